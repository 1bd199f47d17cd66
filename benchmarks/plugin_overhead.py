#!/usr/bin/env python3
"""Plugin overhead on a plain run: what installing pytest-ampgate costs a project's
ordinary ``pytest`` run, with no ``--ampgate`` and no gated test.

It times, hyperfine-style, a fresh ``python -m pytest`` subprocess running one trivial test, with
the plugin loaded and with it disabled (``-p no:ampgate``), interleaved (A, B, A, B, ...) so that a
machine shared with other jobs slows both alike, after untimed warm-up runs that fill the OS file
cache.  It prints the median and interquartile range of each and the median of the per-pair
differences (with - without), which is the overhead; the target is at most 50 ms.  It also says
whether torch was imported by the plain run (it must not be).

    python benchmarks/plugin_overhead.py                 # 30 pairs
    python benchmarks/plugin_overhead.py --runs 60 --json overhead.json

The plugin is loaded the way users get it: through its ``pytest11`` entry point when the package
is installed, else with ``-p pytest_ampgate.plugin`` from this checkout (``PYTHONPATH`` is set to
the checkout either way, so the copy measured is this one).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TEST = "def test_trivial():\n    assert 1 + 1 == 2\n"
PROBE = (  # at interpreter exit: after every hook of the session, the plugin's included
    "import atexit, sys\n"
    "def _heavy():\n"
    "    heavy = [m for m in ('torch', 'numpy', 'torchvision', 'matplotlib', 'cpuinfo') if m in sys.modules]\n"
    "    print('\\nHEAVY-MODULES:', ','.join(heavy) or '-', flush=True)\n"
    "atexit.register(_heavy)\n"
)


def _installed() -> bool:
    return any(ep.value == "pytest_ampgate.plugin" for ep in metadata.entry_points(group="pytest11"))


def _command(with_plugin: bool, installed: bool) -> list[str]:
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_trivial.py"]
    if with_plugin:
        return base if installed else [*base, "-p", "pytest_ampgate.plugin"]
    return [*base, "-p", "no:ampgate"] if installed else base


def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _time(cmd: list[str], cwd: str, env: dict) -> tuple[float, float, str]:
    """Wall time and CPU time (user + system) of one run: on a shared machine the CPU time is the
    steadier figure, since waiting for a core counts in the wall time only."""
    cpu0, start = _cpu_children(), time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed, cpu = time.perf_counter() - start, _cpu_children() - cpu0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return elapsed, cpu, done.stdout


def _iqr(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="timed pairs (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed pairs first (default 3)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)

    installed = _installed()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_PLUGINS", None)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "test_trivial.py").write_text(TEST)
        Path(tmp, "conftest.py").write_text(PROBE)
        Path(tmp, "pytest.ini").write_text("[pytest]\n")
        with_cmd, without_cmd = _command(True, installed), _command(False, installed)
        for _ in range(args.warmup):
            _time(with_cmd, tmp, env)
            _time(without_cmd, tmp, env)
        with_s, without_s, with_cpu, without_cpu, heavy = [], [], [], [], set()
        for i in range(args.runs):
            order = [(True, with_cmd), (False, without_cmd)]
            if i % 2:
                order.reverse()  # ABBA: neither side always runs first
            for plugin, cmd in order:
                t, cpu, out = _time(cmd, tmp, env)
                (with_s if plugin else without_s).append(t)
                (with_cpu if plugin else without_cpu).append(cpu)
                if plugin:
                    line = next((ln for ln in out.splitlines() if ln.startswith("HEAVY-MODULES:")), "HEAVY-MODULES: ?")
                    heavy.update(m for m in line.split(":", 1)[1].strip().split(",") if m not in ("-", ""))
    diffs = [a - b for a, b in zip(with_s, without_s)]
    cpu_diffs = [a - b for a, b in zip(with_cpu, without_cpu)]
    result = {
        "runs": args.runs,
        "plugin_loaded_via": "entry point" if installed else "-p pytest_ampgate.plugin",
        "with_plugin_median_s": statistics.median(with_s),
        "with_plugin_iqr_s": _iqr(with_s),
        "without_plugin_median_s": statistics.median(without_s),
        "without_plugin_iqr_s": _iqr(without_s),
        "overhead_median_s": statistics.median(diffs),
        "overhead_iqr_s": _iqr(diffs),
        "with_plugin_cpu_median_s": statistics.median(with_cpu),
        "without_plugin_cpu_median_s": statistics.median(without_cpu),
        "cpu_overhead_median_s": statistics.median(cpu_diffs),
        "cpu_overhead_iqr_s": _iqr(cpu_diffs),
        "bytecode_cache": not env.get("PYTHONDONTWRITEBYTECODE"),
        "heavy_modules_imported": sorted(heavy),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    ms = lambda s: f"{s * 1e3:.0f} ms"  # noqa: E731
    print(f"plain pytest run of one trivial test, {args.runs} interleaved pairs (plugin via {result['plugin_loaded_via']}):")
    print(
        f"  with pytest-ampgate:    median {ms(result['with_plugin_median_s'])} (IQR {ms(result['with_plugin_iqr_s'][0])}-{ms(result['with_plugin_iqr_s'][1])})"
    )
    print(
        f"  with -p no:ampgate:     median {ms(result['without_plugin_median_s'])} (IQR {ms(result['without_plugin_iqr_s'][0])}-{ms(result['without_plugin_iqr_s'][1])})"
    )
    print(
        f"  overhead (paired):      median {ms(result['overhead_median_s'])} (IQR {ms(result['overhead_iqr_s'][0])}-{ms(result['overhead_iqr_s'][1])}); target <= 50 ms"
    )
    print(
        f"  CPU time (user+sys):    median {ms(result['with_plugin_cpu_median_s'])} with, {ms(result['without_plugin_cpu_median_s'])} without; "
        f"overhead median {ms(result['cpu_overhead_median_s'])} (IQR {ms(result['cpu_overhead_iqr_s'][0])}-{ms(result['cpu_overhead_iqr_s'][1])})"
    )
    print(f"  heavy modules imported: {', '.join(result['heavy_modules_imported']) or 'none'}")
    print(
        f"  bytecode cache: {'on' if result['bytecode_cache'] else 'off (PYTHONDONTWRITEBYTECODE is set: every run compiles the plugin)'}"
    )
    print(f"  machine: {result['cpus']} CPUs, load average {result['load_average']}, Python {result['python']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
