"""Spend resets ("reset this window's spend"): stored per scope and window,
honoured by the Limiter's live counters and by its rebuild from the usage
rows, which must agree; and the administrative changes of
hubcore.governance.changes with their audit rows."""
from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from hubcore import store
from hubcore.accounting.usage import FIELDS, INSERT_SQL, UsageEvent
from hubcore.governance import audit, changes, storage, tokens
from hubcore.governance.limit_edits import CLEAR, LimitEdits
from hubcore.governance.limiter import Limiter, Refused
from hubcore.governance.limits import WINDOWS, Limits
from hubcore.governance.storage import ScopeLimits
from hubcore.governance.tokens import Principal

USD = 1_000_000
ACTOR = {"actor": "admin:root", "origin": "test"}


def at(text: str, tz: str = "UTC") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp()


T0 = at("2026-03-04T10:00:00")  # a Wednesday


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = store.connect(tmp_path / "hub.db")
    yield conn
    conn.close()


def event(n: int, ts: float, cost: int | None, token_id: int = 1, user: str = "alice",
          project: str | None = "proj") -> UsageEvent:
    return UsageEvent(ts=ts, request_id=f"r{n}", endpoint="/v1/messages", status=200, outcome="ok", total_ms=1.0,
                      token_id=token_id, user=user, project=project, cost_micros=cost)


def insert(conn: sqlite3.Connection, events: list[UsageEvent]) -> None:
    conn.executemany(INSERT_SQL, [tuple(getattr(e, f) for f in FIELDS) for e in events])


def alice(limits: Limits | None = None) -> Principal:
    return Principal(token_id=1, user="alice", project="proj", prefix="hc-test", limits=limits)


def test_a_reset_starts_the_window_afresh_and_a_rebuild_keeps_it(db: sqlite3.Connection) -> None:
    assert tokens.create(db, "alice", "proj")[0] == 1
    limits = Limits(budget_day=5 * USD)
    history = [event(0, T0 - 7200, 3 * USD), event(1, T0 - 3600, 3 * USD)]
    insert(db, history)
    live = Limiter(clock=lambda: T0)
    live.reload(db)
    live.rebuild(db, T0)
    live.update(ScopeLimits(users={"alice": limits}))
    with pytest.raises(Refused) as refused:
        live.admit(alice(), None, T0)
    assert refused.value.limit == "budget_day"

    storage.write_spend_reset(db, "user", "alice", "day", T0 - 60)
    live.reload(db)
    assert live.spent("user", "alice", "day", T0) == 0
    live.admit(alice(), None, T0).release()
    # Only the user's window: the token's and the project's, and the user's
    # other windows, still hold what was spent.
    assert live.spent("token", 1, "day", T0) == 6 * USD
    assert live.spent("user", "alice", "week", T0) == 6 * USD
    # A request that arrived before the reset and ends after it stays forgiven;
    # one that arrived after it counts.
    late, fresh = event(2, T0 - 120, 1 * USD), event(3, T0 - 30, 2 * USD)
    for e in (late, fresh):
        live.on_usage(e)
    insert(db, [late, fresh])
    assert live.spent("user", "alice", "day", T0) == 2 * USD
    assert live.spent("user", "alice", "week", T0) == 9 * USD

    restarted = Limiter(clock=lambda: T0)
    restarted.reload(db)
    restarted.rebuild(db, T0)
    for window in WINDOWS:
        for kind, name in (("user", "alice"), ("token", 1), ("project", "proj")):
            assert restarted.spent(kind, name, window, T0) == live.spent(kind, name, window, T0), (kind, window)
    # The reload after a restart applies nothing twice.
    restarted.reload(db)
    assert restarted.spent("user", "alice", "day", T0) == 2 * USD


