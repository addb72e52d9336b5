"""A fake Anthropic + OpenAI API server speaking the vendors' wire format.

Owns the vendor side of every end-to-end test and of the benchmark: h11 over
asyncio on a thread of its own, per-key behaviours, per-request scenarios
steered by ``x-fake-*`` headers, and a ledger of the usage it put on the wire.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import email.utils
import fcntl
import itertools
import math
import signal
import socket
import ssl
import struct
import sys
import termios
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from http import HTTPStatus
from typing import Any, Final, Literal, Union, cast

import h11
import orjson

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the dev venv
    uvloop = None  # type: ignore[assignment]

# Theory of operation: the usage ledger (RecordedRequest.sent, FakeVendor.sent_usage).
#
# Numbers are kept in the hub's convention: `input` is uncached input (OpenAI:
# input_tokens - cached_tokens); cache_read / cache_write_5m / cache_write_1h
# are the cache classes; `output` is the vendor's output count, reasoning
# included (both vendors bill it as output); `reasoning` is the part of output
# that was thinking.  A request has "sent" the usage of the last usage-bearing
# event written before it ended or was cut.  The record is updated before the
# bytes go to the transport, and a fake-induced cut first waits until the
# hub's kernel has every written byte, so the hub has received exactly what
# the ledger says.  Per route:
#
# - Anthropic stream: event 1 is message_start, with input, every cache class
#   and a placeholder output_tokens of min(1, output).  The last message_delta
#   (cumulative) brings the final output and reasoning
#   (output_tokens_details.thinking_tokens).  Cut after message_start and
#   before message_delta: the ledger holds message_start's numbers (output 1,
#   reasoning 0).
# - Responses stream: usage only in the terminal response.completed.
# - Chat stream: usage only in the `choices: []` chunk, sent only when the
#   request asked for stream_options.include_usage; without it the stream
#   carries no usage and the ledger records zeros.
# - Non-streaming: the whole body or nothing.  count_tokens, models: nothing.
# - Error statuses, `reset` and `hang` keys: nothing.
# - The hub hanging up mid-stream (outcome client-gone): what was written
#   before the fake noticed; the hub may not have read the last of it.
#
# x-fake-fail-after: N counts every SSE event (ping and [DONE] included) in the
# order anthropic_event_names() and friends give; N = 0 sends the head only.

Behaviour = Union[Literal["ok", "reset", "hang"], int]
Vendor = Literal["anthropic", "openai"]

ANTHROPIC_KEY: Final = "sk-ant-good"
OPENAI_KEY: Final = "sk-openai-good"
DEFAULT_KEYS: Final[dict[str, Behaviour]] = {ANTHROPIC_KEY: "ok", OPENAI_KEY: "ok"}

DEFAULT_TEXT_EVENTS: Final = 5
DEFAULT_RETRY_AFTER_S: Final = 1.0
# Bulk mode (x-fake-bytes) writes text deltas of this size; large enough to
# make 50 MB a few thousand events, small enough to interleave with pauses.
BULK_DELTA_BYTES: Final = 16 * 1024
# Flow control water marks for every connection (uvloop's default high mark).
WRITE_HIGH_WATER: Final = 64 * 1024  # bytes
WRITE_LOW_WATER: Final = 16 * 1024  # bytes
# A fake-induced cut waits at most this long for written bytes to reach the hub.
FLUSH_BEFORE_CUT_S: Final = 2.0
SHUTDOWN_TIMEOUT_S: Final = 5.0

FAIL_MODES: Final = ("reset", "close", "error-event", "stall")
USAGE_FIELDS: Final = ("input_tokens", "output_tokens", "cache_read", "cache_write_5m", "cache_write_1h", "reasoning")

MODELS: Final = (
    ("claude-opus-4-6", "Claude Opus 4.6", "2026-02-05T00:00:00Z"),
    ("claude-sonnet-4-6", "Claude Sonnet 4.6", "2026-02-17T00:00:00Z"),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-15T00:00:00Z"),
)
OPENAI_MODELS: Final = ("gpt-5.1", "gpt-5.1-codex", "gpt-5-mini")

# Outcomes of a recorded request.
PENDING: Final = "pending"
COMPLETED: Final = "completed"
TRUNCATED: Final = "truncated"
ERROR_EVENT: Final = "error-event"
STALLED: Final = "stalled"
CLIENT_GONE: Final = "client-gone"
RESET: Final = "reset"
HUNG: Final = "hung"
ERROR_STATUS: Final = "error-status"

_ANTHROPIC_ERRORS: Final[dict[int, tuple[str, str]]] = {
    400: ("invalid_request_error", "Invalid request"),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low to access the Anthropic API."),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "Not found"),
    405: ("invalid_request_error", "Method not allowed"),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your per-minute rate limit."),
    500: ("api_error", "Internal server error"),
    503: ("api_error", "Service unavailable"),
    504: ("timeout_error", "Request timed out"),
    529: ("overloaded_error", "Overloaded"),
}
# (type, code, message) as the OpenAI API words them.
_OPENAI_ERRORS: Final[dict[int, tuple[str, str | None, str]]] = {
    400: ("invalid_request_error", None, "Invalid request"),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Country, region, or territory not supported"),
    404: ("invalid_request_error", None, "Not found"),
    405: ("invalid_request_error", None, "Method not allowed"),
    413: ("invalid_request_error", None, "Request too large"),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
    529: ("server_error", None, "The engine is currently overloaded, please try again later."),
}

# Exactly PROTOCOL.md's in-stream error, spaces included: meters must cope.
_ANTHROPIC_OVERLOADED_EVENT: Final = (
    b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}\n\n'
)
_ANTHROPIC_PING_EVENT: Final = b'event: ping\ndata: {"type": "ping"}\n\n'
_CHAT_DONE_EVENT: Final = b"data: [DONE]\n\n"
_CHUNKED_END: Final = b"0\r\n\r\n"
_BULK_TEXT: Final = (("lorem ipsum dolor sit amet " * (BULK_DELTA_BYTES // 27 + 1))[:BULK_DELTA_BYTES])

_REASONS: Final = {status.value: status.phrase.encode() for status in HTTPStatus} | {529: b"Overloaded"}
_ANTHROPIC_PATHS: Final = frozenset({"/v1/messages", "/v1/messages/count_tokens", "/v1/models"})
_OPENAI_PATHS: Final = frozenset({"/v1/responses", "/v1/chat/completions"})


def delta_text(index: int) -> str:
    """The text of the index-th text delta of a normal (not bulk) stream."""
    return f"word{index} "


def expected_text(events: int = DEFAULT_TEXT_EVENTS) -> str:
    """The whole text a stream or a non-streaming answer with `events` deltas carries."""
    return "".join(delta_text(i) for i in range(events))


def anthropic_event_names(text_events: int = DEFAULT_TEXT_EVENTS) -> list[str]:
    """SSE event names of a complete Anthropic stream, in order (for fail-after arithmetic)."""
    return (
        ["message_start", "content_block_start", "ping"]
        + ["content_block_delta"] * text_events
        + ["content_block_stop", "message_delta", "message_stop"]
    )


def responses_event_names(text_events: int = DEFAULT_TEXT_EVENTS) -> list[str]:
    """SSE event names of a complete Responses stream, in order."""
    return (
        ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
        + ["response.output_text.delta"] * text_events
        + ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]
    )


def chat_event_names(text_events: int = DEFAULT_TEXT_EVENTS, include_usage: bool = True) -> list[str]:
    """Chunks of a complete Chat Completions stream, in order; `[DONE]` counts as one."""
    return ["role"] + ["content"] * text_events + ["finish"] + (["usage"] if include_usage else []) + ["[DONE]"]


@dataclasses.dataclass(frozen=True)
class Usage:
    """Token counts by class, in the hub's convention (see the module docstring)."""

    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    reasoning: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _WireUsage:
    """What one request reports, in the vendor's own convention (OpenAI input includes cached)."""

    input_tokens: int
    output_tokens: int
    cache_read: int
    cache_write_5m: int
    cache_write_1h: int
    reasoning: int


