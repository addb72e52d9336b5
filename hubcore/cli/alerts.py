"""`hubcore alert test`: one test alert to every [[alert]] target of the
config, and each target's answer. It reads only the [[alert]] entries
(never a vendor key) and needs no running hub."""
from __future__ import annotations

import argparse
import asyncio

from hubcore import config
from hubcore.cli.common import CommandError, Subcommands, add_command, config_path
from hubcore.ops.alerts import send_test


def add_commands(sub: Subcommands) -> None:
    group = add_command(sub, "alert", "try the [[alert]] webhooks of the config")
    actions = group.add_subparsers(metavar="ACTION")
    add_command(
        actions, "test",
        "send one test alert to every [[alert]] target and print each one's answer "
        "(exit status 1 if any failed)",
        run_test,
    )


def run_test(args: argparse.Namespace) -> int:
    """Each target on a line by its label, never its URL: `alert[0]
    (json): 200` or `ops (slack): failed: no answer within 5 s`."""
    alerts = config.load_alerts(config_path(args))
    if not alerts:
        raise CommandError("no [[alert]] in the config: nothing to test")
    answers = asyncio.run(send_test(alerts))
    failed = 0
    for alert, answer in answers:
        if answer.ok:
            print(f"{alert.label} ({alert.format}): {answer.status}")
        else:
            failed += 1
            print(f"{alert.label} ({alert.format}): failed: {answer.describe()}")
    return 1 if failed else 0
