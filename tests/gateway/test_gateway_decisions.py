"""The gateway's pure decisions, each called with plain values: routes and
tokens (routes.py), head rewriting (rewrite.py), the hub's own answers
(answers.py), the usage event and the exchange's phase table (exchange.py)."""
from __future__ import annotations

import dataclasses
import itertools
from types import SimpleNamespace

import orjson
import pytest

from hubcore.accounting.usage import Outcome, UsageEvent
from hubcore.errors import ANTHROPIC, OPENAI, HubError
from hubcore.gateway import answers, rewrite, routes
from hubcore.gateway.exchange import _MOVES, Exchange, Phase, usage_event
from hubcore.gateway.rewrite import Framing
from hubcore.governance.tokens import Principal
from hubcore.http.client import ConnectFailed, ConnectionClosed, UpstreamTimeout

ALICE = Principal(7, "alice", "web", "hc_abc")
HOST_LINE = b"host: api.anthropic.com\r\n"
AUTH_LINE = b"x-api-key: sk-vendor\r\n"
CLIENT_HEADERS = [
    (b"host", b"127.0.0.1:8787"),
    (b"x-api-key", b"hc_token"),
    (b"content-type", b"application/json"),
    (b"content-length", b"2"),
    (b"accept-encoding", b"gzip"),
    (b"anthropic-version", b"2023-06-01"),
    (b"connection", b"keep-alive"),
]
VENDOR_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"transfer-encoding", b"chunked"),
    (b"connection", b"keep-alive"),
    (b"request-id", b"req_1"),
]


# -- routes -----------------------------------------------------------------

@pytest.mark.parametrize(
    ("path", "endpoint"),
    [
        (b"/v1/messages", "/v1/messages"),
        (b"/v1/messages/count_tokens", "/v1/messages/count_tokens"),
        (b"/v1/models", "/v1/models"),
        (b"/v1/models/claude-sonnet-4-5-20250929", "/v1/models"),
        (b"/v1/models/gpt-5.1", "/v1/models"),
        (b"/v1/models/claude-3@20240229", "/v1/models"),
        (b"/v1/responses", "/v1/responses"),
        (b"/v1/chat/completions", "/v1/chat/completions"),
    ],
)
def test_route_for_routed_paths(path: bytes, endpoint: str) -> None:
    route = routes.route_for(path)
    assert route is not None and route.endpoint == endpoint


@pytest.mark.parametrize(
    "path",
    [
        b"/", b"", b"/v1/messages/", b"/v1/messages/batches", b"/V1/messages", b"/v1//messages",
        b"/v1/models/", b"/v1/models/../messages", b"/v1/models/a/b", b"/v1/models/%2e%2e",
        b"/v1/models/.hidden", b"/v1/models/a%2Fb", b"/v1/models/" + b"a" * 257, b"/v1/files",
        b"/v1/chat/completions/x", b"/v1/messages?beta=true",
    ],
)
def test_route_for_refuses_every_other_path(path: bytes) -> None:
    assert routes.route_for(path) is None


def test_a_routed_path_says_its_upstream_kind_and_error_shape() -> None:
    messages, responses = routes.route_for(b"/v1/messages"), routes.route_for(b"/v1/responses")
    assert messages is not None and (messages.kind, messages.flavour, messages.methods) == ("anthropic", ANTHROPIC, (b"POST",))
    assert responses is not None and (responses.kind, responses.flavour) == ("openai", OPENAI)
    models = routes.route_for(b"/v1/models/claude-sonnet-4-6")
    assert models is not None and models.methods == (b"GET",) and models.fmt == 0


@pytest.mark.parametrize(
    ("path", "flavour"),
    [
        (b"/v1/messages", ANTHROPIC),
        (b"/v1/unknown", ANTHROPIC),
        (b"", ANTHROPIC),
        (b"/v1/responses", OPENAI),
        (b"/v1/responses/resp_1/cancel", OPENAI),
        (b"/v1/chat/completions?x=1", OPENAI),
        (b"/v1/chat/other", OPENAI),
    ],
)
def test_flavour_for_path(path: bytes, flavour: str) -> None:
    assert routes.flavour_for_path(path) == flavour


