"""The summary table as GitHub-flavoured Markdown (``--ampgate-markdown``, ``$GITHUB_STEP_SUMMARY``).

A CI page shows it without anyone opening the logs: counts per outcome, the environment, the
table's rows with a mark per verdict, and the checks that did not pass with their reasons.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..verdict import FAIL, INCONCLUSIVE
from .figures import WORST_FIRST, on_cpu
from .paths import save
from .table import table_columns, table_rows

if TYPE_CHECKING:
    from ..gate import GateResult

_MARK = {"FAIL": "❌ FAIL", "INCONCLUSIVE": "⚠️ INCONCLUSIVE", "pass": "✅ pass"}


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_summary(results: list[GateResult], skip_reason: str | None = None) -> str:
    """The whole summary as Markdown text."""
    counts = {o: sum(1 for r in results if r.verdict.outcome == o) for o in WORST_FIRST}
    said = ", ".join(f"{n} {o}" for o, n in counts.items() if n) or "no gated tests ran"
    lines = [f"### AMP gate (pytest-ampgate): {said}", ""]
    if not results:
        lines.append(f"No gated test produced a result{': ' + skip_reason if skip_reason else '.'}")
        return "\n".join(lines) + "\n"
    envs = sorted({r.env_key for r in results})
    lines.append("Environment: " + ", ".join(f"`{e}`" for e in envs))
    if on_cpu(results):
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


def write(results: list[GateResult], path: str | os.PathLike, skip_reason: str | None = None) -> Path:
    """Write the summary to ``path`` (whole or not at all); returns the path."""
    return save(path, markdown_summary(results, skip_reason).encode("utf-8"))


def append_step_summary(step_summary: str | os.PathLike, text: str) -> None:
    """Append to GitHub's ``$GITHUB_STEP_SUMMARY``: the runner owns that file and other steps append
    to it too, so it is appended to in place, never replaced."""
    with open(step_summary, "a", encoding="utf-8") as fh:
        fh.write(text + "\n")
