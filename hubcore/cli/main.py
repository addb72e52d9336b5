"""The `hubcore` command: serve, token, usage, stats, keys, check-config."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from hubcore import __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from hubcore import store

    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except (store.CannotOpen, store.SchemaTooNew) as e:
        print(f"hubcore: {e}", file=sys.stderr)
        return 1


def _with_db(args: argparse.Namespace, run: Any, tz: bool = False) -> int:
    if not hasattr(args, "config"):
        args.config = None
    cfg = _load_config(args)
    from hubcore import store

    conn = store.connect(cfg.server.database)
    try:
        if tz:
            return int(run(args, conn, tz=cfg.server.budget_timezone))
        return int(run(args, conn))
    finally:
        conn.close()


def build_parser() -> argparse.ArgumentParser:
    from hubcore.cli import admin
    from hubcore.ops import client as opsclient

    parser = argparse.ArgumentParser(prog="hubcore", description="A gateway between AI coding clients and vendor APIs.")
    parser.add_argument("--version", action="version", version=f"hubcore {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--config", help="TOML config file (default: $HUBCORE_CONFIG, else built-in defaults)")
        return p

    p = command("serve", "run the proxy")
    p.set_defaults(func=cmd_serve)

    p = command("check-config", "load and validate the config, then exit")
    p.set_defaults(func=cmd_check_config)

    token = sub.add_parser("token", help="create, list and revoke hub tokens")
    token_sub = token.add_subparsers(metavar="ACTION")
    p = token_sub.add_parser("create", help="mint a token (printed once, on the last line)")
    p.add_argument("--config")
    p.add_argument("--user", required=True)
    p.add_argument("--project")
    p.add_argument("--note")
    p.add_argument("--json", action="store_true", help="print a JSON object instead")
    admin.add_token_limit_arguments(p)
    p.set_defaults(func=cmd_token_create)
    p = token_sub.add_parser("update", help="change a token's limits")
    p.add_argument("--config")
    admin.add_token_update_arguments(p)
    p.set_defaults(func=lambda a: _with_db(a, admin.run_token_update))
    p = token_sub.add_parser("list", help="list tokens (never the tokens themselves)")
    p.add_argument("--config")
    p.add_argument("--all", action="store_true", help="include revoked tokens")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_token_list)
    p = token_sub.add_parser("revoke", help="revoke a token by id")
    p.add_argument("--config")
    p.add_argument("id", type=int)
    p.set_defaults(func=cmd_token_revoke)


    p = command("stats", "show the running hub's state (over the ops socket)")
    opsclient.add_stats_arguments(p)
    p.set_defaults(func=lambda a: opsclient.run_stats(a, default_socket=_ops_socket(a)))
    p = command("keys", "show the vendor keys' health; enable or disable one")
    opsclient.add_keys_arguments(p)
    p.set_defaults(func=lambda a: opsclient.run_keys(a, default_socket=_ops_socket(a)))
    p = command("reload", "reload config keys, tokens and prices (like SIGHUP)")
    opsclient.add_reload_arguments(p)
    p.set_defaults(func=lambda a: opsclient.run_reload(a, default_socket=_ops_socket(a)))

    p = sub.add_parser("user", help="set and show a user's limits and spend")
    admin.add_user_arguments(p)
    p.set_defaults(func=lambda a: _with_db(a, admin.run_user, tz=True))
    p = sub.add_parser("project", help="set and show a project's limits and spend")
    admin.add_project_arguments(p)
    p.set_defaults(func=lambda a: _with_db(a, admin.run_project, tz=True))

    p = command("usage", "report usage and cost")
    p.add_argument("--by", default="user", choices=["user", "project", "model", "key", "day", "upstream"])
    p.add_argument("--since", help="ISO 8601 time or date, or relative: 24h, 7d")
    p.add_argument("--until", help="ISO 8601 time or date, or relative: 24h, 7d")
    p.add_argument("--format", default="table", choices=["table", "json", "csv"])
    admin.add_budget_arguments(p)
    p.set_defaults(func=cmd_usage)
    return parser


def _load_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from hubcore import config
    from hubcore.errors import ConfigError

    try:
        return config.load(args.config)
    except ConfigError as e:
        print(f"hubcore: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _ops_socket(args: argparse.Namespace) -> str | None:
    """The configured ops socket, read without resolving vendor keys (which
    may live in a credentials directory only the service can see)."""
    from hubcore import config
    from hubcore.errors import ConfigError

    try:
        return config.load_server(args.config).ops_socket
    except ConfigError as e:
        print(f"hubcore: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _open_db(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from hubcore import store

    cfg = _load_config(args)
    return store.connect(cfg.server.database)


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    import uvloop

    from hubcore import app, runtime

    cfg = _load_config(args)
    problem = app.state_path_problem(cfg)
    if problem is not None:
        print(f"hubcore: cannot start: {problem}", file=sys.stderr)
        return 1
    runtime.setup_logging(cfg)
    runtime.tune_malloc()
    try:
        made = app.first_token(cfg)
    except OSError as e:
        print(f"hubcore: cannot write the first hub token: {e}", file=sys.stderr)
        return 1
    # A terminal is a person watching; anything else (a pipe, a file, the
    # journal) keeps what it is given, so the token stays in its 0600 file.
    if made is not None and sys.stdout.isatty():
        print("No hub tokens yet; created one for user 'admin'. Use it as ANTHROPIC_AUTH_TOKEN / OPENAI_API_KEY:", flush=True)
        print(made[0], flush=True)
    if not any(u.keys for u in cfg.upstreams):
        print("hubcore: warning: no vendor keys configured (set ANTHROPIC_API_KEY / OPENAI_API_KEY or write a config)", file=sys.stderr)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(app.serve(cfg, args.config or os.environ.get("HUBCORE_CONFIG")))


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    keys = sum(len(u.keys) for u in cfg.upstreams)
    print(f"{cfg.source}: ok ({len(cfg.upstreams)} upstreams, {keys} keys)")
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    from hubcore.cli import admin

    conn = _open_db(args)
    try:
        token_id, token = admin.create_token(args, conn)
    finally:
        conn.close()
    if args.json:
        print(orjson.dumps({"id": token_id, "user": args.user, "project": args.project, "token": token}).decode())
    else:
        print(f"created token {token_id} for user {args.user}" + (f", project {args.project}" if args.project else ""))
        print("store it now: it is shown only once", file=sys.stderr)
        print(token)
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    import time

    from hubcore.governance import tokens

    conn = _open_db(args)
    try:
        rows = tokens.list_tokens(conn, include_revoked=args.all)
    finally:
        conn.close()
    if args.json:
        print(orjson.dumps(rows).decode())
        return 0
    header = ("ID", "PREFIX", "USER", "PROJECT", "CREATED", "REVOKED")
    table = [header]
    for r in rows:
        table.append((
            str(r["id"]), f"{r['prefix']}…", str(r["user"]), str(r["project"] or "-"),
            time.strftime("%Y-%m-%d %H:%M", time.gmtime(float(r["created_at"]))),  # type: ignore[arg-type]
            "-" if r["revoked_at"] is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(float(r["revoked_at"]))),  # type: ignore[arg-type]
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from hubcore.governance import tokens

    conn = _open_db(args)
    try:
        ok = tokens.revoke(conn, args.id)
    finally:
        conn.close()
    if not ok:
        print(f"hubcore: no active token with id {args.id}", file=sys.stderr)
        return 1
    print(f"revoked token {args.id}")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    from hubcore.cli import admin
    from hubcore.accounting import report

    if args.budgets:
        return _with_db(args, admin.run_budgets, tz=True)
    conn = _open_db(args)
    try:
        since = report.parse_time(args.since) if args.since else None
        until = report.parse_time(args.until) if args.until else None
    except ValueError as e:
        print(f"hubcore: {e}", file=sys.stderr)
        return 2
    try:
        sys.stdout.write(report.render(conn, by=args.by, since=since, until=until, fmt=args.format))
    finally:
        conn.close()
    return 0
