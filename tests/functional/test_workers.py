"""[server] workers = 2 as real processes: `hubcore serve` supervising two
`hubcore serve` workers on one port (SO_REUSEPORT), sharing a real
redis-server and one database. Both serve; the supervisor's ops socket sums
them; SIGHUP and key actions reach each; a worker killed or stuck is started
again while the other keeps the port; SIGTERM drains both and every usage
row lands; systemd hears READY once both listen, and only from the
supervisor."""
from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hubcore import store
from hubcore.governance import admins
from hubcore.ops import client as opsclient
from tests.fakevendor import FakeVendor
from tests.hubharness import REPO, eventually, free_port, hubcore_cmd, usage_rows
from tests.pgserver import PASSWORD, PASSWORD_ENV, PgDatabase, pg_server_database
from tests.servers import RedisServer


KEY_ONE = "sk-ant-workers-one"
KEY_TWO = "sk-ant-workers-two"
START_TIMEOUT = 60.0  # s for a supervisor and its workers to answer (a loaded 2-core machine)


@pytest.fixture
def vendor() -> Iterator[FakeVendor]:
    with FakeVendor(keys={KEY_ONE: "ok", KEY_TWO: "ok"}) as v:
        yield v




class Workers:
    """One `hubcore serve` with [server] workers = 2, its files and its log."""

    def __init__(self, tmp: Path, vendor: FakeVendor, redis: RedisServer | None, *, database: str | None = None,
                 keys: list[tuple[str, str]] | None = None, dashboard: str = "", **server: Any) -> None:
        self.tmp = tmp
        self.vendor = vendor
        self.redis = redis
        self.port = free_port()
        self.db = database or str(tmp / "hub.db")
        # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
        self.sock_dir = Path(tempfile.mkdtemp(prefix="hc-w-", dir="/tmp"))
        self.ops = str(self.sock_dir / "ops.sock")
        self.config = tmp / "hubcore.toml"
        self.log = tmp / "serve.log"
        self.server = {"workers": 2, "token_reload_interval": 0.1, "usage_flush_interval": 0.05,
                       "drain_timeout": 20, "spool": str(tmp / "usage.spool"), **server}
        self.proc: subprocess.Popen[bytes] | None = None
        self.dashboard = dashboard  # its listen address; "": none
        self.write(keys or [("a1", KEY_ONE)])

    def write(self, keys: list[tuple[str, str]]) -> None:
        server = "".join(f"{name} = {orjson.dumps(value).decode()}\n" for name, value in self.server.items())
        shared = f'\n[shared]\nredis = "{self.redis.url}"\n' if self.redis is not None else ""
        password = f'database_password = "env:{PASSWORD_ENV}"\n' if self.db.startswith("postgresql") else ""
        anthropic_keys = ", ".join(f'{{ key = "{key}", label = "{label}" }}' for label, key in keys)
        self.config.write_text(
            f'[server]\nlisten = "127.0.0.1:{self.port}"\ndatabase = "{self.db}"\n{password}'
            f'ops_socket = "{self.ops}"\n{server}{shared}\n'
            f'[[upstream]]\nname = "anthropic"\nkind = "anthropic"\nbase_url = "{self.vendor.url}"\n'
            f'keys = [{anthropic_keys}]\n'
            f'\n[dashboard]\nlisten = "{self.dashboard}"\n'
        )

    @staticmethod
    def env(**extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "WATCHDOG_", "HUBCORE_"))}
        env["PYTHONPATH"] = str(REPO)
        env[PASSWORD_ENV] = PASSWORD
        env.update(extra)
        return env

    def start(self, wait: bool = True, **env: str) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                hubcore_cmd("serve", "--config", str(self.config)),
                stdout=log, stderr=log, env=self.env(**env), cwd=self.tmp,
            )
        if wait:
            self.wait_up()
        return self.proc

    def wait_up(self) -> dict[str, Any]:
        def up() -> dict[str, Any] | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"hubcore exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                stats = opsclient.get_stats(self.ops)
            except opsclient.OpsClientError:
                return None
            return stats if all(w["up"] for w in stats["workers"]) else None

        return eventually(up, timeout=START_TIMEOUT, what="every worker up")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        # A supervisor killed above leaves its workers to their PDEATHSIG;
        # any still about are found by their sockets' owners' absence later.
        shutil.rmtree(self.sock_dir, ignore_errors=True)

    def stats(self) -> dict[str, Any]:
        return opsclient.get_stats(self.ops)

    def worker_stats(self, index: int) -> dict[str, Any]:
        return opsclient.get_stats(f"{self.ops}.w{index}")

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.stats()["workers"]]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(hubcore_cmd(*args, "--config", str(self.config)),
                              capture_output=True, text=True, env=self.env(), cwd=self.tmp, timeout=60)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def rows(self) -> list[dict[str, Any]]:
        database = pg_server_database_from(self.db) if self.db.startswith("postgresql") else self.db
        return usage_rows(database)

    def first_token(self) -> str:
        return (self.tmp / "first-token").read_text().strip()


