"""/requests: the latest usage rows, newest first, filtered by user, project,
model, outcome, status and a time range in the reporting zone, a page at a
time (keyset: ?before=ID, never OFFSET); /requests/{id}: one row in full
(tokens per class, cost, attempts and their route, key label, timings,
session). /api/v1/requests and /api/v1/requests/{id} answer the same as JSON.

Theory of operation. Rows are listed by arrival time (ts), newest first, id
breaking ties, so that a page is one read of an index in its own order: a
(filter, ts) index for an equality filter (migration 8 of hubcore.store;
usage_user_ts serves user), usage_ts without one, the time range and the
cursor as bounds on ts. The cursor is the id of a row; the next page starts
below that row's (ts, id). With one filter or none every index entry read
is a row shown, so a page costs its 50 rows. With several, SQLite cannot
intersect indexes and chooses blind without statistics: the page reads the
index of the filter with the fewest rows in range (each filter's entries
counted on its index alone, index only, up to the fewest so far) and checks
the others on each row it reads. When even the fewest are SCAN_BUDGET or
more and the filters have few rows in common (a user and a project they
never worked in), the page reads that index a window of SCAN_STEP entries
at a time and stops after SCAN_BUDGET: it shows what it found, says how far
back it searched, and its cursor (the last entry read, a row that need not
match) lets the next page search on. No page reads more than SCAN_BUDGET
rows, whatever the filters: with 2 million rows, at most some 200 ms on a
busy 2-core machine (`python -m bench.dashboard`), most pages under 20.
On PostgreSQL the same queries run without the index hints (it has none;
its planner has statistics), and the same budget bounds a page.
"""
from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass
from html import escape
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from hubcore.accounting.usage import FIELDS, OUTCOMES
from hubcore.dashboard import pages, web
from hubcore.database import indexed_by
from hubcore.dashboard.web import Access, BadParameter, Request, Route
from hubcore.governance.limits import format_time, format_usd
from hubcore.http.h11server import Reply

PAGE_ROWS = 50
MAX_ROWS = 500
# Index entries a page with several filters reads at most (see the module's
# docstring), a window of SCAN_STEP at a time: with 2 million rows a table
# row costs 1 to 3 us to read and check, so 50,000 of them stay well under
# the 300 ms a page may take on a busy machine.
SCAN_BUDGET = 50_000
SCAN_STEP = 10_000
# Filter values offered in the form's suggestions, per field.
SUGGESTIONS_MAX = 500

# Each equality filter: its query field, column and index (fixed SQL, never
# text from the caller).
_FILTER_INDEXES = {
    "user": "usage_user_ts",
    "project": "usage_project_ts",
    "model": "usage_model_ts",
    "outcome": "usage_outcome_ts",
    "status": "usage_status_ts",
}
_FILTER_ORDER = ("outcome", "status", "user", "project", "model")
_COLUMNS = ("id", *FIELDS)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM usage"
_BASIS_TITLES = {
    None: "list price",
    "estimate": "estimated: the model has no price, charged at the vendor's dearest",
    "free": "free: the model has no price ([pricing] unpriced = \"free\")",
    "refused": "refused before it was sent: the model has no price",
    "unknown": "unknown: the model has no price and nothing to estimate from",
}


@dataclass(frozen=True, slots=True)
class RequestQuery:
    """One page's filters, bounds and cursor, checked."""

    filters: tuple[tuple[str, str | int], ...]   # (column, value) of each equality filter given
    since: float | None                          # inclusive, unix seconds
    until: float | None                          # exclusive
    before: int | None                           # the cursor: the previous page's next_before
    limit: int


def read_query(request: Request, now: float) -> RequestQuery:
    """The page's query fields; BadParameter naming the field that is wrong."""
    filters: list[tuple[str, str | int]] = []
    for name in ("user", "project", "model"):
        value = request.query.get(name, "").strip()
        if value:
            filters.append((name, value))
    outcome = request.query.get("outcome", "").strip()
    if outcome:
        if outcome not in OUTCOMES:
            raise BadParameter(f"outcome: must be one of {', '.join(OUTCOMES)}, not {outcome!r}")
        filters.append(("outcome", outcome))
    status = web.integer(request, "status", None, low=100, high=599)
    if status is not None:
        filters.append(("status", status))
    since = web.when(request, "from", now)
    until = web.when(request, "until", now)
    if since is not None and until is not None and until <= since:
        raise BadParameter("until: must be later than from")
    before = web.integer(request, "before", None, low=1)
    limit = web.integer(request, "limit", PAGE_ROWS, low=1, high=MAX_ROWS)
    assert limit is not None
    return RequestQuery(tuple(filters), since, until, before, limit)


