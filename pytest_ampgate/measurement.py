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

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Iterator, Sequence

import torch

from . import env as env_mod
from .data import DeviceDataset
from .config import MeasureConfig
from .errors import ConfigError, WorkloadError
from .modes import ModeRunner, PrecisionMode, ScalerStats, cudnn_benchmark, numerics_policy, prepare, resolve_mode, unsupported_reason
from .precision_coverage import PrecisionCoverage, measure_precision_coverage
from .stats import Estimate, abba_order, estimate_ratio, round_ratios, summarize_times
from .workloads import Workload, get_workload

RESULTS_VERSION = 1
DEFAULT_MODES = ("amp_fp16", "amp_bf16")


@dataclass
class ModeMeasurement:
    """Everything measured for one mode; plain data that serialises to JSON."""

    mode: str
    supported: bool = True
    unsupported_reason: str = ""
    error: str = ""
    """Set when the mode failed while running (out of memory, an exception in the model)."""
    step_times_s: list[float] = field(default_factory=list)
    """Seconds per step, one value per timed round (block time / steps per block)."""
    peak_memory_bytes: int | None = None
    memory_note: str = ""
    losses: list[float] = field(default_factory=list)
    """The loss at every training step of the run, in order."""
    first_nonfinite_step: int | None = None
    nonfinite_steps: int = 0
    scaler: ScalerStats | None = None
    accuracy: float | None = None
    precision_coverage: PrecisionCoverage | None = None

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
        d["scaler"] = self.scaler.to_dict() if self.scaler else None
        d["precision_coverage"] = self.precision_coverage.to_dict() if self.precision_coverage else None
        d["step_time_summary"] = summarize_times(self.step_times_s)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModeMeasurement":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values["losses"] = [float(v) for v in values.get("losses", [])]
        if values.get("scaler"):
            values["scaler"] = ScalerStats.from_dict(values["scaler"])
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
    def from_dict(cls, d: dict) -> "Comparison":
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
    """NVML noise indicators before and after timing: {"before": {...}, "after": {...}}."""
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
    def from_dict(cls, d: dict) -> "Measurements":
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
    def from_json(cls, text: str) -> "Measurements":
        return cls.from_dict(json.loads(text))


# --- timing ----------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(runner: ModeRunner, dataset: DeviceDataset, batch_size: int, steps: int) -> tuple[float, list[float]]:
    """Run ``steps`` training steps; return (seconds, losses).

    On CUDA the block is bracketed by two events and synchronised once at its end; the losses,
    kept on the device meanwhile, are read back only after that.
    """
    device = runner.device
    losses = []
    with numerics_policy(runner.mode):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                losses.append(runner.step(*dataset.batch(runner.steps_taken, batch_size)))
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000.0
        else:
            begin = time.perf_counter()
            for _ in range(steps):
                losses.append(runner.step(*dataset.batch(runner.steps_taken, batch_size)))
            seconds = time.perf_counter() - begin
    return seconds, _read_losses(losses)


def _read_losses(losses: list[torch.Tensor]) -> list[float]:
    return torch.stack(losses).float().cpu().tolist() if losses else []


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
            f"workload {workload.name!r}: the loss rejected the model's output (shape {tuple(out.shape)}, {out.dtype}) "
            f"with targets (shape {tuple(y.shape)}, {y.dtype}): {type(exc).__name__}: {exc}"
        ) from exc
    if not torch.is_tensor(loss) or loss.numel() != 1:
        shape = tuple(loss.shape) if torch.is_tensor(loss) else type(loss).__name__
        raise WorkloadError(f"workload {workload.name!r}: the loss must be a scalar tensor, got {shape}")


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

    def block(self, dataset: DeviceDataset, batch: int, steps: int, device: torch.device) -> float | None:
        """One block of training steps, its losses recorded; its seconds, or None if the mode failed in it."""
        try:
            seconds, losses = time_block(self.runner, dataset, batch, steps)
        except RuntimeError as exc:  # CUDA out-of-memory is a RuntimeError too
            self.fail(device, exc)
            return None
        self.m.record_losses(losses)
        return seconds

    def fail(self, device: torch.device, exc: BaseException) -> None:
        oom = isinstance(exc, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))
        self.m.error = _oom_message(device, exc) if oom else f"{type(exc).__name__}: {exc}"
        self.runner = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


