"""Upstream connections: a keep-alive pool per vendor origin, TLS, response
parsing with httptools, timeouts and flow control.

Theory of operation: one `UpstreamConnection` (an asyncio Protocol) carries
one request at a time. Header callbacks go to a compiled `HeaderCollector`
(hubcore.http.wire). The Exchange awaits the response head (status and headers)
as a future, because retry decisions are made on it; it is also called with
the head as it is parsed (`on_head`), so that a response it will not retry
gets its sink attached in the read that brought the head. The body then flows
by callbacks: the chunks httptools finds in one read are collected by
`list.append` (a C call, no Python frame per SSE event) and handed to the
attached `BodySink` together at the end of the read (it writes them to the
client in one write and feeds the meter; the read that ends the body hands
its chunks over with the end), with no task switch and no queue. Chunks that
arrive while no sink is attached (a response about to be retried, or read
as an error body) are held until one is. A slow client pauses this
transport's reading (`pause_reading`), which lets TCP push back on the
vendor, so nothing in between grows without bound.

A connection goes back to the pool only from the IDLE state, i.e. after a
complete response with keep-alive; anything else closes it.
"""
from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from types import SimpleNamespace
from typing import cast, Protocol

import httptools

from hubcore.http.deadlines import Sweeper, sweep_interval
from hubcore.http.flow import ReadFlow, detached
from hubcore.http.wire import HeaderCollector

log = logging.getLogger("hubcore.upstream")


class UpstreamError(Exception):
    """A failure talking to the vendor. `before_response` is True when no
    response byte was received, so the request may be retried elsewhere."""

    kind = "upstream_error"

    def __init__(self, message: str, *, before_response: bool = True) -> None:
        super().__init__(message)
        self.before_response = before_response


class ConnectFailed(UpstreamError):
    kind = "connect_failed"


class UpstreamTimeout(UpstreamError):
    kind = "timeout"


class ConnectionClosed(UpstreamError):
    kind = "connection_closed"


class BodySink(Protocol):
    # The body chunks of one read; the list is reused: consume it in the call.
    def on_data(self, parts: list[bytes]) -> None: ...
    # The body is complete; `parts` are its last chunks (maybe none), which
    # came in the same read: the sink can write them and the end together.
    def on_complete(self, parts: list[bytes]) -> None: ...
    def on_error(self, exc: UpstreamError) -> None: ...


class ConnState(enum.Enum):
    CONNECTING = "connecting"
    IDLE = "idle"          # in the pool, reusable
    SENDING = "sending"    # request written, waiting for the response head
    RECEIVING = "receiving"  # head received, body in progress
    DONE = "done"          # response complete, not yet back in the pool
    CLOSED = "closed"


# The states as module globals (see server.py's phases): an Enum class's
# attribute costs a slow hook's call, some ten a request here.
_CONNECTING, _IDLE, _SENDING, _RECEIVING, _DONE, _CLOSED = (
    ConnState.CONNECTING, ConnState.IDLE, ConnState.SENDING, ConnState.RECEIVING, ConnState.DONE,
    ConnState.CLOSED,
)


