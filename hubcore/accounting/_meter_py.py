"""Pure-Python twin of the streaming meter (`_meter.pyx`): same names, same numbers.

It owns the reference semantics; the compiled twin mirrors it method for method.
Conventions are documented in `hubcore/accounting/meter.py`.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from hubcore._meter_errors import MeterError

__all__ = [
    "CHARS_PER_TOKEN",
    "FMT_ANTHROPIC",
    "FMT_OPENAI_CHAT",
    "FMT_OPENAI_RESPONSES",
    "MAX_BODY_SIZE",
    "MAX_EVENT_SIZE",
    "Meter",
    "MeterError",
    "estimated_tokens",
    "scan_request",
    "session_from_user_id",
]

FMT_ANTHROPIC = 1  # Anthropic Messages (/v1/messages)
FMT_OPENAI_RESPONSES = 2  # OpenAI Responses (/v1/responses)
FMT_OPENAI_CHAT = 3  # OpenAI Chat Completions (/v1/chat/completions)

# Bytes. The largest SSE line or event (joined data) the meter will hold; a
# bigger one is dropped and counted in `malformed`. Usage-bearing events are
# under 2 KiB; the biggest real events (web search results echoed in a
# content_block_start) stay well under 1 MiB.
MAX_EVENT_SIZE = 16 * 1024 * 1024
# Bytes. A non-streaming response body is buffered up to this and decoded at
# close(); a larger one is dropped and counted in `malformed`.
MAX_BODY_SIZE = 64 * 1024 * 1024
# Characters (decoded, not bytes) per output token, for the estimate of a
# stream cut before its final usage: the vendors' own rule of thumb of about
# four characters per token of English text or code. Rounded up, since any
# text at all took a token. It errs low, the safe side for a bill: on the two
# longest recorded Anthropic streams in tests/fixtures (284 and 1,312
# characters of tool input and text) the vendor counted 2.3 and 2.4 characters
# per token, and scripts such as CJK take a token or more per character.
CHARS_PER_TOKEN = 4

# What an event is, from its `event:` name or its data's "type".
_SNIFF = 0  # no name (or "message"): read the type from the data
_SKIP = 1
_A_START = 2
_A_DELTA = 3
_A_STOP = 4
_A_BLOCK = 5  # content_block_start: may name the model a fallback switched to
_ERROR = 6
_R_CREATED = 7  # response.created / response.in_progress: the model, early
_R_COMPLETED = 8
_R_INCOMPLETE = 9
_R_FAILED = 10
_A_TEXT = 11  # content_block_delta: generated text, counted for a cut stream
_R_TEXT = 12  # response.<...>.delta: the same for Responses

_KINDS: dict[int, dict[bytes, int]] = {
    FMT_ANTHROPIC: {
        b"message_start": _A_START,
        b"message_delta": _A_DELTA,
        b"message_stop": _A_STOP,
        b"content_block_start": _A_BLOCK,
        b"content_block_delta": _A_TEXT,
        b"error": _ERROR,
    },
    FMT_OPENAI_RESPONSES: {
        b"response.created": _R_CREATED,
        b"response.in_progress": _R_CREATED,
        b"response.completed": _R_COMPLETED,
        b"response.incomplete": _R_INCOMPLETE,
        b"response.failed": _R_FAILED,
        b"error": _ERROR,
    },
    FMT_OPENAI_CHAT: {},
}
_TERMINAL_STATUS = {_R_COMPLETED: "completed", _R_INCOMPLETE: "incomplete", _R_FAILED: "failed"}
# The generated text in a delta: Anthropic's `delta` members (text_delta,
# thinking_delta, input_json_delta; a signature is not generated text) and
# Chat's `choices[].delta` members (plus tool_calls[].function.arguments).
_ANTHROPIC_TEXT_KEYS = ("text", "thinking", "partial_json")
_CHAT_TEXT_KEYS = ("content", "reasoning_content", "refusal")
# base64 audio, not text
_RESPONSES_AUDIO_DELTA = b"response.audio.delta"

_WS = rb"[ \t\n\r]*"
_EOL = re.compile(rb"[\r\n]")
# `{"type":"<name>"` at the start of the data; a name with a backslash is left
# to the full decode. Everything below only inspects the data, never trusts it.
_TYPE_PREFIX = re.compile(_WS + rb"\{" + _WS + rb'"type"' + _WS + rb":" + _WS + rb'"([^"\\]*)"')
# A quote preceded by a backslash is inside a JSON string (text that merely
# mentions "usage"); a structural quote never is.
_FALLBACK_BLOCK = re.compile(rb'(?<!\\)"type"' + _WS + rb":" + _WS + rb'"fallback"')
_CHAT_WANTED = re.compile(
    rb'(?<!\\)"(?:usage"' + _WS + rb":" + _WS + rb"\{|finish_reason\"" + _WS + rb":" + _WS + rb'")'
)
_ERROR_FIRST = re.compile(_WS + rb"\{" + _WS + rb'"error"' + _WS + rb":")


def _kind(fmt: int, kinds: dict[bytes, int], name: bytes) -> int:
    """What a named event is to the meter; every Responses `response.<...>.delta` carries text."""
    kind = kinds.get(name, _SKIP)
    if (
        kind == _SKIP
        and fmt == FMT_OPENAI_RESPONSES
        and len(name) >= 15
        and name.startswith(b"response.")
        and name.endswith(b".delta")
        and name != _RESPONSES_AUDIO_DELTA
    ):
        return _R_TEXT
    return kind


def estimated_tokens(chars: int) -> int:
    """Output tokens estimated from characters of generated text: ceil(chars / CHARS_PER_TOKEN)."""
    return -(-chars // CHARS_PER_TOKEN)


# The characters of generated text in one decoded delta event. The compiled
# twin counts them in place, and calls these for the events it decodes.


def _anthropic_text(obj: dict[str, Any]) -> int:
    delta = obj.get("delta")
    n = 0
    if type(delta) is dict:
        for key in _ANTHROPIC_TEXT_KEYS:
            v = delta.get(key)
            if type(v) is str:
                n += len(v)
    return n


def _responses_text(obj: dict[str, Any]) -> int:
    v = obj.get("delta")
    return len(v) if type(v) is str else 0


def _chat_text(obj: dict[str, Any]) -> int:
    choices = obj.get("choices")
    n = 0
    if type(choices) is not list:
        return 0
    for choice in choices:
        delta = choice.get("delta") if type(choice) is dict else None
        if type(delta) is not dict:
            continue
        for key in _CHAT_TEXT_KEYS:
            v = delta.get(key)
            if type(v) is str:
                n += len(v)
        calls = delta.get("tool_calls")
        if type(calls) is list:
            for call in calls:
                fn = call.get("function") if type(call) is dict else None
                args = fn.get("arguments") if type(fn) is dict else None
                if type(args) is str:
                    n += len(args)
    return n


def _count(v: object) -> int | None:
    """A token count as the vendor sent it, or None for null, bools, negatives, floats."""
    return v if type(v) is int and v >= 0 else None


def _openai_error(err: object) -> str:
    if isinstance(err, dict):
        for key in ("code", "type"):
            v = err.get(key)
            if type(v) is str and v:
                return v
    return "error"


class Meter:
    """Counts one response's tokens from its bytes, fed in pieces as they pass."""

    def __init__(
        self,
        fmt: int,
        sse: bool,
        *,
        max_event_size: int = MAX_EVENT_SIZE,
        max_body_size: int = MAX_BODY_SIZE,
    ) -> None:
        if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt not in _KINDS:
            raise MeterError(f"unknown meter format {fmt!r}")
        if max_event_size < 1 or max_body_size < 0:
            raise MeterError("size caps must be positive")
        self.fmt = int(fmt)
        self.sse = bool(sse)
        # results
        self.model: str | None = None
        self.input_tokens = 0
        self.cache_write_5m = 0
        self.cache_write_1h = 0
        self.cache_read = 0
        self.reasoning_tokens = 0
        self.server_tool_requests = 0
        self.stop_reason: str | None = None
        self.error_type: str | None = None
        self.completed = False
        self.events = 0
        self.malformed = 0
        self.delta_chars = 0
        # the vendor's own output count, and whether it is final (a cut
        # stream's output is at least the estimate from its deltas)
        self._output_reported = 0
        self._final_usage = False
        # OpenAI reports input including cached tokens; keep both raw totals
        self._oa_input = 0
        self._oa_cached = 0
        self._closed = False
        self._kinds = _KINDS[fmt]
        # SSE framing
        self._max_event = max_event_size
        self._tail = b""
        self._discarding = False
        self._after_cr = False
        # the event being assembled
        self._name = b""
        self._parts: list[bytes] = []
        self._dlen = 0
        self._poisoned = False
        # non-SSE body
        self._max_body = max_body_size
        self._body = bytearray()
        self._overflow = False

    @property
    def output_tokens(self) -> int:
        """The vendor's count; before its final usage, at least the estimate from the deltas."""
        if self._final_usage:
            return self._output_reported
        return max(self._output_reported, estimated_tokens(self.delta_chars))

    @property
    def output_estimated(self) -> bool:
        """Whether `output_tokens` is the estimate (the stream was cut before its final usage)."""
        return not self._final_usage and estimated_tokens(self.delta_chars) > self._output_reported

    # -- input -------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Meter the next bytes of the body, split anywhere."""
        if self._closed:
            raise MeterError("feed() after close()")
        if type(data) is not bytes:
            data = bytes(memoryview(data).cast("B"))
        if not data:
            return
        if not self.sse:
            if self._overflow:
                return
            if len(self._body) + len(data) > self._max_body:
                self._overflow = True
                self._body = bytearray()
            else:
                self._body += data
            return
        start = 0
        if self._after_cr:
            self._after_cr = False
            if data[0] == 10:
                start = 1
        if self._discarding or self._tail:
            m = _EOL.search(data, start)
            if m is None:
                if not self._discarding:
                    if len(self._tail) + len(data) - start > self._max_event:
                        self._discarding = True
                        self._tail = b""
                    else:
                        self._tail += data[start:]
                return
            j = m.start()
            if self._discarding:
                self._discarding = False
                self._poison()
            else:
                line = self._tail + data[start:j]
                self._tail = b""
                if len(line) > self._max_event:
                    self._poison()
                else:
                    self._line(line)
            start = self._past_eol(data, j)
        if start >= len(data):
            return
        lines = (data[start:] if start else data).splitlines(keepends=True)
        last = lines[-1]
        if last[-1] not in (10, 13):
            lines.pop()
        else:
            last = b""
            if data[-1] == 13:
                self._after_cr = True
        max_event = self._max_event
        for raw in lines:
            line = raw[:-2] if raw[-1] == 10 and raw[-2:-1] == b"\r" else raw[:-1]
            if len(line) > max_event:
                self._poison()
            else:
                self._line(line)
        if last:
            if len(last) > max_event:
                self._discarding = True
            else:
                self._tail = last

    def close(self) -> None:
        """The body ended (complete or not); the numbers are final. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self.sse:
            self._close_body()
            return
        if self._discarding:
            self._discarding = False
            self._poison()
        elif self._tail:
            # the body ended without a line end: the SDKs drop such an event,
            # but its numbers are real (a vendor bills them), so keep them
            line, self._tail = self._tail, b""
            self._line(line)
        self._dispatch()

    def _past_eol(self, data: bytes, j: int) -> int:
        if data[j] == 13:
            if j + 1 < len(data):
                return j + 2 if data[j + 1] == 10 else j + 1
            self._after_cr = True
        return j + 1

    # -- SSE fields and events ---------------------------------------------

    def _line(self, line: bytes) -> None:
        if not line:
            self._dispatch()
        elif line.startswith(b"data"):
            if len(line) == 4:
                self._data(b"")
            elif line[4] == 58:
                self._data(line[6:] if line[5:6] == b" " else line[5:])
        elif line.startswith(b"event"):
            if len(line) == 5:
                self._name = b""
            elif line[5] == 58:
                self._name = line[7:] if line[6:7] == b" " else line[6:]

    def _data(self, value: bytes) -> None:
        if self._poisoned:
            return
        if self._parts:
            self._dlen += 1 + len(value)
            if self._dlen > self._max_event:
                self._poison()
                return
            self._parts.append(value)
        else:
            self._parts = [value]
            self._dlen = len(value)

    def _poison(self) -> None:
        self._poisoned = True
        self._parts = []

    def _dispatch(self) -> None:
        parts, name, poisoned = self._parts, self._name, self._poisoned
        self._parts = []
        self._name = b""
        self._poisoned = False
        self._dlen = 0
        if not parts and not poisoned:
            return
        self.events += 1
        if poisoned:
            self.malformed += 1
            return
        data = parts[0] if len(parts) == 1 else b"\n".join(parts)
        if self.fmt == FMT_OPENAI_CHAT:
            self._chat_event(data)
            return
        if name == b"" or name == b"message":
            m = _TYPE_PREFIX.match(data)
            if m is None:
                obj = self._loads(data)
                if type(obj) is dict:
                    t = obj.get("type")
                    if type(t) is str:
                        self._apply(_kind(self.fmt, self._kinds, t.encode()), obj)
                return
            kind = _kind(self.fmt, self._kinds, m.group(1))
        else:
            kind = _kind(self.fmt, self._kinds, name)
        if kind == _SKIP:
            return
        if kind == _A_STOP:
            self.completed = self._final_usage = True
            return
        if kind == _A_BLOCK and _FALLBACK_BLOCK.search(data) is None:
            return
        if kind == _R_CREATED and self.model is not None:
            return
        obj = self._loads(data)
        if type(obj) is dict:
            self._apply(kind, obj)
        elif kind == _ERROR or kind == _R_FAILED:
            self._error("error")

    def _chat_event(self, data: bytes) -> None:
        # [DONE] completes the stream but is no usage: a stream without
        # stream_options.include_usage keeps its estimate
        if data == b"[DONE]":
            self.completed = True
            return
        # every chunk is decoded for its text; only a few carry anything else
        obj = self._loads(data)
        if type(obj) is not dict:
            return
        self.delta_chars += _chat_text(obj)
        if (
            self.model is None
            or _CHAT_WANTED.search(data) is not None
            or _ERROR_FIRST.match(data) is not None
        ):
            self._chat_obj(obj)

    def _loads(self, data: bytes | bytearray) -> Any:
        """The decoded JSON, or None (counted in `malformed`) when it is not JSON."""
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            self.malformed += 1
            return None

    # -- interpretation of the few decoded objects -------------------------

    def _error(self, kind: str) -> None:
        # the first error is the cause; later ones are its echoes
        if self.error_type is None:
            self.error_type = kind

    def _apply(self, kind: int, obj: dict[str, Any]) -> None:
        if kind == _A_START:
            msg = obj.get("message")
            if type(msg) is dict:
                self._anthropic_message(msg)
        elif kind == _A_DELTA:
            delta = obj.get("delta")
            if type(delta) is dict:
                sr = delta.get("stop_reason")
                if type(sr) is str:
                    self.stop_reason = sr
            # message_delta follows the last content block: its output count is final
            if self._anthropic_usage(obj.get("usage")):
                self._final_usage = True
        elif kind == _A_TEXT:
            self.delta_chars += _anthropic_text(obj)
        elif kind == _R_TEXT:
            self.delta_chars += _responses_text(obj)
        elif kind == _A_STOP:
            self.completed = self._final_usage = True
        elif kind == _A_BLOCK:
            block = obj.get("content_block")
            if type(block) is dict and block.get("type") == "fallback":
                to = block.get("to")
                if type(to) is dict:
                    m = to.get("model")
                    if type(m) is str:
                        self.model = m
        elif kind == _ERROR:
            if self.fmt == FMT_ANTHROPIC:
                err = obj.get("error")
                et = err.get("type") if type(err) is dict else None
                self._error(et if type(et) is str and et else "error")
            else:
                code = obj.get("code")
                self._error(code if type(code) is str and code else _openai_error(obj.get("error")))
        elif kind == _R_CREATED:
            resp = obj.get("response")
            if type(resp) is dict:
                m = resp.get("model")
                if type(m) is str:
                    self.model = m
        elif kind in _TERMINAL_STATUS:
            resp = obj.get("response")
            if type(resp) is dict:
                self._responses_obj(resp, _TERMINAL_STATUS[kind])
            elif kind == _R_FAILED:
                self._error("error")
            if kind != _R_FAILED:
                self.completed = self._final_usage = True

    def _anthropic_message(self, msg: dict[str, Any]) -> None:
        m = msg.get("model")
        if type(m) is str:
            self.model = m
        sr = msg.get("stop_reason")
        if type(sr) is str:
            self.stop_reason = sr
        self._anthropic_usage(msg.get("usage"))

    def _anthropic_usage(self, usage: object) -> bool:
        """Take a usage object; whether it carried an output count."""
        # overwrite, never add: message_delta numbers are running totals
        if type(usage) is not dict:
            return False
        v = _count(usage.get("input_tokens"))
        if v is not None:
            self.input_tokens = v
        output = _count(usage.get("output_tokens"))
        if output is not None:
            self._output_reported = output
        v = _count(usage.get("cache_read_input_tokens"))
        if v is not None:
            self.cache_read = v
        split = usage.get("cache_creation")
        if type(split) is dict:
            v = _count(split.get("ephemeral_5m_input_tokens"))
            if v is not None:
                self.cache_write_5m = v
            v = _count(split.get("ephemeral_1h_input_tokens"))
            if v is not None:
                self.cache_write_1h = v
        v = _count(usage.get("cache_creation_input_tokens"))
        if v is not None:
            self._cache_write_total(v)
        details = usage.get("output_tokens_details")
        if type(details) is dict:
            v = _count(details.get("thinking_tokens"))
            if v is not None:
                self.reasoning_tokens = v
        tools = usage.get("server_tool_use")
        if type(tools) is dict:
            total = 0
            for key, n in tools.items():
                c = _count(n)
                if c is not None and key.endswith("_requests"):
                    total += c
            self.server_tool_requests = total
        return output is not None

    def _cache_write_total(self, total: int) -> None:
        """Make the 5m/1h split add up to a new total.

        The split is only known from `cache_creation`; a later total that
        differs moves the difference into 5m, unless all writes so far were 1h.
        """
        w5, w1h = self.cache_write_5m, self.cache_write_1h
        diff = total - (w5 + w1h)
        if diff == 0:
            return
        if w5 == 0 and w1h > 0:
            w1h += diff
        else:
            w5 += diff
        if w5 < 0:
            w1h += w5
            w5 = 0
        if w1h < 0:
            w5 += w1h
            w1h = 0
        self.cache_write_5m, self.cache_write_1h = w5, w1h

    def _openai_usage(self, usage: object, inp: str, out: str, inp_details: str, out_details: str) -> None:
        if type(usage) is not dict:
            return
        v = _count(usage.get(inp))
        if v is not None:
            self._oa_input = v
        details = usage.get(inp_details)
        if type(details) is dict:
            v = _count(details.get("cached_tokens"))
            if v is not None:
                self._oa_cached = v
        self.cache_read = self._oa_cached
        self.input_tokens = max(self._oa_input - self._oa_cached, 0)
        v = _count(usage.get(out))
        if v is not None:
            # OpenAI sends usage once, at the end: it is final
            self._output_reported = v
            self._final_usage = True
        details = usage.get(out_details)
        if type(details) is dict:
            v = _count(details.get("reasoning_tokens"))
            if v is not None:
                self.reasoning_tokens = v

    def _responses_obj(self, resp: dict[str, Any], status_default: str | None) -> None:
        m = resp.get("model")
        if type(m) is str:
            self.model = m
        self._openai_usage(
            resp.get("usage"), "input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details"
        )
        status = resp.get("status")
        if type(status) is not str:
            status = status_default
        details = resp.get("incomplete_details")
        reason = details.get("reason") if type(details) is dict else None
        if type(reason) is str:
            self.stop_reason = reason
        elif status is not None:
            self.stop_reason = status
        err = resp.get("error")
        if err is not None:
            self._error(_openai_error(err))
        elif status == "failed":
            self._error("error")

    def _chat_obj(self, obj: dict[str, Any]) -> None:
        m = obj.get("model")
        if type(m) is str:
            self.model = m
        choices = obj.get("choices")
        if type(choices) is list:
            for choice in choices:
                if type(choice) is dict:
                    fr = choice.get("finish_reason")
                    if type(fr) is str:
                        self.stop_reason = fr
        self._openai_usage(
            obj.get("usage"), "prompt_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details"
        )
        err = obj.get("error")
        if err is not None:
            self._error(_openai_error(err))

    def _close_body(self) -> None:
        if self._overflow:
            self.malformed += 1
            return
        body, self._body = self._body, bytearray()
        obj = self._loads(body)
        if type(obj) is not dict:
            return
        if self.fmt == FMT_ANTHROPIC:
            if obj.get("type") == "error":
                err = obj.get("error")
                et = err.get("type") if type(err) is dict else None
                self._error(et if type(et) is str and et else "error")
            else:
                self._anthropic_message(obj)
        elif self.fmt == FMT_OPENAI_RESPONSES:
            self._responses_obj(obj, None)
        else:
            self._chat_obj(obj)
        if self.error_type is None and type(obj.get("usage")) is dict:
            self.completed = True


# -- request scanning -------------------------------------------------------

_WANTED_KEYS = {b'"model"': 1, b'"stream"': 2, b'"metadata"': 3, b'"prompt_cache_key"': 4}
_STRUCTURAL = re.compile(rb'["{}\[\]]')
_SCALAR_END = re.compile(rb"[,}\] \t\n\r]")
_NOT_WS = re.compile(rb"[^ \t\n\r]")
_NOTHING: tuple[str | None, bool, str | None, str | None] = (None, False, None, None)


def scan_request(body: bytes | bytearray | memoryview) -> tuple[str | None, bool, str | None, str | None]:
    """(model, stream, metadata.user_id, prompt_cache_key) from a request body's top level.

    Pure Python walks JSON slower than orjson parses it, so this twin parses
    the whole body and walks only bodies orjson rejects, the same way the
    compiled twin walks every body.
    """
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _walk(bytes(body))
    if type(obj) is not dict:
        return _NOTHING
    model = obj.get("model")
    md = obj.get("metadata")
    uid = md.get("user_id") if type(md) is dict else None
    pck = obj.get("prompt_cache_key")
    return (
        model if type(model) is str else None,
        obj.get("stream") is True,
        uid if type(uid) is str else None,
        pck if type(pck) is str else None,
    )


def _ws(b: bytes, i: int) -> int:
    m = _NOT_WS.search(b, i)
    return len(b) if m is None else m.start()


def _skip_string(b: bytes, i: int) -> int:
    """Index past the string opening at b[i], or -1 if it never closes."""
    j = i + 1
    while True:
        k = b.find(b'"', j)
        if k < 0:
            return -1
        s = k - 1
        while s > i and b[s] == 92:
            s -= 1
        if (k - 1 - s) % 2 == 0:
            return k + 1
        j = k + 1


def _skip_value(b: bytes, i: int) -> int:
    """Index past the value starting at b[i] (b[i] is not whitespace), or -1."""
    c = b[i]
    if c == 34:
        return _skip_string(b, i)
    if c == 123 or c == 91:
        depth = 0
        n = len(b)
        while i < n:
            m = _STRUCTURAL.search(b, i)
            if m is None:
                return -1
            i = m.start()
            c = b[i]
            if c == 34:
                i = _skip_string(b, i)
                if i < 0:
                    return -1
                continue
            if c == 123 or c == 91:
                depth += 1
            else:
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return -1
    m = _SCALAR_END.search(b, i)
    return len(b) if m is None else m.start()


def _string_at(b: bytes, start: int, end: int) -> str | None:
    if b[start] != 34:
        return None
    try:
        v = orjson.loads(b[start:end])
    except orjson.JSONDecodeError:
        return None
    return v if type(v) is str else None


def _key_is(b: bytes, start: int, end: int, wanted: dict[bytes, int]) -> int:
    raw = b[start:end]
    w = wanted.get(raw)
    if w is not None:
        return w
    if b"\\" not in raw:
        return 0
    key = _string_at(b, start, end)
    if key is None:
        return 0
    return wanted.get(b'"' + key.encode() + b'"', 0)


_USER_ID_KEY = {b'"user_id"': 1}


def _members(b: bytes, i: int, wanted: dict[bytes, int]) -> list[tuple[int, int, int]]:
    """(which, value start, value end) for the wanted keys of the object at b[i], in order.

    Stops quietly where the JSON stops making sense.
    """
    found: list[tuple[int, int, int]] = []
    n = len(b)
    i += 1
    while True:
        i = _ws(b, i)
        if i >= n or b[i] != 34:
            return found
        ks = i
        i = _skip_string(b, i)
        if i < 0:
            return found
        ke = i
        i = _ws(b, i)
        if i >= n or b[i] != 58:
            return found
        i = _ws(b, i + 1)
        if i >= n:
            return found
        vs = i
        i = _skip_value(b, i)
        if i < 0 or i == vs:
            return found
        which = _key_is(b, ks, ke, wanted)
        if which:
            found.append((which, vs, i))
        i = _ws(b, i)
        if i >= n or b[i] != 44:
            return found
        i += 1


def _walk(b: bytes) -> tuple[str | None, bool, str | None, str | None]:
    i = _ws(b, 0)
    if i >= len(b) or b[i] != 123:
        return _NOTHING
    model = uid = pck = None
    stream = False
    for which, vs, ve in _members(b, i, _WANTED_KEYS):
        if which == 1:
            model = _string_at(b, vs, ve)
        elif which == 2:
            stream = b[vs:ve] == b"true"
        elif which == 3:
            uid = None
            if b[vs] == 123:
                for _, us, ue in _members(b, vs, _USER_ID_KEY):
                    uid = _string_at(b, us, ue)
        else:
            pck = _string_at(b, vs, ve)
    return model, stream, uid, pck


# -- Claude Code session ids ------------------------------------------------

_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_UUID_RE = re.compile(_UUID)
_LEGACY_USER_ID = re.compile(r"user_[0-9a-fA-F]{64}_account_(?:" + _UUID + r")?_session_(" + _UUID + r")")


def session_from_user_id(user_id: str) -> str | None:
    """The session uuid (lower case) inside Claude Code's `metadata.user_id`, or None.

    Two shapes exist: a JSON string with `session_id`, and the legacy
    `user_<64 hex>_account_<uuid or nothing>_session_<uuid>`.
    """
    if user_id.startswith("{"):
        try:
            obj = orjson.loads(user_id)
        except orjson.JSONDecodeError:
            return None
        sid = obj.get("session_id") if type(obj) is dict else None
        if type(sid) is str and _UUID_RE.fullmatch(sid):
            return sid.lower()
        return None
    m = _LEGACY_USER_ID.fullmatch(user_id)
    return m.group(1).lower() if m else None
