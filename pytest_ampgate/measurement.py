"""The measurement protocol: train one workload under several precision modes and measure it honestly.

For every mode, in one process and on one device, from identical initial weights:

1. set-up: a fresh copy of the model, its optimizer (and scaler), then one training step under the
   precision-coverage recorder (which dtype each matmul/convolution really ran in);
2. warm-up steps, never timed (lazy initialisation, cuDNN autotuning, scaler calibration);
3. a memory pass on CUDA: ``reset_peak_memory_stats`` then ``max_memory_allocated`` over a few
   steady-state steps, less what was allocated before the mode's model existed;
4. timed rounds, all modes interleaved in ABBA order; each round times a block of steps with CUDA
   events (the thread's CPU time on the CPU, ``timing.cpu_clock``) and synchronises once, at the block's end.  Losses stay on
   the device during the block and are read once after it, so finiteness is checked at every step
   without a host sync inside the timed loop;
5. held-out accuracy.

Every step of 1-4 is a real training step, so the loss history covers the whole run.  The speedup
of each mode is the median of per-round ratios against the reference mode, with an interval.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from . import compiled_runs, gpu_noise, records
from . import env as env_mod
from .compiled import compared_with, eager_name
from .config import DEFAULT_MODES, MeasureConfig
from .data import DeviceDataset
from .errors import ConfigError
from .gpu_noise import NoiseReadings
from .known_state import measured_from_known_state
from .memory import CPU_PROFILER_BUSY, cuda_requested, memory_pass, oom_message, warm_libraries
from .metrics import HeldOut, metric_of
from .mode_runner import ModeRunner, prepare
from .modes import PrecisionMode, require_device, resolve_mode, unsupported_reason
from .precision_coverage import measure_precision_coverage
from .precision_policy import cudnn_benchmark, numerics_policy
from .profiles import SLOW_ON_CPU, cpu_threads, default_measure_config, sized_for
from .results import Comparison, Measurements, ModeMeasurement
from .stats import abba_order, estimate_ratio, round_ratios
from .timing import BlockTiming, default_timer, device_context, no_cyclic_gc, read_losses, synchronize, timed_block
from .workload_checks import build_model, check_fits
from .workloads import Workload, get_workload


def _evaluate_metric(slot: _Slot, workload: Workload, dataset: DeviceDataset) -> None:
    """The workload's metric for one mode, recorded under its name."""
    metric = metric_of(workload)
    value = slot.runner.evaluate(HeldOut(lambda: dataset.test_batches(workload.eval_batch_size)), metric)
    slot.m.set_metric(metric.name, metric.check_value(value, workload.name), metric.higher_is_better)


class _Slot:
    """One mode in the run: its measurement, and its runner while it is alive."""

    def __init__(self, mode: PrecisionMode, measurement: ModeMeasurement, compile_spec=None):
        self.mode = mode
        self.m = measurement
        self.compile = compile_spec
        """The compiled.CompileSpec this row runs under, or None (eager)."""
        self.runner: ModeRunner | None = None
        self.failure: dict | None = None
        """How this mode failed in this process: exception type, message, user frame, phase, ``time.time()``."""

    def block(self, dataset: DeviceDataset, batch: int, steps: int, device: torch.device, phase: str, timer=None) -> BlockTiming | None:
        """One block of training steps, its losses recorded; its timing, or None if the mode failed in it."""
        try:
            timing, losses = timed_block(self.runner, dataset, batch, steps, timer)
        except Exception as exc:  # any exception fails this mode only; KeyboardInterrupt still stops the run
            self.fail(device, exc, phase)
            return None
        self.m.record_losses(losses)
        self.m.block_seconds += timing.seconds
        return timing

    def fail(self, device: torch.device, exc: BaseException, phase: str = "") -> None:
        oom = isinstance(exc, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))
        self.m.error = oom_message(device, exc) if oom else f"{type(exc).__name__}: {exc}"
        self.m.failed_phase = phase
        self.failure = failure_summary(exc, phase)
        self.runner = None
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def settle(self, phase: str, after_phase=None) -> bool:
        """After a phase: whether the mode goes on.  ``after_phase(mode, phase, failure or None)`` is the
        distributed ranks' agreement (one collective): a message means a process failed this mode, so
        it stops here too, with that message, and no process pairs a collective of it with another mode's."""
        if after_phase is not None:
            message = after_phase(self.m.mode, phase, self.failure if self.runner is None else None)
            if message:
                if self.runner is not None:
                    self.m.failed_phase = phase
                self.m.error = message
                self.runner = None
        return self.runner is not None


