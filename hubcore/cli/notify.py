"""Telling the running hub that tokens or limits changed, so that a change is
live when the command that made it returns (a CI script mints a token and
calls the proxy with it at once).

The database is the truth and the hub's poll of it (every
server.token_reload_interval) the fallback: with no hub running nothing is
said; a hub that does not answer gets a warning, and the command succeeds.
"""
from __future__ import annotations

import argparse
import sqlite3
import time

from hubcore.cli.common import load_server, say
from hubcore.governance import tokens
from hubcore.ops import client as opsclient

# The hub's side is one read of the tokens and limits tables in a worker
# thread (milliseconds); two seconds leave room for a loaded machine without
# making a script wait long on a hub that has hung.
NOTIFY_TIMEOUT = 2.0        # s for the whole exchange, retries included
# Between asks while the hub answers with an older generation than the one
# just written: its read failed (it logs why), or it reads another database.
RETRY_PAUSE = 0.1           # s


def tell_hub(args: argparse.Namespace, conn: sqlite3.Connection) -> None:
    """After a committed change to tokens, users or projects: have the hub
    on the configured ops socket reload now, and wait until it holds the
    generation written (or a later one)."""
    written = tokens.generation(conn)
    # The [server] table alone: this must not resolve vendor keys.
    server = load_server(args)
    if not server.ops_socket:
        return
    later = f"the change reaches the hub within its poll interval ({server.token_reload_interval:g} s)"
    deadline = time.monotonic() + NOTIFY_TIMEOUT
    while True:
        remaining = deadline - time.monotonic()
        try:
            held = opsclient.refresh_tokens(server.ops_socket, timeout=max(remaining, 0.05))
        except opsclient.HubNotRunning:
            return
        except opsclient.OpsClientError as e:
            say(f"warning: the running hub did not confirm the change ({e}); {later}")
            return
        if held >= written:
            return
        if remaining <= RETRY_PAUSE:
            say(
                f"warning: the hub on {server.ops_socket} holds tokens generation {held}, older than "
                f"the {written} just written: is it serving another database than {server.database}?"
            )
            return
        time.sleep(RETRY_PAUSE)
