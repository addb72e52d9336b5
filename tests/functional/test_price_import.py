"""End to end: `hubcore prices import` writes the price file the hub's config
names, `reload` hands it to the running hub, and a model only that file
prices is charged the imported price to the micro-dollar, its long-context
price included, through the official SDKs and the fake vendor."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, TypeVar

import anthropic
import openai
import orjson
import pytest

from hubcore import config as config_mod
from tests.fakevendor import ANTHROPIC_KEY, OPENAI_KEY, FakeVendor
from tests.hubharness import HubThread, run_cli

T = TypeVar("T")

CLAUDE = "claude-imported-7"
GPT = "gpt-imported-7"
# USD per token, as the map writes them; odd enough that rounding shows.
CLAUDE_PRICES = {
    "input": "3.3e-06", "cache_write_5m": "4.125e-06", "cache_write_1h": "6.6e-06", "cache_read": "3.3e-07",
    "output": "1.65e-05",
}
CLAUDE_LONG = {
    "input": "6.6e-06", "cache_write_5m": "8.25e-06", "cache_write_1h": "1.32e-05", "cache_read": "6.6e-07",
    "output": "2.475e-05",
}
GPT_PRICES = {"input": "2.5e-06", "cache_read": "2.5e-07", "output": "1.5e-05"}
GPT_LONG = {"input": "5e-06", "cache_read": "5e-07", "output": "2.25e-05"}

PRICE_MAP = f"""{{
  "{CLAUDE}": {{
    "litellm_provider": "anthropic", "mode": "chat",
    "input_cost_per_token": {CLAUDE_PRICES["input"]}, "output_cost_per_token": {CLAUDE_PRICES["output"]},
    "cache_read_input_token_cost": {CLAUDE_PRICES["cache_read"]},
    "cache_creation_input_token_cost": {CLAUDE_PRICES["cache_write_5m"]},
    "cache_creation_input_token_cost_above_1hr": {CLAUDE_PRICES["cache_write_1h"]},
    "input_cost_per_token_above_200k_tokens": {CLAUDE_LONG["input"]},
    "output_cost_per_token_above_200k_tokens": {CLAUDE_LONG["output"]},
    "cache_read_input_token_cost_above_200k_tokens": {CLAUDE_LONG["cache_read"]},
    "cache_creation_input_token_cost_above_200k_tokens": {CLAUDE_LONG["cache_write_5m"]},
    "cache_creation_input_token_cost_above_1hr_above_200k_tokens": {CLAUDE_LONG["cache_write_1h"]}
  }},
  "{GPT}": {{
    "litellm_provider": "openai", "mode": "responses",
    "input_cost_per_token": {GPT_PRICES["input"]}, "output_cost_per_token": {GPT_PRICES["output"]},
    "cache_read_input_token_cost": {GPT_PRICES["cache_read"]},
    "input_cost_per_token_above_272k_tokens": {GPT_LONG["input"]},
    "output_cost_per_token_above_272k_tokens": {GPT_LONG["output"]},
    "cache_read_input_token_cost_above_272k_tokens": {GPT_LONG["cache_read"]}
  }},
  "gemini-imported-7": {{
    "litellm_provider": "vertex_ai-language-models", "mode": "chat",
    "input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06
  }}
}}"""

MESSAGES = [{"role": "user", "content": "hi"}]


def eventually(check: Callable[[], T | None], what: str, timeout: float = 10.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def by_hand(prices: dict[str, str], **tokens: int) -> int:
    """Micro-dollars for `tokens` at `prices` (USD per token), rounded half up once."""
    usd = sum(Decimal(prices[cls]) * count for cls, count in tokens.items())
    return int((usd * 1_000_000).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def fake_usage(**usage: int) -> dict[str, str]:
    return {"x-fake-usage": orjson.dumps(usage).decode()}


@pytest.fixture
def setup(vendor: FakeVendor, tmp_path: Path) -> Iterator[tuple[HubThread, Path, Path]]:
    """A hub started from a config file whose [server] prices is a hand-written
    operator file; the config's path, and the price map's."""
    operator = tmp_path / "operator-prices.toml"
    operator.write_text(
        '[prices]\n"house-model" = { input = 1, cache_write_5m = 0, cache_write_1h = 0, cache_read = 0.1, output = 2 }\n'
    )
    config = tmp_path / "hubcore.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\ndatabase = "{tmp_path / "hub.db"}"\nops_socket = ""\n'
        f'token_reload_interval = 0.1\nusage_flush_interval = 0.05\nprices = "{operator}"\n\n'
        f'[[upstream]]\nname = "anthropic"\nkind = "anthropic"\nbase_url = "{vendor.url}"\n'
        f'keys = [{{ key = "{ANTHROPIC_KEY}", label = "a" }}]\n\n'
        f'[[upstream]]\nname = "openai"\nkind = "openai"\nbase_url = "{vendor.url}"\n'
        f'keys = [{{ key = "{OPENAI_KEY}", label = "o" }}]\n'
    )
    price_map = tmp_path / "model_prices_and_context_window.json"
    price_map.write_text(PRICE_MAP)
    hub = HubThread(config_mod.load(str(config), env={}))
    hub.__enter__()
    assert hub.app is not None
    hub.app.config_path = str(config)  # what `serve --config` gives the App
    try:
        yield hub, config, price_map
    finally:
        hub.__exit__(None, None, None)


def rows_of(hub: HubThread, model: str, count: int) -> list[dict[str, Any]]:
    return eventually(lambda: (r := [x for x in hub.usage_rows() if x["model"] == model]) and len(r) >= count and r,
                      f"{count} rows of {model}")


def test_imported_prices_are_what_the_usage_rows_use(setup: tuple[HubThread, Path, Path]) -> None:
    hub, config, price_map = setup
    token = hub.mint("importer")
    claude = anthropic.Anthropic(base_url=hub.url, api_key=token, timeout=10, max_retries=0)
    gpt = openai.OpenAI(base_url=hub.url + "/v1", api_key=token, timeout=10, max_retries=0)
    try:
        # Before: the model has no price, so it is estimated.
        claude.messages.create(model=CLAUDE, max_tokens=8, messages=MESSAGES,
                               extra_headers=fake_usage(input_tokens=10, output_tokens=10))
        (before,) = rows_of(hub, CLAUDE, 1)
        assert before["cost_basis"] == "estimate"

        done = run_cli("prices", "import", str(price_map), "--config", str(config))
        assert done.returncode == 0, done.stderr
        assert "imported 2 models" in done.stdout and "1 another vendor" in done.stdout
        assert "kept 1 entry" in done.stdout and "hubcore reload" in done.stdout
        assert hub.call(hub.app.reload())[0]  # type: ignore[union-attr]

        # A short request: every class at its base price.
        short = {"input_tokens": 1001, "output_tokens": 2003, "cache_write_5m": 405, "cache_write_1h": 507,
                 "cache_read": 309}
        claude.messages.create(model=CLAUDE, max_tokens=8, messages=MESSAGES, extra_headers=fake_usage(**short))
        # Long context: 150,000 uncached + 50,001 read = 200,001 tokens of input.
        long = {"input_tokens": 150_000, "output_tokens": 1_001, "cache_write_5m": 0, "cache_write_1h": 0,
                "cache_read": 50_001}
        claude.messages.create(model=CLAUDE, max_tokens=8, messages=MESSAGES, extra_headers=fake_usage(**long))
        # Exactly 200,000: not above.
        edge = dict(long, cache_read=50_000)
        claude.messages.create(model=CLAUDE, max_tokens=8, messages=MESSAGES, extra_headers=fake_usage(**edge))

        # OpenAI: its input_tokens include the cached ones (the row moves them to cache_read).
        gpt.responses.create(model=GPT, input="hi",
                             extra_headers=fake_usage(input_tokens=1_301, output_tokens=2_001, cache_read=300))
        gpt.responses.create(model=GPT, input="hi",
                             extra_headers=fake_usage(input_tokens=272_001, output_tokens=999, cache_read=72_000))
    finally:
        claude.close()
        gpt.close()

    rows = rows_of(hub, CLAUDE, 4)
    short_row, long_row, edge_row = rows[1:]

    def classes(usage: dict[str, int]) -> dict[str, int]:
        return {"input": usage["input_tokens"], "output": usage["output_tokens"], "cache_write_5m":
                usage["cache_write_5m"], "cache_write_1h": usage["cache_write_1h"], "cache_read": usage["cache_read"]}

    assert (short_row["cost_micros"], short_row["cost_basis"]) == (by_hand(CLAUDE_PRICES, **classes(short)), None)
    assert long_row["cost_micros"] == by_hand(CLAUDE_LONG, **classes(long))
    assert edge_row["cost_micros"] == by_hand(CLAUDE_PRICES, **classes(edge))
    assert long_row["cost_micros"] != by_hand(CLAUDE_PRICES, **classes(long))

    gpt_short, gpt_long = rows_of(hub, GPT, 2)
    assert (gpt_short["input_tokens"], gpt_short["cache_read"]) == (1_001, 300)
    assert (gpt_short["cost_micros"], gpt_short["cost_basis"]) == (
        by_hand(GPT_PRICES, input=1_001, cache_read=300, output=2_001), None)
    # 200,001 uncached + 72,000 cached = 272,001 tokens of input: above 272k.
    assert gpt_long["cost_micros"] == by_hand(GPT_LONG, input=200_001, cache_read=72_000, output=999)