@dataclass(slots=True)
class Bounds:
    """The WHERE terms on ts (and id) of a page: the lower bound (from) and
    the upper one (until, or the cursor), kept apart because a windowed
    scan moves the upper one."""

    lower: list[str]
    lower_params: list[Any]
    upper: list[str]
    upper_params: list[Any]

    @property
    def terms(self) -> list[str]:
        return self.lower + self.upper

    @property
    def params(self) -> list[Any]:
        return self.lower_params + self.upper_params

    def below(self, ts: float, row_id: int) -> Bounds:
        """These bounds, the upper one moved to below the row (ts, row_id)."""
        # `ts <= ?` is the term an index range can use.
        return Bounds(self.lower, self.lower_params, ["ts <= ? AND (ts < ? OR id < ?)"], [ts, ts, row_id])


def bounds(conn: sqlite3.Connection, query: RequestQuery) -> Bounds | None:
    """The page's bounds; None when the cursor's row is gone (retention
    removed it, and with it every older row: nothing is left to show)."""
    lower, lower_params = (["ts >= ?"], [query.since]) if query.since is not None else ([], [])
    found = Bounds(lower, lower_params, [], [])
    if query.before is not None:
        row = conn.execute("SELECT ts FROM usage WHERE id = ?", (query.before,)).fetchone()
        if row is None:
            return None
        if query.until is None or row[0] < query.until:
            return found.below(row[0], query.before)
    if query.until is not None:
        found.upper, found.upper_params = ["ts < ?"], [query.until]
    return found


def choose_index(conn: sqlite3.Connection, query: RequestQuery, where: Bounds) -> tuple[str, int]:
    """The index a page reads, and the number of its entries within the
    bounds (counted up to SCAN_BUDGET; 0 when nothing had to be counted).
    With several filters: the one whose filter has the fewest rows, each
    counted on its index alone, up to the fewest found so far."""
    if not query.filters:
        return "usage_ts", 0
    if len(query.filters) == 1:
        return _FILTER_INDEXES[query.filters[0][0]], 0
    # Likely the fewest first, so that the later counts stop sooner: a
    # failure's outcome or status, then a user, a project, a model; "ok"
    # and 200 are most rows.
    likely = sorted(query.filters, key=lambda f: (f[1] in ("ok", 200), _FILTER_ORDER.index(f[0])))
    best, chosen = SCAN_BUDGET, _FILTER_INDEXES[likely[0][0]]
    for column, value in likely:
        index = _FILTER_INDEXES[column]
        (count,) = conn.execute(
            f"SELECT count(*) FROM (SELECT 1 FROM usage {indexed_by(conn, index)} "
            f"WHERE {' AND '.join([f'{column} = ?', *where.terms])} LIMIT {best}) AS counted",
            [value, *where.params],
        ).fetchone()
        if count < best:
            best, chosen = count, index
    return chosen, best


@dataclass(frozen=True, slots=True)
class Page:
    rows: list[dict[str, Any]]
    next_before: int | None      # the cursor of the next page; None: nothing older
    # When the page stopped at SCAN_BUDGET before it was full: the arrival
    # time it searched back to (the next page goes on from there).
    searched_to: float | None = None


def _select(conn: sqlite3.Connection, index: str, query: RequestQuery, where: Bounds, limit: int) -> list[dict[str, Any]]:
    terms = [f"{column} = ?" for column, _ in query.filters] + where.terms
    cursor = conn.execute(
        f"{_SELECT} {indexed_by(conn, index)} WHERE {' AND '.join(terms) or '1 = 1'}"
        f" ORDER BY ts DESC, id DESC LIMIT {limit}",
        [value for _, value in query.filters] + where.params,
    )
    return [dict(zip(_COLUMNS, values)) for values in cursor]


