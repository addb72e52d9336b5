"""`hubcore stats`, `hubcore keys`, `hubcore reload`: the running hub, over
its ops socket (the client and its renderings are hubcore.ops.client)."""
from __future__ import annotations

import argparse

from hubcore.cli.common import Subcommands, add_command, load_server
from hubcore.ops import client as opsclient


def add_commands(sub: Subcommands) -> None:
    p = add_command(sub, "stats", "show the running hub's state (over the ops socket)", run_stats)
    opsclient.add_stats_arguments(p)
    p = add_command(sub, "keys", "show the vendor keys' health; enable, disable or reset one", run_keys)
    opsclient.add_keys_arguments(p)
    p = add_command(sub, "reload", "reload config keys, tokens and prices (like SIGHUP)", run_reload)
    opsclient.add_reload_arguments(p)


def configured_socket(args: argparse.Namespace) -> str:
    """The config's ops socket, read without resolving vendor keys; --socket
    and $HUBCORE_OPS_SOCKET come before it (opsclient.resolve_socket)."""
    return load_server(args).ops_socket


def run_stats(args: argparse.Namespace) -> int:
    return opsclient.run_stats(args, default_socket=configured_socket(args))


def run_keys(args: argparse.Namespace) -> int:
    return opsclient.run_keys(args, default_socket=configured_socket(args))


def run_reload(args: argparse.Namespace) -> int:
    return opsclient.run_reload(args, default_socket=configured_socket(args))
