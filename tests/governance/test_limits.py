"""The Limiter on a fake clock: rpm, concurrency, budgets over rolling and
calendar windows, model allow-lists, expiry, rebuild from the usage table."""
from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hubcore import store

from hubcore.governance import tokens
from hubcore.errors import ANTHROPIC, OPENAI, HubError
from hubcore.governance.limiter import Admission, Limiter, Refused
from hubcore.governance.limits import Limits, calendar_periods, format_usd, parse_column
from hubcore.governance.storage import ScopeLimits
from hubcore.governance.tokens import Principal
from hubcore.accounting.usage import FIELDS, INSERT_SQL, UsageEvent
from hubcore.cli.render import limits_text

USD = 1_000_000


def at(text: str, tz: str = "UTC") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp()


T0 = at("2026-03-04T10:00:00")  # a Wednesday


def who(token_id: int = 1, user: str = "alice", project: str | None = "proj", limits: Limits | None = None) -> Principal:
    return Principal(token_id=token_id, user=user, project=project, prefix="hc-test", limits=limits)


def refused(limiter: Limiter, principal: Principal, model: str | None = None, now: float = T0) -> Refused:
    with pytest.raises(Refused) as info:
        limiter.admit(principal, model, now)
    return info.value


def test_rpm_refuses_the_request_after_n_with_retry_after_then_slides() -> None:
    limiter = Limiter(clock=lambda: T0)
    p = who(limits=Limits(rpm=3))
    for offset in (0.0, 10.0, 20.0):
        limiter.admit(p, "claude-sonnet-4-6", T0 + offset).release()
    error = refused(limiter, p, now=T0 + 30)
    assert (error.status, error.error_type, error.code, error.limit) == (429, "rate_limit_error", "rate_limit_exceeded", "rpm")
    assert error.retry_after == pytest.approx(30.0)
    assert error.resets_at == pytest.approx(T0 + 60)
    assert "token 1" in error.message and "3 requests per minute" in error.message
    assert "retry in 30 s" in error.message and "2026-03-04T10:01:00+00:00" in error.message
    # Refused requests do not count: the window still holds exactly three.
    # retry-after is whole seconds, rounded up, never 0.
    assert refused(limiter, p, now=T0 + 59.5).retry_after == 1.0
    assert refused(limiter, p, now=T0 + 44.2).retry_after == 16.0
    limiter.admit(p, None, T0 + 60).release()
    # Now the window is T0+10, T0+20, T0+60: the next slot frees at T0+70.
    assert refused(limiter, p, now=T0 + 61).retry_after == pytest.approx(9.0)
    limiter.admit(p, None, T0 + 70).release()


def test_rpm_applies_per_scope_user_across_tokens() -> None:
    limiter = Limiter(clock=lambda: T0)
    limiter.update(ScopeLimits(users={"alice": Limits(rpm=2)}))
    limiter.admit(who(1), None, T0).release()
    limiter.admit(who(2), None, T0 + 1).release()
    error = refused(limiter, who(3), now=T0 + 2)
    assert error.scope == "user alice" and error.retry_after == pytest.approx(58.0)
    limiter.admit(who(4, user="bob"), None, T0 + 2).release()


def test_lowered_rpm_waits_for_enough_hits_to_age_out() -> None:
    limiter = Limiter(clock=lambda: T0)
    for i in range(5):
        limiter.admit(who(limits=Limits(rpm=10)), None, T0 + i).release()
    error = refused(limiter, who(limits=Limits(rpm=2)), now=T0 + 10)
    # Hits at T0..T0+4; with room for 2 the hit at T0+3 must age out first.
    assert error.retry_after == pytest.approx(53.0)


