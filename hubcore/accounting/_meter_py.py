"""Pure-Python twin of the streaming meter (`_meter.pyx`): same names, same numbers.

It owns the reference framing and event sorting, which the compiled twin
mirrors method for method; what the decoded objects mean lives once, in
`_meter_interpret.py`. Conventions are documented in `hubcore/accounting/meter.py`.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from hubcore._meter_errors import MeterError
from hubcore.accounting._meter_interpret import (
    A_BLOCK, A_STOP, CHARS_PER_TOKEN, FMT_ANTHROPIC, FMT_OPENAI_CHAT, FMT_OPENAI_RESPONSES, MAX_BODY_SIZE,
    MAX_EVENT_SIZE, R_CREATED, SKIP, Reading, estimated_tokens, kind_of,
)

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


class Meter(Reading):
    """Counts one response's tokens from its bytes, fed in pieces as they pass."""

    def __init__(
        self,
        fmt: int,
        sse: bool,
        *,
        max_event_size: int = MAX_EVENT_SIZE,
        max_body_size: int = MAX_BODY_SIZE,
    ) -> None:
        super().__init__(fmt)  # the counters
        if max_event_size < 1 or max_body_size < 0:
            raise MeterError("size caps must be positive")
        self.sse = bool(sse)
        self.events = 0
        self.malformed = 0
        self.delta_chars = 0
        self._closed = False
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
        return self._output_tokens(self.delta_chars)

    @property
    def output_estimated(self) -> bool:
        """Whether `output_tokens` is the estimate (the stream was cut before its final usage)."""
        return self._output_estimated(self.delta_chars)

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
                self.delta_chars += self._untyped(self._loads(data))
                return
            kind = kind_of(self.fmt, m.group(1))
        else:
            kind = kind_of(self.fmt, name)
        if kind == SKIP:
            return
        if kind == A_STOP:
            self._stop()
            return
        if kind == A_BLOCK and _FALLBACK_BLOCK.search(data) is None:
            return
        if kind == R_CREATED and self.model is not None:
            return
        self.delta_chars += self._event(kind, self._loads(data))

    def _chat_event(self, data: bytes) -> None:
        if data == b"[DONE]":
            self._done()
            return
        # every chunk is decoded for its text; only a few carry anything else
        whole = _CHAT_WANTED.search(data) is not None or _ERROR_FIRST.match(data) is not None
        self.delta_chars += self._chunk(self._loads(data), whole)

    def _loads(self, data: bytes | bytearray) -> Any:
        """The decoded JSON, or None (counted in `malformed`) when it is not JSON."""
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            self.malformed += 1
            return None

    def _close_body(self) -> None:
        if self._overflow:
            self.malformed += 1
            return
        body, self._body = self._body, bytearray()
        self._unstreamed(self._loads(body))


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
