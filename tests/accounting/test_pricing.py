"""Price table: the built-in file, operator overrides, matching, exact cost."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hubcore.accounting.pricing import Price, PricesError, PriceTable, parse_prices

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
    assert table.cost_micros(model, MTOK, 0) == round(input_usd * 1_000_000)
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


def test_anthropic_multipliers_hold_for_every_builtin_claude_entry(table: PriceTable) -> None:
    claude = [p for p in table.entries if p.pattern.startswith("claude-")]
    assert claude
    for price in claude:
        assert price.cache_write_5m * 4 == price.input * 5, price.pattern
        assert price.cache_write_1h == 2 * price.input, price.pattern
        assert price.cache_read * 10 == price.input, price.pattern


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
