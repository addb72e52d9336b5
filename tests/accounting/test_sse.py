"""The streaming meter, both twins: recorded Anthropic streams, OpenAI streams, odd framing, caps."""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import anthropic
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hubcore.accounting import _meter_interpret as _interpret
from hubcore.accounting import _meter_py as _sse_py

from hubcore.accounting import meter as sse
from hubcore.accounting.meter import FMT_ANTHROPIC, FMT_OPENAI_CHAT, FMT_OPENAI_RESPONSES, MeterError

FIXTURES_DIR = Path(__file__).parents[1] / "fixtures"
FIXTURES = sorted([*FIXTURES_DIR.glob("*.txt"), *FIXTURES_DIR.glob("*.sse")])
NO_EXTENSIONS = bool(os.environ.get("HUBCORE_NO_EXTENSIONS"))

FIELDS = (
    "model", "input_tokens", "output_tokens", "cache_write_5m", "cache_write_1h", "cache_read",
    "reasoning_tokens", "server_tool_requests", "stop_reason", "error_type", "completed", "events", "malformed",
    "delta_chars", "output_estimated",
)

# OpenAI Responses as Codex receives it (gpt-5-codex, reasoning, then text).
RESPONSES_STREAM = (
    b'event: response.created\n'
    b'data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_0a1b2c","object":"response",'
    b'"created_at":1764000000,"status":"in_progress","background":false,"error":null,"incomplete_details":null,'
    b'"instructions":"You are Codex, based on GPT-5.","max_output_tokens":null,"model":"gpt-5-codex","output":[],'
    b'"parallel_tool_calls":false,"previous_response_id":null,"prompt_cache_key":"0199a3c2-5f1e-7d40-9b6a-2c8e4f1d3a57",'
    b'"reasoning":{"effort":"medium","summary":"auto"},"store":false,"temperature":1.0,"text":{"format":{"type":"text"},'
    b'"verbosity":"medium"},"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled","usage":null,'
    b'"user":null,"metadata":{}}}\n\n'
    b'event: response.in_progress\n'
    b'data: {"type":"response.in_progress","sequence_number":1,"response":{"id":"resp_0a1b2c","object":"response",'
    b'"created_at":1764000000,"status":"in_progress","error":null,"incomplete_details":null,"model":"gpt-5-codex",'
    b'"output":[],"parallel_tool_calls":false,"tool_choice":"auto","tools":[],"usage":null,"metadata":{}}}\n\n'
    b'event: response.output_item.added\n'
    b'data: {"type":"response.output_item.added","sequence_number":2,"output_index":0,'
    b'"item":{"id":"rs_0a1b2c","type":"reasoning","summary":[]}}\n\n'
    b'event: response.output_item.done\n'
    b'data: {"type":"response.output_item.done","sequence_number":3,"output_index":0,'
    b'"item":{"id":"rs_0a1b2c","type":"reasoning","summary":[]}}\n\n'
    b'event: response.output_item.added\n'
    b'data: {"type":"response.output_item.added","sequence_number":4,"output_index":1,'
    b'"item":{"id":"msg_0a1b2c","type":"message","status":"in_progress","content":[],"role":"assistant"}}\n\n'
    b'event: response.content_part.added\n'
    b'data: {"type":"response.content_part.added","sequence_number":5,"item_id":"msg_0a1b2c","output_index":1,'
    b'"content_index":0,"part":{"type":"output_text","annotations":[],"logprobs":[],"text":""}}\n\n'
    b'event: response.output_text.delta\n'
    b'data: {"type":"response.output_text.delta","sequence_number":6,"item_id":"msg_0a1b2c","output_index":1,'
    b'"content_index":0,"delta":"The \\"usage\\": {\\"input_tokens\\": 1} field","logprobs":[]}\n\n'
    b'event: response.output_text.delta\n'
    b'data: {"type":"response.output_text.delta","sequence_number":7,"item_id":"msg_0a1b2c","output_index":1,'
    b'"content_index":0,"delta":" counts tokens.","logprobs":[]}\n\n'
    b'event: response.output_text.done\n'
    b'data: {"type":"response.output_text.done","sequence_number":8,"item_id":"msg_0a1b2c","output_index":1,'
    b'"content_index":0,"text":"The \\"usage\\": {\\"input_tokens\\": 1} field counts tokens.","logprobs":[]}\n\n'
    b'event: response.completed\n'
    b'data: {"type":"response.completed","sequence_number":9,"response":{"id":"resp_0a1b2c","object":"response",'
    b'"created_at":1764000000,"status":"completed","error":null,"incomplete_details":null,"model":"gpt-5-codex",'
    b'"output":[{"id":"rs_0a1b2c","type":"reasoning","summary":[]},{"id":"msg_0a1b2c","type":"message",'
    b'"status":"completed","content":[{"type":"output_text","annotations":[],"logprobs":[],'
    b'"text":"The \\"usage\\": {\\"input_tokens\\": 1} field counts tokens."}],"role":"assistant"}],'
    b'"parallel_tool_calls":false,"tool_choice":"auto","tools":[],"usage":{"input_tokens":12450,'
    b'"input_tokens_details":{"cached_tokens":11264},"output_tokens":318,"output_tokens_details":'
    b'{"reasoning_tokens":192},"total_tokens":12768},"metadata":{}}}\n\n'
)
RESPONSES_EXPECTED = {
    "model": "gpt-5-codex", "input_tokens": 12450 - 11264, "output_tokens": 318, "cache_write_5m": 0,
    "cache_write_1h": 0, "cache_read": 11264, "reasoning_tokens": 192, "server_tool_requests": 0,
    "stop_reason": "completed", "error_type": None, "completed": True, "events": 10, "malformed": 0,
    "delta_chars": 38 + 15, "output_estimated": False,
}

RESPONSES_INCOMPLETE = (
    b'event: response.created\n'
    b'data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1","object":"response",'
    b'"status":"in_progress","model":"gpt-5-mini","output":[],"usage":null}}\n\n'
    b'event: response.output_text.delta\n'
    b'data: {"type":"response.output_text.delta","sequence_number":1,"item_id":"msg_1","output_index":0,'
    b'"content_index":0,"delta":"Once upon","logprobs":[]}\n\n'
    b'event: response.incomplete\n'
    b'data: {"type":"response.incomplete","sequence_number":2,"response":{"id":"resp_1","object":"response",'
    b'"status":"incomplete","incomplete_details":{"reason":"max_output_tokens"},"model":"gpt-5-mini","output":[],'
    b'"usage":{"input_tokens":40,"input_tokens_details":{"cached_tokens":0},"output_tokens":16,'
    b'"output_tokens_details":{"reasoning_tokens":0},"total_tokens":56}}}\n\n'
)

RESPONSES_FAILED = (
    b'event: response.created\n'
    b'data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_2","object":"response",'
    b'"status":"in_progress","model":"gpt-5-codex","output":[],"usage":null}}\n\n'
    b'event: response.failed\n'
    b'data: {"type":"response.failed","sequence_number":1,"response":{"id":"resp_2","object":"response",'
    b'"status":"failed","error":{"code":"server_error","message":"The server had an error."},'
    b'"model":"gpt-5-codex","output":[],"usage":{"input_tokens":900,"input_tokens_details":{"cached_tokens":0},'
    b'"output_tokens":0,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":900}}}\n\n'
)

RESPONSES_ERROR = (
    b'event: response.created\n'
    b'data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_3","object":"response",'
    b'"status":"in_progress","model":"gpt-5-codex","output":[],"usage":null}}\n\n'
    b'event: error\n'
    b'data: {"type":"error","code":"rate_limit_exceeded","message":"Rate limit reached for gpt-5-codex.",'
    b'"param":null,"sequence_number":1}\n\n'
)

# Chat Completions with stream_options.include_usage: every chunk says
# "usage":null, the last one before [DONE] carries it with empty choices.
CHAT_STREAM = (
    b'data: {"id":"chatcmpl-B9x","object":"chat.completion.chunk","created":1764000000,"model":"gpt-4o-2024-08-06",'
    b'"service_tier":"default","system_fingerprint":"fp_07871e2ad8","choices":[{"index":0,"delta":{"role":"assistant",'
    b'"content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-B9x","object":"chat.completion.chunk","created":1764000000,"model":"gpt-4o-2024-08-06",'
    b'"service_tier":"default","system_fingerprint":"fp_07871e2ad8","choices":[{"index":0,"delta":{"content":'
    b'"Set \\"usage\\": {\\"prompt_tokens\\": 1} and \\"finish_reason\\":\\"x\\""},"logprobs":null,'
    b'"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-B9x","object":"chat.completion.chunk","created":1764000000,"model":"gpt-4o-2024-08-06",'
    b'"service_tier":"default","system_fingerprint":"fp_07871e2ad8","choices":[{"index":0,"delta":{},'
    b'"logprobs":null,"finish_reason":"stop"}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-B9x","object":"chat.completion.chunk","created":1764000000,"model":"gpt-4o-2024-08-06",'
    b'"service_tier":"default","system_fingerprint":"fp_07871e2ad8","choices":[],"usage":{"prompt_tokens":2006,'
    b'"completion_tokens":300,"total_tokens":2306,"prompt_tokens_details":{"cached_tokens":1920,"audio_tokens":0},'
    b'"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,'
    b'"rejected_prediction_tokens":0}}}\n\n'
    b"data: [DONE]\n\n"
)
CHAT_EXPECTED = {
    "model": "gpt-4o-2024-08-06", "input_tokens": 86, "output_tokens": 300, "cache_write_5m": 0,
    "cache_write_1h": 0, "cache_read": 1920, "reasoning_tokens": 0, "server_tool_requests": 0,
    "stop_reason": "stop", "error_type": None, "completed": True, "events": 5, "malformed": 0,
    "delta_chars": 57, "output_estimated": False,
}

