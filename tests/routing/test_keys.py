"""The key ring: selection, affinity, cooling, the circuit breaker, waiting
for a key, reloads (what answers say: test_failures.py); a fake clock except
where asyncio timers are the thing under test."""
from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Iterable
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hubcore.routing.failures import Failure, FailureKind, classify
from hubcore.routing.keys import KeyPolicy, KeyRing, KeySpec, KeyState, Lease

WALL_START = 1_767_225_600.0  # 2026-01-01T00:00:00Z

SERVER_ERROR = Failure(FailureKind.SERVER_ERROR, 500)
OVERLOADED = Failure(FailureKind.OVERLOADED, 529)
CONNECT_FAILED = Failure(FailureKind.CONNECT_FAILED)
TIMEOUT = Failure(FailureKind.TIMEOUT)
AUTH_FAILED = Failure(FailureKind.AUTH_FAILED, 401)
CLIENT_ABORTED = Failure(FailureKind.CLIENT_ABORTED)
CONFLICT = Failure(FailureKind.TRANSIENT, 409)
STREAM_BROKEN = Failure(FailureKind.STREAM_BROKEN)


def rate_limited(cooldown: float | None = None) -> Failure:
    return Failure(FailureKind.RATE_LIMITED, 429, cooldown)


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.start = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def wall(self) -> float:
        return WALL_START + (self.now - self.start)


def spec(label: str, **kw: Any) -> KeySpec:
    return KeySpec(secret=f"sk-ant-secret-{label}", label=label, **kw)


def make_ring(specs: Iterable[KeySpec], clock: FakeClock | None = None, **policy: Any) -> tuple[KeyRing, FakeClock]:
    clock = clock or FakeClock()
    # Every answer read, unless a test says otherwise: their clock stands still.
    policy.setdefault("headroom_read_interval", 0.0)
    ring = KeyRing("anthropic", list(specs), KeyPolicy(**policy), clock=clock, wall_clock=clock.wall)
    return ring, clock


def states(ring: KeyRing) -> dict[str, str]:
    return {row["label"]: row["state"] for row in ring.snapshot()}


def row(ring: KeyRing, label: str) -> dict[str, Any]:
    return next(r for r in ring.snapshot() if r["label"] == label)


def use(ring: KeyRing, session: str | None = None, failure: Failure | None = None, **kw: Any) -> str:
    """Acquire and release at once; the label used."""
    lease = ring.acquire(session, **kw)
    assert lease is not None
    ring.release(lease, failure)
    return lease.label


def probe(ring: KeyRing, failure: Failure | None = None) -> str:
    """The hub's probe of the one key due for it, released with `failure`; its label."""
    (lease,) = ring.take_probes()
    assert lease.probe and states(ring)[lease.label] == "probing"
    ring.release(lease, failure)
    return lease.label


def fail_until_open(ring: KeyRing, label: str, threshold: int) -> None:
    for _ in range(threshold):
        lease = ring.acquire(tried=frozenset(ring.labels) - {label})
        assert lease is not None and lease.label == label
        ring.release(lease, SERVER_ERROR)
    assert states(ring)[label] == "open"


# -- selection -----------------------------------------------------------------


def test_best_priority_tier_only_while_it_has_a_usable_key() -> None:
    ring, _ = make_ring([spec("backup", priority=1, weight=100), spec("main", priority=0)])
    assert {use(ring) for _ in range(20)} == {"main"}
    lease = ring.acquire()
    assert lease is not None
    ring.release(lease, AUTH_FAILED)
    assert {use(ring) for _ in range(5)} == {"backup"}


def test_weights_split_1000_sequential_acquires_exactly_and_smoothly() -> None:
    ring, _ = make_ring([spec("a", weight=5), spec("b", weight=3), spec("c", weight=2)])
    picks = [use(ring) for _ in range(1000)]
    assert Counter(picks) == {"a": 500, "b": 300, "c": 200}
    # Smooth: every run of 10 (the total weight) holds each key by its weight.
    for start in range(0, 1000, 10):
        assert Counter(picks[start : start + 10]) == {"a": 5, "b": 3, "c": 2}


def test_weights_split_concurrent_leases_by_weight() -> None:
    ring, _ = make_ring([spec("a", weight=3), spec("b", weight=1)])
    leases = [ring.acquire() for _ in range(400)]
    assert Counter(lease.label for lease in leases if lease) == {"a": 300, "b": 100}


def test_least_in_flight_wins_over_round_robin() -> None:
    ring, _ = make_ring([spec("a"), spec("b"), spec("c")])
    held = {label: ring.acquire() for label in ("x", "y", "z")}
    assert {lease.label for lease in held.values() if lease} == {"a", "b", "c"}
    freed = held["y"]
    assert freed is not None
    ring.release(freed)
    # Round-robin alone would come back to "a"; the idle key wins.
    assert use(ring) == freed.label


def test_least_in_flight_is_per_unit_of_weight() -> None:
    ring, _ = make_ring([spec("big", weight=4), spec("small", weight=1)])
    small = ring.acquire(tried=frozenset({"big"}))
    big = [ring.acquire(tried=frozenset({"small"})) for _ in range(3)]
    assert small is not None and small.label == "small" and all(b is not None for b in big)
    # 3 in flight on weight 4 is lighter than 1 on weight 1.
    assert use(ring) == "big"


def test_no_usable_key_gives_none() -> None:
    ring, _ = make_ring([spec("a"), spec("b")])
    assert ring.acquire(tried=frozenset({"a", "b"})) is None
    assert make_ring([])[0].acquire() is None


# -- cooling ------------------------------------------------------------------------


