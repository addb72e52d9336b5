"""A client connection's common request path, the pure-Python twin of
`_conn.pyx`: reading a request (the parser's callbacks, its limits and
timeouts as the reads come), handing it to the application, and getting
ready for the next one. `hubcore.http.conn` picks a twin; server.py's
`HttpProtocol` subclasses its `ConnCore` and keeps what is rare (refusals,
lingering, admission, closing, the sweeper's timeouts, TLS).

The twins behave the same (tests/http/test_conn.py runs both on the same
bytes). What is not hot lives here once and the compiled twin imports it:
the phases, the exceptions the callbacks raise, the constants, malloc_trim.
"""
from __future__ import annotations

import asyncio
import ctypes
import enum
import logging
from collections import deque
from collections.abc import Coroutine
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import httptools

# The pure HeaderList as the base (the compiled one's index is a C field
# this twin cannot set); the collector is the compiled one when built.
from hubcore.http._wire_py import HeaderList
from hubcore.http.wire import HeaderCollector

if TYPE_CHECKING:
    from hubcore.http.server import App, Gate, Handler, Server

log = logging.getLogger("hubcore.server")

CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
# How far line_version looks for the end of the request line.
MAX_REQUEST_LINE = 8192
# A body that came in more pieces than this (a client's small chunks) is
# joined at once rather than written upstream piece by piece.
MAX_BODY_PARTS = 16
# A body announced by Content-Length at least this long is kept as one
# bytes object, never joined. Once a read has brought only part of it, the
# compiled core reads the rest straight into that object rather than into
# the server's read buffer (see _conn.pyx's get_buffer), which spares
# copying a long conversation out of the buffer read by read and joining it
# after. A shorter body is kept in the pieces the reads brought.
BODY_WHOLE_BYTES = 16 * 1024
# A request refused at its head with a body up to this size (announced by
# Content-Length) has its body read and dropped, so the connection stays
# usable, as after any answer; a larger or chunked one is not read at all,
# and the connection is closed after the refusal.
REFUSED_BODY_DISCARD_BYTES = 64 * 1024
# Request bodies are kept in pieces of up to server.READ_BUFFER_BYTES, or
# whole (BODY_WHOLE_BYTES); glibc serves most of them from its heap (its
# mmap threshold rises to the largest block freed, up to 32 MiB), so
# freeing them leaves holes in the heap that glibc keeps (60 token-less
# clients sending 31 MiB each once left the hub at 1.9 GB). After this many
# body bytes were freed the heap's free pages are given back with
# malloc_trim, at most once per TRIM_MIN_INTERVAL seconds.
TRIM_AFTER_BYTES = 16 * 1024 * 1024
TRIM_MIN_INTERVAL = 1.0


class Phase(enum.Enum):
    IDLE = "idle"          # keep-alive: waiting for the next request
    HEAD = "head"          # receiving a request head
    BODY = "body"          # receiving a request body
    BUSY = "busy"          # the request is being answered
    LINGER = "linger"      # answered and closing: unread input is dropped
    CLOSED = "closed"


# The phases as module globals, for the request path: an attribute of an
# Enum class is looked up through EnumType.__getattr__'s slow hook (some
# 150 ns in CPython 3.11, where a global takes 20), some twenty times a
# request here.
_IDLE, _HEAD, _BODY, _BUSY, _LINGER, _CLOSED = (
    Phase.IDLE, Phase.HEAD, Phase.BODY, Phase.BUSY, Phase.LINGER, Phase.CLOSED,
)