def test_concurrency_refuses_while_c_are_open_and_admits_after_a_release() -> None:
    limiter = Limiter(clock=lambda: T0)
    p = who(limits=Limits(concurrency=2))
    first = limiter.admit(p, None, T0)
    second = limiter.admit(p, None, T0)
    error = refused(limiter, p)
    assert (error.status, error.error_type, error.limit, error.retry_after) == (429, "rate_limit_error", "concurrency", 1.0)
    assert "concurrency limit of token 1" in error.message and "2 requests in flight" in error.message
    assert limiter.in_flight("token", 1) == 2
    first.release()
    first.release()  # idempotent
    assert first.released and limiter.in_flight("token", 1) == 1
    third = limiter.admit(p, None, T0)
    assert limiter.in_flight("token", 1) == 2
    error = refused(limiter, p)
    second.release()
    third.release()
    assert limiter.in_flight("token", 1) == limiter.in_flight("user", "alice") == limiter.in_flight("project", "proj") == 0


def test_a_tiny_budget_refuses_the_next_request_after_a_costly_one() -> None:
    limiter = Limiter(clock=lambda: T0)
    p = who(limits=Limits(budget_day=10_000))  # $0.01
    admission = limiter.admit(p, "claude-opus-4-6", T0)
    limiter.charge(1, "alice", "proj", 250_000, T0)  # the request cost $0.25: it finishes anyway
    admission.release()
    error = refused(limiter, p, now=T0 + 1)
    assert (error.status, error.error_type, error.code, error.limit) == (403, "permission_error", "budget_exceeded", "budget_day")
    assert error.retry_after is None
    assert error.resets_at == at("2026-03-05T00:00:00")
    assert error.message == (
        "daily budget of token 1 is spent: $0.25 of $0.01; "
        "it resets at 2026-03-05T00:00:00+00:00 (in 13 h 59 min)"
    )
    limiter.admit(p, None, at("2026-03-05T00:00:00")).release()


def test_refusals_render_in_both_vendor_shapes() -> None:
    limiter = Limiter(clock=lambda: T0)
    error = refused(limiter, who(limits=Limits(models=("claude-sonnet-*",))), "claude-opus-4-6")
    assert isinstance(error, HubError)
    anthropic = orjson.loads(error.body(ANTHROPIC))
    assert anthropic == {"type": "error", "error": {"type": "permission_error", "message": error.message}}
    openai = orjson.loads(error.body(OPENAI))
    assert openai["error"]["type"] == "permission_error" and openai["error"]["code"] == "model_not_allowed"


def test_user_budget_holds_across_two_tokens_of_that_user() -> None:
    limiter = Limiter(clock=lambda: T0)
    limiter.update(ScopeLimits(users={"alice": Limits(budget_total=1 * USD)}))
    limiter.admit(who(1), None, T0).release()
    limiter.charge(1, "alice", "proj", 700_000, T0)
    limiter.admit(who(2), None, T0 + 1).release()
    limiter.charge(2, "alice", None, 300_000, T0 + 1)
    error = refused(limiter, who(2, project=None), now=T0 + 2)
    assert error.scope == "user alice" and error.limit == "budget_total" and error.resets_at is None
    assert "total budget of user alice is spent: $1.00 of $1.00" in error.message
    assert "does not reset" in error.message
    refused(limiter, who(1), now=T0 + 2)
    limiter.admit(who(3, user="bob"), None, T0 + 2).release()


def test_project_budget_and_the_check_order() -> None:
    limiter = Limiter(clock=lambda: T0)
    limiter.update(ScopeLimits(projects={"proj": Limits(budget_week=5 * USD, models=("claude-*",))}))
    limiter.charge(9, "carol", "proj", 5 * USD, T0)
    # Expiry beats the model check, the model check beats the budget, the
    # budget beats rpm and concurrency.
    expired = who(limits=Limits(expires_at=T0 - 1, rpm=1))
    assert refused(limiter, expired, "gpt-5").limit == "expires_at"
    assert refused(limiter, who(limits=Limits(rpm=1)), "gpt-5").limit == "models"
    error = refused(limiter, who(limits=Limits(rpm=1, concurrency=1)), "claude-haiku-4-5")
    assert error.limit == "budget_week" and error.scope == "project proj"
    assert error.resets_at == at("2026-03-09T00:00:00")  # the next Monday
    # None of the refusals counted against rpm.
    limiter.admit(who(limits=Limits(rpm=1)), "claude-haiku-4-5", T0 + 7 * 86400).release()


