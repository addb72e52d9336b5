"""The SQLite usage writer's connection: the pure-Python twin of
`_sqlite_batch.pyx` (tests/accounting/test_sqlite_batch.py holds both to it).

A BatchConnection is made, used and closed on one thread, the writer's,
but for `prepare`, which the event loop's thread calls: it reads a batch
of UsageEvents into what `write` takes, Python work that holds the GIL
and so costs the loop's thread no handoff when done there. `write`
inserts a prepared batch in one transaction, the rollups added in the
same (rollup.add), and returns how many rows were new; a failure raises
the sqlite3 exception SQLite's result code maps to, with the transaction
rolled back.
"""
from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from typing import Any

from hubcore import store
from hubcore.accounting import rollup
from hubcore.accounting.rows import insert_values
from hubcore.accounting.usage import FIELDS, UsageEvent, insert_chunks, insert_sql


class Batch:
    """A batch's values, read for SQLite: what `BatchConnection.write` takes."""

    __slots__ = ("rows", "_values")

    def __init__(self, values: list[Any]) -> None:
        self._values = values
        self.rows = len(values) // len(FIELDS)


class BatchConnection:
    """The usage writer's own connection to the SQLite file at `path`."""

    def __init__(self, path: str | os.PathLike[str], busy_timeout_ms: int) -> None:
        # Autocommit (the transactions are written out), usable from the
        # thread that closes it should that not be the writer's.
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            store.configure(conn, busy_timeout_ms)
        except BaseException:
            conn.close()
            raise
        self._conn: sqlite3.Connection | None = conn

    def prepare(self, events: Sequence[UsageEvent]) -> Batch:
        """Read `events` into a Batch (on the event loop's thread)."""
        return Batch(insert_values(events))

    def write(self, batch: Batch) -> int:
        """Insert the batch and add it to the rollups in one transaction;
        return how many rows were new (the rest were in already: a replay)."""
        conn = self._conn
        if conn is None:
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
        values = batch._values
        width = len(FIELDS)
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Other processes may write to the same file, but not before
            # COMMIT: BEGIN IMMEDIATE holds the write lock, so the rows with
            # an id above this one will be exactly this batch's.
            (last_id,), = conn.execute(rollup.LAST_ID).fetchall()
            inserted = at = 0
            for size, statements in insert_chunks(batch.rows):
                step = size * width
                end = at + step * statements
                # executemany's rowcount is the sum over its statements.
                inserted += conn.executemany(
                    insert_sql(size), [values[i:i + step] for i in range(at, end, step)]
                ).rowcount
                at = end
            if inserted:
                rollup.add(conn, last_id)
            conn.execute("COMMIT")
        except BaseException:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the failure ended the transaction already
            raise
        return inserted

    def close(self) -> None:
        """Close the connection; again is a no-op."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
