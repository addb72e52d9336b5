"""The CLI side of the ops socket: `hubcore stats`, `hubcore keys`, `hubcore reload`.

A small blocking HTTP/1.1 client over AF_UNIX (h11), the text renderings an
operator reads, and the argparse pieces cli.py wires in.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO
from urllib.parse import quote

import h11
import orjson

DEFAULT_OPS_SOCKET = "/run/hubcore/ops.sock"
OPS_SOCKET_ENV = "HUBCORE_OPS_SOCKET"
FETCH_TIMEOUT = 5.0                  # s for connect + request + response
DEFAULT_WATCH_INTERVAL = 2.0         # s, like watch(1)
MAX_RESPONSE = 16 * 1024 * 1024      # bytes; /metrics of a very large key ring stays far below

# Exit codes: sysexits.h values where one fits, so scripts can tell
# "hub not there" from "hub said no".
EXIT_OK = 0
EXIT_FAILED = 1          # the hub answered with an error
EXIT_UNAVAILABLE = 69    # EX_UNAVAILABLE: no socket, nobody listening, bad answer
EXIT_NOPERM = 77         # EX_NOPERM: the socket exists but we may not connect

# Redraw in place like top(1): home, each line clears its tail, then clear
# whatever the previous, longer frame left below.
_HOME = "\x1b[H"
_CLEAR_EOL = "\x1b[K"
_CLEAR_BELOW = "\x1b[J"
_CLEAR_SCREEN = "\x1b[2J"


class OpsClientError(Exception):
    """The ops request could not be made or answered; carries the exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_UNAVAILABLE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def failed_exchange(error: BaseException, socket_path: str, timeout: float) -> OpsClientError:
    """What a failed exchange with an ops socket says: no answer in time, a
    broken answer, or the socket's own error."""
    if isinstance(error, TimeoutError):
        return OpsClientError(f"no answer from {socket_path} within {timeout:g}s")
    if isinstance(error, h11.ProtocolError):
        return OpsClientError(f"bad answer from {socket_path}: {error}")
    if isinstance(error, OSError):
        return OpsClientError(f"{socket_path}: {error.strerror or error}")
    return OpsClientError(f"{socket_path}: {error}")


class HubNotRunning(OpsClientError):
    """No socket file, or nobody listening on it: no hub to ask."""


# -- transport --------------------------------------------------------------------

def resolve_socket(explicit: str | None, configured: str | None = None) -> str:
    """--socket, else $HUBCORE_OPS_SOCKET, else the config's ops_socket, else the default."""
    return explicit or os.environ.get(OPS_SOCKET_ENV) or configured or DEFAULT_OPS_SOCKET