def test_429_cools_the_key_until_retry_after_then_it_returns() -> None:
    ring, clock = make_ring([spec("a"), spec("b", priority=1)])
    lease = ring.acquire()
    assert lease is not None and lease.label == "a"
    ring.release(lease, classify(429, [(b"retry-after", b"7")], wall_now=clock.wall()))
    a = row(ring, "a")
    assert a["state"] == "cooling" and a["rate_limited"] == 1 and a["last_error"] == "429 rate limited"
    assert a["until"] == pytest.approx(clock.wall() + 7)
    clock.advance(6.75)
    assert use(ring) == "b"
    clock.advance(0.25 - 1 / 1024)  # binary fractions: exact arithmetic at the edge
    assert use(ring) == "b"
    clock.advance(1 / 1024)
    assert use(ring) == "a"
    assert row(ring, "a")["until"] is None


def test_429_without_headers_cools_for_the_default() -> None:
    ring, clock = make_ring([spec("a")], cooldown_default=4.0)
    lease = ring.acquire()
    assert lease is not None
    ring.release(lease, classify(429, []))
    assert ring.next_available_in() == pytest.approx(4.0)
    clock.advance(3.5)
    assert ring.acquire() is None
    clock.advance(0.5)
    assert ring.acquire() is not None


def test_a_later_429_lengthens_a_rest_and_a_late_success_does_not_end_it() -> None:
    ring, clock = make_ring([spec("a")])
    first, second, third = ring.acquire(), ring.acquire(), ring.acquire()
    assert first and second and third
    ring.release(first, rate_limited(10))
    ring.release(second, rate_limited(3))
    ring.release(third)
    assert states(ring) == {"a": "cooling"}
    assert ring.next_available_in() == pytest.approx(10)


def test_org_wide_cooling_only_when_configured() -> None:
    keys = [spec("a1", org="x"), spec("a2", org="x"), spec("b1", org="y")]
    for cool_whole_org, expected in ((False, "healthy"), (True, "cooling")):
        ring, _ = make_ring(keys, cool_whole_org=cool_whole_org)
        lease = ring.acquire(tried=frozenset({"a2", "b1"}))
        assert lease is not None
        ring.release(lease, rate_limited(5))
        assert states(ring) == {"a1": "cooling", "a2": expected, "b1": "healthy"}
        assert row(ring, "a2")["rate_limited"] == 0


def test_org_wide_cooling_lengthens_rests_and_holds_back_probes() -> None:
    keys = [spec("a1", org="x"), spec("a2", org="x"), spec("a3", org="x"), spec("b1", org="y")]
    ring, clock = make_ring(keys, cool_whole_org=True, circuit_threshold=1, circuit_pause=1.0)
    org_x = frozenset({"a1", "a2", "a3"})
    held = ring.acquire(tried=frozenset({"a2", "a3", "b1"}))
    use(ring, tried=frozenset({"a1", "a2", "b1"}), failure=SERVER_ERROR)
    clock.advance(1.0)
    assert states(ring)["a3"] == "half_open"
    # The org is out of capacity: the half-open key waits for it before probing.
    use(ring, tried=frozenset({"a1", "a3", "b1"}), failure=rate_limited(2))
    assert states(ring) == {"a1": "cooling", "a2": "cooling", "a3": "open", "b1": "healthy"}
    clock.advance(1.0)
    # A later, longer 429 lengthens every rest in the org.
    assert held is not None
    ring.release(held, rate_limited(10))
    assert {r["label"]: r["until"] for r in ring.snapshot()} == {
        "a1": pytest.approx(clock.wall() + 10),
        "a2": pytest.approx(clock.wall() + 10),
        "a3": pytest.approx(clock.wall() + 10),
        "b1": None,
    }
    clock.advance(10 - 1 / 1024)
    assert ring.acquire(tried=frozenset({"b1"})) is None
    clock.advance(1 / 1024)
    assert states(ring) == {"a1": "healthy", "a2": "healthy", "a3": "half_open", "b1": "healthy"}
    assert probe(ring) == "a3"
    assert {use(ring, tried=frozenset({"b1"}) | org_x - {label}) for label in org_x} == org_x


# -- circuit breaker -------------------------------------------------------------------


def test_circuit_opens_after_n_consecutive_failures() -> None:
    ring, clock = make_ring([spec("a")], circuit_threshold=3, circuit_pause=2.0)
    for failure in (SERVER_ERROR, OVERLOADED):
        use(ring, failure=failure)
    use(ring)  # a success in between: the count starts again
    for failure in (CONNECT_FAILED, TIMEOUT):
        use(ring, failure=failure)
    assert states(ring) == {"a": "healthy"} and row(ring, "a")["consecutive_failures"] == 2
    use(ring, failure=SERVER_ERROR)
    a = row(ring, "a")
    assert a["state"] == "open" and a["consecutive_failures"] == 3 and a["errors"] == 5
    assert a["last_error"] == "500 server error"
    assert ring.acquire() is None and ring.take_probes() == []
    assert ring.next_probe_in() == pytest.approx(2.0)


def test_neutral_outcomes_do_not_count_towards_the_circuit() -> None:
    ring, _ = make_ring([spec("a")], circuit_threshold=2)
    use(ring, failure=SERVER_ERROR)
    use(ring, failure=CLIENT_ABORTED)
    assert row(ring, "a")["consecutive_failures"] == 1
    use(ring, failure=CONFLICT)  # the vendor answered: the key works
    assert row(ring, "a")["consecutive_failures"] == 0
    use(ring, failure=SERVER_ERROR)
    assert states(ring) == {"a": "healthy"}


