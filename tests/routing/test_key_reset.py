"""The operator's reset of a key (KeyRing.reset, behind `hubcore keys reset`
and the dashboard's live page): every rest after a 429 ends, the whole
key's and each model class's, an open circuit closes with its failure
count and pause back to nothing, and a dead or disabled key stays so."""
from __future__ import annotations

import asyncio

import pytest

from hubcore.routing.keys import KeyRing, KeyState
from tests.routing.test_key_headroom import OPUS, SONNET, anthropic_limits, answer
from tests.routing.test_key_state_log import Captured, captured  # noqa: F401 - the fixture
from tests.routing.test_keys import (
    AUTH_FAILED,
    SERVER_ERROR,
    fail_until_open,
    make_ring,
    probe,
    rate_limited,
    row,
    spec,
    states,
    use,
)


def test_reset_ends_a_whole_key_rest_and_says_so(captured: Captured) -> None:
    ring, clock = make_ring([spec("a")])
    use(ring, failure=rate_limited(30))
    assert states(ring) == {"a": "cooling"} and ring.next_available_in() == pytest.approx(30)
    captured.clear()
    assert ring.reset("a") is KeyState.HEALTHY
    assert captured.changes() == [("a", "cooling", "healthy", "operator reset")]
    assert row(ring, "a")["until"] is None
    assert ring.next_available_in() == 0.0 and use(ring) == "a"
    # What the ring counted stays: the reset is no rewrite of history.
    assert row(ring, "a")["rate_limited"] == 1


def test_reset_ends_every_model_class_rest_and_keeps_the_readings(captured: Captured) -> None:
    ring, clock = make_ring([spec("a"), spec("b")])
    for model_class, seconds in ((OPUS, 60), (SONNET, 20)):
        lease = ring.acquire(tried=frozenset({"b"}), model_class=model_class)
        assert lease is not None
        answer(ring, lease, anthropic_limits(clock, 0.3), rate_limited(seconds))
    assert set(row(ring, "a")["rests"]) == {OPUS, SONNET} and states(ring)["a"] == "healthy"
    assert ring.acquire(tried=frozenset({"b"}), model_class=OPUS) is None
    captured.clear()
    assert ring.reset("a") is KeyState.HEALTHY
    assert row(ring, "a")["rests"] == {}
    # One line per class whose rest ended; the key's own state did not change.
    assert sorted(captured.records[i].model_class for i in range(2)) == [OPUS, SONNET]  # type: ignore[attr-defined]
    assert {change[1:] for change in captured.changes()} == {("cooling", "healthy", "operator reset")}
    # The vendor's word on the key's room is not the operator's to change.
    assert set(row(ring, "a")["headroom"]) == {OPUS, SONNET}
    lease = ring.acquire(tried=frozenset({"b"}), model_class=OPUS)
    assert lease is not None and lease.label == "a"


def test_reset_forgets_the_no_room_reading_a_429_brought_and_the_key_serves_at_once(captured: Captured) -> None:
    ring, clock = make_ring([spec("a"), spec("b")])
    lease = ring.acquire(tried=frozenset({"b"}), model_class=SONNET)
    assert lease is not None
    # The 429's head says no room is left for the next 60 s.
    answer(ring, lease, anthropic_limits(clock, 0.0), rate_limited(60))
    lease = ring.acquire(tried=frozenset({"a"}), model_class=SONNET)
    assert lease is not None
    answer(ring, lease, anthropic_limits(clock, 0.8))
    assert ring.reset("a") is KeyState.HEALTHY
    # The operator's word contradicts the 429's: "a" is a candidate again
    # now, not when the vendor's window would have reset.
    assert SONNET not in row(ring, "a")["headroom"]
    assert ring.acquire(tried=frozenset({"b"}), model_class=SONNET) is not None
    picks = set()
    for _ in range(4):
        lease = ring.acquire(model_class=SONNET)
        assert lease is not None
        picks.add(lease.label)
        ring.release(lease)
    assert "a" in picks


