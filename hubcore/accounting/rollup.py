"""The rollups of usage: sums per local hour of the reporting zone x user x
project x model x served model x upstream x key label x token, the same per
local day (in three tables, DAY_TABLES), and a histogram of time to first
byte per local hour. On SQLite the usage writer adds each batch of rows to
them in the transaction that inserts it (`add`); on PostgreSQL a trigger
keeps them (pgstore.py), which runs in the database server, not in the hub.
This module aligns them to the reporting zone at start and sums them over a
time range.

Buckets are LOCAL hours of the reporting zone (server.budget_timezone), not
UTC hours and not quarter hours: a UTC hour straddles local midnight where
the offset is not whole hours (Asia/Kolkata, +05:30), and quarter-hour
buckets, right for every zone, hold up to four times the rows where traffic
is dense, and the rollup's size is the dashboard's speed. A local hour
starts where the zone's offset modulo an hour, its *phase*, says: 0 for
every whole-hour zone (Europe/Berlin in summer and winter alike), 1800 for
Asia/Kolkata. So a DST change moves no bucket; a zone change rebuilds the
hours (from raw rows) only when the phase changes, and the days (from the
hours) when any offset does; see `prepare`. The days make long ranges cheap:
a month of days holds a fraction of a month of hours' rows, the more so as
the days keep users, models and keys apart (DAY_TABLES). Keeping them
costs the writer's thread some 32,000 instructions a row (`python -m
bench.hotpath --instructions`: 90,000 a row with them, 57,000 without; the
trigger SQLite had until migration 12, five upserts a row, cost 77,000).

Theory of operation of `sums`: a range [since, until) is cut into the whole
local days it covers (read from a daily rollup), the whole hours left at its
ends (usage_hourly) and what is left of a partial hour at either end (raw
usage rows: at most an hour each side, and none when the range starts and
ends on hour boundaries). Every row is counted by exactly one of the three:
its day lies within the days, or else its hour within the hours, or else it
is read raw. (Where a retention deleted raw rows, a range that starts or
ends mid-hour that long ago misses what its partial hours held.)
"""
from __future__ import annotations

import math
import sqlite3
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timezone
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from hubcore import store
from hubcore.database import floor_of

HOUR = 3600
DAY = 86400
# Offsets are probed once a day over these years: every zone's rules since
# 1970 and as far as tzdata projects them change far less often than that.
FIRST_YEAR, LAST_YEAR = 1970, 2100
EARLIEST = -(2 ** 63)      # the first offset's start: it holds for every earlier time
EPOCH_ORDINAL = date(1970, 1, 1).toordinal()

DIMENSIONS = ("user", "project", "model", "served_model", "upstream", "key_label", "token_id")
# The daily rollups and their dimensions: who, what and through which key
# apart, as their product is what makes most of the hourly rollup's rows
# (with 300 users, 6 models and a dozen keys over 90 days, 1.3 million
# hourly rows of 2 million raw ones; a day of all dimensions still held
# 200,000, the three apart hold 46,000). A sum over whole days reads the
# first that has every dimension it groups by: the smallest first.
DAY_TABLES: dict[str, tuple[str, ...]] = {
    "usage_daily_models": ("model", "served_model"),
    "usage_daily_keys": ("upstream", "key_label"),
    "usage_daily_principals": ("user", "project", "token_id"),
}
# Besides the dimensions a sum can be grouped by its bucket's start ("hour",
# unix seconds) or its local date ("day").
GROUPS = (*DIMENSIONS, "hour", "day")
# Each rollup counter as an aggregate of raw usage rows (the trigger's sums).
COUNTERS: dict[str, str] = {
    "requests": "COUNT(*)",
    "errors": "SUM(CASE WHEN outcome != 'ok' THEN 1 ELSE 0 END)",
    "input": "SUM(input_tokens)",
    "output": "SUM(output_tokens)",
    "cache_write_5m": "SUM(cache_write_5m)",
    "cache_write_1h": "SUM(cache_write_1h)",
    "cache_read": "SUM(cache_read)",
    "reasoning": "SUM(reasoning_tokens)",
    "cost_micros": "COALESCE(SUM(cost_micros), 0)",
    "unpriced": "SUM(CASE WHEN cost_basis IS NOT NULL OR (cost_micros IS NULL AND model IS NOT NULL) THEN 1 ELSE 0 END)",
    "estimated": "SUM(CASE WHEN cost_basis = 'estimate' THEN 1 ELSE 0 END)",
    "ttfb_count": "COUNT(ttfb_ms)",
    "ttfb_ms": "COALESCE(SUM(ttfb_ms), 0)",
}
# A dimension that is NULL in the usage table is '' in the rollups, a token
# 0 (see store.py); sums() gives it back as None.
ABSENT: dict[str, str | int] = {**dict.fromkeys(DIMENSIONS, ""), "token_id": 0}

