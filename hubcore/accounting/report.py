"""Usage reports over the usage table (`hubcore usage`): totals grouped by
user, project, model, key, upstream or UTC day, as a table, JSON or CSV, and
the --since/--until time syntax.
"""
from __future__ import annotations

import csv
import io
import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson

# Group expressions are fixed SQL chosen by name, never text from the caller.
GROUPS: dict[str, str] = {
    "user": "user",
    "project": "project",
    "model": "model",
    # Key labels are only unique within an upstream, so the group names both.
    "key": "CASE WHEN key_label IS NULL THEN NULL "
           "ELSE COALESCE(upstream || '/', '') || key_label END",
    "upstream": "upstream",
    # Days are UTC calendar dates, so a report reads the same on every host.
    "day": "strftime('%Y-%m-%d', ts, 'unixepoch')",
}
FORMATS = ("table", "json", "csv")

COUNT_FIELDS = (
    "requests", "input", "output", "cache_write_5m", "cache_write_1h",
    "cache_read", "reasoning", "cost_micros", "unpriced", "errors",
)

_QUERY = """
SELECT {group} AS grp,
       COUNT(*),
       SUM(input_tokens),
       SUM(output_tokens),
       SUM(cache_write_5m),
       SUM(cache_write_1h),
       SUM(cache_read),
       SUM(reasoning_tokens),
       COALESCE(SUM(cost_micros), 0),
       SUM(cost_micros IS NULL AND model IS NOT NULL),
       SUM(outcome != 'ok')
FROM usage
WHERE {where}
GROUP BY grp
"""

_SPAN_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")


@dataclass(slots=True)
class Row:
    group: str | None
    requests: int = 0
    input: int = 0
    output: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    cache_read: int = 0
    reasoning: int = 0
    cost_micros: int = 0
    unpriced: int = 0         # requests for a model with no price (cost unknown)
    errors: int = 0           # requests whose outcome is not "ok"

    @property
    def cache_hit(self) -> float | None:
        """Share of all prompt tokens that were read from the cache."""
        prompt = self.input + self.cache_write_5m + self.cache_write_1h + self.cache_read
        return self.cache_read / prompt if prompt else None

    def add(self, other: Row) -> None:
        for name in COUNT_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def query(
    conn: sqlite3.Connection, by: str = "user",
    since: float | None = None, until: float | None = None,
) -> tuple[list[Row], Row]:
    """Rows grouped by `by` (since inclusive, until exclusive) and their total."""
    if by not in GROUPS:
        raise ValueError(f"cannot group usage by {by!r}; choose one of {', '.join(GROUPS)}")
    where, params = ["1"], []
    if since is not None:
        where.append("ts >= ?")
        params.append(since)
    if until is not None:
        where.append("ts < ?")
        params.append(until)
    sql = _QUERY.format(group=GROUPS[by], where=" AND ".join(where))
    rows = [Row(r[0], *(int(v or 0) for v in r[1:])) for r in conn.execute(sql, params)]
    if by == "day":
        rows.sort(key=lambda r: r.group or "")
    else:
        # Biggest spenders first; the unnamed group last among equals.
        rows.sort(key=lambda r: (-r.cost_micros, -r.requests, r.group is None, r.group or ""))
    total = Row("total")
    for row in rows:
        total.add(row)
    return rows, total


