"""Where limits live: one JSON object in a `limits` column of `tokens`,
`users` and `projects` (migration 2; NULL: no limits), e.g.
`{"rpm": 60, "concurrency": 4, "budget_micros": {"day": 5000000},
"models": ["claude-sonnet-*"], "expires_at": 1767225600.0, "groups": ["cheap"]}`.
Budgets are integer micro-dollars, `expires_at` unix seconds, `groups` the
upstream groups the scope may use (no migration: a hub older than the field
finds the limits unreadable and refuses the scope's requests, fail closed). Triggers on all three tables
bump the tokens generation counter, so a running server reloads within its
token reload interval.
"""
from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field

from hubcore.governance.limits import Limits, parse_column

_TABLES = {"user": "users", "project": "projects"}


@dataclass(frozen=True, slots=True)
class ScopeLimits:
    """Every stored limit, as loaded from the database in one go."""

    tokens: dict[int, Limits] = field(default_factory=dict)   # active tokens only
    users: dict[str, Limits] = field(default_factory=dict)
    projects: dict[str, Limits] = field(default_factory=dict)
    # token id -> (user, project), for reports
    owners: dict[int, tuple[str, str | None]] = field(default_factory=dict)


def load_scope_limits(conn: sqlite3.Connection) -> ScopeLimits:
    """Read all limits; safe to run in a worker thread (touches no Limiter)."""
    result = ScopeLimits()
    for token_id, user, project, text in conn.execute(
        "SELECT id, user, project, limits FROM tokens WHERE revoked_at IS NULL"
    ):
        result.owners[token_id] = (user, project)
        limits = parse_column(text, f"token {token_id}")
        if limits is not None:
            result.tokens[token_id] = limits
    for kind, target in (("user", result.users), ("project", result.projects)):
        for name, text in conn.execute(f"SELECT name, limits FROM {_TABLES[kind]}"):
            limits = parse_column(text, f"{kind} {name}")
            if limits is not None:
                target[name] = limits
    return result


def read_limits(conn: sqlite3.Connection, kind: str, name: str | int) -> Limits | None:
    """The stored limits of one scope (None: none set). KeyError if it does not exist."""
    if kind == "token":
        row = conn.execute("SELECT limits FROM tokens WHERE id = ?", (int(name),)).fetchone()
    else:
        row = conn.execute(f"SELECT limits FROM {_table(kind)} WHERE name = ?", (str(name),)).fetchone()
    if row is None:
        raise KeyError(f"no {kind} {name}")
    return parse_column(row[0], f"{kind} {name}")


def write_limits(
    conn: sqlite3.Connection, kind: str, name: str | int, limits: Limits | None,
    *, note: str | None = None,
) -> bool:
    """Store a scope's limits. Users and projects are created as needed; for a
    token, False when no active token has that id."""
    if limits is not None and limits.error is not None:
        raise ValueError("cannot store unreadable limits")
    text = limits.to_json() if limits is not None else None
    now = time.time()
    if kind == "token":
        cur = conn.execute(
            "UPDATE tokens SET limits = ?, updated_at = ? WHERE id = ? AND revoked_at IS NULL",
            (text, now, int(name)),
        )
        return cur.rowcount == 1
    if not name:
        raise ValueError(f"{kind} name must not be empty")
    table = _table(kind)
    # The stored note named with its table: a bare `note` is ambiguous
    # beside excluded.note on PostgreSQL.
    conn.execute(
        f"INSERT INTO {table} (name, limits, note, created_at, updated_at) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (name) DO UPDATE SET limits = excluded.limits,"
        f" note = COALESCE(excluded.note, {table}.note), updated_at = excluded.updated_at",
        (str(name), text, note, now, now),
    )
    return True


def _table(kind: str) -> str:
    try:
        return _TABLES[kind]
    except KeyError:
        raise ValueError(f"unknown scope kind {kind!r}; choose user or project") from None
