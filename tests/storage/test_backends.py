"""What hubcore stores and reads, on SQLite and on PostgreSQL alike: tokens,
limits, the tokens generation counter, audit, operators, key switches, the
usage report and the budgets rebuilt from usage rows. Each test runs once
per engine (the `database` fixture) and expects the same answers."""
from __future__ import annotations

import math
import sqlite3
import time
from datetime import date, datetime
from zoneinfo import ZoneInfo

import pytest

from hubcore import store
from hubcore.accounting import report
from hubcore.dashboard import web
from hubcore.dashboard.mine import read_mine
from hubcore.database import floor_of
from hubcore.gateway.upstreams import load_disabled_keys, store_key_switches
from hubcore.governance import admins, audit, tokens
from hubcore.governance.limiter import Limiter, budget_report
from hubcore.governance.limits import Limits
from hubcore.governance.storage import load_scope_limits, read_limits, write_limits
from tests.storage.conftest import add_usage, event

# 2026-01-01T00:00:00Z, a Thursday.
JAN1 = 1767225600.0
DAY = 86400.0


def test_a_token_is_created_listed_rotated_and_revoked(conn: sqlite3.Connection) -> None:
    first, value = tokens.create(conn, "alice", "proj", note="laptop")
    second, _ = tokens.create(conn, "bob")
    assert second == first + 1
    assert value.startswith(tokens.TOKEN_PREFIX)
    table = tokens.load_table(conn)
    assert table[tokens.hash_token(value)].user == "alice"
    assert [(t.id, t.user, t.project, t.note) for t in tokens.list_tokens(conn)] == [
        (first, "alice", "proj", "laptop"), (second, "bob", None, None),
    ]
    new_value = tokens.rotate(conn, first)
    assert new_value is not None and new_value != value
    assert tokens.hash_token(value) not in tokens.load_table(conn)
    assert tokens.set_note(conn, first, "desk") and tokens.get(conn, first).note == "desk"  # type: ignore[union-attr]
    assert tokens.revoke(conn, first)
    assert not tokens.revoke(conn, first), "a second revoke changes nothing"
    assert tokens.rotate(conn, first) is None
    assert [t.id for t in tokens.list_tokens(conn)] == [second]
    assert [t.id for t in tokens.list_tokens(conn, include_revoked=True)] == [first, second]
    assert set(tokens.load_revoked(conn)) == {tokens.hash_token(new_value)}
    assert tokens.get(conn, 999) is None and tokens.principal(conn, 999) is None


def test_a_token_shows_its_last_use(conn: sqlite3.Connection) -> None:
    token_id, _ = tokens.create(conn, "alice")
    assert tokens.get(conn, token_id).last_used_at is None  # type: ignore[union-attr]
    add_usage(conn, event("r1", JAN1, token_id=token_id), event("r2", JAN1 + 5.5, token_id=token_id))
    assert tokens.get(conn, token_id).last_used_at == JAN1 + 5.5  # type: ignore[union-attr]


def test_every_change_to_tokens_users_and_projects_moves_the_generation(conn: sqlite3.Connection) -> None:
    seen = [tokens.generation(conn)]

    def moved() -> bool:
        seen.append(tokens.generation(conn))
        return seen[-1] > seen[-2]

    token_id, _ = tokens.create(conn, "alice")
    assert moved()
    tokens.set_note(conn, token_id, "x")
    assert moved()
    write_limits(conn, "user", "alice", Limits(rpm=5))
    assert moved()
    write_limits(conn, "project", "p", Limits(concurrency=2))
    assert moved()
    conn.execute("DELETE FROM users WHERE name = ?", ("alice",))
    assert moved()
    assert not tokens.revoke(conn, 999)
    assert not moved(), "a statement that changes no row leaves the counter alone"


def test_the_token_table_reloads_only_when_the_generation_moved(conn: sqlite3.Connection) -> None:
    table = tokens.TokenTable()
    assert table.refresh(conn)
    assert not table.refresh(conn)
    _, value = tokens.create(conn, "alice")
    assert table.refresh(conn)
    assert table.lookup(value.encode()) is not None


