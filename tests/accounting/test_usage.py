"""UsageRecorder against real SQLite files: batching, flushing, the spool, replay."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hubcore import store
from hubcore.accounting.recorder import UsageRecorder
from hubcore.accounting.usage import FIELDS, INSERT_SIZES, ROWS_PER_INSERT, Outcome, UsageEvent, insert_chunks
from tests.accounting.test_spool import LINE_WITHOUT_NEW_FIELDS, OLD_LINE

BASE_TS = 1_760_000_000.0


def make_event(i: int, **overrides: Any) -> UsageEvent:
    fields: dict[str, Any] = dict(
        ts=BASE_TS + i,
        request_id=f"req-{i:06d}",
        endpoint="/v1/messages",
        status=200,
        outcome="ok",
        total_ms=100.0 + i,
        token_id=7,
        user="alice",
        project="hub",
        upstream="anthropic",
        key_label="key-a",
        model="claude-sonnet-4-5",
        input_tokens=10 + i,
        output_tokens=20 + i,
        cache_write_5m=3,
        cache_write_1h=4,
        cache_read=1000 + i,
        reasoning_tokens=2,
        server_tool_requests=1,
        stop_reason="end_turn",
        cost_micros=1234 + i,
        ttfb_ms=50.5,
        attempts=1,
        session_id="sess-1",
        user_agent="claude-cli/2.0.0 (external, cli)",
    )
    fields.update(overrides)
    return UsageEvent(**fields)


def db_request_ids(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return [r[0] for r in conn.execute("SELECT request_id FROM usage ORDER BY request_id")]
    finally:
        conn.close()


def spool_lines(spool: Path) -> list[bytes]:
    if not spool.exists():
        return []
    return [line for line in spool.read_bytes().split(b"\n") if line]


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


class Lock:
    """Another connection holding the database's write lock, as a second
    process (a CLI, a backup) would; root ignores file modes, not locks."""

    def __init__(self, db: Path) -> None:
        self.conn = sqlite3.connect(db, isolation_level=None)

    def __enter__(self) -> Lock:
        self.conn.execute("BEGIN EXCLUSIVE")
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "hub.db"


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "usage.spool"


@pytest.fixture
async def recorder_factory(
    db: Path, spool: Path
) -> AsyncIterator[Callable[..., UsageRecorder]]:
    made: list[UsageRecorder] = []

    def make(**kwargs: Any) -> UsageRecorder:
        kwargs.setdefault("busy_timeout_ms", 20)
        kwargs.setdefault("retry_max", 0.2)
        recorder = UsageRecorder(db, spool, **kwargs)
        made.append(recorder)
        return recorder

    yield make
    for recorder in made:
        await recorder.close(timeout=2)


async def test_row_appears_within_flush_interval_and_round_trips(
    recorder_factory: Callable[..., UsageRecorder], db: Path
) -> None:
    recorder = recorder_factory(flush_interval=0.05)
    await recorder.start()
    events = [make_event(i) for i in range(3)]
    recorder.record(events[0])
    await eventually(lambda: len(db_request_ids(db)) == 1)
    # Now the writer is idle: the next event alone must wake it.
    for event in events[1:]:
        recorder.record(event)
    # No further events and no close(): only the flush interval can write them.
    await eventually(lambda: len(db_request_ids(db)) == 3)
    # The commit is visible to other connections a moment before the writer's
    # coroutine resumes and counts it.
    await eventually(lambda: recorder.stats()["written"] == 3)

    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        stored = conn.execute(
            f"SELECT {', '.join(FIELDS)} FROM usage WHERE request_id = 'req-000002'"
        ).fetchone()
    finally:
        conn.close()
    assert dict(stored) == dataclasses.asdict(events[2])


async def test_nones_bools_and_outcomes_are_stored_as_sqlite_null_integer_and_text(
    recorder_factory: Callable[..., UsageRecorder], db: Path
) -> None:
    """usage.py binds None, bool and Outcome through its own sqlite3
    adapters (cheaper than sqlite3's lookup): the stored types must be the
    ones sqlite3 would store without them, which the dashboard's sums and
    filters read."""
    recorder = recorder_factory(flush_interval=0.05)
    await recorder.start()
    recorder.record(make_event(0, outcome=Outcome.UPSTREAM_ABORTED, output_estimated=True, model=None,
                               cost_micros=None, ttfb_ms=None))
    recorder.record(make_event(1, outcome=Outcome.OK, output_estimated=False))
    await eventually(lambda: recorder.stats()["written"] == 2)
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT outcome, typeof(outcome), output_estimated, typeof(output_estimated), typeof(model),"
            " typeof(cost_micros), typeof(ttfb_ms) FROM usage ORDER BY request_id"
        ).fetchall()
    finally:
        conn.close()
    assert rows == [
        ("upstream_aborted", "text", 1, "integer", "null", "null", "null"),
        ("ok", "text", 0, "integer", "text", "integer", "real"),
    ]


@given(rows=st.integers(0, 20_000))
def test_a_batch_goes_in_as_few_statements_of_the_few_prepared_sizes(rows: int) -> None:
    chunks = insert_chunks(rows)
    assert sum(size * statements for size, statements in chunks) == rows
    sizes = [size for size, _ in chunks]
    assert sizes == sorted(set(sizes), reverse=True) and set(sizes) <= set(INSERT_SIZES)
    # Each smaller size only takes what the larger one left: fewer rows than it.
    for size, statements in chunks:
        larger = [s for s in INSERT_SIZES if s > size]
        assert not larger or size * statements < min(larger)
    assert INSERT_SIZES[0] * len(FIELDS) <= sqlite3.connect(":memory:").getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)


async def test_full_batches_do_not_wait_for_the_interval(
    recorder_factory: Callable[..., UsageRecorder], db: Path
) -> None:
    recorder = recorder_factory(flush_interval=60.0, batch_max=10)
    await recorder.start()
    for i in range(25):
        recorder.record(make_event(i))
    await eventually(lambda: len(db_request_ids(db)) >= 20)
    # Two full batches went at once; the partial one waits for the interval.
    assert len(db_request_ids(db)) == 20
    assert recorder.stats()["queue_depth"] == 5
    await recorder.close()
    assert len(db_request_ids(db)) == 25


async def test_close_flushes_everything(
    recorder_factory: Callable[..., UsageRecorder], db: Path, spool: Path
) -> None:
    recorder = recorder_factory(flush_interval=60.0, batch_max=64)
    await recorder.start()
    for i in range(500):
        recorder.record(make_event(i))
    await recorder.close()
    assert db_request_ids(db) == [f"req-{i:06d}" for i in range(500)]
    stats = recorder.stats()
    assert (stats["written"], stats["spooled"], stats["queue_depth"]) == (500, 0, 0)
    assert spool_lines(spool) == []


async def test_batches_of_many_statements_keep_every_column_and_skip_duplicates(
    recorder_factory: Callable[..., UsageRecorder], db: Path
) -> None:
    """A batch goes in as several multi-row INSERTs (ROWS_PER_INSERT rows
    each, then the rest in statements of each smaller size of
    INSERT_SIZES): every column of every row lands where it belongs, and
    duplicates anywhere in the batch are counted as ignored, not written."""
    events = [make_event(i, user=f"user-{i}", model=f"model-{i % 7}", stop_reason=None if i % 3 else "max_tokens",
                         ttfb_ms=None if i % 5 == 0 else i / 8)
              for i in range(3 * ROWS_PER_INSERT + sum(INSERT_SIZES[1:]))]
    assert [size for size, _ in insert_chunks(len(events) - ROWS_PER_INSERT)] == list(INSERT_SIZES)
    first = recorder_factory(flush_interval=60.0, batch_max=len(events))
    await first.start()
    for event in events[: 2 * ROWS_PER_INSERT]:
        first.record(event)
    await first.close()
    second = recorder_factory(flush_interval=60.0, batch_max=len(events))
    await second.start()
    for event in events[ROWS_PER_INSERT:]:  # its first ROWS_PER_INSERT are already written
        second.record(event)
    await second.close()
    stats = second.stats()
    assert (stats["written"], stats["ignored"]) == (len(events) - 2 * ROWS_PER_INSERT, ROWS_PER_INSERT)

    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        stored = [dict(r) for r in conn.execute(f"SELECT {', '.join(FIELDS)} FROM usage ORDER BY request_id")]
    finally:
        conn.close()
    assert stored == [dataclasses.asdict(e) for e in events]


async def test_full_queue_spills_to_the_spool_then_replays(
    recorder_factory: Callable[..., UsageRecorder], db: Path, spool: Path
) -> None:
    recorder = recorder_factory(queue_max=5, flush_interval=60.0)
    await recorder.start()
    for i in range(12):
        recorder.record(make_event(i))
    # Synchronously, before the writer ran at all.
    assert len(spool_lines(spool)) == 7
    stats = recorder.stats()
    assert (stats["queue_depth"], stats["spooled"], stats["spool_pending"]) == (5, 7, 7)

    await recorder.close()
    assert db_request_ids(db) == [f"req-{i:06d}" for i in range(12)]
    stats = recorder.stats()
    assert (stats["written"], stats["replayed"], stats["spool_pending"]) == (5, 7, 0)
    assert spool.stat().st_size == 0


async def test_locked_database_spools_then_replays_exactly_once(
    recorder_factory: Callable[..., UsageRecorder], db: Path, spool: Path
) -> None:
    recorder = recorder_factory(flush_interval=0.02, batch_max=8)
    await recorder.start()
    for i in range(10):
        recorder.record(make_event(i))
    await eventually(lambda: recorder.stats()["written"] == 10)

    with Lock(db):
        for i in range(10, 40):
            recorder.record(make_event(i))
            if i % 7 == 0:
                await asyncio.sleep(0.03)  # several batches, across backoff retries
        await eventually(lambda: recorder.stats()["spooled"] == 30)
        stats = recorder.stats()
        assert stats["written"] == 10
        assert stats["spool_pending"] == 30
        assert stats["db_healthy"] is False
        assert "locked" in (stats["last_error"] or "")
        assert len(spool_lines(spool)) == 30

    # No new event is needed: the writer retries on its own.
    await eventually(lambda: recorder.stats()["spool_pending"] == 0)
    for i in range(40, 50):
        recorder.record(make_event(i))
    await eventually(lambda: recorder.stats()["written"] == 20)

    assert db_request_ids(db) == [f"req-{i:06d}" for i in range(50)]
    stats = recorder.stats()
    assert (stats["spooled"], stats["replayed"], stats["ignored"]) == (30, 30, 0)
    assert stats["db_healthy"] is True
    assert stats["last_error"] is None  # recovered: no longer failing
    assert spool.stat().st_size == 0


async def test_unwritable_spool_keeps_events_in_memory(
    tmp_path: Path, db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool_dir = tmp_path / "spool-is-a-directory"
    spool_dir.mkdir()
    recorder = UsageRecorder(
        db, spool_dir, flush_interval=0.02, busy_timeout_ms=20, retry_max=0.1
    )
    await recorder.start()
    try:
        with caplog.at_level(logging.ERROR, logger="hubcore.usage"), Lock(db):
            for i in range(5):
                recorder.record(make_event(i))
            # Back at the front of the queue after both the database and the spool failed.
            await eventually(
                lambda: recorder.stats()["queue_depth"] == 5
                and "cannot write usage spool" in (recorder.stats()["last_error"] or "")
            )
            assert recorder.stats()["spooled"] == 0
        assert "cannot write usage spool" in caplog.text
        await eventually(lambda: recorder.stats()["written"] == 5)
    finally:
        await recorder.close(timeout=2)
    assert db_request_ids(db) == [f"req-{i:06d}" for i in range(5)]


async def test_torn_and_garbled_spool_lines_are_skipped(
    recorder_factory: Callable[..., UsageRecorder], db: Path, spool: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    lines = [orjson.dumps(make_event(i)) + b"\n" for i in range(4)]
    torn = orjson.dumps(make_event(99))[:40]  # kill -9 in the middle of a write
    spool.write_bytes(lines[0] + lines[1] + b"{not json\n" + lines[2] + lines[3] + torn)

    recorder = recorder_factory()
    with caplog.at_level(logging.WARNING, logger="hubcore.usage"):
        await recorder.start()
    assert db_request_ids(db) == [f"req-{i:06d}" for i in range(4)]
    stats = recorder.stats()
    assert (stats["replayed"], stats["spool_bad_lines"], stats["spool_pending"]) == (4, 2, 0)
    assert "torn last line" in caplog.text
    assert spool.stat().st_size == 0


async def test_new_appends_after_a_torn_line_start_on_their_own_line(
    recorder_factory: Callable[..., UsageRecorder], db: Path, spool: Path
) -> None:
    spool.write_bytes(orjson.dumps(make_event(0)) + b"\n" + orjson.dumps(make_event(1))[:30])
    await asyncio.to_thread(lambda: store.connect(db).close())
    first = recorder_factory(queue_max=1, flush_interval=0.02)
    with Lock(db):
        await first.start()  # the replay fails under the lock: the spool stays
        assert first.stats()["db_healthy"] is False
        first.record(make_event(2))  # queued
        first.record(make_event(3))  # queue full: appended after the torn line
        await first.close()
    # Whatever the first run could not write, the next one replays.
    second = recorder_factory()
    await second.start()
    assert db_request_ids(db) == ["req-000000", "req-000002", "req-000003"]
    assert first.stats()["spool_bad_lines"] + second.stats()["spool_bad_lines"] == 1
    assert spool.stat().st_size == 0


async def test_events_spooled_during_a_replay_are_not_truncated_away(
    recorder_factory: Callable[..., UsageRecorder], db: Path, spool: Path
) -> None:
    # A long spool replayed in many small transactions, while a full queue
    # keeps appending to the same spool.
    spool.write_bytes(b"".join(orjson.dumps(make_event(i)) + b"\n" for i in range(3000)))
    recorder = recorder_factory(queue_max=1, batch_max=50, flush_interval=0.02)
    starting = asyncio.get_running_loop().create_task(recorder.start())
    n = 3000
    while not starting.done():
        recorder.record(make_event(n))
        n += 1
        await asyncio.sleep(0)
    await starting
    assert n > 3002, "no event was recorded while the spool was replayed"
    await recorder.close()
    second = recorder_factory()
    await second.start()
    assert db_request_ids(db) == [f"req-{i:06d}" for i in range(n)]


async def test_restart_replays_the_spool_and_replays_are_idempotent(
    db: Path, spool: Path, recorder_factory: Callable[..., UsageRecorder]
) -> None:
    first = recorder_factory(flush_interval=0.02)
    await first.start()
    with Lock(db):
        for i in range(20):
            first.record(make_event(i))
        await first.close()  # the database stays locked: all 20 go to the spool
    assert first.stats()["written"] == 0
    assert first.stats()["spooled"] == 20
    saved = spool.read_bytes()
    assert len(spool_lines(spool)) == 20
    assert db_request_ids(db) == []

    second = recorder_factory()
    await second.start()
    assert db_request_ids(db) == [f"req-{i:06d}" for i in range(20)]
    assert second.stats()["replayed"] == 20
    assert spool.stat().st_size == 0
    await second.close()

    spool.write_bytes(saved)  # the same spool again, as after a crash mid-truncate
    third = recorder_factory()
    await third.start()
    stats = third.stats()
    assert (stats["replayed"], stats["ignored"]) == (0, 20)
    assert len(db_request_ids(db)) == 20


async def test_record_after_close_is_spooled_for_the_next_run(
    db: Path, spool: Path, recorder_factory: Callable[..., UsageRecorder]
) -> None:
    first = recorder_factory()
    await first.start()
    await first.close()
    first.record(make_event(1))  # a straggler after shutdown
    assert len(spool_lines(spool)) == 1

    second = recorder_factory()
    await second.start()
    assert db_request_ids(db) == ["req-000001"]


async def test_listeners_and_unpriced_count(
    recorder_factory: Callable[..., UsageRecorder], caplog: pytest.LogCaptureFixture
) -> None:
    recorder = recorder_factory()
    seen: list[str] = []

    def broken(event: UsageEvent) -> None:
        raise RuntimeError("listener bug")

    recorder.add_listener(broken)
    recorder.add_listener(lambda e: seen.append(e.request_id))
    await recorder.start()
    with caplog.at_level(logging.ERROR, logger="hubcore.usage"):
        recorder.record(make_event(1))
        recorder.record(make_event(2, cost_micros=None))              # unpriced
        recorder.record(make_event(3, cost_micros=None, model=None))  # no model: not unpriced
    assert seen == ["req-000001", "req-000002", "req-000003"]
    assert "listener bug" in caplog.text
    assert recorder.stats()["unpriced"] == 1
    assert recorder.stats()["queue_depth"] == 3


def test_migrate_from_an_empty_database_and_again(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.write_bytes(b"")  # SQLite reads an empty file as a version-0 database
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        assert store.migrate(conn) == 0
        assert conn.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION
        columns = {r[1] for r in conn.execute("PRAGMA table_info(usage)")}
        assert set(FIELDS) <= columns
        schema = conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
        assert store.migrate(conn) == store.SCHEMA_VERSION
        assert conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == schema
    finally:
        conn.close()


async def test_start_migrates_an_empty_database(
    recorder_factory: Callable[..., UsageRecorder], db: Path
) -> None:
    db.write_bytes(b"")
    recorder = recorder_factory()
    await recorder.start()
    recorder.record(make_event(5))
    await recorder.close()
    assert db_request_ids(db) == ["req-000005"]


# -- a write stuck behind a lock -----------------------------------------------------

def spooled_request_ids(spool: Path) -> set[str]:
    return {orjson.loads(line)["request_id"] for line in spool_lines(spool)}


async def test_a_write_stuck_on_a_lock_spools_everything_within_a_flush_interval(
    recorder_factory: Callable[..., UsageRecorder], db: Path, spool: Path
) -> None:
    """A busy timeout far longer than the flush interval: the batch being
    written and every event recorded meanwhile reach the spool one flush
    interval after they would have reached the database, so a kill -9 under
    the lock loses at most that interval; once the lock goes, each event is
    stored exactly once."""
    flush = 0.05
    margin = 1.0  # scheduling on a busy machine, not the mechanism under test
    recorder = recorder_factory(flush_interval=flush, busy_timeout_ms=10_000, batch_max=8)
    await recorder.start()
    recorded: list[str] = []
    with Lock(db):
        for n in range(30):
            event = make_event(n)
            recorder.record(event)
            recorded.append(event.request_id)
            if n % 5 == 4:
                await asyncio.sleep(flush)  # traffic spread over several flush intervals
        await eventually(lambda: spooled_request_ids(spool) == set(recorded), timeout=flush + margin)
        # Still under the lock, and still inside the first write's busy timeout.
        stats = recorder.stats()
        assert (stats["queue_depth"], stats["written"]) == (0, 0)
        assert db_request_ids(db) == []

    await eventually(lambda: recorder.stats()["spool_pending"] == 0)
    conn = sqlite3.connect(db)
    try:
        counts = dict(conn.execute("SELECT request_id, COUNT(*) FROM usage GROUP BY request_id"))
    finally:
        conn.close()
    assert counts == dict.fromkeys(recorded, 1)
    stats = recorder.stats()
    # The stuck write went in once the lock was gone; replay skipped its spool copy.
    assert stats["written"] > 0
    assert (stats["written"] + stats["replayed"], stats["ignored"]) == (30, 0)
    assert stats["spooled"] == stats["replayed"]
    assert spool.stat().st_size == 0


# -- output_estimated ---------------------------------------------------------------

async def test_output_estimated_round_trips_through_the_spool_and_old_lines_read_false(
    recorder_factory: Callable[..., UsageRecorder], db: Path, spool: Path
) -> None:
    first = recorder_factory(flush_interval=0.02)
    await first.start()
    with Lock(db):
        first.record(make_event(1, output_estimated=True))
        first.record(make_event(2))
        await first.close()  # locked throughout: both go to the spool
    written = {orjson.loads(line)["request_id"]: orjson.loads(line)["output_estimated"] for line in spool_lines(spool)}
    assert written == {"req-000001": True, "req-000002": False}
    # A line spooled by a hubcore from before the field.
    old = {k: v for k, v in dataclasses.asdict(make_event(3)).items() if k != "output_estimated"}
    with spool.open("ab") as f:
        f.write(orjson.dumps(old) + b"\n")

    second = recorder_factory()
    await second.start()
    conn = sqlite3.connect(db)
    try:
        stored = dict(conn.execute("SELECT request_id, output_estimated FROM usage"))
    finally:
        conn.close()
    assert stored == {"req-000001": 1, "req-000002": 0, "req-000003": 0}
    assert second.stats()["spool_bad_lines"] == 0


async def test_a_database_from_before_output_estimated_is_migrated_on_open(
    recorder_factory: Callable[..., UsageRecorder], db: Path
) -> None:
    old_version = 2  # the last schema without usage.output_estimated
    raw = sqlite3.connect(db, isolation_level=None)
    try:
        for migration in store.MIGRATIONS[:old_version]:
            raw.executescript(migration)
        raw.execute(f"PRAGMA user_version = {old_version}")
        raw.execute(
            "INSERT INTO usage (ts, request_id, endpoint, status, outcome, total_ms)"
            " VALUES (1.0, 'old-row', '/v1/messages', 200, 'ok', 5.0)"
        )
        assert "output_estimated" not in {r[1] for r in raw.execute("PRAGMA table_info(usage)")}
    finally:
        raw.close()

    recorder = recorder_factory()
    await recorder.start()
    recorder.record(make_event(1, output_estimated=True))
    await recorder.close()

    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION
        stored = dict(conn.execute("SELECT request_id, output_estimated FROM usage"))
    finally:
        conn.close()
    assert stored == {"old-row": 0, "req-000001": 1}


async def test_a_spool_left_by_the_hubcore_before_the_spool_class_replays(
    recorder_factory: Callable[..., UsageRecorder], db: Path, spool: Path
) -> None:
    spool.write_bytes(OLD_LINE + LINE_WITHOUT_NEW_FIELDS)
    recorder = recorder_factory()
    await recorder.start()
    assert db_request_ids(db) == ["req-old", "req-older"]
    stats = recorder.stats()
    assert (stats["replayed"], stats["spool_bad_lines"], stats["spool_pending"]) == (2, 0, 0)
    assert spool.stat().st_size == 0