class ResponseHead:
    __slots__ = ("status", "headers", "index", "keep_alive", "content_length", "chunked")

    def __init__(self, status: int, head: HeaderCollector, keep_alive: bool) -> None:
        self.status = status
        self.headers: list[tuple[bytes, bytes]] = head.headers  # names lower-cased, in order
        self.index: dict[bytes, bytes] = head.index
        self.keep_alive = keep_alive
        self.content_length: int | None = head.content_length if head.content_length >= 0 else None
        self.chunked = False
        for name, value in head.control or ():
            if name == b"transfer-encoding":
                self.chunked = b"chunked" in value.lower()

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower-case), or None."""
        return self.index.get(name)


class UpstreamConnection(ReadFlow, asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        # per-connection
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        # Body chunks go straight into a list: httptools binds its callbacks
        # once, so the list object stays and is emptied after each delivery.
        self.body_parts: list[bytes] = []
        self.collector = HeaderCollector()  # compiled: no Python frame per header
        self.parser = httptools.HttpResponseParser(
            SimpleNamespace(
                on_header=self.collector.on_header,
                on_headers_complete=self.on_headers_complete,
                on_body=self.body_parts.append,
                on_message_complete=self.on_message_complete,
            )
        )
        self.state = _CONNECTING
        self.reused = False
        self.reading_paused = False
        # per-request
        self.head_future: asyncio.Future[ResponseHead] | None = None
        self.on_head: Callable[[ResponseHead], None] | None = None
        self.on_fail: Callable[[], None] | None = None
        self.head: ResponseHead | None = None
        self.head_at = 0.0
        self.sink: BodySink | None = None
        self.held: list[bytes] = []
        self.complete = False
        self.failure: UpstreamError | None = None
        # When the pool's sweeper must look at this connection (loop time;
        # 0.0: never): first byte, stream idle, or pooled idle timeout.
        self.deadline = 0.0
        self.last_activity = 0.0
        self.first_byte_timeout = 0.0
        self.idle_timeout = 0.0

    # -- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        if self.state is _IDLE:
            # A pooled connection must be silent; bytes now mean the server
            # is confused or closing. Never reuse it.
            self.close()
            return
        try:
            self.parser.feed_data(data)
            if self.body_parts:
                self._deliver()
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("upstream tried to upgrade the connection", before_response=self.head is None))
        except httptools.HttpParserError as e:
            self._fail(UpstreamError(f"invalid response from upstream: {e}", before_response=self.head is None))

    def eof_received(self) -> bool | None:
        return None  # let the transport close; connection_lost does the rest

    def connection_lost(self, exc: Exception | None) -> None:
        previous = self.state
        self.state = _CLOSED
        self.parser = detached(httptools.HttpResponseParser)
        self.deadline = 0.0
        self.pool.forget(self)
        if previous in (_SENDING, _RECEIVING) and not self.complete:
            if self.head is not None and self.head.content_length is None and not self.head.chunked:
                # A close-delimited body ends with the connection.
                self.on_message_complete()
                return
            reason = f"upstream closed the connection ({exc})" if exc else "upstream closed the connection"
            self._fail(ConnectionClosed(reason, before_response=self.head is None))

    def pause_writing(self) -> None:
        pass  # request bodies are bounded by max_body_bytes; the buffer may hold one

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks ---------------------------------------------
    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            self.collector.reset()  # 1xx interim response: the real one follows
            return
        head = ResponseHead(status, self.collector, self.parser.should_keep_alive())
        self.head = head
        # time.monotonic(), not the loop's clock: the gateway measures the
        # hub's own share of a request against it (see Exchange.t0).
        self.head_at = time.monotonic()
        self.state = _RECEIVING
        self.deadline = self.last_activity + self.idle_timeout if self.idle_timeout > 0 else 0.0
        fut = self.head_future
        if fut is not None and not fut.done():
            fut.set_result(head)
        if self.on_head is not None:
            self.on_head(head)

    def _deliver(self) -> None:
        parts = self.body_parts
        sink = self.sink
        if sink is not None:
            sink.on_data(parts)
        else:
            self.held.extend(parts)
        parts.clear()

    def on_message_complete(self) -> None:
        if self.head is None:
            return  # end of a 1xx interim response
        self.complete = True
        self.state = _DONE
        self.deadline = 0.0
        sink = self.sink
        if sink is not None:
            parts = self.body_parts
            sink.on_complete(parts)
            parts.clear()
        # else the chunks wait in `held` (data_received delivers them there)
        # for attach(), which completes the sink.

    # -- used by the Exchange --------------------------------------------
    def send(
        self,
        head: bytes,
        body: list[bytes],
        first_byte_timeout: float,
        idle_timeout: float,
        on_head: Callable[[ResponseHead], None] | None = None,
        on_fail: Callable[[], None] | None = None,
    ) -> asyncio.Future[ResponseHead]:
        """Write a request (its head, then its body in pieces, in one write);
        the future gets the response head. `on_head`, if
        given, is also called with it as it arrives, in the read that brought
        it: a caller can attach a sink there and the body chunks of that same
        read reach it without waiting for the future's waiter to wake.
        `on_fail`, if given, is called when a failure reaches no one else:
        the future fails or is cancelled, or the connection fails after the
        head and before a sink is attached (a caller that awaits nothing
        learns so)."""
        assert self.transport is not None
        self.on_head = on_head
        self.on_fail = on_fail
        self.state = _SENDING
        self.collector.reset()
        self.head = None
        self.sink = None
        self.held = []
        self.body_parts.clear()
        self.complete = False
        self.failure = None
        self.first_byte_timeout = first_byte_timeout
        self.idle_timeout = idle_timeout
        self.head_future = self.loop.create_future()
        if body:
            self.transport.writelines([head, *body])
        else:
            self.transport.write(head)
        now = self.last_activity = self.loop.time()
        self.deadline = now + first_byte_timeout if first_byte_timeout > 0 else 0.0
        return self.head_future

    def attach(self, sink: BodySink) -> None:
        """Start delivering the body to `sink` (held chunks first)."""
        self.sink = sink
        held, self.held = self.held, []
        if self.complete:
            sink.on_complete(held)
            return
        if held:
            sink.on_data(held)
        if self.failure is not None:
            sink.on_error(self.failure)

    async def read_body(self, limit: int = 1024 * 1024) -> bytes:
        """Read a whole (small) body, e.g. an error body that decides a retry."""
        collector = _Collector(self.loop, limit)
        self.attach(collector)
        return await collector.future

    def release(self) -> None:
        """Give the connection back: pooled if the response completed cleanly."""
        self.sink = None
        self.head_future = None
        self.on_head = None
        self.on_fail = None
        if (
            self.state is _DONE
            and self.head is not None
            and self.head.keep_alive
            and self.transport is not None
            and not self.transport.is_closing()
        ):
            self.resume_reading()
            self.state = _IDLE
            self.pool.put_idle(self)
        else:
            self.close()

    def close(self) -> None:
        if self.state is not _CLOSED:
            self.state = _CLOSED
            self.deadline = 0.0
            self.pool.forget(self)
        fut = self.head_future
        if fut is not None and not fut.done():
            # Closed by the hub while the head was awaited (the client left,
            # or shutdown): nobody wants the answer. Cancel the waiter rather
            # than leave it to the first-byte timeout, and rather than fail it
            # with an UpstreamError that would be retried on another key.
            fut.cancel()
            if self.on_fail is not None:
                self.on_fail()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    # -- timeouts ----------------------------------------------------------
    # The pool's sweeper calls this once `deadline` has passed. data_received
    # only stamps last_activity; a stream that was active since gets a later
    # deadline here instead of a timer per chunk.
    def on_deadline(self, now: float) -> None:
        state = self.state
        if state is _IDLE:
            self.close()  # pooled for pool_idle_timeout unused
            return
        if state is _RECEIVING:
            due = self.last_activity + self.idle_timeout
            if due > now:
                self.deadline = due
                return
            exc = UpstreamTimeout(f"upstream stream idle for {self.idle_timeout:g} s", before_response=False)
        elif state is _SENDING:
            exc = UpstreamTimeout(f"no response from upstream within {self.first_byte_timeout:g} s")
        else:
            self.deadline = 0.0
            return
        self.deadline = 0.0
        self._fail(exc)
        self.close()

    def _fail(self, exc: UpstreamError) -> None:
        if self.failure is not None or self.complete:
            return
        self.failure = exc
        if self.body_parts:
            self._deliver()  # what arrived before the failure goes out first
        fut = self.head_future
        if self.sink is not None and (fut is None or fut.done()):
            self.sink.on_error(exc)
        else:
            # Before the head, or after it with no sink attached yet: the
            # sender may not be awaiting the future (see `send`).
            if fut is not None and not fut.done():
                fut.set_exception(exc)
            if self.on_fail is not None:
                self.on_fail()
        if self.state is not _CLOSED:
            self.close()


class _Collector:
    """A BodySink that gathers a bounded body into a future."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self.future: asyncio.Future[bytes] = loop.create_future()
        self.parts: list[bytes] = []
        self.size = 0
        self.limit = limit

    def on_data(self, parts: list[bytes]) -> None:
        for chunk in parts:
            if self.size < self.limit:
                self.parts.append(chunk[: self.limit - self.size])
            self.size += len(chunk)

    def on_complete(self, parts: list[bytes]) -> None:
        self.on_data(parts)
        if not self.future.done():
            self.future.set_result(b"".join(self.parts))

    def on_error(self, exc: UpstreamError) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class Pool:
    """Keep-alive connections to one origin (scheme, host, port)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        *,
        connect_timeout: float,
        max_idle: int,
        idle_timeout: float,
        sweep_every: float | None = None,
    ) -> None:
        self.loop = loop
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.idle: deque[UpstreamConnection] = deque()
        self.active: set[UpstreamConnection] = set()
        # Every connection's timeouts, idle or busy; `sweep_every` should be
        # sweep_interval() of the shortest one the requests will use.
        self.sweeper = Sweeper(
            loop, sweep_every if sweep_every is not None else sweep_interval(idle_timeout),
            lambda: itertools.chain(self.idle, self.active),
        )
        # Set by retire(): connections still busy close when they are done.
        self.retired = False

    def take_idle(self) -> UpstreamConnection | None:
        """A pooled connection that is still usable, or None."""
        while self.idle:
            conn = self.idle.pop()  # most recently used: least likely closed by the peer
            conn.deadline = 0.0
            if conn.state is _IDLE and conn.transport is not None and not conn.transport.is_closing():
                conn.reused = True
                self.active.add(conn)
                return conn
        return None

    async def connect(self) -> UpstreamConnection:
        conn = UpstreamConnection(self)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self.loop.create_connection(
                    lambda: conn,
                    self.host,
                    self.port,
                    ssl=self.ssl_context,
                    server_hostname=self.host if self.ssl_context else None,
                )
        except TimeoutError:
            conn.close()
            raise ConnectFailed(f"connect to {self.host}:{self.port} timed out after {self.connect_timeout:g} s") from None
        except ssl.SSLError as e:
            conn.close()
            raise ConnectFailed(f"TLS handshake with {self.host}:{self.port} failed: {e.reason or e}") from e
        except OSError as e:
            conn.close()
            raise ConnectFailed(f"connect to {self.host}:{self.port} failed: {e.strerror or e}") from e
        conn.state = _DONE
        self.active.add(conn)
        self.sweeper.start()
        return conn

    def put_idle(self, conn: UpstreamConnection) -> None:
        self.active.discard(conn)
        if self.retired or len(self.idle) >= self.max_idle or self.idle_timeout <= 0:
            conn.close()
            return
        self.idle.append(conn)
        conn.deadline = self.loop.time() + self.idle_timeout
        self.sweeper.start()

    def forget(self, conn: UpstreamConnection) -> None:
        self.active.discard(conn)
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def retire(self) -> int:
        """Keep no connection for reuse from now on (a new pool replaced this
        one): the idle ones close now, each busy one when its response is
        done. The sweeper keeps watching the busy ones' timeouts, and stops
        by itself once none is left. The busy count."""
        self.retired = True
        for conn in list(self.idle):
            conn.close()
        return len(self.active)

    def close(self) -> None:
        self.sweeper.stop()
        for conn in list(self.idle) + list(self.active):
            conn.close()


def client_ssl_context(ca_file: str = "") -> ssl.SSLContext:
    """TLS for vendor connections: system CAs (or `ca_file`), SNI, HTTP/1.1."""
    ctx = ssl.create_default_context(cafile=ca_file or None)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
