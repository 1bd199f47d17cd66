"""The run as a chart (``--ampgate-plot PATH``): per test and mode, the speedup with its interval
against its floor, the peak-memory ratio against its limit, the held-out metric (under its own
name) against fp32's in the same run and the stored baseline, and every other check that did not
pass (precision coverage, finite loss, ...).  Every failed check is red, and so is the label of a
mode with one.

A table says whether each check passed; the chart shows how close each one came, which is what
someone deciding whether to relax a margin or chase a regression needs.  matplotlib is an optional
extra (``pip install 'pytest-ampgate[plot]'``); it is drawn through the object-oriented API with the
Agg canvas, so the chart never touches pyplot's global state or the user's backend.  Importing
this module imports neither matplotlib nor torch: the plugin asks it whether matplotlib is there
before anything is measured.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

from .paths import save

INSTALL_HINT = "pip install 'pytest-ampgate[plot]'  (or: pip install matplotlib)"

COLOURS = {"pass": "#2a9d55", "fail": "#d62828", "inconclusive": "#f08c00", "skipped": "#8a8a8a"}


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable(f"--ampgate-plot needs matplotlib, an optional extra: {INSTALL_HINT}") from None


@dataclass(frozen=True)
class ChartRow:
    """One (test, mode) row of the chart; None where a figure was not measured."""

    test_id: str
    mode: str
    speedup: float | None
    low: float | None
    high: float | None
    floor: float | None
    floor_gated: bool
    speed_outcome: str
    memory_ratio: float | None
    memory_limit: float | None
    memory_gated: bool
    memory_outcome: str
    memory_note: str
    metric_name: str = "accuracy"
    metric: float | None = None
    reference_metric: float | None = None
    baseline_metric: float | None = None
    higher_is_better: bool = True
    metric_outcome: str = "skipped"
    metric_limit: float | None = None
    """The same-run check's limit (fp32's value less the tolerance), drawn as a gated tick."""
    other_checks: tuple[tuple[str, str], ...] = ()
    """(check name, outcome) of the mode's checks no panel draws (precision coverage, finite loss, ...)."""
    compiled: str = ""
    """A compiled mode's compile time, graph breaks and recompiles, in a few words ('' for eager)."""


PANEL_CHECKS = frozenset(("speedup", "memory", "same_run"))
"""Checks a panel of their own draws; the metric's baseline check colours the metric panel too."""


def drawable(results) -> bool:
    """Some result compares a mode with the reference: there is something to chart."""
    return any(r.measurements.comparisons for r in results)


def chart_rows(results) -> list[ChartRow]:
    """What the chart draws, from gated results (floors and limits from the checks, else the config)."""
    from .figures import compiled_summary, figures_of, finite, settings_of  # the engine (torch) only once there is something to draw

    rows = []
    for r in results:
        checks = {(c.mode, c.metric): c for c in r.verdict.checks}
        config = settings_of(r)
        figures = figures_of(r)
        reference = figures[0]
        for f in figures:
            if f.reference or f.comparison is None:
                continue
            est = f.speedup
            speed = checks.get((f.mode, "speedup"))
            memory = checks.get((f.mode, "memory"))
            same_run = checks.get((f.mode, "same_run"))
            metric_checks = [c for c in (same_run, checks.get((f.mode, f.metric_name))) if c is not None]
            shown = PANEL_CHECKS | {f.metric_name}
            others = tuple((str(c.metric), str(c.outcome)) for c in r.verdict.checks if c.mode == f.mode and c.metric not in shown)
            floor_gated = speed is not None and speed.threshold is not None
            memory_gated = memory is not None and memory.threshold is not None
            rows.append(
                ChartRow(
                    test_id=r.test_id,
                    mode=f.mode,
                    speedup=est.median if est else None,
                    low=est.low if est else None,
                    high=est.high if est else None,
                    floor=speed.threshold if floor_gated else config.get("min_speedup"),
                    floor_gated=floor_gated,
                    speed_outcome=speed.outcome if speed is not None else "skipped",
                    memory_ratio=f.memory_ratio,
                    memory_limit=memory.threshold if memory_gated else config.get("max_memory_ratio"),
                    memory_gated=memory_gated,
                    memory_outcome=memory.outcome if memory is not None else "skipped",
                    memory_note=f.measurement.memory_note or reference.measurement.memory_note or f.comparison.note or "not measured",
                    metric_name=f.metric_name,
                    metric=finite(f.metric),
                    reference_metric=finite(reference.metric),
                    baseline_metric=finite(f.baseline_metric),
                    higher_is_better=f.higher_is_better,
                    metric_outcome=_worst([str(c.outcome) for c in metric_checks]),
                    metric_limit=same_run.threshold if same_run is not None else None,
                    other_checks=others,
                    compiled=compiled_summary(f.measurement, short=True),
                )
            )
    return rows


