"""Hub tokens: minting, rotating, hashing, listing, the in-memory table the
proxy checks, reloads.

The database stores only a token's SHA-256 and a short display prefix; the
token itself is shown once, when it is created or rotated. The server keeps
every live token in a dict keyed by hash and swaps in a new dict whenever the
tokens table's generation counter moves (bumped by triggers on every change
to tokens, users and projects). Each entry carries the upstream groups its
requests may use, computed then from its token's, user's and project's
limits, so that the request path reads them as one attribute.
"""
from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from hubcore.governance.limits import Limits, effective_groups, parse_column

TOKEN_PREFIX = "hc-"
# 32 random bytes: the token is as hard to guess as a vendor key.
TOKEN_BYTES = 32
DISPLAY_PREFIX_LEN = len(TOKEN_PREFIX) + 6


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: what the proxy knows about a valid token."""

    token_id: int
    user: str
    project: str | None
    prefix: str
    # The token's own limits (the user's and project's live in the Limiter).
    limits: Limits | None = None
    # The upstream groups its requests may use: the intersection of the groups
    # restrictions of its token, user and project (limits.effective_groups).
    # None: every group; empty: none at all (the Limiter refuses it).
    groups: frozenset[str] | None = None
    # (scope, the groups it allows) of each restriction, e.g. ("user alice",
    # ("cheap",)), for the refusal's text; () as groups: unreadable limits.
    group_rules: tuple[tuple[str, tuple[str, ...]], ...] = ()


def hash_token(token: str | bytes) -> bytes:
    if isinstance(token, str):
        token = token.encode()
    return hashlib.sha256(token).digest()


def _mint() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def create(conn: sqlite3.Connection, user: str, project: str | None = None, note: str | None = None) -> tuple[int, str]:
    """Mint a token for `user`; return (id, token). The token is not stored."""
    if not user:
        raise ValueError("user must not be empty")
    token = _mint()
    now = time.time()
    cur = conn.execute(
        "INSERT INTO tokens (prefix, hash, user, project, note, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (token[:DISPLAY_PREFIX_LEN], hash_token(token), user, project, note, now, now),
    )
    assert cur.lastrowid is not None
    return cur.lastrowid, token


def revoke(conn: sqlite3.Connection, token_id: int) -> bool:
    now = time.time()
    cur = conn.execute(
        "UPDATE tokens SET revoked_at = ?, updated_at = ? WHERE id = ? AND revoked_at IS NULL",
        (now, now, token_id),
    )
    return cur.rowcount == 1


def rotate(conn: sqlite3.Connection, token_id: int) -> str | None:
    """Give an active token a new secret; the old one stops matching. Its id,
    and with it its limits and usage history, stay. None: no active token."""
    token = _mint()
    cur = conn.execute(
        "UPDATE tokens SET prefix = ?, hash = ?, updated_at = ? WHERE id = ? AND revoked_at IS NULL",
        (token[:DISPLAY_PREFIX_LEN], hash_token(token), time.time(), token_id),
    )
    return token if cur.rowcount == 1 else None


def set_note(conn: sqlite3.Connection, token_id: int, note: str | None) -> bool:
    """Replace an active token's note (None clears it); False: no active token."""
    cur = conn.execute(
        "UPDATE tokens SET note = ?, updated_at = ? WHERE id = ? AND revoked_at IS NULL",
        (note, time.time(), token_id),
    )
    return cur.rowcount == 1


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What the database knows of one token, for listing and showing it."""

    id: int
    prefix: str
    user: str
    project: str | None
    note: str | None
    created_at: float
    revoked_at: float | None
    limits: Limits | None
    last_used_at: float | None      # its newest usage row; None: never used

    def status(self, now: float) -> str:
        """active, revoked or expired (at `now`)."""
        if self.revoked_at is not None:
            return "revoked"
        limits = self.limits
        if limits is not None and limits.expires_at is not None and limits.expires_at <= now:
            return "expired"
        return "active"

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of `token list --json` and `token show --json`."""
        return {
            "id": self.id, "prefix": self.prefix, "user": self.user, "project": self.project,
            "note": self.note, "created_at": self.created_at, "revoked_at": self.revoked_at,
            "limits": limits_dict(self.limits), "groups": groups_list(self.limits),
            "last_used_at": self.last_used_at,
        }


def limits_dict(limits: Limits | None) -> dict[str, Any]:
    """Limits as stored ({} for none); unreadable ones as {"error": why}."""
    if limits is None:
        return {}
    if limits.error is not None:
        return {"error": limits.error}
    return limits.to_dict()


def groups_list(limits: Limits | None) -> list[str] | None:
    """The `groups` of a scope's JSON: the upstream groups it is restricted
    to, None when it is not; [] when its limits cannot be read (it may use none)."""
    if limits is None:
        return None
    if limits.error is not None:
        return []
    return list(limits.groups) if limits.groups else None


# A token's last use is its newest usage row: one seek per token into the
# usage_token_ts_cost index (token_id, ts, ...), so nothing on the request
# path has to keep a column of the tokens table current.
_SELECT_INFO = (
    "SELECT id, prefix, user, project, note, created_at, revoked_at, limits,"
    " (SELECT MAX(ts) FROM usage WHERE usage.token_id = tokens.id) FROM tokens"
)