def test_limits_of_every_scope_round_trip(conn: sqlite3.Connection) -> None:
    token_id, _ = tokens.create(conn, "alice", "proj")
    assert write_limits(conn, "token", token_id, Limits(rpm=3, models=("claude-*",)))
    assert write_limits(conn, "user", "alice", Limits(budget_day=5_000_000), note="first")
    # A later write without a note keeps the stored one (COALESCE with the existing row).
    assert write_limits(conn, "user", "alice", Limits(budget_day=6_000_000))
    assert write_limits(conn, "project", "proj", Limits(groups=("cheap",)))
    assert not write_limits(conn, "token", 999, Limits(rpm=1))
    assert read_limits(conn, "token", token_id) == Limits(rpm=3, models=("claude-*",))
    assert read_limits(conn, "user", "alice") == Limits(budget_day=6_000_000)
    assert conn.execute("SELECT note FROM users WHERE name = ?", ("alice",)).fetchone() == ("first",)
    with pytest.raises(KeyError):
        read_limits(conn, "user", "nobody")
    loaded = load_scope_limits(conn)
    assert loaded.tokens == {token_id: Limits(rpm=3, models=("claude-*",))}
    assert loaded.users == {"alice": Limits(budget_day=6_000_000)}
    assert loaded.projects == {"proj": Limits(groups=("cheap",))}
    assert loaded.owners == {token_id: ("alice", "proj")}
    principal = tokens.principal(conn, token_id)
    assert principal is not None and principal.groups == frozenset({"cheap"})


def test_a_write_transaction_commits_or_rolls_back_whole(conn: sqlite3.Connection) -> None:
    with store.immediate(conn):
        tokens.create(conn, "kept")
    with pytest.raises(RuntimeError):
        with store.immediate(conn):
            tokens.create(conn, "gone")
            raise RuntimeError("abort")
    assert [t.user for t in tokens.list_tokens(conn)] == ["kept"]
    assert not conn.in_transaction


def test_audit_rows_read_newest_first_with_filters_and_pages(conn: sqlite3.Connection) -> None:
    ids = [audit.record(conn, "cli:ops" if n % 2 else "admin:bob", "token.revoke" if n < 5 else "user.set",
                        f"token {n}", {"n": n}, None, "cli", now=float(n)) for n in range(10)]
    assert [e.id for e in audit.read(conn)] == ids[::-1]
    assert [e.id for e in audit.read(conn, since=7.0)] == ids[:6:-1]
    first = audit.read(conn, limit=4)
    second = audit.read(conn, limit=4, before_id=first[-1].id)
    assert [e.id for e in first + second] == ids[:1:-1]
    assert [e.target for e in audit.read(conn, actor="admin:bob", action="token")] == ["token 4", "token 2", "token 0"]
    # The prefix is matched as text: LIKE's wildcards in it widen nothing.
    assert audit.read(conn, action="token%") == []
    assert audit.read(conn)[0].before == {"n": 9}


def test_operators_and_their_api_tokens(conn: sqlite3.Connection) -> None:
    admins.add(conn, "bob", "a long enough password", 1.0)
    with pytest.raises(admins.AdminExists):
        admins.add(conn, "bob", "another long password", 2.0)
    assert admins.exists(conn, "bob") and not admins.exists(conn, "eve")
    assert admins.verify_password(conn, "bob", "a long enough password")
    assert not admins.verify_password(conn, "bob", "wrong password here")
    token_id, value = admins.create_token(conn, "bob", 3.0)
    assert token_id >= 1 and admins.verify_api_token(conn, value) == "bob"
    admins.record_sign_in(conn, "bob", 4.0)
    assert admins.set_password(conn, "bob", "a new long password", 5.0)
    assert admins.account_version(conn, "bob") == 5.0
    (info,) = admins.list_admins(conn)
    assert (info.name, info.last_sign_in_at, info.tokens) == ("bob", 4.0, 1)
    assert admins.remove(conn, "bob")
    # Its API tokens go with it (ON DELETE CASCADE).
    assert admins.verify_api_token(conn, value) is None
    assert conn.execute("SELECT count(*) FROM admin_tokens").fetchone() == (0,)


def test_key_switches_are_stored_and_read_back(database: str) -> None:
    store_key_switches(database, [("primary", "a1", False), ("primary", "a2", False)], 10.0, 1.0)
    store_key_switches(database, [("primary", "a2", True)], 11.0, 1.0,
                       also=lambda c: audit.record(c, "cli", "key.enable", "key a2", None, None, "cli"))
    conn = store.connect(database)
    try:
        assert load_disabled_keys(conn) == {"primary": {"a1"}}
        assert [e.action for e in audit.read(conn)] == ["key.enable"]
    finally:
        conn.close()


