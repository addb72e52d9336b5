"""The hubcore command line: one module per command group (serve, tokens,
scopes, usage, ops), each command a function `run_*(args) -> int` that
raises CommandError to fail; common.py holds what they share (the --config
option, the config, the database), render.py all they print for people."""

from hubcore.cli.main import main

__all__ = ["main"]
