"""The CI artefacts of a gated run: JSON report, Markdown summary (and GitHub step summary), chart.

Written once per session, from the merged results, by the process that saw every test report
(the xdist controller, or the only process).  Each writer lives in its own module; this one only
decides which to call and says where each file went.
"""

from __future__ import annotations

import os
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
) -> list[str]:
    """Write what was asked for; return one summary line per file written (or not written, and why)."""
    if not (json_path or markdown_path or plot_path or step_summary):
        return []
    lines = []
    skip_reason = gate.skip_reason()
    if json_path:

        def json_report():
            from .json_report import build_report, write_report

            info = {**run_info, "skip_reason": skip_reason, "stale_baselines": stale()}
            return f"ampgate JSON report: {write_report(json_path, build_report(gate.results, runs=runs, run_info=info))}"

        lines.append(_one_output("ampgate JSON report", json_path, json_report))
    if markdown_path or step_summary:
        from .report import markdown_summary

        text = markdown_summary(gate.results, skip_reason)
        if markdown_path:

            def markdown():
                markdown_path.parent.mkdir(parents=True, exist_ok=True)
                markdown_path.write_text(text, encoding="utf-8")
                return f"ampgate Markdown summary: {markdown_path}"

            lines.append(_one_output("ampgate Markdown summary", markdown_path, markdown))
        if step_summary:

            def append_summary():
                with open(step_summary, "a", encoding="utf-8") as fh:
                    fh.write(text + "\n")

            line = _one_output("GitHub step summary ($GITHUB_STEP_SUMMARY)", step_summary, append_summary)
            if line:
                lines.append(line)
    if plot_path:

        def chart():
            from .plot import write_chart

            if any(r.measurements.comparisons for r in gate.results):
                return f"ampgate chart: {write_chart(gate.results, plot_path)}"
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


OUTPUT_OPTIONS = {"json": "--ampgate-json", "markdown": "--ampgate-markdown", "plot": "--ampgate-plot"}


def check_output_path(option: str, path: Path) -> None:
    """Refuse before measuring what is sure to fail at session end: a directory in the file's place,
    a file in the place of one of its parent directories, a parent no one may write into, or a path
    the OS will not even look up (a name too long, a symlink loop)."""
    from .errors import ConfigError

    try:
        _check_output_path(option, path)
    except OSError as exc:
        raise ConfigError(f"{option} {path}: {exc.strerror or exc}; choose another path") from None


def _check_output_path(option: str, path: Path) -> None:
    from .errors import ConfigError

    try:  # a name too long or a symlink loop: an OSError, made a ConfigError above
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # not there yet, or under a file: see below
        pass
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a directory; give the path of a file to write, e.g. {path / 'ampgate'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{option} {path}: {parent} is a file, not a directory; choose a path under a directory")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"{option} {path}: not writable by this user; choose a path you may write to")


def check_step_summary(value: str) -> None:
    """``$GITHUB_STEP_SUMMARY`` is appended to, never created with its directory: check both exist as such."""
    from .errors import ConfigError

    path = Path(value)
    try:
        os.stat(path) if os.path.lexists(path) else None
    except OSError as exc:
        raise ConfigError(f"$GITHUB_STEP_SUMMARY={value}: {exc.strerror or exc}; unset it or point it at a file") from None
    if path.is_dir():
        raise ConfigError(f"$GITHUB_STEP_SUMMARY={value}: is a directory, not a file; unset it or point it at a file")
    if not path.parent.is_dir():
        raise ConfigError(
            f"$GITHUB_STEP_SUMMARY={value}: its directory {path.parent} does not exist; unset it or point it at a file "
            "in an existing directory (on GitHub Actions the runner sets it for you)"
        )


def check_baseline_dir(path: Path, update: bool) -> None:
    """The baseline directory, checked before measuring: a file in its place (or in the place of one of
    its parents) fails every gated test, and under --ampgate-update a directory that cannot be created
    or written would lose every measurement at session end."""
    from .errors import ConfigError

    fix = "point --ampgate-baseline-dir (or the ampgate_baseline_dir ini setting) at a directory"
    try:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"baseline directory {path}: is a file, not a directory; {fix}")
        parent = path
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise ConfigError(f"baseline directory {path}: {parent} is a file, not a directory; {fix}")
        if update and not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(
                f"baseline directory {path}: {parent} is not writable by this user, so --ampgate-update could record nothing; {fix} you may write to"
            )
    except OSError as exc:
        raise ConfigError(f"baseline directory {path}: {exc.strerror or exc}; {fix}") from None
