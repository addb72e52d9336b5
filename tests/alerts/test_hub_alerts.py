"""Alerts from a real hub (HubThread) in front of the fake vendor, to local
webhook receivers, with the anthropic SDK as the client: budget thresholds,
a dead key, targets that hang or refuse while requests go on, reloads, the
CLI's `alert test`; and the webhook URL in no log line and no output."""
from __future__ import annotations

import dataclasses
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest

from hubcore import config as config_mod
from hubcore.config import Config
from hubcore.governance.limits import Limits
from tests.conftest import upstreams_for
from tests.fakevendor import ANTHROPIC_KEY, FakeVendor, expected_text
from tests.hubharness import HubThread, make_config, run_cli
from tests.webhook import WebhookReceiver, refused_url

USD = 1_000_000
# claude-sonnet-4-6 input is $3 per million tokens: 100,000 of them cost $0.30.
REQUEST_COST = 300_000
MODEL = "claude-sonnet-4-6"


def hub_config(tmp: Path, vendor: FakeVendor, alerts: list[dict[str, Any]], keys: list[Any] | None = None) -> Config:
    config = make_config(tmp, upstreams_for(vendor, anthropic_keys=keys))
    return dataclasses.replace(config, alerts=config_mod.parse_alerts(alerts, "<test>", {}))


def client(hub: HubThread, token: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=hub.url, api_key=token, max_retries=0, timeout=30)


def ask(sdk: anthropic.Anthropic) -> str:
    """One request costing REQUEST_COST; the answer's text."""
    message = sdk.messages.create(
        model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-fake-usage": orjson.dumps({"input_tokens": 100_000, "output_tokens": 0}).decode()},
    )
    block = message.content[0]
    assert block.type == "text"
    return block.text


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as r:
        yield r


def test_one_charge_past_two_thresholds_sends_the_highest_only(
    vendor: FakeVendor, tmp_path: Path, receiver: WebhookReceiver,
) -> None:
    config = hub_config(tmp_path, vendor, [{"url": receiver.url, "events": ["budget"]}])
    with HubThread(config) as hub:
        token = hub.mint("alice", "exp")
        hub.set_limits("project", "exp", Limits(budget_month=4 * REQUEST_COST, soft=("month",)))
        sdk = client(hub, token)
        for _ in range(3):  # 25%, 50%, 75%
            assert ask(sdk) == expected_text()
        assert receiver.settle(quiet=0.3) == []
        ask(sdk)  # 75% -> 100% passes 80 and 100 at once
        (first,) = receiver.wait_for(1, timeout=1.0)
        assert (first["event"], first["details"]["threshold_percent"]) == ("budget.threshold", 100)
        # A soft budget: requests go on past 100%, and say nothing more.
        for _ in range(3):
            assert ask(sdk) == expected_text()
        assert len(receiver.settle()) == 1


def test_soft_budget_thresholds_80_and_100_one_alert_each_within_a_second(
    vendor: FakeVendor, tmp_path: Path, receiver: WebhookReceiver,
) -> None:
    config = hub_config(tmp_path, vendor, [{"url": receiver.url}])
    with HubThread(config) as hub:
        token = hub.mint("alice", "exp")
        # $1.00 soft: $0.30, $0.60, $0.90 (passes 80%), $1.20 (passes 100%), $1.50.
        hub.set_limits("project", "exp", Limits(budget_month=USD, soft=("month",)))
        sdk = client(hub, token)
        seen: list[Any] = []
        for n in range(1, 6):
            assert ask(sdk) == expected_text()
            if n in (3, 4):
                started = time.monotonic()
                seen = receiver.wait_for(len(seen) + 1, timeout=1.0)
                assert time.monotonic() - started < 1.0, f"no alert within a second of request {n}"
        bodies = receiver.settle()
        assert [(b["event"], b["details"]["threshold_percent"], b["details"]["spent_micros"]) for b in bodies] == [
            ("budget.threshold", 80, 3 * REQUEST_COST), ("budget.threshold", 100, 4 * REQUEST_COST),
        ]
        assert bodies[1]["severity"] == "warning" and bodies[1]["details"]["soft"] is True
        assert bodies[1]["summary"].startswith("project exp passed 100% of its monthly budget: $1.20 of $1.00")
        assert hub.app is not None and hub.app.alerts.stats()["sent"] == 2