def measure(
    workload: Workload | str,
    modes: Sequence[str] = DEFAULT_MODES,
    *,
    device: str | torch.device = "cuda",
    config: MeasureConfig | None = None,
    dataset: DeviceDataset | None = None,
    data_root=None,
    download: bool = False,
    progress: Callable[[str], None] | None = None,
    runner_factory: Callable[..., ModeRunner] | None = None,
) -> Measurements:
    """Train ``workload`` under the reference mode and each of ``modes``; measure and compare them.

    ``modes`` are compared against ``config.reference_mode`` (fp32); naming the reference mode
    itself in ``modes`` gives an A/A control (two independent runs of the same mode).  Modes the
    hardware cannot run come back with ``supported=False`` and the reason; a mode that fails while
    running (out of memory) comes back with ``error`` set, and the others are still measured.

    ``runner_factory`` replaces :func:`modes.prepare` (same arguments): the distributed ranks use it
    to wrap each mode's model in DDP or FSDP2, so they run exactly this protocol.
    """
    started = time.perf_counter()
    config = config or MeasureConfig()
    workload = get_workload(workload)
    device = torch.device(device)
    say = progress or (lambda _msg: None)
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

    environment = env_mod.fingerprint(device).to_dict() if slots[0].m.supported else {"device_type": device.type}
    dataset_info: dict = {}
    noise: dict = {}
    if any(s.m.supported for s in slots):
        dataset = dataset.to(device) if dataset is not None else workload.dataset(device, root=data_root, download=download, seed=config.seed)
        dataset_info = dataset.describe()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            initial_model = workload.model_factory()
        _check_fits(workload, initial_model, dataset)
        noise["before"] = env_mod.noise_report(device).to_dict()
        with cudnn_benchmark(config.cudnn_benchmark):
            _run(workload, slots, initial_model, dataset, device, config, say, runner_factory or prepare)
        noise["after"] = env_mod.noise_report(device).to_dict()

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


def _run(workload, slots, initial_model, dataset, device, config: MeasureConfig, say, runner_factory=prepare) -> None:
    batch = workload.batch_size
    for slot in slots:
        if slot.m.supported:
            say(f"{workload.name}: {slot.mode.name}: set-up, warm-up and memory pass")
            try:
                _start(slot, workload, initial_model, dataset, device, config, runner_factory)
            except RuntimeError as exc:  # CUDA out-of-memory is a RuntimeError too
                slot.fail(device, exc)

    order = abba_order([i for i, s in enumerate(slots) if s.runner is not None], config.rounds)
    if order and order[0]:
        # Lead-in: one untimed block of the mode that opens round 0.  Under ABBA the mode that
        # closes a round also opens the next, running two blocks back to back (the second one on
        # warm caches); the lead-in gives the first mode that same start, so with an even number
        # of rounds the first and last modes get equally many back-to-back blocks, and nobody's
        # first timed block comes straight after another mode's warm-up.  The other modes take
        # their matching block after the rounds, so every mode trains for the same steps.
        slots[order[0][0]].block(dataset, batch, config.steps_per_block, device)
    for round_index, positions in enumerate(order):
        say(f"{workload.name}: timed round {round_index + 1}/{config.rounds}: {', '.join(slots[i].mode.name for i in positions)}")
        for i in positions:
            slot = slots[i]
            if slot.runner is None:
                continue
            seconds = slot.block(dataset, batch, config.steps_per_block, device)
            if seconds is not None:
                slot.runner.note_scale()
                slot.m.step_times_s.append(seconds / config.steps_per_block)

    for slot in slots:
        if slot.runner is not None and order and slot is not slots[order[0][0]]:
            slot.block(dataset, batch, config.steps_per_block, device)

    for slot in slots:
        if slot.runner is None:
            continue
        say(f"{workload.name}: {slot.mode.name}: held-out accuracy")
        try:
            with numerics_policy(slot.mode):
                slot.m.accuracy = slot.runner.evaluate(dataset.test_batches(workload.eval_batch_size))
            slot.m.scaler = slot.runner.scaler_stats()
        except RuntimeError as exc:  # CUDA out-of-memory is a RuntimeError too
            slot.fail(device, exc)
        slot.runner = None
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _start(slot: _Slot, workload: Workload, initial_model, dataset: DeviceDataset, device, config: MeasureConfig, runner_factory=prepare) -> None:
    """Set-up, precision-coverage step, warm-up and (on CUDA) the memory pass for one mode."""
    batch = workload.batch_size
    if device.type == "cuda":
        _synchronize(device)
        base = torch.cuda.memory_allocated(device)
    runner = runner_factory(slot.mode, initial_model, workload.optimizer_factory, workload.loss_fn, device)
    slot.runner = runner
    with numerics_policy(slot.mode):
        losses = []
        if config.precision_coverage:
            x, y = dataset.batch(runner.steps_taken, batch)
            slot.m.precision_coverage = measure_precision_coverage(lambda: losses.append(runner.step(x, y)), model=runner.model)
        for _ in range(config.warmup_steps):
            losses.append(runner.step(*dataset.batch(runner.steps_taken, batch)))
        slot.m.record_losses(_read_losses(losses))
    runner.note_scale()
    if device.type != "cuda":
        slot.m.memory_note = "peak memory is measured on CUDA devices only"
        return
    if config.memory_steps == 0:
        slot.m.memory_note = "memory pass disabled (memory_steps=0)"
        return
    _synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    with numerics_policy(slot.mode):
        losses = [runner.step(*dataset.batch(runner.steps_taken, batch)) for _ in range(config.memory_steps)]
    _synchronize(device)
    slot.m.peak_memory_bytes = torch.cuda.max_memory_allocated(device) - base
    slot.m.record_losses(_read_losses(losses))


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
