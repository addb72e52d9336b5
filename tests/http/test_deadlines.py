"""The sweeper that times out connections with one timer (hubcore.deadlines);
the connections' own timeout rules are tested end to end in test_server,
test_failover and test_proxy."""
from __future__ import annotations

import asyncio

from hubcore.http.deadlines import MAX_INTERVAL, MIN_INTERVAL, Sweeper, sweep_interval


class Member:
    def __init__(self, deadline: float, extend_by: float = 0.0) -> None:
        self.deadline = deadline
        self.extend_by = extend_by
        self.called: list[float] = []

    def on_deadline(self, now: float) -> None:
        self.called.append(now)
        # Like a stream that was active meanwhile: look again later, once.
        self.deadline = now + self.extend_by if self.extend_by and len(self.called) == 1 else 0.0


def test_interval_is_a_tenth_of_the_shortest_timeout_within_bounds() -> None:
    assert sweep_interval(10.0, 60.0, 75.0) == MAX_INTERVAL
    assert sweep_interval(0.5, 60.0) == 0.05
    assert sweep_interval(0.0, 0.2) == 0.02  # 0 means no timeout
    assert sweep_interval(0.001) == MIN_INTERVAL
    assert sweep_interval() == sweep_interval(0.0) == MAX_INTERVAL


async def test_calls_only_members_whose_deadline_passed_and_stops_when_none_are_left() -> None:
    loop = asyncio.get_running_loop()
    now = loop.time()
    due, later, never, again = Member(now + 0.01), Member(now + 60), Member(0.0), Member(now + 0.01, extend_by=0.05)
    members = {due, later, never, again}
    sweeper = Sweeper(loop, 0.02, lambda: members)
    sweeper.start()
    sweeper.start()  # no second timer
    await asyncio.sleep(0.2)
    assert len(due.called) == 1 and due.deadline == 0.0
    assert later.called == [] and never.called == []
    assert len(again.called) == 2 and again.called[1] - again.called[0] >= 0.05
    assert sweeper.handle is not None  # members remain: still sweeping
    members.clear()
    await asyncio.sleep(0.1)
    assert sweeper.handle is None  # nothing to look at: no wake-ups
    members.add(Member(loop.time() + 0.01))
    sweeper.start()
    await asyncio.sleep(0.1)
    assert all(len(m.called) == 1 for m in members)
    sweeper.stop()
    sweeper.start()  # stopped for good (shutdown)
    assert sweeper.handle is None