Key = tuple[Any, ...]


def _offset_sql(ts: str) -> str:
    return f"COALESCE((SELECT utc_offset FROM usage_rollup_zone WHERE start <= {ts} ORDER BY start DESC LIMIT 1), 0)"


def bucket_sql(ts: str) -> str:
    """SQL: the start of the local hour holding unix time `ts`, as the trigger computes it."""
    whole = floor_of(ts)
    return f"{whole} - ({whole} + {_offset_sql(ts)}) % {HOUR}"


def day_sql(ts: str) -> str:
    """SQL: the local day (days since 1970-01-01) holding unix time `ts`, as the trigger computes it."""
    return f"({floor_of(ts)} + {_offset_sql(ts)}) / {DAY}"


def _present(dimension: str) -> str:
    """SQL: a raw row's `dimension` as the rollups store it."""
    return f"COALESCE({dimension}, {ABSENT[dimension]!r})"


_TTFB_BIN = "COALESCE((SELECT bin FROM usage_ttfb_bins WHERE lower_ms <= ttfb_ms ORDER BY lower_ms DESC LIMIT 1), 0)"


def _ordinals(count: int) -> str:
    return ", ".join(str(i + 1) for i in range(count))


def _upsert(table: str, key: Sequence[str], select: str) -> str:
    """SQL: add the rows of `select` (the columns `key`, then COUNTERS) to
    `table`, whose primary key is `key`: a new key's row is inserted, a
    known key's counters are added to."""
    columns = ", ".join(key)
    added = ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in COUNTERS)
    return (f"INSERT INTO {table} ({columns}, {', '.join(COUNTERS)})\n{select}\n"
            f"ON CONFLICT ({columns}) DO UPDATE SET {added}")


def _rows_summed(buckets: Sequence[str], where: str) -> str:
    """SQL: the raw usage rows that `where` picks, summed (COUNTERS) per
    `buckets` (expressions of the row) and every dimension: the arithmetic
    of the trigger that kept the rollups before (store.py, migrations 10
    and 12), each row's bucket by the offset in force at its own `ts`."""
    keys = [*buckets, *(_present(d) for d in DIMENSIONS)]
    return (f"SELECT {', '.join(keys)}, {', '.join(COUNTERS.values())}\n"
            f"FROM usage WHERE {where} GROUP BY {_ordinals(len(keys))}")


def _sums_summed(bucket: str, dims: Sequence[str], source: str) -> str:
    """SQL: the sums in `source` summed again per `bucket` and `dims`."""
    return (f"SELECT {bucket}, {', '.join(dims)}, {', '.join(f'SUM({c})' for c in COUNTERS)}\n"
            f"FROM {source} GROUP BY {_ordinals(len(dims) + 1)}")


def _ttfb_added(where: str) -> str:
    """SQL: add the raw rows that `where` picks to the ttfb histogram (rows
    without a ttfb count in no bin)."""
    return f"""
INSERT INTO usage_ttfb_hourly (hour, bin, requests)
SELECT {bucket_sql("ts")}, {_TTFB_BIN}, COUNT(*)
FROM usage WHERE {where} AND ttfb_ms IS NOT NULL GROUP BY 1, 2
ON CONFLICT (hour, bin) DO UPDATE SET requests = usage_ttfb_hourly.requests + excluded.requests
"""


# A zone change at start (see `prepare`): the hours summed again from the
# raw rows, then the days from the hours (a local hour lies within one
# local day).
_REBUILD_HOURS = _upsert("usage_hourly", ("hour", *DIMENSIONS), _rows_summed([bucket_sql("ts")], "ts >= ?"))
_REBUILD_TTFB = _ttfb_added("ts >= ?")
_REBUILD_DAYS = [
    _upsert(table, ("day", *dims), _sums_summed(day_sql("hour"), dims, "usage_hourly"))
    for table, dims in DAY_TABLES.items()
]

