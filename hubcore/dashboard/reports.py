"""The dashboard's figures, read from the usage rollups (accounting.rollup),
never from raw rows over long ranges: usage grouped as `hubcore usage`
groups it (the same numbers, the same JSON and CSV), and the overview's
periods, spend over time stacked by user, project or model, and top
spenders. Blocking: run them in a worker thread on a read-only connection.

Days are the reporting zone's (server.budget_timezone), where `hubcore
usage --by day` groups by UTC date: the two agree on days only in UTC.
"""
from __future__ import annotations

import csv
import io
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from hubcore.accounting import report, rollup
from hubcore.accounting.report import Row
from hubcore.accounting.rollup import Zone
from hubcore.governance.limiter import BudgetLine
from hubcore.governance.limits import MICROS_PER_USD, format_time, format_usd

# The rollup columns each `hubcore usage --by` group is made of.
_COLUMNS: dict[str, tuple[str, ...]] = {
    "user": ("user",),
    "project": ("project",),
    "token": ("token_id",),
    "model": ("model",),
    "served_model": ("served_model", "model"),
    "key": ("upstream", "key_label"),
    "upstream": ("upstream",),
    "day": ("day",),
}
GROUPS = tuple(report.GROUPS)

# report.Row's counters in the order it takes them, by their rollup names.
_ROW_COUNTERS = (
    "requests", "input", "output", "cache_write_5m", "cache_write_1h", "cache_read",
    "reasoning", "cost_micros", "unpriced", "errors", "estimated",
)
_COST = ("cost_micros",)


def _label(by: str, key: tuple[Any, ...]) -> str | None:
    """A group's name as `hubcore usage` gives it, from its rollup columns."""
    if by == "day":
        return str(key[0].isoformat())
    if by == "token":
        return None if key[0] is None else str(key[0])
    if by == "served_model":
        served, model = key
        return served if served is not None else model
    if by == "key":
        upstream, label = key
        if label is None:
            return None
        return ("" if upstream is None else f"{upstream}/") + label
    value = key[0]
    return None if value is None else str(value)


def _row(group: str | None, counters: Sequence[int | float]) -> Row:
    """A report row of the counters summed in _ROW_COUNTERS' order."""
    return Row(group, *(int(value) for value in counters))


def usage(
    conn: sqlite3.Connection, zone: Zone, by: str = "user",
    since: float | None = None, until: float | None = None,
) -> tuple[list[Row], Row]:
    """What report.query gives for the same range (since inclusive, until
    exclusive), from the rollup: rows grouped by `by`, sorted alike, and
    their total. Days are local dates of the reporting zone."""
    if by not in _COLUMNS:
        raise ValueError(f"cannot group usage by {by!r}; choose one of {', '.join(GROUPS)}")
    merged: dict[str | None, Row] = {}
    for key, counters in rollup.sums(conn, zone, _COLUMNS[by], since, until, counters=_ROW_COUNTERS).items():
        group = _label(by, key)
        row = _row(group, counters)
        if group in merged:
            merged[group].add(row)
        else:
            merged[group] = row
    rows = list(merged.values())
    if by == "token":
        owners = {str(i): (user, note) for i, user, note in conn.execute("SELECT id, user, note FROM tokens")}
        for row in rows:
            if row.group in owners:
                row.user, row.note = owners[row.group]
    if by == "day":
        rows.sort(key=lambda r: r.group or "")
    else:
        rows.sort(key=lambda r: (-r.cost_micros, -r.requests, r.group is None, r.group or ""))
    total = Row("total")
    for row in rows:
        total.add(row)
    return rows, total


# -- the formats of `hubcore usage` ---------------------------------------------------

CSV_HEADER = (
    "group", "requests", "input", "output", "cache_write_5m", "cache_write_1h",
    "cache_read", "reasoning", "cost_usd", "unpriced", "cache_hit_ratio", "errors", "estimated",
)


def _iso(ts: float | None) -> str | None:
    return None if ts is None else format_time(ts)


