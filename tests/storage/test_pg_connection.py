"""PgConnection, the sqlite3-shaped connection to PostgreSQL: how hubcore's
SQL is translated, what comes back (rows, rowcount, lastrowid, description,
numbers), transactions (BEGIN IMMEDIATE serialises writers), lost
connections, errors, and the password kept out of every message."""
from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hubcore import config, pgstore, store
from hubcore.database import PgTarget, mask
from hubcore.errors import ConfigError
from hubcore.governance import tokens
from tests.hubharness import free_port
from tests.pgserver import PASSWORD, PgDatabase
from tests.storage.conftest import pg_server_database

# -- translation (no server) -------------------------------------------------------


def test_parameters_are_numbered_outside_literals_and_comments() -> None:
    statement = pgstore.translate("SELECT '?', \"a?\", x -- why?\n FROM t WHERE a = ? AND b = ? /* ? */")
    assert statement.sql == "SELECT '?', \"a?\", x -- why?\n FROM t WHERE a = $1 AND b = $2 /* ? */"
    assert statement.params == 2 and statement.kind == "rows"
    assert pgstore.translate("EXPLAIN SELECT * FROM usage WHERE id = ?").kind == "rows"


def test_the_reserved_name_user_is_quoted_wherever_it_is_a_name() -> None:
    statement = pgstore.translate("SELECT t.user, user FROM tokens AS t WHERE user = ? AND note = 'user'")
    assert statement.sql == "SELECT t.\"user\", \"user\" FROM tokens AS t WHERE \"user\" = $1 AND note = 'user'"
    assert pgstore.translate('SELECT "user", users.name, username FROM users').sql == (
        'SELECT "user", users.name, username FROM users')


def test_an_insert_into_an_identity_table_returns_its_id() -> None:
    statement = pgstore.translate("INSERT INTO tokens (prefix) VALUES (?)")
    assert statement.sql.endswith(" RETURNING id") and statement.returns_id and statement.writes
    assert not pgstore.translate("INSERT INTO users (name) VALUES (?)").returns_id
    assert not pgstore.translate("INSERT INTO audit (ts) VALUES (?) RETURNING ts").returns_id


def test_transaction_statements_and_pragmas() -> None:
    assert pgstore.translate("BEGIN IMMEDIATE").kind == "begin_immediate"
    assert pgstore.translate("BEGIN").kind == "begin"
    assert pgstore.translate("BEGIN DEFERRED").sql == "BEGIN ISOLATION LEVEL REPEATABLE READ"
    assert pgstore.translate("COMMIT").kind == "commit"
    assert pgstore.translate("ROLLBACK").kind == "rollback"
    assert pgstore.translate("PRAGMA busy_timeout = 1500").value == 1500
    with pytest.raises(sqlite3.NotSupportedError):
        pgstore.translate("PRAGMA journal_mode = WAL")


def test_mask_hides_passwords_of_urls_in_any_text() -> None:
    assert mask("cannot connect to postgresql://bob:s3cret@db:5432/hub: refused") == (
        "cannot connect to postgresql://bob:***@db:5432/hub: refused")
    assert mask("postgres://bob@db/hub") == "postgres://bob@db/hub"


# -- config -----------------------------------------------------------------------------


def parse_server(env: dict[str, str] | None = None, **server: object) -> config.ServerConfig:
    return config.parse({"server": server}, source="hub.toml", env=env or {}).server


def test_a_password_in_the_url_is_refused_without_showing_it() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_server(database="postgresql://bob:s3cret@db/hub")
    assert "server.database:" in str(caught.value) and "s3cret" not in str(caught.value)


@pytest.mark.parametrize(("server", "field"), [
    ({"database": "postgresql://bob@db/hub", "pg_pool_size": 0}, "server.pg_pool_size"),
    ({"database": "postgresql://bob@db/hub", "pg_statement_cache_size": -1}, "server.pg_statement_cache_size"),
    ({"database": "postgresql://bob@db/", "pg_pool_size": 2}, "server.database"),
    ({"database": "postgresql://bob@:99999/hub"}, "server.database"),
    ({"database": "hub.db", "database_password": "env:X"}, "server.database_password"),
    ({"database": "postgresql://bob@db/hub", "database_password": "env:"}, "server.database_password"),
    ({"database": "postgresql://bob@db/hub", "pg_pool_size": "3"}, "server.pg_pool_size"),
])
def test_bad_database_settings_name_their_field(server: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=f"hub.toml: {field}"):
        parse_server(**server)


