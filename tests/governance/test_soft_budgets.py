"""Soft budgets and warning thresholds: their stored form (old rows read as
before), the flags that set them, admission (a soft budget never refuses),
and the crossings the Limiter raises from charge(), once per period, also
across a restart."""
from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import orjson
import pytest

from hubcore import store
from hubcore.accounting.usage import FIELDS, INSERT_SQL, UsageEvent
from hubcore.cli import common, scopes, usage
from hubcore.cli.main import build_parser
from hubcore.governance import tokens
from hubcore.governance.limiter import BudgetCrossing, Limiter, Refused, crossed
from hubcore.governance.limits import SOFT_WARN_AT, Limits
from hubcore.governance.storage import ScopeLimits, read_limits
from hubcore.governance.tokens import Principal

USD = 1_000_000


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo("UTC")).timestamp()


T0 = at("2026-03-04T10:00:00")


def who(project: str | None = "exp", limits: Limits | None = None) -> Principal:
    return Principal(token_id=1, user="alice", project=project, prefix="hc-test", limits=limits)


def limiter_with(projects: dict[str, Limits], clock: Callable[[], float] = lambda: T0) -> tuple[Limiter, list[BudgetCrossing]]:
    limiter = Limiter(clock=clock)
    limiter.update(ScopeLimits(projects=projects))
    seen: list[BudgetCrossing] = []
    limiter.on_crossing = seen.append
    return limiter, seen


# -- stored form ------------------------------------------------------------------------

def test_rows_written_before_soft_budgets_read_as_hard_budgets_without_thresholds() -> None:
    old = Limits.from_json('{"rpm": 5, "budget_micros": {"day": 5000000, "month": 90000000}}')
    assert old is not None
    assert old.soft == () and old.warn_at == () and old.thresholds == ()
    assert old.hard_budgets == (("day", 5 * USD), ("month", 90 * USD))
    assert (old.cap_day, old.cap_month, old.cap_5h) == (5 * USD, 90 * USD, None)
    # And what such limits write is what was written before: no new fields.
    assert orjson.loads(old.to_json() or "") == {"rpm": 5, "budget_micros": {"day": 5 * USD, "month": 90 * USD}}


