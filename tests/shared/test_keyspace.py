"""The pure parts of the shared state: key names, the admit call's layout,
the reading of key states, and an instance's share of a limit."""
from __future__ import annotations

import pytest

from hubcore.governance.limits import Limits
from hubcore.shared.keyspace import (
    SCRIPT_NAMES,
    KeyNews,
    Keyspace,
    circuit_field,
    counted,
    dead_field,
    divided,
    fingerprint,
    load_scripts,
    read_key_states,
    rest_field,
    scope_id,
    scope_part,
    share,
)

SPACE = Keyspace("hubcore")
PERIODS = (1_700_000_000.0, 1_699_800_000.0, 1_698_800_000.0)


def test_scope_names_end_every_key() -> None:
    assert scope_id("token", 12) == "t:12" and scope_id("user", "a:b") == "u:a:b" and scope_id("project", "x") == "p:x"
    assert SPACE.rpm("u:a:b") == "hubcore:rpm:u:a:b"
    assert SPACE.spend("day", "t:1", 1_700_000_000.0) == "hubcore:spend:day:1700000000:t:1"
    assert SPACE.spend("total", "t:1") == "hubcore:spend:total:t:1"
    assert Keyspace("team.a").slots("p:web") == "team.a:slots:p:web"


def test_a_long_session_id_is_keyed_by_its_hash() -> None:
    assert SPACE.session("anthropic", "s-1") == "hubcore:session:anthropic:s-1"
    long_key = SPACE.session("anthropic", "x" * 5000)
    assert long_key.startswith("hubcore:session:anthropic:sha256:") and len(long_key) < 120
    assert long_key != SPACE.session("anthropic", "x" * 5001)


def test_the_admit_layout_of_a_scope() -> None:
    limits = Limits(rpm=30, budget_day=5, budget_total=9)
    keys, args = scope_part(SPACE, "t:1", limits, PERIODS)
    assert keys == [
        "hubcore:rpm:t:1", "hubcore:slots:t:1",
        "hubcore:spend:day:1700000000:t:1", "hubcore:spend:total:t:1",
    ]
    assert args == [30, 0, 2, "day", 5, "total", 9]


@pytest.mark.parametrize(("limits", "expected"), [
    (None, False), (Limits(), False), (Limits(models=("claude-*",)), False),
    (Limits(rpm=1), True), (Limits(concurrency=1), True), (Limits(budget_5h=0), True),
])
def test_counted(limits: Limits | None, expected: bool) -> None:
    assert counted(limits) is expected


def test_key_states_read_by_label() -> None:
    news = read_key_states([
        rest_field("k1", "sonnet").encode(), 1500,
        rest_field("k1", "").encode(), 500,
        circuit_field("k2").encode(), 30000,
        dead_field("k3").encode(), fingerprint("sk-old").encode(),
    ])
    assert news["k1"] == KeyNews({"sonnet": 1.5, "": 0.5})
    assert news["k1"].resting("sonnet") == 1.5
    assert news["k1"].resting("opus") == 0.5  # the whole key rests
    assert news["k2"].circuit == 30.0 and news["k2"].resting("opus") is None
    assert news["k3"].dead_for("sk-old") and not news["k3"].dead_for("sk-new")
    assert read_key_states([]) == {}


def test_a_label_with_separators_survives() -> None:
    news = read_key_states([rest_field("team:a/key 1", "gpt-5.1").encode(), 1000])
    assert news["team:a/key 1"].resting("gpt-5.1") == 1.0


def test_fingerprint_hides_the_secret() -> None:
    secret = "sk-ant-api03-" + "x" * 40
    assert len(fingerprint(secret)) == 12 and "sk-" not in fingerprint(secret)


@pytest.mark.parametrize(("limit", "instances", "expected"), [(30, 2, 15), (31, 2, 15), (1, 3, 1), (4, 0, 4), (10, 3, 3)])
def test_share_of_a_count(limit: int, instances: int, expected: int) -> None:
    assert share(limit, instances) == expected


def test_divided_limits() -> None:
    limits = Limits(rpm=30, concurrency=4, budget_day=10, budget_total=7, models=("claude-*",), expires_at=5.0)
    assert divided(limits, 3) == Limits(rpm=10, budget_day=3, budget_total=2)
    assert divided(Limits(rpm=2), 5) == Limits(rpm=1)
    assert divided(Limits(budget_5h=0), 2) == Limits(budget_5h=0)


def test_every_script_starts_with_the_prelude() -> None:
    scripts = load_scripts()
    assert set(scripts) == set(SCRIPT_NAMES)
    for script in scripts.values():
        assert script.source.startswith("-- hubcore shared state")
        assert "redis.call('TIME')" in script.source
        assert len(script.sha) == 40