def test_a_hard_budget_set_with_warn_at_50_warns_at_50_and_still_refuses_at_100(
    vendor: FakeVendor, tmp_path: Path, receiver: WebhookReceiver,
) -> None:
    config = hub_config(tmp_path, vendor, [{"url": receiver.url, "format": "slack"}])
    cli_config = tmp_path / "cli.toml"
    cli_config.write_text(
        f'[server]\ndatabase = "{config.server.database}"\nops_socket = "{config.server.ops_socket}"\n'
    )
    with HubThread(config) as hub:
        made = run_cli("token", "create", "--user", "bob", "--budget", "month=1.20", "--warn-at", "50",
                       "--config", str(cli_config))
        assert made.returncode == 0, made.stderr
        sdk = client(hub, made.stdout.splitlines()[-1])
        ask(sdk)                       # 25%
        assert receiver.settle(quiet=0.2) == []
        ask(sdk)                       # 50%
        (body,) = receiver.wait_for(1, timeout=1.0)
        assert body["text"].startswith("[hubcore ") and "WARNING: token " in body["text"]
        assert "passed 50% of its monthly budget: $0.60 of $1.20 (requests are refused at 100%" in body["text"]
        ask(sdk)
        ask(sdk)                       # 100%: no threshold there, only the refusal
        with pytest.raises(anthropic.PermissionDeniedError) as info:
            ask(sdk)
        assert "monthly budget of token" in str(info.value) and "is spent" in str(info.value)
        assert len(receiver.settle()) == 1


def test_a_key_answering_401_raises_one_dead_alert_and_requests_go_on(tmp_path: Path, receiver: WebhookReceiver) -> None:
    with FakeVendor({ANTHROPIC_KEY: "ok", "sk-ant-revoked": 401}) as vendor:
        keys = [{"key": "sk-ant-revoked", "label": "revoked"}, {"key": ANTHROPIC_KEY, "label": "good"}]
        config = hub_config(tmp_path, vendor, [{"url": receiver.url, "name": "ops"}], keys=keys)
        with HubThread(config) as hub:
            sdk = client(hub, hub.mint())
            for _ in range(6):
                assert ask(sdk) == expected_text()
            bodies = receiver.settle()
    assert [(b["event"], b["details"]["key"], b["details"]["reason"]) for b in bodies] == [
        ("key.dead", "revoked", "vendor 401"),
    ]
    assert bodies[0]["severity"] == "critical"
    assert bodies[0]["summary"].startswith("upstream anthropic key revoked is dead (vendor 401)")
    assert "sk-ant-revoked" not in orjson.dumps(bodies).decode()


