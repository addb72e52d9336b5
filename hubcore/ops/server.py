"""The ops endpoint: HTTP/1.1 over a Unix socket (never TCP), served with h11.

Owns the socket file (stale-socket cleanup, mode, group), the small route
table (/stats, /metrics, /reload, /tokens/refresh, /keys/{label}/enable|disable)
and the per-connection limits that keep a misbehaving client from costing the
proxy.
"""
from __future__ import annotations

import asyncio
import errno
import grp
import inspect
import logging
import os
import socket
import stat
from collections.abc import Awaitable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote

import h11
import orjson

from hubcore.ops.metrics import PROMETHEUS_CONTENT_TYPE

log = logging.getLogger("hubcore.ops")

# The ops API has no request bodies worth the name and a handful of short
# paths: a few KiB of head is generous, and anything larger is an error.
MAX_REQUEST_HEAD = 8 * 1024          # bytes (h11's default is 16 KiB)
MAX_REQUEST_BODY = 4 * 1024          # bytes
READ_CHUNK = 16 * 1024               # bytes per read()
IDLE_TIMEOUT = 30.0                  # s a kept-alive connection may wait for its next request
REQUEST_TIMEOUT = 5.0                # s from a request's first byte to its last
WRITE_TIMEOUT = 10.0                 # s for a client to take a response (a large /metrics)
MAX_CONNECTIONS = 32                 # concurrent ops clients; `stats --watch` uses one each
# After an error answer, unread input is read and dropped for a moment before
# closing (nginx's lingering close): closing with unread bytes sends a reset
# that can destroy the answer before the client has read it.
LINGER_TIMEOUT = 1.0                 # s
LINGER_MAX = 64 * 1024               # bytes
CLOSE_GRACE = 1.0                    # s close() lets a running handler finish its answer

JSON = "application/json"
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}

# Answered without h11 when the connection limit is reached; precomputed
# because it is needed exactly when the hub is under pressure.
_BUSY_BODY = b'{"error":"too many ops connections"}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"content-length: " + str(len(_BUSY_BODY)).encode() + b"\r\nconnection: close\r\n\r\n" + _BUSY_BODY
)


@dataclass(frozen=True, slots=True)
class KeySwitched:
    """What `keys enable|disable LABEL` did: the state of the key with that
    label in each upstream that has one, after the change."""

    states: dict[str, str]  # upstream name -> state
    # Why the switch could not be stored (it holds until a restart), or None.
    not_stored: str | None = None


class OpsHandler(Protocol):
    """What the ops endpoint asks of the running hub."""

    def stats(self) -> dict[str, Any]: ...

    def metrics_text(self) -> str: ...

    def reload(self) -> tuple[bool, str] | Awaitable[tuple[bool, str]]: ...

    def set_key_enabled(
        self, label: str, enabled: bool
    ) -> KeySwitched | None | Awaitable[KeySwitched | None]: ...  # None: no such key

    def explain_route(
        self, model: str | None, kind: str | None = None, token_id: int | None = None, user: str | None = None,
    ) -> Awaitable[dict[str, Any]]: ...  # LookupError: no such kind, token or database

    def refresh_tokens_now(self) -> Awaitable[int]:
        """Reload the token table (and the limits riding its generation) from
        the database now; the tokens generation the hub then holds."""
        ...


class _Reply:
    __slots__ = ("status", "content_type", "body", "headers")

    def __init__(self, status: int, content_type: str, body: bytes,
                 headers: list[tuple[str, str]] | None = None) -> None:
        self.status = status
        self.content_type = content_type
        self.body = body
        self.headers = headers or []


def _json(status: int, obj: Any, headers: list[tuple[str, str]] | None = None) -> _Reply:
    return _Reply(status, JSON, orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS), headers)


