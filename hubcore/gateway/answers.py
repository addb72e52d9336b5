"""The answers the hub makes itself, shaped like the vendor's own: refusals,
the answer when every attempt failed, the error event that ends a broken
stream, and the errors of the HTTP layer (`render_http_error`, handed to the
Server). Pure functions: status, headers and body from plain values.
"""
from __future__ import annotations

import math

import orjson

from hubcore.errors import ANTHROPIC, OPENAI, HubError, error_body
from hubcore.gateway.rewrite import RESPONSE_DROP
from hubcore.gateway.routes import flavour_for_path
from hubcore.http.client import UpstreamError, UpstreamTimeout

Headers = list[tuple[bytes, bytes]]

JSON = (b"content-type", b"application/json")
ROOT_HEADERS: Headers = [(b"content-type", b"text/plain")]
ROOT_BODY = b"hubcore\n"


def render_http_error(status: int, message: str, target: bytes) -> tuple[tuple[tuple[bytes, bytes], ...], bytes]:
    """A refusal of the HTTP layer (framing, limits, timeouts) in the error
    shape of the vendor whose client is on `target` (see server.ErrorRenderer)."""
    return (JSON,), error_body(flavour_for_path(target), status, message)


RETRY = (b"x-should-retry", b"true")
NO_RETRY = (b"x-should-retry", b"false")


def refusal_headers(error: HubError) -> Headers:
    """The headers of a refusal: when to come back, and whether the SDKs'
    own retries may. A 429 (rate or concurrency) passes, with when. Every
    other refusal of the hub's (a bad, revoked or expired token, a budget
    spent, a model not allowed, no key configured) would only repeat: it
    says so and names no time, so that Claude Code and the SDKs fail at once
    with the hub's message instead of retrying silently for a minute."""
    if error.status == 429:
        retry_after = b"%d" % max(1, round(error.retry_after if error.retry_after is not None else 1))
        return [JSON, (b"retry-after", retry_after), RETRY]
    return [JSON, NO_RETRY]


def give_up(
    flavour: str,
    upstream: str,
    attempts: int,
    rate_limited_for: float | None,
    last_error: tuple[int, Headers, bytes] | None,
    last_exc: UpstreamError | None,
    probe_in: float | None,
) -> tuple[int, Headers, bytes, str]:
    """The answer when no attempt succeeded and none more will be made:
    (status, headers, body, error type for the usage row).

    `rate_limited_for` (seconds until a resting key frees up) is given
    when keys rest after 429s and none frees up within the queue time:
    the hub's own 429 then tells honestly when to come back. Otherwise
    `last_error` (status, headers, body: the last vendor error), passed on
    unchanged but marked so that clients do not multiply the load by
    retrying it themselves; a gateway error when the last attempt got no
    answer (`last_exc`); 503 when no key could be tried at all, with
    `probe_in` (seconds until the next probe of an open circuit, None if
    none is open) as the time to come back.
    """
    if rate_limited_for is not None:
        retry_after = b"%d" % max(1, math.ceil(rate_limited_for))
        body = error_body(flavour, 429, f"every {upstream} key is rate limited; retry after {retry_after.decode()} s")
        return 429, [JSON, (b"retry-after", retry_after)], body, "rate_limit_error"
    if last_error is not None:
        status, headers, body = last_error
        if status in (401, 403):
            # The vendor refused the hub's own keys. Passing that 401/403 on
            # would tell the developer to log in again, though their hub
            # token is fine: this is the operator's problem, say so.
            body = error_body(
                flavour, 503, f"every {upstream} key was refused by the vendor "
                f"({status}); the hub operator must replace them", final=True)
            return 503, [JSON, NO_RETRY], body, "vendor_key_refused"
        headers = [(n, v) for n, v in headers if n.lower() not in RESPONSE_DROP]
        if attempts > 1:
            headers = [(n, v) for n, v in headers if n.lower() != b"x-should-retry"]
            headers.append((b"x-should-retry", b"false"))
        return status, headers, body, f"http_{status}"
    if last_exc is not None:
        status = 504 if isinstance(last_exc, UpstreamTimeout) else 502
        body = error_body(flavour, status, f"upstream {upstream}: {last_exc}")
        return status, [JSON, (b"x-should-retry", b"false")], body, last_exc.kind
    if probe_in is None:
        # Every key is dead or disabled: only the operator can help.
        body = error_body(flavour, 503, f"no usable {upstream} key: every one is disabled or was refused by the "
                          "vendor; the hub operator must replace or enable them", final=True)
        return 503, [JSON, NO_RETRY], body, "overloaded_error"
    # When the next probe is due: a client that comes back then finds the
    # key back if the vendor is.
    retry_after = b"%d" % max(1, math.ceil(probe_in))
    body = error_body(flavour, 503, f"no usable {upstream} key: their circuits are open after failures; "
                      f"the hub probes them again in {retry_after.decode()} s")
    return 503, [JSON, (b"retry-after", retry_after)], body, "overloaded_error"


def sse_error_event(flavour: str, message: str) -> bytes:
    """The SSE `error` event that ends a stream the hub cannot finish, as
    the client's SDK expects it: it raises rather than waiting for more."""
    if flavour == OPENAI:
        data = orjson.dumps({"type": "error", "code": "upstream_aborted", "message": f"hubcore: {message}", "param": None})
        return b"event: error\ndata: " + data + b"\n\n"
    data = error_body(ANTHROPIC, 529, f"hubcore: {message}", "overloaded_error")
    return b"event: error\ndata: " + data + b"\n\n"