@dataclasses.dataclass
class RecordedRequest:
    """One request as the fake received it, and what it answered."""

    index: int
    connection_id: int
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    vendor: Vendor
    key: str | None
    key_header: str | None  # "x-api-key" or "authorization", whichever carried `key`
    # Filled while answering; read them after FakeVendor.wait_idle().
    status: int | None = None
    outcome: str = PENDING
    events_sent: int = 0
    sent: Usage = dataclasses.field(default_factory=Usage)

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_values(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self.headers if key == name]

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclasses.dataclass(frozen=True)
class ProtocolErrorRecord:
    """A request the fake could not parse as HTTP/1.1 (h11 said so)."""

    connection_id: int
    message: str
    status_hint: int


class ScenarioError(ValueError):
    """An x-fake-* header the fake cannot honour: a mistake in the test, answered 400."""


@dataclasses.dataclass(frozen=True)
class _Scenario:
    events: int
    delay_s: float
    first_byte_delay_s: float
    usage: dict[str, int]
    fail_after: int | None
    fail_mode: str
    status: int | None
    bulk_bytes: int | None


def _int_header(value: str, name: str, minimum: int = 0) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ScenarioError(f"{name}: {value!r} is not an integer") from None
    if number < minimum:
        raise ScenarioError(f"{name}: {number} is below {minimum}")
    return number


def _parse_scenario(request: RecordedRequest) -> _Scenario:
    usage: dict[str, int] = {}
    raw_usage = request.header("x-fake-usage")
    if raw_usage is not None:
        try:
            parsed = orjson.loads(raw_usage)
        except orjson.JSONDecodeError:
            raise ScenarioError(f"x-fake-usage is not JSON: {raw_usage!r}") from None
        if not isinstance(parsed, dict):
            raise ScenarioError("x-fake-usage must be a JSON object")
        for name, value in parsed.items():
            if name not in USAGE_FIELDS:
                raise ScenarioError(f"x-fake-usage: unknown field {name!r}; known: {', '.join(USAGE_FIELDS)}")
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ScenarioError(f"x-fake-usage: {name} must be a non-negative integer")
            usage[name] = value
    fail_after = request.header("x-fake-fail-after")
    fail_mode = request.header("x-fake-fail-mode") or "reset"
    if fail_mode not in FAIL_MODES:
        raise ScenarioError(f"x-fake-fail-mode: {fail_mode!r} is not one of {', '.join(FAIL_MODES)}")
    status = request.header("x-fake-status")
    bulk = request.header("x-fake-bytes")
    return _Scenario(
        events=_int_header(request.header("x-fake-events") or str(DEFAULT_TEXT_EVENTS), "x-fake-events"),
        delay_s=_int_header(request.header("x-fake-delay-ms") or "0", "x-fake-delay-ms") / 1000,
        first_byte_delay_s=_int_header(
            request.header("x-fake-first-byte-delay-ms") or "0", "x-fake-first-byte-delay-ms"
        ) / 1000,
        usage=usage,
        fail_after=None if fail_after is None else _int_header(fail_after, "x-fake-fail-after"),
        fail_mode=fail_mode,
        status=None if status is None else _int_header(status, "x-fake-status", minimum=400),
        bulk_bytes=None if bulk is None else _int_header(bulk, "x-fake-bytes", minimum=1),
    )


