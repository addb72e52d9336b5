"""The limit flags of `token create|update` and `user|project set`, and how
they change a scope's limits.

Flags change only what they name; the value `none` clears a limit:
`--rpm none`, `--concurrency none`, `--budget day=none`, `--models none`,
`--expires none`, `--groups none`. A budget of 0 (`--budget day=0`) refuses
every request. Errors in their values surface as argparse usage errors,
before any write; those of `--groups` as a one-line CommandError (status 2)
from apply_limit_flags, which runs before any write too.

`--soft` / `--hard` and `--warn-at` apply to the budgets the same command
sets with `--budget`, or, without one, to every budget the scope has:
`--budget month=500 --soft`, `--warn-at 50,80,100`, `--warn-at none` (back
to the default: 80,100 for a soft budget, none for a hard one). A budget
cleared with `--budget W=none` loses its softness and thresholds with it.
"""
from __future__ import annotations

import argparse
import dataclasses
from datetime import datetime, timezone
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from hubcore.cli.common import USAGE, CommandError
from hubcore.governance.limits import MICROS_PER_USD, WARN_AT_MAX, WINDOWS, Limits, check_group_name


class _Clear:
    """The value of a flag given as `none`: remove that limit."""

    def __repr__(self) -> str:
        return "CLEAR"


CLEAR = _Clear()
_NONE_WORDS = frozenset({"none", "off", "unlimited"})


# -- argument types ------------------------------------------------------------------

def _positive_or_none(text: str) -> int | _Clear:
    if text.strip().lower() in _NONE_WORDS:
        return CLEAR
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'none', not {text!r} "
            "(to block a token, revoke it or set --budget total=0)"
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


def _budget(text: str) -> tuple[str, int | _Clear]:
    window, sep, amount = text.partition("=")
    window = window.strip().lower()
    if not sep or window not in WINDOWS:
        raise argparse.ArgumentTypeError(
            f"expected WINDOW=USD with WINDOW one of {', '.join(WINDOWS)}, not {text!r}"
        )
    if amount.strip().lower() in _NONE_WORDS:
        return window, CLEAR
    try:
        return window, parse_usd(amount)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _models(text: str) -> tuple[str, ...] | _Clear:
    if text.strip().lower() in _NONE_WORDS:
        return CLEAR
    patterns = tuple(p.strip() for p in text.split(",") if p.strip())
    if not patterns:
        raise argparse.ArgumentTypeError("expected PATTERN[,PATTERN...] or 'none'")
    return patterns


def parse_warn_at(text: str) -> tuple[int, ...] | _Clear:
    """`--warn-at 80,50,100` -> (50, 80, 100) (whole percentages, sorted,
    each once; '%' allowed); `none` -> CLEAR."""
    if text.strip().lower() in _NONE_WORDS:
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


