"""Refusals that retrying cannot fix reach the client as final: both SDKs,
with their default retries on, send each request once and raise at once with
the hub's message. (Claude Code reads the same `x-should-retry: false`.)"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from hubcore.governance.limits import Limits
from tests.conftest import upstreams_for
from tests.fakevendor import ANTHROPIC_KEY, FakeVendor
from tests.hubharness import HubThread, eventually, make_config

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def hub(vendor: FakeVendor, tmp_path: Path) -> Iterator[HubThread]:
    with HubThread(make_config(tmp_path, upstreams_for(vendor))) as h:
        yield h


def requests_seen(hub: HubThread) -> int:
    """Requests the hub has finished, once none is in flight: a request is
    counted after its answer is written (Exchange.report), so the count can
    lag the client's return by a moment."""
    app = hub.app
    assert app is not None
    metrics = app.metrics
    eventually(lambda: metrics.in_flight == 0, timeout=5.0, what="no request in flight")
    return metrics.requests_total


CASES: dict[str, Callable[[HubThread], str]] = {
    "unknown token": lambda hub: "hc-not-a-token",
    "revoked token": lambda hub: hub.mint_revoked(),
    "budget spent": lambda hub: hub.mint_limited("spent", Limits(budget_day=0)),
    "model not allowed": lambda hub: hub.mint_limited("narrow", Limits(models=("gpt-nothing-*",))),
}


def timed(call: Callable[[], Any]) -> tuple[BaseException, float]:
    started = time.monotonic()
    with pytest.raises(Exception) as info:
        call()
    return info.value, time.monotonic() - started


@pytest.mark.parametrize("case", list(CASES))
def test_the_anthropic_sdk_does_not_retry_a_final_refusal(hub: HubThread, case: str) -> None:
    token = CASES[case](hub)
    client = anthropic.Anthropic(base_url=hub.url, api_key=token, timeout=10)  # default max_retries=2
    before = requests_seen(hub)
    error, took = timed(lambda: client.messages.create(model="claude-sonnet-4-6", max_tokens=8, messages=MESSAGES))
    assert isinstance(error, anthropic.APIStatusError) and error.status_code in (401, 403)
    assert error.response.headers["x-should-retry"] == "false" and "retry-after" not in error.response.headers
    assert requests_seen(hub) - before == 1, "the SDK retried"
    assert took < 2
    client.close()


@pytest.mark.parametrize("case", list(CASES))
def test_the_openai_sdk_does_not_retry_a_final_refusal(hub: HubThread, case: str) -> None:
    token = CASES[case](hub)
    client = openai.OpenAI(base_url=hub.url + "/v1", api_key=token, timeout=10)
    before = requests_seen(hub)
    error, took = timed(lambda: client.responses.create(model="gpt-5", input="hi"))
    assert isinstance(error, openai.APIStatusError) and error.status_code in (401, 403)
    assert requests_seen(hub) - before == 1, "the SDK retried"
    assert took < 2
    client.close()


def test_no_key_configured_fails_at_once(vendor: FakeVendor, tmp_path: Path) -> None:
    upstreams = upstreams_for(vendor)
    upstreams[0]["keys"] = []
    with HubThread(make_config(tmp_path, upstreams)) as hub:
        client = anthropic.Anthropic(base_url=hub.url, api_key=hub.mint(), timeout=10)
        before = requests_seen(hub)
        error, took = timed(lambda: client.messages.create(model="claude-sonnet-4-6", max_tokens=8, messages=MESSAGES))
        assert isinstance(error, anthropic.APIStatusError) and error.status_code == 503
        assert "no anthropic upstream key is configured" in str(error)
        assert error.response.headers["x-should-retry"] == "false" and "retry-after" not in error.response.headers
        # Not "overloaded_error": Claude Code retries those whatever the headers say.
        assert error.body["error"]["type"] == "api_error"  # type: ignore[index]
        assert requests_seen(hub) - before == 1
        assert took < 2
        client.close()


def test_every_key_refused_by_the_vendor_fails_at_once(vendor: FakeVendor, tmp_path: Path) -> None:
    vendor.set_key_behaviour(ANTHROPIC_KEY, 401)
    with HubThread(make_config(tmp_path, upstreams_for(vendor))) as hub:
        client = anthropic.Anthropic(base_url=hub.url, api_key=hub.mint(), timeout=10)
        for expected in ("every anthropic key was refused by the vendor (401)", "no usable anthropic key"):
            before = requests_seen(hub)
            error, took = timed(lambda: client.messages.create(model="claude-sonnet-4-6", max_tokens=8, messages=MESSAGES))
            assert isinstance(error, anthropic.APIStatusError) and error.status_code == 503
            assert expected in error.message
            assert error.response.headers["x-should-retry"] == "false" and "retry-after" not in error.response.headers
            assert error.body["error"]["type"] == "api_error"  # type: ignore[index]
            assert requests_seen(hub) - before == 1
            assert took < 2
        assert len(vendor.requests) == 1, "a dead key was tried again"
        client.close()

