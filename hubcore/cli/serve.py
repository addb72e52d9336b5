"""`hubcore serve` and `hubcore check-config`."""
from __future__ import annotations

import argparse
import os
import sys

from hubcore.cli.common import CommandError, Subcommands, add_command, load_config, say


def add_commands(sub: Subcommands) -> None:
    add_command(sub, "serve", "run the proxy", run_serve)
    add_command(sub, "check-config", "load and validate the config, then exit", run_check_config)


def run_serve(args: argparse.Namespace) -> int:
    """Check the config and the state directories, set up the process, and
    serve until SIGTERM."""
    # The server's modules load only for this command: the others start fast.
    import asyncio

    import uvloop

    from hubcore import app, runtime

    cfg = load_config(args)
    problem = app.state_path_problem(cfg)
    if problem is not None:
        raise CommandError(f"cannot start: {problem}")
    runtime.setup_logging(cfg)
    runtime.tune_malloc()
    try:
        made = app.first_token(cfg)
    except OSError as e:
        raise CommandError(f"cannot write the first hub token: {e}") from None
    # A terminal is a person watching; anything else (a pipe, a file, the
    # journal) keeps what it is given, so the token stays in its 0600 file.
    if made is not None and sys.stdout.isatty():
        print("No hub tokens yet; created one for user 'admin'. Use it as ANTHROPIC_AUTH_TOKEN / OPENAI_API_KEY:", flush=True)
        print(made[0], flush=True)
    if not any(u.keys for u in cfg.upstreams):
        say("warning: no vendor keys configured (set ANTHROPIC_API_KEY / OPENAI_API_KEY or write a config)")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(app.serve(cfg, args.config or os.environ.get("HUBCORE_CONFIG")))


def run_check_config(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    keys = sum(len(u.keys) for u in cfg.upstreams)
    print(f"{cfg.source}: ok ({len(cfg.upstreams)} upstreams, {keys} keys)")
    return 0