ANTHROPIC_BODY = (
    b'{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-opus-4-6",'
    b'"content":[{"type":"text","text":"Hi!"}],"stop_reason":"end_turn","stop_sequence":null,'
    b'"usage":{"input_tokens":3,"cache_creation_input_tokens":2000,"cache_read_input_tokens":48000,'
    b'"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":2000},"output_tokens":12,'
    b'"service_tier":"standard"}}'
)
RESPONSES_BODY = (
    b'{"id":"resp_9","object":"response","created_at":1764000000,"status":"completed","error":null,'
    b'"incomplete_details":null,"model":"gpt-5-mini-2025-08-07","output":[],"usage":{"input_tokens":500,'
    b'"input_tokens_details":{"cached_tokens":128},"output_tokens":70,"output_tokens_details":'
    b'{"reasoning_tokens":64},"total_tokens":570}}'
)
CHAT_BODY = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":1764000000,"model":"gpt-4o-mini-2024-07-18",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hello"},"finish_reason":"length"}],'
    b'"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,'
    b'"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}'
)

ANTHROPIC_ERROR_MID_STREAM = (
    b'event: message_start\n'
    b'data: {"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],'
    b'"model":"claude-sonnet-4-6","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":5,'
    b'"cache_creation_input_tokens":300,"cache_read_input_tokens":40000,"cache_creation":'
    b'{"ephemeral_5m_input_tokens":300,"ephemeral_1h_input_tokens":0},"output_tokens":1}}}\n\n'
    b'event: content_block_start\n'
    b'data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
    b'event: content_block_delta\n'
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hel"}}\n\n'
    b'event: error\n'
    b'data: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}\n\n'
)


def result(m: Any) -> dict[str, Any]:
    return {f: getattr(m, f) for f in FIELDS}


def meter_over(twin: ModuleType, pieces: list[Any], fmt: int = FMT_ANTHROPIC, sse_: bool = True, **kw: Any) -> Any:
    m = twin.Meter(fmt, sse_, **kw)
    for piece in pieces:
        m.feed(piece)
    m.close()
    return m


def run(twin: ModuleType, data: bytes, fmt: int = FMT_ANTHROPIC, sse_: bool = True, **kw: Any) -> dict[str, Any]:
    return result(meter_over(twin, [data], fmt, sse_, **kw))


def import_c() -> ModuleType:
    return importlib.import_module("hubcore.accounting._meter")


@pytest.fixture(scope="module", params=["c", "py"])
def twin(request: pytest.FixtureRequest) -> ModuleType:
    if request.param == "c":
        if NO_EXTENSIONS:
            pytest.skip("HUBCORE_NO_EXTENSIONS is set")
        return import_c()
    return _sse_py


# -- the selector ------------------------------------------------------------------


def test_compiled_twin_loaded() -> None:
    """Fails where the build should have produced the compiled meter but it did not load."""
    want = not NO_EXTENSIONS and platform.python_implementation() == "CPython"
    assert sse.COMPILED is want
    assert sse.Meter.__module__ == ("hubcore.accounting._meter" if want else "hubcore.accounting._meter_py")
    assert sse.scan_request.__module__ == sse.Meter.__module__


def test_no_extensions_selects_pure_twin() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import hubcore.accounting.meter as s; print(s.COMPILED, s.Meter.__module__)"],
        cwd=Path(__file__).parents[2], env={**os.environ, "HUBCORE_NO_EXTENSIONS": "1"},
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert out.stdout.split() == ["False", "hubcore.accounting._meter_py"]


def test_misuse_raises_meter_error(twin: ModuleType) -> None:
    for fmt in (0, 4, True, "1", 1.0):
        with pytest.raises(MeterError):
            twin.Meter(fmt, True)
    m = twin.Meter(FMT_ANTHROPIC, True)
    m.close()
    m.close()  # idempotent
    with pytest.raises(MeterError):
        m.feed(b"data: x\n\n")
    assert issubclass(MeterError, ValueError)


def test_counters_come_from_the_shared_reading(twin: ModuleType) -> None:
    """Both twins expose the shared Reading's counters (the compiled one forwards them), and nothing else."""
    m = twin.Meter(FMT_ANTHROPIC, True)
    fresh = _interpret.Reading(FMT_ANTHROPIC)
    assert _interpret.COUNTERS <= set(FIELDS)
    assert {f: getattr(m, f) for f in _interpret.COUNTERS} == {f: getattr(fresh, f) for f in _interpret.COUNTERS}
    with pytest.raises(AttributeError):
        m.no_such_counter  # noqa: B018


# -- recorded Anthropic streams --------------------------------------------------------


def line_ends(data: bytes, eol: bytes) -> bytes:
    return data.replace(b"\n", eol)


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_fixture_any_split_same_numbers(twin: ModuleType, path: Path, eol: bytes) -> None:
    data = line_ends(path.read_bytes(), eol)
    whole = run(twin, data)
    assert whole["events"] > 0 and whole["malformed"] == 0
    assert result(meter_over(twin, [data[i : i + 1] for i in range(len(data))])) == whole
    for i in range(len(data) + 1):
        assert result(meter_over(twin, [data[:i], data[i:]])) == whole, i
    if eol == b"\n":
        # the same bytes reached through every kind of buffer
        assert result(meter_over(twin, [bytearray(data[:50]), memoryview(data)[50:]])) == whole


