"""Alert delivery against real local webhook receivers: the two bodies,
min_interval, retries then a counted drop, targets that hang or refuse, a
burst of 10,000 events, reloads; and what key rings, failovers and the
usage writer raise."""
from __future__ import annotations

import asyncio
import gc
import logging
import time
import tracemalloc
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from hubcore import config as config_mod
from hubcore.config import AlertConfig, KeyPolicy, KeySpec, UpstreamConfig
from hubcore.governance.limiter import BudgetCrossing
from hubcore.ops.alerts import QUEUE_MAX, Alert, Alerts, budget_alert, render_body
from hubcore.ops.metrics import HubMetrics
from hubcore.routing.failures import Failure, FailureKind, classify
from hubcore.routing.keys import KeyRing
from tests.webhook import WebhookReceiver, refused_url

USD = 1_000_000
HUB = "testhub"


def alert_config(url: str, **fields: Any) -> AlertConfig:
    """An [[alert]] as the config parser makes it (so its checks apply)."""
    (alert,) = config_mod.parse_alerts([{"url": url, **fields}], "<test>", {})
    return alert


def sample(key: str = "k", kind: str = "budget.threshold", summary: str = "something happened") -> Alert:
    return Alert(kind, "warning", summary, {"n": 1}, key)


def crossing(threshold: int = 80, spent: int = 8 * USD) -> BudgetCrossing:
    resets = datetime.fromisoformat("2026-04-01T00:00:00+00:00").timestamp()
    return BudgetCrossing("project", "exp", "month", threshold, spent, 10 * USD, True, resets, time.time())


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as r:
        yield r


@pytest.fixture
def blackhole() -> Iterator[WebhookReceiver]:
    with WebhookReceiver(mode="blackhole") as r:
        yield r


# -- bodies -------------------------------------------------------------------------------

async def test_json_and_slack_bodies_as_documented(receiver: WebhookReceiver) -> None:
    alerts = Alerts([alert_config(receiver.url, name="js"), alert_config(receiver.url, name="sl", format="slack")], hub=HUB)
    alerts.on_crossing(crossing())
    await asyncio.to_thread(receiver.wait_for, 2)
    await alerts.close()
    by_shape = {("text" in body): body for body in receiver.bodies()}
    body = by_shape[False]
    assert set(body) == {"event", "severity", "summary", "details", "ts", "hub"}
    assert (body["event"], body["severity"], body["hub"]) == ("budget.threshold", "warning", HUB)
    assert datetime.fromisoformat(body["ts"]).utcoffset() is not None  # RFC 3339 with its offset
    assert body["summary"] == (
        "project exp passed 80% of its monthly budget: $8.00 of $10.00 "
        "(soft budget: requests go on; resets 2026-04-01T00:00:00+00:00)"
    )
    assert body["details"] == {
        "scope": "project exp", "kind": "project", "name": "exp", "window": "month", "threshold_percent": 80,
        "spent_micros": 8 * USD, "limit_micros": 10 * USD, "spent_usd": "8.00", "limit_usd": "10.00",
        "soft": True, "refusing": False, "resets_at": "2026-04-01T00:00:00+00:00",
    }
    assert by_shape[True] == {"text": f"[hubcore {HUB}] WARNING: {body['summary']}"}
    (request,) = [r for r in receiver.requests if b'"event"' in r["body"]]
    assert request["headers"]["content-type"] == "application/json"
    assert request["path"] == f"/hooks/{receiver.secret}"
    assert alerts.stats()["sent"] == 2


def test_a_hard_budget_at_its_limit_is_critical() -> None:
    hard = BudgetCrossing("token", "7", "day", 100, 5 * USD, 5 * USD, False, None, 0.0)
    alert = budget_alert(hard)
    assert alert.severity == "critical" and "its requests are refused" in alert.summary
    assert render_body(alert, "slack", "h").startswith(b'{"text":"[hubcore h] CRITICAL: token 7 passed 100%')


