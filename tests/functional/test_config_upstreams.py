"""The `[[upstream]]` tables: one upstream per kind; a second of a kind is
refused when the file is read, not ignored while the hub runs."""
from __future__ import annotations

from pathlib import Path

import pytest

from hubcore import config as config_mod
from hubcore.errors import ConfigError

ANTHROPIC = '[[upstream]]\nname = "{name}"\nkind = "anthropic"\nbase_url = "{url}"\nkeys = ["sk-ant-{name}"]\n\n'
OPENAI = '[[upstream]]\nname = "{name}"\nkind = "openai"\nbase_url = "{url}"\nkeys = ["sk-{name}"]\n\n'


def write(tmp_path: Path, *tables: str) -> Path:
    path = tmp_path / "hubcore.toml"
    path.write_text("".join(tables))
    return path


def test_one_upstream_of_each_kind_is_fine(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        ANTHROPIC.format(name="claude", url="https://api.anthropic.com"),
        OPENAI.format(name="gpt", url="https://api.openai.com"),
    )
    loaded = config_mod.load(str(path), env={})
    assert [(u.name, u.kind) for u in loaded.upstreams] == [("claude", "anthropic"), ("gpt", "openai")]


def test_a_second_upstream_of_one_kind_is_refused_naming_the_file_and_the_upstream(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        ANTHROPIC.format(name="claude", url="https://api.anthropic.com"),
        OPENAI.format(name="gpt", url="https://api.openai.com"),
        ANTHROPIC.format(name="relay", url="https://relay.example.com"),
    )
    with pytest.raises(ConfigError) as refused:
        config_mod.load(str(path), env={})
    message = str(refused.value)
    assert message.startswith(f"{path}: upstream[2] ('relay'): ")
    assert "'anthropic'" in message and "'claude'" in message
    assert "several upstreams of one kind are not supported yet" in message
    assert "sk-ant-" not in message


def test_a_duplicate_name_is_still_reported_as_such(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        ANTHROPIC.format(name="claude", url="https://api.anthropic.com"),
        OPENAI.format(name="claude", url="https://api.openai.com"),
    )
    with pytest.raises(ConfigError, match=r"upstream\[1\]\.name: duplicate upstream name 'claude'"):
        config_mod.load(str(path), env={})