def _as_dict(row: Row, by: str) -> dict[str, Any]:
    named: dict[str, Any] = {}
    if by == "token" and row.group is not None:
        named = {"token_id": int(row.group), "user": row.user, "note": row.note}
    return {
        **named,
        "group": row.group,
        "requests": row.requests,
        "input": row.input,
        "output": row.output,
        "cache_write_5m": row.cache_write_5m,
        "cache_write_1h": row.cache_write_1h,
        "cache_read": row.cache_read,
        "reasoning": row.reasoning,
        "cost_micros": row.cost_micros,
        "cost_usd": row.cost_micros / MICROS_PER_USD,
        "unpriced": row.unpriced,
        "cache_hit_ratio": row.cache_hit,
        "errors": row.errors,
        "estimated": row.estimated,
    }


def usage_document(
    rows: Sequence[Row], total: Row, by: str, since: float | None, until: float | None,
) -> dict[str, Any]:
    """The object `hubcore usage --format json` prints, key for key."""
    total_dict = _as_dict(total, "total")
    del total_dict["group"]
    return {
        "by": by,
        "since": _iso(since),
        "until": _iso(until),
        "groups": [_as_dict(r, by) for r in rows],
        "total": total_dict,
    }


def usage_csv(rows: Sequence[Row], total: Row, by: str) -> str:
    """What `hubcore usage --format csv` prints, column for column."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    named = by == "token"
    writer.writerow([*CSV_HEADER, *(("user", "note") if named else ())])
    for row in [*rows, total]:
        hit = row.cache_hit
        names = (row.user or "", row.note or "") if named else ()
        writer.writerow([
            "TOTAL" if row is total else (row.group or ""),
            row.requests, row.input, row.output, row.cache_write_5m,
            row.cache_write_1h, row.cache_read, row.reasoning,
            format_usd(row.cost_micros, 6, symbol="", grouping=False),
            row.unpriced,
            "" if hit is None else f"{hit:.4f}",
            row.errors,
            row.estimated,
            *names,
        ])
    return out.getvalue()


# -- the overview ---------------------------------------------------------------------

# (name, title, local days back to the first one, today included)
PERIODS = (("today", "Today", 1), ("7d", "7 days", 7), ("30d", "30 days", 30))
CHART_BUCKETS = {"day": 30, "hour": 48}     # bars of each bucket size
CHART_BY = ("user", "project", "model")
TOP_SERIES = 8                              # stacked series before the rest is "other"
TOP_RANKED = 10
RANKED_DAYS = 30                            # the top users and projects: of the last 30 local days
OTHER = "other"
NONE_LABEL = "(none)"


@dataclass(frozen=True, slots=True)
class Period:
    name: str
    title: str
    since: float
    requests: int
    errors: int
    cost_micros: int
    prompt: int           # input tokens of every class: uncached, cache writes, cache reads
    cache_read: int
    ttfb_p50_ms: float | None
    ttfb_p99_ms: float | None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def cache_hit(self) -> float | None:
        return self.cache_read / self.prompt if self.prompt else None


@dataclass(frozen=True, slots=True)
class Chart:
    bucket: str                          # "hour" or "day"
    by: str                              # "user", "project" or "model"
    starts: tuple[float, ...]            # each bar's first moment
    labels: tuple[str, ...]              # each bar's local date or hour
    series: tuple[str, ...]              # the stacked names, biggest first
    rest: bool                           # the last series is everything else (OTHER)
    values: tuple[tuple[int, ...], ...]  # micro-dollars per bar, per series

    def totals(self) -> list[int]:
        return [sum(bar) for bar in self.values]


@dataclass(frozen=True, slots=True)
class Ranked:
    name: str | None
    requests: int
    cost_micros: int


@dataclass(frozen=True, slots=True)
class Overview:
    now: float
    periods: tuple[Period, ...]
    chart: Chart
    top_users: tuple[Ranked, ...]
    top_projects: tuple[Ranked, ...]


def _day_back(zone: Zone, now: float, days: int) -> int:
    return zone.day(now) - days + 1


# What the periods add up. Ask for no more: SQLite pays for every sum in
# every group (30 days by user and project, 7 sums: over 100 ms with 2
# million rows; 2 sums: 20 ms).
_PERIOD_COUNTERS = ("requests", "errors", "cost_micros", "input", "cache_write_5m", "cache_write_1h", "cache_read")


def overview(conn: sqlite3.Connection, zone: Zone, now: float, chart_by: str = "user",
             bucket: str = "day") -> Overview:
    """The overview's figures as of `now`: periods of whole local days to
    now, the chart, the top users and projects of the last 30 days. Each
    comes from the smallest daily rollup that has it (the periods from
    the one by model: a few rows a day)."""
    if chart_by not in CHART_BY:
        raise ValueError(f"cannot stack the chart by {chart_by!r}; choose one of {', '.join(CHART_BY)}")
    if bucket not in CHART_BUCKETS:
        raise ValueError(f"unknown bucket {bucket!r}; choose one of {', '.join(CHART_BUCKETS)}")
    first_day = _day_back(zone, now, max(days for _, _, days in PERIODS))
    per_day = rollup.sums(conn, zone, ("day",), zone.day_start(first_day), counters=_PERIOD_COUNTERS)
    bins = rollup.ttfb_bins(conn)
    periods = []
    for name, title, days in PERIODS:
        start = zone.day_start(_day_back(zone, now, days))
        first = Zone.local_date(_day_back(zone, now, days))
        total = [0] * len(_PERIOD_COUNTERS)
        for (day,), values in per_day.items():
            if day >= first:
                for i, value in enumerate(values):
                    total[i] += int(value)
        c = dict(zip(_PERIOD_COUNTERS, total))
        histogram = rollup.ttfb_histogram(conn, zone, start)
        periods.append(Period(
            name, title, start, c["requests"], c["errors"], c["cost_micros"],
            c["input"] + c["cache_write_5m"] + c["cache_write_1h"] + c["cache_read"], c["cache_read"],
            rollup.percentile(histogram, bins, 0.5), rollup.percentile(histogram, bins, 0.99),
        ))
    since = zone.day_start(_day_back(zone, now, RANKED_DAYS))
    return Overview(now, tuple(periods), _chart(conn, zone, now, chart_by, bucket),
                    _ranked(conn, zone, "user", since), _ranked(conn, zone, "project", since))


def _ranked(conn: sqlite3.Connection, zone: Zone, by: str, since: float) -> tuple[Ranked, ...]:
    sums = rollup.sums(conn, zone, (by,), since, counters=("requests", "cost_micros"))
    found = [Ranked(name, int(requests), int(cost)) for (name,), (requests, cost) in sums.items()]
    found.sort(key=lambda r: (-r.cost_micros, -r.requests, r.name is None, r.name or ""))
    return tuple(found[:TOP_RANKED])


def _chart(conn: sqlite3.Connection, zone: Zone, now: float, by: str, bucket: str) -> Chart:
    if bucket == "day":
        first_day = _day_back(zone, now, CHART_BUCKETS["day"])
        found = rollup.sums(conn, zone, ("day", by), zone.day_start(first_day), counters=_COST)
        return _day_chart(zone, now, by, {(day, name): int(cost) for (day, name), (cost,) in found.items()})
    count = CHART_BUCKETS["hour"]
    first = zone.bucket(now) - (count - 1) * rollup.HOUR
    starts = [float(first + i * rollup.HOUR) for i in range(count)]
    labels = [datetime.fromtimestamp(s, zone.tz).strftime("%Y-%m-%d %H:%M") for s in starts]
    spent: dict[tuple[int, str | None], int] = {}
    for (hour, name), (cost,) in rollup.sums(conn, zone, ("hour", by), first, counters=_COST).items():
        # An hour off the grid (a zone whose phase changed) joins the bar it starts in.
        key = (min(max(int(hour - first) // rollup.HOUR, 0), count - 1), name)
        spent[key] = spent.get(key, 0) + int(cost)
    return _stack(bucket, by, starts, labels, spent)


def _day_chart(zone: Zone, now: float, by: str, spent: dict[tuple[date, str | None], int]) -> Chart:
    count = CHART_BUCKETS["day"]
    first_day = _day_back(zone, now, count)
    days = [Zone.local_date(first_day + i) for i in range(count)]
    slot = {d: i for i, d in enumerate(days)}
    at_slot: dict[tuple[int, str | None], int] = {}
    for (day, name), cost in spent.items():
        if day in slot:
            key = (slot[day], name)
            at_slot[key] = at_slot.get(key, 0) + cost
    starts = [zone.day_start(first_day + i) for i in range(count)]
    return _stack("day", by, starts, [d.isoformat() for d in days], at_slot)


def _stack(bucket: str, by: str, starts: list[float], labels: list[str],
           spent: dict[tuple[int, str | None], int]) -> Chart:
    """The chart of micro-dollars per (bar, name): the biggest names over
    the whole chart stacked, the rest as OTHER."""
    by_series: dict[str | None, int] = {}
    for (_, name), micros in spent.items():
        by_series[name] = by_series.get(name, 0) + micros
    ranked = sorted(by_series, key=lambda name: (-by_series[name], name is None, name or ""))
    # A lone name left over shows as itself rather than as "other".
    shown = ranked if len(ranked) <= TOP_SERIES + 1 else ranked[:TOP_SERIES]
    rest = len(shown) < len(ranked)
    column: dict[str | None, int] = {name: i for i, name in enumerate(shown)}
    width = len(shown) + rest
    values = [[0] * width for _ in starts]
    for (index, name), micros in spent.items():
        values[index][column.get(name, width - 1)] += micros
    series = [NONE_LABEL if name is None else str(name) for name in shown] + ([OTHER] if rest else [])
    return Chart(bucket, by, tuple(starts), tuple(labels), tuple(series), rest, tuple(tuple(v) for v in values))


def closest_budgets(lines: Sequence[BudgetLine], limit: int = TOP_RANKED) -> list[BudgetLine]:
    """The budgets nearest their limit first (spent over limit, a spent
    zero budget first of all)."""
    def used(line: BudgetLine) -> float:
        return line.spent_micros / line.limit_micros if line.limit_micros else float("inf")
    return sorted(lines, key=lambda line: (-used(line), line.kind, line.name, line.window))[:limit]


def period_document(period: Period, zone: Zone) -> dict[str, Any]:
    return {
        "period": period.name,
        "since": format_time(period.since, zone.tz),
        "requests": period.requests,
        "errors": period.errors,
        "error_rate": period.error_rate,
        "cost_micros": period.cost_micros,
        "cost_usd": period.cost_micros / MICROS_PER_USD,
        "cache_hit_ratio": period.cache_hit,
        "ttfb_p50_ms": period.ttfb_p50_ms,
        "ttfb_p99_ms": period.ttfb_p99_ms,
    }


def overview_document(view: Overview, zone: Zone, budgets: Sequence[BudgetLine]) -> dict[str, Any]:
    """/api/v1/overview: the page's figures."""
    chart = view.chart
    return {
        "timezone": zone.tz.key,
        "now": format_time(view.now, zone.tz),
        "periods": [period_document(p, zone) for p in view.periods],
        "chart": {
            "bucket": chart.bucket,
            "by": chart.by,
            "series": list(chart.series),
            "rest": chart.rest,
            "buckets": [
                {"start": format_time(start, zone.tz), "label": label, "total_micros": sum(bar),
                 "series_micros": list(bar)}
                for start, label, bar in zip(chart.starts, chart.labels, chart.values)
            ],
        },
        "top_users": [{"user": r.name, "requests": r.requests, "cost_micros": r.cost_micros} for r in view.top_users],
        "top_projects": [{"project": r.name, "requests": r.requests, "cost_micros": r.cost_micros}
                         for r in view.top_projects],
        "budgets": [line.to_dict() for line in budgets],
    }


def default_range(zone: Zone, now: float, days: int = 7) -> tuple[float, float]:
    """The usage page's range when none is asked for: the last `days` local
    days, today included, to the end of today."""
    first = _day_back(zone, now, days)
    return zone.day_start(first), zone.day_start(zone.day(now) + 1)
