"""The storage tests run on both engines: `database` is the [server]
database string of a fresh SQLite file or of a fresh PostgreSQL database
(a PgTarget whose password comes by env:, as an operator's would)."""
from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hubcore import config, store
from hubcore.accounting.usage import FIELDS, UsageEvent, insert_values
from tests.pgserver import PgDatabase


def pg_server_database(pg: PgDatabase, **server: Any) -> str:
    """The database of `pg` as a config gives it to hubcore."""
    cfg = config.parse({"server": {**pg.server_config, **server}}, source="<test>", env=dict(os.environ))
    return cfg.server.database


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "hub.db")
    return pg_server_database(request.getfixturevalue("pg_database"))


@pytest.fixture
def conn(database: str) -> Iterator[sqlite3.Connection]:
    c = store.connect(database)
    yield c
    c.close()


# Portable (SQLite 3.24+ and PostgreSQL): the usage writer's own INSERT OR
# IGNORE is SQLite's, and PostgreSQL's writer is accounting.pgwriter.
INSERT_USAGE = (
    f"INSERT INTO usage ({', '.join(FIELDS)}) VALUES ({', '.join('?' * len(FIELDS))})"
    " ON CONFLICT (request_id) DO NOTHING"
)


def add_usage(conn: sqlite3.Connection, *events: UsageEvent) -> None:
    for event in events:
        values = insert_values([event])
        values[FIELDS.index("output_estimated")] = int(event.output_estimated)
        conn.execute(INSERT_USAGE, values)


def event(request_id: str, ts: float, **fields: Any) -> UsageEvent:
    base: dict[str, Any] = {"endpoint": "/v1/messages", "status": 200, "outcome": "ok", "total_ms": 10.0}
    return UsageEvent(ts=ts, request_id=request_id, **{**base, **fields})
