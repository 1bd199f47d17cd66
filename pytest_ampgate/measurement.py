"""The measurement protocol: train one workload under several precision modes and measure it honestly.

For every mode, in one process and on one device, from identical initial weights:

1. set-up: a fresh copy of the model, its optimizer (and scaler), then one training step under the
   precision-coverage recorder (which dtype each matmul/convolution really ran in);
2. warm-up steps, never timed (lazy initialisation, cuDNN autotuning, scaler calibration);
3. a memory pass on CUDA: ``reset_peak_memory_stats`` then ``max_memory_allocated`` over a few
   steady-state steps, less what was allocated before the mode's model existed;
4. timed rounds, all modes interleaved in ABBA order; each round times a block of steps with CUDA
   events (``perf_counter`` on the CPU) and synchronises once, at the block's end.  Losses stay on
   the device during the block and are read once after it, so finiteness is checked at every step
   without a host sync inside the timed loop;
5. held-out accuracy.

Every step of 1-4 is a real training step, so the loss history covers the whole run.  The speedup
of each mode is the median of per-round ratios against the reference mode, with an interval.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields

import torch

from . import env as env_mod
from . import gpu_noise, records
from .config import DEFAULT_MODES, MeasureConfig
from .data import DeviceDataset
from .errors import ConfigError, WorkloadError
from .known_state import measured_from_known_state
from .mode_runner import ModeRunner, ScalerStats, prepare
from .modes import PrecisionMode, cuda_bf16_supported, cuda_index, require_device, resolve_mode, unsupported_reason
from .precision_coverage import PrecisionCoverage, measure_precision_coverage
from .precision_policy import cudnn_benchmark, numerics_policy
from .profiles import SLOW_ON_CPU, cpu_threads, default_measure_config, sized_for
from .stats import Estimate, abba_order, estimate_ratio, round_ratios, summarize_times
from .workload_checks import build_model
from .workloads import Workload, accuracy_fit_problem, describe_output, get_workload, metric_of, prediction_of

RESULTS_VERSION = 1


@dataclass
class ModeMeasurement:
    """Everything measured for one mode; plain data that serialises to JSON."""

    mode: str
    supported: bool = True
    unsupported_reason: str = ""
    error: str = ""
    """Set when the mode failed while running (out of memory, an exception in the model)."""
    failed_phase: str = ""
    """Where it failed: set-up, warm-up, memory pass, lead-in block, timed round k, balance block, evaluation."""
    step_times_s: list[float] = field(default_factory=list)
    """Seconds per step, one value per timed round (block time / steps per block)."""
    host_times_s: list[float] = field(default_factory=list)
    """Seconds the host took to enqueue one step, one value per timed round (CUDA; equal to the step time on the CPU)."""
    busy_step_s: float | None = None
    """Device time of one step with every kernel queued in advance (CUDA launch-bound probe), or None."""
    block_seconds: float = 0.0
    """Device seconds of every block of training steps timed in this mode (lead-in, rounds, balance)."""
    peak_memory_bytes: int | None = None
    """Peak of one training step: parameters, buffers, optimizer state, gradients, activations, input batch."""
    activation_memory_bytes: int | None = None
    """Its activation part: what the forward keeps for backward, input batch and its casts included."""
    memory: dict = field(default_factory=dict)
    """The breakdown of ``peak_memory_bytes`` and how it was measured (see :func:`memory_pass`)."""
    memory_note: str = ""
    losses: list[float] = field(default_factory=list)
    """The loss at every training step of the run, in order."""
    first_nonfinite_step: int | None = None
    nonfinite_steps: int = 0
    scaler: ScalerStats | None = None
    accuracy: float | None = None
    """Held-out accuracy when the workload's metric is accuracy (the default); None for another metric."""
    precision_coverage: PrecisionCoverage | None = None
    metric_name: str = "accuracy"
    """The workload's held-out metric: ``accuracy`` unless the workload brings its own."""
    metric: float | None = None
    higher_is_better: bool = True

    def __post_init__(self):
        if self.metric is None and self.accuracy is not None and self.metric_name == "accuracy":
            self.metric = self.accuracy  # results written before metrics had names

    def set_metric(self, name: str, value: float, higher_is_better: bool) -> None:
        """Record the held-out metric; accuracy stays readable as ``.accuracy``."""
        self.metric_name, self.metric, self.higher_is_better = name, value, higher_is_better
        self.accuracy = value if name == "accuracy" else None

    @property
    def ok(self) -> bool:
        return self.supported and not self.error

    @property
    def step_time_s(self) -> float | None:
        return summarize_times(self.step_times_s)["median"] if self.step_times_s else None

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    def record_losses(self, values: Sequence[float]) -> None:
        for value in values:
            if not math.isfinite(value):
                self.nonfinite_steps += 1
                if self.first_nonfinite_step is None:
                    self.first_nonfinite_step = len(self.losses)
            self.losses.append(value)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["losses"] = [json_float(v) for v in self.losses]
        d["scaler"] = records.to_dict(self.scaler) if self.scaler else None
        d["precision_coverage"] = self.precision_coverage.to_dict() if self.precision_coverage else None
        d["metric"] = None if self.metric is None else json_float(self.metric)
        d["accuracy"] = None if self.accuracy is None else json_float(self.accuracy)
        d["step_time_summary"] = summarize_times(self.step_times_s)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModeMeasurement:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values["losses"] = [float(v) for v in values.get("losses", [])]
        for key in ("metric", "accuracy"):
            if isinstance(values.get(key), str):
                values[key] = float(values[key])
        if values.get("scaler"):
            values["scaler"] = records.from_dict(ScalerStats, values["scaler"])
        if values.get("precision_coverage"):
            values["precision_coverage"] = PrecisionCoverage.from_dict(values["precision_coverage"])
        return cls(**values)


