"""The hub's per-request steps before its Exchange (HubCore: the gate and
the request ids), both twins: the same verdict on every head (no route, the
hub's root, `me`, a missing, bearer, unknown, revoked or known token, one
seen before), the same trust given to the connection, and ids of the same
shape, one after the other."""
from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from hubcore import store
from hubcore.errors import HubError
from hubcore.gateway import _exchange_py
from hubcore.governance import tokens
from hubcore.governance.tokens import Principal, TokenTable
from hubcore.http.wire import HeaderCollector
from tests.http.twins import twin_of


def head_of(index: dict[bytes, bytes]) -> HeaderCollector:
    """A request head as the server's parser hands it to the gate."""
    head = HeaderCollector()
    for name, value in index.items():
        head.on_header(name, value)
    return head


@pytest.fixture(params=["c", "py"])
def twin(request: pytest.FixtureRequest) -> ModuleType:
    return twin_of(request.param, "hubcore.gateway._exchange", _exchange_py)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = store.connect(tmp_path / "hub.db")
    yield conn
    conn.close()


class Protocol:
    """A client connection as the gate sees it: trusted once it showed a valid token."""

    def __init__(self) -> None:
        self.trusted = False
        self.trusts = 0

    def trust(self) -> None:
        self.trusts += 1
        self.trusted = True


def verdict(outcome: object) -> Any:
    """What a gate's answer says: the refusal's status and message, the principal's user, or None."""
    if isinstance(outcome, HubError):
        return (outcome.status, str(outcome))
    if isinstance(outcome, Principal):
        return outcome.user
    assert outcome is None
    return None


def test_the_gate_judges_each_head_as_the_twin_does(twin: ModuleType, db: sqlite3.Connection) -> None:
    _, alice = tokens.create(db, "alice")
    revoked_id, revoked = tokens.create(db, "bob")
    tokens.revoke(db, revoked_id)
    table = TokenTable()
    table.refresh(db, force=True)
    hub = twin.HubCore(table)
    heads = [
        (b"/v1/messages", {b"x-api-key": alice.encode()}, "alice"),
        (b"/v1/messages?beta=true", {b"x-api-key": alice.encode()}, "alice"),   # seen before now
        (b"/v1/messages", {b"authorization": b"Bearer " + alice.encode()}, "alice"),
        (b"/v1/responses", {b"x-api-key": alice.encode()}, "alice"),
        (b"/v1/models/claude-opus-4-6", {b"x-api-key": alice.encode()}, "alice"),
        (b"/hubcore/v1/me", {b"x-api-key": alice.encode()}, "alice"),
        (b"/", {}, None),
        (b"/?x", {}, None),
        (b"/v1/messages", {}, (401, "missing hub token: send it as x-api-key or Authorization: Bearer")),
        (b"/v1/messages", {b"x-api-key": b""}, (401, "missing hub token: send it as x-api-key or Authorization: Bearer")),
        (b"/v1/messages", {b"x-api-key": b"hc_not-a-token"}, (401, "invalid hub token")),
        (b"/v1/messages?x=1", {b"x-api-key": revoked.encode()}, 403),
        (b"/v1/complete", {b"x-api-key": alice.encode()}, (404, "no route for '/v1/complete'")),
        (b"/v1/models/../admin", {b"x-api-key": alice.encode()}, (404, "no route for '/v1/models/../admin'")),
    ]
    for target, index, expected in heads:
        protocol = Protocol()
        outcome = verdict(hub.gate(protocol, b"POST", target, head_of(index)))
        if isinstance(expected, int):
            assert outcome[0] == expected, target
        else:
            assert outcome == expected, target
        # Trusted exactly when a principal came back.
        assert protocol.trusts == (1 if isinstance(expected, str) else 0), target
        head = head_of(index)
        assert outcome == verdict(_exchange_py.HubCore.gate(hub, protocol, b"POST", target, head))  # type: ignore[arg-type]


