"""/me: a developer's own spend, budgets and limits (and nothing of anyone
else's), as a page and as /api/v1/me."""
from __future__ import annotations

import asyncio
import time
from typing import Any

from hubcore.dashboard import pages, web
from hubcore.dashboard.mine import Mine, read_mine
from hubcore.dashboard.web import Access, Request, Route
from hubcore.governance.limiter import BudgetLine
from hubcore.http.h11server import Reply


def _mine(request: Request) -> tuple[Any, list[BudgetLine], float]:
    """The developer's principal and budgets, from memory, on the loop where
    the limiter lives: the budgets of this token and this user only (a
    project's spend is its members')."""
    session = request.session
    assert session is not None
    principal = request.server.tokens.lookup(session.token)
    assert principal is not None  # the server checked it before the handler
    now = time.time()
    limiter = request.server.limiter
    budgets = [
        *limiter.spend_report(now, ("token", str(principal.token_id))),
        *limiter.spend_report(now, ("user", principal.user)),
    ]
    return principal, budgets, now


async def me_page(request: Request) -> Reply:
    principal, budgets, now = _mine(request)
    server = request.server

    def render() -> str:
        mine = read_mine(server.database, principal.user, server.tz, now)
        return pages.me_page(
            user=principal.user, project=principal.project, token_prefix=principal.prefix, csrf=request.csrf,
            mine=mine, tz=server.tz, now=now, budgets=budgets, token_limits=principal.limits,
        )

    return web.html(await asyncio.to_thread(render))


async def me_api(request: Request) -> Reply:
    principal, budgets, now = _mine(request)
    server = request.server
    mine: Mine = await asyncio.to_thread(read_mine, server.database, principal.user, server.tz, now)

    def limits(lim: Any) -> dict[str, Any] | None:
        return None if lim is None else {"rpm": lim.rpm, "concurrency": lim.concurrency}

    return web.json_reply({
        "user": principal.user, "project": principal.project, "token": principal.prefix,
        "timezone": server.tz.key,
        "spend": [{"period": p.name, "since": p.start, "requests": p.requests, "input_tokens": p.input,
                   "output_tokens": p.output, "cost_micros": p.cost_micros} for p in mine.periods],
        "daily": [{"date": day.isoformat(), "cost_micros": micros} for day, micros in mine.days],
        "budgets": [{"scope": b.kind, "window": b.window, "spent_micros": b.spent_micros,
                     "limit_micros": b.limit_micros, "remaining_micros": b.remaining_micros,
                     "resets_at": b.resets_at} for b in budgets],
        "limits": {"token": limits(principal.limits), "user": limits(mine.user_limits)},
    })


ROUTES = [
    Route("GET", "/me", me_page, Access.DEVELOPER),
    Route("GET", "/api/v1/me", me_api, Access.DEVELOPER, api={
        "summary": "The signed-in developer's own spend, budgets and limits",
        "tags": ["developer"],
        "responses": {"200": {"description": "spend today, this week and this month; daily spend; budgets; limits"}},
    }),
]
