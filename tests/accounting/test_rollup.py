"""The usage rollups against the raw rows they sum, on real SQLite: every
row counted once whatever is replayed, nothing lost when raw rows are
deleted, local hours and days in zones with DST and with half-hour
offsets, a zone change at start, the migration's backfill, the sums of a
batch (rollup.add) equal to those the trigger before it made row by row, and
reports that give `hubcore usage`'s numbers for any range."""
from __future__ import annotations

import asyncio
import dataclasses
import math
import sqlite3
from collections.abc import Iterator, Sequence
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hubcore import store
from hubcore.accounting import report, rollup
from hubcore.accounting.recorder import UsageRecorder
from hubcore.accounting.rollup import Zone
from hubcore.accounting.spool import Spool
from hubcore.accounting.usage import FIELDS, INSERT_SQL, UsageEvent
from hubcore.dashboard import reports
from tests.storage.conftest import INSERT_USAGE as STORAGE_INSERT

BERLIN, KOLKATA, LORD_HOWE = ZoneInfo("Europe/Berlin"), ZoneInfo("Asia/Kolkata"), ZoneInfo("Australia/Lord_Howe")
UTC = ZoneInfo("UTC")
ZONES = (UTC, BERLIN, KOLKATA, LORD_HOWE, ZoneInfo("America/St_Johns"))
# Both of Berlin's 2026 changes, Lord Howe's half-hour one, Kolkata's midnight at 18:30 UTC.
WINDOW_START = datetime(2026, 3, 27, tzinfo=timezone.utc).timestamp()
SPRING, AUTUMN = datetime(2026, 3, 29, 1, tzinfo=timezone.utc).timestamp(), datetime(2026, 10, 25, 1, tzinfo=timezone.utc).timestamp()

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def event(ts: float, request_id: str, **fields: Any) -> UsageEvent:
    base: dict[str, Any] = dict(ts=ts, request_id=request_id, endpoint="/v1/messages", status=200, outcome="ok",
                                total_ms=10.0)
    base.update(fields)
    return UsageEvent(**base)


def insert(conn: sqlite3.Connection, events: Sequence[UsageEvent]) -> None:
    """As the recorder writes: ON CONFLICT DO NOTHING, a replayed request_id
    skipped, and the rows inserted added to the rollups before COMMIT."""
    with store.immediate(conn), rollup.adding(conn):
        conn.executemany(INSERT_SQL, [tuple(getattr(e, f) for f in FIELDS) for e in events])


def storage_values(e: UsageEvent) -> list[Any]:
    """An event's row for the portable INSERT (output_estimated as 0 or 1)."""
    values = [getattr(e, f) for f in FIELDS]
    values[FIELDS.index("output_estimated")] = int(e.output_estimated)
    return values


def open_db(path: str | Path = ":memory:", tz: ZoneInfo = UTC) -> sqlite3.Connection:
    conn = store.connect(path)
    rollup.prepare(conn, tz)
    return conn


def schema_at(path: str | Path, version: int) -> sqlite3.Connection:
    """A database of schema `version`, as a hubcore of then left it."""
    conn = sqlite3.connect(path, isolation_level=None)
    for number, script in enumerate(store.MIGRATIONS[:version]):
        for statement in store._split(script):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {number + 1}")
    return conn


@pytest.fixture
def conn() -> Iterator[sqlite3.Connection]:
    connection = open_db()
    yield connection
    connection.close()


# -- what the rollups must hold, computed from the raw rows in Python ---------------------

RAW = ("ts", "user", "project", "model", "served_model", "upstream", "key_label", "token_id", "outcome",
       "input_tokens", "output_tokens", "cache_write_5m", "cache_write_1h", "cache_read", "reasoning_tokens",
       "cost_micros", "cost_basis", "ttfb_ms")