def test_reset_closes_an_open_circuit_and_the_next_one_starts_from_the_first_pause(captured: Captured) -> None:
    ring, clock = make_ring([spec("a"), spec("b")], circuit_threshold=2, circuit_pause=5.0, circuit_pause_max=300.0)
    fail_until_open(ring, "a", 2)
    clock.advance(5)
    probe(ring, SERVER_ERROR)  # a failed probe doubles the pause
    assert states(ring)["a"] == "open"
    assert row(ring, "a")["until"] - clock.wall() == pytest.approx(10)
    captured.clear()
    assert ring.reset("a") is KeyState.HEALTHY
    assert captured.changes() == [("a", "open", "healthy", "operator reset")]
    assert row(ring, "a")["consecutive_failures"] == 0 and row(ring, "a")["until"] is None
    assert ring.next_probe_in() is None and ring.take_probes() == []
    # Not on probation: a new circuit needs the whole threshold and pauses the policy's first pause.
    lease = ring.acquire(tried=frozenset({"b"}))
    assert lease is not None
    ring.release(lease, SERVER_ERROR)
    assert states(ring)["a"] == "healthy"
    fail_until_open(ring, "a", 1)
    assert states(ring)["a"] == "open" and row(ring, "a")["until"] - clock.wall() == pytest.approx(5)


@pytest.mark.parametrize("verdict", [None, SERVER_ERROR], ids=["ok", "failed"])
def test_reset_while_the_probe_is_out_closes_the_circuit_and_its_answer_counts_as_a_users(
    captured: Captured, verdict: object,
) -> None:
    ring, clock = make_ring([spec("a")], circuit_threshold=3, circuit_pause=5.0)
    fail_until_open(ring, "a", 3)
    clock.advance(5)
    (lease,) = ring.take_probes()
    assert states(ring) == {"a": "probing"}
    assert ring.reset("a") is KeyState.HEALTHY
    assert use(ring) == "a"
    ring.release(lease, verdict)  # type: ignore[arg-type]
    assert states(ring) == {"a": "healthy"}
    assert row(ring, "a")["consecutive_failures"] == (0 if verdict is None else 1)
    assert row(ring, "a")["in_flight"] == 0 and ring.take_probes() == []


def test_reset_half_open_key_closes_the_circuit_without_a_probe(captured: Captured) -> None:
    ring, clock = make_ring([spec("a")], circuit_threshold=1, circuit_pause=5.0)
    use(ring, failure=SERVER_ERROR)
    clock.advance(5)
    assert ring.next_probe_in() == 0.0 and states(ring) == {"a": "half_open"}
    assert ring.reset("a") is KeyState.HEALTHY
    assert ring.next_probe_in() is None and ring.take_probes() == []


def test_reset_leaves_a_dead_or_disabled_key_so_but_ends_its_rests(captured: Captured) -> None:
    ring, clock = make_ring([spec("a"), spec("b"), spec("c")])
    lease = ring.acquire(tried=frozenset({"b", "c"}), model_class=OPUS)
    assert lease is not None
    ring.release(lease, rate_limited(60))
    use(ring, failure=AUTH_FAILED, tried=frozenset({"b", "c"}))
    ring.disable("b")
    captured.clear()
    assert ring.reset("a") is KeyState.DEAD
    assert ring.reset("b") is KeyState.DISABLED
    assert states(ring) == {"a": "dead", "b": "disabled", "c": "healthy"}
    assert row(ring, "a")["rests"] == {}
    # The class's rest ended (logged); no key changed state.
    assert captured.changes() == [("a", "cooling", "healthy", "operator reset")]
    # Reviving a key the vendor refused is enable's word.
    assert ring.enable("a") is KeyState.HEALTHY


def test_reset_of_a_healthy_key_forgets_its_failures_silently(captured: Captured) -> None:
    ring, _ = make_ring([spec("a")], circuit_threshold=3)
    use(ring, failure=SERVER_ERROR)
    use(ring, failure=SERVER_ERROR)
    assert row(ring, "a")["consecutive_failures"] == 2
    captured.clear()
    assert ring.reset("a") is KeyState.HEALTHY
    assert row(ring, "a")["consecutive_failures"] == 0 and captured.changes() == []
    use(ring, failure=SERVER_ERROR)
    assert states(ring) == {"a": "healthy"}


def test_reset_of_an_unknown_label_is_none() -> None:
    ring, _ = make_ring([spec("a")])
    assert ring.reset("nope") is None


async def test_a_request_waiting_for_a_resting_key_goes_on_at_the_reset() -> None:
    ring = KeyRing("a", [spec("a")])
    use(ring, failure=rate_limited(600))
    asyncio.get_running_loop().call_later(0.01, ring.reset, "a")
    assert await ring.wait_available(timeout=30.0)
    assert use(ring) == "a"