# A batch of new rows (see `add`): one pass over the rows sums them per
# hour, UTC offset and every dimension into usage_batch, a table of the
# connection's own (TEMP: no other connection sees it, nothing of it is
# written to the database file); the hours and the three days' tables are
# summed from those few sums, not from the rows again. An hour plus the
# offset of its rows is their local time rounded down to the hour, so
# divided by a day it is their local day, as day_sql gives it. The ttfb
# histogram takes a pass of its own: its bins would split every sum.
_BATCH = "temp.usage_batch"
_BATCH_KEY = ("hour", "utc_offset", *DIMENSIONS)
# What `add` runs, in order, each with the parameters {"after_id": ...}
# (the usage writer runs them in the transaction of its inserts).
ADD_STATEMENTS = (
    f"CREATE TEMP TABLE IF NOT EXISTS usage_batch ({', '.join((*_BATCH_KEY, *COUNTERS))})",
    f"DELETE FROM {_BATCH}",   # the sums of the batch before
    f"INSERT INTO {_BATCH} ({', '.join((*_BATCH_KEY, *COUNTERS))})\n"
    + _rows_summed([bucket_sql("ts"), _offset_sql("ts")], "id > :after_id"),
    _upsert("usage_hourly", ("hour", *DIMENSIONS), _sums_summed("hour", DIMENSIONS, _BATCH)),
    *(_upsert(table, ("day", *dims), _sums_summed(f"(hour + utc_offset) / {DAY}", dims, _BATCH))
      for table, dims in DAY_TABLES.items()),
    _ttfb_added("id > :after_id"),
)
# The id after which a transaction's rows will be: read it in the
# transaction, before its inserts (see `add`).
LAST_ID = "SELECT COALESCE(MAX(id), 0) FROM usage"


# -- the reporting zone -------------------------------------------------------------


def _offset_at(tz: ZoneInfo, ts: int) -> int:
    offset = datetime.fromtimestamp(ts, tz).utcoffset()
    return int(offset.total_seconds()) if offset is not None else 0


@lru_cache(maxsize=8)
def offsets(tz: ZoneInfo) -> tuple[tuple[int, int], ...]:
    """(start, UTC offset in seconds) from each change of the zone's offset
    on, the first from EARLIEST: usage_rollup_zone's rows."""
    first = int(datetime(FIRST_YEAR, 1, 1, tzinfo=timezone.utc).timestamp())
    last = int(datetime(LAST_YEAR, 1, 1, tzinfo=timezone.utc).timestamp())
    found = [(EARLIEST, _offset_at(tz, first))]
    before = first
    for probe in range(first + DAY, last, DAY):
        offset = _offset_at(tz, probe)
        if offset != found[-1][1]:
            # The change lies in (before, probe]: find its second.
            low, high = before, probe
            while high - low > 1:
                mid = (low + high) // 2
                if _offset_at(tz, mid) == offset:
                    high = mid
                else:
                    low = mid
            found.append((high, offset))
        before = probe
    return tuple(found)


