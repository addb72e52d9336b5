"""Administration commands for limits: the flags that set them on tokens, users
and projects, `hubcore token update`, `hubcore user|project set|show|list`, and
the budget report behind `hubcore usage --budgets`.

Flags change only what they name; the value `none` clears a limit:
`--rpm none`, `--concurrency none`, `--budget day=none`, `--models none`,
`--expires none`. A budget of 0 (`--budget day=0`) refuses every request.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import sqlite3
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

import orjson

from hubcore.config import zone as time_zone
from hubcore.governance import limits as limits_mod
from hubcore.governance import storage, tokens
from hubcore.governance.limiter import BudgetLine, budget_report
from hubcore.governance.limits import WINDOWS, Limits, format_time, format_usd


class _Clear:
    """The value of a flag given as `none`: remove that limit."""

    def __repr__(self) -> str:
        return "CLEAR"


CLEAR = _Clear()
_NONE_WORDS = frozenset({"none", "off", "unlimited"})


# -- argument types (errors surface as argparse usage errors, before any write) --

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
    return int((value * limits_mod.MICROS_PER_USD).to_integral_value(ROUND_HALF_UP))


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


def _scope_arg(text: str) -> tuple[str, str]:
    kind, sep, name = text.partition(":")
    if not sep or kind not in limits_mod.SCOPE_KINDS or not name:
        raise argparse.ArgumentTypeError(f"expected token:ID, user:NAME or project:NAME, not {text!r}")
    return kind, name


# -- parser wiring -------------------------------------------------------------

def add_token_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """The limit flags shared by `token create|update`, `user set`, `project set`."""
    group = parser.add_argument_group("limits (give 'none' to clear one)")
    group.add_argument("--rpm", type=_positive_or_none, metavar="N", help="requests per minute (sliding 60 s)")
    group.add_argument("--concurrency", type=_positive_or_none, metavar="N", help="requests in flight at once")
    group.add_argument(
        "--budget", type=_budget, action="append", metavar="WINDOW=USD",
        help=f"spending limit in USD; WINDOW is one of {', '.join(WINDOWS)} (repeatable)",
    )
    group.add_argument("--models", type=_models, metavar="PATTERN[,PATTERN...]",
                       help="allowed models, shell-style globs such as 'claude-sonnet-*'")
    group.add_argument("--expires", type=_expires, metavar="TIME",
                       help="ISO 8601 time or date after which requests are refused (UTC unless an offset is given)")


def add_token_update_arguments(parser: argparse.ArgumentParser) -> None:
    """`hubcore token update ID [limit flags]`."""
    parser.add_argument("id", type=int, help="token id (see hubcore token list)")
    add_token_limit_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the new limits as JSON")


def add_user_arguments(parser: argparse.ArgumentParser) -> None:
    """`hubcore user set NAME [limit flags] | show NAME | list`."""
    _add_scope_arguments(parser, "user")


def add_project_arguments(parser: argparse.ArgumentParser) -> None:
    """`hubcore project set NAME [limit flags] | show NAME | list`."""
    _add_scope_arguments(parser, "project")


def _add_scope_arguments(parser: argparse.ArgumentParser, kind: str) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    p = sub.add_parser("set", help=f"set limits of a {kind} (flags not given stay as they are)")
    p.add_argument("--config")
    p.add_argument("name")
    p.add_argument("--note")
    add_token_limit_arguments(p)
    p = sub.add_parser("show", help=f"show a {kind}'s limits, tokens and spend against its budgets")
    p.add_argument("--config")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("list", help=f"list {kind}s that have limits")
    p.add_argument("--config")
    p.add_argument("--json", action="store_true")


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """`hubcore usage --budgets [token:ID|user:NAME|project:NAME]`."""
    parser.add_argument(
        "--budgets", nargs="?", const="all", metavar="SCOPE",
        help="show spend against each budget instead (optionally of one scope: token:ID, user:NAME, project:NAME)",
    )


# -- applying flags ---------------------------------------------------------------

def has_limit_flags(args: argparse.Namespace) -> bool:
    return any(getattr(args, name, None) is not None for name in ("rpm", "concurrency", "budget", "models", "expires"))


def apply_limit_flags(current: Limits | None, args: argparse.Namespace) -> Limits | None:
    """`current` with the flags in `args` applied; None when nothing is left."""
    base = current if current is not None and current.error is None else Limits()
    changes: dict[str, Any] = {}
    for name, attr in (("rpm", "rpm"), ("concurrency", "concurrency"), ("models", "models"), ("expires", "expires_at")):
        value = getattr(args, name, None)
        if value is CLEAR:
            changes[attr] = () if attr == "models" else None
        elif value is not None:
            changes[attr] = value
    for window, amount in getattr(args, "budget", None) or ():
        changes["budget_" + window] = None if amount is CLEAR else amount
    result = dataclasses.replace(base, **changes)
    return None if result.empty else result


def run_token_create_limits(args: argparse.Namespace, conn: sqlite3.Connection, token_id: int) -> None:
    """Store the limit flags given to `token create` on the new token.

    Call it in the same transaction as tokens.create (see create_token), so
    that no reload can see the token without its limits."""
    if not has_limit_flags(args):
        return
    limits = apply_limit_flags(None, args)
    if not storage.write_limits(conn, "token", token_id, limits):
        raise LookupError(f"no active token with id {token_id}")


def create_token(args: argparse.Namespace, conn: sqlite3.Connection) -> tuple[int, str]:
    """tokens.create + its limit flags in one transaction: (id, token)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        token_id, token = tokens.create(conn, args.user, getattr(args, "project", None), getattr(args, "note", None))
        run_token_create_limits(args, conn, token_id)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return token_id, token


