"""The limit flags of `token create|update` and `user|project set`, and how
they change a scope's limits.

Flags change only what they name; the value `none` clears a limit:
`--rpm none`, `--concurrency none`, `--budget day=none`, `--models none`,
`--expires none`, `--groups none`. A budget of 0 (`--budget day=0`) refuses
every request. The values are read by hubcore.governance.limit_edits, as the
dashboard's fields are. Errors in them surface as argparse usage errors,
before any write; those of `--groups` as a one-line CommandError (status 2)
from limit_edits_of, which runs before any write too.

`--soft` / `--hard` and `--warn-at` apply to the budgets the same command
sets with `--budget`, or, without one, to every budget the scope has:
`--budget month=500 --soft`, `--warn-at 50,80,100`, `--warn-at none` (back
to the default: 80,100 for a soft budget, none for a hard one). A budget
cleared with `--budget W=none` loses its softness and thresholds with it.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

from hubcore.cli.common import USAGE, CommandError
from hubcore.governance.limit_edits import (
    BudgetlessEdit, LimitEdits, parse_budget, parse_expiry, parse_groups, parse_models, parse_positive, parse_warn_at,
)
from hubcore.governance.limits import WINDOWS, Limits

T = TypeVar("T")


def _argument(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type of a limit_edits parser: its ValueError becomes a usage error."""

    def read(text: str) -> T:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    read.__name__ = parse.__name__.removeprefix("parse_")
    return read


# -- the flags -----------------------------------------------------------------------

def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """The limit flags shared by `token create|update`, `user set`, `project set`."""
    group = parser.add_argument_group("limits (give 'none' to clear one)")
    group.add_argument("--rpm", type=_argument(parse_positive), metavar="N", help="requests per minute (sliding 60 s)")
    group.add_argument("--concurrency", type=_argument(parse_positive), metavar="N",
                       help="requests in flight at once")
    group.add_argument(
        "--budget", type=_argument(parse_budget), action="append", metavar="WINDOW=USD",
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
        "--warn-at", type=_argument(parse_warn_at), metavar="PERCENT[,PERCENT...]",
        help="alert when spend passes these percentages of the budgets given with --budget "
             "(else of every budget); 'none': the default (80,100 soft, none hard)",
    )
    group.add_argument("--models", type=_argument(parse_models), metavar="PATTERN[,PATTERN...]",
                       help="allowed models, shell-style globs such as 'claude-sonnet-*'")
    group.add_argument("--expires", type=_argument(parse_expiry), metavar="TIME",
                       help="ISO 8601 time or date after which requests are refused (UTC unless an offset is given)")
    # Checked by limit_edits_of, so that a bad name is one line, not argparse's usage.
    group.add_argument("--groups", metavar="GROUP[,GROUP...]",
                       help="the upstream groups (each [[upstream]]'s `group`) it may use; 'none': every group")


def has_limit_flags(args: argparse.Namespace) -> bool:
    return any(
        getattr(args, name, None) is not None
        for name in ("rpm", "concurrency", "budget", "models", "expires", "groups", "soft", "warn_at")
    )


def limit_edits_of(args: argparse.Namespace) -> LimitEdits:
    """The limit flags in `args` as an edit. CommandError (status 2) for a bad `--groups`."""
    groups = None
    groups_text = getattr(args, "groups", None)
    if groups_text is not None:
        try:
            groups = parse_groups(groups_text)
        except ValueError as e:
            raise CommandError(f"--groups {e}", USAGE) from None
    return LimitEdits(
        rpm=getattr(args, "rpm", None),
        concurrency=getattr(args, "concurrency", None),
        budgets=tuple(getattr(args, "budget", None) or ()),
        models=getattr(args, "models", None),
        expires_at=getattr(args, "expires", None),
        groups=groups,
        soft=getattr(args, "soft", None),
        warn_at=getattr(args, "warn_at", None),
    )


def budgetless(args: argparse.Namespace) -> CommandError:
    """The usage error for --soft, --hard or --warn-at on a scope without a budget."""
    hardness = getattr(args, "soft", None)
    flag = "--warn-at" if hardness is None else "--soft" if hardness else "--hard"
    return CommandError(f"{flag} applies to budgets, and there is none: give --budget WINDOW=USD", USAGE)


def apply_limit_flags(current: Limits | None, args: argparse.Namespace) -> Limits | None:
    """`current` with the flags in `args` applied; None when nothing is left.
    CommandError (status 2) for a bad `--groups`, and for `--soft`, `--hard`
    or `--warn-at` on a scope without a budget."""
    try:
        return limit_edits_of(args).apply(current)
    except BudgetlessEdit:
        raise budgetless(args) from None
