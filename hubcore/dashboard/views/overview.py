"""/: the operator's landing page: spend and traffic today, over 7 and over
30 days, spend over time stacked by user, project or model, the top users
and projects, and the budgets closest to their limit; /api/v1/overview, the
same figures as JSON. Everything comes from the usage rollups, rendered in
one worker thread; only the budgets are read on the loop, from the limiter."""
from __future__ import annotations

import sqlite3
import time
from html import escape
from typing import Any

from hubcore.accounting.rollup import Zone
from hubcore.dashboard import charts, pages, reports, web
from hubcore.dashboard.web import Access, BadParameter, Request, Route
from hubcore.governance.limiter import BudgetLine
from hubcore.governance.limits import format_time, format_usd
from hubcore.http.h11server import Reply

_BUCKET_TITLES = {"day": "day, last 30 days", "hour": "hour, last 48 hours"}
_WINDOW_TITLES = {"5h": "5 hours (rolling)", "day": "day", "week": "week", "month": "month", "total": "total"}


def choice(request: Request, name: str, allowed: tuple[str, ...], default: str) -> str:
    """Query field `name`, one of `allowed`; `default` when absent."""
    value = request.query.get(name, "").strip() or default
    if value not in allowed:
        raise BadParameter(f"{name}: choose one of {', '.join(allowed)}, not {value!r}")
    return value


def _options(request: Request) -> tuple[str, str]:
    return (choice(request, "by", reports.CHART_BY, "user"),
            choice(request, "bucket", tuple(reports.CHART_BUCKETS), "day"))