def test_only_the_hubs_probe_closes_a_circuit_and_users_never_probe() -> None:
    ring, clock = make_ring([spec("a")], circuit_threshold=1, circuit_pause=2.0)
    use(ring, failure=SERVER_ERROR)
    clock.advance(1.75)
    assert ring.take_probes() == [] and ring.acquire() is None
    clock.advance(0.25)
    assert states(ring) == {"a": "half_open"} and ring.next_probe_in() == 0.0
    # Due for the hub's probe, the key still serves no user.
    assert ring.acquire() is None and ring.acquire("s1") is None
    (lease,) = ring.take_probes()
    assert lease.probe and states(ring) == {"a": "probing"}
    assert row(ring, "a")["in_flight"] == 1 and row(ring, "a")["requests"] == 2
    # Exactly one probe; meanwhile nothing for users, nor for the prober.
    assert ring.take_probes() == [] and ring.acquire() is None
    assert ring.next_probe_in() is None and ring.next_probe_in(pending=True) == 0.0
    # A probe that gave no verdict (cancelled) leaves it due.
    ring.release(lease, CLIENT_ABORTED)
    assert states(ring) == {"a": "half_open"}
    assert probe(ring) == "a"
    assert states(ring) == {"a": "healthy"} and row(ring, "a")["in_flight"] == 0
    lease = ring.acquire()
    assert lease is not None and not lease.probe


def test_failed_probes_double_the_pause_up_to_the_cap() -> None:
    ring, clock = make_ring([spec("a")], circuit_threshold=2, circuit_pause=1.0, circuit_pause_max=3.0)
    use(ring, failure=SERVER_ERROR)
    use(ring, failure=OVERLOADED)
    for pause in (1.0, 2.0, 3.0, 3.0):
        assert ring.next_probe_in() == pytest.approx(pause)
        clock.advance(pause)
        assert probe(ring, OVERLOADED) == "a"
        assert states(ring) == {"a": "open"}
    assert row(ring, "a")["consecutive_failures"] == 6


def test_a_key_the_probe_closed_is_on_probation_until_a_user_succeeds() -> None:
    ring, clock = make_ring([spec("a"), spec("b")], circuit_threshold=3, circuit_pause=1.0)
    fail_until_open(ring, "a", 3)
    clock.advance(1.0)
    probe(ring)
    # A list of models came back, which proves less than a message would:
    # one more failure reopens the circuit, for twice as long.
    assert states(ring)["a"] == "healthy" and row(ring, "a")["consecutive_failures"] == 2
    use(ring, tried=frozenset({"b"}), failure=SERVER_ERROR)
    assert states(ring)["a"] == "open" and ring.next_probe_in() == pytest.approx(2.0)
    clock.advance(2.0)
    probe(ring)
    # A user's success ends the probation and forgets the backoff.
    use(ring, tried=frozenset({"b"}))
    assert row(ring, "a")["consecutive_failures"] == 0
    use(ring, tried=frozenset({"b"}), failure=SERVER_ERROR)
    assert states(ring)["a"] == "healthy"
    fail_until_open(ring, "a", 2)
    assert ring.next_probe_in() == pytest.approx(1.0)


def test_an_unreachable_vendor_is_probed_soon_and_an_erring_one_later() -> None:
    ring, clock = make_ring(
        [spec("a")], circuit_threshold=1, circuit_pause=5.0, circuit_pause_max=60.0,
        circuit_probe_pause=0.25, circuit_probe_pause_max=1.0,
    )
    use(ring, failure=CONNECT_FAILED)
    pause = 0.25
    for failure, then in ((TIMEOUT, 0.5), (CONNECT_FAILED, 1.0), (TIMEOUT, 1.0)):
        assert ring.next_probe_in() == pytest.approx(pause)
        clock.advance(pause)
        probe(ring, failure)
        pause = then
    # The vendor answers again, with errors: the long pauses from here on.
    for failure, then in ((SERVER_ERROR, 5.0), (OVERLOADED, 10.0), (CONNECT_FAILED, 1.0)):
        assert ring.next_probe_in() == pytest.approx(pause)
        clock.advance(pause)
        probe(ring, failure)
        pause = then
    assert ring.next_probe_in() == pytest.approx(1.0)
    # A stream that broke in front of a user is a vendor erring: the long pause.
    ring, clock = make_ring([spec("a")], circuit_threshold=1, circuit_pause=5.0, circuit_probe_pause=0.25)
    use(ring, failure=STREAM_BROKEN)
    assert row(ring, "a")["last_error"] == "stream broken"
    assert ring.next_probe_in() == pytest.approx(5.0)


def test_open_circuits_are_not_waited_for_resting_keys_are() -> None:
    ring, clock = make_ring([spec("a"), spec("b"), spec("c")], circuit_threshold=1, circuit_pause=1.0)
    use(ring, tried=frozenset({"b", "c"}), failure=rate_limited(3))
    use(ring, tried=frozenset({"a", "c"}), failure=SERVER_ERROR)
    use(ring, tried=frozenset({"a", "b"}), failure=AUTH_FAILED)
    assert ring.acquire() is None
    # The open circuit's pause ends sooner, but only its probe can close it.
    assert ring.next_available_in() == pytest.approx(3.0)
    assert ring.next_probe_in() == pytest.approx(1.0)
    assert ring.next_available_in(tried=frozenset({"a"})) is None
    clock.advance(3.0)
    assert ring.next_available_in() == 0.0
    assert states(ring) == {"a": "healthy", "b": "half_open", "c": "dead"}


def test_answers_from_before_the_circuit_opened_do_not_close_it() -> None:
    ring, clock = make_ring([spec("a")], circuit_threshold=1, circuit_pause=2.0)
    early, later = ring.acquire(), ring.acquire()
    use(ring, failure=SERVER_ERROR)
    assert early is not None and later is not None
    ring.release(early)  # a success, but sent before the failure
    assert states(ring) == {"a": "open"}
    clock.advance(2.0)
    (lease,) = ring.take_probes()
    ring.release(later, SERVER_ERROR)  # as stale while the probe is out
    assert states(ring) == {"a": "probing"} and row(ring, "a")["consecutive_failures"] == 1
    ring.release(lease)
    assert states(ring) == {"a": "healthy"}


