"""Timeouts for many connections, checked by one timer.

A connection passes through several timed phases per request (head, body,
keep-alive on the client side; first byte, stream idle, pooled on the
vendor side). One `call_later` and one `cancel` per phase cost about 3 µs
each on uvloop: six per proxied request, most of them on the path a client
waits on. Instead each connection only stores when it must next be looked
at (`deadline`, loop time; 0.0 for never), and a `Sweeper` looks at all of
them every `interval`: a timeout fires up to one interval late, which is why
the interval is a small fraction of the shortest timeout.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Protocol

# Bounds of the sweep interval: fine enough for test-sized timeouts, coarse
# enough that an idle hub wakes twice a second at most.
MIN_INTERVAL = 0.01
MAX_INTERVAL = 0.5


class Timed(Protocol):
    deadline: float

    def on_deadline(self, now: float) -> None:
        """`deadline` has passed: time the connection out, or set a later
        deadline if it was active meanwhile."""


def sweep_interval(*timeouts: float) -> float:
    """A tenth of the shortest positive timeout, within the bounds."""
    positive = [t for t in timeouts if t > 0]
    if not positive:
        return MAX_INTERVAL
    return min(MAX_INTERVAL, max(MIN_INTERVAL, min(positive) / 10))


class Sweeper:
    """Calls `on_deadline` of every member whose deadline has passed, every
    `interval` while there are members (`members()` lists them)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float, members: Callable[[], Iterable[Timed]]) -> None:
        self.loop = loop
        self.interval = interval
        self.members = members
        self.handle: asyncio.TimerHandle | None = None
        self.stopped = False

    def start(self) -> None:
        """Sweep from now on (a no-op while sweeping)."""
        if self.handle is None and not self.stopped:
            self.handle = self.loop.call_later(self.interval, self._sweep)

    def stop(self) -> None:
        self.stopped = True
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _sweep(self) -> None:
        self.handle = None
        now = self.loop.time()
        members = list(self.members())
        for member in members:
            deadline = member.deadline
            if 0.0 < deadline <= now:
                member.on_deadline(now)
        if members:
            self.start()
