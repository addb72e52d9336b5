"""`hubcore statusline`: one short line of the caller's spend for Claude
Code's `statusLine` setting and any shell prompt, e.g.

    hub $3.12 today · $46.88 left this month (resets Jan 1)

It asks the hub's GET /hubcore/v1/me with the client's own settings
(ANTHROPIC_BASE_URL, ANTHROPIC_AUTH_TOKEN or ANTHROPIC_API_KEY; or --url and
--token; a hub on HTTPS under a private CA is trusted through the
NODE_EXTRA_CA_CERTS Claude Code reads too). A prompt waits for it, so it must never fail one: it prints the
line within its deadline (--timeout, 200 ms) or nothing, and exits 0 whatever
happens (no hub, a hub that never answers, a bad token, a bad answer).

Start-up is most of its time, so this module imports only the standard
library, and `hubcore statusline` reaches it before the other commands are
imported (hubcore.cli.main).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse

DEFAULT_TIMEOUT = 0.2  # seconds, all of it: connect, ask, read
ME_PATH = "/hubcore/v1/me"
# An answer is a few hundred bytes; a larger one is not the hub's.
MAX_ANSWER = 256 * 1024
# What Claude Code writes on stdin (the session as JSON) is read and dropped,
# up to this much: never more than what is already there.
MAX_STDIN = 1024 * 1024
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
WINDOW_WORDS = {
    "5h": "in 5 h", "day": "today", "week": "this week", "month": "this month", "total": "in total",
}


def add_commands(sub: Any) -> None:
    """`hubcore statusline` in the full parser (`hubcore --config FILE
    statusline`, --help); `hubcore statusline` itself comes to main() here
    without it (hubcore.cli.main)."""
    from hubcore.cli.common import add_command

    parser = add_command(sub, "statusline", "print one line of your spend, for Claude Code's statusLine or a prompt", run)
    add_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="the hub's base URL (default: $ANTHROPIC_BASE_URL)")
    parser.add_argument(
        "--token", help="the hub token (default: $ANTHROPIC_AUTH_TOKEN, else $ANTHROPIC_API_KEY)",
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT,
        help=f"seconds to wait for the hub before printing nothing (default {DEFAULT_TIMEOUT})",
    )


def main(argv: list[str]) -> int:
    """`hubcore statusline [--url URL] [--token TOKEN] [--timeout S]`, on
    its own parser (the fast path of hubcore.cli.main). Exits 0, always."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="hubcore statusline", description="Print one line of your hub spend (for Claude Code's statusLine).",
    )
    add_arguments(parser)
    # Taken, like every command's, and not needed: the hub is asked, not its config.
    parser.add_argument("--config", help=argparse.SUPPRESS)
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        return 0  # --help, or a usage error argparse has already explained on stderr
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Print the status line, or nothing; exit status 0 whatever happened."""
    started = time.monotonic()
    env = os.environ
    url = args.url or env.get("ANTHROPIC_BASE_URL") or ""
    token, bearer = args.token, True
    if not token:
        token = env.get("ANTHROPIC_AUTH_TOKEN")
    if not token:
        token, bearer = env.get("ANTHROPIC_API_KEY"), False
    timeout = args.timeout if args.timeout is not None and args.timeout > 0 else DEFAULT_TIMEOUT
    deadline = started + timeout
    line = None
    if url and token:
        line = status_line(url, token, bearer, deadline)
    drain_stdin()
    if line:
        write_line(line)
    return 0


def write_line(line: str) -> None:
    out = sys.stdout.buffer
    try:
        out.write(line.encode("utf-8") + b"\n")
        out.flush()
    except OSError:
        # The reader went away (a prompt redrawn, a closed pipe). Python's
        # own flush at exit would fail again and exit 120: as the Python
        # docs advise for SIGPIPE, point stdout at /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def status_line(url: str, token: str, bearer: bool, deadline: float) -> str | None:
    """The line for the hub's answer, or None when none came by `deadline`
    (time.monotonic()) or it was not a good one.

    The question runs in a daemon thread that the caller stops waiting for
    at the deadline: socket timeouts bound each connect and read, but not a
    name lookup, nor a hub that sends a byte at a time."""
    result: list[dict[str, Any] | None] = [None]

    def ask() -> None:
        result[0] = fetch_me(url, token, bearer, deadline)

    worker = threading.Thread(target=ask, name="hubcore-statusline", daemon=True)
    worker.start()
    worker.join(max(0.0, deadline - time.monotonic()))
    me = result[0]
    if worker.is_alive() or me is None:
        return None
    try:
        return render(me)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
        return None  # an answer of another shape: another hub version, or not a hub


def fetch_me(url: str, token: str, bearer: bool, deadline: float) -> dict[str, Any] | None:
    """GET /hubcore/v1/me under the base `url`; the JSON object of a 200, else None."""
    import http.client
    import json
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host or parts.scheme not in ("http", "https"):
        return None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return None
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(host, port, timeout=remaining, context=tls_context())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=remaining)
    headers = {"accept": "application/json", "user-agent": "hubcore-statusline"}
    if bearer:
        headers["authorization"] = f"Bearer {token}"
    else:
        headers["x-api-key"] = token
    try:
        conn.request("GET", parts.path.rstrip("/") + ME_PATH, headers=headers)
        response = conn.getresponse()
        body = response.read(MAX_ANSWER + 1)
        if response.status != 200 or len(body) > MAX_ANSWER:
            return None
        me = json.loads(body)
    except (OSError, http.client.HTTPException, ValueError, UnicodeError):
        return None
    finally:
        conn.close()
    return me if isinstance(me, dict) else None


def tls_context() -> Any:
    """The system's CAs (and $SSL_CERT_FILE), plus $NODE_EXTRA_CA_CERTS: the
    CA file a Claude Code user with a hub on a private CA already set."""
    import ssl

    context = ssl.create_default_context()
    extra = os.environ.get("NODE_EXTRA_CA_CERTS")
    if extra:
        try:
            context.load_verify_locations(extra)
        except (OSError, ssl.SSLError):
            pass  # as Node does: a CA file it cannot read adds nothing
    return context


def render(me: dict[str, Any]) -> str:
    """`hub $3.12 today · $46.88 left this month (resets Jan 1)`: the user's
    spend today and the tightest budget; without a budget, the month's spend."""
    spend = me["spend"]
    parts = [f"hub {usd(spend['today']['user_micros'])} today"]
    tightest = me.get("tightest")
    if tightest:
        text = f"{usd(tightest['remaining_micros'])} left {WINDOW_WORDS.get(tightest['window'], tightest['window'])}"
        notes = []
        if tightest["kind"] == "project":
            notes.append(f"project {tightest['name']}")
        if tightest.get("resets"):
            notes.append("resets " + when(tightest["resets"], float(me["now"])))
        parts.append(f"{text} ({', '.join(notes)})" if notes else text)
    else:
        parts.append(f"{usd(spend['month']['user_micros'])} this month")
    return " · ".join(parts)


