"""`hubcore token create|update|rotate|show|list|revoke`: hub tokens and
their limits.

A token is printed once, by the command that makes it (`create`, `rotate`);
nothing else prints one. Every change is told to the running hub before the
command returns (hubcore.cli.notify).
"""
from __future__ import annotations

import argparse
import sqlite3
import sys
from typing import Any

import orjson

from hubcore import store
from hubcore.cli import render
from hubcore.cli.audit import ORIGIN, cli_actor, record
from hubcore.cli.common import USAGE, CommandError, Context, Subcommands, add_command, on_database
from hubcore.cli.limits import add_limit_arguments, apply_limit_flags, budgetless, has_limit_flags, limit_edits_of
from hubcore.cli.notify import tell_hub
from hubcore.cli.resets import add_reset_command
from hubcore.config import zone
from hubcore.governance import changes, tokens
from hubcore.governance.limiter import BudgetLine, Limiter
from hubcore.governance.limit_edits import BudgetlessEdit
from hubcore.governance.limits import WINDOWS


def add_commands(sub: Subcommands) -> None:
    group = add_command(sub, "token", "create, show, list, rotate and revoke hub tokens, reset their spend")
    actions = group.add_subparsers(metavar="ACTION")
    p = add_command(actions, "create", "mint a token (printed once, on the last line)", run_create)
    p.add_argument("--user", required=True)
    p.add_argument("--project")
    p.add_argument("--note")
    p.add_argument("--json", action="store_true", help="print a JSON object instead")
    add_limit_arguments(p)
    p = add_command(actions, "update", "change a token's note or limits", run_update)
    p.add_argument("id", type=int, help="token id (see hubcore token list)")
    p.add_argument("--note", help="replace the note ('' clears it)")
    add_limit_arguments(p)
    p.add_argument("--json", action="store_true", help="print the token's note and limits as JSON")
    p = add_command(actions, "show", "show a token: owner, limits, last use, spend per budget window", run_show)
    p.add_argument("id", type=int, help="token id (see hubcore token list)")
    p.add_argument("--json", action="store_true")
    p = add_command(actions, "list", "list tokens (never the tokens themselves)", run_list)
    p.add_argument("--all", action="store_true", help="include revoked tokens")
    p.add_argument("--json", action="store_true")
    p = add_command(
        actions, "rotate",
        "give a token a new secret, printed once; the old one stops working, limits and history stay",
        run_rotate,
    )
    p.add_argument("id", type=int, help="token id (see hubcore token list)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead")
    p = add_command(actions, "revoke", "revoke a token by id", run_revoke)
    p.add_argument("id", type=int)
    add_reset_command(actions, "token")


def create_token(args: argparse.Namespace, conn: sqlite3.Connection) -> tuple[int, str]:
    """The token and its limit flags in one transaction, so that no reload
    can see the token without its limits: (id, token)."""
    # Read before anything is written: a bad --groups stops the command here.
    limits = apply_limit_flags(None, args) if has_limit_flags(args) else None
    try:
        with store.immediate(conn):
            return changes.create_token(
                conn, args.user, getattr(args, "project", None), getattr(args, "note", None), limits,
                actor=cli_actor(), origin=ORIGIN,
            )
    except ValueError as e:
        raise CommandError(f"--user: {e}" if not args.user.strip() else str(e), USAGE) from None


def print_secret(
    what: str, token_id: int, user: str, project: str | None, token: str, *, as_json: bool,
) -> None:
    """The one place a token is printed: alone on the last line (or in the
    `--json` object), with a reminder on stderr that it is shown only once."""
    if as_json:
        print(orjson.dumps({"id": token_id, "user": user, "project": project, "token": token}).decode())
        return
    print(f"{what} token {token_id} for user {user}" + (f", project {project}" if project else ""))
    print("store it now: it is shown only once", file=sys.stderr)
    print(token)


def create(args: argparse.Namespace, ctx: Context) -> int:
    """`hubcore token create --user U [--project P] [--note N] [limit flags]`."""
    token_id, token = create_token(args, ctx.conn)
    tell_hub(args, ctx.conn)
    print_secret("created", token_id, args.user, args.project, token, as_json=args.json)
    return 0


def rotate(args: argparse.Namespace, ctx: Context) -> int:
    """`hubcore token rotate ID`: same token, new secret."""
    conn = ctx.conn
    with store.immediate(conn):
        token = tokens.rotate(conn, args.id)
        if token is None:
            raise CommandError(_not_active(conn, args.id))
        user, project = conn.execute("SELECT user, project FROM tokens WHERE id = ?", (args.id,)).fetchone()
        # Only that it happened: the secrets, old and new, stay out of the trail.
        record(conn, "token.rotate", f"token {args.id}", None, {"user": user, "project": project})
    tell_hub(args, conn)
    print_secret("rotated", args.id, user, project, token, as_json=args.json)
    return 0


