"""The audit trail: one row per administrative change (who, what, on what,
the state before and after as JSON, from where), written in the transaction
of the change itself, and read newest first a page at a time.

No secret goes in: before/after carry limits, notes and states, never a
token, a token's hash or a password hash.
"""
from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any

import orjson

# A page of `read` when the caller names none; also what `hubcore audit` shows.
DEFAULT_LIMIT = 100


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    ts: float
    actor: str          # "cli:<unix user>", "admin:<name>", "cli" (the ops socket)
    action: str         # "token.create", "user.set", "key.disable", ...
    target: str | None  # "token 3", "user alice", "admin bob", "key a1"
    before: Any         # parsed JSON; None: nothing before (or nothing to say)
    after: Any
    origin: str         # "cli", "dashboard", ...

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of `hubcore audit --json` and the dashboard's API."""
        return {
            "id": self.id, "ts": self.ts, "actor": self.actor, "action": self.action, "target": self.target,
            "before": self.before, "after": self.after, "origin": self.origin,
        }


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def record(
    conn: sqlite3.Connection, actor: str, action: str, target: str | None,
    before: Any, after: Any, origin: str, *, now: float | None = None,
) -> int:
    """Append one row; the caller's transaction (if any) decides whether it
    stays, so a change and its row commit or roll back together. Its id."""
    cur = conn.execute(
        "INSERT INTO audit (ts, actor, action, target, before, after, origin) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (time.time() if now is None else now, actor, action, target, _json(before), _json(after), origin),
    )
    assert cur.lastrowid is not None
    return cur.lastrowid


def read(
    conn: sqlite3.Connection, since: float | None = None, limit: int = DEFAULT_LIMIT, before_id: int | None = None,
    *, actor: str | None = None, action: str | None = None,
) -> list[AuditEntry]:
    """Up to `limit` rows, newest first, from `since` (unix seconds, inclusive)
    on, of one `actor` and of actions starting with `action` ("token" finds
    token.create, token.revoke, ...) when given. The next page: `before_id`
    = the last row's id (keyset pagination: rows written meanwhile neither
    shift nor repeat a page)."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    clauses: list[str] = []
    params: list[Any] = []
    if since is not None:
        clauses.append("ts >= ?")
        params.append(since)
    if before_id is not None:
        clauses.append("id < ?")
        params.append(before_id)
    if actor:
        clauses.append("actor = ?")
        params.append(actor)
    if action:
        # A prefix match that LIKE's wildcards in the text cannot widen.
        clauses.append("substr(action, 1, ?) = ?")
        params.extend((len(action), action))
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = conn.execute(
        "SELECT id, ts, actor, action, target, before, after, origin FROM audit"
        f"{where} ORDER BY id DESC LIMIT ?", (*params, limit),
    ).fetchall()
    return [
        AuditEntry(row_id, ts, actor, action, target, _parse(before), _parse(after), origin)
        for row_id, ts, actor, action, target, before, after, origin in rows
    ]


def _parse(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)
