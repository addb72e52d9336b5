# cython: language_level=3, annotation_typing=False
# (Compiled by setup.py when extensions are built; annotations are for mypy only.)
"""What the streaming meter's decoded objects mean, written once for both twins.

The twins (`_meter.pyx`, `_meter_py.py`) each frame the bytes, sort the events
and decode the few that matter; `Reading` turns each decoded object into the
counters, a few calls per stream. Conventions are in `hubcore/accounting/meter.py`.
"""

from __future__ import annotations

from typing import Any

from hubcore._meter_errors import MeterError

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
SNIFF = 0  # no name (or "message"): read the type from the data
SKIP = 1
A_START = 2
A_DELTA = 3
A_STOP = 4
A_BLOCK = 5  # content_block_start: may name the model a fallback switched to
ERROR = 6
R_CREATED = 7  # response.created / response.in_progress: the model, early
R_COMPLETED = 8
R_INCOMPLETE = 9
R_FAILED = 10
A_TEXT = 11  # content_block_delta: generated text, counted for a cut stream
R_TEXT = 12  # response.<...>.delta: the same for Responses

_NAMED: dict[int, dict[bytes, int]] = {
    FMT_ANTHROPIC: {
        b"message_start": A_START,
        b"message_delta": A_DELTA,
        b"message_stop": A_STOP,
        b"content_block_start": A_BLOCK,
        b"content_block_delta": A_TEXT,
        b"error": ERROR,
    },
    FMT_OPENAI_RESPONSES: {
        b"response.created": R_CREATED,
        b"response.in_progress": R_CREATED,
        b"response.completed": R_COMPLETED,
        b"response.incomplete": R_INCOMPLETE,
        b"response.failed": R_FAILED,
        b"error": ERROR,
    },
    FMT_OPENAI_CHAT: {},
}
_TERMINAL_STATUS = {R_COMPLETED: "completed", R_INCOMPLETE: "incomplete", R_FAILED: "failed"}
# base64 audio, not text
_RESPONSES_AUDIO_DELTA = b"response.audio.delta"
# The generated text in a delta: Anthropic's `delta` members (text_delta,
# thinking_delta, input_json_delta; a signature is not generated text) and
# Chat's `choices[].delta` members (plus tool_calls[].function.arguments).
_ANTHROPIC_TEXT_KEYS = ("text", "thinking", "partial_json")
_CHAT_TEXT_KEYS = ("content", "reasoning_content", "refusal")

# The counters a meter exposes; the compiled twin forwards these to its Reading.
COUNTERS = frozenset({
    "model", "input_tokens", "cache_write_5m", "cache_write_1h", "cache_read", "reasoning_tokens",
    "server_tool_requests", "stop_reason", "error_type", "completed",
})


def kind_of(fmt: int, name: bytes) -> int:
    """What a named event is to the meter; every Responses `response.<...>.delta` carries text."""
    kind = _NAMED[fmt].get(name, SKIP)
    if (
        kind == SKIP
        and fmt == FMT_OPENAI_RESPONSES
        and len(name) >= 15
        and name.startswith(b"response.")
        and name.endswith(b".delta")
        and name != _RESPONSES_AUDIO_DELTA
    ):
        return R_TEXT
    return kind


