"""`hubcore serve` and `hubcore check-config`."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from hubcore import config, store
from hubcore.cli.common import USAGE, CommandError, Subcommands, add_command, config_path, say
from hubcore.database import is_postgres
from hubcore.errors import ConfigError

log = logging.getLogger("hubcore")


def add_commands(sub: Subcommands) -> None:
    p = add_command(sub, "serve", "run the proxy", run_serve)
    p.add_argument("--listen", metavar="HOST:PORT", help="listen here instead of the config's [server] listen")
    add_command(sub, "check-config", "load and validate the config and its paths, then exit", run_check_config)


def run_serve(args: argparse.Namespace) -> int:
    """Check the config and the state directories, set up the process, and
    serve until SIGTERM."""
    # The server's modules load only for this command: the others start fast.
    import asyncio

    import uvloop

    from hubcore import app, runtime, supervisor

    found = config_path(args)
    cfg = config.load(found)
    if args.listen is not None:
        try:
            cfg = config.with_listen(cfg, args.listen)
        except ConfigError as e:
            raise CommandError(str(e), USAGE) from None
    # One of several workers, started by the supervisor below.
    slot = supervisor.worker_slot()
    siblings: list[str] = []
    if slot is not None:
        if not supervisor.follow_supervisor():
            raise CommandError("cannot start: the supervisor that started this worker is gone")
        if slot.index == 0:  # the dashboard's
            siblings = supervisor.sibling_sockets(cfg, slot)
        cfg = supervisor.worker_config(cfg, slot)
    problem = app.start_problem(cfg)
    if problem is not None:
        raise CommandError(f"cannot start: {problem}")
    # From here on the hub's own lines go through its logger, in the
    # configured format (JSON lines under log_format = "json").
    runtime.setup_logging(cfg)
    if slot is not None:
        supervisor.name_worker_logs(slot.index)
    elif not any(u.keys for u in cfg.upstreams):  # said once, by the supervisor when there is one
        log.warning("no vendor keys configured (set ANTHROPIC_API_KEY / OPENAI_API_KEY or write a config)")
    if slot is None and cfg.server.workers > 1:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(supervisor.supervise(cfg, found, args.listen, show_token=show_on_terminal))
    runtime.tune_malloc()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        show = None if slot is not None else show_on_terminal
        return runner.run(app.serve(cfg, found, show_token=show, worker=slot is not None, sibling_ops_sockets=siblings))


def show_on_terminal(token: str) -> None:
    """Print the first token when a person is watching. Anything else (a
    pipe, a file, the journal) keeps what it is given, so the token stays in
    its 0600 file."""
    if sys.stdout.isatty():
        print("No hub tokens yet; created one for user 'admin'. Use it as ANTHROPIC_AUTH_TOKEN / OPENAI_API_KEY:", flush=True)
        print(token, flush=True)


def run_check_config(args: argparse.Namespace) -> int:
    """Load the config as `serve` would, check what `serve` checks before it
    starts and an existing database, and warn of what would serve nothing."""
    from hubcore import app

    cfg = config.load(config_path(args))
    for name, path in app.state_paths(cfg):
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.exists(directory):
            # systemd makes StateDirectory= and RuntimeDirectory= when the
            # service starts: before its first start they do not exist yet.
            say(f"warning: {name} {path}: directory {directory} does not exist; "
                "`hubcore serve` needs it (systemd makes its own when the service starts)")
    problem = app.start_problem(cfg, missing_directories=True)
    if problem is None and is_postgres(cfg.server.database):
        from hubcore import pgstore

        reason = pgstore.database_problem(cfg.server.database)
        problem = f"database {cfg.server.database}: {reason}" if reason else None
    elif problem is None and os.path.exists(cfg.server.database):
        reason = store.database_problem(cfg.server.database)
        problem = f"database {cfg.server.database}: {reason}" if reason else None
    if problem is not None:
        raise CommandError(f"{cfg.source}: {problem}")
    if not cfg.upstreams:
        say("warning: no [[upstream]]: every request will be refused")
    for upstream in cfg.upstreams:
        if not upstream.keys:
            say(f"warning: upstream {upstream.name!r} has no keys: its requests will be refused")
    keys = sum(len(u.keys) for u in cfg.upstreams)
    print(f"{cfg.source}: ok ({len(cfg.upstreams)} upstreams, {keys} keys)")
    return 0
