"""The Limiter's request path, both twins (hubcore.governance._admit,
compiled, and _admit_py): the same limiters driven through the same
sequences of admissions, releases, charges (late ones too), spend resets
and time give the same refusals, counters, spend and threshold crossings.
tests/governance/test_limits.py and the rest hold the Limiter's behaviour
on whichever twin the run selects.

Each twin gets a Limiter of its own: hubcore.governance.limiter loaded
again with hubcore.governance.admit standing for that twin."""
from __future__ import annotations

from dataclasses import astuple
from collections.abc import Iterator
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hubcore.governance import _admit_py, admit
from hubcore.governance.limits import Limits
from hubcore.governance.storage import ScopeLimits
from hubcore.governance.tokens import Principal
from tests.governance.test_limits import T0
from tests.http.twins import (
    NO_EXTENSIONS, both, check_compiled_loaded, check_no_extensions_selects_pure, module_on_twin, twin_of,
)

USD = 1_000_000


def limiter_of(twin: ModuleType, clock: list[float]) -> Any:
    module = module_on_twin("hubcore.governance.limiter", "hubcore.governance.admit", twin,
                            ["Admission", "LimiterCore", "_Scope"])
    return module.Limiter("Europe/Paris", clock=lambda: clock[0])


@pytest.fixture(scope="module", params=["c", "py"])
def twin(request: pytest.FixtureRequest) -> ModuleType:
    return twin_of(request.param, "hubcore.governance._admit", _admit_py)


def twins() -> list[ModuleType]:
    return both("hubcore.governance._admit", _admit_py)


def test_compiled_twin_loaded() -> None:
    check_compiled_loaded(admit, [admit.Admission, admit.LimiterCore, admit._Scope],
                          "hubcore.governance._admit", "hubcore.governance._admit_py")


def test_no_extensions_selects_pure_twin() -> None:
    check_no_extensions_selects_pure("hubcore.governance.admit", "LimiterCore", "hubcore.governance._admit_py")


def test_the_limiter_runs_on_the_twin(twin: ModuleType) -> None:
    clock = [T0]
    limiter = limiter_of(twin, clock)
    principal = Principal(token_id=1, user="alice", project="proj", prefix="hc-test")
    admission = limiter.admit(principal, "claude-opus-4-6", T0)
    assert type(admission) is twin.Admission and admission.budget is None and not admission.released
    assert [limiter.in_flight(kind, name) for kind, name in SCOPES] == [1, 1, 1, 0, 0]
    admission.release()
    admission.release()  # idempotent
    assert admission.released
    assert [limiter.in_flight(kind, name) for kind, name in SCOPES] == [0, 0, 0, 0, 0]
    assert not limiter.needs_model(principal)
    limiter.charge(1, "alice", "proj", 1234, T0)
    assert [limiter.spent(kind, name, "day") for kind, name in SCOPES] == [1234, 1234, 1234, 0, 0]


def test_a_budgeted_admission_is_the_subclass(twin: ModuleType) -> None:
    limiter = limiter_of(twin, [T0])
    principal = Principal(token_id=1, user="alice", project=None, prefix="hc-test", limits=Limits(budget_day=USD))
    admission = limiter.admit(principal, None, T0)
    assert isinstance(admission, twin.Admission) and admission.budget is not None
    assert admission.budget.tightest(T0).limit_micros == USD
    admission.release()
    assert limiter.in_flight("token", 1) == 0


PRINCIPALS = (
    Principal(token_id=1, user="alice", project="proj", prefix="hc-test"),
    Principal(token_id=2, user="bob", project=None, prefix="hc-test",
              limits=Limits(rpm=3, concurrency=2, budget_day=5 * USD, models=("claude-sonnet-*",))),
    Principal(token_id=3, user="alice", project=None, prefix="hc-test"),
    Principal(token_id=4, user="carol", project="proj", prefix="hc-test",
              limits=Limits(budget_5h=2 * USD, budget_total=10 * USD, soft=("total",),
                            warn_at=(("5h", (50, 90)),))),
)
SCOPES = (("token", 1), ("user", "alice"), ("project", "proj"), ("token", 2), ("user", "bob"))
DEFINED = ScopeLimits(
    users={"alice": Limits(budget_week=3 * USD, warn_at=(("week", (25, 75)),))},
    projects={"proj": Limits(concurrency=3, budget_month=20 * USD)},
)
WINDOWS = ("5h", "day", "week", "month", "total")