class Tokens:
    """The two lookups authenticate makes of a TokenTable."""

    def __init__(self, valid: dict[bytes, Principal], revoked: dict[bytes, float]) -> None:
        self.valid = valid
        self.revoked = revoked

    def lookup(self, token: bytes) -> Principal | None:
        return self.valid.get(token)

    def revoked_at(self, token: bytes) -> float | None:
        return self.revoked.get(token)


TOKENS = Tokens({b"hc_good": ALICE}, {b"hc_old": 0.0})


@pytest.mark.parametrize(
    "index",
    [
        {b"x-api-key": b"hc_good"},
        {b"authorization": b"Bearer hc_good"},
        {b"authorization": b"bearer   hc_good  "},
        {b"x-api-key": b"hc_good", b"authorization": b"Bearer hc_bad"},
    ],
)
def test_authenticate_finds_the_principal(index: dict[bytes, bytes]) -> None:
    assert routes.authenticate(TOKENS, index) is ALICE  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("index", "status", "message"),
    [
        ({}, 401, "missing hub token"),
        ({b"x-api-key": b""}, 401, "missing hub token"),
        ({b"authorization": b"Basic aGM="}, 401, "missing hub token"),
        ({b"authorization": b"Bearer "}, 401, "missing hub token"),
        ({b"x-api-key": b"hc_bad"}, 401, "invalid hub token"),
        ({b"x-api-key": b"hc_old"}, 403, "hub token revoked at 1970-01-01T00:00:00Z"),
    ],
)
def test_authenticate_refuses(index: dict[bytes, bytes], status: int, message: str) -> None:
    refusal = routes.authenticate(TOKENS, index)  # type: ignore[arg-type]
    assert isinstance(refusal, HubError)
    assert refusal.status == status and refusal.message.startswith(message)
    if status == 403:
        assert (refusal.error_type, refusal.code) == ("permission_error", "token_revoked")


def test_a_models_listing_without_anthropic_version_goes_to_openai() -> None:
    models = routes.route_for(b"/v1/models")
    assert routes.route_for(b"/v1/models", None) is models
    assert routes.route_for(b"/v1/models", [(b"anthropic-version", b"2023-06-01")]) is models
    # Present, even empty, is Anthropic's; absent is OpenAI's.
    assert routes.route_for(b"/v1/models", [(b"x-api-key", b"k"), (b"anthropic-version", b"")]) is models
    assert routes.route_for(b"/v1/models", [(b"x-api-key", b"k")]) is routes.OPENAI_MODELS
    assert routes.route_for(b"/v1/messages", []) is routes.route_for(b"/v1/messages")


@pytest.mark.parametrize(
    ("headers", "session"),
    [
        ([], None),
        ([(b"x-claude-code-session-id", b"cc-1"), (b"session_id", b"codex-1")], "cc-1"),
        ([(b"session_id", b"codex-1"), (b"x-claude-code-session-id", b"cc-1")], "cc-1"),
        ([(b"x-claude-code-session-id", b""), (b"session_id", b"codex-1")], "codex-1"),
        ([(b"session-id", b"s\xe9")], "s\xe9"),
        # A name's first value is the one read.
        ([(b"session-id", b"first"), (b"session-id", b"second")], "first"),
    ],
)
def test_session_from_headers(headers: list[tuple[bytes, bytes]], session: str | None) -> None:
    assert routes.session_from_headers(headers) == session


def test_printable_path_is_bounded_and_escaped() -> None:
    assert routes.printable_path(b"/v1/x\r\n") == repr("/v1/x\r\n")
    long = routes.printable_path(b"/" * 300)
    assert long.endswith("...") and len(long) == 200 + 2 + 3


# -- request head -------------------------------------------------------------

def request_head(
    headers: list[tuple[bytes, bytes]] = CLIENT_HEADERS,
    control: list[tuple[bytes, bytes]] | None = None,
    method: bytes = b"POST",
    target: bytes = b"/v1/messages?beta=true",
    body_size: int = 2,
) -> bytes:
    return rewrite.request_head(method, target, b"/base", HOST_LINE, AUTH_LINE, headers, control, body_size)


