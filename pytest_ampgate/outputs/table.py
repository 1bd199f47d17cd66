"""The summary table of a gated run: one row per test and mode, as text cells.

The terminal summary prints it; the Markdown summary and the pytest-html extras render the same
rows.  Works on :class:`~pytest_ampgate.gate.GateResult` objects, which travel from xdist workers
to the controller as plain dicts inside test reports and are rebuilt there.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..verdict import FAIL, INCONCLUSIVE
from .figures import ModeFigures, compiled_summary, figures_of

if TYPE_CHECKING:
    from ..gate import GateResult

COLUMNS = ("test", "mode", "step time", "speedup [CI]", "peak mem (ratio)", "final loss", "accuracy (baseline)", "verdict")


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} us"


def _speed(f: ModeFigures) -> str:
    if f.reference:
        return "reference"
    if f.speedup is None:
        return "-"
    return f"{f.speedup.median:.2f}x [{f.speedup.low:.2f}-{f.speedup.high:.2f}]"


def _mem(f: ModeFigures) -> str:
    if f.peak_memory_bytes is None:
        return "-"
    text = f"{f.peak_memory_bytes / 2**20:.1f} MiB"
    return f"{text} ({f.memory_ratio:.2f}x)" if f.memory_ratio is not None else text


def _loss(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def table_columns(results: list[GateResult]) -> tuple[str, ...]:
    """COLUMNS, with "metric (baseline)" in place of "accuracy (baseline)" when a workload brings its own metric,
    and a "compiled" column (compile time, graph breaks, recompiles) before the verdict when a mode ran compiled."""
    columns = COLUMNS
    if not all(mm.metric_name == "accuracy" for r in results for mm, _c in r.measurements.each_mode()):
        columns = tuple("metric (baseline)" if c == "accuracy (baseline)" else c for c in columns)
    return (*columns[:-1], "compiled", columns[-1]) if any_compiled(results) else columns


def any_compiled(results: list[GateResult]) -> bool:
    """Some mode of these results ran under torch.compile."""
    return any(mm.compiled for r in results for mm, _c in r.measurements.each_mode())


def metric_cell(f: ModeFigures) -> str:
    """``0.748 (0.750)`` for accuracy; ``mse 0.0312 (0.0309)`` for another metric, named."""
    if f.metric is None:
        return "-"
    named = f.metric_name != "accuracy"
    text = _metric(f.metric, named)
    if f.baseline_metric is not None:
        text += f" ({_metric(f.baseline_metric, named)})"
    return f"{f.metric_name} {text}" if named else text


def _metric(value: float, named: bool) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if named else f"{value:.3f}"


def table_rows(results: list[GateResult]) -> list[list[str]]:
    """One row per test and mode (the reference first), in the order of COLUMNS."""
    rows = []
    compiled = any_compiled(results)
    for r in results:
        for f in figures_of(r):
            verdict = f.outcome.upper() if f.outcome in (FAIL, INCONCLUSIVE) else f.outcome
            row = [r.test_id, f.mode, _time(f.step_time_s), _speed(f), _mem(f), _loss(f.final_loss), metric_cell(f)]
            rows.append([*row, compiled_summary(f.measurement) or "eager", verdict] if compiled else [*row, verdict])
    return rows


def format_table(rows: list[list[str]], columns=COLUMNS) -> str:
    """A plain-text table with aligned columns (the terminal summary)."""
    widths = [max(len(str(x)) for x in col) for col in zip(columns, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in rows)])
