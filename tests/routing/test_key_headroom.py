"""The key ring and the vendors' rate-limit headers: each answer's reading
weighs the choice of key per model class, a key under the headroom floor
is used only when no other has more, readings are forgotten once their limit
resets, and a 429 for one model class rests the key for that class only. A
fake clock except where asyncio timers are the thing under test."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from hubcore import config as config_mod
from hubcore.config import ConfigError
from hubcore.routing.headroom import MAX_CLASSES
from hubcore.routing.keys import KeyPolicy, KeyRing, KeySpec, Lease
from tests.routing.test_keys import (
    SERVER_ERROR,
    FakeClock,
    make_ring,
    rate_limited,
    row,
    spec,
    states,
)

SONNET, OPUS = "sonnet", "opus"
Headers = list[tuple[bytes, bytes]]


def anthropic_limits(clock: FakeClock, remaining: float, reset_in: float = 60.0, limit: str = "tokens") -> Headers:
    """An Anthropic answer's head saying `remaining` (a fraction) of `limit` is left until `reset_in` seconds."""
    reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock.wall() + reset_in))
    return [
        (b"content-type", b"application/json"),
        (b"anthropic-ratelimit-requests-limit", b"4000"),
        (b"anthropic-ratelimit-requests-remaining", b"3999"),
        (b"anthropic-ratelimit-requests-reset", reset.encode()),
        (f"anthropic-ratelimit-{limit}-limit".encode(), b"100000"),
        (f"anthropic-ratelimit-{limit}-remaining".encode(), b"%d" % round(remaining * 100000)),
        (f"anthropic-ratelimit-{limit}-reset".encode(), reset.encode()),
        (b"request-id", b"req_1"),
    ]


def openai_limits(remaining: float, reset: str = "6m0s") -> Headers:
    return [
        (b"x-ratelimit-limit-tokens", b"30000"),
        (b"x-ratelimit-remaining-tokens", b"%d" % round(remaining * 30000)),
        (b"x-ratelimit-reset-tokens", reset.encode()),
    ]


def answer(ring: KeyRing, lease: Lease, headers: Headers, failure: object = None) -> str:
    """What the exchange does with an answer: observe its head, then release."""
    ring.observe(lease, dict(headers))
    ring.release(lease, failure)  # type: ignore[arg-type]
    return lease.label


def seed(ring: KeyRing, clock: FakeClock, rooms: dict[str, float], model_class: str = SONNET,
         reset_in: float = 60.0) -> None:
    """One answer per key reporting its room for `model_class`."""
    for label, room in rooms.items():
        lease = ring.acquire(tried=frozenset(ring.labels) - {label}, model_class=model_class)
        assert lease is not None and lease.label == label
        answer(ring, lease, anthropic_limits(clock, room, reset_in))


def run(ring: KeyRing, clock: FakeClock, rooms: dict[str, float], n: int = 100,
        model_class: str = SONNET, session: str | None = None) -> Counter[str]:
    """`n` sequential requests, each answer reporting the key's room as in `rooms`."""
    picks: Counter[str] = Counter()
    for _ in range(n):
        lease = ring.acquire(session, model_class=model_class)
        assert lease is not None
        picks[answer(ring, lease, anthropic_limits(clock, rooms[lease.label]))] += 1
    return picks


# -- spreading by headroom ---------------------------------------------------------------------------


def test_90_and_5_percent_send_at_least_85_of_100_to_the_roomier_key() -> None:
    ring, clock = make_ring([spec("a"), spec("b")])
    rooms = {"a": 0.9, "b": 0.05}
    seed(ring, clock, rooms)
    picks = run(ring, clock, rooms)
    assert picks["a"] >= 85
    # Weighed, not shut out: 5% is not under the default floor of 5%.
    assert picks["b"] > 0
    assert states(ring) == {"a": "healthy", "b": "healthy"}


def test_unknown_room_counts_as_whole_and_the_first_answer_tips_the_balance() -> None:
    ring, clock = make_ring([spec("a"), spec("b")])
    assert run(ring, clock, {"a": 1.0, "b": 1.0}, n=10, model_class="") == {"a": 5, "b": 5}
    picks = run(ring, clock, {"a": 0.9, "b": 0.05})
    assert picks["a"] >= 85


