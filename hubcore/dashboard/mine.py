"""A developer's own figures for /me, read in a worker thread from a
read-only connection: the spend of the current day, week and month and of
each of the last 30 days, in the reporting time zone
(server.budget_timezone), from the usage rollups (accounting.rollup), and
the user's stored limits."""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from hubcore.accounting import report, rollup
from hubcore.accounting.rollup import Zone
from hubcore.dashboard import reports
from hubcore.dashboard.web import connect_read_only
from hubcore.governance.limits import Limits, calendar_periods
from hubcore.governance.storage import read_limits

CHART_DAYS = 30


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
    zone = Zone(tz)
    try:
        periods = []
        for name, (start, end) in zip(("today", "week", "month"), calendar_periods(now, tz)):
            # The numbers of `hubcore usage --by user --since START --until
            # END`, from the rollups: a month of a busy hub is not summed
            # from its raw rows on every view.
            rows, _ = reports.usage(conn, zone, "user", start, end)
            row = next((r for r in rows if r.group == user), report.Row(user))
            periods.append(Period(name, start, end, row.requests, row.input, row.output, row.cost_micros))
        return Mine(tuple(periods), _daily(conn, user, zone, now), _user_limits(conn, user))
    finally:
        conn.close()


def chart_days(now: float, tz: ZoneInfo) -> list[date]:
    today = datetime.fromtimestamp(now, tz).date()
    return [today - timedelta(days=back) for back in range(CHART_DAYS - 1, -1, -1)]


def _daily(conn: sqlite3.Connection, user: str, zone: Zone, now: float) -> tuple[tuple[date, int], ...]:
    days = chart_days(now, zone.tz)
    first = days[0]
    since = datetime(first.year, first.month, first.day, tzinfo=zone.tz).timestamp()
    spent = dict.fromkeys(days, 0)
    for (who, day), (micros,) in rollup.sums(conn, zone, ("user", "day"), since, None,
                                             counters=("cost_micros",)).items():
        if who == user and day in spent:
            spent[day] += int(micros)
    return tuple(spent.items())


def _user_limits(conn: sqlite3.Connection, user: str) -> Limits | None:
    try:
        return read_limits(conn, "user", user)
    except KeyError:  # a user without a row has no limits of its own
        return None
