"""The one rule by which the hub spreads requests over what it may send them
to, keys of a ring (routing.keys) and upstreams of a tier (routing.router)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, TypeVar

__all__ = ["Balanced", "least_loaded"]


class Balanced(Protocol):
    @property
    def in_flight(self) -> int: ...  # requests out on it now
    current: float  # its smooth weighted round-robin accumulator


B = TypeVar("B", bound=Balanced)


def least_loaded(candidates: Sequence[B], shares: Sequence[float]) -> B:
    """The candidate for the next request, given each one's share of the
    traffic (weight, times the room its rate limits leave for keys).

    The least loaded by share, where one is less loaded than another only if
    it stays so with this request on it (in_flight + 1); the rest are tied
    and smooth weighted round-robin picks among them. Sequential traffic is
    all ties, so it splits exactly by share; concurrent traffic spreads by
    load. (nginx's least_conn compares in_flight alone: a candidate with 5%
    of the share would take every request that finds the other one busy,
    half the traffic at two requests in flight.)
    """
    if len(candidates) == 1:
        return candidates[0]
    lightest = math.inf
    for candidate, share in zip(candidates, shares):
        after = (candidate.in_flight + 1) / share
        if after < lightest:
            lightest = after
    total = 0.0
    chosen: B | None = None
    for candidate, share in zip(candidates, shares):
        if candidate.in_flight / share < lightest:
            candidate.current += share
            total += share
            if chosen is None or candidate.current > chosen.current:
                chosen = candidate
    assert chosen is not None  # the lightest is always below its own load after this request
    chosen.current -= total
    return chosen