class _Vendor(BaseHTTPRequestHandler):
    """Answers every POST with the bytes in `body`, as a vendor would stream them."""

    body = b""
    content_type = "text/event-stream"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200)
        self.send_header("content-type", self.content_type)
        self.send_header("content-length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def vendor() -> Iterator[tuple[str, type[_Vendor]]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Vendor)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Vendor
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


# The SDK itself cannot accumulate this one (message_start has no usage);
# test_usage_omitted_from_message_start checks it by hand.
SDK_FIXTURES = [p for p in FIXTURES if p.name != "usage_omitted_with_optional_fields_response.txt"]


@pytest.mark.parametrize("path", SDK_FIXTURES, ids=lambda p: p.name)
def test_fixture_matches_anthropic_sdk(twin: ModuleType, vendor: tuple[str, type[_Vendor]], path: Path) -> None:
    url, handler = vendor
    handler.body = path.read_bytes()
    # the beta stream, as Claude Code uses: it also follows a model fallback
    with (
        anthropic.Anthropic(api_key="sk-test", base_url=url, max_retries=0, timeout=20) as client,
        client.beta.messages.stream(
            model="claude-sonnet-4-6", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        ) as stream,
    ):
        final = stream.get_final_message()
    usage = final.usage
    tools = usage.server_tool_use.model_dump() if usage.server_tool_use else {}
    got = run(twin, path.read_bytes())
    assert got["model"] == final.model
    assert got["stop_reason"] == final.stop_reason
    assert got["input_tokens"] == usage.input_tokens
    assert got["output_tokens"] == usage.output_tokens
    assert got["cache_read"] == (usage.cache_read_input_tokens or 0)
    assert got["cache_write_5m"] + got["cache_write_1h"] == (usage.cache_creation_input_tokens or 0)
    details = usage.output_tokens_details
    assert got["reasoning_tokens"] == ((details.thinking_tokens or 0) if details else 0)
    assert got["server_tool_requests"] == sum(v for k, v in tools.items() if k.endswith("_requests") and v)
    assert got["completed"] is True
    assert got["output_estimated"] is False
    assert got["error_type"] is None


def test_message_delta_fields_by_hand(twin: ModuleType) -> None:
    # message_start: input 25, cache write 10 (all 5m), read 5, output 1; the
    # message_delta totals overwrite: input 40, write 12, read 7, output 8
    got = run(twin, (FIXTURES_DIR / "message_delta_fields_response.txt").read_bytes())
    assert got == {
        "model": "claude-sonnet-4-5", "input_tokens": 40, "output_tokens": 8, "cache_write_5m": 12,
        "cache_write_1h": 0, "cache_read": 7, "reasoning_tokens": 3, "server_tool_requests": 1,
        "stop_reason": "end_turn", "error_type": None, "completed": True, "events": 6, "malformed": 0,
        "delta_chars": len("Hello there!"), "output_estimated": False,
    }


def test_usage_omitted_from_message_start(twin: ModuleType) -> None:
    got = run(twin, (FIXTURES_DIR / "usage_omitted_with_optional_fields_response.txt").read_bytes())
    assert got == {
        "model": "claude-test", "input_tokens": 12, "output_tokens": 6, "cache_write_5m": 4,
        "cache_write_1h": 0, "cache_read": 3, "reasoning_tokens": 2, "server_tool_requests": 1,
        "stop_reason": "end_turn", "error_type": None, "completed": True, "events": 6, "malformed": 0,
        "delta_chars": len("Hello"), "output_estimated": False,
    }


def test_fallback_block_relabels_model(twin: ModuleType) -> None:
    got = run(twin, (FIXTURES_DIR / "fallback_response.txt").read_bytes())
    assert got["model"] == "claude-sonnet-4-5"  # message_start said claude-opus-4-7


def test_truncated_stream_keeps_partial_numbers(twin: ModuleType) -> None:
    data = (FIXTURES_DIR / "message_delta_fields_response.txt").read_bytes()
    start_end = data.index(b"}}}\n", data.index(b"message_start")) + 3
    text_end = data.index(b"}}\n", data.index(b"event: content_block_delta")) + 2
    delta_end = data.index(b"}}}\n", data.index(b"event: message_delta")) + 3
    stop_data = data.index(b"data", data.index(b"event: message_stop")) + len(b"data")
    after_start = {"input_tokens": 25, "output_tokens": 1, "cache_write_5m": 10, "cache_read": 5, "reasoning_tokens": 0}
    # "Hello there!" passed, message_start's placeholder 1 did not bill it
    after_text = {**after_start, "output_tokens": 3, "delta_chars": 12, "output_estimated": True}
    after_delta = {"input_tokens": 40, "output_tokens": 8, "cache_write_5m": 12, "cache_read": 7, "reasoning_tokens": 3,
                   "delta_chars": 12, "output_estimated": False}
    nothing = dict.fromkeys(after_start, 0)
    for t in range(len(data) + 1):
        got = run(twin, data[:t])
        want = (
            nothing if t < start_end else after_start if t < text_end else after_text if t < delta_end else after_delta
        )
        assert {k: got[k] for k in want} == want, t
        assert got["model"] == (None if t < start_end else "claude-sonnet-4-5"), t
        assert got["completed"] is (t >= stop_data), t
        assert got["error_type"] is None


# -- framing -------------------------------------------------------------------------


def test_multiline_data_and_comments(twin: ModuleType) -> None:
    stream = (
        b": hello from a proxy\n\n"
        b"event: message_start\n"
        b'data: {"type":"message_start","message":{"model":"claude-haiku-4-5",\n'
        b': a comment inside the event is ignored\n'
        b'data:"usage":{"input_tokens":9,\n'
        b'data:  "output_tokens":1}}}\n\n'
        b": ping\n\n"
        b"event: message_delta\n"
        b'data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":4}}\n'
        b"id: 7\nretry: 1000\n\n"
        b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
    )
    for eol in (b"\n", b"\r\n", b"\r"):
        data = line_ends(stream, eol)
        got = run(twin, data)
        assert (got["model"], got["input_tokens"], got["output_tokens"]) == ("claude-haiku-4-5", 9, 4)
        assert (got["completed"], got["events"], got["malformed"]) == (True, 3, 0)
        for i in range(len(data) + 1):
            assert result(meter_over(twin, [data[:i], data[i:]])) == got, (eol, i)
        assert result(meter_over(twin, [data[i : i + 1] for i in range(len(data))])) == got, eol


def test_events_without_event_lines(twin: ModuleType) -> None:
    """Some proxies drop `event:` lines: the data's "type" (any spacing) decides."""
    data = (FIXTURES_DIR / "message_delta_fields_response.txt").read_bytes()
    bare = b"".join(line + b"\n" for line in data.split(b"\n") if not line.startswith(b"event:"))
    bare = bare.replace(b'{"type":"message_delta"', b'{ "type" : "message_delta"')
    want = run(twin, data)
    assert run(twin, bare) == want
    # type not the first member: found by a full decode
    moved = bare.replace(b'{"type":"message_stop"}', b'{"x":1,"type":"message_stop"}')
    assert run(twin, moved) == want


def test_in_stream_error_after_200(twin: ModuleType) -> None:
    got = run(twin, ANTHROPIC_ERROR_MID_STREAM)
    assert got["error_type"] == "overloaded_error"
    assert got["completed"] is False
    assert (got["input_tokens"], got["cache_write_5m"], got["cache_read"], got["output_tokens"]) == (5, 300, 40000, 1)


def test_error_event_that_is_not_json(twin: ModuleType) -> None:
    got = run(twin, b"event: error\ndata: upstream connect error\n\n")
    assert (got["error_type"], got["malformed"], got["events"]) == ("error", 1, 1)


def test_escaped_usage_in_text_is_only_text(twin: ModuleType) -> None:
    """Text that mentions usage counts as characters, never as usage; a broken delta counts as malformed."""
    text = '"usage":{"output_tokens":999}, "type":"message_delta"'
    delta = (
        b'event: content_block_delta\n'
        b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta",'
        b'"text":"\\"usage\\":{\\"output_tokens\\":999}, \\"type\\":\\"message_delta\\""}}\n\n'
    )
    broken = delta.replace(b'"}}\n', b'"}\n')
    got = run(twin, ANTHROPIC_ERROR_MID_STREAM.replace(b"event: error", broken + b"event: error"))
    assert (got["output_tokens"], got["malformed"], got["delta_chars"]) == (1, 1, len("Hel"))
    got = run(twin, ANTHROPIC_ERROR_MID_STREAM.replace(b"event: error", delta + b"event: error"))
    chars = len("Hel") + len(text)
    assert (got["output_tokens"], got["malformed"], got["delta_chars"]) == (math.ceil(chars / 4), 0, chars)
    chat_text = b'"choices":[{"delta":{"content":"\\"usage\\": {\\"prompt_tokens\\": 1}"}}]'
    chat_broken = b'data: {"id":"c","model":"gpt-4o",' + chat_text + b"\n\n"
    # a key that ends in an escaped quote and "usage" is text too
    chat_broken += b'data: {"id":"c","model":"gpt-4o","choices":[{"delta":{"say \\"usage": {"n": 1}\n\n'
    chat = CHAT_STREAM.replace(b"data: [DONE]", chat_broken + b"data: [DONE]")
    got = run(twin, chat, FMT_OPENAI_CHAT)
    assert got == {**CHAT_EXPECTED, "events": 7, "malformed": 2}
    chat = CHAT_STREAM.replace(b"data: [DONE]", b'data: {"id":"c","model":"gpt-4o",' + chat_text + b"}\n\ndata: [DONE]")
    got = run(twin, chat, FMT_OPENAI_CHAT)
    chars = 57 + len('"usage": {"prompt_tokens": 1}')
    assert got == {**CHAT_EXPECTED, "events": 6, "delta_chars": chars}
    # a content block that is not a model fallback is skipped unread as well
    block = b'event: content_block_start\ndata: {"type":"content_block_start","content_block":{"type":"text"\n\n'
    got = run(twin, ANTHROPIC_ERROR_MID_STREAM.replace(b"event: error", block + b"event: error"))
    assert got["malformed"] == 0


def test_body_ends_without_blank_line(twin: ModuleType) -> None:
    data = (FIXTURES_DIR / "tool_use_response.txt").read_bytes()
    assert not data.endswith(b"\n")
    got = run(twin, data)
    assert (got["completed"], got["output_tokens"]) == (True, 65)


# -- caps ------------------------------------------------------------------------------


def test_oversized_line_is_dropped_and_the_stream_goes_on(twin: ModuleType) -> None:
    data = (FIXTURES_DIR / "message_delta_fields_response.txt").read_bytes()
    big = b"event: content_block_delta\ndata: {" + b"x" * 5000 + b"}\n\n"
    stream = data.replace(b"event: content_block_stop", big + b"event: content_block_stop")
    want = run(twin, data)
    for pieces in ([stream], [stream[i : i + 100] for i in range(0, len(stream), 100)]):
        got = result(meter_over(twin, pieces, max_event_size=1000))
        assert got == {**want, "events": want["events"] + 1, "malformed": 1}


@pytest.mark.parametrize("sse_", [True, False], ids=["sse", "body"])
def test_memory_stays_bounded(twin: ModuleType, sse_: bool) -> None:
    """A line (or body) that never ends is dropped past the cap, not buffered."""
    cap = 256 * 1024
    piece = b"data: " + b"x" * (64 * 1024 - 6)
    m = twin.Meter(FMT_ANTHROPIC, sse_, max_event_size=cap, max_body_size=cap)
    tracemalloc.start()
    try:
        for _ in range(128):  # 8 MiB
            m.feed(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * cap
    m.close()
    assert m.malformed == 1


def test_many_data_lines_over_the_cap(twin: ModuleType) -> None:
    stream = b"event: message_start\n" + b"data: 0123456789\n" * 200 + b"\n"
    got = run(twin, stream, max_event_size=1000)
    assert (got["events"], got["malformed"], got["model"]) == (1, 1, None)


def test_body_over_the_cap(twin: ModuleType) -> None:
    got = result(meter_over(twin, [ANTHROPIC_BODY[:100], ANTHROPIC_BODY[100:]], sse_=False, max_body_size=200))
    assert (got["malformed"], got["input_tokens"], got["completed"]) == (1, 0, False)


# -- OpenAI streams and every non-streaming body ----------------------------------------


def test_responses_stream_matches_openai_sdk(twin: ModuleType, vendor: tuple[str, type[_Vendor]]) -> None:
    url, handler = vendor
    handler.body = RESPONSES_STREAM
    with openai.OpenAI(api_key="sk-test", base_url=url + "/v1", max_retries=0, timeout=20) as client:
        events = list(client.responses.create(model="gpt-5-codex", input="hi", stream=True))
    assert events[-1].type == "response.completed"
    usage = events[-1].response.usage
    assert usage is not None
    got = run(twin, RESPONSES_STREAM, FMT_OPENAI_RESPONSES)
    assert got == RESPONSES_EXPECTED
    assert got["cache_read"] == usage.input_tokens_details.cached_tokens
    assert got["input_tokens"] + got["cache_read"] == usage.input_tokens
    assert got["output_tokens"] == usage.output_tokens
    assert got["reasoning_tokens"] == usage.output_tokens_details.reasoning_tokens
    assert got["model"] == events[-1].response.model


def test_chat_stream_matches_openai_sdk(twin: ModuleType, vendor: tuple[str, type[_Vendor]]) -> None:
    url, handler = vendor
    handler.body = CHAT_STREAM
    with openai.OpenAI(api_key="sk-test", base_url=url + "/v1", max_retries=0, timeout=20) as client:
        chunks = list(
            client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True,
                stream_options={"include_usage": True},
            )
        )
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    got = run(twin, CHAT_STREAM, FMT_OPENAI_CHAT)
    assert got == CHAT_EXPECTED
    assert got["input_tokens"] + got["cache_read"] == usage.prompt_tokens
    assert got["cache_read"] == usage.prompt_tokens_details.cached_tokens
    assert got["output_tokens"] == usage.completion_tokens


@pytest.mark.parametrize(
    ("stream", "fmt", "want"),
    [
        (RESPONSES_STREAM, FMT_OPENAI_RESPONSES, RESPONSES_EXPECTED),
        (CHAT_STREAM, FMT_OPENAI_CHAT, CHAT_EXPECTED),
        (RESPONSES_INCOMPLETE, FMT_OPENAI_RESPONSES, {
            "model": "gpt-5-mini", "input_tokens": 40, "output_tokens": 16, "cache_write_5m": 0,
            "cache_write_1h": 0, "cache_read": 0, "reasoning_tokens": 0, "server_tool_requests": 0,
            "stop_reason": "max_output_tokens", "error_type": None, "completed": True, "events": 3, "malformed": 0,
            "delta_chars": len("Once upon"), "output_estimated": False,
        }),
        (RESPONSES_FAILED, FMT_OPENAI_RESPONSES, {
            "model": "gpt-5-codex", "input_tokens": 900, "output_tokens": 0, "cache_write_5m": 0,
            "cache_write_1h": 0, "cache_read": 0, "reasoning_tokens": 0, "server_tool_requests": 0,
            "stop_reason": "failed", "error_type": "server_error", "completed": False, "events": 2, "malformed": 0,
            "delta_chars": 0, "output_estimated": False,
        }),
        (RESPONSES_ERROR, FMT_OPENAI_RESPONSES, {
            "model": "gpt-5-codex", "input_tokens": 0, "output_tokens": 0, "cache_write_5m": 0,
            "cache_write_1h": 0, "cache_read": 0, "reasoning_tokens": 0, "server_tool_requests": 0,
            "stop_reason": None, "error_type": "rate_limit_exceeded", "completed": False, "events": 2, "malformed": 0,
            "delta_chars": 0, "output_estimated": False,
        }),
    ],
    ids=["responses", "chat", "responses-incomplete", "responses-failed", "responses-error"],
)
def test_openai_streams(twin: ModuleType, stream: bytes, fmt: int, want: dict[str, Any]) -> None:
    for eol in (b"\n", b"\r\n", b"\r"):
        data = line_ends(stream, eol)
        assert run(twin, data, fmt) == want
        assert result(meter_over(twin, [data[i : i + 7] for i in range(0, len(data), 7)], fmt)) == want


def test_chat_truncated_before_done(twin: ModuleType) -> None:
    got = run(twin, CHAT_STREAM[: CHAT_STREAM.index(b"data: [DONE]")], FMT_OPENAI_CHAT)
    assert got == {**CHAT_EXPECTED, "completed": False, "events": 4}


def test_chat_error_chunk(twin: ModuleType) -> None:
    first_chunk_end = CHAT_STREAM.index(b"\n\n") + 2
    stream = CHAT_STREAM[:first_chunk_end] + (
        b'data: {"error": {"message": "overloaded", "type": "server_error", "code": null}}\n\n'
    )
    got = run(twin, stream, FMT_OPENAI_CHAT)
    assert (got["error_type"], got["completed"], got["model"]) == ("server_error", False, "gpt-4o-2024-08-06")


@pytest.mark.parametrize(
    ("body", "fmt", "want"),
    [
        (ANTHROPIC_BODY, FMT_ANTHROPIC, {
            "model": "claude-opus-4-6", "input_tokens": 3, "output_tokens": 12, "cache_write_5m": 0,
            "cache_write_1h": 2000, "cache_read": 48000, "reasoning_tokens": 0, "server_tool_requests": 0,
            "stop_reason": "end_turn", "error_type": None, "completed": True, "events": 0, "malformed": 0,
            "delta_chars": 0, "output_estimated": False,
        }),
        (RESPONSES_BODY, FMT_OPENAI_RESPONSES, {
            "model": "gpt-5-mini-2025-08-07", "input_tokens": 372, "output_tokens": 70, "cache_write_5m": 0,
            "cache_write_1h": 0, "cache_read": 128, "reasoning_tokens": 64, "server_tool_requests": 0,
            "stop_reason": "completed", "error_type": None, "completed": True, "events": 0, "malformed": 0,
            "delta_chars": 0, "output_estimated": False,
        }),
        (CHAT_BODY, FMT_OPENAI_CHAT, {
            "model": "gpt-4o-mini-2024-07-18", "input_tokens": 19, "output_tokens": 10, "cache_write_5m": 0,
            "cache_write_1h": 0, "cache_read": 0, "reasoning_tokens": 0, "server_tool_requests": 0,
            "stop_reason": "length", "error_type": None, "completed": True, "events": 0, "malformed": 0,
            "delta_chars": 0, "output_estimated": False,
        }),
    ],
    ids=["anthropic", "responses", "chat"],
)
def test_non_streaming_bodies(twin: ModuleType, body: bytes, fmt: int, want: dict[str, Any]) -> None:
    assert run(twin, body, fmt, sse_=False) == want
    assert result(meter_over(twin, [body[i : i + 1] for i in range(len(body))], fmt, sse_=False)) == want
    truncated = run(twin, body[:-1], fmt, sse_=False)
    assert (truncated["completed"], truncated["malformed"], truncated["input_tokens"]) == (False, 1, 0)


@pytest.mark.parametrize(
    ("body", "fmt", "error_type"),
    [
        (b'{"type":"error","error":{"type":"rate_limit_error","message":"slow down"},"request_id":"req_1"}',
         FMT_ANTHROPIC, "rate_limit_error"),
        (b'{"error":{"message":"Incorrect API key","type":"invalid_request_error","param":null,'
         b'"code":"invalid_api_key"}}', FMT_OPENAI_CHAT, "invalid_api_key"),
        (b'{"error":{"message":"bad","type":"invalid_request_error","param":"input","code":null}}',
         FMT_OPENAI_RESPONSES, "invalid_request_error"),
    ],
    ids=["anthropic", "chat", "responses"],
)
def test_error_bodies(twin: ModuleType, body: bytes, fmt: int, error_type: str) -> None:
    got = run(twin, body, fmt, sse_=False)
    assert (got["error_type"], got["completed"], got["stop_reason"]) == (error_type, False, None)


# -- cut streams: the output estimate ---------------------------------------------------


def sse_events(stream: bytes) -> list[tuple[str | None, bytes]]:
    """(event name, data) of each complete event of a stream with LF line ends."""
    out = []
    for block in stream.split(b"\n\n")[:-1]:
        name, data = None, []
        for line in block.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data:"):
                data.append(line[6:] if line.startswith(b"data: ") else line[5:])
        if data:
            out.append((name, b"\n".join(data)))
    return out


def oracle_text(fmt: int, name: str | None, obj: Any) -> int:
    """Characters of generated text in one decoded event, written apart from both twins."""
    def strings(d: Any, keys: tuple[str, ...]) -> int:
        return sum(len(v) for k in keys if isinstance(d, dict) and isinstance(v := d.get(k), str))

    if not isinstance(obj, dict):
        return 0
    if fmt == FMT_ANTHROPIC:
        return strings(obj.get("delta"), ("text", "thinking", "partial_json")) if name == "content_block_delta" else 0
    if fmt == FMT_OPENAI_RESPONSES:
        assert name is not None
        if not (name.startswith("response.") and name.endswith(".delta") and name != "response.audio.delta"):
            return 0
        return strings(obj, ("delta",))
    n = 0
    choices = obj.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        n += strings(delta, ("content", "reasoning_content", "refusal"))
        calls = delta.get("tool_calls") if isinstance(delta, dict) else None
        for call in calls if isinstance(calls, list) else []:
            n += strings(call.get("function") if isinstance(call, dict) else None, ("arguments",))
    return n


def oracle_chars(stream: bytes, fmt: int) -> int:
    """The stdlib's JSON decoder's count of the text in a stream's complete events."""
    return sum(oracle_text(fmt, name, json.loads(data)) for name, data in sse_events(stream) if data != b"[DONE]")


def anthropic_oracle(stream: bytes) -> tuple[int, bool]:
    """(reported output, whether it is final) after a stream's complete events."""
    reported, final = 0, False
    for name, data in sse_events(stream):
        obj = json.loads(data)
        if name == "message_start":
            reported = obj["message"].get("usage", {}).get("output_tokens", reported)
        elif name == "message_delta" and isinstance(obj["usage"].get("output_tokens"), int):
            reported, final = obj["usage"]["output_tokens"], True
        elif name == "message_stop":
            final = True
    return reported, final


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_anthropic_stream_cut_after_any_event(twin: ModuleType, path: Path) -> None:
    """Cut anywhere before its final usage, a stream's output is at least ceil(characters / 4)."""
    data = path.read_bytes()
    if not data.endswith(b"\n\n"):
        data = data.rstrip(b"\n") + b"\n\n"
    ends = [i + 2 for i in range(len(data)) if data.startswith(b"\n\n", i)]
    for end in ends:
        cut = data[:end]
        chars = oracle_chars(cut, FMT_ANTHROPIC)
        reported, final = anthropic_oracle(cut)
        estimate = math.ceil(chars / 4)
        want = {
            "delta_chars": chars,
            "output_tokens": reported if final else max(reported, estimate),
            "output_estimated": not final and estimate > reported,
        }
        for pieces in ([cut], [cut[: end // 2], cut[end // 2 :]]):
            got = result(meter_over(twin, pieces))
            assert {k: got[k] for k in want} == want, end


@pytest.mark.parametrize(
    ("stream", "fmt", "final", "chars", "vendor_output"),
    [
        ((FIXTURES_DIR / "tool_use_response.txt").read_bytes(), FMT_ANTHROPIC, b"event: message_delta", 69, 65),
        (RESPONSES_STREAM, FMT_OPENAI_RESPONSES, b"event: response.completed", 38 + 15, 318),
        (CHAT_STREAM, FMT_OPENAI_CHAT, b'"choices":[],"usage":{', 57, 300),
    ],
    ids=["anthropic", "responses", "chat"],
)
def test_cut_stream_output_is_estimated(
    twin: ModuleType, stream: bytes, fmt: int, final: bytes, chars: int, vendor_output: int
) -> None:
    """Cut just before the event with the final usage; then whole."""
    cut = stream[: stream.rindex(b"\n\n", 0, stream.index(final)) + 2]
    assert oracle_chars(cut, fmt) == chars
    got = run(twin, cut, fmt)
    assert (got["delta_chars"], got["output_tokens"], got["output_estimated"]) == (chars, math.ceil(chars / 4), True)
    assert got["completed"] is False
    # the whole stream: the vendor's number, exactly, whatever the estimate says
    got = run(twin, stream, fmt)
    assert (got["delta_chars"], got["output_tokens"], got["output_estimated"]) == (chars, vendor_output, False)


def anthropic_delta(delta: bytes) -> bytes:
    return b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":' + delta + b"}\n\n"


def responses_delta(name: bytes, delta: bytes) -> bytes:
    return b"event: " + name + b'\ndata: {"type":"' + name + b'","sequence_number":1,"delta":' + delta + b"}\n\n"


def chat_delta(delta: bytes) -> bytes:
    return b'data: {"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":' + delta + b"}]}\n\n"


# 16 characters in 25 bytes of UTF-8.
UNICODE_TEXT = "naïve café — ✓ 😀"
UNICODE_JSON = json.dumps(UNICODE_TEXT, ensure_ascii=False).encode()
# Each escape is one character: \n \" \\ \/ \t \u00e9 \u00E9 \ud83d\ude00 (one astral character) \u0000.
ESCAPES_JSON = b'"\\n\\"\\\\\\/\\t\\u00e9\\u00E9\\ud83d\\ude00\\u0000"'


@pytest.mark.parametrize(
    ("stream", "fmt", "chars"),
    [
        (anthropic_delta(b'{"type":"text_delta","text":' + UNICODE_JSON + b"}"), FMT_ANTHROPIC, 16),
        (anthropic_delta(b'{"type":"thinking_delta","thinking":' + ESCAPES_JSON + b"}"), FMT_ANTHROPIC, 9),
        (anthropic_delta(b'{"type":"input_json_delta","partial_json":"{\\"path\\": \\"/tmp/\\u00e9\\"}"}'),
         FMT_ANTHROPIC, len('{"path": "/tmp/é"}')),
        (responses_delta(b"response.output_text.delta", UNICODE_JSON), FMT_OPENAI_RESPONSES, 16),
        (responses_delta(b"response.reasoning_summary_text.delta", ESCAPES_JSON), FMT_OPENAI_RESPONSES, 9),
        (responses_delta(b"response.reasoning_text.delta", b'"abc"'), FMT_OPENAI_RESPONSES, 3),
        (responses_delta(b"response.function_call_arguments.delta", b'"{\\"a\\":1}"'), FMT_OPENAI_RESPONSES, 7),
        (chat_delta(b'{"content":' + UNICODE_JSON + b"}"), FMT_OPENAI_CHAT, 16),
        (chat_delta(b'{"reasoning_content":' + ESCAPES_JSON + b',"refusal":"no"}'), FMT_OPENAI_CHAT, 11),
        (chat_delta(b'{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"run",'
                    b'"arguments":"{\\"cmd\\""}},{"function":{"arguments":": \\"ls\\"}"}}]}'), FMT_OPENAI_CHAT, 13),
    ],
    ids=[
        "anthropic-unicode", "anthropic-escapes", "anthropic-partial-json", "responses-unicode", "responses-escapes",
        "responses-reasoning", "responses-arguments", "chat-unicode", "chat-escapes", "chat-tool-calls",
    ],
)
def test_delta_characters_not_bytes(twin: ModuleType, stream: bytes, fmt: int, chars: int) -> None:
    assert (len(UNICODE_TEXT), len(UNICODE_TEXT.encode())) == (16, 25)
    assert oracle_chars(stream, fmt) == chars
    # a chat stream's first chunk is decoded for its model; the second is only walked
    data = stream * 2 if fmt == FMT_OPENAI_CHAT else stream
    got = run(twin, data, fmt)
    assert (got["delta_chars"], got["malformed"]) == (chars * (data.count(b"\n\n")), 0)
    assert (got["output_tokens"], got["output_estimated"]) == (math.ceil(got["delta_chars"] / 4), True)


@pytest.mark.parametrize(
    ("stream", "fmt"),
    [
        (anthropic_delta(b'{"type":"signature_delta","signature":"EqQBCgIYAhIM' + b"A" * 60 + b'"}'), FMT_ANTHROPIC),
        (anthropic_delta(b'{"type":"citations_delta","citation":{"type":"char_location","cited_text":"abc"}}'),
         FMT_ANTHROPIC),
        ((FIXTURES_DIR / "compaction_response.txt").read_bytes().split(b"event: content_block_stop")[0],
         FMT_ANTHROPIC),
        (b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
         b'"content_block":{"type":"text","text":"not a delta"}}\n\n', FMT_ANTHROPIC),
        (responses_delta(b"response.audio.delta", b'"UklGRiQAAABXQVZFZm10IBAAAAABAAEA"'), FMT_OPENAI_RESPONSES),
        (b'event: response.output_text.done\ndata: {"type":"response.output_text.done","text":"whole text"}\n\n',
         FMT_OPENAI_RESPONSES),
        (chat_delta(b'{"role":"assistant","content":null,"tool_calls":[{"function":{"name":"run"}}]}'),
         FMT_OPENAI_CHAT),
    ],
    ids=["signature", "citation", "compaction", "block-start", "audio", "text-done", "chat-role-and-name"],
)
def test_what_is_not_generated_text(twin: ModuleType, stream: bytes, fmt: int) -> None:
    got = run(twin, stream, fmt)
    assert (got["delta_chars"], got["output_estimated"], got["malformed"]) == (0, False, 0)


def test_chat_stream_without_usage_is_estimated(twin: ModuleType) -> None:
    """Without stream_options.include_usage a chat stream ends with [DONE] and no usage at all."""
    stream = b"".join(chunk + b"\n\n" for chunk in CHAT_STREAM.split(b"\n\n") if chunk and b'"choices":[]' not in chunk)
    assert b'"usage":{' not in stream
    got = run(twin, stream, FMT_OPENAI_CHAT)
    assert (got["completed"], got["delta_chars"], got["output_tokens"], got["output_estimated"]) == (True, 57, 15, True)


def test_responses_failure_with_usage_is_final(twin: ModuleType) -> None:
    """A terminal event that carries usage is the vendor's count, even of a failed response."""
    text = responses_delta(b"response.output_text.delta", b'"' + b"x" * 40 + b'"')
    stream = RESPONSES_FAILED.replace(b"event: response.failed", text + b"event: response.failed")
    got = run(twin, stream, FMT_OPENAI_RESPONSES)
    assert (got["delta_chars"], got["output_tokens"], got["output_estimated"]) == (40, 0, False)
    got = run(twin, stream[: stream.index(b"event: response.failed")], FMT_OPENAI_RESPONSES)
    assert (got["delta_chars"], got["output_tokens"], got["output_estimated"]) == (40, 10, True)


@pytest.mark.parametrize(
    ("stream", "fmt", "chars", "malformed"),
    [
        # JSON the compiled twin's walk leaves to orjson: both twins still agree with the stdlib
        (anthropic_delta(b'{"type":"text_delta","text":"ab","text":"abcdef"}'), FMT_ANTHROPIC, 6, 0),
        (b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"z"},'
         b'"d\\u0065lta":{"t\\u0065xt":"abc"}}\n\n', FMT_ANTHROPIC, 3, 0),
        (anthropic_delta(b'{"type":"text_delta","n":[1e5,-2.5E-3,123456789012345678901234567890],"text":"abcd"}'),
         FMT_ANTHROPIC, 4, 0),
        (anthropic_delta(b'{"type":"text_delta","deep":' + b"[" * 100 + b"]" * 100 + b',"text":"abcd"}'),
         FMT_ANTHROPIC, 4, 0),
        (responses_delta(b"response.output_text.delta", b' \t "spaced\\/out" \t'), FMT_OPENAI_RESPONSES, 10, 0),
        # data lines are joined with a line feed: JSON whitespace
        (b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",\ndata:"delta":\n'
         b'data:  "ab"}\n\n', FMT_OPENAI_RESPONSES, 2, 0),
        (chat_delta(b'{"content":"a"},"x":{"delta":{"content":"bcd"}}'), FMT_OPENAI_CHAT, 1, 0),
        (b'data: {"id":"c","model":"gpt-4o","choices":[{"delta":{"content":"a"}}],'
         b'"choices":[{"delta":{"content":"bcd"}}]}\n\n', FMT_OPENAI_CHAT, 3, 0),
        # not JSON: malformed, and no text counted
        (anthropic_delta(b'{"type":"text_delta","text":"lone \\ud800 half"}'), FMT_ANTHROPIC, 0, 1),
        (anthropic_delta(b'{"type":"text_delta","text":"bad \xc3\x28 utf-8"}'), FMT_ANTHROPIC, 0, 1),
        (anthropic_delta(b'{"type":"text_delta","text":"raw \t tab"}'), FMT_ANTHROPIC, 0, 1),
        (anthropic_delta(b'{"type":"text_delta","text":"trailing comma",}'), FMT_ANTHROPIC, 0, 1),
        (anthropic_delta(b'{"type":"text_delta","n":01,"text":"leading zero"}'), FMT_ANTHROPIC, 0, 1),
        (responses_delta(b"response.output_text.delta", b'"surrogate in UTF-8 \xed\xa0\x80"'), FMT_OPENAI_RESPONSES,
         0, 1),
        (chat_delta(b'{"content":"unclosed}'), FMT_OPENAI_CHAT, 0, 1),
        # Anthropic's own spelling, which the compiled twin reads without walking the keys, and near misses
        (anthropic_delta(b'{"type":"text_delta","text":"a\\"b\\\\"}'), FMT_ANTHROPIC, 4, 0),
        (anthropic_delta(b'{"type":"text_delta","text":"abc"}').replace(b'"index":0', b'"index":-12.5'),
         FMT_ANTHROPIC, 3, 0),
        (anthropic_delta(b'{"type":"text_delta","text":"abc"}').replace(b"}}\n", b"}} \t\n"), FMT_ANTHROPIC, 3, 0),
        (anthropic_delta(b'{"type":"text_delta","thinking":"abc"}'), FMT_ANTHROPIC, 3, 0),
        (anthropic_delta(b'{"type":"thinking_delta","thinking":"abc","signature":"xyz"}'), FMT_ANTHROPIC, 3, 0),
        (anthropic_delta(b'{"type":"text_delta","text":"abc"},"x":1'), FMT_ANTHROPIC, 3, 0),
        (anthropic_delta(b'{"type":"text_delta","text":"abc"}}'), FMT_ANTHROPIC, 0, 1),
        (anthropic_delta(b'{"type":"text_delta","text":"abc"}').replace(b"}}\n", b"}\n"), FMT_ANTHROPIC, 0, 1),
        (anthropic_delta(b'{"type":"text_delta","text":"abc"}').replace(b'"index":0', b'"index":01'),
         FMT_ANTHROPIC, 0, 1),
        (anthropic_delta(b'{"type":"text_delta","text":"abc}'), FMT_ANTHROPIC, 0, 1),
    ],
)
def test_unusual_deltas_agree_with_the_stdlib(twin: ModuleType, stream: bytes, fmt: int, chars: int,
                                              malformed: int) -> None:
    if not malformed:
        assert oracle_chars(stream, fmt) == chars
    # a model first, so that the chat chunk under test is only walked
    data = (chat_delta(b"{}") + stream) if fmt == FMT_OPENAI_CHAT else stream
    got = run(twin, data, fmt)
    assert (got["delta_chars"], got["malformed"]) == (chars, malformed)


_ANTHROPIC_DELTA_KINDS = [("text_delta", "text"), ("thinking_delta", "thinking"), ("input_json_delta", "partial_json")]


@st.composite
def _anthropic_deltas_as_sent(draw: st.DrawFn) -> tuple[bytes, int | None]:
    """(data, characters or None) of a content_block_delta spelled as Anthropic sends it, at times one byte off."""
    kind, key = draw(st.sampled_from(_ANTHROPIC_DELTA_KINDS))
    text = draw(_JSON_TEXT)
    index = draw(st.integers(0, 10**20))
    data = (
        f'{{"type":"content_block_delta","index":{index},"delta":{{"type":"{kind}","{key}":'
        f"{draw(_json_string(text))}}}}}"
    ).encode()
    if not draw(st.booleans()):
        return data, len(text)
    at = draw(st.integers(0, len(data) - 1))
    return data[:at] + draw(st.binary(max_size=2)) + data[at + 1 :], None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event=_anthropic_deltas_as_sent(), cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=6))
