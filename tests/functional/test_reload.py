"""Reloading upstreams while the hub runs: a new origin or new pool settings
take effect for the next request while a stream already open finishes where
it began; a config that cannot be applied whole is not applied at all; the
answer says what changed and never shows a secret. Real sockets, official SDK."""
from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import pytest

from hubcore import config as config_mod
from hubcore.config import KeySpec, UpstreamConfig
from hubcore.gateway.upstreams import UpstreamRuntime, config_changes
from tests.fakevendor import ANTHROPIC_KEY, OPENAI_KEY, FakeVendor, expected_text
from tests.hubharness import HubThread

MODEL = "claude-sonnet-4-6"
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]
# 20 deltas 60 ms apart: a stream open for about 1.2 s, long enough to reload under it.
SLOW_EVENTS = 20
SLOW = {"x-fake-events": str(SLOW_EVENTS), "x-fake-delay-ms": "60"}


def write_config(path: Path, tmp: Path, anthropic: dict[str, Any], openai: dict[str, Any] | None = None) -> Path:
    """A config file with one anthropic upstream (and an openai one) whose
    fields are `anthropic` (`openai`), keys included."""
    def table(name: str, kind: str, fields: dict[str, Any]) -> str:
        fields = {"name": name, "kind": kind, **fields}
        lines = []
        for field, value in fields.items():
            if field == "keys":
                keys = ", ".join(f'{{ key = "{secret}", label = "{label}" }}' for label, secret in value)
                lines.append(f"keys = [{keys}]")
            elif isinstance(value, str):
                lines.append(f'{field} = "{value}"')
            else:
                lines.append(f"{field} = {value}")
        return "[[upstream]]\n" + "\n".join(lines) + "\n\n"

    text = (
        f'[server]\nlisten = "127.0.0.1:0"\ndatabase = "{tmp / "hub.db"}"\nops_socket = ""\n'
        "token_reload_interval = 0.1\nusage_flush_interval = 0.05\n\n"
    )
    text += table("anthropic", "anthropic", anthropic)
    if openai is not None:
        text += table("openai", "openai", openai)
    path.write_text(text)
    return path


@pytest.fixture
def vendors() -> Iterator[tuple[FakeVendor, FakeVendor]]:
    with FakeVendor() as old, FakeVendor() as new:
        yield old, new
        old.check()
        new.check()


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return tmp_path / "hubcore.toml"


def start_hub(path: Path) -> HubThread:
    hub = HubThread(config_mod.load(str(path), env={}))
    hub.__enter__()
    assert hub.app is not None
    hub.app.config_path = str(path)  # what `serve --config` gives the App
    return hub


def reload(hub: HubThread) -> tuple[bool, str]:
    assert hub.app is not None
    return hub.call(hub.app.reload())


def runtime(hub: HubThread, kind: str = "anthropic") -> UpstreamRuntime:
    assert hub.app is not None
    return hub.app.hub.upstreams[kind]


def on_loop(hub: HubThread, read: Any) -> Any:
    """`read()` on the hub's loop: its objects belong to that thread."""
    async def call() -> Any:
        return read()

    return hub.call(call())


