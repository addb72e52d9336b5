"""Limit administration over real SQLite files: the flags, token create/update,
user and project commands, the budget report, and what a running server's
reload sees (generation bumps, Principal.limits, revoked tokens)."""
from __future__ import annotations

import argparse
import sqlite3
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest

from hubcore import store

from hubcore.cli import common, scopes, usage
from hubcore.cli import tokens as token_commands
from hubcore.cli.main import build_parser

from hubcore.governance import tokens
from hubcore.governance.limiter import Limiter, Refused
from hubcore.governance.limits import Limits
from hubcore.governance.storage import load_scope_limits, read_limits, write_limits
from hubcore.accounting.usage import FIELDS, INSERT_SQL, UsageEvent

USD = 1_000_000
NOW = datetime(2026, 3, 4, 10, 0, tzinfo=timezone.utc).timestamp()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "hub.db"


@pytest.fixture
def conn(db_path: Path) -> Iterator[sqlite3.Connection]:
    connection = store.connect(db_path)
    yield connection
    connection.close()


Run = Callable[..., tuple[int, str, str]]


# The bodies of the commands the real parser picks, run here on the test's
# database, clock and time zone.
BODIES: dict[common.Command, Callable[[argparse.Namespace, common.Context], int]] = {
    token_commands.run_update: token_commands.update,
    scopes.run_missing_action: scopes.missing_action,
    scopes.run_set: scopes.set_limits,
    scopes.run_show: scopes.show,
    scopes.run_list: scopes.list_scopes,
    usage.run_usage: usage.usage,
}


@pytest.fixture
def run(conn: sqlite3.Connection, capsys: pytest.CaptureFixture[str]) -> Run:
    parser = build_parser()

    def go(*argv: str) -> tuple[int, str, str]:
        args = parser.parse_args(argv)
        if args.run is token_commands.run_create:
            token_id, _ = token_commands.create_token(args, conn)
            code = 0
            print(token_id)
        else:
            # Users' budgets in Berlin's calendar, everything else in UTC's.
            ctx = common.Context(conn, tz="Europe/Berlin" if argv[0] == "user" else "UTC", now=NOW)
            code = common.call(lambda a: BODIES[args.run](a, ctx), args)
        out = capsys.readouterr()
        return code, out.out, out.err

    return go


def stored(conn: sqlite3.Connection, token_id: int) -> dict[str, object]:
    text = conn.execute("SELECT limits FROM tokens WHERE id = ?", (token_id,)).fetchone()[0]
    return {} if text is None else dict(orjson.loads(text))


def test_migration_two_adds_tables_and_generation_triggers(conn: sqlite3.Connection, db_path: Path) -> None:
    assert conn.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION
    token_id, _ = tokens.create(conn, "alice")
    before = tokens.generation(conn)
    write_limits(conn, "user", "alice", Limits(rpm=5))
    write_limits(conn, "user", "alice", Limits(rpm=6))
    write_limits(conn, "project", "p", None)
    write_limits(conn, "token", token_id, Limits(concurrency=2))
    conn.execute("DELETE FROM projects")
    assert tokens.generation(conn) == before + 5
    # A database from before the limits opens and upgrades in place.
    old = db_path.with_name("old.db")
    raw = sqlite3.connect(old, isolation_level=None)
    for statement in store._split(store.MIGRATIONS[0]):
        raw.execute(statement)
    raw.execute("PRAGMA user_version = 1")
    raw.execute("INSERT INTO tokens (prefix, hash, user, created_at, updated_at) VALUES ('hc-x', x'00', 'bob', 0, 0)")
    raw.close()
    upgraded = store.connect(old)
    try:
        assert upgraded.execute("SELECT user, limits FROM tokens").fetchall() == [("bob", None)]
        assert upgraded.execute("SELECT count(*) FROM users").fetchone()[0] == 0
    finally:
        upgraded.close()


