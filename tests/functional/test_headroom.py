"""Rate-limit headroom end to end: the official SDK -> a real hub -> a fake
vendor whose answers report each key's rate-limit room. Traffic follows the
room before any key answers 429, and `hubcore keys` and /metrics show it."""
from __future__ import annotations

import http.client
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


def test_an_opus_429_rests_the_key_for_opus_only_in_claude_codes_requests(tmp_path: Path) -> None:
    """Claude Code sends a session header, so the hub does not scan its body;
    it reads the model it writes first, and the rest is for that class."""
    with FakeVendor({ROOMY: "ok"}, retry_after=30) as vendor:
        upstream = {"name": "anthropic", "kind": "anthropic", "base_url": vendor.url, "keys": [ROOMY], "queue_timeout": 0.2}
        with HubThread(make_config(tmp_path, [upstream])) as hub:
            token = hub.mint("dev")

            def post(model: str, *extra: tuple[str, str]) -> int:
                body = b'{"model":"%s","messages":[{"role":"user","content":"hi"}],"max_tokens":8}' % model.encode()
                conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=30)
                try:
                    conn.request("POST", "/v1/messages", body=body, headers={
                        "x-api-key": token, "anthropic-version": "2023-06-01", "content-type": "application/json",
                        "x-claude-code-session-id": "session-1", **dict(extra)})
                    answer = conn.getresponse()
                    answer.read()
                    return answer.status
                finally:
                    conn.close()

            assert post("claude-opus-4-6", ("x-fake-status", "429")) == 429
            sent = len(vendor.requests)
            # Sonnet and Haiku still go out on the key; Opus waits out its rest.
            assert post("claude-sonnet-4-6") == 200
            assert post("claude-haiku-4-5") == 200
            assert len(vendor.requests) == sent + 2
            assert post("claude-opus-4-6") == 429
            assert len(vendor.requests) == sent + 2, "an Opus request reached a key resting for Opus"
            assert hub.app is not None
            (key,) = hub.app.stats()["keys"]["anthropic"]
            assert set(key["rests"]) == {"opus"} and key["state"] == "healthy"
