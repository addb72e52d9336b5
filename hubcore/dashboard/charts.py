"""Charts as server-rendered SVG: no script, no inline style (the CSP allows
neither); colours come from classes in dashboard.css. Every segment carries
its figures in data-* attributes (micro-dollars) and a <title> tooltip."""
from __future__ import annotations

from collections.abc import Sequence
from html import escape

from hubcore.governance.limits import format_usd

WIDTH, HEIGHT = 760, 260
LEFT, RIGHT, TOP, BOTTOM = 64, 8, 12, 40     # px of the plot's margins: axis labels live there
GRID_LINES = 4
MAX_LABELS = 8                               # x labels shown at most; every bar keeps its tooltip
PALETTE = 8                                  # classes s0..s7 in dashboard.css; then s-other


def series_class(index: int, count: int, rest: bool) -> str:
    """The colour class of series `index` of `count`; with `rest`, the last is everything else."""
    return "s-other" if rest and index == count - 1 else f"s{index % PALETTE}"


def nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 2.5 or 5 times a power of ten that is >= value."""
    if value <= 0:
        return 0
    scale = 1
    while scale * 10 <= value:
        scale *= 10
    for step in (1, 2, 2.5, 5, 10):
        top = int(step * scale)
        if top >= value:
            return top
    return 10 * scale


def stacked_bars(
    *, chart_id: str, labels: Sequence[str], ticks: Sequence[str], series: Sequence[str],
    values: Sequence[Sequence[int]], rest: bool = False, caption: str = "",
) -> str:
    """A stacked bar chart of micro-dollars and its legend: one bar per
    label (`ticks`: the short text under it), one segment per series, the
    first series at the bottom. `rest`: the last series is everything else."""
    totals = [sum(bar) for bar in values]
    top = nice_ceiling(max(totals, default=0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / max(len(labels), 1)
    gap = min(2.0, slot / 4)
    parts = [
        f"<svg id=\"{escape(chart_id)}\" class=\"chart\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" "
        f"aria-label=\"{escape(caption or 'stacked bar chart')}\" data-top-micros=\"{top}\">"
    ]
    for i in range(GRID_LINES + 1):
        y = TOP + plot_h - plot_h * i / GRID_LINES
        amount = top * i // GRID_LINES
        if top or i == 0:
            parts.append(
                f"<line class=\"{'axis' if i == 0 else 'grid'}\" x1=\"{LEFT}\" y1=\"{y:.1f}\" "
                f"x2=\"{WIDTH - RIGHT}\" y2=\"{y:.1f}\"/><text class=\"y\" x=\"{LEFT - 6}\" y=\"{y + 4:.1f}\" "
                f"text-anchor=\"end\">{escape(format_usd(amount))}</text>"
            )
    every = max(1, -(-len(labels) // MAX_LABELS))
    for i, (label, bar) in enumerate(zip(labels, values)):
        x = LEFT + i * slot
        total = sum(bar)
        parts.append(
            f"<g class=\"bar\" data-bucket=\"{escape(label)}\" data-total-micros=\"{total}\">"
            f"<title>{escape(label)}: {escape(format_usd(total))}</title>"
        )
        y = TOP + plot_h
        for index, (name, micros) in enumerate(zip(series, bar)):
            if micros <= 0:
                continue
            height = plot_h * micros / top
            y -= height
            parts.append(
                f"<rect class=\"seg {series_class(index, len(series), rest)}\" x=\"{x + gap / 2:.1f}\" y=\"{y:.1f}\" "
                f"width=\"{max(slot - gap, 1):.1f}\" height=\"{height:.2f}\" data-series=\"{escape(name)}\" "
                f"data-micros=\"{micros}\"><title>{escape(label)} · {escape(name)}: {escape(format_usd(micros))}"
                "</title></rect>"
            )
        parts.append("</g>")
        if i % every == 0:
            parts.append(
                f"<text class=\"x\" x=\"{x + slot / 2:.1f}\" y=\"{HEIGHT - BOTTOM + 16}\" "
                f"text-anchor=\"middle\">{escape(ticks[i])}</text>"
            )
    if not top:
        parts.append(
            f"<text class=\"empty\" x=\"{LEFT + plot_w / 2:.1f}\" y=\"{TOP + plot_h / 2:.1f}\" "
            "text-anchor=\"middle\">no spend in this range</text>"
        )
    parts.append("</svg>")
    return "".join(parts) + legend(chart_id, series, values, rest)


def legend(chart_id: str, series: Sequence[str], values: Sequence[Sequence[int]], rest: bool) -> str:
    """The series' colours, names and totals, biggest first as stacked."""
    if not series:
        return ""
    items = []
    for index, name in enumerate(series):
        total = sum(bar[index] for bar in values)
        items.append(
            f"<li data-series=\"{escape(name)}\" data-micros=\"{total}\"><svg class=\"swatch\" viewBox=\"0 0 10 10\" "
            f"aria-hidden=\"true\"><rect class=\"{series_class(index, len(series), rest)}\" width=\"10\" "
            "height=\"10\"/></svg>"
            f"<span class=\"name\">{escape(name)}</span> <span class=\"num\">{escape(format_usd(total))}</span></li>"
        )
    return f"<ul class=\"legend\" id=\"{escape(chart_id)}-legend\">{''.join(items)}</ul>"
