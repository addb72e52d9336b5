"""A developer's own figures for /me, read in a worker thread from a
read-only SQLite connection: the spend of the current day, week and month
and of each of the last 30 days, in the reporting time zone
(server.budget_timezone), and the user's stored limits."""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from hubcore.accounting import report
from hubcore.database import floor_of
from hubcore.dashboard.web import connect_read_only
from hubcore.governance.limits import Limits, calendar_periods
from hubcore.governance.storage import read_limits

CHART_DAYS = 30
# The daily chart sums usage in SQL per quarter hour, then by local date
# here: every time zone's offset is a whole number of quarter hours, so no
# bucket straddles a local midnight.
QUARTER_HOUR = 900


@dataclass(frozen=True, slots=True)
class Period:
    name: str          # "today", "week", "month"
    start: float
    end: float
    requests: int
    input: int
    output: int
    cost_micros: int


@dataclass(frozen=True, slots=True)
class Mine:
    periods: tuple[Period, ...]
    days: tuple[tuple[date, int], ...]   # (local date, cost in micro-dollars), oldest first
    user_limits: Limits | None


def read_mine(database: str, user: str, tz: ZoneInfo, now: float) -> Mine:
    """`user`'s figures as of `now`; blocking: run it in a worker thread."""
    conn = connect_read_only(database)
    try:
        periods = []
        for name, (start, end) in zip(("today", "week", "month"), calendar_periods(now, tz)):
            # The same query as `hubcore usage --by user --since START --until END`.
            rows, _ = report.query(conn, "user", start, end)
            row = next((r for r in rows if r.group == user), report.Row(user))
            periods.append(Period(name, start, end, row.requests, row.input, row.output, row.cost_micros))
        return Mine(tuple(periods), _daily(conn, user, tz, now), _user_limits(conn, user))
    finally:
        conn.close()


def chart_days(now: float, tz: ZoneInfo) -> list[date]:
    today = datetime.fromtimestamp(now, tz).date()
    return [today - timedelta(days=back) for back in range(CHART_DAYS - 1, -1, -1)]


def _daily(conn: sqlite3.Connection, user: str, tz: ZoneInfo, now: float) -> tuple[tuple[date, int], ...]:
    days = chart_days(now, tz)
    first = days[0]
    since = datetime(first.year, first.month, first.day, tzinfo=tz).timestamp()
    spent = dict.fromkeys(days, 0)
    rows = conn.execute(
        f"SELECT {floor_of(f'ts / {QUARTER_HOUR}')}, COALESCE(SUM(cost_micros), 0) FROM usage "
        "WHERE user = ? AND ts >= ? GROUP BY 1",
        (user, since),
    )
    for bucket, micros in rows:
        day = datetime.fromtimestamp(bucket * QUARTER_HOUR, tz).date()
        if day in spent:
            spent[day] += int(micros)
    return tuple(spent.items())


def _user_limits(conn: sqlite3.Connection, user: str) -> Limits | None:
    try:
        return read_limits(conn, "user", user)
    except KeyError:  # a user without a row has no limits of its own
        return None
