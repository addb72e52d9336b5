"""A model the price table lacks, through a real hub, the official SDKs and the
fake vendor, under each `[pricing] unpriced` rule: estimated at the vendor's
most expensive model and charged to budgets, free, or refused before it is
sent; never silent (one warning per model, a counter in /metrics)."""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import anthropic
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hubcore.accounting.pricing import PriceTable, reference_price
from hubcore.config import PricingConfig
from hubcore.governance.limits import Limits
from hubcore.ops import client as opsclient
from tests.conftest import upstreams_for
from tests.fakevendor import ANTHROPIC_KEY, OPENAI_KEY, FakeVendor
from tests.hubharness import HubThread, make_config

T = TypeVar("T")

UNPRICED_CLAUDE = "claude-nova-1"
UNPRICED_GPT = "gpt-nova-1"
MESSAGES = [{"role": "user", "content": "hi"}]
CLAUDE_USAGE = {"input_tokens": 1000, "output_tokens": 2000, "cache_read": 300,
                "cache_write_5m": 400, "cache_write_1h": 500}
GPT_USAGE = {"input_tokens": 1300, "output_tokens": 2000, "cache_read": 300}


def eventually(check: Callable[[], T | None], what: str, timeout: float = 10.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def reference_cost(vendor: str, input: int, output: int, cache_write_5m: int = 0, cache_write_1h: int = 0,
                   cache_read: int = 0) -> int:
    """What the vendor's most expensive built-in model charges for these tokens,
    by hand from its price sheet."""
    ref = reference_price(PriceTable.load(), vendor)
    assert ref is not None
    total = (input * ref.input + output * ref.output + cache_write_5m * ref.cache_write_5m
             + cache_write_1h * ref.cache_write_1h + cache_read * ref.cache_read)
    return (total + 500_000) // 1_000_000


@pytest.fixture
def start_hub(vendor: FakeVendor, tmp_path: Path) -> Iterator[Callable[[str], HubThread]]:
    hubs: list[HubThread] = []

    def start(rule: str) -> HubThread:
        config = make_config(tmp_path, upstreams_for(vendor))
        hub = HubThread(dataclasses.replace(config, pricing=PricingConfig(unpriced=rule)))
        hub.__enter__()
        hubs.append(hub)
        return hub

    yield start
    for hub in hubs:
        hub.__exit__(None, None, None)


def claude(hub: HubThread, token: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=hub.url, api_key=token, timeout=10)


def gpt(hub: HubThread, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=hub.url + "/v1", api_key=token, timeout=10)


def fake_usage(usage: dict[str, int]) -> dict[str, str]:
    return {"x-fake-usage": orjson.dumps(usage).decode()}


def unpriced_warnings(caplog: pytest.LogCaptureFixture, model: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "hubcore.pricing" and r.levelno == logging.WARNING and repr(model) in r.getMessage()]


def metric_samples(hub: HubThread) -> dict[str, float]:
    status, body = opsclient.fetch(hub.config.server.ops_socket, "/metrics")
    assert status == 200
    return {
        sample.labels["model"]: sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples if sample.name == "hubcore_unpriced_requests_total"
    }


def test_estimate_charges_the_vendors_most_expensive_price_and_the_budget_bites(
    start_hub: Callable[[str], HubThread], vendor: FakeVendor, caplog: pytest.LogCaptureFixture,
) -> None:
    hub = start_hub("estimate")
    token = hub.mint("est")
    expected = reference_cost("anthropic", 1000, 2000, 400, 500, 300)
    # The budget holds less than one such request: the first goes through (a
    # budget is checked at admission), its estimated cost spends it, the next
    # is refused.
    hub.set_limits("user", "est", Limits(budget_day=expected - 1))
    client = claude(hub, token)
    with caplog.at_level(logging.WARNING, logger="hubcore.pricing"):
        answer = client.messages.create(model=UNPRICED_CLAUDE, max_tokens=8, messages=MESSAGES,
                                        extra_headers=fake_usage(CLAUDE_USAGE))
        assert answer.model == UNPRICED_CLAUDE
        rows = eventually(lambda: hub.usage_rows() or None, "the usage row")
        (row,) = rows
        assert (row["model"], row["cost_micros"], row["cost_basis"]) == (UNPRICED_CLAUDE, expected, "estimate")
        with pytest.raises(anthropic.PermissionDeniedError) as refused:
            client.messages.create(model=UNPRICED_CLAUDE, max_tokens=8, messages=MESSAGES)
    assert "budget" in str(refused.value)
    assert len(vendor.requests) == 1
    client.close()

    # OpenAI: its own most expensive model (cached input is OpenAI's cache read).
    token = hub.mint("est-gpt")
    with gpt(hub, token) as client_gpt:
        client_gpt.responses.create(model=UNPRICED_GPT, input="hi", extra_headers=fake_usage(GPT_USAGE))
    row = eventually(lambda: [r for r in hub.usage_rows() if r["model"] == UNPRICED_GPT] or None, "the gpt row")[0]
    assert (row["cost_micros"], row["cost_basis"]) == (reference_cost("openai", 1000, 2000, cache_read=300), "estimate")


def test_free_costs_nothing_and_marks_the_row(start_hub: Callable[[str], HubThread]) -> None:
    hub = start_hub("free")
    with claude(hub, hub.mint("free")) as client:
        client.messages.create(model=UNPRICED_CLAUDE, max_tokens=8, messages=MESSAGES,
                               extra_headers=fake_usage(CLAUDE_USAGE))
    (row,) = eventually(lambda: hub.usage_rows() or None, "the usage row")
    assert (row["cost_micros"], row["cost_basis"], row["output_tokens"]) == (0, "free", 2000)


def test_refuse_answers_400_before_sending(start_hub: Callable[[str], HubThread], vendor: FakeVendor) -> None:
    hub = start_hub("refuse")
    token = hub.mint("strict")
    assert hub.app is not None
    client = claude(hub, token)  # the SDK's default retries are on
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model=UNPRICED_CLAUDE, max_tokens=8, messages=MESSAGES)
    error = info.value
    assert error.response.headers["x-should-retry"] == "false" and "retry-after" not in error.response.headers
    body = error.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    message = body["error"]["message"]
    assert UNPRICED_CLAUDE in message and 'unpriced = "refuse"' in message
    assert hub.app.metrics.requests_total == 1, "the SDK retried"

    with gpt(hub, token) as client_gpt, pytest.raises(openai.BadRequestError) as openai_info:
        client_gpt.responses.create(model=UNPRICED_GPT, input="hi")
    assert openai_info.value.response.json()["error"]["code"] == "model_not_priced"
    assert UNPRICED_GPT in openai_info.value.response.json()["error"]["message"]
    assert vendor.requests == [], "an unpriced request reached the vendor"

    # A priced model, by a dated snapshot id, goes through.
    client.messages.create(model="claude-sonnet-4-5-20250929", max_tokens=8, messages=MESSAGES)
    assert len(vendor.requests) == 1
    client.close()
    rows = eventually(lambda: (r := hub.usage_rows()) and len(r) == 3 and r, "three rows")
    assert [(r["model"], r["outcome"], r["cost_micros"], r["cost_basis"]) for r in rows[:2]] == [
        (UNPRICED_CLAUDE, "refused", 0, "refused"), (UNPRICED_GPT, "refused", 0, "refused"),
    ]
    assert rows[2]["cost_basis"] is None and rows[2]["cost_micros"] > 0