def estimated_tokens(chars: int) -> int:
    """Output tokens estimated from characters of generated text: ceil(chars / CHARS_PER_TOKEN)."""
    return -(-chars // CHARS_PER_TOKEN)


# The characters of generated text in one decoded delta event. The compiled
# twin counts most deltas in place and leaves only the rest to these.


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


class Reading:
    """The counters of one response, and how each decoded object moves them.

    The pure twin's Meter is a Reading; the compiled one holds one. The
    `_`-methods are the twins' way in: each takes what the twin decoded
    (None when it was not JSON) and returns the characters of generated text
    found, which the twin adds to its own `delta_chars`.
    """

    __slots__ = (
        "fmt", "model", "input_tokens", "cache_write_5m", "cache_write_1h", "cache_read", "reasoning_tokens",
        "server_tool_requests", "stop_reason", "error_type", "completed",
        "_output_reported", "_final_usage", "_oa_input", "_oa_cached",
    )

    def __init__(self, fmt: int) -> None:
        if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt not in _NAMED:
            raise MeterError(f"unknown meter format {fmt!r}")
        self.fmt = int(fmt)
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
        # the vendor's own output count, and whether it is final (a cut
        # stream's output is at least the estimate from its deltas)
        self._output_reported = 0
        self._final_usage = False
        # OpenAI reports input including cached tokens; keep both raw totals
        self._oa_input = 0
        self._oa_cached = 0

    def _output_tokens(self, delta_chars: int) -> int:
        """The vendor's count; before its final usage, at least the estimate from the deltas."""
        if self._final_usage:
            return self._output_reported
        return max(self._output_reported, estimated_tokens(delta_chars))

    def _output_estimated(self, delta_chars: int) -> bool:
        """Whether the output is the estimate (the stream was cut before its final usage)."""
        return not self._final_usage and estimated_tokens(delta_chars) > self._output_reported

    # -- what the twins hand over ------------------------------------------

    def _error(self, kind: str) -> None:
        # the first error is the cause; later ones are its echoes
        if self.error_type is None:
            self.error_type = kind

    def _stop(self) -> None:
        """Anthropic's message_stop, known from its name alone."""
        self.completed = self._final_usage = True

    def _done(self) -> None:
        """Chat's `data: [DONE]`."""
        # it completes the stream but is no usage: a stream without
        # stream_options.include_usage keeps its estimate
        self.completed = True

    def _event(self, kind: int, obj: object) -> int:
        """An SSE event of a known kind (not Chat)."""
        if type(obj) is not dict:
            if kind == ERROR or kind == R_FAILED:
                self._error("error")
            return 0
        # Checked above; typed `dict` in the compiled twin (the .pxd), whose
        # `.get`s are then C calls instead of method lookups.
        event = obj
        if kind == A_START:
            msg = event.get("message")
            if type(msg) is dict:
                self._anthropic_message(msg)
        elif kind == A_DELTA:
            delta = event.get("delta")
            if type(delta) is dict:
                sr = delta.get("stop_reason")
                if type(sr) is str:
                    self.stop_reason = sr
            # message_delta follows the last content block: its output count is final
            if self._anthropic_usage(event.get("usage")):
                self._final_usage = True
        elif kind == A_TEXT:
            return _anthropic_text(event)
        elif kind == R_TEXT:
            return _responses_text(event)
        elif kind == A_STOP:
            self._stop()
        elif kind == A_BLOCK:
            block = event.get("content_block")
            if type(block) is dict and block.get("type") == "fallback":
                to = block.get("to")
                if type(to) is dict:
                    m = to.get("model")
                    if type(m) is str:
                        self.model = m
        elif kind == ERROR:
            if self.fmt == FMT_ANTHROPIC:
                err = event.get("error")
                et = err.get("type") if type(err) is dict else None
                self._error(et if type(et) is str and et else "error")
            else:
                code = event.get("code")
                self._error(code if type(code) is str and code else _openai_error(event.get("error")))
        elif kind == R_CREATED:
            resp = event.get("response")
            if type(resp) is dict:
                m = resp.get("model")
                if type(m) is str:
                    self.model = m
        elif kind in _TERMINAL_STATUS:
            resp = event.get("response")
            if type(resp) is dict:
                self._responses_obj(resp, _TERMINAL_STATUS[kind])
            elif kind == R_FAILED:
                self._error("error")
            if kind != R_FAILED:
                self.completed = self._final_usage = True
        return 0

    def _untyped(self, obj: object) -> int:
        """An SSE event (not Chat) known only by its decoded data's "type"."""
        t = obj.get("type") if type(obj) is dict else None
        return self._event(kind_of(self.fmt, t.encode()), obj) if type(t) is str else 0

    def _chunk(self, obj: object, whole: bool) -> int:
        """A Chat chunk; only its text unless `whole` (the twin saw usage, a finish or an error in it)."""
        if type(obj) is not dict:
            return 0
        if whole or self.model is None:
            self._chat_obj(obj)
        return _chat_text(obj)

    def _unstreamed(self, obj: object) -> None:
        """A whole non-SSE response body."""
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

    # -- the vendors' shapes -----------------------------------------------

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
        if type(usage) is not dict:
            return False
        counts = usage  # checked: typed `dict` in the compiled twin (the .pxd)
        split = counts.get("cache_creation")
        details = counts.get("output_tokens_details")
        tools = counts.get("server_tool_use")
        tool_requests = None
        if type(tools) is dict:
            tool_requests = 0
            for key, n in tools.items():
                c = _count(n)
                if c is not None and key.endswith("_requests"):
                    tool_requests += c
        return self._anthropic_counts(
            _count(counts.get("input_tokens")),
            _count(counts.get("output_tokens")),
            _count(counts.get("cache_read_input_tokens")),
            _count(split.get("ephemeral_5m_input_tokens")) if type(split) is dict else None,
            _count(split.get("ephemeral_1h_input_tokens")) if type(split) is dict else None,
            _count(counts.get("cache_creation_input_tokens")),
            _count(details.get("thinking_tokens")) if type(details) is dict else None,
            tool_requests,
        )

    def _anthropic_counts(
        self, input_tokens: int | None, output: int | None, cache_read: int | None, write_5m: int | None,
        write_1h: int | None, write_total: int | None, thinking: int | None, tool_requests: int | None,
    ) -> bool:
        """A usage object's counts, each None where it had none (or one that
        is not a count); whether it carried an output count. The compiled
        meter walks message_start's and message_delta's usage into these
        without making the object."""
        # overwrite, never add: message_delta numbers are running totals
        if input_tokens is not None:
            self.input_tokens = input_tokens
        if output is not None:
            self._output_reported = output
        if cache_read is not None:
            self.cache_read = cache_read
        if write_5m is not None:
            self.cache_write_5m = write_5m
        if write_1h is not None:
            self.cache_write_1h = write_1h
        if write_total is not None:
            # after the split, which it is made to add up to
            self._cache_write_total(write_total)
        if thinking is not None:
            self.reasoning_tokens = thinking
        if tool_requests is not None:
            self.server_tool_requests = tool_requests
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
        counts = usage  # checked: typed `dict` in the compiled twin (the .pxd)
        v = _count(counts.get(inp))
        if v is not None:
            self._oa_input = v
        details = counts.get(inp_details)
        if type(details) is dict:
            v = _count(details.get("cached_tokens"))
            if v is not None:
                self._oa_cached = v
        self.cache_read = self._oa_cached
        self.input_tokens = max(self._oa_input - self._oa_cached, 0)
        v = _count(counts.get(out))
        if v is not None:
            # OpenAI sends usage once, at the end: it is final
            self._output_reported = v
            self._final_usage = True
        details = counts.get(out_details)
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
