"""Failover end to end: official SDKs → a real hub → vendor keys that misbehave
on demand. Rotation on 429/5xx/401, cooldowns, the circuit breaker, session
affinity, the rate-limit queue, give-up answers and mid-stream failures."""
from __future__ import annotations

import contextlib
import logging
import math
import socket
import socketserver
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest

from tests.fakevendor import Behaviour, FakeVendor, RecordedRequest, expected_text
from tests.hubharness import HubThread, make_config, mint

MODEL = "claude-sonnet-4-6"
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]


# -- harness -------------------------------------------------------------------


def key(secret: str, **fields: Any) -> dict[str, Any]:
    """A key table whose label is its secret (fine for a fake vendor's test keys)."""
    return {"key": secret, "label": secret, **fields}


@contextlib.contextmanager
def running_hub(
    tmp_path: Path, base_url: str, anthropic_keys: list[Any], openai_keys: list[Any] | None = None, **policy: Any
) -> Iterator[tuple[HubThread, str]]:
    """A hub in front of `base_url` whose upstream tables carry `policy`; yields it and a hub token."""
    upstreams = [{"name": "anthropic", "kind": "anthropic", "base_url": base_url, "keys": anthropic_keys, **policy}]
    if openai_keys is not None:
        upstreams.append({"name": "openai", "kind": "openai", "base_url": base_url, "keys": openai_keys, **policy})
    config = make_config(tmp_path, upstreams)
    token = mint(config.server.database, "alice", "failover")
    with HubThread(config) as hub:
        yield hub, token


class _ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(autouse=True)
def no_hub_errors() -> Iterator[None]:
    """Fail a test whose hub logged an error (a handler that crashed after the
    client got its answer is invisible to the client)."""
    handler = _ErrorLog()
    logger = logging.getLogger("hubcore")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not handler.lines, "\n".join(handler.lines)


ClientFactory = Callable[[HubThread, str], anthropic.Anthropic]


@pytest.fixture
def clients() -> Iterator[ClientFactory]:
    """Makes SDK clients (no retries of their own) and closes them after the test."""
    made: list[anthropic.Anthropic] = []

    def make(hub: HubThread, token: str) -> anthropic.Anthropic:
        client = anthropic.Anthropic(base_url=hub.url, api_key=token, max_retries=0)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def ask(client: anthropic.Anthropic, headers: dict[str, str] | None = None, user_id: str | None = None) -> Any:
    """One non-streaming request; raises whatever the SDK raises."""
    extra: dict[str, Any] = {"extra_headers": headers} if headers else {}
    if user_id is not None:
        extra["metadata"] = {"user_id": user_id}
    return client.messages.create(model=MODEL, max_tokens=32, messages=MESSAGES, **extra)


def key_states(hub: HubThread, kind: str = "anthropic") -> dict[str, dict[str, Any]]:
    """The ring's snapshot, read on the hub's own loop (the ring is not thread-safe)."""
    assert hub.app is not None
    app = hub.app

    async def snapshot() -> list[dict[str, Any]]:
        return app.hub.upstreams[kind].ring.snapshot()

    return {row["label"]: row for row in hub.call(snapshot())}


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)


def check_rows(hub: HubThread, count: int, labels: set[str]) -> list[dict[str, Any]]:
    """The usage rows, once `count` are written; each must name a configured
    key (when an attempt was made) and its number of attempts."""
    rows = hub.wait_rows(count)
    assert len(rows) == count
    for row in rows:
        assert row["attempts"] is not None and row["attempts"] >= 0
        if row["attempts"]:
            assert row["key_label"] in labels, row
    return rows


def legacy_user_id(session: str) -> str:
    return "user_" + "c" * 64 + "_account__session_" + session


def json_user_id(session: str) -> str:
    return orjson.dumps({"device_id": "d" * 64, "account_uuid": "", "session_id": session}).decode()


# -- rotation, cooling, dead keys, the circuit ---------------------------------


def test_429_and_500_keys_never_reach_the_client_and_the_429_key_rests(tmp_path: Path, clients: ClientFactory) -> None:
    keys: dict[str, Behaviour] = {"k-429": 429, "k-500": 500, "k-ok": "ok"}
    with FakeVendor(keys, retry_after=1.0) as vendor, running_hub(
        tmp_path, vendor.url, [key(k) for k in keys], circuit_threshold=1000
    ) as (hub, token):
        client = clients(hub, token)
        # Until the 429 key has answered once, every request must still succeed.
        hit_no_earlier_than = 0.0
        while vendor.hits["k-429"] == 0:
            hit_no_earlier_than = time.monotonic()
            assert ask(client).content[0].text == expected_text()
        hit_no_later_than = time.monotonic()
        # The vendor's limits are per model class: the key rests for this one.
        assert set(key_states(hub)["k-429"]["rests"]) == {"sonnet"}
        # The key rests 1 s (the vendor's retry-after) from its 429: whatever
        # ends before hit_no_earlier_than + 1 s must not touch it.
        sent = 0
        while time.monotonic() < hit_no_earlier_than + 0.6:
            with client.messages.stream(model=MODEL, max_tokens=32, messages=MESSAGES) as stream:
                assert "".join(stream.text_stream) == expected_text()
            if time.monotonic() < hit_no_earlier_than + 1.0:
                assert vendor.hits["k-429"] == 1
                sent += 1
        assert sent >= 1
        # Once the rest is over the key is tried again (and rests again).
        time.sleep(max(0.0, hit_no_later_than + 1.05 - time.monotonic()))
        # Its 429 also said "0 remaining" until a reset rounded up to the
        # next second: while another key has room, the hub leaves it alone.
        deadline = hit_no_later_than + 3.0
        while vendor.hits["k-429"] < 2 and time.monotonic() < deadline:
            ask(client)
        assert vendor.hits["k-429"] == 2
        vendor.wait_idle()
        states = key_states(hub)
        assert states["k-429"]["rate_limited"] == 2
        assert states["k-500"]["errors"] == vendor.hits["k-500"]
        rows = check_rows(hub, len([r for r in vendor.requests if r.key == "k-ok"]), set(keys))
        assert all(r["outcome"] == "ok" and r["status"] == 200 and r["key_label"] == "k-ok" for r in rows)
        assert sum(r["attempts"] for r in rows) == len(vendor.requests)
        assert max(r["attempts"] for r in rows) >= 2