def test_targets_that_hang_or_refuse_leave_requests_alone_and_are_dropped_after_retries(
    vendor: FakeVendor, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    refused = refused_url()
    with WebhookReceiver(mode="blackhole") as blackhole:
        config = hub_config(tmp_path, vendor, [
            {"url": blackhole.url, "name": "hang", "timeout": 0.3, "retries": 1, "retry_backoff": 0.05},
            {"url": refused, "name": "closed", "retries": 1, "retry_backoff": 0.05},
        ])
        with HubThread(config) as hub:
            assert hub.app is not None
            token = hub.mint("alice", "exp")
            # Every request passes a threshold: each is an alert for both targets.
            hub.set_limits("project", "exp", Limits(
                budget_month=10 * REQUEST_COST, soft=("month",), warn_at=(("month", (10, 20, 30, 40, 50, 60)),),
            ))
            sdk = client(hub, token)
            answers = [ask(sdk) for _ in range(6)]
            assert answers == [expected_text()] * 6
            streamed = sdk.messages.create(model=MODEL, max_tokens=16, stream=True,
                                           messages=[{"role": "user", "content": "hi"}])
            text = "".join(e.delta.text for e in streamed if e.type == "content_block_delta" and e.delta.type == "text_delta")
            assert text == expected_text()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                stats = hub.app.alerts.stats()
                if stats["dropped"].get("unreachable", 0) == 6 and stats["dropped"].get("timeout", 0) >= 1:
                    break
                time.sleep(0.05)
            stats = hub.app.alerts.stats()
            assert stats["sent"] == 0
            assert stats["dropped"]["unreachable"] == 6 and stats["dropped"]["timeout"] >= 1
            metrics = hub.app.metrics_text()
            assert 'hubcore_alerts_dropped_total{reason="unreachable"} 6' in metrics
            assert "hubcore_alerts_sent_total 0" in metrics
            everything = repr(hub.app.stats()) + metrics
            hub.wait_rows(7)
    assert "alert closed: budget.threshold alert dropped after 2 attempts: cannot connect: Connection refused" in caplog.text
    assert "alert hang: budget.threshold alert dropped after 2 attempts: no answer within 0.3 s" in caplog.text
    for secret in (blackhole.secret, refused.rsplit("/", 1)[1]):
        assert secret not in caplog.text and secret not in everything


def test_a_reload_replaces_the_targets_and_a_malformed_alert_is_refused(
    vendor: FakeVendor, tmp_path: Path, receiver: WebhookReceiver,
) -> None:
    with WebhookReceiver() as second:
        config = hub_config(tmp_path, vendor, [{"url": receiver.url}])
        path = tmp_path / "hub.toml"

        def write(alerts: str) -> None:
            path.write_text(
                f'[server]\nlisten = "127.0.0.1:0"\ndatabase = "{config.server.database}"\n'
                f'ops_socket = "{config.server.ops_socket}"\n'
                f'[dashboard]\nlisten = ""\n'
                f'[[upstream]]\nname = "anthropic"\nkind = "anthropic"\nbase_url = "{vendor.url}"\n'
                f'keys = ["{ANTHROPIC_KEY}"]\n' + alerts
            )

        with HubThread(config) as hub:
            app = hub.app
            assert app is not None
            app.config_path = str(path)
            write(f'[[alert]]\nurl = "{second.url}"\nname = "second"\nformat = "slack"\n')
            ok, said = hub.call(app.reload())
            assert ok and "alert second: new settings" in said and "alert alert[0]: removed" in said
            assert second.url not in said and receiver.url not in said
            token = hub.mint("alice", "exp")
            hub.set_limits("project", "exp", Limits(budget_month=REQUEST_COST, soft=("month",)))
            ask(client(hub, token))
            assert len(second.wait_for(1)) == 1 and receiver.settle(quiet=0.2) == []
            write(f'[[alert]]\nurl = "{second.url}"\nformat = "xml"\n')
            ok, said = hub.call(app.reload())
            assert not ok and "alert[0].format: must be 'json' or 'slack', got 'xml'" in said
            assert [t.label for t in app.alerts.targets] == ["second"]
    # And at start: `serve` refuses it with the field named.
    started = run_cli("serve", "--config", str(path))
    assert started.returncode == 2
    assert "alert[0].format: must be 'json' or 'slack'" in started.stderr
    assert second.secret not in started.stderr + started.stdout


def test_alert_test_prints_each_targets_answer_and_never_a_url(tmp_path: Path, receiver: WebhookReceiver) -> None:
    refused = refused_url()
    with WebhookReceiver(mode="blackhole") as blackhole:
        path = tmp_path / "hub.toml"
        path.write_text(
            f'[[alert]]\nurl = "{receiver.url}"\nname = "ops"\n'
            f'[[alert]]\nurl = "env:SLACK_HOOK"\nformat = "slack"\n'
            f'[[alert]]\nurl = "{blackhole.url}"\ntimeout = 0.5\n'
            f'[[alert]]\nurl = "{refused}"\nname = "closed"\n'
        )
        env = {**os.environ, "SLACK_HOOK": receiver.url}
        done = run_cli("alert", "test", "--config", str(path), env=env)
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        "ops (json): 200",
        "alert[1] (slack): 200",
        "alert[2] (json): failed: no answer within 0.5 s",
        "closed (json): failed: cannot connect: Connection refused",
    ]
    bodies = receiver.bodies()
    assert sorted(map(sorted, bodies)) == [["details", "event", "hub", "severity", "summary", "ts"], ["text"]]
    assert next(b for b in bodies if "event" in b)["event"] == "test"
    output = done.stdout + done.stderr
    for secret in (receiver.secret, blackhole.secret, refused.rsplit("/", 1)[1]):
        assert secret not in output
    # Every target answering: exit 0.
    path.write_text(f'[[alert]]\nurl = "{receiver.url}"\n')
    assert run_cli("alert", "test", "--config", str(path)).returncode == 0