def failure_summary(exc: BaseException, phase: str) -> dict:
    """What a report says about an exception: type, first line, and the innermost frame of the user's
    code (else of this package, else any); no traceback object is kept (it would keep the model alive)."""
    import os
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    torch_dir = os.path.dirname(torch.__file__)
    package_dir = os.path.dirname(__file__)
    outside_torch = [f for f in frames if not f.filename.startswith(torch_dir)]
    user = [f for f in outside_torch if not f.filename.startswith(package_dir)]
    frame = (user or outside_torch or frames or [None])[-1]
    text = str(exc).strip().splitlines()
    return {
        "type": type(exc).__name__,
        "message": text[0] if text else "",
        "where": f"{os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}" if frame else "",
        "phase": phase,
        "time": time.time(),
    }


_DATASETS: OrderedDict = OrderedDict()
_DATASET_CACHE_SIZE = 4
"""Built datasets kept per process: (data source, device, options) -> DeviceDataset."""


def _dataset_for(workload: Workload, device: torch.device, data_root, download: bool, seed: int) -> DeviceDataset:
    """The workload's dataset on ``device``, built once per process and device.

    Building a synthetic MNIST or CIFAR set on the host takes a large share of a small gate's wall
    time (0.1-2 s), and every measurement and confirmation of a test asked for the same one.  Only
    data given as a callable (the built-ins' loaders) is cached: a user's tensors are theirs to hold.
    """
    source = workload.data
    if not callable(source) or isinstance(source, DeviceDataset):
        return workload.dataset(device, root=data_root, download=download, seed=seed)
    try:
        key = (source, str(device), str(data_root), bool(download), seed, repr(sorted(workload.data_options.items())))
        hash(key)
    except TypeError:
        return workload.dataset(device, root=data_root, download=download, seed=seed)
    if key in _DATASETS:
        _DATASETS.move_to_end(key)
        return _DATASETS[key]
    dataset = workload.dataset(device, root=data_root, download=download, seed=seed)
    _DATASETS[key] = dataset
    while len(_DATASETS) > _DATASET_CACHE_SIZE:
        _DATASETS.popitem(last=False)
    return dataset


