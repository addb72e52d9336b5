"""The accounting invariant end to end: a few hundred mixed requests through a
real hub, and the database holds exactly what the fake vendor says it sent,
class by class and request by request, one row each, correctly priced."""
from __future__ import annotations

import dataclasses
import http.client
import logging
import random
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest

from hubcore.accounting.pricing import PriceTable, reference_price
from tests.conftest import upstreams_for
from tests.fakevendor import (
    FakeVendor,
    Usage,
    anthropic_event_names,
    chat_event_names,
    responses_event_names,
)
from tests.hubharness import HubThread, make_config

SEED = 20260301
WORKERS = 16
# A stalled upstream stream is given up after this many seconds without a byte.
STREAM_IDLE_TIMEOUT = 1.0
SEQ_HEADER = "x-test-seq"
SESSION_HEADER = {"anthropic": "x-claude-code-session-id", "openai": "session_id"}
PRICED_CLAUDE = ("claude-sonnet-4-6", "claude-opus-4-6", "claude-haiku-4-5")
PRICED_GPT = ("gpt-5", "gpt-5-codex", "gpt-5-mini")
UNPRICED_CLAUDE = "claude-nova-1"
UNPRICED_GPT = "gpt-unpriced-1"
TOKEN_COLUMNS = {
    "input": "input_tokens",
    "output": "output_tokens",
    "cache_read": "cache_read",
    "cache_write_5m": "cache_write_5m",
    "cache_write_1h": "cache_write_1h",
    "reasoning": "reasoning_tokens",
}


@dataclass
class Call:
    """One request of the mix: what to send and what the hub should record."""

    seq: int
    kind: str                      # how it is sent (see RUNNERS)
    model: str
    headers: dict[str, str]
    outcome: str                   # the row's expected outcome
    status: int = 200
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Answer:
    seq: int
    request_id: str
    status: int


# -- the mix -------------------------------------------------------------------------

def claude_usage(rng: random.Random) -> dict[str, int]:
    output = rng.randint(1, 4000)
    usage = {
        "input_tokens": rng.randint(1, 3000),
        "output_tokens": output,
        "cache_read": rng.choice((0, rng.randint(1000, 180_000))),
        "cache_write_5m": rng.choice((0, 0, rng.randint(100, 40_000))),
        "cache_write_1h": rng.choice((0, 0, rng.randint(100, 40_000))),
        "reasoning": rng.choice((0, rng.randint(0, output))),
    }
    return usage


def gpt_usage(rng: random.Random) -> dict[str, int]:
    prompt = rng.randint(10, 120_000)
    output = rng.randint(1, 4000)
    return {
        "input_tokens": prompt,
        "output_tokens": output,
        "cache_read": rng.choice((0, rng.randint(0, prompt))),
        "reasoning": rng.choice((0, rng.randint(0, output))),
    }


