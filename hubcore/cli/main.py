"""The `hubcore` command: the parser that gathers every command group, and
main(), which runs the command chosen under the one error convention."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from hubcore import __version__
from hubcore.cli import admin, audit, db, ops, prices, route, scopes, serve, tokens, usage
from hubcore.cli.common import USAGE, add_config_option, call

# In the order `hubcore --help` lists them.
GROUPS = (serve, tokens, ops, route, scopes, usage, prices, admin, audit, db)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hubcore", description="A gateway between AI coding clients and vendor APIs.")
    parser.add_argument("--version", action="version", version=f"hubcore {__version__}")
    add_config_option(parser, top=True)
    sub = parser.add_subparsers(metavar="COMMAND")
    for group in GROUPS:
        group.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run = getattr(args, "run", None)
    if run is None:
        parser.print_help()
        return USAGE
    return call(run, args)
