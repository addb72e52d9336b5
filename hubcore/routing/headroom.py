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

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from hubcore.routing.failures import nonnegative_number, parse_duration, parse_rfc3339

__all__ = ["MAX_CLASSES", "Headroom", "Reading", "model_class", "read", "read_index"]

_ANTHROPIC = "anthropic-ratelimit-"
_OPENAI = "x-ratelimit-"
# Each limit's name, the full names of its remaining, limit and reset
# headers, and whether its reset is a duration (OpenAI) or a time (RFC 3339).
_Limit = tuple[str, bytes, bytes, bytes, bool]


def _limit(limit: str, remaining: str, whole: str, reset: str, relative: bool) -> _Limit:
    return (limit, remaining.encode(), whole.encode(), reset.encode(), relative)


_LIMITS: tuple[_Limit, ...] = tuple(
    _limit(name, f"{_ANTHROPIC}{name}-remaining", f"{_ANTHROPIC}{name}-limit", f"{_ANTHROPIC}{name}-reset", False)
    for name in ("requests", "tokens", "input-tokens", "output-tokens")
) + tuple(
    _limit(name, f"{_OPENAI}remaining-{name}", f"{_OPENAI}limit-{name}", f"{_OPENAI}reset-{name}", True)
    for name in ("requests", "tokens")
)
_INF = math.inf
_UNIFIED = f"{_ANTHROPIC}unified-".encode()
_UTILIZATION = b"-utilization"
# Sent with every unified claim: the sign to look for the claims.
_UNIFIED_STATUS = _UNIFIED + b"status"
_UNIFIED_RESET = _UNIFIED + b"reset"

# Anthropic's classes share one limit across the versions of a family.
_FAMILIES = ("opus", "sonnet", "haiku")
_DATED = re.compile(r"-\d{4}-?\d{2}-?\d{2}$")


def model_class(model: str | None) -> str:
    """The rate-limit class of a model id: "opus", "sonnet", "haiku" for
    Claude models, else the id without a date suffix ("gpt-5.1-2025-11-13" is
    "gpt-5.1"); "" when the request named none. Memoised: every request asks."""
    if not model:
        return ""
    found = _classes.get(model)
    if found is None:
        if len(_classes) >= _CLASSES_MEMO_MAX:
            _classes.clear()
        found = _classes[model] = _class_of(model)
    return found


# Model ids come from request bodies: the memo is bounded.
_CLASSES_MEMO_MAX = 4096
_classes: dict[str, str] = {}


def _class_of(model: str) -> str:
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
    index: dict[bytes, bytes] = {}
    for name, value in headers:
        index.setdefault(name.lower(), value)
    return read_index(index, wall_now)


def read_index(index: Mapping[bytes, bytes], wall_now: float) -> Reading | None:
    """read() of headers indexed by lower-case name, first value each
    (hubcore.http.client.ResponseHead.index).

    The key ring reads every answer's head, so this looks up the few names
    it knows instead of going through the head, keeps values as bytes, and
    parses each reset value once (Anthropic's are to the second, the same
    for every answer within it); see KeyRing.observe for what it costs."""
    # The tightest so far: fraction, reset (unix time), which limit. The
    # first of equal fractions wins, in the order Anthropic's limits,
    # OpenAI's, unified claims, unified rejection.
    best: tuple[float, float, str] | None = None
    for limit, remaining, whole, reset, relative in _LIMITS:
        left = index.get(remaining)
        if left is None:
            continue
        total = index.get(whole)
        if total is None:
            continue
        # _fraction, inline: six of these per answer.
        try:
            left_n, total_n = float(left), float(total)
        except ValueError:
            continue
        if not (0.0 <= left_n < _INF and 0.0 < total_n < _INF):  # NaN fails both
            continue
        fraction = left_n / total_n if left_n < total_n else 1.0
        if best is not None and fraction >= best[0]:
            continue
        if relative:
            delay = _duration(index.get(reset))
            until = None if delay is None else wall_now + delay
        else:
            until = _reset_time(index.get(reset))
        if until is not None:
            best = (fraction, until, limit)
    status = index.get(_UNIFIED_STATUS)
    if status is not None:
        for name, used in index.items():
            if name.startswith(_UNIFIED) and name.endswith(_UTILIZATION):
                claim = name[len(_UNIFIED):-len(_UTILIZATION)]
                utilization = nonnegative_number(used)
                until = nonnegative_number(index.get(_UNIFIED + claim + b"-reset"))
                if utilization is None or until is None:
                    continue
                fraction = max(0.0, 1.0 - min(utilization, 1.0))
                if best is None or fraction < best[0]:
                    best = (fraction, until, "unified-" + claim.decode("latin-1"))
        if status.strip().lower() == b"rejected":
            until = nonnegative_number(index.get(_UNIFIED_RESET))
            if until is not None and (best is None or best[0] > 0.0):
                best = (0.0, until, "unified")
    return None if best is None else Reading(*best)