def _phases(zone_offsets: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Where the offset modulo an hour changes: what the hours depend on."""
    found: list[tuple[int, int]] = []
    for start, offset in zone_offsets:
        if not found or found[-1][1] != offset % HOUR:
            found.append((start, offset % HOUR))
    return found


@dataclass(frozen=True, slots=True)
class Zone:
    """The reporting zone as the rollups cut time: local hours and days."""

    tz: ZoneInfo

    def offset(self, ts: float) -> int:
        table = offsets(self.tz)
        return table[bisect_right(table, (int(ts), 2 ** 63)) - 1][1]

    def bucket(self, ts: float) -> int:
        """The start of the local hour holding `ts` (what bucket_sql says)."""
        whole = int(ts)
        return whole - (whole + self.offset(whole)) % HOUR

    def day(self, ts: float) -> int:
        """The local day holding `ts`, as days since 1970-01-01 (what day_sql says)."""
        whole = int(ts)
        return (whole + self.offset(whole)) // DAY

    def day_start(self, day: int) -> float:
        """Local midnight of `day` (its first moment, where DST skips midnight)."""
        d = date.fromordinal(day + EPOCH_ORDINAL)
        return datetime(d.year, d.month, d.day, tzinfo=self.tz).timestamp()

    @staticmethod
    def local_date(day: int) -> date:
        """The date of local day `day` (days since 1970-01-01)."""
        return date.fromordinal(day + EPOCH_ORDINAL)


def prepare(conn: sqlite3.Connection, tz: ZoneInfo) -> str | None:
    """Align the rollups to `tz` at start, before rows are written: None
    when they were already, else what was rebuilt ("days" or "hours").

    When the phase changes, the hours are rebuilt from the raw rows as far
    back as those go: a retention that deleted older raw rows leaves the
    older hours as they were (aligned to the previous zone), so totals stay
    right and only their split into the new zone's days can be off. The
    days are then summed again from the hours.
    """
    wanted = list(offsets(tz))
    if _stored_offsets(conn) == wanted:
        return None  # without the write lock: a start beside a busy writer goes on
    with store.immediate(conn):
        stored = _stored_offsets(conn)
        if stored == wanted:
            return None
        rebuilt = "days"
        keep_before = None
        if _phases(stored) != _phases(wanted):
            rebuilt = "hours"
            oldest = conn.execute("SELECT MIN(ts) FROM usage").fetchone()[0]
            if oldest is not None:
                # The old hour of the oldest raw row and every earlier one
                # stay (their raw rows may be gone); the rest is rebuilt.
                keep_before = _bucket(oldest, stored) + HOUR
                conn.execute("DELETE FROM usage_hourly WHERE hour >= ?", (keep_before,))
                conn.execute("DELETE FROM usage_ttfb_hourly WHERE hour >= ?", (keep_before,))
        conn.execute("DELETE FROM usage_rollup_zone")
        conn.executemany("INSERT INTO usage_rollup_zone (start, utc_offset) VALUES (?, ?)", wanted)
        if keep_before is not None:
            conn.execute(_REBUILD_HOURS, (keep_before,))
            conn.execute(_REBUILD_TTFB, (keep_before,))
        for table, rebuild in zip(DAY_TABLES, _REBUILD_DAYS):
            conn.execute(f"DELETE FROM {table}")
            conn.execute(rebuild)
    return rebuilt


def _bucket(ts: float, zone_offsets: Sequence[tuple[int, int]]) -> int:
    """The hour bucket of `ts` under `zone_offsets`: what bucket_sql says."""
    whole = math.floor(ts)
    offset = zone_offsets[bisect_right(zone_offsets, (whole, 2 ** 63)) - 1][1] if zone_offsets else 0
    return whole - (whole + offset) % HOUR


def _stored_offsets(conn: sqlite3.Connection) -> list[tuple[int, int]]:
    return [(int(s), int(o)) for s, o in conn.execute("SELECT start, utc_offset FROM usage_rollup_zone ORDER BY start")]


# -- new rows -------------------------------------------------------------------------


def add(conn: sqlite3.Connection, after_id: int) -> None:
    """Add the usage rows with an id above `after_id` to the rollups.

    Call it in the transaction that inserted them, before its COMMIT, with
    `after_id` read (LAST_ID) in that transaction before its inserts: the
    write lock that BEGIN IMMEDIATE took keeps every other connection from
    inserting meanwhile, so the rows above it are exactly the transaction's
    own, and rows and rollups commit together. A row that ON CONFLICT DO
    NOTHING skipped took no id and adds nothing. On PostgreSQL, nothing:
    its trigger added each row as it was inserted.
    """
    if not isinstance(conn, sqlite3.Connection):
        return
    for statement in ADD_STATEMENTS:
        conn.execute(statement, {"after_id": after_id})


@contextmanager
def adding(conn: sqlite3.Connection) -> Iterator[None]:
    """Add the usage rows the block inserts to the rollups as it ends, as
    the usage writer does (`add`): use it inside the transaction that
    inserts them, around its inserts."""
    if not isinstance(conn, sqlite3.Connection):
        yield  # PostgreSQL: its trigger adds each row
        return
    (after_id,) = conn.execute(LAST_ID).fetchone()
    yield
    add(conn, after_id)


# -- sums over a range ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Plan:
    days: tuple[int | None, int | None] | None     # [first, end) of whole days; None: no days
    spans: tuple[tuple[float | None, float | None], ...]   # the rest, from the hours and raw rows


def _plan(zone: Zone, since: float | None, until: float | None, use_days: bool) -> _Plan:
    if since is not None and until is not None and since >= until:
        return _Plan(None, ())
    if not use_days:
        return _Plan(None, ((since, until),))
    first = None
    if since is not None:
        first = zone.day(since)
        if zone.day_start(first) < since:
            first += 1
    end = None if until is None else zone.day(until)
    if first is not None and end is not None and first >= end:
        return _Plan(None, ((since, until),))
    spans = []
    if first is not None and since is not None and zone.day_start(first) > since:
        spans.append((since, zone.day_start(first)))
    if end is not None and until is not None and until > zone.day_start(end):
        spans.append((zone.day_start(end), until))
    return _Plan((first, end), tuple(spans))


def _hour_at(zone: Zone, ts: float) -> bool:
    """Whether a local hour starts at `ts` and the hour after it has one
    phase: every row of that hour then belongs to it."""
    return ts == int(ts) and zone.bucket(ts) == ts and zone.bucket(ts + HOUR - 1) == ts


def _raw_windows(zone: Zone, since: float | None, until: float | None) -> list[tuple[float, float]]:
    """Where rows of [since, until) that no whole hour of it holds can be:
    within an hour of either end, unless that end is an hour boundary."""
    windows: list[tuple[float, float]] = []
    if since is not None and not _hour_at(zone, since):
        windows.append((since, since + HOUR if until is None else min(since + HOUR, until)))
    if until is not None and not _hour_at(zone, until - HOUR):
        low = until - HOUR if since is None else max(until - HOUR, since)
        if windows and low <= windows[0][1]:
            windows[0] = (windows[0][0], until)
        else:
            windows.append((low, until))
    return windows


def _whole_hours(low: float | None, high: float | None) -> tuple[str, list[Any]]:
    """The hours that start at or after `low` and end by `high`."""
    where, params = [], []
    if low is not None:
        where.append("hour >= ?")
        params.append(low)
    if high is not None:
        where.append("hour <= ?")
        params.append(high - HOUR)
    return " AND ".join(where) or "1 = 1", params


def _outside(low: float | None, high: float | None) -> tuple[str, list[Any]]:
    """Raw rows whose hour is not one of _whole_hours(low, high)."""
    bucket = bucket_sql("ts")
    outside, params = [], []
    if low is not None:
        outside.append(f"{bucket} < ?")
        params.append(low)
    if high is not None:
        outside.append(f"{bucket} > ?")
        params.append(high - HOUR)
    return " OR ".join(outside) or "1 = 0", params


def _select(columns: Sequence[str], source: str) -> str:
    """The SELECT list of `columns` from a rollup (`source` "daily" or
    "hourly") or raw rows ("raw"); "day" from an hourly or raw source is its
    hour, turned into a day in Python."""
    picked = []
    for column in columns:
        if column == "day":
            picked.append({"daily": "day", "hourly": "hour", "raw": bucket_sql("ts")}[source])
        elif column == "hour":
            picked.append(bucket_sql("ts") if source == "raw" else "hour")
        else:
            picked.append(column)
    return ", ".join(picked)


def sums(
    conn: sqlite3.Connection, zone: Zone, by: Sequence[str],
    since: float | None = None, until: float | None = None, counters: Sequence[str] = tuple(COUNTERS),
) -> dict[Key, list[int | float]]:
    """The rollup's `counters` (by default all, in COUNTERS' order) over
    [since, until), grouped by the columns `by` (of GROUPS): {(values of
    by...): counters}. An absent dimension is None, a day a datetime.date,
    an hour its start. Ask only for the counters needed: each costs a sum
    over every row of the range."""
    unknown = [column for column in by if column not in GROUPS] + [c for c in counters if c not in COUNTERS]
    if unknown:
        raise ValueError(f"cannot sum the rollup by or of {', '.join(unknown)}")
    wanted = set(by) - {"day"}
    day_table = next((t for t, dims in DAY_TABLES.items() if wanted <= set(dims)), None) if "hour" not in by else None
    plan = _plan(zone, since, until, use_days=day_table is not None)
    width = len(by)
    group = f" GROUP BY {', '.join(str(i + 1) for i in range(width))}" if width else ""
    select = {source: (_select(by, source) + ", ") if width else "" for source in ("daily", "hourly", "raw")}
    # requests first, whether asked for or not: a range with no rows at all
    # still answers one row to an aggregate without GROUP BY, of 0 requests.
    summed = ", ".join(f"SUM({c})" for c in ("requests", *counters))
    raw = ", ".join(COUNTERS[c] for c in ("requests", *counters))
    queries: list[tuple[str, str, list[Any]]] = []
    if plan.days is not None:
        first, end = plan.days
        where, params = [], []
        if first is not None:
            where.append("day >= ?")
            params.append(first)
        if end is not None:
            where.append("day < ?")
            params.append(end)
        queries.append(("daily", f"SELECT {select['daily']}{summed} FROM {day_table} "
                                 f"WHERE {' AND '.join(where) or '1 = 1'}{group}", params))
    for low, high in plan.spans:
        where_hours, params = _whole_hours(low, high)
        queries.append(("hourly", f"SELECT {select['hourly']}{summed} FROM usage_hourly WHERE {where_hours}{group}",
                        params))
        outside, outside_params = _outside(low, high)
        for start, stop in _raw_windows(zone, low, high):
            queries.append(("raw", f"SELECT {select['raw']}{raw} FROM usage "
                                   f"WHERE ts >= ? AND ts < ? AND ({outside}){group}", [start, stop, *outside_params]))
    found: dict[Key, list[int | float]] = {}
    day_at = by.index("day") if "day" in by else None
    empty = [ABSENT.get(column) for column in by]
    for source, sql, params in queries:
        for row in conn.execute(sql, params):
            if not row[width]:
                continue  # no rows at all: an aggregate without GROUP BY still answers
            key: Key = tuple(
                None if absent is not None and value == absent else value for absent, value in zip(empty, row[:width])
            )
            if day_at is not None:
                stored: int = key[day_at]
                day = stored if source == "daily" else zone.day(stored)
                key = (*key[:day_at], zone.local_date(day), *key[day_at + 1:])
            values = row[width + 1:]
            known = found.get(key)
            if known is None:
                found[key] = [value or 0 for value in values]
            else:
                for i, value in enumerate(values):
                    known[i] += value or 0
    return found


# -- time to first byte ---------------------------------------------------------------


def ttfb_bins(conn: sqlite3.Connection) -> list[float]:
    """The histogram's lower bounds in ms, bin by bin (bin 0 from 0)."""
    return [lower for lower, in conn.execute("SELECT lower_ms FROM usage_ttfb_bins ORDER BY bin")]


