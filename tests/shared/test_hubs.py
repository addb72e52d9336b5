"""Two real hubs (Apps on their own loops and ports, one database) with a
[shared] table: a token's limits hold across them, a session's requests
land on one key whichever hub takes them, and Redis dying costs no request."""
from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from hubcore.governance.limits import Limits
from hubcore.shared.redis_state import Link
from tests.fakevendor import OPENAI_KEY, FakeVendor
from tests.hubharness import HubThread, eventually, make_config
from tests.servers import RedisServer

BODY = orjson.dumps({"model": "claude-sonnet-4-6", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})


def post(hub: HubThread, token: str, session: str | None = None, **headers: str) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=30)
    try:
        sent = {"x-api-key": token, "content-type": "application/json", "anthropic-version": "2023-06-01", **headers}
        if session is not None:
            sent["x-claude-code-session-id"] = session
        conn.request("POST", "/v1/messages", BODY, sent)
        response = conn.getresponse()
        return response.status, orjson.loads(response.read())
    finally:
        conn.close()


@contextmanager
def two_hubs(tmp_path: Path, vendor: FakeVendor, redis: RedisServer, keys: list[str], b_shared: dict[str, Any] | None = None,
             **shared: Any) -> Iterator[tuple[HubThread, HubThread]]:
    """Hubs a and b on one database and one Redis; `b_shared`: b's [shared] settings that differ."""
    upstreams = [
        {"name": "anthropic", "kind": "anthropic", "base_url": vendor.url, "keys": [{"key": k, "label": k} for k in keys]},
        {"name": "openai", "kind": "openai", "base_url": vendor.url, "keys": [OPENAI_KEY]},
    ]
    database = tmp_path / "hub.db"
    configs = []
    for name in ("a", "b"):
        home = tmp_path / name
        home.mkdir()
        configs.append(make_config(
            home, upstreams, database=str(database), spool=str(home / "spool"),
            shared={"redis": redis.url, "timeout": 0.5, "heartbeat_interval": 0.2, "instance_ttl": 1.0, **shared,
                    **((b_shared or {}) if name == "b" else {})},
        ))
    with HubThread(configs[0]) as a, HubThread(configs[1]) as b:
        yield a, b


def refreshed(*hubs: HubThread) -> None:
    for hub in hubs:
        assert hub.app is not None
        hub.call(hub.app.refresh_tokens(force=True))


def following(hub: HubThread) -> None:
    """Wait until `hub` hears every charge the others announce: charges
    announced before its subscription is up reach it through the catch-up
    instead, which a test counting heard charges must not race."""
    assert hub.app is not None and hub.app.shared is not None
    shared = hub.app.shared
    eventually(lambda: shared.stats()["following_charges"] or None, what="the charges' subscription")


def test_rpm_30_across_two_hubs(tmp_path: Path, vendor: FakeVendor, redis_server: RedisServer) -> None:
    with two_hubs(tmp_path, vendor, redis_server, ["sk-ant-good"]) as (a, b):
        token = a.mint_limited("alice", Limits(rpm=30))
        refreshed(b)
        answers = [post(a if i % 2 else b, token) for i in range(90)]
        statuses = [status for status, _ in answers]
        assert statuses.count(200) == 30 and statuses.count(429) == 60
        refused = next(body for status, body in answers if status == 429)
        assert refused["error"]["type"] == "rate_limit_error"
        assert "30 requests per minute" in refused["error"]["message"]


def test_a_request_the_shared_window_refused_takes_no_place_in_the_local_one(
    tmp_path: Path, vendor: FakeVendor, redis_server: RedisServer,
) -> None:
    with two_hubs(tmp_path, vendor, redis_server, ["sk-ant-good"]) as (a, b):
        token = a.mint_limited("carol", Limits(rpm=2))
        refreshed(b)
        assert [post(b, token)[0] for _ in range(2)] == [200, 200]
        assert [post(a, token)[0] for _ in range(2)] == [429, 429]
        # The minute passes for the shared window (its key goes, as after
        # 60 s): hub a, which admitted none itself, has both places to give.
        assert redis_server.command("DEL", "hubcore:rpm:u:carol") == b":1\r\n"
        assert [post(a, token)[0] for _ in range(3)] == [200, 200, 429]


