"""What every command shares: how a command is declared (`--config` comes
with it), how it reads the config and the database, and the one way it fails:
CommandError, a one-line `hubcore: ...` on stderr and a non-zero exit status.
"""
from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hubcore import config, store
from hubcore.errors import ConfigError

Command = Callable[[argparse.Namespace], int]
# What add_subparsers() returns.
if TYPE_CHECKING:
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Subcommands = argparse._SubParsersAction

CONFIG_HELP = "TOML config file (default: $HUBCORE_CONFIG, else built-in defaults)"
# Exit statuses: 1 the command failed, 2 it was given something it cannot
# use (as argparse exits on a usage error), 130 interrupted (128 + SIGINT).
FAILED = 1
USAGE = 2
INTERRUPTED = 130


class CommandError(Exception):
    """Why a command stops: one line for stderr, and the exit status."""

    def __init__(self, message: str, status: int = FAILED) -> None:
        super().__init__(message)
        self.status = status


def say(message: str) -> None:
    """A line for the operator on stderr, in the commands' one voice."""
    print(f"hubcore: {message}", file=sys.stderr)


def call(run: Command, args: argparse.Namespace) -> int:
    """Run one command; its failures become their line on stderr and exit status."""
    try:
        return int(run(args))
    except KeyboardInterrupt:
        return INTERRUPTED
    except CommandError as e:
        say(str(e))
        return e.status
    except ConfigError as e:
        say(f"config error: {e}")
        return USAGE
    except (store.CannotOpen, store.SchemaTooNew) as e:
        say(str(e))
        return FAILED


# -- declaring commands ------------------------------------------------------------

def add_config_option(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    """`--config`, given before the subcommand or after it. Below the top it
    sets nothing unless given: a subcommand's default would overwrite the value
    given before it."""
    parser.add_argument("--config", help=CONFIG_HELP, default=None if top else argparse.SUPPRESS)


def add_command(sub: Subcommands, name: str, help: str, run: Command | None = None) -> argparse.ArgumentParser:
    """A subcommand (or a group of them: no `run`) taking `--config`."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
    add_config_option(parser)
    if run is not None:
        parser.set_defaults(run=run)
    return parser


# -- what commands read ------------------------------------------------------------

def load_config(args: argparse.Namespace) -> config.Config:
    return config.load(getattr(args, "config", None))


def load_server(args: argparse.Namespace) -> config.ServerConfig:
    """Only the [server] table: for commands that must not resolve vendor keys
    (they may live in a credentials directory only the service can see)."""
    return config.load_server(getattr(args, "config", None))


@dataclass(frozen=True, slots=True)
class Context:
    """What a command on the database works with: the connection, the time
    zone of the budget windows (server.budget_timezone), and its moment."""

    conn: sqlite3.Connection
    tz: str = "UTC"
    now: float = field(default_factory=time.time)


@contextmanager
def database(args: argparse.Namespace) -> Iterator[Context]:
    """The configured database, open for the length of a command."""
    cfg = load_config(args)
    conn = store.connect(cfg.server.database)
    try:
        yield Context(conn, cfg.server.budget_timezone)
    finally:
        conn.close()


def on_database(body: Callable[[argparse.Namespace, Context], int]) -> Command:
    """The command that runs `body` on the configured database."""

    def run(args: argparse.Namespace) -> int:
        with database(args) as ctx:
            return body(args, ctx)

    run.__doc__ = body.__doc__
    return run