def test_the_split_by_headroom_holds_under_concurrent_traffic() -> None:
    # Least-in-flight alone would send every request that finds the roomier
    # key busy to the idle one: half the traffic at a concurrency of two.
    for concurrency in (2, 3, 8):
        ring, clock = make_ring([spec("a"), spec("b")])
        rooms = {"a": 0.9, "b": 0.05}
        seed(ring, clock, rooms)
        window: list[Lease] = []
        picks: Counter[str] = Counter()
        for _ in range(200):
            lease = ring.acquire(model_class=SONNET)
            assert lease is not None
            picks[lease.label] += 1
            window.append(lease)
            if len(window) == concurrency:
                oldest = window.pop(0)
                answer(ring, oldest, anthropic_limits(clock, rooms[oldest.label]))
        assert picks["a"] >= 170, (concurrency, picks)


def test_weights_multiply_the_room() -> None:
    ring, clock = make_ring([spec("a", weight=1), spec("b", weight=4)])
    rooms = {"a": 0.8, "b": 0.2}
    seed(ring, clock, rooms)
    # 1 x 0.8 against 4 x 0.2: even.
    assert run(ring, clock, rooms) == {"a": 50, "b": 50}


def test_a_key_under_the_floor_is_used_only_when_no_other_key_has_more() -> None:
    ring, clock = make_ring([spec("a"), spec("b")])
    rooms = {"a": 0.9, "b": 0.04}
    seed(ring, clock, rooms)
    assert run(ring, clock, rooms) == {"a": 100}
    # The roomy key is out (resting after a 429): the low one carries on.
    lease = ring.acquire(model_class=SONNET)
    assert lease is not None and lease.label == "a"
    ring.release(lease, rate_limited(5))
    assert run(ring, clock, rooms, n=3) == {"b": 3}
    assert ring.acquire(tried=frozenset({"b"}), model_class=SONNET) is None
    # Both under the floor: the one with the most room left.
    clock.advance(5)
    rooms = {"a": 0.02, "b": 0.04}
    seed(ring, clock, rooms)
    assert run(ring, clock, rooms, n=10) == {"b": 10}


def test_the_floor_is_configurable_and_zero_turns_it_off() -> None:
    rooms = {"a": 0.9, "b": 0.04}
    ring, clock = make_ring([spec("a"), spec("b")], headroom_floor=0.0)
    seed(ring, clock, rooms)
    assert run(ring, clock, rooms, n=1000)["b"] > 0
    ring, clock = make_ring([spec("a"), spec("b")], headroom_floor=0.5)
    rooms = {"a": 0.6, "b": 0.45}
    seed(ring, clock, rooms)
    assert run(ring, clock, rooms) == {"a": 100}
    # A key the vendor says is exhausted waits while another has any room.
    ring, clock = make_ring([spec("a"), spec("b")], headroom_floor=0.0)
    rooms = {"a": 0.01, "b": 0.0}
    seed(ring, clock, rooms)
    assert run(ring, clock, rooms) == {"a": 100}


def test_readings_are_forgotten_once_their_limit_resets() -> None:
    ring, clock = make_ring([spec("a"), spec("b")])
    seed(ring, clock, {"a": 0.9, "b": 0.01}, reset_in=10)
    assert row(ring, "b")["headroom"] == {
        SONNET: {"remaining": 0.01, "limit": "tokens", "resets": clock.wall() + 10},
    }
    picks = Counter(_use(ring) for _ in range(10))
    assert picks == {"a": 10}
    clock.advance(10)
    assert row(ring, "b")["headroom"] == {}
    assert Counter(_use(ring) for _ in range(10)) == {"a": 5, "b": 5}


def _use(ring: KeyRing, model_class: str = SONNET) -> str:
    """A request whose answer carries no rate-limit headers."""
    lease = ring.acquire(model_class=model_class)
    assert lease is not None
    return answer(ring, lease, [])


