"""What a gated run tells people and machines: the one family of interchangeable outputs.

Every output is fed by the same per-mode figures (:mod:`.figures`) and writes its file through the
same atomic write (:func:`.paths.save`):

==================  ==============================================================================
``table``           the terminal summary table (also the rows of the Markdown and HTML tables)
``markdown``        ``--ampgate-markdown`` and ``$GITHUB_STEP_SUMMARY``
``json_report``     ``--ampgate-json``: the whole run, with its JSON Schema in ``json_schema``
``junit``           per-test figures as JUnit XML properties (the plugin hands them to junitxml)
``chart``           ``--ampgate-plot``: speedup, memory and metric against their floors (matplotlib)
``html``            pytest-html: a verdict column, and the table and chart as a test's extras
``benchmark``       the measurements as pytest-benchmark entries (its JSON, storage and compare)
``paths``           output paths checked before measuring, and the one write
==================  ==============================================================================

The session-end files (JSON, Markdown, chart) are written by :func:`write_ci_outputs`, once per
session, from the merged results, by the process that saw every test report (the xdist
controller, or the only process).  Importing this package imports no torch: the plugin checks
the output paths from here before anything is measured.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


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
    written: list[Path] | None = None,
) -> list[str]:
    """Write what was asked for; return one summary line per file written (or not written, and why).

    The paths of the files written are appended to ``written`` where given (the step summary is
    GitHub's file, not ours, so it is not listed).
    """
    if not (json_path or markdown_path or plot_path or step_summary):
        return []
    lines = []
    done = written if written is not None else []
    skip_reason = gate.skip_reason()
    if json_path:

        def json_report():
            from . import json_report

            info = {**run_info, "skip_reason": skip_reason, "stale_baselines": stale()}
            done.append(json_report.write(gate.results, json_path, runs=runs, run_info=info))
            return f"ampgate JSON report: {done[-1]}"

        lines.append(_one_output("ampgate JSON report", json_path, json_report))
    if markdown_path or step_summary:
        from . import markdown

        if markdown_path:

            def write_markdown():
                done.append(markdown.write(gate.results, markdown_path, skip_reason))
                return f"ampgate Markdown summary: {done[-1]}"

            lines.append(_one_output("ampgate Markdown summary", markdown_path, write_markdown))
        if step_summary:
            text = markdown.markdown_summary(gate.results, skip_reason)
            line = _one_output(
                "GitHub step summary ($GITHUB_STEP_SUMMARY)", step_summary, lambda: markdown.append_step_summary(step_summary, text)
            )
            if line:
                lines.append(line)
    if plot_path:

        def chart():
            from . import chart

            if chart.drawable(gate.results):
                done.append(chart.write(gate.results, plot_path))
                return f"ampgate chart: {done[-1]}"
            return "ampgate chart NOT written: no gated test compared a mode with fp32 in this run"

        lines.append(_one_output("ampgate chart", plot_path, chart))
    return lines


def _one_output(what: str, path, write: Callable[[], str | None]) -> str | None:
    """Run one writer; a failure is one line naming the file and the cause, and the others still run."""
    try:
        return write()
    except (OSError, ValueError, RuntimeError) as exc:  # a full disk, a path turned into a directory, a chart backend error
        cause = f"{exc.strerror}" if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        return f"{what} NOT written to {path}: {cause}"
