"""`hubcore prices import`: LiteLLM's model_prices_and_context_window.json
into the operator's price file, through the real command in a subprocess."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from hubcore.accounting.pricing import Price, PriceTable, parse_prices
from tests.hubharness import run_cli

# An excerpt of LiteLLM 1.108.7's price map (tests/fixtures/prices/README.md):
# 13 Anthropic and OpenAI chat/responses models and gemini-2.5-pro.
EXCERPT = Path(__file__).resolve().parents[1] / "fixtures" / "prices" / "litellm-excerpt.json"

# Entries in the map's format, as text: the exponents are the map's own.
SYNTHETIC = """{
  "claude-longctx-9": {
    "litellm_provider": "anthropic", "mode": "chat",
    "input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
    "cache_read_input_token_cost": 3e-07, "cache_creation_input_token_cost": 3.75e-06,
    "cache_creation_input_token_cost_above_1hr": 6e-06,
    "input_cost_per_token_above_200k_tokens": 6e-06, "output_cost_per_token_above_200k_tokens": 2.25e-05,
    "cache_read_input_token_cost_above_200k_tokens": 6e-07,
    "cache_creation_input_token_cost_above_200k_tokens": 7.5e-06,
    "cache_creation_input_token_cost_above_1hr_above_200k_tokens": 1.2e-05,
    "input_cost_per_token_above_200k_tokens_priority": 9e-06
  },
  "gpt-longctx-9": {
    "litellm_provider": "openai", "mode": "responses",
    "input_cost_per_token": 2.5e-06, "output_cost_per_token": 1.5e-05, "cache_read_input_token_cost": 2.5e-07,
    "input_cost_per_token_above_272k_tokens": 5e-06, "output_cost_per_token_above_272k_tokens": 2.25e-05
  },
  "gpt-nocache-9": {"litellm_provider": "openai", "mode": "chat",
                    "input_cost_per_token": 1.5e-05, "output_cost_per_token": 0.00012},
  "anthropic/claude-longctx-9": {"litellm_provider": "anthropic", "mode": "chat",
                                 "input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06},
  "claude-embed-9": {"litellm_provider": "anthropic", "mode": "embedding", "input_cost_per_token": 1e-07,
                     "output_cost_per_token": 0},
  "gpt-free-text-9": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 1e-06},
  "gpt-odd[9]": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 1e-06,
                 "output_cost_per_token": 1e-06},
  "gpt-tiny-9": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 1.5e-13,
                 "output_cost_per_token": 1e-06},
  "gpt-twotier-9": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 1e-06,
                    "output_cost_per_token": 1e-06, "input_cost_per_token_above_128k_tokens": 2e-06,
                    "input_cost_per_token_above_272k_tokens": 3e-06},
  "sample_spec": {"litellm_provider": "one of https://docs.litellm.ai/docs/providers",
                  "mode": "one of: chat, embedding, completion"}
}"""

HAND_WRITTEN = """\
# my own prices
[prices]
"house-model" = { input = 0.7, cache_write_5m = 0, cache_write_1h = 0, cache_read = 0.07, output = 2.1 }
"claude-opus-4-7" = { input = 1, cache_write_5m = 1, cache_write_1h = 1, cache_read = 1, output = 1 }
"""


def prices_import(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_cli("prices", "import", *map(str, args))


def synthetic_map(tmp_path: Path) -> Path:
    """The excerpt and the synthetic entries in one file."""
    # Joined as text: json.dumps would turn the map's numbers into floats or strings.
    excerpt = EXCERPT.read_text().rstrip()
    assert excerpt.endswith("}") and SYNTHETIC.startswith("{")
    path = tmp_path / "model_prices_and_context_window.json"
    path.write_text(excerpt[:-1].rstrip() + ",\n" + SYNTHETIC[1:])
    assert len(json.loads(path.read_text())) == 14 + 10
    return path


def entries(path: Path) -> dict[str, Price]:
    return {p.pattern: p for p in parse_prices(path.read_text(), str(path))}


def test_the_excerpt_imports_with_exact_prices_per_million(tmp_path: Path) -> None:
    out = tmp_path / "prices.toml"
    done = prices_import(EXCERPT, "--output", out)
    assert done.returncode == 0, done.stderr
    assert "imported 13 models" in done.stdout
    assert "skipped 1: 1 another vendor" in done.stdout
    assert f"wrote {out}" in done.stdout
    assert "hubcore reload" in done.stdout and "SIGHUP" in done.stdout

    got = entries(out)
    assert len(got) == 13 and "gemini-2.5-pro" not in got
    opus = got["claude-opus-4-7"]
    # USD per token x 10^12 = micro-dollars per million: 6.25e-06 -> 6.25.
    assert (opus.input, opus.cache_write_5m, opus.cache_write_1h, opus.cache_read, opus.output) == (
        5_000_000, 6_250_000, 10_000_000, 500_000, 25_000_000)
    haiku = got["claude-haiku-4-5-20251001"]
    assert (haiku.input, haiku.cache_write_5m, haiku.cache_write_1h, haiku.cache_read, haiku.output) == (
        1_000_000, 1_250_000, 2_000_000, 100_000, 5_000_000)
    mini = got["gpt-5-mini"]
    # OpenAI gives no cache write price: a write would cost uncached input.
    assert (mini.input, mini.cache_write_5m, mini.cache_write_1h, mini.cache_read, mini.output) == (
        250_000, 250_000, 250_000, 25_000, 2_000_000)
    assert got["gpt-5.2"].input == 1_750_000 and got["gpt-5.2"].cache_read == 175_000
    assert all(p.long_context_above is None for p in got.values())

    text = out.read_text()
    # The prices.toml format, decimal notation, and where it came from.
    assert '"claude-haiku-4-5" = { input = 1, cache_write_5m = 1.25, cache_write_1h = 2, cache_read = 0.1, output = 5 }' in text
    assert '"gpt-5-mini" = { input = 0.25, cache_write_5m = 0.25, cache_write_1h = 0.25, cache_read = 0.025, output = 2 }' in text
    assert str(EXCERPT) in text.split("[prices]")[0]
    assert not re.search(r"[0-9][eE][-+]?[0-9]", text)


def test_the_imported_prices_agree_with_the_builtin_table(tmp_path: Path) -> None:
    out = tmp_path / "prices.toml"
    assert prices_import(EXCERPT, "--output", out).returncode == 0
    builtin = PriceTable.load()
    for model, imported in entries(out).items():
        own = builtin.price_for(model)
        assert own is not None, model
        assert (own.input, own.cache_write_5m, own.cache_write_1h, own.cache_read, own.output) == (
            imported.input, imported.cache_write_5m, imported.cache_write_1h, imported.cache_read, imported.output,
        ), model


def test_long_context_prices_and_what_is_skipped_and_why(tmp_path: Path) -> None:
    out = tmp_path / "prices.toml"
    done = prices_import(synthetic_map(tmp_path), "--output", out)
    assert done.returncode == 0, done.stderr
    assert "imported 16 models" in done.stdout
    skipped = done.stdout.split("skipped ", 1)[1].splitlines()[0]
    assert skipped.startswith("8: ")
    for reason in ("2 another vendor", "1 not a chat or responses model", "1 provider-prefixed key",
                   "1 no input or output price", "1 glob character in the key",
                   "1 finer than a micro-dollar per million tokens", "1 more than one long-context threshold"):
        assert reason in skipped, skipped

    got = entries(out)
    long = got["claude-longctx-9"]
    assert long.long_context_above == 200_000
    assert (long.input_long, long.cache_write_5m_long, long.cache_write_1h_long, long.cache_read_long,
            long.output_long) == (6_000_000, 7_500_000, 12_000_000, 600_000, 22_500_000)
    gpt = got["gpt-longctx-9"]
    assert gpt.long_context_above == 272_000
    assert (gpt.input_long, gpt.output_long, gpt.cache_read_long, gpt.cache_write_5m_long) == (
        5_000_000, 22_500_000, None, None)
    # No cache price at all: a cached token costs what an uncached one does.
    nocache = got["gpt-nocache-9"]
    assert (nocache.input, nocache.cache_read, nocache.cache_write_5m, nocache.output) == (
        15_000_000, 15_000_000, 15_000_000, 120_000_000)
    assert "input_above_200k = 6" in out.read_text()
    table = PriceTable.load(out)
    assert table.cost_micros("claude-longctx-9", 200_001, 0) == 1_200_006
    assert table.cost_micros("claude-longctx-9", 200_000, 0) == 600_000


def test_the_operators_other_entries_are_kept_and_the_imported_ones_replaced(tmp_path: Path) -> None:
    out = tmp_path / "ops-prices.toml"
    out.write_text(HAND_WRITTEN)
    done = prices_import(EXCERPT, "--output", out)
    assert done.returncode == 0, done.stderr
    assert "kept 1 entry" in done.stdout and "replaced 1" in done.stdout and "claude-opus-4-7" in done.stdout
    got = entries(out)
    assert len(got) == 14
    house = got["house-model"]
    assert (house.input, house.cache_write_5m, house.cache_write_1h, house.cache_read, house.output) == (
        700_000, 0, 0, 70_000, 2_100_000)
    assert got["claude-opus-4-7"].input == 5_000_000
    # Imported again: the same file (nothing doubled, the kept entry still kept).
    first = out.read_text()
    again = prices_import(EXCERPT, "--output", out)
    assert again.returncode == 0, again.stderr
    assert "replaced 13" in again.stdout and "kept 1 entry" in again.stdout
    assert entries(out) == got
    body = lambda text: text.split("[prices]", 1)[1]  # noqa: E731 (the header has the time)
    assert body(out.read_text()) == body(first)


def test_the_file_is_the_configs_server_prices_and_vendor_narrows(tmp_path: Path) -> None:
    target = tmp_path / "from-config.toml"
    config = tmp_path / "hubcore.toml"
    config.write_text(f'[server]\nprices = "{target}"\ndatabase = "{tmp_path / "hub.db"}"\n')
    done = prices_import(EXCERPT, "--config", config, "--vendor", "openai")
    assert done.returncode == 0, done.stderr
    assert f"wrote {target}" in done.stdout
    assert "imported 6 models" in done.stdout and "8 another vendor" in done.stdout
    assert all(model.startswith("gpt-") for model in entries(target))


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "prices.toml"
    done = prices_import(EXCERPT, "--output", out, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "imported 13 models" in done.stdout and "dry run" in done.stdout
    assert not out.exists()


def test_no_file_to_write_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "hubcore.toml"
    config.write_text(f'[server]\ndatabase = "{tmp_path / "hub.db"}"\n')
    done = prices_import(EXCERPT, "--config", config)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "hubcore: no price file to write: set [server] prices in the config or pass --output"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a JSON object of models"),
        ('{"claude-x": {"litellm_provider": "anthropic", "mode": "chat", "input_cost_per_token": -1e-06,'
         ' "output_cost_per_token": 1e-06}}', "claude-x: input_cost_per_token: must be a finite, non-negative"),
        ('{"gpt-x": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 1e-06,'
         ' "output_cost_per_token": "0.00001"}}', "gpt-x: output_cost_per_token: expected a number of USD per token"),
        ('{"gpt-x": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": NaN,'
         ' "output_cost_per_token": 1e-06}}', "gpt-x: input_cost_per_token: must be a finite, non-negative"),
        ('{"gpt-x": "cheap"}', "gpt-x: expected an object"),
    ],
)
def test_bad_input_is_one_line_naming_file_and_entry_and_writes_nothing(
    tmp_path: Path, text: str, message: str,
) -> None:
    source = tmp_path / "map.json"
    source.write_text(text)
    out = tmp_path / "prices.toml"
    out.write_text(HAND_WRITTEN)
    done = prices_import(source, "--output", out)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"hubcore: {source}: "), line
    assert message in line
    assert out.read_text() == HAND_WRITTEN


def test_a_broken_operator_file_or_map_path_stops_the_import(tmp_path: Path) -> None:
    out = tmp_path / "prices.toml"
    out.write_text("[prices]\nx = { input = 1 }\n")
    done = prices_import(EXCERPT, "--output", out)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"hubcore: {out}: prices.x.cache_write_5m: missing (USD per million tokens); fix it or pass another --output"]
    assert out.read_text() == "[prices]\nx = { input = 1 }\n"
    missing = prices_import(tmp_path / "nope.json", "--output", out)
    assert missing.returncode == 1 and "nope.json: cannot read" in missing.stderr
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"caf\xe9": {}}')
    undecodable = prices_import(latin, "--output", out)
    assert undecodable.returncode == 1
    assert undecodable.stderr.strip().splitlines() == [f"hubcore: {latin}: not JSON: not UTF-8 text"]
    bad_vendor = prices_import(EXCERPT, "--output", out, "--vendor", ",")
    assert bad_vendor.returncode == 2 and "--vendor" in bad_vendor.stderr
