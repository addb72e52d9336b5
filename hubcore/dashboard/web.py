"""What every dashboard view is written against: the request as a view sees
it (who asked, from where, with which session), the route table entry a
view module exports, the replies it answers with, and the database access
that keeps reads and writes off the event loop.

A view module (hubcore.dashboard.views.*) exports ROUTES, a list of Route.
The server matches method and path, checks access (see Access) and, for a
state-changing request made with the session cookie, the CSRF token, before
the handler runs: a handler never repeats those checks. A route under
/api/v1/ carries its OpenAPI operation, from which /api/v1/openapi.json is
built.
"""
from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast
from urllib.parse import parse_qs
from urllib.request import pathname2url
from zoneinfo import ZoneInfo

import h11
import orjson

from hubcore import store
from hubcore.database import is_postgres
from hubcore.accounting import report
from hubcore.http.h11server import Reply

if TYPE_CHECKING:
    from hubcore.dashboard.sessions import Session

HTML = "text/html; charset=utf-8"
TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
API_PREFIX = "/api/v1/"
READ_TIMEOUT = 5.0  # s a read waits for a lock held by a writer

T = TypeVar("T")


class Access(Enum):
    PUBLIC = "public"          # anyone, signed in or not
    SIGNED_IN = "signed_in"    # an operator or a developer
    DEVELOPER = "developer"    # a developer's session (its own data only)
    OPERATOR = "operator"      # an operator's session or admin API token


class HubControl(Protocol):
    """What the dashboard may ask of the running hub (hubcore.app.App)."""

    async def refresh_tokens_now(self) -> int: ...
    async def set_key_enabled(self, label: str, enabled: bool, *, actor: str = ..., origin: str = ...) -> Any: ...
    def stats(self) -> dict[str, Any]: ...


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: Mapping[str, str]
    head: h11.Request
    body: bytes
    peer: str                           # the client's address
    server: Any                         # the DashboardServer: .database, .tz, .tokens, .limiter, .hub
    session: Session | None = None      # a browser's, operator or developer
    operator: str | None = None         # an operator's name, by session or admin API token
    by_api_token: bool = False
    path_params: dict[str, str] = field(default_factory=dict)
    _form: dict[str, str] | None = None

    @property
    def actor(self) -> str:
        """Who a change is audited as."""
        return f"admin:{self.operator}" if self.operator else "dashboard"

    @property
    def origin(self) -> str:
        """Where a change came from, for the audit trail: the API or a page, and the address."""
        via = "api" if self.by_api_token or self.path.startswith(API_PREFIX) else "dashboard"
        return f"{via} {self.peer}" if self.peer else via

    @property
    def csrf(self) -> str:
        """The session's CSRF token, for the forms a page renders ("" without a session)."""
        return self.session.csrf if self.session is not None else ""

    @property
    def wants_json(self) -> bool:
        return self.path.startswith(API_PREFIX)

    def header(self, wanted: bytes) -> str | None:
        for name, value in self.head.headers:
            if name == wanted:
                return value.decode("latin-1")
        return None

    def form(self) -> dict[str, str]:
        """The urlencoded body's fields (the last value of a repeated one)."""
        if self._form is None:
            self._form = parse_form(self.body)
        return self._form

    def json(self) -> Any:
        """The body as JSON; ValueError with a readable reason."""
        try:
            return orjson.loads(self.body or b"null")
        except orjson.JSONDecodeError as e:
            raise ValueError(f"the body is not JSON: {e}") from None

    def fields(self) -> Mapping[str, Any]:
        """A state-changing request's fields, from a JSON object body or a
        form: the API takes either. ValueError for a body that is neither."""
        content_type = (self.header(b"content-type") or "").split(";")[0].strip().lower()
        if content_type == JSON:
            data = self.json()
            if data is None:
                return {}
            if not isinstance(data, dict):
                raise ValueError("the body must be a JSON object")
            return data
        return self.form()


Handler = Callable[[Request], Awaitable[Reply]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str                           # segments in braces are parameters: /api/v1/requests/{id}
    handler: Handler
    access: Access
    # The OpenAPI operation object of an API route (summary, parameters,
    # requestBody, responses); None for a page.
    api: dict[str, Any] | None = None

    def match(self, path: str) -> dict[str, str] | None:
        want, got = self.path.split("/"), path.split("/")
        if len(want) != len(got):
            return None
        params = {}
        for w, g in zip(want, got):
            if w.startswith("{") and w.endswith("}"):
                if not g:
                    return None
                params[w[1:-1]] = g
            elif w != g:
                return None
        return params


# -- replies -----------------------------------------------------------------------


def html(body: str, status: int = 200, headers: list[tuple[str, str]] | None = None) -> Reply:
    return Reply(status, HTML, body, headers)


def json_reply(obj: Any, status: int = 200, headers: list[tuple[str, str]] | None = None) -> Reply:
    return Reply(status, JSON, orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS), headers)