@measured_from_known_state
def measure(
    workload: Workload | str,
    modes: Sequence[str] = DEFAULT_MODES,
    *,
    device: str | torch.device = "cuda",
    config: MeasureConfig | None = None,
    dataset: DeviceDataset | None = None,
    data_root=None,
    download: bool = False,
    progress: Callable[[str], None] | bool | None = True,
    timer=None,
    runner_factory: Callable[..., ModeRunner] | None = None,
    after_phase: Callable[[str, str, dict | None], str | None] | None = None,
) -> Measurements:
    """Train ``workload`` under the reference mode and each of ``modes``; measure and compare them.

    ``modes`` are compared against ``config.reference_mode`` (fp32); naming the reference mode
    itself in ``modes`` gives an A/A control (two independent runs of the same mode).  Modes the
    hardware cannot run come back with ``supported=False`` and the reason; a mode that fails while
    running (out of memory, any exception in the model) comes back with ``error`` and
    ``failed_phase`` set, and the others are still measured.  ``timer`` replaces the device's
    timing source (CUDA events, ``timing.cpu_clock`` on the CPU): tests pass a fake one.

    ``runner_factory`` replaces :func:`mode_runner.prepare` (same arguments): the distributed ranks use it
    to wrap each mode's model in DDP or FSDP2, so they run exactly this protocol.  ``after_phase(mode, phase,
    failure)`` is called after every phase of every running mode (set-up, warm-up, memory pass, each
    block, evaluation) with this process's failure summary or None; the ranks agree there, and a
    message it returns fails the mode in this process too (see :meth:`_Slot.settle`).

    Without ``config``, the protocol suits the device: GPU defaults on CUDA, the CPU profile
    (``profiles.CPU_PROFILE``, the one ``pytest --ampgate-device cpu`` uses) on the CPU, where a
    built-in workload at its default size also gets its CPU size.  A device that is not there is
    an error naming it.  ``progress``: True prints what the run will cost and each stage to
    stderr, a callable receives the same lines, False or None is silent.
    """
    started = time.perf_counter()
    device = require_device(device, f"measure(device={str(device)!r})")
    config = config or default_measure_config(device.type)
    workload = sized_for(get_workload(workload), device.type)
    say = _progress_printer(progress, started)
    reference_mode, resolved = resolve_mode(config.reference_mode), [resolve_mode(x) for x in modes]
    names = [m.name for m in resolved]
    if len(set(names)) != len(names):
        raise ConfigError(f"modes must not repeat, got {list(modes)}")
    by_name = {m.name: m for m in (reference_mode, *resolved)}  # the objects given, a PrecisionMode of the caller's too
    rows = compiled_runs.rows(reference_mode.name, names, config)
    slots = [_Slot(by_name[mode], ModeMeasurement(row), spec) for row, mode, spec in rows]
    for slot in slots:
        reason = unsupported_reason(slot.mode, device)
        if reason:
            slot.m.supported, slot.m.unsupported_reason = False, reason

    say(_cost_line(workload, slots, device, config))
    environment = records.to_dict(env_mod.fingerprint(device)) if slots[0].m.supported else {"device_type": device.type}
    dataset_info: dict = {}
    noise = NoiseReadings()
    if any(s.m.supported for s in slots):
        if device.type == "cuda":  # before anything creates the context: NVML then shows which PID is ours
            gpu_noise.note_own_context(device)
        with device_context(device):
            if dataset is not None:
                dataset = dataset.to(device)
            else:
                dataset = _dataset_for(workload, device, data_root, download, config.seed)
            dataset_info = dataset.describe()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                initial_model = build_model(workload)
            check_fits(workload, initial_model, dataset)
            before = gpu_noise.noise_report(device)
            # On the CPU with profiles.CPU_THREADS: a CPU run's numbers must not depend on the core count.
            with cudnn_benchmark(config.cudnn_benchmark), cpu_threads(device.type):
                warm_libraries(device)
                window = _run(
                    workload,
                    slots,
                    initial_model,
                    dataset,
                    device,
                    config,
                    say,
                    timer or default_timer(device),
                    runner_factory or prepare,
                    after_phase,
                )
            noise = NoiseReadings(before, gpu_noise.noise_report(device), window)

    reference = slots[0].m
    rows = {s.m.mode: s.m for s in slots[1:]}  # not the reference: an A/A control's fp32 row shares its name

    def compared(row: ModeMeasurement) -> ModeMeasurement:
        name = compared_with(row.mode, reference.mode)
        return reference if name == reference.mode else rows[name]

    comparisons = {s.m.mode: compare_modes(compared(s.m), s.m, config) for s in slots[1:]}
    return Measurements(
        workload=workload.name,
        device=str(device),
        config=config,
        batch_size=workload.batch_size,
        environment=environment,
        dataset=dataset_info,
        reference=reference,
        modes={s.m.mode: s.m for s in slots[1:]},
        comparisons=comparisons,
        noise=noise,
        wall_time_s=time.perf_counter() - started,
    )