def test_concurrency_1_across_two_hubs(tmp_path: Path, vendor: FakeVendor, redis_server: RedisServer) -> None:
    with two_hubs(tmp_path, vendor, redis_server, ["sk-ant-good"]) as (a, b):
        token = a.mint_limited("bob", Limits(concurrency=1))
        refreshed(b)
        slow: list[int] = []
        holder = threading.Thread(target=lambda: slow.append(post(a, token, **{"x-fake-first-byte-delay-ms": "1500"})[0]))
        holder.start()
        try:
            time.sleep(0.5)  # hub a's request holds the slot
            status, body = post(b, token)
            assert status == 429 and "concurrency limit of user bob" in body["error"]["message"]
        finally:
            holder.join(10)
        assert slow == [200]
        deadline = time.monotonic() + 5
        while post(b, token)[0] != 200:  # the slot comes back once the release lands
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_a_session_lands_on_one_key_across_hubs(tmp_path: Path, redis_server: RedisServer) -> None:
    keys = ["sk-ant-one", "sk-ant-two"]
    with FakeVendor(keys={keys[0]: "ok", keys[1]: "ok", OPENAI_KEY: "ok"}) as vendor:
        with two_hubs(tmp_path, vendor, redis_server, keys) as (a, b):
            token = a.mint("carol")
            refreshed(b)
            # The hubs' rings would otherwise pick in step (the same round
            # robin over the same keys) and agree without sharing anything.
            assert post(b, token)[0] == 200
            sessions = [f"session-{i}" for i in range(8)]
            # A vendor's first byte takes far longer than a write to Redis;
            # a fake one answering at once would race the session's first
            # write (the documented bound: a new session's first requests,
            # when they overlap).
            vendor_time = {"x-fake-first-byte-delay-ms": "30"}
            for round_ in range(3):
                for i, session in enumerate(sessions):
                    # Each session starts on a hub of its own and goes back and forth.
                    first, second = (a, b) if (i + round_) % 2 else (b, a)
                    assert post(first, token, session, **vendor_time)[0] == 200
                    assert post(second, token, session, **vendor_time)[0] == 200
            used: dict[str, set[str]] = {}
            for request in vendor.requests:
                session = request.header("x-claude-code-session-id")
                if session is not None:
                    used.setdefault(session, set()).add(request.key)
            assert {session: len(labels) for session, labels in used.items()} == {session: 1 for session in sessions}
            assert set().union(*used.values()) == set(keys)  # both keys served: a choice was made each time


def test_redis_killed_mid_traffic_costs_no_request(tmp_path: Path, vendor: FakeVendor, redis_server: RedisServer) -> None:
    with two_hubs(tmp_path, vendor, redis_server, ["sk-ant-good"], timeout=0.05) as (a, b):
        token = a.mint_limited("dave", Limits(rpm=10_000, concurrency=50))
        refreshed(b)
        statuses = []
        for i in range(40):
            if i == 15:
                redis_server.kill()
            statuses.append(post(a if i % 2 else b, token)[0])
        assert statuses == [200] * 40
        for hub in (a, b):
            assert hub.app is not None and hub.app.shared is not None
            assert hub.app.shared.degraded
            assert "hubcore_shared_degraded 1" in hub.app.metrics_text().splitlines()
            assert hub.app.stats()["shared"]["degraded"] is True
        redis_server.start()
        deadline = time.monotonic() + 10
        while not all(h.app is not None and h.app.shared is not None and h.app.shared.link is Link.SHARED for h in (a, b)):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert post(a, token)[0] == 200
        assert a.app is not None and "hubcore_shared_degraded 0" in a.app.metrics_text().splitlines()


def test_a_key_that_answered_429_through_one_hub_gets_nothing_from_the_other(
    tmp_path: Path, redis_server: RedisServer,
) -> None:
    # Listed first, so that each hub's round robin would try it first.
    keys = ["sk-ant-limited", "sk-ant-fine"]
    with FakeVendor(keys={keys[0]: 429, keys[1]: "ok", OPENAI_KEY: "ok"}, retry_after=30.0) as vendor:
        with two_hubs(tmp_path, vendor, redis_server, keys) as (a, b):
            token = a.mint("erin")
            refreshed(b)
            assert post(a, token)[0] == 200  # 429 on the first key, then the other
            assert [r.key for r in vendor.requests] == keys
            # The bound is "once the news lands": milliseconds after the 429.
            assert a.app is not None and a.app.shared is not None and a.call(a.app.shared.flush())
            for _ in range(6):
                assert post(b, token)[0] == 200
            assert [r.key for r in vendor.requests[2:]] == [keys[1]] * 6
            assert b.app is not None
            (limited,) = [k for k in b.app.hub.upstreams["anthropic"].ring.snapshot() if k["label"] == keys[0]]
            assert limited["rests"].get("sonnet", 0) > time.time() + 20  # rests there for the rest of the 30 s


