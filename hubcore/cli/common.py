"""What every command shares: how a command is declared (`--config` comes
with it, `--init` with those on the database), how it finds the config and
the database, and the one way it fails: CommandError, a one-line
`hubcore: ...` on stderr and a non-zero exit status.
"""
from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from hubcore import config, store
from hubcore.database import describe, is_postgres
from hubcore.errors import ConfigError

Command = Callable[[argparse.Namespace], int]
# What add_subparsers() returns.
if TYPE_CHECKING:
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Subcommands = argparse._SubParsersAction

CONFIG_HELP = f"TOML config file (default: $HUBCORE_CONFIG, else {config.SYSTEM_CONFIG} if it exists, else built-in defaults)"
INIT_HELP = "create the database if there is none (`hubcore serve` creates it on its first start)"
# How the stderr lines name the config when no file was found.
DEFAULTS = "built-in defaults"
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
    """A subcommand (or a group of them: no `run`) taking `--config`, and
    `--init` when it runs on the database."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
    add_config_option(parser)
    if run is not None:
        parser.set_defaults(run=run)
        if uses_database(run):
            # SUPPRESS, as for --config: a subcommand's default would
            # overwrite the value given to its group.
            parser.add_argument("--init", action="store_true", default=argparse.SUPPRESS, help=INIT_HELP)
    return parser


# -- what commands read ------------------------------------------------------------

def config_path(args: argparse.Namespace) -> str | None:
    """The config file this command reads (config.locate: the same search as
    `serve`'s), or None for the built-in defaults."""
    return config.locate(getattr(args, "config", None), dict(os.environ))


def load_config(args: argparse.Namespace) -> config.Config:
    return config.load(config_path(args))


def load_server(args: argparse.Namespace) -> config.ServerConfig:
    """Only the [server] table: for commands that must not resolve vendor keys
    (they may live in a credentials directory only the service can see)."""
    return config.load_server(config_path(args))


@dataclass(frozen=True, slots=True)
class Context:
    """What a command on the database works with: the connection, the time
    zone of the budget windows (server.budget_timezone), and its moment."""

    conn: sqlite3.Connection
    tz: str = "UTC"
    now: float = field(default_factory=time.time)


# What on_database made: add_command gives these `--init`.
_DATABASE_COMMANDS: set[Command] = set()


@contextmanager
def database(args: argparse.Namespace) -> Iterator[Context]:
    """The configured database, open for the length of a command. It reads
    only [server] (never a vendor key), creates no database unless `--init`
    asks, and once the command is done names on stderr the database and the
    config it used: a command run with the wrong config shows it there,
    while stdout stays what scripts parse."""
    found = config_path(args)
    server = config.load_server(found)
    path = server.database
    source = found or DEFAULTS
    if is_postgres(path):
        conn = _open_postgres(path, getattr(args, "init", False), source)
    else:
        conn = _open_sqlite(path, getattr(args, "init", False), source)
    try:
        yield Context(conn, server.budget_timezone)
    finally:
        conn.close()
    say(f"database {describe(path)} (config {source})")


def _open_sqlite(path: str, init: bool, source: str) -> sqlite3.Connection:
    if not os.path.exists(path):
        problem = store.path_problem(path)
        if problem is not None:
            raise CommandError(f"cannot open the database {path}: {problem}")
        if not init:
            # A token minted into a new database opens nothing on the hub
            # that serves another one.
            raise CommandError(
                f"no database at {os.path.abspath(path)} (config: {source}); "
                "run `hubcore serve` once, or pass --init to create it"
            )
    return store.connect(path)


def _open_postgres(path: str, init: bool, source: str) -> sqlite3.Connection:
    """The PostgreSQL database, its schema made only with --init (as a
    SQLite file is created only then)."""
    from hubcore import pgstore

    conn = pgstore.connect(path, migrate=False)
    try:
        if not init and conn.schema_version() == 0:
            raise CommandError(
                f"no hubcore schema in {describe(path)} (config: {source}); "
                "run `hubcore serve` once, or pass --init to create it"
            )
        conn.migrate()
    except sqlite3.Error as e:
        conn.close()
        raise CommandError(f"cannot open the database {describe(path)}: {e}") from e
    except BaseException:
        conn.close()
        raise
    return cast(sqlite3.Connection, conn)


def on_database(body: Callable[[argparse.Namespace, Context], int]) -> Command:
    """The command that runs `body` on the configured database."""

    def run(args: argparse.Namespace) -> int:
        with database(args) as ctx:
            return body(args, ctx)

    run.__doc__ = body.__doc__
    _DATABASE_COMMANDS.add(run)
    return run


def uses_database(run: Command) -> bool:
    """Whether `run` was made by on_database."""
    return run in _DATABASE_COMMANDS
