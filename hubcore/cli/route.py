"""`hubcore route explain`: where the running hub would send a request for a
model, and why not elsewhere (over the ops socket: the answer depends on the
keys' live states)."""
from __future__ import annotations

import argparse
import sys
from typing import Any
from urllib.parse import urlencode

import orjson

from hubcore.cli.common import CommandError, Subcommands, add_command
from hubcore.cli.ops import configured_socket
from hubcore.ops import client as opsclient


def add_commands(sub: Subcommands) -> None:
    route = add_command(sub, "route", "how requests are routed among upstreams")
    actions = route.add_subparsers(metavar="ACTION", required=True)
    p = add_command(actions, "explain", "the upstreams and keys a request for a model would go to, and why", run_explain)
    p.add_argument("--model", required=True, help="the model id a client would send")
    p.add_argument("--kind", choices=("anthropic", "openai"), help="only this route kind (default: every kind)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--token-id", type=int, metavar="N", help="as this token would be routed (its groups)")
    who.add_argument("--user", metavar="NAME", help="as this user would be routed (the user's groups)")
    p.add_argument("--json", action="store_true", help="the hub's answer as JSON")
    opsclient.add_socket_argument(p)


def run_explain(args: argparse.Namespace) -> int:
    query = {"model": args.model}
    if args.kind:
        query["kind"] = args.kind
    if args.token_id is not None:
        query["token_id"] = str(args.token_id)
    if args.user:
        query["user"] = args.user
    socket_path = opsclient.resolve_socket(args.socket, configured_socket(args))
    try:
        status, answer = opsclient.request_json(socket_path, "/route/explain?" + urlencode(query))
    except opsclient.OpsClientError as e:
        raise CommandError(f"{e} (is the hub running?)", e.exit_code) from None
    if status != 200 or not isinstance(answer, dict):
        message = answer.get("error") if isinstance(answer, dict) else None
        raise CommandError(str(message or f"the hub answered {status}"))
    if args.json:
        sys.stdout.write(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(render(answer))
    return 0


def _chance(probability: float, excluded: str | None) -> str:
    return "-" if excluded is not None else f"{probability:.0%}"


def render(answer: dict[str, Any]) -> str:
    """The explanation as an operator reads it: per route kind, the
    upstreams in the order they are considered, then each one's keys."""
    groups = answer.get("groups")
    lines = [f"model {answer.get('model')!r} for {answer.get('principal')}"
             + ("" if groups is None else f", groups {','.join(groups) or '(none)'}"), ""]
    for route in answer.get("routes", []):
        upstreams = route.get("upstreams", [])
        lines.append(f"{route.get('kind')} upstreams, in the order they are considered:")
        lines.append(opsclient.format_table(
            ["upstream", "priority", "weight", "group", "chance", "sends model", "why not"],
            [[u["name"], u["priority"], u["weight"], u["group"], _chance(u["probability"], u["excluded"]),
              u.get("sends_model"), u["excluded"]] for u in upstreams],
            right=(1, 2, 4),
        ))
        for u in upstreams:
            if u["excluded"] is None and u["keys"]:
                lines.append(f"  keys of {u['name']}:")
                table = opsclient.format_table(
                    ["key", "state", "chance", "why not"],
                    [[k["label"], k["state"], _chance(k["probability"], k["excluded"]), k["excluded"]] for k in u["keys"]],
                    right=(2,),
                )
                lines += ["  " + line for line in table.splitlines()]
        if not any(u["excluded"] is None for u in upstreams):
            lines.append("  no upstream can take it now: the client gets the hub's error")
        lines.append("")
    return "\n".join(lines)