@pytest.mark.parametrize("limited_through", ["a", "b"])
def test_an_operator_reset_through_one_hub_ends_the_rest_on_the_other(
    tmp_path: Path, redis_server: RedisServer, limited_through: str,
) -> None:
    keys = ["sk-ant-limited", "sk-ant-fine"]
    with FakeVendor(keys={keys[0]: 429, keys[1]: "ok", OPENAI_KEY: "ok"}, retry_after=30.0) as vendor:
        with two_hubs(tmp_path, vendor, redis_server, keys) as (a, b):
            token = a.mint("fay")
            refreshed(b)
            if limited_through == "a":
                assert post(a, token)[0] == 200  # the first key rests, through hub a
                assert post(b, token)[0] == 200  # hub b hears of it (or learns it itself)
            else:
                # Hub b's own 429, whose head reads no room left on the key:
                # the reset must outweigh that reading too.
                assert post(b, token)[0] == 200
                assert [r.key for r in vendor.requests] == keys
            assert b.app is not None and a.app is not None
            assert b.app.shared is not None and b.call(b.app.shared.flush())  # what b said of it has landed
            ring_b = b.app.hub.upstreams["anthropic"].ring

            def rests_on_b() -> dict[str, float]:
                (row,) = [k for k in ring_b.snapshot() if k["label"] == keys[0]]
                return dict(row["rests"])

            assert rests_on_b()
            vendor.set_key_behaviour(keys[0], "ok")  # the vendor takes the key again
            reset = a.call(a.app.reset_key(keys[0]))
            assert reset is not None and reset.states == {"anthropic": "healthy"}
            assert a.call(a.app.shared.flush())  # the word is in Redis
            sent = len(vendor.requests)
            for _ in range(4):
                assert post(b, token)[0] == 200
            assert rests_on_b() == {}
            # Hub b sends to the first key again, and tells no one of a reset it only heard.
            assert keys[0] in [r.key for r in vendor.requests[sent:]]


def test_a_key_switched_off_through_one_hub_is_off_on_the_other(tmp_path: Path, redis_server: RedisServer) -> None:
    keys = ["sk-ant-one", "sk-ant-two"]
    with FakeVendor(keys={keys[0]: "ok", keys[1]: "ok", OPENAI_KEY: "ok"}) as vendor, \
            two_hubs(tmp_path, vendor, redis_server, keys) as (a, b):
        token = a.mint("gus")
        refreshed(b)
        assert a.app is not None and b.app is not None
        switched = a.call(a.app.set_key_enabled(keys[0], False))
        assert switched is not None and switched.not_stored is None

        def state_on_b(label: str) -> str:
            (row,) = [k for k in b.app.hub.upstreams["anthropic"].ring.snapshot() if k["label"] == label]
            return str(row["state"])

        b.call(b.app.refresh_tokens())  # its poll: the generation moved with the switch
        assert state_on_b(keys[0]) == "disabled"
        sent = len(vendor.requests)
        for _ in range(4):
            assert post(b, token)[0] == 200
        assert {r.key for r in vendor.requests[sent:]} == {keys[1]}
        a.call(a.app.set_key_enabled(keys[0], True))
        b.call(b.app.refresh_tokens())
        assert state_on_b(keys[0]) == "healthy"


def me(hub: HubThread, token: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=30)
    try:
        conn.request("GET", "/hubcore/v1/me", headers={"x-api-key": token})
        response = conn.getresponse()
        assert response.status == 200
        return orjson.loads(response.read())  # type: ignore[no-any-return]
    finally:
        conn.close()


