"""Choosing among several upstreams of one kind (router.py)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from hubcore.routing.router import Router


@dataclass
class Up:
    name: str
    priority: int = 0
    weight: int = 1
    group: str = "default"
    models: tuple[str, ...] = ()
    failback: str = "sticky"
    in_flight: int = 0
    up: bool = True

    def usable(self) -> bool:
        return self.up


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def names(router: Router, n: int, **kw: object) -> Counter[str]:
    chosen = Counter[str]()
    for _ in range(n):
        u = router.choose("claude-sonnet-4-6", **kw)  # type: ignore[arg-type]
        assert u is not None
        chosen[u.name] += 1
    return chosen


def test_the_best_usable_tier_wins_and_failover_goes_down_the_tiers() -> None:
    primary, backup, last = Up("primary"), Up("backup", priority=1), Up("last", priority=2)
    router = Router([last, backup, primary])
    assert names(router, 5) == {"primary": 5}
    primary.up = False
    assert names(router, 5) == {"backup": 5}
    primary.up = True
    assert router.choose("m", tried={"primary"}) is backup
    assert router.choose("m", tried={"primary", "backup"}) is last
    assert router.choose("m", tried={"primary", "backup", "last"}) is None


def test_within_a_tier_sequential_traffic_splits_by_weight() -> None:
    router = Router([Up("a", weight=3), Up("b", weight=1)])
    assert names(router, 400) == {"a": 300, "b": 100}


def test_within_a_tier_the_least_loaded_per_weight_wins() -> None:
    a, b = Up("a", weight=2, in_flight=4), Up("b", weight=1, in_flight=1)
    router = Router([a, b])
    assert router.choose("m") is b  # 1/1 < 4/2
    b.in_flight = 3
    assert router.choose("m") is a  # 4/2 < 3/1


def test_models_and_groups_narrow_the_candidates() -> None:
    relay = Up("relay", models=("claude-sonnet-*",), group="cheap")
    vendor = Up("vendor", priority=1)
    router = Router([relay, vendor])
    assert router.choose("claude-sonnet-4-6") is relay
    assert router.choose("claude-opus-4-6") is vendor
    assert router.choose("claude-sonnet-4-6", groups=frozenset({"default"})) is vendor
    assert router.choose("claude-opus-4-6", groups=frozenset({"cheap"})) is None
    # A body without a model is no model's: no glob leaves an upstream out
    # (the vendor answers the body as it is).
    assert router.choose(None) is relay


def test_a_session_keeps_its_fallback_until_its_affinity_lapses() -> None:
    clock = Clock()
    primary, backup = Up("primary"), Up("backup", priority=1)
    router = Router([primary, backup], affinity_ttl=60, clock=clock)
    primary.up = False
    assert router.choose("m", session_id="s1") is backup
    primary.up = True
    assert router.choose("m", session_id="s1") is backup  # its prompt cache lives there
    assert router.choose("m", session_id="s2") is primary  # new sessions go back at once
    assert router.choose("m") is primary
    clock.now += 61
    assert router.choose("m", session_id="s1") is primary


def test_failback_immediate_moves_sessions_back_at_once() -> None:
    primary, backup = Up("primary", failback="immediate"), Up("backup", priority=1)
    router = Router([primary, backup])
    primary.up = False
    assert router.choose("m", session_id="s1") is backup
    primary.up = True
    assert router.choose("m", session_id="s1") is primary


def test_a_session_leaves_an_upstream_that_is_no_longer_usable() -> None:
    a, b = Up("a"), Up("b")
    router = Router([a, b])
    first = router.choose("m", session_id="s")
    assert first is not None
    other = b if first is a else a
    assert all(router.choose("m", session_id="s") is first for _ in range(5))
    first.up = False  # type: ignore[union-attr]
    assert router.choose("m", session_id="s") is other


def test_explain_says_why_each_upstream_is_left_out() -> None:
    rows = Router([
        Up("relay", models=("claude-sonnet-*",)),
        Up("a", priority=1, weight=3), Up("b", priority=1, weight=1), Up("down", priority=1, up=False),
        Up("fallback", priority=2), Up("team", group="research"),
    ]).explain("claude-opus-4-6", groups=frozenset({"default"}))
    by_name = {row.name: row for row in rows}
    assert "does not serve 'claude-opus-4-6'" in (by_name["relay"].excluded or "")
    assert "group 'research'" in (by_name["team"].excluded or "")
    assert "no usable key" in (by_name["down"].excluded or "")
    assert "tier 1 has a usable upstream" in (by_name["fallback"].excluded or "")
    assert (by_name["a"].probability, by_name["b"].probability) == (0.75, 0.25)
    assert [row.name for row in rows][:1] == ["relay"]


def test_one_unrestricted_upstream_is_the_single_choice() -> None:
    only = Up("only")
    assert Router([only]).single is only
    assert Router([Up("x", models=("gpt-*",))]).single is None
    assert Router([Up("x"), Up("y")]).single is None