def test_a_probe_outliving_its_probing_period_frees_its_slot() -> None:
    ring, clock = make_ring([spec("a")], circuit_threshold=1, circuit_pause=1.0)
    early = ring.acquire()
    use(ring, failure=SERVER_ERROR)
    clock.advance(1.0)
    (lease,) = ring.take_probes()
    assert early is not None
    ring.release(early, rate_limited(1))  # the vendor answers: closed, resting
    assert states(ring) == {"a": "cooling"}
    ring.release(lease)
    clock.advance(1.0)
    use(ring, failure=SERVER_ERROR)
    clock.advance(1.0)
    assert probe(ring) == "a"


def test_a_429_while_open_pushes_the_probe_back() -> None:
    ring, clock = make_ring([spec("a")], circuit_threshold=1, circuit_pause=2.0)
    early = ring.acquire()
    use(ring, failure=SERVER_ERROR)
    assert early is not None
    ring.release(early, rate_limited(9))
    assert states(ring) == {"a": "open"}
    assert ring.next_probe_in() == pytest.approx(9) and ring.next_available_in() is None


def test_probe_answered_with_429_closes_the_circuit_and_rests() -> None:
    ring, clock = make_ring([spec("a")], circuit_threshold=1, circuit_pause=1.0)
    use(ring, failure=SERVER_ERROR)
    clock.advance(1.0)
    probe(ring, rate_limited(5))
    assert states(ring) == {"a": "cooling"} and row(ring, "a")["consecutive_failures"] == 0
    clock.advance(5)
    assert states(ring) == {"a": "healthy"}


def test_a_probe_the_vendor_refuses_kills_the_key() -> None:
    ring, clock = make_ring([spec("a")], circuit_threshold=1, circuit_pause=1.0)
    use(ring, failure=TIMEOUT)
    clock.advance(1.0)
    probe(ring, AUTH_FAILED)
    assert states(ring) == {"a": "dead"} and ring.next_probe_in() is None


# -- dead, disabled, reload -----------------------------------------------------------------


def test_401_kills_the_key_until_reload() -> None:
    ring, clock = make_ring([spec("a"), spec("b")])
    lease = ring.acquire(tried=frozenset({"b"}))
    assert lease is not None
    ring.release(lease, classify(401, []))
    assert row(ring, "a")["state"] == "dead" and row(ring, "a")["last_error"] == "401 auth failed"
    clock.advance(1e6)
    assert {use(ring) for _ in range(10)} == {"b"}
    # (or until the operator enables it: test_key_state_log.py)
    ring.replace_specs([spec("a"), spec("b")])
    a = row(ring, "a")
    assert a["state"] == "healthy" and a["requests"] == 1 and a["errors"] == 1
    assert "a" in {use(ring) for _ in range(4)}


def test_all_dead_or_disabled_means_nothing_to_wait_for() -> None:
    ring, _ = make_ring([spec("a"), spec("b")])
    use(ring, failure=AUTH_FAILED)
    assert ring.disable("b")
    assert ring.acquire() is None and ring.next_available_in() is None
    assert not ring.disable("nope") and not ring.enable("nope")
    assert ring.enable("b") and use(ring) == "b"


def test_disable_then_enable_starts_the_key_afresh() -> None:
    ring, _ = make_ring([spec("a")], circuit_threshold=1)
    use(ring, failure=SERVER_ERROR)
    assert ring.disable("a") and states(ring) == {"a": "disabled"}
    assert ring.acquire() is None and ring.next_available_in() is None
    assert ring.enable("a") and states(ring) == {"a": "healthy"}
    assert row(ring, "a")["consecutive_failures"] == 0


def test_reload_keeps_state_adds_drops_and_resets_on_a_new_secret() -> None:
    ring, clock = make_ring([spec("keep"), spec("rotate"), spec("drop")])
    for label in ("keep", "rotate", "drop"):
        lease = ring.acquire(tried=frozenset(ring.labels) - {label})
        assert lease is not None
        ring.release(lease, rate_limited(30))
    assert ring.acquire() is None  # all cooling
    clock.advance(30)
    held = {label: ring.acquire(tried=frozenset(ring.labels) - {label}) for label in ("keep", "rotate", "drop")}
    ring.disable("keep")

    ring.replace_specs([KeySpec("sk-new", "rotate"), spec("keep", weight=3), spec("added")])
    assert ring.labels == ("rotate", "keep", "added")
    snap = {r["label"]: r for r in ring.snapshot()}
    assert snap["keep"]["state"] == "disabled" and snap["keep"]["rate_limited"] == 1
    assert snap["keep"]["in_flight"] == 1 and snap["keep"]["weight"] == 3
    assert snap["rotate"]["state"] == "healthy" and snap["rotate"]["requests"] == 0 and snap["rotate"]["in_flight"] == 0
    assert snap["added"]["state"] == "healthy"
    for lease in held.values():
        assert lease is not None
        ring.release(lease, SERVER_ERROR)
    snap = {r["label"]: r for r in ring.snapshot()}
    assert snap["keep"]["in_flight"] == 0 and snap["rotate"]["errors"] == 0
    lease = ring.acquire()
    assert lease is not None and lease.secret in ("sk-new", "sk-ant-secret-added")

    with pytest.raises(ValueError, match="duplicate"):
        ring.replace_specs([spec("x"), spec("x")])


# -- leases, counters, secrets -----------------------------------------------------------------


