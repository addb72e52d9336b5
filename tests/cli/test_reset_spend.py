"""`hubcore token|user|project reset-spend ID|NAME --window W` as real
subprocesses on a real SQLite file with usage rows: the window starts
afresh in `usage --budgets` and `token show`, the other windows and scopes
keep their spend, each reset is audited, a bad scope or window is a
one-line error. (tests/dashboard/test_tokens_pages.py runs one against a
live hub, with the dashboard's own reset.)"""
from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from hubcore import store
from hubcore.accounting.usage import FIELDS, INSERT_SQL, UsageEvent
from hubcore.governance import audit
from tests.hubharness import REPO, hubcore_cmd

USD = 1_000_000


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "hubcore.toml"
    path.write_text(
        f'[server]\ndatabase = "{tmp_path / "hub.db"}"\nops_socket = "{tmp_path / "ops.sock"}"\n'
        'budget_timezone = "America/New_York"\n'
    )
    store.connect(tmp_path / "hub.db").close()
    return path


@pytest.fixture
def db(tmp_path: Path, config: Path) -> Iterator[sqlite3.Connection]:
    conn = store.connect(tmp_path / "hub.db")
    yield conn
    conn.close()


def hubcore(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUBCORE_", "ANTHROPIC_", "OPENAI_"))}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(hubcore_cmd(*args, "--config", str(config)), capture_output=True, text=True, env=env,
                          timeout=60)


def ok(config: Path, *args: str) -> Any:
    done = hubcore(config, *args)
    assert done.returncode == 0, done.stderr
    return orjson.loads(done.stdout) if "--json" in args or "json" in args else done.stdout


def spend(conn: sqlite3.Connection, token_id: int, user: str, project: str, costs: list[tuple[float, int]]) -> None:
    start = conn.execute("SELECT count(*) FROM usage").fetchone()[0]
    events = [
        UsageEvent(ts=ts, request_id=f"r{start + n}", endpoint="/v1/messages", status=200, outcome="ok",
                   total_ms=1.0, token_id=token_id, user=user, project=project, cost_micros=cost)
        for n, (ts, cost) in enumerate(costs)
    ]
    conn.executemany(INSERT_SQL, [tuple(getattr(e, f) for f in FIELDS) for e in events])


def budgets(config: Path, scope: str) -> dict[str, int]:
    report = ok(config, "usage", "--budgets", scope, "--format", "json")
    return {line["window"]: line["spent_micros"] for line in report["budgets"]}


def test_each_scope_resets_one_window_and_keeps_the_rest(config: Path, db: sqlite3.Connection) -> None:
    token = ok(config, "token", "create", "--json", "--user", "ann", "--project", "web",
               "--budget", "day=10", "--budget", "total=50")
    ok(config, "user", "set", "ann", "--budget", "day=10", "--budget", "week=40")
    ok(config, "project", "set", "web", "--budget", "5h=10")
    now = time.time()
    spend(db, token["id"], "ann", "web", [(now - 1.0, 3 * USD), (now - 0.5, 2 * USD)])
    assert budgets(config, f"token:{token['id']}") == {"day": 5 * USD, "total": 5 * USD}

    said = ok(config, "token", "reset-spend", str(token["id"]), "--window", "total", "--json")
    assert (said["kind"], said["name"], said["window"], said["forgiven_micros"]) == ("token", str(token["id"]), "total", 5 * USD)
    assert budgets(config, f"token:{token['id']}") == {"day": 5 * USD, "total": 0}
    shown = ok(config, "token", "show", str(token["id"]), "--json")
    assert {w["window"]: w["spent_micros"] for w in shown["spend"]}["total"] == 0
    assert ok(config, "user", "reset-spend", "ann", "--window", "week").startswith(
        "user ann: week spend reset; $5.00 spent before ")
    assert budgets(config, "user:ann") == {"day": 5 * USD, "week": 0}
    ok(config, "project", "reset-spend", "web", "--window", "5h")
    assert budgets(config, "project:web") == {"5h": 0}
    # Spend after a reset counts again.
    spend(db, token["id"], "ann", "web", [(time.time(), 1 * USD)])
    assert budgets(config, "user:ann") == {"day": 6 * USD, "week": USD}
    assert budgets(config, "project:web") == {"5h": USD}

    rows = [e for e in audit.read(db) if e.action.endswith(".reset_spend")]
    assert [(e.action, e.target, e.before["spent_micros"], e.origin) for e in reversed(rows)] == [
        ("token.reset_spend", f"token {token['id']}", 5 * USD, "cli"),
        ("user.reset_spend", "user ann", 5 * USD, "cli"),
        ("project.reset_spend", "project web", 5 * USD, "cli"),
    ]
    assert all(e.actor.startswith("cli:") for e in rows)


@pytest.mark.parametrize(("args", "status", "said"), [
    (("user", "reset-spend", "nobody", "--window", "day"), 1, "hubcore: no user nobody (no limits and no tokens)"),
    (("token", "reset-spend", "99", "--window", "day"), 1, "hubcore: token 99 does not exist"),
    (("project", "reset-spend", "web", "--window", "year"), 2, "invalid choice: 'year'"),
    (("user", "reset-spend", "ann"), 2, "the following arguments are required: --window"),
])
def test_a_bad_scope_or_window_is_one_line_and_changes_nothing(
    config: Path, db: sqlite3.Connection, args: tuple[str, ...], status: int, said: str,
) -> None:
    done = hubcore(config, *args)
    assert done.returncode == status and said in done.stderr, done.stderr
    assert done.stdout == ""
    assert db.execute("SELECT count(*) FROM spend_resets").fetchone()[0] == 0
    assert audit.read(db) == []


def test_a_revoked_token_is_not_reset(config: Path, db: sqlite3.Connection) -> None:
    token = ok(config, "token", "create", "--json", "--user", "ann")
    ok(config, "token", "revoke", str(token["id"]))
    done = hubcore(config, "token", "reset-spend", str(token["id"]), "--window", "day")
    assert (done.returncode, done.stderr.splitlines()[0]) == (1, f"hubcore: token {token['id']} is revoked")