def test_token_create_with_every_flag(run: Run, conn: sqlite3.Connection) -> None:
    code, out, _ = run(
        "token", "create", "--user", "alice", "--project", "web",
        "--rpm", "60", "--concurrency", "4", "--budget", "day=5", "--budget", "5h=$1.50",
        "--budget", "total=1,000", "--models", "claude-sonnet-*,claude-haiku-*",
        "--expires", "2026-07-01T18:00:00+02:00",
    )
    assert code == 0
    token_id = int(out.split()[-1])
    assert stored(conn, token_id) == {
        "rpm": 60, "concurrency": 4,
        "budget_micros": {"5h": 1_500_000, "day": 5 * USD, "total": 1000 * USD},
        "models": ["claude-sonnet-*", "claude-haiku-*"],
        "expires_at": datetime(2026, 7, 1, 16, tzinfo=timezone.utc).timestamp(),
    }
    # What the server's reload builds from it.
    table = tokens.load_table(conn)
    (principal,) = table.values()
    assert principal.limits == Limits(
        rpm=60, concurrency=4, budget_5h=1_500_000, budget_day=5 * USD, budget_total=1000 * USD,
        models=("claude-sonnet-*", "claude-haiku-*"), expires_at=datetime(2026, 7, 1, 16, tzinfo=timezone.utc).timestamp(),
    )
    # Without flags a token has no limits at all.
    code, out, _ = run("token", "create", "--user", "bob")
    assert stored(conn, int(out.split()[-1])) == {}


def test_token_update_changes_only_what_it_names(run: Run, conn: sqlite3.Connection) -> None:
    _, out, _ = run("token", "create", "--user", "alice", "--rpm", "10", "--budget", "day=1", "--models", "claude-*")
    token_id = out.split()[-1]
    table = tokens.TokenTable()
    table.refresh(conn)
    code, out, _ = run("token", "update", token_id, "--concurrency", "2", "--budget", "month=20")
    assert code == 0
    assert out == f"updated token {token_id}: rpm 10, concurrency 2, day $1.00, month $20.00, models claude-*\n"
    # The running server's reload notices (it polls the generation).
    assert table.refresh(conn) is True
    code, out, _ = run("token", "update", token_id, "--rpm", "none", "--budget", "day=none", "--models", "none", "--expires", "2026-05-01")
    assert code == 0
    assert stored(conn, int(token_id)) == {
        "concurrency": 2, "budget_micros": {"month": 20 * USD},
        "expires_at": datetime(2026, 5, 1, tzinfo=timezone.utc).timestamp(),
    }
    code, out, _ = run("token", "update", token_id, "--concurrency", "none", "--budget", "month=none", "--expires", "none")
    assert code == 0 and out.endswith(": no limits\n")
    assert conn.execute("SELECT limits FROM tokens WHERE id = ?", (int(token_id),)).fetchone()[0] is None


