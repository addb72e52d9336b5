"""What an operator writes for a limit, read into values, and an edit of a
scope's limits: which limits to set, which to clear, the rest kept.

The CLI's flags (`--rpm 60`, `--budget day=5`, `--groups none`) and the
dashboard's form fields and API values go through these same functions, so a
value means the same wherever it is typed, and is refused with the same words.
Each parser raises ValueError saying what it expected; callers add the name of
their flag or field.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from hubcore.governance.limits import MICROS_PER_USD, WARN_AT_MAX, WINDOWS, Limits, check_group_name


class Clear:
    """The value of a limit given as `none`: remove that limit."""

    def __repr__(self) -> str:
        return "CLEAR"


CLEAR = Clear()
# The words that clear a limit. `--groups` takes only "none": every other
# word may be a group's name.
NONE_WORDS = frozenset({"none", "off", "unlimited"})


def clears(text: str) -> bool:
    """Whether `text` is one of the words that clear a limit."""
    return text.strip().lower() in NONE_WORDS


# -- values ------------------------------------------------------------------------


def parse_positive(text: str) -> int | Clear:
    """rpm and concurrency: a positive integer, or a word that clears it."""
    if clears(text):
        return CLEAR
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected a positive integer or 'none', not {text!r}") from None
    if value < 1:
        raise ValueError(
            f"expected a positive integer or 'none', not {text!r} "
            "(to block a token, revoke it or set a total budget of 0)"
        )
    return value


def parse_usd(text: str) -> int:
    """'5', '$0.01', '1,000.50' -> micro-dollars (rounded to the micro-dollar)."""
    cleaned = text.strip().removeprefix("$").replace(",", "").replace("_", "")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        raise ValueError(f"not an amount in USD: {text!r}") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"a budget must be a non-negative amount in USD, not {text!r}")
    return int((value * MICROS_PER_USD).to_integral_value(ROUND_HALF_UP))


def parse_amount(text: str) -> int | Clear:
    """A budget's amount in USD, or a word that clears the budget."""
    return CLEAR if clears(text) else parse_usd(text)


def parse_budget(text: str) -> tuple[str, int | Clear]:
    """`WINDOW=USD` (`day=5`, `5h=none`) -> (window, micro-dollars or CLEAR)."""
    window, sep, amount = text.partition("=")
    window = window.strip().lower()
    if not sep or window not in WINDOWS:
        raise ValueError(f"expected WINDOW=USD with WINDOW one of {', '.join(WINDOWS)}, not {text!r}")
    return window, parse_amount(amount)


def parse_window(text: str) -> str:
    """A budget window's name: 5h, day, week, month or total."""
    window = text.strip().lower()
    if window not in WINDOWS:
        raise ValueError(f"expected a budget window, one of {', '.join(WINDOWS)}, not {text!r}")
    return window


def parse_models(text: str) -> tuple[str, ...] | Clear:
    """`claude-sonnet-*,claude-haiku-*` -> the patterns; a word that clears them."""
    if clears(text):
        return CLEAR
    patterns = tuple(p.strip() for p in text.split(",") if p.strip())
    if not patterns:
        raise ValueError("expected PATTERN[,PATTERN...] or 'none'")
    return patterns