def test_soft_and_warn_at_round_trip_and_apply_the_soft_default() -> None:
    limits = Limits(budget_day=5 * USD, budget_month=500 * USD, soft=("month",), warn_at=(("day", (50,)),))
    assert orjson.loads(limits.to_json() or "") == {
        "budget_micros": {"day": 5 * USD, "month": 500 * USD}, "soft": ["month"], "warn_at": {"day": [50]},
    }
    assert Limits.from_json(limits.to_json()) == limits
    assert limits.hard_budgets == (("day", 5 * USD),) and limits.cap_month is None
    assert limits.thresholds == (("day", 5 * USD, (50,)), ("month", 500 * USD, SOFT_WARN_AT))
    assert SOFT_WARN_AT == (80, 100)
    # Its own thresholds replace the soft default.
    own = Limits(budget_month=USD, soft=("month",), warn_at=(("month", (90,)),))
    assert own.warns_at("month") == (90,)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('{"soft": ["day"]}', "soft names the 'day' window, which has no budget"),
        ('{"budget_micros": {"day": 1}, "soft": ["year"]}', "'year'"),
        ('{"budget_micros": {"day": 1}, "soft": "day"}', "soft must be a list"),
        ('{"budget_micros": {"day": 1}, "warn_at": {"month": [50]}}', "warn_at names the 'month' window"),
        ('{"budget_micros": {"day": 1}, "warn_at": {"day": [0]}}', "from 1 to 1000, not 0"),
        ('{"budget_micros": {"day": 1}, "warn_at": {"day": [1001]}}', "not 1001"),
        ('{"budget_micros": {"day": 1}, "warn_at": {"day": [80, 50]}}', "ascending"),
        ('{"budget_micros": {"day": 1}, "warn_at": {"day": []}}', "at least one percentage"),
        ('{"budget_micros": {"day": 1}, "warn_at": {"day": [true]}}', "whole percentage"),
        ('{"budget_micros": {"day": 1}, "warn_at": [50]}', "warn_at must be an object"),
    ],
)
def test_bad_soft_or_warn_at_is_an_error_naming_the_field(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        Limits.from_json(text)


# -- crossing -------------------------------------------------------------------------------

def test_crossed_reports_the_highest_threshold_reached_in_one_step() -> None:
    limit = 100 * USD
    assert crossed(0, 79 * USD, limit, (80, 100)) is None
    assert crossed(79 * USD, 80 * USD, limit, (80, 100)) == 80
    assert crossed(80 * USD, 99 * USD, limit, (80, 100)) is None     # 80 already passed
    assert crossed(79 * USD, 101 * USD, limit, (80, 100)) == 100     # both: the highest says it
    assert crossed(100 * USD, 300 * USD, limit, (80, 100)) is None
    # The amount is rounded up: 80% of 1 micro-dollar is reached at 1.
    assert crossed(0, 1, 1, (80,)) == 80
    assert crossed(0, 0, 0, (80,)) is None


def test_soft_budget_never_refuses_and_warns_at_80_and_100_once_each() -> None:
    limiter, seen = limiter_with({"exp": Limits(budget_month=10 * USD, soft=("month",))})
    p = who()
    for n in range(12):
        limiter.admit(p, "claude-sonnet-4-6", T0 + n).release()
        limiter.charge(1, "alice", "exp", USD, T0 + n)
    # $12 of $10 spent and still admitted.
    limiter.admit(p, "claude-sonnet-4-6", T0 + 20).release()
    assert [(c.scope, c.window, c.threshold, c.spent_micros, c.soft) for c in seen] == [
        ("project exp", "month", 80, 8 * USD, True),
        ("project exp", "month", 100, 10 * USD, True),
    ]
    assert seen[0].limit_micros == 10 * USD and seen[0].resets_at == at("2026-04-01T00:00:00")
    line, = limiter.spend_report(T0 + 20)
    assert (line.soft, line.warn_at, line.spent_micros) == (True, (80, 100), 12 * USD)
    assert line.to_dict()["soft"] is True and line.to_dict()["warn_at"] == [80, 100]


def test_hard_budget_warns_before_it_bites_and_still_refuses() -> None:
    limiter, seen = limiter_with({"exp": Limits(budget_day=4 * USD, warn_at=(("day", (50,)),))})
    p = who()
    for n in range(4):
        limiter.admit(p, None, T0 + n).release()
        limiter.charge(1, "alice", "exp", USD, T0 + n)
    assert [(c.threshold, c.spent_micros, c.soft) for c in seen] == [(50, 2 * USD, False)]
    with pytest.raises(Refused) as info:
        limiter.admit(p, None, T0 + 5)
    assert info.value.limit == "budget_day"
    # A hard budget without thresholds says nothing.
    quiet, quiet_seen = limiter_with({"exp": Limits(budget_day=USD)})
    quiet.charge(1, "alice", "exp", 2 * USD, T0)
    assert quiet_seen == []


def test_a_soft_budget_beside_a_hard_one_refuses_only_by_the_hard_one() -> None:
    limiter, _ = limiter_with({"exp": Limits(budget_day=USD, budget_month=50 * USD, soft=("day",))})
    limiter.charge(1, "alice", "exp", 3 * USD, T0)
    limiter.admit(who(), None, T0 + 1).release()   # the day is soft: $3 of $1 passes
    limiter.charge(1, "alice", "exp", 47 * USD, T0 + 2)
    with pytest.raises(Refused) as info:
        limiter.admit(who(), None, T0 + 3)
    assert info.value.limit == "budget_month"


def test_every_scope_of_a_charge_is_watched() -> None:
    limiter = Limiter(clock=lambda: T0)
    limiter.update(ScopeLimits(
        tokens={1: Limits(budget_total=2 * USD, soft=("total",))},
        users={"alice": Limits(budget_week=4 * USD, warn_at=(("week", (25,)),))},
    ))
    seen: list[BudgetCrossing] = []
    limiter.on_crossing = seen.append
    limiter.charge(1, "alice", None, 2 * USD, T0)
    assert sorted((c.scope, c.window, c.threshold) for c in seen) == [
        ("token 1", "total", 100), ("user alice", "week", 25),
    ]
    assert next(c for c in seen if c.window == "total").resets_at is None


def test_a_new_period_warns_again() -> None:
    now = [T0]
    limiter, seen = limiter_with({"exp": Limits(budget_day=USD, soft=("day",))}, clock=lambda: now[0])
    limiter.charge(1, "alice", "exp", USD, T0)
    tomorrow = T0 + 86400
    now[0] = tomorrow
    limiter.charge(1, "alice", "exp", USD, tomorrow)
    assert [(c.threshold, c.resets_at) for c in seen] == [
        (100, at("2026-03-05T00:00:00")), (100, at("2026-03-06T00:00:00")),
    ]


def test_the_rolling_window_warns_again_once_its_spend_fell_and_rose() -> None:
    limiter, seen = limiter_with({"exp": Limits(budget_5h=USD, soft=("5h",), warn_at=(("5h", (100,)),))})
    limiter.charge(1, "alice", "exp", USD, T0)
    limiter.charge(1, "alice", "exp", USD, T0 + 60)         # still over: nothing new
    later = T0 + 5 * 3600 + 120                              # both minutes aged out
    limiter.charge(1, "alice", "exp", USD, later)
    assert [c.threshold for c in seen] == [100, 100]
    # Its reset is when the minute that holds the spend ages out.
    assert seen[1].resets_at == float((int(later // 60) + 300) * 60)


# -- restart -----------------------------------------------------------------------------------

@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = store.connect(tmp_path / "hub.db")
    yield conn
    conn.close()


def test_a_restart_does_not_repeat_thresholds_passed_before_it(db: sqlite3.Connection) -> None:
    token_id, _ = tokens.create(db, "alice", "exp")
    limits = Limits(budget_month=10 * USD, soft=("month",))
    db.execute("INSERT INTO projects (name, limits, created_at, updated_at) VALUES ('exp', ?, 0, 0)", (limits.to_json(),))
    # $8.50 spent before the restart: 80% was passed (and alerted) then.
    db.executemany(INSERT_SQL, [tuple(getattr(e, f) for f in FIELDS) for e in [
        UsageEvent(ts=T0 - 3600 * k, request_id=f"r{k}", endpoint="/v1/messages", status=200, outcome="ok",
                   total_ms=1.0, token_id=token_id, user="alice", project="exp", cost_micros=850_000 * 2)
        for k in range(5)
    ]])
    db.commit()
    restarted = Limiter(clock=lambda: T0)
    seen: list[BudgetCrossing] = []
    restarted.on_crossing = seen.append
    restarted.reload(db)
    restarted.rebuild(db, T0)
    restarted.charge(token_id, "alice", "exp", 500_000, T0)     # $9.00: 80% is behind, nothing
    assert seen == []
    restarted.charge(token_id, "alice", "exp", USD, T0 + 1)     # $10.00: 100% is news
    assert [(c.threshold, c.spent_micros) for c in seen] == [(100, 10 * USD)]


# -- the flags ----------------------------------------------------------------------------------

@pytest.fixture
def run(db: sqlite3.Connection, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    parser = build_parser()
    bodies = {scopes.run_set: scopes.set_limits, scopes.run_show: scopes.show, usage.run_usage: usage.usage}

    def go(*argv: str) -> tuple[int, str, str]:
        args = parser.parse_args(argv)
        ctx = common.Context(db, tz="UTC", now=T0)
        code = common.call(lambda a: bodies[args.run](a, ctx), args)
        out = capsys.readouterr()
        return code, out.out, out.err

    return go


def test_soft_and_warn_at_flags_apply_to_the_budgets_named_else_to_all(
    run: Callable[..., tuple[int, str, str]], db: sqlite3.Connection,
) -> None:
    code, out, _ = run("project", "set", "exp", "--budget", "month=500", "--soft")
    assert (code, out) == (0, "project exp: month $500.00 soft (warn 80,100%)\n")
    code, out, _ = run("project", "set", "exp", "--budget", "day=5", "--warn-at", "80%,50")
    assert out == "project exp: day $5.00 (warn 50,80%), month $500.00 soft (warn 80,100%)\n"
    # No --budget: every budget of the scope.
    _, out, _ = run("project", "set", "exp", "--warn-at", "90")
    assert out == "project exp: day $5.00 (warn 90%), month $500.00 soft (warn 90%)\n"
    _, out, _ = run("project", "set", "exp", "--hard", "--budget", "month=400")
    assert out == "project exp: day $5.00 (warn 90%), month $400.00 (warn 90%)\n"
    _, out, _ = run("project", "set", "exp", "--warn-at", "none", "--soft")
    assert out == "project exp: day $5.00 soft (warn 80,100%), month $400.00 soft (warn 80,100%)\n"
    # Clearing a budget takes its softness and thresholds with it.
    _, out, _ = run("project", "set", "exp", "--budget", "day=none")
    assert out == "project exp: month $400.00 soft (warn 80,100%)\n"
    assert read_limits(db, "project", "exp") == Limits(budget_month=400 * USD, soft=("month",))
    code, out, _ = run("usage", "--budgets", "--format", "json")
    (line,) = orjson.loads(out)["budgets"]
    assert (line["window"], line["soft"], line["warn_at"]) == ("month", True, [80, 100])
    code, out, _ = run("usage", "--budgets")
    assert out.splitlines()[1].split()[:5] == ["project:exp", "month", "soft", "(warn", "80,100%)"]


def test_soft_or_warn_at_without_a_budget_is_refused_before_any_write(
    run: Callable[..., tuple[int, str, str]], db: sqlite3.Connection,
) -> None:
    code, _, err = run("project", "set", "none-yet", "--soft")
    assert code == 2 and "--soft applies to budgets, and there is none: give --budget WINDOW=USD" in err
    code, _, err = run("project", "set", "none-yet", "--warn-at", "50")
    assert code == 2 and "--warn-at applies to budgets" in err
    assert db.execute("SELECT count(*) FROM projects").fetchone()[0] == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["project", "set", "x", "--soft", "--hard"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["project", "set", "x", "--warn-at", "0"])


def test_a_threshold_crossed_by_another_instances_charge_is_theirs_to_announce() -> None:
    limiter, seen = limiter_with({"exp": Limits(budget_day=10 * USD, soft=("day",))})
    limiter.charge_elsewhere(None, "alice", "exp", 9 * USD, T0)   # 90%: another instance's news
    assert seen == []
    assert limiter.spent("project", "exp", "day", T0) == 9 * USD  # counted here all the same
    limiter.charge(None, "alice", "exp", USD, T0 + 1)             # 100%, by this instance's charge
    assert [(c.scope, c.threshold) for c in seen] == [("project exp", 100)]
    assert limiter.on_crossing is not None


def test_raise_spend_moves_one_window_to_what_another_count_holds_and_announces_nothing() -> None:
    # What an instance that missed charges does with what Redis holds
    # (shared.redis_state catching up): each window on its own, never down.
    limiter, seen = limiter_with({"exp": Limits(budget_day=10 * USD, budget_month=100 * USD, soft=("day",))})
    limiter.charge(None, "alice", "exp", 2 * USD, T0)
    assert limiter.raise_spend("project", "exp", "month", 7 * USD, T0) == 5 * USD
    assert limiter.raise_spend("project", "exp", "month", 6 * USD, T0) == 0   # never lowered
    assert [limiter.spent("project", "exp", w, T0) for w in ("5h", "day", "week", "month", "total")] == [
        2 * USD, 2 * USD, 2 * USD, 7 * USD, 2 * USD]
    assert limiter.raise_spend("project", "exp", "day", 9 * USD, T0) == 7 * USD  # 90% of the soft day budget
    assert limiter.raise_spend("project", "exp", "5h", 4 * USD, T0) == 2 * USD
    assert limiter.raise_spend("project", "exp", "total", 12 * USD, T0) == 10 * USD
    assert seen == []  # the charges were another instance's to announce
    assert [limiter.spent("project", "exp", w, T0) for w in ("5h", "day", "week", "month", "total")] == [
        4 * USD, 9 * USD, 2 * USD, 7 * USD, 12 * USD]
    # This instance's next charge counts in every window from there, and
    # the threshold it crosses is its own.
    limiter.charge(None, "alice", "exp", USD, T0 + 1)
    assert [limiter.spent("project", "exp", w, T0 + 1) for w in ("5h", "day", "week", "month", "total")] == [
        5 * USD, 10 * USD, 3 * USD, 8 * USD, 13 * USD]
    assert [(c.scope, c.threshold) for c in seen] == [("project exp", 100)]
    # The day raised counts in its day only; the 5h raise ages out five
    # hours after it was made.
    assert limiter.spent("project", "exp", "day", T0 + 86400) == 0
    assert limiter.spent("project", "exp", "5h", T0 + 5 * 3600 + 120) == 0


def test_raise_spend_of_a_scope_never_charged_here_and_bad_windows() -> None:
    limiter, _ = limiter_with({})
    assert limiter.raise_spend("user", "bob", "week", 3 * USD, T0) == 3 * USD
    assert limiter.raise_spend("token", "7", "day", USD, T0) == USD
    assert limiter.spent("user", "bob", "week", T0) == 3 * USD and limiter.spent("token", 7, "day", T0) == USD
    with pytest.raises(ValueError, match="unknown budget window"):
        limiter.raise_spend("user", "bob", "year", USD, T0)
