"""What the vendors' rate-limit headers say of a key's room before it runs
out: read from every answer (successes included), so that traffic can be
spread by the room each key has left before any of them answers 429.

Both vendors report their limits on every response:
- Anthropic: `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}`
  with RFC 3339 resets, and for subscription-style accounts
  `anthropic-ratelimit-unified-{claim}-{utilization,reset}` (a fraction used
  and a unix time) and `anthropic-ratelimit-unified-status`;
- OpenAI: `x-ratelimit-{limit,remaining}-{requests,tokens}` and
  `x-ratelimit-reset-{requests,tokens}` as durations ("6m0s", "120ms").

The limits are per model class (Anthropic's Opus, Sonnet and Haiku have
separate ones; OpenAI's are per model), so a reading belongs to the class of
the model the request named (`model_class`). Pure functions and one small
holder; the key ring decides what a reading does to the choice of key.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from hubcore.routing.failures import nonnegative_number, parse_duration, parse_rfc3339

__all__ = ["Headroom", "Reading", "model_class", "read"]

_ANTHROPIC = b"anthropic-ratelimit-"
_OPENAI = b"x-ratelimit-"
_ANTHROPIC_LIMITS = ("requests", "tokens", "input-tokens", "output-tokens")
_OPENAI_LIMITS = ("requests", "tokens")
_UNIFIED = "unified-"
_UTILIZATION = "-utilization"

# Anthropic's classes share one limit across the versions of a family.
_FAMILIES = ("opus", "sonnet", "haiku")
_DATED = re.compile(r"-\d{4}-?\d{2}-?\d{2}$")


def model_class(model: str | None) -> str:
    """The rate-limit class of a model id: "opus", "sonnet", "haiku" for
    Claude models, else the id without a date suffix ("gpt-5.1-2025-11-13" is
    "gpt-5.1"); "" when the request named none."""
    if not model:
        return ""
    lowered = model.lower()
    for family in _FAMILIES:
        if family in lowered:
            return family
    return _DATED.sub("", lowered)


@dataclass(frozen=True, slots=True)
class Reading:
    """One answer's word on a key's room: the tightest limit it reported."""

    fraction: float  # remaining / limit of that limit, 0.0 to 1.0
    until: float  # unix time that limit resets; the reading says nothing after it
    limit: str  # which: "requests", "tokens", "input-tokens", "output-tokens", "unified-5h", ...


def read(headers: Iterable[tuple[bytes, bytes]], wall_now: float) -> Reading | None:
    """The tightest limit an answer's headers report, or None when they
    report none (a relay that strips them, a probe of the models list)."""
    values: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name = raw_name.lower()
        if name.startswith(_ANTHROPIC):
            values[name[len(_ANTHROPIC):].decode("latin-1")] = raw_value.decode("latin-1").strip()
        elif name.startswith(_OPENAI):
            values["openai:" + name[len(_OPENAI):].decode("latin-1")] = raw_value.decode("latin-1").strip()
    if not values:
        return None
    tightest: Reading | None = None
    for reading in _readings(values, wall_now):
        if tightest is None or reading.fraction < tightest.fraction:
            tightest = reading
    return tightest


def _readings(values: dict[str, str], wall_now: float) -> Iterable[Reading]:
    for limit in _ANTHROPIC_LIMITS:
        fraction = _fraction(values.get(limit + "-remaining"), values.get(limit + "-limit"))
        reset = values.get(limit + "-reset")
        until = parse_rfc3339(reset) if reset is not None else None
        if fraction is not None and until is not None:
            yield Reading(fraction, until, limit)
    for name, used in values.items():
        if name.startswith(_UNIFIED) and name.endswith(_UTILIZATION):
            claim = name[len(_UNIFIED):-len(_UTILIZATION)]
            utilization = nonnegative_number(used)
            until = nonnegative_number(values.get(f"{_UNIFIED}{claim}-reset"))
            if utilization is not None and until is not None:
                yield Reading(max(0.0, 1.0 - min(utilization, 1.0)), until, _UNIFIED + claim)
    if values.get("unified-status") == "rejected":
        until = nonnegative_number(values.get("unified-reset"))
        if until is not None:
            yield Reading(0.0, until, "unified")
    for limit in _OPENAI_LIMITS:
        fraction = _fraction(values.get(f"openai:remaining-{limit}"), values.get(f"openai:limit-{limit}"))
        reset = values.get(f"openai:reset-{limit}")
        delay = parse_duration(reset) if reset is not None else None
        if fraction is not None and delay is not None:
            yield Reading(fraction, wall_now + delay, limit)


def _fraction(remaining: str | None, limit: str | None) -> float | None:
    left, whole = nonnegative_number(remaining), nonnegative_number(limit)
    if left is None or whole is None or whole <= 0:
        return None
    return min(left / whole, 1.0)


class Headroom:
    """A key's latest reading per model class. A class with no reading, or
    whose reading's limit has reset since, has all its room (1.0)."""

    __slots__ = ("_by_class",)

    def __init__(self) -> None:
        self._by_class: dict[str, Reading] = {}

    def update(self, model_class: str, reading: Reading) -> None:
        self._by_class[model_class] = reading

    def fraction(self, model_class: str, wall_now: float) -> float:
        reading = self._by_class.get(model_class)
        if reading is None:
            return 1.0
        if reading.until <= wall_now:
            del self._by_class[model_class]
            return 1.0
        return reading.fraction

    def snapshot(self, wall_now: float) -> dict[str, dict[str, float | str]]:
        """The readings still in force, per class, for stats."""
        return {
            cls: {"remaining": reading.fraction, "limit": reading.limit, "resets": reading.until}
            for cls, reading in self._by_class.items()
            if reading.until > wall_now
        }
