"""`hubcore serve` as a real process: SIGTERM drain, SIGHUP reload, the usage
spool across a locked database and a kill -9, the ops socket, live token
changes, sd_notify, and no secret in anything an operator can read."""
from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hubcore.ops import client as opsclient
from tests.fakevendor import OPENAI_KEY, FakeVendor
from tests.hubharness import REPO, eventually, free_port, hubcore_cmd, mint, usage_rows, wait_listening


KEY_ONE = "sk-ant-lifecycle-one"
KEY_TWO = "sk-ant-lifecycle-two"
KEY_NEW = "sk-ant-lifecycle-new"
# The usage writer waits this long for a locked database before it spools
# (server.db_busy_timeout, kept small here); a lock outlasts it to force the spool.
BUSY_TIMEOUT_S = 0.5
SLOW_STREAM = {"x-fake-events": "10", "x-fake-delay-ms": "100"}


@pytest.fixture
def vendor() -> Iterator[FakeVendor]:
    with FakeVendor(keys={KEY_ONE: "ok", KEY_TWO: "ok", KEY_NEW: "ok", OPENAI_KEY: "ok"}) as v:
        yield v




class Serve:
    """One `hubcore serve --config FILE` process (restartable) and its files."""

    def __init__(self, tmp: Path, vendor: FakeVendor, keys: list[tuple[str, str]] | None = None, **server: Any) -> None:
        self.tmp = tmp
        self.vendor = vendor
        self.port = free_port()
        self.db = tmp / "hub.db"
        # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
        self.sock_dir = Path(tempfile.mkdtemp(prefix="hc-", dir="/tmp"))
        self.ops = str(self.sock_dir / "ops.sock")
        self.config = tmp / "hubcore.toml"
        self.log = tmp / "serve.log"
        self.server = {"drain_timeout": 30, "token_reload_interval": 0.1, "usage_flush_interval": 0.05, **server}
        self.proc: subprocess.Popen[bytes] | None = None
        self.write(keys or [("a1", KEY_ONE)])

    def write(self, keys: list[tuple[str, str]], extra: str = "") -> None:
        server = "".join(f"{name} = {orjson.dumps(value).decode()}\n" for name, value in self.server.items())
        anthropic_keys = ", ".join(f'{{ key = "{key}", label = "{label}" }}' for label, key in keys)
        self.config.write_text(
            f'[server]\nlisten = "127.0.0.1:{self.port}"\ndatabase = "{self.db}"\nops_socket = "{self.ops}"\n{server}{extra}\n'
            f'[[upstream]]\nname = "anthropic"\nkind = "anthropic"\nbase_url = "{self.vendor.url}"\nkeys = [{anthropic_keys}]\n\n'
            f'[[upstream]]\nname = "openai"\nkind = "openai"\nbase_url = "{self.vendor.url}"\nkeys = [{{ key = "{OPENAI_KEY}", label = "o1" }}]\n'
            # Not the dashboard's default port, which every hub would share.
            '\n[dashboard]\nlisten = ""\n'
        )

    @staticmethod
    def env(**extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "WATCHDOG_", "HUBCORE_"))}
        env["PYTHONPATH"] = str(REPO)
        env.update(extra)
        return env

    def start(self, wait: bool = True, **env: str) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                hubcore_cmd("serve", "--config", str(self.config)),
                stdout=log, stderr=log, env=self.env(**env), cwd=self.tmp,
            )
        if wait:
            wait_listening(self.port, self.proc)
            eventually(lambda: os.path.exists(self.ops), what="ops socket")
        return self.proc

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 40) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.sock_dir, ignore_errors=True)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            hubcore_cmd(*args, "--config", str(self.config)),
            capture_output=True, text=True, env=self.env(), cwd=self.tmp, timeout=60,
        )

    def stats(self) -> dict[str, Any]:
        return opsclient.get_stats(self.ops)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def rows(self) -> list[dict[str, Any]]:
        return usage_rows(self.db)


