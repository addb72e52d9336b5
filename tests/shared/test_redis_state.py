"""Two hubs (SharedState instances with their own clients) share limits, key
states and sessions through a real redis-server; and when that Redis dies,
stalls or never answers, no call waits longer than the timeout, none raises
but a refusal, and each hub falls back to its share of the limits."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import prometheus_client.parser
import pytest

from hubcore.errors import ANTHROPIC, HubError
from hubcore.governance.limiter import Refused
from hubcore.governance.limits import Limits
from hubcore.governance.storage import ScopeLimits
from hubcore.ops.metrics import HubMetrics
from hubcore.shared.redis_state import Link, SharedState
from tests.servers import RedisServer, SilentServer
from tests.shared.support import counted_instances, hubs, principal, shared_again, shared_config, until

# What a call may take beyond its timeout: the event loop's own delays on a
# busy machine. The bound checked is timeout + this, never a wait for Redis.
SLACK = 0.25
USD = 1_000_000


async def admitted(state: SharedState, *args: object, **kwargs: object) -> bool:
    try:
        grant = await state.admit(*args, **kwargs)  # type: ignore[arg-type]
    except Refused:
        return False
    grant.release()
    return True


# -- shared while Redis answers ------------------------------------------------------

async def test_rpm_30_holds_across_two_hubs(redis_server: RedisServer) -> None:
    async with hubs(shared_config(redis_server.url)) as (a, b):
        caller = principal(rpm=30)
        results = [await admitted(a if i % 2 else b, caller) for i in range(90)]
        assert results.count(True) == 30
        assert results[:30] == [True] * 30  # the first 30, whichever hub took them
        with pytest.raises(Refused) as refused:
            await a.admit(caller)
        assert refused.value.status == 429 and refused.value.limit == "rpm"
        assert 1 <= (refused.value.retry_after or 0) <= 60
        assert refused.value.message.startswith("rate limit of token 1 reached: 30 requests per minute; retry in ")


async def test_concurrency_2_holds_across_two_hubs(redis_server: RedisServer) -> None:
    async with hubs(shared_config(redis_server.url)) as (a, b):
        caller = principal(concurrency=2)
        first = await a.admit(caller)
        second = await b.admit(caller)
        for hub in (a, b):
            with pytest.raises(Refused) as refused:
                await hub.admit(caller)
            assert refused.value.limit == "concurrency" and refused.value.retry_after == 1.0
        first.release()
        first.release()  # idempotent
        await a.flush()
        third = await b.admit(caller)
        with pytest.raises(Refused):
            await a.admit(caller)
        second.release()
        third.release()


async def test_a_refused_request_takes_nothing(redis_server: RedisServer) -> None:
    async with hubs(shared_config(redis_server.url)) as (a, b):
        caller = principal(rpm=2, concurrency=1)
        held = await a.admit(caller)
        with pytest.raises(Refused):
            await b.admit(caller)  # concurrency: its rpm place is not taken
        held.release()
        await a.flush()
        assert await admitted(b, caller)
        with pytest.raises(Refused) as refused:
            await a.admit(caller)
        assert refused.value.limit == "rpm"


async def test_a_budget_spent_through_one_hub_refuses_on_the_other(redis_server: RedisServer) -> None:
    async with hubs(shared_config(redis_server.url)) as (a, b):
        limits = ScopeLimits(users={"alice": Limits(budget_day=2 * USD)})
        for hub in (a, b):
            hub.update_limits(limits)
        caller = principal()
        assert await admitted(b, caller)
        a.charge("req-1", 1, "alice", None, 2 * USD, time.time())
        await a.flush()
        with pytest.raises(Refused) as refused:
            await b.admit(caller)
        assert refused.value.status == 403 and refused.value.limit == "budget_day"
        assert refused.value.scope == "user alice"
        assert refused.value.message.startswith("daily budget of user alice is spent: $2.00 of $2.00; it resets at ")
        # Another user of the same token's kind is not touched.
        assert await admitted(b, principal(token_id=2, user="bob"))


async def test_a_charge_counts_once_per_request_id(redis_server: RedisServer) -> None:
    async with hubs(shared_config(redis_server.url), count=1) as (a,):
        now = time.time()
        for _ in range(3):
            a.charge("req-7", 5, "carol", "web", 1234, now)
        await a.flush()
        assert redis_server.command("GET", "hubcore:spend:total:t:5") == b"$4\r\n1234\r\n"
        assert redis_server.command("GET", "hubcore:spend:total:p:web") == b"$4\r\n1234\r\n"


async def test_a_5h_budget_refuses_until_its_spend_ages_out(redis_server: RedisServer) -> None:
    async with hubs(shared_config(redis_server.url)) as (a, b):
        a.charge("req-1", 1, "alice", None, 3 * USD, time.time())
        await a.flush()
        with pytest.raises(Refused) as refused:
            await b.admit(principal(budget_5h=2 * USD))
        assert refused.value.limit == "budget_5h"
        assert refused.value.resets_at is not None
        # The spend of this minute ages out 5 hours on, at a minute's boundary.
        assert 5 * 3600 - 120 <= refused.value.resets_at - time.time() <= 5 * 3600 + 60


async def test_a_key_rested_through_one_hub_is_rested_on_the_other_until_it_ends(redis_server: RedisServer) -> None:
    async with hubs(shared_config(redis_server.url)) as (a, b):
        a.rested("anthropic", "key-1", "sonnet", 0.6)
        await a.flush()
        news = (await b.admit(principal(), "anthropic")).keys
        resting = news["key-1"].resting("sonnet")
        assert resting is not None and 0.3 < resting <= 0.6
        assert news["key-1"].resting("opus") is None  # a 429 of one class rests that class only
        await asyncio.sleep(0.65)
        assert "key-1" not in (await b.admit(principal(), "anthropic")).keys
        # Rests only lengthen: a late, shorter one changes nothing.
        a.rested("anthropic", "key-1", "", 5.0)
        a.rested("anthropic", "key-1", "", 1.0)
        await a.flush()
        whole = (await b.admit(principal(), "anthropic")).keys["key-1"]
        assert whole.resting("opus") is not None and whole.resting("opus") > 4.0  # type: ignore[operator]


async def test_open_circuits_and_dead_keys_are_shared_until_revived(redis_server: RedisServer) -> None:
    async with hubs(shared_config(redis_server.url)) as (a, b):
        a.circuit_opened("anthropic", "key-2", 30.0)
        a.key_refused("anthropic", "key-3", "sk-ant-old")
        a.rested("anthropic", "key-3", "opus", 30.0)
        await a.flush()
        news = (await b.admit(principal(), "anthropic")).keys
        assert news["key-2"].circuit is not None and 29 < news["key-2"].circuit <= 30
        assert news["key-3"].dead_for("sk-ant-old")
        assert not news["key-3"].dead_for("sk-ant-rotated")  # a new secret under the old label
        a.circuit_closed("anthropic", "key-2")
        a.key_revived("anthropic", "key-3")
        await a.flush()
        news = (await b.admit(principal(), "anthropic")).keys
        # Nothing stands against either; the revived key carries the mark
        # by which the instances revive it too.
        assert set(news) == {"key-3"}
        assert news["key-3"].revival is not None and not news["key-3"].rests and news["key-3"].dead is None
        # Another upstream's keys are its own.
        a.circuit_opened("openai", "key-2", 30.0)
        await a.flush()
        assert set((await b.admit(principal(), "anthropic")).keys) == {"key-3"}


async def test_a_session_maps_to_one_key_across_hubs(redis_server: RedisServer) -> None:
    async with hubs(shared_config(redis_server.url)) as (a, b):
        assert (await b.admit(principal(), "anthropic", "session-1")).session_key is None
        a.remember_session("anthropic", "session-1", "key-2", ttl=60.0)
        await a.flush()
        for hub in (a, b, b):
            assert (await hub.admit(principal(), "anthropic", "session-1")).session_key == "key-2"
        assert (await b.admit(principal(), "openai", "session-1")).session_key is None
        # A session id a client made enormous is keyed by its hash.
        long_id = "s" * 10_000
        a.remember_session("anthropic", long_id, "key-1")
        await a.flush()
        assert (await b.admit(principal(), "anthropic", long_id)).session_key == "key-1"


async def test_a_session_keeps_its_key_while_used(redis_server: RedisServer) -> None:
    async with hubs(shared_config(redis_server.url)) as (a, b):
        a.remember_session("anthropic", "session-2", "key-1", ttl=0.5)
        await a.flush()
        for _ in range(4):
            await asyncio.sleep(0.2)  # each read renews the affinity
            assert (await b.admit(principal(), "anthropic", "session-2", session_ttl=0.5)).session_key == "key-1"
        await asyncio.sleep(0.6)
        assert (await b.admit(principal(), "anthropic", "session-2", session_ttl=0.5)).session_key is None


async def test_hubs_count_each_other(redis_server: RedisServer) -> None:
    async with hubs(shared_config(redis_server.url), count=3) as states:
        await counted_instances(states)
        await states[2].close()
        await until(lambda: states[0].instances == 2)
        assert redis_server.command("ZCARD", "hubcore:instances") == b":2\r\n"


async def test_scripts_flushed_from_redis_are_loaded_again(redis_server: RedisServer) -> None:
    async with hubs(shared_config(redis_server.url)) as (a, b):
        caller = principal(rpm=2)
        assert await admitted(a, caller)
        assert redis_server.command("SCRIPT", "FLUSH") == b"+OK\r\n"
        assert await admitted(b, caller)
        a.charge("req-1", 1, "alice", None, 10, time.time())
        assert await a.flush()
        assert not await admitted(a, caller)
        assert a.link is Link.SHARED and b.link is Link.SHARED
        assert a.errors == {"timeout": 0, "connection": 0, "error": 0}


async def test_a_dead_instance_gives_its_slots_back_after_the_lease(redis_server: RedisServer, tmp_path: Path) -> None:
    lease = 1.0
    script = tmp_path / "holder.py"
    script.write_text(
        "import asyncio, sys\n"
        "from hubcore import config\n"
        "from hubcore.governance.limits import Limits\n"
        "from hubcore.governance.tokens import Principal\n"
        "from hubcore.shared.redis_state import SharedState\n"
        "async def main():\n"
        f"    cfg = config.parse({{'shared': {{'redis': {redis_server.url!r}, 'timeout': 0.1, 'lease_ttl': {lease}}}}},"
        " source='t', env={}).shared\n"
        "    state = SharedState(cfg)\n"
        "    await state.start()\n"
        "    await state.admit(Principal(1, 'alice', None, 'hc', limits=Limits(concurrency=1)))\n"
        "    print('held', flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    holder = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"held\n"
        async with hubs(shared_config(redis_server.url), count=1) as (b,):
            caller = principal(concurrency=1)
            assert not await admitted(b, caller)
            await asyncio.sleep(lease * 1.5)
            assert not await admitted(b, caller)  # renewed while its instance lives
            holder.send_signal(signal.SIGKILL)
            holder.wait()
            killed = time.monotonic()
            while not await admitted(b, caller):
                assert time.monotonic() - killed < lease + 1.0
                await asyncio.sleep(0.05)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


async def test_a_long_request_keeps_its_slot_past_the_lease(redis_server: RedisServer) -> None:
    async with hubs(shared_config(redis_server.url), count=1) as (b,):
        config = shared_config(redis_server.url, timeout=0.1, lease_ttl=1.0, heartbeat_interval=0.1, instance_ttl=0.5)
        async with hubs(config, count=1) as (a,):
            caller = principal(concurrency=1)
            grant = await a.admit(caller)
            for _ in range(4):
                await asyncio.sleep(0.5)
                assert not await admitted(b, caller)
            grant.release()
            await a.flush()
            assert await admitted(b, caller)


# -- when Redis fails ---------------------------------------------------------------------

async def test_redis_killed_mid_traffic_then_restarted(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="hubcore.shared")
    config = shared_config(redis_server.url, timeout=0.2)
    async with hubs(config) as (a, b):
        await counted_instances([a, b])
        caller = principal(rpm=1000)
        slowest = 0.0
        outcomes: list[bool] = []

        async def traffic(state: SharedState) -> None:
            nonlocal slowest
            for _ in range(60):
                started = time.monotonic()
                outcomes.append(await admitted(state, caller, "anthropic", "session-1"))
                slowest = max(slowest, time.monotonic() - started)
                await asyncio.sleep(0.003)

        async def kill_soon() -> None:
            await asyncio.sleep(0.05)
            await asyncio.to_thread(redis_server.kill)

        # Any exception but a refusal would fail the gather.
        await asyncio.gather(traffic(a), traffic(b), kill_soon())
        assert outcomes.count(True) == 120  # no request refused because Redis went
        assert slowest < config.timeout + SLACK
        assert a.degraded and b.degraded and a.link is Link.DEGRADED
        assert a.errors["connection"] + a.errors["timeout"] >= 1
        assert a.stats()["degraded"] is True

        # Local enforcement on each hub's share: 2 hubs, rpm 30 -> 15, concurrency 4 -> 2.
        local = principal(token_id=2, rpm=30)
        assert [await admitted(a, local) for _ in range(30)].count(True) == 15
        assert [await admitted(b, local) for _ in range(30)].count(True) == 15
        slots = principal(token_id=3, concurrency=4)
        held = [await a.admit(slots), await a.admit(slots)]
        with pytest.raises(Refused) as refused:
            await a.admit(slots)
        assert "its share of 4" in refused.value.message
        for grant in held:
            grant.release()
        # A charge while Redis is away waits in the queue.
        a.update_limits(ScopeLimits(tokens={9: Limits(budget_total=USD)}))
        a.charge("req-9", 9, "alice", None, 77, time.time())
        assert a.stats()["queue_depth"] >= 1

        redis_server.start()
        await shared_again(a)
        await shared_again(b)
        assert await a.flush()
        shared = principal(token_id=4, rpm=30)
        results = [await admitted(a if i % 2 else b, shared) for i in range(90)]
        assert results.count(True) == 30
        # Redis came back empty (no persistence): hub a seeded the budget's
        # spend from what it knew, the queued charge included, once.
        assert redis_server.command("GET", "hubcore:spend:total:t:9") == b"$2\r\n77\r\n"

    entered = [r for r in caplog.records if "degraded:" in r.getMessage()]
    left = [r for r in caplog.records if "answers again" in r.getMessage()]
    assert len(entered) == 2 and len(left) == 2  # one line each way, per hub
    assert all(r.levelno == logging.WARNING for r in entered)


async def test_a_redis_that_never_answers_bounds_every_call(silent_server: SilentServer) -> None:
    config = shared_config(silent_server.url, timeout=0.05)
    state = SharedState(config)
    started = time.monotonic()
    await state.start()
    assert time.monotonic() - started < config.timeout + SLACK
    try:
        assert state.degraded and silent_server.accepted >= 1
        caller = principal(rpm=10)
        for _ in range(20):
            started = time.monotonic()
            await admitted(state, caller, "anthropic", "session-1")
            assert time.monotonic() - started < config.timeout + SLACK
        state.charge("req-1", 1, "alice", None, 5, time.time())
        state.rested("anthropic", "key-1", "", 1.0)
        await asyncio.sleep(0.5)  # the link task probes meanwhile, each probe bounded too
        assert state.errors["timeout"] >= 2
        assert state.degraded
    finally:
        started = time.monotonic()
        await state.close()
        assert time.monotonic() - started < config.timeout + SLACK


async def test_a_stalled_redis_bounds_every_call_then_recovers(redis_server: RedisServer) -> None:
    config = shared_config(redis_server.url, timeout=0.05)
    async with hubs(config) as (a, b):
        await counted_instances([a, b])
        caller = principal(rpm=100, concurrency=10)
        assert await admitted(a, caller)
        redis_server.pause()  # SIGSTOP: connections are taken, nothing answers
        try:
            durations = []
            for hub in (a, b, a, b):
                started = time.monotonic()
                assert await admitted(hub, caller, "anthropic", "session-9")
                durations.append(time.monotonic() - started)
            assert max(durations) < config.timeout + SLACK
            assert a.degraded and b.degraded
            assert a.errors["timeout"] >= 1
        finally:
            redis_server.resume()
        await shared_again(a)
        await shared_again(b)
        assert await admitted(b, caller)


async def test_on_failure_closed_refuses_with_a_vendor_shaped_503(redis_server: RedisServer) -> None:
    config = shared_config(redis_server.url, on_failure="closed", timeout=0.2)
    async with hubs(config, count=1) as (a,):
        assert await admitted(a, principal())
        redis_server.kill()
        for _ in range(2):  # the call that finds Redis gone, and one after
            started = time.monotonic()
            with pytest.raises(HubError) as refused:
                await a.admit(principal())
            assert time.monotonic() - started < config.timeout + SLACK
            assert not isinstance(refused.value, Refused)
            assert refused.value.status == 503 and refused.value.code == "shared_state_unavailable"
            assert refused.value.retry_after is not None
        body = orjson.loads(refused.value.body(ANTHROPIC))
        assert body["type"] == "error" and "[shared] on_failure" in body["error"]["message"]


async def test_a_redis_that_lost_its_data_is_seeded_with_spend(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="hubcore.shared")
    async with hubs(shared_config(redis_server.url)) as (a, b):
        limits = ScopeLimits(tokens={1: Limits(budget_day=2 * USD)})
        for hub in (a, b):
            hub.update_limits(limits)
        a.charge("req-1", 1, "alice", None, 2 * USD, time.time())
        b.charge("req-2", 1, "alice", None, 1 * USD, time.time())
        await a.flush()
        await b.flush()
        caller = principal(budget_day=2 * USD)
        assert not await admitted(b, caller)
        redis_server.kill()
        redis_server.start()  # empty: no persistence
        key = a.space.spend("day", "t:1", a._period_starts[0])
        await until(lambda: redis_server.command("EXISTS", key) == b":1\r\n")
        await until(lambda: sum("lost its data" in r.getMessage() for r in caplog.records) == 2)
        # Each hub raises the counter to what it knew itself, the larger
        # stands: a lower bound of the spend (3 USD), never more. A hub logs
        # before its seed lands: wait for the larger, then for both hubs to
        # be back (each seeds before it is), and it still stands.
        await until(lambda: redis_server.command("GET", key) == b"$7\r\n2000000\r\n")
        await until(lambda: a.link is Link.SHARED and b.link is Link.SHARED)
        assert redis_server.command("GET", key) == b"$7\r\n2000000\r\n"
        assert not await admitted(b, caller)


async def test_a_password_is_used_and_never_shown(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    password = "pw-" + os.urandom(8).hex()
    server = RedisServer(tmp_path / "redis", password=password)
    server.start()
    try:
        caplog.set_level(logging.DEBUG)
        good = dataclasses.replace(shared_config(server.url), password=password)
        async with hubs(good, count=1) as (a,):
            assert a.link is Link.SHARED
        wrong = dataclasses.replace(good, password="not-" + password)
        async with hubs(wrong, count=1, linked=False) as (c,):
            assert c.degraded
            assert "not-" + password not in str(c.stats())
        assert password not in caplog.text
        assert any("degraded" in r.getMessage() for r in caplog.records)
    finally:
        server.stop()


async def test_metrics_say_degraded(silent_server: SilentServer, redis_server: RedisServer) -> None:
    metrics = HubMetrics()
    async with hubs(shared_config(redis_server.url), count=1) as (up,):
        text = metrics.render_prometheus(shared=up.stats())
        assert "hubcore_shared_degraded 0" in text.splitlines()
        assert metrics.snapshot(shared=up.stats())["shared"]["state"] == "shared"
    async with hubs(shared_config(silent_server.url, timeout=0.05), count=1, linked=False) as (down,):
        text = metrics.render_prometheus(shared=down.stats())
    families = {f.name: f for f in prometheus_client.parser.text_string_to_metric_families(text)}
    assert families["hubcore_shared_degraded"].samples[0].value == 1
    errors = {s.labels["kind"]: s.value for s in families["hubcore_shared_errors"].samples}
    assert errors["timeout"] >= 1 and set(errors) == {"timeout", "connection", "error"}
    assert families["hubcore_shared_instances"].samples[0].value == 1
    assert "hubcore_shared_degraded" not in metrics.render_prometheus()



async def test_a_cancelled_admission_is_cancelled_not_degraded(redis_server: RedisServer) -> None:
    async with hubs(shared_config(redis_server.url, timeout=2.0), count=1) as (a,):
        redis_server.pause()
        try:
            waiting = asyncio.ensure_future(a.admit(principal(rpm=5)))
            await asyncio.sleep(0.1)
            waiting.cancel()  # the client went away
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert a.link is Link.SHARED and a.errors == {"timeout": 0, "connection": 0, "error": 0}
        finally:
            redis_server.resume()


async def test_connections_a_restarted_redis_closed_are_replaced_without_degrading(redis_server: RedisServer) -> None:
    async with hubs(shared_config(redis_server.url), count=1) as (a,):
        caller = principal(rpm=100)
        assert await admitted(a, caller)
        a.charge("req-1", 1, "alice", None, 10, time.time())
        assert await a.flush()  # the admit's and the sender's connections are kept
        redis_server.kill()
        redis_server.start()
        grant = await a.admit(caller)
        assert grant.shared  # counted in Redis, not on this instance's share
        grant.release()
        a.charge("req-2", 1, "alice", None, 10, time.time())
        assert await a.flush()
        assert a.link is Link.SHARED and a.errors == {"timeout": 0, "connection": 0, "error": 0}