def test_a_key_the_vendor_refuses_is_never_used_again(tmp_path: Path, clients: ClientFactory) -> None:
    keys: dict[str, Behaviour] = {"k-401": 401, "k-403": 403, "k-ok": "ok"}
    with FakeVendor(keys) as vendor, running_hub(tmp_path, vendor.url, [key(k) for k in keys]) as (hub, token):
        client = clients(hub, token)
        for _ in range(20):
            assert ask(client).content[0].text == expected_text()
        assert vendor.hits == Counter({"k-401": 1, "k-403": 1, "k-ok": 20})
        states = key_states(hub)
        assert states["k-401"]["state"] == "dead" and states["k-401"]["last_error"] == "401 auth failed"
        assert states["k-403"]["state"] == "dead"
        rows = check_rows(hub, 20, set(keys))
        assert sum(r["attempts"] for r in rows) == 22


def test_every_key_refused_by_the_vendor_is_the_operators_503_not_a_401(tmp_path: Path, clients: ClientFactory) -> None:
    # A vendor 401 passed on would make Claude Code ask the developer to log
    # in again, though their hub token is fine.
    keys: dict[str, Behaviour] = {"k-401": 401, "k-403": 403}
    with FakeVendor(keys) as vendor, running_hub(tmp_path, vendor.url, [key(k) for k in keys]) as (hub, token):
        client = clients(hub, token)
        with pytest.raises(anthropic.APIStatusError) as info:
            ask(client)
        assert info.value.status_code == 503
        assert info.value.response.headers["x-should-retry"] == "false"
        assert "refused by the vendor" in info.value.message
        assert "k-401" not in info.value.response.text
        assert vendor.hits == Counter({"k-401": 1, "k-403": 1})
        (row,) = check_rows(hub, 1, set(keys))
        assert row["outcome"] == "upstream_error" and row["error_type"] == "vendor_key_refused"


def user_requests(vendor: FakeVendor, label: str) -> list[RecordedRequest]:
    return [r for r in vendor.requests if r.key == label and r.method == "POST"]


def probes(vendor: FakeVendor, label: str) -> list[RecordedRequest]:
    """The hub's own probes of a key: GET /v1/models with it."""
    return [r for r in vendor.requests if r.key == label and r.method == "GET" and r.path == "/v1/models"]


def test_circuit_opens_and_only_the_hubs_probe_closes_it(tmp_path: Path, clients: ClientFactory) -> None:
    keys: dict[str, Behaviour] = {"k-flaky": 500, "k-ok": "ok"}
    with FakeVendor(keys) as vendor, running_hub(
        tmp_path, vendor.url, [key(k) for k in keys], circuit_threshold=3, circuit_pause=0.4
    ) as (hub, token):
        client = clients(hub, token)
        requests = 0

        def ask_until_hits(count: int) -> tuple[float, float]:
            """Ask until k-flaky has `count` user requests; the bounds of when the last one happened."""
            nonlocal requests
            for _ in range(20):
                started = time.monotonic()
                assert ask(client).content[0].text == expected_text()
                requests += 1
                if len(user_requests(vendor, "k-flaky")) == count:
                    return started, time.monotonic()
            raise AssertionError(f"k-flaky not tried {count} times: {vendor.hits}")

        def ask_until_probes(count: int, timeout: float) -> tuple[float, float]:
            """Ask until k-flaky has had `count` probes: the last time it had
            fewer, and the first time it was seen to have them."""
            nonlocal requests
            fewer: float | None = None
            deadline = time.monotonic() + timeout
            while True:
                checked = time.monotonic()
                if len(probes(vendor, "k-flaky")) >= count:
                    assert fewer is not None, f"probe {count} came before it was looked for"
                    return fewer, checked
                fewer = checked
                assert checked < deadline, f"no probe {count} of k-flaky: {vendor.hits}"
                ask(client)
                requests += 1
                time.sleep(0.01)

        opened_after, _ = ask_until_hits(3)
        assert key_states(hub)["k-flaky"]["state"] == "open"
        # The pause over, the hub probes the key itself; users never do.
        first_probe_after, first_probe_seen = ask_until_probes(1, timeout=5)
        assert first_probe_seen >= opened_after + 0.4
        # It fails: open again, the pause doubled.
        wait_for(lambda: key_states(hub)["k-flaky"]["state"] == "open")
        assert key_states(hub)["k-flaky"]["consecutive_failures"] == 4
        # The vendor recovers; the next probe succeeds and closes the circuit.
        vendor.set_key_behaviour("k-flaky", "ok")
        _, second_probe_seen = ask_until_probes(2, timeout=5)
        assert second_probe_seen >= first_probe_after + 0.8
        wait_for(lambda: key_states(hub)["k-flaky"]["state"] == "healthy")
        # Only a probe's word: one failure short of the threshold until a user's request succeeds.
        assert key_states(hub)["k-flaky"]["consecutive_failures"] == 2
        assert len(user_requests(vendor, "k-flaky")) == 3
        for _ in range(4):
            ask(client)
            requests += 1
        assert len(user_requests(vendor, "k-flaky")) >= 4
        state = key_states(hub)["k-flaky"]
        assert state["state"] == "healthy" and state["consecutive_failures"] == 0
        assert [r.status for r in probes(vendor, "k-flaky")] == [500, 200]
        rows = check_rows(hub, requests, set(keys))
        assert all(r["outcome"] == "ok" for r in rows)
        assert sum(r["attempts"] for r in rows) == len([r for r in vendor.requests if r.method == "POST"])


