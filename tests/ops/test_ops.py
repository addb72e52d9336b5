"""The ops endpoint over a real Unix socket, and the CLI client against it."""
from __future__ import annotations

import argparse
import asyncio
import grp
import io
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from hubcore.ops import client as opsclient
from hubcore.ops.metrics import HubMetrics
from hubcore.ops.server import MAX_REQUEST_BODY, MAX_REQUEST_HEAD, KeySwitched, OpsServer

GET_STATS = b"GET /stats HTTP/1.1\r\nhost: x\r\n\r\n"
GET_STATS_CLOSE = b"GET /stats HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
GET_METRICS_CLOSE = b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
MALFORMED = b"GARBAGE\x00 NOT HTTP\r\n\r\n"

REPO = Path(__file__).resolve().parents[2]


class FakeHub:
    """An OpsHandler over a real HubMetrics and an in-memory key list."""

    def __init__(self) -> None:
        self.metrics = HubMetrics()
        self.metrics.connection_opened()
        self.metrics.request_started()
        self.metrics.request_finished("/v1/messages", 200, "ok", 1.5, 0.3)
        self.metrics.observe_hub_added(0.0002)
        self.enabled = {"a": True, "team/b": True}
        self.reload_result: tuple[bool, str] = (True, "reloaded 3 tokens, 2 keys")
        self.reload_async = False
        self.reloads = 0
        self.fail_stats = False
        # Why the next key switch cannot be stored, or None.
        self.not_stored: str | None = None

    def _keys(self) -> dict[str, list[dict[str, Any]]]:
        return {"anthropic": [
            {"label": label, "state": "healthy" if on else "disabled", "until": None,
             "consecutive_failures": 0, "in_flight": 0, "requests": 5, "rate_limited": 0,
             "errors": 0, "last_error": None, "priority": 0, "weight": 1,
             "workspace": "ws-1", "org": "org-1"}
            for label, on in self.enabled.items()]}

    def stats(self) -> dict[str, Any]:
        if self.fail_stats:
            raise RuntimeError("stats exploded")
        return self.metrics.snapshot(self._keys(), {"queue_depth": 0, "written": 1}, 2, "0.1.0")

    def metrics_text(self) -> str:
        return self.metrics.render_prometheus(self._keys(), {"queue_depth": 0}, 2, "0.1.0")

    def reload(self) -> Any:
        self.reloads += 1
        if self.reload_async:
            async def later() -> tuple[bool, str]:
                await asyncio.sleep(0)
                return self.reload_result
            return later()
        return self.reload_result

    def set_key_enabled(self, label: str, enabled: bool) -> KeySwitched | None:
        if label not in self.enabled:
            return None
        self.enabled[label] = enabled
        return KeySwitched({"anthropic": "healthy" if enabled else "disabled"}, self.not_stored)


@pytest.fixture
def hub() -> FakeHub:
    return FakeHub()


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "ops.sock")


@pytest.fixture
async def server(hub: FakeHub, sock_path: str) -> AsyncIterator[OpsServer]:
    srv = OpsServer(sock_path, hub, idle_timeout=2.0, request_timeout=2.0)
    await srv.start()
    yield srv
    await srv.close()


async def fetch(path: str, sock: str, method: str = "GET") -> tuple[int, bytes]:
    return await asyncio.to_thread(opsclient.fetch, sock, path, method)


async def raw(sock: str, data: bytes) -> bytes:
    """Send bytes, read until the server closes."""
    reader, writer = await asyncio.open_unix_connection(sock)
    try:
        writer.write(data)
        async with asyncio.timeout(5):
            return await reader.read(-1)
    finally:
        writer.close()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def body_of(response: bytes) -> Any:
    return orjson.loads(response.split(b"\r\n\r\n", 1)[1])


# -- routes -------------------------------------------------------------------------------

async def test_stats_is_the_handlers_json(server: OpsServer, hub: FakeHub) -> None:
    status, body = await fetch("/stats", server.path)
    assert status == 200
    stats = orjson.loads(body)
    assert stats["requests"]["total"] == 1
    assert [k["label"] for k in stats["keys"]["anthropic"]] == ["a", "team/b"]
    response = await raw(server.path, GET_STATS_CLOSE)
    assert b"\r\ncontent-type: application/json\r\n" in response.lower()