def test_anthropic_deltas_as_sent_agree(event: tuple[bytes, int | None], cuts: list[int]) -> None:
    """The compiled twin's shortcut for Anthropic's spelling counts as the pure twin does, broken or not."""
    data, chars = event
    stream = b"event: content_block_delta\ndata: " + data + b"\n\n"
    want = result(meter_over(_sse_py, [stream]))
    if chars is not None:
        assert (want["delta_chars"], want["malformed"]) == (chars, 0)
    if not NO_EXTENSIONS:
        assert result(meter_over(import_c(), _split(stream, cuts))) == want


# -- cache write split ------------------------------------------------------------------


def _start_and_delta(start_usage: bytes, delta_usage: bytes) -> bytes:
    return (
        b'event: message_start\ndata: {"type":"message_start","message":{"model":"m","usage":' + start_usage + b"}}\n\n"
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":'
        + delta_usage + b"}\n\n"
    )


@pytest.mark.parametrize(
    ("start", "delta", "w5", "w1h"),
    [
        # no split anywhere: all 5m
        (b'{"input_tokens":1,"cache_creation_input_tokens":700}', b'{"output_tokens":2}', 700, 0),
        # the split from message_start survives a delta without cache fields
        (b'{"cache_creation_input_tokens":700,"cache_creation":{"ephemeral_5m_input_tokens":200,'
         b'"ephemeral_1h_input_tokens":500}}', b'{"output_tokens":2}', 200, 500),
        # a larger total later: the difference is 5m
        (b'{"cache_creation_input_tokens":700,"cache_creation":{"ephemeral_5m_input_tokens":200,'
         b'"ephemeral_1h_input_tokens":500}}', b'{"cache_creation_input_tokens":900}', 400, 500),
        # all writes were 1h: the difference stays 1h
        (b'{"cache_creation_input_tokens":700,"cache_creation":{"ephemeral_5m_input_tokens":0,'
         b'"ephemeral_1h_input_tokens":700}}', b'{"cache_creation_input_tokens":750}', 0, 750),
        # a smaller total takes from 5m first, then from 1h, never below 0
        (b'{"cache_creation_input_tokens":700,"cache_creation":{"ephemeral_5m_input_tokens":200,'
         b'"ephemeral_1h_input_tokens":500}}', b'{"cache_creation_input_tokens":300}', 0, 300),
        # null means "not carried": message_start's numbers stay
        (b'{"cache_creation_input_tokens":80}', b'{"cache_creation_input_tokens":null,"output_tokens":3}', 80, 0),
    ],
)
def test_cache_write_split(twin: ModuleType, start: bytes, delta: bytes, w5: int, w1h: int) -> None:
    got = run(twin, _start_and_delta(start, delta))
    assert (got["cache_write_5m"], got["cache_write_1h"]) == (w5, w1h)


