"""Upstream connections: a keep-alive pool per vendor origin, TLS, response
parsing with httptools, timeouts and flow control.

Theory of operation: one `UpstreamConnection` (an asyncio Protocol) carries
one request at a time; what every request does is its core's
(hubcore.http.upstream, compiled when built), and header callbacks go to a
compiled `HeaderCollector` (hubcore.http.wire). The Exchange awaits the
response head (status and headers) as a future, because retry decisions are
made on it; it is also called with the head as it is parsed (`on_head`), so
that a response it will not retry gets its sink attached in the read that
brought the head. The body then flows by callbacks: the chunks httptools
finds in one read are collected by `list.append` (a C call, no Python frame
per SSE event) and handed to the attached `BodySink` together at the end of
the read (it writes them to the client in one write and feeds the meter; the
read that ends the body hands its chunks over with the end), with no task
switch and no queue. Chunks that arrive while no sink is attached (a
response about to be retried, or read as an error body) are held until one
is. A slow client pauses this transport's reading (`pause_reading`), which
lets TCP push back on the vendor, so nothing in between grows without bound.

A connection goes back to the pool only from the IDLE state, i.e. after a
complete response with keep-alive; anything else closes it.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
from typing import cast

import httptools

from hubcore.http.deadlines import Sweeper, sweep_interval
from hubcore.http.flow import ReadFlow, detached
from hubcore.http.upstream import (
    BodySink, ConnectFailed, ConnectionClosed, ConnState, PoolCore, ResponseHead, UpstreamCore, UpstreamError,
    UpstreamTimeout,
)

__all__ = [
    "BodySink", "ConnState", "ConnectFailed", "ConnectionClosed", "Pool", "ResponseHead", "UpstreamConnection",
    "UpstreamError", "UpstreamTimeout", "client_ssl_context",
]

log = logging.getLogger("hubcore.upstream")

# The states as module globals (see _upstream_py): the rare paths below use these.
_IDLE, _SENDING, _RECEIVING, _DONE, _CLOSED = (
    ConnState.IDLE, ConnState.SENDING, ConnState.RECEIVING, ConnState.DONE, ConnState.CLOSED,
)


class UpstreamConnection(UpstreamCore, ReadFlow, asyncio.Protocol):
    """One connection to a vendor. What every request does (writing it,
    reading the answer's head and body, going back to the pool) is the
    core's (hubcore.http.upstream, compiled when built); what is rare is
    here: connection loss, timeouts, failures, closing."""

    # -- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def eof_received(self) -> bool | None:
        return None  # let the transport close; connection_lost does the rest

    def connection_lost(self, exc: Exception | None) -> None:
        previous = self.state
        self.state = _CLOSED
        if self.parser is not None:
            # The twin's httptools parser holds this connection's bound
            # methods; the compiled core's llhttp parser is part of it.
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

    async def read_body(self, limit: int = 1024 * 1024) -> bytes:
        """Read a whole (small) body, e.g. an error body that decides a retry."""
        collector = _Collector(self.loop, limit)
        self.attach(collector)
        return await collector.future

    def close(self) -> None:
        # The head was still awaited: a request written, no head and no
        # failure since (a failure comes here after it is told).
        awaited = self.state is _SENDING and self.failure is None
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
        elif fut is None and awaited:
            # The same, with no waiter made yet: head_waiter() makes it cancelled.
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

    def head_waiter(self) -> asyncio.Future[ResponseHead]:
        """The future of the response head to the request written last,
        made when first asked: done already if the head, a failure or a
        close (cancelled) came first."""
        fut = self.head_future
        if fut is None:
            fut = self.head_future = self.loop.create_future()
            if self.head is not None:
                fut.set_result(self.head)
            elif self.failure is not None:
                fut.set_exception(self.failure)
            elif self.state is _CLOSED:
                fut.cancel()
        return fut

    def _fail(self, exc: UpstreamError) -> None:
        if self.failure is not None or self.complete:
            return
        self.failure = exc
        if self.body_parts:
            self.deliver()  # what arrived before the failure goes out first
        fut = self.head_future
        if self.sink is not None and (fut is None or fut.done()):
            self.sink.on_error(exc)
        else:
            # Before the head, or after it with no sink attached yet: the
            # sender may be awaiting no future (see `write_request`).
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


class Pool(PoolCore):
    """Keep-alive connections to one origin (scheme, host, port). Taking an
    idle connection and putting one back are the core's (PoolCore)."""

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
        # Every connection's timeouts, idle or busy; `sweep_every` should be
        # sweep_interval() of the shortest one the requests will use.
        sweeper = Sweeper(
            loop, sweep_every if sweep_every is not None else sweep_interval(idle_timeout),
            lambda: itertools.chain(self.idle, self.active),
        )
        super().__init__(loop, max_idle, idle_timeout, sweeper)
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.connect_timeout = connect_timeout

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
