"""Upstream groups on the principal side: a token, user or project may be
restricted to some upstream groups; a request may use the intersection of
the restrictions that are set (None: every group). Stored in the `limits`
column, loaded into `Principal.groups` with the token table, refused by the
Limiter when the intersection is empty."""
from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from hubcore import store
from hubcore.errors import ANTHROPIC, OPENAI
from hubcore.governance import storage, tokens
from hubcore.governance.limiter import Limiter, Refused
from hubcore.governance.limits import Limits, effective_groups, parse_column
from hubcore.governance.tokens import Principal, TokenTable

CHEAP = Limits(groups=("cheap",))
CHEAP_FAST = Limits(groups=("cheap", "fast"))
FAST_SLOW = Limits(groups=("fast", "slow"))
SLOW = Limits(groups=("slow",))


# -- the intersection rule ---------------------------------------------------------

def test_nothing_restricted_is_none_every_group() -> None:
    assert effective_groups(None, None, None) is None
    # Limits without a groups restriction restrict no group.
    assert effective_groups(Limits(rpm=5), None, Limits(models=("claude-*",))) is None
    assert effective_groups() is None


def test_token_only() -> None:
    assert effective_groups(CHEAP_FAST, None, None) == frozenset({"cheap", "fast"})
    assert effective_groups(CHEAP_FAST, Limits(rpm=1), None) == frozenset({"cheap", "fast"})


def test_user_only() -> None:
    assert effective_groups(None, CHEAP, None) == frozenset({"cheap"})


def test_project_only() -> None:
    assert effective_groups(None, None, SLOW) == frozenset({"slow"})


def test_all_three_intersect() -> None:
    assert effective_groups(CHEAP_FAST, FAST_SLOW, Limits(groups=("fast", "cheap", "slow"))) == frozenset({"fast"})
    assert effective_groups(CHEAP_FAST, None, FAST_SLOW) == frozenset({"fast"})


def test_an_empty_intersection_is_the_empty_set_not_none() -> None:
    groups = effective_groups(CHEAP, None, SLOW)
    assert groups is not None and groups == frozenset()
    assert effective_groups(CHEAP, FAST_SLOW, None) == frozenset()


def test_unreadable_limits_allow_no_group() -> None:
    # Fail closed: what the unreadable limits restricted is unknown.
    broken = parse_column('{"groups": "cheap"}', "user alice")
    assert broken is not None and broken.error is not None
    assert effective_groups(None, broken, None) == frozenset()


# -- the stored shape ----------------------------------------------------------------

def test_groups_round_trip_in_the_limits_json() -> None:
    limits = Limits(rpm=5, groups=("cheap", "fast"))
    text = limits.to_json()
    assert text is not None and orjson.loads(text) == {"rpm": 5, "groups": ["cheap", "fast"]}
    assert Limits.from_json(text) == limits
    only = Limits(groups=("cheap",))
    assert not only.empty and Limits.from_json(only.to_json()) == only
    # No restriction is not stored at all.
    assert Limits(rpm=5).to_dict() == {"rpm": 5}


@pytest.mark.parametrize("bad", [
    '{"groups": "cheap"}', '{"groups": [1]}', '{"groups": [""]}', '{"groups": ["a b"]}',
    '{"groups": ["' + "x" * 65 + '"]}', '{"groups": ["ok", "ok"]}',
])
def test_bad_stored_groups_are_unreadable(bad: str) -> None:
    with pytest.raises(ValueError):
        Limits.from_json(bad)