def stream_text(client: anthropic.Anthropic) -> str:
    with client.messages.stream(model=MODEL, max_tokens=64, messages=MESSAGES, extra_headers=SLOW) as stream:
        return "".join(stream.text_stream)


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_a_new_base_url_takes_the_next_request_while_an_open_stream_finishes_on_the_old_origin(
    tmp_path: Path, config_path: Path, vendors: tuple[FakeVendor, FakeVendor]
) -> None:
    old, new = vendors
    keys = [("k1", ANTHROPIC_KEY)]
    write_config(config_path, tmp_path, {"base_url": old.url, "keys": keys})
    hub = start_hub(config_path)
    try:
        client = anthropic.Anthropic(base_url=hub.url, api_key=hub.mint(), max_retries=0)
        with ThreadPoolExecutor(1) as pool:
            streaming = pool.submit(stream_text, client)
            old.wait_for_requests(1)
            old_pool = on_loop(hub, lambda: runtime(hub).pool)

            write_config(config_path, tmp_path, {"base_url": new.url + "/", "keys": keys})
            ok, message = reload(hub)
            assert ok, message
            assert f"upstream anthropic: base_url '{old.url}' -> '{new.url}/'" in message
            assert "upstream anthropic: new connection pool (1 requests in flight finish on the old one)" in message
            assert not streaming.done(), "the stream ended before the reload"

            answer = client.messages.create(model=MODEL, max_tokens=32, messages=MESSAGES)
            assert answer.content[0].type == "text" and answer.content[0].text == expected_text()
            assert new.hits[ANTHROPIC_KEY] == 1 and old.hits[ANTHROPIC_KEY] == 1
            assert new.requests[0].target == "/v1/messages"
            assert new.requests[0].header("host") == f"127.0.0.1:{new.port}"

            assert streaming.result(timeout=20) == expected_text(SLOW_EVENTS)
        assert old.requests[0].outcome == "completed"
        # The old pool kept nothing: its one connection closed when the stream was done.
        wait_for(lambda: old.open_connections == 0)
        assert on_loop(hub, lambda: (len(old_pool.active), len(old_pool.idle), old_pool.retired)) == (0, 0, True)
        assert on_loop(hub, lambda: runtime(hub).pool) is not old_pool
        # And the new origin's connection is pooled for the next request.
        client.messages.create(model=MODEL, max_tokens=32, messages=MESSAGES)
        assert new.connections_accepted == 1 and new.hits[ANTHROPIC_KEY] == 2 and old.hits[ANTHROPIC_KEY] == 1
        client.close()
    finally:
        hub.__exit__(None, None, None)
    rows = hub.usage_rows()
    assert [row["outcome"] for row in rows] == ["ok", "ok", "ok"]


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A port whose connects hang: its listener's accept queue is full and
    never drained, so the kernel drops further SYNs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.05)
    try:
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_a_new_connect_timeout_is_the_one_the_pool_connects_with(
    tmp_path: Path, config_path: Path, unanswered_port: int
) -> None:
    upstream = {
        "base_url": f"http://127.0.0.1:{unanswered_port}",
        "keys": [("k1", ANTHROPIC_KEY)],
        "connect_timeout": 30.0,
        "max_attempts": 1,
    }
    write_config(config_path, tmp_path, upstream)
    hub = start_hub(config_path)
    try:
        write_config(config_path, tmp_path, {**upstream, "connect_timeout": 0.2})
        ok, message = reload(hub)
        assert ok, message
        assert "upstream anthropic: connect_timeout 30 -> 0.2" in message
        assert on_loop(hub, lambda: runtime(hub).pool.connect_timeout) == 0.2

        # With the old pool's 30 s, this would outlast the client's timeout.
        client = anthropic.Anthropic(base_url=hub.url, api_key=hub.mint(), max_retries=0, timeout=5.0)
        started = time.monotonic()
        with pytest.raises(anthropic.APIStatusError) as failed:
            client.messages.create(model=MODEL, max_tokens=32, messages=MESSAGES)
        assert time.monotonic() - started < 3.0
        assert failed.value.status_code == 502
        assert "timed out after 0.2 s" in str(failed.value.body)
        client.close()
    finally:
        hub.__exit__(None, None, None)