def fetch(socket_path: str, path: str, method: str = "GET", *,
          timeout: float = FETCH_TIMEOUT) -> tuple[int, bytes]:
    """One request over the ops socket: ``(status, body)``; raises OpsClientError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        _connect(sock, socket_path)
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(method=method, target=path, headers=[
            ("host", "hubcore"), ("content-length", "0"), ("connection", "close"),
        ])
        sock.sendall(conn.send(request) + conn.send(h11.EndOfMessage()))
        return _read_response(conn, sock)
    except (OSError, h11.ProtocolError) as exc:  # TimeoutError among them
        raise failed_exchange(exc, socket_path, timeout) from exc
    finally:
        sock.close()


def _connect(sock: socket.socket, socket_path: str) -> None:
    try:
        sock.connect(socket_path)
    except FileNotFoundError:
        raise HubNotRunning(
            f"no ops socket at {socket_path}: is hubcore running, and is that its "
            f"server.ops_socket? (choose another with --socket or ${OPS_SOCKET_ENV})") from None
    except PermissionError:
        raise OpsClientError(
            f"permission denied on {socket_path}: run as the hub's user, or join the group "
            "the socket belongs to (server.ops_socket_group)", EXIT_NOPERM) from None
    except ConnectionRefusedError:
        raise HubNotRunning(
            f"nothing is listening on {socket_path} (a socket left by a stopped hub?)") from None


def _read_response(conn: h11.Connection, sock: socket.socket) -> tuple[int, bytes]:
    status = 0
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(sock.recv(64 * 1024))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_RESPONSE:
                raise OpsClientError(f"ops response larger than {MAX_RESPONSE} bytes")
        elif isinstance(event, h11.EndOfMessage):
            return status, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            raise OpsClientError("the hub closed the ops connection before answering")


def request_json(socket_path: str, path: str, method: str = "GET", *,
                 timeout: float = FETCH_TIMEOUT) -> tuple[int, Any]:
    status, body = fetch(socket_path, path, method, timeout=timeout)
    try:
        return status, orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise OpsClientError(f"ops answer to {path} is not JSON: {exc}") from None


def get_stats(socket_path: str, *, timeout: float = FETCH_TIMEOUT) -> dict[str, Any]:
    status, data = request_json(socket_path, "/stats", timeout=timeout)
    if status != 200 or not isinstance(data, dict):
        raise OpsClientError(f"/stats answered {status}: {_error_text(data)}", EXIT_FAILED)
    return data


def refresh_tokens(socket_path: str, *, timeout: float = FETCH_TIMEOUT) -> int:
    """Have the hub reload its tokens and limits now; the tokens generation
    it then holds. HubNotRunning when there is no hub to ask."""
    status, data = request_json(socket_path, "/tokens/refresh", "POST", timeout=timeout)
    generation = data.get("generation") if isinstance(data, dict) else None
    if status != 200 or not isinstance(generation, int):
        raise OpsClientError(f"/tokens/refresh answered {status}: {_error_text(data)}", EXIT_FAILED)
    return generation


def _error_text(data: Any) -> str:
    if isinstance(data, dict):
        return str(data.get("error") or data.get("message") or data)
    return str(data)


# -- rendering ------------------------------------------------------------------------

def format_duration(seconds: float | None) -> str:
    """A latency for humans: 85us, 12.3ms, 2.41s, 3.5m."""
    if seconds is None:
        return "-"
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f}us"
    if seconds < 1.0:
        ms = seconds * 1e3
        return f"{ms:.2f}ms" if ms < 10 else f"{ms:.1f}ms" if ms < 100 else f"{ms:.0f}ms"
    if seconds < 10.0:
        return f"{seconds:.2f}s"
    if seconds < 120.0:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.1f}m"


def format_quantile(summary: Mapping[str, Any], name: str) -> str:
    """One quantile of a /stats latency summary; beyond the histogram's last
    bound all that is known is "more than that" (HubMetrics summary)."""
    value = summary.get(name)
    if value is None and summary.get("count") and summary.get("above_last_bound"):
        return f"> {format_duration(summary.get('last_bound'))}"
    return format_duration(value)


def format_uptime(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


def printable(text: str) -> str:
    """Control characters escaped: labels and vendor error messages must not
    break a table line or send escape sequences to the operator's terminal."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
                 right: Iterable[int] = ()) -> str:
    """Columns padded to their widest cell; ``right`` holds right-aligned column indexes."""
    text_rows = [[("-" if v is None or v == "" else printable(str(v))) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    right_set = set(right)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right_set else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(list(headers)), *(line(r) for r in text_rows)])


