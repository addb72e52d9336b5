"""/tokens: hub tokens, users and projects with their limits and budget
bars; create a token (shown once), revoke one, set and clear limits, reset a
budget window's spend. And /api/v1/tokens, /api/v1/users, /api/v1/projects,
the same for scripts.

Every change is hubcore.governance.changes' (the CLI's own, with its audit
row in the change's transaction), then the running hub reloads tokens and
limits at once, as after a CLI change: a token created here is accepted by
the proxy when the answer arrives, a revoked one refused. Spend and budgets
come from the hub's in-memory Limiter, read on the event loop; the database
reads and the rendering run in a worker thread.

A page's form posts to a page route and is answered with a redirect (303)
back to the page, saying what happened in ?done=; the one exception is the
new token, shown in the answer to its form and never again (never in a URL).
"""
from __future__ import annotations

import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import wraps
from typing import Any, TypeVar

from hubcore.dashboard import pages, web
from hubcore.dashboard.views import tokens_html as html_of
from hubcore.dashboard.views.tokens_input import (
    LIMIT_FIELDS, check_fields, checked_name, limit_edits, name_field, note, path_name, token_id, window_field,
)
from hubcore.dashboard.web import Access, BadParameter, Request, Route
from hubcore.governance import changes, storage, tokens
from hubcore.governance.limit_edits import LimitEdits
from hubcore.governance.limiter import BudgetLine
from hubcore.governance.limits import Limits
from hubcore.governance.tokens import Principal, TokenInfo, groups_list, limits_dict
from hubcore.http.h11server import Reply

T = TypeVar("T")
SCOPE_KINDS = ("user", "project")


