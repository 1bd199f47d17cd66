"""The per-mode figures every output shows, worked out in one place from one gated result.

The terminal table, JUnit properties, the JSON report, the pytest-benchmark entries and the chart
all show the same few numbers per mode: its outcome, step time, speedup with its interval, peak
memory and its ratio, the held-out metric beside its stored value, the final loss.  Deriving them
once means the outputs cannot disagree about, say, which stored value a custom metric is compared
with, or what the reference's memory ratio is.  Each output only formats them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..results import MeasuredFigures
from ..verdict import FAIL, INCONCLUSIVE, PASS, SKIPPED

if TYPE_CHECKING:
    from ..gate import GateResult
    from ..results import Comparison, ModeMeasurement
    from ..verdict import Verdict

WORST_FIRST = (FAIL, INCONCLUSIVE, PASS, SKIPPED)
UNSUPPORTED = "unsupported"
"""The outcome of a mode the hardware could not run (no check applies to it)."""


@dataclass(frozen=True)
class ModeFigures(MeasuredFigures):
    """One mode of one gated test, as the outputs show it: the measured figures plus the verdict's."""

    test_id: str = ""
    outcome: str = SKIPPED
    """The mode's worst check outcome, or 'unsupported' for a mode the hardware could not run."""
    baseline_metric: float | None = None
    """The metric's stored value for this mode and environment."""
    baseline_accuracy: float | None = None
    measurement: ModeMeasurement | None = field(default=None, repr=False, compare=False)
    """The whole measurement, for outputs that show more than these figures (the JSON report)."""
    comparison: Comparison | None = field(default=None, repr=False, compare=False)


def figures_of(result: GateResult) -> list[ModeFigures]:
    """Every measured mode of ``result``, the reference first."""
    out = []
    for (mm, comparison), measured in zip(result.measurements.each_mode(), result.measurements.figures()):
        out.append(
            ModeFigures(
                **{f.name: getattr(measured, f.name) for f in dataclasses.fields(measured)},
                test_id=result.test_id,
                outcome=mode_outcome(result.verdict, mm.mode) if mm.supported else UNSUPPORTED,
                baseline_metric=stored_metric(result, mm),
                baseline_accuracy=result.baseline_accuracy.get(mm.mode),
                measurement=mm,
                comparison=comparison,
            )
        )
    return out


def compiled_summary(mm: ModeMeasurement | None, short: bool = False) -> str:
    """A compiled mode's compile figures in a few words (backend, compile time, graph breaks, recompiles); '' for eager."""
    c = (mm.compiled if mm is not None else None) or {}
    if not c:
        return ""
    recompiles = len(c.get("timed_recompiles", [])) + int(c.get("recompiles", 0))
    figures = f"compiled in {c.get('compile_time_s', 0.0):.2f} s, {c.get('graph_breaks', 0)} graph breaks, {recompiles} recompiles"
    if short:
        return figures.replace("compiled in", "compile").replace("graph breaks", "breaks")
    return f"{c.get('backend', '?')}{':' + c['mode'] if c.get('mode') else ''}, {figures}"


def stored_metric(result: GateResult, mm: ModeMeasurement) -> float | None:
    """The stored value of the mode's metric; accuracy falls back to the stored accuracy of older baselines."""
    named = mm.metric_name != "accuracy"
    return (result.baseline_metric or ({} if named else result.baseline_accuracy)).get(mm.mode)


def mode_outcome(verdict: Verdict, mode: str) -> str:
    """The worst outcome among one mode's checks ('skipped' when none applies)."""
    outcomes = {c.outcome for c in verdict.checks if c.mode == mode}
    return next((o for o in WORST_FIRST if o in outcomes), SKIPPED)


def on_cpu(results: list[GateResult]) -> bool:
    """Some result was measured on the CPU, where timing and memory are reported but not gated."""
    return any(r.measurements.device.startswith("cpu") for r in results)


def settings_of(result: GateResult) -> dict:
    """The test's gate settings (margins, limits) by name, whether the result holds them as a dict or a record."""
    config = result.config or {}
    return dict(config) if isinstance(config, dict) else {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def finite(value: Any) -> float | int | None:
    """A figure strict JSON can hold as a number: NaN, infinity and non-numbers become None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value
    return None