def _report_rows(conn: sqlite3.Connection) -> None:
    token_id, _ = tokens.create(conn, "alice", "proj", note="ci")
    add_usage(
        conn,
        event("a1", JAN1 + 10, token_id=token_id, user="alice", project="proj", upstream="primary",
              key_label="k1", model="claude-sonnet", input_tokens=100, output_tokens=10, cache_read=300,
              cost_micros=1500),
        event("a2", JAN1 + DAY + 0.5, token_id=token_id, user="alice", project="proj", upstream="backup",
              key_label="k1", model="claude-sonnet", served_model="relay-sonnet", input_tokens=50,
              output_tokens=5, cost_micros=700, cost_basis="estimate", output_estimated=True),
        event("b1", JAN1 + DAY - 0.25, user="bob", model="mystery", outcome="upstream_error", status=502),
        event("b2", JAN1 + 2 * DAY + 3600, user="bob", model="claude-haiku", input_tokens=7, cost_micros=20),
    )


def test_the_usage_report_groups_and_counts(conn: sqlite3.Connection) -> None:
    _report_rows(conn)
    rows, total = report.query(conn, "user")
    assert [(r.group, r.requests, r.input, r.output, r.cost_micros, r.unpriced, r.errors, r.estimated)
            for r in rows] == [("alice", 2, 150, 15, 2200, 1, 0, 1), ("bob", 2, 7, 0, 20, 1, 1, 0)]
    assert (total.requests, total.cost_micros, total.cache_read) == (4, 2220, 300)
    assert isinstance(total.cost_micros, int)
    days, _ = report.query(conn, "day")
    # A row a quarter second before midnight UTC is still on its own day.
    assert [(r.group, r.requests) for r in days] == [("2026-01-01", 2), ("2026-01-02", 1), ("2026-01-03", 1)]
    keys, _ = report.query(conn, "key")
    assert {r.group for r in keys} == {"primary/k1", "backup/k1", None}
    served, _ = report.query(conn, "served_model")
    assert {r.group for r in served} == {"claude-sonnet", "relay-sonnet", "mystery", "claude-haiku"}
    by_token, _ = report.query(conn, "token")
    named = [r for r in by_token if r.group is not None]
    assert [(r.group, r.user, r.note) for r in named] == [("1", "alice", "ci")]
    window, window_total = report.query(conn, "user", since=JAN1 + DAY - 1, until=JAN1 + 2 * DAY)
    assert window_total.requests == 2 and {r.group for r in window} == {"alice", "bob"}


