"""The storage tests run on both engines: `database` (tests/pgserver.py) is
the [server] database of a fresh SQLite file, then of a fresh PostgreSQL
database; `conn` is a connection to it. Helpers that write usage rows the
same way on both."""
from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest

from hubcore import store
from hubcore.accounting import rollup
from hubcore.accounting.rows import insert_values
from hubcore.accounting.usage import FIELDS, UsageEvent, insert_sql
from tests.pgserver import pg_server_database

__all__ = ["add_usage", "event", "pg_server_database"]


@pytest.fixture
def conn(database: str) -> Iterator[sqlite3.Connection]:
    c = store.connect(database)
    yield c
    c.close()


# The SQLite usage writer's own INSERT, portable (SQLite 3.24+ and
# PostgreSQL, whose writer is accounting.pgwriter).
INSERT_USAGE = insert_sql(1)


def add_usage(conn: sqlite3.Connection, *events: UsageEvent) -> None:
    """Rows and their rollups, as the usage writer stores them (on
    PostgreSQL the trigger keeps the rollups, and rollup.add does nothing)."""
    with rollup.adding(conn):
        for event in events:
            values = insert_values([event])
            values[FIELDS.index("output_estimated")] = int(event.output_estimated)
            conn.execute(INSERT_USAGE, values)


def event(request_id: str, ts: float, **fields: Any) -> UsageEvent:
    base: dict[str, Any] = {"endpoint": "/v1/messages", "status": 200, "outcome": "ok", "total_ms": 10.0}
    return UsageEvent(ts=ts, request_id=request_id, **{**base, **fields})