def test_model_allow_list() -> None:
    limiter = Limiter(clock=lambda: T0)
    p = who(limits=Limits(models=("claude-sonnet-*", "claude-haiku-4-5")))
    error = refused(limiter, p, "claude-opus-4-6")
    assert (error.status, error.error_type, error.limit) == (403, "permission_error", "models")
    assert error.message == "model 'claude-opus-4-6' is not allowed for token 1 (allowed: claude-sonnet-*, claude-haiku-4-5)"
    limiter.admit(p, "claude-sonnet-4-6", T0).release()
    limiter.admit(p, "claude-haiku-4-5", T0).release()
    refused(limiter, p, "claude-haiku-4-5-20251001")  # a glob without * matches exactly
    refused(limiter, p, "CLAUDE-SONNET-4-6")  # case matters, as at the vendor
    limiter.admit(p, None, T0).release()  # GET /v1/models carries no model
    # A body whose model the hub could not read does not slip past the list.
    with pytest.raises(Refused) as info:
        limiter.admit(p, None, T0, model_required=True)
    assert info.value.limit == "models" and "names none" in info.value.message
    limiter.admit(who(2, user="bob", project=None), None, T0, model_required=True).release()


def test_needs_model_only_where_an_allow_list_applies() -> None:
    limiter = Limiter(clock=lambda: T0)
    assert not limiter.needs_model(who(limits=Limits(rpm=5, budget_day=1)))
    assert limiter.needs_model(who(limits=Limits(models=("claude-*",))))
    limiter.update(ScopeLimits(users={"bob": Limits(models=("claude-*",))}, projects={"lab": Limits(models=("gpt-*",))}))
    assert limiter.needs_model(who(user="bob", project=None))
    assert limiter.needs_model(who(user="carol", project="lab"))
    assert not limiter.needs_model(who(user="carol", project="other"))
    assert not limiter.needs_model(who(user="carol", project=None))


def test_expired_token_is_refused_with_the_time() -> None:
    limiter = Limiter("Europe/Berlin", clock=lambda: T0)
    p = who(7, limits=Limits(expires_at=T0))
    limiter.admit(p, None, T0 - 0.001).release()
    error = refused(limiter, p, now=T0)
    assert (error.status, error.error_type, error.code) == (403, "permission_error", "token_expired")
    assert error.message == "token 7 expired at 2026-03-04T11:00:00+01:00"
    limiter.update(ScopeLimits(users={"bob": Limits(expires_at=T0)}))
    assert refused(limiter, who(8, user="bob")).message.startswith("user bob expired")


def test_unreadable_limits_fail_closed() -> None:
    limits = parse_column('{"rpm": "lots"}', "token 3")
    assert limits is not None and limits.error is not None
    error = refused(Limiter(clock=lambda: T0), who(3, limits=limits))
    assert error.status == 403 and error.limit == "unreadable" and "token 3" in error.message


def test_rolling_five_hours() -> None:
    limiter = Limiter(clock=lambda: T0)
    p = who(limits=Limits(budget_5h=100))
    limiter.charge(1, "alice", None, 60, T0)
    limiter.charge(1, "alice", None, 60, T0 + 2 * 3600)
    error = refused(limiter, p, now=T0 + 2 * 3600 + 5)
    # Spend drops below the limit once the first charge is five hours old.
    assert error.limit == "budget_5h" and error.resets_at == T0 + 5 * 3600
    assert "5-hour rolling budget of token 1 is spent: $0.00012 of $0.0001" in error.message
    assert "in 2 h 59 min" in error.message
    refused(limiter, p, now=T0 + 5 * 3600 - 1)
    limiter.admit(p, None, T0 + 5 * 3600).release()
    assert limiter.spent("token", 1, "5h", T0 + 5 * 3600) == 60
    assert limiter.spent("token", 1, "5h", T0 + 7 * 3600) == 0
    assert limiter.spent("token", 1, "total", T0 + 7 * 3600) == 120