def update(args: argparse.Namespace, ctx: Context) -> int:
    """`hubcore token update ID [--note N] [limit flags]`: change what is given, keep the rest."""
    limits_given = has_limit_flags(args)
    if not limits_given and args.note is None:
        raise CommandError(
            "nothing to update: give --note, --rpm, --concurrency, --budget, --soft, --hard, --warn-at, --models, "
            "--expires or --groups", USAGE
        )
    edits = limit_edits_of(args)
    conn = ctx.conn
    try:
        with store.immediate(conn):
            edited = changes.edit_token(conn, args.id, edits, args.note, actor=cli_actor(), origin=ORIGIN)
    except LookupError as e:
        raise CommandError(str(e)) from None
    except BudgetlessEdit:
        raise budgetless(args) from None
    new, note = edited.after, edited.note
    tell_hub(args, conn)
    if getattr(args, "json", False):
        print(orjson.dumps({
            "id": args.id, "note": note, "limits": tokens.limits_dict(new), "groups": tokens.groups_list(new),
        }).decode())
    else:
        said = "" if args.note is None else f"; note {note!r}" if note else "; note cleared"
        print(f"updated token {args.id}: {render.limits_text(new)}{said}")
    return 0


def _not_active(conn: sqlite3.Connection, token_id: int) -> str:
    row = conn.execute("SELECT revoked_at FROM tokens WHERE id = ?", (token_id,)).fetchone()
    return f"token {token_id} {'is revoked' if row is not None else 'does not exist'}"


def token_spend(conn: sqlite3.Connection, token_id: int, tz: str, now: float) -> list[tuple[str, int, BudgetLine | None]]:
    """A token's spend in every budget window (day, week and month in `tz`)
    and its budget there if it has one: (window, micro-dollars, budget line),
    the numbers the hub refuses by."""
    limiter = Limiter(tz)
    limiter.reload(conn)
    limiter.rebuild(conn, now)
    budgets = {line.window: line for line in limiter.spend_report(now, ("token", str(token_id)))}
    return [(window, limiter.spent("token", token_id, window, now), budgets.get(window)) for window in WINDOWS]


def spend_json(spend: list[tuple[str, int, BudgetLine | None]]) -> list[dict[str, Any]]:
    return [
        {
            "window": window, "spent_micros": spent,
            "limit_micros": None if line is None else line.limit_micros,
            "remaining_micros": None if line is None else line.remaining_micros,
            "resets_at": None if line is None else line.resets_at,
        }
        for window, spent, line in spend
    ]


def show(args: argparse.Namespace, ctx: Context) -> int:
    """`hubcore token show ID [--json]`."""
    info = tokens.get(ctx.conn, args.id)
    if info is None:
        raise CommandError(f"token {args.id} does not exist")
    try:
        tz = zone(ctx.tz)
    except ValueError as e:
        raise CommandError(str(e), USAGE) from None
    spend = token_spend(ctx.conn, info.id, ctx.tz, ctx.now)
    state = info.status(ctx.now)
    # The token as the hub loads it: its groups with its user's and project's.
    principal = tokens.principal(ctx.conn, info.id)
    assert principal is not None  # the same token, read in the same command
    if args.json:
        effective = principal.groups
        print(orjson.dumps({
            **info.to_dict(), "effective_groups": None if effective is None else sorted(effective),
            "status": state, "timezone": ctx.tz, "spend": spend_json(spend),
        }).decode())
        return 0
    sys.stdout.write(render.token_detail(info, state, spend, tz, principal))
    return 0


def list_tokens(args: argparse.Namespace, ctx: Context) -> int:
    """`hubcore token list [--all] [--json]`."""
    rows = tokens.list_tokens(ctx.conn, include_revoked=args.all)
    if args.json:
        print(orjson.dumps([row.to_dict() for row in rows]).decode())
    else:
        sys.stdout.write(render.token_table(rows))
    return 0


def revoke(args: argparse.Namespace, ctx: Context) -> int:
    """`hubcore token revoke ID`."""
    conn = ctx.conn
    try:
        with store.immediate(conn):
            changes.revoke_token(conn, args.id, actor=cli_actor(), origin=ORIGIN)
    except LookupError:
        raise CommandError(f"no active token with id {args.id}") from None
    tell_hub(args, conn)
    print(f"revoked token {args.id}")
    return 0


run_create = on_database(create)
run_update = on_database(update)
run_rotate = on_database(rotate)
run_show = on_database(show)
run_list = on_database(list_tokens)
run_revoke = on_database(revoke)