def test_in_flight_is_exact_after_mixed_outcomes_and_release_is_once() -> None:
    ring, clock = make_ring([spec("a"), spec("b"), spec("c")], circuit_threshold=2)
    outcomes = [None, SERVER_ERROR, rate_limited(0.5), CLIENT_ABORTED, TIMEOUT, CONFLICT, AUTH_FAILED, OVERLOADED]
    held: list[Lease] = []
    for i in range(40):
        lease = ring.acquire(f"s{i % 5}")
        if lease is not None:
            held.append(lease)
        if i % 3 == 0 and held:
            ring.release(held.pop(0), outcomes[i % len(outcomes)])
        clock.advance(0.1)
        expected = Counter(lease.label for lease in held)
        assert {r["label"]: r["in_flight"] for r in ring.snapshot()} == {k: expected[k] for k in ("a", "b", "c")}
    assert held
    for lease in held:
        ring.release(lease, CLIENT_ABORTED)
    assert all(r["in_flight"] == 0 for r in ring.snapshot())
    with pytest.raises(RuntimeError, match="twice"):
        ring.release(held[0])
    assert all(r["in_flight"] == 0 for r in ring.snapshot())


def test_the_secret_is_never_shown() -> None:
    secret = "sk-ant-api03-VERYSECRET"
    key = KeySpec(secret=secret, label="prod", workspace="w", org="o")
    ring, _ = make_ring([key])
    lease = ring.acquire("s")
    assert lease is not None and lease.secret == secret
    ring.release(lease, classify(401, [(b"x-api-key", secret.encode())]))
    shown = [repr(key), str(key), repr(lease), repr(ring), orjson.dumps(ring.snapshot()).decode()]
    assert not any(secret in text for text in shown)
    assert set(ring.snapshot()[0]) == {
        "label", "state", "until", "consecutive_failures", "in_flight", "requests",
        "rate_limited", "errors", "last_error", "priority", "weight", "workspace", "org", "headroom", "rests",
    }


def test_policy_rejects_nonsense_by_field_name() -> None:
    with pytest.raises(ValueError, match="circuit_threshold"):
        KeyPolicy(circuit_threshold=0)
    with pytest.raises(ValueError, match="cooldown_default"):
        KeyPolicy(cooldown_default=math.nan)
    with pytest.raises(ValueError, match="circuit_pause_max"):
        KeyPolicy(circuit_pause=10.0, circuit_pause_max=5.0)
    with pytest.raises(ValueError, match="circuit_probe_pause:"):
        KeyPolicy(circuit_probe_pause=-0.5)
    with pytest.raises(ValueError, match="circuit_probe_pause_max"):
        KeyPolicy(circuit_probe_pause=2.0, circuit_probe_pause_max=1.0)


# -- affinity ------------------------------------------------------------------------------------


def test_a_session_stays_on_its_key() -> None:
    ring, _ = make_ring([spec("a"), spec("b"), spec("c"), spec("d")])
    mine = set()
    for i in range(200):
        mine.add(use(ring, "mine"))
        use(ring, f"other-{i}")
        use(ring)
    assert len(mine) == 1


def test_sessions_spread_over_the_keys() -> None:
    ring, _ = make_ring([spec("a"), spec("b"), spec("c"), spec("d")])
    first = {f"s{i}": use(ring, f"s{i}") for i in range(100)}
    assert Counter(first.values()) == {"a": 25, "b": 25, "c": 25, "d": 25}
    assert all(use(ring, s) == label for s, label in first.items())


def test_failover_after_429_prefers_another_org_then_the_same_workspace() -> None:
    keys = [
        spec("x1", org="x", workspace="wx"),
        spec("x2", org="x", workspace="wx"),
        spec("y1", org="y", workspace="wy"),
        spec("y2", org="y", workspace="wx-shared"),
        spec("z1", workspace="wx"),  # org unknown: not known to share x's limit
    ]
    ring, _ = make_ring(keys)
    for i in range(12):
        lease = ring.acquire(f"s{i}", tried=frozenset({"x2", "y1", "y2", "z1"}))
        assert lease is not None and lease.label == "x1"
        ring.release(lease, rate_limited(0))
        tried = frozenset({"x1"})
        assert use(ring, f"s{i}", tried=tried, reason=rate_limited(0), previous=lease) == "z1"
        # The new key is the session's key now.
        assert use(ring, f"s{i}") == "z1"

    ring.replace_specs([k for k in keys if k.label != "z1"])
    for i in range(12):
        lease = ring.acquire(f"t{i}", tried=frozenset({"x2", "y1", "y2"}))
        assert lease is not None
        ring.release(lease, rate_limited(0))
        # Without `previous`: the session's key is the one that failed.
        assert use(ring, f"t{i}", tried=frozenset({"x1"}), reason=rate_limited(0)) in ("y1", "y2")


def test_failover_after_5xx_prefers_the_same_workspace() -> None:
    keys = [
        spec("a", org="x", workspace="w1"),
        spec("b", org="x", workspace="w2"),
        spec("c", org="y", workspace="w2"),
        spec("d", org="y", workspace="w1"),
    ]
    ring, _ = make_ring(keys)
    for failure in (SERVER_ERROR, OVERLOADED, CONNECT_FAILED, TIMEOUT, AUTH_FAILED):
        lease = ring.acquire(tried=frozenset({"b", "c", "d"}))
        assert lease is not None
        ring.release(lease, failure if failure is not AUTH_FAILED else None)
        # Sessionless: the one key tried is the previous one.
        assert use(ring, tried=frozenset({"a"}), reason=failure) == "d"


def test_a_session_moves_within_the_workspace_when_its_key_breaks() -> None:
    keys = [spec("a", workspace="w1"), spec("b", workspace="w2"), spec("c", workspace="w1")]
    ring, _ = make_ring(keys, circuit_threshold=1)
    assert use(ring, "s", tried=frozenset({"b", "c"})) == "a"
    use(ring, tried=frozenset({"b", "c"}), failure=SERVER_ERROR)
    assert states(ring)["a"] == "open"
    assert use(ring, "s") == "c"


