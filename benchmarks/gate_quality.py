#!/usr/bin/env python3
"""Gate quality: how often the gate raises a false alarm, and how often it catches a real regression.

It runs the whole gate (``pytest_ampgate.gate.decide``: measure, judge, re-measure before a timing
FAIL) many times per workload and counts outcomes:

* **A/A control**: fp32 against fp32.  Configured as "a mode against a baseline of itself": the
  speedup floor is ``1 - speedup_tolerance`` and the memory limit ``1 + memory_tolerance``.  It
  must never FAIL; INCONCLUSIVE is how the gate says the timing was too noisy.
* **unchanged vs baseline**: the AMP modes of the unplanted workload against a baseline recorded
  like ``--ampgate-update``, with the same protocol, in a fresh process.  The false-alarm rate of
  real use.  There are ``--baselines`` of them (default 3), each recorded in a new process, and
  every scenario runs against each: a baseline is one measurement, as uncertain as the runs it
  judges, so a rate is reported per baseline and the targets take the worst.
* **planted regressions** (:mod:`pytest_ampgate.testing`): a slowdown and a memory plant at
  several sizes relative to the tolerance (0.5x, 1x, 1.5x, 2x), and the forced-fp32 layer, the
  fp16-only loss overflow and the collapsing loss scale; and the regressions common to every mode
  (fp32 too), which the ratios cannot see: a slowdown of k x ``step_time_tolerance`` and a memory
  growth of k x ``peak_memory_tolerance`` of fp32's peak, caught by each mode's own baseline check.  Detection = the share of (run, mode)
  pairs in which the plant's own check FAILs; "other FAIL" counts failures of any other check.

For the tolerance scenarios the absolute margins are set out of the way (``min_speedup=0.01``,
``max_memory_ratio=100``), so what is measured is the baseline-relative floor the tolerances set.
Deterministic plants (coverage, overflow, scale collapse) run with a short numerics protocol.

On the CPU it runs every scenario with the CPU's clock (the thread's CPU time) on one thread, the
tolerances in force on the CPU (``config.SPEEDUP_TOLERANCE``, ``STEP_TIME_TOLERANCE``), the
slowdown plant as extra CPU work (``delays.cpu_work``) and peak memory from the profiler's window;
the default-gate wall time is a CUDA figure.

    python benchmarks/gate_quality.py                          # GPU if there is one, else CPU
    python benchmarks/gate_quality.py --device cuda --json gate_quality.json
    python benchmarks/gate_quality.py --device cpu --quick      # a minute-sized smoke run
    python benchmarks/gate_quality.py --device cuda --rounds 6 --steps-per-block 20   # try a protocol
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

from pytest_ampgate import testing
from pytest_ampgate.baselines import Baseline
from pytest_ampgate.config import GateConfig
from pytest_ampgate.delays import calibration_config
from pytest_ampgate.env import fingerprint
from pytest_ampgate.gate import baseline_from, decide, evaluate, record
from pytest_ampgate.measurement import measure
from pytest_ampgate.recordings import joined
from pytest_ampgate.records import to_dict
from pytest_ampgate.verdict import FAIL, INCONCLUSIVE
from pytest_ampgate.workloads import get_workload

SIZES = (0.5, 1.0, 1.5, 2.0)
"""Planted sizes, as multiples of the tolerance (speedup_tolerance, memory_tolerance)."""

TARGETS = {
    "aa_fail": 0.005,
    "aa_inconclusive": 0.02,
    "slowdown_1.5x": 0.95,
    "slowdown_2x": 0.99,
    "memory_2x": 1.0,
    "common_2x": 0.95,
    "force_fp32_layer": 1.0,
    "default_gate_s": 30.0,
}


@dataclass(frozen=True)
class Profile:
    """How much to run on one device: workloads and their sizes, the protocols, the repetitions."""

    device: str
    workloads: dict
    timed_modes: tuple
    protocol: dict
    numerics_protocol: dict
    aa_repeats: int
    plant_repeats: int
    numeric_repeats: int
    sizes: tuple = SIZES
    threads: int | None = None
    confirm: bool = True


NUMERICS = {"warmup_steps": 2, "rounds": 2, "steps_per_block": 10, "memory_steps": 2}
"""1 + 2 + 20 steps: enough for a GradScaler that halves every step to fall from 65536 below 1."""


def profile_for(device: str, quick: bool) -> Profile:
    if device == "cuda":
        protocol = {f: getattr(GateConfig(), f) for f in ("warmup_steps", "rounds", "steps_per_block", "memory_steps")}
        if quick:
            protocol = {"warmup_steps": 3, "rounds": 6, "steps_per_block": 10, "memory_steps": 2}
        return Profile(
            device="cuda",
            workloads={"mnist_mlp": {}, "cifar_cnn": {}},
            timed_modes=("amp_fp16", "amp_bf16"),
            protocol=protocol,
            numerics_protocol=NUMERICS,
            aa_repeats=3 if quick else 30,
            plant_repeats=2 if quick else 20,
            numeric_repeats=1 if quick else 5,
            sizes=(1.0, 2.0) if quick else SIZES,
        )
    # CPU: a small MNIST MLP on one thread (on a shared 2-core machine, torch's own thread pool
    # fighting other processes is most of the noise); amp_bf16 is the CPU's useful AMP mode.
    # 30 rounds: at 10 the speedup's interval was 12-19% wide on the quiet CI VM; at 30, 3-4% wide,
    # and with the CPU's tolerances every target was met in three runs (BENCHMARKS.md, gate quality).
    return Profile(
        device="cpu",
        workloads={"mnist_mlp": {"batch_size": 64, "data_options": {"n_train": 2048, "n_test": 512}}},
        timed_modes=("amp_bf16",),
        protocol={"warmup_steps": 1, "rounds": 6, "steps_per_block": 5, "memory_steps": 1}
        if quick
        else {"warmup_steps": 5, "rounds": 30, "steps_per_block": 20, "memory_steps": 1},
        numerics_protocol={**NUMERICS, "memory_steps": 0},
        aa_repeats=3 if quick else 100,
        plant_repeats=2 if quick else 30,
        numeric_repeats=1 if quick else 3,
        sizes=(1.0, 2.0) if quick else SIZES,
        threads=1,
    )


@dataclass
class Tally:
    """Outcomes of one scenario against one baseline: counts, and the speedup figures of every run's first measurement."""

    workload: str
    scenario: str
    size: float | None = None
    expected: list = field(default_factory=list)
    """(mode, metric) pairs the plant must FAIL; empty for controls."""
    consequences: tuple = ()
    """Checks that may fail as the plant's consequence (PlantInfo.consequences): not counted as other FAILs."""
    runs: int = 0
    fail: int = 0
    inconclusive: int = 0
    detected: int = 0
    chances: int = 0
    other_fail: int = 0
    speedups: list = field(default_factory=list)
    speedup_modes: list = field(default_factory=list)
    widths: list = field(default_factory=list)
    walls: list = field(default_factory=list)
    step_times: dict = field(default_factory=dict)
    """Per timed mode, the median step time of every run (seconds)."""
    example: str = ""
    note: str = ""
    drop: float | None = None
    """Slowdown rows: the speedup drop measured against the unchanged runs (the plant's real size)."""
    baseline: int = 1
    """Which fresh baseline (1..N) the runs were judged against."""

    def add(self, measurements, verdict, wall: float, timed_modes) -> None:
        self.runs += 1
        self.walls.append(wall)
        outcome = verdict.outcome
        self.fail += outcome == FAIL
        self.inconclusive += outcome == INCONCLUSIVE
        failed = {(c.mode, c.metric) for c in verdict.of(FAIL)}
        expected = {tuple(e) for e in self.expected}
        modes = sorted({m for m, _ in expected})
        for mode in modes:
            self.chances += 1
            self.detected += all((mode, metric) in failed for m, metric in expected if m == mode)
        self.other_fail += bool({f for f in failed if f not in expected and f[1] not in self.consequences})
        if failed and not self.example:
            fails = verdict.of(FAIL)
            self.example = next((c.why for c in fails if (c.mode, c.metric) in expected), fails[0].why)
        for mode in timed_modes:
            comparison = measurements.comparisons.get(mode)
            if comparison is not None and comparison.speedup is not None:
                self.speedups.append(comparison.speedup.median)
                self.speedup_modes.append(mode)
                self.widths.append(comparison.speedup.relative_width)
                self.step_times.setdefault(mode, []).append(measurements.modes[mode].step_time_s)

    def rate(self, count: int, of: int | None = None) -> float | None:
        of = self.runs if of is None else of
        return count / of if of else None

    def summary(self) -> dict:
        mean = statistics.fmean(self.speedups) if self.speedups else None
        sd = statistics.stdev(self.speedups) if len(self.speedups) > 1 else None
        return {
            "workload": self.workload,
            "baseline": self.baseline,
            "scenario": self.scenario,
            "size_x_tolerance": self.size,
            "runs": self.runs,
            "fail_rate": self.rate(self.fail),
            "inconclusive_rate": self.rate(self.inconclusive),
            "detection_rate": self.rate(self.detected, self.chances) if self.expected else None,
            "other_fail_rate": self.rate(self.other_fail) if self.expected else None,
            "speedup_mean": mean,
            "speedup_run_to_run_cv": sd / mean if sd is not None and mean else None,
            "ci_relative_width_median": statistics.median(self.widths) if self.widths else None,
            "wall_s_median": statistics.median(self.walls) if self.walls else None,
            "wall_s_total": sum(self.walls),
            "measured_speedup_drop": self.drop,
            "example": self.example,
            "note": self.note,
        }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