def test_readings_are_per_model_class() -> None:
    ring, clock = make_ring([spec("a"), spec("b")])
    seed(ring, clock, {"a": 1.0, "b": 0.01}, model_class=OPUS)
    assert Counter(_use(ring, OPUS) for _ in range(10)) == {"a": 10}
    assert Counter(_use(ring, SONNET) for _ in range(10)) == {"a": 5, "b": 5}
    assert set(row(ring, "b")["headroom"]) == {OPUS}


def test_answers_without_limits_change_nothing_and_openai_durations_count() -> None:
    ring, clock = make_ring([spec("a"), spec("b")])
    seed(ring, clock, {"a": 0.9, "b": 0.01})
    before = row(ring, "b")["headroom"]
    lease = ring.acquire(tried=frozenset({"a"}), model_class=SONNET)
    assert lease is not None
    answer(ring, lease, [(b"content-type", b"application/json"), (b"x-request-id", b"req_2")])
    assert row(ring, "b")["headroom"] == before
    lease = ring.acquire(tried=frozenset({"a"}), model_class="gpt-5.1")
    assert lease is not None
    answer(ring, lease, openai_limits(0.25, "1m30s"))
    assert row(ring, "b")["headroom"]["gpt-5.1"] == {
        "remaining": 0.25, "limit": "tokens", "resets": clock.wall() + 90,
    }


def test_an_explicit_class_on_observe_overrides_the_leases() -> None:
    ring, clock = make_ring([spec("a"), spec("b")])
    lease = ring.acquire(tried=frozenset({"b"}))
    assert lease is not None
    ring.observe(lease, dict(anthropic_limits(clock, 0.3)), model_class=OPUS)
    ring.release(lease)
    assert set(row(ring, "a")["headroom"]) == {OPUS}


def test_a_reading_stands_for_the_read_interval_then_the_next_answer_is_read() -> None:
    ring, clock = make_ring([spec("a"), spec("b")], headroom_read_interval=0.05)
    for room in (0.9, 0.2):
        lease = ring.acquire(tried=frozenset({"b"}), model_class=SONNET)
        assert lease is not None
        answer(ring, lease, anthropic_limits(clock, room))
    assert row(ring, "a")["headroom"][SONNET]["remaining"] == 0.9  # the second answer came too soon
    clock.advance(0.05)
    lease = ring.acquire(tried=frozenset({"b"}), model_class=SONNET)
    assert lease is not None
    answer(ring, lease, anthropic_limits(clock, 0.2))
    assert row(ring, "a")["headroom"][SONNET]["remaining"] == 0.2
    # A class without a reading is read at once.
    lease = ring.acquire(tried=frozenset({"b"}), model_class=OPUS)
    assert lease is not None
    answer(ring, lease, anthropic_limits(clock, 0.4))
    assert row(ring, "a")["headroom"][OPUS]["remaining"] == 0.4


class ReadCounted(dict[bytes, bytes]):
    """A head that counts the ring's reads of it."""

    reads = 0

    def get(self, name: bytes, default: object = None) -> object:  # type: ignore[override]
        ReadCounted.reads += 1
        return super().get(name, default)


def answer_counted(ring: KeyRing, model_class: str, headers: Headers) -> bool:
    """One answer from key a; whether the ring read its head, which
    reading_due says beforehand (a caller indexes a head only then)."""
    lease = ring.acquire(tried=frozenset({"b"}), model_class=model_class)
    assert lease is not None
    due = ring.reading_due(lease)
    before = ReadCounted.reads
    ring.observe(lease, ReadCounted(headers))
    ring.release(lease)
    read = ReadCounted.reads > before
    assert due == read
    return read