def run_token_update(args: argparse.Namespace, conn: sqlite3.Connection) -> int:
    """`hubcore token update ID ...`: change the flags given, keep the rest."""
    if not has_limit_flags(args):
        print("hubcore: nothing to update: give --rpm, --concurrency, --budget, --models or --expires", file=sys.stderr)
        return 2
    conn.execute("BEGIN IMMEDIATE")
    try:
        row = conn.execute("SELECT limits, revoked_at FROM tokens WHERE id = ?", (args.id,)).fetchone()
        if row is None or row[1] is not None:
            conn.execute("ROLLBACK")
            state = "is revoked" if row is not None else "does not exist"
            print(f"hubcore: token {args.id} {state}", file=sys.stderr)
            return 1
        new = apply_limit_flags(limits_mod.parse_column(row[0], f"token {args.id}"), args)
        storage.write_limits(conn, "token", args.id, new)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    if getattr(args, "json", False):
        print(orjson.dumps({"id": args.id, "limits": new.to_dict() if new else {}}).decode())
    else:
        print(f"updated token {args.id}: {new.describe() if new else 'no limits'}")
    return 0


def run_user(args: argparse.Namespace, conn: sqlite3.Connection, tz: str = "UTC", now: float | None = None) -> int:
    return _run_scope(args, conn, "user", tz, now)


def run_project(args: argparse.Namespace, conn: sqlite3.Connection, tz: str = "UTC", now: float | None = None) -> int:
    return _run_scope(args, conn, "project", tz, now)


def _run_scope(args: argparse.Namespace, conn: sqlite3.Connection, kind: str, tz: str, now: float | None) -> int:
    action = getattr(args, "action", None)
    table = "users" if kind == "user" else "projects"
    if action == "set":
        conn.execute("BEGIN IMMEDIATE")
        try:
            try:
                current = storage.read_limits(conn, kind, args.name)
            except KeyError:
                current = None
            new = apply_limit_flags(current, args)
            storage.write_limits(conn, kind, args.name, new, note=args.note)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        print(f"{kind} {args.name}: {new.describe() if new else 'no limits'}")
        return 0
    if action == "show":
        return _show_scope(args, conn, kind, tz, now)
    if action == "list":
        rows = conn.execute(f"SELECT name, limits, note FROM {table} ORDER BY name").fetchall()
        entries = []
        for name, text, note in rows:
            lim = limits_mod.parse_column(text, f"{kind} {name}")
            entries.append((name, lim, note))
        if getattr(args, "json", False):
            print(orjson.dumps([
                {"name": n, "limits": lim.to_dict() if lim else {}, "note": note} for n, lim, note in entries
            ]).decode())
        else:
            zone = time_zone(tz)
            for name, lim, note in entries:
                text = lim.describe(zone) if lim else "no limits"
                print(f"{name}: {text}" + (f"  ({note})" if note else ""))
        return 0
    print(f"hubcore: usage: hubcore {kind} set|show|list ...", file=sys.stderr)
    return 2