def test_late_charge_lands_in_the_window_of_its_request() -> None:
    limiter = Limiter(clock=lambda: T0)
    midnight = at("2026-03-05T00:00:00")
    limiter.charge(1, "alice", None, 10, midnight + 60)
    # A request that arrived before midnight and ended after it.
    limiter.charge(1, "alice", None, 7, midnight - 30)
    limiter.charge(1, "alice", None, 5, midnight + 30)
    assert limiter.spent("token", 1, "day", midnight + 120) == 15
    assert limiter.spent("token", 1, "5h", midnight + 120) == 22
    assert limiter.spent("token", 1, "week", midnight + 120) == 22
    assert limiter.spent("token", 1, "5h", midnight - 30 + 5 * 3600) == 15


@pytest.mark.parametrize(
    ("tz", "spent_at", "still_refused_at", "resets_at"),
    [
        # New York: UTC midnight passes, the local day does not.
        ("America/New_York", "2026-01-14T18:30:00", "2026-01-15T02:00:00+00:00", "2026-01-15T05:00:00+00:00"),
        ("Asia/Tokyo", "2026-01-14T09:30:00", "2026-01-14T14:59:59+00:00", "2026-01-14T15:00:00+00:00"),
        # The day the clocks go forward in New York has 23 hours.
        ("America/New_York", "2026-03-08T12:00:00", "2026-03-09T03:59:59+00:00", "2026-03-09T04:00:00+00:00"),
    ],
)
def test_calendar_day_resets_at_the_timezone_boundary(tz: str, spent_at: str, still_refused_at: str, resets_at: str) -> None:
    spent = at(spent_at, tz)
    limiter = Limiter(tz, clock=lambda: spent)
    p = who(limits=Limits(budget_day=100))
    limiter.charge(1, "alice", "proj", 100, spent)
    error = refused(limiter, p, now=datetime.fromisoformat(still_refused_at).timestamp())
    assert error.resets_at == datetime.fromisoformat(resets_at).timestamp()
    assert datetime.fromtimestamp(error.resets_at, ZoneInfo(tz)).strftime("%H:%M:%S") == "00:00:00"
    limiter.admit(p, None, error.resets_at).release()
    assert limiter.spent("token", 1, "day", error.resets_at) == 0
    assert limiter.spent("token", 1, "month", error.resets_at) == 100


def test_week_and_month_boundaries() -> None:
    tz = ZoneInfo("Europe/Berlin")
    day, week, month = calendar_periods(at("2026-03-29T12:00:00", "Europe/Berlin"), tz)  # a Sunday, DST starts
    assert day == (at("2026-03-29T00:00:00", "Europe/Berlin"), at("2026-03-30T00:00:00", "Europe/Berlin"))
    assert day[1] - day[0] == 23 * 3600
    assert week == (at("2026-03-23T00:00:00", "Europe/Berlin"), at("2026-03-30T00:00:00", "Europe/Berlin"))
    assert month == (at("2026-03-01T00:00:00", "Europe/Berlin"), at("2026-04-01T00:00:00", "Europe/Berlin"))
    december = calendar_periods(at("2026-12-31T23:59:59", "Europe/Berlin"), tz)[2]
    assert december[1] == at("2027-01-01T00:00:00", "Europe/Berlin")

    limiter = Limiter("Europe/Berlin", clock=lambda: at("2026-03-31T22:00:00", "Europe/Berlin"))
    p = who(limits=Limits(budget_month=50))
    limiter.charge(1, "alice", None, 50, at("2026-03-31T23:00:00", "Europe/Berlin"))
    error = refused(limiter, p, now=at("2026-03-31T23:59:59", "Europe/Berlin"))
    assert error.resets_at == at("2026-04-01T00:00:00", "Europe/Berlin")
    assert "monthly budget" in error.message and "2026-04-01T00:00:00+02:00" in error.message
    limiter.admit(p, None, error.resets_at).release()


