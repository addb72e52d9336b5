"""Usage retention (`[server] usage_retention_days`): raw usage rows older
than that are deleted by a task of the running hub, at start and then every
INTERVAL, in short transactions run by a worker thread on a connection of
its own, so that the usage writer waits for at most one of them.

Theory of operation: what a deletion must leave right.
- Budgets are rebuilt from usage rows at start (governance.limiter.Limiter
  .rebuild). The calendar windows (day, week, month, in the budget time
  zone) and the rolling 5 hours only read rows since the start of the
  current week or month: a retention shorter than a month is refused by the
  config (config.USAGE_RETENTION_MIN_DAYS), and the cutoff never passes the
  start of the current periods (`keep_since`: a month with a DST change is
  an hour longer than its days).
- A `total` budget counts every row there ever was. The spend of the rows a
  batch deletes is added, per token, to the usage_carried table in the same
  transaction, and the rebuild adds it to the token's (so its user's and
  project's) total: deleting rows never lowers a total.
- The hourly rollups are a table of their own; retention leaves them alone,
  so charts over long windows keep what the raw rows no longer have.
What is gone is gone for the raw-row views: `hubcore usage` over a range
older than the retention, /requests and a request's detail.

On PostgreSQL a batch is one statement that deletes its rows and carries
the spend of exactly the rows it deleted (delete_batch), under the advisory
lock that stands for SQLite's write lock: the CLI's and the dashboard's
writes and other instances' retention wait for the batch under way, never
the usage writer, which takes no such lock and inserts rows no batch
touches. Batches are sized and paced as on SQLite, which bounds the wait
of the rare insert that does meet one (a replayed request_id whose old row
is being deleted) and spreads the dead rows over autovacuum's runs. The
budgets' rebuild reads usage rows and usage_carried in one snapshot
(pgstore: a plain BEGIN is REPEATABLE READ), so a batch is seen on one
side only there too.
"""
from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable

from hubcore import store
from hubcore.config import USAGE_RETENTION_MIN_DAYS

log = logging.getLogger("hubcore.usage")

DAY = 86400.0
INTERVAL = 3600.0  # seconds between two passes
# A batch holds the database's write lock while it deletes: with 2 million
# rows and the usage table's eight indexes a row costs some 50 us to
# delete, so batches are sized to take about BATCH_SECONDS each (the usage
# writer flushes every 0.2 s by default and spools a batch that waits
# longer), and a pause as long follows each, leaving the writer at least
# half of the time.
BATCH_SECONDS = 0.05
BATCH_FIRST = 1000
BATCH_MIN = 100
BATCH_MAX = 5000
PAUSE_MIN = 0.02  # seconds

_DOOMED = "SELECT id FROM usage WHERE ts < ? ORDER BY ts, id LIMIT ?"
# The carry of a batch's rows, per token: the rebuild counts a row's cost
# when it is above zero, so does the carry. A token's user and project
# never change (min() picks the one value, which PostgreSQL needs spelt).
_CARRY_SELECT = """
SELECT token_id, min(user), min(project), SUM(CASE WHEN cost_micros > 0 THEN cost_micros ELSE 0 END), COUNT(*), MAX(ts)
"""
_CARRY_INTO = f"""
INSERT INTO usage_carried (token_id, user, project, cost_micros, requests, through_ts)
{_CARRY_SELECT}"""
_CARRY_ADD = """
ON CONFLICT (token_id) DO UPDATE SET
    cost_micros = usage_carried.cost_micros + excluded.cost_micros,
    requests = usage_carried.requests + excluded.requests,
    through_ts = CASE WHEN excluded.through_ts > usage_carried.through_ts
                      THEN excluded.through_ts ELSE usage_carried.through_ts END
"""
# SQLite: the carry, then the deletion, of the same rows (see delete_batch).
_CARRY = f"{_CARRY_INTO} FROM usage WHERE id IN ({_DOOMED}) AND token_id IS NOT NULL GROUP BY token_id {_CARRY_ADD}"
_DELETE = f"DELETE FROM usage WHERE id IN ({_DOOMED})"
# PostgreSQL: one statement that deletes the rows and carries what it
# deleted (a data-modifying WITH, which SQLite lacks); the count of rows
# deleted is its answer.
_PG_BATCH = f"""
WITH doomed AS (
    DELETE FROM usage WHERE id IN ({_DOOMED}) RETURNING token_id, user, project, cost_micros, ts
), carried AS (
    {_CARRY_INTO} FROM doomed WHERE token_id IS NOT NULL GROUP BY token_id {_CARRY_ADD}
)
SELECT count(*) FROM doomed
"""


