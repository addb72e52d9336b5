"""`hubcore admin ...` and `hubcore audit`, and the audit rows every
administrative command writes, each command a real subprocess on a real
SQLite file. The keys switch goes through a running hub's ops socket."""
from __future__ import annotations

import getpass
import os
import pty
import re
import select
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from hubcore import store
from hubcore.governance import admins, audit
from tests.fakevendor import FakeVendor
from tests.hubharness import REPO, HubThread, hubcore_cmd, make_config

PASSWORD = "a long enough secret pass"
NEW_PASSWORD = "another long enough pass"
ACTOR = f"cli:{getpass.getuser()}"
ADMIN_TOKEN_LINE = re.compile(r"^hca-[A-Za-z0-9_-]{40,}$")
HUB_TOKEN_LINE = re.compile(r"^hc-[A-Za-z0-9_-]{40,}$")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "hubcore.toml"
    path.write_text(f'[server]\ndatabase = "{tmp_path / "hub.db"}"\nops_socket = "{tmp_path / "ops.sock"}"\n')
    store.connect(tmp_path / "hub.db").close()
    return path


@pytest.fixture
def db(tmp_path: Path, config: Path) -> Iterator[sqlite3.Connection]:
    conn = store.connect(tmp_path / "hub.db")
    yield conn
    conn.close()


def hubcore(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUBCORE_", "ANTHROPIC_", "OPENAI_"))}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        hubcore_cmd(*args, "--config", str(config)), capture_output=True, text=True, env=env, timeout=60,
        input=stdin if stdin is not None else "",
    )


def ok(config: Path, *args: str, stdin: str | None = None) -> str:
    done = hubcore(config, *args, stdin=stdin)
    assert done.returncode == 0, done.stderr
    return done.stdout


def add(config: Path, name: str, password: str = PASSWORD) -> str:
    return ok(config, "admin", "add", name, "--password-stdin", stdin=password + "\n")


def audit_rows(db: sqlite3.Connection) -> list[audit.AuditEntry]:
    return audit.read(db, limit=1000)[::-1]


