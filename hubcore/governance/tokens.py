"""Hub tokens: minting, hashing, the in-memory table the proxy checks, reloads.

The database stores only a token's SHA-256 and a short display prefix; the
token itself is shown once, when it is created. The server keeps every live
token in a dict keyed by hash and swaps in a new dict whenever the tokens
table's generation counter moves (bumped by triggers on every change).
"""
from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from dataclasses import dataclass

from hubcore.governance.limits import Limits, parse_column

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


def hash_token(token: str | bytes) -> bytes:
    if isinstance(token, str):
        token = token.encode()
    return hashlib.sha256(token).digest()


def create(conn: sqlite3.Connection, user: str, project: str | None = None, note: str | None = None) -> tuple[int, str]:
    """Mint a token for `user`; return (id, token). The token is not stored."""
    if not user:
        raise ValueError("user must not be empty")
    token = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
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


def list_tokens(conn: sqlite3.Connection, include_revoked: bool = False) -> list[dict[str, object]]:
    sql = "SELECT id, prefix, user, project, note, created_at, revoked_at FROM tokens"
    if not include_revoked:
        sql += " WHERE revoked_at IS NULL"
    rows = conn.execute(sql + " ORDER BY id").fetchall()
    keys = ("id", "prefix", "user", "project", "note", "created_at", "revoked_at")
    return [dict(zip(keys, row)) for row in rows]


def generation(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM generation WHERE name = 'tokens'").fetchone()
    return int(row[0]) if row else 0


def load_table(conn: sqlite3.Connection) -> dict[bytes, Principal]:
    rows = conn.execute(
        "SELECT id, hash, user, project, prefix, limits FROM tokens WHERE revoked_at IS NULL"
    ).fetchall()
    return {
        bytes(h): Principal(
            token_id=i, user=u, project=p, prefix=pre,
            limits=None if lim is None else parse_column(lim, f"token {i}"),
        )
        for i, h, u, p, pre, lim in rows
    }


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
        # every reload, so a revoked token stops working with it.
        self._seen: dict[bytes, Principal] = {}

    def __len__(self) -> int:
        return len(self._by_hash)

    def lookup(self, token: bytes) -> Principal | None:
        principal = self._seen.get(token)
        if principal is None:
            principal = self._by_hash.get(hashlib.sha256(token).digest())
            if principal is not None:
                if len(self._seen) >= SEEN_MAX:
                    self._seen.clear()
                self._seen[token] = principal
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
        self._seen = {}
        self._generation = current
        return True