def _wire_usage(vendor: Vendor, scenario: _Scenario, body: bytes, text_bytes: int) -> _WireUsage:
    """The usage to report: x-fake-usage where given, else numbers derived from the sizes."""
    given = scenario.usage
    usage = _WireUsage(
        input_tokens=given.get("input_tokens", len(body) // 4 + 1),
        output_tokens=given.get("output_tokens", text_bytes // 4 + 1),
        cache_read=given.get("cache_read", 0),
        cache_write_5m=given.get("cache_write_5m", 0),
        cache_write_1h=given.get("cache_write_1h", 0),
        reasoning=given.get("reasoning", 0),
    )
    if usage.reasoning > usage.output_tokens:
        raise ScenarioError("x-fake-usage: reasoning is part of output_tokens and cannot exceed it")
    if vendor == "openai":
        if usage.cache_write_5m or usage.cache_write_1h:
            raise ScenarioError("x-fake-usage: OpenAI reports no cache writes; drop cache_write_5m/1h")
        if usage.cache_read > usage.input_tokens:
            raise ScenarioError("x-fake-usage: OpenAI cached tokens are included in input_tokens; cache_read > input")
    return usage


def _hub_usage(vendor: Vendor, wire: _WireUsage) -> Usage:
    uncached = wire.input_tokens - wire.cache_read if vendor == "openai" else wire.input_tokens
    return Usage(
        input=uncached,
        output=wire.output_tokens,
        cache_read=wire.cache_read,
        cache_write_5m=wire.cache_write_5m,
        cache_write_1h=wire.cache_write_1h,
        reasoning=wire.reasoning,
    )


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (event.encode(), orjson.dumps(data))


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _text_pieces(scenario: _Scenario) -> Iterator[str]:
    if scenario.bulk_bytes is None:
        return (delta_text(i) for i in range(scenario.events))
    full, rest = divmod(scenario.bulk_bytes, BULK_DELTA_BYTES)
    return itertools.chain(itertools.repeat(_BULK_TEXT, full), [_BULK_TEXT[:rest]] if rest else [])


def _text_length(scenario: _Scenario) -> int:
    if scenario.bulk_bytes is not None:
        return scenario.bulk_bytes
    return sum(len(delta_text(i)) for i in range(scenario.events))


# An event source yields (SSE bytes, the sent usage after it or None if unchanged).
EventSource = Iterator[tuple[bytes, Union[Usage, None]]]


def _anthropic_usage(wire: _WireUsage, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": wire.input_tokens,
        "cache_creation_input_tokens": wire.cache_write_5m + wire.cache_write_1h,
        "cache_read_input_tokens": wire.cache_read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": wire.cache_write_5m,
            "ephemeral_1h_input_tokens": wire.cache_write_1h,
        },
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def _anthropic_final_usage(wire: _WireUsage) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "input_tokens": wire.input_tokens,
        "cache_creation_input_tokens": wire.cache_write_5m + wire.cache_write_1h,
        "cache_read_input_tokens": wire.cache_read,
        "output_tokens": wire.output_tokens,
    }
    if wire.reasoning:
        usage["output_tokens_details"] = {"thinking_tokens": wire.reasoning}
    return usage


def _anthropic_stream(message_id: str, model: str, scenario: _Scenario, wire: _WireUsage) -> EventSource:
    start_output = min(1, wire.output_tokens)
    start = {
        "type": "message_start",
        "message": {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": _anthropic_usage(wire, start_output),
        },
    }
    yield _sse("message_start", start), dataclasses.replace(
        _hub_usage("anthropic", wire), output=start_output, reasoning=0
    )
    yield _sse(
        "content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    ), None
    yield _ANTHROPIC_PING_EVENT, None
    bulk_event = b""
    for piece in _text_pieces(scenario):
        if piece is _BULK_TEXT:
            # Every full bulk delta is the same bytes: encode it once.
            bulk_event = bulk_event or _sse(
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}},
            )
            yield bulk_event, None
        else:
            yield _sse(
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}},
            ), None
    yield _sse("content_block_stop", {"type": "content_block_stop", "index": 0}), None
    yield _sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": _anthropic_final_usage(wire),
        },
    ), _hub_usage("anthropic", wire)
    yield _sse("message_stop", {"type": "message_stop"}), None


def _anthropic_message(message_id: str, model: str, text: str, wire: _WireUsage) -> dict[str, Any]:
    usage = _anthropic_usage(wire, wire.output_tokens)
    if wire.reasoning:
        usage["output_tokens_details"] = {"thinking_tokens": wire.reasoning}
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage,
    }


def _responses_usage(wire: _WireUsage) -> dict[str, Any]:
    return {
        "input_tokens": wire.input_tokens,
        "input_tokens_details": {"cached_tokens": wire.cache_read},
        "output_tokens": wire.output_tokens,
        "output_tokens_details": {"reasoning_tokens": wire.reasoning},
        "total_tokens": wire.input_tokens + wire.output_tokens,
    }


def _responses_object(
    response_id: str, model: str, created: int, status: str, output: list[Any], usage: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "metadata": {},
    }