class Refusal(Exception):
    """A request refused: its status and the words, shaped by _answers as
    the request expects (a JSON error or a page)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


_TITLES = {400: "Not saved", 404: "Not found", 409: "Not changed"}


def _answers(handler: Callable[[Request], Awaitable[Reply]]) -> Callable[[Request], Awaitable[Reply]]:
    """The handler, with its refusals and bad fields answered in the shape
    of the request: a vendor-like JSON error for the API, a page otherwise."""

    @wraps(handler)
    async def run(request: Request) -> Reply:
        try:
            return await handler(request)
        except BadParameter as e:
            refusal = Refusal(400, str(e))
        except Refusal as e:
            refusal = e
        if request.wants_json:
            return web.api_error(refusal.status, str(refusal))
        # Back to the page the form was on: /tokens/3 for /tokens/3/limits.
        back = request.path.rsplit("/", 1)[0] if request.method == "POST" else ""
        back = "/tokens" if back in ("", "/tokens/users", "/tokens/projects") else back
        title = _TITLES.get(refusal.status, "Refused")
        return web.html(_page(request, title, html_of.refused_page(title, str(refusal), back), time.time()),
                        refusal.status)

    return run


def _page(request: Request, title: str, body: str, now: float) -> str:
    assert request.operator is not None  # Access.OPERATOR
    return pages.operator_page(title=title, active="/tokens", operator=request.operator, csrf=request.csrf,
                               tz=request.server.tz, now=now, body=body)


def _fields(request: Request, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    try:
        fields = request.fields()
    except ValueError as e:
        raise Refusal(400, str(e)) from None
    check_fields(fields, allowed)
    return fields


async def _change(request: Request, change: Callable[[sqlite3.Connection], T]) -> T:
    """`change` in a write transaction, then the hub reloads tokens and
    limits at once (as after the CLI's change, over the ops socket)."""
    try:
        result = await web.write(request.server.database, change)
    except changes.NotFound as e:
        raise Refusal(404, str(e)) from None
    except changes.Revoked as e:
        raise Refusal(409, str(e)) from None
    except ValueError as e:   # governance's validation: a value it refuses
        raise Refusal(400, str(e)) from None
    hub = request.server.hub
    if hub is not None:
        await hub.refresh_tokens_now()
    return result


def _who(request: Request) -> dict[str, str]:
    return {"actor": request.actor, "origin": request.origin}


def _budgets(request: Request, now: float, scope: tuple[str, str] | None = None) -> dict[tuple[str, str], list[BudgetLine]]:
    """The hub's spend against every budget (or one scope's), by scope: from
    the Limiter, on the loop where it lives."""
    found: dict[tuple[str, str], list[BudgetLine]] = {}
    for line in request.server.limiter.spend_report(now, scope):
        found.setdefault((line.kind, line.name), []).append(line)
    return found


def _notice(request: Request) -> str:
    return html_of.flash(request.query.get("done"), request.query.get("window"))


# -- JSON shapes -------------------------------------------------------------------------


def _limit_extras(limits: Limits | None) -> dict[str, Any]:
    readable = limits is not None and limits.error is None
    return {
        "expires_at": limits.expires_at if readable and limits is not None else None,
        "models": list(limits.models) if readable and limits is not None and limits.models else None,
    }


def token_json(
    info: TokenInfo, budgets: Sequence[BudgetLine], now: float, principal: Principal | None = None,
) -> dict[str, Any]:
    """`hubcore token list --json`'s object, with its status, expiry, models and budget bars."""
    out = {**info.to_dict(), "status": info.status(now), **_limit_extras(info.limits),
           "budgets": [line.to_dict() for line in budgets]}
    if principal is not None:
        out["effective_groups"] = None if principal.groups is None else sorted(principal.groups)
    return out


def scope_json(scope: storage.ScopeInfo, budgets: Sequence[BudgetLine]) -> dict[str, Any]:
    return {
        "kind": scope.kind, "name": scope.name, "note": scope.note, "limits": limits_dict(scope.limits),
        "groups": groups_list(scope.limits), **_limit_extras(scope.limits),
        "tokens": list(scope.active_tokens), "revoked_tokens": scope.revoked_tokens,
        "budgets": [line.to_dict() for line in budgets],
    }


def _include_revoked(request: Request) -> bool:
    text = request.query.get("all", "").strip().lower()
    if text in ("", "0", "false", "no"):
        return False
    if text in ("1", "true", "yes"):
        return True
    raise BadParameter(f"all: expected true or false, got {text!r}")


# -- reading ----------------------------------------------------------------------------


def _read_token(conn: sqlite3.Connection, wanted: int) -> tuple[TokenInfo, Principal | None]:
    info = tokens.get(conn, wanted)
    if info is None:
        raise Refusal(404, f"token {wanted} does not exist")
    return info, tokens.principal(conn, wanted)


def _read_scope(conn: sqlite3.Connection, kind: str, name: str) -> storage.ScopeInfo:
    scope = storage.get_scope(conn, kind, name)
    if scope is None:
        raise Refusal(404, f"no {kind} {name} (no limits and no tokens)")
    return scope


def _kind(request: Request) -> str:
    """user or project, from the route's path: /tokens/users/..., /api/v1/projects/..."""
    plural = request.path.split("/")[3 if request.wants_json else 2]
    return "user" if plural == "users" else "project"


# -- changes shared by pages and API ------------------------------------------------------------


async def _create(request: Request) -> tuple[int, str, str, str | None]:
    fields = _fields(request, ("user", "project", "note", *LIMIT_FIELDS))
    user = name_field(fields, "user", required=True)
    assert user is not None
    project = name_field(fields, "project", required=False)
    memo = note(fields) or None
    edits = limit_edits(fields, request.server.tz)
    limits = _applied(edits, None)
    token_id_, token = await _change(request, lambda conn: changes.create_token(
        conn, user, project, memo, limits, **_who(request)))
    return token_id_, token, user, project


def _applied(edits: LimitEdits, current: Limits | None) -> Limits | None:
    try:
        result: Limits | None = edits.apply(current)
    except ValueError as e:
        raise Refusal(400, str(e)) from None
    return result


def _edits(request: Request, *, partial: bool) -> tuple[LimitEdits, str | None]:
    """The limit edits and note of a change; with `partial` (the API), one
    that changes nothing is refused."""
    fields = _fields(request, ("note", *LIMIT_FIELDS))
    edits, memo = limit_edits(fields, request.server.tz), note(fields)
    if partial and edits.empty and memo is None:
        raise Refusal(400, f"nothing to update: give note or one of {', '.join(LIMIT_FIELDS)}")
    return edits, memo


async def _edit_token(request: Request, wanted: int, *, partial: bool) -> changes.Edited:
    edits, memo = _edits(request, partial=partial)
    return await _change(request, lambda conn: changes.edit_token(conn, wanted, edits, memo, **_who(request)))


async def _edit_scope(request: Request, kind: str, name: str, *, partial: bool) -> changes.Edited:
    edits, memo = _edits(request, partial=partial)
    return await _change(request, lambda conn: changes.edit_scope(conn, kind, name, edits, memo, **_who(request)))


async def _revoke(request: Request, wanted: int) -> None:
    _fields(request, ())
    await _change(request, lambda conn: changes.revoke_token(conn, wanted, **_who(request)))


async def _reset(request: Request, kind: str, name: str | int) -> dict[str, Any]:
    window = window_field(_fields(request, ("window",)))
    at = time.time()
    # What the hub counts there now, for the audit row: what the reset forgives.
    forgiven = request.server.limiter.spent(kind, name, window, at)
    await _change(request, lambda conn: changes.reset_spend(
        conn, kind, name, window, at, spent_micros=forgiven, **_who(request)))
    return {"kind": kind, "name": str(name), "window": window, "counts_from": at, "forgiven_micros": forgiven}


# -- pages --------------------------------------------------------------------------------


@_answers
async def tokens_page(request: Request) -> Reply:
    now = time.time()
    budgets = _budgets(request, now)
    show_revoked = request.query.get("revoked") == "show"

    def render(conn: sqlite3.Connection) -> str:
        body = html_of.tokens_page(
            infos=tokens.list_tokens(conn, include_revoked=show_revoked),
            users=storage.list_scopes(conn, "user"), projects=storage.list_scopes(conn, "project"),
            budgets=budgets, tz=request.server.tz, now=now, csrf=request.csrf, show_revoked=show_revoked,
            notice=_notice(request),
        )
        return _page(request, "Tokens", body, now)

    return web.html(await web.read(request.server.database, render))


@_answers
async def create_page(request: Request) -> Reply:
    token_id_, token, user, project = await _create(request)
    body = html_of.created_page(token_id=token_id_, token=token, user=user, project=project)
    return web.html(_page(request, "Token created", body, time.time()))


@_answers
async def token_page(request: Request) -> Reply:
    wanted = token_id(request.path_params["id"])
    now = time.time()
    budgets = _budgets(request, now, ("token", str(wanted))).get(("token", str(wanted)), [])

    def render(conn: sqlite3.Connection) -> str:
        info, principal = _read_token(conn, wanted)
        body = html_of.token_page(info=info, principal=principal, budgets=budgets, tz=request.server.tz, now=now,
                                  csrf=request.csrf, notice=_notice(request))
        return _page(request, f"Token {wanted}", body, now)

    return web.html(await web.read(request.server.database, render))


@_answers
async def revoke_page(request: Request) -> Reply:
    wanted = token_id(request.path_params["id"])
    await _revoke(request, wanted)
    return web.redirect(f"/tokens/{wanted}?done=revoked")


@_answers
async def token_limits_page(request: Request) -> Reply:
    wanted = token_id(request.path_params["id"])
    await _edit_token(request, wanted, partial=False)
    return web.redirect(f"/tokens/{wanted}?done=limits")


@_answers
async def token_reset_page(request: Request) -> Reply:
    wanted = token_id(request.path_params["id"])
    done = await _reset(request, "token", wanted)
    return web.redirect(f"/tokens/{wanted}?done=reset&window={done['window']}")


@_answers
async def scope_page(request: Request) -> Reply:
    kind, name = _kind(request), path_name(request.path_params["name"])
    now = time.time()
    budgets = _budgets(request, now, (kind, name)).get((kind, name), [])

    def render(conn: sqlite3.Connection) -> str:
        scope = _read_scope(conn, kind, name)
        body = html_of.scope_page(scope=scope, budgets=budgets, tz=request.server.tz, now=now, csrf=request.csrf,
                                  notice=_notice(request))
        return _page(request, f"{kind.capitalize()} {name}", body, now)

    return web.html(await web.read(request.server.database, render))


@_answers
async def new_scope_page(request: Request) -> Reply:
    """The lists' "set the limits of a user (project)" form: by name, new or not."""
    kind = _kind(request)
    fields = _fields(request, ("name", "note", *LIMIT_FIELDS))
    name = name_field(fields, "name", required=True)
    assert name is not None
    edits, memo = limit_edits(fields, request.server.tz), note(fields)
    await _change(request, lambda conn: changes.edit_scope(conn, kind, name, edits, memo, **_who(request)))
    return web.redirect(f"{html_of.scope_url(kind, name)}?done=limits")


@_answers
async def scope_limits_page(request: Request) -> Reply:
    kind, name = _kind(request), path_name(request.path_params["name"])
    await _edit_scope(request, kind, checked_name("name", name), partial=False)
    return web.redirect(f"{html_of.scope_url(kind, name)}?done=limits")


@_answers
async def scope_reset_page(request: Request) -> Reply:
    kind, name = _kind(request), path_name(request.path_params["name"])
    done = await _reset(request, kind, name)
    return web.redirect(f"{html_of.scope_url(kind, name)}?done=reset&window={done['window']}")


# -- API ------------------------------------------------------------------------------------


@_answers
async def tokens_api(request: Request) -> Reply:
    include_revoked = _include_revoked(request)
    now = time.time()
    budgets = _budgets(request, now)
    infos = await web.read(request.server.database, lambda conn: tokens.list_tokens(conn, include_revoked))
    return web.json_reply({"tokens": [token_json(i, budgets.get(("token", str(i.id)), ()), now) for i in infos]})


async def _token_answer(request: Request, wanted: int, status: int = 200, **extra: Any) -> Reply:
    now = time.time()
    budgets = _budgets(request, now, ("token", str(wanted))).get(("token", str(wanted)), [])
    info, principal = await web.read(request.server.database, lambda conn: _read_token(conn, wanted))
    return web.json_reply({**token_json(info, budgets, now, principal), **extra}, status)


@_answers
async def create_api(request: Request) -> Reply:
    token_id_, token, _, _ = await _create(request)
    # 201 with the token, this once: the hub keeps only its hash.
    return await _token_answer(request, token_id_, 201, token=token)


@_answers
async def token_api(request: Request) -> Reply:
    return await _token_answer(request, token_id(request.path_params["id"]))


@_answers
async def token_patch_api(request: Request) -> Reply:
    wanted = token_id(request.path_params["id"])
    await _edit_token(request, wanted, partial=True)
    return await _token_answer(request, wanted)


@_answers
async def token_delete_api(request: Request) -> Reply:
    wanted = token_id(request.path_params["id"])
    await _revoke(request, wanted)
    return await _token_answer(request, wanted)


@_answers
async def token_reset_api(request: Request) -> Reply:
    return web.json_reply(await _reset(request, "token", token_id(request.path_params["id"])))


@_answers
async def scopes_api(request: Request) -> Reply:
    kind = _kind(request)
    now = time.time()
    budgets = _budgets(request, now)
    scopes = await web.read(request.server.database, lambda conn: storage.list_scopes(conn, kind))
    return web.json_reply({f"{kind}s": [scope_json(s, budgets.get((kind, s.name), ())) for s in scopes]})


async def _scope_answer(request: Request, kind: str, name: str) -> Reply:
    now = time.time()
    budgets = _budgets(request, now, (kind, name)).get((kind, name), [])
    scope = await web.read(request.server.database, lambda conn: _read_scope(conn, kind, name))
    return web.json_reply(scope_json(scope, budgets))


@_answers
async def scope_api(request: Request) -> Reply:
    return await _scope_answer(request, _kind(request), path_name(request.path_params["name"]))


@_answers
async def scope_patch_api(request: Request) -> Reply:
    kind, name = _kind(request), path_name(request.path_params["name"])
    await _edit_scope(request, kind, checked_name("name", name), partial=True)
    return await _scope_answer(request, kind, name)


@_answers
async def scope_reset_api(request: Request) -> Reply:
    kind, name = _kind(request), path_name(request.path_params["name"])
    return web.json_reply(await _reset(request, kind, name))


# -- the OpenAPI operations ------------------------------------------------------------------

_ERROR = {"$ref": "#/components/responses/Error"}
_LIMIT_PROPERTIES: dict[str, Any] = {
    "rpm": {"type": ["integer", "string", "null"], "description": "requests per minute; null, '' or 'none' clears it"},
    "concurrency": {"type": ["integer", "string", "null"], "description": "requests in flight at once"},
    **{f"budget_{w}": {"type": ["number", "string", "null"], "description": f"the {w} budget in USD"}
       for w in ("5h", "day", "week", "month", "total")},
    "soft": {"type": ["boolean", "null"],
             "description": "true: the budgets this change sets (else every budget) warn and never refuse; false: hard"},
    "warn_at": {"type": ["array", "string", "null"], "items": {"type": "integer"},
                "description": "alert thresholds in percent of those budgets; null: the default (80,100 soft)"},
    "models": {"type": ["array", "string", "null"], "items": {"type": "string"},
               "description": "allowed models, shell-style patterns"},
    "groups": {"type": ["array", "string", "null"], "items": {"type": "string"},
               "description": "the upstream groups it may use"},
    "expires": {"type": ["string", "number", "null"],
                "description": "ISO 8601 (without an offset: the reporting zone) or unix seconds"},
    "note": {"type": ["string", "null"], "description": "null or '' clears it"},
}


def _body(description: str, properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    return {"description": description, "required": bool(required), "content": {
        web.JSON: {"schema": schema}, "application/x-www-form-urlencoded": {"schema": schema}}}


_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
         "description": "percent-encoded"}
_WINDOW_BODY = _body("the budget window whose spend starts afresh", {
    "window": {"type": "string", "enum": ["5h", "day", "week", "month", "total"]}}, ("window",))
_RESET_ANSWER = {"200": {"description": "kind, name, window, counts_from (unix seconds), forgiven_micros"},
                 "400": _ERROR, "404": _ERROR, "409": _ERROR}


def _scope_routes(kind: str) -> list[Route]:
    plural = f"{kind}s"
    return [
        Route("POST", f"/tokens/{plural}", new_scope_page, Access.OPERATOR),
        Route("GET", f"/tokens/{plural}/{{name}}", scope_page, Access.OPERATOR),
        Route("POST", f"/tokens/{plural}/{{name}}/limits", scope_limits_page, Access.OPERATOR),
        Route("POST", f"/tokens/{plural}/{{name}}/reset-spend", scope_reset_page, Access.OPERATOR),
        Route("GET", f"/api/v1/{plural}", scopes_api, Access.OPERATOR, api={
            "summary": f"Every {kind}: limits, note, tokens and budget bars",
            "tags": ["tokens"],
            "responses": {"200": {"description": f"{plural}: kind, name, note, limits, groups, models, expires_at, "
                                                 "tokens, revoked_tokens, budgets"}},
        }),
        Route("GET", f"/api/v1/{plural}/{{name}}", scope_api, Access.OPERATOR, api={
            "summary": f"One {kind}", "tags": ["tokens"], "parameters": [_NAME],
            "responses": {"200": {"description": f"the {kind}"}, "404": _ERROR},
        }),
        Route("PATCH", f"/api/v1/{plural}/{{name}}", scope_patch_api, Access.OPERATOR, api={
            "summary": f"Set or clear a {kind}'s limits and note (created if it has none)", "tags": ["tokens"],
            "parameters": [_NAME], "requestBody": _body("the fields to change; absent ones stay", _LIMIT_PROPERTIES),
            "responses": {"200": {"description": f"the {kind} as changed"}, "400": _ERROR},
        }),
        Route("POST", f"/api/v1/{plural}/{{name}}/reset-spend", scope_reset_api, Access.OPERATOR, api={
            "summary": f"Reset a {kind}'s spend in one budget window", "tags": ["tokens"],
            "parameters": [_NAME], "requestBody": _WINDOW_BODY, "responses": dict(_RESET_ANSWER),
        }),
    ]


ROUTES = [
    Route("GET", "/tokens", tokens_page, Access.OPERATOR),
    Route("POST", "/tokens", create_page, Access.OPERATOR),
    *_scope_routes("user"),
    *_scope_routes("project"),
    Route("GET", "/tokens/{id}", token_page, Access.OPERATOR),
    Route("POST", "/tokens/{id}/revoke", revoke_page, Access.OPERATOR),
    Route("POST", "/tokens/{id}/limits", token_limits_page, Access.OPERATOR),
    Route("POST", "/tokens/{id}/reset-spend", token_reset_page, Access.OPERATOR),
    Route("GET", "/api/v1/tokens", tokens_api, Access.OPERATOR, api={
        "summary": "Hub tokens (never the tokens themselves): owner, note, limits, status, budget bars",
        "tags": ["tokens"],
        "parameters": [{"name": "all", "in": "query", "schema": {"type": "boolean"},
                        "description": "include revoked tokens"}],
        "responses": {"200": {"description": "tokens, as `hubcore token list --json` with status, expires_at, "
                                             "models and budgets"}, "400": _ERROR},
    }),
    Route("POST", "/api/v1/tokens", create_api, Access.OPERATOR, api={
        "summary": "Create a token; the answer holds it, this once", "tags": ["tokens"],
        "requestBody": _body("its owner, note and limits", {
            "user": {"type": "string"}, "project": {"type": ["string", "null"]}, **_LIMIT_PROPERTIES}, ("user",)),
        "responses": {"201": {"description": "the token's object and `token`, the secret (shown only here)"},
                      "400": _ERROR},
    }),
    Route("GET", "/api/v1/tokens/{id}", token_api, Access.OPERATOR, api={
        "summary": "One token", "tags": ["tokens"], "parameters": [_ID],
        "responses": {"200": {"description": "the token, with effective_groups"}, "400": _ERROR, "404": _ERROR},
    }),
    Route("PATCH", "/api/v1/tokens/{id}", token_patch_api, Access.OPERATOR, api={
        "summary": "Set or clear an active token's limits and note", "tags": ["tokens"], "parameters": [_ID],
        "requestBody": _body("the fields to change; absent ones stay", _LIMIT_PROPERTIES),
        "responses": {"200": {"description": "the token as changed"}, "400": _ERROR, "404": _ERROR, "409": _ERROR},
    }),
    Route("DELETE", "/api/v1/tokens/{id}", token_delete_api, Access.OPERATOR, api={
        "summary": "Revoke a token: the proxy refuses it at once", "tags": ["tokens"], "parameters": [_ID],
        "responses": {"200": {"description": "the token, revoked"}, "404": _ERROR, "409": _ERROR},
    }),
    Route("POST", "/api/v1/tokens/{id}/reset-spend", token_reset_api, Access.OPERATOR, api={
        "summary": "Reset a token's spend in one budget window", "tags": ["tokens"], "parameters": [_ID],
        "requestBody": _WINDOW_BODY, "responses": dict(_RESET_ANSWER),
    }),
]
