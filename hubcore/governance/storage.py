"""Where limits live: one JSON object in a `limits` column of `tokens`,
`users` and `projects` (migration 2; NULL: no limits), e.g.
`{"rpm": 60, "concurrency": 4, "budget_micros": {"day": 5000000},
"models": ["claude-sonnet-*"], "expires_at": 1767225600.0, "groups": ["cheap"]}`.
Budgets are integer micro-dollars, `expires_at` unix seconds, `groups` the
upstream groups the scope may use (no migration: a hub older than the field
finds the limits unreadable and refuses the scope's requests, fail closed). Triggers on all three tables
bump the tokens generation counter, so a running server reloads within its
token reload interval.

Spend resets (migration 8, `spend_resets`): one row per scope and budget
window, the moment from which its spend counts again. Budgets are rebuilt
from the usage rows at every start, so a reset lives here, not in memory
alone: the Limiter's rebuild leaves out what was spent before it, and its
live counters start the window afresh when a reload brings a newer one
(its writes bump the tokens generation too).
"""
from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field

from hubcore.governance.limits import SCOPE_KINDS, WINDOWS, Limits, parse_column

_TABLES = {"user": "users", "project": "projects"}


@dataclass(frozen=True, slots=True)
class ScopeLimits:
    """Every stored limit, as loaded from the database in one go."""

    tokens: dict[int, Limits] = field(default_factory=dict)   # active tokens only
    users: dict[str, Limits] = field(default_factory=dict)
    projects: dict[str, Limits] = field(default_factory=dict)
    # token id -> (user, project), for reports
    owners: dict[int, tuple[str, str | None]] = field(default_factory=dict)
    # (kind, name) -> {window: unix seconds}: spend before then does not
    # count in that window (a token's name is its id as text).
    resets: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)


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
    result.resets.update(load_spend_resets(conn))
    return result


def load_spend_resets(conn: sqlite3.Connection) -> dict[tuple[str, str], dict[str, float]]:
    """Every stored spend reset: (kind, name) -> {window: moment}."""
    found: dict[tuple[str, str], dict[str, float]] = {}
    for kind, name, window, at in conn.execute("SELECT kind, name, budget_window, reset_at FROM spend_resets"):
        found.setdefault((kind, name), {})[window] = float(at)
    return found


def write_spend_reset(conn: sqlite3.Connection, kind: str, name: str | int, window: str, at: float) -> None:
    """Make `kind name`'s spend in `window` count from `at` on. A later
    moment replaces an earlier one, never the other way round."""
    if kind not in SCOPE_KINDS:
        raise ValueError(f"unknown scope kind {kind!r}; choose one of {', '.join(SCOPE_KINDS)}")
    if window not in WINDOWS:
        raise ValueError(f"unknown budget window {window!r}; choose one of {', '.join(WINDOWS)}")
    conn.execute(
        "INSERT INTO spend_resets (kind, name, budget_window, reset_at) VALUES (?, ?, ?, ?)"
        # CASE, not the two-argument max() that PostgreSQL lacks (GREATEST
        # there); the stored column qualified, which PostgreSQL requires.
        " ON CONFLICT (kind, name, budget_window) DO UPDATE SET reset_at = CASE"
        " WHEN excluded.reset_at > spend_resets.reset_at THEN excluded.reset_at ELSE spend_resets.reset_at END",
        (kind, str(name), window, at),
    )


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


def write_note(conn: sqlite3.Connection, kind: str, name: str, note: str | None) -> None:
    """Replace the note of a user or project that has a row (None clears it)."""
    conn.execute(
        f"UPDATE {_table(kind)} SET note = ?, updated_at = ? WHERE name = ?", (note, time.time(), name),
    )


@dataclass(frozen=True, slots=True)
class ScopeInfo:
    """A user or project: its stored limits and note, and its tokens."""

    kind: str
    name: str
    limits: Limits | None
    note: str | None
    active_tokens: tuple[int, ...]   # ids, oldest first
    revoked_tokens: int              # how many of its tokens are revoked


# A user or project exists once it has a row (limits set on it) or a token,
# revoked or not (its spend history is there).
_SCOPE_COLUMN = {"user": "user", "project": "project"}


def list_scopes(conn: sqlite3.Connection, kind: str) -> list[ScopeInfo]:
    """Every user (or project), by name: those with limits and those with tokens."""
    return _scopes(conn, kind, None)


def get_scope(conn: sqlite3.Connection, kind: str, name: str) -> ScopeInfo | None:
    """One user or project; None when it has neither a row nor a token."""
    found = _scopes(conn, kind, name)
    return found[0] if found else None


def _scopes(conn: sqlite3.Connection, kind: str, only: str | None) -> list[ScopeInfo]:
    table, column = _table(kind), _SCOPE_COLUMN[kind]
    where_row = "" if only is None else " WHERE name = ?"
    where_token = f" WHERE {column} IS NOT NULL" if only is None else f" WHERE {column} = ?"
    params = () if only is None else (only,)
    rows: dict[str, tuple[str | None, str | None]] = {
        name: (text, note) for name, text, note in conn.execute(f"SELECT name, limits, note FROM {table}{where_row}", params)
    }
    active: dict[str, list[int]] = {}
    revoked: dict[str, int] = {}
    for token_id, owner, revoked_at in conn.execute(
        f"SELECT id, {column}, revoked_at FROM tokens{where_token} ORDER BY id", params,
    ):
        if revoked_at is None:
            active.setdefault(owner, []).append(token_id)
        else:
            revoked[owner] = revoked.get(owner, 0) + 1
    names = sorted(set(rows) | set(active) | set(revoked))
    return [
        ScopeInfo(
            kind, name, parse_column(rows[name][0], f"{kind} {name}") if name in rows else None,
            rows[name][1] if name in rows else None, tuple(active.get(name, ())), revoked.get(name, 0),
        )
        for name in names
    ]