def test_heads_without_limits_are_read_once_per_interval_too() -> None:
    # An upstream (or a relay) that sends no rate-limit headers: once two
    # heads in a row had none, its heads are read once per interval, not on
    # every answer.
    ring, clock = make_ring([spec("a"), spec("b")], headroom_read_interval=0.05)
    bare = [(b"content-type", b"text/event-stream"), (b"request-id", b"req_1")]
    assert [answer_counted(ring, SONNET, bare) for _ in range(4)] == [True, True, False, False]
    # Within the interval, an answer that has limits waits for it too.
    assert not answer_counted(ring, OPUS, anthropic_limits(clock, 0.4))
    assert row(ring, "a")["headroom"] == {}
    clock.advance(0.05)
    assert answer_counted(ring, OPUS, anthropic_limits(clock, 0.4))
    assert row(ring, "a")["headroom"][OPUS]["remaining"] == 0.4
    # Limits reported: a class without a reading is read at once again.
    assert answer_counted(ring, SONNET, anthropic_limits(clock, 0.7))
    assert row(ring, "a")["headroom"][SONNET]["remaining"] == 0.7
    assert not answer_counted(ring, SONNET, anthropic_limits(clock, 0.1))
    # One head without limits (an odd answer) does not stop the next from being read.
    clock.advance(0.05)
    assert answer_counted(ring, OPUS, bare)
    assert answer_counted(ring, "haiku", anthropic_limits(clock, 0.3))
    assert row(ring, "a")["headroom"]["haiku"]["remaining"] == 0.3


def test_a_single_key_ring_reads_nothing_and_uses_its_key_whatever_its_room() -> None:
    ring, clock = make_ring([spec("a")])
    rooms = {"a": 0.01}
    assert run(ring, clock, rooms, n=3) == {"a": 3}
    assert row(ring, "a")["headroom"] == {}
    lease = ring.acquire()
    assert lease is not None and not ring.reading_due(lease)
    ring.release(lease)


# -- sessions ---------------------------------------------------------------------------------------


def test_a_session_leaves_a_key_under_the_floor_for_one_above_it() -> None:
    ring, clock = make_ring([spec("a", workspace="w"), spec("b", workspace="w"), spec("c", workspace="v")])
    lease = ring.acquire("s", tried=frozenset({"b", "c"}), model_class=SONNET)
    assert lease is not None
    answer(ring, lease, anthropic_limits(clock, 0.5))
    seed(ring, clock, {"b": 0.3, "c": 0.9})
    # Above the floor, the session keeps its key whatever the others have.
    assert run(ring, clock, {"a": 0.5, "b": 0.3, "c": 0.9}, n=5, session="s") == {"a": 5}
    # Under it: the session moves, within its workspace (the prompt cache).
    assert run(ring, clock, {"a": 0.01, "b": 0.3, "c": 0.9}, n=1, session="s") == {"a": 1}
    assert run(ring, clock, {"a": 0.01, "b": 0.3, "c": 0.9}, n=5, session="s") == {"b": 5}


def test_a_session_stays_under_the_floor_when_every_key_is_under_it() -> None:
    ring, clock = make_ring([spec("a"), spec("b")])
    seed(ring, clock, {"a": 0.01, "b": 0.03})
    lease = ring.acquire("s", tried=frozenset({"b"}), model_class=SONNET)
    assert lease is not None
    answer(ring, lease, anthropic_limits(clock, 0.01))
    # A cache is worth more than two points of room that may be gone next minute.
    assert run(ring, clock, {"a": 0.01, "b": 0.03}, n=5, session="s") == {"a": 5}


# -- a rest per model class ----------------------------------------------------------------------------


def test_a_429_for_opus_leaves_sonnet_on_the_key() -> None:
    ring, clock = make_ring([spec("a")])
    lease = ring.acquire(model_class=OPUS)
    assert lease is not None
    ring.release(lease, rate_limited(30))
    assert states(ring) == {"a": "healthy"}
    a = row(ring, "a")
    assert a["rests"] == {OPUS: pytest.approx(clock.wall() + 30)} and a["rate_limited"] == 1
    assert ring.acquire(model_class=OPUS) is None
    assert _use(ring, SONNET) == "a" and _use(ring, "haiku") == "a"
    assert ring.next_available_in(model_class=SONNET) == 0.0
    assert ring.next_available_in(model_class=OPUS) == pytest.approx(30)
    assert ring.rate_limited(model_class=OPUS) and not ring.rate_limited(model_class=SONNET)
    clock.advance(29.5)
    assert ring.acquire(model_class=OPUS) is None
    clock.advance(0.5)
    assert _use(ring, OPUS) == "a"
    assert row(ring, "a")["rests"] == {}


