"""Usage retention on real databases, SQLite and PostgreSQL alike (the
`database` fixture), with the time passed in: which rows go, in batches,
their spend carried so that budgets rebuilt at start (total included) do
not move, two passes at once, the config's bounds, and the running hub's
task that deletes at start, logs, and stops with the hub (on the engine
HUBCORE_TEST_DATABASE names). On PostgreSQL the usage writer inserts while
a batch is under way."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from hubcore import config as config_mod, store
from hubcore.accounting import retention
from hubcore.accounting.pgwriter import PgUsageWriter
from hubcore.accounting.retention import Retention, delete_batch, purge
from hubcore.accounting.rows import insert_values
from hubcore.accounting.usage import UsageEvent, insert_sql
from hubcore.database import is_postgres
from hubcore.errors import ConfigError
from hubcore.governance import tokens
from hubcore.governance.limiter import Limiter
from hubcore.governance.limits import WINDOWS, calendar_periods
from tests.conftest import upstreams_for
from tests.fakevendor import FakeVendor
from tests.hubharness import HubThread, make_config
from tests.pgserver import PgDatabase, pg_server_database

ZONE = "Europe/Berlin"
DAY = 86400.0


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(ZONE)).timestamp()


NOW = at("2026-03-18T15:00:00")


def keep_since(now: float) -> float:
    """What the App passes: the start of the oldest budget period still current."""
    return min(start for start, _ in calendar_periods(now, ZoneInfo(ZONE)))


def seeded(database: str) -> str:
    """`database` with the tokens of alice (1), bob (2) and carol (3)."""
    conn = store.connect(database)
    try:
        with store.immediate(conn):
            for user, project in (("alice", "web"), ("bob", None), ("carol", "web")):
                tokens.create(conn, user, project)
    finally:
        conn.close()
    return database


def make_events(spans: list[tuple[float, float, int]]) -> list[UsageEvent]:
    """For each (first, last, count): `count` rows spread from `first` to
    `last`, for tokens 1-3 (and some refused without a token), costs of
    every kind (none, zero, positive)."""
    events = []
    for first, last, count in spans:
        for i in range(count):
            ts = first + (last - first) * i / max(count - 1, 1)
            token_id = None if i % 17 == 0 else 1 + i % 3
            cost = None if i % 11 == 0 else (0 if i % 7 == 0 else 1000 + i)
            events.append(UsageEvent(
                ts=ts, request_id=f"req-{first}-{i}", endpoint="/v1/messages", status=200, outcome="ok", total_ms=5.0,
                token_id=token_id, user=None if token_id is None else ("alice", "bob", "carol")[token_id - 1],
                project=None if token_id is None else ("web", None, "web")[token_id - 1], model="claude-sonnet-4-6",
                cost_micros=cost,
            ))
    return events


def add_rows(database: str, spans: list[tuple[float, float, int]]) -> None:
    events = make_events(spans)
    conn = store.connect(database)
    try:
        with store.immediate(conn):
            for chunk in range(0, len(events), 30):
                batch = events[chunk:chunk + 30]
                conn.execute(insert_sql(len(batch)), insert_values(batch))
    finally:
        conn.close()


def rows(database: str) -> list[tuple[Any, ...]]:
    conn = store.connect(database)
    try:
        return conn.execute("SELECT id, ts, token_id, cost_micros FROM usage ORDER BY id").fetchall()
    finally:
        conn.close()


def carried(database: str) -> dict[int, tuple[Any, ...]]:
    conn = store.connect(database)
    try:
        return {token: (user, project, micros, requests) for token, user, project, micros, requests
                in conn.execute("SELECT token_id, user, project, cost_micros, requests FROM usage_carried")}
    finally:
        conn.close()


def expected_carry(doomed: list[tuple[Any, ...]]) -> dict[int, tuple[Any, ...]]:
    """What usage_carried holds once the rows `doomed` (rows() rows) are gone."""
    expected = {}
    for token_id, user, project in ((1, "alice", "web"), (2, "bob", None), (3, "carol", "web")):
        mine = [r for r in doomed if r[2] == token_id]
        expected[token_id] = (user, project, sum(r[3] for r in mine if r[3] and r[3] > 0), len(mine))
    return expected


def spend(database: str, now: float) -> dict[tuple[str, str, str], int]:
    """Every scope's spend in every window, as the hub rebuilds it at start."""
    conn = store.connect(database)
    try:
        limiter = Limiter(ZONE)
        limiter.rebuild(conn, now)
    finally:
        conn.close()
    scopes = [("token", "1"), ("token", "2"), ("token", "3"), ("user", "alice"), ("user", "bob"),
              ("user", "carol"), ("project", "web")]
    return {(kind, name, window): limiter.spent(kind, name, window, now) for kind, name in scopes for window in WINDOWS}