def test_budgets_are_rebuilt_from_usage_rows(conn: sqlite3.Connection) -> None:
    token_id, _ = tokens.create(conn, "alice", "proj")
    write_limits(conn, "user", "alice", Limits(budget_day=1_000_000, budget_5h=2_000_000))
    now = JAN1 + 12 * 3600
    add_usage(
        conn,
        event("old", now - 2 * DAY, token_id=token_id, user="alice", project="proj", cost_micros=900_000),
        event("today", now - 3620.5, token_id=token_id, user="alice", project="proj", cost_micros=250_000),
        event("late", now - 60.5, token_id=token_id, user="alice", project="proj", cost_micros=50_000),
        event("free", now - 30, token_id=token_id, user="alice", project="proj", cost_micros=0),
    )
    lines = {(line.kind, line.window): line for line in budget_report(conn, "UTC", now)}
    assert lines[("user", "day")].spent_micros == 300_000
    assert lines[("user", "5h")].spent_micros == 300_000
    # The rolling window's oldest bucket is the minute of "today": 39.5 s
    # into its minute, which a rounding cast would put in the next one.
    minute = int((now - 3620.5) // 60)
    assert lines[("user", "5h")].resets_at == float((minute + 300) * 60)
    limiter = Limiter("UTC", clock=lambda: now)
    limiter.reload(conn)
    limiter.rebuild(conn, now)
    assert {(line.kind, line.window, line.spent_micros) for line in limiter.spend_report(now)} >= {
        ("user", "day", 300_000), ("user", "5h", 300_000),
    }


def test_a_plain_begin_reads_one_snapshot_while_another_connection_commits(database: str) -> None:
    # What the budgets' rebuild relies on: a retention batch that moves
    # spend from usage rows to usage_carried while it reads is seen on one
    # side only.
    reader, writer = store.connect(database), store.connect(database)
    try:
        token_id, _ = tokens.create(writer, "alice")
        add_usage(writer, event("a", JAN1, token_id=token_id, user="alice", cost_micros=700))
        reader.execute("BEGIN")
        assert reader.execute("SELECT SUM(cost_micros) FROM usage").fetchone() == (700,)
        with store.immediate(writer):
            writer.execute("DELETE FROM usage")
            writer.execute("INSERT INTO usage_carried (token_id, user, project, cost_micros, requests, through_ts)"
                           " VALUES (?, ?, ?, ?, ?, ?)", (token_id, "alice", None, 700, 1, JAN1))
        assert reader.execute("SELECT count(*) FROM usage_carried").fetchone() == (0,)
        assert reader.execute("SELECT SUM(cost_micros) FROM usage").fetchone() == (700,)
        reader.execute("COMMIT")
        assert reader.execute("SELECT count(*), SUM(cost_micros) FROM usage_carried").fetchone() == (1, 700)
    finally:
        reader.close()
        writer.close()


def test_the_schema_is_migrated_once_and_reopened_as_it_is(database: str) -> None:
    first = store.connect(database)
    tokens.create(first, "alice")
    first.close()
    again = store.connect(database)
    try:
        assert [t.user for t in tokens.list_tokens(again)] == ["alice"]
        assert again.execute("SELECT count(*) FROM generation").fetchone() == (1,)
    finally:
        again.close()


def test_a_unique_violation_is_an_integrity_error(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO users (name, created_at, updated_at) VALUES (?, ?, ?)", ("x", 1.0, 1.0))
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO users (name, created_at, updated_at) VALUES (?, ?, ?)", ("x", 2.0, 2.0))


def test_an_unknown_table_is_an_operational_error(conn: sqlite3.Connection) -> None:
    with pytest.raises(sqlite3.OperationalError):
        conn.execute("SELECT * FROM no_such_table")


def test_time_columns_keep_their_fractions(conn: sqlite3.Connection) -> None:
    now = time.time()
    audit.record(conn, "a", "x", None, None, None, "cli", now=now)
    assert audit.read(conn)[0].ts == now


async def test_the_dashboards_reads_and_writes(database: str) -> None:
    made, _ = await web.write(database, lambda c: tokens.create(c, "alice", "proj"))
    assert [t.id for t in await web.read(database, tokens.list_tokens)] == [made]
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        await web.read(database, lambda c: tokens.create(c, "eve"))
    with pytest.raises(KeyError):
        await web.write(database, lambda c: (tokens.create(c, "gone"), {}["abort"]))
    assert [t.user for t in await web.read(database, tokens.list_tokens)] == ["alice"]


def test_a_developers_own_page_figures(conn: sqlite3.Connection, database: str) -> None:
    tz = ZoneInfo("Europe/Berlin")
    now = JAN1 + 10 * DAY + 12 * 3600
    write_limits(conn, "user", "alice", Limits(budget_day=1_000_000))
    # 23:59:30 Berlin time on the day before: a bucket rounded up would land on "today".
    late = datetime(2026, 1, 10, 23, 59, 30, tzinfo=tz).timestamp()
    add_usage(conn, event("m1", now - 60, user="alice", cost_micros=300),
              event("m2", late, user="alice", cost_micros=70), event("m3", now - 30, user="bob", cost_micros=5))
    mine = read_mine(database, "alice", tz, now)
    assert [(p.name, p.requests, p.cost_micros) for p in mine.periods][0] == ("today", 1, 300)
    days = dict(mine.days)
    assert (days[date(2026, 1, 10)], days[date(2026, 1, 11)]) == (70, 300)
    assert mine.user_limits == Limits(budget_day=1_000_000)


@pytest.mark.parametrize("x", [-1.5, -1.0, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 59.999, 1767225599.75 / 86400])
def test_floor_of_is_the_floor_on_both_engines(conn: sqlite3.Connection, x: float) -> None:
    (found,) = conn.execute(f"SELECT {floor_of(repr(x))}").fetchone()
    assert (found, type(found)) == (math.floor(x), int)
