"""The dashboard's sign-in throttle, sans-IO: it is told of failures and
successes and asked whether an attempt may go ahead; the caller passes the
time (or the clock it was given supplies it).

Theory of operation: failures are counted per address and per name, each in
a sliding window. The MAX_FAILURES-th failure within WINDOW_SECONDS locks
that address (or name) for LOCKOUT_SECONDS; an attempt is refused while
either its address or its name is locked. Counting the name as well stops a
guesser that spreads over many addresses; counting the address stops one
that spreads over many names. The price: anyone can lock a name out for a
while by failing at it, which the operator sees as refused sign-ins and
outlasts. A success clears its name's failures, not its address's: an
account of one's own must not reset a count of guesses at others.

Memory is bounded: at most `max_tracked` addresses and as many names are
remembered, the least recently touched forgotten first (each attempt touches
its entries, so an address that keeps trying stays).
"""
from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

MAX_FAILURES = 10
WINDOW_SECONDS = 5 * 60.0
LOCKOUT_SECONDS = 15 * 60.0
# Some 100 bytes per entry: a few MB at most, however many addresses try.
MAX_TRACKED = 10_000


class _Record:
    __slots__ = ("failures", "locked_until")

    def __init__(self) -> None:
        self.failures: deque[float] = deque(maxlen=MAX_FAILURES)
        self.locked_until = 0.0


class _Tracked:
    """Records by key, least recently touched first, at most `cap` of them."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.records: OrderedDict[str, _Record] = OrderedDict()

    def touch(self, key: str) -> _Record | None:
        record = self.records.get(key)
        if record is not None:
            self.records.move_to_end(key)
        return record

    def touch_or_add(self, key: str) -> _Record:
        record = self.touch(key)
        if record is None:
            record = self.records[key] = _Record()
            while len(self.records) > self.cap:
                self.records.popitem(last=False)
        return record


class SignInThrottle:
    def __init__(
        self, clock: Callable[[], float] = time.monotonic, *,
        max_failures: int = MAX_FAILURES, window: float = WINDOW_SECONDS,
        lockout: float = LOCKOUT_SECONDS, max_tracked: int = MAX_TRACKED,
    ) -> None:
        if not 1 <= max_failures <= MAX_FAILURES:
            # The failure deques are bounded by MAX_FAILURES.
            raise ValueError(f"max_failures must be 1..{MAX_FAILURES}, not {max_failures}")
        self.clock = clock
        self.max_failures = max_failures
        self.window = window
        self.lockout = lockout
        self._addresses = _Tracked(max_tracked)
        self._names = _Tracked(max_tracked)

    def tracked(self) -> tuple[int, int]:
        """(addresses, names) remembered now."""
        return len(self._addresses.records), len(self._names.records)

    def allowed(self, address: str, name: str, now: float | None = None) -> float | None:
        """None: the attempt may go ahead; else the seconds until it may."""
        at = self.clock() if now is None else now
        wait = 0.0
        for record in (self._addresses.touch(address), self._names.touch(name)):
            if record is not None and record.locked_until > at:
                wait = max(wait, record.locked_until - at)
        return wait or None

    def failed(self, address: str, name: str, now: float | None = None) -> bool:
        """An attempt from `address` for `name` failed; True when this
        failure locked the address or the name (worth an audit row)."""
        at = self.clock() if now is None else now
        locked = False
        for record in (self._addresses.touch_or_add(address), self._names.touch_or_add(name)):
            failures = record.failures
            while failures and failures[0] <= at - self.window:
                failures.popleft()
            failures.append(at)
            if len(failures) >= self.max_failures:
                record.locked_until = at + self.lockout
                failures.clear()
                locked = True
        return locked

    def succeeded(self, address: str, name: str) -> None:
        """An attempt from `address` for `name` succeeded: the name's failures
        are forgotten (see the module's docstring for why not the address's)."""
        self._names.records.pop(name, None)
