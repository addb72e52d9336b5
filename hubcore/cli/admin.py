"""`hubcore admin add|list|remove|passwd|token`: the dashboard's operators.

A password is asked twice on the terminal, or read from the first line of
stdin with `--password-stdin` (for scripts: `printf '%s\\n' "$PW" | ...`);
it is never an argument, which every user of the host could read in ps. An
admin API token is printed once, by `admin token`, alone on the last line.
Every change leaves an audit row in its own transaction.
"""
from __future__ import annotations

import argparse
import getpass
import sys

import orjson

from hubcore import store
from hubcore.cli import render
from hubcore.cli.audit import record
from hubcore.cli.common import USAGE, CommandError, Context, Subcommands, add_command, on_database
from hubcore.governance import admins


def add_commands(sub: Subcommands) -> None:
    group = add_command(sub, "admin", "add, list and remove dashboard operators; their passwords and API tokens")
    actions = group.add_subparsers(metavar="ACTION")
    p = add_command(actions, "add", "add an operator (password asked twice, or --password-stdin)", run_add)
    p.add_argument("name", help="1 to 64 letters, digits and . _ @ -")
    _password_option(p)
    p = add_command(actions, "list", "list operators: created, last sign-in, API tokens", run_list)
    p.add_argument("--json", action="store_true")
    p = add_command(actions, "remove", "remove an operator and its API tokens", run_remove)
    p.add_argument("name")
    p = add_command(actions, "passwd", "set an operator's password", run_passwd)
    p.add_argument("name")
    _password_option(p)
    p = add_command(actions, "token", "mint an admin API token for the dashboard's /api/v1/ (printed once)", run_token)
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print a JSON object instead")


def _password_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of stdin instead of asking on the terminal")


def read_password(args: argparse.Namespace) -> str:
    """The new password, checked for length before anything is written."""
    if args.password_stdin:
        line = sys.stdin.readline()
        if not line:
            raise CommandError("no password on stdin", USAGE)
        password = line.removesuffix("\n").removesuffix("\r")
    else:
        if not sys.stdin.isatty():
            # getpass would fall back to reading stdin with a warning, or wait
            # on a controlling terminal nobody is looking at.
            raise CommandError("no terminal to ask for the password on; pass --password-stdin", USAGE)
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise CommandError("the passwords differ; nothing changed", USAGE)
    try:
        admins.check_password(password)
    except ValueError as e:
        raise CommandError(str(e), USAGE) from None
    return password


def _check_name(name: str) -> None:
    try:
        admins.check_name(name)
    except ValueError as e:
        raise CommandError(str(e), USAGE) from None


def add(args: argparse.Namespace, ctx: Context) -> int:
    """`hubcore admin add NAME [--password-stdin]`."""
    _check_name(args.name)
    password = read_password(args)
    conn = ctx.conn
    try:
        with store.immediate(conn):
            admins.add(conn, args.name, password, ctx.now)
            record(conn, "admin.add", f"admin {args.name}", None, {"name": args.name})
    except admins.AdminExists as e:
        raise CommandError(str(e)) from None
    print(f"added operator {args.name}")
    return 0


def list_admins(args: argparse.Namespace, ctx: Context) -> int:
    """`hubcore admin list [--json]`."""
    rows = admins.list_admins(ctx.conn)
    if args.json:
        print(orjson.dumps([row.to_dict() for row in rows]).decode())
        return 0
    table: list[list[str] | None] = [["NAME", "CREATED", "LAST SIGN-IN", "TOKENS"]]
    table += [
        [row.name, render.utc_minute(row.created_at),
         "never" if row.last_sign_in_at is None else render.utc_minute(row.last_sign_in_at), str(row.tokens)]
        for row in rows
    ]
    for line in render.table(table, right={3}):
        print(line)
    return 0


def _current(ctx: Context, name: str) -> admins.AdminInfo:
    found = next((row for row in admins.list_admins(ctx.conn) if row.name == name), None)
    if found is None:
        raise CommandError(f"no operator {name}")
    return found


def remove(args: argparse.Namespace, ctx: Context) -> int:
    """`hubcore admin remove NAME`."""
    conn = ctx.conn
    with store.immediate(conn):
        before = _current(ctx, args.name)
        admins.remove(conn, args.name)
        record(conn, "admin.remove", f"admin {args.name}", before.to_dict(), None)
    print(f"removed operator {args.name}")
    return 0


def passwd(args: argparse.Namespace, ctx: Context) -> int:
    """`hubcore admin passwd NAME [--password-stdin]`."""
    conn = ctx.conn
    if not admins.exists(conn, args.name):
        # Before asking: no password typed twice for a name that has none.
        raise CommandError(f"no operator {args.name}")
    password = read_password(args)
    with store.immediate(conn):
        if not admins.set_password(conn, args.name, password, ctx.now):
            raise CommandError(f"no operator {args.name}")
        # What changed is a secret: the row says only that it did.
        record(conn, "admin.passwd", f"admin {args.name}", None, None)
    print(f"changed the password of operator {args.name}")
    return 0


def token(args: argparse.Namespace, ctx: Context) -> int:
    """`hubcore admin token NAME [--json]`."""
    conn = ctx.conn
    with store.immediate(conn):
        try:
            token_id, secret = admins.create_token(conn, args.name, ctx.now)
        except LookupError as e:
            raise CommandError(str(e)) from None
        record(conn, "admin.token", f"admin {args.name}", None, {"token_id": token_id})
    if args.json:
        print(orjson.dumps({"id": token_id, "admin": args.name, "token": secret}).decode())
        return 0
    print(f"created admin token {token_id} for operator {args.name}")
    print("store it now: it is shown only once", file=sys.stderr)
    print(secret)
    return 0


run_add = on_database(add)
run_list = on_database(list_admins)
run_remove = on_database(remove)
run_passwd = on_database(passwd)
run_token = on_database(token)
