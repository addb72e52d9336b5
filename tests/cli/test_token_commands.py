"""`hubcore token show|list|update --note|rotate` and `hubcore usage --by
token`, each as a real subprocess on a real SQLite file with usage rows in it.
No hub runs here (tests/functional/test_token_notify.py has one)."""
from __future__ import annotations

import csv
import io
import os
import re
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
from hubcore.config import zone
from hubcore.governance.limits import WINDOWS, calendar_periods
from hubcore.governance.tokens import TokenTable
from tests.hubharness import REPO, hubcore_cmd

TOKEN_LINE = re.compile(r"hc-[A-Za-z0-9_-]{40,}")
TZ = "Pacific/Auckland"     # far from UTC: a day window in UTC would show
USD = 1_000_000


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "hubcore.toml"
    path.write_text(
        f'[server]\ndatabase = "{tmp_path / "hub.db"}"\nops_socket = "{tmp_path / "ops.sock"}"\n'
        f'budget_timezone = "{TZ}"\n'
    )
    # The database of a hub that has run once (commands create none unasked).
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
    return subprocess.run(hubcore_cmd(*args, "--config", str(config)), capture_output=True, text=True, env=env, timeout=60)


def ok(config: Path, *args: str) -> str:
    done = hubcore(config, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def create(config: Path, *flags: str) -> dict[str, Any]:
    made: dict[str, Any] = orjson.loads(ok(config, "token", "create", "--json", *flags))
    return made


def insert_usage(conn: sqlite3.Connection, token_id: int, user: str, rows: list[tuple[float, int]]) -> None:
    """Usage rows of `token_id`: (ts, cost in micro-dollars) each."""
    start = conn.execute("SELECT count(*) FROM usage").fetchone()[0]
    events = [
        UsageEvent(ts=ts, request_id=f"r{start + n}", endpoint="/v1/messages", status=200, outcome="ok",
                   total_ms=1.0, token_id=token_id, user=user, model="claude-sonnet-4-6",
                   input_tokens=10, output_tokens=5, cost_micros=cost)
        for n, (ts, cost) in enumerate(rows)
    ]
    conn.executemany(INSERT_SQL, [tuple(getattr(e, f) for f in FIELDS) for e in events])


def lookup(db: sqlite3.Connection, token: str) -> Any:
    table = TokenTable()
    table.refresh(db, force=True)
    return table.lookup(token.encode())


# -- token show -------------------------------------------------------------------------

def test_show_gives_owner_limits_last_use_and_spend_per_window(config: Path, db: sqlite3.Connection) -> None:
    made = create(config, "--user", "alice", "--project", "web", "--note", "ci bot",
                  "--rpm", "10", "--concurrency", "2", "--budget", "day=5", "--budget", "month=20")
    now = time.time()
    day, week, month = calendar_periods(now, zone(TZ))
    # One row in each stretch between the windows' starts, and one long ago.
    moments = sorted({now - 60, day[0] + 1, week[0] + 1, month[0] + 1, month[0] - 86400 * 40})
    rows = [(ts, (i + 1) * USD) for i, ts in enumerate(moments)]
    insert_usage(db, made["id"], "alice", rows)

    shown = orjson.loads(ok(config, "token", "show", str(made["id"]), "--json"))
    starts = {"5h": now - 5 * 3600, "day": day[0], "week": week[0], "month": month[0], "total": 0.0}
    expected = {w: sum(cost for ts, cost in rows if ts >= starts[w]) for w in WINDOWS}
    assert {w["window"]: w["spent_micros"] for w in shown["spend"]} == expected
    assert {w["window"]: w["limit_micros"] for w in shown["spend"]} == {
        "5h": None, "day": 5 * USD, "week": None, "month": 20 * USD, "total": None,
    }
    by_window = {w["window"]: w for w in shown["spend"]}
    assert by_window["day"]["remaining_micros"] == max(0, 5 * USD - expected["day"])
    assert shown["timezone"] == TZ and shown["status"] == "active"
    assert shown["last_used_at"] == pytest.approx(max(moments))
    assert {k: shown[k] for k in ("id", "user", "project", "note")} == {
        "id": made["id"], "user": "alice", "project": "web", "note": "ci bot",
    }
    assert shown["limits"] == {"rpm": 10, "concurrency": 2, "budget_micros": {"day": 5 * USD, "month": 20 * USD}}
    assert made["token"].startswith(shown["prefix"])

    text = ok(config, "token", "show", str(made["id"]))
    assert made["token"] not in text
    facts = dict(line.split(":", 1) for line in text.splitlines()[:8])
    assert facts["token"].strip() == f"{made['id']} ({shown['prefix']}…)"
    assert facts["note"].strip() == "ci bot" and facts["status"].strip() == "active"
    assert facts["limits"].strip() == "rpm 10, concurrency 2, day $5.00, month $20.00"
    # Times read in the budget time zone.
    assert facts["last used"].strip().endswith(("+12:00", "+13:00"))
    table = text.splitlines()[9:]
    assert table[0] == f"spend (day, week and month in {TZ}):"
    cells = {line.split()[0]: line.split()[1:] for line in table[2:]}
    assert list(cells) == list(WINDOWS)
    assert cells["day"][:2] == [f"${expected['day'] // USD}.00", "$5.00"]
    assert cells["week"] == [f"${expected['week'] // USD}.00", "-", "-", "-"]


def test_show_says_never_used_revoked_and_expired(config: Path) -> None:
    fresh = create(config, "--user", "bob")
    text = ok(config, "token", "show", str(fresh["id"]))
    assert "last used: never" in re.sub(" +", " ", text)
    shown = orjson.loads(ok(config, "token", "show", str(fresh["id"]), "--json"))
    assert shown["last_used_at"] is None and shown["limits"] == {}
    assert all(w["spent_micros"] == 0 for w in shown["spend"])

    ok(config, "token", "revoke", str(fresh["id"]))
    assert orjson.loads(ok(config, "token", "show", str(fresh["id"]), "--json"))["status"] == "revoked"
    assert re.search(r"status: +revoked at \d{4}-", ok(config, "token", "show", str(fresh["id"])))

    old = create(config, "--user", "bob", "--expires", "2020-01-01")
    assert orjson.loads(ok(config, "token", "show", str(old["id"]), "--json"))["status"] == "expired"
    assert re.search(r"status: +expired at 2020-01-01T1[23]:00:00\+13:00",
                     ok(config, "token", "show", str(old["id"])))

    missing = hubcore(config, "token", "show", "99")
    assert missing.returncode == 1 and missing.stderr == "hubcore: token 99 does not exist\n"


# -- token list -------------------------------------------------------------------------

def test_list_adds_limits_and_last_use_and_keeps_its_keys(config: Path, db: sqlite3.Connection) -> None:
    used = create(config, "--user", "alice", "--rpm", "10", "--budget", "day=5")
    idle = create(config, "--user", "bob")
    insert_usage(db, used["id"], "alice", [(time.time() - 7200, USD), (time.time() - 60, USD)])
    listed = orjson.loads(ok(config, "token", "list", "--json"))
    assert [set(row) for row in listed] == [{
        "id", "prefix", "user", "project", "note", "created_at", "revoked_at", "limits", "groups", "last_used_at",
    }] * 2
    assert listed[0]["limits"] == {"rpm": 10, "budget_micros": {"day": 5 * USD}}
    assert listed[0]["last_used_at"] == pytest.approx(time.time() - 60, abs=30)
    assert listed[1]["limits"] == {} and listed[1]["last_used_at"] is None

    lines = ok(config, "token", "list").splitlines()
    assert lines[0].split() == ["ID", "PREFIX", "USER", "PROJECT", "CREATED", "REVOKED", "LAST", "USED", "LIMITS"]
    assert lines[1].endswith("rpm 10, day $5.00") and re.search(r" - +\d{4}-\d\d-\d\d \d\d:\d\d +rpm", lines[1])
    assert re.search(r" - +never +-$", lines[2])
    for made in (used, idle):
        assert made["token"] not in "\n".join(lines)


# -- token update --note ----------------------------------------------------------------

def test_update_note_alone_or_with_limits(config: Path) -> None:
    made = create(config, "--user", "alice", "--note", "laptop", "--rpm", "10")
    assert ok(config, "token", "update", str(made["id"]), "--note", "ci runner") == (
        f"updated token {made['id']}: rpm 10; note 'ci runner'\n"
    )
    shown = orjson.loads(ok(config, "token", "show", str(made["id"]), "--json"))
    assert shown["note"] == "ci runner" and shown["limits"] == {"rpm": 10}

    out = orjson.loads(ok(config, "token", "update", str(made["id"]), "--note", "", "--concurrency", "3", "--json"))
    assert out == {"id": made["id"], "note": None, "limits": {"rpm": 10, "concurrency": 3}, "groups": None}

    ok(config, "token", "revoke", str(made["id"]))
    refused = hubcore(config, "token", "update", str(made["id"]), "--note", "x")
    assert refused.returncode == 1 and refused.stderr == f"hubcore: token {made['id']} is revoked\n"


# -- token rotate -----------------------------------------------------------------------

def test_rotate_prints_a_new_secret_once_and_keeps_the_token(config: Path, db: sqlite3.Connection) -> None:
    made = create(config, "--user", "alice", "--project", "web", "--note", "ci", "--budget", "total=9")
    insert_usage(db, made["id"], "alice", [(time.time() - 60, USD)])
    done = hubcore(config, "token", "rotate", str(made["id"]))
    assert done.returncode == 0, done.stderr
    new = done.stdout.splitlines()[-1]
    assert TOKEN_LINE.fullmatch(new) and new != made["token"]
    assert done.stdout.splitlines()[0] == f"rotated token {made['id']} for user alice, project web"
    assert done.stdout.count(new) == 1 and new not in done.stderr
    assert "shown only once" in done.stderr

    assert lookup(db, made["token"]) is None
    principal = lookup(db, new)
    assert (principal.token_id, principal.user, principal.project) == (made["id"], "alice", "web")
    shown = orjson.loads(ok(config, "token", "show", str(made["id"]), "--json"))
    assert shown["limits"] == {"budget_micros": {"total": 9 * USD}} and shown["note"] == "ci"
    assert new.startswith(shown["prefix"]) and not made["token"].startswith(shown["prefix"])
    assert {w["window"]: w["spent_micros"] for w in shown["spend"]}["total"] == USD

    as_json = orjson.loads(ok(config, "token", "rotate", str(made["id"]), "--json"))
    assert as_json["id"] == made["id"] and lookup(db, as_json["token"]) is not None and lookup(db, new) is None
    for args in (("token", "list"), ("token", "list", "--json"), ("token", "show", str(made["id"]))):
        assert as_json["token"] not in ok(config, *args)

    ok(config, "token", "revoke", str(made["id"]))
    refused = hubcore(config, "token", "rotate", str(made["id"]))
    assert refused.returncode == 1 and refused.stderr == f"hubcore: token {made['id']} is revoked\n"
    missing = hubcore(config, "token", "rotate", "99")
    assert missing.returncode == 1 and missing.stderr == "hubcore: token 99 does not exist\n"


# -- usage --by token -------------------------------------------------------------------

def test_usage_by_token_names_each_tokens_user_and_note(config: Path, db: sqlite3.Connection) -> None:
    ci = create(config, "--user", "alice", "--note", "ci bot")
    laptop = create(config, "--user", "alice")
    insert_usage(db, ci["id"], "alice", [(time.time() - 60, 3 * USD), (time.time() - 30, 2 * USD)])
    insert_usage(db, laptop["id"], "alice", [(time.time() - 60, USD)])

    text = ok(config, "usage", "--by", "token")
    assert text.splitlines()[0].startswith("usage by token,")
    groups = [line.split("  ")[0] for line in text.splitlines()[4:6]]
    assert groups == [f"{ci['id']} alice (ci bot)", f"{laptop['id']} alice"]

    document = orjson.loads(ok(config, "usage", "--by", "token", "--format", "json"))
    assert document["by"] == "token"
    assert [(g["group"], g["token_id"], g["user"], g["note"], g["cost_micros"], g["requests"]) for g in document["groups"]] == [
        (str(ci["id"]), ci["id"], "alice", "ci bot", 5 * USD, 2),
        (str(laptop["id"]), laptop["id"], "alice", None, USD, 1),
    ]

    reader = list(csv.DictReader(io.StringIO(ok(config, "usage", "--by", "token", "--format", "csv"))))
    assert [(r["group"], r["user"], r["note"], r["requests"]) for r in reader] == [
        (str(ci["id"]), "alice", "ci bot", "2"), (str(laptop["id"]), "alice", "", "1"), ("TOTAL", "", "", "3"),
    ]