def _warn_at(text: str) -> tuple[int, ...] | _Clear:
    try:
        return parse_warn_at(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_expires(text: str) -> float:
    """ISO 8601 time or date -> unix seconds; without an offset it is UTC."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not an ISO 8601 time: {text!r} (e.g. 2026-07-01 or 2026-07-01T18:00:00+02:00)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _expires(text: str) -> float | _Clear:
    if text.strip().lower() in _NONE_WORDS:
        return CLEAR
    try:
        return parse_expires(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_groups(text: str) -> tuple[str, ...] | _Clear:
    """`--groups cheap,fast` -> ("cheap", "fast"); `none` alone -> CLEAR.
    ValueError names what is wrong. Only `none` clears: every other word is a
    possible group name."""
    if text.strip().lower() == "none":
        return CLEAR
    if not text.strip():
        raise ValueError("--groups needs at least one group name, or 'none' to lift the restriction")
    names = tuple(name.strip() for name in text.split(","))
    if "" in names:
        raise ValueError(f"--groups has an empty name in {text!r}")
    for name in names:
        if name.lower() == "none":
            raise ValueError("'none' lifts the restriction and cannot be one of several groups")
        check_group_name(name)
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ValueError(f"--groups names {name} twice")
    return names


# -- the flags -----------------------------------------------------------------------

def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """The limit flags shared by `token create|update`, `user set`, `project set`."""
    group = parser.add_argument_group("limits (give 'none' to clear one)")
    group.add_argument("--rpm", type=_positive_or_none, metavar="N", help="requests per minute (sliding 60 s)")
    group.add_argument("--concurrency", type=_positive_or_none, metavar="N", help="requests in flight at once")
    group.add_argument(
        "--budget", type=_budget, action="append", metavar="WINDOW=USD",
        help=f"spending limit in USD; WINDOW is one of {', '.join(WINDOWS)} (repeatable)",
    )
    hardness = group.add_mutually_exclusive_group()
    hardness.add_argument(
        "--soft", action="store_const", const=True, dest="soft",
        help="the budgets given with --budget (else every budget) never refuse; they warn at 80,100%% "
             "unless --warn-at says otherwise",
    )
    hardness.add_argument(
        "--hard", action="store_const", const=False, dest="soft",
        help="the budgets given with --budget (else every budget) refuse once spent (the default)",
    )
    group.add_argument(
        "--warn-at", type=_warn_at, metavar="PERCENT[,PERCENT...]",
        help="alert when spend passes these percentages of the budgets given with --budget "
             "(else of every budget); 'none': the default (80,100 soft, none hard)",
    )
    group.add_argument("--models", type=_models, metavar="PATTERN[,PATTERN...]",
                       help="allowed models, shell-style globs such as 'claude-sonnet-*'")
    group.add_argument("--expires", type=_expires, metavar="TIME",
                       help="ISO 8601 time or date after which requests are refused (UTC unless an offset is given)")
    # Checked by apply_limit_flags, so that a bad name is one line, not argparse's usage.
    group.add_argument("--groups", metavar="GROUP[,GROUP...]",
                       help="the upstream groups (each [[upstream]]'s `group`) it may use; 'none': every group")


def has_limit_flags(args: argparse.Namespace) -> bool:
    return any(
        getattr(args, name, None) is not None
        for name in ("rpm", "concurrency", "budget", "models", "expires", "groups", "soft", "warn_at")
    )


def apply_limit_flags(current: Limits | None, args: argparse.Namespace) -> Limits | None:
    """`current` with the flags in `args` applied; None when nothing is left.
    CommandError (status 2) for a bad `--groups`, and for `--soft`, `--hard`
    or `--warn-at` on a scope without a budget."""
    base = current if current is not None and current.error is None else Limits()
    changes: dict[str, Any] = {}
    groups_text = getattr(args, "groups", None)
    if groups_text is not None:
        try:
            groups = parse_groups(groups_text)
        except ValueError as e:
            raise CommandError(str(e), USAGE) from None
        changes["groups"] = () if groups is CLEAR else groups
    for name, attr in (("rpm", "rpm"), ("concurrency", "concurrency"), ("models", "models"), ("expires", "expires_at")):
        value = getattr(args, name, None)
        if value is CLEAR:
            changes[attr] = () if attr == "models" else None
        elif value is not None:
            changes[attr] = value
    named = []
    for window, amount in getattr(args, "budget", None) or ():
        changes["budget_" + window] = None if amount is CLEAR else amount
        if amount is not CLEAR:
            named.append(window)
    budgeted = [w for w in WINDOWS if changes.get("budget_" + w, base.budget(w)) is not None]
    soft = {w for w in base.soft if w in budgeted}
    warn_at = {w: p for w, p in base.warn_at if w in budgeted}
    hardness, percents = getattr(args, "soft", None), getattr(args, "warn_at", None)
    if hardness is not None or percents is not None:
        targets = named or budgeted
        if not targets:
            flag = "--warn-at" if hardness is None else "--soft" if hardness else "--hard"
            raise CommandError(f"{flag} applies to budgets, and there is none: give --budget WINDOW=USD", USAGE)
        for window in targets:
            if hardness is True:
                soft.add(window)
            elif hardness is False:
                soft.discard(window)
            if percents is CLEAR:
                warn_at.pop(window, None)
            elif percents is not None:
                warn_at[window] = percents
    changes["soft"] = tuple(w for w in WINDOWS if w in soft)
    changes["warn_at"] = tuple((w, warn_at[w]) for w in WINDOWS if w in warn_at)
    result = dataclasses.replace(base, **changes)
    return None if result.empty else result