class Reject(Exception):
    """A request the protocol refuses itself, with the status to answer."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class RefusedAtHead(Exception):
    """Stops the parser at a head the gate refused; the body stays unread."""

    def __init__(self, request: Request) -> None:
        super().__init__("refused at its head")
        self.request = request


def line_version(data: bytes | memoryview) -> str | None:
    """The version a whole request line at the start of `data` names, "1.1"
    or "1.0"; None for anything else (a line not ended yet, an empty line
    before the request line, another version), which the parser is asked for.

    httptools formats its version with str.format each time it is asked,
    some 1.5 µs a request in the running hub, against a look at the read
    the request line arrived in. When that read starts the message, its
    first line is the request line llhttp parses, and a line llhttp takes
    that ends in " HTTP/1.1" names 1.1 (no space may come before it in a
    request target).
    """
    end = bytes(data[:MAX_REQUEST_LINE]).find(b"\n")
    if end < 10 or data[end - 10:end - 2] != b" HTTP/1." or data[end - 1:end] != b"\r":
        return None
    minor = data[end - 2:end - 1]
    return "1.1" if minor == b"1" else "1.0" if minor == b"0" else None


def _load_malloc_trim() -> Any:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    return trim


malloc_trim = _load_malloc_trim()


class BodyBudget:
    """The memory that request bodies hold across all connections: reserved
    as a head announces its Content-Length (or as chunks arrive), released
    when the body is let go; freed memory is handed back to the system."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        self.limit = limit
        self.loop = loop
        self.in_flight = 0
        self.freed_since_trim = 0
        self.last_trim = 0.0
        self.trim_handle: asyncio.TimerHandle | asyncio.Handle | None = None

    def reserve(self, size: int) -> bool:
        if self.in_flight + size > self.limit:
            return False
        self.in_flight += size
        return True

    def release(self, size: int) -> None:
        self.in_flight -= size
        self.freed_since_trim += size
        if self.freed_since_trim >= TRIM_AFTER_BYTES and self.trim_handle is None and malloc_trim is not None:
            delay = max(0.0, self.last_trim + TRIM_MIN_INTERVAL - self.loop.time())
            self.trim_handle = self.loop.call_later(delay, self._trim)

    def _trim(self) -> None:
        self.trim_handle = None
        self.freed_since_trim = 0
        self.last_trim = self.loop.time()
        if malloc_trim is not None:
            malloc_trim(0)

    def close(self) -> None:
        if self.trim_handle is not None:
            self.trim_handle.cancel()
            self.trim_handle = None


class Request(HeaderList):
    __slots__ = (
        "method", "path", "target", "control", "parts", "body_size",
        "_body", "keep_alive", "http_version", "context", "reserved", "budget",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        head: HeaderCollector,
        parts: list[bytes],
        keep_alive: bool,
        http_version: str,
    ) -> None:
        self.method = method
        self.target = target
        self.path = target.partition(b"?")[0]
        self.headers = head.headers  # names lower-cased, in order received
        self._index = None
        # Transfer-Encoding, Expect and Connection, in order (None: none came).
        self.control: list[tuple[bytes, bytes]] | None = head.control
        # The body as the reads brought it: it can go upstream as it is, and
        # is joined only when something reads it whole (see `body`).
        if len(parts) > MAX_BODY_PARTS:
            parts = [b"".join(parts)]
        self.parts = parts
        self.body_size = sum(map(len, parts))
        self._body: bytes | None = b"" if not parts else parts[0] if len(parts) == 1 else None
        self.keep_alive = keep_alive
        self.http_version = http_version
        # What the application's gate said of the head (see server.Gate).
        self.context: Any = None
        # Bytes of the in-flight body budget this request holds.
        self.reserved = 0
        self.budget: BodyBudget | None = None

    @property
    def body(self) -> bytes:
        """The whole body, joined on first use."""
        body = self._body
        if body is None:
            body = self._body = b"".join(self.parts)
            self.parts = [body]
        return body

    def drop_body(self) -> None:
        """Let go of the body (up to max_body_bytes) once nothing can resend it."""
        self._body = b""
        self.parts = []
        if self.reserved:
            assert self.budget is not None
            self.budget.release(self.reserved)
            self.reserved = 0