def _error(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> _Reply:
    return _json(status, {"error": message}, headers)


class _RequestTooLarge(Exception):
    pass


class _RequestTimeout(Exception):
    pass


class OpsServer:
    """Serves an OpsHandler on a Unix socket at ``path``."""

    def __init__(
        self,
        path: str,
        handler: OpsHandler,
        *,
        mode: int = 0o660,
        group: str | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.path = path
        self.handler = handler
        self.mode = mode
        self.group = group or None        # "" (the config default) means no group
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.write_timeout = write_timeout
        self.max_connections = max_connections
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None      # (st_dev, st_ino) of our socket file
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._closing = False

    # -- socket file lifecycle ------------------------------------------------

    async def start(self) -> None:
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._bind(sock)
            # Mode and group are set between bind() and listen(): until
            # listen() nobody can connect, so there is no window in which the
            # socket is reachable with the umask's permissions, and the
            # process-wide umask (shared with aiosqlite's thread) stays alone.
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            os.chmod(self.path, self.mode)
            if self.group is not None:
                self._chown_group()
            self._closing = False
            self._server = await asyncio.start_unix_server(self._accept, sock=sock)
        except BaseException:
            sock.close()
            self._unlink_own()
            raise
        log.info("ops socket listening on %s (mode %o%s)", self.path, self.mode,
                 f", group {self.group}" if self.group else "")

    async def close(self) -> None:
        """Stop listening, drop open ops connections and remove the socket file."""
        self._closing = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        # Closing the transports ends idle connections at once; one whose
        # handler is running (a reload) gets a moment to finish, then is cancelled.
        for writer in self._connections.values():
            writer.close()
        if self._connections:
            _, pending = await asyncio.wait(list(self._connections), timeout=CLOSE_GRACE)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if server is not None:
            await server.wait_closed()
        self._unlink_own()

    def _bind(self, sock: socket.socket) -> None:
        try:
            sock.bind(self.path)
        except OSError as exc:
            # bind() names neither the path nor what it was for.
            if exc.errno is None:       # e.g. "AF_UNIX path too long"
                raise OSError(f"cannot bind the ops socket {self.path}: {exc}") from exc
            raise type(exc)(exc.errno, f"cannot bind the ops socket: {exc.strerror}",
                            self.path) from exc

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, "exists and is not a socket; not replacing it", self.path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)
        try:
            probe.connect(self.path)
        except ConnectionRefusedError:
            # Bound by a process that is gone (a crash, a kill -9): safe to take over.
            log.info("removing stale ops socket %s", self.path)
            os.unlink(self.path)
            return
        except BlockingIOError:
            pass        # listening, with a full backlog: alive
        finally:
            probe.close()
        raise FileExistsError(errno.EADDRINUSE, "another process is serving this ops socket", self.path)

    def _chown_group(self) -> None:
        assert self.group is not None
        try:
            gid = int(self.group) if self.group.isdigit() else grp.getgrnam(self.group).gr_gid
        except KeyError:
            raise LookupError(f"ops_socket_group: no group named {self.group!r}") from None
        if os.stat(self.path).st_gid == gid:
            # Already the hub's primary group. Skipping the call matters: the
            # systemd unit's SystemCallFilter=~@privileged denies chown().
            return
        try:
            os.chown(self.path, -1, gid)
        except PermissionError as exc:
            raise PermissionError(
                exc.errno, f"cannot give the ops socket to group {self.group!r} "
                "(the hub's user must be a member of it)", self.path) from exc

    def _unlink_own(self) -> None:
        # Only the file this server bound: after a restart race the path may
        # already belong to a newer process's socket.
        if self._inode is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._inode = None

    # -- one connection ----------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback that starts and tracks its own task: asyncio.streams
        # on 3.11 logs a spurious error when a task it started is cancelled.
        if self._closing or len(self._connections) >= self.max_connections:
            coro = self._refuse(reader, writer)
        else:
            coro = self._serve(reader, writer)
        task = asyncio.get_running_loop().create_task(coro, name="hubcore-ops-connection")
        self._connections[task] = writer
        task.add_done_callback(self._connection_done)

    def _connection_done(self, task: asyncio.Task[None]) -> None:
        self._connections.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("ops connection failed", exc_info=task.exception())

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(_BUSY)
            await self._linger(reader, writer)
        except ConnectionError:
            pass        # the client is gone: nobody left to tell
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
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
                reply = await self._dispatch(head, body)
                await self._send(conn, writer, reply)
                if (self._closing or conn.our_state is not h11.DONE
                        or conn.their_state is not h11.DONE):
                    return
                conn.start_next_cycle()
        except (ConnectionError, TimeoutError) as exc:
            log.debug("ops connection dropped: %r", exc)
        finally:
            writer.close()

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader,
    ) -> tuple[h11.Request, bytes] | None:
        loop = asyncio.get_running_loop()
        head: h11.Request | None = None
        body = bytearray()
        # Bytes of a pipelined next request may already sit in h11's buffer.
        started = bool(conn.trailing_data[0])
        try:
            first_wait = self.request_timeout if started else self.idle_timeout
            async with asyncio.timeout(first_wait) as deadline:
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await reader.read(READ_CHUNK)
                        if data and not started:
                            # The idle wait is over; the whole request must now
                            # arrive within request_timeout (slow-loris guard).
                            started = True
                            deadline.reschedule(loop.time() + self.request_timeout)
                        conn.receive_data(data)
                    elif isinstance(event, h11.Request):
                        # h11 bounds only a head still incomplete in its buffer; one
                        # that arrived whole in a single read is measured here.
                        if _head_size(event) > MAX_REQUEST_HEAD:
                            raise h11.RemoteProtocolError("request head too large",
                                                          error_status_hint=431)
                        head = event
                        started = True
                        length = _content_length(event)
                        if length is not None and length > MAX_REQUEST_BODY:
                            raise _RequestTooLarge
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > MAX_REQUEST_BODY:
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

    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, reply: _Reply) -> None:
        headers = [
            ("content-type", reply.content_type),
            ("content-length", str(len(reply.body))),
            ("cache-control", "no-store"),
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
        async with asyncio.timeout(self.write_timeout):
            await writer.drain()

    async def _reply_error(self, conn: h11.Connection, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter, status: int, message: str) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        log.debug("ops request refused with %d: %s", status, message)
        try:
            await self._send(conn, writer, _error(status, message))
        except h11.LocalProtocolError:
            return      # h11 will not frame a response in this state; closing says enough
        await self._linger(reader, writer)

    @staticmethod
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

    # -- routes ---------------------------------------------------------------------

    async def _dispatch(self, head: h11.Request, body: bytes) -> _Reply:
        method = head.method.decode("ascii", "replace")
        raw_path = head.target.split(b"?", 1)[0].decode("ascii", "replace")
        segments = raw_path.split("/")[1:] if raw_path.startswith("/") else []
        try:
            if segments == ["stats"]:
                if method != "GET":
                    return _error(405, "use GET", [("allow", "GET")])
                return _json(200, self.handler.stats())
            if segments == ["metrics"]:
                if method != "GET":
                    return _error(405, "use GET", [("allow", "GET")])
                return _Reply(200, PROMETHEUS_CONTENT_TYPE, self.handler.metrics_text().encode("utf-8"))
            if segments == ["reload"]:
                if method != "POST":
                    return _error(405, "use POST", [("allow", "POST")])
                return await self._reload()
            if segments == ["tokens", "refresh"]:
                # The CLI's word after it changed a token or a limit, so the
                # change is live when the command returns, not a poll later.
                if method != "POST":
                    return _error(405, "use POST", [("allow", "POST")])
                return _json(200, {"generation": await self.handler.refresh_tokens_now()})
            if segments == ["route", "explain"]:
                if method != "GET":
                    return _error(405, "use GET", [("allow", "GET")])
                return await self._explain_route(head.target)
            if len(segments) == 3 and segments[0] == "keys" and segments[2] in ("enable", "disable"):
                if method != "POST":
                    return _error(405, "use POST", [("allow", "POST")])
                return await self._set_key_enabled(unquote(segments[1]), segments[2] == "enable")
        except Exception as exc:
            log.exception("ops %s %s failed", method, raw_path)
            return _error(500, f"{type(exc).__name__}: {exc}")
        return _error(404, f"no such ops route: {method} {raw_path}")

    async def _set_key_enabled(self, label: str, enabled: bool) -> _Reply:
        result = self.handler.set_key_enabled(label, enabled)
        if inspect.isawaitable(result):
            result = await result
        if result is None:
            return _error(404, f"no key labelled {label!r}")
        # The states after the change: what the operator is told is what the
        # ring now does with the key.
        reply: dict[str, Any] = {
            "label": label, "enabled": enabled, "states": result.states, "stored": result.not_stored is None,
        }
        if result.not_stored is not None:
            reply["warning"] = f"not stored ({result.not_stored}): a restart forgets this change"
        return _json(200, reply)

    async def _explain_route(self, target: bytes) -> _Reply:
        query = parse_qs(target.partition(b"?")[2].decode("ascii", "replace"))

        def one(name: str) -> str | None:
            values = query.get(name)
            return values[-1] if values else None

        token_id = one("token_id")
        if token_id is not None and not token_id.isdigit():
            return _error(400, f"token_id: not a token id: {token_id!r}")
        try:
            answer = await self.handler.explain_route(
                one("model"), one("kind"), int(token_id) if token_id is not None else None, one("user"),
            )
        except LookupError as e:
            return _error(404, str(e.args[0]) if e.args else "not found")
        return _json(200, answer)

    async def _reload(self) -> _Reply:
        result = self.handler.reload()
        if inspect.isawaitable(result):
            result = await result
        ok, message = result
        if ok:
            return _json(200, {"ok": True, "message": message})
        return _json(500, {"ok": False, "error": message})


def _head_size(request: h11.Request) -> int:
    return len(request.method) + len(request.target) + sum(
        len(name) + len(value) + 4 for name, value in request.headers)


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)       # h11 has validated it already
    return None