def test_bogus_counts_are_ignored(twin: ModuleType) -> None:
    got = run(twin, _start_and_delta(
        b'{"input_tokens":10,"output_tokens":1,"cache_read_input_tokens":4}',
        b'{"input_tokens":true,"output_tokens":-5,"cache_read_input_tokens":2.5,"server_tool_use":'
        b'{"web_search_requests":2,"web_fetch_requests":3,"other":7}}',
    ))
    assert (got["input_tokens"], got["output_tokens"], got["cache_read"], got["server_tool_requests"]) == (10, 1, 4, 5)


def test_a_repeated_member_stands_as_the_last(twin: ModuleType) -> None:
    """As in the dict orjson makes: a repeated count, split, tool or usage
    replaces the one before it whole, null included."""
    got = run(twin, _start_and_delta(
        b'{"input_tokens":10,"output_tokens":1,"cache_creation_input_tokens":9,'
        b'"cache_creation":{"ephemeral_5m_input_tokens":9},"cache_creation":{"ephemeral_1h_input_tokens":9},'
        b'"output_tokens_details":{"thinking_tokens":4},"output_tokens_details":null}',
        b'{"output_tokens":50,"server_tool_use":{"web_search_requests":2,"web_fetch_requests":1,'
        b'"web_search_requests":5},"output_tokens":7,"input_tokens":3,"input_tokens":null}',
    ))
    assert (got["input_tokens"], got["output_tokens"], got["server_tool_requests"]) == (10, 7, 6)
    assert (got["cache_write_5m"], got["cache_write_1h"], got["reasoning_tokens"]) == (0, 9, 0)
    # a second usage member replaces the first: its counts, not the first's, stand
    got = run(twin, _start_and_delta(
        b'{"input_tokens":10,"output_tokens":1}',
        b'{"output_tokens":50,"server_tool_use":{"web_search_requests":2}},"usage":{"cache_read_input_tokens":6}',
    ))
    assert (got["output_tokens"], got["server_tool_requests"], got["cache_read"]) == (1, 0, 6)