def flatten_keys(stats: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The per-upstream key rings of a /stats answer as one list with ``upstream`` set."""
    rows: list[dict[str, Any]] = []
    for upstream, ring in (stats.get("keys") or {}).items():
        for key in ring:
            rows.append({"upstream": upstream, **key})
    return rows


def format_keys(rows: Sequence[Mapping[str, Any]], *, now: float | None = None) -> str:
    """The key tables: one per upstream, in the order the upstreams first
    come, one line per vendor key."""
    if not rows:
        return "no vendor keys loaded"
    now = time.time() if now is None else now
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for k in rows:
        groups.setdefault(str(k.get("upstream") or "-"), []).append(k)
    headers = ("KEY", "STATE", "FOR", "PRIO", "WEIGHT", "WORKSPACE", "ORG",
               "INFLIGHT", "REQUESTS", "429S", "ERRORS", "FAILS", "HEADROOM", "LAST ERROR")
    blocks = []
    for upstream, keys in groups.items():
        table = []
        for k in keys:
            until = k.get("until")
            remaining = f"{max(0.0, float(until) - now):.0f}s" if until is not None else None
            last_error = k.get("last_error")
            if last_error and len(str(last_error)) > 60:
                last_error = str(last_error)[:57] + "..."
            table.append((k.get("label"), k.get("state"), remaining,
                          k.get("priority"), k.get("weight"), k.get("workspace"), k.get("org"),
                          k.get("in_flight"), k.get("requests"), k.get("rate_limited"),
                          k.get("errors"), k.get("consecutive_failures"), format_headroom(k, now), last_error))
        lines = format_table(headers, table, right=(2, 3, 4, 7, 8, 9, 10, 11)).splitlines()
        count = f"{len(keys)} key" if len(keys) == 1 else f"{len(keys)} keys"
        blocks.append("\n".join([f"upstream {printable(upstream)}: {count}", *("  " + line for line in lines)]))
    return "\n\n".join(blocks)


def format_headroom(key: Mapping[str, Any], now: float) -> str:
    """A key's room per model class, as the vendor last reported it, and the
    classes resting after a 429: `sonnet 62% (tokens, resets 12:00:30);
    opus resting 25s`. Times are local; a reset a day or more away has its date."""
    parts = []
    for model_class, reading in sorted((key.get("headroom") or {}).items()):
        remaining = float(reading.get("remaining", 1.0))
        percent = f"{remaining * 100:.1f}%" if 0 < remaining < 0.01 else f"{remaining * 100:.0f}%"
        resets = float(reading.get("resets", now))
        shape = "%Y-%m-%d %H:%M" if resets - now >= 86400 else "%H:%M:%S"
        parts.append(f"{model_class or 'any model'} {percent} "
                     f"({reading.get('limit', '?')}, resets {time.strftime(shape, time.localtime(resets))})")
    for model_class, until in sorted((key.get("rests") or {}).items()):
        parts.append(f"{model_class} resting {max(0.0, float(until) - now):.0f}s")
    return "; ".join(parts)


def _counts(d: Mapping[str, Any]) -> str:
    if not d:
        return "-"
    return printable("  ".join(f"{k} {v}" for k, v in
                               sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))))


def format_upstreams(upstreams: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per upstream: attempts, then (from hubs that count them)
    attempts by status class, errors by kind, and failovers to others."""
    lines: list[str] = []
    for name, u in sorted(upstreams.items()):
        parts = [f"{u.get('attempts', 0)} attempts, {u.get('retries', 0)} retries"]
        for field in ("requests", "errors"):
            counts = u.get(field) or {}
            if counts:
                parts.append(", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        failovers = u.get("failovers") or {}
        if failovers:
            parts.append(", ".join(f"failed over to {to} {n}" for to, n in sorted(failovers.items())))
        lines.append(("upstream    " if not lines else " " * 12) + printable(f"{name}: " + "; ".join(parts)))
    return lines


def format_worker(worker: Mapping[str, Any]) -> str:
    """One worker of a hub of several ([server] workers): `1 pid 4242 up, 2 restarts`."""
    text = f"{worker.get('index', '?')} pid {worker.get('pid') or '-'} {'up' if worker.get('up') else 'DOWN'}"
    restarts = worker.get("restarts") or 0
    if restarts:
        text += f" ({restarts} restart{'s' if restarts != 1 else ''})"
    return text


def format_stats(d: Mapping[str, Any], *, now: float | None = None) -> str:
    """The `hubcore stats` summary: one screen, the numbers an operator looks at first."""
    req = d.get("requests") or {}
    conns = d.get("connections") or {}
    lag = d.get("loop_lag_s") or {}
    lines = [
        f"hubcore {d.get('version') or '?'}  pid {d.get('pid', '?')}  "
        f"up {format_uptime(float(d.get('uptime_s') or 0))}  "
        f"tokens {d.get('tokens_loaded', 0)}  "
        f"loop lag {format_duration(lag.get('last'))} (max {format_duration(lag.get('max'))})",
        f"connections {conns.get('open', 0)} open, {conns.get('total', 0)} total   "
        f"in flight {d.get('in_flight', 0)}   "
        f"requests {req.get('total', 0)}, {float(req.get('rate_1m') or 0):.2f}/s (1m)",
        f"status      {_counts(req.get('by_status') or {})}",
        f"outcome     {_counts(req.get('by_outcome') or {})}",
    ]
    refused = d.get("refused") or {}
    if refused:
        lines.append(f"refused     {_counts(refused)}")
    workers = d.get("workers") or []
    if workers:
        lines.append("workers     " + ", ".join(format_worker(w) for w in workers))
    lines += format_upstreams(d.get("upstream") or {})

    lines.append("")
    latency = d.get("latency_s") or {}
    lat_rows = []
    for name, label in (("ttfb", "ttfb"), ("total", "total"), ("hub_added", "hub added"),
                        ("queue_wait", "queue wait")):
        h = latency.get(name) or {}
        lat_rows.append((label, *(format_quantile(h, p) for p in ("p50", "p90", "p99")), h.get("count", 0)))
    lines.append(format_table(("LATENCY", "P50", "P90", "P99", "COUNT"), lat_rows,
                              right=(1, 2, 3, 4)))

    w = d.get("writer") or {}
    if w:
        lines.append("")
        lines.append(
            f"usage writer  queue {w.get('queue_depth', 0)}  written {w.get('written', 0)}  "
            f"spooled {w.get('spooled', 0)}  replayed {w.get('replayed', 0)}  "
            f"spool pending {w.get('spool_pending', 0)}  unpriced {w.get('unpriced', 0)}")
        if w.get("last_error"):
            lines.append(f"              last error: {printable(str(w['last_error']))}")

    g = d.get("gc") or {}
    if g.get("scheduled"):
        last = g.get("last_full_collection_ms")
        lines.append(
            f"gc            frozen {g.get('frozen_objects', 0)}  full collections {g.get('full_collections', 0)}"
            + (f" (last {last:.1f} ms)" if last is not None else ""))

    lines.append("")
    lines.append(format_keys(flatten_keys(d), now=now))
    return "\n".join(lines)


# -- commands -------------------------------------------------------------------------

def _fail(exc: OpsClientError) -> int:
    print(f"hubcore: {exc}", file=sys.stderr)
    return exc.exit_code


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode()


def watch(socket_path: str, interval: float = DEFAULT_WATCH_INTERVAL, *, as_json: bool = False,
          out: TextIO | None = None, iterations: int | None = None) -> int:
    """Redraw the stats every ``interval`` seconds until Ctrl-C (or ``iterations``).

    An unreachable hub is shown and retried, so a `systemctl restart` does
    not end the watch.
    """
    out = sys.stdout if out is None else out
    tty = out.isatty()
    shown = 0
    try:
        if tty:
            out.write(_CLEAR_SCREEN)
        while True:
            try:
                stats = get_stats(socket_path)
                body = _dumps(stats) if as_json else format_stats(stats)
            except OpsClientError as exc:
                body = f"hubcore: {exc}\n(retrying every {interval:g}s)"
            header = f"every {interval:g}s: {socket_path}    {time.strftime('%Y-%m-%d %H:%M:%S')}"
            frame = f"{header}\n\n{body}"
            if tty:
                out.write(_HOME + "".join(f"{ln}{_CLEAR_EOL}\n" for ln in frame.split("\n"))
                          + _CLEAR_BELOW)
            else:
                out.write(frame + "\n\n")
            out.flush()
            shown += 1
            if iterations is not None and shown >= iterations:
                return EXIT_OK
            time.sleep(interval)
    except KeyboardInterrupt:
        out.write("\n")
        return EXIT_OK


def run_stats(args: argparse.Namespace, *, default_socket: str | None = None) -> int:
    """`hubcore stats [--socket P] [--json] [--watch [SECONDS]]`."""
    path = resolve_socket(args.socket, default_socket)
    if args.watch is not None:
        return watch(path, args.watch, as_json=args.json)
    try:
        stats = get_stats(path)
    except OpsClientError as exc:
        return _fail(exc)
    print(_dumps(stats) if args.json else format_stats(stats))
    return EXIT_OK


def run_keys(args: argparse.Namespace, *, default_socket: str | None = None) -> int:
    """`hubcore keys [list] [--json]` and `hubcore keys enable|disable|reset LABEL`."""
    path = resolve_socket(args.socket, default_socket)
    if args.action in ("enable", "disable", "reset"):
        if not args.label:
            print(f"hubcore: keys {args.action} needs a key LABEL", file=sys.stderr)
            return 2
        if args.action == "reset":
            return reset_key(path, args.label, as_json=args.json)
        return set_key_enabled(path, args.label, args.action == "enable", as_json=args.json)
    try:
        rows = flatten_keys(get_stats(path))
    except OpsClientError as exc:
        return _fail(exc)
    print(_dumps(rows) if args.json else format_keys(rows))
    return EXIT_OK


def set_key_enabled(socket_path: str, label: str, enabled: bool, *, as_json: bool = False) -> int:
    action = "enable" if enabled else "disable"
    try:
        status, data = request_json(socket_path, f"/keys/{quote(label, safe='')}/{action}", "POST")
    except OpsClientError as exc:
        return _fail(exc)
    if status != 200:
        print(f"hubcore: {action} {printable(label)}: {_error_text(data)}", file=sys.stderr)
        return EXIT_FAILED
    if as_json:
        print(_dumps(data))
    else:
        print(format_key_switch(label, action, data))
    if isinstance(data, dict) and data.get("warning"):
        print(f"hubcore: warning: key {printable(label)} {action}d but {printable(str(data['warning']))}",
              file=sys.stderr)
    return EXIT_OK


def reset_key(socket_path: str, label: str, *, as_json: bool = False) -> int:
    """`hubcore keys reset LABEL`: end the key's rests after 429s and close its circuit."""
    try:
        status, data = request_json(socket_path, f"/keys/{quote(label, safe='')}/reset", "POST")
    except OpsClientError as exc:
        return _fail(exc)
    if status != 200:
        print(f"hubcore: reset {printable(label)}: {_error_text(data)}", file=sys.stderr)
        return EXIT_FAILED
    print(_dumps(data) if as_json else format_key_reset(label, data))
    if isinstance(data, dict) and data.get("warning"):
        print(f"hubcore: warning: key {printable(label)} reset but {printable(str(data['warning']))}",
              file=sys.stderr)
    return EXIT_OK


def format_key_reset(label: str, reply: Any) -> str:
    """`key a reset: anthropic healthy`, and how to revive a key the reset
    left dead or disabled."""
    states = reply.get("states") if isinstance(reply, dict) else None
    if not isinstance(states, dict):
        return f"key {printable(label)} reset"
    text = f"key {printable(label)} reset: {_upstream_states(states)}"
    if any(state in ("dead", "disabled") for state in states.values()):
        text += f"\n(a dead or disabled key comes back with `hubcore keys enable {printable(label)}`)"
    return text


def format_key_switch(label: str, action: str, reply: Any) -> str:
    """`key b enabled: anthropic healthy`: the key's state after the switch
    in each upstream that has it, as the hub reported it."""
    states = reply.get("states") if isinstance(reply, dict) else None
    text = f"key {printable(label)} {action}d"
    if not isinstance(states, dict):
        return text  # a hub from before the answer carried the states
    return f"{text}: {_upstream_states(states)}"


def _upstream_states(states: Mapping[Any, Any]) -> str:
    """`anthropic healthy, bedrock disabled`."""
    return ", ".join(f"{printable(str(up))} {printable(str(st))}" for up, st in states.items())


def run_reload(args: argparse.Namespace, *, default_socket: str | None = None) -> int:
    """`hubcore reload`: the same as SIGHUP, but answers whether it worked."""
    path = resolve_socket(args.socket, default_socket)
    try:
        status, data = request_json(path, "/reload", "POST")
    except OpsClientError as exc:
        return _fail(exc)
    if status != 200 or not (isinstance(data, dict) and data.get("ok")):
        print(f"hubcore: reload failed: {_error_text(data)}", file=sys.stderr)
        return EXIT_FAILED
    print(data.get("message") or "reloaded")
    return EXIT_OK


# -- argparse wiring --------------------------------------------------------------------

def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("the watch interval must be more than 0 seconds")
    return value


def add_socket_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket", metavar="PATH", default=None,
        help=f"ops socket (default: ${OPS_SOCKET_ENV}, else server.ops_socket, "
             f"else {DEFAULT_OPS_SOCKET})")


def add_stats_arguments(parser: argparse.ArgumentParser) -> None:
    add_socket_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the raw /stats JSON")
    parser.add_argument(
        "--watch", metavar="SECONDS", nargs="?", type=_positive_seconds, default=None,
        const=DEFAULT_WATCH_INTERVAL,
        help=f"redraw every SECONDS (default {DEFAULT_WATCH_INTERVAL:g}) until Ctrl-C")


def add_keys_arguments(parser: argparse.ArgumentParser) -> None:
    add_socket_argument(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("action", nargs="?", choices=("list", "enable", "disable", "reset"), default="list",
                        help="list the keys (default); enable or disable one by label; reset one: end its "
                             "rests after 429s and close its circuit")
    parser.add_argument("label", nargs="?", help="the key's label (for enable, disable, reset)")


def add_key_toggle_arguments(parser: argparse.ArgumentParser) -> None:
    add_socket_argument(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("label", help="the key's label")


def add_reload_arguments(parser: argparse.ArgumentParser) -> None:
    add_socket_argument(parser)