def test_token_update_errors(run: Run, conn: sqlite3.Connection) -> None:
    code, _, err = run("token", "update", "99", "--rpm", "5")
    assert code == 1 and "token 99 does not exist" in err
    token_id, _ = tokens.create(conn, "alice")
    tokens.revoke(conn, token_id)
    code, _, err = run("token", "update", str(token_id), "--rpm", "5")
    assert code == 1 and "is revoked" in err
    code, _, err = run("token", "update", str(token_id))
    assert code == 2 and "nothing to update" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rpm", "0"], "positive integer or 'none'"),
        (["--concurrency", "-1"], "positive integer or 'none'"),
        (["--rpm", "fast"], "positive integer or 'none'"),
        (["--budget", "year=5"], "WINDOW one of 5h, day, week, month, total"),
        (["--budget", "day"], "WINDOW=USD"),
        (["--budget", "day=lots"], "not an amount in USD"),
        (["--budget", "day=-1"], "non-negative"),
        (["--budget", "day=nan"], "non-negative"),
        (["--models", ","], "PATTERN"),
        (["--expires", "tomorrow"], "not an ISO 8601 time"),
    ],
)
def test_bad_flags_are_usage_errors(flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["token", "update", "1", *flags])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_user_set_show_list(run: Run, conn: sqlite3.Connection) -> None:
    code, out, _ = run("user", "set", "alice", "--budget", "month=500", "--rpm", "100", "--note", "team lead")
    assert (code, out) == (0, "user alice: rpm 100, month $500.00\n")
    code, out, _ = run("user", "set", "alice", "--concurrency", "8")
    assert out == "user alice: rpm 100, concurrency 8, month $500.00\n"
    assert read_limits(conn, "user", "alice") == Limits(rpm=100, concurrency=8, budget_month=500 * USD)
    assert conn.execute("SELECT note FROM users WHERE name = 'alice'").fetchone()[0] == "team lead"
    first, _ = tokens.create(conn, "alice")
    second, _ = tokens.create(conn, "alice", "web")
    _insert(conn, [_event(1, first, "alice", None, 120 * USD, NOW - 3600), _event(2, second, "alice", "web", 30 * USD, NOW - 60)])
    code, out, _ = run("user", "show", "alice")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "user alice: rpm 100, concurrency 8, month $500.00"
    assert lines[1] == f"active tokens: {first}, {second}"
    assert lines[2].split() == ["SCOPE", "WINDOW", "LIMIT", "SPENT", "REMAINING", "USED", "RESETS"]
    # Months in the user's command timezone (Europe/Berlin here).
    assert lines[3].split() == ["user:alice", "month", "$500.00", "$150.00", "$350.00", "30%", "2026-04-01T00:00:00+02:00"]
    code, out, _ = run("user", "show", "alice", "--json")
    shown = orjson.loads(out)
    assert shown["limits"] == {"rpm": 100, "concurrency": 8, "budget_micros": {"month": 500 * USD}}
    assert shown["tokens"] == [first, second]
    assert shown["budgets"][0]["remaining_micros"] == 350 * USD
    # A user with tokens but no limits row, and one that does not exist.
    tokens.create(conn, "carol")
    code, out, _ = run("user", "show", "carol")
    assert code == 0 and out.startswith("user carol: no limits\n")
    code, _, err = run("user", "show", "nobody")
    assert code == 1 and "no user 'nobody'" in err
    run("user", "set", "bob", "--models", "claude-haiku-*")
    code, out, _ = run("user", "list")
    assert out == "alice: rpm 100, concurrency 8, month $500.00  (team lead)\nbob: models claude-haiku-*\n"
    code, out, _ = run("user", "list", "--json")
    assert [u["name"] for u in orjson.loads(out)] == ["alice", "bob"]
    code, _, err = run("user")
    assert code == 2


def test_project_budget_enforced_after_reload(run: Run, conn: sqlite3.Connection) -> None:
    token_id, _ = tokens.create(conn, "alice", "web")
    limiter = Limiter(clock=lambda: NOW)
    table = tokens.TokenTable()
    table.refresh(conn)
    limiter.reload(conn)
    limiter.rebuild(conn, NOW)
    (principal,) = tokens.load_table(conn).values()
    limiter.admit(principal, "claude-opus-4-6", NOW).release()
    code, _, _ = run("project", "set", "web", "--budget", "day=0.01", "--models", "claude-sonnet-*")
    assert code == 0
    # What the server does when the generation moves.
    assert table.refresh(conn)
    limiter.reload(conn)
    with pytest.raises(Refused) as info:
        limiter.admit(principal, "claude-opus-4-6", NOW)
    assert info.value.limit == "models" and info.value.scope == "project web"
    limiter.admit(principal, "claude-sonnet-4-6", NOW).release()
    limiter.charge(token_id, "alice", "web", 20_000, NOW)
    with pytest.raises(Refused) as info:
        limiter.admit(principal, "claude-sonnet-4-6", NOW + 1)
    assert info.value.limit == "budget_day" and info.value.status == 403