@pytest.mark.parametrize("bad", [("a/b",), ("",), ("x" * 65,), ("é",), ("cheap", "cheap")])
def test_limits_refuse_bad_group_names(bad: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        Limits(groups=bad)


# -- loaded with the token table ---------------------------------------------------------

@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = store.connect(tmp_path / "hub.db")
    yield conn
    conn.close()


def principal_of(db: sqlite3.Connection, token: str) -> Principal:
    table = TokenTable()
    table.refresh(db, force=True)
    found = table.lookup(token.encode())
    assert found is not None
    return found


def test_the_token_table_carries_each_principals_effective_groups(db: sqlite3.Connection) -> None:
    free_id, free = tokens.create(db, "bob")
    own_id, own = tokens.create(db, "carol", "p2")
    storage.write_limits(db, "token", own_id, CHEAP_FAST)
    both_id, both = tokens.create(db, "alice", "p1")
    storage.write_limits(db, "token", both_id, CHEAP_FAST)
    storage.write_limits(db, "user", "alice", FAST_SLOW)
    _, via_project = tokens.create(db, "dave", "p1")
    storage.write_limits(db, "project", "p1", Limits(rpm=9, groups=("fast", "cheap")))
    _, none_left = tokens.create(db, "alice", "p3")
    storage.write_limits(db, "project", "p3", CHEAP)

    assert principal_of(db, free).groups is None
    assert principal_of(db, own).groups == frozenset({"cheap", "fast"})
    assert principal_of(db, both).groups == frozenset({"fast"})
    assert principal_of(db, via_project).groups == frozenset({"fast", "cheap"})
    assert principal_of(db, none_left).groups == frozenset()
    # Which scope restricts what, for the refusal's message.
    assert principal_of(db, both).group_rules == (
        (f"token {both_id}", ("cheap", "fast")), ("user alice", ("fast", "slow")), ("project p1", ("fast", "cheap")),
    )
    assert principal_of(db, free).group_rules == ()


def test_a_change_to_a_users_groups_reloads_the_table(db: sqlite3.Connection) -> None:
    _, token = tokens.create(db, "alice")
    table = TokenTable()
    table.refresh(db, force=True)
    assert table.lookup(token.encode()).groups is None  # type: ignore[union-attr]
    storage.write_limits(db, "user", "alice", CHEAP)
    assert table.refresh(db)  # the users trigger moved the tokens generation
    assert table.lookup(token.encode()).groups == frozenset({"cheap"})  # type: ignore[union-attr]
    storage.write_limits(db, "user", "alice", None)
    assert table.refresh(db)
    assert table.lookup(token.encode()).groups is None  # type: ignore[union-attr]


def test_unreadable_user_limits_leave_the_principal_no_group(db: sqlite3.Connection) -> None:
    _, token = tokens.create(db, "alice")
    db.execute(
        "INSERT INTO users (name, limits, created_at, updated_at) VALUES ('alice', '{\"groups\": 5}', 0, 0)"
    )
    assert principal_of(db, token).groups == frozenset()


# -- the refusal ---------------------------------------------------------------------------

def test_admit_refuses_an_empty_intersection_naming_the_groups(db: sqlite3.Connection) -> None:
    token_id, token = tokens.create(db, "alice", "p1")
    storage.write_limits(db, "token", token_id, CHEAP)
    storage.write_limits(db, "project", "p1", FAST_SLOW)
    limiter = Limiter()
    limiter.reload(db)
    principal = principal_of(db, token)
    with pytest.raises(Refused) as info:
        limiter.admit(principal, "claude-sonnet-4-6")
    error = info.value
    assert (error.status, error.error_type, error.code, error.limit) == (
        403, "permission_error", "no_upstream_group", "groups"
    )
    assert error.scope == f"token {token_id}"
    assert error.message == (
        f"token {token_id} may use no upstream group: token {token_id} allows cheap; "
        "project p1 allows fast,slow; no group is allowed by all of them"
    )
    assert orjson.loads(error.body(ANTHROPIC)) == {
        "type": "error", "error": {"type": "permission_error", "message": error.message},
    }
    assert orjson.loads(error.body(OPENAI))["error"]["code"] == "no_upstream_group"
    # Nothing was counted for the refused request.
    assert limiter.in_flight("token", token_id) == 0


def test_admit_lets_a_restricted_principal_with_a_group_through(db: sqlite3.Connection) -> None:
    token_id, token = tokens.create(db, "alice", "p1")
    storage.write_limits(db, "token", token_id, CHEAP_FAST)
    storage.write_limits(db, "project", "p1", FAST_SLOW)
    limiter = Limiter()
    limiter.reload(db)
    admission = limiter.admit(principal_of(db, token), "claude-sonnet-4-6")
    assert limiter.in_flight("project", "p1") == 1
    admission.release()


def test_expiry_is_refused_before_the_groups() -> None:
    principal = Principal(
        token_id=1, user="alice", project=None, prefix="hc-x",
        limits=Limits(expires_at=1.0, groups=("cheap",)), groups=frozenset(),
        group_rules=(("token 1", ("cheap",)),),
    )
    with pytest.raises(Refused) as info:
        Limiter().admit(principal, None, 10.0)
    assert info.value.limit == "expires_at"


def test_a_table_newer_than_the_limiters_limits_still_refuses() -> None:
    # The token table reloads before Limiter.update(): a user's groups may
    # already empty the principal's while the Limiter knows no limits of it.
    principal = Principal(
        token_id=1, user="alice", project=None, prefix="hc-x",
        groups=frozenset(), group_rules=(("token 1", ("cheap",)), ("user alice", ("fast",))),
    )
    with pytest.raises(Refused) as info:
        Limiter().admit(principal, None, 10.0)
    assert info.value.message == (
        "token 1 may use no upstream group: token 1 allows cheap; user alice allows fast; "
        "no group is allowed by all of them"
    )


def test_a_restriction_alone_admits_and_counts_as_usual() -> None:
    limiter = Limiter()
    principal = Principal(token_id=1, user="alice", project=None, prefix="hc-x",
                          limits=CHEAP, groups=frozenset({"cheap"}), group_rules=(("token 1", ("cheap",)),))
    admission = limiter.admit(principal, "claude-sonnet-4-6", 10.0)
    assert limiter.in_flight("user", "alice") == 1
    admission.release()
    assert not limiter.needs_model(principal)
