"""`hubcore db copy`: move a hub's SQLite database into PostgreSQL.

Every table an operator made (users, projects, tokens, operators and their
API tokens, key switches, the audit trail) is copied with its keys, and the
usage rows by request id, each batch in a transaction of its own and with
ON CONFLICT DO NOTHING: a copy cut short is run again and picks up where it
stopped, and a run over rows copied before (or written meanwhile by a hub
already on PostgreSQL) inserts none of them twice. Ids are kept, so usage
rows still point at their tokens; the identity sequences are moved past the
copied ids afterwards, so the next token made on PostgreSQL gets a new one.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from hubcore import config, store
from hubcore.accounting.usage import FIELDS, UsageEvent
from hubcore.cli.common import USAGE, CommandError, Subcommands, add_command, config_path, say
from hubcore.database import PgTarget, describe, is_postgres, target as database_target

# Tables in an order their foreign keys accept, each with its conflict key.
# The usage table comes last, keyed by request_id (its ids are the target's own).
KEYED_TABLES: tuple[tuple[str, str], ...] = (
    ("users", "name"),
    ("projects", "name"),
    ("tokens", "id"),
    ("admins", "name"),
    ("admin_tokens", "id"),
    ("key_switches", "upstream, label"),
    ("audit", "id"),
    ("spend_resets", "kind, name, budget_window"),
    ("usage_carried", "token_id"),
)
DEFAULT_BATCH = 5000
# Seconds between two updates of the progress line on a terminal.
PROGRESS_INTERVAL = 0.2


def add_commands(sub: Subcommands) -> None:
    group = add_command(sub, "db", "move the database between engines")
    actions = group.add_subparsers(metavar="ACTION")
    p = add_command(actions, "copy", "copy a SQLite database into PostgreSQL (idempotent, resumable)", run_copy)
    p.add_argument("--from", dest="source", required=True, metavar="PATH", help="the SQLite database file")
    p.add_argument("--to", dest="target", metavar="URL",
                   help="postgresql://USER@HOST:PORT/DATABASE (default: the config's [server] database)")
    p.add_argument("--password", metavar="REF",
                   help="the target's password as env:NAME or file:PATH (default: the config's "
                        "database_password when --to is the config's database, else PGPASSWORD or ~/.pgpass)")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help=f"rows per transaction (default {DEFAULT_BATCH})")


def run_copy(args: argparse.Namespace) -> int:
    """Check the arguments, then copy."""
    if args.batch < 1:
        raise CommandError("--batch: must be at least 1", USAGE)
    if is_postgres(args.source):
        raise CommandError("--from: must be a SQLite file (copying out of PostgreSQL is pg_dump's job)", USAGE)
    if not os.path.isfile(args.source):
        raise CommandError(f"--from: no database at {os.path.abspath(args.source)}", USAGE)
    problem = store.database_problem(args.source)
    if problem is not None:
        raise CommandError(f"--from {args.source}: {problem}")
    target = _target(args)
    source = store.connect(args.source)
    try:
        copied = asyncio.run(copy(source, target, args.batch, sys.stderr))
    finally:
        source.close()
    for table, (new, present) in copied.items():
        print(f"{table}: {new} copied, {present} already there")
    say(f"copied {os.path.abspath(args.source)} into {target.display}")
    return 0


def _target(args: argparse.Namespace) -> PgTarget:
    server = config.load_server(config_path(args))
    url = args.target or server.database
    if not is_postgres(url):
        raise CommandError(
            "--to: name a postgresql:// database (the config's [server] database is "
            f"{describe(server.database)})", USAGE)
    if args.target:
        from hubcore.database import url_problem

        problem = url_problem(args.target)
        if problem is not None:
            raise CommandError(f"--to: {problem}", USAGE)
    if args.password:
        return database_target(url, password_ref=args.password, where="--password")
    if isinstance(server.database, PgTarget) and str(server.database) == url:
        return server.database
    return database_target(url)


class Progress:
    """One line on a terminal, rewritten in place; nothing elsewhere."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.live = out.isatty()
        self._shown = 0.0

    def show(self, table: str, done: int, total: int, *, final: bool = False) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if not final and now - self._shown < PROGRESS_INTERVAL:
            return
        self._shown = now
        share = f"{100 * done // total:3d}%" if total else "100%"
        self.out.write(f"\r\x1b[Kcopying {table}: {share} ({done} of {total} rows)")
        if final:
            self.out.write("\n")
        self.out.flush()


