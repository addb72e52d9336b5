"""The audit trail on a real database (SQLite and PostgreSQL): rows as written, newest first,
`since` and keyset pagination by id."""
from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest

from hubcore import store
from hubcore.governance import audit


@pytest.fixture
def conn(database: str) -> Iterator[sqlite3.Connection]:
    c = store.connect(database)
    yield c
    c.close()


def test_a_row_reads_back_as_written(conn: sqlite3.Connection) -> None:
    row_id = audit.record(conn, "cli:ops", "user.set", "user alice", {"rpm": 5}, {"rpm": 10}, "cli", now=50.0)
    (entry,) = audit.read(conn)
    assert entry == audit.AuditEntry(row_id, 50.0, "cli:ops", "user.set", "user alice", {"rpm": 5}, {"rpm": 10}, "cli")
    assert entry.to_dict()["before"] == {"rpm": 5}
    stored = conn.execute("SELECT before, after FROM audit").fetchone()
    assert stored == ('{"rpm":5}', '{"rpm":10}')


def test_none_is_stored_as_null(conn: sqlite3.Connection) -> None:
    audit.record(conn, "cli:ops", "admin.add", "admin alice", None, None, "cli", now=1.0)
    assert conn.execute("SELECT before, after FROM audit").fetchone() == (None, None)
    assert audit.read(conn)[0].before is None


def test_newest_first_with_since_limit_and_keyset_pages(conn: sqlite3.Connection) -> None:
    ids = [audit.record(conn, "a", "token.revoke", f"token {n}", None, None, "cli", now=float(n)) for n in range(10)]
    assert [e.id for e in audit.read(conn)] == ids[::-1]
    assert [e.id for e in audit.read(conn, since=7.0)] == ids[:6:-1]
    first = audit.read(conn, limit=4)
    second = audit.read(conn, limit=4, before_id=first[-1].id)
    third = audit.read(conn, limit=4, before_id=second[-1].id)
    assert [e.id for e in first + second + third] == ids[::-1]
    assert audit.read(conn, limit=4, before_id=ids[0]) == []


def test_a_bad_limit_is_refused(conn: sqlite3.Connection) -> None:
    with pytest.raises(ValueError, match="limit"):
        audit.read(conn, limit=0)
