"""Model prices and request cost: the built-in prices.toml, the operator's
overrides, the most-specific-pattern lookup, cost in integer micro-dollars
(long-context prices and an upstream's cost multiplier included), and
(Pricing) what a model without a price costs under [pricing] unpriced.
"""
from __future__ import annotations

import fnmatch
import importlib.resources
import logging
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from hubcore.config import UNPRICED_RULES

log = logging.getLogger("hubcore.pricing")

PRICE_FIELDS = ("input", "cache_write_5m", "cache_write_1h", "cache_read", "output")
# Long-context prices: "<class>_above_<N>k" charges every token class of a
# request whose input exceeds N thousand tokens (see Price).
LONG_CONTEXT_FIELD = re.compile(r"(input|cache_write_5m|cache_write_1h|cache_read|output)_above_([1-9][0-9]*)k")
BUILTIN_SOURCE = "hubcore/accounting/prices.toml (built-in)"

MICROS_PER_USD = 1_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are per million tokens
_HALF_UNIT = TOKENS_PER_PRICE_UNIT // 2
# Model ids come from client request bodies, so the memo must not grow
# without bound; real deployments see a few dozen distinct ids.
LOOKUP_MEMO_MAX = 4096

_WILDCARDS = "*?["


class PricesError(ValueError):
    """A price file is malformed; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class Price:
    """One entry: micro-dollars per million tokens for each token class.

    Long context: when a request's input (uncached input + cache writes +
    cache reads) exceeds `long_context_above` tokens, every token class of
    that request is charged at its `*_long` price, as the vendors bill it
    (Anthropic above 200k, OpenAI's gpt-5.4 and later above 272k); a class
    whose long-context price is None keeps its base price.
    """

    pattern: str
    input: int
    cache_write_5m: int
    cache_write_1h: int
    cache_read: int
    output: int
    source: str = BUILTIN_SOURCE
    long_context_above: int | None = None  # tokens of input; None: no long-context prices
    input_long: int | None = None
    cache_write_5m_long: int | None = None
    cache_write_1h_long: int | None = None
    cache_read_long: int | None = None
    output_long: int | None = None

    def cost_micros(
        self, input_tokens: int, output_tokens: int,
        cache_write_5m: int = 0, cache_write_1h: int = 0, cache_read: int = 0,
        multiplier: float = 1.0,
    ) -> int:
        """Exact: the sum over token classes of tokens x micro-dollars per
        million tokens is an integer; it is scaled by `multiplier` (an
        upstream billing a fraction of the list price) and divided by a
        million once, on the total, rounding half up (so no class's rounding
        adds up, and half of a price is half of its exact total)."""
        above = self.long_context_above
        if above is not None and input_tokens + cache_write_5m + cache_write_1h + cache_read > above:
            total = self._long_context_total(input_tokens, output_tokens, cache_write_5m, cache_write_1h, cache_read)
        else:
            total = (
                input_tokens * self.input
                + cache_write_5m * self.cache_write_5m
                + cache_write_1h * self.cache_write_1h
                + cache_read * self.cache_read
                + output_tokens * self.output
            )
        if multiplier == 1:
            return (total + _HALF_UNIT) // TOKENS_PER_PRICE_UNIT
        return _scaled_micros(total, multiplier)

    def _long_context_total(
        self, input_tokens: int, output_tokens: int, cache_write_5m: int, cache_write_1h: int, cache_read: int,
    ) -> int:
        def long(price: int | None, base: int) -> int:
            return base if price is None else price

        return (
            input_tokens * long(self.input_long, self.input)
            + cache_write_5m * long(self.cache_write_5m_long, self.cache_write_5m)
            + cache_write_1h * long(self.cache_write_1h_long, self.cache_write_1h)
            + cache_read * long(self.cache_read_long, self.cache_read)
            + output_tokens * long(self.output_long, self.output)
        )


def _scaled_micros(total: int, multiplier: float) -> int:
    """`total` (micro-dollars x a million) times `multiplier`, in micro-dollars,
    rounded half up once. The multiplier is taken as the decimal it is
    written as (0.1 is 1/10, not the binary float nearest it)."""
    factor = Decimal(str(multiplier))
    if not factor.is_finite() or factor < 0:
        raise ValueError(f"cost multiplier must be a finite, non-negative number, got {multiplier!r}")
    numerator, denominator = factor.as_integer_ratio()
    unit = denominator * TOKENS_PER_PRICE_UNIT
    # floor(total x n / unit + 1/2), in integers.
    return (2 * total * numerator + unit) // (2 * unit)


def _specificity(pattern: str) -> tuple[int, int, int]:
    """(literal prefix length, 1 if no wildcard, literal character count)."""
    cut = min((i for i in (pattern.find(c) for c in _WILDCARDS) if i >= 0), default=-1)
    if cut < 0:
        return (len(pattern), 1, len(pattern))
    literal = sum(1 for c in pattern if c not in _WILDCARDS)
    return (cut, 0, literal)


class PriceTable:
    """Prices by model-id pattern; the most specific matching pattern wins.

    Specificity: the longest literal prefix (text before the first `*`, `?`
    or `[`), then a pattern with no wildcard at all, then the most literal
    characters, then the entry defined last. This makes file order
    irrelevant, so "gpt-5-mini" beats "gpt-5*" wherever either is written.
    """

    def __init__(self, entries: Iterable[Price]) -> None:
        by_pattern: dict[str, Price] = {}
        for entry in entries:
            # A later entry with the same pattern replaces the earlier one
            # but, being an override, keeps the later position in tie-breaks.
            by_pattern.pop(entry.pattern, None)
            by_pattern[entry.pattern] = entry
        self._entries = tuple(by_pattern.values())
        self._exact = {p.pattern: p for p in self._entries if _specificity(p.pattern)[1]}
        ranked = [
            (_specificity(p.pattern), order, p)
            for order, p in enumerate(self._entries)
            if not _specificity(p.pattern)[1]
        ]
        ranked.sort(key=lambda r: (r[0], r[1]), reverse=True)
        self._globs = tuple(p for _, _, p in ranked)
        self._memo: dict[str, Price | None] = {}

    @classmethod
    def load(cls, operator_file: Path | None = None) -> PriceTable:
        """The built-in prices, then the operator's file overriding and extending them."""
        builtin = importlib.resources.files("hubcore.accounting").joinpath("prices.toml").read_text("utf-8")
        entries = parse_prices(builtin, BUILTIN_SOURCE)
        if operator_file is not None:
            try:
                text = Path(operator_file).read_text("utf-8")
            except OSError as exc:
                raise PricesError(f"{operator_file}: cannot read price file: {exc}") from exc
            entries += parse_prices(text, str(operator_file))
        return cls(entries)

    @property
    def entries(self) -> tuple[Price, ...]:
        return self._entries

    def price_for(self, model: str | None) -> Price | None:
        if model is None:
            return None
        memo = self._memo
        try:
            return memo[model]
        except KeyError:
            pass
        price = self._exact.get(model)
        if price is None:
            for candidate in self._globs:
                if fnmatch.fnmatchcase(model, candidate.pattern):
                    price = candidate
                    break
        if len(memo) >= LOOKUP_MEMO_MAX:
            memo.clear()
        memo[model] = price
        return price

    def cost_micros(
        self,
        model: str | None,
        input_tokens: int,
        output_tokens: int,
        cache_write_5m: int = 0,
        cache_write_1h: int = 0,
        cache_read: int = 0,
    ) -> int | None:
        """Cost in micro-dollars (Price.cost_micros), or None when the model has no price."""
        price = self.price_for(model)
        if price is None:
            return None
        return price.cost_micros(input_tokens, output_tokens, cache_write_5m, cache_write_1h, cache_read)


# -- models without a price ---------------------------------------------------

ESTIMATE, FREE, REFUSE = UNPRICED_RULES

# A usage row's cost_basis when its model has no price (NULL: the model's own
# price, or no model to price).
BASIS_ESTIMATE = "estimate"  # charged at the vendor's most expensive model's price
BASIS_FREE = "free"          # charged 0, as [pricing] unpriced = "free" says
BASIS_REFUSED = "refused"    # refused before it was sent: no tokens, cost 0
BASIS_UNKNOWN = "unknown"    # no cost at all (NULL): nothing to estimate from, or a row from before

# Model ids come from client request bodies: past this many, models without a
# price are no longer logged one by one (a client cycling through made-up
# names must not flood the log, nor grow the set without bound).
UNPRICED_LOG_MAX = 256

# Whose model a price entry is, from its pattern's name: Anthropic's models are
# all "claude-*"; OpenAI's are "gpt-*", "chatgpt-*", "codex-*" and the
# o-series ("o1", "o3-mini", "o4-mini"). Any other pattern belongs to no
# vendor and is never an estimate's reference.
_VENDOR_PATTERNS = (
    ("anthropic", re.compile(r"claude")),
    ("openai", re.compile(r"gpt|chatgpt|codex|o[0-9]")),
)


def vendor_of(pattern: str) -> str | None:
    """The vendor whose model a price pattern names, or None."""
    for vendor, prefix in _VENDOR_PATTERNS:
        if prefix.match(pattern):
            return vendor
    return None


def _cost_rank(price: Price) -> tuple[int, ...]:
    # Output tokens are the dearest class of every model, so they decide;
    # then input, then the cache classes. Equal sheets: any is the same price.
    return (price.output, price.input, price.cache_write_1h, price.cache_write_5m, price.cache_read)


def reference_price(table: PriceTable, vendor: str | None) -> Price | None:
    """The vendor's most expensive model in `table`: the highest output price
    per token, then the highest input price, then the cache classes; among
    equal sheets the pattern first in sorting order. None: no such model."""
    candidates = [p for p in table.entries if vendor is not None and vendor_of(p.pattern) == vendor]
    if not candidates:
        return None
    top = max(_cost_rank(p) for p in candidates)
    return min((p for p in candidates if _cost_rank(p) == top), key=lambda p: p.pattern)


class Pricing:
    """The price table and the rule for the models it lacks ([pricing] unpriced).

    A model without a price is never silent: its row says how its cost was
    set (cost_basis), the first request for it logs a warning naming the
    model, the vendor and the rule, and the recorder counts it per model.

    - "estimate": the whole price sheet (cache classes included) of the
      vendor's most expensive model (`reference_price`), so a budget is
      charged no less than any known model would cost;
    - "free": 0;
    - "refuse": the gateway refuses the request before it is sent
      (`refuses`). A row whose model still has no price (the vendor's answer
      named a model the request did not) is estimated.
    """

    def __init__(self, table: PriceTable, unpriced: str = ESTIMATE, *, previous: Pricing | None = None) -> None:
        if unpriced not in UNPRICED_RULES:
            raise ValueError(f"unpriced: must be one of {', '.join(UNPRICED_RULES)}, got {unpriced!r}")
        self.table = table
        self.unpriced = unpriced
        self._references = {vendor: reference_price(table, vendor) for vendor, _ in _VENDOR_PATTERNS}
        # (model, basis) pairs already logged. Shared with the Pricing this one
        # replaces at a reload: once per model and process, and again only
        # when a new rule treats the model differently.
        self._warned: set[tuple[str, str]] = previous._warned if previous is not None else set()

    @classmethod
    def load(cls, operator_file: Path | None = None, unpriced: str = ESTIMATE, *,
             previous: Pricing | None = None) -> Pricing:
        """PriceTable.load(operator_file) under the rule `unpriced`."""
        return cls(PriceTable.load(operator_file), unpriced, previous=previous)

    def refuses(self, vendor: str | None, model: str | None) -> bool:
        """Whether a request to `vendor` for `model` is to be refused before it is sent."""
        if self.unpriced != REFUSE or model is None or self.table.price_for(model) is not None:
            return False
        self._warn(model, vendor, BASIS_REFUSED, None)
        return True

    def cost(
        self, vendor: str | None, model: str | None, input_tokens: int, output_tokens: int,
        cache_write_5m: int = 0, cache_write_1h: int = 0, cache_read: int = 0, *, forwarded: bool = True,
        multiplier: float = 1.0,
    ) -> tuple[int | None, str | None]:
        """(cost in micro-dollars, cost_basis) of a request to `vendor` (the
        upstream kind) for `model`; `forwarded`: whether it was sent at all.
        The basis is None for a model with a price (and for no model, whose
        cost is None). `multiplier` scales the cost of an upstream that bills
        a fraction (or a multiple) of the list price: the tokens are priced
        by the client's model id, then scaled exactly (Price.cost_micros);
        an estimate is scaled the same way. ValueError: a negative one."""
        if multiplier != 1 and not 0 <= multiplier < math.inf:
            raise ValueError(f"cost multiplier must be a finite, non-negative number, got {multiplier!r}")
        price = self.table.price_for(model)
        if price is not None:
            return price.cost_micros(
                input_tokens, output_tokens, cache_write_5m, cache_write_1h, cache_read, multiplier,
            ), None
        if model is None:
            return None, None
        reference = None
        if self.unpriced == FREE:
            cost, basis = 0, BASIS_FREE
        elif self.unpriced == REFUSE and not forwarded:
            cost, basis = 0, BASIS_REFUSED
        else:
            reference = self._references.get(vendor) if vendor is not None else None
            if reference is None:
                cost, basis = None, BASIS_UNKNOWN
            else:
                cost = reference.cost_micros(
                    input_tokens, output_tokens, cache_write_5m, cache_write_1h, cache_read, multiplier,
                )
                basis = BASIS_ESTIMATE
        self._warn(model, vendor, basis, reference)
        return cost, basis

    def _warn(self, model: str, vendor: str | None, basis: str, reference: Price | None) -> None:
        warned = self._warned
        if (model, basis) in warned or len(warned) > UNPRICED_LOG_MAX:
            return
        warned.add((model, basis))
        if len(warned) > UNPRICED_LOG_MAX:
            log.warning(
                "more than %d models without a price; no longer logged one by one "
                "(see hubcore_unpriced_requests_total and the cost_basis of usage rows)", UNPRICED_LOG_MAX,
            )
            return
        rule = f'[pricing] unpriced = "{self.unpriced}"'
        whose = f"{model!r} ({vendor or 'unknown vendor'})"
        if basis == BASIS_REFUSED:
            log.warning("model %s has no price: its requests are refused before they are sent, as %s says",
                        whose, rule)
        elif basis == BASIS_FREE:
            log.warning("model %s has no price: its requests cost 0, as %s says; rows are marked cost_basis=free",
                        whose, rule)
        elif reference is not None:
            log.warning(
                "model %s has no price: its requests are charged at the prices of %s, the vendor's most "
                "expensive model, as %s says; rows are marked cost_basis=estimate", whose, reference.pattern, rule,
            )
        else:
            log.warning("model %s has no price and no model of its vendor has one to estimate from (%s): "
                        "its cost is unknown and charged to no budget", whose, rule)


def parse_prices(text: str, source: str) -> list[Price]:
    """Parse a price file (the prices.toml format); errors name `source` and the field."""
    try:
        # Decimal, not float: 0.125 or 6.25 dollars become micro-dollars exactly.
        document = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as exc:
        raise PricesError(f"{source}: invalid TOML: {exc}") from exc
    unknown = sorted(set(document) - {"prices"})
    if unknown:
        raise PricesError(f"{source}: unknown top-level key {unknown[0]!r} (expected [prices])")
    table = document.get("prices", {})
    if not isinstance(table, Mapping):
        raise PricesError(f"{source}: 'prices' must be a table of model patterns")
    entries = []
    for pattern, fields in table.items():
        where = f"{source}: prices.{_quote(pattern)}"
        if not pattern:
            raise PricesError(f"{where}: the model pattern must not be empty")
        if not isinstance(fields, Mapping):
            raise PricesError(f"{where}: expected a table with {', '.join(PRICE_FIELDS)}")
        micros: dict[str, Any] = {}
        for name in PRICE_FIELDS:
            if name not in fields:
                raise PricesError(f"{where}.{name}: missing (USD per million tokens)")
            micros[name] = _to_micros(fields[name], f"{where}.{name}")
        above = None
        for name in fields:
            if name in PRICE_FIELDS:
                continue
            match = LONG_CONTEXT_FIELD.fullmatch(name)
            if match is None:
                raise PricesError(
                    f"{where}.{name}: unknown field (expected {', '.join(PRICE_FIELDS)}, "
                    "or one of them + _above_<N>k for input above N thousand tokens)"
                )
            token_class, thousands = match.group(1), int(match.group(2))
            if above is not None and above != thousands * 1000:
                raise PricesError(
                    f"{where}.{name}: one long-context threshold per entry "
                    f"(this entry also has prices above {above // 1000}k)"
                )
            above = thousands * 1000
            micros[token_class + "_long"] = _to_micros(fields[name], f"{where}.{name}")
        entries.append(Price(pattern=pattern, source=source, long_context_above=above, **micros))
    return entries


def _to_micros(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
        raise PricesError(f"{where}: expected a number of USD per million tokens, got {value!r}")
    amount = Decimal(value)
    if not amount.is_finite() or amount < 0:
        raise PricesError(f"{where}: must be a finite, non-negative number, got {value}")
    micros = amount * MICROS_PER_USD
    if micros != micros.to_integral_value():
        raise PricesError(f"{where}: {value} is finer than a micro-dollar per million tokens")
    return int(micros)


def _quote(pattern: str) -> str:
    return pattern if pattern.replace("-", "").replace("_", "").isalnum() else f'"{pattern}"'
