"""Key health as an operator sees it, end to end: the official SDK through a
real hub to a fake vendor that refuses a key on demand, and the real
`hubcore keys` CLI. A vendor 401 is one log line; `keys enable` revives a
dead key and prints the state it left it in; enable and disable are stored
and survive restarts (a real `hubcore serve` process) and reloads."""
from __future__ import annotations

import logging
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest

from hubcore import store
from hubcore.ops.client import FETCH_TIMEOUT
from tests.fakevendor import FakeVendor
from tests.functional.test_lifecycle import (
    KEY_NEW,
    KEY_ONE,
    KEY_TWO,
    Serve,
    assert_no_secrets,
    eventually,
    request,
)
from tests.hubharness import HubThread, make_config, mint, run_cli

KEY_GOOD = "sk-ant-persist-good"
KEY_REFUSED = "sk-ant-persist-refused"
MODEL = "claude-sonnet-4-6"


class KeyLog(logging.Handler):
    """The `hubcore.keys` records, attached to that logger itself so that no
    propagation setting elsewhere in the process can hide one."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def key_log() -> Iterator[KeyLog]:
    logger = logging.getLogger("hubcore.keys")
    handler, level = KeyLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="hc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def hub_config(tmp_path: Path, sock_dir: Path, vendor: FakeVendor, keys: list[tuple[str, str]]) -> Any:
    upstream = {
        "name": "anthropic", "kind": "anthropic", "base_url": vendor.url,
        "keys": [{"key": secret, "label": label} for label, secret in keys],
    }
    return make_config(tmp_path, [upstream], ops_socket=str(sock_dir / "ops.sock"))


def client(hub: HubThread, token: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=token, base_url=hub.url, max_retries=0)


def ask(sdk: anthropic.Anthropic) -> str:
    message = sdk.messages.create(model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    return message.id


def keys_cli(sock: Path, *args: str) -> Any:
    return run_cli("keys", *args, "--socket", str(sock / "ops.sock"))


# -- a refused key ---------------------------------------------------------------------------


def test_a_vendor_401_is_one_log_line_naming_the_key(tmp_path: Path, sock_dir: Path, key_log: KeyLog) -> None:
    with FakeVendor(keys={KEY_GOOD: "ok", KEY_REFUSED: 401}) as vendor:
        config = hub_config(tmp_path, sock_dir, vendor, [("good", KEY_GOOD), ("refused", KEY_REFUSED)])
        with HubThread(config) as hub:
            sdk = client(hub, hub.mint())
            for _ in range(6):
                ask(sdk)  # the refused key's request goes out again on the good one
            assert vendor.hits[KEY_REFUSED] == 1
    lines = [r for r in key_log.records if r.label == "refused"]  # type: ignore[attr-defined]
    assert len(lines) == 1, [r.getMessage() for r in key_log.records]
    (line,) = lines
    assert line.levelno == logging.WARNING
    assert (line.upstream, line.old_state, line.new_state, line.reason) == (  # type: ignore[attr-defined]
        "anthropic", "healthy", "dead", "vendor 401",
    )
    assert line.getMessage() == "upstream anthropic key refused: healthy -> dead (vendor 401)"
    assert_no_secrets(*(r.getMessage() for r in key_log.records), secrets=(KEY_REFUSED, KEY_GOOD))


def test_keys_enable_revives_a_dead_key_and_prints_its_state(tmp_path: Path, sock_dir: Path) -> None:
    with FakeVendor(keys={KEY_REFUSED: 401}) as vendor:
        config = hub_config(tmp_path, sock_dir, vendor, [("b", KEY_REFUSED)])
        with HubThread(config) as hub:
            sdk = client(hub, hub.mint())
            with pytest.raises(anthropic.APIStatusError):
                ask(sdk)
            listed = keys_cli(sock_dir, "--json")
            assert listed.returncode == 0, listed.stderr
            assert [k["state"] for k in orjson.loads(listed.stdout)] == ["dead"]

            vendor.set_key_behaviour(KEY_REFUSED, "ok")  # the vendor takes the key again
            enabled = keys_cli(sock_dir, "enable", "b")
            assert enabled.returncode == 0, enabled.stderr
            assert enabled.stdout.strip() == "key b enabled: anthropic healthy"
            hits = vendor.hits[KEY_REFUSED]
            ask(sdk)
            assert vendor.hits[KEY_REFUSED] == hits + 1

            # disable, then enable: the round trip, each printing the truth.
            disabled = keys_cli(sock_dir, "disable", "b")
            assert (disabled.returncode, disabled.stdout.strip()) == (0, "key b disabled: anthropic disabled")
            with pytest.raises(anthropic.APIStatusError) as refused:
                ask(sdk)
            assert refused.value.status_code == 503
            assert vendor.hits[KEY_REFUSED] == hits + 1
            enabled = keys_cli(sock_dir, "enable", "b", "--json")
            assert enabled.returncode == 0, enabled.stderr
            assert orjson.loads(enabled.stdout) == {
                "label": "b", "enabled": True, "states": {"anthropic": "healthy"}, "stored": True,
            }
            ask(sdk)
            assert vendor.hits[KEY_REFUSED] == hits + 2

            missing = keys_cli(sock_dir, "enable", "nope")
            assert missing.returncode != 0 and missing.stdout == ""
            assert missing.stderr.startswith("hubcore: ") and "nope" in missing.stderr


def test_a_switch_the_locked_database_cannot_take_still_applies_and_says_so(
    tmp_path: Path, sock_dir: Path, key_log: KeyLog
) -> None:
    with FakeVendor(keys={KEY_GOOD: "ok", KEY_REFUSED: "ok"}) as vendor:
        config = hub_config(tmp_path, sock_dir, vendor, [("good", KEY_GOOD), ("other", KEY_REFUSED)])
        with HubThread(config) as hub:
            sdk = client(hub, hub.mint())
            # store.connect: on PostgreSQL too, BEGIN IMMEDIATE takes the write lock.
            locker = store.connect(config.server.database)
            try:
                locker.execute("BEGIN IMMEDIATE")  # another writer holds the database
                started = time.monotonic()
                disabled = keys_cli(sock_dir, "disable", "other")
                took = time.monotonic() - started
                hits = vendor.hits[KEY_REFUSED]
                for _ in range(4):
                    ask(sdk)
                assert vendor.hits[KEY_REFUSED] == hits
            finally:
                locker.close()
            assert disabled.returncode == 0, disabled.stderr
            assert disabled.stdout.strip() == "key other disabled: anthropic disabled"
            assert disabled.stderr.startswith("hubcore: warning: key other disabled but not stored (")
            assert disabled.stderr.rstrip().endswith("a restart forgets this change")
            # Within the CLI's own wait for the answer (opsclient.FETCH_TIMEOUT).
            assert took < FETCH_TIMEOUT
            # Unlocked, the next switch is stored.
            enabled = keys_cli(sock_dir, "enable", "other", "--json")
            assert orjson.loads(enabled.stdout)["stored"] is True


# -- across restarts and reloads ---------------------------------------------------------------


@pytest.fixture
def vendor() -> Iterator[FakeVendor]:
    with FakeVendor(keys={KEY_ONE: "ok", KEY_TWO: "ok", KEY_NEW: "ok"}, accept_any_key=True) as v:
        yield v


@pytest.fixture
def serve(tmp_path: Path, vendor: FakeVendor) -> Iterator[Serve]:
    s = Serve(tmp_path, vendor, [("a1", KEY_ONE), ("a2", KEY_TWO)])
    yield s
    s.close()


def states(s: Serve) -> dict[tuple[str, str], str]:
    shown = s.cli("keys", "--json")
    assert shown.returncode == 0, shown.stderr
    return {(k["upstream"], k["label"]): k["state"] for k in orjson.loads(shown.stdout)}


def restart(s: Serve) -> None:
    s.signal(signal.SIGTERM)
    assert s.wait() == 0
    s.start()


def hits_over(s: Serve, vendor: FakeVendor, token: str, count: int) -> dict[str, int]:
    """Send `count` requests (each must succeed); how many reached each key."""
    before = vendor.hits
    assert [request(s.port, token)[0] for _ in range(count)] == [200] * count
    after = vendor.hits
    return {secret: after[secret] - before[secret] for secret in (KEY_ONE, KEY_TWO, KEY_NEW)}


def test_disable_and_enable_survive_restarts(serve: Serve, vendor: FakeVendor) -> None:
    token = mint(serve.db, "persist")
    serve.start()
    disabled = serve.cli("keys", "disable", "a1")
    assert (disabled.returncode, disabled.stdout.strip()) == (0, "key a1 disabled: anthropic disabled"), disabled.stderr

    restart(serve)
    assert states(serve)[("anthropic", "a1")] == "disabled"
    assert hits_over(serve, vendor, token, 6) == {KEY_ONE: 0, KEY_TWO: 6, KEY_NEW: 0}
    assert "upstream anthropic key a1: healthy -> disabled (operator disable, stored)" in serve.log_text()

    enabled = serve.cli("keys", "enable", "a1")
    assert (enabled.returncode, enabled.stdout.strip()) == (0, "key a1 enabled: anthropic healthy"), enabled.stderr
    restart(serve)
    assert states(serve)[("anthropic", "a1")] == "healthy"
    assert hits_over(serve, vendor, token, 4) == {KEY_ONE: 2, KEY_TWO: 2, KEY_NEW: 0}

    # A stored switch of a key the config no longer has is harmless.
    serve.cli("keys", "disable", "a1")
    serve.write([("a2", KEY_TWO)])
    restart(serve)
    assert set(states(serve)) == {("anthropic", "a2"), ("openai", "o1")}
    assert hits_over(serve, vendor, token, 2) == {KEY_ONE: 0, KEY_TWO: 2, KEY_NEW: 0}
    serve.signal(signal.SIGTERM)
    assert serve.wait() == 0
    assert_no_secrets(serve.log_text(), secrets=(KEY_ONE, KEY_TWO, KEY_NEW))


def test_a_reload_keeps_the_operators_disable(serve: Serve, vendor: FakeVendor) -> None:
    token = mint(serve.db, "persist")
    serve.start()
    assert serve.cli("keys", "disable", "a1").returncode == 0

    # The same config, then a new secret under the label: still disabled,
    # as a restart would have it.
    for keys in ([("a1", KEY_ONE), ("a2", KEY_TWO)], [("a1", KEY_NEW), ("a2", KEY_TWO)]):
        serve.write(keys)
        reloaded = serve.cli("reload")
        assert reloaded.returncode == 0, reloaded.stderr
        assert states(serve)[("anthropic", "a1")] == "disabled"
        assert hits_over(serve, vendor, token, 4) == {KEY_ONE: 0, KEY_TWO: 4, KEY_NEW: 0}

    # SIGHUP, with the key dropped and then back.
    serve.write([("a2", KEY_TWO)])
    serve.signal(signal.SIGHUP)
    eventually(lambda: ("anthropic", "a1") not in states(serve), what="a1 dropped by the reload")
    serve.write([("a1", KEY_NEW), ("a2", KEY_TWO)])
    serve.signal(signal.SIGHUP)
    eventually(lambda: states(serve).get(("anthropic", "a1")), what="a1 back after the reload")
    assert states(serve)[("anthropic", "a1")] == "disabled"

    assert serve.cli("keys", "enable", "a1").returncode == 0
    assert serve.cli("reload").returncode == 0
    assert states(serve)[("anthropic", "a1")] == "healthy"
    assert hits_over(serve, vendor, token, 4) == {KEY_ONE: 0, KEY_TWO: 2, KEY_NEW: 2}


def test_the_switch_is_one_row_per_upstream_and_label(serve: Serve) -> None:
    serve.start()
    for action in ("disable", "enable", "disable"):
        assert serve.cli("keys", action, "a1").returncode == 0
    assert serve.cli("keys", "disable", "o1").returncode == 0
    conn = store.connect(serve.db)
    try:
        rows = conn.execute("SELECT upstream, label, enabled FROM key_switches ORDER BY upstream").fetchall()
    finally:
        conn.close()
    assert rows == [("anthropic", "a1", 0), ("openai", "o1", 0)]

