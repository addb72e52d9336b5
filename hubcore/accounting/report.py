"""Usage reports over the usage table (`hubcore usage`): totals grouped by
user, project, token, model, served model, key, upstream or UTC day, and the --since/--until
time syntax. The numbers only: hubcore.cli.render writes them as a table, JSON or
CSV.
"""
from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone

from hubcore.database import floor_of

# Group expressions are fixed SQL chosen by name, never text from the caller.
GROUPS: dict[str, str] = {
    "user": "user",
    "project": "project",
    # An id as text, like every other group; query() adds the token's user and note.
    "token": "CAST(token_id AS TEXT)",
    # The client's model id: prices go by it.
    "model": "model",
    # The id the upstream was asked for: the model_map's, else the client's own.
    "served_model": "COALESCE(served_model, model)",
    # Key labels are only unique within an upstream, so the group names both.
    "key": "CASE WHEN key_label IS NULL THEN NULL "
           "ELSE COALESCE(upstream || '/', '') || key_label END",
    "upstream": "upstream",
    # Days are UTC calendar dates, so a report reads the same on every host:
    # grouped by day number since the epoch, named by query() (no date
    # function is spelled alike on SQLite and PostgreSQL).
    "day": floor_of("ts / 86400"),
}
_EPOCH = date(1970, 1, 1)

COUNT_FIELDS = (
    "requests", "input", "output", "cache_write_5m", "cache_write_1h",
    "cache_read", "reasoning", "cost_micros", "unpriced", "errors", "estimated",
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
       SUM(CASE WHEN cost_basis IS NOT NULL OR (cost_micros IS NULL AND model IS NOT NULL) THEN 1 ELSE 0 END),
       SUM(CASE WHEN outcome != 'ok' THEN 1 ELSE 0 END),
       SUM(CASE WHEN cost_basis = 'estimate' THEN 1 ELSE 0 END)
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
    unpriced: int = 0         # requests for a model with no price (see cost_basis)
    errors: int = 0           # requests whose outcome is not "ok"
    estimated: int = 0        # of the unpriced: cost estimated, so cost_micros holds an estimate
    # Grouped by token: whose it is and its note, which say more than an id.
    user: str | None = field(default=None, kw_only=True)
    note: str | None = field(default=None, kw_only=True)

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
    where, params = ["1 = 1"], []
    if since is not None:
        where.append("ts >= ?")
        params.append(since)
    if until is not None:
        where.append("ts < ?")
        params.append(until)
    sql = _QUERY.format(group=GROUPS[by], where=" AND ".join(where))
    if by == "day":
        rows = [Row(_day(r[0]), *(int(v or 0) for v in r[1:])) for r in conn.execute(sql, params)]
    else:
        rows = [Row(r[0], *(int(v or 0) for v in r[1:])) for r in conn.execute(sql, params)]
    if by == "token":
        _name_tokens(conn, rows)
    if by == "day":
        rows.sort(key=lambda r: r.group or "")
    else:
        # Biggest spenders first; the unnamed group last among equals.
        rows.sort(key=lambda r: (-r.cost_micros, -r.requests, r.group is None, r.group or ""))
    total = Row("total")
    for row in rows:
        total.add(row)
    return rows, total


def _day(number: int) -> str:
    """The UTC date of day `number` since the epoch, as 2026-01-31."""
    return (_EPOCH + timedelta(days=int(number))).isoformat()


def _name_tokens(conn: sqlite3.Connection, rows: list[Row]) -> None:
    owners = {str(i): (user, note) for i, user, note in conn.execute("SELECT id, user, note FROM tokens")}
    for row in rows:
        if row.group is not None and row.group in owners:
            row.user, row.note = owners[row.group]


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