def test_a_429_without_a_class_rests_the_whole_key() -> None:
    ring, clock = make_ring([spec("a")])
    lease = ring.acquire()
    assert lease is not None
    ring.release(lease, rate_limited(30))
    assert states(ring) == {"a": "cooling"}
    assert ring.acquire(model_class=SONNET) is None
    assert ring.next_available_in(model_class=SONNET) == pytest.approx(30)
    assert ring.rate_limited(model_class=SONNET)


def test_a_class_rest_fails_over_to_another_key_for_that_class_only() -> None:
    ring, clock = make_ring([spec("a"), spec("b")])
    lease = ring.acquire("s", tried=frozenset({"b"}), model_class=OPUS)
    assert lease is not None
    ring.release(lease, rate_limited(30))
    assert {_use(ring, OPUS) for _ in range(4)} == {"b"}
    assert Counter(_use(ring, SONNET) for _ in range(4)) == {"a": 2, "b": 2}
    # The session's opus requests move; its key is still its key for sonnet.
    moved = ring.acquire("s", model_class=OPUS)
    assert moved is not None and moved.label == "b"
    ring.release(moved)


def test_class_rests_lengthen_and_a_whole_key_rest_counts_too() -> None:
    ring, clock = make_ring([spec("a")])
    first, second = ring.acquire(model_class=OPUS), ring.acquire(model_class=OPUS)
    assert first is not None and second is not None
    ring.release(first, rate_limited(10))
    ring.release(second, rate_limited(3))
    assert ring.next_available_in(model_class=OPUS) == pytest.approx(10)
    whole = ring.acquire()
    assert whole is not None
    ring.release(whole, rate_limited(4))
    assert states(ring) == {"a": "cooling"}
    assert ring.next_available_in(model_class=SONNET) == pytest.approx(4)
    assert ring.next_available_in(model_class=OPUS) == pytest.approx(10)
    clock.advance(4)
    assert _use(ring, SONNET) == "a"
    assert ring.acquire(model_class=OPUS) is None


def test_org_wide_cooling_rests_the_org_for_the_class_only() -> None:
    ring, clock = make_ring([spec("x1", org="x"), spec("x2", org="x"), spec("y1", org="y")], cool_whole_org=True)
    lease = ring.acquire(tried=frozenset({"x2", "y1"}), model_class=OPUS)
    assert lease is not None
    ring.release(lease, rate_limited(5))
    assert {r["label"]: set(r["rests"]) for r in ring.snapshot()} == {"x1": {OPUS}, "x2": {OPUS}, "y1": set()}
    assert {_use(ring, OPUS) for _ in range(4)} == {"y1"}
    assert {_use(ring, SONNET) for _ in range(6)} == {"x1", "x2", "y1"}
    assert row(ring, "x2")["rate_limited"] == 0


def test_enable_ends_class_rests_and_a_rotated_secret_starts_afresh() -> None:
    ring, clock = make_ring([spec("a"), spec("b")])
    for label in ("a", "b"):
        lease = ring.acquire(tried=frozenset(ring.labels) - {label}, model_class=OPUS)
        assert lease is not None
        answer(ring, lease, anthropic_limits(clock, 0.2), rate_limited(60))
    ring.disable("a")
    ring.enable("a")
    assert row(ring, "a")["rests"] == {}
    # What the vendor said of the key's room stays: the operator did not change it.
    assert set(row(ring, "a")["headroom"]) == {OPUS}
    ring.replace_specs([spec("a"), KeySpec(secret="sk-rotated-b", label="b")])
    assert row(ring, "b")["rests"] == {} and row(ring, "b")["headroom"] == {}


def test_a_class_429_counts_as_the_vendor_answering_for_the_circuit() -> None:
    ring, clock = make_ring([spec("a")], circuit_threshold=2)
    lease = ring.acquire(model_class=SONNET)
    assert lease is not None
    ring.release(lease, SERVER_ERROR)
    assert row(ring, "a")["consecutive_failures"] == 1
    lease = ring.acquire(model_class=OPUS)
    assert lease is not None
    ring.release(lease, rate_limited(5))
    assert row(ring, "a")["consecutive_failures"] == 0 and states(ring) == {"a": "healthy"}