def build_mix(rng: random.Random) -> list[Call]:
    calls: list[Call] = []

    def add(kind: str, n: int, vendor: str, outcome: str = "ok", status: int = 200,
            headers: dict[str, str] | None = None, **extra: Any) -> None:
        for i in range(n):
            if vendor == "anthropic":
                model = UNPRICED_CLAUDE if i % 7 == 3 else rng.choice(PRICED_CLAUDE)
                usage = claude_usage(rng)
            else:
                model = UNPRICED_GPT if i % 7 == 3 else rng.choice(PRICED_GPT)
                usage = gpt_usage(rng)
            h = {"x-fake-usage": orjson.dumps(usage).decode(), "x-fake-events": str(rng.randint(1, 8))}
            if rng.random() < 0.5:
                # Named as Claude Code and Codex name their sessions: the hub
                # then reads the row's model from the answer, or from the
                # body only when no answer names it (errors, cut streams).
                h[SESSION_HEADER[vendor]] = f"5d0c7a4e-1b2f-4c3d-9e8f-{rng.getrandbits(48):012x}"
            h.update(headers or {})
            calls.append(Call(len(calls), kind, model, h, outcome, status, dict(extra)))

    # Complete requests through the official SDKs.
    add("messages", 50, "anthropic")
    add("messages_stream", 65, "anthropic")
    add("count_tokens", 5, "anthropic")
    add("responses", 20, "openai")
    add("responses_stream", 35, "openai")
    add("chat", 15, "openai")
    add("chat_stream", 25, "openai")
    add("chat_stream_no_usage", 5, "openai")
    add("messages", 5, "anthropic", outcome="upstream_error", status=400, headers={"x-fake-status": "400"})

    # Clients that hang up mid-stream. Either after the event that carries the
    # final usage (the hub has metered it: the client read it from the hub),
    # or early in a long, slow stream, when the next usage-bearing event is
    # hundreds of milliseconds away from being sent.
    slow_tail = {"x-fake-events": "2", "x-fake-delay-ms": "300"}
    long_slow = {"x-fake-events": "40", "x-fake-delay-ms": "25"}
    add("raw_stream", 10, "anthropic", outcome="client_aborted", headers=slow_tail,
        path="/v1/messages", abort_after=("message_delta", 1))
    add("raw_stream", 10, "anthropic", outcome="client_aborted", headers=long_slow,
        path="/v1/messages", abort_after=("content_block_delta", 2))
    add("raw_stream", 8, "openai", outcome="client_aborted", headers=long_slow,
        path="/v1/responses", abort_after=("response.output_text.delta", 2))
    add("raw_stream", 6, "openai", outcome="client_aborted", headers=long_slow,
        path="/v1/chat/completions", abort_after=("data", 3))

    # Upstream streams that die part-way, at every interesting point, in every way.
    events = 5
    cut_points = {
        "/v1/messages": (
            1,                                                        # message_start only
            4,                                                        # mid content
            anthropic_event_names(events).index("message_delta") + 1,  # final usage, no message_stop
            len(anthropic_event_names(events)),                        # everything, then no end
        ),
        "/v1/responses": (3, len(responses_event_names(events)) - 1, len(responses_event_names(events))),
        "/v1/chat/completions": (2, chat_event_names(events).index("usage") + 1, len(chat_event_names(events))),
    }
    for path, points in cut_points.items():
        vendor = "anthropic" if path == "/v1/messages" else "openai"
        for point in points:
            for mode in ("reset", "close", "error-event", "stall"):
                if mode == "error-event" and point == max(points):
                    continue  # an error after a complete stream is not a failed stream
                add("raw_stream", 1, vendor, outcome="upstream_aborted",
                    headers={"x-fake-events": str(events), "x-fake-fail-after": str(point), "x-fake-fail-mode": mode},
                    path=path)
    # Non-streaming answers cut in the middle of the body carry no usage.
    for path, vendor in (("/v1/messages", "anthropic"), ("/v1/responses", "openai"), ("/v1/chat/completions", "openai")):
        for mode in ("reset", "close"):
            add("raw_json", 1, vendor, outcome="upstream_aborted",
                headers={"x-fake-fail-after": "1", "x-fake-fail-mode": mode}, path=path)
    rng.shuffle(calls)
    return calls


# -- sending -------------------------------------------------------------------------

class Clients:
    def __init__(self, hub: HubThread, token: str) -> None:
        self.port = hub.port
        self.token = token
        self.anthropic = anthropic.Anthropic(base_url=hub.url, api_key=token, max_retries=0, timeout=30)
        self.openai = openai.OpenAI(base_url=hub.url + "/v1", api_key=token, max_retries=0, timeout=30)

    def close(self) -> None:
        self.anthropic.close()
        self.openai.close()


def headers_of(call: Call) -> dict[str, str]:
    return {**call.headers, SEQ_HEADER: str(call.seq)}


def send(clients: Clients, call: Call) -> Answer:
    return RUNNERS[call.kind](clients, call)


