#!/usr/bin/env python3
"""Engine benchmark: what the built-in workloads show under each precision mode, and
what the engine's timed step costs against a bare hand-written loop.

For every workload and batch size it runs :func:`pytest_ampgate.measure` (fp32 is always measured,
as the reference) and prints one row per mode: step time (median with IQR), speedup against fp32
with its interval, peak memory and its ratio, final loss and held-out accuracy.

Then, per mode, the overhead check: the engine's own ``time_block`` over a
:class:`~pytest_ampgate.mode_runner.ModeRunner` against the loop a user writes by hand for that mode
(same initial weights, same batch slices, same autocast/GradScaler/parameter dtype, same TF32
policy), interleaved ABBA so drift cancels, warm-up untimed.  The ratio engine/bare is the median
of per-round ratios with the same distribution-free interval the gate uses.  After timing, both
copies must hold the same parameters (they took the same steps on the same data): that is printed
too, so the ratio is known to compare like with like.

``--sweep`` measures several batch sizes per workload and applies the rule BENCHMARKS.md uses to
choose the default batch sizes (smallest batch where every AMP mode's speedup interval clears
1.2x and its peak memory is below 0.9x fp32).

    python benchmarks/engine_benchmark.py                      # GPU if there is one, else CPU
    python benchmarks/engine_benchmark.py --device cpu --quick  # small sizes, few rounds
    python benchmarks/engine_benchmark.py --device cuda --sweep --json sweep.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

from pytest_ampgate.env import fingerprint
from pytest_ampgate.errors import ModeError
from pytest_ampgate.measurement import MeasureConfig, measure
from pytest_ampgate.mode_runner import prepare
from pytest_ampgate.modes import MODES, PrecisionMode, resolve_mode
from pytest_ampgate.outputs.table import format_table
from pytest_ampgate.precision_policy import cudnn_benchmark, numerics_policy
from pytest_ampgate.records import to_dict
from pytest_ampgate.results import Measurements
from pytest_ampgate.stats import MIN_ROUNDS_FOR_CONFIDENCE, Estimate, abba_order, estimate_ratio, summarize_times
from pytest_ampgate.timing import launch_bound, time_block
from pytest_ampgate.workloads import BUILTIN, Workload, get_workload

DEFAULT_MODES = ("fp32", "amp_fp16", "amp_bf16")

GPU_SWEEP = {"mnist_mlp": (512, 1024, 2048, 4096, 8192, 16384), "cifar_cnn": (128, 256, 512, 1024, 2048)}
"""Batch sizes a GPU session measures to choose the defaults (all fit the 20000-sample synthetic sets)."""

QUICK_SIZES = {
    "mnist_mlp": {"batch_size": 128, "data_options": {"n_train": 4096, "n_test": 1024}},
    "cifar_cnn": {"batch_size": 16, "data_options": {"n_train": 1024, "n_test": 256}},
}
"""--quick: sizes a 2-core CPU gets through in minutes (CPU float16 convolutions are very slow)."""

QUICK_SWEEP = {"mnist_mlp": (64, 128, 256), "cifar_cnn": (8, 16, 32)}
QUICK_PROTOCOL = {"warmup_steps": 2, "rounds": 10, "steps_per_block": 8, "memory_steps": 2}
"""10 rounds: the smallest count whose 95% interval drops the extreme round at each end."""

CHOOSE_MIN_SPEEDUP = 1.2
CHOOSE_MAX_MEMORY_RATIO = 0.9

COLUMNS = (
    "workload",
    "batch",
    "mode",
    "step ms (IQR)",
    "speedup vs fp32 [CI]",
    "peak MiB",
    "mem ratio",
    "final loss",
    "accuracy",
    "engine/bare [CI]",
)


# --- the bare loop ---------------------------------------------------------------------------


class BareLoop:
    """The training loop a user writes by hand for one mode, with nothing of the engine in it.

    Only what the mode itself requires: autocast around forward and loss, a GradScaler for
    float16 autocast, float16/bfloat16 parameters and inputs for the pure modes.  Batches are the
    same slices ``DeviceDataset.batch`` hands the engine, written inline.
    """

    def __init__(self, mode: PrecisionMode, initial_model: torch.nn.Module, workload: Workload, dataset, device: torch.device):
        self.mode = mode
        self.device = device
        self.model = copy.deepcopy(initial_model).to(device)
        self.model.train()
        if mode.param_dtype is not None:
            self.model.to(mode.param_dtype)  # the built-in workloads have no BatchNorm to keep in fp32
        self.optimizer = workload.optimizer_factory(self.model.parameters())
        self.loss_fn = workload.loss_fn
        self.scaler = torch.amp.GradScaler(device.type) if mode.grad_scaler else None
        self.x, self.y = dataset.train_x, dataset.train_y
        self.batch_size = workload.batch_size
        self.steps_taken = 0

    def block(self, steps: int) -> float:
        """Seconds for ``steps`` training steps, timed exactly as ``time_block`` times the engine."""
        with numerics_policy(self.mode):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self._loop(steps)
                end.record()
                end.synchronize()
                return start.elapsed_time(end) / 1000.0
            begin = time.perf_counter()
            self._loop(steps)
            return time.perf_counter() - begin

    def _loop(self, steps: int) -> None:
        model, optimizer, loss_fn, scaler = self.model, self.optimizer, self.loss_fn, self.scaler
        x_all, y_all, bs = self.x, self.y, self.batch_size
        span = x_all.shape[0] - bs + 1
        first = self.steps_taken
        if self.mode.autocast_dtype is None:  # fp32, tf32, fp16, bf16
            dtype = self.mode.param_dtype
            for k in range(first, first + steps):
                s = (k * bs) % span
                x, y = x_all[s : s + bs], y_all[s : s + bs]
                if dtype is not None:
                    x = x.to(dtype)
                optimizer.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
        elif scaler is None:  # amp_bf16
            device_type, dtype = self.device.type, self.mode.autocast_dtype
            for k in range(first, first + steps):
                s = (k * bs) % span
                x, y = x_all[s : s + bs], y_all[s : s + bs]
                optimizer.zero_grad()
                with torch.autocast(device_type, dtype=dtype):
                    loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
        else:  # amp_fp16
            device_type, dtype = self.device.type, self.mode.autocast_dtype
            for k in range(first, first + steps):
                s = (k * bs) % span
                x, y = x_all[s : s + bs], y_all[s : s + bs]
                optimizer.zero_grad()
                with torch.autocast(device_type, dtype=dtype):
                    loss = loss_fn(model(x), y)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
        self.steps_taken += steps


@dataclass
class Overhead:
    """Engine step time over bare-loop step time for one mode, and the evidence both did the same work."""

    mode: str
    estimate: Estimate | None = None
    engine_step_s: list[float] = field(default_factory=list)
    bare_step_s: list[float] = field(default_factory=list)
    steps_each: int = 0
    param_max_abs_diff: float | None = None
    """Largest parameter difference between the two copies after timing; 0.0 on the CPU."""
    error: str = ""

    def verdict(self) -> str:
        if self.estimate is None:
            return f"not measured: {self.error}"
        e = self.estimate
        text = f"engine step costs {e.median:.2f}x a bare loop [{e.low:.2f}-{e.high:.2f}]"
        if e.rounds < MIN_ROUNDS_FOR_CONFIDENCE:
            text += f": too few rounds ({e.rounds}) to tell"
        elif e.low <= 1.0:
            text += ": no measurable overhead"
        else:
            text += f": overhead of {e.median - 1:.1%} (interval above 1.00x)"
        if e.noisy:
            text += f" (noisy: {e.note})"
        return text

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "estimate": self.estimate.to_dict() if self.estimate else None,
            "engine_step_s": self.engine_step_s,
            "bare_step_s": self.bare_step_s,
            "steps_each": self.steps_each,
            "param_max_abs_diff": self.param_max_abs_diff,
            "error": self.error,
        }


def engine_vs_bare(workload: Workload, mode: str, dataset, device: torch.device, config: MeasureConfig) -> Overhead:
    """Time the engine's ``time_block`` against :class:`BareLoop`, ABBA-interleaved, from identical weights."""
    mode = resolve_mode(mode)
    result = Overhead(mode.name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # the same initial model measure() builds
        initial = workload.model_factory()
    try:
        runner = prepare(mode, initial, workload.optimizer_factory, workload.loss_fn, device)
        bare = BareLoop(mode, initial, workload, dataset, device)
        steps, batch = config.steps_per_block, workload.batch_size
        with cudnn_benchmark(config.cudnn_benchmark):
            time_block(runner, dataset, batch, config.warmup_steps)  # warm-up, never counted
            bare.block(config.warmup_steps)
            for order in abba_order(["engine", "bare"], config.rounds):
                for who in order:
                    if who == "engine":
                        seconds, _losses = time_block(runner, dataset, batch, steps)
                        result.engine_step_s.append(seconds / steps)
                    else:
                        result.bare_step_s.append(bare.block(steps) / steps)
        if runner.steps_taken != bare.steps_taken:
            raise RuntimeError(f"engine took {runner.steps_taken} steps, bare loop {bare.steps_taken}")
        result.steps_each = runner.steps_taken
        result.param_max_abs_diff = max(
            (a.detach().float() - b.detach().float()).abs().max().item() for a, b in zip(runner.model.parameters(), bare.model.parameters())
        )
    except RuntimeError as exc:  # CUDA out-of-memory is a RuntimeError too
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return result
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ratios = [e / b for e, b in zip(result.engine_step_s, result.bare_step_s) if b > 0]
    if ratios:
        result.estimate = estimate_ratio(ratios, config.confidence, config.noise_threshold)
    return result


# --- how launch-bound a step is ----------------------------------------------------------------


@dataclass
class OpCount:
    """Operators one training step dispatches (views excluded): on a GPU each is one or more kernel launches."""

    total: int
    casts: int
    host_syncs: int

    def describe(self) -> str:
        return f"{self.total} ops ({self.casts} casts, {self.host_syncs} host sync{'s' if self.host_syncs != 1 else ''})"


def count_ops(workload: Workload, mode: str, dataset, device: torch.device, config: MeasureConfig) -> OpCount:
    """Count the ops of one steady-state step (the second: the first creates optimizer state) on a fresh copy."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if not func.is_view and not name.startswith("profiler."):
                self.names.append(name)
            return func(*args, **(kwargs or {}))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        initial = workload.model_factory()
    runner = prepare(mode, initial, workload.optimizer_factory, workload.loss_fn, device)
    with numerics_policy(runner.mode):
        runner.step(*dataset.batch(0, workload.batch_size))
        with Counter() as counter:
            runner.step(*dataset.batch(1, workload.batch_size))
    names = counter.names
    return OpCount(len(names), names.count("aten._to_copy"), names.count("aten._local_scalar_dense"))


# --- one workload at one batch size ----------------------------------------------------------


@dataclass
class Case:
    workload: str
    batch_size: int
    measurements: Measurements
    overhead: dict[str, Overhead]
    wall_time_s: float
    ops: dict[str, OpCount] = field(default_factory=dict)

    def rows_by_mode(self):
        return [mm for mm, _comparison in self.measurements.each_mode()]

    def to_dict(self) -> dict:
        return {
            "workload": self.workload,
            "batch_size": self.batch_size,
            "measurements": self.measurements.to_dict(),
            "overhead": {k: v.to_dict() for k, v in self.overhead.items()},
            "ops_per_step": {k: v.__dict__ for k, v in self.ops.items()},
            "wall_time_s": self.wall_time_s,
        }


def run_case(workload: Workload, modes, device: torch.device, config: MeasureConfig, data_root, say, overhead_check: bool = True) -> Case:
    started = time.perf_counter()
    dataset = workload.dataset(device, root=data_root, seed=config.seed)  # one copy for measure() and the overhead check
    others = [name for name in modes if resolve_mode(name).name != resolve_mode(config.reference_mode).name]
    say(f"{workload.name} batch {workload.batch_size}: measure() {', '.join([config.reference_mode, *others])}")
    m = measure(workload, others, device=device, config=config, dataset=dataset)
    overhead, ops = {}, {}
    for mm, _comparison in m.each_mode():
        if mm.ok and overhead_check:
            say(f"{workload.name} batch {workload.batch_size}: {mm.mode}: engine vs bare loop")
            overhead[mm.mode] = engine_vs_bare(workload, mm.mode, dataset, device, config)
            try:
                ops[mm.mode] = count_ops(workload, mm.mode, dataset, device, config)
            except RuntimeError as exc:  # out of memory: the count is a diagnostic, never fatal
                say(f"{workload.name} {mm.mode}: ops not counted: {exc}")
    return Case(workload.name, workload.batch_size, m, overhead, time.perf_counter() - started, ops)


# --- choosing default batch sizes ------------------------------------------------------------


def qualifies(case: Case, min_speedup: float = CHOOSE_MIN_SPEEDUP, max_memory_ratio: float = CHOOSE_MAX_MEMORY_RATIO) -> tuple[bool, str]:
    """Does this batch size show AMP's benefit clearly: every AMP mode that ran clears both bars?"""
    m = case.measurements
    amp = [mm for mm in m.modes.values() if resolve_mode(mm.mode).is_amp and mm.supported]
    if not amp:
        return False, "no AMP mode ran"
    reasons = []
    for mm in amp:
        if mm.error:
            reasons.append(f"{mm.mode} failed: {mm.error}")
            continue
        c = m.comparisons[mm.mode]
        if c.speedup is None:
            reasons.append(f"{mm.mode} has no speedup")
        elif c.speedup.low < min_speedup:
            reasons.append(f"{mm.mode} speedup CI low {c.speedup.low:.2f}x < {min_speedup:.2f}x")
        if c.memory_ratio is None:
            reasons.append(f"{mm.mode} peak memory not measured ({mm.memory_note or 'no fp32 peak'})")
        elif c.memory_ratio >= max_memory_ratio:
            reasons.append(f"{mm.mode} memory ratio {c.memory_ratio:.2f} >= {max_memory_ratio:.2f}")
    return (not reasons), "; ".join(reasons) or f"every AMP mode: speedup CI > {min_speedup:.2f}x, memory < {max_memory_ratio:.2f}x"


def choose_default(cases: list[Case], **bars) -> tuple[int | None, list[tuple[int, bool, str]]]:
    """The smallest batch size that qualifies (None if none does), and why each batch did or did not."""
    verdicts = [(c.batch_size, *qualifies(c, **bars)) for c in sorted(cases, key=lambda c: c.batch_size)]
    return next((b for b, ok, _ in verdicts if ok), None), verdicts


# --- printing --------------------------------------------------------------------------------


def _ratio(e: Estimate | None) -> str:
    if e is None:
        return "-"
    return f"{e.median:.2f}x [{e.low:.2f}-{e.high:.2f}]" + ("!" if e.noisy else "")


def _num(value, fmt: str) -> str:
    if value is None:
        return "-"
    return format(value, fmt) if math.isfinite(value) else str(value)


def table(cases: list[Case]) -> tuple[str, list[str]]:
    """The results table and the notes under it (unsupported modes, errors, noisy intervals)."""
    rows, notes = [], []
    for case in cases:
        m = case.measurements
        for mm in case.rows_by_mode():
            head = [case.workload, str(case.batch_size), mm.mode]
            if not mm.supported:
                rows.append(head + ["unsupported*"] + ["-"] * 6)
                notes.append(f"* {case.workload} {mm.mode}: unsupported: {mm.unsupported_reason}")
                continue
            if mm.error:
                rows.append(head + ["error*"] + ["-"] * 6)
                notes.append(f"* {case.workload} batch {case.batch_size} {mm.mode}: error: {mm.error}")
                continue
            summary = summarize_times(mm.step_times_s)
            step = f"{summary['median'] * 1e3:.3f} ({summary['iqr'] * 1e3:.3f})" if summary else "-"
            is_ref = mm is m.reference
            comparison = None if is_ref else m.comparisons.get(mm.mode)
            speedup = "reference" if is_ref else _ratio(comparison.speedup if comparison else None)
            peak = None if mm.peak_memory_bytes is None else mm.peak_memory_bytes / 2**20
            mem_ratio = (1.0 if peak is not None else None) if is_ref else (comparison.memory_ratio if comparison else None)
            overhead = case.overhead.get(mm.mode)
            rows.append(
                [
                    *head,
                    step,
                    speedup,
                    _num(peak, ".1f"),
                    _num(mem_ratio, ".2f"),
                    _num(mm.final_loss, ".4g"),
                    _num(mm.accuracy, ".3f"),
                    _ratio(overhead.estimate) if overhead else "-",
                ]
            )
            for label, e in (
                ("speedup", None if comparison is None else comparison.speedup),
                ("engine/bare", overhead and overhead.estimate),
            ):
                if e is not None and e.noisy:
                    notes.append(f"! {case.workload} batch {case.batch_size} {mm.mode} {label}: {e.note}")
            bound = launch_bound(mm)
            if bound is not None:
                state = (
                    bound.describe()
                    if bound.bound
                    else (
                        f"{mm.mode} is not launch-bound: its GPU works {bound.busy_s * 1e3:.3g} ms of each {bound.step_s * 1e3:.3g} ms step; "
                        f"the host takes {bound.host_s * 1e3:.3g} ms to launch it"
                    )
                )
                notes.append(f"~ {case.workload} batch {case.batch_size}: {state}")
    return format_table(rows, COLUMNS), notes


def environment_lines(device: torch.device, cases: list[Case]) -> list[str]:
    env = fingerprint(device)
    lines = [f"environment: {env.short()}  [key {env.key()}]"]
    detail = f"torch {env.torch_version}, python {env.python_version}, {env.platform}"
    if device.type == "cpu":
        detail += f", {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
        if hasattr(os, "getloadavg"):  # other processes on the CPU are this run's noise
            detail += f", load average {os.getloadavg()[0]:.1f} at the end (started at {LOAD_AT_START:.1f})"
    else:
        detail += f", CUDA {env.cuda_version}, cuDNN {env.cudnn_version}, driver {env.driver_version}, compute capability {env.compute_capability}"
    lines.append(f"  {detail}")
    seen = set()
    for case in cases:
        d = case.measurements.dataset
        if d and case.workload not in seen:
            seen.add(case.workload)
            lines.append(f"data {case.workload}: {d['source']}, n_train {d['n_train']}, n_test {d['n_test']} ({d['note'] or 'real files'})")
    noise = [n for c in cases for n in (c.measurements.noise.before, c.measurements.noise.window, c.measurements.noise.after) if n]
    if device.type == "cuda" and noise:
        noisy = [n.describe() for n in noise if n.noisy]
        lines.append("GPU noise (NVML): " + (noisy[0] if noisy else noise[0].describe()))
    return lines


def report(args, device: torch.device, device_why: str, config: MeasureConfig, cases: list[Case], wall: float) -> str:
    out = [f"device: {device} ({device_why})"]
    out += environment_lines(device, cases)
    out.append(
        f"protocol: warm-up {config.warmup_steps}, {config.rounds} rounds x {config.steps_per_block} steps, "
        f"memory pass {config.memory_steps} steps; fp32 is strict IEEE (TF32 off); intervals are "
        f"{config.confidence:.0%} distribution-free CIs of the median of per-round ratios"
    )
    out.append("")
    text, notes = table(cases)
    out.append(text)
    out += notes
    if device.type != "cuda":
        out.append(
            "peak memory on the CPU comes from torch.profiler's allocation events; CPU step times and memory say nothing about AMP on a GPU"
        )
    out.append("")
    out.append("engine vs bare hand-written loop (same weights, batch slices, mode; ABBA-interleaved):")
    for case in cases:
        for name, o in case.overhead.items():
            same = (
                ""
                if o.param_max_abs_diff is None
                else f"; after {o.steps_each} steps each, params differ by max {o.param_max_abs_diff:.2g}"
            )
            out.append(f"  {case.workload} batch {case.batch_size} {name}: {o.verdict()}{same}")
    all_est = [o.estimate for c in cases for o in c.overhead.values() if o.estimate is not None]
    if all_est:
        worst = max(all_est, key=lambda e: e.median)
        out.append(f"  worst: engine step costs {worst.median:.2f}x a bare loop [{worst.low:.2f}-{worst.high:.2f}]")
    out.append("")
    out.append("ops dispatched per training step (views excluded; on a GPU each is one or more kernel launches):")
    for case in cases:
        if case.ops:
            out.append(f"  {case.workload} batch {case.batch_size}: " + "; ".join(f"{k} {v.describe()}" for k, v in case.ops.items()))
    out.append("")
    by_workload: dict[str, list[Case]] = {}
    for c in cases:
        by_workload.setdefault(c.workload, []).append(c)
    out.append(
        f"default-batch rule: smallest batch where every AMP mode's speedup CI clears {CHOOSE_MIN_SPEEDUP:.2f}x "
        f"and peak memory < {CHOOSE_MAX_MEMORY_RATIO:.2f}x fp32"
    )
    for name, group in by_workload.items():
        chosen, verdicts = choose_default(group)
        for batch, ok, why in verdicts:
            out.append(f"  {name} batch {batch}: {'qualifies' if ok else 'does not qualify'}: {why}")
        out.append(f"  {name}: " + (f"smallest qualifying batch {chosen}" if chosen else "no measured batch qualifies"))
    out.append("")
    out.append(f"wall time: {wall:.1f} s (" + ", ".join(f"{c.workload} b{c.batch_size} {c.wall_time_s:.1f} s" for c in cases) + ")")
    return "\n".join(out)


# --- command line ----------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available, else cpu")
    p.add_argument("--workloads", nargs="+", choices=sorted(BUILTIN), default=["mnist_mlp", "cifar_cnn"])
    p.add_argument(
        "--modes", nargs="+", default=list(DEFAULT_MODES), help=f"precision modes (fp32 is always measured); known: {', '.join(MODES)}"
    )
    p.add_argument("--batch-sizes", nargs="+", type=int, help="batch sizes to measure for every workload (default: the workload's own)")
    p.add_argument("--sweep", action="store_true", help="measure the sweep batch sizes per workload, to choose defaults")
    p.add_argument("--quick", action="store_true", help="small batches, small data, few rounds (CPU runs, smoke tests)")
    p.add_argument("--rounds", type=int)
    p.add_argument("--steps-per-block", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--memory-steps", type=int)
    p.add_argument("--threads", type=int, help="torch.set_num_threads for CPU runs")
    p.add_argument("--data-root", help="real MNIST/CIFAR-10 files (never downloaded); synthetic data otherwise")
    p.add_argument("--json", metavar="PATH", help="write every number (with spreads and environment) as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--no-overhead", action="store_true", help="skip the engine-vs-bare-loop check and the op count (a shorter run)")
    args = p.parse_args(argv)
    for name in args.modes:
        try:
            resolve_mode(name)
        except ModeError as exc:  # unknown or refused mode: the message names the valid ones
            p.error(str(exc))
    if args.sweep and args.batch_sizes:
        p.error("--sweep and --batch-sizes are exclusive")
    return args


def pick_device(requested: str | None) -> tuple[torch.device, str]:
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (no GPU, or a CPU-only torch build)")
    if requested:
        return torch.device(requested), "asked for with --device"
    if torch.cuda.is_available():
        return torch.device("cuda"), "default: a CUDA device is available"
    return torch.device("cpu"), "default: no CUDA device is available, so the CPU"


def build_config(args) -> MeasureConfig:
    values = dict(QUICK_PROTOCOL) if args.quick else {}
    for key, arg in (
        ("rounds", args.rounds),
        ("steps_per_block", args.steps_per_block),
        ("warmup_steps", args.warmup),
        ("memory_steps", args.memory_steps),
    ):
        if arg is not None:
            values[key] = arg
    return MeasureConfig(**values)


def workloads_to_run(args) -> list[Workload]:
    result = []
    for name in args.workloads:
        base = get_workload(name)
        if args.quick:
            base = base.with_options(**QUICK_SIZES[name])
        if args.sweep:
            sizes = (QUICK_SWEEP if args.quick else GPU_SWEEP)[name]
        else:
            sizes = args.batch_sizes or [base.batch_size]
        result += [base.with_options(batch_size=b) for b in sizes]
    return result


LOAD_AT_START = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def main(argv=None) -> int:
    global LOAD_AT_START
    LOAD_AT_START = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    started = time.perf_counter()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, why = pick_device(args.device)
    config = build_config(args)
    say = (
        (lambda _msg: None)
        if args.quiet
        else (lambda msg: print(f"[{time.perf_counter() - started:7.1f}s] {msg}", file=sys.stderr, flush=True))
    )
    say(f"device {device} ({why})")
    cases = [run_case(w, args.modes, device, config, args.data_root, say, not args.no_overhead) for w in workloads_to_run(args)]
    wall = time.perf_counter() - started
    print(report(args, device, why, config, cases, wall))
    print(f"command: python benchmarks/engine_benchmark.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    if args.json:
        payload = {
            "command": ["benchmarks/engine_benchmark.py", *(sys.argv[1:] if argv is None else argv)],
            "device": str(device),
            "environment": to_dict(fingerprint(device)),
            "config": config.to_dict(),
            "cases": [c.to_dict() for c in cases],
            "wall_time_s": wall,
        }
        Path(args.json).write_text(json.dumps(payload, indent=1, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
