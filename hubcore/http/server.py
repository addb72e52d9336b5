"""The client side of the hub: HTTP/1.1 over uvloop, parsed with httptools.

One `HttpProtocol` per connection, one `Request` per message. The protocol
enforces the limits (head size, body size, read timeouts and minimum body
rate, connection counts overall, per address and before authentication, the
memory held by bodies in flight), refuses request smuggling, answers
`Expect: 100-continue`, and hands each complete request to the application,
one at a time per connection (pipelined requests wait their turn with
reading paused). The application is called as the request completes, in
that read; it does what needs no waiting and either returns a coroutine for
the rest, which runs as the request's task, or returns None and goes on in
callbacks, calling `request_done()` when the answer is complete (see
`Handler`).

Before a body is read, the application's gate judges the head (see `Gate`):
a refused request is handed over at once with no body, answered, and the
connection closed without reading the body, so that a client without a token
never makes the hub hold its body.

The protocol knows no application: what it refuses itself (framing, limits,
timeouts) is worded by the application's `ErrorRenderer`, plain text without one.
"""
from __future__ import annotations

import asyncio
import ssl
import ctypes
import enum
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Sequence
from http import HTTPStatus
from types import SimpleNamespace
from typing import cast, Any, Protocol

import httptools

from hubcore.config import ServerConfig
from hubcore.http.deadlines import Sweeper, sweep_interval
from hubcore.http.flow import ReadFlow, detached
from hubcore.http.wire import HeaderCollector

log = logging.getLogger("hubcore.server")


def _status_line(status: int) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Overloaded" if status == 529 else "Unknown"
    return b"HTTP/1.1 %d %s\r\n" % (status, reason.encode())


# Status lines are built once; the vendors' statuses plus the hub's own.
STATUS_LINES = {s: _status_line(s) for s in [*map(int, HTTPStatus), 529]}
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
# The shared read buffer: as much as one socket read takes (uvloop's own
# read buffer is this size too).
READ_BUFFER_BYTES = 256 * 1024
# A body that came in more pieces than this (a client's small chunks) is
# joined at once rather than written upstream piece by piece.
MAX_BODY_PARTS = 16
# Request bodies arrive in pieces of up to READ_BUFFER_BYTES, below glibc's
# mmap threshold, so freeing them leaves holes in the heap that glibc keeps
# (60 token-less clients sending 31 MiB each once left the hub at 1.9 GB).
# After this many body bytes were freed the heap's free pages are given back
# with malloc_trim, at most once per TRIM_MIN_INTERVAL seconds.
TRIM_AFTER_BYTES = 16 * 1024 * 1024
TRIM_MIN_INTERVAL = 1.0
# A request refused at its head with a body up to this size (announced by
# Content-Length) has its body read and dropped, so the connection stays
# usable, as after any answer; a larger or chunked one is not read at all,
# and the connection is closed after the refusal.
REFUSED_BODY_DISCARD_BYTES = 64 * 1024


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    return line if line is not None else _status_line(status)