def run_messages(c: Clients, call: Call) -> Answer:
    raw = c.anthropic.messages.with_raw_response.create(
        model=call.model, max_tokens=64, messages=[{"role": "user", "content": f"hello {call.seq}"}],
        extra_headers=headers_of(call),
    ) if call.status == 200 else None
    if raw is None:
        with pytest.raises(anthropic.BadRequestError) as info:
            c.anthropic.messages.create(
                model=call.model, max_tokens=64, messages=[{"role": "user", "content": "x"}], extra_headers=headers_of(call)
            )
        response = info.value.response
        return Answer(call.seq, response.headers["x-hubcore-request-id"], response.status_code)
    message = raw.parse()
    assert message.usage.output_tokens == orjson.loads(call.headers["x-fake-usage"])["output_tokens"]
    return Answer(call.seq, raw.headers["x-hubcore-request-id"], raw.status_code)


def run_messages_stream(c: Clients, call: Call) -> Answer:
    stream = c.anthropic.messages.create(
        model=call.model, max_tokens=64, messages=[{"role": "user", "content": f"stream {call.seq}"}],
        stream=True, extra_headers=headers_of(call),
    )
    with stream:
        types = [event.type for event in stream]
    assert types[0] == "message_start" and types[-1] == "message_stop"
    return Answer(call.seq, stream.response.headers["x-hubcore-request-id"], stream.response.status_code)


def run_count_tokens(c: Clients, call: Call) -> Answer:
    raw = c.anthropic.messages.with_raw_response.count_tokens(
        model=call.model, messages=[{"role": "user", "content": "count me"}], extra_headers=headers_of(call)
    )
    assert raw.parse().input_tokens > 0
    return Answer(call.seq, raw.headers["x-hubcore-request-id"], raw.status_code)


def run_responses(c: Clients, call: Call) -> Answer:
    raw = c.openai.responses.with_raw_response.create(model=call.model, input=f"hi {call.seq}", extra_headers=headers_of(call))
    assert raw.parse().usage is not None
    return Answer(call.seq, raw.headers["x-hubcore-request-id"], raw.status_code)


def run_responses_stream(c: Clients, call: Call) -> Answer:
    stream = c.openai.responses.create(model=call.model, input=f"hi {call.seq}", stream=True, extra_headers=headers_of(call))
    with stream:
        types = [event.type for event in stream]
    assert types[-1] == "response.completed"
    return Answer(call.seq, stream.response.headers["x-hubcore-request-id"], stream.response.status_code)


def run_chat(c: Clients, call: Call) -> Answer:
    raw = c.openai.chat.completions.with_raw_response.create(
        model=call.model, messages=[{"role": "user", "content": "hi"}], extra_headers=headers_of(call)
    )
    assert raw.parse().usage is not None
    return Answer(call.seq, raw.headers["x-hubcore-request-id"], raw.status_code)


def run_chat_stream(c: Clients, call: Call, include_usage: bool = True) -> Answer:
    stream = c.openai.chat.completions.create(
        model=call.model, messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": include_usage},
        extra_headers=headers_of(call),
    )
    with stream:
        chunks = list(stream)
    assert (chunks[-1].usage is not None) == include_usage
    return Answer(call.seq, stream.response.headers["x-hubcore-request-id"], stream.response.status_code)


def request_body(call: Call, stream: bool) -> bytes:
    path = call.extra["path"]
    if path == "/v1/messages":
        body: dict[str, Any] = {"model": call.model, "max_tokens": 64, "messages": [{"role": "user", "content": "raw"}]}
    elif path == "/v1/responses":
        body = {"model": call.model, "input": "raw"}
    else:
        body = {"model": call.model, "messages": [{"role": "user", "content": "raw"}]}
        if stream:
            body["stream_options"] = {"include_usage": True}
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


