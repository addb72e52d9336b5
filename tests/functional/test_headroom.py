"""Rate-limit headroom end to end: the official SDK -> a real hub -> a fake
vendor whose answers report each key's rate-limit room. Traffic follows the
room before any key answers 429, and `hubcore keys` and /metrics show it."""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import pytest

from hubcore.ops import client as opsclient
from tests.fakevendor import FakeVendor
from tests.hubharness import HubThread, make_config, run_cli

ROOMY, TIGHT = "sk-ant-roomy", "sk-ant-tight"
MODEL = "claude-sonnet-4-6"
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]


def limits(remaining: float, reset_in: float = 3600.0) -> list[tuple[str, str]]:
    """Anthropic's rate-limit headers: `remaining` of the token limit left, the requests limit untouched."""
    reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + reset_in))
    return [
        ("anthropic-ratelimit-requests-limit", "4000"),
        ("anthropic-ratelimit-requests-remaining", "4000"),
        ("anthropic-ratelimit-requests-reset", reset),
        ("anthropic-ratelimit-tokens-limit", "100000"),
        ("anthropic-ratelimit-tokens-remaining", str(round(remaining * 100000))),
        ("anthropic-ratelimit-tokens-reset", reset),
    ]


@pytest.fixture
def vendor() -> Iterator[FakeVendor]:
    with FakeVendor(keys={ROOMY: "ok", TIGHT: "ok"}, key_headers={ROOMY: limits(0.9), TIGHT: limits(0.05)}) as v:
        yield v


def test_the_fake_vendor_reports_each_keys_own_headers(vendor: FakeVendor) -> None:
    body = {"model": MODEL, "max_tokens": 16, "messages": MESSAGES}
    with httpx2.Client(base_url=vendor.url, headers={"anthropic-version": "2023-06-01"}, timeout=10) as http:
        roomy = http.post("/v1/messages", json=body, headers={"x-api-key": ROOMY})
        tight = http.post("/v1/messages", json=body, headers={"x-api-key": TIGHT})
        vendor.set_key_behaviour(TIGHT, 429)
        refused = http.post("/v1/messages", json=body, headers={"x-api-key": TIGHT})
        vendor.set_key_headers(TIGHT, [])
        bare = http.post("/v1/messages", json=body, headers={"x-api-key": TIGHT})
    assert roomy.status_code == tight.status_code == 200
    assert roomy.headers["anthropic-ratelimit-tokens-remaining"] == "90000"
    assert tight.headers["anthropic-ratelimit-tokens-remaining"] == "5000"
    # On errors too; the 429's own limit headers come after the key's.
    assert refused.status_code == 429
    assert refused.headers.get_list("anthropic-ratelimit-tokens-remaining") == ["5000"]
    assert "anthropic-ratelimit-tokens-remaining" not in bare.headers


def test_traffic_follows_the_vendors_headroom_before_any_429(vendor: FakeVendor, tmp_path: Path) -> None:
    keys = [{"key": ROOMY, "label": "roomy"}, {"key": TIGHT, "label": "tight"}]
    config = make_config(tmp_path, [{"name": "anthropic", "kind": "anthropic", "base_url": vendor.url, "keys": keys}])
    with HubThread(config) as hub:
        client = anthropic.Anthropic(base_url=hub.url, api_key=hub.mint(), max_retries=0)
        for _ in range(100):
            message = client.messages.create(model=MODEL, max_tokens=16, messages=MESSAGES)
            assert message.content
        hits = vendor.hits
        assert hits[ROOMY] + hits[TIGHT] == 100
        assert hits[ROOMY] >= 85, hits
        assert [r.status for r in vendor.requests if r.status == 429] == []

        socket_path = config.server.ops_socket
        listed = run_cli("keys", "--socket", socket_path)
        assert listed.returncode == 0, listed.stderr
        assert "upstream anthropic" in listed.stdout
        lines = listed.stdout.splitlines()
        roomy = next(line for line in lines if line.split()[:1] == ["roomy"])
        tight = next(line for line in lines if line.split()[:1] == ["tight"])
        assert "sonnet 90% (tokens, resets " in roomy and "sonnet 5% (tokens, resets " in tight

        status, body = opsclient.fetch(socket_path, "/metrics")
        assert status == 200
        metrics = body.decode()
        assert 'hubcore_key_headroom_ratio{upstream="anthropic",key="roomy",class="sonnet"} 0.9' in metrics
        assert 'hubcore_key_headroom_ratio{upstream="anthropic",key="tight",class="sonnet"} 0.05' in metrics
