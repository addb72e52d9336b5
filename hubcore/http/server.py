"""The client side of the hub: HTTP/1.1 over uvloop, parsed with httptools.

One `HttpProtocol` per connection, one `Request` per message; what every
request does is the connection core's (hubcore.http.conn). The protocol
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
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from http import HTTPStatus
from typing import cast, Any, Protocol

import httptools

from hubcore.config import ServerConfig
from hubcore.http.conn import BodyBudget, ConnCore, Phase, Reject, Request
from hubcore.http.deadlines import Sweeper, sweep_interval
from hubcore.http.flow import ReadFlow, detached
from hubcore.http.wire import HeaderCollector

__all__ = [
    "App", "BodyBudget", "ErrorRenderer", "Gate", "Handler", "HttpProtocol", "Phase", "Request",
    "Server", "ServerMetrics", "plain_error", "server_ssl_context", "status_line",
]

def _status_line(status: int) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Overloaded" if status == 529 else "Unknown"
    return b"HTTP/1.1 %d %s\r\n" % (status, reason.encode())


# Status lines are built once; the vendors' statuses plus the hub's own.
STATUS_LINES = {s: _status_line(s) for s in [*map(int, HTTPStatus), 529]}
# The shared read buffer: as much as one socket read takes (uvloop's own
# read buffer is this size too).
READ_BUFFER_BYTES = 256 * 1024


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    return line if line is not None else _status_line(status)


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


# The phases as module globals (see _conn_py): the rare paths below use these.
_HEAD, _BODY, _LINGER, _CLOSED = Phase.HEAD, Phase.BODY, Phase.LINGER, Phase.CLOSED


class HttpProtocol(ConnCore, ReadFlow, asyncio.BufferedProtocol):
    """One client connection. The transport reads straight into the server's
    shared read buffer (`get_buffer`), which the parser consumes at once:
    no bytes object per read, and a 90 KB request body is copied once (into
    its pieces) on its way from the socket instead of twice.

    What every request does (reading it, handing it to the App, getting
    ready for the next) is the core's (hubcore.http.conn, compiled when
    built); what is rare is here: admission, refusals, lingering, closing,
    the sweeper's timeouts."""

    def __init__(self, server: Server) -> None:
        super().__init__(server)
        # per-connection, beside the core's
        # The client's address (None on a Unix socket), for the per-address cap.
        self.peer: str | None = None
        # Has sent a request whose credentials the gate accepted (see trust()).
        self.trusted = False
        # Bytes the LINGER phase may still drop before closing.
        self.linger_left = 0

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
        self.set_phase(_HEAD)

    def trust(self) -> None:
        """The connection sent credentials the gate accepted: it no longer
        counts against max_unauthenticated_connections."""
        if not self.trusted:
            self.trusted = True
            self.server.untrusted.pop(self, None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = _CLOSED
        if self.parser is not None:
            # The twin's httptools parser holds this connection's bound
            # methods; the compiled core's llhttp parser is part of it.
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

    # -- running requests --------------------------------------------------
    def run_task(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run the current request's coroutine as its task."""
        self.task = task = self.loop.create_task(coro)
        self.server.tasks.add(task)
        task.add_done_callback(self._on_task_done)

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
            self.pending_reject = Reject(status, message, headers)
            return
        rendered, body = self.server.render_error(status, message, self.url)
        self.send_response(status, [*rendered, *headers], body, keep_alive=False)
        if self.server.metrics is not None:
            self.server.metrics.refuse(f"http_{status}")

    def _release_partial_body(self) -> None:
        if self.reserved:
            self.budget.release(self.reserved)
            self.reserved = 0
        self.body_parts = []

    def _refuse_connection(self, reason: str) -> None:
        rendered, body = self.server.render_error(503, f"hubcore is at its {reason}; retry shortly", b"")
        self.send_response(503, [*rendered, (b"retry-after", b"1")], body, keep_alive=False)
        if self.server.metrics is not None:
            self.server.metrics.refuse(reason.replace(" ", "_"))

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
