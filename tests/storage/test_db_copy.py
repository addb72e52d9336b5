"""`hubcore db copy --from hub.db --to postgresql://...` as a real
subprocess: every table arrives with its keys, a second run copies nothing
twice, a run over a half-done copy finishes it, and tokens made afterwards
on PostgreSQL get fresh ids."""
from __future__ import annotations

import io
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from hubcore import store
from hubcore.accounting import report
from hubcore.cli.db import Progress
from hubcore.gateway.upstreams import store_key_switches
from hubcore.governance import admins, audit, tokens
from hubcore.governance.limits import Limits
from hubcore.governance.storage import write_limits
from tests.hubharness import REPO, run_cli
from tests.pgserver import PASSWORD, PASSWORD_ENV, PgDatabase
from tests.storage.conftest import add_usage, event, pg_server_database

USAGE_ROWS = 2500
TABLES = ("users", "projects", "tokens", "admins", "admin_tokens", "key_switches", "audit")


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HUBCORE_", "PG"))}
    return {**clean, "PYTHONPATH": str(REPO), PASSWORD_ENV: PASSWORD}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "hub.db"
    conn = store.connect(path)
    try:
        first, _ = tokens.create(conn, "alice", "proj", note="laptop")
        second, _ = tokens.create(conn, "bob")
        tokens.revoke(conn, second)
        tokens.create(conn, "carol")
        write_limits(conn, "user", "alice", Limits(rpm=5), note="team lead")
        write_limits(conn, "project", "proj", Limits(budget_day=9_000_000))
        write_limits(conn, "token", first, Limits(models=("claude-*",)))
        admins.add(conn, "root", "a long enough password", 1.0)
        admins.create_token(conn, "root", 2.0)
        for n in range(30):
            audit.record(conn, "cli:ops", "token.create", f"token {n}", None, {"n": n}, "cli", now=float(n))
        add_usage(conn, *(event(f"req-{n:05d}", 1767225600.0 + n * 37.5, token_id=first if n % 3 else None,
                                user="alice" if n % 2 else "bob", model="claude-sonnet-4-6",
                                input_tokens=n, output_tokens=2 * n, cost_micros=n * 10,
                                output_estimated=n % 5 == 0) for n in range(USAGE_ROWS)))
    finally:
        conn.close()
    store_key_switches(path, [("primary", "k1", False)], 3.0, 1.0)
    return path


def copy(source: Path, pg: PgDatabase, *extra: str) -> Any:
    done = run_cli("db", "copy", "--from", str(source), "--to", pg.url, "--password", f"env:{PASSWORD_ENV}",
                   "--batch", "1000", *extra, env=env(), cwd=source.parent)
    assert PASSWORD not in done.stdout + done.stderr
    return done


def contents(conn: sqlite3.Connection, table: str) -> list[tuple[Any, ...]]:
    order = "upstream, label" if table == "key_switches" else ("name" if table in ("users", "projects", "admins")
                                                                else "id")
    return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
            for row in conn.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()]


def usage_of(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    # Ids are the target's own; everything else is the row.
    return conn.execute("SELECT * FROM usage ORDER BY request_id").fetchall()


def test_a_copy_brings_every_table_and_a_second_run_nothing_twice(source: Path, pg_database: PgDatabase) -> None:
    done = copy(source, pg_database)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "tokens: 3 copied, 0 already there" in lines
    assert f"usage: {USAGE_ROWS} copied, 0 already there" in lines
    assert f"into {pg_database.url}" in done.stderr
    lite, pg = store.connect(source), store.connect(pg_server_database(pg_database))
    try:
        for table in TABLES:
            assert contents(pg, table) == contents(lite, table), table
        assert [row[1:] for row in usage_of(pg)] == [row[1:] for row in usage_of(lite)]
        assert tokens.load_table(pg) == tokens.load_table(lite)
        assert report.query(pg, "day") == report.query(lite, "day")

        again = copy(source, pg_database)
        assert again.returncode == 0, again.stderr
        assert f"usage: 0 copied, {USAGE_ROWS} already there" in again.stdout.splitlines()
        assert "audit: 0 copied, 30 already there" in again.stdout.splitlines()
        assert pg.execute("SELECT count(*) FROM usage").fetchone() == (USAGE_ROWS,)

        # The identity sequences moved past the copied ids.
        made, _ = tokens.create(pg, "dave")
        assert made == 4
        assert audit.record(pg, "a", "x", None, None, None, "cli") == 31
    finally:
        lite.close()
        pg.close()


def test_a_copy_cut_short_is_finished_by_running_it_again(source: Path, pg_database: PgDatabase) -> None:
    # What a copy stopped after its first batch leaves: the keyed tables and
    # some usage rows are in.
    pg = store.connect(pg_server_database(pg_database))
    lite = store.connect(source)
    try:
        first_batch = lite.execute("SELECT request_id FROM usage ORDER BY id LIMIT 1000").fetchall()
        add_usage(pg, *(event(request_id, 1767225600.0) for (request_id,) in first_batch))
    finally:
        lite.close()
        pg.close()
    done = copy(source, pg_database)
    assert done.returncode == 0, done.stderr
    assert f"usage: {USAGE_ROWS - 1000} copied, 1000 already there" in done.stdout.splitlines()
    pg = store.connect(pg_server_database(pg_database))
    try:
        assert pg.execute("SELECT count(*), count(DISTINCT request_id) FROM usage").fetchone() == (USAGE_ROWS,) * 2
    finally:
        pg.close()


def test_the_target_must_be_postgresql(source: Path, tmp_path: Path) -> None:
    done = run_cli("db", "copy", "--from", str(source), "--to", str(tmp_path / "other.db"), env=env())
    assert done.returncode == 2 and "--to: name a postgresql:// database" in done.stderr
    done = run_cli("db", "copy", "--from", str(tmp_path / "missing.db"), "--to", "postgresql://u@h/db", env=env())
    assert done.returncode == 2 and "--from: no database at" in done.stderr
    done = run_cli("db", "copy", "--from", str(source), "--to", "postgresql://u:secret@h/db", env=env())
    assert done.returncode == 2 and "secret" not in done.stderr and "password" in done.stderr


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_line_is_rewritten_in_place_on_a_terminal_only() -> None:
    shown = Terminal()
    progress = Progress(shown)
    progress.show("usage", 0, 200)
    progress.show("usage", 100, 200)  # within the interval: not drawn
    progress.show("usage", 200, 200, final=True)
    assert shown.getvalue() == "\r\x1b[Kcopying usage:   0% (0 of 200 rows)\r\x1b[Kcopying usage: 100% (200 of 200 rows)\n"
    piped = io.StringIO()
    Progress(piped).show("usage", 200, 200, final=True)
    assert piped.getvalue() == ""