class Request:
    __slots__ = (
        "method", "path", "target", "headers", "index", "control", "parts", "body_size",
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
        self.headers: list[tuple[bytes, bytes]] = head.headers  # names lower-cased, in order received
        self.index: dict[bytes, bytes] = head.index  # each name's first value
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
        # What the application's gate said of the head (see `Gate`).
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

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower-case), or None."""
        return self.index.get(name)


class Handler(Protocol):
    """What the protocol calls with each request, and while it runs."""

    def client_gone(self) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...
    # A request running in callbacks (its App returned None) goes on in a
    # task from here, started with `run_task`: shutdown drains tasks.
    def ensure_task(self) -> None: ...


# Called with each complete request; returns the coroutine to run as its
# task, or None when the request goes on in callbacks: its handler (set on
# the protocol) then calls `request_done()` once the answer is complete.
App = Callable[[Request, "HttpProtocol"], Coroutine[Any, Any, None] | None]

# Words the answer to a request the protocol refuses itself: (status,
# message, request target, empty before a request came) -> (headers, body).
# The application knows which error shape the client on that target parses.
ErrorRenderer = Callable[[int, str, bytes], tuple[Sequence[tuple[bytes, bytes]], bytes]]

PLAIN_TEXT = ((b"content-type", b"text/plain; charset=utf-8"),)


def plain_error(status: int, message: str, target: bytes) -> tuple[Sequence[tuple[bytes, bytes]], bytes]:
    """The ErrorRenderer of a Server given none: the message as plain text."""
    return PLAIN_TEXT, message.encode() + b"\n"


class ServerMetrics(Protocol):
    """What the server counts, when it is given metrics."""

    def connection_opened(self) -> None: ...
    def connection_closed(self) -> None: ...
    def refuse(self, reason: str) -> None: ...


# Called with each request head (method, target, headers) before its body is
# read. Its result becomes `Request.context`; an exception instance means the
# request is refused: its body is not read, the request is handed to the App
# with no body (the App answers the refusal), and the connection is closed.
# The gate calls `HttpProtocol.trust()` when the head carried valid credentials.
Gate = Callable[["HttpProtocol", bytes, bytes, HeaderCollector], Any]


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
        if self.freed_since_trim >= TRIM_AFTER_BYTES and self.trim_handle is None and _malloc_trim is not None:
            delay = max(0.0, self.last_trim + TRIM_MIN_INTERVAL - self.loop.time())
            self.trim_handle = self.loop.call_later(delay, self._trim)

    def _trim(self) -> None:
        self.trim_handle = None
        self.freed_since_trim = 0
        self.last_trim = self.loop.time()
        if _malloc_trim is not None:
            _malloc_trim(0)

    def close(self) -> None:
        if self.trim_handle is not None:
            self.trim_handle.cancel()
            self.trim_handle = None


def _load_malloc_trim() -> Any:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()


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


class _Reject(Exception):
    def __init__(self, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class _RefusedAtHead(Exception):
    """Stops the parser at a head the gate refused; the body stays unread."""

    def __init__(self, request: Request) -> None:
        super().__init__("refused at its head")
        self.request = request


class HttpProtocol(ReadFlow, asyncio.BufferedProtocol):
    """One client connection. The transport reads straight into the server's
    shared read buffer (`get_buffer`), which the parser consumes at once:
    no bytes object per read, and a 90 KB request body is copied once (into
    its pieces) on its way from the socket instead of twice."""

    def __init__(self, server: Server) -> None:
        # per-connection
        self.server = server
        self.config = server.config
        self.loop = server.loop
        self.app = server.app
        self.gate = server.gate
        self.transport: asyncio.Transport | None = None
        # The client's address (None on a Unix socket), for the per-address cap.
        self.peer: str | None = None
        # Has sent a request whose credentials the gate accepted (see trust()).
        self.trusted = False
        # A framing error met while an earlier request was being answered:
        # refused once that answer (and those pipelined before it) are done.
        self.pending_reject: _Reject | None = None
        # A refused head ended parsing: whatever else comes is not read.
        self.parsing_stopped = False
        # Bytes the LINGER phase may still drop before closing.
        self.linger_left = 0
        # The request being answered, whose body budget is released when done.
        self.current: Request | None = None
        # httptools calls on_header for every header: that callback is
        # compiled (hubcore.http.wire), the per-message ones stay here.
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
        self.reading_paused = False
        self.closing = False
        # per-request (the one being parsed)
        self.url = b""
        self.method = b""
        self.version = ""
        # What the gate said of the head, for its Request; when it is a
        # refusal, the (small) body is read and dropped.
        self.context: Any = None
        self.discarding = False
        self.chunked = False  # Transfer-Encoding: chunked
        self.head_bytes = 0
        self.body_parts: list[bytes] = []
        self.body_size = 0
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

    # -- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        server = self.server
        server.connections.add(self)
        server.sweeper.start()
        if server.metrics is not None:
            server.metrics.connection_opened()
        peername = self.transport.get_extra_info("peername")
        if isinstance(peername, tuple) and peername:
            self.peer = peername[0]
        refusal = server.admit(self)
        if refusal is not None:
            self._refuse_connection(refusal)
            return
        # A new connection must send its request head promptly.
        self._set_phase(_HEAD)

    def trust(self) -> None:
        """The connection sent credentials the gate accepted: it no longer
        counts against max_unauthenticated_connections."""
        if not self.trusted:
            self.trusted = True
            self.server.untrusted.pop(self, None)

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
            if isinstance(reason, _RefusedAtHead):
                self._refused_at_head(reason.request)
            elif isinstance(reason, _Reject):
                self._reject(reason.status, reason.message, reason.headers)
            else:
                self._reject(400, f"malformed HTTP request: {e}")
            return
        if self.message_phase is _HEAD and self.head_bytes > self.config.max_header_bytes:
            self._reject(431, f"request head larger than {self.config.max_header_bytes} bytes")
        elif self.message_phase is _BODY and self.collector.size > self.config.max_header_bytes:
            # Trailers of a chunked body still coming: counted with the head they follow.
            self._reject(431, f"request head and trailers larger than {self.config.max_header_bytes} bytes")

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = _CLOSED
        self.parser = detached(httptools.HttpRequestParser)
        self.server.forget(self)
        if self.server.metrics is not None:
            self.server.metrics.connection_closed()
        self.deadline = 0.0
        self._release_partial_body()
        if self.handler is not None:
            self.handler.client_gone()
        for request in self.pipeline:
            request.drop_body()
        self.pipeline.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.handler is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.handler is not None:
            self.handler.resume_writing()

    # -- httptools callbacks (never await) ---------------------------------
    def on_message_begin(self) -> None:
        self.url = b""
        self.collector.reset()
        self.body_parts = []
        self.body_size = 0
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
            raise _Reject(431, f"request head larger than {config.max_header_bytes} bytes")
        # Read once here, where the head's checks need them, and again by
        # on_message_complete from these attributes, not from the parser.
        method = self.method = self.parser.get_method()
        version = self.version = self.parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise _Reject(505, f"HTTP/{version} is not supported; hubcore speaks HTTP/1.1")
        if method == b"CONNECT":
            raise _Reject(405, "CONNECT is not supported: hubcore is not a forward proxy")
        if head.hosts != 1 and (head.hosts > 1 or version == "1.1"):
            # RFC 9112 3.2: a 1.1 request without exactly one Host is a 400.
            raise _Reject(400, "a request must carry exactly one Host header")
        if head.control is not None:
            self._control_headers(head.control)
        if b"upgrade" in head.index:
            raise _Reject(400, "protocol upgrades (WebSocket, h2c) are not supported")
        length = head.content_length
        if length > config.max_body_bytes:
            raise _Reject(413, f"request body larger than {config.max_body_bytes} bytes")
        context = self.gate(self, method, self.url, head) if self.gate is not None else None
        self.context = context
        if isinstance(context, BaseException):
            # A client waiting for 100 Continue gets the refusal instead.
            if self.expect_continue or self.chunked or length > REFUSED_BODY_DISCARD_BYTES:
                request = Request(method, self.url, head, [], False, version)
                request.context = context
                raise _RefusedAtHead(request)
            self.discarding = True
        elif length > 0:
            self._reserve(length)
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
                    raise _Reject(417, "unsupported Expect header")
                self.expect_continue = True
            elif name == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    # Only plain chunked framing is understood end to end;
                    # anything else is a classic smuggling vector.
                    raise _Reject(400, "unsupported Transfer-Encoding")
                self.chunked = True

    def _reserve(self, size: int) -> None:
        """Hold `size` (the body's length, or the bytes of a chunked one so
        far) against the server's body budget, or refuse the request."""
        extra = size - self.reserved
        if not self.server.body_budget.reserve(extra):
            raise _Reject(503, "hubcore holds as many request bodies as it may; retry shortly",
                          ((b"retry-after", b"1"),))
        self.reserved = size

    def on_body(self, body: bytes) -> None:
        size = self.body_size = self.body_size + len(body)
        if size > self.config.max_body_bytes:
            raise _Reject(413, f"request body larger than {self.config.max_body_bytes} bytes")
        if self.discarding:
            return
        if size > self.reserved:
            # A chunked body (or one longer than announced, which llhttp
            # does not let through): reserved as it comes.
            self._reserve(size)
        self.body_parts.append(body)

    def on_message_complete(self) -> None:
        if self.collector.size > self.config.max_header_bytes:
            raise _Reject(431, f"request head and trailers larger than {self.config.max_header_bytes} bytes")
        request = Request(
            self.method,
            self.url,
            self.collector,
            self.body_parts,
            self.parser.should_keep_alive(),
            self.version,
        )
        request.context = self.context
        self.context = None
        if self.reserved:
            request.reserved = self.reserved
            request.budget = self.server.body_budget
            self.reserved = 0
        self.body_parts = []
        self.message_phase = _IDLE
        self.continue_due = False
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
        coro = self.app(request, self)
        if coro is not None:
            self.run_task(coro)

    def run_task(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run the current request's coroutine as its task."""
        self.task = task = self.loop.create_task(coro)
        self.server.tasks.add(task)
        task.add_done_callback(self._on_task_done)

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

    def close_gracefully(self) -> None:
        """Close after the answer written so far, without a reset: send FIN,
        then read and drop what the client still sends (a body the hub
        refused to read, pipelined bytes) for up to linger_timeout and
        linger_bytes. Closing with unread input would make the kernel send
        a reset, and the client would see that instead of the answer."""
        self.closing = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.config.linger_timeout <= 0 or transport.get_extra_info("sslcontext") is not None or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self.phase = _LINGER
        self.linger_left = self.config.linger_bytes
        self.timeout = self.config.linger_timeout
        self.deadline = self.loop.time() + self.timeout
        for request in self.pipeline:
            request.drop_body()
        self.pipeline.clear()
        self.resume_reading()

    def _linger_drop(self, size: int) -> None:
        # Before LINGER (a refusal still being answered) reading is paused,
        # and what the last read brought is dropped.
        if self.phase is _LINGER:
            self.linger_left -= size
            if self.linger_left < 0:
                self.close()

    def writelines(self, data: list[bytes] | tuple[bytes, ...]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(data)

    def send_response(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        keep_alive: bool,
        head_only: bool = False,
    ) -> None:
        """Write a complete response with a Content-Length body."""
        parts = [status_line(status)]
        for name, value in headers:
            parts.append(b"%s: %s\r\n" % (name, value))
        parts.append(b"content-length: %d\r\n" % len(body))
        if not keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        if body and not head_only:
            parts.append(body)
        self.writelines(parts)
        self.finish(keep_alive)

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    # -- limits and timeouts -------------------------------------------------
    def _reject(self, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """Answer a request the parser refused, then close: after a framing
        error nothing more on this connection can be trusted."""
        self.deadline = 0.0
        self.parsing_stopped = True
        self._release_partial_body()
        if self.busy:
            # A response is in progress for an earlier request: its client
            # gets it (and those of requests pipelined before the bad bytes);
            # the refusal follows once they are done (request_done).
            self.pause_reading()
            self.pending_reject = _Reject(status, message, headers)
            return
        rendered, body = self.server.render_error(status, message, self.url)
        self.send_response(status, [*rendered, *headers], body, keep_alive=False)
        if self.server.metrics is not None:
            self.server.metrics.refuse(f"http_{status}")

    def _refused_at_head(self, request: Request) -> None:
        """The gate refused a head: hand the request over with no body (the
        App answers it), read nothing more of this connection, and close
        once answered (its Request says keep_alive False)."""
        self.parsing_stopped = True
        self.message_phase = _IDLE
        self.head_bytes = 0
        self._dispatch(request)

    def _release_partial_body(self) -> None:
        if self.reserved:
            self.server.body_budget.release(self.reserved)
            self.reserved = 0
        self.body_parts = []

    def _refuse_connection(self, reason: str) -> None:
        rendered, body = self.server.render_error(503, f"hubcore is at its {reason}; retry shortly", b"")
        self.send_response(503, [*rendered, (b"retry-after", b"1")], body, keep_alive=False)
        if self.server.metrics is not None:
            self.server.metrics.refuse(reason.replace(" ", "_"))

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

    def on_deadline(self, now: float) -> None:
        timeout = self.timeout
        if self.phase is _LINGER:
            self.close()
            return
        if self.phase is _BODY:
            # The body timeout is between reads, not for the whole body; the
            # whole body must also come at min_body_rate after a grace of
            # body_timeout, so one byte a minute cannot hold a slot for hours.
            due = self.last_activity + timeout
            rate = self.config.min_body_rate
            if rate > 0:
                rate_due = self.body_started + timeout + self.body_size / rate
                if rate_due <= now:
                    self._reject(408, f"request body arrived slower than {rate} bytes/s")
                    return
                due = min(due, rate_due)
            if due > now:
                self.deadline = due
                return
            self._reject(408, f"no request body data for {timeout:g} s")
            return
        self.deadline = 0.0
        if self.phase is _HEAD and self.message_phase is _HEAD:
            self._reject(408, f"request head not received within {timeout:g} s")
            return
        self.close()



class Server:
    """Listening sockets, the set of live connections and what they may
    hold, graceful shutdown."""

    def __init__(
        self, config: ServerConfig, app: App, loop: asyncio.AbstractEventLoop, metrics: ServerMetrics | None = None,
        gate: Gate | None = None, render_error: ErrorRenderer = plain_error,
    ) -> None:
        self.config = config
        self.app = app
        self.gate = gate
        self.render_error = render_error
        self.loop = loop
        self.metrics = metrics
        self.connections: set[HttpProtocol] = set()
        # Connections not yet trusted (see HttpProtocol.trust), oldest first.
        self.untrusted: OrderedDict[HttpProtocol, None] = OrderedDict()
        self.per_address: dict[str, int] = {}
        self.body_budget = BodyBudget(config.max_body_bytes_in_flight, loop)
        self.tasks: set[asyncio.Task[None]] = set()
        self.servers: list[asyncio.base_events.Server] = []
        self.draining = False
        # Every connection's reads land here, one at a time (see HttpProtocol).
        self.read_view = memoryview(bytearray(READ_BUFFER_BYTES))
        self.sweeper = Sweeper(
            loop, sweep_interval(config.header_timeout, config.body_timeout, config.keepalive_timeout),
            lambda: self.connections,
        )

    def admit(self, conn: HttpProtocol) -> str | None:
        """Count a new connection in; the limit it is refused by, if any.

        Connections nobody has authenticated on yet may hold at most
        max_unauthenticated_connections slots, and a new one evicts the
        longest-waiting of them rather than being turned away: a client with
        a token sends its head at once and is trusted before its turn to be
        evicted comes, while silent or token-less connections cannot keep
        slots from it. The rest of max_connections stays for trusted ones.
        """
        config = self.config
        peer = conn.peer
        if peer is not None:
            # Counted even when refused: forget() uncounts every connection.
            count = self.per_address.get(peer, 0) + 1
            self.per_address[peer] = count
            if config.max_connections_per_address and count > config.max_connections_per_address:
                return "per-address connection limit"
        if self.draining:
            return "connection limit"
        if len(self.untrusted) >= config.max_unauthenticated_connections or len(self.connections) > config.max_connections:
            if not self._evict_untrusted():
                return "connection limit"
        self.untrusted[conn] = None
        return None

    def _evict_untrusted(self) -> bool:
        for old in self.untrusted:
            if not old.busy:
                del self.untrusted[old]
                old.abort()
                if self.metrics is not None:
                    self.metrics.refuse("unauthenticated_evicted")
                return True
        return False

    def forget(self, conn: HttpProtocol) -> None:
        self.connections.discard(conn)
        self.untrusted.pop(conn, None)
        peer = conn.peer
        if peer is not None:
            count = self.per_address.get(peer, 0) - 1
            if count > 0:
                self.per_address[peer] = count
            else:
                self.per_address.pop(peer, None)

    async def start(
        self, host: str, port: int, ssl: Any = None, sock: Any = None, reuse_port: bool = False,
    ) -> list[tuple[str, int]]:
        """Listen; `reuse_port` (SO_REUSEPORT): beside other processes that
        listen on the same port, the kernel spreading connections among them."""
        if sock is not None:
            server = await self.loop.create_server(lambda: HttpProtocol(self), sock=sock, ssl=ssl, backlog=2048)
        else:
            server = await self.loop.create_server(
                lambda: HttpProtocol(self), host, port, ssl=ssl, reuse_address=True,
                reuse_port=reuse_port or None, backlog=2048,
            )
        self.servers.append(server)
        return [s.getsockname()[:2] for s in server.sockets]

    async def shutdown(self, drain_timeout: float) -> None:
        """Stop accepting, let in-flight requests finish (up to the drain
        timeout), close idle keep-alive connections, then abort the rest."""
        self.draining = True
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()
            elif conn.task is None and conn.handler is not None:
                conn.handler.ensure_task()
        # A request that completed in callbacks ends in a callback already
        # scheduled: let it run before waiting for the rest.
        await asyncio.sleep(0)
        if self.tasks:
            done, pending = await asyncio.wait(set(self.tasks), timeout=drain_timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for conn in list(self.connections):
            conn.close()
        self.sweeper.stop()
        self.body_budget.close()
        for server in self.servers:
            await server.wait_closed()


def server_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """TLS for a listener of the hub's (OSError, ssl.SSLError among them,
    when the files will not load); HTTP/1.1 only."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