def test_request_head_swaps_host_key_and_framing() -> None:
    assert request_head(control=[(b"connection", b"keep-alive")]) == (
        b"POST /base/v1/messages?beta=true HTTP/1.1\r\n"
        b"host: api.anthropic.com\r\n"
        b"content-type: application/json\r\n"
        b"anthropic-version: 2023-06-01\r\n"
        b"x-api-key: sk-vendor\r\n"
        b"accept-encoding: identity\r\n"
        b"content-length: 2\r\n"
        b"\r\n"
    )


def test_request_head_drops_every_hop_by_hop_and_client_credential() -> None:
    headers = [(name, b"v") for name in sorted(rewrite.REQUEST_DROP)] + [(b"x-kept", b"1")]
    head = request_head(headers)
    lines = head.split(b"\r\n")[1:-2]
    assert lines == [
        b"host: api.anthropic.com", b"x-kept: 1", b"x-api-key: sk-vendor",
        b"accept-encoding: identity", b"content-length: 2",
    ]


def test_request_head_drops_the_headers_connection_names() -> None:
    headers = [*CLIENT_HEADERS, (b"x-hop", b"1"), (b"x-other-hop", b"2"), (b"x-kept", b"3")]
    control = [(b"transfer-encoding", b"chunked"), (b"connection", b"keep-alive, X-Hop ,x-other-hop")]
    head = request_head(headers, control)
    assert b"x-hop" not in head and b"x-other-hop" not in head and b"x-kept: 3\r\n" in head
    # Only Connection names headers; other control headers do not.
    head = request_head(headers, [(b"transfer-encoding", b"x-kept")])
    assert b"x-kept: 3\r\n" in head and b"x-hop: 1\r\n" in head


def test_request_head_does_not_widen_the_drop_set_for_already_dropped_names() -> None:
    assert request_head(control=[(b"connection", b"keep-alive, te")]) == request_head()


@pytest.mark.parametrize(
    ("method", "body_size", "length"),
    [(b"POST", 2, b"content-length: 2\r\n"), (b"POST", 0, b"content-length: 0\r\n"), (b"GET", 0, None), (b"GET", 5, b"content-length: 5\r\n")],
)
def test_request_head_sends_a_length_for_a_body_or_a_post(method: bytes, body_size: int, length: bytes | None) -> None:
    head = request_head(method=method, body_size=body_size)
    assert head.startswith(method + b" /base/v1/messages")
    if length is None:
        assert b"content-length" not in head
    else:
        assert head.count(b"content-length") == 1 and length in head


# -- response head --------------------------------------------------------------

@pytest.mark.parametrize(
    ("status", "content_length", "http11", "framing"),
    [
        (200, 120, True, Framing.LENGTH),
        (200, 120, False, Framing.LENGTH),
        (200, None, True, Framing.CHUNKED),
        (200, None, False, Framing.UNTIL_CLOSE),
        (204, None, True, Framing.BODILESS),
        (204, None, False, Framing.BODILESS),
        (304, None, True, Framing.BODILESS),
        (204, 0, True, Framing.LENGTH),  # the vendor's own length is passed on
        (500, None, True, Framing.CHUNKED),
    ],
)
def test_response_framing(status: int, content_length: int | None, http11: bool, framing: Framing) -> None:
    assert rewrite.response_framing(status, content_length, http11) is framing


@pytest.mark.parametrize(
    ("framing", "client", "kept"),
    [
        (Framing.LENGTH, True, True),
        (Framing.CHUNKED, True, True),
        (Framing.BODILESS, True, True),
        (Framing.UNTIL_CLOSE, True, False),
        (Framing.LENGTH, False, False),
        (Framing.CHUNKED, False, False),
    ],
)
def test_keeps_alive(framing: Framing, client: bool, kept: bool) -> None:
    assert rewrite.keeps_alive(framing, client) is kept


