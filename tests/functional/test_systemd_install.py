"""The README's systemd install, the unit and the example config, checked
against each other: where hubcore is installed and what ExecStart= runs,
the key files the README writes and the unit's LoadCredential= sources,
the credential names and the config's references to them; then the
install played through in a temporary root: the service's view (keys
under $CREDENTIALS_DIRECTORY) serves a token that an operator's management
commands (no $CREDENTIALS_DIRECTORY) created."""
from __future__ import annotations

import grp
import os
import re
import subprocess
from pathlib import Path

import anthropic
import pytest

from hubcore import config as config_mod
from tests.fakevendor import FakeVendor
from tests.functional.test_systemd_unit import EXAMPLE, UNIT, one, parse_unit
from tests.hubharness import REPO, free_port, hubcore_cmd, terminate, wait_listening

README = REPO / "README.md"
VENV = "/opt/hubcore"
KEYS_DIR = "/etc/hubcore/keys"


def readme_install() -> str:
    """The shell block of the README's systemd section."""
    section = README.read_text().split("### systemd", 1)[1]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "no ```sh block in the README's systemd section"
    return match.group(1)


def readme_key_files() -> list[str]:
    match = re.search(r"for k in ([\w .-]+); do .*?> (\S+)/\$k", readme_install())
    assert match, "the README's install writes no key files"
    assert match.group(2) == KEYS_DIR
    return match.group(1).split()


def credentials() -> dict[str, str]:
    """LoadCredential= of the unit: credential name -> source file."""
    entries = parse_unit(UNIT.read_text())["Service"]["LoadCredential"]
    return dict(entry.split(":", 1) for entry in entries)


def test_the_readme_installs_into_the_venv_that_execstart_runs() -> None:
    script = readme_install()
    assert f"python3 -m venv {VENV}" in script
    assert f"{VENV}/bin/pip install ." in script
    assert "\npip install" not in "\n" + script  # Debian's system pip refuses it
    exec_start = one(parse_unit(UNIT.read_text())["Service"], "ExecStart").split()
    assert exec_start[0] == f"{VENV}/bin/hubcore"
    assert exec_start[1:] == ["serve", "--config", config_mod.SYSTEM_CONFIG]
    assert f"deploy/hubcore.example.toml {config_mod.SYSTEM_CONFIG}" in script


def test_the_readme_writes_the_key_files_the_unit_loads_under_the_same_names() -> None:
    loaded = credentials()
    assert readme_key_files() == sorted(readme_key_files())
    assert {f"{KEYS_DIR}/{name}" for name in readme_key_files()} == set(loaded.values())
    for name, source in loaded.items():
        # One name for the credential and its file: an operator who points
        # $CREDENTIALS_DIRECTORY at the keys directory gets what the service gets.
        assert source == f"{KEYS_DIR}/{name}"


def test_the_readme_says_how_operators_run_management_commands() -> None:
    section = README.read_text().split("### systemd", 1)[1].split("\n## ", 1)[0]
    assert f"sudo -u hubcore {VENV}/bin/hubcore token create" in section
    assert config_mod.SYSTEM_CONFIG in section


@pytest.fixture
def installed(tmp_path: Path) -> dict[str, Path]:
    """The README's install in tmp_path: key files, the example config with
    its paths moved under tmp_path, and the credentials directory systemd
    would make from LoadCredential=."""
    root = tmp_path
    keys_dir = root / KEYS_DIR.lstrip("/")
    keys_dir.mkdir(parents=True)
    for name in readme_key_files():
        (keys_dir / name).write_text(f"sk-test-{name}")
        (keys_dir / name).chmod(0o600)
    credentials_dir = root / "run" / "credentials" / "hubcore.service"
    credentials_dir.mkdir(parents=True)
    for name, source in credentials().items():
        (credentials_dir / name).write_bytes((root / source.lstrip("/")).read_bytes())
    state, runtime = root / "var" / "lib" / "hubcore", root / "run" / "hubcore"
    state.mkdir(parents=True)
    runtime.mkdir(parents=True)
    text = EXAMPLE.read_text().replace("/var/lib/hubcore/", f"{state}/").replace("/run/hubcore/", f"{runtime}/")
    text = text.replace('ops_socket_group = "hubcore"', f'ops_socket_group = "{grp.getgrgid(os.getgid()).gr_name}"')
    config = root / config_mod.SYSTEM_CONFIG.lstrip("/")
    config.write_text(text)
    return {"config": config, "credentials": credentials_dir, "state": state}


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HUBCORE_", "CREDENTIALS_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    return {**base, "PYTHONPATH": str(REPO), **extra}


def test_the_install_end_to_end(installed: dict[str, Path]) -> None:
    port = free_port()
    config = installed["config"]
    config.write_text(config.read_text().replace('listen = "127.0.0.1:8787"', f'listen = "127.0.0.1:{port}"')
                      + '\n[dashboard]\nlisten = ""\n')
    keys = {f"sk-test-{name}": "ok" for name in readme_key_files()}
    with FakeVendor(keys) as vendor:
        config.write_text(re.sub(r'base_url = "https://api\.(anthropic|openai)\.com"', f'base_url = "{vendor.url}"', config.read_text()))
        checked = subprocess.run(hubcore_cmd("check-config", "--config", str(config)), capture_output=True, text=True,
                                 env=env(CREDENTIALS_DIRECTORY=str(installed["credentials"])), timeout=60)
        assert checked.returncode == 0, checked.stderr
        assert checked.stdout.endswith("ok (2 upstreams, 3 keys)\n")
        proc = subprocess.Popen(hubcore_cmd("serve", "--config", str(config)), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, cwd=installed["state"],
                                env=env(CREDENTIALS_DIRECTORY=str(installed["credentials"])))
        try:
            wait_listening(port, proc)

            def operator(*args: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run(hubcore_cmd(*args, "--config", str(config)), capture_output=True, text=True,
                                      env=env(), timeout=60)

            made = operator("token", "create", "--user", "alice", "--project", "web")
            assert made.returncode == 0, made.stderr
            assert f"hubcore: database {installed['state'] / 'hubcore.db'} (config {config})" in made.stderr
            token = made.stdout.splitlines()[-1]
            for args in (("user", "set", "alice", "--rpm", "100"), ("project", "show", "web"), ("usage",)):
                done = operator(*args)
                assert done.returncode == 0, (args, done.stderr)
            # As an operator would, rather than wait for the next token reload.
            assert operator("reload").returncode == 0
            client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key=token, max_retries=0)
            try:
                client.messages.create(model="claude-sonnet-4-6", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
            finally:
                client.close()
            assert sum(vendor.hits[key] for key in keys) == 1
        finally:
            _, err = terminate(proc)
        assert proc.returncode == 0, err
