"""The key ring's common path, both twins (hubcore.routing._lease, compiled,
and _lease_py): the same rings driven through the same sequences of
acquires, answers, releases and time give the same leases, states and
counters. tests/routing/test_keys.py and the rest hold the ring's behaviour
on whichever twin the run selects.

Each twin gets a KeyRing of its own: hubcore.routing.keys loaded again with
hubcore.routing.lease standing for that twin."""
from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hubcore.routing import _lease_py, lease
from hubcore.routing.failures import Failure, FailureKind
from tests.http.twins import (
    NO_EXTENSIONS, both, check_compiled_loaded, check_no_extensions_selects_pure, module_on_twin, twin_of,
)
from tests.routing.test_keys import FakeClock, spec

LABELS = ("a", "b", "c")
CLASSES = ("", "opus", "sonnet")
FAILURES: tuple[Failure | None, ...] = (
    None,
    None,
    None,
    Failure(FailureKind.RATE_LIMITED, 429, 3.0),
    Failure(FailureKind.RATE_LIMITED, 429, None),
    Failure(FailureKind.SERVER_ERROR, 500),
    Failure(FailureKind.CONNECT_FAILED),
    Failure(FailureKind.AUTH_FAILED, 401),
    Failure(FailureKind.CLIENT_ABORTED),
    Failure(FailureKind.TRANSIENT, 409),
)


def ring_of(twin: ModuleType, specs: list[Any], clock: FakeClock, **policy: Any) -> Any:
    keys = module_on_twin("hubcore.routing.keys", "hubcore.routing.lease", twin,
                          ["Lease", "RingCore", "_Key", "pick", "wake"])
    return keys.KeyRing("anthropic", specs, keys.KeyPolicy(**policy), clock=clock, wall_clock=clock.wall)


@pytest.fixture(scope="module", params=["c", "py"])
def twin(request: pytest.FixtureRequest) -> ModuleType:
    return twin_of(request.param, "hubcore.routing._lease", _lease_py)


def twins() -> list[ModuleType]:
    return both("hubcore.routing._lease", _lease_py)


def test_compiled_twin_loaded() -> None:
    check_compiled_loaded(lease, [lease.Lease, lease.RingCore, lease._Key],
                          "hubcore.routing._lease", "hubcore.routing._lease_py")


def test_no_extensions_selects_pure_twin() -> None:
    check_no_extensions_selects_pure("hubcore.routing.lease", "RingCore", "hubcore.routing._lease_py")


def test_the_ring_runs_on_the_twin(twin: ModuleType) -> None:
    clock = FakeClock()
    ring = ring_of(twin, [spec("a"), spec("b")], clock)
    got = ring.acquire("s1", model_class="opus")
    assert type(got) is twin.Lease and got.label in ("a", "b") and got.model_class == "opus"
    assert got.probe is False and got.released is False
    ring.release(got)
    assert got.released is True
    with pytest.raises(RuntimeError, match="released twice"):
        ring.release(got)
    assert ring.in_flight == 0


def test_a_session_keeps_its_key_on_the_fast_path(twin: ModuleType) -> None:
    clock = FakeClock()
    ring = ring_of(twin, [spec("a"), spec("b")], clock)
    first = ring.acquire("s1")
    for _ in range(5):
        again = ring.acquire("s1")
        assert again.label == first.label
        ring.release(again)
    assert {row["label"]: row["requests"] for row in ring.snapshot()}[first.label] == 6


def headers(remaining: int) -> dict[bytes, bytes]:
    return {
        b"x-ratelimit-limit-requests": b"100",
        b"x-ratelimit-remaining-requests": str(remaining).encode(),
        b"x-ratelimit-reset-requests": b"30s",
    }


# One step: what, and what it is done with. A session (or none), the keys
# tried, the model class, and whether it fails over from an earlier lease
# (its index) with a reason.
ACQUIRE = st.tuples(st.just("acquire"), st.sampled_from([None, "s1", "s2", "s3", "s4"]),
                    st.frozensets(st.sampled_from(LABELS), max_size=2), st.sampled_from(CLASSES),
                    st.one_of(st.none(), st.tuples(st.integers(0, 99), st.sampled_from(FAILURES))))
RELEASE = st.tuples(st.just("release"), st.integers(0, 99), st.sampled_from(FAILURES))
STEP = st.one_of(
    ACQUIRE, ACQUIRE, ACQUIRE, RELEASE, RELEASE,
    st.tuples(st.just("observe"), st.integers(0, 99), st.integers(0, 100), st.sampled_from((None, *CLASSES))),
    st.tuples(st.just("tick"), st.floats(0.0, 12.0)),
    st.tuples(st.just("probes")),
)


def run(twin: ModuleType, specs: list[Any], steps: list[tuple[Any, ...]], policy: dict[str, Any]) -> Iterator[Any]:
    """What each step gives on `twin`'s ring, as plain values."""
    clock = FakeClock()
    ring = ring_of(twin, specs, clock, **policy)
    leases: list[Any] = []
    for what, *args in steps:
        if what == "acquire":
            session, tried, model_class, failover = args
            previous, reason = (None, None) if failover is None or not leases else (
                leases[failover[0] % len(leases)], failover[1])
            got = ring.acquire(session, tried, reason, previous, model_class=model_class)
            if got is not None:
                leases.append(got)
            yield what, None if got is None else (got.label, got.model_class, got.probe)
        elif what == "release":
            open_leases = [held for held in leases if not held.released]
            if open_leases:
                held = open_leases[args[0] % len(open_leases)]
                ring.release(held, args[1])
                yield what, held.label
        elif what == "observe":
            if leases:
                held = leases[args[0] % len(leases)]
                ring.observe(held, headers(args[1]), args[2])
                yield what, held.label
        elif what == "tick":
            clock.advance(args[0])
        else:
            probes = ring.take_probes()
            leases += probes
            yield what, [held.label for held in probes]
        yield "state", ring.states(), ring.snapshot(), ring.session_count()


@pytest.mark.skipif(NO_EXTENSIONS, reason="one twin in this run (HUBCORE_NO_EXTENSIONS)")
@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(STEP, min_size=10, max_size=80),
    n_keys=st.integers(1, 3),
    weights=st.lists(st.integers(1, 3), min_size=3, max_size=3),
    priorities=st.lists(st.integers(0, 1), min_size=3, max_size=3),
    org=st.booleans(),
    floor=st.sampled_from([0.0, 0.2, 0.6]),
    cool_whole_org=st.booleans(),
)
def test_both_twins_give_the_same_leases_states_and_counters(
    steps: list[tuple[Any, ...]], n_keys: int, weights: list[int], priorities: list[int],
    org: bool, floor: float, cool_whole_org: bool,
) -> None:
    specs = [
        spec(LABELS[i], weight=weights[i], priority=priorities[i], org="o1" if org and i < 2 else None,
             workspace="w1" if i != 1 else None)
        for i in range(n_keys)
    ]
    policy = {"headroom_read_interval": 0.5, "headroom_floor": floor, "cool_whole_org": cool_whole_org,
              "circuit_threshold": 2, "affinity_max_sessions": 3}
    compiled, pure = twins()
    assert list(run(compiled, specs, steps, policy)) == list(run(pure, specs, steps, policy))