def raw_rows(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    return [dict(zip(RAW, row)) for row in conn.execute(f"SELECT {', '.join(RAW)} FROM usage")]


def counters_of(row: dict[str, Any]) -> list[float]:
    return [
        1, row["outcome"] != "ok", row["input_tokens"], row["output_tokens"], row["cache_write_5m"],
        row["cache_write_1h"], row["cache_read"], row["reasoning_tokens"], row["cost_micros"] or 0,
        row["cost_basis"] is not None or (row["cost_micros"] is None and row["model"] is not None),
        row["cost_basis"] == "estimate", row["ttfb_ms"] is not None, row["ttfb_ms"] or 0.0,
    ]


def expected(conn: sqlite3.Connection, key_of: Any, dims: Sequence[str] = rollup.DIMENSIONS) -> dict[tuple[Any, ...], list[float]]:
    found: dict[tuple[Any, ...], list[float]] = {}
    for row in raw_rows(conn):
        key = (key_of(row["ts"]), *(rollup.ABSENT[d] if row[d] is None else row[d] for d in dims))
        total = found.setdefault(key, [0] * len(rollup.COUNTERS))
        for i, value in enumerate(counters_of(row)):
            total[i] += value
    return found


def stored(conn: sqlite3.Connection, table: str) -> dict[tuple[Any, ...], list[float]]:
    width = 1 + len(rollup.DAY_TABLES.get(table, rollup.DIMENSIONS))
    return {tuple(row[:width]): list(row[width:]) for row in conn.execute(f"SELECT * FROM {table}")}


def assert_same(got: dict[tuple[Any, ...], list[float]], want: dict[tuple[Any, ...], list[float]]) -> None:
    assert got.keys() == want.keys()
    for key, values in want.items():
        assert got[key][:-1] == values[:-1], key
        assert math.isclose(got[key][-1], values[-1], rel_tol=1e-9, abs_tol=1e-6), key  # ttfb: a float sum


def assert_rollups_match(conn: sqlite3.Connection, tz: ZoneInfo) -> None:
    zone = Zone(tz)
    assert_same(stored(conn, "usage_hourly"), expected(conn, zone.bucket))
    for table, dims in rollup.DAY_TABLES.items():
        assert_same(stored(conn, table), expected(conn, zone.day, dims))
    histogram: dict[tuple[int, int], int] = {}
    bins = rollup.ttfb_bins(conn)
    for row in raw_rows(conn):
        if row["ttfb_ms"] is not None:
            bin_ = max(i for i, lower in enumerate(bins) if lower <= row["ttfb_ms"]) if row["ttfb_ms"] >= 0 else 0
            key = (zone.bucket(row["ts"]), bin_)
            histogram[key] = histogram.get(key, 0) + 1
    assert dict(((h, b), n) for h, b, n in conn.execute("SELECT hour, bin, requests FROM usage_ttfb_hourly")) == histogram


# -- random usage -------------------------------------------------------------------------

names = st.sampled_from(["alice", "bob", "<b>x</b>", None])
events = st.builds(
    event,
    # To the millisecond, as SQLite's date functions (the CLI's days) read a time.
    ts=st.integers(0, 4 * 86400 * 1000).map(lambda ms: WINDOW_START + ms / 1000),
    request_id=st.integers(0, 60).map(lambda n: f"req-{n}"),   # a small pool: duplicates come up
    user=names,
    project=st.sampled_from(["p1", "p2", None]),
    model=st.sampled_from(["claude-sonnet-4-6", "gpt-5", None]),
    served_model=st.sampled_from([None, "claude-sonnet-4-6-20260101"]),
    upstream=st.sampled_from(["anthropic", "backup", None]),
    key_label=st.sampled_from(["key-a", "key-b", None]),
    token_id=st.sampled_from([1, 2, 3, None]),
    outcome=st.sampled_from(["ok", "ok", "upstream_error", "refused", "client_aborted"]),
    input_tokens=st.integers(0, 5000),
    output_tokens=st.integers(0, 5000),
    cache_write_5m=st.integers(0, 100),
    cache_write_1h=st.integers(0, 100),
    cache_read=st.integers(0, 10_000),
    reasoning_tokens=st.integers(0, 50),
    cost_micros=st.one_of(st.none(), st.integers(0, 10_000_000)),
    cost_basis=st.sampled_from([None, None, "estimate", "free", "unknown"]),
    ttfb_ms=st.one_of(st.none(), st.floats(0, 600_000), st.floats(-5, 0)),
)
batches = st.lists(st.lists(events, max_size=30), min_size=1, max_size=4)


@SETTINGS
@given(batches=batches, tz=st.sampled_from(ZONES))
def test_the_rollups_equal_a_group_by_over_the_raw_rows_whatever_is_inserted_twice(
    batches: list[list[UsageEvent]], tz: ZoneInfo,
) -> None:
    conn = open_db(tz=tz)
    try:
        for batch in batches:
            insert(conn, batch)
            insert(conn, batch)  # a replay: nothing more
        assert_rollups_match(conn, tz)
    finally:
        conn.close()


def test_the_rollups_buckets_are_the_zones_local_hours_and_days() -> None:
    # Every phase and offset change of these zones over decades, as SQLite
    # computes them in rollup.add and Python in Zone.
    for tz in ZONES:
        conn = open_db(tz=tz)
        zone = Zone(tz)
        moments = [1e9 + i * 7919.37 for i in range(0, 120_000, 7)]
        for ts in moments[::50]:
            local = datetime.fromtimestamp(ts, tz)
            assert zone.day(ts) == local.date().toordinal() - rollup.EPOCH_ORDINAL
            start = datetime.fromtimestamp(zone.bucket(ts), tz)
            assert start.date() == local.date() and start.minute == 0 and start.second == 0
            assert 0 <= ts - zone.bucket(ts) < 3600
        found = conn.execute(
            f"SELECT {rollup.bucket_sql(':ts')}, {rollup.day_sql(':ts')}", {"ts": moments[3]}).fetchone()
        assert found == (zone.bucket(moments[3]), zone.day(moments[3]))
        insert(conn, [event(ts, f"r{i}") for i, ts in enumerate(moments[::40])])
        assert_rollups_match(conn, tz)
        conn.close()


def test_a_zones_offsets_are_the_ones_zoneinfo_gives() -> None:
    for tz in ZONES:
        zone = Zone(tz)
        for ts in range(0, 4_100_000_000, 3_333_331):
            assert zone.offset(ts) == datetime.fromtimestamp(ts, tz).utcoffset().total_seconds()  # type: ignore[union-attr]
    assert rollup.offsets(UTC) == ((rollup.EARLIEST, 0),)
    assert len({offset % 3600 for _, offset in rollup.offsets(BERLIN)}) == 1  # DST moves no hour


# -- the write path -----------------------------------------------------------------------


async def test_a_spool_replayed_over_rows_already_written_counts_each_once(tmp_path: Path) -> None:
    db, spool_path = tmp_path / "hub.db", tmp_path / "usage.spool"
    written = [event(WINDOW_START + i * 600, f"req-{i}", user="alice", cost_micros=1000 + i, ttfb_ms=120.0 + i)
               for i in range(40)]
    first = UsageRecorder(db, spool_path, flush_interval=0.01, timezone="Asia/Kolkata")
    await first.start()
    for e in written:
        first.record(e)
    await first.close()
    # A crash after the database took the batch but before the spool
    # forgot it: the next start replays every line again.
    spool = Spool(spool_path)
    spool.append([*written, event(WINDOW_START + 99, "req-new", user="bob", cost_micros=7)], sync=True)
    spool.close()
    second = UsageRecorder(db, spool_path, flush_interval=0.01, timezone="Asia/Kolkata")
    await second.start()
    stats = second.stats()
    await second.close()
    assert stats["ignored"] == 40 and stats["replayed"] == 1
    conn = open_db(db, KOLKATA)
    try:
        assert_rollups_match(conn, KOLKATA)
        (requests, cost), = conn.execute("SELECT SUM(requests), SUM(cost_micros) FROM usage_daily_models").fetchall()
        assert (requests, cost) == (41, sum(1000 + i for i in range(40)) + 7)
    finally:
        conn.close()


def test_deleting_raw_rows_leaves_the_rollups_and_the_reports(conn: sqlite3.Connection) -> None:
    insert(conn, [event(WINDOW_START + i * 997.3, f"req-{i}", user=("alice", "bob")[i % 2], cost_micros=i)
                  for i in range(300)])
    zone = Zone(UTC)
    before = {t: stored(conn, t) for t in ("usage_hourly", *rollup.DAY_TABLES, "usage_ttfb_hourly")}
    report_before = reports.usage(conn, zone, "user")
    # What `usage_retention_days` does: delete old raw rows, nothing else.
    with store.immediate(conn):
        conn.execute("DELETE FROM usage WHERE ts < ?", (WINDOW_START + 2 * 86400,))
    assert conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0] < 300
    assert {t: stored(conn, t) for t in before} == before
    assert reports.usage(conn, zone, "user") == report_before
    assert report_before[1].requests == 300 and report_before[1].cost_micros == sum(range(300))


