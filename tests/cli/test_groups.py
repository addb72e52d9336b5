"""`--groups` on `token create|update` and `user|project set`: which upstream
groups a token, user or project may use, as a real subprocess on a real
SQLite file; shown by `token show|list` and `user|project show|list`, in
text and JSON; and a change that reaches a running hub before the command
returns (the hub polls once an hour here)."""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest

from hubcore import config as config_mod, store
from hubcore.governance.tokens import Principal
from tests.fakevendor import ANTHROPIC_KEY, FakeVendor
from tests.hubharness import REPO, HubThread, hubcore_cmd

POLL_NEVER = 3600
MODEL = "claude-sonnet-4-6"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="hc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def config(tmp_path: Path, sock_dir: Path) -> Path:
    path = tmp_path / "hubcore.toml"
    path.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\ndatabase = "{tmp_path / "hub.db"}"\n'
        f'ops_socket = "{sock_dir / "ops.sock"}"\ntoken_reload_interval = {POLL_NEVER}\n'
        "usage_flush_interval = 0.05\n"
    )
    # The database of a hub that has run once (commands create none unasked).
    store.connect(tmp_path / "hub.db").close()
    return path


@pytest.fixture
def db(tmp_path: Path, config: Path) -> Iterator[sqlite3.Connection]:
    conn = store.connect(tmp_path / "hub.db")
    yield conn
    conn.close()