def test_old_rows_go_in_batches_and_their_spend_is_carried_per_token(database: str) -> None:
    path = seeded(database)
    add_rows(path, [(NOW - 200 * DAY, NOW - 41 * DAY, 2600), (NOW - 39 * DAY, NOW, 900)])
    before = rows(path)
    cutoff = NOW - 40 * DAY
    doomed = [r for r in before if r[1] < cutoff]
    assert len(doomed) == 2600
    removed = purge(path, cutoff)
    assert removed == 2600
    assert rows(path) == [r for r in before if r[1] >= cutoff]
    assert carried(path) == expected_carry(doomed)
    # A second pass finds nothing more, and adds nothing to the carry.
    assert purge(path, cutoff) == 0
    assert len(rows(path)) == 900
    assert carried(path) == expected_carry(doomed)


def test_two_passes_at_once_delete_each_row_once_and_carry_it_once(database: str) -> None:
    # Two hubs on one PostgreSQL database each run retention; on SQLite, a
    # pass of the hub's and one of a second process.
    path = seeded(database)
    add_rows(path, [(NOW - 200 * DAY, NOW - 41 * DAY, 6000), (NOW - 39 * DAY, NOW, 100)])
    before = rows(path)
    cutoff = NOW - 40 * DAY
    removed: list[int] = []
    start = threading.Barrier(2)

    def run() -> None:
        start.wait()
        removed.append(purge(path, cutoff))

    passes = [threading.Thread(target=run) for _ in range(2)]
    for thread in passes:
        thread.start()
    for thread in passes:
        thread.join(60)
    assert sum(removed) == 6000 and len(removed) == 2
    assert rows(path) == [r for r in before if r[1] >= cutoff]
    assert carried(path) == expected_carry([r for r in before if r[1] < cutoff])


