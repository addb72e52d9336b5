"""The usage writer's PostgreSQL backend: what UsageRecorder calls instead
of its SQLite connection when `[server] database` is a postgresql:// URL.

One statement per batch, whatever its size: the batch goes as one array per
column and PostgreSQL unnests them into rows,

    INSERT INTO usage (ts, request_id, ...) SELECT * FROM unnest($1::float8[], $2::text[], ...)
    ON CONFLICT (request_id) DO NOTHING

so the statement is prepared once per connection (no text per batch size,
no 32767-parameter limit) and a batch replayed after a failure, whose rows
may be in already, inserts each row once. The connections come from an
asyncpg pool made without connecting (min_size 0): a writer started, or a
write tried, while the server is down fails that write alone, and the
recorder spools and retries as it does on SQLite. Every failure leaves here
as sqlite3.OperationalError, its message masked, so that the recorder's
error handling is the same for both engines.
"""
from __future__ import annotations

import asyncio
import sqlite3
import typing
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any

import asyncpg

from hubcore import pgstore
from hubcore.accounting.usage import FIELDS, UsageEvent
from hubcore.database import PgTarget, mask

# Seconds one batch may take, from asking the pool for a connection to the
# server's answer: a server that stopped answering (not refusing) fails the
# write, and the recorder spools and backs off, instead of one write hanging
# on for as long as TCP takes to give up. The recorder copies a waiting batch
# to the spool after a flush interval anyway: this bounds how long it waits.
WRITE_TIMEOUT = 30.0
# Seconds close() waits for the pool's connections before cutting them.
CLOSE_TIMEOUT = 5.0

# PostgreSQL array type of each UsageEvent field, by its annotation.
_ARRAY_TYPES = {int: "int8[]", float: "float8[]", str: "text[]", bool: "int8[]"}


def _array_types() -> list[str]:
    hints = typing.get_type_hints(UsageEvent)
    types = []
    for name in FIELDS:
        base = [t for t in typing.get_args(hints[name]) if t is not type(None)] or [hints[name]]
        types.append(_ARRAY_TYPES[base[0]])
    return types


def _column(name: str) -> str:
    return f'"{name}"' if name in pgstore.RESERVED_NAMES else name


INSERT_SQL = (
    f"INSERT INTO usage ({', '.join(map(_column, FIELDS))})"
    f" SELECT * FROM unnest({', '.join(f'${i}::{t}' for i, t in enumerate(_array_types(), 1))})"
    " ON CONFLICT (request_id) DO NOTHING"
)

_row: Callable[[UsageEvent], tuple[Any, ...]] = attrgetter(*FIELDS)
# Stored as 0 or 1, as on SQLite.
_BOOL_COLUMNS = tuple(i for i, t in enumerate(typing.get_type_hints(UsageEvent)[f] for f in FIELDS) if t is bool)


def columns(events: Sequence[UsageEvent]) -> list[list[Any]]:
    """The batch as one list per column, in FIELDS order."""
    arrays = [list(column) for column in zip(*map(_row, events))]
    for i in _BOOL_COLUMNS:
        arrays[i] = [int(v) for v in arrays[i]]
    return arrays


class PgUsageWriter:
    """Inserts batches of usage events into PostgreSQL."""

    def __init__(self, target: PgTarget) -> None:
        self.target = target
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        """Migrate the schema (as every hubcore connection does), make the pool."""
        try:
            await asyncio.to_thread(_migrate, self.target)
            self._pool = await pgstore.create_pool(self.target)
        except (sqlite3.Error, *pgstore.DRIVER_ERRORS) as e:
            raise _error(e) from e

    async def insert(self, events: Sequence[UsageEvent]) -> int:
        """Insert `events` in one statement; how many were new (the rest
        were in already: a replay)."""
        pool = self._pool
        if pool is None:
            raise sqlite3.OperationalError("the usage database is not open")
        arrays = columns(events)
        try:
            async with asyncio.timeout(WRITE_TIMEOUT):
                conn = await pool.acquire()
                try:
                    status = await conn.execute(INSERT_SQL, *arrays)
                except BaseException:
                    # Whatever state a failed or cut-off statement left the
                    # connection in, it is not handed out again.
                    conn.terminate()
                    raise
                finally:
                    await pool.release(conn)
        except pgstore.DRIVER_ERRORS as e:
            raise _error(e) from e
        return int(status.rpartition(" ")[2])

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT)
        except pgstore.DRIVER_ERRORS:
            pool.terminate()


def _migrate(target: PgTarget) -> None:
    pgstore.connect(target).close()


def _error(exc: BaseException) -> sqlite3.OperationalError:
    if isinstance(exc, sqlite3.OperationalError):
        return exc
    if isinstance(exc, TimeoutError):
        return sqlite3.OperationalError(f"no answer from the usage database within {WRITE_TIMEOUT:g} s")
    return sqlite3.OperationalError(mask(str(exc) or repr(exc)))