async def copy(source: sqlite3.Connection, target: PgTarget, batch: int, out: TextIO) -> dict[str, tuple[int, int]]:
    """Copy every table; (rows copied, rows already there) per table."""
    from hubcore import pgstore
    from hubcore.accounting.pgwriter import INSERT_SQL, columns

    progress = Progress(out)
    try:
        await asyncio.to_thread(lambda: pgstore.connect(target).close())  # the schema
        conn = await pgstore.open_async(target)
    except (sqlite3.Error, *pgstore.DRIVER_ERRORS) as e:
        raise CommandError(f"cannot open the database {target.display}: {pgstore.sqlite_error(e)}") from e
    copied: dict[str, tuple[int, int]] = {}
    try:
        for table, key in KEYED_TABLES:
            names = [row[1] for row in source.execute(f"PRAGMA table_info({table})")]
            total = source.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            sql = await _unnest_insert(conn, table, names, key)
            new = done = 0
            rows = source.execute(f"SELECT {', '.join(map(_quoted, names))} FROM {table} ORDER BY {key}")
            while chunk := rows.fetchmany(batch):
                async with conn.transaction():
                    status = await conn.execute(sql, *[list(column) for column in zip(*chunk)])
                new += int(status.rpartition(" ")[2])
                done += len(chunk)
                progress.show(table, done, total)
            progress.show(table, done, total, final=True)
            copied[table] = (new, total - new)
        total = source.execute("SELECT count(*) FROM usage").fetchone()[0]
        new = done = 0
        last = 0
        while True:
            chunk = source.execute(
                f"SELECT id, {', '.join(FIELDS)} FROM usage WHERE id > ? ORDER BY id LIMIT ?", (last, batch),
            ).fetchall()
            if not chunk:
                break
            last = chunk[-1][0]
            events = [UsageEvent(*row[1:]) for row in chunk]
            async with conn.transaction():
                status = await conn.execute(INSERT_SQL, *columns(events))
            new += int(status.rpartition(" ")[2])
            done += len(chunk)
            progress.show("usage", done, total)
        progress.show("usage", done, total, final=True)
        copied["usage"] = (new, done - new)
        # Explicit ids do not move an identity's sequence: past the copied
        # ones, or the next token made here would collide with a copied one.
        for table in sorted(pgstore.IDENTITY_TABLES):
            await conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                f" GREATEST((SELECT max(id) FROM {table}), 1), (SELECT max(id) FROM {table}) IS NOT NULL)"
            )
    except pgstore.DRIVER_ERRORS as e:
        raise CommandError(f"copying into {target.display} failed (run the command again to resume): "
                           f"{pgstore.sqlite_error(e)}") from e
    finally:
        if conn.is_closed():
            conn.terminate()
        else:
            await conn.close()
    return copied


async def _unnest_insert(conn: Any, table: str, names: Sequence[str], key: str) -> str:
    """One INSERT of a whole batch of `table`'s rows, a typed array per
    column (types as the target declares them), skipping rows whose `key`
    is there already; its command tag counts the rows it inserted."""
    types = {
        record["column_name"]: record["udt_name"] for record in await conn.fetch(
            "SELECT column_name, udt_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = $1", table)
    }
    missing = [name for name in names if name not in types]
    if missing:
        raise CommandError(f"the target's table {table} has no column {', '.join(missing)}: "
                           "is it a database of an older hubcore?")
    arrays = ", ".join(f"${i}::{types[name]}[]" for i, name in enumerate(names, 1))
    return (f"INSERT INTO {table} ({', '.join(map(_quoted, names))}) SELECT * FROM unnest({arrays})"
            f" ON CONFLICT ({key}) DO NOTHING")


def _quoted(name: str) -> str:
    return f'"{name}"' if name == "user" else name
