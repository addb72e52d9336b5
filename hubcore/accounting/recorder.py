"""UsageRecorder, which takes usage events off the request path and into
SQLite: a bounded queue, one batch-writing task, and a Spool for whatever the
database cannot take yet, so that no event is ever lost. The batches go in
through accounting.sqlitewriter, or accounting.pgwriter on PostgreSQL;
everything else here is the same for both.
"""
from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Coroutine, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from hubcore import store
from hubcore.accounting import rollup
from hubcore.accounting._rows_py import Listener
from hubcore.accounting.rows import RecorderCore
from hubcore.accounting.spool import SPOOL_ERRORS, Spool, encode_line
from hubcore.accounting.sqlitewriter import SqliteUsageWriter
from hubcore.accounting.usage import UsageEvent
from hubcore.config import zone
from hubcore.database import PgTarget, is_postgres, target as as_target

if TYPE_CHECKING:
    from hubcore.accounting.pgwriter import PgUsageWriter

# Named explicitly, not after this module: operators filter on it.
log = logging.getLogger("hubcore.usage")

# Everything that can go wrong writing to SQLite: locked past the busy
# timeout, unwritable file, disk full, corruption, the connection already
# closed (sqlite3.Error), or a text SQLite cannot take as UTF-8 (a
# UnicodeEncodeError, a ValueError).
_DB_ERRORS = (sqlite3.Error, ValueError)

DEFAULT_CLOSE_TIMEOUT = 30.0  # seconds close() keeps trying when both DB and spool fail

# Models counted one by one among requests for models without a price; the
# rest are counted under OTHER_MODELS. Model ids come from client request
# bodies: the count, and the /metrics series made of it, must stay bounded.
UNPRICED_MODELS_MAX = 100
OTHER_MODELS = "_other"