def test_a_reset_before_the_current_period_changes_nothing_in_it(db: sqlite3.Connection) -> None:
    limiter = Limiter(clock=lambda: T0)
    limiter.charge(1, "alice", "proj", 4 * USD, T0 - 600)
    limiter.reset_spend("user", "alice", "day", at("2026-03-03T12:00:00"), T0)   # yesterday
    assert limiter.spent("user", "alice", "day", T0) == 4 * USD
    limiter.reset_spend("user", "alice", "week", at("2026-03-03T12:00:00"), T0)  # this week, before the charge
    assert limiter.spent("user", "alice", "week", T0) == 0
    assert limiter.spent("user", "alice", "month", T0) == 4 * USD
    # An older reset of a window that holds a newer one is no reset at all.
    limiter.charge(1, "alice", "proj", 1 * USD, T0 - 300)
    limiter.reset_spend("user", "alice", "week", at("2026-03-02T12:00:00"), T0)
    assert limiter.spent("user", "alice", "week", T0) == 1 * USD


def test_total_and_rolling_windows_reset_too() -> None:
    limiter = Limiter(clock=lambda: T0)
    limits = Limits(budget_total=3 * USD, budget_5h=3 * USD)
    limiter.update(ScopeLimits(tokens={1: limits}))
    limiter.charge(1, "alice", None, 4 * USD, T0 - 600)
    limiter.reset_spend("token", 1, "total", T0 - 60, T0)
    assert limiter.spent("token", 1, "total", T0) == 0
    with pytest.raises(Refused) as refused:
        limiter.admit(alice(limits), None, T0)
    assert refused.value.limit == "budget_5h"
    limiter.reset_spend("token", 1, "5h", T0 - 60, T0)
    limiter.admit(alice(limits), None, T0).release()
    limiter.charge(1, "alice", None, 1 * USD, T0 - 10)
    limiter.charge(1, "alice", None, 5 * USD, T0 - 900)   # arrived before both resets
    assert (limiter.spent("token", 1, "5h", T0), limiter.spent("token", 1, "total", T0)) == (USD, USD)
    assert limiter.spent("token", 1, "month", T0) == 10 * USD
    (line,) = [line for line in limiter.spend_report(T0) if line.window == "total"]
    assert (line.spent_micros, line.remaining_micros) == (USD, 2 * USD)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_live_counters_and_the_rebuild_agree_whatever_the_resets(db: sqlite3.Connection, seed: int) -> None:
    """Requests end in some order after they arrive; resets land at their
    moment among them. Charged live with the resets applied as they come,
    or rebuilt from the table and the stored resets, every window of every
    scope holds the same spend."""
    rng = random.Random(seed)
    tz = "Europe/Berlin"
    now = at("2026-03-30T01:30:00", tz)  # the Monday after the DST change
    owners = {1: ("ann", "x"), 2: ("ann", None), 3: ("ben", "x"), 4: ("ben", "y")}
    for token_id, (user, project) in owners.items():
        assert tokens.create(db, user, project)[0] == token_id
    owners[9] = ("cat", "z")  # usage of a token the tokens table does not know
    happenings: list[tuple[float, object]] = []
    events = []
    for n in range(500):
        ts = now - rng.uniform(0, 40 * 86400) if rng.random() < 0.5 else now - rng.uniform(0, 7 * 3600)
        token_id = rng.choice(list(owners))
        user, project = owners[token_id]
        e = event(n, ts, rng.choice([None, rng.randint(1, 5 * USD)]), token_id, user, project)
        events.append(e)
        happenings.append((ts + rng.uniform(0, 900), e))
    scopes = [("token", "1"), ("token", "3"), ("token", "9"), ("user", "ann"), ("user", "cat"), ("project", "x")]
    stored: dict[tuple[str, str, str], float] = {}
    for _ in range(12):
        kind, name = rng.choice(scopes)
        window = rng.choice(WINDOWS)
        moment = now - (rng.uniform(0, 35 * 86400) if rng.random() < 0.4 else rng.uniform(0, 6 * 3600))
        happenings.append((moment, (kind, name, window)))
        stored[(kind, name, window)] = max(stored.get((kind, name, window), moment), moment)
    live = Limiter(tz, clock=lambda: now)
    for moment, what in sorted(happenings, key=lambda h: h[0]):
        if isinstance(what, UsageEvent):
            live.on_usage(what)
        else:
            kind, name, window = what  # type: ignore[misc]
            live.reset_spend(kind, name, window, moment, now)
    insert(db, events)
    for (kind, name, window), moment in stored.items():
        storage.write_spend_reset(db, kind, name, window, moment)
    rebuilt = Limiter(tz, clock=lambda: now)
    rebuilt.reload(db)
    rebuilt.rebuild(db, now)
    for kind, names in (("token", [1, 2, 3, 4, 9]), ("user", ["ann", "ben", "cat"]), ("project", ["x", "y", "z"])):
        for name in names:
            for window in WINDOWS:
                assert live.spent(kind, name, window, now) == rebuilt.spent(kind, name, window, now), (kind, name, window)