def json_float(value: float):
    """Strict JSON has no NaN/inf: non-finite losses are written as the strings 'nan', 'inf', '-inf'."""
    return value if math.isfinite(value) else str(value)


@dataclass
class Comparison:
    """One mode against the reference: speedup with interval, peak-memory ratio."""

    mode: str
    reference: str
    speedup: Estimate | None = None
    memory_ratio: float | None = None
    note: str = ""

    def to_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup.to_dict() if self.speedup else None}

    @classmethod
    def from_dict(cls, d: dict) -> Comparison:
        return cls(**{**d, "speedup": Estimate.from_dict(d["speedup"]) if d.get("speedup") else None})


@dataclass
class Measurements:
    """The result of :func:`measure`: per-mode measurements, comparisons, and where they were taken."""

    workload: str
    device: str
    config: MeasureConfig
    batch_size: int
    environment: dict
    dataset: dict
    reference: ModeMeasurement
    modes: dict[str, ModeMeasurement]
    comparisons: dict[str, Comparison]
    noise: dict = field(default_factory=dict)
    """NVML noise: snapshots "before" and "after", and "window": processes that used the GPU and
    throttling during the timed rounds (:class:`pytest_ampgate.gpu_noise.WindowNoise`)."""
    wall_time_s: float = 0.0
    version: int = RESULTS_VERSION
    distributed: dict = field(default_factory=dict)
    """For runs under torch.distributed: world size, backend, modes, per-rank figures (see distributed.py)."""

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "workload": self.workload,
            "device": self.device,
            "config": self.config.to_dict(),
            "batch_size": self.batch_size,
            "environment": self.environment,
            "dataset": self.dataset,
            "reference": self.reference.to_dict(),
            "modes": {k: v.to_dict() for k, v in self.modes.items()},
            "comparisons": {k: v.to_dict() for k, v in self.comparisons.items()},
            "noise": self.noise,
            "wall_time_s": self.wall_time_s,
            **({"distributed": self.distributed} if self.distributed else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Measurements:
        return cls(
            workload=d["workload"],
            device=d["device"],
            config=MeasureConfig.from_dict(d["config"]),
            batch_size=d["batch_size"],
            environment=d["environment"],
            dataset=d["dataset"],
            reference=ModeMeasurement.from_dict(d["reference"]),
            modes={k: ModeMeasurement.from_dict(v) for k, v in d["modes"].items()},
            comparisons={k: Comparison.from_dict(v) for k, v in d["comparisons"].items()},
            noise=d.get("noise", {}),
            wall_time_s=d.get("wall_time_s", 0.0),
            version=d.get("version", RESULTS_VERSION),
            distributed=d.get("distributed", {}),
        )

    def each_mode(self) -> Iterator[tuple[ModeMeasurement, Comparison | None]]:
        """Every measured mode, the reference first, with its comparison to the reference (None for the reference)."""
        yield self.reference, None
        for name, mm in self.modes.items():
            yield mm, self.comparisons.get(name)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)

    @classmethod
    def from_json(cls, text: str) -> Measurements:
        return cls.from_dict(json.loads(text))