def test_one_warning_per_model_and_the_metric(
    start_hub: Callable[[str], HubThread], caplog: pytest.LogCaptureFixture,
) -> None:
    hub = start_hub("estimate")
    with caplog.at_level(logging.WARNING, logger="hubcore.pricing"), claude(hub, hub.mint("many")) as client:
        for _ in range(3):
            client.messages.create(model=UNPRICED_CLAUDE, max_tokens=8, messages=MESSAGES)
        client.messages.create(model="claude-nova-2", max_tokens=8, messages=MESSAGES)
        client.messages.create(model="claude-haiku-4-5-20251001", max_tokens=8, messages=MESSAGES)
        eventually(lambda: len(hub.usage_rows()) == 5, "five rows")
    (line,) = unpriced_warnings(caplog, UNPRICED_CLAUDE)
    assert "anthropic" in line and 'unpriced = "estimate"' in line
    assert len(unpriced_warnings(caplog, "claude-nova-2")) == 1
    assert unpriced_warnings(caplog, "claude-haiku-4-5-20251001") == []
    assert metric_samples(hub) == {UNPRICED_CLAUDE: 3.0, "claude-nova-2": 1.0}


def test_a_changed_rule_applies_on_reload(vendor: FakeVendor, tmp_path: Path) -> None:
    def write(rule: str) -> Path:
        path = tmp_path / "hub.toml"
        path.write_text(
            "[server]\n"
            f'listen = "127.0.0.1:0"\ndatabase = "{tmp_path / "hub.db"}"\nops_socket = "{tmp_path / "ops.sock"}"\n'
            "token_reload_interval = 0.1\nusage_flush_interval = 0.05\n"
            f'[pricing]\nunpriced = "{rule}"\n'
            f'[[upstream]]\nname = "anthropic"\nkind = "anthropic"\nbase_url = "{vendor.url}"\nkeys = ["{ANTHROPIC_KEY}"]\n'
            f'[[upstream]]\nname = "openai"\nkind = "openai"\nbase_url = "{vendor.url}"\nkeys = ["{OPENAI_KEY}"]\n'
        )
        return path

    from hubcore import config as config_mod

    path = write("free")
    with HubThread(config_mod.load(str(path))) as hub:
        assert hub.app is not None
        hub.app.config_path = str(path)
        with claude(hub, hub.mint()) as client:
            client.messages.create(model=UNPRICED_CLAUDE, max_tokens=8, messages=MESSAGES)
            write("refuse")
            ok, said = hub.call(hub.app.reload())
            assert ok, said
            with pytest.raises(anthropic.BadRequestError):
                client.messages.create(model=UNPRICED_CLAUDE, max_tokens=8, messages=MESSAGES)
        assert len(vendor.requests) == 1
        rows = eventually(lambda: (r := hub.usage_rows()) and len(r) == 2 and r, "two rows")
        assert [r["cost_basis"] for r in rows] == ["free", "refused"]