async def test_credentials_in_the_url_go_as_basic_auth(receiver: WebhookReceiver) -> None:
    url = receiver.url.replace("http://", "http://hook:s%40cret@")
    alerts = Alerts([alert_config(url)], hub=HUB)
    alerts.emit(sample())
    await asyncio.to_thread(receiver.wait_for, 1)
    await alerts.close()
    assert receiver.requests[0]["headers"]["authorization"] == "Basic aG9vazpzQGNyZXQ="  # hook:s@cret


# -- min_interval and the events filter ---------------------------------------------------------

async def test_ten_identical_events_within_min_interval_send_one(receiver: WebhookReceiver) -> None:
    now = [1000.0]
    alerts = Alerts([alert_config(receiver.url, min_interval=60)], hub=HUB, clock=lambda: now[0])
    for _ in range(10):
        alerts.emit(sample("same"))
    alerts.emit(sample("other"))
    assert len(await asyncio.to_thread(receiver.settle)) == 2
    assert alerts.stats()["deduplicated"] == 9
    now[0] += 61  # min_interval over: the same news may go again
    alerts.emit(sample("same"))
    assert len(await asyncio.to_thread(receiver.wait_for, 3)) == 3
    await alerts.close()


async def test_a_target_gets_only_the_kinds_it_asked_for(receiver: WebhookReceiver) -> None:
    alerts = Alerts([alert_config(receiver.url, events=["key", "usage.degraded"])], hub=HUB)
    alerts.on_crossing(crossing())
    alerts.emit(sample("k1", kind="upstream.failover"))
    alerts.emit(sample("k2", kind="key.dead"))
    bodies = await asyncio.to_thread(receiver.settle)
    await alerts.close()
    assert [b["event"] for b in bodies] == ["key.dead"]


# -- failing targets ---------------------------------------------------------------------------------

async def test_a_target_that_never_answers_is_dropped_after_retries(
    blackhole: WebhookReceiver, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, "hubcore.alerts")
    alerts = Alerts([alert_config(blackhole.url, name="hang", timeout=0.2, retries=2, retry_backoff=0.05)], hub=HUB)
    started = time.monotonic()
    alerts.emit(sample())
    # emit() returned at once: it never waits for a target.
    assert time.monotonic() - started < 0.05
    deadline = time.monotonic() + 5
    while not alerts.stats()["dropped"] and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert alerts.stats()["dropped"] == {"timeout": 1} and alerts.stats()["sent"] == 0
    assert len(blackhole.requests) == 3  # the first attempt and two retries
    assert "alert hang: budget.threshold alert dropped after 3 attempts: no answer within 0.2 s" in caplog.text
    text = HubMetrics().render_prometheus(alerts=alerts.stats())
    assert 'hubcore_alerts_dropped_total{reason="timeout"} 1' in text
    assert "hubcore_alerts_sent_total 0" in text
    assert blackhole.url not in caplog.text and blackhole.secret not in caplog.text
    await alerts.close(grace=0)


async def test_a_target_that_refuses_connections_is_dropped_after_retries(caplog: pytest.LogCaptureFixture) -> None:
    url = refused_url()
    alerts = Alerts([alert_config(url, retries=1, retry_backoff=0.01)], hub=HUB)
    alerts.emit(sample())
    deadline = time.monotonic() + 5
    while not alerts.stats()["dropped"] and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await alerts.close(grace=0)
    assert alerts.stats()["dropped"] == {"unreachable": 1}
    assert "alert alert[0]: budget.threshold alert dropped after 2 attempts: cannot connect: Connection refused" in caplog.text
    # Not even the port: the client's own words name the address, ours do not.
    assert url.split("/")[2] not in caplog.text