def hubcore(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUBCORE_", "NOTIFY_SOCKET"))}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(hubcore_cmd(*args, "--config", str(config)), capture_output=True, text=True, env=env, timeout=60)


def ok(config: Path, *args: str) -> str:
    done = hubcore(config, *args)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hubcore: database "), done.stderr
    return done.stdout


def as_json(config: Path, *args: str) -> Any:
    return orjson.loads(ok(config, *args, "--json"))


def create(config: Path, *flags: str) -> int:
    made: dict[str, Any] = orjson.loads(ok(config, "token", "create", "--user", "alice", "--json", *flags))
    return int(made["id"])


# -- tokens ----------------------------------------------------------------------------

def test_token_create_with_groups_shows_them_everywhere(config: Path) -> None:
    token_id = create(config, "--groups", "cheap,fast", "--rpm", "5")
    shown = as_json(config, "token", "show", str(token_id))
    assert shown["groups"] == ["cheap", "fast"] and shown["effective_groups"] == ["cheap", "fast"]
    assert shown["limits"] == {"rpm": 5, "groups": ["cheap", "fast"]}
    listed = as_json(config, "token", "list")
    assert [(t["id"], t["groups"]) for t in listed] == [(token_id, ["cheap", "fast"])]
    text = ok(config, "token", "show", str(token_id))
    assert "limits:          rpm 5, groups cheap,fast\n" in text
    assert "upstream groups: cheap,fast\n" in text
    row = ok(config, "token", "list").splitlines()[1]
    assert row.endswith("rpm 5, groups cheap,fast")


def test_an_unrestricted_token_has_null_groups(config: Path) -> None:
    token_id = create(config)
    shown = as_json(config, "token", "show", str(token_id))
    assert shown["groups"] is None and shown["effective_groups"] is None
    # An unrestricted token's show has no groups line.
    assert "upstream groups" not in ok(config, "token", "show", str(token_id))
    assert as_json(config, "token", "list")[0]["groups"] is None


def test_token_update_replaces_and_none_clears_keeping_other_limits(config: Path) -> None:
    token_id = create(config, "--groups", "cheap", "--rpm", "5")
    updated = as_json(config, "token", "update", str(token_id), "--groups", " fast , slow ")
    assert updated["groups"] == ["fast", "slow"] and updated["limits"] == {"rpm": 5, "groups": ["fast", "slow"]}
    assert ok(config, "token", "update", str(token_id), "--groups", "slow") == (
        f"updated token {token_id}: rpm 5, groups slow\n"
    )
    assert ok(config, "token", "update", str(token_id), "--groups", "none") == f"updated token {token_id}: rpm 5\n"
    shown = as_json(config, "token", "show", str(token_id))
    assert shown["groups"] is None and shown["limits"] == {"rpm": 5}
    # Other limit flags leave the groups alone.
    ok(config, "token", "update", str(token_id), "--groups", "cheap")
    ok(config, "token", "update", str(token_id), "--rpm", "none")
    assert as_json(config, "token", "show", str(token_id))["limits"] == {"groups": ["cheap"]}


def test_token_show_gives_the_intersection_with_its_user_and_project(config: Path) -> None:
    token_id = create(config, "--project", "web", "--groups", "cheap,fast")
    ok(config, "user", "set", "alice", "--groups", "fast,slow")
    shown = as_json(config, "token", "show", str(token_id))
    assert shown["groups"] == ["cheap", "fast"] and shown["effective_groups"] == ["fast"]
    assert f"upstream groups: fast (token {token_id}: cheap,fast; user alice: fast,slow)\n" in ok(
        config, "token", "show", str(token_id)
    )
    ok(config, "project", "set", "web", "--groups", "cheap")
    shown = as_json(config, "token", "show", str(token_id))
    assert shown["effective_groups"] == []
    assert f"upstream groups: none (token {token_id}: cheap,fast; user alice: fast,slow; project web: cheap)\n" in ok(
        config, "token", "show", str(token_id)
    )


# -- users and projects ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["user", "project"])
def test_scope_set_list_show_and_clear(config: Path, kind: str) -> None:
    assert ok(config, kind, "set", "web", "--groups", "cheap,fast") == f"{kind} web: groups cheap,fast\n"
    assert ok(config, kind, "set", "web", "--budget", "day=5") == f"{kind} web: day $5.00, groups cheap,fast\n"
    assert ok(config, kind, "list") == "web: day $5.00, groups cheap,fast\n"
    assert as_json(config, kind, "list") == [
        {"name": "web", "limits": {"budget_micros": {"day": 5_000_000}, "groups": ["cheap", "fast"]},
         "note": None, "groups": ["cheap", "fast"]},
    ]
    shown = as_json(config, kind, "show", "web")
    assert shown["groups"] == ["cheap", "fast"]
    assert ok(config, kind, "show", "web").startswith(f"{kind} web: day $5.00, groups cheap,fast\n")
    assert ok(config, kind, "set", "web", "--groups", "none") == f"{kind} web: day $5.00\n"
    assert as_json(config, kind, "list")[0]["groups"] is None


# -- bad values ---------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "said"), [
    ("a b", "'a b' is not a group name"),
    ("cheap,fa$t", "'fa$t' is not a group name"),
    ("x" * 65, "is not a group name"),
    ("", "--groups needs at least one group name, or 'none'"),
    ("cheap,,fast", "--groups has an empty name in 'cheap,,fast'"),
    ("cheap,cheap", "--groups names cheap twice"),
    ("cheap,none", "'none' lifts the restriction and cannot be one of several groups"),
])
def test_bad_group_names_are_one_line_errors_and_change_nothing(
    config: Path, db: sqlite3.Connection, value: str, said: str,
) -> None:
    token_id = create(config, "--groups", "keep")
    generation = db.execute("SELECT value FROM generation").fetchone()[0]
    for args in (
        ("token", "create", "--user", "bob", "--groups", value),
        ("token", "update", str(token_id), "--groups", value),
        ("user", "set", "bob", "--groups", value),
        ("project", "set", "web", "--groups", value),
    ):
        done = hubcore(config, *args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stdout == ""
        assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("hubcore: "), done.stderr
        assert said in done.stderr, done.stderr
    assert db.execute("SELECT value FROM generation").fetchone()[0] == generation
    assert db.execute("SELECT count(*) FROM tokens").fetchone()[0] == 1
    assert as_json(config, "token", "show", str(token_id))["groups"] == ["keep"]


# -- a running hub ---------------------------------------------------------------------------

@pytest.fixture
def hub_config(config: Path, vendor: FakeVendor) -> Path:
    with config.open("a") as f:
        f.write(
            f'\n[[upstream]]\nname = "anthropic"\nkind = "anthropic"\nbase_url = "{vendor.url}"\n'
            f'keys = ["{ANTHROPIC_KEY}"]\n'
            # The group every restriction below keeps, until one rules it out.
            'group = "fast"\n'
            # Off: the default port would be shared by every hub on the machine.
            '\n[dashboard]\nlisten = ""\n'
        )
    return config


@pytest.fixture
def hub(hub_config: Path) -> Iterator[HubThread]:
    with HubThread(config_mod.load(str(hub_config))) as h:
        yield h


def principal(hub: HubThread, token: str) -> Principal:
    """What the running hub's token table holds for `token`, read on its loop."""

    async def lookup() -> Principal | None:
        assert hub.app is not None
        return hub.app.tokens.lookup(token.encode())

    found = hub.call(lookup())
    assert found is not None
    return found


def ask(hub: HubThread, token: str) -> anthropic.types.Message:
    with anthropic.Anthropic(base_url=hub.url, api_key=token, max_retries=0) as client:
        return client.messages.create(model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "hi"}])


def test_group_changes_reach_the_running_hub_when_the_command_returns(hub_config: Path, hub: HubThread) -> None:
    made = orjson.loads(ok(hub_config, "token", "create", "--user", "alice", "--project", "web", "--json"))
    token_id, token = made["id"], made["token"]
    assert principal(hub, token).groups is None
    ok(hub_config, "token", "update", str(token_id), "--groups", "cheap,fast")
    assert principal(hub, token).groups == frozenset({"cheap", "fast"})
    assert ask(hub, token).content

    ok(hub_config, "user", "set", "alice", "--groups", "fast")
    assert principal(hub, token).groups == frozenset({"fast"})
    ok(hub_config, "project", "set", "web", "--groups", "slow")
    assert principal(hub, token).groups == frozenset()
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        ask(hub, token)
    assert "may use no upstream group" in str(refused.value)
    assert "project web allows slow" in str(refused.value)

    ok(hub_config, "project", "set", "web", "--groups", "none")
    assert principal(hub, token).groups == frozenset({"fast"})
    assert ask(hub, token).content
    ok(hub_config, "user", "set", "alice", "--groups", "none")
    ok(hub_config, "token", "update", str(token_id), "--groups", "none")
    assert principal(hub, token).groups is None