def test_failover_to_the_spare_upstream_and_the_return_to_the_preferred_one(tmp_path: Path, receiver: WebhookReceiver) -> None:
    with FakeVendor({ANTHROPIC_KEY: "ok", "sk-ant-revoked": 401}) as vendor:
        upstreams = [
            {"name": "main", "kind": "anthropic", "base_url": vendor.url, "priority": 0,
             "keys": [{"key": "sk-ant-revoked", "label": "main-1"}]},
            {"name": "spare", "kind": "anthropic", "base_url": vendor.url, "priority": 1,
             "keys": [{"key": ANTHROPIC_KEY, "label": "spare-1"}]},
        ]
        config = dataclasses.replace(
            make_config(tmp_path, upstreams),
            alerts=config_mod.parse_alerts([{"url": receiver.url, "events": ["upstream", "key.dead"]}], "<test>", {}),
        )
        with HubThread(config) as hub:
            assert hub.app is not None
            sdk = client(hub, hub.mint())
            assert ask(sdk) == expected_text()  # main's key refused, the spare answered
            assert ask(sdk) == expected_text()
            bodies = receiver.settle()
            assert sorted(b["event"] for b in bodies) == ["key.dead", "upstream.failover", "upstream.unavailable"]
            failover = next(b for b in bodies if b["event"] == "upstream.failover")
            assert failover["details"] == {"from": "main", "to": "spare", "from_priority": 0, "to_priority": 1}
            # The operator brings the key back: the preferred upstream is usable, and says so.
            hub.call(hub.app.set_key_enabled("main-1", True))
            back = receiver.wait_for(4)[3:]
            assert [(b["event"], b["details"]["upstream"]) for b in back] == [("upstream.recovered", "main")]


def test_the_usage_writer_spooling_raises_one_degraded_alert(
    vendor: FakeVendor, tmp_path: Path, receiver: WebhookReceiver,
) -> None:
    config = make_config(tmp_path, upstreams_for(vendor), db_busy_timeout=0.1)
    config = dataclasses.replace(
        config, alerts=config_mod.parse_alerts([{"url": receiver.url, "events": ["usage"]}], "<test>", {}),
    )
    with HubThread(config) as hub:
        sdk = client(hub, hub.mint())
        # Another process holds the database: the writer waits its busy
        # timeout, then the rows go to the spool.
        blocker = sqlite3.connect(config.server.database, timeout=5)
        try:
            blocker.execute("BEGIN EXCLUSIVE")
            for _ in range(3):
                assert ask(sdk) == expected_text()
            bodies = receiver.wait_for(1, timeout=5)
        finally:
            blocker.rollback()
            blocker.close()
        assert bodies and {b["event"] for b in bodies} == {"usage.degraded"}
        assert "spool" in {b["details"]["condition"] for b in bodies}
        hub.wait_rows(3)
