"""The bench's round order (bench/latency_tax.round_order): over a full set
of rounds every path runs once in each place and right after every other
path equally often, so that neither the place nor the path run just before
favours one."""
from __future__ import annotations

from collections import Counter

import pytest

from bench.latency_tax import round_order


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_each_path_has_each_place_and_each_predecessor_equally(n: int) -> None:
    paths = [f"p{i}" for i in range(n)]
    rounds = [round_order(paths, r) for r in range(n if n % 2 == 0 else 2 * n)]
    assert all(sorted(order) == paths for order in rounds)
    places = Counter((place, path) for order in rounds for place, path in enumerate(order))
    assert set(places.values()) == {len(rounds) // n} and len(places) == n * n
    after = Counter(pair for order in rounds for pair in zip(order, order[1:]))
    assert len(after) == n * (n - 1) and len(set(after.values())) == 1
