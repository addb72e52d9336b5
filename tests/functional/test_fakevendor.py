"""The fake vendor against the official SDKs: wire shapes, usage ledger, keys, failures.

Every end-to-end test trusts this server, so its own tests talk to it directly
with the `anthropic` and `openai` SDKs (no hub in between) and raw sockets.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx2
import openai
import pytest
import trustme

from tests import fakevendor
from tests.fakevendor import (
    ANTHROPIC_KEY,
    BULK_DELTA_BYTES,
    Behaviour,
    OPENAI_KEY,
    CLIENT_GONE,
    COMPLETED,
    ERROR_EVENT,
    ERROR_STATUS,
    HUNG,
    RESET,
    TRUNCATED,
    FakeVendor,
    Usage,
    anthropic_event_names,
    chat_event_names,
    client_ssl_context,
    expected_text,
    responses_event_names,
    running_vendor,
)

ROOT = Path(__file__).resolve().parents[2]
MESSAGES: list[anthropic.types.MessageParam] = [{"role": "user", "content": "hello"}]
FULL_USAGE = {
    "input_tokens": 120,
    "output_tokens": 40,
    "cache_read": 900,
    "cache_write_5m": 30,
    "cache_write_1h": 70,
    "reasoning": 12,
}
OPENAI_USAGE = {"input_tokens": 1000, "output_tokens": 50, "cache_read": 800, "reasoning": 20}
# What OPENAI_USAGE means in the hub's convention: input is uncached input.
OPENAI_USAGE_HUB = Usage(input=200, output=50, cache_read=800, reasoning=20)
KEYS: dict[str, Behaviour] = {ANTHROPIC_KEY: "ok", OPENAI_KEY: "ok", "sk-limited": 429, "sk-forbidden": 403, "sk-reset": "reset", "sk-hang": "hang"}


def usage_header(**numbers: int) -> dict[str, str]:
    return {"x-fake-usage": json.dumps(numbers)}


@pytest.fixture
def vendor() -> Iterator[FakeVendor]:
    with running_vendor(KEYS) as v:
        yield v


@pytest.fixture
def claude(vendor: FakeVendor) -> Iterator[anthropic.Anthropic]:
    client = anthropic.Anthropic(base_url=vendor.url, api_key=ANTHROPIC_KEY, max_retries=0, timeout=10)
    with client:
        yield client


@pytest.fixture
def oai(vendor: FakeVendor) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=vendor.url + "/v1", api_key=OPENAI_KEY, max_retries=0, timeout=10)
    with client:
        yield client


# -- Anthropic Messages ----------------------------------------------------------


def test_messages_stream_usage_equals_the_ledger(vendor: FakeVendor, claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model="claude-opus-4-6", max_tokens=64, messages=MESSAGES, extra_headers=usage_header(**FULL_USAGE)
    ) as stream:
        message = stream.get_final_message()

    assert message.model == "claude-opus-4-6"
    assert message.content[0].type == "text" and message.content[0].text == expected_text()
    usage = message.usage
    assert (usage.input_tokens, usage.output_tokens) == (120, 40)
    assert (usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (900, 100)
    assert usage.cache_creation is not None
    assert (usage.cache_creation.ephemeral_5m_input_tokens, usage.cache_creation.ephemeral_1h_input_tokens) == (30, 70)
    vendor.wait_idle()
    expected = Usage(input=120, output=40, cache_read=900, cache_write_5m=30, cache_write_1h=70, reasoning=12)
    assert vendor.sent_usage == expected
    (request,) = vendor.requests
    assert (request.outcome, request.status, request.key, request.vendor) == (COMPLETED, 200, ANTHROPIC_KEY, "anthropic")
    assert request.events_sent == len(anthropic_event_names())


def test_messages_stream_bytes_look_like_the_recorded_fixtures(vendor: FakeVendor) -> None:
    with httpx2.Client() as http:
        response = http.post(
            vendor.url + "/v1/messages?beta=true",
            headers={"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01", "x-fake-events": "2"},
            content=b'{"model":"claude-haiku-4-5","stream":true,"max_tokens":5}',
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["request-id"].startswith("req_")
    blocks = response.content.decode().split("\n\n")
    assert blocks[-1] == ""
    names = [block.split("\n")[0].removeprefix("event: ") for block in blocks[:-1]]
    assert names == anthropic_event_names(2)
    for block in blocks[:-1]:
        event_line, data_line = block.split("\n")
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == event_line.removeprefix("event: ")
    start = json.loads(blocks[0].split("\n")[1][6:])
    assert start["message"]["model"] == "claude-haiku-4-5"
    assert set(start["message"]["usage"]["cache_creation"]) == {"ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens"}
    assert blocks[2] == 'event: ping\ndata: {"type": "ping"}'
    assert vendor.requests[0].target == "/v1/messages?beta=true"


def test_messages_non_stream_default_usage_comes_from_the_body_size(
    vendor: FakeVendor, claude: anthropic.Anthropic
) -> None:
    message = claude.messages.create(
        model="claude-sonnet-4-6", max_tokens=16, messages=MESSAGES, extra_headers={"x-fake-events": "3"}
    )
    request = vendor.requests[0]
    assert message.usage.input_tokens == len(request.body) // 4 + 1
    assert message.usage.output_tokens == len(expected_text(3)) // 4 + 1
    assert message.content[0].type == "text" and message.content[0].text == expected_text(3)
    vendor.wait_idle()
    assert vendor.sent_usage == Usage(input=message.usage.input_tokens, output=message.usage.output_tokens)


def test_count_tokens_and_models_send_no_usage(vendor: FakeVendor, claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(model="claude-opus-4-6", messages=MESSAGES)
    assert counted.input_tokens == len(vendor.requests[0].body) // 4 + 1
    models = list(claude.models.list())
    assert [model.id for model in models][0] == "claude-opus-4-6"
    assert all(model.type == "model" and model.display_name for model in models)
    vendor.wait_idle()
    assert vendor.sent_usage == Usage()
    assert [r.path for r in vendor.requests] == ["/v1/messages/count_tokens", "/v1/models"]


def test_messages_require_anthropic_version(vendor: FakeVendor) -> None:
    with httpx2.Client() as http:
        response = http.post(
            vendor.url + "/v1/messages", headers={"x-api-key": ANTHROPIC_KEY}, content=b'{"model":"m"}'
        )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


# -- OpenAI Responses and Chat ---------------------------------------------------


def test_responses_stream_helper_gives_the_usage(vendor: FakeVendor, oai: openai.OpenAI) -> None:
    with oai.responses.stream(model="gpt-5-codex", input="hi", extra_headers=usage_header(**OPENAI_USAGE)) as stream:
        response = stream.get_final_response()
    assert response.model == "gpt-5-codex"
    assert response.output_text == expected_text()
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (1000, 50)
    assert response.usage.input_tokens_details.cached_tokens == 800
    assert response.usage.output_tokens_details.reasoning_tokens == 20
    vendor.wait_idle()
    assert vendor.sent_usage == OPENAI_USAGE_HUB
    assert vendor.requests[0].key == OPENAI_KEY


def test_responses_raw_stream_numbers_every_event(vendor: FakeVendor, oai: openai.OpenAI) -> None:
    events = list(oai.responses.create(model="gpt-5", input="hi", stream=True, extra_headers={"x-fake-events": "4"}))
    assert [event.type for event in events] == responses_event_names(4)
    assert [event.sequence_number for event in events] == list(range(len(events)))
    final = events[-1]
    assert final.type == "response.completed" and final.response.usage is not None
    assert final.response.usage.input_tokens == len(vendor.requests[0].body) // 4 + 1


def test_responses_non_stream(vendor: FakeVendor, oai: openai.OpenAI) -> None:
    response = oai.responses.create(model="gpt-5", input="hi", extra_headers=usage_header(**OPENAI_USAGE))
    assert response.output_text == expected_text()
    assert response.usage is not None and response.usage.input_tokens == 1000
    vendor.wait_idle()
    assert vendor.sent_usage == OPENAI_USAGE_HUB


def test_chat_stream_with_include_usage_gives_the_usage(vendor: FakeVendor, oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(
            model="gpt-5-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=usage_header(**OPENAI_USAGE),
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected_text()
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (1000, 50, 1050)
    assert last.usage.prompt_tokens_details is not None and last.usage.prompt_tokens_details.cached_tokens == 800
    vendor.wait_idle()
    assert vendor.sent_usage == OPENAI_USAGE_HUB
    assert vendor.requests[0].events_sent == len(chat_event_names())


def test_chat_stream_without_include_usage_sends_no_usage(vendor: FakeVendor, oai: openai.OpenAI) -> None:
    chunks = list(oai.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert all(chunk.usage is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    vendor.wait_idle()
    assert vendor.requests[0].outcome == COMPLETED
    assert vendor.sent_usage == Usage()


def test_chat_non_stream(vendor: FakeVendor, oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(
        model="gpt-5", messages=[{"role": "user", "content": "hi"}], extra_headers=usage_header(**OPENAI_USAGE)
    )
    assert completion.choices[0].message.content == expected_text()
    assert completion.usage is not None and completion.usage.prompt_tokens == 1000
    vendor.wait_idle()
    assert vendor.sent_usage == OPENAI_USAGE_HUB


# -- keys and error shapes -------------------------------------------------------


def test_a_429_key_gives_rate_limit_error_with_retry_after(vendor: FakeVendor) -> None:
    vendor.retry_after = 7
    client = anthropic.Anthropic(base_url=vendor.url, api_key="sk-limited", max_retries=0)
    with client, pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(model="m", max_tokens=1, messages=MESSAGES)
    headers = caught.value.response.headers
    assert headers["retry-after"] == "7"
    reset_at = datetime.datetime.fromisoformat(headers["anthropic-ratelimit-requests-reset"])
    seconds_ahead = (reset_at - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    assert 5 <= seconds_ahead <= 9
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert body["request_id"] == headers["request-id"]
    assert vendor.hits["sk-limited"] == 1 and vendor.hits[ANTHROPIC_KEY] == 0


@pytest.mark.parametrize(
    ("key", "status_header", "error", "error_type"),
    [
        ("sk-unknown", None, anthropic.AuthenticationError, "authentication_error"),
        ("sk-forbidden", None, anthropic.PermissionDeniedError, "permission_error"),
        (ANTHROPIC_KEY, "500", anthropic.InternalServerError, "api_error"),
        (ANTHROPIC_KEY, "529", anthropic.OverloadedError, "overloaded_error"),
    ],
)
def test_anthropic_error_shapes(
    vendor: FakeVendor, key: str, status_header: str | None, error: type[Exception], error_type: str
) -> None:
    headers = {"x-fake-status": status_header} if status_header else {}
    client = anthropic.Anthropic(base_url=vendor.url, api_key=key, max_retries=0)
    with client, pytest.raises(error) as caught:
        client.messages.create(model="m", max_tokens=1, messages=MESSAGES, extra_headers=headers)
    assert isinstance(caught.value, anthropic.APIStatusError)
    body = caught.value.response.json()
    assert set(body) == {"type", "error", "request_id"}
    assert body["error"]["type"] == error_type
    vendor.wait_idle()
    assert vendor.requests[0].outcome == ERROR_STATUS
    assert vendor.sent_usage == Usage()


@pytest.mark.parametrize(
    ("key", "status_header", "error", "code"),
    [
        ("sk-unknown", None, openai.AuthenticationError, "invalid_api_key"),
        (OPENAI_KEY, "429", openai.RateLimitError, "rate_limit_exceeded"),
        (OPENAI_KEY, "500", openai.InternalServerError, None),
    ],
)
def test_openai_error_shapes(
    vendor: FakeVendor, key: str, status_header: str | None, error: type[Exception], code: str | None
) -> None:
    headers = {"x-fake-status": status_header} if status_header else {}
    client = openai.OpenAI(base_url=vendor.url + "/v1", api_key=key, max_retries=0)
    with client, pytest.raises(error) as caught:
        client.responses.create(model="gpt-5", input="hi", extra_headers=headers)
    assert isinstance(caught.value, openai.APIStatusError)
    assert caught.value.response.headers["x-request-id"].startswith("req_")
    body = caught.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code


def test_reset_key_closes_without_an_answer(vendor: FakeVendor) -> None:
    client = anthropic.Anthropic(base_url=vendor.url, api_key="sk-reset", max_retries=0)
    with client, pytest.raises(anthropic.APIConnectionError):
        client.messages.create(model="m", max_tokens=1, messages=MESSAGES)
    vendor.wait_idle()
    assert vendor.requests[0].outcome == RESET and vendor.requests[0].status is None


def test_hang_key_never_answers_until_the_client_gives_up(vendor: FakeVendor) -> None:
    client = anthropic.Anthropic(base_url=vendor.url, api_key="sk-hang", max_retries=0, timeout=0.3)
    with client, pytest.raises(anthropic.APITimeoutError):
        client.messages.create(model="m", max_tokens=1, messages=MESSAGES)
    vendor.wait_idle()  # the client's hang-up ends the cycle
    assert vendor.requests[0].outcome == HUNG


def test_key_behaviour_changes_and_reset_forgets(vendor: FakeVendor, claude: anthropic.Anthropic) -> None:
    claude.models.list()
    vendor.set_key_behaviour(ANTHROPIC_KEY, 529)
    with pytest.raises(anthropic.OverloadedError):
        claude.models.list()
    assert vendor.hits[ANTHROPIC_KEY] == 2
    vendor.reset()
    assert vendor.requests == [] and vendor.hits[ANTHROPIC_KEY] == 0
    with pytest.raises(ValueError):
        vendor.set_key_behaviour(ANTHROPIC_KEY, "sometimes")  # type: ignore[arg-type]


# -- connections, TLS, failures --------------------------------------------------


def test_keep_alive_serves_many_requests_on_one_connection(vendor: FakeVendor, claude: anthropic.Anthropic) -> None:
    for _ in range(3):
        claude.messages.create(model="m", max_tokens=1, messages=MESSAGES)
        with claude.messages.stream(model="m", max_tokens=1, messages=MESSAGES) as stream:
            stream.get_final_message()
    vendor.wait_idle()
    assert len(vendor.requests) == 6
    assert vendor.connections_accepted == 1
    assert {r.connection_id for r in vendor.requests} == {vendor.requests[0].connection_id}


def test_tls_mode_with_the_sdk() -> None:
    ca = trustme.CA()
    with running_vendor(tls=ca) as vendor, httpx2.Client(verify=client_ssl_context(ca)) as http:
        assert vendor.url.startswith("https://localhost:")
        client = anthropic.Anthropic(base_url=vendor.url, api_key=ANTHROPIC_KEY, max_retries=0, http_client=http)
        with client.messages.stream(model="m", max_tokens=1, messages=MESSAGES, extra_headers=usage_header(output_tokens=9)) as stream:
            assert stream.get_final_message().usage.output_tokens == 9
        client.messages.create(model="m", max_tokens=1, messages=MESSAGES)
        vendor.wait_idle()
        assert vendor.connections_accepted == 1 and len(vendor.requests) == 2


def test_fail_after_message_start_sends_message_start_usage(vendor: FakeVendor, claude: anthropic.Anthropic) -> None:
    headers = {"x-fake-fail-after": "1", **usage_header(**FULL_USAGE)}
    # Older SDKs let a mid-stream transport error through, newer ones wrap it.
    with pytest.raises((httpx2.TransportError, anthropic.APIConnectionError)):
        with claude.messages.stream(model="m", max_tokens=1, messages=MESSAGES, extra_headers=headers) as stream:
            stream.get_final_message()
    vendor.wait_idle()
    (request,) = vendor.requests
    assert (request.outcome, request.events_sent) == (TRUNCATED, 1)
    # message_start carries input and cache classes and a placeholder output of 1; no reasoning yet.
    assert vendor.sent_usage == Usage(input=120, output=1, cache_read=900, cache_write_5m=30, cache_write_1h=70)


@pytest.mark.parametrize("mode", ["reset", "close"])
def test_fail_after_cuts_an_openai_stream(vendor: FakeVendor, oai: openai.OpenAI, mode: str) -> None:
    headers = {"x-fake-fail-after": "6", "x-fake-fail-mode": mode}
    with pytest.raises(openai.APIConnectionError):
        with oai.responses.stream(model="gpt-5", input="hi", extra_headers=headers) as stream:
            stream.get_final_response()
    vendor.wait_idle()
    assert (vendor.requests[0].outcome, vendor.requests[0].events_sent) == (TRUNCATED, 6)
    assert vendor.sent_usage == Usage()  # Responses usage only travels in response.completed


def test_error_event_mode_raises_in_the_sdk(vendor: FakeVendor, claude: anthropic.Anthropic) -> None:
    headers = {"x-fake-fail-after": "4", "x-fake-fail-mode": "error-event"}
    with pytest.raises(anthropic.APIStatusError) as caught:
        with claude.messages.stream(model="m", max_tokens=1, messages=MESSAGES, extra_headers=headers) as stream:
            stream.get_final_message()
    assert caught.value.body == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    vendor.wait_idle()
    assert vendor.requests[0].outcome == ERROR_EVENT


def test_error_event_mode_ends_the_body_cleanly(vendor: FakeVendor) -> None:
    headers = {
        "x-api-key": ANTHROPIC_KEY,
        "anthropic-version": "2023-06-01",
        "x-fake-fail-after": "4",
        "x-fake-fail-mode": "error-event",
    }
    with httpx2.Client() as http:
        first = http.post(vendor.url + "/v1/messages", headers=headers, content=b'{"model":"m","stream":true}')
        second = http.post(vendor.url + "/v1/messages", headers=headers, content=b'{"model":"m","stream":true}')
    for response in (first, second):
        events = response.content.decode().split("\n\n")[:-1]
        assert len(events) == 5 and events[-1].startswith("event: error\n")
    vendor.wait_idle()
    assert vendor.connections_accepted == 1


def test_error_event_mode_in_chat_raises_api_error(vendor: FakeVendor, oai: openai.OpenAI) -> None:
    headers = {"x-fake-fail-after": "2", "x-fake-fail-mode": "error-event"}
    with pytest.raises(openai.APIError):
        list(oai.chat.completions.create(model="gpt-5", messages=[], stream=True, extra_headers=headers))


def test_bulk_stream_respects_backpressure(vendor: FakeVendor) -> None:
    size = 32 * 1024 * 1024
    headers = {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01", "x-fake-bytes": str(size)}
    with httpx2.Client(timeout=10) as http, http.stream(
        "POST", vendor.url + "/v1/messages", headers=headers, content=b'{"model":"m","stream":true}'
    ) as response:
        chunks = response.iter_raw(64 * 1024)
        received = len(next(chunks))
        # Stop reading until the fake stops writing: it must wait for us, not buffer the rest.
        request = vendor.requests[0]
        before, deadline = -1, time.monotonic() + 5
        while request.events_sent != before and time.monotonic() < deadline:
            before = request.events_sent
            time.sleep(0.1)
        assert request.events_sent * BULK_DELTA_BYTES < size / 2
        tail = b""
        for chunk in chunks:
            received += len(chunk)
            tail = (tail + chunk)[-200:]
    assert received > size
    assert tail.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    vendor.wait_idle()
    assert vendor.requests[0].outcome == COMPLETED
    assert vendor.sent_usage.output == size // 4 + 1


def test_client_hanging_up_mid_stream_is_recorded(vendor: FakeVendor) -> None:
    headers = {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01", "x-fake-delay-ms": "50", "x-fake-events": "50"}
    with httpx2.Client(timeout=10) as http, http.stream(
        "POST", vendor.url + "/v1/messages", headers=headers, content=b'{"model":"m","stream":true}'
    ) as response:
        next(response.iter_raw())
    vendor.wait_idle()
    assert vendor.requests[0].outcome == CLIENT_GONE
    assert 1 <= vendor.requests[0].events_sent < len(anthropic_event_names(50))


def test_malformed_http_is_a_recorded_protocol_error() -> None:
    vendor = FakeVendor()
    with vendor, socket.create_connection(("127.0.0.1", vendor.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert len(vendor.protocol_errors) == 1 and vendor.requests == []
    with pytest.raises(AssertionError, match="protocol error"):
        vendor.check()


def test_bad_scenario_header_is_answered_400_and_recorded(vendor: FakeVendor, claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model="m", max_tokens=1, messages=MESSAGES, extra_headers=usage_header(tokens=3))
    assert len(vendor.scenario_errors) == 1
    with pytest.raises(AssertionError, match="unknown field 'tokens'"):
        vendor.check()
    vendor.reset()


async def test_async_sdk_from_an_event_loop(vendor: FakeVendor) -> None:
    client = anthropic.AsyncAnthropic(base_url=vendor.url, api_key=ANTHROPIC_KEY, max_retries=0)
    async with client:
        async with client.messages.stream(
            model="m", max_tokens=1, messages=MESSAGES, extra_headers={"x-fake-delay-ms": "1"}
        ) as stream:
            message = await stream.get_final_message()
    assert message.content[0].type == "text" and message.content[0].text == expected_text()


def test_standalone_server_prints_its_port_and_stops_on_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakevendor", "--port", "0", "--print-port"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key="sk-any", max_retries=0)
        with client:
            assert client.messages.create(model="m", max_tokens=1, messages=MESSAGES).content
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


def test_stop_ends_hanging_requests_and_leaves_no_thread() -> None:
    errors: list[BaseException] = []
    vendor = FakeVendor(KEYS)
    with vendor:
        client = anthropic.Anthropic(base_url=vendor.url, api_key="sk-hang", max_retries=0, timeout=10)

        def call() -> None:
            try:
                client.messages.create(model="m", max_tokens=1, messages=MESSAGES)
            except anthropic.APIConnectionError as exc:
                errors.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        vendor.wait_for_requests(1)
    caller.join(5)
    client.close()
    assert not caller.is_alive() and len(errors) == 1
    assert not [t for t in threading.enumerate() if t.name.startswith("fakevendor-")]
    assert vendor.requests[0].outcome == HUNG and vendor.open_connections == 0


def test_fail_after_on_a_non_streaming_answer_cuts_its_body(vendor: FakeVendor, claude: anthropic.Anthropic) -> None:
    with pytest.raises((anthropic.APIConnectionError, httpx2.TransportError)):
        claude.messages.create(model="m", max_tokens=1, messages=MESSAGES, extra_headers={"x-fake-fail-after": "0"})
    vendor.wait_idle()
    assert vendor.requests[0].outcome == TRUNCATED
    assert vendor.sent_usage == Usage()


def test_a_bug_in_the_fake_fails_check(vendor: FakeVendor, claude: anthropic.Anthropic, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> Iterator[tuple[bytes, Usage | None]]:
        raise KeyError("boom")

    monkeypatch.setattr(fakevendor, "_anthropic_stream", broken)
    with pytest.raises((anthropic.APIConnectionError, httpx2.TransportError)):
        with claude.messages.stream(model="m", max_tokens=1, messages=MESSAGES) as stream:
            stream.get_final_message()
    vendor.wait_idle()
    with pytest.raises(AssertionError, match="fake vendor bug.*boom"):
        vendor.check()
    vendor.reset()
