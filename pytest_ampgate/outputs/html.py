"""pytest-html: each gated test's row carries its AMP verdict; its extras the per-mode table and the chart.

Teams that publish pytest-html reports then see the figures without opening the JSON report.
:func:`extras` builds the extras of one test where it ran (an xdist worker or the only process):
they are plain dicts in pytest-html's own format, so they travel on the test report like our
results do.  :class:`HtmlColumns` adds the verdict column in the process that writes the report.
Nothing here imports pytest; pytest-html's ``extras`` helpers are used for the extras' format.
"""

from __future__ import annotations

import base64
import html

VERDICT_STYLE = {
    "fail": "color:#b00020;font-weight:bold",
    "inconclusive": "color:#b26a00;font-weight:bold",
    "pass": "color:#1b7f3b",
    "skipped": "color:#666666",
}


def mode_table(results) -> str:
    """The per-mode summary table (the terminal summary's rows) as an HTML table."""
    from .table import table_columns, table_rows

    head = "".join(f"<th>{html.escape(c)}</th>" for c in table_columns(results))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in table_rows(results))
    checks = "".join(f"<li>{html.escape(c.line())}</li>" for r in results for c in r.verdict.checks)
    return (
        '<div class="ampgate"><p><b>pytest-ampgate</b> '
        + ", ".join(f"{html.escape(r.test_id)}: {verdict_html(r.verdict.outcome)}" for r in results)
        + f'</p><table border="1" cellpadding="4" style="border-collapse:collapse">'
        f"<tr>{head}</tr>{body}</table><ul>{checks}</ul></div>"
    )


def verdict_html(outcome: str) -> str:
    style = VERDICT_STYLE.get(outcome.lower(), "")
    text = outcome.upper() if outcome.lower() in ("fail", "inconclusive") else outcome
    return f'<span style="{style}">{html.escape(text)}</span>'


def chart_png(results) -> str | None:
    """The chart of these results as base64 PNG, or None without matplotlib or without a compared mode."""
    from .chart import PlotUnavailable, drawable, png

    if not drawable(results):
        return None
    try:
        return base64.b64encode(png(results)).decode("ascii")
    except (PlotUnavailable, ValueError):
        return None


def extras(results) -> list[dict]:
    """pytest-html extras for one gated test: the per-mode table, and the chart where matplotlib is installed."""
    from pytest_html import extras as html_extras

    out = [html_extras.html(mode_table(results))]
    png = chart_png(results)
    if png is not None:
        out.append(html_extras.png(png, name="ampgate chart"))
    return out


class HtmlColumns:
    """pytest-html hooks: an "AMP verdict" column, filled on the gated tests' rows."""

    def pytest_html_results_table_header(self, cells):
        cells.insert(2, '<th class="sortable" data-column-type="ampgate">AMP verdict</th>')

    def pytest_html_results_table_row(self, report, cells):
        records = report.__dict__.get("ampgate") or []
        outcomes = [r.get("verdict", {}).get("outcome", "") for r in records]
        text = " ".join(verdict_html(o) for o in outcomes if o)
        cells.insert(2, f'<td class="col-ampgate">{text}</td>')