def usd(micros: int) -> str:
    """Micro-dollars as dollars and cents, rounded half up, from integers."""
    if not isinstance(micros, int) or isinstance(micros, bool):
        raise TypeError(f"an amount of micro-dollars, not {micros!r}")
    cents = (abs(micros) + 5_000) // 10_000
    return f"{'-' if micros < 0 else ''}${cents // 100:,}.{cents % 100:02d}"


def when(resets: str, now: float) -> str:
    """A reset moment (RFC 3339 in the hub's budget timezone) as its time
    when it is today there, else as its date: "18:00", "Jan 1"."""
    moment = datetime.fromisoformat(resets)
    today = datetime.fromtimestamp(now, moment.tzinfo).date()
    if moment.date() == today:
        return f"{moment:%H:%M}"
    return f"{MONTHS[moment.month - 1]} {moment.day}"


def drain_stdin() -> None:
    """Read what Claude Code wrote on stdin (and drop it) so that its write
    cannot fail, without ever waiting: not on a terminal, and only what is
    already there."""
    import select

    stdin = sys.stdin
    try:
        if stdin is None or stdin.isatty():
            return
        fd = stdin.fileno()
        taken = 0
        while taken < MAX_STDIN:
            readable, _, _ = select.select([fd], [], [], 0)
            if not readable:
                return
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            taken += len(chunk)
    except (OSError, ValueError):
        return  # closed, or no real file: nothing to drain