async def test_metrics_is_prometheus_text(server: OpsServer) -> None:
    response = await raw(server.path, GET_METRICS_CLOSE)
    head, _, body = response.partition(b"\r\n\r\n")
    assert status_of(response) == 200
    assert b"content-type: text/plain; version=0.0.4; charset=utf-8" in head.lower()
    assert b"hubcore_requests_total{" in body
    assert b'hubcore_key_state{upstream="anthropic",key="team/b",state="healthy"} 1' in body


@pytest.mark.parametrize("is_async", [False, True])
async def test_reload(server: OpsServer, hub: FakeHub, is_async: bool) -> None:
    hub.reload_async = is_async
    status, body = await fetch("/reload", server.path, "POST")
    assert (status, orjson.loads(body)) == (200, {"ok": True, "message": "reloaded 3 tokens, 2 keys"})
    hub.reload_result = (False, "config: upstream[0].keys[1]: file not found")
    status, body = await fetch("/reload", server.path, "POST")
    assert status == 500
    assert orjson.loads(body) == {"ok": False, "error": "config: upstream[0].keys[1]: file not found"}
    assert hub.reloads == 2


async def test_enable_disable_keys(server: OpsServer, hub: FakeHub) -> None:
    status, body = await fetch("/keys/a/disable", server.path, "POST")
    assert (status, orjson.loads(body)) == (
        200, {"label": "a", "enabled": False, "states": {"anthropic": "disabled"}, "stored": True})
    assert hub.enabled["a"] is False
    status, _ = await fetch("/keys/team%2Fb/disable", server.path, "POST")
    assert status == 200 and hub.enabled["team/b"] is False
    status, _ = await fetch("/keys/a/enable", server.path, "POST")
    assert status == 200 and hub.enabled["a"] is True
    status, body = await fetch("/keys/nope/enable", server.path, "POST")
    assert status == 404 and "nope" in orjson.loads(body)["error"]