def test_response_head_rechunks_for_an_http11_client() -> None:
    head = rewrite.response_head(200, VENDOR_HEADERS, Framing.CHUNKED, None, True, "hc_1")
    assert head == (
        b"HTTP/1.1 200 OK\r\n"
        b"content-type: text/event-stream\r\n"
        b"request-id: req_1\r\n"
        b"x-hubcore-request-id: hc_1\r\n"
        b"transfer-encoding: chunked\r\n"
        b"\r\n"
    )


def test_response_head_passes_a_length_on() -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"999")]
    head = rewrite.response_head(200, headers, Framing.LENGTH, 120, True, "hc_1")
    assert head.count(b"content-length") == 1 and b"content-length: 120\r\n" in head
    assert b"transfer-encoding" not in head and b"connection" not in head


def test_response_head_for_an_http10_client_ends_the_body_with_the_connection() -> None:
    framing = rewrite.response_framing(200, None, False)
    head = rewrite.response_head(200, VENDOR_HEADERS, framing, None, rewrite.keeps_alive(framing, True), "hc_1")
    assert head.endswith(b"x-hubcore-request-id: hc_1\r\nconnection: close\r\n\r\n")
    assert b"transfer-encoding" not in head and b"content-length" not in head


def test_response_head_of_a_204_frames_no_body() -> None:
    framing = rewrite.response_framing(204, None, True)
    head = rewrite.response_head(204, [(b"x-a", b"1")], framing, None, rewrite.keeps_alive(framing, True), "hc_1")
    assert head == b"HTTP/1.1 204 No Content\r\nx-a: 1\r\nx-hubcore-request-id: hc_1\r\n\r\n"


def test_response_head_closes_when_the_hub_does_not_keep_alive() -> None:
    head = rewrite.response_head(529, [], Framing.CHUNKED, None, False, "hc_2")
    assert head == (
        b"HTTP/1.1 529 Overloaded\r\nx-hubcore-request-id: hc_2\r\n"
        b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )


# -- the hub's own answers ----------------------------------------------------------

def error_of(body: bytes) -> dict[str, object]:
    parsed = orjson.loads(body)
    assert parsed["type"] == "error"
    error: dict[str, object] = parsed["error"]
    return error


def test_give_up_when_every_key_is_rate_limited() -> None:
    status, headers, body, error_type = answers.give_up(ANTHROPIC, "claude", 3, 2.2, None, None, None)
    assert (status, error_type) == (429, "rate_limit_error")
    assert headers == [answers.JSON, (b"retry-after", b"3")]
    assert error_of(body) == {"type": "rate_limit_error", "message": "every claude key is rate limited; retry after 3 s"}
    # Even a wait under a second is announced as one.
    assert answers.give_up(ANTHROPIC, "claude", 1, 0.01, None, None, None)[1][1] == (b"retry-after", b"1")


@pytest.mark.parametrize("vendor_status", [401, 403])
def test_give_up_when_the_vendor_refused_the_hubs_keys(vendor_status: int) -> None:
    last = (vendor_status, [(b"content-type", b"application/json")], b'{"vendor":"body"}')
    status, headers, body, error_type = answers.give_up(ANTHROPIC, "claude", 2, None, last, None, None)
    assert (status, error_type) == (503, "vendor_key_refused")
    # Only the operator can help: no time to come back, no retry.
    assert headers == [answers.JSON, (b"x-should-retry", b"false")]
    message = error_of(body)["message"]
    assert isinstance(message, str) and f"({vendor_status})" in message and "operator" in message


def test_give_up_passes_the_last_vendor_error_on() -> None:
    headers = [(b"content-type", b"application/json"), (b"Connection", b"keep-alive"), (b"content-length", b"9"),
               (b"x-should-retry", b"true"), (b"request-id", b"req_9")]
    last = (529, headers, b'{"overloaded":1}')
    # After one attempt, as the vendor said it (less hop-by-hop and framing headers).
    status, passed, body, error_type = answers.give_up(ANTHROPIC, "claude", 1, None, last, None, None)
    assert (status, body, error_type) == (529, b'{"overloaded":1}', "http_529")
    assert passed == [(b"content-type", b"application/json"), (b"x-should-retry", b"true"), (b"request-id", b"req_9")]
    # After retries, marked so that the client does not retry it again.
    status, passed, body, error_type = answers.give_up(ANTHROPIC, "claude", 3, None, last, None, None)
    assert passed == [(b"content-type", b"application/json"), (b"request-id", b"req_9"), (b"x-should-retry", b"false")]


