"""What a key ring hears from the hub's other instances (KeyRing.hear) and
what it tells them (KeyRing.listener): rests, open circuits, refused keys;
a fake clock, no Redis (tests/shared has the Redis side)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hubcore.shared.keyspace import KeyNews, fingerprint
from tests.routing.test_keys import AUTH_FAILED, SERVER_ERROR, fail_until_open, make_ring, probe, rate_limited, spec, states


class Told:
    """A KeyListener that keeps what it was told."""

    def __init__(self) -> None:
        self.said: list[tuple[Any, ...]] = []

    def rested(self, label: str, model_class: str, seconds: float) -> None:
        self.said.append(("rested", label, model_class, round(seconds, 3)))

    def circuit_opened(self, label: str, seconds: float) -> None:
        self.said.append(("opened", label, round(seconds, 3)))

    def circuit_closed(self, label: str) -> None:
        self.said.append(("closed", label))

    def refused(self, label: str, secret: str) -> None:
        self.said.append(("refused", label, secret))

    def revived(self, label: str) -> None:
        self.said.append(("revived", label))


def test_a_class_rest_heard_skips_the_key_for_that_class_until_it_ends() -> None:
    ring, clock = make_ring([spec("a"), spec("b")])
    ring.hear({"a": KeyNews({"sonnet": 30.0})})
    for _ in range(4):
        lease = ring.acquire(model_class="sonnet")
        assert lease is not None and lease.label == "b"
        ring.release(lease)
    assert {ring.acquire(model_class="opus").label for _ in range(4)} == {"a", "b"}  # type: ignore[union-attr]
    assert ring.next_available_in(tried=frozenset({"b"}), model_class="sonnet") == 30.0
    assert ring.rate_limited("sonnet") and not ring.rate_limited("opus")
    clock.advance(30.0)
    assert ring.next_available_in(tried=frozenset({"b"}), model_class="sonnet") == 0.0


def test_a_whole_key_rest_heard_holds_it_for_every_class_and_may_be_waited_for() -> None:
    ring, clock = make_ring([spec("a"), spec("b")])
    ring.hear({"a": KeyNews({"": 10.0})})
    assert {ring.acquire(model_class=cls).label for cls in ("opus", "sonnet", "")} == {"b"}  # type: ignore[union-attr]
    assert ring.next_available_in(tried=frozenset({"b"}), model_class="opus") == 10.0
    assert ring.rate_limited("opus")
    assert states(ring)["a"] == "healthy"  # held, not a state of its own
    clock.advance(10.0)
    assert ring.acquire(tried=frozenset({"b"})) is not None


def test_a_circuit_open_elsewhere_holds_the_key_and_is_not_waited_for() -> None:
    ring, clock = make_ring([spec("a")])
    ring.hear({"a": KeyNews(circuit=5.0)})
    assert ring.acquire() is None
    assert ring.next_available_in() is None and not ring.rate_limited()
    assert ring.take_probes() == []  # the instance whose circuit it is probes it
    clock.advance(5.0)
    assert ring.acquire() is not None


def test_a_session_on_a_held_key_moves() -> None:
    ring, _ = make_ring([spec("a"), spec("b")])
    ring.pin_session("s-1", "a")
    assert ring.acquire("s-1").label == "a"  # type: ignore[union-attr]
    ring.hear({"a": KeyNews({"": 10.0})})
    assert ring.acquire("s-1").label == "b"  # type: ignore[union-attr]


def test_a_key_refused_elsewhere_is_dead_here_only_with_the_same_secret() -> None:
    ring, _ = make_ring([spec("a"), spec("b")])
    ring.hear({"a": KeyNews(dead=fingerprint("sk-ant-secret-a")), "b": KeyNews(dead=fingerprint("sk-ant-rotated"))})
    assert states(ring) == {"a": "dead", "b": "healthy"}
    ring.enable("a")
    assert states(ring)["a"] == "healthy"


def test_news_of_a_label_the_ring_lacks_is_ignored() -> None:
    ring, _ = make_ring([spec("a")])
    ring.hear({"zz": KeyNews({"": 10.0}, circuit=3.0, dead="0" * 12)})
    assert states(ring) == {"a": "healthy"} and ring.acquire() is not None


def test_the_operator_enabling_a_key_ends_what_was_heard() -> None:
    ring, _ = make_ring([spec("a")])
    ring.hear({"a": KeyNews({"": 30.0, "opus": 30.0}, circuit=30.0)})
    assert ring.acquire(model_class="opus") is None
    ring.enable("a")
    assert ring.acquire(model_class="opus") is not None


def test_the_ring_tells_what_it_learns_and_nothing_it_heard() -> None:
    ring, clock = make_ring([spec("a"), spec("b")], circuit_threshold=2, circuit_pause=5.0)
    told = ring.listener = Told()
    ring.hear({"a": KeyNews({"haiku": 9.0}, circuit=1.0), "b": KeyNews(dead=fingerprint("sk-ant-secret-b"))})
    assert told.said == []
    clock.advance(1.0)
    ring.enable("b")
    assert told.said == [("revived", "b")]
    told.said.clear()

    lease = ring.acquire(tried=frozenset({"b"}), model_class="sonnet")
    assert lease is not None and lease.label == "a"
    ring.release(lease, rate_limited(7.0))
    lease = ring.acquire(tried=frozenset({"a"}))
    assert lease is not None and lease.label == "b"
    ring.release(lease, rate_limited(3.0))  # no model class: the whole key rests
    assert told.said == [("rested", "a", "sonnet", 7.0), ("rested", "b", "", 3.0)]
    told.said.clear()

    clock.advance(7.0)
    fail_until_open(ring, "a", 2)
    assert told.said == [("opened", "a", 5.0)]
    clock.advance(5.0)
    probe(ring)
    assert told.said[-1] == ("closed", "a")
    told.said.clear()

    lease = ring.acquire(tried=frozenset({"b"}))
    assert lease is not None
    ring.release(lease, AUTH_FAILED)
    assert told.said == [("refused", "a", "sk-ant-secret-a")]


def test_without_a_listener_nothing_is_told() -> None:
    ring, _ = make_ring([spec("a")], circuit_threshold=1)
    lease = ring.acquire()
    assert lease is not None
    ring.release(lease, SERVER_ERROR)
    assert states(ring)["a"] == "open"


@dataclass(frozen=True)
class Report:
    """A KeyReport of another shape than KeyNews: the ring reads the protocol only."""

    rests: Mapping[str, float] = field(default_factory=dict)
    circuit: float | None = None
    revival: str | None = None

    def dead_for(self, secret: str) -> bool:
        return False


def test_any_key_report_will_do() -> None:
    ring, _ = make_ring([spec("a"), spec("b")])
    ring.hear({"a": Report({"opus": 4.0})})
    assert ring.acquire(model_class="opus").label == "b"  # type: ignore[union-attr]


def test_a_revival_heard_ends_rests_and_revives_a_dead_key_once_per_mark() -> None:
    ring, _ = make_ring([spec("a"), spec("b"), spec("c")])
    told = ring.listener = Told()
    ring.hear({"a": KeyNews({"": 30.0}), "b": KeyNews(dead=fingerprint("sk-ant-secret-b"))})
    ring.disable("c")
    told.said.clear()
    assert states(ring) == {"a": "healthy", "b": "dead", "c": "disabled"}
    assert ring.acquire(tried=frozenset({"b", "c"})) is None  # a is held back
    # An operator revived each on another instance: the rests written before
    # the mark are gone from Redis, the mark comes instead.
    marks = {label: KeyNews(revival="1764950000.000001") for label in "abc"}
    ring.hear(marks)
    assert states(ring) == {"a": "healthy", "b": "healthy", "c": "disabled"}  # disabled stays: that is enable's word
    assert ring.acquire(tried=frozenset({"b", "c"})) is not None
    assert told.said == []  # not told back to the instances it came from
    # The same mark with a rest written after it: the rest holds.
    ring.hear({"a": KeyNews({"": 30.0}, revival="1764950000.000001")})
    assert ring.acquire(tried=frozenset({"b", "c"})) is None


def test_an_operator_reset_is_told_to_the_other_instances_unless_the_key_stays_dead() -> None:
    ring, _ = make_ring([spec("a"), spec("b")])
    told = ring.listener = Told()
    lease = ring.acquire(tried=frozenset({"b"}))
    assert lease is not None
    ring.release(lease, rate_limited(30.0))
    told.said.clear()
    ring.reset("a")
    assert told.said == [("revived", "a")]
    lease = ring.acquire(tried=frozenset({"a"}))
    assert lease is not None
    ring.release(lease, AUTH_FAILED)
    told.said.clear()
    ring.reset("b")
    assert told.said == []


def test_switches_followed_from_the_database_move_keys_without_telling_anyone() -> None:
    ring, _ = make_ring([spec("a"), spec("b")])
    told = ring.listener = Told()
    assert ring.follow_switches({"a", "gone"}) == ["disabled a", "disabled gone"]
    assert states(ring) == {"a": "disabled", "b": "healthy"}
    assert ring.follow_switches({"a", "gone"}) == []
    assert ring.follow_switches(set()) == ["enabled a", "enabled gone"]
    assert states(ring) == {"a": "healthy", "b": "healthy"}
    assert told.said == []
