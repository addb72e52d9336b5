"""What the Limiter tells of a principal's budgets, on a fake clock: whether
any applies (decided at admission: a principal without one gets the plain
Admission), the tightest of its token's, user's and project's, and the
budgets of one scope."""
from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hubcore.governance.limiter import Admission, BudgetedAdmission, BudgetLine, Limiter, Refused, binding_order
from hubcore.governance.limits import Limits, calendar_periods
from hubcore.governance.storage import ScopeLimits
from hubcore.governance.tokens import Principal

USD = 1_000_000
TZ = "Europe/Berlin"


def at(text: str, tz: str = TZ) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp()


T0 = at("2026-03-04T10:00:00")  # a Wednesday
DAY_END, WEEK_END, MONTH_END = at("2026-03-05T00:00:00"), at("2026-03-09T00:00:00"), at("2026-04-01T00:00:00")


def who(limits: Limits | None = None, token_id: int = 1, user: str = "alice", project: str | None = "web") -> Principal:
    return Principal(token_id=token_id, user=user, project=project, prefix="hc-test", limits=limits)


def limiter_with(token: Limits | None = None, user: Limits | None = None, project: Limits | None = None) -> Limiter:
    limiter = Limiter(TZ, clock=lambda: T0)
    limiter.update(ScopeLimits(
        tokens={1: token} if token is not None else {},
        users={"alice": user} if user is not None else {},
        projects={"web": project} if project is not None else {},
    ))
    return limiter


@pytest.mark.parametrize("limits", [None, Limits(rpm=10, concurrency=2, models=("claude-*",))],
                         ids=["no-limits", "limits-without-budget"])
def test_a_principal_without_a_budget_gets_the_plain_admission(limits: Limits | None) -> None:
    limiter = limiter_with(token=limits, user=limits)
    admission = limiter.admit(who(limits), "claude-sonnet-4-6", T0)
    assert type(admission) is Admission and admission.budget is None
    admission.release()


def test_the_tightest_budget_is_the_least_left_of_token_user_and_project() -> None:
    token, user, project = Limits(budget_day=5 * USD), Limits(budget_week=3 * USD), Limits(budget_month=4 * USD)
    limiter = limiter_with(token, user, project)
    admission = limiter.admit(who(token), None, T0)
    assert isinstance(admission, BudgetedAdmission) and admission.budget is not None
    view = admission.budget
    assert view.tightest(T0) == BudgetLine("user", "alice", "week", 3 * USD, 0, WEEK_END)
    # Spend by another token of the project: the project's month now has least left.
    limiter.charge(2, "bob", "web", int(3.5 * USD), T0)
    assert view.tightest(T0) == BudgetLine("project", "web", "month", 4 * USD, int(3.5 * USD), MONTH_END)
    # Nothing left of the week or the month: the month binds longer.
    limiter.charge(1, "alice", "web", int(4.9 * USD), T0)
    assert view.tightest(T0) == BudgetLine("project", "web", "month", 4 * USD, int(8.4 * USD), MONTH_END)
    assert [(line.window, line.remaining_micros) for line in view.lines(T0)] == [
        ("day", 100_000), ("week", 0), ("month", 0),
    ]
    # The next day the day's budget starts over; the week's and month's spend hold.
    assert [(line.window, line.remaining_micros) for line in view.lines(DAY_END + 1)] == [
        ("day", 5 * USD), ("week", 0), ("month", 0),
    ]
    admission.release()


def test_of_as_little_left_the_budget_that_binds_longest_is_named() -> None:
    day = BudgetLine("token", "1", "day", 2 * USD, USD, DAY_END)
    month = BudgetLine("user", "alice", "month", 9 * USD, 8 * USD, MONTH_END)
    total = BudgetLine("project", "web", "total", 3 * USD, 2 * USD, None)
    empty_5h = BudgetLine("token", "1", "5h", USD, 0, None)
    assert min([day, month], key=binding_order) is month
    assert min([day, month, total], key=binding_order) is total
    # A 5-hour window with nothing in it has no reset, and binds least.
    assert min([empty_5h, BudgetLine("token", "1", "day", USD, 0, DAY_END)], key=binding_order).window == "day"
    # A zero budget never lifts.
    zero = BudgetLine("token", "1", "day", 0, 0, None)
    assert min([zero, BudgetLine("user", "alice", "month", 5, 5, MONTH_END)], key=binding_order) is zero