async def test_answers_decide_whether_to_retry() -> None:
    with WebhookReceiver(status=404) as gone, WebhookReceiver(status=503) as busy:
        alerts = Alerts([
            alert_config(gone.url, name="gone", retries=2, retry_backoff=0.01),
            alert_config(busy.url, name="busy", retries=2, retry_backoff=0.01),
        ], hub=HUB)
        alerts.emit(sample())
        deadline = time.monotonic() + 5
        while sum(alerts.stats()["dropped"].values()) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await alerts.close(grace=0)
        # 404 says the URL is wrong: no retry. 503 may pass: retried.
        assert (len(gone.requests), len(busy.requests)) == (1, 3)
        assert alerts.stats()["dropped"] == {"rejected": 2}


async def test_a_burst_of_10000_events_keeps_the_queue_bounded(
    blackhole: WebhookReceiver, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "hubcore.alerts")
    alerts = Alerts([alert_config(blackhole.url, timeout=30)], hub=HUB)
    gc.collect()
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    for n in range(10_000):
        alerts.emit(sample(f"event-{n}"))
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    await asyncio.sleep(0.1)  # the delivery task takes the first one
    stats = alerts.stats()
    assert stats["queued"] <= QUEUE_MAX
    # All but those queued (and the one being delivered) were dropped, counted, and logged once.
    assert stats["dropped"]["queue_full"] == 10_000 - QUEUE_MAX
    assert caplog.text.count("queue full") == 1
    # QUEUE_MAX alerts and their keys: well under a megabyte, whatever the burst.
    assert after - before < 1024 * 1024, after - before
    await alerts.close(grace=0)
    assert alerts.stats()["dropped"]["shutdown"] == QUEUE_MAX


async def test_alerts_queued_at_shutdown_get_their_grace(receiver: WebhookReceiver) -> None:
    alerts = Alerts([alert_config(receiver.url)], hub=HUB)
    for n in range(3):
        alerts.emit(sample(f"k{n}"))
    await alerts.close()
    assert len(receiver.bodies()) == 3
    alerts.emit(sample("after"))  # closed: nothing more goes out, nothing starts
    assert alerts.stats()["queued"] == 0 and all(t.task is None for t in alerts.targets)


async def test_a_reload_replaces_changed_targets_and_keeps_the_others(receiver: WebhookReceiver) -> None:
    kept, changed = alert_config(receiver.url, name="kept"), alert_config(receiver.url, name="changed")
    alerts = Alerts([kept, changed], hub=HUB)
    before = {t.label: t for t in alerts.targets}
    changes = alerts.configure([kept, alert_config(receiver.url, name="changed", min_interval=5)])
    assert changes == ["alert changed: new settings"]
    after = {t.label: t for t in alerts.targets}
    assert after["kept"] is before["kept"] and after["changed"] is not before["changed"]
    assert alerts.configure([kept]) == ["alert changed: removed"]
    alerts.emit(sample())
    assert len(await asyncio.to_thread(receiver.settle)) == 1
    await alerts.close()


# -- what raises alerts ------------------------------------------------------------------------------

class Recorded(Alerts):
    """Alerts that keeps what it emits instead of posting it."""

    def __init__(self) -> None:
        super().__init__([], hub=HUB)
        self._kinds = frozenset(config_mod.ALERT_EVENTS)
        self.seen: list[Alert] = []

    def emit(self, alert: Alert) -> None:
        self.seen.append(alert)


def ring_of(*labels: str, threshold: int = 2) -> tuple[KeyRing, list[float]]:
    now = [100.0]
    ring = KeyRing("main", [KeySpec(secret=f"sk-{label}", label=label) for label in labels],
                   KeyPolicy(circuit_threshold=threshold), clock=lambda: now[0])
    return ring, now


