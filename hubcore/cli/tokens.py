"""`hubcore token create|update|list|revoke`: hub tokens and their limits."""
from __future__ import annotations

import argparse
import sqlite3
import sys

import orjson

from hubcore.cli import render
from hubcore.cli.common import USAGE, CommandError, Context, Subcommands, add_command, on_database
from hubcore.cli.limits import add_limit_arguments, apply_limit_flags, has_limit_flags
from hubcore.governance import storage, tokens
from hubcore.governance.limits import parse_column


def add_commands(sub: Subcommands) -> None:
    group = add_command(sub, "token", "create, list and revoke hub tokens")
    actions = group.add_subparsers(metavar="ACTION")
    p = add_command(actions, "create", "mint a token (printed once, on the last line)", run_create)
    p.add_argument("--user", required=True)
    p.add_argument("--project")
    p.add_argument("--note")
    p.add_argument("--json", action="store_true", help="print a JSON object instead")
    add_limit_arguments(p)
    p = add_command(actions, "update", "change a token's limits", run_update)
    p.add_argument("id", type=int, help="token id (see hubcore token list)")
    add_limit_arguments(p)
    p.add_argument("--json", action="store_true", help="print the new limits as JSON")
    p = add_command(actions, "list", "list tokens (never the tokens themselves)", run_list)
    p.add_argument("--all", action="store_true", help="include revoked tokens")
    p.add_argument("--json", action="store_true")
    p = add_command(actions, "revoke", "revoke a token by id", run_revoke)
    p.add_argument("id", type=int)


def create_token(args: argparse.Namespace, conn: sqlite3.Connection) -> tuple[int, str]:
    """tokens.create and its limit flags in one transaction, so that no reload
    can see the token without its limits: (id, token)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        token_id, token = tokens.create(conn, args.user, getattr(args, "project", None), getattr(args, "note", None))
        if has_limit_flags(args) and not storage.write_limits(conn, "token", token_id, apply_limit_flags(None, args)):
            raise LookupError(f"no active token with id {token_id}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return token_id, token


def create(args: argparse.Namespace, ctx: Context) -> int:
    """`hubcore token create --user U [--project P] [limit flags]`."""
    token_id, token = create_token(args, ctx.conn)
    if args.json:
        print(orjson.dumps({"id": token_id, "user": args.user, "project": args.project, "token": token}).decode())
    else:
        print(f"created token {token_id} for user {args.user}" + (f", project {args.project}" if args.project else ""))
        print("store it now: it is shown only once", file=sys.stderr)
        print(token)
    return 0


def update(args: argparse.Namespace, ctx: Context) -> int:
    """`hubcore token update ID ...`: change the flags given, keep the rest."""
    if not has_limit_flags(args):
        raise CommandError("nothing to update: give --rpm, --concurrency, --budget, --models or --expires", USAGE)
    conn = ctx.conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        row = conn.execute("SELECT limits, revoked_at FROM tokens WHERE id = ?", (args.id,)).fetchone()
        if row is None or row[1] is not None:
            raise CommandError(f"token {args.id} {'is revoked' if row is not None else 'does not exist'}")
        new = apply_limit_flags(parse_column(row[0], f"token {args.id}"), args)
        storage.write_limits(conn, "token", args.id, new)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    if getattr(args, "json", False):
        print(orjson.dumps({"id": args.id, "limits": new.to_dict() if new else {}}).decode())
    else:
        print(f"updated token {args.id}: {render.limits_text(new)}")
    return 0


def list_tokens(args: argparse.Namespace, ctx: Context) -> int:
    """`hubcore token list [--all] [--json]`."""
    rows = tokens.list_tokens(ctx.conn, include_revoked=args.all)
    if args.json:
        print(orjson.dumps(rows).decode())
    else:
        sys.stdout.write(render.token_table(rows))
    return 0


def revoke(args: argparse.Namespace, ctx: Context) -> int:
    """`hubcore token revoke ID`."""
    if not tokens.revoke(ctx.conn, args.id):
        raise CommandError(f"no active token with id {args.id}")
    print(f"revoked token {args.id}")
    return 0


run_create = on_database(create)
run_update = on_database(update)
run_list = on_database(list_tokens)
run_revoke = on_database(revoke)