# --- timing ----------------------------------------------------------------------------------

LAUNCH_BOUND_IDLE = 0.25
"""A step is launch-bound when its device idles at least this share of it.  A GPU-bound step keeps
the launch queue full and its device idle close to 0%; any sizeable idle share means the device
waits for the host, so the step cannot get shorter than the host's launch time, which AMP only
lengthens (casts, scaler ops).  A quarter leaves room for the probe's noise either way."""


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_context(device: torch.device):
    """The CUDA device context for ``device`` (so events, ``_sleep`` and streams follow cuda:N), or nothing."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.device(device if device.index is not None else torch.cuda.current_device())
    return contextlib.nullcontext()


@contextlib.contextmanager
def no_cyclic_gc() -> Iterator[None]:
    """Cyclic garbage collection off inside a timed block: a collection would land in one mode's time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass(frozen=True)
class BlockTiming:
    """One block of steps: its elapsed time (device time on CUDA) and the host's time to enqueue it."""

    seconds: float
    host_s: float


class CpuTimer:
    """The CPU: the host does the work, so elapsed and host time are one ``perf_counter`` reading."""

    def time(self, runner: ModeRunner, run: Callable[[], list]) -> tuple[BlockTiming, list]:
        begin = time.perf_counter()
        losses = run()
        seconds = time.perf_counter() - begin
        return BlockTiming(seconds, seconds), losses

    def busy(self, runner: ModeRunner, run: Callable[[], list], steps: int, host_step_s: float) -> tuple[float | None, list]:
        """No launch queue on the CPU: nothing to probe."""
        return None, run()


class CudaTimer:
    """CUDA events around the block, one synchronisation at its end; the host's enqueue time beside it."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    def time(self, runner: ModeRunner, run: Callable[[], list]) -> tuple[BlockTiming, list]:
        with device_context(self.device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            begin = time.perf_counter()
            losses = run()
            end.record()
            host = time.perf_counter() - begin
            end.synchronize()
            return BlockTiming(start.elapsed_time(end) / 1000.0, host), losses

    def busy(self, runner: ModeRunner, run: Callable[[], list], steps: int, host_step_s: float) -> tuple[float | None, list]:
        """Device time of ``steps`` steps with every kernel queued before the device starts them.

        A ``torch.cuda._sleep`` kernel keeps the device busy while the host enqueues the steps; the
        time from an event after the sleep to one after the steps is then the device's own work,
        without the gaps where it waited for the host.  If the sleep ended before the host finished
        (a host sync in the step, a full launch queue), the probe says nothing: None.
        """
        from .delays import gpu_cycles_per_second

        with device_context(self.device):
            index = torch.cuda.current_device()
            torch.cuda.synchronize()
            sleep_s = min(max(4 * host_step_s * steps, 2e-3), 0.2)
            after_sleep, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(max(1, int(sleep_s * gpu_cycles_per_second(index))))
            after_sleep.record()
            losses = run()
            end.record()
            covered = not after_sleep.query()
            end.synchronize()
            if not covered:
                return None, losses
            return after_sleep.elapsed_time(end) / 1000.0 / steps, losses


def default_timer(device: torch.device):
    return CudaTimer(device) if torch.device(device).type == "cuda" else CpuTimer()


def timed_block(runner: ModeRunner, dataset: DeviceDataset, batch_size: int, steps: int, timer=None) -> tuple[BlockTiming, list[float]]:
    """Run ``steps`` training steps under the mode's numerics, cyclic GC off; return (timing, losses).

    On CUDA the block is bracketed by two events and synchronised once at its end; the losses,
    kept on the device meanwhile, are read back only after that.
    """
    timer = timer or default_timer(runner.device)

    def run() -> list:
        return [runner.step(*dataset.batch(runner.steps_taken, batch_size)) for _ in range(steps)]

    with numerics_policy(runner.mode), no_cyclic_gc():
        timing, losses = timer.time(runner, run)
    return timing, _read_losses(losses)


def time_block(runner: ModeRunner, dataset: DeviceDataset, batch_size: int, steps: int, timer=None) -> tuple[float, list[float]]:
    """Run ``steps`` training steps; return (seconds, losses).  See :func:`timed_block`."""
    timing, losses = timed_block(runner, dataset, batch_size, steps, timer)
    return timing.seconds, losses


def _read_losses(losses: list[torch.Tensor]) -> list[float]:
    return torch.stack(losses).float().cpu().tolist() if losses else []


@dataclass(frozen=True)
class LaunchBound:
    """Whether a mode's step is bound by the host launching kernels, with the numbers that say so."""

    mode: str
    step_s: float
    """Device time per step in the timed rounds (median)."""
    host_s: float
    """Host time to enqueue one step (median)."""
    busy_s: float
    """Device time per step when its kernels were all queued in advance (the device's own work)."""

    @property
    def idle_share(self) -> float:
        return max(0.0, 1.0 - self.busy_s / self.step_s) if self.step_s > 0 else 0.0

    @property
    def bound(self) -> bool:
        return self.idle_share >= LAUNCH_BOUND_IDLE

    def describe(self) -> str:
        return (
            f"{self.mode} is launch-bound: its GPU works {self.busy_s * 1e3:.3g} ms of each {self.step_s * 1e3:.3g} ms step "
            f"(idle {self.idle_share:.0%}) while the host takes {self.host_s * 1e3:.3g} ms to launch it"
        )


