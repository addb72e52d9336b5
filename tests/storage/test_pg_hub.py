"""hubcore on PostgreSQL from the outside: the real CLI (`hubcore token
create/list/revoke`, `hubcore usage`) as subprocesses, and a hub that
proxies a request with the anthropic SDK and records its usage row, hears
of a token made or revoked elsewhere within a second (LISTEN/NOTIFY, the
poll set far longer), and loses no usage row while the server is stopped."""
from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest

from hubcore import store
from hubcore.governance import tokens
from tests.conftest import upstreams_for
from tests.fakevendor import FakeVendor
from tests.hubharness import REPO, HubThread, free_port, hubcore_cmd, make_config, run_cli, terminate, wait_listening
from tests.pgserver import PASSWORD, PASSWORD_ENV, PgDatabase, PgServer, wait_until
from tests.storage.conftest import add_usage, event, pg_server_database

SONNET = "claude-sonnet-4-6"


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUBCORE_", "ANTHROPIC_", "OPENAI_", "PG"))}
    env.update(PYTHONPATH=str(REPO), **{PASSWORD_ENV: PASSWORD})
    return env


@pytest.fixture
def config_file(tmp_path: Path, pg_database: PgDatabase) -> Path:
    path = tmp_path / "hubcore.toml"
    path.write_text(
        f'[server]\ndatabase = "{pg_database.url}"\ndatabase_password = "env:{PASSWORD_ENV}"\n'
        f'ops_socket = "{tmp_path / "ops.sock"}"\n'
    )
    return path


def cli(config_file: Path, *args: str) -> Any:
    done = run_cli(*args, "--config", str(config_file), env=cli_env())
    assert done.returncode == 0, done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    return done


def test_token_commands_and_the_usage_report_through_the_cli(config_file: Path, pg_database: PgDatabase) -> None:
    refused = run_cli("token", "create", "--user", "alice", "--config", str(config_file), env=cli_env())
    assert refused.returncode != 0 and "pass --init" in refused.stderr
    made = orjson.loads(cli(config_file, "token", "create", "--user", "alice", "--project", "p", "--json",
                            "--init").stdout)
    other = cli(config_file, "token", "create", "--user", "bob")
    bob_token = other.stdout.strip().splitlines()[-1]
    assert bob_token.startswith(tokens.TOKEN_PREFIX)
    assert f"database {pg_database.url} (config {config_file})" in other.stderr
    listed = orjson.loads(cli(config_file, "token", "list", "--json").stdout)
    assert [(t["id"], t["user"], t["project"]) for t in listed] == [(made["id"], "alice", "p"), (made["id"] + 1, "bob", None)]
    cli(config_file, "token", "revoke", str(made["id"]))
    assert [t["user"] for t in orjson.loads(cli(config_file, "token", "list", "--json").stdout)] == ["bob"]

    conn = store.connect(pg_server_database(pg_database))
    try:
        add_usage(conn, event("r1", 1767225600.0 + 5, token_id=made["id"], user="alice", model=SONNET,
                              input_tokens=10, output_tokens=3, cost_micros=40),
                  event("r2", 1767225600.0 + 86400, user="bob", model=SONNET, cost_micros=2))
    finally:
        conn.close()
    days = cli(config_file, "usage", "--since", "2026-01-01", "--until", "2026-01-03", "--by", "day",
               "--format", "csv").stdout.splitlines()
    assert [line.split(",")[:2] for line in days[1:]] == [["2026-01-01", "1"], ["2026-01-02", "1"], ["TOTAL", "2"]]
    by_user = orjson.loads(cli(config_file, "usage", "--since", "2026-01-01", "--until", "2026-01-03",
                               "--by", "user", "--format", "json").stdout)
    assert "alice" in orjson.dumps(by_user).decode() and "bob" in orjson.dumps(by_user).decode()
    budgets = cli(config_file, "usage", "--budgets")
    assert budgets.returncode == 0


@pytest.fixture
def pg_hub(vendor: FakeVendor, tmp_path: Path, pg_database: PgDatabase) -> Iterator[HubThread]:
    # The poll every 30 s: a change seen within a second came by NOTIFY.
    config = make_config(tmp_path, upstreams_for(vendor), **pg_database.server_config,
                         token_reload_interval=30.0)
    with HubThread(config) as hub:
        yield hub


def ask(hub: HubThread, token: str) -> Any:
    with anthropic.Anthropic(base_url=hub.url, api_key=token, max_retries=0) as client:
        return client.messages.create(model=SONNET, max_tokens=16, messages=[{"role": "user", "content": "hi"}])


def test_a_hub_on_postgresql_proxies_and_records_usage(pg_hub: HubThread, vendor: FakeVendor) -> None:
    token = pg_hub.mint("alice", "proj")
    answer = ask(pg_hub, token)
    (row,) = pg_hub.wait_rows(1)
    assert (row["user"], row["project"], row["model"], row["status"], row["outcome"]) == (
        "alice", "proj", SONNET, 200, "ok")
    assert row["output_tokens"] == answer.usage.output_tokens and row["cost_micros"] > 0
    assert len(vendor.requests) == 1