def test_settings_of_requests_apply_in_place_and_keep_the_pooled_connections(
    tmp_path: Path, config_path: Path, vendors: tuple[FakeVendor, FakeVendor]
) -> None:
    vendor, _ = vendors
    upstream = {"base_url": vendor.url, "keys": [("k1", ANTHROPIC_KEY)]}
    write_config(config_path, tmp_path, upstream)
    hub = start_hub(config_path)
    try:
        client = anthropic.Anthropic(base_url=hub.url, api_key=hub.mint(), max_retries=0)
        client.messages.create(model=MODEL, max_tokens=32, messages=MESSAGES)
        pool = on_loop(hub, lambda: runtime(hub).pool)

        changed = {**upstream, "first_byte_timeout": 0.5, "circuit_threshold": 2,
                   "keys": [("k1", ANTHROPIC_KEY), ("k2", "sk-ant-second")]}
        write_config(config_path, tmp_path, changed)
        ok, message = reload(hub)
        assert ok, message
        assert message == (
            "reloaded; upstream anthropic: first_byte_timeout 600 -> 0.5; "
            "upstream anthropic: circuit_threshold 5 -> 2; upstream anthropic: key k2 added"
        )
        assert on_loop(hub, lambda: (runtime(hub).pool, pool.sweeper.interval)) == (pool, 0.05)
        assert on_loop(hub, lambda: runtime(hub).ring.labels) == ("k1", "k2")

        client.messages.create(model=MODEL, max_tokens=32, messages=MESSAGES)
        assert vendor.connections_accepted == 1  # the pooled connection served it

        # Nothing changed: nothing to report.
        assert reload(hub) == (True, "reloaded")
        client.close()
    finally:
        hub.__exit__(None, None, None)


def test_a_config_that_cannot_be_applied_whole_is_not_applied_at_all(
    tmp_path: Path, config_path: Path, vendors: tuple[FakeVendor, FakeVendor]
) -> None:
    old, new = vendors
    anthropic_upstream = {"base_url": old.url, "keys": [("k1", ANTHROPIC_KEY)]}
    openai_upstream = {"base_url": old.url, "keys": [("o1", OPENAI_KEY)]}
    write_config(config_path, tmp_path, anthropic_upstream, openai_upstream)
    hub = start_hub(config_path)
    try:
        missing = tmp_path / "no-such-ca.pem"
        write_config(
            config_path, tmp_path,
            {**anthropic_upstream, "base_url": f"https://localhost:{new.port}", "ca_file": str(missing)},
            {**openai_upstream, "base_url": new.url},
        )
        ok, message = reload(hub)
        assert not ok
        assert message.startswith(f"upstream 'anthropic': ca_file '{missing}': cannot load")
        assert on_loop(hub, lambda: (runtime(hub).config.base_url, runtime(hub, "openai").config.base_url)) == (
            old.url, old.url,
        )
    finally:
        hub.__exit__(None, None, None)


def test_upstreams_added_or_removed_are_reported_as_waiting_for_a_restart(
    tmp_path: Path, config_path: Path, vendors: tuple[FakeVendor, FakeVendor]
) -> None:
    vendor, _ = vendors
    write_config(config_path, tmp_path, {"base_url": vendor.url, "keys": [("k1", ANTHROPIC_KEY)]})
    hub = start_hub(config_path)
    try:
        text = config_path.read_text().replace('name = "anthropic"', 'name = "claude"')
        config_path.write_text(text)
        ok, message = reload(hub)
        assert ok
        assert message == (
            "reloaded; upstream claude: new; not started until a restart; "
            "upstream anthropic: gone from the file; serving until a restart"
        )
    finally:
        hub.__exit__(None, None, None)


def test_changes_name_keys_by_label_and_never_show_a_secret_or_url_credentials() -> None:
    old = UpstreamConfig(
        name="anthropic", kind="anthropic", base_url="https://user:hunter2@relay.example.com/v1",
        keys=(KeySpec("sk-ant-one", "a"), KeySpec("sk-ant-two", "b", weight=1)),
    )
    new = UpstreamConfig(
        name="anthropic", kind="anthropic", base_url="https://user:hunter3@relay.example.com:8443/v1",
        keys=(KeySpec("sk-ant-ONE", "a"), KeySpec("sk-ant-two", "b", weight=3), KeySpec("sk-ant-three", "c")),
        ca_file="/etc/ssl/relay.pem",
    )
    changes = config_changes(old, new)
    assert changes == [
        "base_url 'https://relay.example.com/v1' -> 'https://relay.example.com:8443/v1'",
        "ca_file '' -> '/etc/ssl/relay.pem'",
        "key c added",
        "key a: new secret",
        "key b: weight 1 -> 3",
    ]
    assert config_changes(new, new) == []
    shown = " ".join(changes)
    assert "hunter" not in shown and "sk-ant" not in shown