def test_spend_before_a_boundary_stays_out_of_the_new_period() -> None:
    limiter = Limiter(clock=lambda: T0)
    sunday, monday = at("2026-03-08T23:00:00"), at("2026-03-09T01:00:00")
    limiter.charge(1, "alice", None, 1000, T0)           # Wednesday
    limiter.charge(1, "alice", None, 300, sunday)
    limiter.charge(1, "alice", None, 20, monday)
    assert [limiter.spent("token", 1, w, monday) for w in ("day", "week", "month", "total")] == [20, 20, 1320, 1320]
    april = at("2026-04-01T00:00:30")
    limiter.charge(1, "alice", None, 4, april)
    limiter.charge(1, "alice", None, 50, april - 60)      # ended after midnight, arrived before
    assert [limiter.spent("token", 1, w, april) for w in ("day", "week", "month", "total")] == [4, 54, 4, 1374]


def test_update_keeps_counters() -> None:
    limiter = Limiter(clock=lambda: T0)
    limiter.update(ScopeLimits(users={"alice": Limits(concurrency=5)}))
    open_ = [limiter.admit(who(i), None, T0) for i in range(3)]
    limiter.charge(1, "alice", "proj", 40, T0)
    limiter.update(ScopeLimits(users={"alice": Limits(concurrency=3, budget_day=100)}))
    assert limiter.in_flight("user", "alice") == 3
    assert refused(limiter, who(4)).limit == "concurrency"
    open_[0].release()
    later = limiter.admit(who(4), None, T0)
    limiter.charge(4, "alice", None, 60, T0)
    assert refused(limiter, who(5)).limit == "budget_day"
    limiter.update(ScopeLimits())
    limiter.admit(who(5), None, T0).release()
    for admission in [*open_, later]:
        admission.release()
    assert limiter.in_flight("user", "alice") == 0


def _insert(conn: sqlite3.Connection, events: list[UsageEvent]) -> None:
    conn.executemany(INSERT_SQL, [tuple(getattr(e, f) for f in FIELDS) for e in events])


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = store.connect(tmp_path / "hub.db")
    yield conn
    conn.close()


def test_rebuild_after_a_restart_restores_spend(db: sqlite3.Connection) -> None:
    limits = Limits(budget_5h=10 * USD, budget_day=6 * USD, budget_week=20 * USD, budget_month=20 * USD, budget_total=20 * USD)
    running = Limiter(clock=lambda: T0)
    recorded: list[UsageEvent] = []
    # Yesterday, and two requests within the hour; one refused (no cost).
    for n, (ts, cost) in enumerate([(T0 - 86400, 4 * USD), (T0 - 3000, 3 * USD), (T0 - 60, 3 * USD), (T0 - 30, None)]):
        event = UsageEvent(ts=ts, request_id=f"r{n}", endpoint="/v1/messages", status=200,
                           outcome="ok" if cost else "refused", total_ms=5.0, token_id=1,
                           user="alice", project="proj", cost_micros=cost)
        running.on_usage(event)
        recorded.append(event)
    _insert(db, recorded)
    assert refused(running, who(limits=limits), now=T0).limit == "budget_day"

    restarted = Limiter(clock=lambda: T0)
    restarted.rebuild(db, T0)
    error = refused(restarted, who(limits=limits), now=T0)
    assert error.limit == "budget_day" and error.message == refused(running, who(limits=limits), now=T0).message
    for kind, name in (("token", 1), ("user", "alice"), ("project", "proj")):
        for window, expected in (("5h", 6), ("day", 6), ("week", 10), ("month", 10), ("total", 10)):
            assert restarted.spent(kind, name, window, T0) == expected * USD, (kind, window)
            assert running.spent(kind, name, window, T0) == expected * USD, (kind, window)


