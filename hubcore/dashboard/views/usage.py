"""/usage: usage grouped by user, project, model, key, upstream, day (or
token, served model) over a range of local days, from the rollups, with the
same numbers as `hubcore usage`; its CSV and JSON downloads (/usage.csv,
/usage.json, or ?format=), and /api/v1/usage, the JSON of `hubcore usage
--format json`."""
from __future__ import annotations

import sqlite3
import time
from datetime import date
from html import escape
from typing import Any
from urllib.parse import urlencode

from hubcore.accounting.report import Row
from hubcore.accounting.rollup import EPOCH_ORDINAL, Zone
from hubcore.dashboard import pages, reports, web
from hubcore.dashboard.views.overview import choice, percent
from hubcore.dashboard.web import Access, BadParameter, Request, Route
from hubcore.governance.limits import format_time, format_usd
from hubcore.http.h11server import Reply

CSV = "text/csv; charset=utf-8"
FORMATS = ("html", "csv", "json")
DEFAULT_DAYS = 7
# The page's choices first; token and served model as `hubcore usage` has them.
PAGE_GROUPS = ("user", "project", "model", "key", "upstream", "day", "token", "served_model")
_GROUP_TITLES = {"key": "key (upstream/label)", "served_model": "served model"}


def _page_range(request: Request, zone: Zone, now: float) -> tuple[float, float]:
    """The page's from/until: local dates (until included: up to its end),
    or what web.when reads (times, spans); by default the last 7 local days."""
    since, until = reports.default_range(zone, now, DEFAULT_DAYS)
    text = request.query.get("from", "").strip()
    if text:
        day = _local_day(text)
        since = zone.day_start(day) if day is not None else _when(request, "from", now)
    text = request.query.get("until", "").strip()
    if text:
        day = _local_day(text)
        until = zone.day_start(day + 1) if day is not None else _when(request, "until", now)
    if since >= until:
        raise BadParameter("from: must be before until")
    return since, until


def _local_day(text: str) -> int | None:
    """A date (YYYY-MM-DD) as days since 1970-01-01; None for anything else."""
    try:
        day = date.fromisoformat(text) if len(text) == 10 else None
    except ValueError:
        return None
    return None if day is None else day.toordinal() - EPOCH_ORDINAL


def _when(request: Request, name: str, now: float) -> float:
    moment = web.when(request, name, now)
    assert moment is not None  # the field is not empty
    return moment


def _dates(zone: Zone, since: float, until: float) -> tuple[date, date]:
    """The first and the last local date the range [since, until) touches."""
    end = zone.day(until)
    last = end - 1 if zone.day_start(end) >= until else end
    return Zone.local_date(zone.day(since)), Zone.local_date(max(last, zone.day(since)))


def _filename(by: str, since: float, until: float, zone: Zone, suffix: str) -> str:
    first, last = _dates(zone, since, until)
    return f"usage-by-{by}-{first.isoformat()}-{last.isoformat()}.{suffix}"


async def usage_page(request: Request, fmt: str | None = None) -> Reply:
    now = time.time()
    zone = Zone(request.server.tz)
    try:
        by = choice(request, "by", PAGE_GROUPS, "user")
        fmt = fmt or choice(request, "format", FORMATS, "html")
        since, until = _page_range(request, zone, now)
    except BadParameter as e:
        return web.bad_parameter(request, e)
    operator, csrf, shown = request.operator or "", request.csrf, _shown(request, zone, by, since, until)

    def answer(conn: sqlite3.Connection) -> Reply:
        # Queried and rendered in the worker thread: a long table never holds the loop.
        rows, total = reports.usage(conn, zone, by, since, until)
        if fmt in ("json", "csv"):
            attachment = [("content-disposition", f"attachment; filename=\"{_filename(by, since, until, zone, fmt)}\"")]
            if fmt == "json":
                return web.json_reply(reports.usage_document(rows, total, by, since, until), headers=attachment)
            return Reply(200, CSV, reports.usage_csv(rows, total, by), attachment)
        return web.html(render_page(zone, operator, csrf, shown, by, since, until, rows, total, now))

    return await web.read(request.server.database, answer)


async def usage_csv(request: Request) -> Reply:
    return await usage_page(request, "csv")


async def usage_json(request: Request) -> Reply:
    return await usage_page(request, "json")


async def usage_api(request: Request) -> Reply:
    now = time.time()
    zone = Zone(request.server.tz)
    try:
        by = choice(request, "by", PAGE_GROUPS, "user")
        since = web.when(request, "since", now)
        until = web.when(request, "until", now)
    except BadParameter as e:
        return web.bad_parameter(request, e)
    if since is not None and until is not None and since >= until:
        return web.api_error(400, "since: must be before until")

    def document(conn: sqlite3.Connection) -> dict[str, Any]:
        rows, total = reports.usage(conn, zone, by, since, until)
        return reports.usage_document(rows, total, by, since, until)

    return web.json_reply(await web.read(request.server.database, document))


def _shown(request: Request, zone: Zone, by: str, since: float, until: float) -> dict[str, str]:
    """The form's fields as asked, else the dates of the range shown."""
    first, last = _dates(zone, since, until)
    return {"by": by, "from": request.query.get("from", "").strip() or first.isoformat(),
            "until": request.query.get("until", "").strip() or last.isoformat()}


