"""Which database `[server] database` names: a path is SQLite (hubcore.store),
a postgresql:// or postgres:// URL is PostgreSQL (hubcore.pgstore, imported
only when used: asyncpg costs a CLI command a quarter of a second to import).

A PostgreSQL database travels through hubcore as a PgTarget: a str whose text
is the URL as configured, which never holds a password (config refuses one),
so it can be logged, shown and compared as it is; the password reference
(`env:NAME`, `file:PATH` or a literal) and the connection settings ride along
as attributes and are resolved only when a connection is made.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

SCHEMES = ("postgresql", "postgres")

# asyncpg's own default (Connection statement_cache_size).
DEFAULT_STATEMENT_CACHE_SIZE = 100
# Connections of the usage writer's pool: one batch in flight plus the spool
# replay, and one spare for a connection being replaced after a failure.
DEFAULT_POOL_SIZE = 3

_PASSWORD_IN_URL = re.compile(r"(?P<head>\b(?:postgres(?:ql)?|redis|rediss)://[^:/@\s]*:)(?P<secret>[^@\s]*)(?=@)")


def is_postgres(database: str | Path | None) -> bool:
    """Whether `database` names a PostgreSQL database rather than a SQLite file."""
    if not isinstance(database, str):
        return False
    return database.split("://", 1)[0].lower() in SCHEMES and "://" in database


def mask(text: str) -> str:
    """`text` with the password of every database URL in it replaced by ***
    (error messages of drivers may quote a URL as it was given)."""
    return _PASSWORD_IN_URL.sub(r"\g<head>***", text)


class PgTarget(str):
    """A PostgreSQL database: the URL (text of the str, no password), how to
    get its password, and the settings of connections to it."""

    password_ref: str
    statement_cache_size: int
    pool_size: int
    _resolve: Callable[[str], str] | None

    def __new__(
        cls, url: str, password_ref: str = "", *,
        statement_cache_size: int = DEFAULT_STATEMENT_CACHE_SIZE, pool_size: int = DEFAULT_POOL_SIZE,
        resolve: Callable[[str], str] | None = None,
    ) -> PgTarget:
        self = super().__new__(cls, url)
        self.password_ref = password_ref
        self.statement_cache_size = statement_cache_size
        self.pool_size = pool_size
        self._resolve = resolve
        return self

    def __repr__(self) -> str:
        return f"PgTarget({str.__repr__(self)})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled (to a worker process) with its settings, not as a bare str.
        return (_rebuild, (str(self), self.password_ref, self.statement_cache_size, self.pool_size))

    def password(self) -> str | None:
        """The password, resolved now; None: let the driver find one
        (PGPASSWORD, ~/.pgpass) or go without."""
        if not self.password_ref:
            return None
        if self._resolve is None:
            return self.password_ref
        return self._resolve(self.password_ref)

    @property
    def display(self) -> str:
        """How messages name it: the URL (it holds no password)."""
        return mask(str(self))


def _rebuild(url: str, password_ref: str, statement_cache_size: int, pool_size: int,
             where: str = "server.database_password") -> PgTarget:
    from hubcore.config import resolve_secret

    return PgTarget(url, password_ref, statement_cache_size=statement_cache_size, pool_size=pool_size,
                    resolve=lambda ref: resolve_secret(ref, _environ(), where))


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)


def url_problem(url: str) -> str | None:
    """What is wrong with a postgresql:// URL as `[server] database`, or None."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        return f"not a valid URL: {e}"
    if parts.password is not None:
        return ("the URL must not hold a password (it is shown in logs and messages): "
                "put it in server.database_password as env:NAME or file:PATH")
    if not parts.hostname and "host=" not in parts.query:
        return "the URL names no host; write postgresql://USER@HOST:PORT/DATABASE"
    if port is not None and not 0 < port < 65536:
        return f"port {port} out of range"
    if not unquote(parts.path.lstrip("/")):
        return "the URL names no database; write postgresql://USER@HOST:PORT/DATABASE"
    return None


def target(database: str, *, password_ref: str = "", statement_cache_size: int = DEFAULT_STATEMENT_CACHE_SIZE,
           pool_size: int = DEFAULT_POOL_SIZE, where: str = "server.database_password") -> PgTarget:
    """`database` as a PgTarget: itself if it is one and no password is
    given, else a URL given without a config (a command's --to) whose
    password reference is resolved from the environment when used (none:
    PGPASSWORD or ~/.pgpass)."""
    if isinstance(database, PgTarget) and not password_ref:
        return database
    return _rebuild(str(database), password_ref, statement_cache_size, pool_size, where)


def describe(database: str | Path) -> str:
    """How a message names the database: a SQLite file by its absolute
    path, a PostgreSQL database by its URL with any password masked."""
    if is_postgres(database):
        return mask(str(database))
    import os

    return os.path.abspath(database)


def floor_of(expr: str) -> str:
    """SQL for the floor of the number `expr`, as an integer, that means the
    same on SQLite and PostgreSQL: CAST(x AS INTEGER) truncates towards zero
    on SQLite but rounds to nearest on PostgreSQL, and neither has a floor()
    everywhere (SQLite's math functions are optional). Subtracting one
    where the cast landed above x gives the floor on both. `expr` appears
    three times: it must hold no `?` parameter."""
    if "?" in expr:
        raise ValueError("floor_of: the expression must not hold a ? parameter")
    cast = f"CAST({expr} AS INTEGER)"
    return f"({cast} - CASE WHEN {cast} > {expr} THEN 1 ELSE 0 END)"


def indexed_by(conn: object, index: str) -> str:
    """The clause that makes SQLite read `index` (INDEXED BY; it goes after
    the table's name), or "" on PostgreSQL, which has no index hints and
    needs none: its planner chooses from the statistics ANALYZE keeps, where
    SQLite, without them, may choose blind. `index` is a name from hubcore's
    own code, never text from a caller."""
    import sqlite3

    return f"INDEXED BY {index}" if isinstance(conn, sqlite3.Connection) else ""
