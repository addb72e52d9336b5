"""The ops endpoint: HTTP/1.1 over a Unix socket (never TCP), served with h11.

Owns the socket file (stale-socket cleanup, mode, group), the small route
table (/stats, /metrics, /reload, /tokens/refresh,
/keys/{label}/enable|disable|reset)
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
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote

import h11
import orjson

from hubcore.http.h11server import H11Server, Limits, Reply, busy_answer
from hubcore.ops.metrics import PROMETHEUS_CONTENT_TYPE

log = logging.getLogger("hubcore.ops")

# The ops API has no request bodies worth the name and a handful of short
# paths: a few KiB of head is generous, and anything larger is an error.
MAX_REQUEST_HEAD = 8 * 1024          # bytes (h11's default is 16 KiB)
MAX_REQUEST_BODY = 4 * 1024          # bytes
IDLE_TIMEOUT = 30.0                  # s a kept-alive connection may wait for its next request
REQUEST_TIMEOUT = 5.0                # s from a request's first byte to its last
WRITE_TIMEOUT = 10.0                 # s for a client to take a response (a large /metrics)
MAX_CONNECTIONS = 32                 # concurrent ops clients; `stats --watch` uses one each
JSON = "application/json"


@dataclass(frozen=True, slots=True)
class KeySwitched:
    """What `keys enable|disable LABEL` did: the state of the key with that
    label in each upstream that has one, after the change."""

    states: dict[str, str]  # upstream name -> state
    # Why the switch could not be stored (it holds until a restart), or None.
    not_stored: str | None = None


@dataclass(frozen=True, slots=True)
class KeyReset:
    """What `keys reset LABEL` did: the state of the key with that label in
    each upstream that has one, after its rests ended and its circuit closed
    (a dead or disabled key stays so)."""

    states: dict[str, str]  # upstream name -> state
    # Why the reset's audit row could not be written (the reset holds), or None.
    not_audited: str | None = None


class OpsHandler(Protocol):
    """What the ops endpoint asks of the running hub."""

    def stats(self) -> dict[str, Any]: ...

    def metrics_text(self) -> str: ...

    def live(self) -> dict[str, Any]: ...  # the dashboard's live view of this process (App.live)

    def reload(self) -> tuple[bool, str] | Awaitable[tuple[bool, str]]: ...

    # record=False (`?record=0`, from the supervisor of several workers):
    # change this process only; another worker stores the change and writes
    # its audit row. Passed only when False.
    def set_key_enabled(
        self, label: str, enabled: bool, *, record: bool = ...,
    ) -> KeySwitched | None | Awaitable[KeySwitched | None]: ...  # None: no such key

    def reset_key(self, label: str, *, record: bool = ...) -> Awaitable[KeyReset | None]: ...  # None: no such key

    def explain_route(
        self, model: str | None, kind: str | None = None, token_id: int | None = None, user: str | None = None,
    ) -> Awaitable[dict[str, Any]]: ...  # LookupError: no such kind, token or database

    def refresh_tokens_now(self) -> Awaitable[int]:
        """Reload the token table (and the limits riding its generation) from
        the database now; the tokens generation the hub then holds."""
        ...


def _records(target: bytes) -> bool:
    """False for a key action sent with `?record=0`."""
    return parse_qs(target.partition(b"?")[2].decode("ascii", "replace")).get("record", ["1"])[-1] != "0"


def json_reply(status: int, obj: Any, headers: list[tuple[str, str]] | None = None) -> Reply:
    return Reply(status, JSON, orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS), headers)


def json_error(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> Reply:
    return json_reply(status, {"error": message}, headers)


class UnixSocketServer(H11Server):
    """An H11Server on a Unix socket file at ``path``: its mode and group,
    and the takeover of a socket file a dead process left. The routes are
    a subclass's."""

    name = "ops"
    busy = busy_answer(JSON, b'{"error":"too many ops connections"}')

    def __init__(
        self,
        path: str,
        *,
        mode: int = 0o660,
        group: str | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        super().__init__(Limits(
            max_head=MAX_REQUEST_HEAD, max_body=MAX_REQUEST_BODY, idle_timeout=idle_timeout,
            request_timeout=request_timeout, write_timeout=write_timeout, max_connections=max_connections,
        ))
        self.path = path
        self.mode = mode
        self.group = group or None        # "" (the config default) means no group
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None      # (st_dev, st_ino) of our socket file

    # -- socket file lifecycle ------------------------------------------------

    async def start(self) -> None:
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._bind(sock)
            # Mode and group are set between bind() and listen(): until
            # listen() nobody can connect, so there is no window in which the
            # socket is reachable with the umask's permissions, and the
            # process-wide umask (shared with the usage writer's thread) stays alone.
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            os.chmod(self.path, self.mode)
            if self.group is not None:
                self._chown_group()
            self._closing = False
            self._server = await asyncio.start_unix_server(self.accept, sock=sock)
        except BaseException:
            sock.close()
            self._unlink_own()
            raise
        log.info("ops socket listening on %s (mode %o%s)", self.path, self.mode,
                 f", group {self.group}" if self.group else "")

    async def close(self) -> None:
        """Stop listening, drop open ops connections and remove the socket file."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        await self.close_connections()
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

    def error_reply(self, status: int, message: str) -> Reply:
        return json_error(status, message)


class OpsServer(UnixSocketServer):
    """Serves an OpsHandler on a Unix socket at ``path``."""

    def __init__(self, path: str, handler: OpsHandler, **options: Any) -> None:
        super().__init__(path, **options)
        self.handler = handler

    # -- routes ---------------------------------------------------------------------

    async def dispatch(self, head: h11.Request, body: bytes, peer: str) -> Reply:
        method = head.method.decode("ascii", "replace")
        raw_path = head.target.split(b"?", 1)[0].decode("ascii", "replace")
        segments = raw_path.split("/")[1:] if raw_path.startswith("/") else []
        try:
            if segments == ["stats"]:
                if method != "GET":
                    return json_error(405, "use GET", [("allow", "GET")])
                return json_reply(200, self.handler.stats())
            if segments == ["metrics"]:
                if method != "GET":
                    return json_error(405, "use GET", [("allow", "GET")])
                return Reply(200, PROMETHEUS_CONTENT_TYPE, self.handler.metrics_text().encode("utf-8"))
            if segments == ["live"]:
                # What worker 0's dashboard asks of the other workers (App.live_view).
                if method != "GET":
                    return json_error(405, "use GET", [("allow", "GET")])
                return json_reply(200, self.handler.live())
            if segments == ["reload"]:
                if method != "POST":
                    return json_error(405, "use POST", [("allow", "POST")])
                return await self._reload()
            if segments == ["tokens", "refresh"]:
                # The CLI's word after it changed a token or a limit, so the
                # change is live when the command returns, not a poll later.
                if method != "POST":
                    return json_error(405, "use POST", [("allow", "POST")])
                return json_reply(200, {"generation": await self.handler.refresh_tokens_now()})
            if segments == ["route", "explain"]:
                if method != "GET":
                    return json_error(405, "use GET", [("allow", "GET")])
                return await self._explain_route(head.target)
            if len(segments) == 3 and segments[0] == "keys" and segments[2] in ("enable", "disable"):
                if method != "POST":
                    return json_error(405, "use POST", [("allow", "POST")])
                return await self._set_key_enabled(
                    unquote(segments[1]), segments[2] == "enable", _records(head.target))
            if len(segments) == 3 and segments[0] == "keys" and segments[2] == "reset":
                if method != "POST":
                    return json_error(405, "use POST", [("allow", "POST")])
                return await self._reset_key(unquote(segments[1]), _records(head.target))
        except Exception as exc:
            log.exception("ops %s %s failed", method, raw_path)
            return json_error(500, f"{type(exc).__name__}: {exc}")
        return json_error(404, f"no such ops route: {method} {raw_path}")

    async def _set_key_enabled(self, label: str, enabled: bool, record: bool = True) -> Reply:
        result = self.handler.set_key_enabled(label, enabled, **({} if record else {"record": False}))
        if inspect.isawaitable(result):
            result = await result
        if result is None:
            return json_error(404, f"no key labelled {label!r}")
        # The states after the change: what the operator is told is what the
        # ring now does with the key.
        reply: dict[str, Any] = {
            "label": label, "enabled": enabled, "states": result.states, "stored": result.not_stored is None,
        }
        if result.not_stored is not None:
            reply["warning"] = f"not stored ({result.not_stored}): a restart forgets this change"
        return json_reply(200, reply)

    async def _reset_key(self, label: str, record: bool = True) -> Reply:
        result = await self.handler.reset_key(label, **({} if record else {"record": False}))
        if result is None:
            return json_error(404, f"no key labelled {label!r}")
        reply: dict[str, Any] = {"label": label, "states": result.states, "audited": result.not_audited is None}
        if result.not_audited is not None:
            reply["warning"] = f"not audited ({result.not_audited}): the audit trail misses this reset"
        return json_reply(200, reply)

    async def _explain_route(self, target: bytes) -> Reply:
        query = parse_qs(target.partition(b"?")[2].decode("ascii", "replace"))

        def one(name: str) -> str | None:
            values = query.get(name)
            return values[-1] if values else None

        token_id = one("token_id")
        if token_id is not None and not token_id.isdigit():
            return json_error(400, f"token_id: not a token id: {token_id!r}")
        try:
            answer = await self.handler.explain_route(
                one("model"), one("kind"), int(token_id) if token_id is not None else None, one("user"),
            )
        except LookupError as e:
            return json_error(404, str(e.args[0]) if e.args else "not found")
        return json_reply(200, answer)

    async def _reload(self) -> Reply:
        result = self.handler.reload()
        if inspect.isawaitable(result):
            result = await result
        ok, message = result
        if ok:
            return json_reply(200, {"ok": True, "message": message})
        return json_reply(500, {"ok": False, "error": message})