def test_a_session_whose_key_rests_moves_to_another_org() -> None:
    keys = [spec("x1", org="x", workspace="w"), spec("x2", org="x", workspace="w"), spec("y1", org="y", workspace="v")]
    ring, _ = make_ring(keys)
    assert use(ring, "s", tried=frozenset({"x2", "y1"})) == "x1"
    # Another request's 429 on the session's key: no failover reason reaches
    # this session, yet its key's org is as exhausted as the key.
    use(ring, tried=frozenset({"x2", "y1"}), failure=rate_limited(5))
    assert use(ring, "s") == "y1"


def test_a_session_returns_to_the_best_tier() -> None:
    ring, clock = make_ring([spec("main"), spec("backup", priority=1)], circuit_threshold=1, circuit_pause=5.0)
    assert use(ring, "s") == "main"
    use(ring, "s", failure=rate_limited(3))
    assert use(ring, "s") == "backup"
    clock.advance(3)
    assert use(ring, "s") == "main"
    use(ring, "s", failure=SERVER_ERROR)
    assert use(ring, "s") == "backup"
    clock.advance(5)
    assert use(ring, "s") == "backup"  # due for a probe, not yet back
    assert probe(ring) == "main"
    assert {use(ring, "s") for _ in range(5)} == {"main"}


def test_a_session_never_gets_a_secret_a_reload_replaced() -> None:
    ring, _ = make_ring([spec("a"), spec("b")])
    assert use(ring, "s") == "a"
    ring.replace_specs([KeySpec(secret="sk-rotated-a", label="a"), spec("b")])
    lease = ring.acquire("s")
    assert lease is not None and lease.secret == "sk-rotated-a"
    ring.release(lease)
    ring.replace_specs([spec("b")])
    assert use(ring, "s") == "b"


def test_affinity_table_drops_the_least_recently_used_session() -> None:
    ring, _ = make_ring([spec("a"), spec("b")], affinity_max_sessions=2)
    assert [use(ring, s) for s in ("s1", "s2", "s3")] == ["a", "b", "a"]
    assert ring.session_count() == 2
    # s1 was the oldest: forgotten, it takes the next key in turn.
    assert use(ring, "s1") == "b"

    ring, _ = make_ring([spec("a"), spec("b")], affinity_max_sessions=2)
    assert [use(ring, s) for s in ("s1", "s2", "s1", "s3")] == ["a", "b", "a", "a"]
    # s1 was used again before s3 came: s2 went instead.
    assert use(ring, "s1") == "a"
    assert ring.session_count() == 2


def test_affinity_has_a_sliding_ttl() -> None:
    ring, clock = make_ring([spec("a"), spec("b")], affinity_ttl=10.0)
    assert use(ring, "s") == "a"
    for _ in range(3):
        clock.advance(9.9)
        assert use(ring, "s") == "a"
    clock.advance(10.0)
    assert use(ring, "s") == "b"
    assert ring.session_count() == 1


# -- waiting (real asyncio timers, tiny times) --------------------------------------------------------


async def test_wait_available_wakes_when_a_cooling_key_frees() -> None:
    ring = KeyRing("a", [spec("a")], KeyPolicy(cooldown_default=0.05))
    lease = ring.acquire()
    assert lease is not None
    ring.release(lease, rate_limited())
    assert ring.acquire() is None
    assert await ring.wait_available(timeout=5.0)
    assert ring.acquire() is not None


async def test_wait_available_times_out() -> None:
    ring = KeyRing("a", [spec("a"), spec("b")], KeyPolicy())
    use(ring, failure=AUTH_FAILED)
    use(ring, failure=rate_limited(30))
    assert not await ring.wait_available(timeout=0.05)
    assert not await ring.wait_available(timeout=0.05, tried=frozenset({"b"}))
    assert not await ring.wait_available(timeout=0)


async def test_wait_available_wakes_on_an_operator_change() -> None:
    ring = KeyRing("a", [spec("a")], KeyPolicy())
    ring.disable("a")
    asyncio.get_running_loop().call_later(0.01, ring.enable, "a")
    assert await ring.wait_available(timeout=30.0)


async def test_wait_available_wakes_when_the_probe_comes_back() -> None:
    ring = KeyRing("a", [spec("a")], KeyPolicy(circuit_threshold=1, circuit_pause=0.01))
    use(ring, failure=SERVER_ERROR)
    await asyncio.sleep(0.02)
    (lease,) = ring.take_probes()
    asyncio.get_running_loop().call_later(0.01, ring.release, lease, None)
    assert await ring.wait_available(timeout=30.0)
    assert ring.snapshot()[0]["state"] == "healthy"


async def test_wait_probe_due_wakes_when_a_circuit_opens_and_when_its_pause_ends() -> None:
    loop = asyncio.get_running_loop()
    ring = KeyRing("a", [spec("a"), spec("b")], KeyPolicy(circuit_threshold=1, circuit_pause=0.05))
    waiting = asyncio.ensure_future(ring.wait_probe_due())
    for _ in range(3):
        use(ring)  # users' answers do not wake the prober
        await asyncio.sleep(0.01)
    assert not waiting.done()
    opened = loop.time()
    use(ring, tried=frozenset({"b"}), failure=SERVER_ERROR)
    await asyncio.wait_for(waiting, 5.0)
    assert loop.time() - opened >= 0.04
    (lease,) = ring.take_probes()
    assert lease.label == "a"
    # A probe with no verdict is due again at once.
    waiting = asyncio.ensure_future(ring.wait_probe_due())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    ring.release(lease, CLIENT_ABORTED)
    await asyncio.wait_for(waiting, 1.0)
    assert not ring._probe_waiters