_ODD_VALUES = [b"[1,2]", b'"12"', b"7", b"null", b"true"]


@pytest.mark.parametrize("odd", _ODD_VALUES)
def test_members_of_another_json_type_are_passed_over(twin: ModuleType, odd: bytes) -> None:
    """A usage, message, response or split that is not an object counts for
    nothing (the compiled twin reads objects as typed dicts) and the
    stream's other figures stand."""
    got = run(twin, _start_and_delta(b'{"input_tokens":10,"output_tokens":1,"cache_creation":' + odd + b"}", odd))
    assert (got["model"], got["input_tokens"], got["output_tokens"], got["cache_write_5m"]) == ("m", 10, 1, 0)
    assert got["stop_reason"] == "end_turn"
    got = run(twin, b'event: message_start\ndata: {"type":"message_start","message":' + odd + b"}\n\n")
    assert (got["model"], got["input_tokens"]) == (None, 0)
    responses = (
        b'event: response.completed\ndata: {"type":"response.completed","response":' + odd + b"}\n\n"
        b'event: response.completed\ndata: {"type":"response.completed","response":{"model":"r","usage":'
        + odd + b"}}\n\n"
    )
    got = run(twin, responses, FMT_OPENAI_RESPONSES)
    assert (got["model"], got["input_tokens"], got["output_tokens"]) == ("r", 0, 0)
    chat = b'data: {"model":"c","choices":' + odd + b',"usage":' + odd + b"}\n\ndata: [DONE]\n\n"
    got = run(twin, chat, FMT_OPENAI_CHAT)
    assert (got["model"], got["input_tokens"]) == ("c", 0)


