"""What a gated run tells people: the summary table, from plain result records.

Works on :class:`~pytest_ampgate.gate.GateResult` objects, which travel from xdist workers to
the controller as plain dicts inside test reports and are rebuilt there.
"""

from __future__ import annotations

import math

from .gate import GateResult
from .results import ModeMeasurement
from .verdict import FAIL, INCONCLUSIVE, PASS, SKIPPED, Verdict

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


def table_columns(results: list[GateResult]) -> tuple[str, ...]:
    """COLUMNS, with "metric (baseline)" in place of "accuracy (baseline)" when a workload brings its own metric."""
    if all(mm.metric_name == "accuracy" for r in results for mm, _c in r.measurements.each_mode()):
        return COLUMNS
    return tuple("metric (baseline)" if c == "accuracy (baseline)" else c for c in COLUMNS)


def metric_cell(r: GateResult, mm: ModeMeasurement) -> str:
    """``0.748 (0.750)`` for accuracy; ``mse 0.0312 (0.0309)`` for another metric, named."""
    value = mm.metric if mm.metric is not None else mm.accuracy
    if value is None:
        return "-"
    named = mm.metric_name != "accuracy"
    text = _metric(value, named)
    stored = (r.baseline_metric or ({} if named else r.baseline_accuracy)).get(mm.mode)
    if stored is not None:
        text += f" ({_metric(stored, named)})"
    return f"{mm.metric_name} {text}" if named else text


def _metric(value: float, named: bool) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if named else f"{value:.3f}"


def mode_outcome(verdict: Verdict, mode: str) -> str:
    outcomes = {c.outcome for c in verdict.checks if c.mode == mode}
    return next((o for o in WORST_FIRST if o in outcomes), SKIPPED)


def mode_status(result: GateResult, mm: ModeMeasurement) -> str:
    """A mode's worst check outcome, or 'unsupported' for a mode the hardware could not run."""
    return mode_outcome(result.verdict, mm.mode) if mm.supported else "unsupported"


def reference_memory_ratio(mm: ModeMeasurement) -> float | None:
    """The reference against itself: 1.0 where its peak memory was measured."""
    return 1.0 if mm.peak_memory_bytes else None


def table_rows(results: list[GateResult]) -> list[list[str]]:
    """One row per test and mode (the reference first), in the order of COLUMNS."""
    rows = []
    for r in results:
        m = r.measurements
        for mm, comparison in m.each_mode():
            is_reference = mm is m.reference
            speedup = comparison.speedup if comparison else None
            if is_reference:
                speed = "reference"
            elif speedup is not None:
                speed = f"{speedup.median:.2f}x [{speedup.low:.2f}-{speedup.high:.2f}]"
            else:
                speed = "-"
            accuracy = metric_cell(r, mm)
            outcome = mode_status(r, mm)
            rows.append(
                [
                    r.test_id,
                    mm.mode,
                    _time(mm.step_time_s),
                    speed,
                    _mem(mm, comparison.memory_ratio if comparison else reference_memory_ratio(mm)),
                    _loss(mm.final_loss),
                    accuracy,
                    outcome.upper() if outcome in (FAIL, INCONCLUSIVE) else outcome,
                ]
            )
    return rows


def format_table(rows: list[list[str]], columns=COLUMNS) -> str:
    """A plain-text table with aligned columns (the terminal summary)."""
    widths = [max(len(str(x)) for x in col) for col in zip(columns, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in rows)])


# --- CI outputs: Markdown summary and JUnit properties ----------------------------------------

_MARK = {"FAIL": "❌ FAIL", "INCONCLUSIVE": "⚠️ INCONCLUSIVE", "pass": "✅ pass"}


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_summary(results: list[GateResult], skip_reason: str | None = None) -> str:
    """The summary table as GitHub-flavoured Markdown (``--ampgate-markdown``, ``$GITHUB_STEP_SUMMARY``)."""
    counts = {o: sum(1 for r in results if r.verdict.outcome == o) for o in WORST_FIRST}
    said = ", ".join(f"{n} {o}" for o, n in counts.items() if n) or "no gated tests ran"
    lines = [f"### AMP gate (pytest-ampgate): {said}", ""]
    if not results:
        lines.append(f"No gated test produced a result{': ' + skip_reason if skip_reason else '.'}")
        return "\n".join(lines) + "\n"
    envs = sorted({r.env_key for r in results})
    lines.append("Environment: " + ", ".join(f"`{e}`" for e in envs))
    if any(r.measurements.device.startswith("cpu") for r in results):
        lines.append("")
        lines.append("CPU run: numerics and accuracy are gated; timing and memory are gated on CUDA only.")
    columns = table_columns(results)
    lines += ["", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in table_rows(results):
        cells = [f"`{row[0]}`", *row[1:-1], _MARK.get(row[-1], row[-1])]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    doubts = [(r.test_id, c) for r in results for c in r.verdict.checks if c.outcome in (FAIL, INCONCLUSIVE)]
    if doubts:
        lines += ["", "Checks that did not pass:", ""]
        lines += [f"- **{c.outcome.upper()}** `{test_id}`: {_md_cell(c.why)}" for test_id, c in doubts]
    return "\n".join(lines) + "\n"


def _round(value: float | None, digits: int = 4):
    return None if value is None or not math.isfinite(value) else float(f"{value:.{digits}g}")


def junit_properties(result: GateResult) -> list[tuple[str, object]]:
    """Key figures of one gated test as (name, value) pairs for JUnit XML ``<property>`` elements.

    Dashboards that read JUnit (GitLab, Jenkins, Azure) show them next to the test without parsing
    our own report.  Absent figures are left out rather than written as empty values.
    """
    m = result.measurements
    props: list[tuple[str, object]] = [
        ("ampgate_verdict", result.verdict.outcome),
        ("ampgate_env", result.env_key),
        ("ampgate_device", m.device),
        ("ampgate_workload", m.workload),
    ]
    if m.distributed:  # runs under torch.distributed (see distributed.py)
        props += [("ampgate_world_size", m.distributed.get("world_size")), ("ampgate_backend", m.distributed.get("backend"))]
    for mm, comparison in m.each_mode():
        prefix = f"ampgate_{mm.mode}"
        speedup = comparison.speedup if comparison else None
        figures = {
            "outcome": mode_status(result, mm),
            "step_time_ms": _round(mm.step_time_s * 1e3) if mm.step_time_s is not None else None,
            "speedup": _round(speedup.median) if speedup else None,
            "speedup_low": _round(speedup.low) if speedup else None,
            "speedup_high": _round(speedup.high) if speedup else None,
            "peak_memory_mib": _round(mm.peak_memory_bytes / 2**20) if mm.peak_memory_bytes is not None else None,
            "memory_ratio": _round(comparison.memory_ratio) if comparison and comparison.memory_ratio is not None else None,
            "accuracy": _round(mm.accuracy) if mm.accuracy is not None else None,
            **({mm.metric_name: _round(mm.metric)} if mm.metric_name != "accuracy" and mm.metric is not None else {}),
            "final_loss": None
            if mm.final_loss is None
            else (_round(mm.final_loss) if math.isfinite(mm.final_loss) else str(mm.final_loss)),
            "first_nonfinite_step": mm.first_nonfinite_step,
        }
        props += [(f"{prefix}_{k}", v) for k, v in figures.items() if v is not None]
    return props