async def test_waits_are_per_class() -> None:
    ring = KeyRing("a", [spec("a")], KeyPolicy())
    lease = ring.acquire(model_class=OPUS)
    assert lease is not None
    ring.release(lease, rate_limited(0.1))
    loop = asyncio.get_running_loop()
    started = loop.time()
    # A sonnet request does not wait for the opus rest.
    assert await ring.wait_available(timeout=5.0, model_class=SONNET)
    assert loop.time() - started < 0.05
    assert not await ring.wait_available(timeout=0.02, model_class=OPUS)
    assert await ring.wait_available(timeout=5.0, model_class=OPUS)
    assert loop.time() - started >= 0.09
    assert ring.acquire(model_class=OPUS) is not None


# -- the log -----------------------------------------------------------------------------------------


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    logger = logging.getLogger("hubcore.keys")
    captured: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = captured.append  # type: ignore[method-assign]
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield captured
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_class_rest_is_one_line_when_it_starts(records: list[logging.LogRecord]) -> None:
    ring, clock = make_ring([spec("a", org="x"), spec("b", org="x")], cool_whole_org=True)
    leases = [ring.acquire(tried=frozenset({"b"}), model_class=OPUS) for _ in range(3)]
    for lease in leases:
        assert lease is not None
        ring.release(lease, rate_limited(30))
    lines = [(r.label, r.model_class, r.old_state, r.new_state, r.reason) for r in records]  # type: ignore[attr-defined]
    # The class's change of state; the key's own stays healthy, and says nothing.
    assert lines == [
        ("a", OPUS, "healthy", "cooling", "vendor 429, retry-after 30s"),
        ("b", OPUS, "healthy", "cooling", "vendor 429 on key a of the same org, 30s rest"),
    ]
    assert all(r.levelno == logging.INFO for r in records)
    assert records[0].getMessage() == "upstream anthropic key a (opus): healthy -> cooling (vendor 429, retry-after 30s)"
    records.clear()
    clock.advance(30)
    assert _use(ring, OPUS) in ("a", "b")
    assert sorted((r.label, r.model_class, r.old_state, r.new_state, r.reason) for r in records) == [  # type: ignore[attr-defined]
        ("a", OPUS, "cooling", "healthy", "rest over"), ("b", OPUS, "cooling", "healthy", "rest over"),
    ]


# -- the policy --------------------------------------------------------------------------------------


@pytest.mark.parametrize("floor", [-0.01, 1.0, 1.5, float("nan")])
def test_the_floor_must_be_a_fraction_below_one(floor: float) -> None:
    with pytest.raises(ValueError, match="headroom_floor"):
        KeyPolicy(headroom_floor=floor)


def test_the_floor_is_an_upstream_setting() -> None:
    upstream = {"name": "anthropic", "kind": "anthropic", "base_url": "http://127.0.0.1:9", "keys": ["sk-x"]}
    assert KeyPolicy().headroom_floor == 0.05
    parsed = config_mod.parse({"upstream": [{**upstream, "headroom_floor": 0.2}]}, source="<t>", env={})
    assert parsed.upstreams[0].policy.headroom_floor == 0.2
    with pytest.raises(ConfigError, match=r"upstream\[0\].*headroom_floor"):
        config_mod.parse({"upstream": [{**upstream, "headroom_floor": 1}]}, source="<t>", env={})


def test_a_client_naming_models_at_random_cannot_grow_a_keys_rests() -> None:
    ring, clock = make_ring([spec("a")])
    leases = [ring.acquire(model_class=f"model-{i}") for i in range(MAX_CLASSES + 1)]
    for lease in leases:
        assert lease is not None
        ring.release(lease, rate_limited(30))
    a = row(ring, "a")
    # The class past the bound rested the whole key instead.
    assert len(a["rests"]) == MAX_CLASSES and a["state"] == "cooling"


def test_with_the_floor_off_a_session_still_leaves_a_key_with_nothing_left() -> None:
    ring, clock = make_ring([spec("a"), spec("b")], headroom_floor=0.0)
    lease = ring.acquire("s", tried=frozenset({"b"}), model_class=SONNET)
    assert lease is not None
    answer(ring, lease, anthropic_limits(clock, 0.0))
    assert run(ring, clock, {"a": 0.0, "b": 0.5}, n=3, session="s") == {"b": 3}