def test_the_migration_backfills_the_rows_it_finds(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = schema_at(path, next(i for i, script in enumerate(store.MIGRATIONS) if "CREATE TABLE usage_hourly" in script))
    rows = [event(WINDOW_START + i * 1234.5, f"req-{i}", user=("a", None)[i % 2], model="m", cost_micros=i or None,
                  ttfb_ms=float(i)) for i in range(200)]
    old.executemany(INSERT_SQL, [tuple(getattr(e, f) for f in FIELDS) for e in rows])
    old.close()
    conn = store.connect(path)
    try:
        assert_rollups_match(conn, UTC)
        assert conn.execute("SELECT SUM(requests) FROM usage_hourly").fetchone()[0] == 200
    finally:
        conn.close()


def test_on_both_engines_the_rollups_reports_and_zone_changes_agree_with_the_raw_rows(database: str) -> None:
    conn = store.connect(database)
    try:
        rollup.prepare(conn, UTC)
        rows = [
            event(WINDOW_START + i * 733.3, f"req-{i % 250}", user=("alice", "bob", None)[i % 3],
                  project=("p1", None)[i % 2], model=("m1", "m2", None)[i % 3], upstream=("a", "b")[i % 2],
                  key_label=("k1", "k2", None)[i % 3], token_id=(1, 2, None)[i % 3], served_model=(None, "s")[i % 5 == 0],
                  outcome=("ok", "ok", "refused")[i % 3], input_tokens=i, output_tokens=2 * i, cache_read=3 * i,
                  cost_micros=(None, i)[i % 4 != 0], cost_basis=(None, "estimate")[i % 7 == 0],
                  ttfb_ms=(None, 10.0 + i)[i % 2])
            for i in range(300)
        ]
        for part in (rows[:200], rows[100:]):   # rows 100 to 199 come twice; request ids repeat as well
            with store.immediate(conn), rollup.adding(conn):   # on PostgreSQL, its trigger's work
                conn.executemany(STORAGE_INSERT, [storage_values(e) for e in part])
        assert_rollups_match(conn, UTC)
        for by in report.GROUPS:
            for since, until in ((None, None), (WINDOW_START + 5000.5, WINDOW_START + 2 * 86400 + 77.7)):
                assert row_dicts(*reports.usage(conn, Zone(UTC), by, since, until)) == \
                    row_dicts(*report.query(conn, by, since, until)), by
        total = reports.usage(conn, Zone(UTC), "user")[1]
        assert rollup.prepare(conn, KOLKATA) == "hours"
        # The first hour stays UTC's (its raw rows might have been deleted); the rest are Kolkata's.
        phases = [h % 3600 for h, in conn.execute("SELECT DISTINCT hour FROM usage_hourly ORDER BY hour")]
        assert phases[0] == 0 and set(phases[1:]) == {1800}
        assert reports.usage(conn, Zone(KOLKATA), "user")[1] == total
        with store.immediate(conn):
            conn.execute("DELETE FROM usage WHERE ts < ?", (WINDOW_START + 86400,))
        before = reports.usage(conn, Zone(KOLKATA), "user")[1]
        assert before.requests == 250 and before == reports.usage(conn, Zone(KOLKATA), "user")[1]
        histogram = rollup.ttfb_histogram(conn, Zone(KOLKATA))
        assert sum(histogram.values()) == 125
        assert rollup.percentile(histogram, rollup.ttfb_bins(conn), 0.5) == pytest.approx(10.0 + 125, rel=0.1)
    finally:
        conn.close()


# -- a batch's sums against the trigger's, row by row -------------------------------------------

# The migration that dropped the trigger which kept the rollups row by row.
TRIGGER_DROPPED = next(i for i, script in enumerate(store.MIGRATIONS) if "DROP TRIGGER usage_rollup" in script)
ROLLUPS = ("usage_hourly", *rollup.DAY_TABLES)
HISTOGRAM = "SELECT hour, bin, requests FROM usage_ttfb_hourly ORDER BY hour, bin"


def with_trigger(path: str | Path = ":memory:", tz: ZoneInfo = UTC) -> sqlite3.Connection:
    """A database whose rollups the trigger keeps, aligned to `tz`."""
    conn = schema_at(path, TRIGGER_DROPPED)
    rollup.prepare(conn, tz)
    return conn


def insert_by_trigger(conn: sqlite3.Connection, events: Sequence[UsageEvent]) -> None:
    with store.immediate(conn):
        conn.executemany(INSERT_SQL, [tuple(getattr(e, f) for f in FIELDS) for e in events])


def assert_same_rollups(got: sqlite3.Connection, want: sqlite3.Connection) -> None:
    for table in ROLLUPS:
        assert_same(stored(got, table), stored(want, table))
    assert got.execute(HISTOGRAM).fetchall() == want.execute(HISTOGRAM).fetchall()


async def written(recorder: UsageRecorder, count: int, what: str = "written") -> None:
    """Wait until the recorder's `what` counter reaches `count`."""
    async with asyncio.timeout(10):
        while recorder.stats()[what] < count:
            await asyncio.sleep(0.005)


@SETTINGS
@given(batches=batches, tz=st.sampled_from(ZONES))
def test_a_batch_adds_to_the_rollups_what_the_trigger_added_row_by_row(
    batches: list[list[UsageEvent]], tz: ZoneInfo,
) -> None:
    by_batch, by_row = open_db(tz=tz), with_trigger(tz=tz)
    try:
        for batch in batches:
            for _ in range(2):  # and its replay, which adds nothing
                insert(by_batch, batch)
                insert_by_trigger(by_row, batch)
            assert_same_rollups(by_batch, by_row)
    finally:
        by_batch.close()
        by_row.close()


def test_kolkatas_half_hours_bucket_a_batch_as_the_trigger_did() -> None:
    midnight = datetime(2026, 3, 30, tzinfo=KOLKATA).timestamp()   # 18:30 UTC
    rows = [event(midnight + offset, f"req-{i}", user=("alice", "bob", None)[i % 3], model=("m1", "m2")[i % 2],
                  cost_micros=100 + i, ttfb_ms=(None, 5.0 + i)[i % 2])
            for i, offset in enumerate(range(-3 * 3600, 3 * 3600, 7 * 60 + 13))]
    # The last second of each local hour and the first of the next: the hour
    # and, at midnight, the day change between them.
    rows += [event(midnight + hour * 3600 + second, f"edge-{hour}-{second}", user="carol", cost_micros=1, ttfb_ms=1.0)
             for hour in range(-3, 4) for second in (-0.001, 0)]
    by_batch, by_row = open_db(tz=KOLKATA), with_trigger(tz=KOLKATA)
    try:
        insert(by_batch, rows)
        insert_by_trigger(by_row, rows)
        assert_same_rollups(by_batch, by_row)
        assert {hour % 3600 for hour, in by_batch.execute("SELECT hour FROM usage_hourly")} == {1800}
        day = Zone(KOLKATA).day(midnight)
        per_day = dict(by_batch.execute("SELECT day, SUM(requests) FROM usage_daily_principals GROUP BY day"))
        assert per_day == {day - 1: sum(e.ts < midnight for e in rows), day: sum(e.ts >= midnight for e in rows)}
    finally:
        by_batch.close()
        by_row.close()


async def test_the_writer_adds_a_batch_to_the_rollups_once_whatever_it_skips(tmp_path: Path) -> None:
    recorder = UsageRecorder(tmp_path / "hub.db", tmp_path / "usage.spool", flush_interval=0.01,
                             timezone="Europe/Berlin")
    await recorder.start()
    recorder.record(event(WINDOW_START + 5, "req-stored", user="alice", model="m1", cost_micros=5))
    await written(recorder, 1)
    # Users, models, keys and outcomes over 17 hours (Berlin's spring change among them), in one batch.
    batch = [
        event(SPRING - 8 * 3600 + i * 523.7, f"req-{i}", user=("alice", "bob", "carol", None)[i % 4],
              project=("p1", None)[i % 2], model=("claude-sonnet-4-6", "gpt-5", None)[i % 3],
              served_model=(None, "relay-sonnet")[i % 5 == 0], upstream=("primary", "backup")[i % 2],
              key_label=("k1", "k2", "k3")[i % 3], token_id=(1, 2, None)[i % 3],
              outcome=("ok", "ok", "upstream_error")[i % 3], input_tokens=10 * i, output_tokens=i, cache_read=3 * i,
              cost_micros=(None, 100 + i)[i % 4 != 0], cost_basis=(None, "estimate")[i % 5 == 0],
              ttfb_ms=(None, 3.0 + i)[i % 2])
        for i in range(120)
    ]
    batch.insert(50, dataclasses.replace(batch[10], user="mallory", cost_micros=10 ** 9))   # twice in the batch
    batch.append(event(WINDOW_START + 9, "req-stored", user="mallory", cost_micros=10 ** 9))  # stored already
    for e in batch:
        recorder.record(e)
    await recorder.close()
    # (How many the writer counts as ignored depends on the timing: a write
    # that waits a flush interval has its batch copied to the spool too.)
    assert recorder.stats()["written"] == 121
    conn = open_db(tmp_path / "hub.db", BERLIN)
    try:
        assert_rollups_match(conn, BERLIN)
        assert conn.execute("SELECT SUM(requests) FROM usage_hourly").fetchone()[0] == 121
        assert conn.execute("SELECT COUNT(*) FROM usage_daily_principals WHERE user = 'mallory'").fetchone()[0] == 0
    finally:
        conn.close()


async def test_a_batch_whose_rollups_fail_commits_neither_rows_nor_sums(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    recorder = UsageRecorder(path, tmp_path / "usage.spool", flush_interval=0.01, retry_max=0.05)
    await recorder.start()
    # The last statement (the ttfb histogram's) fails, after the rows and
    # the other rollups went in.
    assert "usage_ttfb_hourly" in rollup.ADD_STATEMENTS[-1]
    refusing = store.connect(path)
    refusing.execute("CREATE TRIGGER refuse BEFORE INSERT ON usage_ttfb_hourly BEGIN SELECT RAISE(ABORT, 'refused'); END")
    for i in range(20):
        recorder.record(event(WINDOW_START + i * 600, f"req-{i}", user="alice", cost_micros=i, ttfb_ms=1.0))
    await written(recorder, 20, "spooled")
    conn = open_db(path)
    try:
        counts = [conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in ("usage", *ROLLUPS)]
        assert counts == [0] * (1 + len(ROLLUPS))
    finally:
        conn.close()
    refusing.execute("DROP TRIGGER refuse")
    refusing.close()
    await written(recorder, 20, "replayed")
    await recorder.close()
    conn = open_db(path)
    try:
        assert_rollups_match(conn, UTC)
        assert conn.execute("SELECT SUM(requests) FROM usage_hourly").fetchone()[0] == 20
    finally:
        conn.close()


async def test_two_writers_on_one_file_never_add_each_others_rows(tmp_path: Path) -> None:
    # As the workers of `[server] workers = N` share one SQLite file: each
    # batch's rollups are its own rows', however the two interleave.
    path = tmp_path / "hub.db"
    writers = [UsageRecorder(path, tmp_path / f"usage-{n}.spool", flush_interval=0.01) for n in range(2)]
    for writer in writers:
        await writer.start()
    for round_ in range(12):
        for n, writer in enumerate(writers):
            for i in range(8):
                writer.record(event(WINDOW_START + round_ * 3000 + i * 60 + n, f"w{n}-{round_}-{i}", user=f"u{n}",
                                    cost_micros=round_ + i, ttfb_ms=float(i)))
        await asyncio.sleep(0.011)
    for writer in writers:
        await writer.close()
    conn = open_db(path)
    try:
        assert_rollups_match(conn, UTC)
        assert conn.execute("SELECT SUM(requests) FROM usage_hourly").fetchone()[0] == 2 * 12 * 8
    finally:
        conn.close()


async def test_a_database_the_trigger_kept_keeps_its_sums_and_the_writer_adds_to_them(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    old = with_trigger(path, KOLKATA)
    insert_by_trigger(old, [event(WINDOW_START + i * 1234.5, f"old-{i}", user=("alice", "bob")[i % 2], model="m",
                                  cost_micros=10 + i, ttfb_ms=float(i)) for i in range(100)])
    before = {table: stored(old, table) for table in ROLLUPS}
    histogram = old.execute(HISTOGRAM).fetchall()
    old.close()
    recorder = UsageRecorder(path, tmp_path / "usage.spool", flush_interval=0.01, timezone="Asia/Kolkata")
    await recorder.start()   # migrates: the trigger goes, its sums stay
    conn = open_db(path, KOLKATA)
    try:
        triggers = conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'usage'")
        assert triggers.fetchall() == []
        assert {table: stored(conn, table) for table in ROLLUPS} == before
        assert conn.execute(HISTOGRAM).fetchall() == histogram
    finally:
        conn.close()
    # New rows in the old rows' hours and days, and an old row replayed.
    for i in range(60):
        recorder.record(event(WINDOW_START + i * 2000.5 + 17, f"new-{i}", user=("alice", "carol")[i % 2], model="m",
                              cost_micros=1000 + i, ttfb_ms=2.0 * i))
    recorder.record(event(WINDOW_START, "old-0", user="mallory", cost_micros=10 ** 9))
    await recorder.close()
    assert recorder.stats()["written"] == 60
    conn = open_db(path, KOLKATA)
    try:
        assert_rollups_match(conn, KOLKATA)
        assert conn.execute("SELECT SUM(requests), SUM(cost_micros) FROM usage_daily_principals").fetchone() == (
            160, sum(10 + i for i in range(100)) + sum(1000 + i for i in range(60)))
    finally:
        conn.close()


# -- a change of the reporting zone ----------------------------------------------------------


def test_a_zone_with_another_phase_rebuilds_the_hours_and_keeps_those_without_raw_rows(tmp_path: Path) -> None:
    conn = open_db(tmp_path / "hub.db", UTC)
    try:
        insert(conn, [event(WINDOW_START + i * 731.1, f"req-{i}", user="alice", cost_micros=10 + i, ttfb_ms=float(i))
                      for i in range(800)])
        total_before = reports.usage(conn, Zone(UTC), "user")[1]
        cut = WINDOW_START + 2 * 86400 + 1000
        with store.immediate(conn):
            conn.execute("DELETE FROM usage WHERE ts < ?", (cut,))   # retention ran
        assert rollup.prepare(conn, KOLKATA) == "hours"
        assert rollup.prepare(conn, KOLKATA) is None                  # the next start finds it done
        zone = Zone(KOLKATA)
        # Nothing lost, nothing counted twice.
        assert reports.usage(conn, zone, "user")[1] == total_before
        # The UTC hour of the oldest raw row and those before stay; the rest are Kolkata's.
        oldest = int(conn.execute("SELECT MIN(ts) FROM usage").fetchone()[0])
        keep = oldest - oldest % 3600 + 3600
        phases = dict(conn.execute("SELECT hour % 3600, MAX(hour) FROM usage_hourly GROUP BY 1"))
        assert phases[0] < keep
        assert conn.execute("SELECT MIN(hour) FROM usage_hourly WHERE hour % 3600 = 1800").fetchone()[0] >= keep - 1800
        recent = [row for row in raw_rows(conn) if row["ts"] >= keep]
        hours = dict(conn.execute("SELECT hour, SUM(requests) FROM usage_hourly WHERE hour % 3600 = 1800 GROUP BY hour"))
        want: dict[int, int] = {}
        for row in recent:
            want[zone.bucket(row["ts"])] = want.get(zone.bucket(row["ts"]), 0) + 1
        assert hours == want
        first_whole_day = zone.day(keep) + 1
        days = reports.usage(conn, zone, "day", since=zone.day_start(first_whole_day))[0]
        per_day: dict[str, int] = {}
        for row in recent:
            if zone.day(row["ts"]) >= first_whole_day:
                key = datetime.fromtimestamp(row["ts"], KOLKATA).date().isoformat()
                per_day[key] = per_day.get(key, 0) + 1
        assert {r.group: r.requests for r in days} == per_day and len(per_day) >= 3
        assert conn.execute("SELECT SUM(requests) FROM usage_ttfb_hourly").fetchone()[0] == 800
    finally:
        conn.close()


def test_a_zone_with_the_same_phase_keeps_the_hours_and_sums_its_days_again(conn: sqlite3.Connection) -> None:
    insert(conn, [event(WINDOW_START + i * 1801.7, f"req-{i}", cost_micros=i) for i in range(400)])
    hours = stored(conn, "usage_hourly")
    assert rollup.prepare(conn, BERLIN) == "days"
    assert stored(conn, "usage_hourly") == hours
    assert_rollups_match(conn, BERLIN)


# -- reports ----------------------------------------------------------------------------------


def row_dicts(rows: list[report.Row], total: report.Row) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    def as_dict(row: report.Row) -> dict[str, Any]:
        return {name: getattr(row, name) for name in ("group", *report.COUNT_FIELDS, "user", "note")}
    return [as_dict(r) for r in rows], as_dict(total)


moments = st.one_of(
    st.none(),
    st.floats(WINDOW_START - 86400, WINDOW_START + 5 * 86400),
    st.integers(-1, 5 * 24).map(lambda h: WINDOW_START + h * 3600),
    st.integers(-1, 5 * 48).map(lambda h: WINDOW_START + h * 1800),
)


@SETTINGS
@given(batch=st.lists(events, max_size=60), since=moments, until=moments, tz=st.sampled_from(ZONES))
def test_reports_give_the_numbers_of_hubcore_usage_for_any_range(
    batch: list[UsageEvent], since: float | None, until: float | None, tz: ZoneInfo,
) -> None:
    conn = open_db(tz=tz)
    try:
        insert(conn, batch)
        zone = Zone(tz)
        for by in report.GROUPS:
            got = row_dicts(*reports.usage(conn, zone, by, since, until))
            if by == "day":
                # Local dates here, UTC dates in the CLI: compare with the raw rows per local date.
                per_day: dict[str, int] = {}
                for row in raw_rows(conn):
                    if (since is None or row["ts"] >= since) and (until is None or row["ts"] < until):
                        key = datetime.fromtimestamp(row["ts"], tz).date().isoformat()
                        per_day[key] = per_day.get(key, 0) + 1
                assert {g["group"]: g["requests"] for g in got[0]} == per_day
                assert [g["group"] for g in got[0]] == sorted(per_day)
                if tz is not UTC:
                    continue
            assert got == row_dicts(*report.query(conn, by, since, until)), by
    finally:
        conn.close()


def test_a_range_is_read_from_days_hours_and_raw_rows_only_where_needed(conn: sqlite3.Connection) -> None:
    zone = Zone(KOLKATA)
    rollup.prepare(conn, KOLKATA)
    day = zone.day(WINDOW_START) + 1
    midnight = zone.day_start(day)
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    rollup.sums(conn, zone, ("user",), midnight, zone.day_start(day + 3))
    assert [s.split(" FROM ")[1].split()[0] for s in statements] == ["usage_daily_principals"]
    statements.clear()
    rollup.sums(conn, zone, ("user",), midnight + 3600, midnight + 5 * 3600)
    assert [s.split(" FROM ")[1].split()[0] for s in statements] == ["usage_hourly"]
    statements.clear()
    rollup.sums(conn, zone, ("user",), midnight - 1800, midnight + 86400 + 60)
    tables = [s.split(" FROM ")[1].split()[0] for s in statements]
    assert tables.count("usage_daily_principals") == 1 and tables.count("usage") == 2
    # Users, models and keys apart, the smallest for days alone; together only hour by hour.
    statements.clear()
    rollup.sums(conn, zone, ("upstream", "key_label"), midnight, zone.day_start(day + 3))
    rollup.sums(conn, zone, ("served_model", "model"), midnight, zone.day_start(day + 3))
    rollup.sums(conn, zone, ("day",), midnight, zone.day_start(day + 3))
    rollup.sums(conn, zone, ("user", "key_label"), midnight, zone.day_start(day + 3))
    assert [s.split(" FROM ")[1].split()[0] for s in statements] == [
        "usage_daily_keys", "usage_daily_models", "usage_daily_models", "usage_hourly"]
    conn.set_trace_callback(None)
    with pytest.raises(ValueError, match="hours"):
        rollup.sums(conn, zone, ("hours",))


# -- local days across DST and half-hour offsets -----------------------------------------------


def test_berlins_23_and_25_hour_days_are_summed_whole_and_once(conn: sqlite3.Connection) -> None:
    rollup.prepare(conn, BERLIN)
    zone = Zone(BERLIN)
    rows = []
    for around in (SPRING, AUTUMN):
        start = around - 2 * 86400
        rows += [event(start + i * 600 + 7, f"req-{around}-{i}", user="alice", cost_micros=1) for i in range(4 * 144)]
    insert(conn, rows)
    for first in (date(2026, 3, 28), date(2026, 10, 24)):
        since = datetime(first.year, first.month, first.day, tzinfo=BERLIN).timestamp()
        until = datetime.combine(first + timedelta(days=2), datetime.min.time(), BERLIN).timestamp()
        got = {r.group: r.requests for r in reports.usage(conn, zone, "day", since, until)[0]}
        short_or_long = (first + timedelta(days=1)).isoformat()
        want = {first.isoformat(): 144, short_or_long: 6 * (23 if first.month == 3 else 25)}
        assert got == want
    # Hour by hour: every local hour holds its six rows, the doubled 02:00 of October twice over.
    hours = rollup.sums(conn, zone, ("hour",), AUTUMN - 3 * 3600, AUTUMN + 3 * 3600, counters=("requests",))
    assert sorted(hours) == [(AUTUMN + h * 3600,) for h in range(-3, 3)]
    assert {n for (n,) in hours.values()} == {6}


def test_kolkatas_midnight_at_18_30_utc_splits_the_day_and_the_hours() -> None:
    conn = open_db(tz=KOLKATA)
    try:
        midnight = datetime(2026, 3, 30, tzinfo=KOLKATA).timestamp()
        assert datetime.fromtimestamp(midnight, timezone.utc).strftime("%H:%M") == "18:30"
        insert(conn, [event(midnight - 1, "before", cost_micros=5), event(midnight, "at", cost_micros=7)])
        days = {r.group: r.cost_micros for r in reports.usage(conn, Zone(KOLKATA), "day")[0]}
        assert days == {"2026-03-29": 5, "2026-03-30": 7}
        assert [h for h, in conn.execute("SELECT hour FROM usage_hourly ORDER BY hour")] == [
            int(midnight) - 3600, int(midnight)]
    finally:
        conn.close()


# -- time to first byte ----------------------------------------------------------------------


@SETTINGS
@given(values=st.lists(st.floats(0.01, 900_000), min_size=1, max_size=400), q=st.sampled_from([0.5, 0.9, 0.99]))
def test_ttfb_percentiles_are_within_a_bin_of_the_exact_ones(values: list[float], q: float) -> None:
    conn = open_db()
    try:
        insert(conn, [event(WINDOW_START + i, f"req-{i}", ttfb_ms=v) for i, v in enumerate(values)])
        bins = rollup.ttfb_bins(conn)
        estimate = rollup.percentile(rollup.ttfb_histogram(conn, Zone(UTC)), bins, q)
        ordered = sorted(values)
        exact_low = ordered[max(math.ceil(q * len(values)) - 1, 0)]
        assert estimate is not None
        # Within the bin of the exact rank: 2^(1/8) wide, or below 1 ms.
        step = 2 ** (1 / 8)
        assert exact_low / step - 1 <= estimate <= exact_low * step + 1
    finally:
        conn.close()


def test_an_empty_histogram_has_no_percentile(conn: sqlite3.Connection) -> None:
    assert rollup.percentile(rollup.ttfb_histogram(conn, Zone(UTC)), rollup.ttfb_bins(conn), 0.5) is None
    assert len(rollup.ttfb_bins(conn)) == 161 and rollup.ttfb_bins(conn)[-1] == pytest.approx(2 ** (159 / 8))
