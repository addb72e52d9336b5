"""SqliteUsageWriter, the usage recorder's writer for SQLite: batches of
usage events inserted, with their rollups, on a thread of its own.

Its connection is `BatchConnection`: the compiled twin (`_sqlite_batch.pyx`)
when built, which runs a batch's whole transaction through SQLite's C API
without the GIL, else the pure-Python one (`_sqlite_batch_py.py`) on
Python's sqlite3. `HUBCORE_NO_EXTENSIONS` (any non-empty value) or a
non-CPython interpreter selects the pure twin, as for the connection cores
(hubcore.http.conn). The PostgreSQL writer with the same three calls is
accounting.pgwriter.
"""
from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from hubcore import load_twin
from hubcore.accounting.usage import UsageEvent

__all__ = ["COMPILED", "BatchConnection", "SqliteUsageWriter"]

if TYPE_CHECKING:
    from hubcore.accounting._sqlite_batch_py import BatchConnection

    COMPILED = False
else:
    _twin, COMPILED = load_twin("hubcore.accounting._sqlite_batch", "hubcore.accounting._sqlite_batch_py")
    BatchConnection = _twin.BatchConnection


class SqliteUsageWriter:
    """Inserts batches of usage events into the SQLite file at `path`.

    Every call on the connection but `prepare` runs on one thread, made for
    this writer: a write that waits on another process's lock (up to the
    busy timeout) holds that thread, never the event loop, and the
    connection is closed only after the writes handed to it. A write the
    caller stops waiting for still runs to its end there.
    """

    def __init__(self, path: str | Path, busy_timeout_ms: int) -> None:
        self.path = Path(path)
        self._busy_timeout_ms = busy_timeout_ms
        self._executor: ThreadPoolExecutor | None = None
        self._conn: BatchConnection | None = None

    async def open(self) -> None:
        """Open the connection (the file migrated already: recorder._migrate)."""
        executor = ThreadPoolExecutor(1, thread_name_prefix="hubcore-usage-writer")
        try:
            self._conn = await asyncio.get_running_loop().run_in_executor(
                executor, BatchConnection, self.path, self._busy_timeout_ms
            )
        except BaseException:
            executor.shutdown(wait=False)
            raise
        self._executor = executor

    async def insert(self, events: Sequence[UsageEvent]) -> int:
        """Insert `events` in one transaction, with their rollups; how many
        were new (the rest were in already: a replay)."""
        conn, executor = self._conn, self._executor
        if conn is None or executor is None:
            raise sqlite3.OperationalError("the usage database is not open")
        return await asyncio.get_running_loop().run_in_executor(executor, conn.write, conn.prepare(events))

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            if conn is not None:
                await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        finally:
            executor.shutdown(wait=False)