async def test_a_key_switch_the_hub_could_not_store_says_so(server: OpsServer, hub: FakeHub,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    hub.not_stored = "database is locked"
    status, body = await fetch("/keys/a/disable", server.path, "POST")
    reply = orjson.loads(body)
    assert status == 200 and reply["stored"] is False and reply["states"] == {"anthropic": "disabled"}
    assert reply["warning"] == "not stored (database is locked): a restart forgets this change"
    assert await asyncio.to_thread(opsclient.run_keys, keys_args(server.path, "enable", "a")) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "key a enabled: anthropic healthy"
    assert err.strip() == ("hubcore: warning: key a enabled but not stored (database is locked): "
                           "a restart forgets this change")


@pytest.mark.parametrize("method, path, expected", [
    ("GET", "/nowhere", 404),
    ("GET", "/keys/a", 404),
    ("GET", "/keys/a/explode", 404),
    ("GET", "/", 404),
    ("POST", "/stats", 405),
    ("DELETE", "/metrics", 405),
    ("GET", "/reload", 405),
    ("GET", "/keys/a/disable", 405),
])
async def test_unknown_routes_and_wrong_methods(server: OpsServer, hub: FakeHub,
                                                method: str, path: str, expected: int) -> None:
    status, body = await fetch(path, server.path, method)
    assert status == expected
    assert isinstance(orjson.loads(body)["error"], str)
    assert hub.enabled == {"a": True, "team/b": True}


async def test_wrong_method_names_the_allowed_one(server: OpsServer) -> None:
    response = await raw(server.path, b"GET /reload HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert status_of(response) == 405
    assert b"\r\nallow: POST\r\n" in response
    assert response.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")


async def test_handler_failure_is_a_500_and_the_server_goes_on(server: OpsServer, hub: FakeHub) -> None:
    hub.fail_stats = True
    status, body = await fetch("/stats", server.path)
    assert status == 500 and "stats exploded" in orjson.loads(body)["error"]
    hub.fail_stats = False
    assert (await fetch("/stats", server.path))[0] == 200


# -- connection handling ----------------------------------------------------------------------

async def test_keep_alive_serves_several_requests_on_one_connection(server: OpsServer) -> None:
    response = await raw(server.path, GET_STATS + GET_STATS + GET_STATS_CLOSE)
    assert response.count(b"HTTP/1.1 200 ") == 3


async def test_malformed_request_gets_400_and_close(server: OpsServer) -> None:
    response = await raw(server.path, MALFORMED + GET_STATS)
    assert status_of(response) == 400
    assert response.count(b"HTTP/1.1") == 1          # the pipelined request is not served
    assert "error" in body_of(response)
    assert (await fetch("/stats", server.path))[0] == 200


async def test_oversized_head_and_body_are_refused(server: OpsServer) -> None:
    huge_head = b"GET /stats HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * MAX_REQUEST_HEAD + b"\r\n\r\n"
    assert status_of(await raw(server.path, huge_head)) == 431
    declared = (b"POST /reload HTTP/1.1\r\nhost: x\r\ncontent-length: "
                + str(MAX_REQUEST_BODY + 1).encode() + b"\r\n\r\n")
    assert status_of(await raw(server.path, declared)) == 413
    chunked = (b"POST /reload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
               + (b"400\r\n" + b"b" * 0x400 + b"\r\n") * 5 + b"0\r\n\r\n")
    assert status_of(await raw(server.path, chunked)) == 413
    assert (await fetch("/stats", server.path))[0] == 200


async def test_idle_and_slow_clients_are_timed_out(hub: FakeHub, sock_path: str) -> None:
    srv = OpsServer(sock_path, hub, idle_timeout=0.2, request_timeout=0.2)
    await srv.start()
    try:
        # idle: closed without a response
        assert await raw(sock_path, b"") == b""
        # slow: half a request, then nothing
        response = await raw(sock_path, b"GET /stats HTTP/1.1\r\nhos")
        assert status_of(response) == 408
        # a kept-alive connection is closed once idle after its first answer
        response = await raw(sock_path, GET_STATS)
        assert response.count(b"HTTP/1.1 200 ") == 1
    finally:
        await srv.close()


async def test_connection_limit_answers_503(hub: FakeHub, sock_path: str) -> None:
    srv = OpsServer(sock_path, hub, max_connections=1)
    await srv.start()
    try:
        reader, writer = await asyncio.open_unix_connection(sock_path)
        writer.write(GET_STATS)           # keep-alive: the connection stays open
        async with asyncio.timeout(5):
            await reader.readuntil(b"\r\n\r\n")
        response = await raw(sock_path, GET_STATS_CLOSE)
        assert status_of(response) == 503
        writer.close()
    finally:
        await srv.close()


async def test_close_drops_open_connections_and_removes_the_socket(hub: FakeHub, sock_path: str) -> None:
    srv = OpsServer(sock_path, hub, idle_timeout=60.0)
    await srv.start()
    reader, writer = await asyncio.open_unix_connection(sock_path)
    writer.write(GET_STATS)
    async with asyncio.timeout(5):
        await reader.readuntil(b"\r\n\r\n")
        await srv.close()                 # must not wait for the idle client
        assert await reader.read(-1) is not None
    writer.close()
    assert not os.path.exists(sock_path)


# -- the socket file ------------------------------------------------------------------------

async def test_socket_mode_and_group(hub: FakeHub, sock_path: str) -> None:
    gid = os.getgid()
    group = grp.getgrgid(gid).gr_name
    for mode, grp_arg in ((0o660, None), (0o600, group), (0o660, str(gid))):
        srv = OpsServer(sock_path, hub, mode=mode, group=grp_arg)
        await srv.start()
        try:
            st = os.stat(sock_path)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == mode
            assert st.st_gid == gid
        finally:
            await srv.close()


async def test_group_chown_only_when_needed(hub: FakeHub, sock_path: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*args: object) -> None:   # as under SystemCallFilter=~@privileged
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "chown", denied)
    srv = OpsServer(sock_path, hub, group=str(os.getgid()))
    await srv.start()                     # the socket already has the process's group
    await srv.close()
    other = 65534 if os.getgid() != 65534 else 0
    with pytest.raises(PermissionError, match="must be a member"):
        await OpsServer(sock_path, hub, group=str(other)).start()
    assert not os.path.exists(sock_path)


async def test_default_mode_is_0660(server: OpsServer) -> None:
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o660


async def test_unknown_group_fails_and_leaves_no_socket(hub: FakeHub, sock_path: str) -> None:
    srv = OpsServer(sock_path, hub, group="no-such-group-hubcore-test")
    with pytest.raises(LookupError, match="no-such-group-hubcore-test"):
        await srv.start()
    assert not os.path.exists(sock_path)


async def test_stale_socket_is_replaced(hub: FakeHub, sock_path: str) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(sock_path)
    dead.close()                           # the file stays, as after a kill -9
    assert os.path.exists(sock_path)
    srv = OpsServer(sock_path, hub)
    await srv.start()
    try:
        assert (await fetch("/stats", sock_path))[0] == 200
    finally:
        await srv.close()
    assert not os.path.exists(sock_path)


async def test_live_socket_and_regular_file_are_not_replaced(server: OpsServer, hub: FakeHub,
                                                             tmp_path: Path) -> None:
    with pytest.raises(FileExistsError, match="another process"):
        await OpsServer(server.path, hub).start()
    assert (await fetch("/stats", server.path))[0] == 200
    regular = tmp_path / "not-a-socket"
    regular.write_text("keep me")
    with pytest.raises(FileExistsError, match="not a socket"):
        await OpsServer(str(regular), hub).start()
    assert regular.read_text() == "keep me"


async def test_bind_errors_name_the_path(hub: FakeHub, tmp_path: Path) -> None:
    missing_dir = str(tmp_path / "no-such-dir" / "ops.sock")
    with pytest.raises(FileNotFoundError, match="cannot bind the ops socket") as info:
        await OpsServer(missing_dir, hub).start()
    assert missing_dir in str(info.value)
    too_long = str(tmp_path / ("x" * 120))
    with pytest.raises(OSError, match="cannot bind the ops socket"):
        await OpsServer(too_long, hub).start()


async def test_close_leaves_a_newer_socket_alone(hub: FakeHub, sock_path: str) -> None:
    old = OpsServer(sock_path, hub)
    await old.start()
    os.unlink(sock_path)                   # a newer hub took the path over
    newer = OpsServer(sock_path, hub)
    await newer.start()
    try:
        await old.close()
        assert os.path.exists(sock_path)
        assert (await fetch("/stats", sock_path))[0] == 200
    finally:
        await newer.close()
    assert not os.path.exists(sock_path)


# -- the CLI client ----------------------------------------------------------------------------

def stats_args(sock: str, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    opsclient.add_stats_arguments(parser)
    return parser.parse_args(["--socket", sock, *argv])


def keys_args(sock: str, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    opsclient.add_keys_arguments(parser)
    return parser.parse_args(["--socket", sock, *argv])


async def test_run_stats_json_and_text(server: OpsServer, hub: FakeHub,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert await asyncio.to_thread(opsclient.run_stats, stats_args(server.path, "--json")) == 0
    printed = orjson.loads(capsys.readouterr().out)
    assert printed["requests"]["total"] == 1
    assert printed["keys"]["anthropic"][1]["label"] == "team/b"

    assert await asyncio.to_thread(opsclient.run_stats, stats_args(server.path)) == 0
    text = capsys.readouterr().out
    assert "hubcore 0.1.0" in text
    assert "requests 1," in text
    assert "200 1" in text and "ok 1" in text
    assert "team/b" in text and "ws-1" in text
    for column in ("P50", "P90", "P99", "hub added"):
        assert column in text


async def test_run_keys_lists_and_toggles(server: OpsServer, hub: FakeHub,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert await asyncio.to_thread(opsclient.run_keys, keys_args(server.path, "--json")) == 0
    rows = orjson.loads(capsys.readouterr().out)
    assert [(r["upstream"], r["label"]) for r in rows] == [("anthropic", "a"), ("anthropic", "team/b")]

    assert await asyncio.to_thread(opsclient.run_keys, keys_args(server.path, "disable", "team/b")) == 0
    assert capsys.readouterr().out.strip() == "key team/b disabled: anthropic disabled"
    assert hub.enabled["team/b"] is False
    assert await asyncio.to_thread(opsclient.run_keys, keys_args(server.path, "enable", "zzz")) == 1
    assert "zzz" in capsys.readouterr().err
    assert await asyncio.to_thread(opsclient.run_keys, keys_args(server.path, "enable")) == 2

    assert await asyncio.to_thread(opsclient.run_keys, keys_args(server.path)) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "upstream anthropic: 2 keys"
    assert table[1].startswith("  KEY ")
    state_col = table[1].index("STATE")
    assert [line[state_col:].split()[0] for line in table[2:]] == ["healthy", "disabled"]


async def test_run_reload_reports_failure(server: OpsServer, hub: FakeHub,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(socket=server.path)
    assert await asyncio.to_thread(opsclient.run_reload, args) == 0
    assert "reloaded 3 tokens" in capsys.readouterr().out
    hub.reload_result = (False, "bad config")
    assert await asyncio.to_thread(opsclient.run_reload, args) == opsclient.EXIT_FAILED
    assert "bad config" in capsys.readouterr().err


def test_missing_socket_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "absent.sock")
    assert opsclient.run_stats(stats_args(missing)) == opsclient.EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert "no ops socket at" in err and missing in err
    with pytest.raises(opsclient.OpsClientError) as info:
        opsclient.fetch(missing, "/stats")
    assert info.value.exit_code == opsclient.EXIT_UNAVAILABLE


def test_stale_socket_is_a_clear_error(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()
    with pytest.raises(opsclient.OpsClientError, match="nothing is listening"):
        opsclient.fetch(path, "/stats")


async def test_permission_denied_is_a_clear_error(server: OpsServer) -> None:
    if os.geteuid() != 0:
        os.chmod(server.path, 0o000)
        with pytest.raises(opsclient.OpsClientError, match="permission denied") as info:
            await asyncio.to_thread(opsclient.fetch, server.path, "/stats")
        assert info.value.exit_code == opsclient.EXIT_NOPERM
        return
    # root connects anywhere: a child drops to nobody once Python and hubcore are loaded
    code = ("import argparse, os, sys; from hubcore.ops import client as opsclient; "
            "os.setgroups([]); os.setgid(65534); os.setuid(65534); "
            "sys.exit(opsclient.run_stats(argparse.Namespace(socket=sys.argv[1], json=False, watch=None)))")
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", code, server.path],
        capture_output=True, text=True, timeout=60, cwd=str(REPO))
    assert proc.returncode == opsclient.EXIT_NOPERM, proc.stderr
    assert "permission denied on " + server.path in proc.stderr


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_watch_redraws_in_place(server: OpsServer) -> None:
    out = FakeTTY()
    code = await asyncio.to_thread(opsclient.watch, server.path, 0.01, out=out, iterations=2)
    assert code == 0
    text = out.getvalue()
    assert text.startswith("\x1b[2J")
    assert text.count("\x1b[H") == 2 and text.count("\x1b[J") == 2
    assert text.count("hubcore 0.1.0") == 2


async def test_watch_survives_an_unreachable_hub(tmp_path: Path) -> None:
    out = io.StringIO()
    missing = str(tmp_path / "absent.sock")
    code = await asyncio.to_thread(opsclient.watch, missing, 0.01, out=out, iterations=2)
    assert code == 0
    text = out.getvalue()
    assert "\x1b" not in text                 # not a terminal: plain frames
    assert text.count("no ops socket at") == 2


def test_watch_interval_must_be_positive() -> None:
    parser = argparse.ArgumentParser()
    opsclient.add_stats_arguments(parser)
    assert parser.parse_args(["--watch"]).watch == opsclient.DEFAULT_WATCH_INTERVAL
    assert parser.parse_args(["--watch", "0.5"]).watch == 0.5
    assert parser.parse_args([]).watch is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--watch", "0"])


def test_socket_resolution_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(opsclient.OPS_SOCKET_ENV, raising=False)
    assert opsclient.resolve_socket(None) == opsclient.DEFAULT_OPS_SOCKET
    assert opsclient.resolve_socket(None, "/cfg.sock") == "/cfg.sock"
    monkeypatch.setenv(opsclient.OPS_SOCKET_ENV, "/env.sock")
    assert opsclient.resolve_socket(None, "/cfg.sock") == "/env.sock"
    assert opsclient.resolve_socket("/flag.sock", "/cfg.sock") == "/flag.sock"


def test_format_helpers() -> None:
    assert opsclient.format_duration(None) == "-"
    assert opsclient.format_duration(0.000085) == "85us"
    assert opsclient.format_duration(0.0123) == "12.3ms"
    assert opsclient.format_duration(0.00231) == "2.31ms"
    assert opsclient.format_duration(0.5) == "500ms"
    assert opsclient.format_duration(42.0) == "42.0s"
    assert opsclient.format_duration(2.414) == "2.41s"
    assert opsclient.format_duration(210.0) == "3.5m"
    assert opsclient.format_uptime(3 * 86400 + 4 * 3600 + 5 * 60 + 6) == "3d 04:05:06"
    assert opsclient.format_uptime(59) == "00:00:59"
    now = time.time()
    table = opsclient.format_keys([
        {"upstream": "anthropic", "label": "a", "state": "cooling", "until": now + 12.2,
         "requests": 12345, "last_error": "x" * 100},
        {"upstream": "openai", "label": "long-label-here", "state": "healthy", "requests": 7},
        {"upstream": "anthropic", "label": "b", "state": "healthy", "requests": 7},
    ], now=now).splitlines()
    # Grouped under their upstream, in the order the upstreams first come.
    assert table[0] == "upstream anthropic: 2 keys"
    assert table[4] == "" and table[5] == "upstream openai: 1 key"
    header, a, b = table[1:4]
    assert " 12s " in a
    assert a.endswith("x" * 57 + "...")
    requests_end = header.index("REQUESTS") + len("REQUESTS")
    assert a[:requests_end].endswith("12345") and b[:requests_end].endswith("7")
    assert table[7][:table[6].index("REQUESTS") + len("REQUESTS")].endswith("7")
    assert opsclient.format_keys([]) == "no vendor keys loaded"


def test_the_key_table_shows_headroom_and_rests_per_model_class() -> None:
    now = 1_800_000_000.0
    resets = now + 30
    clock = time.strftime("%H:%M:%S", time.localtime(resets))
    week = now + 5 * 86400
    table = opsclient.format_keys([
        {"upstream": "anthropic", "label": "a", "state": "healthy",
         "headroom": {"sonnet": {"remaining": 0.62, "limit": "tokens", "resets": resets},
                      "opus": {"remaining": 0.004, "limit": "requests", "resets": resets},
                      "": {"remaining": 0.5, "limit": "unified-7d", "resets": week}},
         "rests": {"opus": now + 25.4}},
        {"upstream": "anthropic", "label": "b", "state": "healthy", "headroom": {}, "rests": {}},
    ], now=now).splitlines()
    room = table[1].index("HEADROOM")
    a, b = table[2][room:], table[3][room:]
    assert a.split("  ")[0] == (
        f"any model 50% (unified-7d, resets {time.strftime('%Y-%m-%d %H:%M', time.localtime(week))}); "
        f"opus 0.4% (requests, resets {clock}); sonnet 62% (tokens, resets {clock}); opus resting 25s"
    )
    assert b.split()[0] == "-"


def test_tables_escape_control_characters() -> None:
    table = opsclient.format_keys([
        {"upstream": "anthropic", "label": "evil\nlabel", "state": "dead",
         "last_error": "\x1b[2Jvendor said no"},
    ])
    lines = table.splitlines()
    assert len(lines) == 3
    assert "\x1b" not in table
    assert "evil\\nlabel" in lines[2] and "\\x1b[2Jvendor said no" in lines[2]
    headroom = opsclient.format_keys([
        {"upstream": "up\x1b[2J", "label": "a", "state": "healthy",
         "headroom": {"\x1b[2Jm": {"remaining": 0.5, "limit": "tokens\n", "resets": time.time() + 5}}},
    ])
    assert "\x1b" not in headroom and len(headroom.splitlines()) == 3