def test_token_changes_made_elsewhere_reach_the_hub_within_a_second(
    pg_hub: HubThread, config_file: Path,
) -> None:
    # Made by the CLI, as an operator would, on another connection.
    started = time.monotonic()
    made = orjson.loads(cli(config_file, "token", "create", "--user", "carol", "--json").stdout)
    value = made["token"]
    assert pg_hub.app is not None
    assert wait_until(lambda: pg_hub.app.tokens.lookup(value.encode()) is not None, timeout=1.0 + (
        time.monotonic() - started))
    ask(pg_hub, value)
    cli(config_file, "token", "revoke", str(made["id"]))
    revoked = time.monotonic()
    assert wait_until(lambda: pg_hub.app.tokens.lookup(value.encode()) is None, timeout=1.0)
    assert time.monotonic() - revoked < 1.0
    with pytest.raises(anthropic.PermissionDeniedError):
        ask(pg_hub, value)


def test_a_hub_loses_no_usage_row_while_postgresql_is_stopped(
    pg_server: PgServer, pg_hub: HubThread, vendor: FakeVendor,
) -> None:
    token = pg_hub.mint("alice")
    answered = 0
    stop = threading.Event()

    def traffic() -> None:
        nonlocal answered
        with anthropic.Anthropic(base_url=pg_hub.url, api_key=token, max_retries=0) as client:
            while not stop.is_set():
                client.messages.create(model=SONNET, max_tokens=16, messages=[{"role": "user", "content": "hi"}])
                answered += 1

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        time.sleep(0.5)
        pg_server.stop()
        down_at = answered
        time.sleep(3.0)
        assert answered > down_at, "requests are answered while the database is down"
        pg_server.start()
        time.sleep(0.5)
    finally:
        stop.set()
        sender.join(30)
    assert pg_hub.app is not None
    assert wait_until(lambda: len(pg_hub.usage_rows()) >= len(vendor.requests), timeout=20)
    rows = pg_hub.usage_rows()
    assert len(rows) == len(vendor.requests) == answered
    assert len({r["request_id"] for r in rows}) == len(rows), "no row twice"
    assert pg_hub.app.recorder.stats()["spooled"] > 0


def test_the_listener_comes_back_after_losing_its_connection(pg_hub: HubThread, pg_database: PgDatabase) -> None:
    conn = store.connect(pg_server_database(pg_database))
    listening = ("SELECT pid FROM pg_stat_activity"
                 " WHERE datname = ? AND query LIKE 'LISTEN%' AND pid != pg_backend_pid()")
    try:
        # The hub's listener connects and listens in the background once it has started.
        assert wait_until(lambda: len(conn.execute(listening, (pg_database.name,)).fetchall()) == 1, timeout=5.0), (
            "one listening connection")
        killed = conn.execute(
            f"SELECT pg_terminate_backend(pid) FROM ({listening}) AS listener", (pg_database.name,),
        ).fetchall()
        assert killed == [(True,)]
        # Made while nobody listens: the refresh that follows the reconnect finds it.
        _, value = tokens.create(conn, "erin")
    finally:
        conn.close()
    assert pg_hub.app is not None
    assert wait_until(lambda: pg_hub.app.tokens.lookup(value.encode()) is not None, timeout=3.0)


def serve_config(tmp_path: Path, url: str, port: int) -> Path:
    path = tmp_path / "hubcore.toml"
    path.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\ndatabase = "{url}"\ndatabase_password = "env:{PASSWORD_ENV}"\n'
        f'spool = "{tmp_path / "state" / "usage.spool"}"\nops_socket = "{tmp_path / "ops.sock"}"\n'
        '\n[dashboard]\nlisten = ""\n'
    )
    (tmp_path / "state").mkdir()
    return path


def test_serve_on_an_empty_postgresql_database_mints_the_first_token_beside_the_spool(
    tmp_path: Path, pg_database: PgDatabase,
) -> None:
    port = free_port()
    config = serve_config(tmp_path, pg_database.url, port)
    proc = subprocess.Popen(hubcore_cmd("serve", "--config", str(config)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=tmp_path)
    try:
        wait_listening(port, proc)
        token = (tmp_path / "state" / "first-token").read_text().strip()
        listed = orjson.loads(cli(config, "token", "list", "--json").stdout)
        assert [(t["user"], token.startswith(t["prefix"])) for t in listed] == [("admin", True)]
    finally:
        _, err = terminate(proc)
    assert proc.returncode == 0, err
    assert PASSWORD not in err


def test_serve_with_postgresql_unreachable_is_one_line_naming_it(tmp_path: Path) -> None:
    url = f"postgresql://hubcore@127.0.0.1:{free_port()}/hub"
    config = serve_config(tmp_path, url, free_port())
    done = run_cli("serve", "--config", str(config), env=cli_env(), timeout=60)
    assert done.returncode == 1
    assert f"cannot start: cannot open the database {url}" in done.stderr and "Traceback" not in done.stderr


def test_check_config_reaches_the_database(config_file: Path, pg_database: PgDatabase) -> None:
    assert "ok" in cli(config_file, "check-config").stdout
    wrong = {**cli_env(), PASSWORD_ENV: "not-the-password"}
    done = run_cli("check-config", "--config", str(config_file), env=wrong)
    assert done.returncode == 1
    assert f"database {pg_database.url}: " in done.stderr and "password authentication failed" in done.stderr
    assert "not-the-password" not in done.stderr
