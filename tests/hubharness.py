"""Run a real hub for tests: in a thread with its own uvloop loop (so the
official sync SDKs can talk to it), or as a `hubcore serve` subprocess."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from hubcore import config as config_mod, store
from hubcore.database import is_postgres

from hubcore.governance import tokens
from hubcore.governance.limits import Limits
from hubcore.governance.storage import write_limits
from hubcore.app import App
from hubcore.config import Config

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent


def make_config(tmp: Path, upstreams: list[dict[str, Any]], dashboard: dict[str, Any] | None = None,
                shared: dict[str, Any] | None = None, **server: Any) -> Config:
    from tests.pgserver import engine_database

    settings = {
        "listen": "127.0.0.1:0",
        "database": str(tmp / "hub.db"),
        "ops_socket": str(tmp / "ops.sock"),
        "token_reload_interval": 0.1,
        "usage_flush_interval": 0.05,
        # HUBCORE_TEST_DATABASE=postgresql: on PostgreSQL instead.
        **({} if "database" in server else engine_database()),
        **server,
    }
    if is_postgres(settings["database"]):
        # Not the default, in the working directory: the test's own.
        settings.setdefault("spool", str(tmp / "usage.spool"))
    data: dict[str, Any] = {
        "server": settings,
        "upstream": upstreams,
        # Off unless asked for: its default port 8788 would be shared by every test hub.
        "dashboard": {"listen": ""} if dashboard is None else dashboard,
    }
    if shared is not None:
        data["shared"] = shared
    return config_mod.parse(data, source="<test>", env=dict(os.environ))


def mint(database: str | Path, user: str = "alice", project: str | None = None) -> str:
    conn = store.connect(database)
    try:
        return tokens.create(conn, user, project)[1]
    finally:
        conn.close()


def usage_rows(database: str | Path) -> list[dict[str, Any]]:
    """Every usage row of a hub's database, in insertion order, by column name
    (read only: no migration, no pragmas, safe beside a running hub)."""
    conn = store.connect(database) if is_postgres(database) else sqlite3.connect(str(database))
    try:
        cur = conn.execute("SELECT * FROM usage ORDER BY id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]
    finally:
        conn.close()


class HubThread:
    """A started App on 127.0.0.1:<ephemeral>, stopped on exit."""

    def __init__(self, config: Config) -> None:
        if config.dashboard.listen == config_mod.DashboardConfig().listen:
            # The default port is one for every hub of a run (tests run in
            # parallel): a test that wants the dashboard asks for port 0.
            config = dataclasses.replace(config, dashboard=dataclasses.replace(config.dashboard, listen=""))
        self.config = config
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="hub", daemon=True)
        self.app: App | None = None
        self.url = ""
        self.port = 0
        self.dashboard_url = ""
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def __enter__(self) -> HubThread:
        self.thread.start()
        self.app = self.call(self._start())
        return self

    async def _start(self) -> App:
        app = App(self.config, asyncio.get_running_loop())
        addresses = await app.start()
        self.port = addresses[0][1]
        scheme = "https" if self.config.server.tls_cert else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        if app.dashboard_addresses:
            dashboard_scheme = "https" if self.config.dashboard.tls_cert else "http"
            self.dashboard_url = f"{dashboard_scheme}://127.0.0.1:{app.dashboard_addresses[0][1]}"
        return app

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __exit__(self, *exc: object) -> None:
        if self.app is not None:
            self.call(self.app.stop(), timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def mint(self, user: str = "alice", project: str | None = None) -> str:
        """A new hub token, already seen by the running hub."""
        value = mint(self.config.server.database, user, project)
        assert self.app is not None
        self.call(self.app.refresh_tokens(force=True))
        return value

    def set_limits(self, kind: str, name: str | int, limits: Limits) -> None:
        """Store a token's, user's or project's limits; the hub has them on return."""
        conn = store.connect(self.config.server.database)
        try:
            assert write_limits(conn, kind, name, limits) or kind != "token", f"no active token {name}"
            conn.commit()
        finally:
            conn.close()
        assert self.app is not None
        self.call(self.app.refresh_tokens(force=True))

    def mint_limited(self, user: str, limits: Limits) -> str:
        """A new token of `user`, whose user limits are `limits`."""
        token = self.mint(user)
        self.set_limits("user", user, limits)
        return token

    def mint_revoked(self, user: str = "gone") -> str:
        """A token the hub knows as revoked."""
        token = self.mint(user)
        conn = store.connect(self.config.server.database)
        try:
            (token_id,) = conn.execute("SELECT id FROM tokens WHERE hash = ?", (tokens.hash_token(token),)).fetchone()
            tokens.revoke(conn, token_id)
            conn.commit()
        finally:
            conn.close()
        assert self.app is not None
        self.call(self.app.refresh_tokens(force=True))
        return token

    def usage_rows(self) -> list[dict[str, Any]]:
        return usage_rows(self.config.server.database)

    def wait_rows(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.usage_rows()
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hubcore_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "hubcore", *args]


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60,
            input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(hubcore_cmd(*args), capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout,
                          input=input_text)


def terminate(proc: subprocess.Popen[Any], timeout: float = 40) -> tuple[Any, Any]:
    """SIGTERM, as a supervisor stops the hub; its (stdout, stderr). One that
    has not exited within `timeout` is killed before TimeoutExpired goes up,
    so that it does not run on into the next test and fail that one as a
    leaked process."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise


def wait_listening(port: int, proc: subprocess.Popen[Any] | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"hubcore exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


def eventually(probe: Callable[[], T | None], timeout: float = 20.0, what: str = "condition",
               interval: float = 0.02) -> T:
    """Poll `probe()` until it returns something true; that value (an
    AssertionError naming `what` after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout:g} s")
        time.sleep(interval)
