#!/usr/bin/env python3
"""Side by side with pytest-benchmark's ``--benchmark-compare-fail``: who catches a planted slowdown, who cries wolf.

Both gates judge the same workload (the built-in MNIST MLP, batch 64, its amp_bf16 training step
on the CPU, one thread) with the same plants (AMP-only extra CPU work from
``pytest_ampgate.testing.slow_down`` of +15% and +25% of the step, its length calibrated once here
against the gate's timed blocks so both gates get the same plant, and unchanged code), through real pytest runs in subprocesses on a
tiny test project written to a temp dir:

* **pytest-benchmark**: ``pytest --benchmark-save`` into a fresh ``--benchmark-storage``, then each
  run ``pytest --benchmark-compare --benchmark-compare-fail mean:10% median:10%`` (its defaults
  otherwise).  Which field failed is read from its own "Field 'mean' has failed" lines.
* **this gate**: ``pytest --ampgate --ampgate-update`` into a fresh baseline dir, ``--recordings``
  times (default 3, each a fresh process: the baseline pools them, as docs/baselines.md tells a
  user to record it), then each run
  ``pytest --ampgate`` with ``check_speed=True`` (its defaults otherwise, confirming re-run
  included); the verdict is read from ``--ampgate-json``.

Several fresh baselines per condition, each recorded in a fresh process; after each, the plants
run interleaved (gate order alternating, plant order shuffled).  Conditions: ``quiet`` (nothing
started by this script) and ``contention`` (two spinning processes, each on for a random
0.5-3 s and off for as long, so about half the time), with baselines recorded under the same
condition, as a shared runner would.  Each rate's worst case over the baselines is reported.

    python benchmarks/peer_comparison.py             # the full comparison
    python benchmarks/peer_comparison.py --quick     # smallest size: 1 baseline, 1 run per plant, quiet only
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

PLANTS = (0.0, 0.15, 0.25)
"""Slowdowns as fractions of the amp_bf16 step; 0 is unchanged code."""
PEER_FIELDS = ("mean", "median")
TOLERANCE = "10%"
GATES = ("ampgate", "ampgate strict", "mean:10%", "median:10%")
"""``ampgate strict`` is not a separate run: it is what ``--ampgate-strict`` makes of the same
verdicts (an INCONCLUSIVE fails the build too), derived from the ``ampgate`` rows."""

TEST_PROJECT = '''
"""The workload both gates judge; PEER_FRACTION / PEER_WORK_UNITS plant the slowdown."""
import os

import pytest
import torch

from pytest_ampgate import delays, testing
from pytest_ampgate.workloads import get_workload


def workload():
    wl = get_workload("mnist_mlp").with_options(batch_size=64, data_options={"n_train": 2048, "n_test": 512})
    fraction = float(os.environ.get("PEER_FRACTION", "0"))
    if fraction:
        delay_s = int(os.environ["PEER_WORK_UNITS"]) * delays.cpu_work_unit_s()  # the same work in every process
        wl = testing.slow_down(wl, fraction, modes=["amp_bf16"], step_time_s={"amp_bf16": delay_s / fraction}, device="cpu")
    return wl


# min_speedup out of the way: the CPU bf16 step is slower than fp32, and only the baseline tolerance is compared here,
# at the peer's 10% (the CPU's default speedup_tolerance is 25%; the step-time check keeps its CPU default).
# 24 rounds x 20 steps x 2 modes: about 1 s of timed steps, the budget pytest-benchmark gives itself (max_time 1.0 s).
@pytest.mark.amp_regression(modes=["amp_bf16"], check_speed=True, min_speedup=0.01, speedup_tolerance=0.10, rounds=24)
def test_ampgate(ampgate):
    ampgate.run(workload())


def test_peer(benchmark):
    from pytest_ampgate.mode_runner import prepare
    from pytest_ampgate.precision_policy import numerics_policy

    torch.set_num_threads(1)
    wl = workload()
    dataset = wl.dataset("cpu")
    runner = prepare("amp_bf16", wl.model_factory(), wl.optimizer_factory, wl.loss_fn, "cpu")

    def step():
        runner.step(*dataset.batch(runner.steps_taken, wl.batch_size))

    with numerics_policy("amp_bf16"):
        benchmark(step)
'''

PEER_FAILED = re.compile(r"Field '(\w+)' has failed")


def calibrate_plants(fractions) -> dict[float, int]:
    """Units of planted CPU work (``delays.cpu_work``) that slow the amp_bf16 step by each fraction, as the gate's timed blocks measure it.

    Handed to the test processes as a count, not a length: one unit's cost differs from process to
    process on a shared VM (by 15% here), and both gates must get the same work.
    """
    from pytest_ampgate import testing
    from pytest_ampgate.delays import calibration_config, cpu_work_unit_s
    from pytest_ampgate.workloads import get_workload

    wl = get_workload("mnist_mlp").with_options(batch_size=64, data_options={"n_train": 2048, "n_test": 512})
    calibration = calibration_config(20, "cpu")

    def once(f):
        return testing.calibrated_delays(wl, f, modes=["amp_bf16"], device="cpu", calibration=calibration)["amp_bf16"]

    # One calibration on a shared machine can land far off; the median of three is steadier.
    return {f: round(statistics.median(once(f) for _ in range(3)) / cpu_work_unit_s()) for f in fractions if f}


def _spin_on_and_off(seed: int) -> None:
    """One contending process: busy for a random 0.5-3 s, idle as long, until terminated."""
    rng = random.Random(seed)
    while True:
        busy = rng.uniform(0.5, 3.0)
        end = time.perf_counter() + busy
        while time.perf_counter() < end:
            pass
        time.sleep(rng.uniform(0.5, 3.0))


class Contention:
    """Two spinning processes that come and go, for the ``contention`` condition."""

    def __init__(self, on: bool):
        self.on, self.procs = on, []

    def __enter__(self):
        if self.on:
            ctx = multiprocessing.get_context("spawn")
            self.procs = [ctx.Process(target=_spin_on_and_off, args=(seed,), daemon=True) for seed in (1, 2)]
            for p in self.procs:
                p.start()
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.terminate()
            p.join()


@dataclass
class Runner:
    """Runs pytest on the tiny project; one baseline at a time."""

    project: Path
    plants: dict
    log: list = field(default_factory=list)

    def pytest(self, args, fraction: float = 0.0) -> subprocess.CompletedProcess:
        env = dict(os.environ, PEER_FRACTION=str(fraction), PEER_WORK_UNITS=str(self.plants.get(fraction, 0)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
        return subprocess.run(cmd, cwd=self.project, env=env, capture_output=True, text=True, timeout=900)

    def record(self, gate: str, store: Path, recordings: int = 1) -> None:
        """Record ``gate``'s baseline into ``store``: this gate ``recordings`` times, each a fresh
        process (its baseline pools them); pytest-benchmark compares with one saved run, so once."""
        if gate == "ampgate":
            args = [
                "test_peer.py::test_ampgate",
                "--ampgate",
                "--ampgate-update",
                "--ampgate-device",
                "cpu",
                f"--ampgate-baseline-dir={store}",
            ]
        else:
            args = ["test_peer.py::test_peer", f"--benchmark-storage=file://{store}", "--benchmark-save=base"]
        for _ in range(recordings if gate == "ampgate" else 1):
            done = self.pytest(args)
            if done.returncode != 0:
                raise RuntimeError(f"recording the {gate} baseline failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")

    @staticmethod
    def pooled(store: Path) -> int:
        """How many recordings this gate's stored baseline pools (read back from its file, not assumed)."""
        (path,) = store.rglob("test_peer.json")
        (entry,) = json.loads(path.read_text())["tests"]["test_peer.py::test_ampgate"].values()
        return entry["modes"]["amp_bf16"].get("recordings", 1)

    def judge_ampgate(self, store: Path, fraction: float) -> tuple[str, str]:
        report = store / "report.json"
        args = [
            "test_peer.py::test_ampgate",
            "--ampgate",
            "--ampgate-device",
            "cpu",
            f"--ampgate-baseline-dir={store}",
            f"--ampgate-json={report}",
        ]
        done = self.pytest(args, fraction)
        tests = json.loads(report.read_text())["tests"] if report.exists() else []
        if not tests:
            raise RuntimeError(f"the ampgate run wrote no verdict:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        why = "; ".join(f"{c['mode']} {c['metric']}: {c['why']}" for c in tests[0]["checks"] if c["outcome"] != "pass")
        return tests[0]["outcome"].upper(), why

    def judge_peer(self, store: Path, fraction: float) -> tuple[dict[str, str], float]:
        """Each field's verdict, and the run's median step over the baseline's (the plant as it landed)."""
        checks = [f"{f}:{TOLERANCE}" for f in PEER_FIELDS]
        run_json = store / "run.json"
        args = [
            f"--benchmark-json={run_json}",
            "test_peer.py::test_peer",
            f"--benchmark-storage=file://{store}",
            "--benchmark-compare=0001",
            "--benchmark-compare-fail",
            *checks,
        ]
        done = self.pytest(args, fraction)
        failed = set(PEER_FAILED.findall(done.stdout + done.stderr))
        if done.returncode != 0 and not failed:
            raise RuntimeError(f"the pytest-benchmark run failed for another reason:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        saved = next(store.rglob("0001_base.json"))
        median = json.loads(run_json.read_text())["benchmarks"][0]["stats"]["median"]
        ratio = median / json.loads(saved.read_text())["benchmarks"][0]["stats"]["median"]
        return {f"{f}:{TOLERANCE}": "FAIL" if f in failed else "PASS" for f in PEER_FIELDS}, ratio


def write_project(root: Path) -> Path:
    project = root / "project"
    project.mkdir()
    (project / "test_peer.py").write_text(textwrap.dedent(TEST_PROJECT))
    (project / "pytest.ini").write_text("[pytest]\n")
    return project


def run_condition(
    name: str, runner: Runner, work: Path, baselines: int, repeats: int, rng: random.Random, say, recordings: int = 1
) -> list[dict]:
    """Outcomes of every (baseline, plant, gate) run under one condition."""
    rows = []
    with Contention(name == "contention"):
        for b in range(baselines):
            stores = {g: work / f"{name}-{b}-{g}" for g in ("ampgate", "peer")}
            order = ("ampgate", "peer") if b % 2 == 0 else ("peer", "ampgate")
            for gate in order:
                stores[gate].mkdir()
                runner.record(gate, stores[gate], recordings)
            for r in range(repeats):
                plants = list(PLANTS)
                rng.shuffle(plants)
                for i, fraction in enumerate(plants):
                    gates = order if (r + i) % 2 == 0 else order[::-1]
                    for gate in gates:
                        row = {"condition": name, "baseline": b, "plant": fraction}
                        if gate == "ampgate":
                            outcome, why = runner.judge_ampgate(stores["ampgate"], fraction)
                            outcomes = {"ampgate": outcome}
                            pooled = runner.pooled(stores["ampgate"])
                            rows.append({**row, "gate": "ampgate", "outcome": outcome, "why": why, "recordings": pooled})
                        else:
                            outcomes, ratio = runner.judge_peer(stores["peer"], fraction)
                            why = f"median {ratio - 1:+.1%} vs baseline"
                            rows += [{**row, "gate": g, "outcome": o, "median_ratio": ratio} for g, o in outcomes.items()]
                        say(f"{name} baseline {b + 1}/{baselines} run {r + 1}/{repeats} plant +{fraction:.0%}: {outcomes} {why}")
    return rows


def as_strict(rows: list[dict]) -> list[dict]:
    """The ``ampgate`` rows as ``--ampgate-strict`` would end them: an INCONCLUSIVE fails the build too."""
    return [
        {**x, "gate": "ampgate strict", "outcome": "FAIL" if x["outcome"] in ("FAIL", "INCONCLUSIVE") else x["outcome"]}
        for x in rows
        if x["gate"] == "ampgate"
    ]


def worst_rates(rows: list[dict], gate: str) -> dict:
    """Per rate, the worst baseline's value (lowest detection, highest false alarm), as 'k/n'."""
    mine = [x for x in rows + as_strict(rows) if x["gate"] == gate]
    baselines = sorted({x["baseline"] for x in mine})

    def worst(fraction: float, outcome: str, higher_is_worse: bool) -> str:
        shares = []
        for b in baselines:
            runs = [x for x in mine if x["baseline"] == b and x["plant"] == fraction]
            shares.append((sum(x["outcome"] == outcome for x in runs), len(runs)))
        k, n = (max if higher_is_worse else min)(shares, key=lambda s: s[0] / s[1])
        total_k, total_n = sum(s[0] for s in shares), sum(s[1] for s in shares)
        return f"{k}/{n} (all: {total_k}/{total_n})"

    return {
        "+15% caught": worst(0.15, "FAIL", False),
        "+25% caught": worst(0.25, "FAIL", False),
        "unchanged FAIL": worst(0.0, "FAIL", True),
        "unchanged INCONCLUSIVE": worst(0.0, "INCONCLUSIVE", True),
        "+15% INCONCLUSIVE": worst(0.15, "INCONCLUSIVE", True),
        "+25% INCONCLUSIVE": worst(0.25, "INCONCLUSIVE", True),
    }


def table(rows: list[dict], condition: str) -> str:
    cond = [x for x in rows if x["condition"] == condition]
    rates = {g: worst_rates(cond, g) for g in GATES}
    columns = list(rates["ampgate"])
    lines = [
        f"### {condition}: worst baseline of {len({x['baseline'] for x in cond})} (all baselines in brackets)",
        "",
        "| gate | " + " | ".join(columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    names = {
        "ampgate": "pytest-ampgate (check_speed=True)",
        "ampgate strict": "pytest-ampgate, --ampgate-strict (same runs)",
        "mean:10%": "pytest-benchmark mean:10%",
        "median:10%": "pytest-benchmark median:10%",
    }
    for g in GATES:
        lines.append(f"| {names[g]} | " + " | ".join(rates[g][c] for c in columns) + " |")
    landed = []
    for fraction in PLANTS:
        ratios = sorted(x["median_ratio"] for x in cond if x["gate"] == "median:10%" and x["plant"] == fraction)
        if ratios:
            landed.append(f"+{fraction:.0%}: {statistics.median(ratios) - 1:+.1%} (range {ratios[0] - 1:+.1%} to {ratios[-1] - 1:+.1%})")
    lines += ["", "Plants as they landed (pytest-benchmark's median step vs its baseline's, median over runs): " + "; ".join(landed)]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 baseline, 1 run per plant, quiet only")
    parser.add_argument("--baselines", type=int, default=3, help="fresh baselines per condition (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each plant per baseline (default 3)")
    parser.add_argument(
        "--recordings", type=int, default=3, help="--ampgate-update runs pooled into each of this gate's baselines (default 3)"
    )
    parser.add_argument("--conditions", default="quiet,contention", help="comma-separated: quiet, contention")
    parser.add_argument("--json", type=Path, help="write every run's outcome here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    conditions = ["quiet"] if args.quick else [c.strip() for c in args.conditions.split(",") if c.strip()]
    unknown = set(conditions) - {"quiet", "contention"}
    if unknown or min(args.baselines, args.repeats, args.recordings) < 1:
        parser.error(
            f"--conditions takes quiet and/or contention (got {sorted(unknown)}); --baselines, --repeats and --recordings at least 1"
        )
    baselines, repeats = (1, 1) if args.quick else (args.baselines, args.repeats)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    started = time.perf_counter()
    plants = calibrate_plants(PLANTS)
    say("calibrated plants: " + ", ".join(f"+{f:.0%}: {n} units of CPU work" for f, n in plants.items()))
    rows = []
    with tempfile.TemporaryDirectory(prefix="peer_comparison_") as tmp:
        runner = Runner(write_project(Path(tmp)), plants)
        rng = random.Random(args.seed)
        for condition in conditions:
            rows += run_condition(condition, runner, Path(tmp), baselines, repeats, rng, say, args.recordings)
    elapsed = time.perf_counter() - started
    for condition in conditions:
        print(table(rows, condition))
        print()
    print(
        f"{len(rows)} verdicts in {elapsed / 60:.1f} min; this gate's baselines pool {args.recordings} recording(s); plants of CPU work {', '.join(f'+{f:.0%}: {n} units' for f, n in plants.items())}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"plant_units": {str(k): v for k, v in plants.items()}, "recordings": args.recordings, "elapsed_s": elapsed, "rows": rows},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