def _progress_printer(progress, started: float) -> Callable[[str], None]:
    """True: lines to stderr with the seconds elapsed; a callable: that; False/None: silent."""
    if progress is True:
        import sys

        def say(message: str) -> None:
            print(f"[ampgate {time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

        return say
    return progress if callable(progress) else (lambda _msg: None)


def _cost_line(workload: Workload, slots, device: torch.device, config: MeasureConfig) -> str:
    """What the run will cost, said before it starts: modes x steps x batch, and the slow modes on a CPU."""
    running = [s.m.mode for s in slots if s.m.supported]
    line = (
        f"{workload.name} on {device}: {len(running)} mode(s) ({', '.join(running)}) x {config.total_steps()} training steps "
        f"of batch {workload.batch_size} ({config.warmup_steps} warm-up, {config.rounds} rounds x {config.steps_per_block} steps)"
    )
    slow = [name for name in running if eager_name(name) in SLOW_ON_CPU]
    if device.type == "cpu" and slow:
        line += (
            f"; {', '.join(slow)} run in float16, which a CPU without fp16 arithmetic runs many times slower "
            "than fp32: they are here for their numerics"
        )
    return line


def _run(
    workload, slots, initial_model, dataset, device, config: MeasureConfig, say, timer, runner_factory=prepare, after_phase=None
) -> gpu_noise.WindowNoise:
    """Set-up, lead-in, the interleaved timed rounds, balance blocks and evaluation; what NVML saw during the rounds."""
    batch = workload.batch_size
    steps = config.steps_per_block
    compiled_runs.prepare([s.m for s in slots], [s.compile for s in slots])
    for slot in slots:
        if slot.m.supported:
            say(f"{workload.name}: {slot.m.mode}: set-up, warm-up and memory pass")
            _start(slot, workload, initial_model, dataset, device, config, timer, runner_factory, after_phase)

    order = abba_order([i for i, s in enumerate(slots) if s.runner is not None], config.rounds)
    lead = order[-1][-1] if order and order[0] else None
    if lead is not None:
        # Lead-in: one untimed block of the mode that closes the last round, as if the rounds ran
        # in a cycle.  With two modes in ABBA that is the mode opening round 0, which then gets
        # the same back-to-back start the other gets at each turn; with three or more, round 0's
        # first mode follows another mode's block as every non-back-to-back block does.  Nobody's
        # first timed block comes straight after another mode's warm-up.  The other modes take
        # their matching block after the rounds, so every mode trains for the same steps.
        slots[lead].block(dataset, batch, steps, device, "lead-in block", timer)
        slots[lead].settle("lead-in block", after_phase)
    noise_window = gpu_noise.open_noise_window(device)
    for round_index, positions in enumerate(order):
        say(f"{workload.name}: timed round {round_index + 1}/{config.rounds}: {', '.join(slots[i].mode.name for i in positions)}")
        for i in positions:
            slot = slots[i]
            if slot.runner is None:
                continue
            with compiled_runs.watching_timed_block(slot.m):
                timing = slot.block(dataset, batch, steps, device, f"timed round {round_index + 1}", timer)
            if not slot.settle(f"timed round {round_index + 1}", after_phase):
                continue  # the agreement is also the start line: every rank begins the next block together
            if timing is not None:
                slot.runner.note_scale()
                slot.m.step_times_s.append(timing.seconds / steps)
                slot.m.host_times_s.append(timing.host_s / steps)
    window = noise_window.close()

    for index, slot in enumerate(slots):
        if slot.runner is not None and order and index != lead:
            slot.block(dataset, batch, steps, device, "balance block", timer)
            slot.settle("balance block", after_phase)

    for slot in slots:
        if slot.runner is None:
            continue
        say(f"{workload.name}: {slot.m.mode}: held-out {metric_of(workload).name}")
        try:
            with numerics_policy(slot.mode):
                _evaluate_metric(slot, workload, dataset)
            slot.m.scaler = slot.runner.scaler_stats()
        except Exception as exc:  # any exception fails this mode only
            slot.fail(device, exc, "evaluation")
        slot.settle("evaluation", after_phase)
        slot.runner = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return window


def _start(
    slot: _Slot,
    workload: Workload,
    initial_model,
    dataset: DeviceDataset,
    device,
    config: MeasureConfig,
    timer,
    runner_factory=prepare,
    after_phase=None,
) -> None:
    """Set-up, precision-coverage step, warm-up (its last steps probe launch-boundness) and the memory pass.

    Each phase ends with :meth:`_Slot.settle` (the ranks' agreement, under torch.distributed), so a
    mode that failed anywhere stops everywhere before its next phase."""
    batch = workload.batch_size
    losses: list = []
    base = []

    def set_up() -> None:
        if device.type == "cuda":
            synchronize(device)
            base.append(cuda_requested(device, "current"))
        slot.runner = runner = runner_factory(slot.mode, initial_model, workload.optimizer_factory, workload.loss_fn, device)
        if config.precision_coverage:
            with numerics_policy(slot.mode):
                x, y = dataset.batch(runner.steps_taken, batch)
                slot.m.precision_coverage = measure_precision_coverage(lambda: losses.append(runner.step(x, y)), model=runner.model)

    def warm_up() -> None:
        runner = slot.runner
        with numerics_policy(slot.mode):
            if slot.compile is not None:  # coverage ran on the eager module, under the same autocast
                step = lambda: losses.append(runner.step(*dataset.batch(runner.steps_taken, batch)))  # noqa: E731
                compiled_runs.compile_and_settle(runner, slot.m, slot.compile, config.warmup_steps, step, device.type)
            probe = min(5, config.warmup_steps // 2)
            begin = time.perf_counter()
            for _ in range(config.warmup_steps - probe):
                losses.append(runner.step(*dataset.batch(runner.steps_taken, batch)))
            synchronize(device)
            host_step = (time.perf_counter() - begin) / max(1, config.warmup_steps - probe)
            if probe:
                with no_cyclic_gc():
                    found, probe_losses = timer.busy(
                        runner, lambda: [runner.step(*dataset.batch(runner.steps_taken, batch)) for _ in range(probe)], probe, host_step
                    )
                if found is not None:
                    slot.m.busy_step_s, slot.m.probe_host_step_s = found.busy_s, found.host_s
                losses.extend(probe_losses)
            slot.m.record_losses(read_losses(losses))
        runner.note_scale()

    def memory() -> None:
        if config.memory_steps == 0:
            slot.m.memory_note = "memory pass disabled (memory_steps=0)"
            return
        figures, memory_losses = memory_pass(slot.runner, dataset, batch, config.memory_steps, device, base[0] if base else None)
        slot.m.record_losses(read_losses(memory_losses))
        if figures is None:
            slot.m.memory_note = CPU_PROFILER_BUSY
            return
        slot.m.memory = figures
        slot.m.peak_memory_bytes = figures["peak_bytes"]
        slot.m.activation_memory_bytes = figures["activation_bytes"]

    for phase, run in (("set-up", set_up), ("warm-up", warm_up), ("memory pass", memory)):
        try:
            run()
        except Exception as exc:  # any exception fails this mode only; KeyboardInterrupt still stops the run
            slot.fail(device, exc, phase)
        if not slot.settle(phase, after_phase):
            return


def compare_modes(reference: ModeMeasurement, m: ModeMeasurement, config: MeasureConfig) -> Comparison:
    """One mode against the reference: the speedup from per-round ratios, the memory ratio, or why neither.

    Public because every producer of a Measurements compares the same way (the distributed merge too)."""
    comparison = Comparison(mode=m.mode, reference=reference.mode)
    if not m.ok:
        comparison.note = m.unsupported_reason or m.error
        return comparison
    if not reference.ok:
        comparison.note = f"reference {reference.mode} did not run: {reference.unsupported_reason or reference.error}"
        return comparison
    rounds = min(len(reference.step_times_s), len(m.step_times_s))
    if rounds:
        samples = round_ratios(reference.step_times_s[:rounds], m.step_times_s[:rounds])
        if samples:
            comparison.speedup = estimate_ratio(samples, config.confidence, config.noise_threshold)
    if reference.peak_memory_bytes and m.peak_memory_bytes is not None:
        comparison.memory_ratio = m.peak_memory_bytes / reference.peak_memory_bytes
    return comparison