class ConnCore:
    """The per-connection and per-message state of a client connection, and
    what every request does with it. The subclass (server.HttpProtocol)
    supplies the rare paths it calls: `_reject`, `_linger_drop`, `close`,
    `close_gracefully`, `run_task`, `pause_reading` and `resume_reading`."""

    def __init__(self, server: Server) -> None:
        # per-connection
        self.server = server
        self.config = server.config
        self.loop = server.loop
        self.app: App = server.app
        self.gate: Gate | None = server.gate
        self.budget: BodyBudget = server.body_budget
        self.transport: asyncio.Transport | None = None
        self.reading_paused: bool = False
        # A refused head ended parsing: whatever else comes is not read.
        self.parsing_stopped = False
        # A framing error met while an earlier request was being answered:
        # refused once that answer (and those pipelined before it) are done.
        self.pending_reject: Reject | None = None
        # The request being answered, whose body budget is released when done.
        self.current: Request | None = None
        # httptools calls on_header for every header: that callback is
        # compiled (hubcore.http.wire), the per-message ones are here.
        self.collector = HeaderCollector()
        self.parser = httptools.HttpRequestParser(
            SimpleNamespace(
                on_message_begin=self.on_message_begin,
                on_url=self.on_url,
                on_header=self.collector.on_header,
                on_headers_complete=self.on_headers_complete,
                on_body=self.on_body,
                on_message_complete=self.on_message_complete,
            )
        )
        self.phase = _IDLE
        # When the Server's sweeper must look at this connection (loop time,
        # 0.0: never), and the timeout of the phase that set it.
        self.deadline = 0.0
        self.timeout = 0.0
        self.last_activity = 0.0
        self.pipeline: deque[Request] = deque()
        # A request is being answered (in its task, or in callbacks).
        self.busy = False
        self.task: asyncio.Task[None] | None = None
        self.handler: Handler | None = None
        self.write_paused = False
        self.closing = False
        # per-request (the one being parsed)
        self.url = b""
        self.method = b""
        self.version = ""
        # The version of the request line a read began with (line_version),
        # when the message began with that read.
        self.line_version: str | None = None
        # What the gate said of the head, for its Request; when it is a
        # refusal, the (small) body is read and dropped.
        self.context: Any = None
        self.discarding = False
        self.chunked = False  # Transfer-Encoding: chunked
        self.head_bytes = 0
        self.body_parts: list[bytes] = []
        self.body_size = 0
        self.body_whole = False  # see BODY_WHOLE_BYTES
        # Bytes of the body budget this message's body holds, and when its
        # first body read came (loop time), for the minimum body rate.
        self.reserved = 0
        self.body_started = 0.0
        self.expect_continue = False
        # Where the parser is in the current message; `phase` says BUSY while
        # an earlier request is answered, this still knows head from body.
        self.message_phase = _IDLE
        # A 100 Continue owed to a request that arrived while another was
        # being answered: it goes out when that answer is complete.
        self.continue_due = False

    if TYPE_CHECKING:
        # The rare paths, written once in server.HttpProtocol.
        def _reject(self, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None: ...
        def _linger_drop(self, size: int) -> None: ...
        def close(self) -> None: ...
        def close_gracefully(self) -> None: ...
        def run_task(self, coro: Coroutine[Any, Any, None]) -> None: ...
        def pause_reading(self) -> None: ...
        def resume_reading(self) -> None: ...

    # -- reading -----------------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server.read_view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.server.read_view[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        # Called with what the transport read; nothing may keep `data` (it
        # is the server's read buffer): httptools hands callbacks copies.
        if self.phase is _LINGER or self.parsing_stopped:
            self._linger_drop(len(data))
            return
        now = self.last_activity = self.loop.time()
        if self.phase is _IDLE:
            self._set_phase(_HEAD, now)
        if self.message_phase is not _BODY:
            # Counted before parsing, so a head that never ends is caught
            # even when it arrives while an earlier request is answered.
            self.head_bytes += len(data)
            if self.message_phase is _IDLE:
                # The parser is between messages: this read starts the next one.
                self.line_version = line_version(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # on_headers_complete refuses CONNECT and Upgrade first; this is
            # what llhttp still calls an upgrade.
            self._reject(400, "protocol upgrades are not supported")
            return
        except httptools.HttpParserError as e:
            # httptools re-raises an exception from a callback as a
            # HttpParserCallbackError whose context is the original.
            reason = e.__context__
            if isinstance(reason, RefusedAtHead):
                self._refused_at_head(reason.request)
            elif isinstance(reason, Reject):
                self._reject(reason.status, reason.message, reason.headers)
            elif isinstance(reason, ValueError):
                # The header collector's refusal says what is wrong, where
                # httptools' own words name only the callback.
                self._reject(400, f"malformed HTTP request: {reason}")
            else:
                self._reject(400, f"malformed HTTP request: {e}")
            return
        max_header_bytes = self.config.max_header_bytes
        if self.message_phase is _HEAD and self.head_bytes > max_header_bytes:
            self._reject(431, f"request head larger than {max_header_bytes} bytes")
        elif self.message_phase is _BODY and self.collector.size > max_header_bytes:
            # Trailers of a chunked body still coming: counted with the head they follow.
            self._reject(431, f"request head and trailers larger than {max_header_bytes} bytes")

    # -- httptools callbacks (never await) ---------------------------------
    def on_message_begin(self) -> None:
        self.url = b""
        self.collector.reset()
        self.body_parts = []
        self.body_size = 0
        self.body_whole = False
        self.reserved = 0
        self.discarding = False
        self.chunked = False
        self.expect_continue = False
        self.continue_due = False
        self.message_phase = _HEAD

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_headers_complete(self) -> None:
        head = self.collector
        head.seal()  # a chunked body's trailers are not headers
        config = self.config
        if len(self.url) + head.size > config.max_header_bytes:
            raise Reject(431, f"request head larger than {config.max_header_bytes} bytes")
        # Read once here, where the head's checks need them, and again by
        # on_message_complete from these attributes, not from the parser.
        method = self.method = self.parser.get_method()
        version = self.line_version
        if version is None:
            version = self.parser.get_http_version()
        else:
            self.line_version = None  # a message later in this read has its own line
        self.version = version
        if version != "1.1" and version != "1.0":
            raise Reject(505, f"HTTP/{version} is not supported; hubcore speaks HTTP/1.1")
        if method == b"CONNECT":
            raise Reject(405, "CONNECT is not supported: hubcore is not a forward proxy")
        if head.hosts != 1 and (head.hosts > 1 or version == "1.1"):
            # RFC 9112 3.2: a 1.1 request without exactly one Host is a 400.
            raise Reject(400, "a request must carry exactly one Host header")
        if head.control is not None:
            self._control_headers(head.control)
        if head.header(b"upgrade") is not None:
            raise Reject(400, "protocol upgrades (WebSocket, h2c) are not supported")
        length = head.content_length
        if length > config.max_body_bytes:
            raise Reject(413, f"request body larger than {config.max_body_bytes} bytes")
        context = self.gate(self, method, self.url, head) if self.gate is not None else None  # type: ignore[arg-type]
        self.context = context
        if isinstance(context, BaseException):
            # A client waiting for 100 Continue gets the refusal instead.
            if self.expect_continue or self.chunked or length > REFUSED_BODY_DISCARD_BYTES:
                request = Request(method, self.url, head, [], False, version)
                request.context = context
                raise RefusedAtHead(request)
            self.discarding = True
        elif length > 0:
            self._reserve(length)
            self.body_whole = length >= BODY_WHOLE_BYTES
        self.message_phase = _BODY
        if not self.busy:
            # While an earlier request is answered the client is waiting for
            # us, not we for it: no body timer until that answer is done.
            self._set_phase(_BODY, self.last_activity)  # this read's time
            self.body_started = self.last_activity
        if self.expect_continue and length != 0 and self.transport is not None:
            if not self.busy:
                self.transport.write(CONTINUE_100)
            else:
                # Written now it would land inside the running response.
                self.continue_due = True

    def _control_headers(self, control: list[tuple[bytes, bytes]]) -> None:
        for name, value in control:
            if name == b"expect":
                if value.lower() != b"100-continue":
                    raise Reject(417, "unsupported Expect header")
                self.expect_continue = True
            elif name == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    # Only plain chunked framing is understood end to end;
                    # anything else is a classic smuggling vector.
                    raise Reject(400, "unsupported Transfer-Encoding")
                self.chunked = True

    def _reserve(self, size: int) -> None:
        """Hold `size` (the body's length, or the bytes of a chunked one so
        far) against the server's body budget, or refuse the request."""
        extra = size - self.reserved
        if not self.budget.reserve(extra):
            raise Reject(503, "hubcore holds as many request bodies as it may; retry shortly",
                         ((b"retry-after", b"1"),))
        self.reserved = size

    def on_body(self, body: bytes) -> None:
        size = self.body_size = self.body_size + len(body)
        if size > self.config.max_body_bytes:
            raise Reject(413, f"request body larger than {self.config.max_body_bytes} bytes")
        if self.discarding:
            return
        if size > self.reserved:
            # A chunked body (or one longer than announced, which llhttp
            # does not let through): reserved as it comes.
            self._reserve(size)
        self.body_parts.append(body)

    def on_message_complete(self) -> None:
        if self.collector.size > self.config.max_header_bytes:
            raise Reject(431, f"request head and trailers larger than {self.config.max_header_bytes} bytes")
        parts = self.body_parts
        if self.body_whole and len(parts) > 1:
            parts = [b"".join(parts)]
        request = Request(
            self.method,
            self.url,
            self.collector,
            parts,
            self.parser.should_keep_alive(),
            self.version,
        )
        request.context = self.context
        self.context = None
        if self.reserved:
            request.reserved = self.reserved
            request.budget = self.budget
            self.reserved = 0
        self.body_parts = []
        self.message_phase = _IDLE
        self.continue_due = False
        self.head_bytes = 0
        self._dispatch(request)

    def _refused_at_head(self, request: Request) -> None:
        """The gate refused a head: hand the request over with no body (the
        App answers it), read nothing more of this connection, and close
        once answered (its Request says keep_alive False)."""
        self.parsing_stopped = True
        self.message_phase = _IDLE
        self.head_bytes = 0
        self._dispatch(request)

    # -- running requests --------------------------------------------------
    def _dispatch(self, request: Request) -> None:
        if not self.busy:
            self._start(request)
        else:
            # A pipelined request: answer in order, stop reading meanwhile.
            self.pipeline.append(request)
            self.pause_reading()

    def _start(self, request: Request) -> None:
        self._set_phase(_BUSY)
        self.busy = True
        self.current = request
        coro = self.app(request, self)  # type: ignore[arg-type]
        if coro is not None:
            self.run_task(coro)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        self.server.tasks.discard(task)
        self.task = None
        if not task.cancelled() and task.exception() is not None:
            log.error("request handler failed", exc_info=task.exception())
            self._end_current()
            self.close()
            return
        self.request_done()

    def _end_current(self) -> None:
        self.handler = None
        self.busy = False
        request, self.current = self.current, None
        if request is not None:
            request.drop_body()

    def request_done(self) -> None:
        """The current request is answered and its bookkeeping done: start
        the next pipelined one, or wait for the next request."""
        self._end_current()
        if self.phase is _CLOSED or self.closing:
            return
        if self.pipeline:
            self._start(self.pipeline.popleft())
            return
        if self.pending_reject is not None:
            # Every request before the bad bytes has its answer: now refuse them.
            reject, self.pending_reject = self.pending_reject, None
            self._reject(reject.status, reject.message, reject.headers)
            return
        self.resume_reading()
        if self.server.draining:
            self.close()
            return
        # Part of the next request may have arrived meanwhile: time it from now.
        self._set_phase(self.message_phase)
        if self.continue_due and self.transport is not None:
            self.continue_due = False
            self.transport.write(CONTINUE_100)

    def finish(self, keep_alive: bool) -> None:
        """The response is fully written; close unless it may be kept alive."""
        if not keep_alive:
            self.close_gracefully()

    def writelines(self, data: list[bytes] | tuple[bytes, ...]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(data)

    # -- timeouts ------------------------------------------------------------
    def set_phase(self, phase: Phase) -> None:
        """Enter `phase`, timed from now (for the subclass)."""
        self._set_phase(phase)

    def _set_phase(self, phase: Phase, now: float | None = None) -> None:
        """Enter `phase` and time it from `now` (loop time; None: read the
        clock), unless the caller has just read it."""
        if self.phase is _LINGER or self.phase is _CLOSED:
            return  # closing: only the linger deadline applies
        self.phase = phase
        if phase is _HEAD:
            timeout = self.config.header_timeout
        elif phase is _BODY:
            timeout = self.config.body_timeout
        elif phase is _IDLE:
            timeout = self.config.keepalive_timeout
        else:
            self.deadline = 0.0
            return
        if now is None:
            now = self.loop.time()
        self.last_activity = now
        self.timeout = timeout
        self.deadline = now + timeout if timeout > 0 else 0.0