# Reset values seen lately and what they parsed to (None: not a time). A
# few distinct values a second come by; the table is emptied when full
# rather than kept in order, since a value is stale a second later anyway.
_PARSED_MAX = 64
_reset_times: dict[bytes, float | None] = {}
_durations: dict[bytes, float | None] = {}


def _reset_time(value: bytes | None) -> float | None:
    """Unix time of an RFC 3339 reset value."""
    if value is None:
        return None
    try:
        return _reset_times[value]
    except KeyError:
        if len(_reset_times) >= _PARSED_MAX:
            _reset_times.clear()
        parsed = _reset_times[value] = parse_rfc3339(value.decode("latin-1"))
        return parsed


def _duration(value: bytes | None) -> float | None:
    """Seconds of an OpenAI reset value ("6m0s")."""
    if value is None:
        return None
    try:
        return _durations[value]
    except KeyError:
        if len(_durations) >= _PARSED_MAX:
            _durations.clear()
        parsed = _durations[value] = parse_duration(value.decode("latin-1").strip())
        return parsed


# Classes a key keeps readings for. Anthropic has three, OpenAI a class per
# model (a few dozen); the class comes from the model a client named, so a
# client naming models at random must not grow a key's readings without end.
MAX_CLASSES = 32


class Headroom:
    """A key's latest reading per model class. A class with no reading, or
    whose reading's limit has reset since, has all its room (1.0)."""

    __slots__ = ("by_class",)

    def __init__(self) -> None:
        # Public for the key ring's per-request checks, which read it with
        # one dict lookup rather than a method call.
        self.by_class: dict[str, Reading] = {}

    def update(self, model_class: str, reading: Reading) -> None:
        by_class = self.by_class
        if model_class not in by_class and len(by_class) >= MAX_CLASSES:
            # Full: the reading that resets first goes (the first to be stale).
            del by_class[min(by_class, key=lambda cls: by_class[cls].until)]
        by_class[model_class] = reading

    def forget_exhausted(self) -> None:
        """Drop the readings of no room left (what a 429's head says), for
        an operator's word that the key serves again."""
        by_class = self.by_class
        for model_class in [cls for cls, reading in by_class.items() if reading.fraction <= 0.0]:
            del by_class[model_class]

    def latest(self, model_class: str) -> Reading | None:
        """The class's latest reading, even one whose limit has reset since."""
        return self.by_class.get(model_class)

    def fraction(self, model_class: str, wall_now: float) -> float:
        reading = self.by_class.get(model_class)
        if reading is None:
            return 1.0
        if reading.until <= wall_now:
            del self.by_class[model_class]
            return 1.0
        return reading.fraction

    def snapshot(self, wall_now: float) -> dict[str, dict[str, float | str]]:
        """The readings still in force, per class, for stats."""
        return {
            cls: {"remaining": reading.fraction, "limit": reading.limit, "resets": reading.until}
            for cls, reading in self.by_class.items()
            if reading.until > wall_now
        }