def _budgets(request: Request, now: float) -> list[BudgetLine]:
    # The limiter lives on the loop: read it here, before the worker thread.
    return reports.closest_budgets(request.server.limiter.spend_report(now))


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def millis(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"


def money_cell(field: str, micros: int) -> str:
    """A cell of dollars that carries its exact micro-dollars."""
    return f"<td class=\"num\" data-field=\"{field}\" data-micros=\"{micros}\">{escape(format_usd(micros))}</td>"


def _ttfb_cell(field: str, ms: float | None) -> str:
    value = "" if ms is None else f"{ms:.1f}"
    return f"<td class=\"num\" data-field=\"{field}\" data-value=\"{value}\">{escape(millis(ms))}</td>"


def _head(*names: str) -> str:
    """A header row: the first column's names left, numbers (after "|") right."""
    return "".join(f"<th class=\"num\">{name[1:]}</th>" if name.startswith("|") else f"<th>{name}</th>"
                   for name in names)


def _periods(view: reports.Overview, tz: Any) -> str:
    rows = "".join(
        f"<tr id=\"period-{p.name}\"><th scope=\"row\">{escape(p.title)}</th>"
        + money_cell("cost", p.cost_micros)
        + f"<td class=\"num\" data-field=\"requests\" data-value=\"{p.requests}\">{p.requests:,}</td>"
        f"<td class=\"num\" data-field=\"errors\" data-value=\"{p.errors}\">{escape(percent(p.error_rate))}</td>"
        + _ttfb_cell("ttfb_p50", p.ttfb_p50_ms) + _ttfb_cell("ttfb_p99", p.ttfb_p99_ms)
        + f"<td class=\"num\" data-field=\"cache_hit\">{escape(percent(p.cache_hit))}</td>"
        f"<td><time datetime=\"{escape(format_time(p.since, tz))}\">{escape(format_time(p.since, tz)[:10])}</time>"
        "</td></tr>"
        for p in view.periods
    )
    head = _head("", "|Spend", "|Requests", "|Error rate", "|TTFB p50", "|TTFB p99", "|Cache hit", "Since")
    return (
        "<section id=\"figures\"><h2>Spend and traffic</h2>"
        f"<table id=\"periods\"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></section>"
    )


def _chart(view: reports.Overview) -> str:
    chart = view.chart

    def select(name: str, options: tuple[str, ...], current: str, titles: dict[str, str]) -> str:
        items = "".join(
            f"<option value=\"{o}\"{' selected' if o == current else ''}>{escape(titles.get(o, o))}</option>"
            for o in options
        )
        return f"<select id=\"chart-{name}\" name=\"{name}\">{items}</select>"

    controls = (
        "<form class=\"chart-controls\" method=\"get\" action=\"/\">"
        f"<label>Stack by {select('by', reports.CHART_BY, chart.by, {})}</label>"
        f"<label>Bars per {select('bucket', tuple(reports.CHART_BUCKETS), chart.bucket, _BUCKET_TITLES)}</label>"
        "<button type=\"submit\">Show</button></form>"
    )
    ticks = [label[5:] if chart.bucket == "day" else label[11:] for label in chart.labels]
    svg = charts.stacked_bars(
        chart_id="spend-chart", labels=chart.labels, ticks=ticks, series=chart.series, values=chart.values,
        rest=chart.rest, caption=f"spend per {chart.bucket} by {chart.by}",
    )
    return (
        f"<section id=\"spend-over-time\"><h2>Spend per {escape(_BUCKET_TITLES[chart.bucket])}, by {escape(chart.by)}"
        f"</h2>{controls}{svg}</section>"
    )


def _ranked(title: str, table_id: str, rows: tuple[reports.Ranked, ...]) -> str:
    if not rows:
        return f"<div><h3>{escape(title)}</h3><p id=\"{table_id}\">No usage in the last 30 days.</p></div>"
    body = "".join(
        f"<tr data-name=\"{escape(r.name or '')}\"><td>{escape(r.name or reports.NONE_LABEL)}</td>"
        + money_cell("cost", r.cost_micros)
        + f"<td class=\"num\" data-field=\"requests\">{r.requests:,}</td></tr>"
        for r in rows
    )
    return (
        f"<div><h3>{escape(title)}</h3><table id=\"{table_id}\"><thead><tr>{_head('Name', '|Spend', '|Requests')}"
        f"</tr></thead><tbody>{body}</tbody></table></div>"
    )


def _meter(line: BudgetLine) -> str:
    """The share of a budget spent, as a bar that turns amber at 80 % and red at 95 %."""
    top = max(line.limit_micros, 1)
    used = percent(line.spent_micros / line.limit_micros if line.limit_micros else None)
    return (
        f"<meter min=\"0\" max=\"{top}\" low=\"{line.limit_micros * 8 // 10}\" "
        f"high=\"{line.limit_micros * 95 // 100}\" optimum=\"0\" value=\"{min(line.spent_micros, top)}\"></meter> "
        f"{escape(used)}"
    )


def _budget_rows(lines: list[BudgetLine], tz: Any) -> str:
    if not lines:
        return "<p id=\"budgets-closest\">No budgets are set.</p>"
    rows = "".join(
        f"<tr><td>{escape(line.kind)} {escape(line.name)}</td>"
        f"<td>{escape(_WINDOW_TITLES.get(line.window, line.window))}</td><td>{_meter(line)}</td>"
        + money_cell("spent", line.spent_micros) + money_cell("limit", line.limit_micros)
        + f"<td>{escape(format_time(line.resets_at, tz)) if line.resets_at is not None else '-'}</td></tr>"
        for line in lines
    )
    head = _head("Scope", "Window", "Used", "|Spent", "|Limit", "Resets")
    return f"<table id=\"budgets-closest\"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def render_page(view: reports.Overview, budgets: list[BudgetLine], tz: Any, operator: str, csrf: str) -> str:
    body = (
        "<h1>Overview</h1>"
        + _periods(view, tz)
        + _chart(view)
        + "<section id=\"top\"><h2>Top spenders, last 30 days</h2><div class=\"columns\">"
        + _ranked("Users", "top-users", view.top_users)
        + _ranked("Projects", "top-projects", view.top_projects)
        + "</div></section>"
        + f"<section id=\"budgets\"><h2>Budgets closest to their limit</h2>{_budget_rows(budgets, tz)}</section>"
    )
    return pages.operator_page(title="Overview", active="/", operator=operator, csrf=csrf, tz=tz, now=view.now,
                               body=body)


async def overview_page(request: Request) -> Reply:
    now = time.time()
    try:
        chart_by, bucket = _options(request)
    except BadParameter as e:
        return web.bad_parameter(request, e)
    budgets = _budgets(request, now)
    tz = request.server.tz
    zone = Zone(tz)
    operator, csrf = request.operator or "", request.csrf

    def render(conn: sqlite3.Connection) -> str:
        return render_page(reports.overview(conn, zone, now, chart_by, bucket), budgets, tz, operator, csrf)

    return web.html(await web.read(request.server.database, render))


async def overview_api(request: Request) -> Reply:
    now = time.time()
    try:
        chart_by, bucket = _options(request)
    except BadParameter as e:
        return web.bad_parameter(request, e)
    budgets = _budgets(request, now)
    zone = Zone(request.server.tz)

    def document(conn: sqlite3.Connection) -> dict[str, Any]:
        return reports.overview_document(reports.overview(conn, zone, now, chart_by, bucket), zone, budgets)

    return web.json_reply(await web.read(request.server.database, document))


ROUTES = [
    Route("GET", "/", overview_page, Access.OPERATOR),
    Route("GET", "/api/v1/overview", overview_api, Access.OPERATOR, api={
        "summary": "The overview: spend and traffic per period, spend over time, top spenders, budgets",
        "tags": ["usage"],
        "parameters": [
            {"name": "by", "in": "query", "schema": {"type": "string", "enum": list(reports.CHART_BY)},
             "description": "what the chart's bars are stacked by (default user)"},
            {"name": "bucket", "in": "query", "schema": {"type": "string", "enum": list(reports.CHART_BUCKETS)},
             "description": "a bar per local day (30) or per local hour (48); default day"},
        ],
        "responses": {"200": {"description": (
            "periods (today, 7d, 30d: whole local days to now) with spend, requests, error rate, TTFB p50/p99 "
            "and cache-hit ratio; the chart's buckets with micro-dollars per series; top users and projects "
            "of the last 30 days; the budgets closest to their limit"
        )}},
    }),
]