def test_rebuild_agrees_with_live_charging(db: sqlite3.Connection) -> None:
    """Any history, charged live as it happened or rebuilt from the table,
    gives the same spend in every window of every scope."""
    rng = random.Random(5)
    tz = "America/Los_Angeles"
    now = at("2026-03-09T03:00:00", tz)  # Monday, just after the DST change
    owners = {1: ("ann", "x"), 2: ("ann", None), 3: ("ben", "x"), 4: ("ben", "y")}
    for token_id, (user, project) in owners.items():
        assert tokens.create(db, user, project)[0] == token_id
    owners[9] = ("cat", "z")  # usage of a token the tokens table does not know
    live = Limiter(tz, clock=lambda: now)
    events = []
    for n in range(400):
        ts = now - rng.uniform(0, 45 * 86400) if rng.random() < 0.6 else now - rng.uniform(0, 6 * 3600)
        token_id = rng.choice(list(owners))
        user, project = owners[token_id]
        event = UsageEvent(
            ts=ts, request_id=f"r{n}", endpoint="/v1/messages", status=200, outcome="ok", total_ms=1.0,
            token_id=token_id, user=user, project=project,
            cost_micros=rng.choice([None, 0, rng.randint(1, 5 * USD)]),
        )
        events.append(event)
    # Live charges arrive in the order requests end, roughly by ts.
    for event in sorted(events, key=lambda e: e.ts + rng.uniform(0, 600)):
        live.on_usage(event)
    _insert(db, events)
    rebuilt = Limiter(tz, clock=lambda: now)
    rebuilt.rebuild(db, now)
    for kind, names in (("token", [1, 2, 3, 4, 9]), ("user", ["ann", "ben", "cat"]), ("project", ["x", "y", "z"])):
        for name in names:
            for window in ("5h", "day", "week", "month", "total"):
                assert live.spent(kind, name, window, now) == rebuilt.spent(kind, name, window, now), (kind, name, window)
    assert sum(rebuilt.spent("user", u, "total", now) for u in ("ann", "ben", "cat")) == sum(
        e.cost_micros or 0 for e in events
    )


def test_rebuild_keeps_in_flight_counts(db: sqlite3.Connection) -> None:
    limiter = Limiter(clock=lambda: T0)
    admission = limiter.admit(who(limits=Limits(concurrency=1)), None, T0)
    limiter.rebuild(db, T0)
    assert refused(limiter, who(limits=Limits(concurrency=1))).limit == "concurrency"
    admission.release()
    assert limiter.in_flight("token", 1) == 0


