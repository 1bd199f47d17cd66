"""The run as a chart (``--ampgate-plot PATH``): per test and mode, the speedup with its interval
against its floor, and the peak-memory ratio against its limit.

A table says whether each check passed; the chart shows how close each one came, which is what
someone deciding whether to relax a margin or chase a regression needs.  matplotlib is an optional
extra (``pip install 'pytest-ampgate[plot]'``); it is drawn through the object-oriented API with the
Agg canvas, so the chart never touches pyplot's global state or the user's backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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


def chart_rows(results) -> list[ChartRow]:
    """What the chart draws, from gated results (floors and limits from the checks, else the config)."""
    rows = []
    for r in results:
        m = r.measurements
        checks = {(c.mode, c.metric): c for c in r.verdict.checks}
        for name, comparison in m.comparisons.items():
            est = comparison.speedup
            speed = checks.get((name, "speedup"))
            memory = checks.get((name, "memory"))
            floor_gated = speed is not None and speed.threshold is not None
            rows.append(ChartRow(
                test_id=r.test_id,
                mode=name,
                speedup=est.median if est else None,
                low=est.low if est else None,
                high=est.high if est else None,
                floor=speed.threshold if floor_gated else r.config.get("min_speedup"),
                floor_gated=floor_gated,
                speed_outcome=speed.outcome if speed is not None else "skipped",
                memory_ratio=comparison.memory_ratio,
                memory_limit=memory.threshold if memory is not None and memory.threshold is not None else r.config.get("max_memory_ratio"),
                memory_gated=memory is not None and memory.threshold is not None,
                memory_outcome=memory.outcome if memory is not None else "skipped",
                memory_note=m.modes[name].memory_note or m.reference.memory_note or comparison.note or "not measured",
            ))
    return rows


def _label(row: ChartRow, short: bool) -> str:
    test = row.test_id.rsplit("::", 1)[-1] if short else row.test_id
    return f"{test}\n{row.mode}"


def write_chart(results, path: str | Path, title: str | None = None) -> Path:
    """Draw the chart of ``results`` into a PNG at ``path``; returns the path."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    rows = chart_rows(results)
    if not rows:
        raise ValueError("no compared modes to chart")
    names = [row.test_id.rsplit("::", 1)[-1] for row in rows]
    short = len(set(names)) == len({row.test_id for row in rows})
    n = len(rows)
    fig = Figure(figsize=(11, 1.9 + 0.62 * n), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax_speed, ax_mem = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [1.35, 1]})
    ys = list(range(n))[::-1]

    # Speedup with its interval, against the floor.
    for y, row in zip(ys, rows):
        colour = COLOURS.get(row.speed_outcome, COLOURS["skipped"])
        if row.speedup is not None:
            ax_speed.errorbar(row.speedup, y, xerr=[[row.speedup - row.low], [row.high - row.speedup]], fmt="o",
                              color=colour, ecolor=colour, elinewidth=2.2, capsize=5, markersize=7, zorder=3)
            ax_speed.annotate(f"{row.speedup:.2f}x [{row.low:.2f}-{row.high:.2f}]", (row.low, y), xytext=(0, 10),
                              textcoords="offset points", fontsize=8, color="#333333", ha="left", va="bottom", zorder=5)
        else:
            ax_speed.text(1.0, y, "  speedup not measured", va="center", fontsize=8, color=COLOURS["skipped"])
        if row.floor is not None:
            ax_speed.plot([row.floor, row.floor], [y - 0.2, y + 0.2], color="black",
                          linestyle="-" if row.floor_gated else (0, (2, 2)), linewidth=2.2, zorder=2)
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
            ax_mem.text(0.03, y, row.memory_note, va="center", fontsize=8, color="#555555",
                        transform=ax_mem.get_yaxis_transform(), wrap=True)
        if row.memory_limit is not None and row.memory_ratio is not None:
            ax_mem.plot([row.memory_limit, row.memory_limit], [y - 0.2, y + 0.2], color="black",
                        linestyle="-" if row.memory_gated else (0, (2, 2)), linewidth=2.2, zorder=4)
    ax_mem.axvline(1.0, color="#bbbbbb", linewidth=1, zorder=1)
    ax_mem.set_xlabel("peak memory, mode / fp32 (lower is better)")
    ax_mem.set_title("Peak-memory ratio vs limit", fontsize=11, loc="left")
    mems = [v for row in rows if row.memory_ratio is not None for v in (row.memory_ratio, row.memory_limit) if v is not None] + [1.0]
    ax_mem.set_xlim(0, max(mems) * 1.25)

    ax_speed.set_yticks(ys, [_label(row, short) for row in rows], fontsize=9)
    ax_speed.set_ylim(-0.7, n - 0.3)
    for ax in (ax_speed, ax_mem):
        ax.grid(axis="x", color="#eeeeee", zorder=0)
        ax.spines[["top", "right"]].set_visible(False)

    handles = [Line2D([], [], color=COLOURS[o], marker="o", linestyle="", label=o) for o in ("pass", "fail", "inconclusive")]
    handles += [
        Line2D([], [], color=COLOURS["skipped"], marker="o", linestyle="", label="not gated"),
        Line2D([], [], color="black", linewidth=2.2, label="floor / limit (gated)"),
        Line2D([], [], color="black", linewidth=2.2, linestyle=(0, (2, 2)), label="configured, not gated here"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=6, fontsize=8, frameon=False)
    envs = sorted({r.env_key for r in results})
    heading = title or "pytest-ampgate: " + "; ".join(envs)
    if any(r.measurements.device.startswith("cpu") for r in results):
        heading += "\nCPU run: timing and memory are not gated on the CPU, and CPU speedups say nothing about GPUs"
    fig.suptitle(heading, fontsize=11, x=0.01, ha="left")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
