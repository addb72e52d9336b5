"""What a request path and head say before anything is sent: its route, the
vendor's error shape its client understands, the hub token's principal, and
the session the request belongs to. Pure functions of the head's values.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

from hubcore.accounting import meter as sse
from hubcore.errors import ANTHROPIC, OPENAI, HubError
from hubcore.governance.tokens import Principal, TokenTable
from hubcore.http.wire import first_value


@dataclass(frozen=True, slots=True)
class Route:
    kind: str            # upstream kind: "anthropic" or "openai"
    endpoint: str        # the path, for usage rows
    fmt: int             # meter format
    methods: tuple[bytes, ...]
    flavour: str         # error shape


ROUTES: dict[bytes, Route] = {
    b"/v1/messages": Route("anthropic", "/v1/messages", sse.FMT_ANTHROPIC, (b"POST",), ANTHROPIC),
    b"/v1/messages/count_tokens": Route("anthropic", "/v1/messages/count_tokens", 0, (b"POST",), ANTHROPIC),
    b"/v1/models": Route("anthropic", "/v1/models", 0, (b"GET",), ANTHROPIC),
    b"/v1/responses": Route("openai", "/v1/responses", sse.FMT_OPENAI_RESPONSES, (b"POST",), OPENAI),
    b"/v1/chat/completions": Route("openai", "/v1/chat/completions", sse.FMT_OPENAI_CHAT, (b"POST",), OPENAI),
}
# GET /v1/models is both vendors' path. Anthropic's clients always send
# anthropic-version (the API refuses requests without it); OpenAI's never do.
OPENAI_MODELS = Route("openai", "/v1/models", 0, (b"GET",), OPENAI)
MODELS_PREFIX = b"/v1/models/"
# A model id as the vendors spell them ("claude-sonnet-4-5-20250929",
# "gpt-5.1", "claude-3@20240229"): no slash, no percent-encoding, no dot
# segment, nothing that could make the vendor see another path.
MODEL_ID = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,255}")
# The caller's own spend, budgets and limits (gateway.me): the hub answers it.
ME_PATH = b"/hubcore/v1/me"
# Claude Code's header first; Codex sends the other two.
SESSION_HEADERS = (b"x-claude-code-session-id", b"session_id", b"session-id")


def route_for(path: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> Route | None:
    """The route of a request path, or None. Only the exact paths, and
    `/v1/models/{id}` with a plain model id: the target goes to the vendor
    as the client sent it, with the hub's key, so nothing else (dot segments,
    encoded slashes or dots, other vendor endpoints) may pass. Given the
    head's `headers` (lower-case names), a models listing without
    anthropic-version goes to the OpenAI upstream."""
    route = ROUTES.get(path)
    if route is None and path.startswith(MODELS_PREFIX) and MODEL_ID.fullmatch(path, len(MODELS_PREFIX)):
        route = ROUTES[b"/v1/models"]
    if (route is not None and route.endpoint == "/v1/models" and headers is not None
            and first_value(headers, b"anthropic-version") is None):
        return OPENAI_MODELS
    return route


def flavour_for_path(path: bytes) -> str:
    """Which vendor's error shape a client on `path` understands, routed or
    not (an OpenAI SDK that got a path wrong still parses OpenAI errors)."""
    if path.startswith((b"/v1/responses", b"/v1/chat/")):
        return OPENAI
    return ANTHROPIC


def authenticate(tokens: TokenTable, index: dict[bytes, bytes]) -> Principal | HubError:
    """The principal of the hub token in a request head (`x-api-key`, else
    `Authorization: Bearer`), or the refusal to answer with."""
    token = index.get(b"x-api-key")
    if token is None:
        auth = index.get(b"authorization")
        if auth is not None and auth[:7].lower() == b"bearer ":
            token = auth[7:].strip()
    if not token:
        return HubError(401, "missing hub token: send it as x-api-key or Authorization: Bearer")
    principal = tokens.lookup(token)
    if principal is None:
        revoked_at = tokens.revoked_at(token)
        if revoked_at is not None:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(revoked_at))
            return HubError(403, f"hub token revoked at {when}", error_type="permission_error", code="token_revoked")
        return HubError(401, "invalid hub token")
    return principal


# A body that names its model first, as Claude Code's does: `{"model":"...`.
# Only plain ids (no escapes); anything else is left to the body's scan.
_LEADING_MODEL = re.compile(rb'\{\s*"model"\s*:\s*"([A-Za-z0-9._:@+/-]{1,256})"')


def leading_model(body_start: bytes) -> str | None:
    """The model a request body names as its first member, read from the
    body's first bytes at a constant cost; None when it does not start so."""
    match = _LEADING_MODEL.match(body_start)
    return match.group(1).decode("ascii") if match is not None else None


def session_from_headers(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The session a request head names, if any (the body may name one too:
    see meter.scan_request); `headers`: lower-case names, in order."""
    for name in SESSION_HEADERS:
        value = first_value(headers, name)
        if value:
            return value.decode("latin-1")
    return None


def printable_path(path: bytes) -> str:
    """A request path for an error message: bounded, control bytes escaped."""
    text = repr(path[:200].decode("latin-1"))
    return text if len(path) <= 200 else text + "..."