def _info(row: tuple[Any, ...]) -> TokenInfo:
    token_id, prefix, user, project, note, created_at, revoked_at, limits, last_used_at = row
    return TokenInfo(
        token_id, prefix, user, project, note, created_at, revoked_at,
        parse_column(limits, f"token {token_id}"), last_used_at,
    )


def list_tokens(conn: sqlite3.Connection, include_revoked: bool = False) -> list[TokenInfo]:
    """The active tokens (every token with `include_revoked`), by id."""
    sql = _SELECT_INFO
    if not include_revoked:
        sql += " WHERE revoked_at IS NULL"
    return [_info(row) for row in conn.execute(sql + " ORDER BY id")]


def get(conn: sqlite3.Connection, token_id: int) -> TokenInfo | None:
    """One token, revoked or not; None if there is none with that id."""
    row = conn.execute(_SELECT_INFO + " WHERE id = ?", (token_id,)).fetchone()
    return None if row is None else _info(row)


def generation(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM generation WHERE name = 'tokens'").fetchone()
    return int(row[0]) if row else 0


# A token with its user's and project's limits, for its groups.
_SELECT_PRINCIPAL = (
    "SELECT t.id, t.hash, t.user, t.project, t.prefix, t.limits, u.limits, p.limits FROM tokens AS t"
    " LEFT JOIN users AS u ON u.name = t.user LEFT JOIN projects AS p ON p.name = t.project"
)


def load_table(conn: sqlite3.Connection) -> dict[bytes, Principal]:
    rows = conn.execute(_SELECT_PRINCIPAL + " WHERE t.revoked_at IS NULL").fetchall()
    # A user's or project's limits are parsed once, however many tokens it has.
    parsed: dict[tuple[str, str], Limits | None] = {}
    return {bytes(row[1]): _principal(row, parsed) for row in rows}


def principal(conn: sqlite3.Connection, token_id: int) -> Principal | None:
    """The Principal of one token, revoked or not, as the hub would load it
    (for `hubcore token show`); None if there is no token with that id."""
    row = conn.execute(_SELECT_PRINCIPAL + " WHERE t.id = ?", (token_id,)).fetchone()
    return None if row is None else _principal(row, {})


def _principal(row: tuple[Any, ...], parsed: dict[tuple[str, str], Limits | None]) -> Principal:
    token_id, _, user, project, prefix, token_text, user_text, project_text = row

    def scope_limits(kind: str, name: str | None, text: str | None) -> Limits | None:
        if name is None or text is None:
            return None
        key = (kind, name)
        if key not in parsed:
            parsed[key] = parse_column(text, f"{kind} {name}")
        return parsed[key]

    scopes = (
        (f"token {token_id}", None if token_text is None else parse_column(token_text, f"token {token_id}")),
        (f"user {user}", scope_limits("user", user, user_text)),
        (f"project {project}", scope_limits("project", project, project_text)),
    )
    return Principal(
        token_id=token_id, user=user, project=project, prefix=prefix, limits=scopes[0][1],
        groups=effective_groups(*(limits for _, limits in scopes)),
        group_rules=group_rules(scopes),
    )


def group_rules(scopes: tuple[tuple[str, Limits | None], ...]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(scope, groups it allows) of each scope that restricts the groups;
    () as groups for one whose limits cannot be read."""
    return tuple(
        (label, () if limits.error is not None else limits.groups)
        for label, limits in scopes
        if limits is not None and (limits.groups or limits.error is not None)
    )


def load_revoked(conn: sqlite3.Connection) -> dict[bytes, float]:
    """Hash -> revocation time of every revoked token (so they get a 403, not a 401)."""
    rows = conn.execute("SELECT hash, revoked_at FROM tokens WHERE revoked_at IS NOT NULL").fetchall()
    return {bytes(h): float(at) for h, at in rows}


# Valid tokens remembered by value between reloads (see TokenTable.lookup).
SEEN_MAX = 4096


class TokenTable:
    """The live tokens, looked up by hash on every request in O(1)."""

    def __init__(self) -> None:
        self._by_hash: dict[bytes, Principal] = {}
        self._revoked: dict[bytes, float] = {}
        self._generation = -1
        # Tokens seen valid since the last reload, by their value: a token
        # is hashed once per reload, not per request. Bounded; emptied by
        # every reload, so a revoked token stops working with it. The
        # compiled gate (gateway._exchange.HubCore) reads it first, as
        # `lookup` does, without a call.
        self.seen: dict[bytes, Principal] = {}

    def __len__(self) -> int:
        return len(self._by_hash)

    @property
    def generation(self) -> int:
        """The tokens generation the table was loaded at (-1: never loaded)."""
        return self._generation

    def lookup(self, token: bytes) -> Principal | None:
        principal = self.seen.get(token)
        if principal is None:
            principal = self._by_hash.get(hashlib.sha256(token).digest())
            if principal is not None:
                if len(self.seen) >= SEEN_MAX:
                    self.seen.clear()
                self.seen[token] = principal
        return principal

    def revoked_at(self, token: bytes) -> float | None:
        """When `token` was revoked; None if it never was (or is unknown)."""
        return self._revoked.get(hashlib.sha256(token).digest())

    def refresh(self, conn: sqlite3.Connection, force: bool = False) -> bool:
        """Reload from the database if the tokens changed; True if reloaded."""
        current = generation(conn)
        if current == self._generation and not force:
            return False
        self._by_hash = load_table(conn)
        self._revoked = load_revoked(conn)
        self.seen = {}
        self._generation = current
        return True
