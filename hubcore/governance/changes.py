"""The administrative changes of tokens, users and projects, as the CLI and
the dashboard both make them: create and revoke a token, edit limits and
notes, reset a budget window's spend.

Each runs in the caller's write transaction (store.immediate in the CLI,
dashboard.web.write) and writes its audit row there, so a change and its row
commit or roll back together. Each refuses what it cannot do with an
exception the caller words its own way: NotFound, Revoked, ValueError.
Before and after in the audit rows carry notes, limits and states, never a
token or its hash. Telling the running hub is the caller's part, after the
commit.
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from hubcore.governance import audit, storage, tokens
from hubcore.governance.limit_edits import LimitEdits
from hubcore.governance.limits import SCOPE_KINDS, WINDOWS, Limits, parse_column
from hubcore.governance.tokens import limits_dict


class NotFound(LookupError):
    """No such token, user or project."""


class Revoked(LookupError):
    """The token is revoked: nothing about it changes any more."""


def _active_token(conn: sqlite3.Connection, token_id: int) -> tuple[str | None, str | None]:
    """(limits column, note) of an active token; NotFound or Revoked otherwise."""
    row = conn.execute("SELECT limits, note, revoked_at FROM tokens WHERE id = ?", (token_id,)).fetchone()
    if row is None:
        raise NotFound(f"token {token_id} does not exist")
    if row[2] is not None:
        raise Revoked(f"token {token_id} is revoked")
    return row[0], row[1]


def create_token(
    conn: sqlite3.Connection, user: str, project: str | None = None, note: str | None = None,
    limits: Limits | None = None, *, actor: str, origin: str,
) -> tuple[int, str]:
    """Mint a token with its limits, in one transaction, so that no reload
    sees the token without them: (id, token). The token is not stored."""
    if not user or not user.strip():
        raise ValueError("user must not be empty")
    if limits is not None and limits.error is not None:
        raise ValueError("cannot store unreadable limits")
    project, note = project or None, note or None
    token_id, token = tokens.create(conn, user, project, note)
    if limits is not None:
        storage.write_limits(conn, "token", token_id, limits)
    audit.record(conn, actor, "token.create", f"token {token_id}", None, {
        "user": user, "project": project, "note": note, "limits": limits_dict(limits), "state": "active",
    }, origin)
    return token_id, token


def revoke_token(conn: sqlite3.Connection, token_id: int, *, actor: str, origin: str) -> None:
    _active_token(conn, token_id)
    tokens.revoke(conn, token_id)
    audit.record(conn, actor, "token.revoke", f"token {token_id}", {"state": "active"}, {"state": "revoked"}, origin)


@dataclass(frozen=True, slots=True)
class Edited:
    """A scope's note and limits after an edit, and its limits before."""

    note: str | None
    before: Limits | None
    after: Limits | None


def edit_token(
    conn: sqlite3.Connection, token_id: int, edits: LimitEdits, note: str | None = None,
    *, actor: str, origin: str,
) -> Edited:
    """Apply `edits` to an active token's limits and replace its note when
    `note` is given ("" clears it)."""
    text, old_note = _active_token(conn, token_id)
    before = after = parse_column(text, f"token {token_id}")
    if not edits.empty:
        after = edits.apply(before)
        storage.write_limits(conn, "token", token_id, after)
    new_note = old_note
    if note is not None:
        new_note = note or None
        tokens.set_note(conn, token_id, new_note)
    audit.record(conn, actor, "token.update", f"token {token_id}",
                 {"note": old_note, "limits": limits_dict(before)}, {"note": new_note, "limits": limits_dict(after)},
                 origin)
    return Edited(new_note, before, after)


def _scope_table(kind: str) -> str:
    if kind == "user":
        return "users"
    if kind == "project":
        return "projects"
    raise ValueError(f"unknown scope kind {kind!r}; choose user or project")


def edit_scope(
    conn: sqlite3.Connection, kind: str, name: str, edits: LimitEdits, note: str | None = None,
    *, actor: str, origin: str,
) -> Edited:
    """Apply `edits` to a user's or project's limits (creating its row if it
    has none) and replace its note when `note` is given ("" clears it)."""
    table = _scope_table(kind)
    if not name:
        raise ValueError(f"{kind} name must not be empty")
    row = conn.execute(f"SELECT limits, note FROM {table} WHERE name = ?", (name,)).fetchone()
    before = None if row is None else parse_column(row[0], f"{kind} {name}")
    after = edits.apply(before)
    storage.write_limits(conn, kind, name, after, note=note or None)
    if note == "":
        storage.write_note(conn, kind, name, None)
    (new_note,) = conn.execute(f"SELECT note FROM {table} WHERE name = ?", (name,)).fetchone()
    audit.record(
        conn, actor, f"{kind}.set", f"{kind} {name}",
        None if row is None else {"note": row[1], "limits": limits_dict(before)},
        {"note": new_note, "limits": limits_dict(after)}, origin,
    )
    return Edited(new_note, before, after)


def reset_spend(
    conn: sqlite3.Connection, kind: str, name: str | int, window: str, at: float,
    *, spent_micros: int | None, actor: str, origin: str,
) -> None:
    """Make `kind name`'s spend in `window` count from `at` on: what it spent
    there before no longer counts against its budget (storage.write_spend_reset).
    `spent_micros`: what that was, as far as the caller knows, for the audit row."""
    if kind not in SCOPE_KINDS:
        raise ValueError(f"unknown scope kind {kind!r}; choose one of {', '.join(SCOPE_KINDS)}")
    if window not in WINDOWS:
        raise ValueError(f"expected a budget window, one of {', '.join(WINDOWS)}, not {window!r}")
    if kind == "token":
        _active_token(conn, int(name))
    elif storage.get_scope(conn, kind, str(name)) is None:
        raise NotFound(f"no {kind} {name!s} (no limits and no tokens)")
    storage.write_spend_reset(conn, kind, name, window, at)
    audit.record(conn, actor, f"{kind}.reset_spend", f"{kind} {name}",
                 {"window": window, "spent_micros": spent_micros},
                 {"window": window, "spent_micros": 0, "counts_from": at}, origin, now=at)
