"""Token changes reach a running hub before the CLI returns: `token
create|revoke|rotate|update` and `user|project set` tell the hub over its ops
socket. The hub under test polls the tokens table once an hour, so without
that word every assertion below about "at once" would fail.

Also: without a running hub the commands succeed quietly (the database is the
truth, the poll the fallback); with a socket nobody answers on they warn and
still succeed."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import orjson
import pytest

from hubcore import config as config_mod, store
from hubcore.governance import tokens
from hubcore.ops import client as opsclient
from tests.fakevendor import ANTHROPIC_KEY, OPENAI_KEY, FakeVendor
from tests.hubharness import REPO, HubThread, hubcore_cmd, mint

# Far longer than any test: a change the hub sees came over the ops socket.
POLL_NEVER = 3600
MODEL = "claude-sonnet-4-6"


def said_nothing_but_the_database(stderr: str) -> bool:
    """A database command's stderr when all went well: only the line that
    names the database it used."""
    lines = stderr.splitlines()
    return len(lines) == 1 and lines[0].startswith("hubcore: database ")


def write_config(path: Path, database: Path, ops_socket: str, vendor_url: str) -> Path:
    path.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\ndatabase = "{database}"\nops_socket = "{ops_socket}"\n'
        f"token_reload_interval = {POLL_NEVER}\nusage_flush_interval = 0.05\n\n"
        f'[[upstream]]\nname = "anthropic"\nkind = "anthropic"\nbase_url = "{vendor_url}"\nkeys = ["{ANTHROPIC_KEY}"]\n\n'
        f'[[upstream]]\nname = "openai"\nkind = "openai"\nbase_url = "{vendor_url}"\nkeys = ["{OPENAI_KEY}"]\n'
    )
    return path


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUBCORE_", "NOTIFY_SOCKET"))}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(hubcore_cmd(*args, "--config", str(config)), capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="hc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def config(tmp_path: Path, sock_dir: Path, vendor: FakeVendor) -> Path:
    # The database of a hub that has run once (commands create none unasked).
    store.connect(tmp_path / "hub.db").close()
    return write_config(tmp_path / "hubcore.toml", tmp_path / "hub.db", str(sock_dir / "ops.sock"), vendor.url)


@pytest.fixture
def hub(config: Path) -> Iterator[HubThread]:
    with HubThread(config_mod.load(str(config))) as h:
        yield h


def ask(hub: HubThread, token: str) -> anthropic.types.Message:
    with anthropic.Anthropic(base_url=hub.url, api_key=token, max_retries=0) as client:
        return client.messages.create(model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "hi"}])


def create(config: Path, *flags: str) -> tuple[int, str]:
    done = cli(config, "token", "create", "--user", "ci", "--json", *flags)
    assert done.returncode == 0, done.stderr
    assert said_nothing_but_the_database(done.stderr), done.stderr
    made = orjson.loads(done.stdout)
    return made["id"], made["token"]


def test_a_new_token_works_as_soon_as_create_returns(config: Path, hub: HubThread) -> None:
    _, token = create(config)
    assert ask(hub, token).content


def test_a_revoked_token_is_refused_as_soon_as_revoke_returns(config: Path, hub: HubThread) -> None:
    token_id, token = create(config)
    assert ask(hub, token).content
    done = cli(config, "token", "revoke", str(token_id))
    assert done.returncode == 0 and said_nothing_but_the_database(done.stderr), done.stderr
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        ask(hub, token)
    assert "revoked" in str(refused.value)


def test_rotate_swaps_the_secret_at_once_and_keeps_the_token(config: Path, hub: HubThread) -> None:
    token_id, old = create(config, "--rpm", "100", "--note", "ci bot")
    assert ask(hub, old).content
    done = cli(config, "token", "rotate", str(token_id), "--json")
    assert done.returncode == 0 and said_nothing_but_the_database(done.stderr), done.stderr
    rotated = orjson.loads(done.stdout)
    new = rotated["token"]
    assert rotated["id"] == token_id and new != old
    with pytest.raises(anthropic.AuthenticationError):
        ask(hub, old)
    assert ask(hub, new).content
    # Same token: its limits, note and request history stay with it.
    shown = orjson.loads(cli(config, "token", "show", str(token_id), "--json").stdout)
    assert shown["limits"] == {"rpm": 100} and shown["note"] == "ci bot"
    assert [row["token_id"] for row in hub.wait_rows(2)] == [token_id, token_id]


def test_limit_changes_apply_as_soon_as_the_command_returns(config: Path, hub: HubThread) -> None:
    token_id, token = create(config, "--project", "web")
    assert ask(hub, token).content
    done = cli(config, "token", "update", str(token_id), "--models", "gpt-*")
    assert done.returncode == 0 and said_nothing_but_the_database(done.stderr), done.stderr
    with pytest.raises(anthropic.PermissionDeniedError):
        ask(hub, token)
    assert cli(config, "token", "update", str(token_id), "--models", "none").returncode == 0
    assert ask(hub, token).content

    for kind, name in (("user", "ci"), ("project", "web")):
        done = cli(config, kind, "set", name, "--budget", "total=0")
        assert done.returncode == 0 and said_nothing_but_the_database(done.stderr), done.stderr
        with pytest.raises(anthropic.PermissionDeniedError):
            ask(hub, token)
        assert cli(config, kind, "set", name, "--budget", "total=none").returncode == 0
        assert ask(hub, token).content


def test_without_a_running_hub_the_commands_succeed_quietly(config: Path, sock_dir: Path) -> None:
    assert not (sock_dir / "ops.sock").exists()
    token_id, _ = create(config)
    for args in (("token", "update", str(token_id), "--rpm", "5"), ("token", "revoke", str(token_id)),
                 ("user", "set", "ci", "--rpm", "5")):
        done = cli(config, *args)
        assert done.returncode == 0 and said_nothing_but_the_database(done.stderr), (args, done.stderr)


def test_a_socket_left_by_a_stopped_hub_is_no_hub(config: Path, sock_dir: Path) -> None:
    # Bound, never listening: connect() is refused, as after a kill -9.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(sock_dir / "ops.sock"))
        create(config)


def test_a_hub_that_does_not_answer_gets_a_warning_not_a_failure(config: Path, sock_dir: Path) -> None:
    # Listening, never accepting: the connect succeeds and the answer never comes.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(str(sock_dir / "ops.sock"))
        silent.listen(8)
        started = time.monotonic()
        done = cli(config, "token", "create", "--user", "ci")
        took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith(tokens.TOKEN_PREFIX)
    warning = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and warning[0].startswith("hubcore: warning:"), done.stderr
    assert f"within its poll interval ({POLL_NEVER:g} s)" in warning[0]
    assert took < 30


def test_a_hub_on_another_database_gets_a_warning(tmp_path: Path, config: Path, hub: HubThread, sock_dir: Path, vendor: FakeVendor) -> None:
    # The CLI's config names the hub's socket but a different database, one
    # whose generation is ahead of the hub's: the hub can never confirm it.
    other_db = tmp_path / "other.db"
    conn = store.connect(other_db)
    try:
        for _ in range(5):
            tokens.create(conn, "someone")
    finally:
        conn.close()
    other = write_config(tmp_path / "other.toml", other_db, str(sock_dir / "ops.sock"), vendor.url)
    done = cli(other, "token", "create", "--user", "ci")
    assert done.returncode == 0, done.stderr
    assert "hubcore: warning:" in done.stderr and "another database" in done.stderr, done.stderr


def test_the_ops_route_reloads_now_and_answers_the_generation(config: Path, hub: HubThread) -> None:
    assert hub.app is not None and hub.app.ops is not None
    path = hub.app.ops.path
    token = mint(hub.config.server.database, "quiet")
    with pytest.raises(anthropic.AuthenticationError):
        ask(hub, token)     # written behind the hub's back, an hour before its poll
    conn = store.connect(hub.config.server.database)
    try:
        written = tokens.generation(conn)
    finally:
        conn.close()
    assert opsclient.refresh_tokens(path) == written
    assert ask(hub, token).content
    status, body = opsclient.request_json(path, "/tokens/refresh", "GET")
    assert status == 405 and body == {"error": "use POST"}

