"""`hubcore user|project|token reset-spend NAME --window W`: start a budget
window's spend afresh, as the dashboard's "reset this window's spend" does.

The reset is stored (hubcore.governance.changes.reset_spend) and audited,
and the running hub is told at once; what was spent before it no longer
counts, in the hub's counters and in every rebuild of them from the usage
rows (a restart, `hubcore usage --budgets`), while the usage rows themselves
stay as they are.
"""
from __future__ import annotations

import argparse
import time

import orjson

from hubcore import store
from hubcore.cli.audit import ORIGIN, cli_actor
from hubcore.cli.common import USAGE, CommandError, Context, Subcommands, add_command, on_database
from hubcore.cli.notify import tell_hub
from hubcore.cli.render import format_time, format_usd
from hubcore.config import zone
from hubcore.governance import changes
from hubcore.governance.limiter import Limiter
from hubcore.governance.limits import WINDOWS


def add_reset_command(actions: Subcommands, kind: str) -> None:
    """`reset-spend` among the actions of `hubcore KIND`."""
    p = add_command(
        actions, "reset-spend",
        f"start a {kind}'s spend in one budget window afresh (what it spent there before stops counting)",
        run_reset,
    )
    if kind == "token":
        p.add_argument("name", type=int, metavar="id", help="token id (see hubcore token list)")
    else:
        p.add_argument("name")
    p.add_argument("--window", required=True, choices=list(WINDOWS), help="the budget window to reset")
    p.add_argument("--json", action="store_true", help="print a JSON object instead")
    p.set_defaults(kind=kind)


def reset(args: argparse.Namespace, ctx: Context) -> int:
    kind, name, window, conn = args.kind, args.name, args.window, ctx.conn
    try:
        tz = zone(ctx.tz)
    except ValueError as e:
        raise CommandError(str(e), USAGE) from None
    at = time.time()
    # What the hub counts now, from the usage rows and earlier resets: for
    # the audit row and the operator's confirmation.
    limiter = Limiter(ctx.tz)
    limiter.reload(conn)
    limiter.rebuild(conn, at)
    spent = limiter.spent(kind, name, window, at)
    try:
        with store.immediate(conn):
            changes.reset_spend(conn, kind, name, window, at, spent_micros=spent, actor=cli_actor(), origin=ORIGIN)
    except LookupError as e:
        raise CommandError(str(e)) from None
    tell_hub(args, conn)
    if args.json:
        print(orjson.dumps({
            "kind": kind, "name": str(name), "window": window, "counts_from": at, "forgiven_micros": spent,
        }).decode())
    else:
        print(f"{kind} {name}: {window} spend reset; {format_usd(spent)} spent before "
              f"{format_time(at, tz)} no longer counts")
    return 0


run_reset = on_database(reset)