@pytest.mark.parametrize(
    ("exc", "status", "error_type"),
    [
        (ConnectFailed("refused"), 502, "connect_failed"),
        (ConnectionClosed("closed"), 502, "connection_closed"),
        (UpstreamTimeout("no response within 1 s"), 504, "timeout"),
    ],
)
def test_give_up_after_a_transport_error(exc: Exception, status: int, error_type: str) -> None:
    got_status, headers, body, got_type = answers.give_up(OPENAI, "openai", 2, None, None, exc, None)  # type: ignore[arg-type]
    assert (got_status, got_type) == (status, error_type)
    assert headers == [answers.JSON, (b"x-should-retry", b"false")]
    assert orjson.loads(body)["error"]["message"] == f"upstream openai: {exc}"


@pytest.mark.parametrize(("probe_in", "retry_after"), [(0.0, b"1"), (7.5, b"8")])
def test_give_up_when_every_circuit_is_open_says_when_the_next_probe_is(probe_in: float, retry_after: bytes) -> None:
    status, headers, body, error_type = answers.give_up(ANTHROPIC, "claude", 0, None, None, None, probe_in)
    assert (status, error_type) == (503, "overloaded_error")
    assert headers == [answers.JSON, (b"retry-after", retry_after)]
    assert error_of(body)["type"] == "overloaded_error"


def test_give_up_when_every_key_is_dead_or_disabled_says_not_to_retry() -> None:
    status, headers, body, error_type = answers.give_up(ANTHROPIC, "claude", 0, None, None, None, None)
    assert (status, error_type) == (503, "overloaded_error")
    assert headers == [answers.JSON, (b"x-should-retry", b"false")]
    assert "operator" in str(error_of(body)["message"])


@pytest.mark.parametrize(
    ("error", "headers"),
    [
        # Retrying cannot fix these: say so, and name no time to come back.
        (HubError(401, "invalid hub token"), [answers.JSON, (b"x-should-retry", b"false")]),
        (HubError(403, "budget", retry_after=3600.4), [answers.JSON, (b"x-should-retry", b"false")]),
        (HubError(503, "no key", retry_after=30), [answers.JSON, (b"x-should-retry", b"false")]),
        (HubError(500, "bug"), [answers.JSON, (b"x-should-retry", b"false")]),
        (HubError(429, "rate", retry_after=0.2), [answers.JSON, (b"retry-after", b"1"), (b"x-should-retry", b"true")]),
        (HubError(429, "concurrency"), [answers.JSON, (b"retry-after", b"1"), (b"x-should-retry", b"true")]),
    ],
)
def test_refusal_headers(error: HubError, headers: list[tuple[bytes, bytes]]) -> None:
    assert answers.refusal_headers(error) == headers


def test_sse_error_event_in_each_vendors_shape() -> None:
    event = answers.sse_error_event(ANTHROPIC, "upstream stream failed")
    assert event.startswith(b"event: error\ndata: ") and event.endswith(b"\n\n")
    assert orjson.loads(event.split(b"data: ", 1)[1]) == {
        "type": "error", "error": {"type": "overloaded_error", "message": "hubcore: upstream stream failed"},
    }
    event = answers.sse_error_event(OPENAI, "cut")
    assert orjson.loads(event.split(b"data: ", 1)[1]) == {
        "type": "error", "code": "upstream_aborted", "message": "hubcore: cut", "param": None,
    }


@pytest.mark.parametrize(("target", "openai"), [(b"/v1/messages", False), (b"/v1/chat/completions?x", True), (b"", False)])
def test_render_http_error_speaks_the_clients_vendor(target: bytes, openai: bool) -> None:
    headers, body = answers.render_http_error(413, "too large", target)
    assert list(headers) == [answers.JSON]
    parsed = orjson.loads(body)
    if openai:
        assert parsed["error"]["message"] == "too large" and parsed["error"]["type"] == "invalid_request_error"
    else:
        assert parsed == {"type": "error", "error": {"type": "request_too_large", "message": "too large"}}



