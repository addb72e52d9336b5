"""The key ring's word on each key: one `hubcore.keys` log line per change of
a key's state (label, upstream, old and new state, reason; never the
secret), none for an event that leaves the state as it was; and what the
operator's enable and disable do, including over a reload."""
from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from hubcore.routing.failures import classify
from hubcore.routing.keys import KeyRing, KeySpec, KeyState
from tests.routing.test_keys import (
    AUTH_FAILED,
    CLIENT_ABORTED,
    SERVER_ERROR,
    make_ring,
    probe,
    rate_limited,
    row,
    spec,
    states,
    use,
)

FIELDS = ("label", "upstream", "old_state", "new_state", "reason")


class Captured(logging.Handler):
    """Every record of one logger, attached to it directly so that no
    propagation setting elsewhere in the process can hide one."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def changes(self, min_level: int = logging.DEBUG) -> list[tuple[str, str, str, str]]:
        """(label, old, new, reason) of each record at `min_level` or above."""
        return [
            (r.label, r.old_state, r.new_state, r.reason)  # type: ignore[attr-defined]
            for r in self.records
            if r.levelno >= min_level
        ]

    def clear(self) -> None:
        self.records.clear()


@pytest.fixture
def captured() -> Iterator[Captured]:
    logger = logging.getLogger("hubcore.keys")
    handler = Captured()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_vendor_401_is_one_line_with_every_field_and_no_secret(captured: Captured) -> None:
    ring, _ = make_ring([spec("a"), spec("b")])
    lease = ring.acquire(tried=frozenset({"b"}))
    assert lease is not None
    ring.release(lease, classify(401, [(b"x-api-key", b"sk-ant-secret-a")]))
    assert len(captured.records) == 1
    record = captured.records[0]
    assert record.levelno == logging.WARNING
    assert {name: getattr(record, name) for name in FIELDS} == {
        "label": "a", "upstream": "anthropic", "old_state": "healthy", "new_state": "dead", "reason": "vendor 401",
    }
    message = record.getMessage()
    for fact in ("a", "anthropic", "healthy", "dead", "vendor 401"):
        assert fact in message
    assert "sk-ant-secret" not in message
    # A dead key gets no more requests, so nothing more to say about it.
    assert {use(ring) for _ in range(5)} == {"b"}
    assert len(captured.records) == 1


def test_a_429_storm_logs_the_rest_once_and_its_end_once(captured: Captured) -> None:
    ring, clock = make_ring([spec("a")])
    use(ring, failure=rate_limited(20))
    assert captured.changes() == [("a", "healthy", "cooling", "vendor 429, retry-after 20s")]
    clock.advance(20)
    # Three requests out at once, all answered 429.
    held = [ring.acquire() for _ in range(3)]
    captured.clear()
    for lease in held:
        assert lease is not None
        ring.release(lease, rate_limited(None))
    # The first 429 starts the rest; the two after it find the key cooling.
    assert captured.changes() == [("a", "healthy", "cooling", "vendor 429, no retry-after: 10s rest")]
    clock.advance(10)
    assert states(ring) == {"a": "healthy"}
    assert captured.changes()[1:] == [("a", "cooling", "healthy", "rest over")]


def test_the_circuit_opening_names_the_failures_and_the_probe_closing_it(captured: Captured) -> None:
    ring, clock = make_ring([spec("a")], circuit_threshold=3, circuit_pause=5)
    for _ in range(3):
        use(ring, failure=SERVER_ERROR)
    assert captured.changes(logging.INFO) == [("a", "healthy", "open", "3 failures in a row, last 500 server error")]
    assert captured.records[-1].levelno == logging.WARNING
    clock.advance(5)
    probe(ring, SERVER_ERROR)  # fails: the pause doubles
    clock.advance(10)
    probe(ring)
    # The probe cycle is at DEBUG (an outage would repeat it every second);
    # what an operator needs, the circuit opening and closing, is not.
    assert captured.changes(logging.INFO) == [
        ("a", "healthy", "open", "3 failures in a row, last 500 server error"),
        ("a", "probing", "healthy", "probe ok"),
    ]
    assert captured.changes() == [
        ("a", "healthy", "open", "3 failures in a row, last 500 server error"),
        ("a", "open", "half_open", "pause over, probe due"),
        ("a", "half_open", "probing", "probe sent"),
        ("a", "probing", "open", "probe failed: 500 server error"),
        ("a", "open", "half_open", "pause over, probe due"),
        ("a", "half_open", "probing", "probe sent"),
        ("a", "probing", "healthy", "probe ok"),
    ]


def test_a_probe_without_verdict_and_org_wide_rests_say_why(captured: Captured) -> None:
    ring, clock = make_ring([spec("a", org="o"), spec("b", org="o")], cool_whole_org=True, circuit_threshold=1)
    lease = ring.acquire(tried=frozenset({"b"}))
    assert lease is not None
    ring.release(lease, rate_limited(3))
    assert captured.changes() == [
        ("a", "healthy", "cooling", "vendor 429, retry-after 3s"),
        ("b", "healthy", "cooling", "vendor 429 on key a of the same org, 3s rest"),
    ]
    clock.advance(3)
    captured.clear()
    use(ring, failure=SERVER_ERROR, tried=frozenset({"b"}))
    clock.advance(60)
    probe(ring, CLIENT_ABORTED)
    assert captured.changes()[-1] == ("a", "probing", "half_open", "probe gave no verdict")


def test_operator_enable_revives_a_dead_key_and_says_so(captured: Captured) -> None:
    ring, _ = make_ring([spec("a")])
    use(ring, failure=AUTH_FAILED)
    assert states(ring) == {"a": "dead"}
    captured.clear()
    assert ring.enable("a") is KeyState.HEALTHY
    assert captured.changes() == [("a", "dead", "healthy", "operator enable")]
    assert row(ring, "a")["consecutive_failures"] == 0
    assert use(ring) == "a"


@pytest.mark.parametrize("failure", [rate_limited(30), SERVER_ERROR], ids=["cooling", "open"])
def test_operator_enable_ends_a_rest_and_closes_a_circuit(captured: Captured, failure: object) -> None:
    ring, _ = make_ring([spec("a")], circuit_threshold=1)
    use(ring, failure=failure)  # type: ignore[arg-type]
    assert states(ring)["a"] in ("cooling", "open")
    assert ring.enable("a") is KeyState.HEALTHY
    assert row(ring, "a")["until"] is None
    assert ring.next_available_in() == 0.0 and use(ring) == "a"


def test_operator_disable_and_enable_log_once_each_and_repeat_silently(captured: Captured) -> None:
    ring, _ = make_ring([spec("a"), spec("b")])
    assert ring.disable("a") is KeyState.DISABLED
    assert ring.disable("a") is KeyState.DISABLED
    assert ring.enable("a") is KeyState.HEALTHY
    assert ring.enable("a") is KeyState.HEALTHY
    assert captured.changes() == [
        ("a", "healthy", "disabled", "operator disable"),
        ("a", "disabled", "healthy", "operator enable"),
    ]
    assert ring.disable("nope") is None and ring.enable("nope") is None


def test_a_reload_revives_dead_keys_and_says_so(captured: Captured) -> None:
    ring, _ = make_ring([spec("a")])
    use(ring, failure=AUTH_FAILED)
    captured.clear()
    ring.replace_specs([spec("a")])
    assert captured.changes() == [("a", "dead", "healthy", "reload")]


def test_the_operators_disable_sticks_to_the_label_over_reloads(captured: Captured) -> None:
    ring, _ = make_ring([spec("a"), spec("b")])
    ring.disable("a")
    # A new secret under the label, the label dropped and added back: as
    # after a restart, where the stored switch applies by label.
    ring.replace_specs([KeySpec("sk-ant-rotated", "a"), spec("b")])
    assert states(ring) == {"a": "disabled", "b": "healthy"}
    ring.replace_specs([spec("b")])
    ring.replace_specs([spec("b"), spec("a")])
    assert states(ring) == {"b": "healthy", "a": "disabled"}
    assert {use(ring) for _ in range(4)} == {"b"}
    assert ring.enable("a") is KeyState.HEALTHY
    ring.replace_specs([KeySpec("sk-ant-rotated-again", "a"), spec("b")])
    assert states(ring) == {"a": "healthy", "b": "healthy"}


def test_stored_switches_apply_to_present_labels_and_remember_absent_ones(captured: Captured) -> None:
    ring = KeyRing("anthropic", [spec("a"), spec("b")])
    ring.restore_disabled({"a", "gone"})
    assert states(ring) == {"a": "disabled", "b": "healthy"}
    assert captured.changes() == [("a", "healthy", "disabled", "operator disable, stored")]
    ring.replace_specs([spec("a"), spec("b"), spec("gone")])
    assert states(ring)["gone"] == "disabled"