def pg_server_database_from(url: str) -> Any:
    return pg_server_database(PgDatabase(url=url, name=url.rpartition("/")[2]))


@pytest.fixture
def workers_factory(tmp_path: Path, vendor: FakeVendor) -> Iterator[Callable[..., Workers]]:
    made: list[Workers] = []

    def make(redis: RedisServer | None, **kwargs: Any) -> Workers:
        hub = Workers(tmp_path, vendor, redis, **kwargs)
        made.append(hub)
        return hub

    yield make
    for hub in made:
        pids = []
        try:
            pids = hub.worker_pids() if hub.proc is not None and hub.proc.poll() is None else []
        except opsclient.OpsClientError:
            pass
        hub.close()
        for pid in pids:  # workers outliving a supervisor this test killed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def request(port: int, token: str) -> int:
    """One POST on a fresh connection: its status."""
    body = {"model": "claude-sonnet-4-6", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/messages", orjson.dumps(body), {
            "x-api-key": token, "content-type": "application/json", "anthropic-version": "2023-06-01",
        })
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def metric_values(text: str, name: str) -> list[float]:
    return [s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


# -- both workers serve; the supervisor sums them -----------------------------------------

def test_two_workers_serve_one_port_and_the_ops_socket_sums_them(
    workers_factory: Callable[..., Workers], redis_server: RedisServer,
) -> None:
    hub = workers_factory(redis_server)
    hub.start()
    # Minted once, by the supervisor, before the workers started.
    conn = sqlite3.connect(hub.db)
    assert conn.execute("SELECT count(*), min(user) FROM tokens").fetchone() == (1, "admin")
    conn.close()
    assert hub.log_text().count("no hub tokens yet") == 1
    token = hub.first_token()

    stats = hub.stats()
    pids = [w["pid"] for w in stats["workers"]]
    assert [w["index"] for w in stats["workers"]] == [0, 1] and len(set(pids)) == 2
    assert hub.proc is not None and stats["pid"] == hub.proc.pid
    assert {hub.worker_stats(i)["pid"] for i in (0, 1)} == set(pids)

    statuses = [request(hub.port, token) for _ in range(40)]
    assert statuses == [200] * 40
    per_worker = eventually(
        lambda: (counts := [hub.worker_stats(i)["requests"]["total"] for i in (0, 1)]) and sum(counts) == 40
        and counts, what="both workers counted the requests")
    # Fresh connections from new source ports: the kernel spreads them over
    # both listeners (all 40 on one would be a chance of 2 in 2**40).
    assert all(n > 0 for n in per_worker), per_worker
    stats = hub.stats()
    assert stats["requests"]["total"] == 40
    assert stats["requests"]["by_outcome"] == {"ok": 40}
    assert stats["latency_s"]["total"]["count"] == 40 and stats["latency_s"]["total"]["p50"] is not None
    assert stats["keys"]["anthropic"][0]["requests"] == 40
    assert stats["tokens_loaded"] == 1
    # Each worker is an instance in Redis (worker 0's count, from its latest heartbeat).
    eventually(lambda: hub.stats()["shared"]["instances"] == 2, what="two instances in Redis")

    status, body = opsclient.fetch(hub.ops, "/metrics")
    assert status == 200
    text = body.decode()
    assert sum(metric_values(text, "hubcore_requests_total")) == 40
    assert metric_values(text, "hubcore_request_duration_seconds_count") == [40]
    assert metric_values(text, "hubcore_workers") == [2] and metric_values(text, "hubcore_workers_answering") == [2]
    assert metric_values(text, "hubcore_worker_up") == [1, 1]

    # The CLI against the supervisor's socket, unchanged.
    shown = hub.cli("stats", "--json")
    assert shown.returncode == 0, shown.stderr
    assert orjson.loads(shown.stdout)["requests"]["total"] == 40
    table = hub.cli("stats")
    assert table.returncode == 0 and "requests 40" in table.stdout, table.stdout
    assert f"workers     0 pid {pids[0]} up, 1 pid {pids[1]} up" in table.stdout, table.stdout
    keys = hub.cli("keys", "--json")
    assert keys.returncode == 0 and [k["requests"] for k in orjson.loads(keys.stdout)] == [40]

    hub.signal(signal.SIGTERM)
    assert hub.wait() == 0
    assert len(hub.rows()) == 40
    assert not any(os.path.exists(p) for p in (hub.ops, f"{hub.ops}.w0", f"{hub.ops}.w1"))
    log = hub.log_text()
    assert "hubcore.supervisor: stopped" in log and log.count("hubcore[w") >= 4
    assert token not in log


# -- the dashboard's live view is every worker's ----------------------------------------------

def test_the_live_view_shows_the_requests_in_flight_on_every_worker(
    workers_factory: Callable[..., Workers], redis_server: RedisServer,
) -> None:
    dashboard_port = free_port()
    hub = workers_factory(redis_server, dashboard=f"127.0.0.1:{dashboard_port}")
    hub.start()
    token = hub.first_token()
    db = store.connect(hub.db)
    try:
        admins.add(db, "ops", "a long operator password", time.time())
        api_token = admins.create_token(db, "ops", time.time())[1]
    finally:
        db.close()

    def live() -> dict[str, Any]:
        page = http.client.HTTPConnection("127.0.0.1", dashboard_port, timeout=10)
        try:
            page.request("GET", "/api/v1/live", headers={"authorization": f"Bearer {api_token}"})
            answer = page.getresponse()
            body = answer.read()
        finally:
            page.close()
        assert answer.status == 200, body
        data: dict[str, Any] = orjson.loads(body)
        return data

    def live_when(ready: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            data = live()
            return data if ready(data) else None

        return eventually(probe, timeout=20, what="the live view")

    # Sixteen streams held open, each on a fresh connection: the kernel
    # spreads them over both workers (all on one: a chance of 2 in 2**16).
    streams = 16
    body = orjson.dumps({"model": "claude-sonnet-4-6", "max_tokens": 16, "stream": True,
                         "messages": [{"role": "user", "content": "hi"}]})
    statuses: list[int] = []

    def stream() -> None:
        client = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=60)
        try:
            client.request("POST", "/v1/messages", body, {
                "x-api-key": token, "content-type": "application/json", "anthropic-version": "2023-06-01",
                "x-fake-events": "40", "x-fake-delay-ms": "100",
            })
            response = client.getresponse()
            response.read()
            statuses.append(response.status)
        finally:
            client.close()

    threads = [threading.Thread(target=stream) for _ in range(streams)]
    for thread in threads:
        thread.start()
    try:
        # Counted by the hub as a request starts, by the key ring once its
        # key is taken, by the pool once its connection is: all of them.
        seen = live_when(lambda data: data["in_flight"] == streams == data["upstreams"][0]["in_flight"]
                         == data["upstreams"][0]["connections"]["busy"])
        assert len(seen["requests"]) == streams and seen["requests_not_shown"] == 0
        by_worker = {index: sum(1 for r in seen["requests"] if r["worker"] == index) for index in (0, 1)}
        assert [w["answered"] for w in seen["workers"]] == [True, True]
        assert [w["in_flight"] for w in seen["workers"]] == [by_worker[0], by_worker[1]]
        assert all(n > 0 for n in by_worker.values()), by_worker
        ages = [r["age_s"] for r in seen["requests"]]
        assert ages == sorted(ages, reverse=True)  # oldest first, across workers
        (upstream,) = seen["upstreams"]
        assert upstream["in_flight"] == streams and upstream["keys"][0]["in_flight"] == streams
        assert upstream["connections"]["busy"] == streams
        # The supervisor's ops socket answers the same view.
        status, answer = opsclient.fetch(hub.ops, "/live")
        assert status == 200 and orjson.loads(answer)["in_flight"] == streams
    finally:
        for thread in threads:
            thread.join(60)
    assert statuses == [200] * streams
    live_when(lambda data: data["in_flight"] == 0)

    # A worker that does not answer is left out and named, not waited on.
    pids = hub.worker_pids()
    os.kill(pids[1], signal.SIGSTOP)
    try:
        started = time.monotonic()
        data = live()
        assert time.monotonic() - started < 5
        assert [w["answered"] for w in data["workers"]] == [True, False]
    finally:
        os.kill(pids[1], signal.SIGCONT)


# -- signals and commands reach every worker ------------------------------------------------

def test_sighup_and_key_actions_reach_every_worker(
    workers_factory: Callable[..., Workers], redis_server: RedisServer, vendor: FakeVendor,
) -> None:
    hub = workers_factory(redis_server)
    hub.start()
    token = hub.first_token()

    hub.write([("a2", KEY_TWO)])
    hub.signal(signal.SIGHUP)
    eventually(lambda: all([k["label"] for k in hub.worker_stats(i)["keys"]["anthropic"]] == ["a2"] for i in (0, 1)),
               what="both workers reloaded")
    assert [request(hub.port, token) for _ in range(10)] == [200] * 10
    assert vendor.hits[KEY_TWO] == 10 and vendor.hits[KEY_ONE] == 0

    hub.write([("a2", KEY_TWO), ("a1", KEY_ONE)])
    reloaded = hub.cli("reload")
    assert reloaded.returncode == 0, reloaded.stderr
    assert "reloaded" in reloaded.stdout
    for i in (0, 1):
        assert [k["label"] for k in hub.worker_stats(i)["keys"]["anthropic"]] == ["a2", "a1"]

    disabled = hub.cli("keys", "disable", "a2")
    assert disabled.returncode == 0, disabled.stderr
    assert disabled.stdout.strip() == "key a2 disabled: anthropic disabled"
    for i in (0, 1):
        states = {k["label"]: k["state"] for k in hub.worker_stats(i)["keys"]["anthropic"]}
        assert states == {"a2": "disabled", "a1": "healthy"}, (i, states)
    hits = vendor.hits
    assert [request(hub.port, token) for _ in range(10)] == [200] * 10
    assert vendor.hits[KEY_TWO] == hits[KEY_TWO] and vendor.hits[KEY_ONE] == hits[KEY_ONE] + 10
    missing = hub.cli("keys", "disable", "no-such-key")
    assert missing.returncode != 0 and "no key labelled 'no-such-key'" in missing.stderr

    hub.signal(signal.SIGTERM)
    assert hub.wait() == 0
    # One worker stored the switch and wrote its audit row, the other only heard it.
    conn = sqlite3.connect(hub.db)
    try:
        assert conn.execute("SELECT count(*) FROM audit WHERE action = 'key.disable'").fetchone() == (1,)
    finally:
        conn.close()
    assert len(hub.rows()) == 20


# -- a worker that dies or hangs is started again ---------------------------------------------

class Traffic:
    """Requests one after another on fresh connections, from a thread,
    until stopped: their statuses, an OSError counted as 0."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.statuses.append(request(self.port, self.token))
            except (OSError, http.client.HTTPException):
                self.statuses.append(0)

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(60)
        return self.statuses


def test_a_worker_killed_is_started_again_while_the_other_keeps_the_port(
    workers_factory: Callable[..., Workers], redis_server: RedisServer,
) -> None:
    hub = workers_factory(redis_server)
    hub.start()
    token = hub.first_token()
    victim = hub.worker_pids()[1]
    traffic = Traffic(hub.port, token)
    eventually(lambda: len(traffic.statuses) >= 10, what="traffic flowing")
    os.kill(victim, signal.SIGKILL)
    back = eventually(lambda: (w := hub.stats()["workers"][1])["up"] and w["pid"] != victim and w,
                      timeout=START_TIMEOUT, what="worker 1 started again")
    during = len(traffic.statuses)
    eventually(lambda: len(traffic.statuses) >= during + 20, what="traffic after the restart")
    statuses = traffic.stop()
    assert back["restarts"] == 1
    # Refused at most: the request the killed worker had taken, and one that
    # reached its listener while the kernel closed it.
    assert statuses.count(0) <= 2, statuses.count(0)
    assert set(statuses) <= {200, 0} and statuses.count(200) >= during - 2
    log = hub.log_text()
    assert "worker 1 was killed by SIGKILL" in log

    hub.signal(signal.SIGTERM)
    assert hub.wait() == 0


def test_ready_once_both_listen_watchdog_from_the_supervisor_and_a_stuck_worker_is_replaced(
    workers_factory: Callable[..., Workers], redis_server: RedisServer,
) -> None:
    hub = workers_factory(redis_server)
    path = str(hub.sock_dir / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(path)
        notify.settimeout(START_TIMEOUT)
        seen: list[str] = []  # every line systemd would have heard, in order
        cursor = [0]

        def until(message: str) -> None:
            """Wait for `message` after the one the last call waited for."""
            while message not in seen[cursor[0]:]:
                seen.extend(notify.recv(4096).decode().split("\n"))
            cursor[0] = seen.index(message, cursor[0]) + 1

        # A 2 s watchdog: the supervisor pings it, and takes a worker that
        # has not answered for half of it for stuck.
        hub.start(wait=False, NOTIFY_SOCKET=path, WATCHDOG_USEC="2000000")
        until("READY=1")
        # Not polled: READY promises both workers and the supervisor answer.
        stats = hub.stats()
        assert [w["up"] for w in stats["workers"]] == [True, True]
        for i in (0, 1):
            assert hub.worker_stats(i)["pid"] == stats["workers"][i]["pid"]
        socket.create_connection(("127.0.0.1", hub.port), timeout=2).close()
        until("WATCHDOG=1")

        stuck = stats["workers"][0]["pid"]
        os.kill(stuck, signal.SIGSTOP)  # its loop answers nothing from now on
        try:
            eventually(lambda: (w := hub.stats()["workers"][0])["up"] and w["pid"] != stuck,
                       timeout=START_TIMEOUT, what="the stuck worker replaced")
        finally:
            try:
                os.kill(stuck, signal.SIGCONT)
            except ProcessLookupError:
                pass
        assert f"worker 0 (pid {stuck}) has not answered on its ops socket" in hub.log_text()
        until("WATCHDOG=1")  # the service never stopped pinging: one worker's restart, not the service's
        hub.signal(signal.SIGTERM)
        until("STOPPING=1")
        assert hub.wait() == 0
        notify.settimeout(0.5)
        try:
            while True:
                seen.extend(notify.recv(4096).decode().split("\n"))
        except TimeoutError:
            pass
    # The workers, the restarted one too, never spoke to systemd: the
    # supervisor's READY is the only one.
    assert seen.count("READY=1") == 1 and seen.count("STOPPING=1") == 1


# -- refused at start ---------------------------------------------------------------------------

def test_several_workers_without_redis_or_with_port_0_are_refused(
    workers_factory: Callable[..., Workers], redis_server: RedisServer,
) -> None:
    hub = workers_factory(None)
    hub.start(wait=False)
    assert hub.wait() != 0
    assert "server.workers: 2 workers need [shared] redis" in hub.log_text()

    zero = workers_factory(redis_server)
    zero.config.write_text(zero.config.read_text().replace(f"127.0.0.1:{zero.port}", "127.0.0.1:0"))
    checked = zero.cli("check-config")
    assert checked.returncode != 0 and "port 0" in checked.stderr
    started = subprocess.run(hubcore_cmd("serve", "--config", str(zero.config)), capture_output=True, text=True,
                             env=zero.env(), cwd=zero.tmp, timeout=60)
    assert started.returncode != 0 and "port 0 would give each of the 2 workers" in started.stderr


def test_a_worker_that_cannot_start_stops_the_hub_with_its_reason(
    workers_factory: Callable[..., Workers], redis_server: RedisServer,
) -> None:
    hub = workers_factory(redis_server)
    # Worker 1's ops socket path is taken by a file that is not a socket.
    Path(f"{hub.ops}.w1").write_text("not a socket")
    hub.start(wait=False)
    assert hub.wait() == 1
    log = hub.log_text()
    assert "exists and is not a socket" in log
    assert "worker 1 exited with status 1 before it listened" in log
    assert not os.path.exists(hub.ops) and not os.path.exists(f"{hub.ops}.w0")
    # The first token of the failed start was taken back.
    assert not (hub.tmp / "first-token").exists()


# -- PostgreSQL ---------------------------------------------------------------------------------

def test_two_workers_on_postgresql(
    workers_factory: Callable[..., Workers], redis_server: RedisServer, pg_database: PgDatabase,
) -> None:
    hub = workers_factory(redis_server, database=pg_database.url)
    hub.start()
    token = hub.first_token()
    assert [request(hub.port, token) for _ in range(20)] == [200] * 20

    def stored() -> bool:
        # A batch the database was slow to take goes by the spool: replayed, not written.
        writer = hub.stats()["writer"]
        return bool(writer["written"] + writer["replayed"] == 20 and writer["spool_pending"] == 0)

    eventually(stored, what="every row stored")
    hub.signal(signal.SIGTERM)
    assert hub.wait() == 0
    rows = hub.rows()
    assert len(rows) == 20 and len({r["request_id"] for r in rows}) == 20
