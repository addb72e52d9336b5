"""Price table: the built-in file, operator overrides, matching, exact cost."""
from __future__ import annotations

import json
import re
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hubcore.accounting.pricing import Price, PricesError, PriceTable, Pricing, parse_prices

MTOK = 1_000_000


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return PriceTable.load()


@pytest.mark.parametrize(
    ("model", "input_usd", "output_usd"),
    [
        ("claude-opus-4-6", 5, 25),
        ("claude-opus-4-5-20251101", 5, 25),
        ("claude-opus-4-1-20250805", 15, 75),
        ("claude-opus-4-20250514", 15, 75),
        ("claude-sonnet-4-5", 3, 15),
        ("claude-sonnet-4-5-20250929", 3, 15),
        ("claude-sonnet-4-20250514", 3, 15),
        ("claude-haiku-4-5", 1, 5),
        ("claude-3-5-haiku-20241022", 0.8, 4),
        ("gpt-5", 1.25, 10),
        ("gpt-5-2025-08-07", 1.25, 10),
        ("gpt-5-codex", 1.25, 10),
        ("gpt-5.1-codex", 1.25, 10),
        ("gpt-5-mini", 0.25, 2),
        ("gpt-5-mini-2025-08-07", 0.25, 2),
    ],
)
def test_builtin_prices_for_real_model_ids(
    table: PriceTable, model: str, input_usd: float, output_usd: float
) -> None:
    # 100k input tokens: below every long-context threshold.
    assert table.cost_micros(model, MTOK // 10, 0) * 10 == round(input_usd * 1_000_000)
    assert table.cost_micros(model, 0, MTOK) == round(output_usd * 1_000_000)


def test_protocol_example_cache_read_against_cache_write(table: PriceTable) -> None:
    # A 100k-token prefix on Opus 4.6: $0.05 read from cache, $0.625 written.
    assert table.cost_micros("claude-opus-4-6", 0, 0, cache_read=100_000) == 50_000
    assert table.cost_micros("claude-opus-4-6", 0, 0, cache_write_5m=100_000) == 625_000
    # The 1-hour write is 2x input, not the 5-minute 1.25x.
    one_hour = table.cost_micros("claude-opus-4-6", 0, 0, cache_write_1h=100_000)
    uncached = table.cost_micros("claude-opus-4-6", 100_000, 0)
    assert uncached == 500_000
    assert one_hour == 2 * uncached == 1_000_000


_FIFTH = re.compile(r"claude-(opus|sonnet|haiku|fable|mythos)-(5|preview)")


def test_the_fifth_claude_generation_is_priced_as_the_map_prices_it(table: PriceTable) -> None:
    # USD per million tokens, from LiteLLM's map (1.110.2).
    assert table.cost_micros("claude-opus-5", MTOK, MTOK) == 30_000_000
    assert table.cost_micros("claude-opus-5-5-20261101", MTOK, MTOK) == 24_000_000
    assert table.cost_micros("claude-sonnet-5-5", MTOK, 0, cache_read=MTOK) == 2_100_000
    assert table.cost_micros("claude-mythos-preview", 0, MTOK) == 50_000_000
    # Haiku 5.5 above 100k input tokens: every class at its long-context price.
    assert table.cost_micros("claude-haiku-5-5", 100_000, 0) == 10_000
    assert table.cost_micros("claude-haiku-5-5", 100_001, 0) == 50_001  # 100,001 x $0.50 / M, rounded half up


def test_anthropic_multipliers_hold_for_every_builtin_claude_entry(table: PriceTable) -> None:
    # Claude 3 and 4: the 5 generation's caches are cheaper to read (the map
    # gives 0.05x and 0.025x), and Haiku 5.5's long context starts at 100k.
    claude = [p for p in table.entries if p.pattern.startswith("claude-") and not _FIFTH.match(p.pattern)]
    assert claude
    for price in claude:
        assert price.cache_write_5m * 4 == price.input * 5, price.pattern
        assert price.cache_write_1h == 2 * price.input, price.pattern
        assert price.cache_read * 10 == price.input, price.pattern
        if price.long_context_above is not None:  # the same rule on the long-context prices
            assert price.long_context_above == 200_000, price.pattern
            assert price.input_long is not None, price.pattern
            assert price.cache_write_5m_long is not None and price.cache_write_5m_long * 4 == price.input_long * 5
            assert price.cache_write_1h_long == 2 * price.input_long, price.pattern
            assert price.cache_read_long is not None and price.cache_read_long * 10 == price.input_long


def test_unknown_and_missing_models_have_no_price(table: PriceTable) -> None:
    assert table.cost_micros("claude-opus-9", 100, 100) is None
    assert table.cost_micros("gpt-4-nano-x", 100, 100) is None
    assert table.cost_micros(None, 100, 100) is None
    # Zero tokens of a known model cost zero, which is not the same thing.
    assert table.cost_micros("gpt-5", 0, 0) == 0


def test_openai_cached_input_is_priced_as_cache_read(table: PriceTable) -> None:
    # 1M uncached + 1M cached input + 1M output on gpt-5: 1.25 + 0.125 + 10.
    assert table.cost_micros("gpt-5", MTOK, MTOK, cache_read=MTOK) == 11_375_000


def test_mixed_request_rounds_half_up_on_the_total(table: PriceTable) -> None:
    # Sonnet: 1 input token is 3 micro-dollars, 1 cache-read token 0.3: each
    # rounded alone the read would vanish; on the total 3.3 rounds to 3.
    assert table.cost_micros("claude-sonnet-4-5", 1, 0, cache_read=1) == 3
    # 5 cache reads = 1.5 micro-dollars: half rounds up.
    assert table.cost_micros("claude-sonnet-4-5", 0, 0, cache_read=5) == 2
    # 4 = 1.2 rounds down.
    assert table.cost_micros("claude-sonnet-4-5", 0, 0, cache_read=4) == 1


@given(
    st.integers(0, 10**7), st.integers(0, 10**7), st.integers(0, 10**7),
    st.integers(0, 10**7), st.integers(0, 10**7),
)
def test_cost_is_the_exact_rational_total_rounded_half_up(
    inp: int, out: int, w5: int, w1: int, read: int
) -> None:
    table = PriceTable([Price("m", 3_000_000, 3_750_000, 6_000_000, 300_000, 15_000_000)])
    exact = (
        Fraction(inp * 3, 1) + Fraction(w5 * 375, 100) + Fraction(w1 * 6, 1)
        + Fraction(read * 3, 10) + Fraction(out * 15, 1)
    )  # micro-dollars
    expected = int(exact + Fraction(1, 2))  # floor(x + 1/2): half up
    assert table.cost_micros("m", inp, out, w5, w1, read) == expected


def test_most_specific_pattern_wins_regardless_of_order() -> None:
    text = """
    [prices]
    "gpt-5*"       = { input = 1, cache_write_5m = 0, cache_write_1h = 0, cache_read = 0, output = 1 }
    "gpt-5-mini*"  = { input = 2, cache_write_5m = 0, cache_write_1h = 0, cache_read = 0, output = 2 }
    "gpt-5-mini"   = { input = 3, cache_write_5m = 0, cache_write_1h = 0, cache_read = 0, output = 3 }
    "gpt-?-mini-x" = { input = 4, cache_write_5m = 0, cache_write_1h = 0, cache_read = 0, output = 4 }
    """
    forward = parse_prices(text, "test.toml")
    for entries in (forward, list(reversed(forward))):
        table = PriceTable(entries)

        def pattern(model: str) -> str | None:
            price = table.price_for(model)
            return None if price is None else price.pattern

        assert pattern("gpt-5") == "gpt-5*"
        assert pattern("gpt-5-codex") == "gpt-5*"
        assert pattern("gpt-5-mini") == "gpt-5-mini"          # exact beats glob
        assert pattern("gpt-5-mini-2025") == "gpt-5-mini*"    # longer literal prefix
        assert pattern("gpt-5-mini-x") == "gpt-5-mini*"       # prefix before '?' is short
        assert pattern("gpt-4o") is None


def test_operator_file_overrides_and_extends(tmp_path: Path) -> None:
    operator = tmp_path / "prices.toml"
    operator.write_text(
        "[prices]\n"
        '"claude-sonnet-4-5*" = { input = 2, cache_write_5m = 2.5, cache_write_1h = 4,'
        " cache_read = 0.2, output = 10 }\n"
        '"gpt-5-nano*" = { input = 0.05, cache_write_5m = 0, cache_write_1h = 0,'
        " cache_read = 0.005, output = 0.4 }\n"
    )
    table = PriceTable.load(operator)
    assert table.cost_micros("claude-sonnet-4-5-20250929", MTOK, 0) == 2_000_000
    assert table.cost_micros("gpt-5-nano", MTOK, MTOK, cache_read=MTOK) == 455_000
    # Untouched built-ins stay.
    assert table.cost_micros("claude-opus-4-6", MTOK, 0) == 5_000_000
    price = table.price_for("claude-sonnet-4-5")
    assert price is not None and price.source == str(operator)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('"m" = { input = 1, cache_write_5m = 1, cache_write_1h = 1, cache_read = 1 }',
         'prices.m.output: missing'),
        ('"m" = { input = "ten", cache_write_5m = 1, cache_write_1h = 1, cache_read = 1, output = 1 }',
         "prices.m.input: expected a number"),
        ('"m" = { input = -1, cache_write_5m = 1, cache_write_1h = 1, cache_read = 1, output = 1 }',
         "prices.m.input: must be a finite, non-negative"),
        ('"m" = { input = 1, cache_write_5m = 1, cache_write_1h = 1, cache_read = 1, output = 1, cache_write = 1 }',
         "prices.m.cache_write: unknown field"),
        ('"m" = { input = 0.0000001, cache_write_5m = 1, cache_write_1h = 1, cache_read = 1, output = 1 }',
         "prices.m.input: 1E-7 is finer than a micro-dollar"),
        ('"m*" = 5', 'prices."m*": expected a table'),
        ("m = { input = 1", "invalid TOML"),
    ],
)
def test_errors_name_the_file_and_the_field(tmp_path: Path, body: str, message: str) -> None:
    operator = tmp_path / "ops-prices.toml"
    operator.write_text("[prices]\n" + body + "\n")
    with pytest.raises(PricesError) as caught:
        PriceTable.load(operator)
    assert str(caught.value).startswith(str(operator) + ": ")
    assert message in str(caught.value)