def test_the_target_carries_its_settings_but_shows_no_password() -> None:
    server = parse_server({"PGPW": "s3cret"}, database="postgresql://bob@db/hub", database_password="env:PGPW",
                          pg_statement_cache_size=0, pg_pool_size=7)
    target = server.database
    assert isinstance(target, PgTarget)
    assert (target.statement_cache_size, target.pool_size, target.password()) == (0, 7, "s3cret")
    assert "s3cret" not in repr(server) and "s3cret" not in str(target)
    assert config.Config(server=server).spool_path == config.PG_SPOOL


def test_a_missing_password_variable_names_the_field_when_connecting() -> None:
    target = parse_server(database="postgresql://bob@127.0.0.1/hub", database_password="env:NOT_SET_HERE").database
    with pytest.raises(store.CannotOpen, match="server.database_password: environment variable NOT_SET_HERE"):
        store.connect(target)


def test_the_password_comes_from_a_file(pg_database: PgDatabase, tmp_path: Path) -> None:
    secret = tmp_path / "pgpassword"
    secret.write_text(PASSWORD + "\n")
    target = parse_server(database=pg_database.url, database_password=f"file:{secret}").database
    store.connect(target).close()


def test_a_wrong_password_fails_without_showing_it(pg_database: PgDatabase) -> None:
    target = parse_server({"PGPW": "not-the-password"}, database=pg_database.url,
                          database_password="env:PGPW").database
    with pytest.raises(store.CannotOpen) as caught:
        store.connect(target)
    assert pg_database.url in str(caught.value) and "not-the-password" not in str(caught.value)


def test_an_unreachable_server_fails_fast_naming_it() -> None:
    url = f"postgresql://bob@127.0.0.1:{free_port()}/hub"
    started = time.monotonic()
    with pytest.raises(store.CannotOpen, match=f"cannot open the database {url}"):
        store.connect(PgTarget(url))
    assert time.monotonic() - started < pgstore.CONNECT_TIMEOUT + 1


# -- on a server ------------------------------------------------------------------------


@pytest.fixture
def target(pg_database: PgDatabase) -> str:
    return pg_server_database(pg_database)


@pytest.fixture
def conn(target: str) -> Iterator[pgstore.PgConnection]:
    c = pgstore.connect(target)
    yield c
    c.close()


def test_results_read_as_sqlite3_cursors_read(conn: pgstore.PgConnection) -> None:
    cur = conn.executemany("INSERT INTO users (name, note, created_at, updated_at) VALUES (?, ?, ?, ?)",
                           [(f"u{n}", None, float(n), 1) for n in range(5)])
    assert cur.rowcount == 5
    assert conn.execute("UPDATE users SET note = ? WHERE created_at >= ?", ("x", 3)).rowcount == 2
    cur = conn.execute("SELECT name, created_at FROM users ORDER BY name")
    assert cur.rowcount == -1
    assert [d[0] for d in cur.description or ()] == ["name", "created_at"]
    assert cur.fetchone() == ("u0", 0.0)
    assert cur.fetchmany(2) == [("u1", 1.0), ("u2", 2.0)]
    assert list(cur) == [("u3", 3.0), ("u4", 4.0)]
    assert cur.fetchone() is None
    empty = conn.execute("SELECT name, note FROM users WHERE name = ?", ("nobody",))
    assert empty.fetchall() == [] and [d[0] for d in empty.description or ()] == ["name", "note"]


def test_sums_are_ints_and_averages_floats_as_on_sqlite(conn: pgstore.PgConnection) -> None:
    conn.executemany("INSERT INTO audit (ts, actor, action, origin) VALUES (?, ?, ?, ?)",
                     [(1.5, "a", "x", "cli"), (2.0, "a", "x", "cli")])
    total, count, mean, biggest = conn.execute("SELECT SUM(id), COUNT(*), AVG(id), MAX(ts) FROM audit").fetchone()
    assert (total, count, mean, biggest) == (3, 2, 1.5, 2.0)
    assert type(total) is int and type(mean) is float


def test_lastrowid_comes_from_the_identity(conn: pgstore.PgConnection) -> None:
    first = conn.execute("INSERT INTO audit (ts, actor, action, origin) VALUES (?, ?, ?, ?)", (1.0, "a", "x", "c"))
    second = conn.execute("INSERT INTO audit (ts, actor, action, origin) VALUES (?, ?, ?, ?)", (1.0, "a", "x", "c"))
    assert (first.lastrowid, second.lastrowid, second.rowcount) == (1, 2, 1)
    assert second.fetchall() == [], "the id is lastrowid, not a row"


