"""The dashboard's listener (its connections are hubcore.http.h11server's,
as the ops socket's are): sign-in and sign-out, the route table of the view
modules, access and CSRF checks, the security headers on every answer, and
the admin API's OpenAPI description.

Who a request is: an operator (a session opened with name and password, or
an admin API token as `Authorization: Bearer` on /api/v1/), a developer (a
session opened with a hub token: its own figures only), or nobody. Only
the session lookup runs on the event loop; every database read, the scrypt
of a sign-in and the rendering of a page run in worker threads, so the
proxy sharing the loop is never held up by the dashboard.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from importlib import resources
from typing import Any

import h11

from hubcore.config import DashboardConfig, zone
from hubcore.dashboard import pages, web
from hubcore.dashboard.sessions import Session, Sessions, same_secret
from hubcore.dashboard.views import VIEWS
from hubcore.dashboard.web import Access, Request, Route
from hubcore.governance import admins, audit
from hubcore.governance.limiter import Limiter
from hubcore.governance.throttle import SignInThrottle
from hubcore.governance.tokens import TokenTable
from hubcore.http.h11server import H11Server, Limits, Reply, busy_answer

log = logging.getLogger("hubcore.dashboard")

LIMITS = Limits(
    max_head=8 * 1024, max_body=64 * 1024,   # bytes: forms and the API's JSON bodies
    idle_timeout=30.0, request_timeout=10.0, write_timeout=10.0, max_connections=64,
)
SESSION_COOKIE = "hubcore_session"
# The sign-in form's CSRF token rides in this cookie as well as in the form
# (double submit): there is no session yet to hold it.
LOGIN_COOKIE = "hubcore_login"
CSRF_HEADER = b"x-csrf-token"
SAFE_METHODS = ("GET", "HEAD")

SECURITY_HEADERS = [
    ("content-security-policy", "default-src 'self'"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "same-origin"),
    ("x-content-type-options", "nosniff"),
]
_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


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
    busy = busy_answer(web.TEXT, b"too many dashboard connections\n")

    def __init__(self, config: DashboardConfig, *, database: str, timezone: str,
                 tokens: TokenTable, limiter: Limiter, hub: web.HubControl | None = None) -> None:
        super().__init__(LIMITS)
        self.config = config
        self.database = database
        self.tz = zone(timezone)
        self.tokens = tokens
        self.limiter = limiter
        self.hub = hub
        self.sessions = Sessions(config.session_ttl)
        self.throttle = SignInThrottle()
        self.secure = bool(config.tls_cert)
        self.static = _static_files()
        own = [
            Route("GET", "/login", self._login_form, Access.PUBLIC),
            Route("POST", "/login", self._login, Access.PUBLIC),
            Route("POST", "/logout", self._logout, Access.SIGNED_IN),
            Route("GET", "/api/v1/openapi.json", self._openapi, Access.PUBLIC),
        ]
        self.routes = web.collect_routes([_Own(own), *VIEWS])
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

    def error_reply(self, status: int, message: str) -> Reply:
        return Reply(status, web.TEXT, message + "\n")

    # -- dispatch ---------------------------------------------------------------

    async def dispatch(self, head: h11.Request, body: bytes, peer: str) -> Reply:
        method = head.method.decode("ascii", "replace")
        path = head.target.split(b"?", 1)[0].decode("ascii", "replace")
        if path.startswith("/static/"):
            found = self.static.get(path.removeprefix("/static/"))
            if found is None or method not in SAFE_METHODS:
                return Reply(404, web.TEXT, "no such file\n")
            # The file's bytes change only with a new hubcore: a day is long enough.
            return Reply(200, found[0], found[1], [("cache-control", "public, max-age=86400")])
        request = Request(method, path, web.parse_query(head.target), head, body, peer, self)
        route, params, allowed = self._match(method if method != "HEAD" else "GET", path)
        request.path_params = params
        if route is None:
            if allowed:
                message = f"use {' or '.join(allowed)}"
                if request.wants_json:
                    reply = web.api_error(405, message)
                    reply.headers.append(("allow", ", ".join(allowed)))
                    return reply
                return Reply(405, web.TEXT, message + "\n", [("allow", ", ".join(allowed))])
            return web.api_error(404, "no such API route") if request.wants_json else \
                web.html(pages.message_page("Not found", "There is no such page."), 404)
        refused = await self._authenticate(request)
        if refused is not None:
            return refused
        refused = self._check_access(route, request)
        if refused is not None:
            return refused
        return await route.handler(request)

    def _match(self, method: str, path: str) -> tuple[Route | None, dict[str, str], list[str]]:
        """(the route, its path parameters, []), or (None, {}, the methods
        the path takes)."""
        allowed = []
        for route in self.routes:
            params = route.match(path)
            if params is None:
                continue
            if route.method == method:
                return route, params, []
            allowed.append(route.method)
        return None, {}, sorted(allowed)

    async def _authenticate(self, request: Request) -> Reply | None:
        """Who is asking: sets request.session / .operator; a reply only for
        an admin API token that is not one."""
        authorization = request.header(b"authorization")
        if authorization is not None and request.wants_json:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return web.api_error(401, "send an admin API token as Authorization: Bearer hca-...")
            name = await web.read(self.database, lambda conn: admins.verify_api_token(conn, token.strip()))
            if name is None:
                return web.api_error(401, "that admin API token is unknown or revoked")
            request.operator, request.by_api_token = name, True
            return None
        session = await self._session(request)
        if session is not None:
            request.session = session
            request.operator = session.operator
        return None

    async def _session(self, request: Request) -> Session | None:
        session = self.sessions.get(_cookies(request.head).get(SESSION_COOKIE))
        if session is None:
            return None
        if session.operator is None:
            if self.tokens.lookup(session.token) is None:
                # Its token was revoked since the sign-in: so is the session.
                self.sessions.close(session.id)
                return None
            return session
        name = session.operator
        version = await web.read(self.database, lambda conn: admins.account_version(conn, name))
        if version is None or version != session.account_version:
            # Removed, or its password changed (by the CLI, in another process): signed out.
            self.sessions.close_operator(name)
            return None
        return session

    def _check_access(self, route: Route, request: Request) -> Reply | None:
        operator = request.operator is not None
        developer = request.session is not None and not operator
        json = request.wants_json
        if route.access is Access.PUBLIC:
            return None
        if not operator and not developer:
            if json:
                return web.api_error(401, "sign in, or send an admin API token as Authorization: Bearer")
            if request.method in SAFE_METHODS:
                return web.redirect("/login")
            return web.html(pages.message_page("Signed out", "Your session has ended; sign in again."), 401)
        if route.access is Access.OPERATOR and not operator:
            if json:
                return web.api_error(403, "this is for operators; a developer's session sees only its own usage")
            if request.path == "/":
                return web.redirect("/me")
            return web.html(pages.message_page("Operators only", "This page is for the hub's operators."), 403)
        if route.access is Access.DEVELOPER and not developer:
            if json:
                return web.api_error(403, "this is a developer's own view; an operator has no hub token here")
            return web.redirect("/")
        if request.method not in SAFE_METHODS and not request.by_api_token:
            assert request.session is not None
            given = request.header(CSRF_HEADER)
            if given is None and _is_form(request):
                given = request.form().get("csrf")
            if not same_secret(given, request.session.csrf):
                message = "missing or wrong CSRF token: reload the page and try again"
                return web.api_error(403, message) if json else web.html(
                    pages.message_page("Refused", message), 403)
        return None

    # -- sign-in and sign-out -----------------------------------------------------

    def _cookie(self, name: str, value: str, max_age: int | None = None) -> tuple[str, str]:
        parts = [f"{name}={value}", "HttpOnly", "SameSite=Strict", "Path=/"]
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        if self.secure:
            parts.append("Secure")
        return ("set-cookie", "; ".join(parts))

    async def _login_form(self, request: Request) -> Reply:
        session = await self._session(request)
        if session is not None:
            return web.redirect("/" if session.operator else "/me")
        return self._login_page(200)

    def _login_page(self, status: int, token_error: str | None = None, operator_error: str | None = None,
                    name: str = "") -> Reply:
        csrf = secrets.token_urlsafe(32)
        page = pages.login_page(csrf, token_error, operator_error, name)
        return Reply(status, web.HTML, page, [self._cookie(LOGIN_COOKIE, csrf)])

    async def _login(self, request: Request) -> Reply:
        form = request.form()
        expected = _cookies(request.head).get(LOGIN_COOKIE)
        if expected is None or not same_secret(form.get("csrf"), expected):
            return Reply(403, web.TEXT, "the sign-in form has expired or did not come from this page; load /login again\n")
        token = form.get("token", "").strip()
        name = form.get("name", "").strip()
        if token:
            return await self._developer_sign_in(request, token)
        if name or form.get("password"):
            return await self._operator_sign_in(request, name, form.get("password", ""))
        return self._login_page(401, token_error="enter your hub token")

    async def _developer_sign_in(self, request: Request, token: str) -> Reply:
        # Hub tokens are too long to guess; the throttle still bounds what
        # one address may try, under a name of its own.
        key = f"token@{request.peer}"
        wait = self.throttle.allowed(request.peer, key)
        if wait is not None:
            return self._login_page(429, token_error=_locked_message(wait))
        principal = self.tokens.lookup(token.encode())
        if principal is None:
            self.throttle.failed(request.peer, key)
            return self._login_page(401, token_error="that token is unknown or revoked")
        session = self.sessions.open(token.encode(), principal.user)
        log.info("dashboard: user %s signed in with token %d from %s", principal.user, principal.token_id, request.peer)
        return web.redirect("/me", [self._cookie(SESSION_COOKIE, session.id), self._cookie(LOGIN_COOKIE, "", 0)])

    async def _operator_sign_in(self, request: Request, name: str, password: str) -> Reply:
        peer = request.peer
        wait = self.throttle.allowed(peer, name)
        if wait is not None:
            log.warning("dashboard: sign-in as %r from %s refused: locked for %.0f s", name, peer, wait)
            return self._login_page(429, operator_error=_locked_message(wait), name=name)
        now = time.time()

        def check(conn: Any) -> float | None:
            if not admins.verify_password(conn, name, password):
                return None
            return admins.account_version(conn, name)

        # scrypt takes tens of milliseconds: in a worker thread, never on the loop.
        version = await web.read(self.database, check)
        if version is None:
            locked = self.throttle.failed(peer, name)
            log.warning("dashboard: failed sign-in as %r from %s", name, peer)
            if locked:
                await self._audit_lockout(name, peer, now)
            return self._login_page(401, operator_error="wrong name or password", name=name)
        self.throttle.succeeded(peer, name)

        def signed_in(conn: Any) -> None:
            admins.record_sign_in(conn, name, now)
            audit.record(conn, f"admin:{name}", "admin.sign_in", f"admin {name}", None, None,
                         request.origin, now=now)

        await web.write(self.database, signed_in)
        session = self.sessions.open(operator=name, account_version=version)
        log.info("dashboard: operator %s signed in from %s", name, peer)
        return web.redirect("/", [self._cookie(SESSION_COOKIE, session.id), self._cookie(LOGIN_COOKIE, "", 0)])

    async def _audit_lockout(self, name: str, peer: str, now: float) -> None:
        until = now + self.throttle.lockout
        log.warning("dashboard: sign-ins as %r or from %s locked for %.0f s after repeated failures",
                    name, peer, self.throttle.lockout)
        try:
            await web.write(self.database, lambda conn: audit.record(
                conn, "dashboard", "admin.locked_out", f"admin {name}", None,
                {"address": peer, "failures": self.throttle.max_failures, "until": until}, f"dashboard {peer}",
                now=now))
        except Exception:  # noqa: BLE001 - the lock holds whether or not its row lands
            log.exception("dashboard: could not audit the sign-in lockout")

    async def _logout(self, request: Request) -> Reply:
        assert request.session is not None
        self.sessions.close(request.session.id)
        return web.redirect("/login", [self._cookie(SESSION_COOKIE, "", 0)])

    async def _openapi(self, request: Request) -> Reply:
        return web.json_reply(openapi(self.routes))


class _Own:
    """The server's own routes, as a view module's ROUTES."""

    def __init__(self, routes: list[Route]) -> None:
        self.ROUTES = routes


def openapi(routes: list[Route]) -> dict[str, Any]:
    """The OpenAPI 3.1 description of the API routes, from their operations."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if route.api is None:
            continue
        operation = {"security": [{"bearer": []}, {"session": []}], **route.api}
        if route.access is Access.PUBLIC:
            operation["security"] = []
        operation.setdefault("responses", {"200": {"description": "OK"}})
        operation["responses"].setdefault("401", {"$ref": "#/components/responses/Error"})
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "hubcore admin API", "version": "1"},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "an admin API token from `hubcore admin token NAME`"},
                "session": {"type": "apiKey", "in": "cookie", "name": SESSION_COOKIE,
                            "description": "the dashboard's session; a change also needs X-CSRF-Token"},
            },
            "responses": {"Error": {"description": "refused", "content": {web.JSON: {"schema": {
                "type": "object", "properties": {"error": {"type": "object", "properties": {
                    "type": {"type": "string"}, "message": {"type": "string"}}}}}}}}},
        },
    }


def _locked_message(wait: float) -> str:
    minutes = max(1, round(wait / 60))
    return f"too many failed sign-ins; try again in {minutes} minute{'s' if minutes != 1 else ''}"


def _is_form(request: Request) -> bool:
    content_type = (request.header(b"content-type") or "").split(";")[0].strip().lower()
    return content_type == "application/x-www-form-urlencoded"


def _cookies(head: h11.Request) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, value in head.headers:
        if name == b"cookie":
            for part in value.decode("latin-1").split(";"):
                key, sep, val = part.strip().partition("=")
                if sep:
                    found.setdefault(key, val)
    return found