@pytest.fixture
def serve_factory(tmp_path: Path, vendor: FakeVendor) -> Iterator[Callable[..., Serve]]:
    made: list[Serve] = []

    def make(keys: list[tuple[str, str]] | None = None, **server: Any) -> Serve:
        s = Serve(tmp_path, vendor, keys, **server)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


# -- requests --------------------------------------------------------------------------

def request(port: int, token: str, headers: dict[str, str] | None = None, *, path: str = "/v1/messages",
            stream: bool = False, model: str = "claude-sonnet-4-6") -> tuple[int, str, list[str]]:
    """POST one request; (status, x-hubcore-request-id, SSE event names or [body])."""
    if path == "/v1/messages":
        body: dict[str, Any] = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    else:
        body = {"model": "gpt-5", "input": "hi"}
    if stream:
        body["stream"] = True
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, orjson.dumps(body), {
            "x-api-key": token, "content-type": "application/json", "anthropic-version": "2023-06-01", **(headers or {}),
        })
        response = conn.getresponse()
        request_id = response.getheader("x-hubcore-request-id") or ""
        if not stream or response.status != 200:
            return response.status, request_id, [response.read().decode()]
        events = []
        while line := response.readline():
            if line.startswith(b"event:"):
                events.append(line[6:].strip().decode())
        return response.status, request_id, events
    finally:
        conn.close()


def assert_complete(results: list[tuple[int, str, list[str]]]) -> None:
    for status, request_id, events in results:
        assert status == 200 and request_id, (status, events)
        assert events[0] == "message_start" and events[-1] in ("message_stop", "response.completed"), events


def assert_no_secrets(*texts: str, secrets: tuple[str, ...]) -> None:
    for text in texts:
        for secret in secrets:
            assert secret not in text, f"a secret ({secret[:6]}…) leaked"


# -- SIGTERM ----------------------------------------------------------------------------

@pytest.mark.parametrize("pooled", [False, True], ids=["fresh", "pooled"])
def test_sigterm_lets_open_streams_finish(serve_factory: Callable[..., Serve], vendor: FakeVendor, pooled: bool) -> None:
    s = serve_factory()
    token = mint(s.db, "drain")
    s.start()
    warm: list[tuple[int, str, list[str]]] = []
    with ThreadPoolExecutor(30) as pool:
        if pooled:
            # Thirty streams open at once leave thirty vendor connections in
            # the pool: the streams below are sent on them, and run in
            # callbacks, with no task for shutdown to wait on, until SIGTERM.
            overlapping = {"x-fake-events": "2", "x-fake-delay-ms": "300"}
            warm = list(pool.map(lambda _: request(s.port, token, overlapping, stream=True), range(30)))
            vendor.wait_for_requests(30, timeout=20)
            vendor.reset()
        futures = [pool.submit(request, s.port, token, SLOW_STREAM, stream=True) for _ in range(30)]
        vendor.wait_for_requests(30, timeout=20)
        s.signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", s.port), timeout=1).close()
            except ConnectionRefusedError:
                return True
            except ConnectionResetError:
                # The kernel took the connection into the listener's backlog
                # just before the hub closed the listener: not accepted either.
                return True
            return False

        eventually(refused, what="stop accepting after SIGTERM")
        assert not all(f.done() for f in futures), "the streams ended before the hub stopped accepting"
        results = [f.result(timeout=60) for f in futures]
    assert s.wait() == 0
    assert_complete(results)
    results += warm
    rows = s.rows()
    assert sorted(r["request_id"] for r in rows) == sorted(r[1] for r in results)
    assert {r["outcome"] for r in rows} == {"ok"}
    assert not os.path.exists(s.ops), "the ops socket file outlived the hub"
    log_text = s.log_text()
    assert "stopped" in log_text
    # One access line per request, flushed before exit.
    for row in rows:
        assert f"access {row['request_id']} user=drain " in log_text


