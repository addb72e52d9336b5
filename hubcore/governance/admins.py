"""Operator accounts for the dashboard: names, scrypt password hashes, admin
API tokens (for `/api/v1/`), sign-in times.

A password is stored as `scrypt$n$r$p$salt$key` (salt and key in base64),
so every hash carries the parameters it was made with: raising SCRYPT_N later
leaves older hashes verifiable. An admin API token is stored like a hub token,
as its SHA-256 (tokens.hash_token) and a short display prefix; it is shown
once, when it is minted.
"""
from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
import secrets
import sqlite3
from dataclasses import dataclass
from typing import Any

from hubcore.governance.tokens import hash_token

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
MIN_PASSWORD_LENGTH = 12

# scrypt as OWASP's password storage cheat sheet gives it: N=2^15, r=8, p=1
# costs 32 MiB and some 50-100 ms per check, per guess for an attacker too.
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32
# hashlib refuses above its 32 MiB default, and N=2^15, r=8 needs 128*N*r =
# 32 MiB plus a little: room for parameters up to twice the current ones.
SCRYPT_MAXMEM = 2 * 128 * SCRYPT_N * SCRYPT_R + 1024 * 1024
SCHEME = "scrypt"

ADMIN_TOKEN_PREFIX = "hca-"
ADMIN_TOKEN_BYTES = 32
DISPLAY_PREFIX_LEN = len(ADMIN_TOKEN_PREFIX) + 6


class AdminExists(ValueError):
    """`add` of a name that already has an account."""


def check_name(name: str) -> None:
    """ValueError naming what a valid operator name is."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"bad operator name {name!r}: use 1 to 64 letters, digits and . _ @ - (no spaces)"
        )


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"the password must be at least {MIN_PASSWORD_LENGTH} characters long")


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=SCRYPT_MAXMEM, dklen=dklen)


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """The stored form of `password`: `scrypt$n$r$p$salt$key`, a fresh salt each time."""
    salt = secrets.token_bytes(SALT_BYTES)
    key = _scrypt(password, salt, n, r, p, KEY_BYTES)
    return f"{SCHEME}${n}${r}${p}${b64encode(salt)}${b64encode(key)}"


def check_hash(stored: str, password: str) -> bool:
    """Whether `password` matches the stored hash, computed with the
    parameters the hash names; False for a hash that cannot be read."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        return False
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, key = b64decode(parts[4]), b64decode(parts[5])
        computed = _scrypt(password, salt, n, r, p, len(key))
    except (ValueError, binascii.Error):
        # Also what hashlib raises for parameters it refuses (n not a power
        # of two, over maxmem): such a hash verifies nothing.
        return False
    return hmac.compare_digest(computed, key)


@functools.cache
def dummy_hash() -> str:
    """A hash of no one's password, made once per process with the current
    parameters: checked when a name has no account, so that a missing name
    takes as long to refuse as a wrong password."""
    return hash_password(secrets.token_urlsafe(16))


# -- accounts ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdminInfo:
    name: str
    created_at: float
    last_sign_in_at: float | None
    tokens: int         # its admin API tokens

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of `hubcore admin list --json`."""
        return {
            "name": self.name, "created_at": self.created_at,
            "last_sign_in_at": self.last_sign_in_at, "tokens": self.tokens,
        }


def add(conn: sqlite3.Connection, name: str, password: str, now: float) -> None:
    """A new operator. ValueError for a bad name or password, AdminExists
    when the name is taken."""
    check_name(name)
    check_password(password)
    stored = hash_password(password)
    try:
        conn.execute(
            "INSERT INTO admins (name, password, created_at, updated_at) VALUES (?, ?, ?, ?)",
            (name, stored, now, now),
        )
    except sqlite3.IntegrityError:
        raise AdminExists(f"operator {name} already exists") from None


def remove(conn: sqlite3.Connection, name: str) -> bool:
    """Delete an operator and its API tokens; False: no such operator."""
    return conn.execute("DELETE FROM admins WHERE name = ?", (name,)).rowcount == 1


def set_password(conn: sqlite3.Connection, name: str, password: str, now: float) -> bool:
    """Replace an operator's password; False: no such operator."""
    check_password(password)
    cur = conn.execute(
        "UPDATE admins SET password = ?, updated_at = ? WHERE name = ?", (hash_password(password), now, name)
    )
    return cur.rowcount == 1


def exists(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM admins WHERE name = ?", (name,)).fetchone() is not None


def list_admins(conn: sqlite3.Connection) -> list[AdminInfo]:
    """Every operator, by name."""
    rows = conn.execute(
        "SELECT name, created_at, last_sign_in_at,"
        " (SELECT count(*) FROM admin_tokens WHERE admin_tokens.admin = admins.name)"
        " FROM admins ORDER BY name"
    ).fetchall()
    return [AdminInfo(*row) for row in rows]


def verify_password(conn: sqlite3.Connection, name: str, password: str) -> bool:
    """Whether `name` is an operator whose password is `password`. A name
    with no account costs one scrypt as well (over dummy_hash), so the time
    an answer takes does not tell which names exist."""
    row = conn.execute("SELECT password FROM admins WHERE name = ?", (name,)).fetchone()
    if row is None:
        check_hash(dummy_hash(), password)
        return False
    return check_hash(row[0], password)


def record_sign_in(conn: sqlite3.Connection, name: str, when: float) -> None:
    conn.execute("UPDATE admins SET last_sign_in_at = ? WHERE name = ?", (when, name))


# -- admin API tokens --------------------------------------------------------------


def create_token(conn: sqlite3.Connection, name: str, now: float) -> tuple[int, str]:
    """Mint an admin API token for operator `name`: (id, token). The token
    is not stored. LookupError: no such operator."""
    if not exists(conn, name):
        raise LookupError(f"no operator {name}")
    token = ADMIN_TOKEN_PREFIX + secrets.token_urlsafe(ADMIN_TOKEN_BYTES)
    cur = conn.execute(
        "INSERT INTO admin_tokens (admin, prefix, hash, created_at) VALUES (?, ?, ?, ?)",
        (name, token[:DISPLAY_PREFIX_LEN], hash_token(token), now),
    )
    assert cur.lastrowid is not None
    return cur.lastrowid, token


def verify_api_token(conn: sqlite3.Connection, token: str) -> str | None:
    """The operator an admin API token belongs to; None for any other
    string. A lookup by hash: nothing secret is compared in Python."""
    if not token.startswith(ADMIN_TOKEN_PREFIX):
        return None
    row = conn.execute("SELECT admin FROM admin_tokens WHERE hash = ?", (hash_token(token),)).fetchone()
    return None if row is None else str(row[0])


def account_version(conn: sqlite3.Connection, name: str) -> float | None:
    """When operator `name`'s account last changed (added, password set);
    None: no such operator. A dashboard session remembers it from the
    sign-in, so removing the operator or changing the password ends it."""
    row = conn.execute("SELECT updated_at FROM admins WHERE name = ?", (name,)).fetchone()
    return None if row is None else float(row[0])