def assert_nowhere(db: sqlite3.Connection, *secrets: str) -> None:
    """No column of any row of any table holds one of `secrets`."""
    if isinstance(db, sqlite3.Connection):
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    else:  # PostgreSQL (HUBCORE_TEST_DATABASE=postgresql)
        tables = [r[0] for r in db.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")]
    for table in tables:
        for row in db.execute(f"SELECT * FROM {table}"):
            for value in row:
                text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
                for secret in secrets:
                    assert secret not in text, f"{table} holds a secret: {row}"


# -- admin add / list / passwd / remove ----------------------------------------------

def test_add_list_passwd_remove_round_trip(config: Path, db: sqlite3.Connection) -> None:
    assert add(config, "alice").strip() == "added operator alice"
    add(config, "bob@example.org")
    assert admins.verify_password(db, "alice", PASSWORD)
    admins.record_sign_in(db, "alice", 1767225600.0)

    listed = orjson.loads(ok(config, "admin", "list", "--json"))
    assert [(a["name"], a["last_sign_in_at"], a["tokens"]) for a in listed] == [
        ("alice", 1767225600.0, 0), ("bob@example.org", None, 0)]
    table = ok(config, "admin", "list")
    assert "alice" in table and "2026-01-01 00:00" in table and "never" in table

    ok(config, "admin", "passwd", "alice", "--password-stdin", stdin=NEW_PASSWORD + "\n")
    assert admins.verify_password(db, "alice", NEW_PASSWORD)
    assert not admins.verify_password(db, "alice", PASSWORD)

    assert ok(config, "admin", "remove", "alice").strip() == "removed operator alice"
    assert [a["name"] for a in orjson.loads(ok(config, "admin", "list", "--json"))] == ["bob@example.org"]

    done = hubcore(config, "admin", "remove", "alice")
    assert (done.returncode, done.stderr.splitlines()[0]) == (1, "hubcore: no operator alice")
    done = hubcore(config, "admin", "passwd", "carol", "--password-stdin", stdin=NEW_PASSWORD + "\n")
    assert (done.returncode, done.stderr.splitlines()[0]) == (1, "hubcore: no operator carol")

    rows = audit_rows(db)
    assert [(r.actor, r.action, r.target, r.origin) for r in rows] == [
        (ACTOR, "admin.add", "admin alice", "cli"),
        (ACTOR, "admin.add", "admin bob@example.org", "cli"),
        (ACTOR, "admin.passwd", "admin alice", "cli"),
        (ACTOR, "admin.remove", "admin alice", "cli"),
    ]
    assert rows[3].before == {"name": "alice", "created_at": listed[0]["created_at"], "last_sign_in_at": 1767225600.0, "tokens": 0}
    assert_nowhere(db, PASSWORD, NEW_PASSWORD)


def test_adding_a_name_twice_is_refused(config: Path) -> None:
    add(config, "alice")
    done = hubcore(config, "admin", "add", "alice", "--password-stdin", stdin=PASSWORD + "\n")
    assert (done.returncode, done.stderr.splitlines()[0]) == (1, "hubcore: operator alice already exists")


def test_a_short_password_is_refused(config: Path, db: sqlite3.Connection) -> None:
    done = hubcore(config, "admin", "add", "alice", "--password-stdin", stdin="short pass\n")
    assert done.returncode == 2
    assert done.stderr.strip() == "hubcore: the password must be at least 12 characters long"
    assert db.execute("SELECT count(*) FROM admins").fetchone()[0] == 0
    add(config, "bob")
    done = hubcore(config, "admin", "passwd", "bob", "--password-stdin", stdin="short pass\n")
    assert (done.returncode, done.stderr.strip()) == (2, "hubcore: the password must be at least 12 characters long")


@pytest.mark.parametrize("name", ["has space", "x" * 65, "semi;colon"])
def test_a_bad_name_is_refused(config: Path, db: sqlite3.Connection, name: str) -> None:
    done = hubcore(config, "admin", "add", name, "--password-stdin", stdin=PASSWORD + "\n")
    assert done.returncode == 2
    assert done.stderr.startswith("hubcore: bad operator name"), done.stderr
    assert db.execute("SELECT count(*) FROM admins").fetchone()[0] == 0


def test_an_empty_stdin_is_refused(config: Path) -> None:
    done = hubcore(config, "admin", "add", "alice", "--password-stdin", stdin="")
    assert (done.returncode, done.stderr.strip()) == (2, "hubcore: no password on stdin")


def test_without_a_terminal_the_password_must_come_on_stdin(config: Path) -> None:
    done = hubcore(config, "admin", "add", "alice", stdin=PASSWORD + "\n")
    assert done.returncode == 2
    assert done.stderr.strip() == "hubcore: no terminal to ask for the password on; pass --password-stdin"


def test_the_stdin_password_keeps_inner_spaces_and_loses_only_the_newline(config: Path, db: sqlite3.Connection) -> None:
    ok(config, "admin", "add", "alice", "--password-stdin", stdin=" spaced  password \r\n")
    assert admins.verify_password(db, "alice", " spaced  password ")


def test_a_command_needs_the_database_or_init(tmp_path: Path) -> None:
    path = tmp_path / "other.toml"
    path.write_text(f'[server]\ndatabase = "{tmp_path / "new.db"}"\n')
    done = hubcore(path, "admin", "add", "alice", "--password-stdin", stdin=PASSWORD + "\n")
    assert done.returncode == 1 and "pass --init" in done.stderr
    ok(path, "admin", "add", "alice", "--password-stdin", "--init", stdin=PASSWORD + "\n")


# -- admin token ---------------------------------------------------------------------

def test_admin_token_is_printed_once_on_the_last_line_and_verifies(config: Path, db: sqlite3.Connection) -> None:
    add(config, "alice")
    done = hubcore(config, "admin", "token", "alice")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "created admin token 1 for operator alice"
    assert ADMIN_TOKEN_LINE.match(lines[-1])
    assert "shown only once" in done.stderr
    token = lines[-1]
    assert admins.verify_api_token(db, token) == "alice"

    made = orjson.loads(ok(config, "admin", "token", "alice", "--json"))
    assert made["admin"] == "alice" and made["id"] == 2
    assert admins.verify_api_token(db, made["token"]) == "alice"
    assert orjson.loads(ok(config, "admin", "list", "--json"))[0]["tokens"] == 2

    done = hubcore(config, "admin", "token", "bob")
    assert (done.returncode, done.stderr.splitlines()[0]) == (1, "hubcore: no operator bob")

    rows = [r for r in audit_rows(db) if r.action == "admin.token"]
    assert [(r.target, r.after) for r in rows] == [("admin alice", {"token_id": 1}), ("admin alice", {"token_id": 2})]
    assert_nowhere(db, token, made["token"], PASSWORD)

    # Removing the operator removes its tokens.
    ok(config, "admin", "remove", "alice")
    assert admins.verify_api_token(db, token) is None


# -- audit rows of the other commands ------------------------------------------------

def test_token_and_scope_changes_are_audited_without_secrets(config: Path, db: sqlite3.Connection) -> None:
    made = orjson.loads(ok(config, "token", "create", "--json", "--user", "alice", "--project", "web",
                           "--note", "ci", "--rpm", "10"))
    ok(config, "token", "update", str(made["id"]), "--rpm", "20", "--note", "ci bot")
    rotated = ok(config, "token", "rotate", str(made["id"])).splitlines()[-1]
    assert HUB_TOKEN_LINE.match(rotated)
    ok(config, "token", "revoke", str(made["id"]))
    ok(config, "user", "set", "alice", "--budget", "day=5")
    ok(config, "user", "set", "alice", "--budget", "day=none", "--rpm", "3", "--note", "intern")
    ok(config, "project", "set", "web", "--concurrency", "2")

    target = f"token {made['id']}"
    rows = audit_rows(db)
    assert [(r.actor, r.action, r.target, r.origin) for r in rows] == [
        (ACTOR, "token.create", target, "cli"),
        (ACTOR, "token.update", target, "cli"),
        (ACTOR, "token.rotate", target, "cli"),
        (ACTOR, "token.revoke", target, "cli"),
        (ACTOR, "user.set", "user alice", "cli"),
        (ACTOR, "user.set", "user alice", "cli"),
        (ACTOR, "project.set", "project web", "cli"),
    ]
    create, update, rotate, revoke, user1, user2, project = rows
    assert create.before is None
    assert create.after == {"user": "alice", "project": "web", "note": "ci", "limits": {"rpm": 10}, "state": "active"}
    assert update.before == {"note": "ci", "limits": {"rpm": 10}}
    assert update.after == {"note": "ci bot", "limits": {"rpm": 20}}
    assert rotate.after == {"user": "alice", "project": "web"}
    assert (revoke.before, revoke.after) == ({"state": "active"}, {"state": "revoked"})
    assert (user1.before, user1.after) == (None, {"note": None, "limits": {"budget_micros": {"day": 5_000_000}}})
    assert user2.before == {"note": None, "limits": {"budget_micros": {"day": 5_000_000}}}
    assert user2.after == {"note": "intern", "limits": {"rpm": 3}}
    assert project.after == {"note": None, "limits": {"concurrency": 2}}
    assert_nowhere(db, made["token"], rotated)


def test_a_refused_change_writes_no_audit_row(config: Path, db: sqlite3.Connection) -> None:
    for args in (("token", "revoke", "7"), ("token", "rotate", "7"), ("token", "update", "7", "--rpm", "2")):
        assert hubcore(config, *args).returncode != 0
    assert audit_rows(db) == []


# -- hubcore audit -------------------------------------------------------------------

def test_audit_lists_newest_first_with_limit_since_and_json(config: Path, db: sqlite3.Connection) -> None:
    add(config, "alice")
    ok(config, "user", "set", "bob", "--rpm", "5")
    audit.record(db, "cli:old", "user.set", "user zed", None, {"rpm": 1}, "cli", now=1000.0)

    shown = orjson.loads(ok(config, "audit", "--json"))
    assert [(e["action"], e["target"]) for e in shown] == [
        ("user.set", "user zed"), ("user.set", "user bob"), ("admin.add", "admin alice")]
    assert shown[1]["actor"] == ACTOR and shown[1]["after"] == {"note": None, "limits": {"rpm": 5}}
    assert [e["target"] for e in orjson.loads(ok(config, "audit", "--json", "--since", "7d"))] == [
        "user bob", "admin alice"]
    assert [e["target"] for e in orjson.loads(ok(config, "audit", "--json", "--limit", "1"))] == ["user zed"]

    text = ok(config, "audit").splitlines()
    assert text[0].split() == ["TIME", "ACTOR", "ACTION", "TARGET", "CHANGE"]
    assert "1970-01-01 00:16" in text[1] and "user zed" in text[1] and 'after {"rpm":1}' in text[1]
    assert "admin.add" in text[3] and ACTOR in text[3]

    for bad, message in ((("--limit", "0"),"--limit must be at least 1"), (("--since", "soon"), "cannot read time")):
        done = hubcore(config, "audit", *bad)
        assert done.returncode == 2 and message in done.stderr, done.stderr


# -- keys enable/disable, through the running hub ------------------------------------

@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="hc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_key_switches_are_audited_by_the_hub(tmp_path: Path, sock_dir: Path, vendor: FakeVendor) -> None:
    upstream: dict[str, Any] = {"name": "anthropic", "kind": "anthropic", "base_url": vendor.url,
                                "keys": [{"key": "sk-ant-audit-one", "label": "a1"}, {"key": "sk-ant-audit-two", "label": "a2"}]}
    hub_config = make_config(tmp_path, [upstream], ops_socket=str(sock_dir / "ops.sock"))
    config = tmp_path / "hubcore.toml"
    config.write_text(f'[server]\ndatabase = "{tmp_path / "hub.db"}"\nops_socket = "{sock_dir / "ops.sock"}"\n')
    with HubThread(hub_config):
        ok(config, "keys", "disable", "a1")
        ok(config, "keys", "enable", "a1")
        assert hubcore(config, "keys", "disable", "nosuch").returncode == 1
    conn = store.connect(hub_config.server.database)
    try:
        rows = audit_rows(conn)
        assert_nowhere(conn, "sk-ant-audit-one", "sk-ant-audit-two")
    finally:
        conn.close()
    assert [(r.actor, r.action, r.target, r.origin) for r in rows] == [
        ("cli", "key.disable", "key a1", "cli"), ("cli", "key.enable", "key a1", "cli")]
    assert (rows[0].before, rows[0].after) == ({"anthropic": "healthy"}, {"anthropic": "disabled"})
    assert (rows[1].before, rows[1].after) == ({"anthropic": "disabled"}, {"anthropic": "healthy"})


# -- the password asked on a terminal ------------------------------------------------

def on_terminal(config: Path, args: tuple[str, ...], answers: list[str], timeout: float = 30) -> tuple[int, str]:
    """Run `hubcore ARGS` with a pseudo-terminal as its controlling terminal,
    typing each answer once its prompt shows; (exit status, all it wrote)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUBCORE_", "ANTHROPIC_", "OPENAI_"))}
    env["PYTHONPATH"] = str(REPO)
    argv = hubcore_cmd(*args, "--config", str(config))
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its terminal
        os.execvpe(argv[0], argv, env)
    deadline = time.monotonic() + timeout
    output = b""
    pending = list(answers)
    try:
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no answer in time: {output!r}"
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
            # getpass flushes pending input when it turns echo off: answer
            # only once the prompt is out.
            prompts = output.count(b"password: ") + output.count(b"again: ")
            if pending and prompts > len(answers) - len(pending) and output.endswith((b"password: ", b"again: ")):
                os.write(fd, pending.pop(0).encode() + b"\n")
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def test_the_password_is_asked_twice_on_the_terminal(config: Path, db: sqlite3.Connection) -> None:
    status, output = on_terminal(config, ("admin", "add", "alice"), [PASSWORD, PASSWORD])
    assert status == 0, output
    assert PASSWORD not in output  # not echoed
    assert admins.verify_password(db, "alice", PASSWORD)

    status, output = on_terminal(config, ("admin", "passwd", "alice"), [NEW_PASSWORD, NEW_PASSWORD + "x"])
    assert status == 2 and "hubcore: the passwords differ; nothing changed" in output
    assert admins.verify_password(db, "alice", PASSWORD)