async def test_cancelled_wait_leaves_no_waiter_behind() -> None:
    ring = KeyRing("a", [spec("a")], KeyPolicy())
    ring.disable("a")
    task = asyncio.ensure_future(ring.wait_available(timeout=30.0))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not ring._waiters


# -- state machine ----------------------------------------------------------------------------------

MACHINE_POLICY = KeyPolicy(
    cooldown_default=2.0,
    circuit_threshold=2,
    circuit_pause=1.0,
    circuit_pause_max=4.0,
    circuit_probe_pause=0.5,
    circuit_probe_pause_max=1.0,
    affinity_ttl=5.0,
    affinity_max_sessions=2,
    cool_whole_org=True,
)
MACHINE_KEYS: dict[str, dict[str, Any]] = {
    "a": dict(weight=2, org="x", workspace="w1"),
    "b": dict(org="x", workspace="w1"),
    "c": dict(org="y", workspace="w2"),
    "d": dict(priority=1, org="y"),
}
OUTCOMES = [
    None,
    rate_limited(None),
    rate_limited(0.5),
    rate_limited(3.0),
    SERVER_ERROR,
    OVERLOADED,
    CONNECT_FAILED,
    TIMEOUT,
    AUTH_FAILED,
    CONFLICT,
    CLIENT_ABORTED,
    STREAM_BROKEN,
]


MACHINE_CLASSES = ["", "opus"]
ROOMS = [1.0, 0.04, 0.0]


def room_of(snapshot_row: dict[str, Any], model_class: str) -> float:
    reading = snapshot_row["headroom"].get(model_class)
    return 1.0 if reading is None else float(reading["remaining"])


