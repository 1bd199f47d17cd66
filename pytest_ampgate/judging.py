"""What every check reads, and how checks speak of figures: one home for both, below the checks themselves."""

from __future__ import annotations

from dataclasses import dataclass

from .baselines import Baseline, ModeBaseline
from .config import GateConfig
from .metrics import Tolerance
from .results import Measurements
from .stats import MIN_ROUNDS_FOR_CONFIDENCE
from .verdict import RECORD_HINT


@dataclass(frozen=True)
class Judging:
    """What every check reads: the run, the gate's settings, the stored baseline and how to speak of it."""

    measurements: Measurements
    config: GateConfig
    baseline: Baseline | None = None
    missing_baseline_note: str = ""
    """Why no baseline applied (e.g. which environments have one), for the metric check's line."""
    metric_tolerance: Tolerance | float | None = None
    """The metric's tolerances (``Metric.tolerances``); None: by the metric's name, from the config."""
    same_run_tolerance: Tolerance | float | None = None
    recording: bool = False
    """This run becomes the stored baseline (``--ampgate-update``): its own noise is judged."""

    @property
    def missing(self) -> str:
        return self.missing_baseline_note or f"no stored baseline; {RECORD_HINT}"

    @property
    def env_label(self) -> str:
        return env_label_of(self.baseline.environment) if self.baseline else ""

    def stored(self, mode: str) -> ModeBaseline | None:
        return self.baseline.modes.get(mode) if self.baseline else None


def fmt_bytes(n: float | None) -> str:
    """Bytes as the reports show them (MiB, one decimal)."""
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def fmt_seconds(s: float) -> str:
    """A step time as the reports show it: milliseconds below a second."""
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def too_few_rounds(est, config: GateConfig) -> str:
    """Why the interval cannot decide anything (too few rounds for the requested coverage), or ''."""
    if est.rounds >= MIN_ROUNDS_FOR_CONFIDENCE and est.confidence >= config.confidence:
        return ""
    return (
        f"only {est.rounds} round{'s' if est.rounds != 1 else ''}, so the interval covers {est.confidence:.0%}, "
        f"not {config.confidence:.0%}: no verdict; raise rounds to at least {max(MIN_ROUNDS_FOR_CONFIDENCE, est.rounds + 1)}"
    )


def env_label_of(environment: dict) -> str:
    """Where a baseline was recorded, in a few words: the device and torch's minor version."""
    name = environment.get("device_name", "?")
    torch_version = ".".join(str(environment.get("torch_version", "?")).split("+")[0].split(".")[:2])
    return f"{name}, torch {torch_version}"