COLUMNS = [
    "workload",
    "baseline",
    "scenario",
    "size",
    "measured drop",
    "runs",
    "FAIL",
    "INCONCL",
    "detected",
    "other FAIL",
    "speedup",
    "run-to-run cv",
    "CI width",
    "wall/run",
]


def table(tallies: list[Tally]) -> str:
    rows = []
    for t in tallies:
        s = t.summary()
        rows.append(
            [
                t.workload,
                str(t.baseline),
                t.scenario,
                "-" if t.size is None else f"{t.size:g}x tol",
                _pct(t.drop),
                str(t.runs),
                _pct(s["fail_rate"]),
                _pct(s["inconclusive_rate"]),
                _pct(s["detection_rate"]),
                _pct(s["other_fail_rate"]),
                _num(s["speedup_mean"], ".3f"),
                _pct(s["speedup_run_to_run_cv"]),
                _pct(s["ci_relative_width_median"]),
                _num(s["wall_s_median"], ".2f") + " s",
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(COLUMNS, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(COLUMNS), line(["-" * w for w in widths]), *(line(r) for r in rows)])


class Runner:
    """Runs the gate on one workload; every scenario goes through ``decide`` as a gated test does."""

    def __init__(self, profile: Profile, name: str, say):
        self.profile = profile
        self.say = say
        self.workload = get_workload(name).with_options(**profile.workloads[name])
        self.dataset = self.workload.dataset(profile.device)
        self.tol = GateConfig().speedup_tolerance_on(profile.device)
        self.mem_tol = GateConfig().memory_tolerance
        self.memory = profile.protocol.get("memory_steps", 0) > 0  # measured on the CPU too (profiler allocation events)
        base = dict(check_speed=True, check_memory=self.memory, missing_baseline="ignore", confirm=profile.confirm, **profile.protocol)
        self.timed = GateConfig(modes=profile.timed_modes, min_speedup=0.01, max_memory_ratio=100.0, **base)
        self.aa = GateConfig(modes=("fp32",), min_speedup=1 - self.tol, max_memory_ratio=1 + self.mem_tol, **base)
        numerics = dict(check_speed=False, check_memory=False, missing_baseline="ignore", **profile.numerics_protocol)
        self.numerics = GateConfig(modes=("amp_fp16", "amp_bf16"), **numerics)
        self.env = fingerprint(profile.device)
        self.baseline = None
        self.baseline_measurements = None
        self.baseline_peak_fp32 = None
        self.baseline_index = 1
        self.baseline_offsets: dict = {}
        self.step_tol = GateConfig().step_time_tolerance_on(profile.device)
        self.peak_tol = GateConfig().peak_memory_tolerance

    def once(self, workload, config: GateConfig):
        return lambda: measure(workload, config.modes, device=self.profile.device, config=config.measure_config(), dataset=self.dataset)

    def gate(self, workload, config: GateConfig, baseline=None):
        started = time.perf_counter()
        measurements, verdict = decide(self.once(workload, config), config, baseline)
        return measurements, verdict, time.perf_counter() - started

    def repeat(self, tally: Tally, workload, config: GateConfig, repeats: int, baseline=None) -> Tally:
        for i in range(repeats):
            m, verdict, wall = self.gate(workload, config, baseline)
            tally.add(m, verdict, wall, config.modes if config.check_speed else ())
            self.say(
                f"  {tally.workload} {tally.scenario} {'' if tally.size is None else f'{tally.size:g}x '}run {i + 1}/{repeats}: {verdict.outcome} ({wall:.2f} s)"
            )
        return tally

    def record_baseline(self) -> dict:
        """What --ampgate-update would store (``gate.record``: the protocol's runs pooled), in this process."""
        started = time.perf_counter()
        m = record(self.once(self.workload, self.timed), self.timed)
        verdict = evaluate(m, self.timed, recording=True)
        wall = time.perf_counter() - started
        self.baseline_measurements = m
        self.baseline = baseline_from(m, f"gate_quality::{self.workload.name}", self.env.key(), {})
        return self._baseline_info(m, verdict, wall)

    def record_baseline_in_a_fresh_process(self, parent_argv: list[str], pool: bool = False) -> dict:
        """As a user's ``--ampgate-update`` is: a new process (its own allocator, caches, clocks), the baseline read back.

        One in-process baseline shares this process's warm state with every run judged against it;
        a user's baseline never does, and its error is what the published rates must survive.
        ``pool``: join the recording to the baseline recorded so far, as a repeated update does.
        """
        proc = subprocess.run(
            [sys.executable, __file__, *parent_argv, "--record-baseline", "1", "--workloads", self.workload.name],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(self.profile.threads or os.environ.get("OMP_NUM_THREADS", ""))},
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("BASELINE ")]
        if proc.returncode or not lines:
            raise SystemExit(f"recording a baseline in a fresh process failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        data = json.loads(lines[-1][len("BASELINE ") :])
        fresh = Baseline.from_entry(f"gate_quality::{self.workload.name}", self.env.key(), data["entry"], "fresh baseline")
        self.baseline, how = joined(self.baseline if pool else None, fresh, self.timed, self.profile.device)
        self.baseline_peak_fp32 = data["fp32_peak_bytes"]
        return {**data["info"], "pooled": how}

    def record_pooled_baseline(self, parent_argv: list[str], recordings: int) -> dict:
        """A baseline as docs/baselines.md tells a user to record it: ``recordings`` runs of
        ``--ampgate-update``, each a fresh process, pooled (:mod:`pytest_ampgate.recordings`)."""
        infos = [self.record_baseline_in_a_fresh_process(parent_argv, pool=i > 0) for i in range(recordings)]
        return {**infos[-1], "recordings": [{m: info[m]["speedup"] for m in self.timed.modes} for info in infos]}

    def _baseline_info(self, m, verdict, wall) -> dict:
        info = {"wall_s": wall, "outcome": verdict.outcome}
        for mode in self.timed.modes:
            c = m.comparisons[mode]
            info[mode] = {
                "speedup": c.speedup.describe() if c.speedup else None,
                "memory_ratio": c.memory_ratio,
                "step_time_s": m.modes[mode].step_time_s,
            }
        info["fp32"] = {"step_time_s": m.reference.step_time_s, "peak_memory_bytes": m.reference.peak_memory_bytes}
        return info

    def tally(self, scenario: str, size: float | None = None, expected=(), **kwargs) -> Tally:
        return Tally(self.workload.name, scenario, size, list(expected), baseline=self.baseline_index, **kwargs)

    def scenarios(self, numerics: bool = True) -> list[Tally]:
        p = self.profile
        out = [self.repeat(self.tally("A/A fp32 vs fp32"), self.workload, self.aa, p.aa_repeats)]
        unchanged = self.repeat(self.tally("unchanged vs baseline"), self.workload, self.timed, p.aa_repeats, self.baseline)
        out.append(unchanged)
        for mode in self.timed.modes:  # the baseline is one run: how far its draw lies from the typical run
            stored = self.baseline.modes[mode].speedup
            typical = statistics.median(s for s, m in zip(unchanged.speedups, unchanged.speedup_modes) if m == mode)
            self.baseline_offsets[mode] = stored / typical - 1
        # The plant calibrates itself against the drop it really causes, in the gate's own timed
        # blocks: on CUDA a host spin plus a GPU sleep (a launch-bound step would hide a GPU sleep
        # alone), on the CPU a count of small elementwise fp32 ops (delays.cpu_work).
        calibration = calibration_config(p.protocol["steps_per_block"], p.device)
        for k in p.sizes:
            fraction = testing.slowdown_for_drop(k * self.tol)
            planted = testing.slow_down(self.workload, fraction, modes=self.timed.modes, device=p.device, calibration=calibration)
            tally = self.tally(
                "slowdown",
                k,
                [(m, "speedup") for m in self.timed.modes],
                note=f"+{fraction:.1%} of the step",
                consequences=("step_time",),  # the slowed mode's own step time rises too: a second true alarm
            )
            self.repeat(tally, planted, self.timed, p.plant_repeats, self.baseline)
            if tally.speedups and unchanged.speedups:
                tally.drop = 1 - statistics.fmean(tally.speedups) / statistics.fmean(unchanged.speedups)
            out.append(tally)
        every = ("fp32", *self.timed.modes)
        for k in p.sizes:  # every mode alike: the ratios cannot see it, each mode's own baseline must
            fraction = k * self.step_tol
            planted = testing.slow_down(self.workload, fraction, modes=every, device=p.device, calibration=calibration)
            tally = self.tally("common slowdown", k, [(m, "step_time") for m in every], note=f"+{fraction:.0%} of every mode's step")
            out.append(self.repeat(tally, planted, self.timed, p.plant_repeats, self.baseline))
        if self.memory:
            fp32_peak = self.baseline_peak_fp32 or self.baseline.modes["fp32"].peak_memory_bytes
            for k in p.sizes:
                extra = math.ceil(k * self.mem_tol * fp32_peak)
                planted = testing.retain_activation(self.workload, extra, modes=self.timed.modes)
                tally = self.tally(
                    "memory", k, [(m, "memory") for m in self.timed.modes], note=f"+{extra / 2**20:.2f} MiB", consequences=("peak_memory",)
                )
                out.append(self.repeat(tally, planted, self.timed, p.plant_repeats, self.baseline))
            for k in p.sizes:
                extra = math.ceil(k * self.peak_tol * fp32_peak)
                planted = testing.retain_activation(self.workload, extra, modes=every)
                tally = self.tally("common memory", k, [(m, "peak_memory") for m in every], note=f"+{extra / 2**20:.2f} MiB in every mode")
                out.append(self.repeat(tally, planted, self.timed, p.plant_repeats, self.baseline))
        if not numerics:
            return out
        layer = testing.largest_layer(self.workload)
        for scenario, planted, info in (
            (f"forced fp32 layer {layer}", testing.force_fp32_layer(self.workload), testing.PLANTS["force_fp32_layer"]),
            ("fp16 loss overflow", testing.overflow_in_fp16(self.workload), testing.PLANTS["overflow_in_fp16"]),
            ("loss scale collapse", testing.collapse_loss_scale(self.workload), testing.PLANTS["collapse_loss_scale"]),
        ):
            expected = [(m, metric) for m in info.modes if m in self.numerics.modes for metric in info.metrics]
            out.append(
                self.repeat(self.tally(scenario, None, expected, consequences=info.consequences), planted, self.numerics, p.numeric_repeats)
            )
        return out

    def default_gate(self) -> float:
        """Wall time of one default gate run (fp32 + amp_fp16 + amp_bf16, default protocol) on this workload."""
        config = GateConfig(missing_baseline="ignore")
        _m, verdict, wall = self.gate(self.workload, config, self.baseline)
        self.say(f"  {self.workload.name} default gate: {verdict.outcome} in {wall:.2f} s")
        return wall


def targets(tallies: list[Tally], default_gate_s: float | None) -> list[tuple[str, str, str, bool | None]]:
    """(target, required, measured, met) for each of the targets that this run measured."""
    rows = []

    def worst(pred, key, higher_is_better: bool):
        values = [t.summary()[key] for t in tallies if pred(t) and t.runs]
        values = [v for v in values if v is not None]
        if not values:
            return None
        return min(values) if higher_is_better else max(values)

    def add(label, required, value, ok):
        rows.append(
            (
                label,
                required,
                "-" if value is None else (f"{value:.1f} s" if label.startswith("default") else f"{value:.1%}"),
                None if value is None else ok(value),
            )
        )

    aa = lambda t: t.scenario.startswith("A/A") or t.scenario.startswith("unchanged")  # noqa: E731
    v = worst(aa, "fail_rate", False)
    add("A/A and unchanged: FAIL rate", "0 (< 0.5%)", v, lambda x: x == 0)
    v = worst(aa, "inconclusive_rate", False)
    add("A/A and unchanged: INCONCLUSIVE rate", "< 2%", v, lambda x: x < TARGETS["aa_inconclusive"])
    v = worst(lambda t: t.scenario == "slowdown" and t.size == 1.5, "detection_rate", True)
    add("slowdown at 1.5x tolerance detected", ">= 95%", v, lambda x: x >= TARGETS["slowdown_1.5x"])
    v = worst(lambda t: t.scenario == "slowdown" and t.size == 2.0, "detection_rate", True)
    add("slowdown at 2x tolerance detected", ">= 99%", v, lambda x: x >= TARGETS["slowdown_2x"])
    v = worst(lambda t: t.scenario == "memory" and t.size == 2.0, "detection_rate", True)
    add("memory plant at 2x tolerance detected", "100%", v, lambda x: x >= 1.0)
    v = worst(lambda t: t.scenario == "common slowdown" and t.size == 2.0, "detection_rate", True)
    add("slowdown common to every mode at 2x tolerance detected", ">= 95%", v, lambda x: x >= TARGETS["common_2x"])
    v = worst(lambda t: t.scenario == "common memory" and t.size == 2.0, "detection_rate", True)
    add("memory growth common to every mode at 2x tolerance detected", ">= 95%", v, lambda x: x >= TARGETS["common_2x"])
    v = worst(lambda t: t.scenario.startswith("forced fp32"), "detection_rate", True)
    add("forced-fp32 layer caught by coverage", "100%", v, lambda x: x >= 1.0)
    add("default gate, both workloads", "< 30 s (H100)", default_gate_s, lambda x: x < TARGETS["default_gate_s"])
    return rows


def _without(argv: list[str], with_value: set[str], flags: set[str]) -> list[str]:
    """``argv`` less the named options (and their values): what a fresh baseline's process is started with."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in with_value:
            skip = "=" not in arg
            continue
        if name not in flags:
            out.append(arg)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--repeats", type=int, default=None, help="A/A and unchanged-vs-baseline gate runs per workload")
    parser.add_argument("--plant-repeats", type=int, default=None, help="gate runs per planted slowdown/memory size")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few repeats, short protocol, sizes 1x and 2x only")
    parser.add_argument("--workloads", default=None, help="comma-separated built-in workloads (default: the profile's)")
    parser.add_argument("--sizes", default=None, help="planted sizes in multiples of the tolerance, e.g. 0.5,1,1.5,2")
    parser.add_argument("--rounds", type=int, default=None, help="override the timed protocol's rounds (to choose its defaults)")
    parser.add_argument("--steps-per-block", type=int, default=None, help="override the timed protocol's steps per block")
    parser.add_argument("--warmup", type=int, default=None, help="override the timed protocol's warm-up steps")
    parser.add_argument(
        "--baseline-runs", type=int, default=None, help="measurements pooled into each recorded baseline (default: the setting's)"
    )
    parser.add_argument("--no-confirm", action="store_true", help="judge timing on one measurement (to see what confirmation buys)")
    parser.add_argument("--json", default=None, help="write every figure to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    parser.add_argument(
        "--baselines", type=int, default=None, help="fresh baselines, each recorded in a new process (default 3, --quick 1)"
    )
    parser.add_argument(
        "--recordings",
        type=int,
        default=None,
        help="--ampgate-update runs (each a fresh process) pooled into each baseline (default 3, --quick 2)",
    )
    parser.add_argument("--record-baseline", default=None, help=argparse.SUPPRESS)  # the child process of one fresh baseline
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("gate_quality: --device cuda but no CUDA device is available; use --device cpu", file=sys.stderr)
        return 2
    profile = profile_for(device, args.quick)
    changes = {}
    if args.repeats is not None:
        changes["aa_repeats"] = max(1, args.repeats)
    if args.plant_repeats is not None:
        changes["plant_repeats"] = max(1, args.plant_repeats)
    if args.workloads:
        names = [n.strip() for n in args.workloads.split(",") if n.strip()]
        sizes = {**profile_for(device, args.quick).workloads}
        changes["workloads"] = {n: sizes.get(n, {}) for n in names}
    if args.sizes:
        changes["sizes"] = tuple(float(x) for x in args.sizes.split(",") if x.strip())
    protocol = dict(profile.protocol)
    for key, value in (("rounds", args.rounds), ("steps_per_block", args.steps_per_block), ("warmup_steps", args.warmup)):
        if value is not None:
            protocol[key] = value
    if args.baseline_runs is not None:
        protocol["baseline_runs"] = max(1, args.baseline_runs)
    changes["protocol"] = protocol
    changes["confirm"] = not args.no_confirm
    profile = replace(profile, **changes)
    if profile.threads:
        torch.set_num_threads(profile.threads)
    say = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    if args.record_baseline is not None:  # a fresh process, as --ampgate-update is: record, print, exit
        [name] = profile.workloads
        runner = Runner(profile, name, lambda _m: None)
        info = runner.record_baseline()
        out = {
            "entry": runner.baseline.to_entry(),
            "fp32_peak_bytes": runner.baseline_measurements.reference.peak_memory_bytes,
            "info": info,
        }
        print("BASELINE " + json.dumps(out, default=str))
        return 0
    n_baselines = args.baselines or (1 if args.quick else 3)
    child_argv = _without(argv, {"--workloads", "--json", "--baselines", "--recordings"}, {"--quiet"})
    recordings = args.recordings or (2 if args.quick else 3)
    if recordings < 1:
        parser.error("--recordings must be at least 1")

    env = fingerprint(device)
    started = time.perf_counter()
    print(f"gate quality on {env.device_name} ({device}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"protocol {profile.protocol}, confirm {profile.confirm}; numerics protocol {profile.numerics_protocol}")
    print(
        f"repeats: A/A and unchanged {profile.aa_repeats}, per planted size {profile.plant_repeats}, deterministic plants "
        f"{profile.numeric_repeats}; {n_baselines} fresh baseline(s), each pooled from {recordings} recording(s) in new "
        "processes; every rate is reported "
        "per baseline and the targets take the worst"
    )
    tallies, baselines, default_walls = [], {}, {}
    for name in profile.workloads:
        runner = Runner(profile, name, say)
        baselines[name] = []
        for b in range(1, n_baselines + 1):
            runner.baseline_index = b
            say(f"{name}: recording baseline {b} in a fresh process")
            info = runner.record_pooled_baseline(child_argv, recordings)
            shown = "; ".join(f"{m} {info[m]['speedup']}" for m in profile.timed_modes)
            stored = {m: runner.baseline.modes[m] for m in profile.timed_modes if m in runner.baseline.modes}
            shown += f" ({info['pooled']}; stored: " + ", ".join(
                f"{m} {b.speedup:.3f} [{b.speedup_low:.3f}-{b.speedup_high:.3f}]" for m, b in stored.items() if b.speedup is not None
            )
            shown += ")"
            print(f"{name}: batch {runner.workload.batch_size}, baseline {b}: {shown}")
            tallies += runner.scenarios(numerics=b == 1)
            info["offset_from_typical"] = dict(runner.baseline_offsets)
            baselines[name].append(info)
            print(
                f"{name}: baseline {b}'s speedup vs the median unchanged run: "
                + ", ".join(f"{m} {o:+.1%}" for m, o in runner.baseline_offsets.items())
            )
        if device == "cuda":
            default_walls[name] = runner.default_gate()
    default_gate_s = sum(default_walls.values()) if default_walls else None

    print()
    print(table(tallies))
    print()
    if default_walls:
        print(
            "default gate wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in default_walls.items()) + f"; total {default_gate_s:.1f} s"
        )
    print("targets (the worst over the baselines):")
    for label, required, measured, ok in targets(tallies, default_gate_s):
        word = "not measured here" if ok is None else ("met" if ok else "NOT MET")
        print(f"  {label}: {measured} (target {required}) {word}")
    examples = [t for t in tallies if t.example]
    if examples:
        print("what the failing checks said (first run of each plant):")
        for t in examples:
            print(f"  {t.scenario}{'' if t.size is None else f' {t.size:g}x'}: {t.example}")
    total = time.perf_counter() - started
    print(f"benchmark wall time {total:.1f} s")

    if args.json:
        data = {
            "command": " ".join(["python", "benchmarks/gate_quality.py", *argv]),
            "environment": to_dict(env),
            "profile": asdict(profile),
            "baselines": baselines,
            "scenarios": [t.summary() for t in tallies],
            "default_gate_s": default_walls,
            "targets": [dict(zip(("target", "required", "measured", "met"), row)) for row in targets(tallies, default_gate_s)],
            "wall_time_s": total,
        }
        Path(args.json).write_text(json.dumps(data, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