STEP = st.one_of(
    st.tuples(st.just("admit"), st.integers(0, len(PRINCIPALS) - 1),
              st.sampled_from([None, "claude-sonnet-4-6", "claude-opus-4-6"]), st.booleans()),
    st.tuples(st.just("release"), st.integers(0, 99)),
    # A charge: whose, how much, how long before now the request arrived.
    st.tuples(st.just("charge"), st.integers(0, len(PRINCIPALS) - 1),
              st.sampled_from([0, 1, 7, 250_000, USD, 3 * USD]), st.sampled_from([0.0, 0.5, 59.0, 3600.0, 86400.0])),
    st.tuples(st.just("tick"), st.sampled_from([0.25, 1.0, 30.0, 61.0, 1800.0, 5 * 3600.0, 86400.0, 7 * 86400.0])),
    st.tuples(st.just("reset"), st.sampled_from(SCOPES), st.sampled_from(WINDOWS), st.sampled_from([0.0, 30.0, 7200.0])),
)


def run(twin: ModuleType, steps: list[tuple[Any, ...]], defined: bool) -> Iterator[Any]:
    """What each step gives on `twin`'s Limiter, as plain values."""
    clock = [T0]
    limiter = limiter_of(twin, clock)
    crossings: list[Any] = []
    limiter.on_crossing = crossings.append
    if defined:
        limiter.update(DEFINED)
    held: list[Any] = []
    for what, *args in steps:
        now = clock[0]
        if what == "admit":
            index, model, required = args
            principal = PRINCIPALS[index]
            needs = limiter.needs_model(principal)
            try:
                admission = limiter.admit(principal, model, now, model_required=required)
            except Exception as refused:
                yield what, needs, type(refused).__name__, vars(refused).copy() | {"budget": None}
            else:
                held.append(admission)
                budget = admission.budget
                yield what, needs, None if budget is None else astuple(budget.tightest(now))
        elif what == "release":
            if held:
                held[args[0] % len(held)].release()
        elif what == "charge":
            index, cost, ago = args
            principal = PRINCIPALS[index]
            limiter.charge(principal.token_id, principal.user, principal.project, cost, now - ago)
        elif what == "tick":
            clock[0] += args[0]
        else:
            (kind, name), window, ago = args
            limiter.reset_spend(kind, name, window, now - ago, now)
        yield ("state", [limiter.in_flight(kind, name) for kind, name in SCOPES],
               [limiter.spent(kind, name, window, clock[0]) for kind, name in SCOPES for window in WINDOWS],
               # Each module's own dataclasses: compared as tuples.
               [astuple(line) for line in limiter.spend_report(clock[0])], [astuple(c) for c in crossings])


@pytest.mark.skipif(NO_EXTENSIONS, reason="one twin in this run (HUBCORE_NO_EXTENSIONS)")
@settings(max_examples=200, deadline=None)
@given(steps=st.lists(STEP, min_size=5, max_size=60), defined=st.booleans())
def test_both_twins_give_the_same_refusals_counters_and_spend(steps: list[tuple[Any, ...]], defined: bool) -> None:
    compiled, pure = twins()
    assert list(run(compiled, steps, defined)) == list(run(pure, steps, defined))


@pytest.mark.parametrize("ts", [T0, T0 + 59.999999, 1_767_225_599.9999999, 1_767_225_600.0, 0.0, 59.99999999999999])
def test_a_charge_lands_in_the_minute_python_floors_it_to(twin: ModuleType, ts: float) -> None:
    limiter = limiter_of(twin, [ts])
    limiter.charge(1, None, None, 5, ts)
    scope = limiter._tokens[1]
    assert list(scope.buckets) == [[int(ts // 60), 5]]


def test_a_principal_is_read_by_its_fields_whatever_its_class(twin: ModuleType) -> None:
    """The compiled twin reads an exact Principal's fields, and the stored
    limits' users and projects, from their slots (hubcore/_slots.pxd); a
    subclass or a stand-in with the same fields is read by name to the same
    admission, and a field that is unset raises as reading it does."""

    class Caller(Principal):
        __slots__ = ("note",)

    fields = dict(token_id=4, user="alice", project="proj", prefix="hc-test", limits=Limits(models=("claude-*",)))
    results = []
    callers = (Principal(**fields), Caller(**fields), SimpleNamespace(**fields, groups=None))  # type: ignore[arg-type]
    for principal in callers:
        limiter = limiter_of(twin, [T0])
        limiter.update(DEFINED)
        admission = limiter.admit(principal, "claude-opus-4-6", T0)
        results.append((limiter.needs_model(principal), [limiter.in_flight(kind, name) for kind, name in SCOPES],
                        limiter.in_flight("token", 4), admission.budget.tightest(T0).limit_micros))
    assert results[0] == (True, [0, 1, 1, 0, 0], 1, 3 * USD)
    assert results == [results[0]] * 3
    unset = Principal(**fields)  # type: ignore[arg-type]
    object.__delattr__(unset, "project")
    with pytest.raises(AttributeError, match="project"):
        limiter_of(twin, [T0]).admit(unset, None, T0)