def test_with_commits_or_rolls_back(conn: pgstore.PgConnection) -> None:
    with conn:
        conn.execute("BEGIN")
        tokens.create(conn, "kept")
    with pytest.raises(KeyError):
        with conn:
            conn.execute("BEGIN")
            tokens.create(conn, "gone")
            raise KeyError("abort")
    assert [t.user for t in tokens.list_tokens(conn)] == ["kept"]


def test_begin_immediate_serialises_writers_with_the_busy_timeout(target: str, conn: pgstore.PgConnection) -> None:
    other = pgstore.connect(target)
    try:
        conn.execute("BEGIN IMMEDIATE")
        other.execute("PRAGMA busy_timeout = 200")
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="lock"):
            other.execute("BEGIN IMMEDIATE")
        assert 0.15 < time.monotonic() - started < 3
        assert not other.in_transaction, "a BEGIN IMMEDIATE that failed leaves no transaction open"
        # A plain read is not held up by the write lock.
        assert other.execute("SELECT count(*) FROM tokens").fetchone() == (0,)
        conn.execute("COMMIT")
        with store.immediate(other):
            tokens.create(other, "after")
    finally:
        other.close()


def test_a_connection_lost_between_statements_is_made_again(target: str, conn: pgstore.PgConnection) -> None:
    before = conn.execute("SELECT pg_backend_pid()").fetchone()
    kill(target, conn)
    assert conn.execute("SELECT pg_backend_pid()").fetchone() != before
    assert tokens.list_tokens(conn) == []


def test_a_connection_lost_inside_a_transaction_refuses_until_rolled_back(
    target: str, conn: pgstore.PgConnection,
) -> None:
    conn.execute("BEGIN")
    tokens.create(conn, "half")
    kill(target, conn)
    with pytest.raises(sqlite3.OperationalError):
        tokens.create(conn, "other half")
    with pytest.raises(sqlite3.OperationalError, match="inside a transaction"):
        tokens.create(conn, "other half")
    conn.rollback()
    assert tokens.list_tokens(conn) == []


def test_a_read_only_connection_refuses_writes(target: str) -> None:
    pgstore.connect(target).close()  # the schema
    conn = pgstore.connect(target, read_only=True)
    try:
        assert conn.execute("SELECT count(*) FROM tokens").fetchone() == (0,)
        for sql in ("INSERT INTO users (name, created_at, updated_at) VALUES ('x', 1, 1)",
                    "UPDATE tokens SET note = 'x'", "BEGIN IMMEDIATE"):
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                conn.execute(sql)
    finally:
        conn.close()


def test_no_statement_cache_as_behind_a_transaction_mode_pgbouncer(pg_database: PgDatabase) -> None:
    target = pg_server_database(pg_database, pg_statement_cache_size=0)
    conn = store.connect(target)
    try:
        for n in range(3):
            tokens.create(conn, f"user{n}")
        assert len(tokens.list_tokens(conn)) == 3
    finally:
        conn.close()


def kill(target: str, victim: pgstore.PgConnection) -> None:
    """End `victim`'s server process from another connection, as a restart would."""
    (pid,) = victim.execute("SELECT pg_backend_pid()").fetchone() or (None,)
    killer = pgstore.connect(target, migrate=False)
    try:
        assert killer.execute("SELECT pg_terminate_backend(?)", (pid,)).fetchone() == (True,)
    finally:
        killer.close()
    time.sleep(0.1)


def test_a_closed_connection_refuses_statements(conn: pgstore.PgConnection) -> None:
    conn.close()
    with pytest.raises(sqlite3.ProgrammingError):
        conn.execute("SELECT 1")


def test_errors_are_sqlite3_errors(conn: pgstore.PgConnection) -> None:
    with pytest.raises(sqlite3.OperationalError):
        conn.execute("SELEC 1")
    with pytest.raises(sqlite3.ProgrammingError, match="bindings"):
        conn.execute("SELECT ?", ())
    with pytest.raises(sqlite3.DataError):
        conn.execute("SELECT name FROM users WHERE created_at = ?", ("not a number",))


def test_environment_password_is_used_when_the_config_names_none(pg_database: PgDatabase,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(os.environ, "PGPASSWORD", PASSWORD)
    store.connect(PgTarget(pg_database.url)).close()


def test_a_commit_of_a_transaction_with_a_failed_statement_says_it_stored_nothing(
    conn: pgstore.PgConnection,
) -> None:
    conn.execute("BEGIN")
    tokens.create(conn, "lost")
    with pytest.raises(sqlite3.OperationalError):
        conn.execute("SELECT * FROM no_such_table")
    with pytest.raises(sqlite3.OperationalError, match="rolled back"):
        conn.commit()
    assert not conn.in_transaction and tokens.list_tokens(conn) == []