def sse_events(response: http.client.HTTPResponse) -> Iterator[str]:
    """Yield each SSE event's name (or "data" for Chat chunks) as it completes."""
    name = ""
    while True:
        line = response.readline()
        if not line:
            return
        line = line.rstrip(b"\r\n")
        if line.startswith(b"event:"):
            name = line[6:].strip().decode()
        elif line.startswith(b"data:") and not name:
            name = "data"
        elif not line and name:
            yield name
            name = ""


def run_raw(c: Clients, call: Call, stream: bool) -> Answer:
    """Plain HTTP, so the test decides when to hang up and sees cut streams as they are."""
    conn = http.client.HTTPConnection("127.0.0.1", c.port, timeout=30)
    try:
        conn.request(
            "POST", call.extra["path"], request_body(call, stream),
            {"authorization": f"Bearer {c.token}", "content-type": "application/json",
             "anthropic-version": "2023-06-01", **headers_of(call)},
        )
        sock = conn.sock
        assert sock is not None
        response = conn.getresponse()
        request_id = response.getheader("x-hubcore-request-id") or ""
        abort_after = call.extra.get("abort_after")
        seen: list[str] = []
        try:
            if not stream:
                response.read()
            for name in sse_events(response) if stream else ():
                seen.append(name)
                if abort_after is not None and seen.count(abort_after[0]) >= abort_after[1]:
                    sock.shutdown(socket.SHUT_RDWR)
                    break
        except (http.client.IncompleteRead, ConnectionError):
            pass  # an upstream cut the hub could only pass on by closing
        if abort_after is not None:
            assert seen.count(abort_after[0]) == abort_after[1], (call, seen)
        elif stream and call.outcome == "upstream_aborted":
            # The vendor's own error event, or the one the hub adds to a cut
            # stream (Chat's vendor error is a bare data chunk).
            assert seen and seen[-1] in ("error", "data" if call.extra["path"] == "/v1/chat/completions" else "error"), (call, seen)
        return Answer(call.seq, request_id, response.status)
    finally:
        conn.close()


def run_chat_stream_no_usage(c: Clients, call: Call) -> Answer:
    return run_chat_stream(c, call, include_usage=False)


def run_raw_stream(c: Clients, call: Call) -> Answer:
    return run_raw(c, call, stream=True)


def run_raw_json(c: Clients, call: Call) -> Answer:
    return run_raw(c, call, stream=False)


RUNNERS: dict[str, Callable[[Clients, Call], Answer]] = {
    "messages": run_messages,
    "messages_stream": run_messages_stream,
    "count_tokens": run_count_tokens,
    "responses": run_responses,
    "responses_stream": run_responses_stream,
    "chat": run_chat,
    "chat_stream": run_chat_stream,
    "chat_stream_no_usage": run_chat_stream_no_usage,
    "raw_stream": run_raw_stream,
    "raw_json": run_raw_json,
}


# -- the test ----------------------------------------------------------------------------

def vendor_usage_of(vendor: FakeVendor, seq: int) -> Usage:
    """The usage the vendor put on the wire for request number `seq`."""
    (request,) = [r for r in vendor.requests if int(r.header(SEQ_HEADER) or -1) == seq]
    return request.sent


def row_usage(row: dict[str, Any]) -> Usage:
    return Usage(**{cls: row[column] for cls, column in TOKEN_COLUMNS.items()})


@pytest.fixture
def accounting_hub(vendor: FakeVendor, tmp_path: Path) -> Iterator[HubThread]:
    # The run injects in-stream vendor errors on purpose; with one key per
    # vendor they must not open its circuit (they count against the key),
    # or later requests would be refused instead of metered.
    config = make_config(tmp_path, upstreams_for(
        vendor, stream_idle_timeout=STREAM_IDLE_TIMEOUT, max_attempts=1, circuit_threshold=1_000_000,
    ))
    with HubThread(config) as h:
        yield h


