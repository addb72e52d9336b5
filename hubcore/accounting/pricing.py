"""Model prices and request cost: the built-in prices.toml, the operator's
overrides, the most-specific-pattern lookup, and cost in integer micro-dollars.
"""
from __future__ import annotations

import fnmatch
import importlib.resources
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

PRICE_FIELDS = ("input", "cache_write_5m", "cache_write_1h", "cache_read", "output")
BUILTIN_SOURCE = "hubcore/accounting/prices.toml (built-in)"

MICROS_PER_USD = 1_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are per million tokens
# Model ids come from client request bodies, so the memo must not grow
# without bound; real deployments see a few dozen distinct ids.
LOOKUP_MEMO_MAX = 4096

_WILDCARDS = "*?["


class PricesError(ValueError):
    """A price file is malformed; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class Price:
    """One entry: micro-dollars per million tokens for each token class."""

    pattern: str
    input: int
    cache_write_5m: int
    cache_write_1h: int
    cache_read: int
    output: int
    source: str = BUILTIN_SOURCE


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
        """Cost in micro-dollars, or None when the model has no price.

        Exact: the sum over token classes of tokens x micro-dollars per
        million tokens is an integer; it is divided by a million once, on
        the total, rounding half up (so no class's rounding adds up).
        """
        price = self.price_for(model)
        if price is None:
            return None
        total = (
            input_tokens * price.input
            + cache_write_5m * price.cache_write_5m
            + cache_write_1h * price.cache_write_1h
            + cache_read * price.cache_read
            + output_tokens * price.output
        )
        return (total + TOKENS_PER_PRICE_UNIT // 2) // TOKENS_PER_PRICE_UNIT


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
        extra = sorted(set(fields) - set(PRICE_FIELDS))
        if extra:
            raise PricesError(
                f"{where}.{extra[0]}: unknown field (expected {', '.join(PRICE_FIELDS)})"
            )
        micros = {}
        for name in PRICE_FIELDS:
            if name not in fields:
                raise PricesError(f"{where}.{name}: missing (USD per million tokens)")
            micros[name] = _to_micros(fields[name], f"{where}.{name}")
        entries.append(Price(pattern=pattern, source=source, **micros))
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