def parse_expires(text: str, tz: tzinfo = timezone.utc) -> float:
    """ISO 8601 time or date -> unix seconds; without an offset it is in `tz`
    (the CLI's UTC, the dashboard's reporting zone)."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not an ISO 8601 time: {text!r} (e.g. 2026-07-01 or 2026-07-01T18:00:00+02:00)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz)
    return moment.timestamp()


def parse_expiry(text: str, tz: tzinfo = timezone.utc) -> float | Clear:
    """An expiry (parse_expires), or a word that clears it."""
    return CLEAR if clears(text) else parse_expires(text, tz)


def parse_groups(text: str) -> tuple[str, ...] | Clear:
    """`cheap,fast` -> ("cheap", "fast"); `none` alone -> CLEAR. Only `none`
    clears: every other word is a possible group name. The messages read
    after the flag's or field's name ("--groups names cheap twice")."""
    if text.strip().lower() == "none":
        return CLEAR
    if not text.strip():
        raise ValueError("needs at least one group name, or 'none' to lift the restriction")
    names = tuple(name.strip() for name in text.split(","))
    if "" in names:
        raise ValueError(f"has an empty name in {text!r}")
    for name in names:
        if name.lower() == "none":
            raise ValueError("'none' lifts the restriction and cannot be one of several groups")
        check_group_name(name)
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ValueError(f"names {name} twice")
    return names


def parse_warn_at(text: str) -> tuple[int, ...] | Clear:
    """`80,50,100` -> (50, 80, 100) (whole percentages, sorted, each once;
    '%' allowed); a word that clears them (back to the default: 80,100 for a
    soft budget, none for a hard one)."""
    if clears(text):
        return CLEAR
    percents = set()
    for word in text.split(","):
        word = word.strip().removesuffix("%").strip()
        try:
            value = int(word)
        except ValueError:
            raise ValueError(
                f"expected PERCENT[,PERCENT...] such as 50,80,100, or 'none', not {text!r}"
            ) from None
        if not 1 <= value <= WARN_AT_MAX:
            raise ValueError(f"a threshold is a whole percentage from 1 to {WARN_AT_MAX}, not {value}")
        percents.add(value)
    return tuple(sorted(percents))


class BudgetlessEdit(ValueError):
    """Softness or thresholds given for a scope that has no budget to bear them."""


# -- the edit ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LimitEdits:
    """A change to one scope's limits. None: keep that limit; CLEAR: remove
    it; anything else: the new value. `budgets`: (window, micro-dollars or
    CLEAR) of each budget changed."""

    rpm: int | Clear | None = None
    concurrency: int | Clear | None = None
    budgets: tuple[tuple[str, int | Clear], ...] = ()
    models: tuple[str, ...] | Clear | None = None
    expires_at: float | Clear | None = None
    groups: tuple[str, ...] | Clear | None = None
    # Of the budgets named in `budgets` (else of every budget the scope
    # has): True makes them soft, False hard; thresholds in percent, or CLEAR.
    soft: bool | None = None
    warn_at: tuple[int, ...] | Clear | None = None

    @property
    def empty(self) -> bool:
        """Whether this changes nothing."""
        return self == LimitEdits()

    def apply(self, current: Limits | None) -> Limits | None:
        """`current` with these edits; None when nothing is left. Unreadable
        limits are replaced, not edited: what they held is unknown. ValueError
        from Limits for a value it refuses."""
        base = current if current is not None and current.error is None else Limits()
        changes: dict[str, Any] = {}
        for name in ("rpm", "concurrency", "expires_at"):
            value = getattr(self, name)
            if value is CLEAR:
                changes[name] = None
            elif value is not None:
                changes[name] = value
        for name in ("models", "groups"):
            value = getattr(self, name)
            if value is CLEAR:
                changes[name] = ()
            elif value is not None:
                changes[name] = value
        named = []
        for window, amount in self.budgets:
            changes["budget_" + window] = None if amount is CLEAR else amount
            if amount is not CLEAR:
                named.append(window)
        # A budget cleared loses its softness and thresholds with it.
        budgeted = [w for w in WINDOWS if changes.get("budget_" + w, base.budget(w)) is not None]
        soft = {w for w in base.soft if w in budgeted}
        warn_at = {w: p for w, p in base.warn_at if w in budgeted}
        if self.soft is not None or self.warn_at is not None:
            targets = named or budgeted
            if not targets:
                raise BudgetlessEdit("softness and thresholds apply to budgets, and this scope has none")
            for window in targets:
                if self.soft is True:
                    soft.add(window)
                elif self.soft is False:
                    soft.discard(window)
                if isinstance(self.warn_at, Clear):
                    warn_at.pop(window, None)
                elif self.warn_at is not None:
                    warn_at[window] = self.warn_at
        changes["soft"] = tuple(w for w in WINDOWS if w in soft)
        changes["warn_at"] = tuple((w, warn_at[w]) for w in WINDOWS if w in warn_at)
        result = dataclasses.replace(base, **changes)
        return None if result.empty else result