class UsageRecorder(RecorderCore):
    """Queue of UsageEvents drained into SQLite by one writer task.

    Theory of operation. `record()` (the core's, compiled when built: see
    accounting.rows) appends to a deque and, only when the
    queue goes from empty to non-empty or reaches a full batch, sets an
    asyncio.Event; it never touches the database. The writer task wakes on
    that event, waits up to `flush_interval` for a batch to fill, and inserts
    at most `batch_max` events in one transaction. Events that cannot reach
    the database go to the spool, an append-only file of JSON lines:

    - queue full: `record()` appends the event to the spool at once;
    - database write fails: the batch is appended (and fsynced), the database
      is marked unhealthy and retried with exponential backoff; meanwhile new
      batches go straight to the spool, keeping a locked database from
      stalling the writer for a busy timeout per batch;
    - database write still waiting (on a lock, for up to the busy timeout)
      after a flush interval: the batch is copied to the spool and so is
      everything queued since, again at every further flush interval:
      whatever the busy timeout, an event waits in memory (where a kill -9
      loses it) for at most two flush intervals, one to fill its batch and
      one for the write to show it is stuck. Should the write then succeed,
      the batch's request ids are remembered and replay skips their spool
      copy (a crash in between leaves that to ON CONFLICT DO NOTHING);
    - the spool itself fails: the batch goes back to the front of the queue
      and is retried; memory is the last place an event can wait.

    After any successful database write, and at `start()`, the spool is
    replayed from where the last replay stopped and truncated once fully
    consumed. The replay only ever truncates when no append happened since it
    reached the end: every spool write runs on the event loop thread and the
    size check and the truncate happen with no await between them.
    """

    def __init__(
        self,
        db_path: str | Path,
        spool_path: str | Path,
        *,
        queue_max: int = 100_000,
        flush_interval: float = 0.2,
        batch_max: int = 2000,
        busy_timeout_ms: int = store.BUSY_TIMEOUT_MS,
        retry_max: float = 5.0,
        timezone: str = "UTC",
    ) -> None:
        if queue_max < 1 or batch_max < 1 or flush_interval <= 0:
            raise ValueError("queue_max and batch_max must be >= 1, flush_interval > 0")
        # The queue, its wake-up, the listeners and the closed flag: the core's.
        super().__init__(queue_max, batch_max)
        self._flush_interval = flush_interval
        self._retry_max = max(retry_max, flush_interval)
        # The reporting zone, whose local hours and days the rollups' are.
        self._zone = zone(timezone)

        # writer
        self._task: asyncio.Task[None] | None = None
        # The writer that takes the batches: PostgreSQL's imported only when
        # used (asyncpg takes a while to import).
        self._writer: SqliteUsageWriter | PgUsageWriter
        if isinstance(db_path, str) and is_postgres(db_path):
            from hubcore.accounting.pgwriter import PgUsageWriter

            self._writer = PgUsageWriter(as_target(db_path))
        else:
            self._writer = SqliteUsageWriter(db_path, busy_timeout_ms)
        self._closing = False
        self._close_deadline = 0.0
        # the batch an INSERT is writing, and whether the spool holds a copy
        self._in_flight: Sequence[UsageEvent] = ()
        self._in_flight_spooled = False

        # database health: retry_at is a monotonic time; 0 means "now"
        self._db_healthy = True
        self._retry_at = 0.0
        self._backoff = 0.0

        # spool
        self._spool = Spool(spool_path)
        self._spool_failing = False

        # counters
        self._written = 0
        self._spooled = 0
        self._replayed = 0
        self._ignored = 0
        self._unpriced = 0
        self._unpriced_models: dict[str, int] = {}
        self._last_error: str | None = None
        self._logged_error: str | None = None  # reset on recovery, so a relapse logs again

    # -- public API -----------------------------------------------------------

    async def start(self) -> None:
        """Migrate and open the database, align the rollups to the reporting
        zone, replay a leftover spool, start the writer."""
        if self._task is not None:
            raise RuntimeError("UsageRecorder already started")
        writer = self._writer
        if isinstance(writer, SqliteUsageWriter):
            await asyncio.to_thread(_migrate, writer.path, self._zone)
            await writer.open()
        else:
            await writer.open()
            await asyncio.to_thread(_migrate, writer.target, self._zone)
        spool = self._spool
        if spool.path.exists():
            try:
                spool.open(count_lines=True)
                leftover = spool.size()
            except OSError as exc:
                self._spool_failing = True
                self._note_error(f"cannot open usage spool {spool.path}", exc)
            else:
                if leftover:
                    log.info(
                        "replaying %d usage events spooled by a previous run from %s",
                        spool.lines, spool.path,
                    )
                    await self._replay_guarded()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="hubcore-usage-writer"
        )
        self._task.add_done_callback(self._writer_done)

    def _count_unpriced(self, model: str) -> None:
        self._unpriced += 1
        counts = self._unpriced_models
        if model not in counts and len(counts) >= UNPRICED_MODELS_MAX:
            model = OTHER_MODELS
        counts[model] = counts.get(model, 0) + 1

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(event)` synchronously in every `record()`; keep it cheap."""
        self._listeners.append(listener)

    async def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Write or spool everything queued, stop the writer, close the database.

        Only when neither the database nor the spool accepts events for
        `timeout` seconds are the remaining events given up, and then they are
        logged in full at CRITICAL level rather than dropped silently.
        """
        if self._closed:
            return
        self._closing = True
        self._close_deadline = time.monotonic() + timeout
        self._wake.set()
        if self._task is not None:
            try:
                await self._task
            except Exception:
                log.exception("usage writer failed; spooling what is left")
        # Not started, or the writer died: nothing will drain the queue now.
        if self._queue:
            events = list(self._queue)
            self._queue.clear()
            if not self._spool_quietly(events, sync=True):
                _log_lost(events)
        self._closed = True
        if self._spool.dirty:
            self._fsync_spool()
        self._close_spool()
        try:
            await self._writer.close()
        except _DB_ERRORS as exc:
            self._note_error("closing the usage database failed", exc)

    def stats(self) -> dict[str, Any]:
        return {
            "queue_depth": len(self._queue),
            "written": self._written,
            "spooled": self._spooled,
            "replayed": self._replayed,
            "spool_pending": self._spool.pending,
            "last_error": self._last_error,
            "unpriced": self._unpriced,
            "unpriced_models": dict(self._unpriced_models),
            "ignored": self._ignored,
            "spool_bad_lines": self._spool.bad_lines,
            "db_healthy": self._db_healthy,
        }

    # -- the writer task ------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if self._spool.dirty:
                self._fsync_spool()
            if self._queue:
                if not self._closing and len(self._queue) < self._batch_max:
                    await self._wait(self._flush_interval)
                if await self._flush_batch():
                    continue
                # Neither the database nor the spool took the batch.
                if self._closing and time.monotonic() >= self._close_deadline:
                    events = list(self._queue)
                    self._queue.clear()
                    _log_lost(events)
                    return
                await self._wait(self._flush_interval)
                continue
            if self._spool_pending() and self._retry_due():
                await self._replay_guarded()
                continue
            if self._closing:
                return
            await self._wait(self._retry_delay() if self._spool_pending() else None)

    async def _flush_batch(self) -> bool:
        """Move one batch to the database or the spool; False if neither took it."""
        queue = self._queue
        batch = [queue.popleft() for _ in range(min(len(queue), self._batch_max))]
        if self._retry_due():
            self._in_flight, self._in_flight_spooled = batch, False
            try:
                written = await self._await_db(self._insert(batch))
            except _DB_ERRORS as exc:
                self._db_failed(exc)
                if self._in_flight_spooled:
                    self._spooled += len(batch)
                    return True
            else:
                self._written += written
                if self._in_flight_spooled:
                    self._spool.skip([e.request_id for e in batch])
                self._db_ok()
                if self._spool_pending():
                    await self._replay_guarded()
                return True
            finally:
                self._in_flight, self._in_flight_spooled = (), False
        if self._spool_quietly(batch, sync=True):
            return True
        queue.extendleft(reversed(batch))
        return False

    async def _insert(self, events: Sequence[UsageEvent]) -> int:
        """Insert events in one transaction; return how many were new."""
        inserted = await self._writer.insert(events)
        if inserted < len(events):
            self._ignored += len(events) - inserted
        return inserted

    async def _await_db(self, write: Coroutine[Any, Any, int]) -> int:
        """Await a database write; while it waits, spool every flush interval."""
        task = asyncio.ensure_future(write)
        try:
            while True:
                done, _ = await asyncio.wait((task,), timeout=self._flush_interval)
                if done:
                    return task.result()
                self._spool_while_waiting()
        except BaseException:
            task.cancel()
            raise

    def _spool_while_waiting(self) -> None:
        # A write waiting on a lock holds its batch, and the queue grows
        # behind it: both go to the spool now, not after the busy timeout.
        if self._in_flight and not self._in_flight_spooled:
            # Counted as spooled only if the write then fails.
            self._in_flight_spooled = self._spool_quietly(
                self._in_flight, sync=True, counted=False
            )
        queue = self._queue
        if queue:
            events = list(queue)
            queue.clear()
            if not self._spool_quietly(events, sync=True):
                queue.extendleft(reversed(events))
        if self._spool.dirty:
            self._fsync_spool()

    async def _wait(self, timeout: float | None) -> None:
        self._wake.clear()
        if timeout is None:
            await self._wake.wait()
            return
        try:
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        except TimeoutError:
            pass

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._note_error("usage writer stopped", task.exception())

    # -- database health ------------------------------------------------------

    def _retry_due(self) -> bool:
        return self._db_healthy or time.monotonic() >= self._retry_at

    def _retry_delay(self) -> float:
        return max(0.0, self._retry_at - time.monotonic()) if not self._db_healthy else 0.0

    def _db_failed(
        self, exc: BaseException, what: str = "usage database write failed; spooling"
    ) -> None:
        self._note_error(what, exc)
        self._db_healthy = False
        self._backoff = min(self._retry_max, max(self._flush_interval, self._backoff * 2))
        self._retry_at = time.monotonic() + self._backoff

    def _db_ok(self) -> None:
        if not self._db_healthy:
            log.warning("usage database writable again")
            self._db_healthy = True
            self._recovered()
        self._backoff = 0.0
        self._retry_at = 0.0

    # -- the spool ------------------------------------------------------------

    def _spool_pending(self) -> bool:
        return self._spool.pending > 0

    def _spool_quietly(
        self, events: Sequence[UsageEvent], *, sync: bool, counted: bool = True
    ) -> bool:
        """Append events to the spool; False (and the error noted) if it failed."""
        try:
            self._spool.append(events, sync=sync)
        except SPOOL_ERRORS as exc:
            self._spool_failing = True
            self._note_error(f"cannot write usage spool {self._spool.path}", exc)
            return False
        if counted:
            self._spooled += len(events)
        if self._spool_failing:
            self._spool_failing = False
            log.warning("usage spool %s writable again", self._spool.path)
            self._recovered()
        return True

    def _overflow(self, event: UsageEvent) -> None:
        # The queue is full (or the writer is gone): the spool takes the event
        # now. fsync is left to the writer's next pass: a process crash keeps
        # what reached the kernel, and the request path cannot pay for a sync.
        if self._closed:
            # A straggler after shutdown: the next start() replays it.
            stored = self._spool_quietly([event], sync=True)
            self._close_spool()
            if not stored:
                _log_lost([event])
        elif not self._spool_quietly([event], sync=False):
            # Memory is the last place left; the writer drains it in time.
            self._queue.append(event)

    def _close_spool(self) -> None:
        try:
            self._spool.close()
        except OSError as exc:
            self._note_error(f"cannot close usage spool {self._spool.path}", exc)

    def _fsync_spool(self) -> None:
        try:
            self._spool.fsync()
        except OSError as exc:
            self._note_error(f"cannot fsync usage spool {self._spool.path}", exc)

    async def _replay_guarded(self) -> None:
        try:
            await self._replay()
        except _DB_ERRORS as exc:
            self._db_failed(exc)
        except OSError as exc:
            # Reading the spool failed; back off as for the database.
            self._db_failed(exc, f"cannot read usage spool {self._spool.path}")
        else:
            self._db_ok()

    async def _replay(self) -> None:
        """Insert the spool's unread complete lines; truncate it when all are in."""
        spool = self._spool
        for chunk in spool.read():
            events = chunk.events
            for i in range(0, len(events), self._batch_max):
                self._replayed += await self._await_db(self._insert(events[i:i + self._batch_max]))
            if chunk.bad:
                log.warning(
                    "skipped %d unreadable lines in usage spool %s before offset %d",
                    chunk.bad, spool.path, chunk.end,
                )
            if chunk.torn:
                log.warning(
                    "skipped a torn last line (%d bytes) in usage spool %s: "
                    "its writer died mid-write",
                    chunk.torn, spool.path,
                )
            spool.consume(chunk)
        spool.truncate_if_consumed()

    # -- errors ---------------------------------------------------------------

    def _recovered(self) -> None:
        # last_error describes the current failure (stats and metrics read it
        # as "failing"), so it clears once both the database and spool work.
        if self._db_healthy and not self._spool_failing:
            self._last_error = None
            self._logged_error = None

    def _note_error(self, what: str, exc: BaseException | None) -> None:
        text = f"{what}: {exc!r}" if exc is not None else what
        # Log each distinct failure once, not once per batch while it lasts.
        if text != self._logged_error:
            log.error("%s", text)
            self._logged_error = text
        self._last_error = text


def _migrate(database: Path | PgTarget, tz: ZoneInfo) -> None:
    conn = store.connect(database)
    try:
        rebuilt = rollup.prepare(conn, tz)
        if rebuilt:
            log.info("summed the usage rollups' %s again for the local time of %s", rebuilt, tz.key)
    finally:
        conn.close()


def _log_lost(events: Iterable[UsageEvent]) -> None:
    # Last resort: neither the database nor the spool would take these, so
    # the log is the only record left from which an operator can restore them.
    for event in events:
        log.critical("usage event not stored: %s", encode_line(event).decode().rstrip())