def render(
    conn: sqlite3.Connection, by: str = "user",
    since: float | None = None, until: float | None = None, fmt: str = "table",
) -> str:
    """The usage report as text; `day` groups by UTC date."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")
    rows, total = query(conn, by, since, until)
    if fmt == "json":
        return _json(rows, total, by, since, until)
    if fmt == "csv":
        return _csv(rows, total)
    return _table(rows, total, by, since, until)


def parse_time(text: str, now: float | None = None) -> float:
    """A unix time from `now`, a span back from now (`90s`, `30m`, `24h`, `7d`,
    `2w`) or an ISO 8601 date or time; a time without an offset is UTC."""
    value = text.strip()
    current = time.time() if now is None else now
    if value.lower() == "now":
        return current
    span = _SPAN.fullmatch(value.lower())
    if span:
        return current - float(span.group(1)) * _SPAN_UNITS[span.group(2)]
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"cannot read time {text!r}: use an ISO 8601 date or time "
            "(2026-01-31, 2026-01-31T09:30Z) or a span back from now (30m, 24h, 7d, 2w)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


# -- formats ------------------------------------------------------------------

def _usd(micros: int, places: int) -> str:
    """Micro-dollars as dollars with `places` decimals, rounding half up, exactly."""
    scale = 10 ** (6 - places)
    sign = "-" if micros < 0 else ""
    units = (abs(micros) + scale // 2) // scale
    whole, frac = divmod(units, 10 ** places)
    return f"{sign}{whole:,}.{frac:0{places}d}" if places else f"{sign}{whole:,}"


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _as_dict(row: Row) -> dict[str, Any]:
    return {
        "group": row.group,
        "requests": row.requests,
        "input": row.input,
        "output": row.output,
        "cache_write_5m": row.cache_write_5m,
        "cache_write_1h": row.cache_write_1h,
        "cache_read": row.cache_read,
        "reasoning": row.reasoning,
        "cost_micros": row.cost_micros,
        "cost_usd": row.cost_micros / 1_000_000,
        "unpriced": row.unpriced,
        "cache_hit_ratio": row.cache_hit,
        "errors": row.errors,
    }


def _json(
    rows: Sequence[Row], total: Row, by: str, since: float | None, until: float | None
) -> str:
    total_dict = _as_dict(total)
    del total_dict["group"]
    document = {
        "by": by,
        "since": _iso(since),
        "until": _iso(until),
        "groups": [_as_dict(r) for r in rows],
        "total": total_dict,
    }
    return orjson.dumps(document, option=orjson.OPT_INDENT_2).decode()


CSV_HEADER = (
    "group", "requests", "input", "output", "cache_write_5m", "cache_write_1h",
    "cache_read", "reasoning", "cost_usd", "unpriced", "cache_hit_ratio", "errors",
)


def _csv(rows: Sequence[Row], total: Row) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for row in [*rows, total]:
        hit = row.cache_hit
        writer.writerow([
            "TOTAL" if row is total else (row.group or ""),
            row.requests, row.input, row.output, row.cache_write_5m,
            row.cache_write_1h, row.cache_read, row.reasoning,
            # Six decimals: the exact cost, no float rounding.
            _usd(row.cost_micros, 6).replace(",", ""),
            row.unpriced,
            "" if hit is None else f"{hit:.4f}",
            row.errors,
        ])
    return out.getvalue()


def _table(
    rows: Sequence[Row], total: Row, by: str, since: float | None, until: float | None
) -> str:
    header = [by, "requests", "input", "output", "cache w 5m", "cache w 1h",
              "cache read", "reasoning", "cost $", "unpriced", "cache hit", "errors"]

    def cells(row: Row, label: str) -> list[str]:
        hit = row.cache_hit
        return [
            label, f"{row.requests:,}", f"{row.input:,}", f"{row.output:,}",
            f"{row.cache_write_5m:,}", f"{row.cache_write_1h:,}", f"{row.cache_read:,}",
            f"{row.reasoning:,}", _usd(row.cost_micros, 4), f"{row.unpriced:,}",
            "-" if hit is None else f"{hit:.1%}", f"{row.errors:,}",
        ]

    body = [cells(r, r.group if r.group is not None else "(none)") for r in rows]
    foot = cells(total, "total")
    widths = [max(len(line[i]) for line in [header, *body, foot]) for i in range(len(header))]

    def line(values: Sequence[str]) -> str:
        first = values[0].ljust(widths[0])
        rest = (v.rjust(w) for v, w in zip(values[1:], widths[1:]))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    title = (
        f"usage by {by}, {_iso(since) or 'beginning'} to {_iso(until) or 'now'} (UTC)"
    )
    lines = [title, "", line(header), rule, *(line(b) for b in body), rule, line(foot)]
    return "\n".join(lines) + "\n"