def test_database_totals_equal_what_the_vendor_sent(
    accounting_hub: HubThread, vendor: FakeVendor, caplog: pytest.LogCaptureFixture
) -> None:
    hub = accounting_hub
    token = hub.mint("acct", "ledger")
    assert hub.app is not None
    calls = build_mix(random.Random(SEED))
    assert len(calls) >= 300

    clients = Clients(hub, token)
    try:
        with ThreadPoolExecutor(WORKERS) as pool:
            answers = list(pool.map(lambda call: send(clients, call), calls))
    finally:
        clients.close()
    vendor.wait_idle(timeout=10)
    vendor.check()

    rows = hub.wait_rows(len(calls), timeout=10)
    assert len(rows) == len(calls), "one row per request"
    by_request_id = {row["request_id"]: row for row in rows}
    assert len(by_request_id) == len(rows), "request ids are unique"

    # Class by class, the totals are exactly what went over the wire; a
    # stream cut before its final usage (or a chat stream sent without
    # usage) has its output estimated from the deltas that passed, never
    # below what the vendor had reported, and its row says so: counted here
    # with the vendor's number.
    sent = vendor.sent_usage
    by_id = {answer.request_id: call for call, answer in zip(calls, answers)}
    wire = {row["request_id"]: row_usage(row) for row in rows}
    for row in rows:
        if row["output_estimated"]:
            reported = vendor_usage_of(vendor, by_id[row["request_id"]].seq)
            assert row["output_tokens"] > reported.output, row
            assert row["outcome"] != "ok" or reported == Usage(), row
            wire[row["request_id"]] = dataclasses.replace(wire[row["request_id"]], output=reported.output)
    recorded = Usage(**{cls: sum(getattr(u, cls) for u in wire.values()) for cls in TOKEN_COLUMNS})
    assert recorded == sent
    assert sent.cache_write_1h and sent.cache_write_5m and sent.cache_read and sent.reasoning
    assert any(row["output_estimated"] for row in rows), "the mix cuts some streams after text deltas"

    # And request by request: the vendor saw each request once (no retries),
    # the client's x-hubcore-request-id names its row, the row holds what
    # that one request sent, and its outcome says how it ended.
    vendor_by_seq = {}
    for recorded_request in vendor.requests:
        seq = int(recorded_request.header(SEQ_HEADER) or -1)
        assert seq not in vendor_by_seq, f"request {seq} reached the vendor twice"
        vendor_by_seq[seq] = recorded_request
    assert sorted(vendor_by_seq) == list(range(len(calls)))
    prices = PriceTable.load()
    for call, answer in zip(calls, answers):
        assert answer.status == call.status, call
        row = by_request_id[answer.request_id]
        expected = vendor_by_seq[call.seq].sent
        if row["output_estimated"]:
            expected = dataclasses.replace(expected, output=row["output_tokens"])
        assert row_usage(row) == expected, (call, row)
        assert row["outcome"] == call.outcome, (call, row)
        assert row["status"] == call.status
        assert row["model"] == call.model
        assert row["user"] == "acct" and row["project"] == "ledger"
        # A model without a price is charged at its vendor's most expensive
        # model ([pricing] unpriced = "estimate", the default), and says so.
        unpriced = call.model in (UNPRICED_CLAUDE, UNPRICED_GPT)
        assert (prices.price_for(row["model"]) is None) == unpriced
        vendor_kind = "anthropic" if call.model.startswith("claude") else "openai"
        price = reference_price(prices, vendor_kind) if unpriced else prices.price_for(row["model"])
        assert price is not None
        expected_cost = price.cost_micros(
            row["input_tokens"], row["output_tokens"],
            row["cache_write_5m"], row["cache_write_1h"], row["cache_read"],
        )
        assert row["cost_micros"] == expected_cost, (call, row)
        assert row["cost_basis"] == ("estimate" if unpriced else None), (call, row)

    # Exact numbers are not enough if getting them crashed request handlers.
    crashes = [r for r in caplog.records if r.name.startswith("hubcore") and r.levelno >= logging.ERROR]
    assert not crashes, [r.getMessage() + (f": {r.exc_info[1]!r}" if r.exc_info else "") for r in crashes[:3]]
