"""/: the operator's landing page."""
from __future__ import annotations

from hubcore.dashboard import web
from hubcore.dashboard.web import Access, Request, Route
from hubcore.http.h11server import Reply


async def overview(request: Request) -> Reply:
    return web.redirect("/audit")


ROUTES = [Route("GET", "/", overview, Access.OPERATOR)]