def _responses_message(item_id: str, status: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def _responses_stream(
    response_id: str, item_id: str, model: str, scenario: _Scenario, wire: _WireUsage
) -> EventSource:
    created = int(time.time())
    sequence = itertools.count()

    def event(name: str, data: dict[str, Any]) -> bytes:
        data["type"] = name
        data["sequence_number"] = next(sequence)
        return _sse(name, data)

    in_progress = _responses_object(response_id, model, created, "in_progress", [], None)
    yield event("response.created", {"response": in_progress}), None
    yield event("response.in_progress", {"response": in_progress}), None
    yield event(
        "response.output_item.added", {"output_index": 0, "item": _responses_message(item_id, "in_progress", None)}
    ), None
    part_ids = {"item_id": item_id, "output_index": 0, "content_index": 0}
    yield event(
        "response.content_part.added",
        {**part_ids, "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}},
    ), None
    text_parts: list[str] = []
    for piece in _text_pieces(scenario):
        # Bulk streams would hold 50 MB here; the SDK only needs the text of normal ones.
        if scenario.bulk_bytes is None:
            text_parts.append(piece)
        yield event("response.output_text.delta", {**part_ids, "delta": piece, "logprobs": []}), None
    text = "".join(text_parts)
    yield event("response.output_text.done", {**part_ids, "text": text, "logprobs": []}), None
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    yield event("response.content_part.done", {**part_ids, "part": part}), None
    item = _responses_message(item_id, "completed", text)
    yield event("response.output_item.done", {"output_index": 0, "item": item}), None
    completed = _responses_object(response_id, model, created, "completed", [item], _responses_usage(wire))
    yield event("response.completed", {"response": completed}), _hub_usage("openai", wire)


def _chat_usage(wire: _WireUsage) -> dict[str, Any]:
    return {
        "prompt_tokens": wire.input_tokens,
        "completion_tokens": wire.output_tokens,
        "total_tokens": wire.input_tokens + wire.output_tokens,
        "prompt_tokens_details": {"cached_tokens": wire.cache_read, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": wire.reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _chat_stream(
    completion_id: str, model: str, scenario: _Scenario, wire: _WireUsage, include_usage: bool
) -> EventSource:
    created = int(time.time())

    def chunk(choices: list[Any], usage: dict[str, Any] | None = None) -> bytes:
        data: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": None,
            "choices": choices,
        }
        if include_usage:
            data["usage"] = usage
        return b"data: %s\n\n" % orjson.dumps(data)

    def choice(delta: dict[str, Any], finish_reason: str | None = None) -> list[Any]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]

    yield chunk(choice({"role": "assistant", "content": "", "refusal": None})), None
    bulk_event = b""
    for piece in _text_pieces(scenario):
        if piece is _BULK_TEXT:
            bulk_event = bulk_event or chunk(choice({"content": piece}))
            yield bulk_event, None
        else:
            yield chunk(choice({"content": piece})), None
    yield chunk(choice({}, "stop")), None
    if include_usage:
        yield chunk([], _chat_usage(wire)), _hub_usage("openai", wire)
    yield _CHAT_DONE_EVENT, None


def _anthropic_error_body(status: int, request_id: str, message: str | None = None) -> bytes:
    error_type, default_message = _ANTHROPIC_ERRORS.get(status, ("api_error", "Internal server error"))
    return orjson.dumps(
        {"type": "error", "error": {"type": error_type, "message": message or default_message}, "request_id": request_id}
    )


def _openai_error_body(status: int, message: str | None = None) -> bytes:
    error_type, code, default_message = _OPENAI_ERRORS.get(status, ("server_error", None, "Server error"))
    return orjson.dumps(
        {"error": {"message": message or default_message, "type": error_type, "param": None, "code": code}}
    )


def _rfc3339_after(seconds: float) -> str:
    # Rounded up: a reset time earlier than retry-after would invite an early retry.
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(math.ceil(time.time() + seconds)))


