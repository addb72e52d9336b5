"""The `[[upstream]]` tables: several per kind, with the provider settings
(priority, weight, models, model_map, cost_multiplier, group,
health_check_interval, failback); each mistake refused naming the file and
the field, never a key."""
from __future__ import annotations

from pathlib import Path

import pytest

from hubcore import config as config_mod
from hubcore.errors import ConfigError

ANTHROPIC = '[[upstream]]\nname = "{name}"\nkind = "anthropic"\nbase_url = "{url}"\nkeys = ["sk-ant-{name}"]\n{extra}\n'
OPENAI = '[[upstream]]\nname = "{name}"\nkind = "openai"\nbase_url = "{url}"\nkeys = ["sk-{name}"]\n\n'


def write(tmp_path: Path, *tables: str) -> Path:
    path = tmp_path / "hubcore.toml"
    path.write_text("".join(tables))
    return path


def anthropic(name: str, url: str = "https://api.anthropic.com", extra: str = "") -> str:
    return ANTHROPIC.format(name=name, url=url, extra=extra)


def test_several_upstreams_of_one_kind_with_their_provider_settings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        anthropic("claude"),
        OPENAI.format(name="gpt", url="https://api.openai.com"),
        anthropic("relay", "https://relay.example.com", extra=(
            'priority = 1\nweight = 3\nmodels = ["claude-sonnet-*", "claude-haiku-4-5"]\n'
            'model_map = { "claude-sonnet-4-6" = "relay-sonnet", "claude-sonnet-*" = "relay-sonnet-old" }\n'
            'cost_multiplier = 0.5\ngroup = "cheap"\nhealth_check_interval = 2\nfailback = "immediate"\n'
        )),
    )
    loaded = config_mod.load(str(path), env={})
    assert [(u.name, u.kind) for u in loaded.upstreams] == [("claude", "anthropic"), ("gpt", "openai"), ("relay", "anthropic")]
    claude, relay = loaded.upstreams[0], loaded.upstreams[2]
    assert (claude.priority, claude.weight, claude.models, claude.model_map, claude.cost_multiplier,
            claude.group, claude.health_check_interval, claude.failback) == (0, 1, (), (), 1.0, "default", 0.0, "sticky")
    assert (relay.priority, relay.weight, relay.cost_multiplier, relay.group, relay.health_check_interval,
            relay.failback) == (1, 3, 0.5, "cheap", 2.0, "immediate")
    assert relay.models == ("claude-sonnet-*", "claude-haiku-4-5")
    # An exact entry wins over a glob written before it; else the first glob that matches.
    assert relay.mapped_model("claude-sonnet-4-6") == "relay-sonnet"
    assert relay.mapped_model("claude-sonnet-4-5") == "relay-sonnet-old"
    assert relay.mapped_model("claude-haiku-4-5") is None


@pytest.mark.parametrize(("extra", "field", "says"), [
    ("weight = -1\n", "weight", "must be at least 1"),
    ("weight = 0\n", "weight", "must be at least 1"),
    ("cost_multiplier = -0.5\n", "cost_multiplier", "must not be negative"),
    ('cost_multiplier = "half"\n', "cost_multiplier", "expected float"),
    ('model_map = { "claude-sonnet-4-6" = "" }\n', "model_map.claude-sonnet-4-6", "non-empty string"),
    ('model_map = { "claude-sonnet-4-6" = 5 }\n', "model_map.claude-sonnet-4-6", "non-empty string"),
    ('model_map = ["x"]\n', "model_map", "must be a table"),
    ('models = "claude-*"\n', "models", "must be an array"),
    ('models = [""]\n', "models", "must be an array"),
    ('group = "two words"\n', "group", "is not a group name"),
    ('failback = "never"\n', "failback", "'sticky' or 'immediate'"),
    ("health_check_interval = -1\n", "health_check_interval", "must not be negative"),
    ('priorty = 1\n', "priorty", "did you mean priority"),
])
def test_a_bad_provider_setting_is_refused_naming_the_file_and_field(tmp_path: Path, extra: str, field: str, says: str) -> None:
    path = write(tmp_path, anthropic("claude"), anthropic("relay", "https://relay.example.com", extra=extra))
    with pytest.raises(ConfigError) as refused:
        config_mod.load(str(path), env={})
    message = str(refused.value)
    assert message.startswith(f"{path}: upstream[1].{field}"), message
    assert says in message
    assert "sk-ant-" not in message


def test_a_duplicate_name_is_reported_as_such(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        anthropic("claude"),
        OPENAI.format(name="claude", url="https://api.openai.com"),
    )
    with pytest.raises(ConfigError, match=r"upstream\[1\]\.name: duplicate upstream name 'claude'"):
        config_mod.load(str(path), env={})
