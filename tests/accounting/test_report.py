"""Usage reports over a real database, SQLite and PostgreSQL: grouping,
totals, the three formats."""
from __future__ import annotations

import csv
import io
import sqlite3
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import orjson
import pytest

from hubcore import store
from hubcore.accounting.report import parse_time
from hubcore.accounting.usage import UsageEvent
from hubcore.cli.render import table
from hubcore.cli.usage import render_usage
from tests.storage.conftest import add_usage


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def event(n: int, ts: str, **fields: Any) -> UsageEvent:
    base: dict[str, Any] = dict(
        ts=utc(ts), request_id=f"req-{n}", endpoint="/v1/messages",
        status=200, outcome="ok", total_ms=10.0,
    )
    base.update(fields)
    return UsageEvent(**base)


EVENTS = [
    # The first two straddle midnight UTC.
    event(1, "2026-01-01T23:59:59", user="alice", project="p1", upstream="anthropic",
          key_label="key-a", model="claude-sonnet-4-5", input_tokens=1000,
          output_tokens=2000, cache_write_5m=500, cache_read=8500, cost_micros=1_234_567),
    event(2, "2026-01-02T00:00:01", user="alice", project="p1", upstream="anthropic",
          key_label="key-b", model="claude-sonnet-4-5", input_tokens=2000,
          output_tokens=3000, cache_write_1h=1000, cache_read=1_000_000,
          reasoning_tokens=100, cost_micros=500_000, outcome="upstream_aborted"),
    event(3, "2026-01-02T12:00:00", user="bob", project="p2", upstream="openai",
          key_label="key-x", model="gpt-5", endpoint="/v1/responses",
          input_tokens=10, output_tokens=20, reasoning_tokens=5, cost_micros=3),
    event(4, "2026-01-02T13:00:00", user="bob", project="p2", upstream="openai",
          key_label="key-x", model="mystery-model", input_tokens=7, output_tokens=1),
    # Refused before anyone or any model was known.
    event(5, "2026-01-03T00:00:00", status=401, outcome="refused"),
]


@pytest.fixture
def conn(database: str) -> Iterator[sqlite3.Connection]:
    connection = store.connect(database)
    add_usage(connection, *EVENTS)
    yield connection
    connection.close()


def table_rows(text: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in text.splitlines()[2:]
            if line and not line.startswith("-")}


def test_table_by_user(conn: sqlite3.Connection) -> None:
    text = render_usage(conn, by="user")
    lines = text.splitlines()
    assert lines[0] == "usage by user, beginning to now (UTC)"
    rows = table_rows(text)
    assert list(rows) == ["user", "alice", "bob", "(none)", "total"]
    assert rows["alice"] == ["2", "3,000", "5,000", "500", "1,000", "1,008,500", "100",
                             "1.7346", "0", "99.6%", "1"]
    assert rows["bob"] == ["2", "17", "21", "0", "0", "0", "5", "0.0000", "1", "0.0%", "0"]
    assert rows["(none)"] == ["1", "0", "0", "0", "0", "0", "0", "0.0000", "0", "-", "1"]
    assert rows["total"] == ["5", "3,017", "5,021", "500", "1,000", "1,008,500", "105",
                             "1.7346", "1", "99.6%", "2"]
    # Right-aligned columns: every line of the table is as wide as the header.
    assert len({len(line) for line in lines[2:]}) == 1


def test_table_pads_aligns_and_rules() -> None:
    assert table([("a", "bb"), None, ("ccc", "d")], right=(1,)) == ["a    bb", "---  --", "ccc   d"]
    assert table([("ID", "USER"), ("1", "ann")]) == ["ID  USER", "1   ann"]


def test_day_groups_by_utc_date_in_order(conn: sqlite3.Connection) -> None:
    rows = table_rows(render_usage(conn, by="day"))
    assert list(rows) == ["day", "2026-01-01", "2026-01-02", "2026-01-03", "total"]
    assert [rows[d][0] for d in ("2026-01-01", "2026-01-02", "2026-01-03")] == ["1", "3", "1"]


def test_key_groups_name_the_upstream(conn: sqlite3.Connection) -> None:
    document = orjson.loads(render_usage(conn, by="key", fmt="json"))
    assert [(g["group"], g["requests"]) for g in document["groups"]] == [
        ("anthropic/key-a", 1), ("anthropic/key-b", 1), ("openai/key-x", 2), (None, 1),
    ]


