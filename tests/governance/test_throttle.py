"""SignInThrottle with a fake clock: ten failures within five minutes, from
one address or for one name, lock further attempts for fifteen minutes; the
memory it keeps is bounded."""
from __future__ import annotations

import pytest

from hubcore.governance.throttle import LOCKOUT_SECONDS, MAX_FAILURES, WINDOW_SECONDS, SignInThrottle


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def fail_times(throttle: SignInThrottle, address: str, name: str, times: int, now: float) -> None:
    for _ in range(times):
        assert throttle.allowed(address, name, now) is None
        throttle.failed(address, name, now)


def test_the_tenth_failure_from_one_address_locks_it_for_fifteen_minutes() -> None:
    throttle = SignInThrottle(FakeClock())
    for n in range(MAX_FAILURES):
        # A different name each time: the address alone is counted.
        assert throttle.allowed("10.0.0.1", f"name{n}", 1000.0 + n) is None
        throttle.failed("10.0.0.1", f"name{n}", 1000.0 + n)
    locked_at = 1000.0 + MAX_FAILURES - 1
    assert throttle.allowed("10.0.0.1", "anyone", locked_at) == pytest.approx(LOCKOUT_SECONDS)
    assert throttle.allowed("10.0.0.1", "anyone", locked_at + 600) == pytest.approx(LOCKOUT_SECONDS - 600)
    # Another address, another name: not locked.
    assert throttle.allowed("10.0.0.2", "other", locked_at) is None
    assert throttle.allowed("10.0.0.1", "anyone", locked_at + LOCKOUT_SECONDS) is None


def test_the_tenth_failure_for_one_name_locks_it_from_every_address() -> None:
    throttle = SignInThrottle(FakeClock())
    for n in range(MAX_FAILURES):
        throttle.failed(f"10.0.1.{n}", "alice", 1000.0)
    assert throttle.allowed("192.0.2.7", "alice", 1000.0) == pytest.approx(LOCKOUT_SECONDS)
    assert throttle.allowed("192.0.2.7", "bob", 1000.0) is None


def test_failures_older_than_the_window_do_not_count() -> None:
    throttle = SignInThrottle(FakeClock())
    fail_times(throttle, "10.0.0.1", "alice", MAX_FAILURES - 1, 1000.0)
    # The nine failures leave the window; one more is the first of a new count.
    throttle.failed("10.0.0.1", "alice", 1000.0 + WINDOW_SECONDS + 1)
    assert throttle.allowed("10.0.0.1", "alice", 1000.0 + WINDOW_SECONDS + 1) is None


def test_nine_failures_do_not_lock() -> None:
    throttle = SignInThrottle(FakeClock())
    fail_times(throttle, "10.0.0.1", "alice", MAX_FAILURES - 1, 1000.0)
    assert throttle.allowed("10.0.0.1", "alice", 1000.0) is None


def test_success_clears_the_names_failures_but_not_the_addresses() -> None:
    throttle = SignInThrottle(FakeClock())
    fail_times(throttle, "10.0.0.1", "alice", MAX_FAILURES - 1, 1000.0)
    throttle.succeeded("10.0.0.1", "alice")
    # alice starts again from 0, from another address...
    throttle.failed("10.0.0.9", "alice", 1001.0)
    assert throttle.allowed("10.0.0.9", "alice", 1001.0) is None
    # ...but the address that failed nine times has one attempt left: a
    # success with an account of one's own does not reset guessing at others.
    throttle.failed("10.0.0.1", "bob", 1001.0)
    assert throttle.allowed("10.0.0.1", "carol", 1001.0) == pytest.approx(LOCKOUT_SECONDS)


def test_now_defaults_to_the_clock() -> None:
    clock = FakeClock(5000.0)
    throttle = SignInThrottle(clock)
    for _ in range(MAX_FAILURES):
        throttle.failed("10.0.0.1", "alice")
    assert throttle.allowed("10.0.0.1", "alice") == pytest.approx(LOCKOUT_SECONDS)
    clock.now += 60
    assert throttle.allowed("10.0.0.1", "alice") == pytest.approx(LOCKOUT_SECONDS - 60)


def test_memory_is_bounded_and_the_oldest_entries_go_first() -> None:
    throttle = SignInThrottle(FakeClock(), max_tracked=100)
    for n in range(MAX_FAILURES):
        throttle.failed("10.9.9.9", f"early{n}", 1000.0)
    assert throttle.allowed("10.9.9.9", "x", 1000.0) is not None
    for n in range(1000):
        throttle.failed(f"10.{n // 256}.{n % 256}.1", f"user{n}", 1001.0)
    assert throttle.tracked() <= (100, 100)
    # The oldest (the locked address) was evicted; the newest are kept.
    assert throttle.allowed("10.9.9.9", "x", 1001.0) is None
    for _ in range(MAX_FAILURES - 1):
        throttle.failed("10.3.231.1", "user999", 1001.0)
    assert throttle.allowed("10.3.231.1", "user999", 1001.0) is not None


def test_a_locked_entry_refreshed_by_attempts_is_not_the_oldest() -> None:
    throttle = SignInThrottle(FakeClock(), max_tracked=10)
    fail_times(throttle, "10.0.0.1", "alice", MAX_FAILURES, 1000.0)
    for n in range(9):
        throttle.failed(f"10.1.0.{n}", f"u{n}", 1000.0)
        # Each refused attempt touches the locked entries.
        assert throttle.allowed("10.0.0.1", "alice", 1000.0) is not None
    throttle.failed("10.2.0.0", "v", 1000.0)
    assert throttle.allowed("10.0.0.1", "alice", 1000.0) is not None