class _CommitWaits:
    """A connection whose COMMIT waits for `release`: a batch caught with
    its rows deleted and its carry written, not yet committed."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.reached = threading.Event()
        self.release = threading.Event()

    def execute(self, sql: str, parameters: Any = ()) -> Any:
        if sql == "COMMIT":
            self.reached.set()
            assert self.release.wait(30)
        return self.conn.execute(sql, parameters)


def test_on_postgresql_the_usage_writer_inserts_while_a_batch_is_under_way(pg_database: PgDatabase) -> None:
    # SQLite has one write lock, and its writer waits for at most one batch;
    # PostgreSQL's writer waits for none.
    path = seeded(pg_server_database(pg_database))
    add_rows(path, [(NOW - 100 * DAY, NOW - 50 * DAY, 400)])
    before = rows(path)
    conn = store.connect(path)
    held = _CommitWaits(conn)
    deleted: list[int] = []
    batch = threading.Thread(target=lambda: deleted.append(delete_batch(held, NOW - 40 * DAY, 1000)))  # type: ignore[arg-type]
    batch.start()
    try:
        assert held.reached.wait(30)
        fresh = make_events([(NOW - 60, NOW, 20)])

        async def write() -> float:
            writer = PgUsageWriter(path)  # type: ignore[arg-type]
            await writer.open()
            try:
                started = time.monotonic()
                assert await asyncio.wait_for(writer.insert(fresh), 10) == 20
                return time.monotonic() - started
            finally:
                await writer.close()

        assert asyncio.run(write()) < 1.0
        # Until the batch commits, others see its rows and no carry.
        assert rows(path)[:400] == before and carried(path) == {}
    finally:
        held.release.set()
        batch.join(30)
        conn.close()
    assert deleted == [400]
    assert len(rows(path)) == 20 and carried(path) == expected_carry(before)


def test_budgets_rebuilt_after_retention_are_those_before_it_total_included(database: str) -> None:
    path = seeded(database)
    # Rows from 200 days ago up to now, this month's and week's and the last
    # five hours' among them.
    add_rows(path, [(NOW - 200 * DAY, NOW, 4000), (NOW - 4 * 3600, NOW - 60, 300)])
    kept = spend(path, NOW)
    assert kept[("user", "alice", "total")] > kept[("user", "alice", "month")] > kept[("user", "alice", "day")] > 0
    assert kept[("project", "web", "5h")] > 0
    task = Retention(path, 31, keep_since)
    removed = task.run_once(NOW)
    assert removed > 2000 and task.removed == removed
    assert min(r[1] for r in rows(path)) >= NOW - 31 * DAY
    assert spend(path, NOW) == kept
    # Weeks later, another pass: still the same totals, and the windows move
    # on as they would have with every row kept.
    later = NOW + 20 * DAY
    add_rows(path, [(NOW + DAY, later - 3600, 200)])
    kept = spend(path, later)
    assert task.run_once(later) > 0
    assert spend(path, later) == kept


def test_the_cutoff_never_passes_the_start_of_the_current_month(tmp_path: Path) -> None:
    # The last half hour of October in Berlin: the month (with its extra DST
    # hour) began 31 days and 30 minutes ago.
    now = at("2026-10-31T23:30:00")
    month_start = at("2026-10-01T00:00:00")
    assert now - 31 * DAY < month_start + 3600
    task = Retention(str(tmp_path / "unused.db"), 31, keep_since)
    assert task.cutoff(now) == month_start
    # Otherwise the days decide.
    assert task.cutoff(NOW) == NOW - 31 * DAY
    assert Retention(str(tmp_path / "unused.db"), 400, keep_since).cutoff(NOW) == NOW - 400 * DAY
    with pytest.raises(ValueError, match="shorter than 31 days"):
        Retention(str(tmp_path / "unused.db"), 30, keep_since)


class _Pauses(threading.Event):
    """A stop event that records the pauses between batches instead of waiting them."""

    def __init__(self, stop_after: int | None = None) -> None:
        super().__init__()
        self.pauses: list[float] = []
        self.stop_after = stop_after

    def wait(self, timeout: float | None = None) -> bool:
        self.pauses.append(timeout or 0.0)
        if self.stop_after is not None and len(self.pauses) >= self.stop_after:
            self.set()
        return self.is_set()


def test_batches_shrink_when_they_are_slow_and_a_pause_as_long_follows_each(database: str) -> None:
    path = seeded(database)
    add_rows(path, [(NOW - 100 * DAY, NOW - 50 * DAY, 1500)])
    ticks = iter(range(1000))
    stop = _Pauses()
    # Each batch seems to take a whole second: 1,000 rows, then batches of
    # the smallest size (100) for the other 500.
    removed = purge(path, NOW - 40 * DAY, stop=stop, clock=lambda: float(next(ticks)))
    assert removed == 1500 and rows(path) == []
    assert stop.pauses == [1.0] * 6
    assert retention.BATCH_FIRST == 1000 and retention.BATCH_MIN == 100


def test_a_stop_ends_the_pass_after_the_batch_under_way(database: str) -> None:
    path = seeded(database)
    add_rows(path, [(NOW - 100 * DAY, NOW - 50 * DAY, 2500)])
    stop = _Pauses(stop_after=1)
    assert purge(path, NOW - 40 * DAY, stop=stop) == retention.BATCH_FIRST
    assert len(rows(path)) == 2500 - retention.BATCH_FIRST


def test_the_task_runs_at_start_and_stops_at_once_while_it_waits(database: str) -> None:
    path = seeded(database)
    add_rows(path, [(time.time() - 90 * DAY, time.time() - 60 * DAY, 300)])

    async def run() -> float:
        task = Retention(path, 31, keep_since, interval=3600)
        task.start()
        while task.removed < 300:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await asyncio.wait_for(task.stop(), 5)
        return time.monotonic() - started

    assert asyncio.run(run()) < 1.0
    assert rows(path) == []


# What each engine says when the write lock stays taken for the busy timeout.
LOCKED = {False: "database is locked", True: "canceling statement due to lock timeout"}


def test_a_locked_database_is_logged_and_retried_next_pass(database: str, caplog: pytest.LogCaptureFixture) -> None:
    path = seeded(database)
    add_rows(path, [(time.time() - 90 * DAY, time.time() - 60 * DAY, 50)])
    # The write lock (on PostgreSQL the advisory lock that stands for it),
    # as a command or the dashboard holds it.
    holder = store.connect(path)
    holder.execute("BEGIN IMMEDIATE")

    async def run() -> None:
        task = Retention(path, 31, keep_since, interval=0.2, busy_timeout_ms=50)
        task.start()
        await asyncio.sleep(0.3)
        holder.execute("ROLLBACK")
        while task.removed < 50:
            await asyncio.sleep(0.02)
        await task.stop()

    try:
        with caplog.at_level(logging.INFO, logger="hubcore.usage"):
            asyncio.run(asyncio.wait_for(run(), 10))
    finally:
        holder.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "hubcore.usage"]
    locked = LOCKED[is_postgres(path)]
    assert any(f"usage retention: pass failed, retrying in 0.2 s: {locked}" in m for m in messages), messages
    assert any(m.startswith("usage retention: removed 50 rows from before ") for m in messages), messages
    assert rows(path) == []


def test_the_config_takes_zero_or_at_least_31_days(tmp_path: Path) -> None:
    def server(**fields: Any) -> config_mod.ServerConfig:
        return config_mod.parse({"server": fields}, source="hub.toml", env={}).server

    assert server().usage_retention_days == 0
    assert server(usage_retention_days=90).usage_retention_days == 90.0
    assert server(usage_retention_days=31.5).usage_retention_days == 31.5
    for value, message in (
        (10, "hub.toml: server.usage_retention_days: 10 is too short: monthly budgets are rebuilt at start from "
             "the month's usage rows, so keep at least 31 days (0: keep every row)"),
        (-1, "hub.toml: server.usage_retention_days: must not be negative"),
        (float("inf"), "hub.toml: server.usage_retention_days: must be a number of days (0: keep every row)"),
        (float("nan"), "hub.toml: server.usage_retention_days: must be a number of days (0: keep every row)"),
        ("90", "hub.toml: server.usage_retention_days: expected float, got str"),
    ):
        with pytest.raises(ConfigError) as info:
            server(usage_retention_days=value)
        assert str(info.value) == message


def test_a_running_hub_deletes_old_rows_at_start_and_a_restart_keeps_every_budget(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    now = time.time()
    with FakeVendor() as vendor:
        # The database the hubs of this run use (HUBCORE_TEST_DATABASE).
        config = make_config(tmp_path, upstreams_for(vendor), budget_timezone=ZONE, usage_retention_days=40)
        path = seeded(config.server.database)
        add_rows(path, [(now - 120 * DAY, now - 45 * DAY, 1200), (now - 20 * DAY, now - 60, 300)])
        kept = spend(path, now)
        with caplog.at_level(logging.INFO, logger="hubcore.usage"):
            with HubThread(config) as hub:
                deadline = time.monotonic() + 20
                while len(rows(path)) > 300 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert len(rows(path)) == 300
                assert hub.app is not None and hub.app.retention is not None
        assert any(r.getMessage().startswith("usage retention: removed 1200 rows") for r in caplog.records)
        # The next start rebuilds the budgets from the 300 rows and the carry.
        with HubThread(config) as hub:
            assert hub.app is not None
            limiter = hub.app.limiter
            live = {(kind, name, window): limiter.spent(kind, name, window, time.time())
                    for kind, name, window in kept if window != "5h"}
    assert live == {key: value for key, value in kept.items() if key[2] != "5h"}
    assert live[("user", "alice", "total")] > live[("user", "alice", "month")]