def test_json_groups_and_total(conn: sqlite3.Connection) -> None:
    document = orjson.loads(render_usage(conn, by="model", fmt="json"))
    assert document["by"] == "model"
    assert document["since"] is None and document["until"] is None
    groups = {g["group"]: g for g in document["groups"]}
    assert set(groups) == {"claude-sonnet-4-5", "gpt-5", "mystery-model", None}
    sonnet = groups["claude-sonnet-4-5"]
    assert sonnet["cost_micros"] == 1_734_567
    assert sonnet["cost_usd"] == pytest.approx(1.734567)
    assert sonnet["cache_hit_ratio"] == pytest.approx(1_008_500 / 1_013_000)
    assert groups["mystery-model"]["unpriced"] == 1
    assert groups[None]["cache_hit_ratio"] is None
    total = document["total"]
    for name in ("requests", "input", "output", "cache_write_5m", "cache_write_1h",
                 "cache_read", "reasoning", "cost_micros", "unpriced", "errors"):
        assert total[name] == sum(g[name] for g in document["groups"]), name
    assert (total["requests"], total["errors"], total["cost_micros"]) == (5, 2, 1_734_570)


def test_csv_parses_with_the_csv_module(conn: sqlite3.Connection) -> None:
    reader = csv.DictReader(io.StringIO(render_usage(conn, by="project", fmt="csv")))
    rows = {r["group"]: r for r in reader}
    assert list(rows) == ["p1", "p2", "", "TOTAL"]
    assert rows["p1"]["cost_usd"] == "1.734567"
    assert rows["p1"]["cache_hit_ratio"] == "0.9956"
    assert rows["p2"]["unpriced"] == "1"
    assert rows[""]["cache_hit_ratio"] == ""
    assert rows["TOTAL"]["requests"] == "5"
    assert rows["TOTAL"]["cost_usd"] == "1.734570"
    assert rows["TOTAL"]["input"] == "3017"


def test_since_is_inclusive_until_exclusive(conn: sqlite3.Connection) -> None:
    since = parse_time("2026-01-02T00:00:01Z")
    until = parse_time("2026-01-02T13:00:00Z")
    document = orjson.loads(render_usage(conn, by="model", since=since, until=until, fmt="json"))
    assert {g["group"]: g["requests"] for g in document["groups"]} == {
        "claude-sonnet-4-5": 1, "gpt-5": 1,
    }
    assert document["since"] == "2026-01-02T00:00:01+00:00"
    assert "2026-01-02T00:00:01+00:00 to 2026-01-02T13:00:00+00:00" in render_usage(
        conn, since=since, until=until
    )


def test_empty_database(database: str) -> None:
    connection = store.connect(database)
    try:
        rows = table_rows(render_usage(connection, by="upstream"))
        assert list(rows) == ["upstream", "total"]
        assert rows["total"] == ["0", "0", "0", "0", "0", "0", "0", "0.0000", "0", "-", "0"]
        assert list(csv.reader(io.StringIO(render_usage(connection, fmt="csv"))))[1][0] == "TOTAL"
    finally:
        connection.close()


def test_unknown_grouping_or_format(conn: sqlite3.Connection) -> None:
    with pytest.raises(ValueError, match="cannot group usage by 'team'"):
        render_usage(conn, by="team")
    with pytest.raises(ValueError, match="unknown report format 'xml'"):
        render_usage(conn, fmt="xml")


NOW = 1_780_000_000.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", NOW - 7 * 86400),
        ("24h", NOW - 86400),
        ("30m", NOW - 1800),
        ("90s", NOW - 90),
        ("2w", NOW - 14 * 86400),
        ("1.5h", NOW - 5400),
        ("now", NOW),
        ("2026-01-31", utc("2026-01-31T00:00:00")),
        ("2026-01-31T09:30", utc("2026-01-31T09:30:00")),
        ("2026-01-31T09:30Z", utc("2026-01-31T09:30:00")),
        ("2026-01-31T09:30:00+02:00", utc("2026-01-31T07:30:00")),
        (" 2026-01-31 09:30:00 ", utc("2026-01-31T09:30:00")),
    ],
)
def test_parse_time(text: str, expected: float) -> None:
    assert parse_time(text, now=NOW) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "7", "7y", "-3d", "2026-13-01"])
def test_parse_time_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="cannot read time"):
        parse_time(text, now=NOW)