def test_a_dead_key_then_the_last_usable_key_then_its_return() -> None:
    recorded = Recorded()
    ring, _ = ring_of("a", "b")
    recorded.watch(ring)
    lease = ring.acquire()
    assert lease is not None
    ring.release(lease, classify(401, []))
    assert [a.kind for a in recorded.seen] == ["key.dead"]
    assert recorded.seen[0].details == {"upstream": "main", "key": lease.label, "from": "healthy", "to": "dead",
                                        "reason": "vendor 401"}
    assert recorded.seen[0].severity == "critical"
    other = ring.acquire()
    assert other is not None and other.label != lease.label
    ring.release(other, classify(403, []))
    assert [a.kind for a in recorded.seen] == ["key.dead", "key.dead", "upstream.unavailable"]
    assert recorded.seen[-1].summary == "upstream main has no usable key: a dead, b dead"
    # A reload revives dead keys: the upstream is back.
    ring.replace_specs([KeySpec(secret="sk-a", label="a"), KeySpec(secret="sk-b", label="b")])
    assert [a.kind for a in recorded.seen[3:]] == ["upstream.recovered"]


def test_a_circuit_opens_once_per_outage_not_per_probe() -> None:
    recorded = Recorded()
    ring, now = ring_of("only", threshold=2)
    recorded.watch(ring)
    for _ in range(2):
        lease = ring.acquire()
        assert lease is not None
        ring.release(lease, Failure(FailureKind.SERVER_ERROR, 500))
    assert [a.kind for a in recorded.seen] == ["key.circuit_open", "upstream.unavailable"]
    # The probe cycle: half-open, probing, failed again, open again: no new alert.
    now[0] += 60
    (probe,) = ring.take_probes()
    ring.release(probe, Failure(FailureKind.SERVER_ERROR, 500))
    assert [a.kind for a in recorded.seen] == ["key.circuit_open", "upstream.unavailable"]
    now[0] += 120
    (probe,) = ring.take_probes()
    ring.release(probe, None)
    assert [a.kind for a in recorded.seen][-1] == "upstream.recovered"


def test_failover_to_a_lower_priority_is_news_within_a_tier_it_is_not() -> None:
    recorded = Recorded()
    main = UpstreamConfig(name="main", kind="anthropic", base_url="http://a", priority=0)
    peer = UpstreamConfig(name="peer", kind="anthropic", base_url="http://b", priority=0)
    spare = UpstreamConfig(name="spare", kind="anthropic", base_url="http://c", priority=1)
    recorded.on_failover(main, peer)
    assert recorded.seen == []
    recorded.on_failover(main, spare)
    (alert,) = recorded.seen
    assert (alert.kind, alert.key) == ("upstream.failover", "upstream.failover:main:spare")
    assert alert.summary == "requests fail over from upstream main (priority 0) to spare (priority 1)"


async def test_the_usage_writer_degraded_raises_each_condition_once_while_it_lasts() -> None:
    recorded = Recorded()
    state: dict[str, Any] = {"spooled": 0, "spool_pending": 0, "queue_depth": 0, "db_healthy": True, "last_error": None}
    recorded.watch_usage(lambda: dict(state), queue_max=100, interval=0.02)
    await asyncio.sleep(0.06)
    assert recorded.seen == []
    state.update(spooled=5, spool_pending=5, db_healthy=False,
                 last_error="usage database write failed; spooling: disk I/O error")
    await asyncio.sleep(0.06)
    state.update(spooled=9, spool_pending=9, queue_depth=85)
    await asyncio.sleep(0.06)
    conditions = [a.details["condition"] for a in recorded.seen]
    assert sorted(conditions) == ["database", "queue", "spool"]
    # Over, then back: news again.
    state.update(spool_pending=0, queue_depth=0, db_healthy=True, last_error=None)
    await asyncio.sleep(0.06)
    state.update(spooled=10, spool_pending=1)
    await asyncio.sleep(0.06)
    await recorded.close(grace=0)
    assert [a.details["condition"] for a in recorded.seen[3:]] == ["spool"]
    database = next(a for a in recorded.seen if a.details["condition"] == "database")
    assert database.severity == "critical" and database.summary.endswith("disk I/O error")
    queue = next(a for a in recorded.seen if a.details["condition"] == "queue")
    assert queue.summary.startswith("usage queue 85 of 100 (85% full)")
