"""The dashboard's listener: HTTP/1.1 with h11 on asyncio streams, one
response per request, bounded heads and bodies, timeouts, and the security
headers on every answer.

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
from http import HTTPStatus
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

log = logging.getLogger("hubcore.dashboard")

MAX_REQUEST_HEAD = 8 * 1024      # bytes
MAX_REQUEST_BODY = 16 * 1024     # bytes: a sign-in form
READ_CHUNK = 16 * 1024
IDLE_TIMEOUT = 30.0              # s a kept-alive connection may wait for its next request
REQUEST_TIMEOUT = 10.0           # s from a request's first byte to its last
WRITE_TIMEOUT = 10.0             # s for a client to take a response
MAX_CONNECTIONS = 64
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
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


class Reply:
    __slots__ = ("status", "content_type", "body", "headers", "cache")

    def __init__(self, status: int, content_type: str, body: bytes | str,
                 headers: list[tuple[str, str]] | None = None, cache: str = "no-store") -> None:
        self.status = status
        self.content_type = content_type
        self.body = body.encode() if isinstance(body, str) else body
        self.headers = headers or []
        self.cache = cache


def _redirect(location: str, headers: list[tuple[str, str]] | None = None) -> Reply:
    return Reply(303, TEXT, f"see {location}\n", [("location", location), *(headers or [])])


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _static_files() -> dict[str, tuple[str, bytes]]:
    """Every file under static/, read once: name -> (content type, bytes)."""
    found = {}
    for entry in resources.files("hubcore.dashboard").joinpath("static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _STATIC_TYPES:
            found[entry.name] = (_STATIC_TYPES[suffix], entry.read_bytes())
    return found


class DashboardServer:
    def __init__(self, config: DashboardConfig, *, database: str, timezone: str,
                 tokens: TokenTable, limiter: Limiter) -> None:
        self.config = config
        self.database = database
        self.tz = zone(timezone)
        self.tokens = tokens
        self.limiter = limiter
        self.sessions = Sessions(config.session_ttl)
        self.secure = bool(config.tls_cert)
        self.static = _static_files()
        self._server: asyncio.AbstractServer | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def start(self, host: str, port: int, ssl: Any = None) -> list[tuple[str, int]]:
        self._server = await asyncio.start_server(self._accept, host, port, ssl=ssl)
        return [sock.getsockname()[:2] for sock in self._server.sockets]

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in self._connections.values():
            writer.close()
        if self._connections:
            _, pending = await asyncio.wait(list(self._connections), timeout=1.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if server is not None:
            await server.wait_closed()

    # -- connections ------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= MAX_CONNECTIONS:
            writer.close()
            return
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer), name="hubcore-dashboard")
        self._connections[task] = writer
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._connections.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("dashboard connection failed", exc_info=task.exception())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        try:
            while True:
                try:
                    request = await self._read(conn, reader)
                except h11.RemoteProtocolError as e:
                    await self._send(conn, writer, Reply(e.error_status_hint, TEXT, f"{e}\n"))
                    return
                except _BadRequest as e:
                    await self._send(conn, writer, Reply(e.status, TEXT, f"{e}\n"))
                    return
                if request is None:
                    return
                head, body = request
                try:
                    reply = await self.dispatch(head, body)
                except Exception:
                    log.exception("dashboard %s %s failed", head.method.decode(), head.target.decode("ascii", "replace"))
                    reply = Reply(500, TEXT, "internal error\n")
                await self._send(conn, writer, reply)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, TimeoutError, h11.LocalProtocolError) as e:
            log.debug("dashboard connection dropped: %r", e)
        finally:
            writer.close()

    async def _read(self, conn: h11.Connection, reader: asyncio.StreamReader) -> tuple[h11.Request, bytes] | None:
        loop = asyncio.get_running_loop()
        head: h11.Request | None = None
        body = bytearray()
        started = bool(conn.trailing_data[0])
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT if started else IDLE_TIMEOUT) as deadline:
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await reader.read(READ_CHUNK)
                        if data and not started:
                            started = True  # the whole request must now come within REQUEST_TIMEOUT
                            deadline.reschedule(loop.time() + REQUEST_TIMEOUT)
                        conn.receive_data(data)
                    elif isinstance(event, h11.Request):
                        size = len(event.method) + len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
                        if size > MAX_REQUEST_HEAD:
                            raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
                        head, started = event, True
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > MAX_REQUEST_BODY:
                            raise _BadRequest(413, "request body too large")
                    elif isinstance(event, h11.EndOfMessage):
                        assert head is not None
                        return head, bytes(body)
                    elif isinstance(event, h11.ConnectionClosed):
                        return None
                    else:
                        raise h11.RemoteProtocolError(f"unexpected {event!r}", error_status_hint=400)
        except TimeoutError:
            if started:
                raise _BadRequest(408, "request not received in time") from None
            return None

    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, reply: Reply) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        headers = [
            ("content-type", reply.content_type),
            ("content-length", str(len(reply.body))),
            ("cache-control", reply.cache),
            *SECURITY_HEADERS,
            *reply.headers,
        ]
        if conn.their_state is not h11.DONE:
            headers.append(("connection", "close"))
        writer.write(conn.send(h11.Response(status_code=reply.status, headers=headers,
                                            reason=_REASONS.get(reply.status, b""))))
        writer.write(conn.send(h11.Data(data=reply.body)))
        writer.write(conn.send(h11.EndOfMessage()))
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()

    # -- routes -----------------------------------------------------------------

    async def dispatch(self, head: h11.Request, body: bytes) -> Reply:
        method = head.method.decode("ascii", "replace")
        path = head.target.split(b"?", 1)[0].decode("ascii", "replace")
        if path.startswith("/static/"):
            found = self.static.get(path.removeprefix("/static/"))
            if found is None or method not in ("GET", "HEAD"):
                return Reply(404, TEXT, "no such file\n")
            # The file's bytes change only with a new hubcore: a day is long enough.
            return Reply(200, found[0], found[1], cache="public, max-age=86400")
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
