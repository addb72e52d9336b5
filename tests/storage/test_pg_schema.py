"""The PostgreSQL migrations are the twins of the SQLite ones: same version
numbers, and at every version the same tables, columns (name, type, NOT
NULL), indexes and triggers (but for the usage rollups' trigger, which only
PostgreSQL keeps from version 12). Two instances starting at once on an
empty database migrate it once."""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import cast

import asyncpg
import pytest

from hubcore import pgstore, store
from hubcore.governance import tokens
from tests.pgserver import PgDatabase
from tests.storage.conftest import pg_server_database

# SQLite's declared types and what each becomes in PostgreSQL.
TYPES = {"INTEGER": "bigint", "REAL": "double precision", "TEXT": "text", "BLOB": "bytea"}

Shape = dict[str, object]


def sqlite_shape(conn: sqlite3.Connection) -> Shape:
    tables = [name for (name,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    columns = {
        table: [(name, TYPES[kind.upper()], bool(notnull or pk)) for _, name, kind, notnull, _, pk
                in conn.execute(f"PRAGMA table_info({table})")]
        for table in tables
    }
    indexes = {
        name: (table, tuple(column for _, _, column in conn.execute(f"PRAGMA index_info({name})")))
        for name, table in conn.execute(
            "SELECT name, tbl_name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
    }
    triggers = {(name, table) for name, table in conn.execute(
        "SELECT name, tbl_name FROM sqlite_master WHERE type = 'trigger'")}
    return {"tables": tables, "columns": columns, "indexes": indexes, "triggers": triggers}


async def pg_shape(conn: asyncpg.Connection) -> Shape:
    tables = [r["table_name"] for r in await conn.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        " AND table_name != $1 ORDER BY table_name", pgstore.VERSION_TABLE)]
    columns = {
        table: [(r["column_name"], r["data_type"], r["is_nullable"] == "NO") for r in await conn.fetch(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position", table)]
        for table in tables
    }
    # Explicitly made indexes: not those behind PRIMARY KEY and UNIQUE
    # constraints (SQLite's sqlite_autoindex_*, left out above too).
    indexes = {
        r["index"]: (r["table"], tuple(r["columns"])) for r in await conn.fetch(
            "SELECT i.relname AS index, t.relname AS table,"
            " array(SELECT a.attname FROM unnest(x.indkey) WITH ORDINALITY AS k(num, pos)"
            "       JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.num ORDER BY k.pos) AS columns"
            " FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid"
            " JOIN pg_namespace n ON n.oid = t.relnamespace"
            " WHERE n.nspname = 'public' AND t.relname != $1"
            " AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)",
            pgstore.VERSION_TABLE)
    }
    triggers = {(r["trigger_name"], r["event_object_table"]) for r in await conn.fetch(
        "SELECT trigger_name, event_object_table FROM information_schema.triggers WHERE trigger_schema = 'public'")}
    return {"tables": tables, "columns": columns, "indexes": indexes, "triggers": triggers}


def test_both_engines_have_a_migration_for_every_version() -> None:
    assert len(pgstore.PG_MIGRATIONS) == len(store.MIGRATIONS), (
        "every SQLite migration needs its PostgreSQL twin in pgstore.PG_MIGRATIONS, at the same index"
    )
    assert pgstore.SCHEMA_VERSION == store.SCHEMA_VERSION


# The usage rollups' trigger: SQLite drops it at this version (the usage
# writer adds each batch to the rollups itself), PostgreSQL keeps it.
ROLLUP_TRIGGER = ("usage_rollup", "usage")
ROLLUP_TRIGGER_DROPPED = 12


async def test_every_version_has_the_same_schema_on_both(pg_database: PgDatabase, tmp_path: Path) -> None:
    lite = sqlite3.connect(tmp_path / "hub.db", isolation_level=None)
    pg = await asyncpg.connect(pg_database.url, password=pg_database.password)
    try:
        for version in range(store.SCHEMA_VERSION):
            for statement in store._split(store.MIGRATIONS[version]):
                lite.execute(statement)
            await pg.execute(pgstore.PG_MIGRATIONS[version])
            expected, found = sqlite_shape(lite), await pg_shape(pg)
            if version + 1 >= ROLLUP_TRIGGER_DROPPED:
                triggers = cast(set[tuple[str, str]], expected["triggers"])
                assert ROLLUP_TRIGGER not in triggers
                expected["triggers"] = triggers | {ROLLUP_TRIGGER}
            for part in expected:
                assert found[part] == expected[part], f"version {version + 1}: {part} differ"
    finally:
        lite.close()
        await pg.close()


def test_identity_tables_are_those_with_an_integer_primary_key() -> None:
    assert pgstore.IDENTITY_TABLES == {"tokens", "usage", "admin_tokens", "audit"}


async def test_two_starts_at_once_migrate_once(pg_database: PgDatabase) -> None:
    database = pg_server_database(pg_database)
    holder = await asyncpg.connect(pg_database.url, password=pg_database.password)
    # Holding the migration lock keeps both starts waiting at the same
    # point, so they are released together and race for real.
    transaction = holder.transaction()
    await transaction.start()
    await holder.execute(f"SELECT pg_advisory_xact_lock({pgstore.MIGRATION_LOCK})")
    results: list[object] = []
    waiting = threading.Barrier(3)

    def start() -> None:
        waiting.wait()
        try:
            conn = store.connect(database)
            results.append(tokens.generation(conn))
            conn.close()
        except BaseException as e:  # reported by the assertion below
            results.append(e)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    waiting.wait()
    for _ in range(200):
        waiters = await holder.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        if waiters == 2:
            break
        await __import__("asyncio").sleep(0.02)
    assert waiters == 2, "both starts wait on the migration lock"
    await transaction.rollback()
    for thread in threads:
        thread.join(30)
    await holder.close()
    assert results == [0, 0]
    conn = store.connect(database)
    try:
        assert conn.execute("SELECT version FROM hubcore_schema").fetchall() == [(pgstore.SCHEMA_VERSION,)]
        assert conn.execute("SELECT name, value FROM generation").fetchall() == [("tokens", 0)]
    finally:
        conn.close()


def test_a_newer_schema_is_refused(pg_database: PgDatabase) -> None:
    database = pg_server_database(pg_database)
    store.connect(database).close()
    conn = store.connect(database)
    conn.execute("UPDATE hubcore_schema SET version = ?", (pgstore.SCHEMA_VERSION + 1,))
    conn.close()
    with pytest.raises(store.SchemaTooNew, match="newer than this hubcore"):
        store.connect(database)