def ttfb_histogram(
    conn: sqlite3.Connection, zone: Zone, since: float | None = None, until: float | None = None,
) -> dict[int, int]:
    """Requests per time-to-first-byte bin over [since, until): the whole
    hours from the rollup, the partial hours at its ends from raw rows."""
    if since is not None and until is not None and since >= until:
        return {}
    where, params = _whole_hours(since, until)
    queries = [(f"SELECT bin, SUM(requests) FROM usage_ttfb_hourly WHERE {where} GROUP BY bin", params)]
    outside, outside_params = _outside(since, until)
    for start, stop in _raw_windows(zone, since, until):
        queries.append((f"SELECT {_TTFB_BIN}, COUNT(*) FROM usage WHERE ts >= ? AND ts < ? "
                        f"AND ttfb_ms IS NOT NULL AND ({outside}) GROUP BY 1", [start, stop, *outside_params]))
    counts: dict[int, int] = {}
    for sql, query_params in queries:
        for bin_, n in conn.execute(sql, query_params):
            counts[bin_] = counts.get(bin_, 0) + n
    return counts


def percentile(histogram: dict[int, int], bins: Sequence[float], q: float) -> float | None:
    """The q-quantile (0 < q <= 1) of a ttfb histogram in ms, interpolated
    geometrically within its bin (a bin spans 9 %: so does the error at
    worst); None for an empty histogram."""
    total = sum(histogram.values())
    if not total:
        return None
    rank = q * total
    seen = 0
    for bin_ in sorted(histogram):
        n = histogram[bin_]
        if seen + n >= rank:
            lower = bins[bin_] if bin_ < len(bins) else bins[-1]
            upper = bins[bin_ + 1] if bin_ + 1 < len(bins) else lower * (bins[-1] / bins[-2])
            share = (rank - seen) / n
            if bin_ == 0:       # 0 to 1 ms: linear
                return upper * share
            return float(lower * (upper / lower) ** share)
        seen += n
    return bins[-1]
