"""The small HTTP/1.1 servers beside the proxy (the ops socket, the
dashboard): h11 on asyncio streams, where strictness beats speed. One
response per request, bounded heads and bodies, an idle and a per-request
timeout (slow-loris guard), a write timeout, a cap on connections answered
with a precomputed 503, and a lingering close after an error answer.

A server subclasses H11Server and gives `dispatch` (a request to a Reply)
and `error_reply` (a refusal of the HTTP layer in its own shape); what it
listens on, and its routes, are its own.
"""
from __future__ import annotations

import abc
import asyncio
import logging
from dataclasses import dataclass
from http import HTTPStatus

import h11

log = logging.getLogger("hubcore.http")

READ_CHUNK = 16 * 1024               # bytes per read()
# After an error answer, unread input is read and dropped for a moment before
# closing (nginx's lingering close): closing with unread bytes sends a reset
# that can destroy the answer before the client has read it.
LINGER_TIMEOUT = 1.0                 # s
LINGER_MAX = 64 * 1024               # bytes
CLOSE_GRACE = 1.0                    # s close_connections() lets a running handler finish

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


class Reply:
    """One response: status, content type, body, further headers."""

    __slots__ = ("status", "content_type", "body", "headers")

    def __init__(self, status: int, content_type: str, body: bytes | str,
                 headers: list[tuple[str, str]] | None = None) -> None:
        self.status = status
        self.content_type = content_type
        self.body = body.encode() if isinstance(body, str) else body
        self.headers = headers or []


@dataclass(frozen=True, slots=True)
class Limits:
    max_head: int                    # bytes of a request head (h11's default is 16 KiB)
    max_body: int                    # bytes of a request body
    idle_timeout: float              # s a kept-alive connection may wait for its next request
    request_timeout: float           # s from a request's first byte to its last
    write_timeout: float             # s for a client to take a response
    max_connections: int


class _RequestTooLarge(Exception):
    pass


class _RequestTimeout(Exception):
    pass


def busy_answer(content_type: str, body: bytes) -> bytes:
    """The 503 written without h11 past the connection cap: precomputed,
    because it is needed exactly when the hub is under pressure."""
    return (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: " + content_type.encode()
        + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
    )


