"""AMP measurements as pytest-benchmark results, so its JSON, its saved history and
``pytest-benchmark compare`` work on them.

Each gated test contributes one pytest-benchmark entry per mode (fp32 and every compared mode):
the per-step times of its timed rounds summarised by ``pytest_benchmark.stats.Stats`` itself
(``rounds`` = timed rounds, ``iterations`` = steps per round, exactly pytest-benchmark's meaning),
grouped by test so ``compare`` shows fp32 next to each AMP mode, with the speedup and its interval,
peak memory and its ratio, accuracy and the verdict in ``extra_info``, and the GPU in
``machine_info["gpu"]``.

The entries are built with pytest-benchmark's hooks (``pytest_benchmark_update_json`` adds our
entries to whatever it writes; ``pytest_benchmark_update_machine_info`` adds the GPU; the
``generate_*`` hooks build a document), its ``Stats`` class and its ``load_storage`` helper.  Where
that surface falls short we say so: pytest-benchmark saves nothing when no ``benchmark`` fixture
ran (it checks its own private list of benchmarks, and disables itself entirely under
pytest-xdist), so :meth:`BenchmarkBridge.finish` then writes the same document itself, built by
those same hooks, into the ``--benchmark-json`` file (an open file before pytest-benchmark 5.3, a
path from 5.3) and the ``--benchmark-save``/``--benchmark-autosave`` storage; and
``--benchmark-compare-fail`` compares pytest-benchmark's own in-session benchmarks only, so it never
sees these entries (the gate's verdicts are what fail a build).  Supported: pytest-benchmark 5.x.
Nothing here imports pytest.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from typing import Any

from . import paths

ENTRY_MARK = "ampgate"
"""``extra_info["ampgate"]`` is True on our entries (so scripts can tell them from real benchmarks)."""


def _with_mode(name: str, mode: str) -> str:
    """``test_a`` -> ``test_a[amp_fp16]``; ``test_a[p1]`` -> ``test_a[p1-amp_fp16]`` (pytest's own style)."""
    return f"{name[:-1]}-{mode}]" if name.endswith("]") else f"{name}[{mode}]"


def entries(results: Iterable) -> list[dict]:
    """pytest-benchmark entries (the shape of ``Metadata.as_dict(include_data=True)``) for gated results."""
    from pytest_benchmark.stats import Stats

    from .figures import figures_of, finite

    out = []
    for r in results:
        m = r.measurements
        for f in figures_of(r):
            mm = f.measurement
            if not mm.step_times_s:  # unsupported or failed modes have no timings to compare
                continue
            stats = Stats()
            for t in mm.step_times_s:
                stats.update(t)
            stat_dict = {**stats.as_dict(), "data": list(stats.data), "iterations": m.config.steps_per_block}
            speedup = f.speedup
            extra = {
                ENTRY_MARK: True,
                "test_id": r.test_id,
                "mode": f.mode,
                "reference_mode": m.reference.mode,
                "workload": m.workload,
                "batch_size": m.batch_size,
                "device": m.device,
                "env_key": r.env_key,
                "speedup": finite(speedup.median) if speedup else (1.0 if f.reference else None),
                "speedup_low": finite(speedup.low) if speedup else None,
                "speedup_high": finite(speedup.high) if speedup else None,
                "speedup_confidence": finite(speedup.confidence) if speedup else None,
                "peak_memory_bytes": f.peak_memory_bytes,
                "memory_ratio": None if f.reference else finite(f.memory_ratio),
                "accuracy": finite(f.accuracy),
                "baseline_accuracy": finite(f.baseline_accuracy),
                "final_loss": finite(f.final_loss),
                "nonfinite_steps": f.nonfinite_steps,
                "low_precision_share": finite(f.low_precision_share),
                "outcome": f.outcome,
                "verdict": r.verdict.outcome,
            }
            name = r.test_id.rsplit("::", 1)[-1]
            out.append(
                {
                    "group": f"ampgate: {r.test_id}",
                    "name": _with_mode(name, f.mode),
                    "fullname": _with_mode(r.test_id, f.mode),
                    "params": {"mode": f.mode},
                    "param": f.mode,
                    "extra_info": extra,
                    "options": {
                        "timer": "cuda events" if m.device.startswith("cuda") else "time.perf_counter",
                        "warmup_steps": m.config.warmup_steps,
                        "rounds": m.config.rounds,
                        "steps_per_block": m.config.steps_per_block,
                        "interleaving": "ABBA",
                    },
                    "stats": stat_dict,
                }
            )
    return out


def machine_info_extra(environment: Any, device: str) -> dict:
    """What pytest-benchmark's machine_info lacks for GPU work: the GPU and the torch stack.

    ``environment`` is the fingerprint of where the run happened (a record, or its dict), or None.
    """
    from ..records import to_dict

    env = to_dict(environment) if environment else {}
    gpu = None
    if env.get("device_type") == "cuda":
        gpu = {
            "name": env.get("device_name"),
            "compute_capability": env.get("compute_capability"),
            "count": env.get("gpu_count"),
            "driver_version": env.get("driver_version"),
            "cuda_version": env.get("cuda_version"),
            "cudnn_version": env.get("cudnn_version"),
        }
    return {
        "gpu": gpu,
        "ampgate": {
            "device": device,
            "device_name": env.get("device_name"),
            "torch_version": env.get("torch_version"),
            "tf32": env.get("tf32"),
        },
    }


class BenchmarkBridge:
    """pytest-benchmark hook implementations, registered by the plugin when pytest-benchmark is active."""

    def __init__(self, config: Any, gate: Any):
        self.config = config
        self.gate = gate
        self.included = False
        if any(self._requested()):
            # pytest-benchmark warns that it saves nothing when no benchmark fixture ran, outside
            # pytest's warning capture; finish() then saves our entries and says so itself.
            warnings.filterwarnings("ignore", message="Not saving anything, no benchmarks have been run")

    def _requested(self) -> tuple:
        config = self.config
        save = config.getoption("benchmark_save", None) or config.getoption("benchmark_autosave", None)
        return config.getoption("benchmark_json", None), save

    def _environment(self) -> Any:
        if self.gate.results:
            return self.gate.results[0].measurements.environment
        if self.config.pluginmanager.hasplugin("dsession"):
            return None  # the xdist controller must not touch the GPU the workers time on
        try:
            return self.gate.environment()
        except Exception:
            return None

    def pytest_benchmark_update_machine_info(self, config, machine_info):
        machine_info.update(machine_info_extra(self._environment(), self.gate.options.device))

    def pytest_benchmark_update_json(self, config, benchmarks, output_json):
        output_json.setdefault("benchmarks", []).extend(entries(self.gate.results))
        self.included = True

    def finish(self) -> list[str]:
        """Write our entries where pytest-benchmark wrote nothing; returns lines for the terminal."""
        config = self.config
        wants_json, save = self._requested()
        if self.included or not (wants_json or save):
            return []
        if not self.gate.results:
            return ["pytest-benchmark: nothing saved, no benchmark or gated test produced a result"]
        hook = config.hook
        machine_info = hook.pytest_benchmark_generate_machine_info(config=config)
        hook.pytest_benchmark_update_machine_info(config=config, machine_info=machine_info)
        commit_info = hook.pytest_benchmark_generate_commit_info(config=config)
        hook.pytest_benchmark_update_commit_info(config=config, commit_info=commit_info)
        output = hook.pytest_benchmark_generate_json(
            config=config, benchmarks=[], include_data=True, machine_info=machine_info, commit_info=commit_info
        )
        hook.pytest_benchmark_update_json(config=config, benchmarks=[], output_json=output)
        count = sum(1 for b in output.get("benchmarks", []) if b.get("extra_info", {}).get(ENTRY_MARK))
        lines = []
        text = json.dumps(output, indent=4, ensure_ascii=True, default=str).encode()
        if wants_json:
            if hasattr(wants_json, "write"):  # pytest-benchmark < 5.3: argparse opened the file already
                with wants_json as fh:
                    fh.write(text)
            else:  # pytest-benchmark >= 5.3 hands over the path
                paths.save(wants_json, text)
            lines.append(f"pytest-benchmark JSON: {count} AMP entries written to {getattr(wants_json, 'name', wants_json)}")
        if save:
            from pytest_benchmark.logger import Logger
            from pytest_benchmark.utils import get_machine_id, load_storage

            storage = load_storage(
                config.getoption("benchmark_storage"),
                logger=Logger(Logger.QUIET, config=config),
                default_machine_id=get_machine_id(),
                netrc=config.getoption("benchmark_netrc", ""),
            )
            storage.save(output, save)
            lines.append(f"pytest-benchmark storage: {count} AMP entries saved as run {save!r} in {storage}")
        return lines
