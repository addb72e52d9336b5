"""The compiled usage row's cost (`_exchange.usage_event`), which prices the
common case (a model with its own price, at the list price, below any
long-context threshold, counts within 64 bits) in C and leaves the rest to
Pricing.cost: the same cost and basis as the pure twin, which asks
Pricing.cost every time, for any model, counts and multiplier."""
from __future__ import annotations

from types import ModuleType, SimpleNamespace
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from hubcore.accounting.pricing import Price, Pricing, PriceTable
from hubcore.accounting.usage import Outcome
from hubcore.gateway import _exchange_py
from hubcore.governance.tokens import Principal
from tests.http.twins import twin_of

ALICE = Principal(token_id=7, user="alice", project=None, prefix="hc_x")
BUILT_IN = Pricing.load()
# An exact id, one priced by a glob, one with long-context prices, ids with
# no price (estimated from the vendor's dearest model), and no model.
MODELS = ["claude-opus-4-6", "claude-opus-4-6-20260101", "claude-sonnet-4-5-20250929", "claude-sonnet-4-0",
          "gpt-5.4", "no-such-model", None]
LONG_CONTEXT = next(e for e in BUILT_IN.table.entries if e.pattern == "claude-sonnet-4-0")
assert LONG_CONTEXT.long_context_above is not None
counts = st.one_of(st.integers(0, 10**7), st.integers(0, 2**70), st.sampled_from([0, 2**60 - 1, 2**60, 2**63]))


def compiled() -> ModuleType:
    return twin_of("c", "hubcore.gateway._exchange", _exchange_py)


def row(twin: Any, prices: Any, model: str | None, tokens: tuple[int, ...], multiplier: float = 1.0,
        attempts: int = 1) -> tuple[int | None, str | None]:
    meter = SimpleNamespace(
        model=None, input_tokens=tokens[0], output_tokens=tokens[1], cache_write_5m=tokens[2],
        cache_write_1h=tokens[3], cache_read=tokens[4], reasoning_tokens=0, server_tool_requests=0,
        stop_reason="end_turn", output_estimated=False, error_type=None, completed=True,
    )
    event = twin.usage_event(
        1700000000.0, "hc_1", "/v1/messages", 200, Outcome.OK, 40.0, ALICE, "anthropic", "k-1", model,
        None, 12.5, attempts, None, None, True, meter, "anthropic", prices, None, None, multiplier,
    )
    return event.cost_micros, event.cost_basis


@settings(max_examples=400, deadline=None)
@given(model=st.sampled_from(MODELS), tokens=st.tuples(counts, counts, counts, counts, counts),
       multiplier=st.sampled_from([1.0, 0.5, 0.1, 2.0, 0.0]), attempts=st.sampled_from([0, 1]))
# Just below, at and just above the long-context threshold; sums of five
# products past 64 bits.
@example(model="claude-sonnet-4-0", tokens=(LONG_CONTEXT.long_context_above, 1, 0, 0, 0), multiplier=1.0, attempts=1)
@example(model="claude-sonnet-4-0", tokens=(LONG_CONTEXT.long_context_above - 3, 1, 1, 1, 1), multiplier=1.0,
         attempts=1)
@example(model="claude-sonnet-4-0", tokens=(LONG_CONTEXT.long_context_above - 2, 1, 1, 1, 1), multiplier=1.0,
         attempts=1)
@example(model="claude-opus-4-6", tokens=(2**60 - 1,) * 5, multiplier=1.0, attempts=1)
@example(model="claude-opus-4-6", tokens=(499_999, 0, 0, 0, 0), multiplier=1.0, attempts=1)
def test_the_compiled_cost_is_pricing_cost(model: str | None, tokens: tuple[int, ...], multiplier: float,
                                           attempts: int) -> None:
    assert row(compiled(), BUILT_IN, model, tokens, multiplier, attempts) == \
        row(_exchange_py, BUILT_IN, model, tokens, multiplier, attempts)


def test_prices_that_change_are_read_from_the_new_pricing() -> None:
    """A reload makes a new Pricing: the prices kept for the old one are not used for it."""
    c = compiled()
    tokens = (1_000_000, 1_000_000, 0, 0, 0)
    before = Pricing(PriceTable([Price("team-model", 1_000_000, 0, 0, 0, 2_000_000)]))
    after = Pricing(PriceTable([Price("team-model", 3_000_000, 0, 0, 0, 5_000_000)]))
    assert row(c, before, "team-model", tokens) == (3_000_000, None)
    assert row(c, after, "team-model", tokens) == (8_000_000, None)
    assert row(c, before, "team-model", tokens) == (3_000_000, None)


def test_a_pricer_that_is_not_pricing_is_asked() -> None:
    """Another pricer (a test's, a plugin's) answers for itself."""
    class Asked:
        def cost(self, *args: object, forwarded: bool, multiplier: float = 1.0) -> tuple[int, str]:
            return 42, "free"

    assert row(compiled(), Asked(), "claude-opus-4-6", (1, 2, 3, 4, 5)) == (42, "free")


def test_half_a_micro_dollar_rounds_up_as_in_pricing() -> None:
    table = Pricing(PriceTable([Price("m", 1, 0, 0, 0, 0)]))
    for tokens in (0, 1, 499_999, 500_000, 500_001, 1_499_999, 1_500_000):
        assert row(compiled(), table, "m", (tokens, 0, 0, 0, 0)) == row(_exchange_py, table, "m", (tokens, 0, 0, 0, 0))
    assert row(compiled(), table, "m", (500_000, 0, 0, 0, 0)) == (1, None)
