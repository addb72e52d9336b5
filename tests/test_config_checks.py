"""Config mistakes an operator makes on day one, each refused (or warned
about) in one line that says what to write instead: a base_url ending in
/v1, a decimal ops_socket_mode, a misspelt field, no upstreams or keys."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from hubcore import config as config_mod
from hubcore.errors import ConfigError
from tests.cli.test_cli import hubcore

SOURCE = "hub.toml"


def parse(data: dict[str, Any], env: dict[str, str] | None = None) -> config_mod.Config:
    return config_mod.parse(data, source=SOURCE, env=env or {})


def upstream(**fields: Any) -> dict[str, Any]:
    return {"name": "openai", "kind": "openai", "base_url": "https://api.openai.com", "keys": ["sk-x"], **fields}


def refusal(data: dict[str, Any], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse(data, env)
    return str(info.value)


# -- base_url ------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "given", "fix"), [
    ("openai", "https://api.openai.com/v1", "https://api.openai.com"),
    ("openai", "https://api.openai.com/v1/", "https://api.openai.com"),
    ("anthropic", "https://api.anthropic.com/v1", "https://api.anthropic.com"),
    ("openai", "https://relay.example.com/openai/v1", "https://relay.example.com/openai"),
])
def test_a_base_url_ending_in_v1_is_refused_with_the_fix(kind: str, given: str, fix: str) -> None:
    message = refusal({"upstream": [upstream(kind=kind, name=kind, base_url=given)]})
    assert message == (
        f"{SOURCE}: upstream[0].base_url: {given!r} ends in /v1, which the hub adds itself "
        f"(clients' paths start with /v1); write {fix!r}"
    )


def test_a_base_url_with_a_path_not_ending_in_v1_is_kept() -> None:
    (loaded,) = parse({"upstream": [upstream(base_url="https://relay.example.com/v1beta/openai")]}).upstreams
    assert loaded.base_path == "/v1beta/openai"


# -- ops_socket_mode ---------------------------------------------------------------------------

@pytest.mark.parametrize(("given", "mode"), [("0660", 0o660), ("660", 0o660), ("0o640", 0o640), (0o600, 0o600), ("0600", 0o600)])
def test_ops_socket_mode_as_octal_string_or_toml_octal(given: object, mode: int) -> None:
    assert parse({"server": {"ops_socket_mode": given}}).server.ops_socket_mode == mode


def test_ops_socket_mode_from_a_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "hub.toml"
    path.write_text('[server]\nops_socket_mode = "0640"\n')
    assert config_mod.load(str(path), env={}).server.ops_socket_mode == 0o640
    path.write_text("[server]\nops_socket_mode = 0o640\n")
    assert config_mod.load_server(str(path), env={}).ops_socket_mode == 0o640


def test_a_decimal_ops_socket_mode_is_refused_with_the_fix() -> None:
    assert refusal({"server": {"ops_socket_mode": 660}}) == (
        f"{SOURCE}: server.ops_socket_mode: 660 is not a file mode (a TOML integer is decimal: 660 is 0o1224); "
        'write 0o660 or "0660"'
    )


@pytest.mark.parametrize("given", ["0999", "rw-rw----", "", "01777", 1000, -1, True, 6.6])
def test_other_bad_ops_socket_modes_are_refused(given: object) -> None:
    message = refusal({"server": {"ops_socket_mode": given}})
    assert message.startswith(f"{SOURCE}: server.ops_socket_mode: ") and 'write an octal mode such as 0o660 or "0660"' in message


# -- misspelt fields ---------------------------------------------------------------------------

@pytest.mark.parametrize(("data", "line"), [
    ({"upstream": [{"name": "a", "kind": "anthropic", "base_ur": "https://api.anthropic.com"}]},
     "upstream[0].base_ur: unknown field; did you mean base_url?"),
    ({"server": {"listn": "127.0.0.1:1"}}, "server.listn: unknown field; did you mean listen?"),
    ({"servr": {}}, "servr: unknown field; did you mean server?"),
    ({"upstreams": []}, "upstreams: unknown field; did you mean upstream?"),
    ({"upstream": [upstream(circuit_treshold=3)]}, "upstream[0].circuit_treshold: unknown field; did you mean circuit_threshold?"),
    ({"upstream": [upstream(keys=[{"kye": "sk-x"}])]}, "upstream[0].keys[0].kye: unknown field; did you mean key?"),
    ({"server": {"colour": "blue"}}, "server.colour: unknown field"),
])
def test_a_misspelt_field_is_named_with_what_was_probably_meant(data: dict[str, Any], line: str) -> None:
    assert refusal(data) == f"{SOURCE}: {line}"


# -- credentials ------------------------------------------------------------------------------

def test_an_unset_credentials_directory_says_how_to_set_it() -> None:
    message = refusal({"upstream": [upstream(keys=["file:${CREDENTIALS_DIRECTORY}/openai-key-a"])]})
    assert "$CREDENTIALS_DIRECTORY is not set" in message
    assert "CREDENTIALS_DIRECTORY=/etc/hubcore/keys" in message


# -- check-config warnings ---------------------------------------------------------------------

def test_check_config_warns_of_no_upstreams(tmp_path: Path) -> None:
    path = tmp_path / "hub.toml"
    path.write_text(f'[server]\ndatabase = "{tmp_path / "hub.db"}"\nops_socket = ""\n')
    done = hubcore("check-config", "--config", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{path}: ok (0 upstreams, 0 keys)\n"
    assert done.stderr.splitlines() == ["hubcore: warning: no [[upstream]]: every request will be refused"]


def test_check_config_warns_of_an_upstream_without_keys(tmp_path: Path) -> None:
    path = tmp_path / "hub.toml"
    path.write_text(
        f'[server]\ndatabase = "{tmp_path / "hub.db"}"\nops_socket = ""\n'
        '[[upstream]]\nname = "claude"\nkind = "anthropic"\nbase_url = "https://api.anthropic.com"\n'
        '[[upstream]]\nname = "gpt"\nkind = "openai"\nbase_url = "https://api.openai.com"\nkeys = ["sk-x"]\n'
    )
    done = hubcore("check-config", "--config", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{path}: ok (2 upstreams, 1 keys)\n"
    assert done.stderr.splitlines() == ["hubcore: warning: upstream 'claude' has no keys: its requests will be refused"]


def test_check_config_on_the_built_in_defaults_warns_of_no_keys(tmp_path: Path) -> None:
    done = hubcore("check-config", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "<built-in defaults>: ok (2 upstreams, 0 keys)\n"
    assert "hubcore: warning: upstream 'anthropic' has no keys: its requests will be refused" in done.stderr.splitlines()
    assert not os.listdir(tmp_path)
