"""The usage row's served_model and route: in the table, through the
recorder into a real SQLite file, through the spool and back (lines from
before the fields replay too), and the migration that adds the columns."""
from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from hubcore import store
from hubcore.accounting.recorder import UsageRecorder
from hubcore.accounting.spool import decode_line, encode_line
from hubcore.accounting.usage import FIELDS, UsageEvent
from tests.accounting.test_spool import OLD_LINE
from tests.accounting.test_usage import Lock, make_event, spool_lines

ROUTE = "primary/a:529,backup/c:200"


def rows(db: Path, *columns: str) -> dict[str, tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        sql = f"SELECT request_id, {', '.join(columns)} FROM usage"
        return {r[0]: tuple(r[1:]) for r in conn.execute(sql)}
    finally:
        conn.close()


def usage_columns(conn: sqlite3.Connection) -> list[str]:
    return [r[1] for r in conn.execute("PRAGMA table_info(usage)")]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "hub.db"


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "usage.spool"


@pytest.fixture
async def recorder_factory(db: Path, spool: Path) -> AsyncIterator[Callable[..., UsageRecorder]]:
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


def test_the_fields_come_last_and_default_to_none() -> None:
    assert FIELDS[-3:] == ("cost_basis", "served_model", "route")
    event = UsageEvent(1.0, "r", "/v1/messages", 200, "ok", 1.0)
    assert (event.served_model, event.route) == (None, None)
    # The positional call of gateway.exchange.usage_event, one value per field.
    positional = UsageEvent(*[getattr(make_event(1, served_model="m", route=ROUTE), f) for f in FIELDS])
    assert (positional.served_model, positional.route) == ("m", ROUTE)


def test_the_usage_table_has_a_column_per_field(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "fresh.db")
    try:
        columns = usage_columns(conn)
    finally:
        conn.close()
    assert columns[0] == "id"
    assert set(columns[1:]) == set(FIELDS)


async def test_recorded_rows_keep_served_model_and_route(
    recorder_factory: Callable[..., UsageRecorder], db: Path
) -> None:
    recorder = recorder_factory(flush_interval=0.02)
    await recorder.start()
    recorder.record(make_event(1, served_model="claude-sonnet-4-5-20250929", route=ROUTE))
    recorder.record(make_event(2, route="anthropic/key-a:200"))
    recorder.record(make_event(3, status=401, outcome="refused", upstream=None, key_label=None))
    await recorder.close()
    assert rows(db, "model", "served_model", "route") == {
        "req-000001": ("claude-sonnet-4-5", "claude-sonnet-4-5-20250929", ROUTE),
        "req-000002": ("claude-sonnet-4-5", None, "anthropic/key-a:200"),
        "req-000003": ("claude-sonnet-4-5", None, None),
    }


def test_spool_lines_round_trip_the_fields() -> None:
    event = make_event(1, served_model="gpt-5-mini", route="openai/o1:connect,openai-b/o2:200")
    line = encode_line(event)
    assert orjson.loads(line)["route"] == "openai/o1:connect,openai-b/o2:200"
    assert decode_line(line) == event


def test_a_line_from_before_the_fields_decodes_with_none() -> None:
    event = decode_line(OLD_LINE)
    assert event is not None and event.request_id == "req-old"
    assert (event.served_model, event.route) == (None, None)


async def test_a_spool_of_old_and_new_lines_replays_into_the_new_columns(
    recorder_factory: Callable[..., UsageRecorder], db: Path, spool: Path
) -> None:
    first = recorder_factory(flush_interval=0.02)
    await first.start()
    with Lock(db):
        first.record(make_event(1, served_model="claude-opus-4-1-20250805", route=ROUTE))
        await first.close()  # locked throughout: the event goes to the spool
    assert [orjson.loads(line)["route"] for line in spool_lines(spool)] == [ROUTE]
    # A line spooled by a hubcore from before served_model and route.
    old = {k: v for k, v in dataclasses.asdict(make_event(2)).items() if k not in ("served_model", "route")}
    with spool.open("ab") as f:
        f.write(orjson.dumps(old) + b"\n" + OLD_LINE)

    second = recorder_factory()
    await second.start()
    assert rows(db, "served_model", "route") == {
        "req-000001": ("claude-opus-4-1-20250805", ROUTE),
        "req-000002": (None, None),
        "req-old": (None, None),
    }
    assert second.stats()["spool_bad_lines"] == 0


async def test_a_database_from_before_the_columns_is_migrated_on_open(
    recorder_factory: Callable[..., UsageRecorder], db: Path
) -> None:
    # The schema version just before the migration that adds the columns
    # (found by its text: other migrations may come before or after it).
    before = next((i for i, sql in enumerate(store.MIGRATIONS) if "served_model" in sql), None)
    assert before is not None, "no migration adds usage.served_model"
    raw = sqlite3.connect(db, isolation_level=None)
    try:
        for migration in store.MIGRATIONS[:before]:
            raw.executescript(migration)
        raw.execute(f"PRAGMA user_version = {before}")
        raw.execute(
            "INSERT INTO usage (ts, request_id, endpoint, status, outcome, total_ms)"
            " VALUES (1.0, 'old-row', '/v1/messages', 200, 'ok', 5.0)"
        )
        assert not {"served_model", "route"} & set(usage_columns(raw))
    finally:
        raw.close()

    recorder = recorder_factory()
    await recorder.start()
    recorder.record(make_event(1, served_model="m-served", route=ROUTE))
    await recorder.close()

    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION
    finally:
        conn.close()
    assert rows(db, "served_model", "route") == {"old-row": (None, None), "req-000001": ("m-served", ROUTE)}