def test_unknown_top_level_key_and_unreadable_file(tmp_path: Path) -> None:
    operator = tmp_path / "p.toml"
    operator.write_text("[model]\n")
    with pytest.raises(PricesError, match=r"p\.toml: unknown top-level key 'model'"):
        PriceTable.load(operator)
    with pytest.raises(PricesError, match="cannot read price file"):
        PriceTable.load(tmp_path / "missing.toml")


def test_lookup_memo_is_bounded(table: PriceTable) -> None:
    from hubcore.accounting import pricing

    for i in range(pricing.LOOKUP_MEMO_MAX * 2 + 3):
        table.price_for(f"made-up-model-{i}")
    assert len(table._memo) <= pricing.LOOKUP_MEMO_MAX
    assert table.cost_micros("gpt-5-mini", MTOK, 0) == 250_000


# -- the refreshed built-in table --------------------------------------------------

# An excerpt of LiteLLM 1.108.7's price map (tests/fixtures/prices/README.md).
EXCERPT = Path(__file__).resolve().parents[1] / "fixtures" / "prices" / "litellm-excerpt.json"


@pytest.mark.parametrize(
    ("model", "input_usd", "output_usd"),
    [
        ("claude-opus-4-7", 5, 25),
        ("claude-opus-4-7-20260416", 5, 25),
        ("claude-opus-4-8", 5, 25),
        ("claude-opus-4-6-20260205", 5, 25),
        ("claude-haiku-4-5-20251001", 1, 5),
        ("gpt-5.1", 1.25, 10),
        ("gpt-5.1-codex-max", 1.25, 10),
        ("gpt-5.2", 1.75, 14),
        ("gpt-5.2-2025-12-11", 1.75, 14),
        ("gpt-5.2-codex", 1.75, 14),
        ("gpt-5.4", 2.5, 15),
        ("gpt-5.4-mini-2026-03-17", 0.75, 4.5),
        ("gpt-5.5", 5, 30),
        ("gpt-4.1", 2, 8),
        ("gpt-4.1-mini-2025-04-14", 0.4, 1.6),
        ("gpt-4.1-nano", 0.1, 0.4),
        ("o3", 2, 8),
        ("o3-2025-04-16", 2, 8),
        ("o4-mini", 1.1, 4.4),
    ],
)
def test_models_the_old_table_left_unpriced(table: PriceTable, model: str, input_usd: float, output_usd: float) -> None:
    # 100k input tokens: below every long-context threshold.
    assert table.cost_micros(model, MTOK // 10, 0) * 10 == round(input_usd * 1_000_000)
    assert table.cost_micros(model, 0, MTOK) == round(output_usd * 1_000_000)


def test_the_builtin_table_agrees_with_the_price_map_excerpt(table: PriceTable) -> None:
    # Every Anthropic and OpenAI entry of the map's excerpt, class by class,
    # USD per token x 10^12 = micro-dollars per million tokens.
    document = json.loads(EXCERPT.read_text(), parse_float=Decimal)
    checked = 0
    for model, entry in document.items():
        if entry["litellm_provider"] not in ("anthropic", "openai"):
            continue
        price = table.price_for(model)
        assert price is not None, model

        def micros(field: str) -> int:
            return int(entry[field] * 10**12)

        assert (price.input, price.output, price.cache_read) == (
            micros("input_cost_per_token"), micros("output_cost_per_token"), micros("cache_read_input_token_cost"),
        ), model
        if "cache_creation_input_token_cost" in entry:
            assert price.cache_write_5m == micros("cache_creation_input_token_cost"), model
            assert price.cache_write_1h == micros("cache_creation_input_token_cost_above_1hr"), model
        checked += 1
    assert checked == 13


# -- long context ------------------------------------------------------------------

# TOML inline tables are one line; a sub-table reads better for a long entry.
LONG = """
[prices."long-m"]
input = 3
cache_write_5m = 3.75
cache_write_1h = 6
cache_read = 0.3
output = 15
input_above_200k = 6
cache_write_5m_above_200k = 7.5
cache_write_1h_above_200k = 12
cache_read_above_200k = 0.6
output_above_200k = 22.5

[prices]
"part-m" = { input = 2, cache_write_5m = 0, cache_write_1h = 0, cache_read = 0.2, output = 10, input_above_272k = 4, output_above_272k = 15 }
"""


def test_long_context_prices_parse_with_their_threshold() -> None:
    full, part = parse_prices(LONG, "long.toml")
    assert full.long_context_above == 200_000
    assert (full.input_long, full.cache_write_5m_long, full.cache_write_1h_long, full.cache_read_long,
            full.output_long) == (6_000_000, 7_500_000, 12_000_000, 600_000, 22_500_000)
    assert part.long_context_above == 272_000
    assert (part.input_long, part.output_long, part.cache_read_long) == (4_000_000, 15_000_000, None)


def test_above_the_threshold_every_class_is_charged_its_long_context_price() -> None:
    table = PriceTable(parse_prices(LONG, "long.toml"))
    # Exactly 200,000 tokens of input (uncached + writes + reads) is not above.
    at = table.cost_micros("long-m", 100_000, 1_000, 40_000, 20_000, 40_000)
    assert at == (100_000 * 3 + 40_000 * 3.75 + 20_000 * 6 + 40_000 * 0.3 + 1_000 * 15)
    # One more cache-read token and the whole request is long context.
    above = table.cost_micros("long-m", 100_000, 1_000, 40_000, 20_000, 40_001)
    assert above == round(100_000 * 6 + 40_000 * 7.5 + 20_000 * 12 + 40_001 * 0.6 + 1_000 * 22.5)
    # A class the entry gives no long-context price for keeps its own price.
    part = table.cost_micros("part-m", 200_000, 1_000, cache_read=72_001)
    assert part == round(200_000 * 4 + 72_001 * 0.2 + 1_000 * 15)
    assert table.cost_micros("part-m", 200_000, 1_000, cache_read=72_000) == round(200_000 * 2 + 72_000 * 0.2 + 1_000 * 10)


def test_long_context_fields_are_checked(tmp_path: Path) -> None:
    base = 'input = 1, cache_write_5m = 1, cache_write_1h = 1, cache_read = 1, output = 1'
    cases = [
        (f'"m" = {{ {base}, input_above_200k = 2, output_above_272k = 3 }}',
         "prices.m.output_above_272k: one long-context threshold per entry"),
        (f'"m" = {{ {base}, input_above_0k = 2 }}', "prices.m.input_above_0k: unknown field"),
        (f'"m" = {{ {base}, input_above_200k = -2 }}', "prices.m.input_above_200k: must be a finite, non-negative"),
        (f'"m" = {{ {base}, reasoning_above_200k = 2 }}', "prices.m.reasoning_above_200k: unknown field"),
    ]
    for body, message in cases:
        with pytest.raises(PricesError) as caught:
            parse_prices("[prices]\n" + body + "\n", "p.toml")
        assert message in str(caught.value), body


def test_builtin_sonnet_4_5_has_anthropics_long_context_prices(table: PriceTable) -> None:
    # Input over 200k on Sonnet 4.5: $6 / $22.50 per million (2x, 1.5x).
    assert table.cost_micros("claude-sonnet-4-5-20250929", 200_001, 0) == 1_200_006
    assert table.cost_micros("claude-sonnet-4-5", 1, MTOK, cache_read=200_000) == 22_500_000 + 120_000 + 6
    assert table.cost_micros("claude-sonnet-4-5", 200_000, MTOK) == 600_000 + 15_000_000


def test_builtin_gpt_5_4_long_context_starts_above_272k(table: PriceTable) -> None:
    assert table.cost_micros("gpt-5.4", 272_000, 0) == 680_000
    assert table.cost_micros("gpt-5.4", 272_001, 0) == 1_360_005


# -- the cost multiplier (an upstream that bills a fraction of the list price) ------

def test_a_half_price_upstream_costs_half_to_the_micro_dollar() -> None:
    price = Price("m", 3_000_000, 3_750_000, 6_000_000, 300_000, 15_000_000)
    assert price.cost_micros(MTOK, MTOK, multiplier=0.5) == 9_000_000
    # 1 input token = 3 micro-dollars: half is 1.5, rounded half up once.
    assert price.cost_micros(1, 0, multiplier=0.5) == 2
    # 5 cache reads = 1.5 micro-dollars (2 at full price): half is 0.75 -> 1,
    # not half of the rounded 2.
    assert price.cost_micros(0, 0, cache_read=5) == 2
    assert price.cost_micros(0, 0, cache_read=5, multiplier=0.5) == 1
    # 7 cache reads = 2.1: half 1.05 -> 1; 0.3 x 2.1 = 0.63 -> 1; 0.1 -> 0.21 -> 0.
    assert price.cost_micros(0, 0, cache_read=7, multiplier=0.5) == 1
    assert price.cost_micros(0, 0, cache_read=7, multiplier=0.3) == 1
    assert price.cost_micros(0, 0, cache_read=7, multiplier=0.1) == 0
    assert price.cost_micros(1, 1, multiplier=0) == 0
    assert price.cost_micros(1, 1, multiplier=2) == 36


@given(st.integers(0, 10**7), st.integers(0, 10**7), st.integers(0, 10**7),
       st.sampled_from([0.5, 0.25, 0.1, 0.3, 0.85, 1.2, 2.0, 0.001]))
def test_a_multiplier_scales_the_exact_total_before_the_one_rounding(inp: int, out: int, read: int, m: float) -> None:
    price = Price("m", 3_000_000, 3_750_000, 6_000_000, 300_000, 15_000_000)
    exact = (Fraction(inp * 3) + Fraction(read * 3, 10) + Fraction(out * 15)) * Fraction(str(m))
    assert price.cost_micros(inp, out, cache_read=read, multiplier=m) == int(exact + Fraction(1, 2))


def test_pricing_cost_takes_the_multiplier_for_priced_and_estimated_models() -> None:
    pricing = Pricing(PriceTable([Price("claude-x", 3_000_000, 3_750_000, 6_000_000, 300_000, 15_000_000)]))
    full, basis = pricing.cost("anthropic", "claude-x", 1, 0, cache_read=5)
    assert (full, basis) == (5, None)  # 3 + 1.5 = 4.5 -> 5
    assert pricing.cost("anthropic", "claude-x", 1, 0, cache_read=5, multiplier=0.5) == (2, None)  # 2.25 -> 2
    # A model without a price is estimated at the reference, then scaled the same way.
    assert pricing.cost("anthropic", "claude-unknown", 1, 0, cache_read=5, multiplier=0.5) == (2, "estimate")
    with pytest.raises(ValueError, match="multiplier"):
        pricing.cost("anthropic", "claude-x", 1, 0, multiplier=-1.0)