WORST_FIRST = ("fail", "inconclusive", "pass", "skipped")


def _worst(outcomes: list[str]) -> str:
    return next((o for o in WORST_FIRST if o in outcomes), "skipped")


def _row_failed(row: ChartRow) -> bool:
    outcomes = [row.speed_outcome, row.memory_outcome, row.metric_outcome] + [o for _n, o in row.other_checks]
    return "fail" in outcomes


def _label(row: ChartRow, short: bool) -> str:
    test = row.test_id.rsplit("::", 1)[-1] if short else row.test_id
    return f"{test}\n{row.mode}" + (f"\n{row.compiled}" if row.compiled else "")


DASHED = (0, (2, 2))
"""A floor or limit the test is configured with but that gated nothing here (e.g. no baseline, a CPU run)."""


def _threshold(ax, x: float, y: float, gated: bool, zorder: int) -> None:
    """A floor or limit as a short vertical bar across the row: solid where it gated, dashed where it did not."""
    ax.plot([x, x], [y - 0.2, y + 0.2], color="black", linestyle="-" if gated else DASHED, linewidth=2.2, zorder=zorder)


def _draw_metric(ax, rows: list[ChartRow], ys: list[int]) -> None:
    """Each mode's held-out metric, named, beside fp32's from the same run (a hollow triangle), the
    same-run limit (a floor/limit tick) and the stored baseline (a diamond).  Metrics of different
    kinds are not put on one scale: with more than one metric, each is drawn as its change against
    its own fp32 value (percent), and labelled with its value."""
    names = sorted({row.metric_name for row in rows})
    relative = len(names) > 1

    def change(row: ChartRow, v: float | None) -> float | None:
        ref = row.reference_metric
        return None if v is None or not ref else (v / ref - 1) * 100

    limits = [abs(c) for row in rows for c in (change(row, row.metric_limit),) if c is not None]
    window = max(3 * max(limits, default=0), 5.0)
    """Percent changes beyond this are drawn at the edge as an arrow, so one collapse does not flatten the rest."""

    def x_of(row: ChartRow, v: float | None) -> float | None:
        if v is None or not relative:
            return v
        x = change(row, v)
        return None if x is None else max(-window, min(window, x))

    for y, row in zip(ys, rows):
        colour = COLOURS.get(row.metric_outcome, COLOURS["skipped"])
        x = x_of(row, row.metric)
        if x is None:
            ax.text(
                0.03, y, f"{row.metric_name} not measured", va="center", fontsize=8, color="#555555", transform=ax.get_yaxis_transform()
            )
            continue
        clipped = relative and abs(x) >= window
        ax.plot([x], [y], (">" if x > 0 else "<") if clipped else "o", color=colour, markersize=8 if clipped else 7, zorder=3)
        label = f"{row.metric:.3g}" if not relative else f"{row.metric_name} {row.metric:.3g}"
        ha = "center" if not clipped else ("right" if x > 0 else "left")
        ax.annotate(label, (x, y), xytext=(0, 8), textcoords="offset points", fontsize=8, ha=ha, color=colour)
        ref = x_of(row, row.reference_metric)
        if ref is not None:
            ax.plot([ref], [y], "^", markerfacecolor="none", color="#444444", markersize=8, zorder=2)
        limit = x_of(row, row.metric_limit)
        if limit is not None:
            _threshold(ax, limit, y, True, zorder=2)
        base = x_of(row, row.baseline_metric)
        if base is not None:
            ax.plot([base], [y], "D", markerfacecolor="none", color="#444444", markersize=6, zorder=2)
    values = [
        v
        for row in rows
        for v in (x_of(row, w) for w in (row.metric, row.reference_metric, row.baseline_metric, row.metric_limit))
        if v is not None
    ]
    if values:
        low, high = min(values), max(values)
        pad = (high - low) * 0.25 or max(abs(high) * 0.1, 0.05)
        ax.set_xlim(low - pad, high + pad)
    directions = {row.higher_is_better for row in rows}
    direction = "" if len(directions) != 1 else (" (higher is better)" if directions.pop() else " (lower is better)")
    if relative:
        ax.axvline(0.0, color="#bbbbbb", linewidth=1, zorder=1)
        ax.set_xlabel(f"change vs fp32, same run (%; arrow: beyond {window:.0f}%)")
        ax.set_title("Metrics vs fp32 (same run), each on its own scale", fontsize=11, loc="left")
    else:
        ax.set_xlabel(names[0] + direction)
        ax.set_title(f"{names[0]} vs fp32 (same run)", fontsize=11, loc="left")