def launch_bound(mm: ModeMeasurement) -> LaunchBound | None:
    """The launch-bound diagnosis of one measured mode, or None where it could not be probed (CPU, host syncs)."""
    if mm.busy_step_s is None or not mm.step_times_s or not mm.host_times_s:
        return None
    from .stats import median

    return LaunchBound(mm.mode, median(mm.step_times_s), median(mm.host_times_s), mm.busy_step_s)


# --- peak memory -----------------------------------------------------------------------------

MEMORY_COVERS = (
    "one training step's peak: parameters, buffers, optimizer state, gradients, activations, the input batch "
    "(a fresh copy in every mode, as a data loader delivers it, plus its casts) and temporaries; requested "
    "bytes, without allocator rounding, library workspaces or other modes' memory"
)


def _storage_bytes(tensors, seen: set) -> int:
    total = 0
    for t in tensors:
        if not torch.is_tensor(t) or t.device.type == "meta":
            continue
        try:
            local = t.to_local() if hasattr(t, "to_local") else t  # FSDP2/DTensor: this rank's shard
            storage = local.untyped_storage()
            key, size = (storage.data_ptr(), str(local.device)), storage.nbytes()
        except (RuntimeError, TypeError, NotImplementedError):  # a tensor subclass without storage
            continue
        if key in seen or size == 0:
            continue
        seen.add(key)
        total += size
    return total