class KeyRingMachine(RuleBasedStateMachine):
    """Random acquire / probe / observe / release / time / operator / reload
    sequences against a model of what must never happen."""

    @initialize()
    def start(self) -> None:
        self.clock = FakeClock()
        self.secrets = {label: f"sk-{label}-0" for label in MACHINE_KEYS}
        self.ring = KeyRing("m", self.specs(), MACHINE_POLICY, clock=self.clock, wall_clock=self.clock.wall)
        self.generation = {label: 0 for label in MACHINE_KEYS}
        self.leases: list[tuple[Lease, int]] = []
        self.dead: set[str] = set()
        self.disabled: set[str] = set()
        self.not_before = {label: -math.inf for label in MACHINE_KEYS}
        # A model class's rest on a key: (label, class) -> not before.
        self.class_not_before: dict[tuple[str, str], float] = {}

    def specs(self) -> list[KeySpec]:
        return [KeySpec(secret, label, **MACHINE_KEYS[label]) for label, secret in self.secrets.items()]

    def current(self, lease: Lease, generation: int) -> bool:
        return lease.label in self.secrets and self.generation[lease.label] == generation

    def open_probes(self, label: str) -> int:
        return sum(1 for lease, gen in self.leases if lease.label == label and lease.probe and self.current(lease, gen))

    @rule(
        session=st.sampled_from([None, "s1", "s2", "s3"]),
        tried=st.frozensets(st.sampled_from(sorted(MACHINE_KEYS)), max_size=3),
        reason=st.sampled_from(OUTCOMES[1:9]) | st.none(),
        with_previous=st.booleans(),
        model_class=st.sampled_from(MACHINE_CLASSES),
    )
    def acquire(
        self, session: str | None, tried: frozenset[str], reason: Failure | None, with_previous: bool, model_class: str
    ) -> None:
        before = {r["label"]: r for r in self.ring.snapshot()}
        previous = self.leases[-1][0] if with_previous and self.leases else None
        lease = self.ring.acquire(session, tried, reason, previous, model_class=model_class)
        # Users get healthy keys only (an open circuit is the hub's to
        # probe), and none resting for the request's class.
        usable = [
            k for k, r in before.items() if k not in tried and r["state"] == "healthy" and model_class not in r["rests"]
        ]
        if lease is None:
            assert self.ring.next_available_in(tried, model_class) != 0.0
            assert not usable
            return
        label = lease.label
        assert label not in self.dead and label not in self.disabled
        assert self.clock.now >= self.not_before[label]
        assert self.clock.now >= self.class_not_before.get((label, model_class), -math.inf)
        assert label in usable
        tier = min(MACHINE_KEYS[k].get("priority", 0) for k in usable)
        assert MACHINE_KEYS[label].get("priority", 0) == tier
        # Under the floor (or out of room) only when no other key of the tier has more.
        floor = MACHINE_POLICY.headroom_floor
        room = room_of(before[label], model_class)
        if room < floor or room == 0.0:
            assert not any(
                room_of(before[k], model_class) >= max(floor, room) and room_of(before[k], model_class) > 0.0
                for k in usable if MACHINE_KEYS[k].get("priority", 0) == tier
            )
        assert not lease.probe and lease.model_class == model_class
        self.leases.append((lease, self.generation[label]))

    @precondition(lambda self: bool(self.leases))
    @rule(data=st.data(), room=st.sampled_from(ROOMS), reset=st.sampled_from(["1s", "5s"]))
    def observe(self, data: st.DataObject, room: float, reset: str) -> None:
        lease, _ = self.leases[data.draw(st.integers(0, len(self.leases) - 1))]
        self.ring.observe(lease, {
            b"x-ratelimit-limit-tokens": b"100",
            b"x-ratelimit-remaining-tokens": b"%d" % round(room * 100),
            b"x-ratelimit-reset-tokens": reset.encode(),
        })

    @rule()
    def take_probes(self) -> None:
        before = states(self.ring)
        due = self.ring.next_probe_in() == 0.0
        leases = self.ring.take_probes()
        # Exactly the keys whose pause is over, unless a probe is still out.
        assert {lease.label for lease in leases} == {
            k for k, state in before.items() if state == "half_open" and self.open_probes(k) == 0
        }
        assert due == bool(leases)
        after = states(self.ring)
        for lease in leases:
            assert lease.probe and after[lease.label] == "probing"
            self.leases.append((lease, self.generation[lease.label]))
        assert self.ring.take_probes() == [] and self.ring.next_probe_in() != 0.0

    @precondition(lambda self: bool(self.leases))
    @rule(data=st.data(), outcome=st.sampled_from(OUTCOMES))
    def release(self, data: st.DataObject, outcome: Failure | None) -> None:
        lease, generation = self.leases.pop(data.draw(st.integers(0, len(self.leases) - 1)))
        self.ring.release(lease, outcome)
        label = lease.label
        live = self.current(lease, generation)
        if outcome is not None and outcome.kind is FailureKind.AUTH_FAILED and live and label not in self.disabled:
            self.dead.add(label)
            self.not_before[label] = -math.inf
        if outcome is not None and outcome.kind is FailureKind.RATE_LIMITED:
            cooldown = MACHINE_POLICY.cooldown_default if outcome.cooldown is None else outcome.cooldown
            rest = self.clock.now + cooldown
            org = MACHINE_KEYS[label]["org"]
            model_class = "" if lease.probe else lease.model_class
            for other in self.secrets:
                # A lease of a replaced key still speaks for its org, this label included.
                if MACHINE_KEYS[other]["org"] != org:
                    continue
                if model_class:
                    # The class's rest, whatever the key's state.
                    slot = (other, model_class)
                    self.class_not_before[slot] = max(self.class_not_before.get(slot, -math.inf), rest)
                elif other not in self.dead and other not in self.disabled:
                    self.not_before[other] = max(self.not_before[other], rest)

    @rule(seconds=st.sampled_from([0.1, 0.5, 1.0, 2.0, 5.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(label=st.sampled_from(sorted(MACHINE_KEYS)))
    def disable(self, label: str) -> None:
        state = self.ring.disable(label)
        assert (state is not None) == (label in self.secrets)
        if label in self.secrets:
            assert state is KeyState.DISABLED
            self.disabled.add(label)
            self.dead.discard(label)
            self.not_before[label] = -math.inf

    @rule(label=st.sampled_from(sorted(MACHINE_KEYS)))
    def enable(self, label: str) -> None:
        state = self.ring.enable(label)
        assert (state is not None) == (label in self.secrets)
        if label in self.secrets:
            # The operator's word: healthy, whatever the ring had learned.
            assert state is KeyState.HEALTHY
            self.disabled.discard(label)
            self.dead.discard(label)
            self.not_before[label] = -math.inf
            self.forget_class_rests(label)

    @rule(label=st.sampled_from(sorted(MACHINE_KEYS)))
    def reset(self, label: str) -> None:
        state = self.ring.reset(label)
        assert (state is not None) == (label in self.secrets)
        if label in self.secrets:
            # Rests and circuit end; a dead or disabled key stays so.
            expected = (
                KeyState.DEAD if label in self.dead
                else KeyState.DISABLED if label in self.disabled
                else KeyState.HEALTHY
            )
            assert state is expected
            self.not_before[label] = -math.inf
            self.forget_class_rests(label)

    @rule(label=st.sampled_from(sorted(MACHINE_KEYS)), change=st.sampled_from(["same", "rotate", "toggle"]))
    def reload(self, label: str, change: str) -> None:
        fresh = False
        if change == "rotate" and label in self.secrets:
            self.secrets[label] = f"sk-{label}-{self.generation[label] + 1}"
            fresh = True
        elif change == "toggle":
            if label in self.secrets:
                del self.secrets[label]
            else:
                self.secrets[label] = f"sk-{label}-{self.generation[label] + 1}"
            fresh = True
        if fresh:
            # A new key; disabled still if the operator disabled its label.
            self.generation[label] += 1
            self.not_before[label] = -math.inf
            self.forget_class_rests(label)
        # Order as configured, whatever was toggled.
        self.secrets = {k: self.secrets[k] for k in MACHINE_KEYS if k in self.secrets}
        self.ring.replace_specs(self.specs())
        self.dead.clear()

    def forget_class_rests(self, label: str) -> None:
        for slot in [slot for slot in self.class_not_before if slot[0] == label]:
            del self.class_not_before[slot]

    @invariant()
    def in_flight_matches_open_leases(self) -> None:
        if not hasattr(self, "ring"):
            return
        expected = Counter(lease.label for lease, gen in self.leases if self.current(lease, gen))
        snap = self.ring.snapshot()
        assert [r["label"] for r in snap] == list(self.secrets)
        for r in snap:
            assert r["in_flight"] == expected[r["label"]] >= 0
            assert self.open_probes(r["label"]) <= 1
            if r["state"] == "probing":
                assert self.open_probes(r["label"]) == 1
            assert (r["state"] == "dead") == (r["label"] in self.dead)
            assert (r["state"] == "disabled") == (r["label"] in self.disabled)
            if r["state"] in ("cooling", "open"):
                # Later than now on the ring's clock; mapped onto wall time
                # (about 1.8e9) a rest with nanoseconds left rounds to now.
                assert r["until"] is not None and r["until"] >= self.clock.wall()
            else:
                assert r["until"] is None
            for model_class, until in r["rests"].items():
                assert model_class and until >= self.clock.wall()
            for reading in r["headroom"].values():
                assert 0.0 <= reading["remaining"] <= 1.0 and reading["resets"] > self.clock.wall()


KeyRingMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_key_ring_state_machine = KeyRingMachine.TestCase