def test_spend_through_one_hub_shows_on_the_others_me_and_budget_headers(
    tmp_path: Path, vendor: FakeVendor, redis_server: RedisServer,
) -> None:
    with two_hubs(tmp_path, vendor, redis_server, ["sk-ant-good"]) as (a, b):
        token = a.mint_limited("hal", Limits(budget_month=1_000_000_000))
        refreshed(b)
        following(a)
        following(b)
        for _ in range(3):
            assert post(a, token)[0] == 200
        assert a.app is not None and b.app is not None

        def spent(hub: HubThread) -> int:
            return int(me(hub, token)["spend"]["month"]["user_micros"])

        deadline = time.monotonic() + 5
        while spent(a) == 0 or spent(b) != spent(a):
            assert time.monotonic() < deadline, (spent(a), spent(b))
            time.sleep(0.02)
        # As /stats shows them.
        seen_b, seen_a = b.app.stats()["shared"], a.app.stats()["shared"]
        assert (seen_b["charges_heard"], seen_b["following_charges"]) == (3, True)
        assert (seen_a["charges_heard"], seen_a["following_charges"]) == (0, True)
        # Hub b's budget header, written before this request's cost, counts hub a's spend.
        before = spent(a)
        conn = http.client.HTTPConnection("127.0.0.1", b.port, timeout=30)
        try:
            conn.request("POST", "/v1/messages", BODY, {"x-api-key": token, "content-type": "application/json",
                                                       "anthropic-version": "2023-06-01"})
            response = conn.getresponse()
            response.read()
            remaining = float(response.headers["x-hubcore-budget-remaining"])
        finally:
            conn.close()
        assert remaining == pytest.approx(1000.0 - before / 1e6, abs=1e-6)


def test_charges_made_while_a_hubs_link_was_down_are_caught_up_when_it_returns(
    tmp_path: Path, vendor: FakeVendor, redis_server: RedisServer,
) -> None:
    # Hub b reaches Redis as a user of its own, so that its link alone can
    # be cut (its user refused, its connections killed) while a charges.
    admin = redis.Redis(host="127.0.0.1", port=redis_server.port)
    admin.acl_setuser("bee", enabled=True, passwords=["+bee-secret"], keys=["*"], channels=["*"], commands=["+@all"])
    b_shared = {"redis": redis_server.url.replace("redis://", "redis://bee@"), "password": "bee-secret"}
    with two_hubs(tmp_path, vendor, redis_server, ["sk-ant-good"], b_shared=b_shared) as (a, b):
        assert a.app is not None and a.app.shared is not None and b.app is not None and b.app.shared is not None
        shared_b = b.app.shared
        token = a.mint_limited("hal", Limits(budget_month=1_000_000_000, budget_5h=1_000_000_000))
        refreshed(b)
        following(b)

        def spent(hub: HubThread, window: str) -> int:
            assert hub.app is not None
            return hub.app.limiter.spent("user", "hal", window)

        def agree() -> bool:
            return all(spent(b, w) == spent(a, w) > 0 for w in ("month", "5h"))

        assert post(a, token)[0] == 200
        eventually(lambda: agree() or None, what="b hears a's charge")
        assert shared_b.stats()["charges_heard"] == 1

        before = shared_b.stats()
        admin.acl_setuser("bee", enabled=False)
        admin.client_kill_filter(user="bee")
        eventually(lambda: shared_b.stats()["state"] == "degraded" or None, what="b's link down")
        eventually(lambda: not shared_b.stats()["following_charges"] or None, what="b's subscription down")
        for _ in range(3):
            assert post(a, token)[0] == 200
        assert a.call(a.app.shared.flush())
        # Announced while b was away: b did not hear them.
        assert spent(b, "month") < spent(a, "month")

        admin.acl_setuser("bee", enabled=True)
        eventually(lambda: shared_b.stats()["state"] == "shared" or None, what="b's link back")
        eventually(lambda: agree() or None, what="b caught up")
        following(b)
        stats = shared_b.stats()
        assert stats["charges_heard"] == 1 and stats["catch_ups"] == before["catch_ups"] + 1
        # Month and 5h, three requests each.
        assert stats["caught_up_micros"] - before["caught_up_micros"] == 2 * 3 * (spent(a, "month") // 4)
        assert me(b, token)["spend"]["month"]["user_micros"] == spent(a, "month")

        # Charges after the catch-up are heard again, and count once.
        assert post(a, token)[0] == 200
        eventually(lambda: (shared_b.stats()["charges_heard"] == 2 and agree()) or None, what="b hears again")