def _draw_other_checks(ax, rows: list[ChartRow], ys: list[int]) -> None:
    """The checks no other panel draws (precision coverage, finite loss, loss scale, ...): every
    one that did not pass is named in its outcome's colour, so a failed test never looks healthy."""
    ax.set_xlim(0, 1)
    ax.set_xticks([])
    for y, row in zip(ys, rows):
        bad = [(n, o) for n, o in row.other_checks if o in ("fail", "inconclusive")]
        if not bad:
            text = f"{len(row.other_checks)} passed" if row.other_checks else "none"
            ax.text(0.03, y, text, va="center", fontsize=8, color=COLOURS["pass"] if row.other_checks else "#555555")
            continue
        for i, (name, outcome) in enumerate(bad[:3]):
            ax.text(
                0.03,
                y + 0.18 - 0.18 * i,
                f"{name.replace('_', ' ')}: {outcome.upper()}",
                va="center",
                fontsize=8,
                color=COLOURS[outcome],
                fontweight="bold" if outcome == "fail" else "normal",
            )
    ax.set_title("Other checks", fontsize=11, loc="left")


def write(results, path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw the chart of ``results`` into a PNG at ``path`` (whole or not at all); returns the path."""
    return save(path, png(results, title))


def png(results, title: str | None = None) -> bytes:
    """The chart of ``results`` as PNG bytes (ValueError without a compared mode)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from .figures import on_cpu

    rows = chart_rows(results)
    if not rows:
        raise ValueError("no compared modes to chart")
    names = [row.test_id.rsplit("::", 1)[-1] for row in rows]
    short = len(set(names)) == len({row.test_id for row in rows})
    n = len(rows)
    fig = Figure(figsize=(17, 1.9 + 0.62 * n), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax_speed, ax_mem, ax_metric, ax_other = fig.subplots(1, 4, sharey=True, gridspec_kw={"width_ratios": [1.35, 1, 1, 0.55]})
    ys = list(range(n))[::-1]

    # Speedup with its interval, against the floor.
    for y, row in zip(ys, rows):
        colour = COLOURS.get(row.speed_outcome, COLOURS["skipped"])
        if row.speedup is not None:
            ax_speed.errorbar(
                row.speedup,
                y,
                xerr=[[row.speedup - row.low], [row.high - row.speedup]],
                fmt="o",
                color=colour,
                ecolor=colour,
                elinewidth=2.2,
                capsize=5,
                markersize=7,
                zorder=3,
            )
            ax_speed.annotate(
                f"{row.speedup:.2f}x [{row.low:.2f}-{row.high:.2f}]",
                (row.low, y),
                xytext=(0, 10),
                textcoords="offset points",
                fontsize=8,
                color="#333333",
                ha="left",
                va="bottom",
                zorder=5,
            )
        else:
            ax_speed.text(1.0, y, "  speedup not measured", va="center", fontsize=8, color=COLOURS["skipped"])
        if row.floor is not None:
            _threshold(ax_speed, row.floor, y, row.floor_gated, zorder=2)
    ax_speed.axvline(1.0, color="#bbbbbb", linewidth=1, zorder=1)
    ax_speed.set_xlabel("speedup over fp32 (median of per-round ratios, with its interval)")
    ax_speed.set_title("Speedup vs floor", fontsize=11, loc="left")
    xs = [v for row in rows for v in (row.low, row.high, row.floor) if v is not None] + [1.0]
    span = max(xs) - min(xs) or 1.0
    ax_speed.set_xlim(max(0.0, min(xs) - 0.08 * span), max(xs) + 0.35 * span)

    # Peak-memory ratio against its limit.
    for y, row in zip(ys, rows):
        if row.memory_ratio is not None:
            colour = COLOURS.get(row.memory_outcome, COLOURS["skipped"])
            ax_mem.barh(y, row.memory_ratio, height=0.5, color=colour, alpha=0.85, zorder=2)
            ax_mem.text(row.memory_ratio, y, f" {row.memory_ratio:.2f}x", va="center", fontsize=8, zorder=3)
        else:
            ax_mem.text(
                0.03, y, row.memory_note, va="center", fontsize=8, color="#555555", transform=ax_mem.get_yaxis_transform(), wrap=True
            )
        if row.memory_limit is not None and row.memory_ratio is not None:
            _threshold(ax_mem, row.memory_limit, y, row.memory_gated, zorder=4)
    ax_mem.axvline(1.0, color="#bbbbbb", linewidth=1, zorder=1)
    ax_mem.set_xlabel("peak memory, mode / fp32 (lower is better)")
    ax_mem.set_title("Peak-memory ratio vs limit", fontsize=11, loc="left")
    mems = [v for row in rows if row.memory_ratio is not None for v in (row.memory_ratio, row.memory_limit) if v is not None] + [1.0]
    ax_mem.set_xlim(0, max(mems) * 1.25)

    _draw_metric(ax_metric, rows, ys)
    _draw_other_checks(ax_other, rows, ys)

    ax_speed.set_yticks(ys, [_label(row, short) for row in rows], fontsize=9)
    for tick, row in zip(ax_speed.get_yticklabels(), rows):
        if _row_failed(row):  # the row of a mode with any failed check is labelled in red
            tick.set_color(COLOURS["fail"])
            tick.set_fontweight("bold")
    ax_speed.set_ylim(-0.7, n - 0.3)
    for ax in (ax_speed, ax_mem, ax_metric, ax_other):
        ax.grid(axis="x", color="#eeeeee", zorder=0)
        ax.spines[["top", "right"]].set_visible(False)

    handles = [Line2D([], [], color=COLOURS[o], marker="o", linestyle="", label=o) for o in ("pass", "fail", "inconclusive")]
    handles += [
        Line2D([], [], color=COLOURS["skipped"], marker="o", linestyle="", label="not gated"),
        Line2D([], [], color="black", linewidth=2.2, label="floor / limit (gated)"),
        Line2D([], [], color="black", linewidth=2.2, linestyle=DASHED, label="configured, not gated here"),
    ]
    handles.append(Line2D([], [], color="#444444", marker="^", markerfacecolor="none", linestyle="", label="fp32, same run"))
    handles.append(Line2D([], [], color="#444444", marker="D", markerfacecolor="none", linestyle="", label="stored baseline"))
    fig.legend(handles=handles, loc="outside lower center", ncols=8, fontsize=8, frameon=False)
    envs = sorted({r.env_key for r in results})
    heading = title or "pytest-ampgate: " + "; ".join(envs)
    if on_cpu(results):
        heading += "\nCPU run: timing and memory are not gated on the CPU, and CPU speedups say nothing about GPUs"
    fig.suptitle(heading, fontsize=11, x=0.01, ha="left")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