def delete_batch(conn: sqlite3.Connection, before: float, size: int) -> int:
    """Delete the `size` oldest rows that arrived before `before`, carrying
    their spend, in one transaction; the number deleted."""
    with store.immediate(conn):
        if isinstance(conn, sqlite3.Connection):
            # Both statements pick the same rows: the transaction holds the
            # write lock, so no row comes or goes in between.
            conn.execute(_CARRY, (before, size))
            return conn.execute(_DELETE, (before, size)).rowcount
        # PostgreSQL's usage writer takes no lock (the advisory lock of
        # BEGIN IMMEDIATE serialises retention with the other writers and
        # other instances' retention alone): under READ COMMITTED two
        # statements could see different rows, say a spooled row of long
        # ago replayed in between. What one statement deletes is what it
        # carries, whatever commits meanwhile.
        (deleted,) = conn.execute(_PG_BATCH, (before, size)).fetchone()
        return int(deleted)


def purge(
    database: str, before: float, *, stop: threading.Event | None = None,
    busy_timeout_ms: int = store.BUSY_TIMEOUT_MS, clock: Callable[[], float] = time.monotonic,
) -> int:
    """Delete every usage row that arrived before `before`, batch after
    batch, until none is left or `stop` is set; the number deleted.
    Blocking: run it in a worker thread."""
    stop = stop or threading.Event()
    conn = store.connect(database)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        removed, size = 0, BATCH_FIRST
        while not stop.is_set():
            started = clock()
            deleted = delete_batch(conn, before, size)
            removed += deleted
            if deleted < size:
                break
            took = clock() - started
            # The next batch's size from this one's pace, within bounds.
            pace = took / deleted
            size = max(BATCH_MIN, min(BATCH_MAX, int(BATCH_SECONDS / pace) if pace > 0 else BATCH_MAX))
            if stop.wait(max(PAUSE_MIN, took)):
                break
        return removed
    finally:
        conn.close()


class Retention:
    """The running hub's retention task: a pass at start, then one every
    `interval`; stop() ends it after the batch under way."""

    def __init__(
        self, database: str, days: float, keep_since: Callable[[float], float], *,
        interval: float = INTERVAL, busy_timeout_ms: int = store.BUSY_TIMEOUT_MS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if days < USAGE_RETENTION_MIN_DAYS:
            raise ValueError(f"usage retention of {days:g} days is shorter than {USAGE_RETENTION_MIN_DAYS} days")
        self.database = database
        self.days = days
        # The start of the oldest budget period still current (the week's or
        # the month's, in the budget time zone): no row from then on goes.
        self.keep_since = keep_since
        self.interval = interval
        self.busy_timeout_ms = busy_timeout_ms
        self.clock = clock
        self.removed = 0                        # rows deleted since start
        self._stop = threading.Event()          # seen by the worker thread between batches
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def cutoff(self, now: float) -> float:
        """Rows that arrived before this go."""
        return min(now - self.days * DAY, self.keep_since(now))

    def run_once(self, now: float | None = None) -> int:
        """One pass, blocking: the number of rows deleted."""
        now = self.clock() if now is None else now
        before = self.cutoff(now)
        removed = purge(self.database, before, stop=self._stop, busy_timeout_ms=self.busy_timeout_ms)
        self.removed += removed
        if removed:
            log.info("usage retention: removed %d rows from before %s (older than %g days)",
                     removed, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(before)), self.days)
        else:
            log.debug("usage retention: no rows older than %g days", self.days)
        return removed

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="usage retention")

    async def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            await task

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.to_thread(self.run_once)
            except (sqlite3.Error, store.SchemaTooNew) as e:
                # A locked or unwritable database: the rows wait for the next pass.
                log.warning("usage retention: pass failed, retrying in %g s: %s", self.interval, e)
            except Exception:  # noqa: BLE001 - a bug here must not take the hub's stop down with it
                log.exception("usage retention: pass failed, retrying in %g s", self.interval)
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