def list_rows(conn: sqlite3.Connection, query: RequestQuery) -> Page:
    """A page of rows, newest first, and where the next one starts."""
    where = bounds(conn, query)
    if where is None:
        return Page([], None)
    index, entries = choose_index(conn, query, where)
    if entries < SCAN_BUDGET:
        # Every entry the index has in range matches, or there are few.
        rows = _select(conn, index, query, where, query.limit + 1)
        more = len(rows) > query.limit
        rows = rows[:query.limit]
        return Page(rows, rows[-1]["id"] if more else None)
    # Several filters, each with many rows, possibly few in common: read the
    # index a window of SCAN_STEP entries at a time, up to SCAN_BUDGET.
    column, value = next((c, v) for c, v in query.filters if _FILTER_INDEXES[c] == index)
    rows = []
    for _ in range(SCAN_BUDGET // SCAN_STEP):
        edge = conn.execute(
            f"SELECT ts, id FROM usage {indexed_by(conn, index)}"
            f" WHERE {' AND '.join([f'{column} = ?', *where.terms])}"
            f" ORDER BY ts DESC, id DESC LIMIT 1 OFFSET {SCAN_STEP - 1}", [value, *where.params],
        ).fetchone()
        window = where if edge is None else Bounds(
            where.lower + ["ts >= ? AND (ts > ? OR id >= ?)"], where.lower_params + [edge[0], edge[0], edge[1]],
            where.upper, where.upper_params)
        rows += _select(conn, index, query, window, query.limit + 1 - len(rows))
        if len(rows) > query.limit:
            rows = rows[:query.limit]
            return Page(rows, rows[-1]["id"])
        if edge is None:
            return Page(rows, None)
        where = where.below(edge[0], edge[1])
    # The budget is spent: the next page goes on below the last entry read,
    # a row that need not match the filters (the cursor only says where).
    assert edge is not None
    return Page(rows, edge[1], None if len(rows) == query.limit else edge[0])


def one_row(conn: sqlite3.Connection, row_id: int) -> dict[str, Any] | None:
    found = conn.execute(f"{_SELECT} WHERE id = ?", (row_id,)).fetchone()
    return dict(zip(_COLUMNS, found)) if found else None


def suggestions(conn: sqlite3.Connection, column: str) -> list[str]:
    """The distinct values of a filter column, for the form's suggestions:
    one index seek per value (a skip scan), not a read of every row. The
    LIMIT is the outer query's, which stops the recursion on both engines
    (PostgreSQL refuses one inside a recursive query)."""
    assert column in ("user", "project", "model")
    found = conn.execute(
        f"WITH RECURSIVE seen(value) AS ("
        f" SELECT (SELECT min({column}) FROM usage)"
        f" UNION ALL SELECT (SELECT min({column}) FROM usage WHERE {column} > seen.value) FROM seen"
        f" WHERE seen.value IS NOT NULL)"
        f" SELECT value FROM seen WHERE value IS NOT NULL LIMIT {SUGGESTIONS_MAX}"
    )
    return [value for (value,) in found]


def route_chain(route: str | None) -> list[dict[str, Any]]:
    """The attempts of a row's `route` ("primary/a:529,primary/b:connect,
    backup/c:200"), in order: upstream, key and the HTTP status the attempt
    got (an int) or, with no answer, what happened ("connect", "timeout",
    "reset"). Attempts beyond those a route writes out ("+3 more") are one
    last entry {"more": 3}."""
    chain: list[dict[str, Any]] = []
    for hop in (route or "").split(","):
        more = re.fullmatch(r"\+(\d+) more", hop)
        if more:
            chain.append({"more": int(more.group(1))})
            continue
        target, sep, status = hop.rpartition(":")
        if not sep:
            continue
        upstream, _, key = target.partition("/")
        chain.append({"upstream": upstream, "key": key, "status": int(status) if status.isdigit() else status})
    return chain


def to_json(row: dict[str, Any], tz: ZoneInfo) -> dict[str, Any]:
    """A row for the API: its columns, its time in the reporting zone and
    whether output_tokens was estimated as a boolean."""
    return {**row, "time": format_time(row["ts"], tz), "output_estimated": bool(row["output_estimated"])}


# -- the API ------------------------------------------------------------------------------


async def requests_api(request: Request) -> Reply:
    try:
        query = read_query(request, time.time())
    except BadParameter as e:
        return web.bad_parameter(request, e)
    tz = request.server.tz
    page = await web.read(request.server.database, lambda conn: list_rows(conn, query))
    return web.json_reply({
        "rows": [to_json(row, tz) for row in page.rows], "next_before": page.next_before,
        "searched_to": None if page.searched_to is None else format_time(page.searched_to, tz), "timezone": tz.key,
    })


def _row_id(request: Request) -> int:
    text = request.path_params["id"]
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise BadParameter(f"id: expected a request's number, got {text!r}")
    return int(text)


async def request_api(request: Request) -> Reply:
    try:
        row_id = _row_id(request)
    except BadParameter as e:
        return web.bad_parameter(request, e)
    row = await web.read(request.server.database, lambda conn: one_row(conn, row_id))
    if row is None:
        return web.api_error(404, f"no request {row_id}: it never existed, or retention removed it")
    return web.json_reply({**to_json(row, request.server.tz), "route_chain": route_chain(row["route"])})


# -- the pages ----------------------------------------------------------------------------


def _text(value: Any) -> str:
    return "-" if value is None or value == "" else escape(str(value))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"


def _cost(row: dict[str, Any]) -> str:
    micros = row["cost_micros"]
    shown = "-" if micros is None else format_usd(micros)
    mark = "" if row["cost_basis"] is None else "*"
    return f"{escape(shown)}{mark}"


def _list_html(request: Request, query: RequestQuery, page: Page, known: dict[str, list[str]], tz: ZoneInfo) -> str:
    rows, after = page.rows, page.next_before
    kept = {k: request.query[k].strip() for k in ("user", "project", "model", "outcome", "status", "from", "until",
                                                    "limit") if request.query.get(k, "").strip()}

    def field(name: str, label: str, hint: str) -> str:
        options = "".join(f"<option value=\"{escape(v)}\">" for v in known.get(name, ()))
        datalist = f"<datalist id=\"{name}-values\">{options}</datalist>" if options else ""
        listed = f" list=\"{name}-values\"" if options else ""
        return (f"<label>{label} <input name=\"{name}\" id=\"filter-{name}\" value=\"{escape(kept.get(name, ''))}\""
                f" placeholder=\"{escape(hint)}\"{listed}></label>{datalist}")

    outcomes = "".join(
        f"<option value=\"{o}\"{' selected' if kept.get('outcome') == o else ''}>{o}</option>" for o in OUTCOMES
    )
    zone = pages.zone_label(tz, time.time())
    form = (
        "<form id=\"request-filters\" method=\"get\" action=\"/requests\">"
        f"{field('user', 'User', 'alice')}{field('project', 'Project', 'web')}"
        f"{field('model', 'Model', 'claude-sonnet-4-6')}"
        f"<label>Outcome <select name=\"outcome\" id=\"filter-outcome\"><option value=\"\">any</option>{outcomes}"
        "</select></label>"
        f"{field('status', 'Status', '429')}"
        f"{field('from', 'From', '24h or 2026-01-31T09:00')}{field('until', 'Until', '2026-02-01')}"
        "<button type=\"submit\">Filter</button> <a href=\"/requests\">Clear</a>"
        f"<p class=\"hint\">Times without an offset are in {escape(zone)}; a span such as 7d counts back from now.</p>"
        "</form>"
    )
    body_rows = "".join(
        f"<tr data-id=\"{row['id']}\"><td><a href=\"/requests/{row['id']}\">{escape(format_time(row['ts'], tz))}</a></td>"
        f"<td>{_text(row['user'])}</td><td>{_text(row['project'])}</td><td>{_text(row['model'])}</td>"
        f"<td>{_text(row['upstream'])}{'/' + escape(row['key_label']) if row['key_label'] else ''}</td>"
        f"<td class=\"num\">{row['status']}</td><td>{escape(row['outcome'])}</td>"
        f"<td class=\"num\">{row['input_tokens']:,}</td><td class=\"num\">{row['output_tokens']:,}</td>"
        f"<td class=\"num\">{row['cache_read']:,}</td>"
        f"<td class=\"num\" data-micros=\"{'' if row['cost_micros'] is None else row['cost_micros']}\">{_cost(row)}</td>"
        f"<td class=\"num\">{_ms(row['ttfb_ms'])}</td><td class=\"num\">{_ms(row['total_ms'])}</td></tr>"
        for row in rows
    )
    table = (
        "<div class=\"scroll\"><table id=\"requests\"><thead><tr><th>Time</th><th>User</th><th>Project</th><th>Model</th>"
        "<th>Upstream/key</th><th>Status</th><th>Outcome</th><th>Input</th><th>Output</th><th>Cache read</th>"
        f"<th>Cost</th><th>TTFB</th><th>Total</th></tr></thead><tbody>{body_rows}</tbody></table></div>"
        if rows else "<p id=\"requests-empty\">No requests match these filters"
        f"{'' if page.searched_to is None else ' so far'}.</p>"
    )
    if page.searched_to is not None:
        table += (f"<p id=\"searched\" class=\"hint\">Searched back to {escape(format_time(page.searched_to, tz))} "
                  "(these filters have few requests in common); Older searches on.</p>")
    links = []
    if query.before is not None:
        links.append(f"<a id=\"newest\" href=\"/requests?{escape(urlencode(kept))}\">Newest</a>")
    if after is not None:
        links.append(f"<a id=\"older\" href=\"/requests?{escape(urlencode({**kept, 'before': after}))}\">Older</a>")
    nav = f"<p class=\"pager\">{' · '.join(links)}</p>" if links else ""
    note = "<p class=\"hint\">* cost not at the model's list price: see the request.</p>" if any(
        row["cost_basis"] is not None for row in rows) else ""
    return f"<div class=\"requests-view\"><h1>Requests</h1>{form}{table}{note}{nav}</div>"


async def requests_page(request: Request) -> Reply:
    now = time.time()
    try:
        query = read_query(request, now)
    except BadParameter as e:
        return web.bad_parameter(request, e)
    tz = request.server.tz
    assert request.operator is not None
    operator, csrf = request.operator, request.csrf

    def render(conn: sqlite3.Connection) -> str:
        # In the worker thread, the rendering too: the loop only sends it.
        page = list_rows(conn, query)
        known = {name: suggestions(conn, name) for name in ("user", "project", "model")}
        body = _list_html(request, query, page, known, tz)
        return pages.operator_page(title="Requests", active="/requests", operator=operator, csrf=csrf, tz=tz,
                                   now=now, body=body)

    return web.html(await web.read(request.server.database, render))


def _detail_html(row: dict[str, Any], tz: ZoneInfo) -> str:
    def line(key: str, label: str, value: str) -> str:
        return f"<tr id=\"field-{key}\"><th scope=\"row\">{label}</th><td>{value}</td></tr>"

    def count(key: str, label: str) -> str:
        return (f"<tr id=\"tokens-{key}\"><th scope=\"row\">{label}</th>"
                f"<td class=\"num\" data-value=\"{row[key]}\">{row[key]:,}</td></tr>")

    micros = row["cost_micros"]
    cost = "-" if micros is None else format_usd(micros)
    estimated = " (estimated: the stream was cut before the vendor counted it)" if row["output_estimated"] else ""
    tokens = (
        "<table id=\"tokens\"><tbody>"
        + count("input_tokens", "Input (uncached)") + count("output_tokens", f"Output{estimated}")
        + count("cache_write_5m", "Cache write, 5 minutes") + count("cache_write_1h", "Cache write, 1 hour")
        + count("cache_read", "Cache read") + count("reasoning_tokens", "Reasoning (part of output)")
        + count("server_tool_requests", "Server tool uses")
        + "</tbody></table>"
    )
    chain = route_chain(row["route"])
    attempts = "".join(
        f"<li class=\"more\">and {hop['more']} more</li>" if "more" in hop else
        f"<li><span class=\"upstream\">{escape(hop['upstream'])}</span>/<span class=\"key\">{escape(hop['key'])}</span>"
        f" → <span class=\"status\">{escape(str(hop['status']))}</span></li>"
        for hop in chain
    )
    route = (f"<ol id=\"route\">{attempts}</ol>" if chain
             else "<p id=\"route\">The hub answered by itself: no attempt upstream.</p>")
    basis = _BASIS_TITLES.get(row["cost_basis"], str(row["cost_basis"]))
    fields = "".join([
        line("time", "Time", escape(format_time(row["ts"], tz))),
        line("request_id", "Request id", f"<code>{_text(row['request_id'])}</code>"),
        line("user", "User", _text(row["user"])),
        line("project", "Project", _text(row["project"])),
        line("token_id", "Token", _text(row["token_id"])),
        line("endpoint", "Endpoint", _text(row["endpoint"])),
        line("model", "Model", _text(row["model"])),
        line("served_model", "Model sent upstream", _text(row["served_model"] or row["model"])),
        line("upstream", "Upstream", _text(row["upstream"])),
        line("key_label", "Key", _text(row["key_label"])),
        line("status", "Status", str(row["status"])),
        line("outcome", "Outcome", escape(row["outcome"])),
        line("error_type", "Error type", _text(row["error_type"])),
        line("stop_reason", "Stop reason", _text(row["stop_reason"])),
        line("cost", "Cost", f"<span data-micros=\"{'' if micros is None else micros}\">{escape(cost)}</span>"),
        line("cost_basis", "Cost basis", escape(basis)),
        line("ttfb", "Time to first byte", _ms(row["ttfb_ms"])),
        line("total", "Total time", _ms(row["total_ms"])),
        line("attempts", "Attempts", str(row["attempts"])),
        line("session_id", "Session", _text(row["session_id"])),
        line("user_agent", "User agent", _text(row["user_agent"])),
    ])
    return (
        f"<div class=\"request-view\"><p><a href=\"/requests\">← Requests</a></p><h1>Request {row['id']}</h1>"
        f"<section><h2>Request</h2><table id=\"request\"><tbody>{fields}</tbody></table></section>"
        f"<section><h2>Tokens</h2>{tokens}</section>"
        f"<section><h2>Attempts</h2>{route}</section></div>"
    )


async def request_page(request: Request) -> Reply:
    now = time.time()
    try:
        row_id = _row_id(request)
    except BadParameter as e:
        return web.bad_parameter(request, e)
    tz = request.server.tz
    assert request.operator is not None
    operator, csrf = request.operator, request.csrf

    def render(conn: sqlite3.Connection) -> tuple[int, str]:
        row = one_row(conn, row_id)
        if row is None:
            status = 404
            body = (f"<h1>No request {row_id}</h1><p>It never existed, or usage retention removed it.</p>"
                    "<p><a href=\"/requests\">← Requests</a></p>")
        else:
            status, body = 200, _detail_html(row, tz)
        return status, pages.operator_page(title=f"Request {row_id}", active="/requests", operator=operator,
                                           csrf=csrf, tz=tz, now=now, body=body)

    status, page = await web.read(request.server.database, render)
    return web.html(page, status)


_ROW_SCHEMA = {"type": "object", "description": "a usage row: its columns (see `hubcore usage`), id and time"}
_FILTER_PARAMETERS = [
    {"name": "user", "in": "query", "schema": {"type": "string"}},
    {"name": "project", "in": "query", "schema": {"type": "string"}},
    {"name": "model", "in": "query", "schema": {"type": "string"}, "description": "the client's model id"},
    {"name": "outcome", "in": "query", "schema": {"type": "string", "enum": list(OUTCOMES)}},
    {"name": "status", "in": "query", "schema": {"type": "integer", "minimum": 100, "maximum": 599},
     "description": "the HTTP status the client received"},
    {"name": "from", "in": "query", "schema": {"type": "string"},
     "description": "inclusive: a span back from now (24h, 7d) or an ISO 8601 time; without an offset, in the reporting zone"},
    {"name": "until", "in": "query", "schema": {"type": "string"}, "description": "exclusive; as from"},
    {"name": "before", "in": "query", "schema": {"type": "integer"},
     "description": "the next page: next_before of the previous one"},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ROWS, "default": PAGE_ROWS}},
]

