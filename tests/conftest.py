"""Shared fixtures: a fake vendor and a real hub in front of it; a real
redis-server (tests/servers.py)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakevendor import ANTHROPIC_KEY, OPENAI_KEY, FakeVendor
from tests.hubharness import HubThread, make_config
from tests.servers import RedisServer, SilentServer


@pytest.fixture
def vendor() -> Iterator[FakeVendor]:
    with FakeVendor() as v:
        yield v


def upstreams_for(vendor: FakeVendor, anthropic_keys: list[Any] | None = None, openai_keys: list[Any] | None = None, **extra: Any) -> list[dict[str, Any]]:
    return [
        {"name": "anthropic", "kind": "anthropic", "base_url": vendor.url, "keys": anthropic_keys or [ANTHROPIC_KEY], **extra},
        {"name": "openai", "kind": "openai", "base_url": vendor.url, "keys": openai_keys or [OPENAI_KEY], **extra},
    ]


@pytest.fixture
def hub(vendor: FakeVendor, tmp_path: Path) -> Iterator[HubThread]:
    config = make_config(tmp_path, upstreams_for(vendor))
    with HubThread(config) as h:
        yield h


@pytest.fixture
def token(hub: HubThread) -> str:
    return hub.mint("alice", "proj-a")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own on a free port; skipped without the
    binary (failed under CI=true)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    """A listener that takes connections and never answers."""
    server = SilentServer()
    try:
        yield server
    finally:
        server.close()


# The PostgreSQL cluster of the run, a database per test, and `database`,
# which runs a storage test on SQLite and on PostgreSQL (tests/pgserver.py).
from tests.pgserver import database, pg_database, pg_server  # noqa: E402,F401
