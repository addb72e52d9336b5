"""The `hubcore` command: the parser that gathers every command group, and
main(), which runs the command chosen under the one error convention.

`hubcore statusline` runs a prompt's line, which waits for it: main() hands
it to its module (standard library only) before anything else is imported.
The command groups, and what they import, take some 0.4 s to import, which
the other commands can afford; so this module imports them only in
build_parser()."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from types import ModuleType

from hubcore import __version__


def command_groups() -> tuple[ModuleType, ...]:
    """Every command group, in the order `hubcore --help` lists them."""
    from hubcore.cli import admin, alerts, audit, db, ops, prices, route, scopes, serve, statusline, tokens, usage

    return (serve, tokens, ops, route, scopes, usage, prices, admin, audit, alerts, db, statusline)


def build_parser() -> argparse.ArgumentParser:
    from hubcore.cli.common import add_config_option

    parser = argparse.ArgumentParser(prog="hubcore", description="A gateway between AI coding clients and vendor APIs.")
    parser.add_argument("--version", action="version", version=f"hubcore {__version__}")
    add_config_option(parser, top=True)
    sub = parser.add_subparsers(metavar="COMMAND")
    for group in command_groups():
        group.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        import sys

        argv = sys.argv[1:]
    if argv[:1] == ["statusline"]:
        from hubcore.cli import statusline

        return statusline.main(list(argv[1:]))
    from hubcore.cli.common import USAGE, call

    parser = build_parser()
    args = parser.parse_args(argv)
    run = getattr(args, "run", None)
    if run is None:
        parser.print_help()
        return USAGE
    return call(run, args)