def state_bytes(runner: ModeRunner) -> dict:
    """Bytes the mode holds between steps: parameters, buffers, optimizer state; and its gradients' size."""
    seen: set = set()
    params = list(runner.model.parameters())
    parameter_bytes = _storage_bytes(params, seen)
    buffer_bytes = _storage_bytes(runner.model.buffers(), seen)
    optimizer_tensors = [v for state in runner.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    optimizer_bytes = _storage_bytes(optimizer_tensors, seen)
    gradient_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return {
        "parameter_bytes": parameter_bytes,
        "buffer_bytes": buffer_bytes,
        "optimizer_state_bytes": optimizer_bytes,
        "gradient_bytes": gradient_bytes,
        "state_bytes": parameter_bytes + buffer_bytes + optimizer_bytes,
    }


class _ForwardMarks:
    """Pre- and post-forward hooks on the model: live bytes when the forward starts and ends."""

    def __init__(self, model, read: Callable[[str], None]):
        self.handles = [
            model.register_forward_pre_hook(lambda *_a: read("start")),
            model.register_forward_hook(lambda *_a: read("end")),
        ]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _cuda_requested(device: torch.device, which: str) -> int:
    stats = torch.cuda.memory_stats(device)
    key = f"requested_bytes.all.{which}"
    return int(stats[key]) if key in stats else int(stats.get(f"allocated_bytes.all.{which}", 0))


def _cuda_step_memory(runner: ModeRunner, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[int, int, torch.Tensor, int]:
    """(peak above the step's start, activation bytes, loss, absolute peak) of one step, in requested bytes."""
    marks: dict = {}
    hooks = _ForwardMarks(runner.model, lambda what: marks.__setitem__(what, _cuda_requested(device, "current")))
    try:
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = _cuda_requested(device, "current")
        xb, yb = x.clone(), y.clone()
        batch = xb.untyped_storage().nbytes() + yb.untyped_storage().nbytes()
        loss = runner.step(xb, yb)
        del xb, yb
        _synchronize(device)
        absolute = _cuda_requested(device, "peak")
    finally:
        hooks.remove()
    activation = marks["end"] - marks["start"] + batch if "start" in marks and "end" in marks else None
    return absolute - start, activation, loss, absolute


def _cpu_step_memory(runner: ModeRunner, x: torch.Tensor, y: torch.Tensor) -> tuple[int, int | None, torch.Tensor]:
    """(peak above the step's start, activation bytes, loss) of one CPU step, from the profiler's allocation events.

    The CPU allocator reports every allocation and free (requested bytes) to ``torch.profiler``;
    their running sum over the step, in time order, is the memory the step added.  Two markers
    from the forward hooks give the live bytes when the forward starts and ends.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    def mark(what: str) -> None:
        with record_function(f"ampgate::forward_{what}"):
            pass

    hooks = _ForwardMarks(runner.model, mark)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            xb, yb = x.clone(), y.clone()
            batch = xb.untyped_storage().nbytes() + yb.untyped_storage().nbytes()
            loss = runner.step(xb, yb)
            del xb, yb
    finally:
        hooks.remove()
    allocations, marks = [], {}
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        fields_ = getattr(node, "extra_fields", None)
        if hasattr(fields_, "alloc_size") and str(getattr(fields_, "device", "cpu")).startswith("cpu"):
            allocations.append((node.start_time_ns, int(fields_.alloc_size)))
        elif node.name.startswith("ampgate::forward_"):
            marks[node.name.rsplit("_", 1)[1]] = node.start_time_ns
    allocations.sort()
    live = peak = 0
    at = {}
    for t, size in allocations:
        for what, when in marks.items():
            if what not in at and when < t:
                at[what] = live
        live += size
        peak = max(peak, live)
    for what in marks:
        at.setdefault(what, live)
    activation = at["end"] - at["start"] + batch if "start" in at and "end" in at else None
    return peak, activation, loss


def memory_pass(
    runner: ModeRunner, dataset: DeviceDataset, batch_size: int, steps: int, device: torch.device, base: int | None = None
) -> tuple[dict, list]:
    """Peak memory of a steady-state training step, the same way in every mode; (figures, losses).

    Gradients are set to None before each step, so every mode starts it holding its parameters,
    buffers and optimizer state (and whatever else it keeps between steps), and the input batch
    is a fresh copy in every mode.  CUDA: requested bytes (``torch.cuda.memory_stats``, no
    allocator rounding) at the step's peak, less ``base``, what was allocated before this mode's
    model existed (after the libraries were warmed: their workspaces are in ``base`` whichever
    mode or test came first).  CPU: the parameters, buffers and optimizer state counted from the
    tensors themselves, plus the step's peak from the profiler's allocation events (requested
    bytes); only the first step is profiled.  Either way the figure does not depend on the order
    of modes or tests.
    """
    state = state_bytes(runner)
    losses, peaks, activations, totals = [], [], [], []
    with numerics_policy(runner.mode):
        for k in range(steps):
            runner.optimizer.zero_grad(set_to_none=True)
            x, y = dataset.batch(runner.steps_taken, batch_size)
            if device.type == "cuda":
                peak, activation, loss, absolute = _cuda_step_memory(runner, x, y, device)
                totals.append(absolute - (base or 0))
            elif k == 0:
                peak, activation, loss = _cpu_step_memory(runner, x, y)
            else:
                losses.append(runner.step(x, y))
                continue
            losses.append(loss)
            peaks.append(peak)
            if activation is not None:
                activations.append(activation)
    figures = {
        **state,
        "step_peak_bytes": max(peaks),
        "peak_bytes": max(totals) if totals else state["state_bytes"] + max(peaks),
        "activation_bytes": max(activations) if activations else None,
        "method": "torch.cuda.memory_stats requested bytes" if device.type == "cuda" else "torch.profiler CPU allocation events",
        "covers": MEMORY_COVERS,
    }
    return figures, losses


# --- the protocol ----------------------------------------------------------------------------


def _check_fits(workload: Workload, model: torch.nn.Module, dataset: DeviceDataset) -> None:
    """One fp32 forward and loss on a batch, so a misfit is reported as the user's error, not ours.

    The batch is the training batch size (capped at 32, to stay cheap on the CPU): with two samples
    a two-class output (2, 2) against targets (2,) broadcasts in an elementwise loss and slips by."""
    n_train = dataset.train_x.shape[0]
    if workload.batch_size > n_train:
        raise WorkloadError(
            f"workload {workload.name!r}: batch_size {workload.batch_size} is larger than its training set ({n_train} samples)"
        )
    param = next(model.parameters(), None)
    where = param.device if param is not None else torch.device("cpu")
    x, y = (t.to(where) for t in dataset.batch(0, min(workload.batch_size, n_train, 32)))
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise WorkloadError(
            f"workload {workload.name!r}: the model rejected a batch from its data "
            f"(input shape {tuple(x.shape)}, {x.dtype}): {type(exc).__name__}: {exc}"
        ) from exc
    try:
        with torch.no_grad():
            loss = workload.loss_fn(out, y)
    except Exception as exc:
        raise WorkloadError(
            f"workload {workload.name!r}: the loss rejected the model's output "
            f"({f'shape {tuple(out.shape)}, {out.dtype}' if torch.is_tensor(out) else describe_output(out)}) "
            f"with targets (shape {tuple(y.shape)}, {y.dtype}): {type(exc).__name__}: {exc}"
        ) from exc
    if not torch.is_tensor(loss) or loss.numel() != 1:
        shape = tuple(loss.shape) if torch.is_tensor(loss) else type(loss).__name__
        raise WorkloadError(f"workload {workload.name!r}: the loss must be a scalar tensor, got {shape}")
    _check_metric_fits(workload, model, out, y, dataset)


def _check_metric_fits(workload: Workload, model: torch.nn.Module, out, y: torch.Tensor, dataset: DeviceDataset) -> None:
    """Before training: the model's output must fit the metric (shapes named), and a custom metric
    must return one number, so a misfit is not found after every mode has trained."""
    where = f"workload {workload.name!r}"
    if workload.metric is None:
        try:
            pred = (workload.prediction or prediction_of)(out)
        except WorkloadError as exc:
            raise WorkloadError(f"{where}: {exc}") from None
        problem = accuracy_fit_problem(pred, y)
        if problem:
            raise WorkloadError(
                f"{where}: the model's output {describe_output(out)} does not fit the default metric, accuracy, "
                f"against targets {tuple(y.shape)} {y.dtype}: {problem}"
            )
        return
    metric = metric_of(workload)
    x_test, y_test = next(iter(dataset.test_batches(min(32, dataset.n_test))))
    param = next(model.parameters(), None)
    if param is not None:
        x_test, y_test = x_test.to(param.device), y_test.to(param.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            value = metric.fn(model, [(x_test, y_test)])
    except Exception as exc:
        raise WorkloadError(
            f"{where}: its metric {metric.name!r} failed on a held-out batch (input {tuple(x_test.shape)} {x_test.dtype}, "
            f"targets {tuple(y_test.shape)} {y_test.dtype}; the model returns {describe_output(out)}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        model.train(was_training)
    metric.check_value(value, workload.name)


def _evaluate_metric(slot: _Slot, workload: Workload, dataset: DeviceDataset) -> None:
    """The workload's metric for one mode, recorded under its name."""
    metric = metric_of(workload)
    value = slot.runner.evaluate(dataset.test_batches(workload.eval_batch_size), metric)
    slot.m.set_metric(metric.name, metric.check_value(value, workload.name), metric.higher_is_better)


def _oom_message(device: torch.device, exc: BaseException) -> str:
    text = f"out of memory: {str(exc).splitlines()[0]}"
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        text += (
            f" (allocated {torch.cuda.memory_allocated(device) / 2**20:.0f} MiB, "
            f"peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB, "
            f"free {free / 2**20:.0f} of {total / 2**20:.0f} MiB)"
        )
    return text


class _Slot:
    """One mode in the run: its measurement, and its runner while it is alive."""

    def __init__(self, mode: PrecisionMode, measurement: ModeMeasurement):
        self.mode = mode
        self.m = measurement
        self.runner: ModeRunner | None = None

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
        self.m.error = _oom_message(device, exc) if oom else f"{type(exc).__name__}: {exc}"
        self.m.failed_phase = phase
        self.runner = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


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


def _warm_libraries(device: torch.device) -> None:
    """One small matmul per dtype before any mode is measured, so cuBLAS/cuBLASLt workspaces exist already.

    Their first call in a process allocates the workspace through the caching allocator; warmed
    here, it is charged to no mode, whichever test or mode runs first.
    """
    if device.type != "cuda":
        return
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if cuda_bf16_supported(cuda_index(device)) else [])
    for dtype in dtypes:
        a = torch.ones(64, 64, device=device, dtype=dtype, requires_grad=True)
        (a @ a).sum().backward()
    _synchronize(device)


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
) -> Measurements:
    """Train ``workload`` under the reference mode and each of ``modes``; measure and compare them.

    ``modes`` are compared against ``config.reference_mode`` (fp32); naming the reference mode
    itself in ``modes`` gives an A/A control (two independent runs of the same mode).  Modes the
    hardware cannot run come back with ``supported=False`` and the reason; a mode that fails while
    running (out of memory, any exception in the model) comes back with ``error`` and
    ``failed_phase`` set, and the others are still measured.  ``timer`` replaces the device's
    timing source (CUDA events, ``perf_counter``): tests pass a fake one.

    ``runner_factory`` replaces :func:`mode_runner.prepare` (same arguments): the distributed ranks use it
    to wrap each mode's model in DDP or FSDP2, so they run exactly this protocol.

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
    reference_mode = resolve_mode(config.reference_mode)
    slots = [_Slot(reference_mode, ModeMeasurement(reference_mode.name))]
    slots += [_Slot(m, ModeMeasurement(m.name)) for m in (resolve_mode(x) for x in modes)]
    names = [s.mode.name for s in slots[1:]]
    if len(set(names)) != len(names):
        raise ConfigError(f"modes must not repeat, got {list(modes)}")
    for slot in slots:
        reason = unsupported_reason(slot.mode, device)
        if reason:
            slot.m.supported, slot.m.unsupported_reason = False, reason

    say(_cost_line(workload, slots, device, config))
    environment = records.to_dict(env_mod.fingerprint(device)) if slots[0].m.supported else {"device_type": device.type}
    dataset_info: dict = {}
    noise: dict = {}
    if any(s.m.supported for s in slots):
        with device_context(device):
            if dataset is not None:
                dataset = dataset.to(device)
            else:
                dataset = _dataset_for(workload, device, data_root, download, config.seed)
            dataset_info = dataset.describe()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                initial_model = build_model(workload)
            _check_fits(workload, initial_model, dataset)
            noise["before"] = records.to_dict(gpu_noise.noise_report(device))
            # On the CPU with profiles.CPU_THREADS: a CPU run's numbers must not depend on the core count.
            with cudnn_benchmark(config.cudnn_benchmark), cpu_threads(device.type):
                _warm_libraries(device)
                _run(
                    workload,
                    slots,
                    initial_model,
                    dataset,
                    device,
                    config,
                    say,
                    timer or default_timer(device),
                    noise,
                    runner_factory or prepare,
                )
            noise["after"] = records.to_dict(gpu_noise.noise_report(device))

    reference = slots[0].m
    comparisons = {s.mode.name: _compare(reference, s.m, config) for s in slots[1:]}
    return Measurements(
        workload=workload.name,
        device=str(device),
        config=config,
        batch_size=workload.batch_size,
        environment=environment,
        dataset=dataset_info,
        reference=reference,
        modes={s.mode.name: s.m for s in slots[1:]},
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
    running = [s.mode.name for s in slots if s.m.supported]
    line = (
        f"{workload.name} on {device}: {len(running)} mode(s) ({', '.join(running)}) x {config.total_steps()} training steps "
        f"of batch {workload.batch_size} ({config.warmup_steps} warm-up, {config.rounds} rounds x {config.steps_per_block} steps)"
    )
    slow = [name for name in running if name in SLOW_ON_CPU]
    if device.type == "cpu" and slow:
        line += (
            f"; {', '.join(slow)} run in float16, which a CPU without fp16 arithmetic runs many times slower "
            "than fp32: they are here for their numerics"
        )
    return line


def _run(workload, slots, initial_model, dataset, device, config: MeasureConfig, say, timer, noise: dict, runner_factory=prepare) -> None:
    batch = workload.batch_size
    steps = config.steps_per_block
    for slot in slots:
        if slot.m.supported:
            say(f"{workload.name}: {slot.mode.name}: set-up, warm-up and memory pass")
            _start(slot, workload, initial_model, dataset, device, config, timer, runner_factory)

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
    window = gpu_noise.open_noise_window(device)
    for round_index, positions in enumerate(order):
        say(f"{workload.name}: timed round {round_index + 1}/{config.rounds}: {', '.join(slots[i].mode.name for i in positions)}")
        for i in positions:
            slot = slots[i]
            if slot.runner is None:
                continue
            timing = slot.block(dataset, batch, steps, device, f"timed round {round_index + 1}", timer)
            if timing is not None:
                slot.runner.note_scale()
                slot.m.step_times_s.append(timing.seconds / steps)
                slot.m.host_times_s.append(timing.host_s / steps)
    noise["window"] = records.to_dict(window.close())

    for index, slot in enumerate(slots):
        if slot.runner is not None and order and index != lead:
            slot.block(dataset, batch, steps, device, "balance block", timer)

    for slot in slots:
        if slot.runner is None:
            continue
        say(f"{workload.name}: {slot.mode.name}: held-out {metric_of(workload).name}")
        try:
            with numerics_policy(slot.mode):
                _evaluate_metric(slot, workload, dataset)
            slot.m.scaler = slot.runner.scaler_stats()
        except Exception as exc:  # any exception fails this mode only
            slot.fail(device, exc, "evaluation")
        slot.runner = None
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _start(
    slot: _Slot, workload: Workload, initial_model, dataset: DeviceDataset, device, config: MeasureConfig, timer, runner_factory=prepare
) -> None:
    """Set-up, precision-coverage step, warm-up (its last steps probe launch-boundness) and the memory pass."""
    batch = workload.batch_size
    phase = "set-up"
    try:
        base = None
        if device.type == "cuda":
            _synchronize(device)
            base = _cuda_requested(device, "current")
        runner = runner_factory(slot.mode, initial_model, workload.optimizer_factory, workload.loss_fn, device)
        slot.runner = runner
        with numerics_policy(slot.mode):
            losses = []
            if config.precision_coverage:
                x, y = dataset.batch(runner.steps_taken, batch)
                slot.m.precision_coverage = measure_precision_coverage(lambda: losses.append(runner.step(x, y)), model=runner.model)
            phase = "warm-up"
            probe = min(5, config.warmup_steps // 2)
            begin = time.perf_counter()
            for _ in range(config.warmup_steps - probe):
                losses.append(runner.step(*dataset.batch(runner.steps_taken, batch)))
            _synchronize(device)
            host_step = (time.perf_counter() - begin) / max(1, config.warmup_steps - probe)
            if probe:
                with no_cyclic_gc():
                    slot.m.busy_step_s, probe_losses = timer.busy(
                        runner, lambda: [runner.step(*dataset.batch(runner.steps_taken, batch)) for _ in range(probe)], probe, host_step
                    )
                losses += probe_losses
            slot.m.record_losses(_read_losses(losses))
        runner.note_scale()
        if config.memory_steps == 0:
            slot.m.memory_note = "memory pass disabled (memory_steps=0)"
            return
        phase = "memory pass"
        figures, losses = memory_pass(runner, dataset, batch, config.memory_steps, device, base)
        slot.m.record_losses(_read_losses(losses))
        slot.m.memory = figures
        slot.m.peak_memory_bytes = figures["peak_bytes"]
        slot.m.activation_memory_bytes = figures["activation_bytes"]
    except Exception as exc:  # any exception fails this mode only; KeyboardInterrupt still stops the run
        slot.fail(device, exc, phase)


def _compare(reference: ModeMeasurement, m: ModeMeasurement, config: MeasureConfig) -> Comparison:
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