def _show_scope(args: argparse.Namespace, conn: sqlite3.Connection, kind: str, tz: str, now: float | None) -> int:
    column = "user" if kind == "user" else "project"
    token_ids = [r[0] for r in conn.execute(
        f"SELECT id FROM tokens WHERE {column} = ? AND revoked_at IS NULL ORDER BY id", (args.name,)
    )]
    try:
        limits = storage.read_limits(conn, kind, args.name)
    except KeyError:
        if not token_ids:
            print(f"hubcore: no {kind} {args.name!r} (no limits and no active tokens)", file=sys.stderr)
            return 1
        limits = None
    lines = budget_report(conn, tz, now, (kind, args.name))
    zone = time_zone(tz)
    if getattr(args, "json", False):
        print(orjson.dumps({
            "kind": kind, "name": args.name, "limits": limits.to_dict() if limits else {},
            "tokens": token_ids, "budgets": [line.to_dict() for line in lines],
        }).decode())
        return 0
    print(f"{kind} {args.name}: {limits.describe(zone) if limits else 'no limits'}")
    print(f"active tokens: {', '.join(map(str, token_ids)) or 'none'}")
    if lines:
        sys.stdout.write(_budget_table(lines, zone))
    return 0


def run_budgets(args: argparse.Namespace, conn: sqlite3.Connection, tz: str = "UTC", now: float | None = None) -> int:
    """`hubcore usage --budgets [SCOPE]`: spend against every budget, in the
    format of `args.format` (table, json or csv)."""
    scope = None
    wanted = getattr(args, "budgets", None)
    if wanted and wanted != "all":
        try:
            scope = _scope_arg(wanted)
        except argparse.ArgumentTypeError as e:
            print(f"hubcore: {e}", file=sys.stderr)
            return 2
    try:
        zone = time_zone(tz)
    except ValueError as e:
        print(f"hubcore: {e}", file=sys.stderr)
        return 2
    if now is None:
        now = time.time()
    lines = budget_report(conn, tz, now, scope)
    fmt = getattr(args, "format", "table")
    if fmt == "json":
        print(orjson.dumps({"timezone": tz, "now": now, "budgets": [line.to_dict() for line in lines]}).decode())
    elif fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["kind", "name", "window", "limit_usd", "spent_usd", "remaining_usd", "resets_at"])
        for line in lines:
            writer.writerow([
                line.kind, line.name, line.window, _plain_usd(line.limit_micros),
                _plain_usd(line.spent_micros), _plain_usd(line.remaining_micros),
                "" if line.resets_at is None else format_time(line.resets_at, zone),
            ])
        sys.stdout.write(out.getvalue())
    else:
        if not lines:
            print("no budgets set" if scope is None else f"no budgets set on {scope[0]} {scope[1]}")
            return 0
        sys.stdout.write(_budget_table(lines, zone))
    return 0


def _plain_usd(micros: int) -> str:
    return f"{micros / limits_mod.MICROS_PER_USD:.6f}"


def _budget_table(lines: Sequence[BudgetLine], zone: Any) -> str:
    header = ("SCOPE", "WINDOW", "LIMIT", "SPENT", "REMAINING", "USED", "RESETS")
    rows = [header]
    for line in lines:
        used = f"{100 * line.spent_micros / line.limit_micros:.0f}%" if line.limit_micros else "-"
        resets = "never" if line.resets_at is None else format_time(line.resets_at, zone)
        rows.append((
            f"{line.kind}:{line.name}", line.window, format_usd(line.limit_micros),
            format_usd(line.spent_micros), format_usd(line.remaining_micros), used, resets,
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n" for r in rows)