def test_a_trusted_connection_is_not_trusted_again(twin: ModuleType, db: sqlite3.Connection) -> None:
    _, alice = tokens.create(db, "alice")
    table = TokenTable()
    table.refresh(db, force=True)
    hub = twin.HubCore(table)
    protocol = Protocol()
    head = head_of({b"x-api-key": alice.encode()})
    for _ in range(3):
        assert verdict(hub.gate(protocol, b"POST", b"/v1/messages", head)) == "alice"
    # The twin calls trust() each time, which does nothing once trusted; the
    # compiled gate reads `trusted` first. Either way it is trusted once.
    assert protocol.trusted


def test_a_reload_that_revoked_a_token_seen_before_refuses_it(twin: ModuleType, db: sqlite3.Connection) -> None:
    token_id, alice = tokens.create(db, "alice")
    table = TokenTable()
    table.refresh(db, force=True)
    hub = twin.HubCore(table)
    head = head_of({b"x-api-key": alice.encode()})
    assert verdict(hub.gate(Protocol(), b"POST", b"/v1/messages", head)) == "alice"
    tokens.revoke(db, token_id)
    assert table.refresh(db)
    assert verdict(hub.gate(Protocol(), b"POST", b"/v1/messages", head))[0] == 403


def test_request_ids_are_the_hubs_prefix_then_a_count(twin: ModuleType) -> None:
    hub = twin.HubCore(TokenTable())
    ids = [hub.request_id() for _ in range(20)]
    assert all(re.fullmatch(r"hc_[0-9a-f]{8}[0-9a-f]{10}", i) for i in ids), ids
    assert len({i[:11] for i in ids}) == 1
    assert [int(i[11:], 16) for i in ids] == list(range(1, 21))
    assert twin.HubCore(TokenTable()).request_id()[:11] != ids[0][:11]  # another hub, another prefix (2**-32)
    # Ten digits at least, more once the count needs them.
    hub._id_counter = 16**10 - 2
    assert [hub.request_id()[11:] for _ in range(3)] == ["ffffffffff", "10000000000", "10000000001"]
    hub._id_counter = 16**15 - 1
    assert hub.request_id()[11:] == "1000000000000000"


class Started:
    def __init__(self) -> None:
        self.count = 0

    def request_started(self) -> None:
        self.count += 1


def hub_of(twin: ModuleType, begin_raises: bool, in_callbacks: bool) -> Any:
    class Exchange:
        def __init__(self, hub: Any, request: object, protocol: Any) -> None:
            self.hub, self.request, self.protocol = hub, request, protocol
            self.failure: BaseException | None = None
            self.in_callbacks = in_callbacks

        def begin(self) -> None:
            if begin_raises:
                raise RuntimeError("a bug in begin")

    class Hub(twin.HubCore):  # type: ignore[name-defined, misc]
        def __init__(self) -> None:
            super().__init__(TokenTable())
            self.exchange_type = Exchange
            self.metrics = Started()

        async def _run(self, exchange: Any) -> Any:
            return exchange

    return Hub()


def ran(coroutine: Any) -> Any:
    """What a coroutine that does not wait returns."""
    assert coroutine is not None
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("the task waited")


def test_handle_begins_the_exchange_and_returns_a_task_only_when_it_left_the_callbacks(twin: ModuleType) -> None:
    protocol = SimpleNamespace(handler=None)
    in_callbacks = hub_of(twin, begin_raises=False, in_callbacks=True)
    assert in_callbacks.handle("request", protocol) is None
    assert protocol.handler.request == "request" and in_callbacks.metrics.count == 1

    task = hub_of(twin, begin_raises=False, in_callbacks=False)
    assert ran(task.handle("request", protocol)) is protocol.handler  # the hub's _run, of this exchange
    assert task.metrics.count == 1

    # A bug in begin: kept on the exchange for its task to raise and log.
    failing = hub_of(twin, begin_raises=True, in_callbacks=True)
    assert ran(failing.handle("request", protocol)) is protocol.handler
    assert isinstance(protocol.handler.failure, RuntimeError) and protocol.handler.in_callbacks is False
    assert failing.metrics.count == 1