ROUTES = [
    Route("GET", "/requests", requests_page, Access.OPERATOR),
    Route("GET", "/requests/{id}", request_page, Access.OPERATOR),
    Route("GET", "/api/v1/requests", requests_api, Access.OPERATOR, api={
        "summary": "The latest requests (usage rows), newest first, filtered",
        "tags": ["requests"],
        "parameters": _FILTER_PARAMETERS,
        "responses": {"200": {"description": "rows, newest first; next_before: the cursor of the next page, "
                                             "null on the last. A page may hold fewer rows than limit and "
                                             "still have a next one: with several filters that have few rows "
                                             "in common it stops after reading 50,000, and searched_to says "
                                             "how far back it got", "content": {web.JSON: {"schema": {
                                                 "type": "object", "properties": {
                                                     "rows": {"type": "array", "items": _ROW_SCHEMA},
                                                     "next_before": {"type": ["integer", "null"]},
                                                     "searched_to": {"type": ["string", "null"]},
                                                     "timezone": {"type": "string"}}}}}},
                      "400": {"$ref": "#/components/responses/Error"}},
    }),
    Route("GET", "/api/v1/requests/{id}", request_api, Access.OPERATOR, api={
        "summary": "One request (usage row) in full, with its attempts",
        "tags": ["requests"],
        "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}],
        "responses": {"200": {"description": "the row's columns, its time in the reporting zone and route_chain",
                              "content": {web.JSON: {"schema": _ROW_SCHEMA}}},
                      "400": {"$ref": "#/components/responses/Error"},
                      "404": {"$ref": "#/components/responses/Error"}},
    }),
]