@pytest.mark.parametrize("outage", ["refused", "503"])
def test_an_outage_fails_fast_and_the_first_success_follows_the_vendors_return_within_a_second(
    tmp_path: Path, outage: str, clients: ClientFactory
) -> None:
    keys: dict[str, Behaviour] = {"k-1": "ok", "k-2": "ok"}
    # Connection failures are judged on the default (short) probe pauses; a
    # vendor answering 5xx on the circuit_pause ones, shortened here.
    policy: dict[str, Any] = {"circuit_threshold": 2, "queue_timeout": 10.0}
    if outage == "503":
        policy.update(circuit_pause=0.3, circuit_pause_max=0.6)
    vendor = FakeVendor(keys).start()
    port = vendor.port
    try:
        with running_hub(tmp_path, vendor.url, [key(k) for k in keys], **policy) as (hub, token):
            client = clients(hub, token)
            assert ask(client).content[0].text == expected_text()
            if outage == "refused":
                vendor.stop()
            else:
                for label in keys:
                    vendor.set_key_behaviour(label, 503)
            # Both circuits open within the first request's attempts.
            with pytest.raises(anthropic.APIStatusError):
                ask(client)
            wait_for(lambda: {s["state"] for s in key_states(hub).values()} <= {"open", "half_open", "probing"})
            tripped = len(vendor.requests)
            slowest = 0.0
            for _ in range(10):
                started = time.monotonic()
                with pytest.raises(anthropic.APIStatusError) as info:
                    ask(client)
                slowest = max(slowest, time.monotonic() - started)
                # The hub's own 503, at once: no wait for the queue time, and
                # no user request is the one that finds out.
                assert info.value.status_code == 503
                assert info.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
                assert "no usable anthropic key" in info.value.message
                assert info.value.response.headers["retry-after"] == "1"
                time.sleep(0.1)
            assert slowest < 2.0, slowest

            if outage == "refused":
                vendor = FakeVendor(keys, port=port).start()
                tripped = 0
            else:
                for label in keys:
                    vendor.set_key_behaviour(label, "ok")
            back = time.monotonic()
            while True:
                started = time.monotonic()
                try:
                    message = ask(client)
                    break
                except anthropic.APIStatusError as e:
                    assert e.status_code == 503 and time.monotonic() - started < 2.0
                assert time.monotonic() - back < 10, key_states(hub)
                time.sleep(0.02)
            recovered = time.monotonic() - back
            print(f"{outage}: first success {recovered:.3f} s after the vendor's return, slowest 503 {slowest:.3f} s")
            assert message.content[0].text == expected_text()
            assert recovered < 2.0, recovered
            # Every key a user's request went to was probed (and answered) first.
            since = vendor.requests[tripped:]
            for label in keys:
                mine = [r for r in since if r.key == label]
                first_user = next((i for i, r in enumerate(mine) if r.method == "POST"), None)
                if first_user is not None:
                    before = mine[:first_user]
                    assert before and before[-1].path == "/v1/models" and before[-1].status == 200, [
                        (r.method, r.path, r.status) for r in mine
                    ]
    finally:
        vendor.stop()


