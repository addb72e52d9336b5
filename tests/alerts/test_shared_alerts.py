"""The shared store's alerts: a hub with [shared] Redis tells its webhook
when Redis goes (limits enforced locally) and when it comes back, once
each, while requests go on."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import anthropic

from hubcore import config as config_mod
from tests.conftest import upstreams_for
from tests.fakevendor import FakeVendor
from tests.hubharness import HubThread, make_config
from tests.servers import RedisServer
from tests.webhook import WebhookReceiver


def test_redis_gone_and_back_raise_one_alert_each_and_no_request_fails(
    tmp_path: Path, redis_server: RedisServer,
) -> None:
    with FakeVendor() as vendor, WebhookReceiver() as receiver:
        config = make_config(tmp_path, upstreams_for(vendor),
                             shared={"redis": redis_server.url, "timeout": 0.05, "heartbeat_interval": 0.2})
        alerts = config_mod.parse_alerts([{"url": receiver.url, "name": "ops", "events": ["shared"]}], "<test>", {})
        with HubThread(dataclasses.replace(config, alerts=alerts)) as hub:
            token = hub.mint("erin")
            sdk = anthropic.Anthropic(base_url=hub.url, api_key=token, max_retries=0, timeout=30)

            def ask() -> None:
                sdk.messages.create(model="claude-sonnet-4-6", max_tokens=8, messages=[{"role": "user", "content": "hi"}])

            ask()
            redis_server.kill()
            for _ in range(5):
                ask()  # answered from the local share: no request fails for it
            (gone,) = receiver.wait_for(1, timeout=5.0)
            assert gone["event"] == "shared.degraded" and gone["severity"] == "warning"
            assert "enforces its share of every limit locally" in gone["summary"]
            assert gone["details"]["on_failure"] == "local"
            redis_server.start()
            deadline = time.monotonic() + 10
            while hub.app is not None and hub.app.shared is not None and hub.app.shared.degraded:
                assert time.monotonic() < deadline, "the hub never shared again"
                ask()
                time.sleep(0.05)
            bodies = receiver.wait_for(2, timeout=5.0)
            assert [b["event"] for b in bodies] == ["shared.degraded", "shared.recovered"]
            assert receiver.settle(quiet=0.5) == bodies  # one each, not one per look


def test_a_key_dead_through_one_instance_is_announced_once_for_all(tmp_path: Path, redis_server: RedisServer) -> None:
    keys = ["sk-ant-revoked", "sk-ant-fine"]
    with FakeVendor(keys={keys[0]: 401, keys[1]: "ok"}) as vendor, WebhookReceiver() as receiver:
        alerts = config_mod.parse_alerts([{"url": receiver.url, "name": "ops", "events": ["key.dead"]}], "<test>", {})
        hubs = []
        for name in ("a", "b"):
            home = tmp_path / name
            home.mkdir()
            config = make_config(
                home, upstreams_for(vendor, anthropic_keys=[{"key": k, "label": k} for k in keys]),
                database=str(tmp_path / "hub.db"), spool=str(home / "spool"),
                shared={"redis": redis_server.url, "timeout": 0.5, "heartbeat_interval": 0.2},
            )
            hubs.append(HubThread(dataclasses.replace(config, alerts=alerts)))
        with hubs[0] as a, hubs[1] as b:
            token = a.mint("fred")
            b.call(b.app.refresh_tokens(force=True))  # type: ignore[union-attr]
            for hub in (a, b, a, b):
                sdk = anthropic.Anthropic(base_url=hub.url, api_key=token, max_retries=0, timeout=30)
                sdk.messages.create(model="claude-sonnet-4-6", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
            for hub in (a, b):  # dead on both: seen through one, heard by the other
                assert hub.app is not None
                (row,) = [k for k in hub.app.hub.upstreams["anthropic"].ring.snapshot() if k["label"] == keys[0]]
                assert row["state"] == "dead"
            (dead,) = receiver.wait_for(1, timeout=5.0)
            assert dead["event"] == "key.dead" and dead["details"]["key"] == keys[0]
            assert receiver.settle(quiet=1.0) == [dead]
            deduplicated = sum(h.app.alerts.stats()["deduplicated"] for h in (a, b))  # type: ignore[union-attr]
            assert deduplicated == 1