class H11Server(abc.ABC):
    """The connection handling shared by hubcore's h11 servers."""

    name = "http"                    # for logs and task names
    busy = busy_answer("text/plain", b"too many connections\n")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._closing = False

    # -- what a server gives ----------------------------------------------------

    @abc.abstractmethod
    async def dispatch(self, head: h11.Request, body: bytes, peer: str) -> Reply:
        """A request to its Reply; `peer`: the client's address ("" on a Unix socket)."""

    def error_reply(self, status: int, message: str) -> Reply:
        return Reply(status, "text/plain; charset=utf-8", message + "\n")

    def response_headers(self, reply: Reply) -> list[tuple[str, str]]:
        """Headers every answer of this server carries, before the reply's own."""
        return [("cache-control", "no-store")]

    # -- connections ------------------------------------------------------------

    def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The client_connected_cb of asyncio.start_server / start_unix_server.
        A plain callback that starts and tracks its own task: asyncio.streams
        on 3.11 logs a spurious error when a task it started is cancelled."""
        if self._closing or len(self._connections) >= self.limits.max_connections:
            coro = self._refuse(reader, writer)
        else:
            coro = self._serve(reader, writer)
        task = asyncio.get_running_loop().create_task(coro, name=f"hubcore-{self.name}-connection")
        self._connections[task] = writer
        task.add_done_callback(self._connection_done)

    async def close_connections(self) -> None:
        """Closing the transports ends idle connections at once; one whose
        handler is running gets a moment to finish, then is cancelled."""
        self._closing = True
        for writer in self._connections.values():
            writer.close()
        if self._connections:
            _, pending = await asyncio.wait(list(self._connections), timeout=CLOSE_GRACE)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    def _connection_done(self, task: asyncio.Task[None]) -> None:
        self._connections.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s connection failed", self.name, exc_info=task.exception())

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(self.busy)
            await _linger(reader, writer)
        except ConnectionError:
            pass        # the client is gone: nobody left to tell
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head)
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if isinstance(peername, tuple) and peername else ""
        try:
            while True:
                try:
                    request = await self._read_request(conn, reader)
                except h11.RemoteProtocolError as exc:
                    await self._reply_error(conn, reader, writer, exc.error_status_hint, str(exc))
                    return
                except _RequestTooLarge:
                    await self._reply_error(conn, reader, writer, 413, "request body too large")
                    return
                except _RequestTimeout:
                    await self._reply_error(conn, reader, writer, 408, "request not received in time")
                    return
                if request is None:
                    return
                head, body = request
                try:
                    reply = await self.dispatch(head, body, peer)
                except Exception:
                    # Logged whole; the client learns nothing of the hub's insides.
                    log.exception("%s %s %s failed", self.name, head.method.decode("ascii", "replace"),
                                  head.target.decode("ascii", "replace"))
                    reply = self.error_reply(500, "internal error")
                await self._send(conn, writer, reply)
                if self._closing or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, TimeoutError) as exc:
            log.debug("%s connection dropped: %r", self.name, exc)
        finally:
            writer.close()

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader,
    ) -> tuple[h11.Request, bytes] | None:
        limits = self.limits
        loop = asyncio.get_running_loop()
        head: h11.Request | None = None
        body = bytearray()
        # Bytes of a pipelined next request may already sit in h11's buffer.
        started = bool(conn.trailing_data[0])
        try:
            async with asyncio.timeout(limits.request_timeout if started else limits.idle_timeout) as deadline:
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await reader.read(READ_CHUNK)
                        if data and not started:
                            # The idle wait is over; the whole request must now
                            # arrive within request_timeout (slow-loris guard).
                            started = True
                            deadline.reschedule(loop.time() + limits.request_timeout)
                        conn.receive_data(data)
                    elif isinstance(event, h11.Request):
                        # h11 bounds only a head still incomplete in its buffer; one
                        # that arrived whole in a single read is measured here.
                        if _head_size(event) > limits.max_head:
                            raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
                        head = event
                        started = True
                        length = _content_length(event)
                        if length is not None and length > limits.max_body:
                            raise _RequestTooLarge
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > limits.max_body:
                            raise _RequestTooLarge
                    elif isinstance(event, h11.EndOfMessage):
                        assert head is not None
                        return head, bytes(body)
                    elif isinstance(event, h11.ConnectionClosed):
                        return None
                    else:   # PAUSED cannot happen: a new cycle starts only when both sides are DONE
                        raise h11.RemoteProtocolError(f"unexpected {event!r}", error_status_hint=400)
        except TimeoutError:
            if started:
                raise _RequestTimeout from None
            return None             # an idle keep-alive connection: close it quietly

    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, reply: Reply) -> None:
        headers = [
            ("content-type", reply.content_type),
            ("content-length", str(len(reply.body))),
            *self.response_headers(reply),
            *reply.headers,
        ]
        if conn.their_state is not h11.DONE:
            # An error before the request was read to its end: the connection
            # cannot be reused, so say so.
            headers.append(("connection", "close"))
        reason = _REASONS.get(reply.status, b"")
        writer.write(conn.send(h11.Response(status_code=reply.status, headers=headers, reason=reason)))
        writer.write(conn.send(h11.Data(data=reply.body)))
        writer.write(conn.send(h11.EndOfMessage()))
        async with asyncio.timeout(self.limits.write_timeout):
            await writer.drain()

    async def _reply_error(self, conn: h11.Connection, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter, status: int, message: str) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        log.debug("%s request refused with %d: %s", self.name, status, message)
        try:
            await self._send(conn, writer, self.error_reply(status, message))
        except h11.LocalProtocolError:
            return      # h11 will not frame a response in this state; closing says enough
        await _linger(reader, writer)


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then drop what the client still sends, briefly and boundedly."""
    try:
        async with asyncio.timeout(LINGER_TIMEOUT):
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            dropped = 0
            while dropped < LINGER_MAX:
                chunk = await reader.read(READ_CHUNK)
                if not chunk:
                    break
                dropped += len(chunk)
    except TimeoutError:
        pass        # the client keeps the connection open; the close follows anyway


def _head_size(request: h11.Request) -> int:
    return len(request.method) + len(request.target) + sum(
        len(name) + len(value) + 4 for name, value in request.headers)


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)       # h11 has validated it already
    return None
