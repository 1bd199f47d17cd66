"""What a gated run tells people: the summary table, from plain result records.

Works on :class:`~pytest_ampgate.gate.GateResult` objects, which travel from xdist workers to
the controller as plain dicts inside test reports and are rebuilt there.
"""

from __future__ import annotations

import math
from .gate import FAIL, INCONCLUSIVE, PASS, SKIPPED, GateResult, Verdict
from .measurement import ModeMeasurement

COLUMNS = ("test", "mode", "step time", "speedup [CI]", "peak mem (ratio)", "final loss", "accuracy (baseline)", "verdict")
WORST_FIRST = (FAIL, INCONCLUSIVE, PASS, SKIPPED)


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} us"


def _mem(mm: ModeMeasurement, ratio: float | None) -> str:
    if mm.peak_memory_bytes is None:
        return "-"
    text = f"{mm.peak_memory_bytes / 2**20:.1f} MiB"
    return f"{text} ({ratio:.2f}x)" if ratio is not None else text


def _loss(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def mode_outcome(verdict: Verdict, mode: str) -> str:
    outcomes = {c.outcome for c in verdict.checks if c.mode == mode}
    return next((o for o in WORST_FIRST if o in outcomes), SKIPPED)


def table_rows(results: list[GateResult]) -> list[list[str]]:
    """One row per test and mode (the reference first), in the order of COLUMNS."""
    rows = []
    for r in results:
        m = r.measurements
        for mm in [m.reference, *m.modes.values()]:
            is_reference = mm is m.reference
            comparison = None if is_reference else m.comparisons.get(mm.mode)
            speedup = comparison.speedup if comparison else None
            if is_reference:
                speed = "reference"
            elif speedup is not None:
                speed = f"{speedup.median:.2f}x [{speedup.low:.2f}-{speedup.high:.2f}]"
            else:
                speed = "-"
            accuracy = "-" if mm.accuracy is None else f"{mm.accuracy:.3f}"
            stored = r.baseline_accuracy.get(mm.mode)
            if stored is not None and mm.accuracy is not None:
                accuracy += f" ({stored:.3f})"
            outcome = mode_outcome(r.verdict, mm.mode)
            if not mm.supported:
                outcome = "unsupported"
            rows.append([
                r.test_id,
                mm.mode,
                _time(mm.step_time_s),
                speed,
                _mem(mm, comparison.memory_ratio if comparison else (1.0 if mm.peak_memory_bytes else None)),
                _loss(mm.final_loss),
                accuracy,
                outcome.upper() if outcome in (FAIL, INCONCLUSIVE) else outcome,
            ])
    return rows


def format_table(rows: list[list[str]], columns=COLUMNS) -> str:
    """A plain-text table with aligned columns (the terminal summary)."""
    widths = [max(len(str(x)) for x in col) for col in zip(columns, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in rows)])
