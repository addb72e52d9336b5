"""The proxy end to end: official SDKs → hub → fake vendor, over real sockets."""
from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import orjson
import pytest

from hubcore.gateway import exchange as proxy

from hubcore.accounting import meter as sse
from tests.conftest import upstreams_for
from tests.fakevendor import ANTHROPIC_KEY, MODELS, OPENAI_KEY, OPENAI_MODELS, FakeVendor
from tests.hubharness import HubThread, free_port, make_config, mint

MESSAGES_BODY = {
    "model": "claude-sonnet-4-6",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "Say hello"}],
    "metadata": {"user_id": "user_" + "a" * 64 + "_account__session_0b7c2f5e-1f0e-4d8b-9a63-3c1e0f1d2a4b"},
}


_clients: list[anthropic.Anthropic | openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


def anthropic_client(hub: HubThread, token: str, **kw: object) -> anthropic.Anthropic:
    kw.setdefault("auth_token" if "auth_token" in kw else "api_key", token)
    client = anthropic.Anthropic(base_url=hub.url, max_retries=0, **kw)  # type: ignore[arg-type]
    _clients.append(client)
    return client


def openai_client(hub: HubThread, token: str) -> openai.OpenAI:
    client = openai.OpenAI(base_url=hub.url + "/v1", api_key=token, max_retries=0)
    _clients.append(client)
    return client


def send_raw(hub: HubThread, request: bytes) -> bytes:
    """Everything the hub answers to raw request bytes, until it closes."""
    with socket.create_connection(("127.0.0.1", hub.port)) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def assert_vendor_saw_only_vendor_key(vendor: FakeVendor, token: str) -> None:
    assert vendor.requests, "the vendor saw no request"
    for req in vendor.requests:
        assert req.key in (ANTHROPIC_KEY, OPENAI_KEY)
        for name, value in req.headers:
            assert token not in value, f"hub token leaked upstream in {name}"
        assert req.header("accept-encoding") == "identity"
    assert vendor.protocol_errors == []


def test_messages_non_streaming(hub: HubThread, vendor: FakeVendor, token: str) -> None:
    client = anthropic_client(hub, token)
    raw = client.messages.with_raw_response.create(**MESSAGES_BODY)  # type: ignore[arg-type]
    message = raw.parse()
    assert message.type == "message"
    assert message.model == "claude-sonnet-4-6"
    assert raw.headers["x-hubcore-request-id"].startswith("hc_")
    (req,) = vendor.requests
    assert req.target == "/v1/messages"
    assert req.key == ANTHROPIC_KEY and req.key_header == "x-api-key"
    assert req.header("anthropic-version") == raw.http_request.headers["anthropic-version"]
    assert req.json() == MESSAGES_BODY
    assert_vendor_saw_only_vendor_key(vendor, token)
    (row,) = hub.wait_rows(1)
    assert row["request_id"] == raw.headers["x-hubcore-request-id"]
    assert row["user"] == "alice" and row["project"] == "proj-a"
    assert row["outcome"] == "ok" and row["status"] == 200
    assert row["session_id"] == "0b7c2f5e-1f0e-4d8b-9a63-3c1e0f1d2a4b"
    assert row["input_tokens"] == message.usage.input_tokens
    assert row["output_tokens"] == message.usage.output_tokens


def test_messages_streaming_body_forwarded_byte_for_byte(hub: HubThread, vendor: FakeVendor, token: str) -> None:
    # Odd spacing and key order: the vendor must see these exact bytes.
    body = b'{"stream": true,  "model":"claude-sonnet-4-6","max_tokens":64,\n "messages":[{"role":"user","content":"hi \\u00e9"}]}'
    client = anthropic_client(hub, token)
    with client.messages.stream(
        model="claude-sonnet-4-6",
        max_tokens=64,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"anthropic-beta": "prompt-caching-2024-07-31,oauth-2025-04-20", "x-fake-events": "12"},
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text
    assert vendor.requests[0].header("anthropic-beta") == "prompt-caching-2024-07-31,oauth-2025-04-20"
    assert final.usage.output_tokens > 0

    data = send_raw(
        hub,
        b"POST /v1/messages?beta=true HTTP/1.1\r\nhost: x\r\nx-api-key: " + token.encode()
        + b"\r\ncontent-type: application/json\r\nanthropic-version: 2023-06-01\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        + body,
    )
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"transfer-encoding: chunked" in data.lower()
    assert b"event: message_stop" in data
    assert vendor.requests[-1].body == body
    assert vendor.requests[-1].target == "/v1/messages?beta=true"
    rows = hub.wait_rows(2)
    assert [r["outcome"] for r in rows] == ["ok", "ok"]
    assert rows[0]["output_tokens"] == final.usage.output_tokens


def test_a_body_is_read_only_when_the_answer_does_not_name_the_model(
    hub: HubThread, vendor: FakeVendor, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With its session in a header, a request's body is needed only for the
    # model of its usage row, which a metered answer names itself: the
    # 90 KB of a Claude Code body are then never walked. An error names no
    # model, so its row takes the body's.
    scanned: list[int] = []
    scan = sse.scan_request

    def counted(body: bytes) -> tuple[str | None, bool, str | None, str | None]:
        scanned.append(len(body))
        return scan(body)

    monkeypatch.setattr(sse, "scan_request", counted)
    session = {"x-claude-code-session-id": "0b7c2f5e-1f0e-4d8b-9a63-3c1e0f1d2a4b"}
    client = anthropic_client(hub, token)
    with client.messages.stream(
        model="claude-opus-4-6", max_tokens=64, messages=[{"role": "user", "content": "hi"}], extra_headers=session,
    ) as stream:
        assert stream.get_final_message().model == "claude-opus-4-6"
    client.messages.create(model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi"}], extra_headers=session)
    assert scanned == []
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(
            model="claude-sonnet-4-6", max_tokens=64, messages=[{"role": "user", "content": "hi"}],
            extra_headers={**session, "x-fake-status": "400"},
        )
    assert len(scanned) == 1
    rows = hub.wait_rows(3)
    assert [(r["status"], r["model"], r["session_id"]) for r in rows] == [
        (200, "claude-opus-4-6", session["x-claude-code-session-id"]),
        (200, "claude-haiku-4-5", session["x-claude-code-session-id"]),
        (400, "claude-sonnet-4-6", session["x-claude-code-session-id"]),
    ]


def test_a_body_is_let_go_once_its_answer_has_begun(
    hub: HubThread, vendor: FakeVendor, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing resends a request once the client has bytes of its answer: a
    # body (up to max_body_bytes) must not live on with a long stream, nor
    # wait for the bookkeeping after an answer that came in one read.
    held: list[int] = []
    record = proxy.Exchange._record

    def counted(self: proxy.Exchange) -> None:
        held.append(self.request.body_size if self.request.parts else 0)
        record(self)

    monkeypatch.setattr(proxy.Exchange, "_record", counted)
    session = {"x-claude-code-session-id": "0b7c2f5e-1f0e-4d8b-9a63-3c1e0f1d2a4b"}
    client = anthropic_client(hub, token)
    with client.messages.stream(
        model="claude-opus-4-6", max_tokens=64, messages=[{"role": "user", "content": "hi"}],
        extra_headers={**session, "x-fake-events": "30", "x-fake-delay-ms": "5"},
    ) as stream:
        assert stream.get_final_message().usage.output_tokens > 0
    client.messages.create(model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi"}], extra_headers=session)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(
            model="claude-sonnet-4-6", max_tokens=64, messages=[{"role": "user", "content": "hi"}],
            extra_headers={**session, "x-fake-status": "400"},
        )
    # The hub records an exchange after the client has its answer: the rows
    # come after _record, so waiting for them orders the check.
    rows = hub.wait_rows(3)
    assert [r["model"] for r in rows] == ["claude-opus-4-6", "claude-haiku-4-5", "claude-sonnet-4-6"]
    assert held == [0, 0, 0]


def test_bearer_token_and_count_tokens_and_models(hub: HubThread, vendor: FakeVendor, token: str) -> None:
    client = anthropic_client(hub, token, auth_token=token, api_key=None)
    count = client.messages.count_tokens(model="claude-sonnet-4-6", messages=[{"role": "user", "content": "hello"}])
    assert count.input_tokens > 0
    models = client.models.list()
    assert [m.id for m in models.data]
    assert {r.path for r in vendor.requests} == {"/v1/messages/count_tokens", "/v1/models"}
    assert all(r.key_header == "x-api-key" and r.header("authorization") is None for r in vendor.requests)
    assert_vendor_saw_only_vendor_key(vendor, token)


def test_models_listing_goes_to_the_upstream_of_the_client_that_asks(tmp_path: Path) -> None:
    """GET /v1/models is both vendors' path: the OpenAI SDK (no
    anthropic-version) must reach the openai upstream and get OpenAI's
    listing and error shape; the Anthropic SDK keeps reaching Anthropic."""
    with FakeVendor() as anthropic_vendor, FakeVendor() as openai_vendor:
        upstreams = [upstreams_for(anthropic_vendor)[0], upstreams_for(openai_vendor)[1]]
        with HubThread(make_config(tmp_path, upstreams)) as hub:
            token = hub.mint("alice")
            listing = openai_client(hub, token).models.list()
            assert [m.id for m in listing.data] == list(OPENAI_MODELS)
            retrieved = openai_client(hub, token).models.retrieve("gpt-5.1")
            assert retrieved.id == "gpt-5.1"
            assert [(r.method, r.path, r.key) for r in openai_vendor.requests] == [
                ("GET", "/v1/models", OPENAI_KEY), ("GET", "/v1/models/gpt-5.1", OPENAI_KEY),
            ]
            assert anthropic_vendor.requests == []

            claude = anthropic_client(hub, token).models.list()
            assert [m.id for m in claude.data] == [m[0] for m in MODELS]
            assert [(r.path, r.key) for r in anthropic_vendor.requests] == [("/v1/models", ANTHROPIC_KEY)]

            with pytest.raises(openai.AuthenticationError) as refused:
                openai_client(hub, "not-a-hub-token").models.list()
            # OpenAI's shape: the SDK finds the message under "error".
            assert isinstance(refused.value.body, dict) and refused.value.body["message"] == "invalid hub token"
            assert len(openai_vendor.requests) == 2


def test_openai_responses_streaming(hub: HubThread, vendor: FakeVendor, token: str) -> None:
    client = openai_client(hub, token)
    stream = client.responses.create(model="gpt-5-codex", input="hello", stream=True, extra_headers={"session_id": "conv-1"})
    events = list(stream)
    completed = [e for e in events if e.type == "response.completed"]
    assert completed and completed[0].response.usage is not None
    usage = completed[0].response.usage
    (req,) = vendor.requests
    assert req.key == OPENAI_KEY and req.key_header == "authorization"
    assert_vendor_saw_only_vendor_key(vendor, token)
    (row,) = hub.wait_rows(1)
    assert row["endpoint"] == "/v1/responses" and row["session_id"] == "conv-1"
    cached = usage.input_tokens_details.cached_tokens
    assert row["input_tokens"] + row["cache_read"] == usage.input_tokens
    assert row["cache_read"] == cached
    assert row["output_tokens"] == usage.output_tokens


def test_openai_chat_streaming_with_usage(hub: HubThread, vendor: FakeVendor, token: str) -> None:
    client = openai_client(hub, token)
    chunks = list(
        client.chat.completions.create(
            model="gpt-5-mini", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True}
        )
    )
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0
    (row,) = hub.wait_rows(1)
    assert row["endpoint"] == "/v1/chat/completions"
    assert row["output_tokens"] == usage.completion_tokens
    assert row["model"] == "gpt-5-mini"
    assert_vendor_saw_only_vendor_key(vendor, token)


def test_missing_and_unknown_token_never_reach_vendor(hub: HubThread, vendor: FakeVendor, token: str) -> None:
    client = anthropic_client(hub, "hc-not-a-real-token")
    with pytest.raises(anthropic.AuthenticationError) as info:
        client.messages.create(**MESSAGES_BODY)  # type: ignore[arg-type]
    assert info.value.status_code == 401
    assert info.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        openai_client(hub, "nope").responses.create(model="gpt-5", input="x")
    with socket.create_connection(("127.0.0.1", hub.port)) as s:
        s.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "authentication_error"
    assert vendor.requests == []


def test_root_probe_and_unknown_path(hub: HubThread, token: str) -> None:
    data = send_raw(hub, b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\nGET / HTTP/1.1\r\nhost: x\r\n\r\nGET /v2/nothing HTTP/1.1\r\nhost: x\r\nx-api-key: " + token.encode() + b"\r\nconnection: close\r\n\r\n")
    assert data.count(b"HTTP/1.1 200 OK") == 2
    assert b"HTTP/1.1 404 Not Found" in data
    body = data.rsplit(b"\r\n\r\n", 1)[1]
    assert json.loads(body)["error"]["type"] == "not_found_error"


def test_upstream_connections_are_pooled(hub: HubThread, vendor: FakeVendor, token: str) -> None:
    client = anthropic_client(hub, token)
    for _ in range(5):
        client.messages.create(**MESSAGES_BODY)  # type: ignore[arg-type]
    assert len(vendor.requests) == 5
    assert vendor.connections_accepted == 1


def test_pooled_connections_close_after_pool_idle_timeout(vendor: FakeVendor, tmp_path: Path) -> None:
    # Closed by the hub before the vendor's edge would close it under a
    # request; and reused while younger than that.
    config = make_config(tmp_path, upstreams_for(vendor, pool_idle_timeout=0.5))
    with HubThread(config) as hub:
        client = anthropic_client(hub, hub.mint())
        client.messages.create(**MESSAGES_BODY)  # type: ignore[arg-type]
        client.messages.create(**MESSAGES_BODY)  # type: ignore[arg-type]
        assert vendor.connections_accepted == 1
        assert vendor.open_connections == 1
        deadline = time.monotonic() + 5
        while vendor.open_connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert vendor.open_connections == 0
        client.messages.create(**MESSAGES_BODY)  # type: ignore[arg-type]
        assert vendor.connections_accepted == 2


def test_upstream_error_passes_through_unchanged(hub: HubThread, vendor: FakeVendor, token: str) -> None:
    client = anthropic_client(hub, token)
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(**MESSAGES_BODY, extra_headers={"x-fake-status": "400"})  # type: ignore[arg-type]
    assert info.value.body["error"]["message"] == "Invalid request"  # type: ignore[index]
    (row,) = hub.wait_rows(1)
    assert row["status"] == 400 and row["outcome"] == "upstream_error"


def test_upstream_unreachable_is_502(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    config = make_config(tmp_path, [{"name": "anthropic", "kind": "anthropic", "base_url": f"http://127.0.0.1:{port}", "keys": ["sk-literal-k1"], "max_attempts": 2}])
    tok = mint(config.server.database)
    with HubThread(config) as h:
        with pytest.raises(anthropic.APIStatusError) as info:
            anthropic_client(h, tok).messages.create(**MESSAGES_BODY)  # type: ignore[arg-type]
        assert info.value.status_code == 502
        assert info.value.response.headers["x-should-retry"] == "false"
        assert "sk-literal-k1" not in info.value.response.text
        (row,) = h.wait_rows(1)
        assert row["outcome"] == "upstream_error" and row["attempts"] == 2


def test_hop_by_hop_headers_not_forwarded(hub: HubThread, vendor: FakeVendor, token: str) -> None:
    """Headers a Connection header names are for this hop only (RFC 9110 7.6.1),
    like the fixed hop-by-hop set; every other header reaches the vendor as sent."""
    body = b'{"model":"claude-sonnet-4-6","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}'
    data = send_raw(
        hub,
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + token.encode()
        + b"\r\nConnection: keep-alive, X-Hop-Secret\r\nX-Hop-Secret: 1\r\nKeep-Alive: timeout=5"
        + b"\r\nConnection: X-Other-Hop\r\nX-Other-Hop: 2\r\nTE: trailers\r\nAnthropic-Version: 2023-06-01"
        + b"\r\nX-End-To-End: kept\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        + body,
    )
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    seen = vendor.requests[-1]
    for name in ("x-hop-secret", "x-other-hop", "keep-alive", "te", "connection"):
        assert seen.header(name) is None, name
    assert seen.header("x-end-to-end") == "kept"
    assert seen.header("anthropic-version") == "2023-06-01"
    assert seen.key_header == "x-api-key"