def test_budget_report_formats(run: Run, conn: sqlite3.Connection) -> None:
    code, out, _ = run("usage", "--budgets")
    assert (code, out) == (0, "no budgets set\n")
    _, out, _ = run("token", "create", "--user", "alice", "--budget", "5h=2", "--budget", "total=10")
    token_id = int(out.split()[-1])
    run("user", "set", "alice", "--budget", "day=5")
    run("project", "set", "web", "--rpm", "5")  # no budget: not in the report
    _insert(conn, [
        _event(1, token_id, "alice", "web", 1_250_000, NOW - 7200),
        _event(2, token_id, "alice", "web", 1_000_000, NOW - 60),
        _event(3, token_id, "alice", "web", 4 * USD, NOW - 86400 * 3),
    ])
    code, out, _ = run("usage", "--budgets")
    assert code == 0
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["SCOPE", "WINDOW", "LIMIT", "SPENT", "REMAINING", "USED", "RESETS"]
    first_bucket_ends = datetime.fromtimestamp((int((NOW - 7200) // 60) + 300) * 60, timezone.utc).isoformat()
    assert rows[1:] == [
        [f"token:{token_id}", "5h", "$2.00", "$2.25", "$0.00", "112%", first_bucket_ends],
        [f"token:{token_id}", "total", "$10.00", "$6.25", "$3.75", "62%", "never"],
        ["user:alice", "day", "$5.00", "$2.25", "$2.75", "45%", "2026-03-05T00:00:00+00:00"],
    ]
    code, out, _ = run("usage", "--budgets", "user:alice", "--format", "json")
    report = orjson.loads(out)
    assert report["timezone"] == "UTC"
    assert report["budgets"] == [{
        "kind": "user", "name": "alice", "window": "day", "limit_micros": 5 * USD, "spent_micros": 2_250_000,
        "remaining_micros": 2_750_000, "resets_at": datetime(2026, 3, 5, tzinfo=timezone.utc).timestamp(),
    }]
    code, out, _ = run("usage", "--budgets", f"token:{token_id}", "--format", "csv")
    assert out.splitlines() == [
        "kind,name,window,limit_usd,spent_usd,remaining_usd,resets_at",
        f"token,{token_id},5h,2.000000,2.250000,0.000000,{first_bucket_ends}",
        f"token,{token_id},total,10.000000,6.250000,3.750000,",
    ]
    code, _, err = run("usage", "--budgets", "team:x")
    assert code == 2 and "token:ID, user:NAME or project:NAME" in err


def test_revoked_token_is_known_as_revoked(conn: sqlite3.Connection) -> None:
    token_id, token = tokens.create(conn, "alice")
    table = tokens.TokenTable()
    table.refresh(conn)
    assert table.lookup(token.encode()) is not None and table.revoked_at(token.encode()) is None
    tokens.revoke(conn, token_id)
    assert table.refresh(conn)
    assert table.lookup(token.encode()) is None
    revoked_at = table.revoked_at(token.encode())
    assert revoked_at is not None and abs(revoked_at - datetime.now(timezone.utc).timestamp()) < 60
    assert table.revoked_at(b"hc-never-issued") is None


def test_corrupt_stored_limits_refuse_instead_of_allowing(conn: sqlite3.Connection) -> None:
    token_id, _ = tokens.create(conn, "alice")
    conn.execute("INSERT INTO users (name, limits, created_at, updated_at) VALUES ('alice', '{\"rpm\": -3}', 0, 0)")
    conn.execute("UPDATE tokens SET limits = 'not json' WHERE id = ?", (token_id,))
    limits = load_scope_limits(conn)
    assert limits.users["alice"].error is not None
    (principal,) = tokens.load_table(conn).values()
    assert principal.limits is not None and principal.limits.error is not None
    limiter = Limiter(clock=lambda: NOW)
    limiter.update(limits)
    with pytest.raises(Refused) as info:
        limiter.admit(principal, None, NOW)
    assert info.value.status == 403 and info.value.limit == "unreadable"


def _event(n: int, token_id: int, user: str, project: str | None, cost: int, ts: float) -> UsageEvent:
    return UsageEvent(ts=ts, request_id=f"r{n}", endpoint="/v1/messages", status=200, outcome="ok",
                      total_ms=1.0, token_id=token_id, user=user, project=project, cost_micros=cost)


def _insert(conn: sqlite3.Connection, events: list[UsageEvent]) -> None:
    conn.executemany(INSERT_SQL, [tuple(getattr(e, f) for f in FIELDS) for e in events])
