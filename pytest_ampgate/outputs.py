"""The CI artefacts of a gated run: JSON report, Markdown summary (and GitHub step summary), chart.

Written once per session, from the merged results, by the process that saw every test report
(the xdist controller, or the only process).  Each writer lives in its own module; this one only
decides which to call and says where each file went.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def write_ci_outputs(
    gate,
    *,
    json_path: Path | None,
    markdown_path: Path | None,
    plot_path: Path | None,
    step_summary: str | None,
    runs: dict,
    run_info: dict,
    stale: Callable[[], list],
) -> list[str]:
    """Write what was asked for; return one summary line per file written (or not written, and why)."""
    if not (json_path or markdown_path or plot_path or step_summary):
        return []
    lines = []
    skip_reason = gate.skip_reason()
    if json_path:
        from .json_report import build_report, write_report

        info = {**run_info, "skip_reason": skip_reason, "stale_baselines": stale()}
        path = write_report(json_path, build_report(gate.results, runs=runs, run_info=info))
        lines.append(f"ampgate JSON report: {path}")
    if markdown_path or step_summary:
        from .report import markdown_summary

        text = markdown_summary(gate.results, skip_reason)
        if markdown_path:
            markdown_path.parent.mkdir(parents=True, exist_ok=True)
            markdown_path.write_text(text, encoding="utf-8")
            lines.append(f"ampgate Markdown summary: {markdown_path}")
        if step_summary:
            with open(step_summary, "a", encoding="utf-8") as fh:
                fh.write(text + "\n")
    if plot_path:
        from .plot import write_chart

        if any(r.measurements.comparisons for r in gate.results):
            lines.append(f"ampgate chart: {write_chart(gate.results, plot_path)}")
        else:
            lines.append("ampgate chart NOT written: no gated test compared a mode with fp32 in this run")
    return lines