def test_sd_notify_ready_once_listening_reloading_and_stopping(serve_factory: Callable[..., Serve]) -> None:
    s = serve_factory()
    mint(s.db, "notify")
    path = str(s.sock_dir / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(path)
        notify.settimeout(30)

        def until(message: str) -> list[str]:
            seen: list[str] = []
            while message not in seen:
                seen += notify.recv(4096).decode().split("\n")
            return seen

        s.start(wait=False, NOTIFY_SOCKET=path)
        until("READY=1")
        # Not polled: READY promises that the port and the ops socket already listen.
        socket.create_connection(("127.0.0.1", s.port), timeout=2).close()
        assert opsclient.get_stats(s.ops)["in_flight"] == 0
        s.signal(signal.SIGHUP)
        until("RELOADING=1")
        until("READY=1")  # the reload is done
        s.signal(signal.SIGTERM)
        until("STOPPING=1")
    assert s.wait() == 0


# -- the usage spool --------------------------------------------------------------------------

class DatabaseLock:
    """Another process's write lock on the database (root ignores chmod, not locks)."""

    def __init__(self, db: Path) -> None:
        self.conn = sqlite3.connect(db, isolation_level=None)
        self.conn.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        if self.conn is not None:
            self.conn.execute("ROLLBACK")
            self.conn.close()
            self.conn = None  # type: ignore[assignment]


def writer(s: Serve) -> dict[str, Any]:
    stats = s.stats()["writer"]
    assert isinstance(stats, dict)
    return stats


def test_locked_database_spools_then_replays(serve_factory: Callable[..., Serve]) -> None:
    s = serve_factory(db_busy_timeout=BUSY_TIMEOUT_S)
    token = mint(s.db, "spool")
    s.start()
    before = [request(s.port, token)[1] for _ in range(5)]
    eventually(lambda: len(s.rows()) == 5, what="first rows")
    lock = DatabaseLock(s.db)
    try:
        during = [request(s.port, token)[1] for _ in range(10)]  # the request path never waits on the database
        eventually(lambda: writer(s)["spooled"] >= 10, timeout=BUSY_TIMEOUT_S + 10, what="rows spooled")
        during += [request(s.port, token)[1] for _ in range(10)]
        eventually(lambda: writer(s)["spooled"] == 20, what="later rows spooled directly")
        assert writer(s)["written"] == 5
        assert writer(s)["last_error"]
    finally:
        lock.release()
    eventually(lambda: writer(s)["spool_pending"] == 0, timeout=15, what="spool replayed")
    stats = writer(s)
    assert (stats["spooled"], stats["replayed"], stats["written"]) == (20, 20, 5)
    rows = s.rows()
    assert sorted(r["request_id"] for r in rows) == sorted(before + during), "none lost, none twice"
    s.signal(signal.SIGTERM)
    assert s.wait() == 0


def test_rows_spooled_before_kill_9_are_replayed_on_restart(serve_factory: Callable[..., Serve]) -> None:
    s = serve_factory(db_busy_timeout=BUSY_TIMEOUT_S)
    token = mint(s.db, "crash")
    s.start()
    lock = DatabaseLock(s.db)
    try:
        sent = [request(s.port, token)[1] for _ in range(8)]
        eventually(lambda: writer(s)["spooled"] == 8 and writer(s)["queue_depth"] == 0,
                   timeout=BUSY_TIMEOUT_S + 10, what="rows spooled")
        assert s.proc is not None
        s.proc.kill()
        s.wait()
    finally:
        lock.release()
    assert s.rows() == []
    spool = Path(str(s.db) + ".spool")
    assert len(spool.read_bytes().splitlines()) == 8
    s.start()  # also takes over the stale ops socket the killed process left
    eventually(lambda: len(s.rows()) == 8, what="replay on start")
    assert sorted(r["request_id"] for r in s.rows()) == sorted(sent)
    assert writer(s)["replayed"] == 8
    s.signal(signal.SIGTERM)
    assert s.wait() == 0
    assert spool.stat().st_size == 0


# -- the ops socket ------------------------------------------------------------------------

def test_ops_socket_stats_metrics_and_keys(serve_factory: Callable[..., Serve], vendor: FakeVendor) -> None:
    s = serve_factory(keys=[("a1", KEY_ONE), ("a2", KEY_TWO)])
    token = mint(s.db, "ops")
    s.start()
    assert stat.S_IMODE(os.stat(s.ops).st_mode) == 0o660

    answers = [request(s.port, token) for _ in range(6)]
    answers += [request(s.port, token, stream=True) for _ in range(3)]
    answers += [request(s.port, token, {"x-fake-status": "400"}) for _ in range(2)]
    answers += [request(s.port, "hc-not-a-token")]
    answers += [request(s.port, token, path="/v1/responses", stream=True) for _ in range(4)]
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
    conn.request("GET", "/")
    assert conn.getresponse().status == 200
    conn.close()
    assert [a[0] for a in answers] == [200] * 9 + [400] * 2 + [401] + [200] * 4
    expected = Counter({
        ("/v1/messages", 200, "ok"): 9, ("/v1/messages", 400, "upstream_error"): 2,
        ("/v1/messages", 401, "refused"): 1, ("/v1/responses", 200, "ok"): 4, ("/", 200, "ok"): 1,
    })
    total = sum(expected.values())

    stats = eventually(lambda: (st := s.stats())["requests"]["total"] == total and st["writer"]["written"] == 15 and st,
                       what="stats caught up")
    by_route = Counter({(r["route"], r["status"], r["outcome"]): r["count"] for r in stats["requests"]["by_route"]})
    assert by_route == expected
    assert stats["requests"]["by_outcome"] == {"ok": 14, "upstream_error": 2, "refused": 1}
    assert stats["in_flight"] == 0
    assert stats["tokens_loaded"] == 1
    keys = {k["label"]: k for k in stats["keys"]["anthropic"]}
    assert set(keys) == {"a1", "a2"}
    assert sum(k["requests"] for k in keys.values()) == 11
    assert vendor.hits[KEY_ONE] + vendor.hits[KEY_TWO] == 11

    status, body = opsclient.fetch(s.ops, "/metrics")
    assert status == 200
    metrics_text = body.decode()
    families = {f.name: f for f in text_string_to_metric_families(metrics_text)}
    requests_total = Counter({
        (x.labels["route"], int(x.labels["status"]), x.labels["outcome"]): int(x.value)
        for x in families["hubcore_requests"].samples if x.name == "hubcore_requests_total"
    })
    assert requests_total == expected
    (count,) = [x.value for x in families["hubcore_request_duration_seconds"].samples if x.name.endswith("_count")]
    assert count == total
    key_requests = {x.labels["key"]: x.value for x in families["hubcore_key_requests"].samples}
    assert key_requests["a1"] + key_requests["a2"] == 11

    cli_stats = s.cli("stats", "--json")
    assert cli_stats.returncode == 0, cli_stats.stderr
    assert orjson.loads(cli_stats.stdout)["requests"]["total"] == total
    listed = s.cli("keys", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {k["label"] for k in orjson.loads(listed.stdout)} == {"a1", "a2", "o1"}

    disabled = s.cli("keys", "disable", "a1")
    assert disabled.returncode == 0, disabled.stderr
    hits = vendor.hits
    assert all(request(s.port, token)[0] == 200 for _ in range(8))
    assert vendor.hits[KEY_ONE] == hits[KEY_ONE]
    assert vendor.hits[KEY_TWO] == hits[KEY_TWO] + 8
    states = {k["label"]: k["state"] for k in orjson.loads(s.cli("keys", "--json").stdout)}
    assert states["a1"] == "disabled" and states["a2"] == "healthy"
    assert s.cli("keys", "disable", "no-such-key").returncode != 0

    s.signal(signal.SIGTERM)
    assert s.wait() == 0
    log = s.log_text()
    assert answers[0][1] in log, "the access log names each request"
    assert_no_secrets(
        orjson.dumps(stats).decode(), metrics_text, log, cli_stats.stdout, listed.stdout,
        secrets=(token, KEY_ONE, KEY_TWO, OPENAI_KEY),
    )


# -- SIGHUP ------------------------------------------------------------------------------------

def test_serve_runs_the_collectors_full_collections_on_its_own_schedule(serve_factory: Callable[..., Serve]) -> None:
    s = serve_factory(gc_full_interval=0.2)
    token = mint(s.db, "gc")
    s.start()
    assert [request(s.port, token)[0] for _ in range(3)] == [200] * 3
    gc_stats = eventually(lambda: (g := s.stats()["gc"])["full_collections"] >= 2 and g, what="two full collections")
    assert gc_stats["scheduled"] is True
    assert gc_stats["frozen_objects"] > 1000  # what startup made: modules, config, tables
    assert gc_stats["last_full_collection_ms"] is not None
    shown = s.cli("stats")
    assert shown.returncode == 0 and "gc            frozen" in shown.stdout
    status, body = opsclient.fetch(s.ops, "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    (scheduled,) = families["hubcore_gc_scheduled_full_collections"].samples
    assert scheduled.value >= 2
    s.signal(signal.SIGTERM)
    assert s.wait() == 0

    plain = serve_factory(gc_full_interval=0)  # the first has stopped: its files are reused
    plain.start()
    gc_stats = plain.stats()["gc"]
    assert gc_stats["scheduled"] is False and gc_stats["frozen_objects"] == 0


def test_sighup_during_open_streams_applies_new_key_and_rejects_broken_config(
    serve_factory: Callable[..., Serve], vendor: FakeVendor
) -> None:
    s = serve_factory(keys=[("a1", KEY_ONE)])
    token = mint(s.db, "reload")
    s.start()
    slow = {"x-fake-events": "20", "x-fake-delay-ms": "60"}
    with ThreadPoolExecutor(50) as pool:
        futures = [pool.submit(request, s.port, token, slow, stream=True) for _ in range(50)]
        vendor.wait_for_requests(50, timeout=20)
        s.write([("a2", KEY_NEW)])
        s.signal(signal.SIGHUP)
        eventually(lambda: "configuration reloaded" in s.log_text(), what="reload logged")
        assert not all(f.done() for f in futures), "the streams ended before the reload"
        results = [f.result(timeout=60) for f in futures]
    assert_complete(results)
    assert vendor.hits[KEY_ONE] == 50
    assert all(request(s.port, token)[0] == 200 for _ in range(5))
    assert vendor.hits[KEY_NEW] == 5 and vendor.hits[KEY_ONE] == 50
    assert [k["label"] for k in s.stats()["keys"]["anthropic"]] == ["a2"]

    s.write([("a3", KEY_TWO)], extra="no_such_setting = 1\n")
    s.signal(signal.SIGHUP)
    eventually(lambda: "reload rejected" in s.log_text(), what="rejection logged")
    assert "no_such_setting" in s.log_text()
    assert all(request(s.port, token)[0] == 200 for _ in range(3))
    assert vendor.hits[KEY_NEW] == 8 and vendor.hits[KEY_TWO] == 0
    assert [k["label"] for k in s.stats()["keys"]["anthropic"]] == ["a2"]

    s.signal(signal.SIGTERM)
    assert s.wait() == 0
    rows = s.rows()
    assert len(rows) == 58 and {r["outcome"] for r in rows} == {"ok"}
    assert Counter(r["key_label"] for r in rows) == {"a1": 50, "a2": 8}
    assert_no_secrets(s.log_text(), secrets=(token, KEY_ONE, KEY_TWO, KEY_NEW, OPENAI_KEY))


# -- tokens ------------------------------------------------------------------------------------

def test_token_created_and_revoked_by_the_cli_apply_within_a_second(serve_factory: Callable[..., Serve]) -> None:
    s = serve_factory()
    mint(s.db, "someone-else")
    s.start()
    created = s.cli("token", "create", "--user", "late", "--json")
    assert created.returncode == 0, created.stderr
    made = orjson.loads(created.stdout)
    token = made["token"]
    eventually(lambda: request(s.port, token)[0] == 200, timeout=1.0, what="new token accepted")

    revoked = s.cli("token", "revoke", str(made["id"]))
    assert revoked.returncode == 0, revoked.stderr
    eventually(lambda: request(s.port, token)[0] in (401, 403), timeout=1.0, what="revoked token refused")
    s.signal(signal.SIGTERM)
    assert s.wait() == 0
    assert_no_secrets(s.log_text(), secrets=(token, KEY_ONE, OPENAI_KEY))