def api_error(status: int, message: str, error_type: str | None = None) -> Reply:
    """The API's error body: {"error": {"type", "message"}}, as the proxy's are."""
    kind = error_type or _ERROR_TYPES.get(status, "api_error")
    return json_reply({"error": {"type": kind, "message": message}}, status)


_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
    413: "request_too_large", 429: "rate_limit_error",
}


def redirect(location: str, headers: list[tuple[str, str]] | None = None) -> Reply:
    return Reply(303, TEXT, f"see {location}\n", [("location", location), *(headers or [])])


def parse_form(body: bytes) -> dict[str, str]:
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=100)
    except (UnicodeDecodeError, ValueError):
        return {}
    return {name: values[-1] for name, values in fields.items()}


def parse_query(target: bytes) -> dict[str, str]:
    _, _, query = target.partition(b"?")
    return parse_form(query) if query else {}


# -- the database, off the loop -------------------------------------------------------


def connect_read_only(database: str) -> sqlite3.Connection:
    """A connection that cannot write, migrate or create the file."""
    if is_postgres(database):
        from hubcore import pgstore

        return cast(sqlite3.Connection, pgstore.connect(database, read_only=True))
    uri = f"file:{pathname2url(str(Path(database).resolve()))}?mode=ro"
    return sqlite3.connect(uri, uri=True, timeout=READ_TIMEOUT, check_same_thread=False)


def _read(database: str, fn: Callable[[sqlite3.Connection], T]) -> T:
    conn = connect_read_only(database)
    try:
        return fn(conn)
    finally:
        conn.close()


def _write(database: str, fn: Callable[[sqlite3.Connection], T]) -> T:
    conn = store.connect(database, check_same_thread=False)
    try:
        with store.immediate(conn):
            return fn(conn)
    finally:
        conn.close()


async def read(database: str, fn: Callable[[sqlite3.Connection], T]) -> T:
    """fn(a read-only connection), in a worker thread: a page's query never
    holds the event loop the proxy shares."""
    return await asyncio.to_thread(_read, database, fn)


async def write(database: str, fn: Callable[[sqlite3.Connection], T]) -> T:
    """fn(a connection) inside one write transaction, in a worker thread: a
    change and its audit row commit or roll back together."""
    return await asyncio.to_thread(_write, database, fn)


def zone_of(request: Request) -> ZoneInfo:
    tz: ZoneInfo = request.server.tz
    return tz


def collect_routes(modules: Iterable[Any]) -> list[Route]:
    """Every module's ROUTES, refusing two routes for one method and path."""
    routes: list[Route] = []
    seen: set[tuple[str, str]] = set()
    for module in modules:
        for route in module.ROUTES:
            key = (route.method, route.path)
            if key in seen:
                raise ValueError(f"two dashboard routes for {route.method} {route.path}")
            seen.add(key)
            routes.append(route)
    return routes


# -- query parameters ------------------------------------------------------------------


class BadParameter(ValueError):
    """A query or form field that cannot be read: the message names it."""


def when(request: Request, name: str, now: float) -> float | None:
    """Query field `name` as unix seconds: a span back from now (24h, 7d),
    or an ISO 8601 date or time, which without an offset is in the
    reporting time zone (a date is its local midnight). None when absent."""
    text = request.query.get(name, "").strip()
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        try:
            return report.parse_time(text, now)
        except ValueError as e:
            raise BadParameter(f"{name}: {e}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone_of(request))
    return moment.timestamp()


def integer(request: Request, name: str, default: int | None = None, *, low: int = 0, high: int | None = None) -> int | None:
    """Query field `name` as an int within [low, high]; `default` when absent."""
    text = request.query.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadParameter(f"{name}: expected a whole number, got {text!r}") from None
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f"at least {low}"
        raise BadParameter(f"{name}: must be {bound}, not {value}")
    return value


def bad_parameter(request: Request, error: BadParameter) -> Reply:
    """A 400 in the shape the request expects."""
    if request.wants_json:
        return api_error(400, str(error))
    from hubcore.dashboard import pages
    return html(pages.message_page("Bad request", str(error)), 400)