def test_spend_report_lines() -> None:
    limiter = Limiter(clock=lambda: T0)
    limiter.update(ScopeLimits(
        tokens={1: Limits(budget_5h=2 * USD)}, users={"alice": Limits(budget_day=5 * USD, budget_total=9 * USD)},
        projects={"proj": Limits(rpm=5)},
    ))
    limiter.charge(1, "alice", "proj", 3 * USD, T0 - 600)
    lines = {(line.kind, line.name, line.window): line for line in limiter.spend_report(T0)}
    assert set(lines) == {("token", "1", "5h"), ("user", "alice", "day"), ("user", "alice", "total")}
    five = lines[("token", "1", "5h")]
    assert (five.spent_micros, five.remaining_micros, five.resets_at) == (3 * USD, 0, float((int((T0 - 600) // 60) + 300) * 60))
    day = lines[("user", "alice", "day")]
    assert (day.spent_micros, day.remaining_micros, day.resets_at) == (3 * USD, 2 * USD, at("2026-03-05T00:00:00"))
    assert lines[("user", "alice", "total")].resets_at is None
    assert [line.window for line in limiter.spend_report(T0, ("user", "alice"))] == ["day", "total"]


def test_limits_json_round_trip_and_validation() -> None:
    limits = Limits(rpm=60, concurrency=4, budget_day=5 * USD, budget_total=0, models=("claude-sonnet-*",), expires_at=T0)
    text = limits.to_json()
    assert text is not None
    assert orjson.loads(text) == {
        "rpm": 60, "concurrency": 4, "budget_micros": {"day": 5 * USD, "total": 0},
        "models": ["claude-sonnet-*"], "expires_at": T0,
    }
    assert Limits.from_json(text) == limits
    assert Limits.from_json(None) is None and Limits.from_json("{}") is None and Limits().to_json() is None
    for bad in ('{"rpm": 0}', '{"rpm": 1.5}', '{"budget_micros": {"year": 1}}', '{"speed": 1}', '{"models": "x"}', "[1]", "nope"):
        with pytest.raises(ValueError):
            Limits.from_json(bad)
    assert limits_text(limits, ZoneInfo("UTC")) == (
        "rpm 60, concurrency 4, day $5.00, total $0.00, models claude-sonnet-*, expires 2026-03-04T10:00:00+00:00"
    )
    assert format_usd(10_000) == "$0.01" and format_usd(1_234_567) == "$1.234567" and format_usd(12_345 * USD) == "$12,345.00"


def test_one_money_formatter_for_refusals_tables_and_csv() -> None:
    # Exact to the micro-dollar at any size, rounding half up where places are fixed.
    assert format_usd(123_456_789_012_345_678) == "$123,456,789,012.345678"
    assert format_usd(1_734_567, 4, symbol="") == "1.7346" and format_usd(1_734_550, 4, symbol="") == "1.7346"
    assert format_usd(1_734_549, 4, symbol="") == "1.7345" and format_usd(2_500_000, 0) == "$3"
    assert format_usd(1_234_567_890, 6, symbol="", grouping=False) == "1234.567890"
    assert format_usd(-10_000) == "$-0.01" and format_usd(-5, 6, symbol="") == "-0.000005"
    with pytest.raises(ValueError):
        format_usd(1, 7)


def test_unknown_timezone_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown timezone 'Mars/Olympus'"):
        Limiter("Mars/Olympus")


# -- the concurrency invariant under any interleaving -----------------------------

PRINCIPALS = [
    who(1, "ann", "x", Limits(concurrency=2)),
    who(2, "ann", None, Limits(concurrency=3)),
    who(3, "ben", "x"),
    who(4, "ben", "y", Limits(concurrency=1)),
]
SCOPE_LIMITS = ScopeLimits(users={"ann": Limits(concurrency=3)}, projects={"x": Limits(concurrency=2)})


def _scopes(p: Principal) -> list[tuple[str, str | int]]:
    scopes: list[tuple[str, str | int]] = [("token", p.token_id), ("user", p.user)]
    if p.project is not None:
        scopes.append(("project", p.project))
    return scopes


def _limit(kind: str, name: str | int, p: Principal) -> int | None:
    if kind == "token":
        return p.limits.concurrency if p.limits else None
    table = SCOPE_LIMITS.users if kind == "user" else SCOPE_LIMITS.projects
    lim = table.get(str(name))
    return lim.concurrency if lim else None


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["admit", "release", "release_again"]), st.integers(0, 3), st.integers(0, 50)), max_size=60))
def test_concurrency_counters_stay_exact(ops: list[tuple[str, int, int]]) -> None:
    limiter = Limiter(clock=lambda: T0)
    limiter.update(SCOPE_LIMITS)
    open_: list[tuple[Principal, Admission]] = []
    released: list[Admission] = []
    expected: dict[tuple[str, str | int], int] = {}
    for op, which, pick in ops:
        if op == "admit":
            p = PRINCIPALS[which]
            full = any(
                (limit := _limit(kind, name, p)) is not None and expected.get((kind, name), 0) >= limit
                for kind, name in _scopes(p)
            )
            try:
                admission = limiter.admit(p, None, T0)
            except Refused as e:
                assert full and e.limit == "concurrency"
                continue
            assert not full
            open_.append((p, admission))
            for scope in _scopes(p):
                expected[scope] = expected.get(scope, 0) + 1
        elif op == "release" and open_:
            p, admission = open_.pop(pick % len(open_))
            admission.release()
            released.append(admission)
            for scope in _scopes(p):
                expected[scope] -= 1
        elif op == "release_again" and released:
            released[pick % len(released)].release()
        for p in PRINCIPALS:
            for kind, name in _scopes(p):
                assert limiter.in_flight(kind, name) == expected.get((kind, name), 0)
    for _, admission in open_:
        admission.release()
    for p in PRINCIPALS:
        for kind, name in _scopes(p):
            assert limiter.in_flight(kind, name) == 0