# -- properties -----------------------------------------------------------------------------

_SAMPLE_LINES = sorted(
    {line for p in FIXTURES for line in p.read_bytes().split(b"\n")}
    | set(RESPONSES_STREAM.split(b"\n")) | set(CHAT_STREAM.split(b"\n")) | set(RESPONSES_FAILED.split(b"\n"))
)
_TOKENS = [
    b"event: ", b"event:", b"data: ", b"data:", b"data", b"\n", b"\r\n", b"\r", b"\n\n", b": c\n", b" ",
    b"message_start", b"message_delta", b"message_stop", b"content_block_start", b"error", b"message",
    b"response.completed", b"response.created", b"response.failed", b"response.incomplete", b"[DONE]",
    b'{"type":"', b'{ "type" : "', b'"', b"{", b"}", b"\\", b'"usage":{', b'"usage": {"prompt_tokens":5}',
    b'"finish_reason":"stop"', b'\\"usage\\":{', b'"type":"fallback"', b'{"error":', b"\xff", b"\xe2\x80",
    # the text of deltas, counted by the compiled twin without a decoder
    b"content_block_delta", b"response.output_text.delta", b"response.audio.delta", b'"delta":{"text":"',
    b'"delta":"', b'"choices":[{"delta":{"content":"', b'"tool_calls":[{"function":{"arguments":"', b'"}}', b'"}]}',
    b"\\u00e9", b"\\ud83d\\ude00", b"\\ud800", b"\\n", b"\xc3\xa9", b"\xf0\x9f\x98\x80", b"\xed\xa0\x80", b"1e5", b"01",
]
_STREAMS = st.lists(
    st.sampled_from(_SAMPLE_LINES).map(lambda line: line + b"\n") | st.sampled_from(_TOKENS) | st.binary(max_size=6),
    max_size=60,
).map(b"".join)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=_STREAMS | st.binary(max_size=200),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
    fmt=st.sampled_from([FMT_ANTHROPIC, FMT_OPENAI_RESPONSES, FMT_OPENAI_CHAT]),
    sse_=st.booleans(),
    cap=st.sampled_from([8, 64, 1 << 20]),
)
def test_twins_agree_on_any_bytes_split_anywhere(data: bytes, cuts: list[int], fmt: int, sse_: bool, cap: int) -> None:
    """Nothing but MeterError may escape (and nothing does), and both twins count alike (the estimate too)."""
    pieces = _split(data, cuts)
    kw = {"max_event_size": cap, "max_body_size": cap * 4}
    whole = result(meter_over(_sse_py, [data], fmt, sse_, **kw))
    assert result(meter_over(_sse_py, pieces, fmt, sse_, **kw)) == whole
    if not NO_EXTENSIONS:
        c = import_c()
        assert result(meter_over(c, pieces, fmt, sse_, **kw)) == whole
        assert result(meter_over(c, [data], fmt, sse_, **kw)) == whole


class _Obj(list):  # type: ignore[type-arg]
    """A JSON object as its (key, value) members, so that a key may repeat."""


_KEYS = st.sampled_from([
    "type", "index", "delta", "text", "thinking", "partial_json", "signature", "choices", "content",
    "reasoning_content", "refusal", "tool_calls", "function", "arguments", "usage", "x", "é",
])
_JSON_TEXT = st.text(max_size=24)  # every code point but lone surrogates
# Numbers mostly as vendors write them; an exponent or a very long one sends
# the compiled twin to orjson.
_JSON_NUMBERS = st.one_of(
    st.integers(-(10**6), 10**9), st.sampled_from([0, -1, 0.5, -1.25, 3.0, 1e-7, 2**70, -(10**19)]),
    st.integers(-(10**6), 10**9), st.floats(allow_nan=False, allow_infinity=False),
)
_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | _JSON_NUMBERS | _JSON_TEXT,
    lambda kids: st.lists(kids, max_size=3) | st.lists(st.tuples(_KEYS, kids), max_size=3).map(_Obj),
    max_leaves=8,
)
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "/": "\\/", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