def test_stored_resets_keep_the_latest_moment_and_bump_the_generation(db: sqlite3.Connection) -> None:
    before = tokens.generation(db)
    storage.write_spend_reset(db, "user", "alice", "day", 200.0)
    storage.write_spend_reset(db, "user", "alice", "day", 100.0)
    storage.write_spend_reset(db, "token", 3, "5h", 50.0)
    assert storage.load_spend_resets(db) == {("user", "alice"): {"day": 200.0}, ("token", "3"): {"5h": 50.0}}
    assert tokens.generation(db) > before
    with pytest.raises(ValueError, match="unknown budget window 'year'"):
        storage.write_spend_reset(db, "user", "alice", "year", 1.0)


def test_changes_write_their_audit_rows_in_the_same_transaction(db: sqlite3.Connection) -> None:
    with store.immediate(db):
        token_id, token = changes.create_token(db, "alice", "", "ci", Limits(rpm=5), **ACTOR)
    with store.immediate(db):
        edited = changes.edit_token(db, token_id, LimitEdits(rpm=CLEAR, budgets=(("day", 2 * USD),)), "", **ACTOR)
    assert edited.after == Limits(budget_day=2 * USD) and edited.note is None
    with store.immediate(db):
        changes.edit_scope(db, "user", "alice", LimitEdits(concurrency=2), "lead", **ACTOR)
        changes.reset_spend(db, "user", "alice", "day", 1000.0, spent_micros=7, **ACTOR)
    with pytest.raises(ValueError, match="boom"), store.immediate(db):
        changes.revoke_token(db, token_id, **ACTOR)
        raise ValueError("boom")   # the revocation and its row roll back together
    with store.immediate(db):
        changes.revoke_token(db, token_id, **ACTOR)
    rows = list(reversed(audit.read(db)))
    assert [(r.action, r.target) for r in rows] == [
        ("token.create", "token 1"), ("token.update", "token 1"), ("user.set", "user alice"),
        ("user.reset_spend", "user alice"), ("token.revoke", "token 1"),
    ]
    assert rows[0].after == {"user": "alice", "project": None, "note": "ci", "limits": {"rpm": 5}, "state": "active"}
    assert rows[1].before == {"note": "ci", "limits": {"rpm": 5}}
    assert rows[1].after == {"note": None, "limits": {"budget_micros": {"day": 2 * USD}}}
    assert rows[3].before == {"window": "day", "spent_micros": 7}
    assert rows[3].after == {"window": "day", "spent_micros": 0, "counts_from": 1000.0}
    assert all(r.actor == "admin:root" and r.origin == "test" for r in rows)
    assert not any(token in repr(r) or tokens.hash_token(token).hex() in repr(r) for r in rows)
    with pytest.raises(changes.Revoked, match="token 1 is revoked"):
        changes.revoke_token(db, token_id, **ACTOR)
    with pytest.raises(changes.NotFound, match="token 7 does not exist"):
        changes.edit_token(db, 7, LimitEdits(rpm=1), None, **ACTOR)
    with pytest.raises(changes.NotFound, match="no project nowhere"):
        changes.reset_spend(db, "project", "nowhere", "day", 1.0, spent_micros=None, **ACTOR)
    with pytest.raises(changes.Revoked):
        changes.reset_spend(db, "token", token_id, "day", 1.0, spent_micros=None, **ACTOR)
    assert len(audit.read(db)) == 5
