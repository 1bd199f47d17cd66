"""The records of a measurement: one mode's figures, its comparison with the reference, the whole run.

Typed inside the engine; :meth:`Measurements.to_json` / :meth:`Measurements.from_json` are the JSON
boundary (results files, the xdist and distributed workers' hand-over), through the one generic
conversion of :mod:`pytest_ampgate.records`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from .config import MeasureConfig
from .gpu_noise import NoiseReadings
from .mode_runner import ScalerStats
from .precision_coverage import PrecisionCoverage
from .records import from_dict, to_dict
from .stats import Estimate, summarize_times

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
    probe_host_step_s: float | None = None
    """Host time to launch one step while that probe held the device busy (launch cost alone), or None."""
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
    compiled: dict | None = None
    """Under ``compile``: the spec, compile time, dynamo's graphs, graph breaks and recompiles (warm-up and timed)."""

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
        """Its fields, plus pytest-benchmark's summary of its step times for readers of the JSON."""
        return {**to_dict(self), "step_time_summary": summarize_times(self.step_times_s)}

    @classmethod
    def from_dict(cls, d: dict) -> ModeMeasurement:
        return from_dict(cls, d)


@dataclass
class Comparison:
    """One mode against the reference: speedup with interval, peak-memory ratio."""

    mode: str
    reference: str
    speedup: Estimate | None = None
    memory_ratio: float | None = None
    note: str = ""


def noise_dict(noise: NoiseReadings) -> dict:
    """The noise readings as JSON data, only those that were taken (none on a CPU run)."""
    return {k: v for k, v in to_dict(noise).items() if v is not None}


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
    noise: NoiseReadings = field(default_factory=NoiseReadings)
    wall_time_s: float = 0.0
    version: int = RESULTS_VERSION
    distributed: dict = field(default_factory=dict)
    """For runs under torch.distributed: world size, backend, modes, per-rank figures (see distributed.py)."""

    def __post_init__(self):
        if isinstance(self.noise, Mapping):  # as read from JSON, or written by hand in a test
            self.noise = from_dict(NoiseReadings, self.noise)

    def to_dict(self) -> dict:
        d = to_dict(self)
        d["noise"] = noise_dict(self.noise)
        if not self.distributed:
            del d["distributed"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Measurements:
        return from_dict(cls, d)

    def each_mode(self) -> Iterator[tuple[ModeMeasurement, Comparison | None]]:
        """Every measured mode, the reference first, with its comparison to the reference (None for the reference)."""
        yield self.reference, None
        for name, mm in self.modes.items():
            yield mm, self.comparisons.get(name)

    def reference_of(self, name: str) -> ModeMeasurement:
        """The row ``name`` is compared with: the reference, or under ``also_eager`` a compiled row's compiled reference."""
        comparison = self.comparisons.get(name)
        compared = comparison.reference if comparison is not None else self.reference.mode
        return self.reference if compared == self.reference.mode else self.modes.get(compared, self.reference)

    def figures(self) -> list[MeasuredFigures]:
        """Every measured mode's figures, the reference first: what the baseline stores and every output shows."""
        return [MeasuredFigures.of(mm, comparison, mm is self.reference) for mm, comparison in self.each_mode()]

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)

    @classmethod
    def from_json(cls, text: str) -> Measurements:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class MeasuredFigures:
    """One mode's figures as measured, derived once: the baseline entry and every output read them.

    None where a figure was not measured.  The reference's memory ratio is 1.0 where its peak was
    measured (it is compared with itself); its speedup is None (it has no comparison).
    """

    mode: str
    reference: bool
    """The reference mode (fp32): the others are compared with it."""
    step_time_s: float | None
    speedup: Estimate | None
    peak_memory_bytes: int | None
    memory_ratio: float | None
    metric_name: str
    metric: float | None
    """The held-out metric (accuracy unless the workload brings its own)."""
    higher_is_better: bool
    accuracy: float | None
    final_loss: float | None
    first_nonfinite_step: int | None
    nonfinite_steps: int
    low_precision_share: float | None
    """Share of the step's FLOPs run in low precision, where it was counted."""

    @classmethod
    def of(cls, mm: ModeMeasurement, comparison: Comparison | None, reference: bool) -> MeasuredFigures:
        cov = mm.precision_coverage
        return cls(
            mode=mm.mode,
            reference=reference,
            step_time_s=mm.step_time_s,
            speedup=comparison.speedup if comparison else None,
            peak_memory_bytes=mm.peak_memory_bytes,
            memory_ratio=(1.0 if mm.peak_memory_bytes else None) if reference else comparison and comparison.memory_ratio,
            metric_name=mm.metric_name,
            metric=mm.metric if mm.metric is not None else mm.accuracy,
            higher_is_better=mm.higher_is_better,
            accuracy=mm.accuracy,
            final_loss=mm.final_loss,
            first_nonfinite_step=mm.first_nonfinite_step,
            nonfinite_steps=mm.nonfinite_steps,
            low_precision_share=cov.share if cov is not None and cov.total_flops else None,
        )
