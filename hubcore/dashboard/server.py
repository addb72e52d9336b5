"""The dashboard's listener (its connections are hubcore.http.h11server's,
as the ops socket's are), with the security headers on every answer.

Routes: GET /login, POST /login (a developer's hub token), POST /logout,
GET /me, GET /static/<file>. Only the session lookup and the in-memory
budget view run on the event loop; the database read and the page's
rendering run in a worker thread, so the proxy sharing the loop is never
held up by a page.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import h11

from hubcore.config import DashboardConfig, zone
from hubcore.dashboard import pages
from hubcore.dashboard.mine import read_mine
from hubcore.dashboard.sessions import Sessions, same_secret
from hubcore.governance.limiter import Limiter
from hubcore.governance.tokens import TokenTable
from hubcore.http.h11server import H11Server, Limits, Reply, busy_answer

log = logging.getLogger("hubcore.dashboard")

LIMITS = Limits(
    max_head=8 * 1024, max_body=16 * 1024,   # bytes: a sign-in form
    idle_timeout=30.0, request_timeout=10.0, write_timeout=10.0, max_connections=64,
)
SESSION_COOKIE = "hubcore_session"
# The sign-in form's CSRF token rides in this cookie as well as in the form
# (double submit): there is no session yet to hold it.
LOGIN_COOKIE = "hubcore_login"

HTML = "text/html; charset=utf-8"
TEXT = "text/plain; charset=utf-8"
SECURITY_HEADERS = [
    ("content-security-policy", "default-src 'self'"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "same-origin"),
    ("x-content-type-options", "nosniff"),
]
_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


def _redirect(location: str, headers: list[tuple[str, str]] | None = None) -> Reply:
    return Reply(303, TEXT, f"see {location}\n", [("location", location), *(headers or [])])


def _static_files() -> dict[str, tuple[str, bytes]]:
    """Every file under static/, read once: name -> (content type, bytes)."""
    found = {}
    for entry in resources.files("hubcore.dashboard").joinpath("static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _STATIC_TYPES:
            found[entry.name] = (_STATIC_TYPES[suffix], entry.read_bytes())
    return found


class DashboardServer(H11Server):
    name = "dashboard"
    busy = busy_answer(TEXT, b"too many dashboard connections\n")

    def __init__(self, config: DashboardConfig, *, database: str, timezone: str,
                 tokens: TokenTable, limiter: Limiter) -> None:
        super().__init__(LIMITS)
        self.config = config
        self.database = database
        self.tz = zone(timezone)
        self.tokens = tokens
        self.limiter = limiter
        self.sessions = Sessions(config.session_ttl)
        self.secure = bool(config.tls_cert)
        self.static = _static_files()
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int, ssl: Any = None) -> list[tuple[str, int]]:
        self._server = await asyncio.start_server(self.accept, host, port, ssl=ssl)
        return [sock.getsockname()[:2] for sock in self._server.sockets]

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        await self.close_connections()
        if server is not None:
            await server.wait_closed()

    def response_headers(self, reply: Reply) -> list[tuple[str, str]]:
        # Pages are never cached; a static file says otherwise in its own headers.
        cached = any(name == "cache-control" for name, _ in reply.headers)
        return [*SECURITY_HEADERS, *(() if cached else [("cache-control", "no-store")])]

    # -- routes -----------------------------------------------------------------

    async def dispatch(self, head: h11.Request, body: bytes) -> Reply:
        method = head.method.decode("ascii", "replace")
        path = head.target.split(b"?", 1)[0].decode("ascii", "replace")
        if path.startswith("/static/"):
            found = self.static.get(path.removeprefix("/static/"))
            if found is None or method not in ("GET", "HEAD"):
                return Reply(404, TEXT, "no such file\n")
            # The file's bytes change only with a new hubcore: a day is long enough.
            return Reply(200, found[0], found[1], [("cache-control", "public, max-age=86400")])
        routes = {("GET", "/"): self._root, ("GET", "/login"): self._login_form, ("POST", "/login"): self._login,
                  ("POST", "/logout"): self._logout, ("GET", "/me"): self._me}
        handler = routes.get((method, path))
        if handler is None:
            allowed = sorted(m for m, p in routes if p == path)
            if allowed:
                return Reply(405, TEXT, f"use {' or '.join(allowed)}\n", [("allow", ", ".join(allowed))])
            return Reply(404, TEXT, "no such page\n")
        return await handler(head, body)

    def _cookie(self, name: str, value: str, max_age: int | None = None) -> tuple[str, str]:
        parts = [f"{name}={value}", "HttpOnly", "SameSite=Strict", "Path=/"]
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        if self.secure:
            parts.append("Secure")
        return ("set-cookie", "; ".join(parts))

    def _session(self, head: h11.Request) -> Any:
        session = self.sessions.get(_cookies(head).get(SESSION_COOKIE))
        if session is not None and self.tokens.lookup(session.token) is None:
            # Its token was revoked since the sign-in: so is the session.
            self.sessions.close(session.id)
            return None
        return session

    async def _root(self, head: h11.Request, body: bytes) -> Reply:
        return _redirect("/me" if self._session(head) is not None else "/login")

    async def _login_form(self, head: h11.Request, body: bytes) -> Reply:
        if self._session(head) is not None:
            return _redirect("/me")
        return self._login_page(200)

    def _login_page(self, status: int, token_error: str | None = None, operator_error: str | None = None) -> Reply:
        csrf = secrets.token_urlsafe(32)
        page = pages.login_page(csrf, token_error, operator_error)
        return Reply(status, HTML, page, [self._cookie(LOGIN_COOKIE, csrf)])

    async def _login(self, head: h11.Request, body: bytes) -> Reply:
        form = _form(body)
        expected = _cookies(head).get(LOGIN_COOKIE)
        if expected is None or not same_secret(form.get("csrf"), expected):
            return Reply(403, TEXT, "the sign-in form has expired or did not come from this page; load /login again\n")
        token = form.get("token", "").strip()
        if not token:
            if form.get("name") or form.get("password"):
                return self._login_page(401, operator_error=pages.OPERATOR_SIGN_IN_UNAVAILABLE)
            return self._login_page(401, token_error="enter your hub token")
        principal = self.tokens.lookup(token.encode())
        if principal is None:
            return self._login_page(401, token_error="that token is unknown or revoked")
        session = self.sessions.open(token.encode(), principal.user)
        log.info("dashboard: user %s signed in with token %d", principal.user, principal.token_id)
        return _redirect("/me", [self._cookie(SESSION_COOKIE, session.id), self._cookie(LOGIN_COOKIE, "", 0)])

    async def _logout(self, head: h11.Request, body: bytes) -> Reply:
        session = self._session(head)
        if session is None:
            return _redirect("/login")
        given = _form(body).get("csrf") or _header(head, b"x-csrf-token")
        if not same_secret(given, session.csrf):
            return Reply(403, TEXT, "missing or wrong CSRF token\n")
        self.sessions.close(session.id)
        return _redirect("/login", [self._cookie(SESSION_COOKIE, "", 0)])

    async def _me(self, head: h11.Request, body: bytes) -> Reply:
        session = self._session(head)
        if session is None:
            return _redirect("/login")
        principal = self.tokens.lookup(session.token)
        assert principal is not None  # _session checked it
        now = time.time()
        # In memory and on the loop, where the limiter lives: the budgets of
        # this token and this user only (a project's spend is its members').
        budgets = [
            *self.limiter.spend_report(now, ("token", str(principal.token_id))),
            *self.limiter.spend_report(now, ("user", principal.user)),
        ]

        def render() -> str:
            mine = read_mine(self.database, principal.user, self.tz, now)
            return pages.me_page(
                user=principal.user, project=principal.project, token_prefix=principal.prefix, csrf=session.csrf,
                mine=mine, tz=self.tz, now=now, budgets=budgets, token_limits=principal.limits,
            )

        return Reply(200, HTML, await asyncio.to_thread(render))


def _cookies(head: h11.Request) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, value in head.headers:
        if name == b"cookie":
            for part in value.decode("latin-1").split(";"):
                key, sep, val = part.strip().partition("=")
                if sep:
                    found.setdefault(key, val)
    return found


def _header(head: h11.Request, wanted: bytes) -> str | None:
    for name, value in head.headers:
        if name == wanted:
            return value.decode("latin-1")
    return None


def _form(body: bytes) -> dict[str, str]:
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        return {}
    return {name: values[-1] for name, values in fields.items()}