def test_the_server_renders_plain_text_without_a_renderer() -> None:
    from hubcore.http.server import plain_error

    headers, body = plain_error(400, "malformed HTTP request", b"/v1/messages")
    assert list(headers) == [(b"content-type", b"text/plain; charset=utf-8")]
    assert body == b"malformed HTTP request\n"



# -- the usage event -------------------------------------------------------------

def metered(**numbers: object) -> SimpleNamespace:
    """What usage_event reads of a meter."""
    values: dict[str, object] = {
        "model": "claude-sonnet-4-6", "input_tokens": 10, "output_tokens": 20, "cache_write_5m": 1,
        "cache_write_1h": 2, "cache_read": 3, "reasoning_tokens": 4, "server_tool_requests": 5,
        "stop_reason": "end_turn", "output_estimated": False, "error_type": None, "completed": True,
    }
    values.update(numbers)
    return SimpleNamespace(**values)


class Prices:
    unpriced = "estimate"

    def __init__(self) -> None:
        self.asked: list[tuple[object, ...]] = []

    def cost(self, *args: object, forwarded: bool, multiplier: float = 1.0) -> tuple[int | None, str | None]:
        self.asked.append((*args, forwarded, multiplier))
        return (1234, None) if args[1] == "claude-sonnet-4-6" else (0, "free")


def event(
    outcome: Outcome = Outcome.OK, model: str | None = "claude-from-body", error_type: str | None = None,
    sse_body: bool = True, meter: object = None, prices: object = None, ttfb_ms: float | None = 12.5,
    attempts: int = 2, served_model: str | None = None, route: str | None = None, cost_multiplier: float = 1.0,
) -> UsageEvent:
    return usage_event(
        1700000000.0, "hc_1", "/v1/messages", 200, outcome, 40.0, ALICE, "anthropic", "k-1", model,
        error_type, ttfb_ms, attempts, "session-1", "claude-cli/2.0", sse_body, meter, "anthropic",
        prices, served_model, route, cost_multiplier,  # type: ignore[arg-type]
    )


def test_usage_event_fields_in_their_places() -> None:
    prices = Prices()
    row = event(meter=metered(), prices=prices)
    assert dataclasses.asdict(row) == {
        "ts": 1700000000.0, "request_id": "hc_1", "endpoint": "/v1/messages", "status": 200, "outcome": "ok",
        "total_ms": 40.0, "token_id": 7, "user": "alice", "project": "web", "upstream": "anthropic",
        "key_label": "k-1", "model": "claude-sonnet-4-6", "input_tokens": 10, "output_tokens": 20,
        "cache_write_5m": 1, "cache_write_1h": 2, "cache_read": 3, "reasoning_tokens": 4,
        "server_tool_requests": 5, "stop_reason": "end_turn", "error_type": None, "cost_micros": 1234,
        "ttfb_ms": 12.5, "attempts": 2, "session_id": "session-1", "user_agent": "claude-cli/2.0",
        "output_estimated": False, "cost_basis": None, "served_model": None, "route": None,
    }
    assert prices.asked == [("anthropic", "claude-sonnet-4-6", 10, 20, 1, 2, 3, True, 1.0)]


def test_usage_event_of_a_mapped_request_keeps_the_clients_model_and_prices_it_with_the_multiplier() -> None:
    prices = Prices()
    # The vendor's answer names the id it was asked for (the meter's model).
    row = event(meter=metered(model="relay-sonnet"), prices=prices, model="claude-sonnet-4-6",
                served_model="relay-sonnet", route="primary/a:529,relay/r:200", cost_multiplier=0.5)
    assert (row.model, row.served_model, row.route) == ("claude-sonnet-4-6", "relay-sonnet", "primary/a:529,relay/r:200")
    assert prices.asked == [("anthropic", "claude-sonnet-4-6", 10, 20, 1, 2, 3, True, 0.5)]