@pytest.mark.parametrize("mode", ["reset", "error-event"])
def test_a_key_that_failed_mid_stream_serves_users_again_only_after_the_hubs_probe(
    tmp_path: Path, mode: str, clients: ClientFactory
) -> None:
    keys: dict[str, Behaviour] = {"k-1": "ok", "k-2": "ok"}
    with FakeVendor(keys) as vendor, running_hub(
        tmp_path, vendor.url, [key(k) for k in keys], circuit_threshold=1, circuit_pause=0.5
    ) as (hub, token):
        client = clients(hub, token)
        with pytest.raises(anthropic.APIStatusError):
            with client.messages.stream(
                model=MODEL, max_tokens=32, messages=MESSAGES,
                extra_headers={"x-fake-fail-after": "5", "x-fake-fail-mode": mode},
            ) as stream:
                for _ in stream.text_stream:
                    pass
        failed = vendor.requests[0]
        broken = str(failed.key)
        (healthy,) = set(keys) - {broken}
        wait_for(lambda: key_states(hub)[broken]["state"] != "healthy")
        # Users go to the healthy key while the broken one waits for its probe...
        served = 0
        deadline = time.monotonic() + 5
        while not probes(vendor, broken):
            assert time.monotonic() < deadline, "the hub never probed the key"
            with client.messages.stream(model=MODEL, max_tokens=32, messages=MESSAGES) as stream:
                assert "".join(stream.text_stream) == expected_text()
            served += 1
        assert served >= 1
        assert user_requests(vendor, broken) == [failed]
        # ...and after the probe's 200 the key is theirs again.
        wait_for(lambda: key_states(hub)[broken]["state"] == "healthy")
        for _ in range(10):
            ask(client)
            if len(user_requests(vendor, broken)) > 1:
                break
        mine = [r for r in vendor.requests if r.key == broken]
        assert [(r.method, r.path, r.status) for r in mine[:3]] == [
            ("POST", "/v1/messages", 200), ("GET", "/v1/models", 200), ("POST", "/v1/messages", 200),
        ]
        probe = mine[1]
        assert probe.header("x-api-key") == broken and probe.header("anthropic-version")
        assert len(user_requests(vendor, healthy)) >= served


# -- affinity ------------------------------------------------------------------


