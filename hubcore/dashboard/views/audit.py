"""/audit: every administrative change (dashboard, API, CLI), newest first,
a page at a time (keyset: ?before=ID), filtered by actor, action and
time; and /api/v1/audit, the same rows as `hubcore audit --json`."""
from __future__ import annotations

import time
from html import escape
from typing import Any
from urllib.parse import urlencode

import orjson

from hubcore.dashboard import pages, web
from hubcore.dashboard.web import Access, BadParameter, Request, Route
from hubcore.governance import audit
from hubcore.governance.limits import format_time
from hubcore.http.h11server import Reply

PAGE_ROWS = 100
MAX_ROWS = 1000


def _query(request: Request, now: float) -> dict[str, Any]:
    return {
        "since": web.when(request, "since", now),
        "limit": web.integer(request, "limit", PAGE_ROWS, low=1, high=MAX_ROWS),
        "before_id": web.integer(request, "before", None, low=1),
        "actor": request.query.get("actor", "").strip() or None,
        "action": request.query.get("action", "").strip() or None,
    }


async def _entries(request: Request, query: dict[str, Any]) -> list[audit.AuditEntry]:
    return await web.read(request.server.database, lambda conn: audit.read(conn, **query))


async def audit_api(request: Request) -> Reply:
    try:
        query = _query(request, time.time())
    except BadParameter as e:
        return web.bad_parameter(request, e)
    entries = await _entries(request, query)
    after = entries[-1].id if len(entries) == query["limit"] else None
    return web.json_reply({"entries": [e.to_dict() for e in entries], "next_before": after})


def _change(value: Any) -> str:
    if value is None:
        return ""
    return escape(orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode())


async def audit_page(request: Request) -> Reply:
    now = time.time()
    try:
        query = _query(request, now)
    except BadParameter as e:
        return web.bad_parameter(request, e)
    entries = await _entries(request, query)
    tz = request.server.tz
    rows = "".join(
        f"<tr data-id=\"{e.id}\"><td>{escape(format_time(e.ts, tz))}</td><td>{escape(e.actor)}</td>"
        f"<td>{escape(e.action)}</td><td>{escape(e.target or '')}</td>"
        f"<td><code>{_change(e.before)}</code></td><td><code>{_change(e.after)}</code></td>"
        f"<td>{escape(e.origin)}</td></tr>"
        for e in entries
    )
    kept = {k: request.query[k] for k in ("actor", "action", "since", "limit") if request.query.get(k)}
    more = ""
    if entries and len(entries) == query["limit"]:
        more = f"<p><a id=\"older\" href=\"/audit?{escape(urlencode({**kept, 'before': entries[-1].id}))}\">Older</a></p>"
    filters = (
        "<form class=\"filters\" method=\"get\" action=\"/audit\">"
        f"<label>Actor <input name=\"actor\" value=\"{escape(kept.get('actor', ''))}\" placeholder=\"admin:alice\"></label>"
        f"<label>Action <input name=\"action\" value=\"{escape(kept.get('action', ''))}\" placeholder=\"token\"></label>"
        f"<label>Since <input name=\"since\" value=\"{escape(kept.get('since', ''))}\" placeholder=\"7d or 2026-01-31\"></label>"
        "<button type=\"submit\">Filter</button></form>"
    )
    table = (
        "<table id=\"audit\"><thead><tr><th>When</th><th>Who</th><th>What</th><th>On</th><th>Before</th>"
        f"<th>After</th><th>From</th></tr></thead><tbody>{rows}</tbody></table>"
        if entries else "<p id=\"audit-empty\">No changes recorded for this filter.</p>"
    )
    body = f"<h1>Audit trail</h1>{filters}{table}{more}"
    assert request.operator is not None
    return web.html(pages.operator_page(title="Audit", active="/audit", operator=request.operator,
                                        csrf=request.csrf, tz=tz, now=now, body=body))


ROUTES = [
    Route("GET", "/audit", audit_page, Access.OPERATOR),
    Route("GET", "/api/v1/audit", audit_api, Access.OPERATOR, api={
        "summary": "Administrative changes, newest first",
        "tags": ["audit"],
        "parameters": [
            {"name": "since", "in": "query", "schema": {"type": "string"},
             "description": "a span back from now (24h, 7d) or an ISO 8601 time; without an offset, in the reporting zone"},
            {"name": "before", "in": "query", "schema": {"type": "integer"},
             "description": "the next page: next_before of the previous one"},
            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ROWS}},
            {"name": "actor", "in": "query", "schema": {"type": "string"}},
            {"name": "action", "in": "query", "schema": {"type": "string"}, "description": "an action or its prefix"},
        ],
        "responses": {"200": {"description": "entries (as `hubcore audit --json`) and next_before"}},
    }),
]
