"""`hubcore user|project set|show|list`: the limits of users and projects,
and their spend against their budgets."""
from __future__ import annotations

import argparse
import sys

import orjson

from hubcore import store
from hubcore.cli import render
from hubcore.cli.audit import ORIGIN, cli_actor
from hubcore.cli.common import USAGE, CommandError, Context, Subcommands, add_command, on_database
from hubcore.cli.limits import add_limit_arguments, budgetless, limit_edits_of
from hubcore.governance.limit_edits import BudgetlessEdit
from hubcore.cli.notify import tell_hub
from hubcore.cli.resets import add_reset_command
from hubcore.config import zone
from hubcore.governance import changes, storage
from hubcore.governance.limiter import budget_report
from hubcore.governance.limits import parse_column
from hubcore.governance.tokens import groups_list

_TABLES = {"user": "users", "project": "projects"}


def add_commands(sub: Subcommands) -> None:
    for kind in ("user", "project"):
        group = add_command(sub, kind, f"set and show a {kind}'s limits and spend", run_missing_action)
        group.set_defaults(kind=kind)
        actions = group.add_subparsers(metavar="ACTION")
        p = add_command(actions, "set", f"set limits of a {kind} (flags not given stay as they are)", run_set)
        p.add_argument("name")
        p.add_argument("--note")
        add_limit_arguments(p)
        p = add_command(actions, "show", f"show a {kind}'s limits, tokens and spend against its budgets", run_show)
        p.add_argument("name")
        p.add_argument("--json", action="store_true")
        p = add_command(actions, "list", f"list {kind}s that have limits", run_list)
        p.add_argument("--json", action="store_true")
        add_reset_command(actions, kind)


def missing_action(args: argparse.Namespace, ctx: Context) -> int:
    raise CommandError(f"usage: hubcore {args.kind} set|show|list|reset-spend ...", USAGE)


def set_limits(args: argparse.Namespace, ctx: Context) -> int:
    """`hubcore user|project set NAME [--note N] [limit flags]`."""
    kind, conn = args.kind, ctx.conn
    # Read before anything is written: a bad --groups stops the command here.
    edits = limit_edits_of(args)
    try:
        with store.immediate(conn):
            new = changes.edit_scope(conn, kind, args.name, edits, args.note, actor=cli_actor(), origin=ORIGIN).after
    except BudgetlessEdit:
        raise budgetless(args) from None
    except ValueError as e:
        raise CommandError(str(e), USAGE) from None
    # Users' and projects' limits ride the tokens generation (store, migration 2).
    tell_hub(args, conn)
    print(f"{kind} {args.name}: {render.limits_text(new)}")
    return 0


def show(args: argparse.Namespace, ctx: Context) -> int:
    """`hubcore user|project show NAME [--json]`."""
    kind, conn = args.kind, ctx.conn
    column = "user" if kind == "user" else "project"
    token_ids = [r[0] for r in conn.execute(
        f"SELECT id FROM tokens WHERE {column} = ? AND revoked_at IS NULL ORDER BY id", (args.name,)
    )]
    try:
        limits = storage.read_limits(conn, kind, args.name)
    except KeyError:
        if not token_ids:
            raise CommandError(f"no {kind} {args.name!r} (no limits and no active tokens)") from None
        limits = None
    lines = budget_report(conn, ctx.tz, ctx.now, (kind, args.name))
    if getattr(args, "json", False):
        print(orjson.dumps({
            "kind": kind, "name": args.name, "limits": limits.to_dict() if limits else {},
            "groups": groups_list(limits), "tokens": token_ids, "budgets": [line.to_dict() for line in lines],
        }).decode())
        return 0
    tz = zone(ctx.tz)
    print(f"{kind} {args.name}: {render.limits_text(limits, tz)}")
    print(f"active tokens: {', '.join(map(str, token_ids)) or 'none'}")
    if lines:
        sys.stdout.write(render.budget_table(lines, tz))
    return 0


def list_scopes(args: argparse.Namespace, ctx: Context) -> int:
    """`hubcore user|project list [--json]`: those that have limits."""
    kind = args.kind
    rows = ctx.conn.execute(f"SELECT name, limits, note FROM {_TABLES[kind]} ORDER BY name").fetchall()
    entries = [(name, parse_column(text, f"{kind} {name}"), note) for name, text, note in rows]
    if getattr(args, "json", False):
        print(orjson.dumps([
            {"name": n, "limits": lim.to_dict() if lim else {}, "note": note, "groups": groups_list(lim)}
            for n, lim, note in entries
        ]).decode())
        return 0
    tz = zone(ctx.tz)
    for name, lim, note in entries:
        print(f"{name}: {render.limits_text(lim, tz)}" + (f"  ({note})" if note else ""))
    return 0


run_missing_action = on_database(missing_action)
run_set = on_database(set_limits)
run_show = on_database(show)
run_list = on_database(list_scopes)
