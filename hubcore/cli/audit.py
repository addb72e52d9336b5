"""`hubcore audit [--since T] [--limit N] [--json]`: the audit trail, newest
first; and who the CLI writes its rows as (`cli:<unix user>`, origin "cli")."""
from __future__ import annotations

import argparse
import getpass
import os
import sqlite3
import sys
from typing import Any

import orjson

from hubcore.accounting import report
from hubcore.cli import render
from hubcore.cli.common import USAGE, CommandError, Context, Subcommands, add_command, on_database
from hubcore.governance import audit

ORIGIN = "cli"


def cli_actor() -> str:
    """`cli:<unix user>`: who ran the command, as far as this host can tell."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        # No $USER and no passwd entry (a container's bare uid).
        user = str(os.getuid())
    return f"cli:{user}"


def record(conn: sqlite3.Connection, action: str, target: str, before: Any, after: Any) -> None:
    """One row for a change this command makes, in its transaction."""
    audit.record(conn, cli_actor(), action, target, before, after, ORIGIN)


def add_commands(sub: Subcommands) -> None:
    p = add_command(sub, "audit", "list administrative changes, newest first (who, what, before and after)", run_audit)
    p.add_argument("--since", help="ISO 8601 time or date, or relative: 24h, 7d")
    p.add_argument("--limit", type=int, default=audit.DEFAULT_LIMIT, help=f"rows to show (default {audit.DEFAULT_LIMIT})")
    p.add_argument("--json", action="store_true", help="print a JSON array instead")


def _change(entry: audit.AuditEntry) -> str:
    parts = []
    if entry.before is not None:
        parts.append("before " + orjson.dumps(entry.before, option=orjson.OPT_SORT_KEYS).decode())
    if entry.after is not None:
        parts.append("after " + orjson.dumps(entry.after, option=orjson.OPT_SORT_KEYS).decode())
    return "; ".join(parts) or "-"


def show_audit(args: argparse.Namespace, ctx: Context) -> int:
    """`hubcore audit [--since T] [--limit N] [--json]`."""
    if args.limit < 1:
        raise CommandError(f"--limit must be at least 1, not {args.limit}", USAGE)
    try:
        since = report.parse_time(args.since, ctx.now) if args.since else None
    except ValueError as e:
        raise CommandError(str(e), USAGE) from None
    entries = audit.read(ctx.conn, since=since, limit=args.limit)
    if args.json:
        print(orjson.dumps([entry.to_dict() for entry in entries]).decode())
        return 0
    rows: list[list[str] | None] = [["TIME", "ACTOR", "ACTION", "TARGET", "CHANGE"]]
    rows += [
        [render.utc_minute(e.ts), e.actor, e.action, e.target or "-", _change(e)]
        for e in entries
    ]
    for line in render.table(rows):
        sys.stdout.write(line + "\n")
    return 0


run_audit = on_database(show_audit)