class _DateHeader:
    """The Date header, formatted at most once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = email.utils.formatdate(now, usegmt=True).encode()
        return self._value


_date_header = _DateHeader()


class _Cycle:
    """Answers one request on one connection: error, JSON body, SSE stream, reset or hang."""

    def __init__(self, connection: _Connection, request: RecordedRequest) -> None:
        self.connection = connection
        self.request = request
        self.vendor = connection.vendor
        self.request_id = f"req_fake{request.index:016d}"
        self.scenario: _Scenario | None = None

    # -- answering ---------------------------------------------------------

    async def run(self) -> None:
        request = self.request
        behaviour: Behaviour | None = None
        try:
            self.scenario = _parse_scenario(request)
        except ScenarioError as exc:
            self.vendor._scenario_error(request, str(exc))
            await self.send_error(400, str(exc))
            return
        if self.scenario.first_byte_delay_s:
            await asyncio.sleep(self.scenario.first_byte_delay_s)
        if request.path in _ANTHROPIC_PATHS or request.path in _OPENAI_PATHS:
            behaviour = self.vendor._behaviour_for(request.key)
            if behaviour is None:
                await self.send_error(401, self._bad_key_message())
                return
            if behaviour == "reset":
                request.outcome = RESET
                self.connection.reset()
                return
            if behaviour == "hang":
                request.outcome = HUNG
                await asyncio.get_running_loop().create_future()
            if isinstance(behaviour, int):
                await self.send_error(behaviour)
                return
        if self.scenario.status is not None:
            await self.send_error(self.scenario.status)
            return
        await self.route()

    def _bad_key_message(self) -> str:
        if self.request.key is None:
            if self.request.vendor == "openai":
                return "You didn't provide an API key. Provide it in an Authorization header (Bearer auth)."
            return "x-api-key header is required"
        if self.request.vendor == "openai":
            return "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys."
        return "invalid x-api-key"

    async def route(self) -> None:
        request = self.request
        path, method = request.path, request.method
        allowed = {
            "/v1/messages": "POST",
            "/v1/messages/count_tokens": "POST",
            "/v1/models": "GET",
            "/v1/responses": "POST",
            "/v1/chat/completions": "POST",
        }
        model_id = path[len("/v1/models/"):] if path.startswith("/v1/models/") else None
        if model_id:
            path = "/v1/models"
        if path not in allowed:
            await self.send_error(404, f"Not found: {method} {path}")
            return
        if method != allowed[path]:
            await self.send_error(405, f"Method {method} not allowed for {path}")
            return
        if request.vendor == "anthropic" and request.header("anthropic-version") is None:
            await self.send_error(400, "anthropic-version: header is required")
            return
        if path == "/v1/models":
            await self.models(model_id)
            return
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            await self.send_error(400, f"There was an error parsing the body: {exc}")
            return
        if not isinstance(body, dict):
            await self.send_error(400, "The request body must be a JSON object")
            return
        model = body.get("model")
        if not isinstance(model, str):
            await self.send_error(400, "model: Field required")
            return
        stream = body.get("stream") is True
        try:
            if path == "/v1/messages/count_tokens":
                await self.count_tokens()
            elif path == "/v1/messages":
                await self.messages(model, stream)
            elif path == "/v1/responses":
                await self.responses(model, stream)
            else:
                options = body.get("stream_options")
                include_usage = isinstance(options, dict) and options.get("include_usage") is True
                await self.chat(model, stream, include_usage)
        except ScenarioError as exc:
            self.vendor._scenario_error(request, str(exc))
            await self.send_error(400, str(exc))

    def _wire(self) -> _WireUsage:
        assert self.scenario is not None
        return _wire_usage(self.request.vendor, self.scenario, self.request.body, _text_length(self.scenario))

    async def models(self, model_id: str | None = None) -> None:
        """The models listing, or one model of it (`GET /v1/models/{id}`)."""
        if self.request.vendor == "openai":
            listing = [{"id": name, "object": "model", "created": 1767225600, "owned_by": "openai"} for name in OPENAI_MODELS]
        else:
            listing = [
                {"type": "model", "id": name, "display_name": display, "created_at": created}
                for name, display, created in MODELS
            ]
        if model_id is not None:
            found = [entry for entry in listing if entry["id"] == model_id]
            if not found:
                await self.send_error(404, f"model: {model_id}")
                return
            await self.send_json(200, orjson.dumps(found[0]), Usage())
            return
        if self.request.vendor == "openai":
            await self.send_json(200, orjson.dumps({"object": "list", "data": listing}), Usage())
            return
        data = listing
        body = {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
        await self.send_json(200, orjson.dumps(body), Usage())

    async def count_tokens(self) -> None:
        await self.send_json(200, orjson.dumps({"input_tokens": self._wire().input_tokens}), Usage())

    async def messages(self, model: str, stream: bool) -> None:
        assert self.scenario is not None
        wire = self._wire()
        message_id = f"msg_fake{self.request.index:016d}"
        if stream:
            await self.send_stream(_anthropic_stream(message_id, model, self.scenario, wire))
        else:
            text = "".join(_text_pieces(self.scenario))
            body = orjson.dumps(_anthropic_message(message_id, model, text, wire))
            await self.send_json(200, body, _hub_usage("anthropic", wire))

    async def responses(self, model: str, stream: bool) -> None:
        assert self.scenario is not None
        wire = self._wire()
        response_id = f"resp_fake{self.request.index:016d}"
        item_id = f"msg_fake{self.request.index:016d}"
        if stream:
            await self.send_stream(_responses_stream(response_id, item_id, model, self.scenario, wire))
        else:
            item = _responses_message(item_id, "completed", "".join(_text_pieces(self.scenario)))
            response = _responses_object(response_id, model, int(time.time()), "completed", [item], _responses_usage(wire))
            await self.send_json(200, orjson.dumps(response), _hub_usage("openai", wire))

    async def chat(self, model: str, stream: bool, include_usage: bool) -> None:
        assert self.scenario is not None
        wire = self._wire()
        completion_id = f"chatcmpl-fake{self.request.index:016d}"
        if stream:
            await self.send_stream(_chat_stream(completion_id, model, self.scenario, wire, include_usage))
        else:
            body = {
                "id": completion_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": "".join(_text_pieces(self.scenario)),
                            "refusal": None,
                            "annotations": [],
                        },
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": _chat_usage(wire),
                "service_tier": "default",
                "system_fingerprint": None,
            }
            await self.send_json(200, orjson.dumps(body), _hub_usage("openai", wire))

    # -- writing -----------------------------------------------------------

    def _base_headers(self, content_type: bytes) -> list[tuple[bytes, bytes]]:
        headers = [(b"date", _date_header.get()), (b"content-type", content_type)]
        if self.request.vendor == "anthropic":
            headers.append((b"request-id", self.request_id.encode()))
            headers.append((b"anthropic-organization-id", b"00000000-0000-4000-8000-00000000fa4e"))
        else:
            headers.append((b"x-request-id", self.request_id.encode()))
            headers.append((b"openai-processing-ms", b"1"))
        return headers + self.vendor._headers_for(self.request.key)

    async def send_error(self, status: int, message: str | None = None) -> None:
        request = self.request
        headers = self._base_headers(b"application/json")
        retry_after = self.vendor.retry_after
        if request.vendor == "anthropic":
            body = _anthropic_error_body(status, self.request_id, message)
        else:
            body = _openai_error_body(status, message)
        if status == 429:
            headers.append((b"retry-after", b"%g" % retry_after))
            if request.vendor == "anthropic":
                reset_at = _rfc3339_after(retry_after).encode()
                headers += [
                    (b"anthropic-ratelimit-requests-limit", b"50"),
                    (b"anthropic-ratelimit-requests-remaining", b"0"),
                    (b"anthropic-ratelimit-requests-reset", reset_at),
                ]
            else:
                headers += [
                    (b"x-ratelimit-limit-requests", b"500"),
                    (b"x-ratelimit-remaining-requests", b"0"),
                    (b"x-ratelimit-reset-requests", b"%gs" % retry_after),
                ]
        request.outcome = ERROR_STATUS
        self._write_whole(status, headers, body)

    async def send_json(self, status: int, body: bytes, usage: Usage) -> None:
        assert self.scenario is not None
        request = self.request
        headers = self._base_headers(b"application/json")
        if self.scenario.fail_after is not None:
            # A non-streaming answer cut in the middle of its body carries no usable usage.
            self.connection.write_head(status, headers + [(b"content-length", b"%d" % len(body))])
            self.connection.write_body(body[: len(body) // 2])
            request.status = status
            request.outcome = TRUNCATED
            await self.connection.cut(self.scenario.fail_mode)
            return
        request.sent = usage
        request.outcome = COMPLETED
        self._write_whole(status, headers, body)

    def _write_whole(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.request.status = status
        headers.append((b"content-length", b"%d" % len(body)))
        self.connection.write_head(status, headers)
        self.connection.write_body(body)
        self.connection.write_end()

    async def send_stream(self, events: EventSource) -> None:
        assert self.scenario is not None
        scenario, request, connection = self.scenario, self.request, self.connection
        headers = self._base_headers(b"text/event-stream; charset=utf-8")
        headers += [(b"cache-control", b"no-cache"), (b"transfer-encoding", b"chunked")]
        request.status = 200
        connection.write_head(200, headers)
        fail_after, delay = scenario.fail_after, scenario.delay_s
        pending: list[bytes] = []
        pending_bytes = 0
        sent = 0
        for data, usage in events:
            if sent == fail_after:
                break
            if delay and sent:
                if pending:
                    connection.writelines(pending)
                    pending, pending_bytes = [], 0
                await asyncio.sleep(delay)
            # Record before the bytes can reach the hub: the ledger never lags the wire.
            if usage is not None:
                request.sent = usage
            sent += 1
            request.events_sent = sent
            framed = _chunk(data)
            pending.append(framed)
            pending_bytes += len(framed)
            if pending_bytes >= WRITE_LOW_WATER:
                connection.writelines(pending)
                pending, pending_bytes = [], 0
                await connection.drain()
        if pending:
            connection.writelines(pending)
        if fail_after is not None and sent == fail_after:
            if scenario.fail_mode == "error-event":
                request.outcome = ERROR_EVENT
                connection.write(_chunk(self._error_event(sent)))
                connection.write_end()
                return
            request.outcome = TRUNCATED if scenario.fail_mode != "stall" else STALLED
            await connection.cut(scenario.fail_mode)
            return
        request.outcome = COMPLETED
        connection.write_end()

    def _error_event(self, sequence_number: int) -> bytes:
        path = self.request.path
        if path == "/v1/messages":
            return _ANTHROPIC_OVERLOADED_EVENT
        if path == "/v1/responses":
            return _sse(
                "error",
                {
                    "type": "error",
                    "code": "server_error",
                    "message": "The server had an error while processing your request. Sorry about that!",
                    "param": None,
                    "sequence_number": sequence_number,
                },
            )
        return b"data: %s\n\n" % _openai_error_body(500)


class _Connection(asyncio.Protocol):
    """One accepted TCP (or TLS) connection: h11 parsing, keep-alive, flow control."""

    def __init__(self, vendor: FakeVendor) -> None:
        # per-connection
        self.vendor = vendor
        self.connection_id = vendor._next_connection_id()
        self._h11 = h11.Connection(h11.SERVER)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._lost = False
        self._broken = False  # h11 refused the input or saw the end: read no more
        self._paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # per-request
        self._request: h11.Request | None = None
        self._body: list[bytes] = []
        self._task: asyncio.Task[None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        self.vendor._connection_opened(self)

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        self._h11.receive_data(data)
        self._next_events()

    def eof_received(self) -> bool:
        if not self._broken:
            self._h11.receive_data(b"")
            self._next_events()
        # An HTTP/1.1 client does not half-close while waiting for an answer: the
        # hub hung up, so close, which cancels whatever is being answered.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._wake_drain()
        if self._task is not None:
            self._task.cancel()
        self.vendor._connection_closed(self)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drain()

    # -- reading -----------------------------------------------------------

    def _next_events(self) -> None:
        while self._task is None and not self._lost and not self._broken:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._protocol_error(exc)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._request = event
                self._body = []
            elif isinstance(event, h11.Data):
                self._body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._start_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                self._broken = True
                self.close()
                return

    def _protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        self._broken = True
        self.vendor._protocol_error(ProtocolErrorRecord(self.connection_id, str(exc), exc.error_status_hint))
        if self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = b"fake vendor: malformed request: %s\n" % str(exc).encode()
            headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body)), (b"connection", b"close")]
            with contextlib.suppress(h11.LocalProtocolError):
                status = exc.error_status_hint
                response = h11.Response(status_code=status, headers=headers, reason=_REASONS.get(status, b""))
                self.write(self._h11.send(response) or b"")
                self.write(self._h11.send(h11.Data(data=body)) or b"")
                self.write(self._h11.send(h11.EndOfMessage()) or b"")
        self.close()

    def _start_cycle(self) -> None:
        assert self._request is not None
        request = self.vendor._record(self, self._request, b"".join(self._body))
        self._request, self._body = None, []
        cycle = _Cycle(self, request)
        self._task = self._loop.create_task(self._run_cycle(cycle))

    async def _run_cycle(self, cycle: _Cycle) -> None:
        try:
            await cycle.run()
        except (asyncio.CancelledError, ConnectionError):
            # Hub hung up (or shutdown): hang/stall/truncated keep their outcome.
            if cycle.request.outcome == PENDING:
                cycle.request.outcome = CLIENT_GONE
            self.close()
        except Exception as exc:
            self.vendor._internal_error(cycle.request, exc)
            self.abort()
        finally:
            self.vendor._request_done(cycle.request)
        self._task = None
        if self._lost:
            return
        if self._h11.our_state is h11.MUST_CLOSE or self._h11.their_state is h11.MUST_CLOSE:
            self.close()
        elif self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
            self._next_events()
        elif self._h11.our_state is not h11.DONE:
            # The cycle cut the connection (reset, close, stall ended by shutdown).
            self.close()

    # -- writing -----------------------------------------------------------

    def write_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        response = h11.Response(status_code=status, headers=headers, reason=_REASONS.get(status, b""))
        self.write(self._h11.send(response) or b"")

    def write(self, data: bytes) -> None:
        if self._transport is not None and not self._lost and data:
            self._transport.write(data)

    def writelines(self, chunks: Iterable[bytes]) -> None:
        """Write pre-framed chunks of a chunked body; h11 only frames the head and the end."""
        if self._transport is not None and not self._lost:
            self._transport.writelines(chunks)

    def write_body(self, data: bytes) -> None:
        """Write a Content-Length body through h11, which checks the length."""
        self.write(self._h11.send(h11.Data(data=data)) or b"")

    def write_end(self) -> None:
        self.write(self._h11.send(h11.EndOfMessage()) or b"")

    async def drain(self) -> None:
        if self._lost:
            raise ConnectionResetError("the hub closed the connection")
        if not self._paused:
            return
        self._drain_waiter = self._loop.create_future()
        await self._drain_waiter
        if self._lost:
            raise ConnectionResetError("the hub closed the connection")

    def _wake_drain(self) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- ending ------------------------------------------------------------

    async def cut(self, mode: str) -> None:
        """End a response mid-body: RST (`reset`), FIN (`close`) or silence (`stall`)."""
        if mode == "stall":
            await self._loop.create_future()
        await self._flush()
        if mode == "reset":
            self.reset()
        else:
            self.close()

    async def _flush(self) -> None:
        """Wait until the hub's kernel has every written byte, so a cut loses none of them."""
        transport = self._transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        deadline = self._loop.time() + FLUSH_BEFORE_CUT_S
        while not self._lost and self._loop.time() < deadline:
            unsent = transport.get_write_buffer_size()
            if unsent == 0 and sock is not None:
                queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
                unsent = struct.unpack("i", queued)[0]
            if unsent == 0:
                return
            await asyncio.sleep(0.001)

    def reset(self) -> None:
        """Close with a TCP RST and no further bytes."""
        transport = self._transport
        if transport is None or self._lost:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def abort(self) -> None:
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        if self._transport is not None:
            self._transport.abort()


