"""`hubcore usage`: usage and cost grouped by user, project, token, model,
served model, key, upstream or day, or (`--budgets`) spend against every budget."""
from __future__ import annotations

import argparse
import sqlite3
import sys

from hubcore.accounting import report
from hubcore.cli import render
from hubcore.cli.common import USAGE, CommandError, Context, Subcommands, add_command, on_database
from hubcore.config import zone
from hubcore.governance.limiter import budget_report
from hubcore.governance.limits import SCOPE_KINDS


def add_commands(sub: Subcommands) -> None:
    p = add_command(sub, "usage", "report usage and cost", run_usage)
    p.add_argument("--by", default="user", choices=list(report.GROUPS),
                   help="what to group by (default user); token also names each token's user and note; "
                        "model is the client's model id, served_model the id the upstream was asked for")
    p.add_argument("--since", help="ISO 8601 time or date, or relative: 24h, 7d")
    p.add_argument("--until", help="ISO 8601 time or date, or relative: 24h, 7d")
    p.add_argument("--format", default="table", choices=list(render.FORMATS))
    p.add_argument(
        "--budgets", nargs="?", const="all", metavar="SCOPE",
        help="show spend against each budget instead (optionally of one scope: token:ID, user:NAME, project:NAME)",
    )


def render_usage(
    conn: sqlite3.Connection, by: str = "user",
    since: float | None = None, until: float | None = None, fmt: str = "table",
) -> str:
    """The usage report as text (`since` inclusive, `until` exclusive)."""
    render.check_format(fmt)
    rows, total = report.query(conn, by, since, until)
    return render.usage_report(rows, total, by, since, until, fmt)


def usage(args: argparse.Namespace, ctx: Context) -> int:
    """`hubcore usage [--by G] [--since T] [--until T] [--format F] [--budgets [SCOPE]]`."""
    if args.budgets:
        return budgets(args, ctx)
    try:
        since = report.parse_time(args.since) if args.since else None
        until = report.parse_time(args.until) if args.until else None
    except ValueError as e:
        raise CommandError(str(e), USAGE) from None
    sys.stdout.write(render_usage(ctx.conn, by=args.by, since=since, until=until, fmt=args.format))
    return 0


def budgets(args: argparse.Namespace, ctx: Context) -> int:
    """Spend against every budget (or those of one scope), in `--format`."""
    scope = None
    wanted = getattr(args, "budgets", None)
    if wanted and wanted != "all":
        kind, sep, name = wanted.partition(":")
        if not sep or kind not in SCOPE_KINDS or not name:
            raise CommandError(f"expected token:ID, user:NAME or project:NAME, not {wanted!r}", USAGE)
        scope = (kind, name)
    try:
        tz = zone(ctx.tz)
    except ValueError as e:
        raise CommandError(str(e), USAGE) from None
    lines = budget_report(ctx.conn, ctx.tz, ctx.now, scope)
    fmt = getattr(args, "format", "table")
    if fmt == "json":
        sys.stdout.write(render.budget_json(lines, ctx.tz, ctx.now))
    elif fmt == "csv":
        sys.stdout.write(render.budget_csv(lines, tz))
    elif not lines:
        print("no budgets set" if scope is None else f"no budgets set on {scope[0]} {scope[1]}")
    else:
        sys.stdout.write(render.budget_table(lines, tz))
    return 0


run_usage = on_database(usage)
