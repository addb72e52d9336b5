"""`hubcore serve` at start: `--listen`, a start that fails leaves no admin
token behind, one line for each way it can fail before listening, and its
own start-up lines in the configured log format."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
from pathlib import Path

import orjson
import pytest

from hubcore.app import StartSignals
from tests.cli.test_cli import cli_env, hubcore
from tests.hubharness import free_port, hubcore_cmd, terminate, wait_listening


def write_config(tmp_path: Path, port: int, extra: str = "", upstreams: str = "", dashboard: str = "") -> Path:
    path = tmp_path / "hubcore.toml"
    path.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\ndatabase = "{tmp_path / "hub.db"}"\n'
        f'ops_socket = "{tmp_path / "ops.sock"}"\n{extra}\n{upstreams}'
        # Off unless asked for: the default port would be shared by every hub.
        f'\n[dashboard]\nlisten = "{dashboard}"\n'
    )
    return path


def token_rows(database: Path) -> int:
    if not database.exists():
        return 0
    conn = sqlite3.connect(database)
    try:
        return int(conn.execute("SELECT count(*) FROM tokens").fetchone()[0])
    finally:
        conn.close()


def serve(config: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(hubcore_cmd("serve", "--config", str(config), *extra), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=cli_env())


def stop(proc: subprocess.Popen[str]) -> str:
    _, err = terminate(proc)
    assert proc.returncode == 0, err
    return err


def test_listen_option_overrides_the_config(tmp_path: Path) -> None:
    configured, given = free_port(), free_port()
    proc = serve(write_config(tmp_path, configured), "--listen", f"127.0.0.1:{given}")
    try:
        wait_listening(given, proc)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", configured))  # the config's port stays free
    finally:
        stop(proc)


def test_a_bad_listen_option_is_one_line(tmp_path: Path) -> None:
    done = hubcore("serve", "--config", str(write_config(tmp_path, free_port())), "--listen", "nowhere")
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["hubcore: --listen: expected \"HOST:PORT\", got 'nowhere'"]


def test_a_start_on_a_port_in_use_mints_no_token(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = hubcore("serve", "--config", str(write_config(tmp_path, port)))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"cannot listen on 127.0.0.1:{port}" in errors[0], done.stderr
    assert token_rows(tmp_path / "hub.db") == 0
    assert not (tmp_path / "first-token").exists()
    assert "first-token" not in done.stderr and "created one" not in done.stderr


def test_a_token_minted_by_a_failed_start_is_minted_again_by_the_next(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, port)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        assert hubcore("serve", "--config", str(config)).returncode == 1
    proc = serve(config)
    try:
        wait_listening(port, proc)
        assert token_rows(tmp_path / "hub.db") == 1
        assert (tmp_path / "first-token").exists()
    finally:
        stop(proc)


def test_an_unknown_ops_socket_group_is_one_line(tmp_path: Path) -> None:
    port = free_port()
    done = hubcore("serve", "--config", str(write_config(tmp_path, port, 'ops_socket_group = "no-such-group-hc17"')))
    assert done.returncode == 1
    assert done.stderr.splitlines() == ["hubcore: cannot start: ops_socket_group: no group named 'no-such-group-hc17'"]
    assert token_rows(tmp_path / "hub.db") == 0 and not (tmp_path / "ops.sock").exists()
    checked = hubcore("check-config", "--config", str(tmp_path / "hubcore.toml"))
    assert checked.returncode == 1
    assert checked.stderr.splitlines() == [f"hubcore: {tmp_path / 'hubcore.toml'}: ops_socket_group: no group named 'no-such-group-hc17'"]


@pytest.mark.parametrize(("content", "reason"), [(None, "No such file or directory"), ("not a certificate\n", "no certificate or crl found")])
def test_a_ca_file_that_will_not_load_is_one_line_naming_it(tmp_path: Path, content: str | None, reason: str) -> None:
    ca_file = tmp_path / "vendor-ca.pem"
    if content is not None:
        ca_file.write_text(content)
    upstreams = (
        '[[upstream]]\nname = "anthropic"\nkind = "anthropic"\nbase_url = "https://127.0.0.1:9"\n'
        f'ca_file = "{ca_file}"\nkeys = ["sk-ant-x"]\n'
    )
    config = write_config(tmp_path, free_port(), upstreams=upstreams)
    line = f"upstream 'anthropic': ca_file '{ca_file}': cannot load: {reason}"
    done = hubcore("serve", "--config", str(config))
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"hubcore: cannot start: {line}"]
    checked = hubcore("check-config", "--config", str(config))
    assert checked.returncode == 1
    assert checked.stderr.splitlines() == [f"hubcore: {config}: {line}"]


def test_start_up_lines_follow_the_json_log_format(tmp_path: Path) -> None:
    port = free_port()
    proc = serve(write_config(tmp_path, port, 'log_format = "json"'))
    try:
        wait_listening(port, proc)
    finally:
        err = stop(proc)
    records = [orjson.loads(line) for line in err.splitlines()]  # every line is JSON
    messages = [str(r.get("message", r.get("msg", ""))) for r in records]
    assert any("no vendor keys configured" in m for m in messages), err
    assert any("first-token" in m for m in messages), err


def test_a_stop_signal_the_moment_the_port_answers_is_a_clean_stop(tmp_path: Path) -> None:
    """The proxy listens before the dashboard and the ops socket open: a
    supervisor's SIGTERM in between must wait for the start, then drain and
    exit 0, not kill the process (-15)."""
    port = free_port()
    proc = serve(write_config(tmp_path, port, dashboard="127.0.0.1:0"))
    try:
        while proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                pass
    finally:
        err = stop(proc)
    assert "stopped" in err


class SignalLog:
    """What `StartSignals.release` hands on, in order."""

    def __init__(self) -> None:
        self.calls: list[object] = []

    def on_signal(self, sig: int) -> None:
        self.calls.append(signal.Signals(sig).name)


async def test_signals_during_the_start_are_held_then_a_stop_wins_over_a_reload() -> None:
    loop = asyncio.get_running_loop()
    early = StartSignals(loop)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(500):
            if len(early.held) == 2:
                break
            await asyncio.sleep(0.01)
        target = SignalLog()
        assert target.calls == [] and sorted(early.held) == sorted([signal.SIGHUP, signal.SIGTERM])
        early.release(target)
        assert target.calls == ["SIGTERM"]
    finally:
        for sig in StartSignals.SIGNALS:
            loop.remove_signal_handler(sig)


async def test_a_signal_whose_callback_runs_after_the_start_ended_still_reaches_the_app() -> None:
    """The loop queues a signal's callback when it reads the signal; queued
    behind the step that ends the start, it runs after `release`. It must
    not land in the held list nobody reads any more (CI once saw the hub
    keep serving after such a SIGTERM)."""
    loop = asyncio.get_running_loop()
    early = StartSignals(loop)
    try:
        target = SignalLog()
        early.release(target)
        early.on_signal(signal.SIGTERM)
        assert target.calls == ["SIGTERM"]
        assert early.held == []
        # And a signal sent now goes through the same handlers to the app.
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(500):
            if len(target.calls) == 2:
                break
            await asyncio.sleep(0.01)
        assert target.calls == ["SIGTERM", "SIGHUP"]
    finally:
        for sig in StartSignals.SIGNALS:
            loop.remove_signal_handler(sig)
