"""The streaming meter, both twins: recorded Anthropic streams, OpenAI streams, odd framing, caps."""

from __future__ import annotations

import importlib
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

from hubcore import _sse_py, sse
from hubcore.sse import FMT_ANTHROPIC, FMT_OPENAI_CHAT, FMT_OPENAI_RESPONSES, MeterError

FIXTURES_DIR = Path(__file__).parent / "fixtures"
FIXTURES = sorted([*FIXTURES_DIR.glob("*.txt"), *FIXTURES_DIR.glob("*.sse")])
NO_EXTENSIONS = bool(os.environ.get("HUBCORE_NO_EXTENSIONS"))

FIELDS = (
    "model", "input_tokens", "output_tokens", "cache_write_5m", "cache_write_1h", "cache_read",
    "reasoning_tokens", "server_tool_requests", "stop_reason", "error_type", "completed", "events", "malformed",
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
    return importlib.import_module("hubcore._sse")


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
    assert sse.Meter.__module__ == ("hubcore._sse" if want else "hubcore._sse_py")
    assert sse.scan_request.__module__ == sse.Meter.__module__


def test_no_extensions_selects_pure_twin() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import hubcore.sse as s; print(s.COMPILED, s.Meter.__module__)"],
        cwd=Path(__file__).parents[1], env={**os.environ, "HUBCORE_NO_EXTENSIONS": "1"},
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert out.stdout.split() == ["False", "hubcore._sse_py"]


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
    assert got["error_type"] is None


def test_message_delta_fields_by_hand(twin: ModuleType) -> None:
    # message_start: input 25, cache write 10 (all 5m), read 5, output 1; the
    # message_delta totals overwrite: input 40, write 12, read 7, output 8
    got = run(twin, (FIXTURES_DIR / "message_delta_fields_response.txt").read_bytes())
    assert got == {
        "model": "claude-sonnet-4-5", "input_tokens": 40, "output_tokens": 8, "cache_write_5m": 12,
        "cache_write_1h": 0, "cache_read": 7, "reasoning_tokens": 3, "server_tool_requests": 1,
        "stop_reason": "end_turn", "error_type": None, "completed": True, "events": 6, "malformed": 0,
    }


def test_usage_omitted_from_message_start(twin: ModuleType) -> None:
    got = run(twin, (FIXTURES_DIR / "usage_omitted_with_optional_fields_response.txt").read_bytes())
    assert got == {
        "model": "claude-test", "input_tokens": 12, "output_tokens": 6, "cache_write_5m": 4,
        "cache_write_1h": 0, "cache_read": 3, "reasoning_tokens": 2, "server_tool_requests": 1,
        "stop_reason": "end_turn", "error_type": None, "completed": True, "events": 6, "malformed": 0,
    }


def test_fallback_block_relabels_model(twin: ModuleType) -> None:
    got = run(twin, (FIXTURES_DIR / "fallback_response.txt").read_bytes())
    assert got["model"] == "claude-sonnet-4-5"  # message_start said claude-opus-4-7


def test_truncated_stream_keeps_partial_numbers(twin: ModuleType) -> None:
    data = (FIXTURES_DIR / "message_delta_fields_response.txt").read_bytes()
    start_end = data.index(b"}}}\n", data.index(b"message_start")) + 3
    delta_end = data.index(b"}}}\n", data.index(b"event: message_delta")) + 3
    stop_data = data.index(b"data", data.index(b"event: message_stop")) + len(b"data")
    after_start = {"input_tokens": 25, "output_tokens": 1, "cache_write_5m": 10, "cache_read": 5, "reasoning_tokens": 0}
    after_delta = {"input_tokens": 40, "output_tokens": 8, "cache_write_5m": 12, "cache_read": 7, "reasoning_tokens": 3}
    nothing = dict.fromkeys(after_start, 0)
    for t in range(len(data) + 1):
        got = run(twin, data[:t])
        want = nothing if t < start_end else after_start if t < delta_end else after_delta
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


def test_escaped_usage_in_text_is_never_decoded(twin: ModuleType) -> None:
    """Deltas are skipped unread: even a broken one that mentions usage costs nothing."""
    broken = (
        b'event: content_block_delta\n'
        b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta",'
        b'"text":"\\"usage\\":{\\"output_tokens\\":999}, \\"type\\":\\"message_delta\\""}\n\n'
    )
    stream = ANTHROPIC_ERROR_MID_STREAM.replace(b"event: error", broken + b"event: error")
    got = run(twin, stream)
    assert (got["output_tokens"], got["malformed"]) == (1, 0)
    chat_broken = (
        b'data: {"id":"c","model":"gpt-4o","choices":[{"delta":{"content":"\\"usage\\": {\\"prompt_tokens\\": 1}"}}]\n\n'
    )
    # a key that ends in an escaped quote and "usage" is text too
    chat_broken += b'data: {"id":"c","model":"gpt-4o","choices":[{"delta":{"say \\"usage": {"n": 1}\n\n'
    chat = CHAT_STREAM.replace(b"data: [DONE]", chat_broken + b"data: [DONE]")
    got = run(twin, chat, FMT_OPENAI_CHAT)
    assert got == {**CHAT_EXPECTED, "events": 7}
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
        }),
        (RESPONSES_FAILED, FMT_OPENAI_RESPONSES, {
            "model": "gpt-5-codex", "input_tokens": 900, "output_tokens": 0, "cache_write_5m": 0,
            "cache_write_1h": 0, "cache_read": 0, "reasoning_tokens": 0, "server_tool_requests": 0,
            "stop_reason": "failed", "error_type": "server_error", "completed": False, "events": 2, "malformed": 0,
        }),
        (RESPONSES_ERROR, FMT_OPENAI_RESPONSES, {
            "model": "gpt-5-codex", "input_tokens": 0, "output_tokens": 0, "cache_write_5m": 0,
            "cache_write_1h": 0, "cache_read": 0, "reasoning_tokens": 0, "server_tool_requests": 0,
            "stop_reason": None, "error_type": "rate_limit_exceeded", "completed": False, "events": 2, "malformed": 0,
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
        }),
        (RESPONSES_BODY, FMT_OPENAI_RESPONSES, {
            "model": "gpt-5-mini-2025-08-07", "input_tokens": 372, "output_tokens": 70, "cache_write_5m": 0,
            "cache_write_1h": 0, "cache_read": 128, "reasoning_tokens": 64, "server_tool_requests": 0,
            "stop_reason": "completed", "error_type": None, "completed": True, "events": 0, "malformed": 0,
        }),
        (CHAT_BODY, FMT_OPENAI_CHAT, {
            "model": "gpt-4o-mini-2024-07-18", "input_tokens": 19, "output_tokens": 10, "cache_write_5m": 0,
            "cache_write_1h": 0, "cache_read": 0, "reasoning_tokens": 0, "server_tool_requests": 0,
            "stop_reason": "length", "error_type": None, "completed": True, "events": 0, "malformed": 0,
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
    """Nothing but MeterError may escape (and nothing does), and both twins count alike."""
    pieces = _split(data, cuts)
    kw = {"max_event_size": cap, "max_body_size": cap * 4}
    whole = result(meter_over(_sse_py, [data], fmt, sse_, **kw))
    assert result(meter_over(_sse_py, pieces, fmt, sse_, **kw)) == whole
    if not NO_EXTENSIONS:
        c = import_c()
        assert result(meter_over(c, pieces, fmt, sse_, **kw)) == whole
        assert result(meter_over(c, [data], fmt, sse_, **kw)) == whole