class FakeVendor:
    """The fake vendor server; a context manager that runs it on a thread of its own.

    ``with FakeVendor() as v:`` then point clients at ``v.url``.  Pass a
    ``trustme.CA`` as ``tls`` to serve HTTPS as ``localhost``.
    """

    def __init__(
        self,
        keys: dict[str, Behaviour] | None = None,
        *,
        tls: Any = None,
        retry_after: float = DEFAULT_RETRY_AFTER_S,
        accept_any_key: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        key_headers: dict[str, list[tuple[str, str]]] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, Behaviour] = dict(DEFAULT_KEYS if keys is None else keys)
        # Extra response headers per presented key (say, its rate-limit headroom).
        self._key_headers: dict[str, list[tuple[bytes, bytes]]] = {}
        for key, headers in (key_headers or {}).items():
            self.set_key_headers(key, headers)
        for behaviour in self._keys.values():
            _check_behaviour(behaviour)
        self._tls_ca = tls
        self.retry_after = retry_after
        self.accept_any_key = accept_any_key
        self._host, self._port = host, port
        # state shared with the loop thread, under _lock
        self._requests: list[RecordedRequest] = []
        self._hits: Counter[str] = Counter()
        self._protocol_errors: list[ProtocolErrorRecord] = []
        self._scenario_errors: list[str] = []
        self._internal_errors: list[str] = []
        self._connection_ids = itertools.count(1)
        self._connections_accepted = 0
        self._in_flight = 0
        self._idle = threading.Condition(self._lock)
        # loop-thread only
        self._connections: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self.port = 0

    # -- lifecycle ---------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL clients use, without a trailing slash and without /v1."""
        if self._tls_ca is not None:
            return f"https://localhost:{self.port}"
        return f"http://{self._host}:{self.port}"

    def start(self) -> FakeVendor:
        self._loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name=f"fakevendor-{id(self):x}", daemon=True)
        self._thread.start()
        self._ready.wait(SHUTDOWN_TIMEOUT_S)
        if self._startup_error is not None or not self._ready.is_set():
            self.stop()
            raise RuntimeError("fake vendor did not start") from self._startup_error
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive() and loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(SHUTDOWN_TIMEOUT_S)
            finally:
                loop.call_soon_threadsafe(loop.stop)
        thread.join(SHUTDOWN_TIMEOUT_S)
        self._loop = self._thread = None

    def __enter__(self) -> FakeVendor:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run_loop(self) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(self._loop_exception)
        try:
            try:
                loop.run_until_complete(self._listen())
            except BaseException as exc:
                self._startup_error = exc
                return
            finally:
                self._ready.set()
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            asyncio.set_event_loop(None)

    async def _listen(self) -> None:
        ssl_context = None
        if self._tls_ca is not None:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._tls_ca.issue_cert("localhost", "127.0.0.1").configure_cert(ssl_context)
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Connection(self), self._host, self._port, ssl=ssl_context, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.abort()
        if self._server is not None:
            await self._server.wait_closed()
        # Let connection_lost callbacks and the cancelled cycles run to the end.
        current = asyncio.current_task()
        for _ in range(100):
            pending = [t for t in asyncio.all_tasks() if t is not current]
            if not pending and not self._connections:
                break
            await asyncio.sleep(0.001)

    # -- configuration (any thread) ----------------------------------------

    def set_key_behaviour(self, key: str, behaviour: Behaviour) -> None:
        _check_behaviour(behaviour)
        with self._lock:
            self._keys[key] = behaviour

    def set_key_headers(self, key: str, headers: list[tuple[str, str]]) -> None:
        """Headers added to every answer, success or error, to a request that
        presented `key` (after the fake's own; an empty list removes them)."""
        encoded = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]
        with self._lock:
            self._key_headers[key] = encoded

    def remove_key(self, key: str) -> None:
        with self._lock:
            self._keys.pop(key, None)

    # -- observations (any thread) -----------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received since start or reset()."""
        with self._lock:
            return list(self._requests)

    @property
    def hits(self) -> Counter[str]:
        """Requests per presented vendor key (a snapshot; missing keys count 0)."""
        with self._lock:
            return Counter(self._hits)

    @property
    def protocol_errors(self) -> list[ProtocolErrorRecord]:
        """Malformed HTTP the hub sent (h11 refused it); should stay empty."""
        with self._lock:
            return list(self._protocol_errors)

    @property
    def scenario_errors(self) -> list[str]:
        """x-fake-* headers the fake refused (answered 400): mistakes in a test."""
        with self._lock:
            return list(self._scenario_errors)

    @property
    def connections_accepted(self) -> int:
        with self._lock:
            return self._connections_accepted

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    @property
    def sent_usage(self) -> Usage:
        """Totals per class of the usage put on the wire, in the hub's convention."""
        with self._lock:
            total = Usage()
            for request in self._requests:
                total = total + request.sent
            return total

    def reset(self) -> None:
        """Forget requests, hits, errors and usage (keys and connections stay)."""
        with self._lock:
            self._requests.clear()
            self._hits.clear()
            self._protocol_errors.clear()
            self._scenario_errors.clear()
            self._internal_errors.clear()
            self._connections_accepted = 0

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Block until no request is being answered (streams done, outcomes final)."""
        with self._idle:
            if not self._idle.wait_for(lambda: self._in_flight == 0, timeout):
                raise TimeoutError(f"fake vendor still answering {self._in_flight} request(s)")

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Block until at least `count` requests have arrived; return them."""
        with self._idle:
            if not self._idle.wait_for(lambda: len(self._requests) >= count, timeout):
                raise TimeoutError(f"fake vendor saw {len(self._requests)} of {count} requests")
            return list(self._requests)

    def check(self) -> None:
        """Raise AssertionError if the hub sent malformed HTTP or a test sent a bad x-fake-* header."""
        problems = [f"protocol error on connection {e.connection_id}: {e.message}" for e in self.protocol_errors]
        with self._lock:
            problems += [f"scenario error: {message}" for message in self._scenario_errors]
            problems += [f"fake vendor bug: {message}" for message in self._internal_errors]
        if problems:
            raise AssertionError("fake vendor: " + "; ".join(problems))

    # -- called from the loop thread ---------------------------------------

    def _next_connection_id(self) -> int:
        with self._lock:
            return next(self._connection_ids)

    def _connection_opened(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.add(connection)
            self._connections_accepted += 1

    def _connection_closed(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)

    def _headers_for(self, key: str | None) -> list[tuple[bytes, bytes]]:
        if key is None:
            return []
        with self._lock:
            return self._key_headers.get(key, [])

    def _behaviour_for(self, key: str | None) -> Behaviour | None:
        if key is None:
            return None
        with self._lock:
            behaviour = self._keys.get(key)
        if behaviour is None and self.accept_any_key:
            return "ok"
        return behaviour

    def _record(self, connection: _Connection, event: h11.Request, body: bytes) -> RecordedRequest:
        headers = [(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in event.headers]
        target = event.target.decode("latin-1")
        path = target.split("?", 1)[0]
        # GET /v1/models is both vendors' path: Anthropic's clients always send
        # anthropic-version, OpenAI's never do.
        openai_models = (path == "/v1/models" or path.startswith("/v1/models/")) and not any(name == "anthropic-version" for name, _ in headers)
        vendor: Vendor = "openai" if path in _OPENAI_PATHS or openai_models else "anthropic"
        # Anthropic takes x-api-key, and also a Bearer token (what anthropic 2.x SDKs
        # send for api_key); x-api-key wins if both came.  OpenAI: Bearer only.
        key: str | None = None
        key_header: str | None = None
        for name, value in headers:
            if vendor == "anthropic" and name == "x-api-key":
                key, key_header = value, name
                break
            if name == "authorization" and value[:7].lower() == "bearer " and key is None:
                key, key_header = value[7:].strip(), name
        with self._lock:
            request = RecordedRequest(
                index=len(self._requests),
                connection_id=connection.connection_id,
                method=event.method.decode("ascii"),
                target=target,
                headers=headers,
                body=body,
                vendor=vendor,
                key=key,
                key_header=key_header,
            )
            self._requests.append(request)
            if key is not None:
                self._hits[key] += 1
            self._in_flight += 1
            self._idle.notify_all()
        return request

    def _request_done(self, request: RecordedRequest) -> None:
        with self._lock:
            self._in_flight -= 1
            self._idle.notify_all()

    def _protocol_error(self, record: ProtocolErrorRecord) -> None:
        with self._lock:
            self._protocol_errors.append(record)

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Make a bug in a callback fail check() instead of vanishing into a log line."""
        exc = context.get("exception")
        if exc is None or isinstance(exc, (ConnectionError, ssl.SSLError)):
            loop.default_exception_handler(context)
            return
        with self._lock:
            self._internal_errors.append(f"{context.get('message', 'loop callback')}: {exc!r}")

    def _internal_error(self, request: RecordedRequest, exc: BaseException) -> None:
        with self._lock:
            self._internal_errors.append(f"request {request.index} {request.target}: {exc!r}")

    def _scenario_error(self, request: RecordedRequest, message: str) -> None:
        with self._lock:
            self._scenario_errors.append(f"request {request.index} {request.target}: {message}")


def _check_behaviour(behaviour: object) -> None:
    if behaviour in ("ok", "reset", "hang"):
        return
    if isinstance(behaviour, int) and not isinstance(behaviour, bool) and 400 <= behaviour <= 599:
        return
    raise ValueError(f"key behaviour must be 'ok', 'reset', 'hang' or an error status, not {behaviour!r}")


def client_ssl_context(ca: Any) -> ssl.SSLContext:
    """A client SSLContext trusting the trustme CA a TLS FakeVendor was given."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@contextlib.contextmanager
def running_vendor(
    keys: dict[str, Behaviour] | None = None, *, tls: Any = None, check: bool = True, **options: Any
) -> Iterator[FakeVendor]:
    """Fixture body: yields a started FakeVendor, stops it, then fails on protocol/scenario errors."""
    vendor = FakeVendor(keys, tls=tls, **options)
    with vendor:
        yield vendor
    if check:
        vendor.check()


def serve_forever(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    keys: dict[str, Behaviour] | None = None,
    accept_any_key: bool = True,
    tls: Any = None,
    print_port: bool = False,
) -> None:
    """Run a FakeVendor until SIGINT or SIGTERM (for the benchmark)."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with FakeVendor(keys, tls=tls, accept_any_key=accept_any_key, host=host, port=port) as vendor:
            if print_port:
                print(vendor.port, flush=True)
            while not stop.wait(0.5):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _parse_key_option(text: str) -> tuple[str, Behaviour]:
    key, _, raw = text.partition("=")
    raw = raw or "ok"
    behaviour: Behaviour = int(raw) if raw.isdigit() else raw  # type: ignore[assignment]
    _check_behaviour(behaviour)
    return key, behaviour


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.fakevendor", description="Run the fake vendor API server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--print-port", action="store_true", help="print the bound port alone on a line")
    parser.add_argument(
        "--key", action="append", default=[], metavar="KEY[=BEHAVIOUR]", help="configure a key; ok|reset|hang|STATUS"
    )
    parser.add_argument("--strict-keys", action="store_true", help="answer 401 to keys not given with --key")
    parser.add_argument("--tls-ca-out", metavar="PATH", help="serve TLS; write the CA certificate (PEM) here")
    args = parser.parse_args(argv)
    keys = dict(_parse_key_option(text) for text in args.key) if args.key else None
    tls = None
    if args.tls_ca_out:
        import trustme

        tls = trustme.CA()
        tls.cert_pem.write_to_path(args.tls_ca_out)
    serve_forever(
        args.host, args.port, keys=keys, accept_any_key=not args.strict_keys, tls=tls, print_port=args.print_port
    )


if __name__ == "__main__":
    main(sys.argv[1:])