def test_a_session_stays_on_one_key_and_sessions_spread(tmp_path: Path, clients: ClientFactory) -> None:
    keys: dict[str, Behaviour] = {"k-a": "ok", "k-b": "ok", "k-c": "ok"}
    with FakeVendor(keys) as vendor, running_hub(tmp_path, vendor.url, [key(k) for k in keys]) as (hub, token):
        client = clients(hub, token)
        main_session = str(uuid.uuid4())
        others = [str(uuid.uuid4()) for _ in range(30)]
        # Three ways to name a session; each other session uses one of them.
        forms: list[Callable[[str], dict[str, Any]]] = [
            lambda s: {"headers": {"X-Claude-Code-Session-Id": s}},
            lambda s: {"user_id": json_user_id(s)},
            lambda s: {"user_id": legacy_user_id(s)},
        ]
        for i in range(200):
            ask(client, headers={"X-Claude-Code-Session-Id": main_session})
            if i % 2 == 0:
                other = others[(i // 2) % len(others)]
                ask(client, **forms[(i // 2) % 3](other))
        rows = check_rows(hub, 300, set(keys))
        by_session: dict[str, set[str]] = {}
        for row in rows:
            by_session.setdefault(row["session_id"], set()).add(row["key_label"])
        assert set(by_session) == {main_session, *others}
        assert all(len(labels) == 1 for labels in by_session.values()), by_session
        # The rows say what the vendor saw.
        assert Counter(r["key_label"] for r in rows) == vendor.hits
        spread = Counter(next(iter(labels)) for session, labels in by_session.items() if session != main_session)
        assert set(spread) == set(keys) and min(spread.values()) >= 5, spread


def test_a_rate_limited_session_moves_within_its_workspace(tmp_path: Path, clients: ClientFactory) -> None:
    # One organisation, two workspaces with limits of their own: after a 429
    # no key is of another org, so the failover rule comes down to "same
    # workspace", the move that keeps the session's prompt cache.
    specs = [
        key("a-1", workspace="ws-a", org="org-1"),
        key("a-2", workspace="ws-a", org="org-1"),
        key("b-1", workspace="ws-b", org="org-1"),
        key("b-2", workspace="ws-b", org="org-1"),
    ]
    workspace = {s["label"]: s["workspace"] for s in specs}
    behaviours: dict[str, Behaviour] = {s["key"]: "ok" for s in specs}
    with FakeVendor(behaviours, retry_after=30) as vendor, running_hub(
        tmp_path, vendor.url, specs
    ) as (hub, token):
        client = clients(hub, token)
        sessions = [str(uuid.uuid4()) for _ in range(4)]
        home: dict[str, str] = {}
        for session in sessions:
            ask(client, headers={"X-Claude-Code-Session-Id": session})
            home[session] = str(vendor.requests[-1].key)
        assert set(home.values()) == set(workspace)  # four new sessions, four keys
        moved, stayed = sessions[0], sessions[1]
        vendor.set_key_behaviour(home[moved], 429)
        before = len(vendor.requests)
        for _ in range(10):
            for session in (moved, stayed):
                ask(client, headers={"X-Claude-Code-Session-Id": session})
        seen = vendor.requests[before:]
        assert [r.key for r in seen].count(home[moved]) == 1  # one 429, then it rests
        new_home = {r.key for r in seen if r.header("x-claude-code-session-id") == moved and r.key != home[moved]}
        assert len(new_home) == 1
        (new_key,) = new_home
        assert workspace[new_key] == workspace[home[moved]]
        assert {r.key for r in seen if r.header("x-claude-code-session-id") == stayed} == {home[stayed]}
        rows = check_rows(hub, 24, set(workspace))
        assert all(r["outcome"] == "ok" for r in rows)
        (retried,) = [r for r in rows if r["attempts"] > 1]
        assert retried["session_id"] == moved and retried["attempts"] == 2 and retried["key_label"] == new_key


def test_a_session_pushed_to_a_lower_tier_comes_back(tmp_path: Path, clients: ClientFactory) -> None:
    specs = [key("primary", priority=0), key("backup", priority=1)]
    with FakeVendor({"primary": 429, "backup": "ok"}, retry_after=0.3) as vendor, running_hub(
        tmp_path, vendor.url, specs
    ) as (hub, token):
        client = clients(hub, token)
        session = {"X-Claude-Code-Session-Id": str(uuid.uuid4())}
        ask(client, headers=session)
        assert [r.key for r in vendor.requests] == ["primary", "backup"]
        vendor.set_key_behaviour("primary", "ok")
        ask(client, headers=session)
        assert vendor.requests[-1].key == "backup"
        time.sleep(0.35)
        for _ in range(3):
            ask(client, headers=session)
        assert [r.key for r in vendor.requests[-3:]] == ["primary"] * 3


# -- the queue when every key rests --------------------------------------------


def test_every_key_cooling_with_a_short_queue_is_an_honest_429(tmp_path: Path, clients: ClientFactory) -> None:
    keys: dict[str, Behaviour] = {"k-1": 429, "k-2": 429}
    with FakeVendor(keys, retry_after=5) as vendor, running_hub(
        tmp_path, vendor.url, [key(k) for k in keys], queue_timeout=0.2
    ) as (hub, token):
        client = clients(hub, token)
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(anthropic.RateLimitError) as info:
                ask(client)
            assert time.monotonic() - started < 3.0
            error = info.value
            assert error.body["type"] == "error"  # type: ignore[index]
            assert error.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
            # The hub's own answer, not a vendor 429 forbidding a retry: the
            # retry-after is honest, so a client may come back then.
            assert error.response.headers.get("x-should-retry") != "false"
            assert "x-hubcore-request-id" in error.response.headers
            retry_after = float(error.response.headers["retry-after"])
            # The keys rest 5 s from the vendor's answers: no sooner, and not much later.
            assert 4 <= retry_after <= 6, retry_after
        # Both keys were tried once, by the first request; the second found them resting.
        assert vendor.hits == Counter({"k-1": 1, "k-2": 1})
        rows = check_rows(hub, 2, set(keys))
        assert [r["status"] for r in rows] == [429, 429]
        assert [r["attempts"] for r in rows] == [2, 0]
        assert all(r["error_type"] == "rate_limit_error" for r in rows)


def test_a_request_waits_for_a_key_to_free_up(tmp_path: Path, clients: ClientFactory) -> None:
    keys: dict[str, Behaviour] = {"k-1": 429, "k-2": 429}
    with FakeVendor(keys, retry_after=0.3) as vendor, running_hub(
        tmp_path, vendor.url, [key(k) for k in keys], queue_timeout=5.0
    ) as (hub, token):
        client = clients(hub, token)
        # Both keys answer 429 and rest 0.3 s; k-1 recovers meanwhile.
        result: dict[str, Any] = {}

        def call() -> None:
            try:
                result["message"] = ask(client)
            except anthropic.APIError as e:  # reported below, not swallowed
                result["error"] = e

        caller = threading.Thread(target=call)
        caller.start()
        wait_for(lambda: vendor.hits["k-1"] >= 1 and vendor.hits["k-2"] >= 1)
        vendor.set_key_behaviour("k-1", "ok")
        caller.join(10)
        assert not caller.is_alive()
        assert "error" not in result, result.get("error")
        assert result["message"].content[0].text == expected_text()
        assert vendor.requests[-1].key == "k-1"
        (row,) = check_rows(hub, 1, set(keys))
        # Two 429s, the wait, then k-1 (or k-2 once more first: it rests as long).
        assert row["outcome"] == "ok" and row["key_label"] == "k-1" and row["attempts"] in (3, 4)
        assert row["total_ms"] >= 250


def test_a_queued_request_whose_client_left_is_never_sent(tmp_path: Path) -> None:
    with FakeVendor({"k-1": 429}, retry_after=1.0) as vendor, running_hub(
        tmp_path, vendor.url, [key("k-1")], queue_timeout=5.0
    ) as (hub, token):
        body = orjson.dumps({"model": MODEL, "max_tokens": 32, "messages": MESSAGES})
        with socket.create_connection(("127.0.0.1", hub.port)) as s:
            s.sendall(
                b"POST /v1/messages HTTP/1.1\r\nhost: hub\r\nx-api-key: " + token.encode()
                + b"\r\nanthropic-version: 2023-06-01\r\ncontent-type: application/json\r\n"
                + b"content-length: %d\r\n\r\n" % len(body) + body
            )
            wait_for(lambda: vendor.hits["k-1"] == 1)
            hit_at = time.monotonic()
            time.sleep(0.1)  # the hub now waits for k-1 to rest 1 s
        (row,) = check_rows(hub, 1, {"k-1"})
        assert row["outcome"] == "client_aborted" and row["attempts"] == 1
        # Past the rest: a hub still holding the request would have sent it again.
        time.sleep(max(0.0, hit_at + 1.3 - time.monotonic()))
        assert vendor.hits["k-1"] == 1


# -- giving up -----------------------------------------------------------------


def test_exhausted_attempts_give_the_last_vendor_error_unchanged(tmp_path: Path, clients: ClientFactory) -> None:
    keys: dict[str, Behaviour] = {"k-500": 500, "k-529": 529, "k-503": 503}
    with FakeVendor(keys) as vendor, running_hub(
        tmp_path, vendor.url, [key(k) for k in keys], max_attempts=3, circuit_threshold=100
    ) as (hub, token):
        client = clients(hub, token)
        with pytest.raises(anthropic.APIStatusError) as info:
            ask(client)
        last = vendor.requests[-1]
        assert len(vendor.requests) == 3 and {r.key for r in vendor.requests} == set(keys)
        response = info.value.response
        assert response.status_code == last.status
        assert response.headers["x-should-retry"] == "false"
        assert response.headers["request-id"] == f"req_fake{last.index:016d}"
        body = orjson.loads(response.content)
        assert body["request_id"] == f"req_fake{last.index:016d}"
        (row,) = check_rows(hub, 1, set(keys))
        assert row["attempts"] == 3 and row["key_label"] == last.key
        assert row["outcome"] == "upstream_error" and row["status"] == last.status


def test_a_stream_that_dies_before_its_first_event_is_tried_on_every_key(tmp_path: Path, clients: ClientFactory) -> None:
    # The fake fails every attempt alike here; see the scripted vendor below
    # for the same failure on one key only.
    keys: dict[str, Behaviour] = {"k-1": "ok", "k-2": "ok", "k-3": "ok"}
    with FakeVendor(keys) as vendor, running_hub(
        tmp_path, vendor.url, [key(k) for k in keys], max_attempts=3
    ) as (hub, token):
        client = clients(hub, token)
        for mode in ("reset", "close"):
            vendor.reset()
            started = time.monotonic()
            with pytest.raises(anthropic.APIStatusError) as info:
                with client.messages.stream(
                    model=MODEL, max_tokens=32, messages=MESSAGES,
                    extra_headers={"x-fake-fail-after": "0", "x-fake-fail-mode": mode},
                ) as stream:
                    stream.get_final_message()
            assert time.monotonic() - started < 5
            assert info.value.status_code == 502
            assert info.value.response.headers["x-should-retry"] == "false"
            assert sorted(str(r.key) for r in vendor.requests) == ["k-1", "k-2", "k-3"], mode
            assert all(r.events_sent == 0 and r.status == 200 for r in vendor.requests)
        rows = check_rows(hub, 2, set(keys))
        assert [r["attempts"] for r in rows] == [3, 3]
        assert all(r["outcome"] == "upstream_error" for r in rows)


@pytest.mark.parametrize("mode", ["reset", "close", "error-event", "stall"])
def test_midstream_failure_raises_in_the_sdk_and_is_recorded(tmp_path: Path, mode: str, clients: ClientFactory) -> None:
    keys: dict[str, Behaviour] = {"k-1": "ok", "k-2": "ok"}
    with FakeVendor(keys) as vendor, running_hub(
        tmp_path, vendor.url, [key(k) for k in keys], stream_idle_timeout=0.3
    ) as (hub, token):
        client = clients(hub, token)
        texts: list[str] = []
        started = time.monotonic()
        # message_start, content_block_start, ping, two deltas: then the failure.
        with pytest.raises(anthropic.APIStatusError) as info:
            with client.messages.stream(
                model=MODEL, max_tokens=32, messages=MESSAGES,
                extra_headers={"x-fake-fail-after": "5", "x-fake-fail-mode": mode},
            ) as stream:
                for text in stream.text_stream:
                    texts.append(text)
        assert time.monotonic() - started < 5
        assert "".join(texts) == expected_text(2)  # what was sent, then the error
        assert info.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
        (req,) = vendor.requests  # nothing is retried once bytes reached the client
        (row,) = check_rows(hub, 1, set(keys))
        assert row["outcome"] == "upstream_aborted" and row["status"] == 200
        assert row["key_label"] == req.key and row["attempts"] == 1
        vendor.wait_idle()
        sent = vendor.sent_usage
        # The vendor's usage said 1 output token (message_start's placeholder);
        # the row holds the estimate from the two deltas that passed, and says so.
        assert (row["input_tokens"], sent.output) == (sent.input, 1)
        assert row["output_tokens"] == math.ceil(len(expected_text(2)) / 4) > 1
        assert row["output_estimated"] == 1
        # The hub still works after the abort.
        assert ask(client).content[0].text == expected_text()


def test_in_stream_overloaded_errors_count_towards_the_circuit(tmp_path: Path, clients: ClientFactory) -> None:
    # A 200 whose stream carries an overloaded_error event is the vendor
    # failing on that key as much as a 529 would be.
    keys: dict[str, Behaviour] = {"k-1": "ok"}
    with FakeVendor(keys) as vendor, running_hub(
        tmp_path, vendor.url, [key(k) for k in keys], circuit_threshold=2, circuit_pause=30.0
    ) as (hub, token):
        client = clients(hub, token)
        for expected_state in ("healthy", "open"):
            with pytest.raises(anthropic.APIStatusError):
                with client.messages.stream(
                    model=MODEL, max_tokens=32, messages=MESSAGES,
                    extra_headers={"x-fake-fail-after": "5", "x-fake-fail-mode": "error-event"},
                ) as stream:
                    for _ in stream.text_stream:
                        pass
            wait_for(lambda: key_states(hub)["k-1"]["state"] == expected_state)
        assert key_states(hub)["k-1"]["consecutive_failures"] == 2
        with pytest.raises(anthropic.APIStatusError) as info:
            ask(client)
        assert info.value.status_code == 503  # the circuit is open: the vendor is spared
        assert len(vendor.requests) == 2


# -- Codex-like clients --------------------------------------------------------


def test_codex_like_run_sees_no_429_while_one_key_is_rate_limited(tmp_path: Path) -> None:
    keys: dict[str, Behaviour] = {"o-1": "ok", "o-2": 429, "o-3": "ok"}
    with FakeVendor({"sk-ant-unused": "ok", **keys}, retry_after=0.2) as vendor, running_hub(
        tmp_path, vendor.url, [key("sk-ant-unused")], [key(k) for k in keys]
    ) as (hub, token), openai.OpenAI(base_url=hub.url + "/v1", api_key=token, max_retries=0) as client:
        conversations = [str(uuid.uuid4()) for _ in range(8)]

        def turn(i: int) -> int:
            # Codex sends its conversation id twice: a header and prompt_cache_key.
            conversation = conversations[i % len(conversations)]
            stream = client.responses.create(
                model="gpt-5-codex",
                input="hello",
                stream=True,
                prompt_cache_key=conversation,
                extra_headers={"session_id": conversation, "originator": "codex_cli_rs"},
            )
            events = list(stream)
            assert events[-1].type == "response.completed"
            return stream.response.status_code

        # A few conversations at once, as a developer with several Codex windows.
        with ThreadPoolExecutor(4) as pool:
            statuses = Counter(pool.map(turn, range(100)))
        assert statuses == Counter({200: 100})
        assert vendor.hits["o-2"] >= 1  # the limited key was tried, and absorbed
        rows = check_rows(hub, 100, set(keys))
        assert all(r["outcome"] == "ok" and r["key_label"] in ("o-1", "o-3") for r in rows)
        assert sum(r["attempts"] for r in rows) == len(vendor.requests)
        assert sum(r["attempts"] - 1 for r in rows) == vendor.hits["o-2"]
        for conversation in conversations:
            assert len({r["key_label"] for r in rows if r["session_id"] == conversation}) == 1


def test_first_byte_timeouts_move_on_and_the_deadline_ends_the_retries(tmp_path: Path, clients: ClientFactory) -> None:
    keys: dict[str, Behaviour] = {"k-1": "hang", "k-2": "hang", "k-3": "hang"}
    with FakeVendor(keys) as vendor, running_hub(
        tmp_path, vendor.url, [key(k) for k in keys], first_byte_timeout=0.4, retry_deadline=0.2, max_attempts=10
    ) as (hub, token):
        with pytest.raises(anthropic.APIStatusError) as info:
            ask(clients(hub, token))
        assert info.value.status_code == 504
        assert info.value.response.headers["x-should-retry"] == "false"
        # An attempt starts only before the deadline: the second one (0.4 s in) is the last.
        (row,) = check_rows(hub, 1, set(keys))
        assert row["attempts"] in (1, 2) and row["error_type"] == "timeout"
        assert len(vendor.requests) == row["attempts"]
        assert len({r.key for r in vendor.requests}) == row["attempts"]


# -- scripted vendor: answers the fake vendor cannot give ----------------------

# A minimal Anthropic stream (what the SDK needs to build a Message).
_STREAM_EVENTS = [
    ("message_start", {"type": "message_start", "message": {
        "id": "msg_scripted", "type": "message", "role": "assistant", "model": MODEL, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 7, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 1}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "scripted"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                       "usage": {"output_tokens": 3}}),
    ("message_stop", {"type": "message_stop"}),
]
_SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def _chunked_stream() -> bytes:
    parts = [_SSE_HEAD]
    for name, data in _STREAM_EVENTS:
        event = b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
        parts.append(b"%x\r\n%s\r\n" % (len(event), event))
    parts.append(b"0\r\n\r\n")
    return b"".join(parts)


OVERLOADED_503 = orjson.dumps(
    {"type": "error", "error": {"type": "api_error", "message": "Scripted: do not retry"}, "request_id": "req_scripted"}
)
# key -> (response bytes, close the connection afterwards)
SCRIPT: dict[str, tuple[bytes, bool]] = {
    "k-head-only": (_SSE_HEAD, True),
    "k-no-retry": (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nx-should-retry: false\r\n"
        b"request-id: req_scripted\r\ncontent-length: %d\r\n\r\n%s" % (len(OVERLOADED_503), OVERLOADED_503),
        False,
    ),
    "k-retry-me": (
        b"HTTP/1.1 409 Conflict\r\ncontent-type: application/json\r\nx-should-retry: true\r\n"
        b"content-length: 2\r\n\r\n{}",
        False,
    ),
    "k-ok": (_chunked_stream(), False),
    "k-no-content": (b"HTTP/1.1 204 No Content\r\nrequest-id: req_scripted\r\n\r\n", False),
    "k-not-modified": (b"HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\n\r\n", False),
}


class ScriptedVendor(socketserver.ThreadingTCPServer):
    """A bare HTTP/1.1 server answering each request by its x-api-key from SCRIPT."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> ScriptedVendor:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(5)


class _ScriptedHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server = self.server
        assert isinstance(server, ScriptedVendor)
        sock: socket.socket = self.request
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                data = sock.recv(65536)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            headers = dict(
                (name.strip().lower(), value.strip())
                for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
            )
            length = int(headers.get(b"content-length", b"0"))
            while len(buffer) < length:
                data = sock.recv(65536)
                if not data:
                    return
                buffer += data
            buffer = buffer[length:]
            secret = headers.get(b"x-api-key", b"").decode()
            with server.lock:
                server.hits[secret] += 1
            answer, close = SCRIPT[secret]
            sock.sendall(answer)
            if close:
                return


def test_vendor_x_should_retry_false_is_obeyed(tmp_path: Path, clients: ClientFactory) -> None:
    with ScriptedVendor() as vendor, running_hub(
        tmp_path, vendor.url, [key("k-no-retry", priority=0), key("k-ok", priority=1)]
    ) as (hub, token):
        with pytest.raises(anthropic.APIStatusError) as info:
            ask(clients(hub, token))
        response = info.value.response
        assert response.status_code == 503
        assert response.content == OVERLOADED_503
        assert response.headers["x-should-retry"] == "false"
        assert vendor.hits == Counter({"k-no-retry": 1})
        (row,) = check_rows(hub, 1, {"k-no-retry", "k-ok"})
        assert row["attempts"] == 1 and row["key_label"] == "k-no-retry" and row["status"] == 503


def test_vendor_x_should_retry_true_on_a_4xx_moves_on(tmp_path: Path, clients: ClientFactory) -> None:
    specs = [key("k-retry-me", priority=0), key("k-ok", priority=1)]
    with ScriptedVendor() as vendor, running_hub(tmp_path, vendor.url, specs) as (hub, token):
        with clients(hub, token).messages.stream(model=MODEL, max_tokens=32, messages=MESSAGES) as stream:
            assert "".join(stream.text_stream) == "scripted"
        assert vendor.hits == Counter({"k-retry-me": 1, "k-ok": 1})
        # A transient answer says nothing against the key.
        assert key_states(hub)["k-retry-me"]["state"] == "healthy"
        (row,) = check_rows(hub, 1, {"k-retry-me", "k-ok"})
        assert row["attempts"] == 2 and row["key_label"] == "k-ok"


def test_a_stream_dying_before_its_first_event_is_retried_transparently(tmp_path: Path, clients: ClientFactory) -> None:
    with ScriptedVendor() as vendor, running_hub(
        tmp_path, vendor.url, [key("k-head-only", priority=0), key("k-ok", priority=1)]
    ) as (hub, token):
        client = clients(hub, token)
        with client.messages.stream(model=MODEL, max_tokens=32, messages=MESSAGES) as stream:
            assert "".join(stream.text_stream) == "scripted"
            final = stream.get_final_message()
        assert final.usage.output_tokens == 3
        assert vendor.hits == Counter({"k-head-only": 1, "k-ok": 1})
        (row,) = check_rows(hub, 1, {"k-head-only", "k-ok"})
        assert row["outcome"] == "ok" and row["attempts"] == 2 and row["key_label"] == "k-ok"
        assert (row["input_tokens"], row["output_tokens"]) == (7, 3)


@pytest.mark.parametrize("secret, status", [("k-no-content", b"204 No Content"), ("k-not-modified", b"304 Not Modified")])
def test_bodiless_answers_keep_the_client_connection_framed(tmp_path: Path, secret: str, status: bytes) -> None:
    """A 204 or 304 ends at its head: the hub adds no chunked body to it, so
    the next response on the same keep-alive connection reads cleanly."""
    with ScriptedVendor() as vendor, running_hub(tmp_path, vendor.url, [key(secret)]) as (hub, token):
        body = b'{"model":"%s","max_tokens":8,"messages":[]}' % MODEL.encode()
        request = (b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: " + token.encode()
                   + b"\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        with socket.create_connection(("127.0.0.1", hub.port), timeout=10) as s:
            s.sendall(request + request)
            data = b""
            while data.count(b"\r\n\r\n") < 2:
                chunk = s.recv(65536)
                assert chunk, f"the hub closed the connection after {data!r}"
                data += chunk
            s.settimeout(0.3)
            with pytest.raises(TimeoutError):
                data += s.recv(65536)  # nothing follows the second head
        first, second, rest = data.split(b"\r\n\r\n")
        for head in (first, second):
            assert head.startswith(b"HTTP/1.1 " + status + b"\r\n")
            assert b"transfer-encoding" not in head.lower() and b"connection: close" not in head.lower()
        assert rest == b""
        assert vendor.hits == Counter({secret: 2})