@st.composite
def _json_string(draw: st.DrawFn, s: str, key: bool = False) -> str:
    """`s` as a JSON string, each character raw, short-escaped or \\u-escaped (astral ones as a pair).

    A key is mostly spelled plainly, as vendors do (an escaped one sends the
    compiled twin to orjson).
    """
    escaping = not key or draw(st.sampled_from([False] * 19 + [True]))
    out = ['"']
    for ch in s:
        how = draw(st.integers(0, 9)) if escaping else 0
        if how <= 5 and ch not in '"\\' and ord(ch) >= 0x20:
            out.append(ch)
        elif how <= 7 and ch in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[ch])
        else:
            units = [ord(ch)] if ord(ch) < 0x10000 else [0xD7C0 + (ord(ch) >> 10), 0xDC00 + (ord(ch) & 0x3FF)]
            hexes = [f"{u:04x}" for u in units]
            out.extend("\\u" + (h.upper() if draw(st.booleans()) else h) for h in hexes)
    out.append('"')
    return "".join(out)


@st.composite
def _json_text(draw: st.DrawFn, value: Any, plain: bool = False) -> str:
    """Any JSON value, with JSON whitespace (a line feed too: data lines are joined by one) sprinkled in.

    `plain`: strings mostly spelled as keys are (see _json_string).
    """
    def ws() -> str:
        return draw(st.sampled_from(["", "", "", " ", "\t", "\n ", "  "]))

    if isinstance(value, _Obj):
        members = [
            ws() + draw(_json_string(k, key=True)) + ws() + ":" + ws() + draw(_json_text(v, plain)) + ws()
            for k, v in value
        ]
        return "{" + (",".join(members) or ws()) + "}"
    if isinstance(value, list):
        return "[" + (",".join(ws() + draw(_json_text(v, plain)) + ws() for v in value) or ws()) + "]"
    if isinstance(value, str):
        return draw(_json_string(value, key=plain))
    return json.dumps(value)


@st.composite
def _delta_events(draw: st.DrawFn) -> tuple[int, str, bytes]:
    """(format, event name, data) of a well-formed delta event with random text, members and spelling."""
    fmt = draw(st.sampled_from([FMT_ANTHROPIC, FMT_OPENAI_RESPONSES, FMT_OPENAI_CHAT]))
    # members around the text, mostly not ones the meter wants (a repeated wanted one goes to orjson)
    extra_key = st.sampled_from(["id", "index", "x", "é", "logprobs"]) | _KEYS
    extra = st.lists(st.tuples(extra_key, _JSON_VALUES), max_size=3)
    text_member = st.tuples(_KEYS, _JSON_TEXT | _JSON_VALUES)
    if fmt == FMT_ANTHROPIC:
        name = "content_block_delta"
        delta = _Obj(draw(st.permutations([*draw(extra), *draw(st.lists(text_member, min_size=1, max_size=3))])))
        root = [("type", name), ("index", 0), ("delta", delta)]
    elif fmt == FMT_OPENAI_RESPONSES:
        name = draw(st.sampled_from([
            "response.output_text.delta", "response.function_call_arguments.delta",
            "response.reasoning_summary_text.delta", "response.audio.delta",
        ]))
        root = [("type", name), ("delta", draw(_JSON_TEXT | _JSON_VALUES))]
    else:
        name = "chunk"
        functions = draw(st.lists(st.lists(text_member, max_size=2), max_size=2))
        calls = [_Obj([("function", _Obj(members))]) for members in functions]
        delta = _Obj([*draw(st.lists(text_member, max_size=3)), ("tool_calls", calls), *draw(extra)])
        root = [("id", "c"), ("choices", [_Obj([("index", 0), ("delta", delta)])])]
    obj = _Obj(draw(st.permutations([*root, *draw(extra)])))
    return fmt, name, draw(_json_text(obj)).encode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event=_delta_events(), cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=6))
def test_delta_text_counts_as_the_stdlib_decodes_it(event: tuple[int, str, bytes], cuts: list[int]) -> None:
    """Both twins count a delta's characters as json.loads sees them, however the JSON is spelled."""
    fmt, name, data = event
    want = oracle_text(fmt, name, json.loads(data))
    lines = b"".join(b"data: " + line + b"\n" for line in data.split(b"\n"))
    if fmt == FMT_OPENAI_CHAT:
        # a first chunk names the model, so the one under test is only walked for its text
        stream = b'data: {"model":"m","choices":[]}\n\n' + lines + b"\n"
    else:
        stream = b"event: " + name.encode() + b"\n" + lines + b"\n"
    twins = [_sse_py] if NO_EXTENSIONS else [_sse_py, import_c()]
    for twin in twins:
        for pieces in ([stream], _split(stream, cuts)):
            got = result(meter_over(twin, pieces, fmt))
            assert (got["delta_chars"], got["malformed"]) == (want, 0), twin.__name__
            assert got["output_tokens"] == math.ceil(want / 4)


# -- the usage of message_start and message_delta, walked in place by the compiled twin --

_USAGE_KEYS = st.sampled_from([
    "input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens", "cache_creation",
    "ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens", "output_tokens_details", "thinking_tokens",
    "server_tool_use", "web_search_requests", "web_fetch_requests", "service_tier", "x", "é",
])
_NESTED_USAGE = {"cache_creation", "output_tokens_details", "server_tool_use"}
# Counts mostly as the vendor sends them; now and then what Reading passes over.
_COUNT_VALUES = (
    st.integers(0, 10**12) | st.integers(0, 10**12) | st.integers(0, 10**12)
    | st.sampled_from([None, True, False, -3, -0, 0.0, 2.5, 1e3, 10**19, 10**18 - 1, "7", [1], {}])
)
# Members nobody reads: plain mostly; any JSON (exponents too, which send
# the compiled twin to orjson) now and then.
_OTHER_VALUES = st.none() | st.integers(-(10**6), 10**9) | _JSON_TEXT | st.lists(st.integers(), max_size=2) | _JSON_VALUES


@st.composite
def _usage_members(draw: st.DrawFn, nested: bool = True) -> _Obj:
    members = []
    for key in draw(st.lists(_USAGE_KEYS, max_size=7)):
        if key in _NESTED_USAGE and nested and draw(st.integers(0, 3)):
            members.append((key, draw(_usage_members(nested=False))))
        else:
            members.append((key, draw(_COUNT_VALUES)))
    return _Obj(members)


@st.composite
def _usage_events(draw: st.DrawFn) -> tuple[bool, bytes]:
    """(whether it is a message_start, its data): either event with random usage, members and spelling."""
    extra = st.lists(st.tuples(st.sampled_from(["id", "x", "content", "stop_sequence", "role"]), _OTHER_VALUES),
                     max_size=2)
    usage = draw(_usage_members() | _usage_members() | st.sampled_from([None, [], "u"]))
    stop = draw(st.sampled_from(["end_turn", "tool_use", "max_tokens", None, 3, "é\"\\n"]))
    start = draw(st.booleans())
    if start:
        model = draw(st.sampled_from(["claude-opus-4-6", "claude-sonnet-4-5", "é", "m\\", None, 7, {}]))
        message = _Obj(draw(st.permutations([
            ("id", "msg_1"), ("type", "message"), ("role", "assistant"), ("model", model), ("content", []),
            ("stop_reason", stop), ("usage", usage), *draw(extra),
            # a repeated member: the last one stands
            *draw(st.lists(st.tuples(st.sampled_from(["model", "usage", "stop_reason"]),
                                     st.sampled_from(["m2", None]) | _usage_members()), max_size=1)),
        ])))
        root = [("message", message)]
    else:
        delta = _Obj(draw(st.permutations([("stop_reason", stop), ("stop_sequence", None), *draw(extra)])))
        root = [("delta", delta), ("usage", usage)]
    name = "message_start" if start else "message_delta"
    members = draw(st.permutations([*root, *draw(extra)]))
    # strings mostly plain: an escaped one where Reading looks sends the event to orjson
    return start, draw(_json_text(_Obj([("type", name), *members]), plain=True)).encode()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(_usage_events(), min_size=1, max_size=3),
    named=st.booleans(),
    corrupt=st.sampled_from([None] * 2) | st.tuples(
        st.integers(0, 10_000),
        st.sampled_from([b"", b"x", b"\xff", b"\xc3", b'"', b"\\", b",", b"}", b"]", b"e5", b"-", b".", b"0", b"\t"])
        | st.binary(max_size=2),
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=4),
)
def test_usage_events_count_as_orjson_decodes_them(
    events: list[tuple[bool, bytes]], named: bool, corrupt: tuple[int, bytes] | None, cuts: list[int],
) -> None:
    """Both twins read the usage of message_start and message_delta alike
    however they are spelled, repeated members and odd values included; and
    alike again once a byte is cut or changed (JSON or not)."""
    stream = b""
    for i, (start, data) in enumerate(events):
        if corrupt is not None and i == 0:
            at = corrupt[0] % (len(data) + 1)
            data = data[:at] + corrupt[1] + data[at + 1:]
        lines = b"".join(b"data: " + line + b"\n" for line in data.split(b"\n"))
        name = b"message_start" if start else b"message_delta"
        stream += (b"event: " + name + b"\n" if named else b"") + lines + b"\n"
    want = run(_sse_py, stream)
    if corrupt is None:
        assert want["malformed"] == 0
    if not NO_EXTENSIONS:
        c = import_c()
        assert run(c, stream) == want
        assert result(meter_over(c, _split(stream, cuts))) == want