def test_usage_event_without_a_meter_is_priced_at_zero_tokens() -> None:
    prices = Prices()
    row = event(outcome=Outcome.REFUSED, error_type="rate_limit_error", prices=prices, ttfb_ms=None, attempts=0)
    assert (row.outcome, row.model, row.input_tokens, row.output_tokens, row.stop_reason) == (
        Outcome.REFUSED, "claude-from-body", 0, 0, None)
    assert (row.error_type, row.cost_micros, row.ttfb_ms, row.output_estimated) == ("rate_limit_error", 0, None, False)
    # The pricer says how a model without a price was charged; not sent: not forwarded.
    assert row.cost_basis == "free"
    assert prices.asked == [("anthropic", "claude-from-body", 0, 0, 0, 0, 0, False, 1.0)]
    assert (event(prices=None).cost_micros, event(prices=None).cost_basis) == (None, None)


def test_usage_event_a_stream_the_meter_did_not_see_complete_was_cut() -> None:
    cut = metered(completed=False, output_estimated=True)
    row = event(meter=cut)
    assert (row.outcome, row.output_estimated) == (Outcome.UPSTREAM_ABORTED, True)
    # Not an event stream (a JSON answer), or an outcome already decided: as it was.
    assert event(meter=cut, sse_body=False).outcome is Outcome.OK
    assert event(meter=cut, outcome=Outcome.CLIENT_ABORTED).outcome is Outcome.CLIENT_ABORTED


def test_usage_event_takes_the_meters_model_and_error_only_where_it_has_them() -> None:
    assert event(meter=metered(model=None)).model == "claude-from-body"
    assert event(meter=metered(error_type="overloaded_error")).error_type == "overloaded_error"
    assert event(meter=metered(error_type="overloaded_error"), error_type="hub_shutdown").error_type == "hub_shutdown"


# -- the exchange's phases -----------------------------------------------------------

def bare_exchange(phase: Phase) -> Exchange:
    """An Exchange with only what _enter reads."""
    exchange = Exchange.__new__(Exchange)
    exchange.request_id = "hc_test"
    exchange.phase = phase
    return exchange


@pytest.mark.parametrize(("old", "new"), list(itertools.product(Phase, Phase)), ids=lambda p: p.name)
def test_enter_makes_exactly_the_moves_of_the_table(old: Phase, new: Phase) -> None:
    exchange = bare_exchange(old)
    if new in _MOVES[old]:
        exchange._enter(new)
        assert exchange.phase is new
    else:
        with pytest.raises(RuntimeError, match=f"hc_test: no move from {old.name} to {new.name}"):
            exchange._enter(new)
        assert exchange.phase is old


def walk(*phases: Phase) -> None:
    exchange = bare_exchange(phases[0])
    for phase in phases[1:]:
        exchange._enter(phase)


def test_the_lifecycles_the_exchange_goes_through() -> None:
    A, S, W, H, T, F, D = Phase
    walk(A, S, W, H, T, F, D)                  # sent, streamed, recorded
    walk(A, F, D)                              # refused, or the hub's own `/`
    walk(A, S, W, S, W, H, S, W, H, T, F, D)   # a retryable head, then a failure before the first byte
    walk(A, S, F, D)                           # no key, or every attempt failed: the hub's answer
    walk(A, S, W, H, F, D)                     # the client left before any byte; the answer completed
    for phase in Phase:
        if phase is not D:
            walk(phase, D)                     # the client left, shutdown, or a bug


def test_no_retry_once_bytes_reached_the_client_and_nothing_after_done() -> None:
    for phase in (Phase.STREAMING, Phase.FINISHING, Phase.DONE):
        assert Phase.SENDING not in _MOVES[phase]
    assert _MOVES[Phase.DONE] == frozenset()
    assert set(_MOVES) == set(Phase)
    # Every phase but DONE can end.
    assert all(Phase.DONE in _MOVES[p] for p in Phase if p is not Phase.DONE)


def test_an_exchange_starts_admitting() -> None:
    # An instance: the compiled core keeps the phase as a C int, read
    # through a property (the class has no Phase to show).
    assert Exchange.__new__(Exchange).phase is Phase.ADMITTING
