"""An upstream connection's common response path, the pure-Python twin of
`_upstream.pyx`: writing a request, reading its response (the parser's
callbacks, the head, the body handed to a sink as the reads bring it), and
going back to the pool. `hubcore.http.upstream` picks a twin; client.py's
`UpstreamConnection` subclasses its `UpstreamCore` and keeps what is rare
(connection failures, timeouts, eof, close), and its `Pool` subclasses
`PoolCore`, which takes and puts back idle connections.

The twins behave the same (tests/http/test_upstream.py runs both on the
same bytes). What is not hot lives here once and the compiled twin imports
it: the states, the error kinds, the sink's protocol.
"""
from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Protocol

import httptools

# The pure HeaderList as the base (the compiled one's index is a C field
# this twin cannot set); the collector is the compiled one when built.
from hubcore.http._wire_py import HeaderList
from hubcore.http.wire import HeaderCollector

if TYPE_CHECKING:
    from hubcore.http.client import Pool, UpstreamConnection
    from hubcore.http.deadlines import Sweeper


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


# The states as module globals (see _conn_py's phases): an Enum class's
# attribute costs a slow hook's call, some ten a request here.
_CONNECTING, _IDLE, _SENDING, _RECEIVING, _DONE, _CLOSED = (
    ConnState.CONNECTING, ConnState.IDLE, ConnState.SENDING, ConnState.RECEIVING, ConnState.DONE,
    ConnState.CLOSED,
)


class ResponseHead(HeaderList):
    __slots__ = ("status", "keep_alive", "content_length", "chunked")

    def __init__(self, status: int, head: HeaderCollector, keep_alive: bool) -> None:
        self.status = status
        self.headers = head.headers  # names lower-cased, in order
        self._index = None
        self.keep_alive = keep_alive
        self.content_length: int | None = head.content_length if head.content_length >= 0 else None
        self.chunked = False
        for name, value in head.control or ():
            if name == b"transfer-encoding":
                self.chunked = b"chunked" in value.lower()


# What write_request calls with the response head, and when a failure reaches no one else.
OnHead = Callable[[ResponseHead], None]
OnFail = Callable[[], None]


class UpstreamCore:
    """The per-connection and per-request state of an upstream connection,
    and what every request does with it. The subclass
    (client.UpstreamConnection) supplies the rare paths it calls: `close`,
    `_fail` and `resume_reading`."""

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
        self.reading_paused: bool = False
        # per-request
        # The response head's future: made only when asked (head_waiter).
        self.head_future: asyncio.Future[ResponseHead] | None = None
        self.on_head: OnHead | None = None
        self.on_fail: OnFail | None = None
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

    if TYPE_CHECKING:
        # The rare paths, written once in client.UpstreamConnection.
        def close(self) -> None: ...
        def _fail(self, exc: UpstreamError) -> None: ...
        def resume_reading(self) -> None: ...
        def head_waiter(self) -> asyncio.Future[ResponseHead]: ...

    # -- reading -----------------------------------------------------------
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

    # -- httptools callbacks -----------------------------------------------
    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            self.collector.reset()  # 1xx interim response: the real one follows
            return
        self.collector.seal()  # a chunked body's trailers are not the head's
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

    def deliver(self) -> None:
        """Hand the chunks read so far to the sink, or hold them (for the subclass)."""
        self._deliver()

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

    # -- used by the Exchange ----------------------------------------------
    def send(self, head: bytes, body: list[bytes], first_byte_timeout: float, idle_timeout: float,
             on_head: OnHead | None = None, on_fail: OnFail | None = None) -> asyncio.Future[ResponseHead]:
        """Write a request (see `write_request`); the future gets the response head."""
        self.write_request(head, body, first_byte_timeout, idle_timeout, on_head, on_fail)
        return self.head_waiter()

    def write_request(self, head: bytes, body: list[bytes], first_byte_timeout: float, idle_timeout: float,
                      on_head: OnHead | None = None, on_fail: OnFail | None = None) -> None:
        """Write a request: its head, then its body in pieces, in one write.
        `on_head`, if given, is called with the response head as it arrives,
        in the read that brought it: a caller can attach a sink there and the
        body chunks of that same read reach it at once. `on_fail`, if given,
        is called when a failure reaches no one else: before the head (and
        then `head_waiter()`'s future fails or is cancelled), or after it and
        before a sink is attached. A caller that goes on by these callbacks
        makes no future; one that awaits the head asks `head_waiter()`."""
        assert self.transport is not None
        self.on_head = on_head
        self.on_fail = on_fail
        self.head_future = None
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
        if body:
            self.transport.writelines([head, *body])
        else:
            self.transport.write(head)
        now = self.last_activity = self.loop.time()
        self.deadline = now + first_byte_timeout if first_byte_timeout > 0 else 0.0

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
            # ReadFlow.resume_reading does nothing unless reading is paused:
            # asked only then, the usual request makes no Python call here.
            if self.reading_paused:
                self.resume_reading()
            self.state = _IDLE
            self.pool._put_idle(self)  # type: ignore[arg-type]  # self is a client.UpstreamConnection
        else:
            self.close()


class PoolCore:
    """The idle and busy connections of a pool, and the two moves every
    request makes between them. The subclass (client.Pool) opens, forgets,
    retires and closes connections."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_idle: int, idle_timeout: float, sweeper: Sweeper) -> None:
        self.loop = loop
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.idle: deque[UpstreamConnection] = deque()
        self.active: set[UpstreamConnection] = set()
        # Every connection's timeouts, idle or busy.
        self.sweeper = sweeper
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

    def put_idle(self, conn: UpstreamConnection) -> None:
        """Keep `conn` for reuse, or close it (for callers outside the core)."""
        self._put_idle(conn)

    def _put_idle(self, conn: UpstreamConnection) -> None:
        self.active.discard(conn)
        if self.retired or len(self.idle) >= self.max_idle or self.idle_timeout <= 0:
            conn.close()
            return
        self.idle.append(conn)
        conn.deadline = self.loop.time() + self.idle_timeout
        # Once per request: the sweeper is nearly always running already, and
        # its start() would be a Python call that does nothing.
        sweeper = self.sweeper
        if sweeper.handle is None:
            sweeper.start()