def _group_label(row: Row) -> str:
    if row.group is None:
        return reports.NONE_LABEL
    label = row.group if row.user is None else f"{row.group} {row.user}"
    return label if row.note is None else f"{label} ({row.note})"


def _cells(row: Row) -> str:
    def number(field: str, value: int) -> str:
        return f"<td class=\"num\" data-field=\"{field}\" data-value=\"{value}\">{value:,}</td>"

    return (
        number("requests", row.requests) + number("errors", row.errors) + number("input", row.input)
        + number("output", row.output) + number("cache_write_5m", row.cache_write_5m)
        + number("cache_write_1h", row.cache_write_1h) + number("cache_read", row.cache_read)
        + number("reasoning", row.reasoning)
        + f"<td class=\"num\" data-field=\"cost\" data-micros=\"{row.cost_micros}\">"
        f"{'~' if row.estimated else ''}{escape(format_usd(row.cost_micros, 4))}</td>"
        f"<td class=\"num\" data-field=\"cache_hit\">{escape(percent(row.cache_hit))}</td>"
    )


def render_page(zone: Zone, operator: str, csrf: str, shown: dict[str, str], by: str, since: float, until: float,
                rows: list[Row], total: Row, now: float) -> str:
    tz = zone.tz
    options = "".join(
        f"<option value=\"{g}\"{' selected' if g == by else ''}>{escape(_GROUP_TITLES.get(g, g))}</option>"
        for g in PAGE_GROUPS
    )
    form = (
        "<form class=\"filters\" method=\"get\" action=\"/usage\">"
        f"<label>Group by <select id=\"by\" name=\"by\">{options}</select></label>"
        f"<label>From <input id=\"from\" name=\"from\" value=\"{escape(shown['from'])}\" "
        "placeholder=\"2026-03-01\"></label>"
        f"<label>Until (included) <input id=\"until\" name=\"until\" value=\"{escape(shown['until'])}\" "
        "placeholder=\"2026-03-07\"></label>"
        "<button type=\"submit\">Show</button></form>"
    )
    query = escape(urlencode(shown))
    downloads = (
        f"<p class=\"range\">From <span id=\"since\">{escape(format_time(since, tz))}</span> to "
        f"<span id=\"until-time\">{escape(format_time(until, tz))}</span> · download "
        f"<a id=\"download-csv\" href=\"/usage.csv?{query}\">CSV</a> · "
        f"<a id=\"download-json\" href=\"/usage.json?{query}\">JSON</a></p>"
    )
    body_rows = "".join(
        f"<tr data-group=\"{escape(row.group or '')}\"><th scope=\"row\">{escape(_group_label(row))}</th>"
        f"{_cells(row)}</tr>"
        for row in rows
    )
    header = f"<th>{escape(_GROUP_TITLES.get(by, by).capitalize())}</th>" + "".join(
        f"<th class=\"num\">{name}</th>" for name in (
            "Requests", "Errors", "Input", "Output", "Cache write 5m", "Cache write 1h", "Cache read", "Reasoning",
            "Cost", "Cache hit",
        )
    )
    table = (
        f"<table id=\"usage\"><thead><tr>{header}</tr></thead><tbody>{body_rows}</tbody>"
        f"<tfoot><tr id=\"usage-total\"><th scope=\"row\">Total</th>{_cells(total)}</tr></tfoot></table>"
        if rows else "<p id=\"usage-empty\">No usage in this range.</p>"
    )
    estimated = (
        "<p class=\"note\">~ includes estimated cost: requests for models without a price, charged at the "
        "prices of their vendor's most expensive model.</p>" if total.estimated else ""
    )
    body = f"<h1>Usage</h1>{form}{downloads}<section class=\"wide\">{table}{estimated}</section>"
    return pages.operator_page(title="Usage", active="/usage", operator=operator, csrf=csrf, tz=tz, now=now,
                               body=body)


_GROUP_PARAMETER = {
    "name": "by", "in": "query", "schema": {"type": "string", "enum": list(PAGE_GROUPS)},
    "description": "what to group by (default user); day: local dates of the reporting zone",
}

ROUTES = [
    Route("GET", "/usage", usage_page, Access.OPERATOR),
    Route("GET", "/usage.csv", usage_csv, Access.OPERATOR),
    Route("GET", "/usage.json", usage_json, Access.OPERATOR),
    Route("GET", "/api/v1/usage", usage_api, Access.OPERATOR, api={
        "summary": "Usage and cost grouped as `hubcore usage` groups it",
        "tags": ["usage"],
        "parameters": [
            _GROUP_PARAMETER,
            {"name": "since", "in": "query", "schema": {"type": "string"},
             "description": "inclusive: a span back from now (24h, 7d) or an ISO 8601 date or time; "
                            "without an offset, in the reporting zone (a date is its local midnight)"},
            {"name": "until", "in": "query", "schema": {"type": "string"},
             "description": "exclusive, as since"},
        ],
        "responses": {
            "200": {"description": "the JSON of `hubcore usage --format json`: by, since, until, groups, total"},
            "400": {"description": "a field that cannot be read"},
        },
    }),
]