def test_a_refusal_carries_the_budgets_when_one_applies() -> None:
    limiter = limiter_with(token=Limits(rpm=1, budget_month=10 * USD))
    p = who(Limits(rpm=1, budget_month=10 * USD))
    limiter.admit(p, None, T0).release()
    with pytest.raises(Refused) as throttled:
        limiter.admit(p, None, T0 + 1)
    assert throttled.value.budget is not None
    assert throttled.value.budget.tightest(T0) == BudgetLine("token", "1", "month", 10 * USD, 0, MONTH_END)
    plain = limiter_with(token=Limits(rpm=1))
    plain.admit(who(Limits(rpm=1)), None, T0).release()
    with pytest.raises(Refused) as bare:
        plain.admit(who(Limits(rpm=1)), None, T0 + 1)
    assert bare.value.budget is None


def test_one_scopes_budgets_are_what_the_report_shows_of_it() -> None:
    token = Limits(budget_5h=USD, budget_day=2 * USD, rpm=3)
    limiter = limiter_with(token, Limits(budget_total=9 * USD), Limits(concurrency=2))
    limiter.charge(1, "alice", "web", 700_000, T0 - 3600)
    limiter.charge(1, "alice", "web", 100_000, T0 - 86400)
    for kind, name in (("token", "1"), ("user", "alice"), ("project", "web"), ("user", "nobody")):
        assert limiter.scope_budgets(kind, name, T0) == limiter.spend_report(T0, (kind, name)), (kind, name)
    assert [line.spent_micros for line in limiter.scope_budgets("token", 1, T0)] == [700_000, 700_000]
    assert limiter.scope_limits("token", 1) == token and limiter.scope_limits("project", "none") is None
    assert limiter.periods(T0) == calendar_periods(T0, ZoneInfo(TZ))
    with pytest.raises(ValueError, match="unknown scope kind 'team'"):
        limiter.scope_limits("team", "x")


WINDOW_LIMITS = st.sampled_from([None, 0, 1, 500_000, 2 * USD, 3 * USD])


@st.composite
def scope_limits(draw: st.DrawFn) -> Limits | None:
    values = {window: draw(WINDOW_LIMITS) for window in ("5h", "day", "week", "month", "total")}
    if all(v is None for v in values.values()):
        return None
    return Limits(**{"budget_" + w: v for w, v in values.items()})


@settings(max_examples=300, deadline=None)
@given(
    token=scope_limits(), user=scope_limits(), project=scope_limits(),
    charges=st.lists(st.tuples(st.sampled_from([1, 2]), st.integers(0, 2 * USD), st.floats(-40 * 86400, 0)), max_size=12),
    later=st.floats(0, 10 * 86400),
)
def test_the_tightest_is_the_least_of_the_lines_in_binding_order(
    token: Limits | None, user: Limits | None, project: Limits | None,
    charges: list[tuple[int, int, float]], later: float,
) -> None:
    """tightest() takes a shortcut past the budget lines; it must name the
    one min(lines, binding_order) names, whatever was spent when."""
    limiter = limiter_with(token, user, project)
    for token_id, cost, offset in sorted(charges, key=lambda c: c[2]):
        limiter.charge(token_id, "alice", "web", cost, T0 + offset)
    try:
        admission = limiter.admit(who(token), None, T0)
    except Refused as refused:
        view = refused.budget
    else:
        view = admission.budget
        admission.release()
    if token is None and user is None and project is None:
        assert view is None
        return
    assert view is not None
    for now in (T0, T0 + later):
        assert view.tightest(now) == min(view.lines(now), key=binding_order)
