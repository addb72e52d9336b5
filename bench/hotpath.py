"""The hub's own CPU per proxied request, measured in one process without
sockets: the figure to drive down, free of the scheduling noise of a shared
machine that the latency-tax run (`python -m bench`) is exposed to.

The real App runs (token table, limiter, metrics, usage writer with its
SQLite file, access log), on uvloop. Each request is fed to a real
HttpProtocol as the kernel would hand it over (a 90 KB Claude Code body in
64 KiB reads); the upstream side is a real pool of real UpstreamConnections
whose transports answer every request, in the next loop turn, with the
recorded 20-event stream behind Cloudflare's response headers. So every line
of the hub's request path runs; only the socket system calls do not (they
cost nginx the same).

    python -m bench.hotpath                  # µs of hub CPU per request
    python -m bench.hotpath --profile        # and where it goes (cProfile)
    python -m bench.hotpath --instructions   # instructions per request (callgrind)

Compare two trees by running each: `PYTHONPATH=TREE python -m bench.hotpath`.

--instructions counts instructions instead of timing them: on a shared
machine the count repeats to a fraction of a percent where time does not.
It runs this benchmark in two child processes, each under valgrind's
callgrind, with INSTRUCTION_RUNS requests after the same warm-up, and
divides the difference of the two runs' totals by the difference of their
request counts, which cancels start-up, imports and shutdown. Callgrind
counts each thread apart: the event loop's (the main thread), and the
others, whose per-request share is the usage writer's SQLite thread
(asyncio's and libuv's worker threads work at start-up only). Python runs
some 50 times slower under callgrind, and the hub's timers would fire that
much more often per request: the counted runs lengthen two of them
(`COUNTED_SERVER_EXTRA`), and leave the usage rows to shutdown.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from bench import callgrind, payloads, services
from bench.vendor import RESPONSE_HEADERS, Stream

READ_SIZE = 64 * 1024


def compiled_or_twins() -> str:
    """Which module of each compiled/pure-Python pair this process runs: a
    figure of a run on a twin is not one of the compiled path."""
    from hubcore.accounting import meter
    from hubcore.gateway import exchange_core
    from hubcore.http import conn, upstream, wire
    from hubcore.governance import admit
    from hubcore.ops import access_core, tally
    from hubcore.routing import lease

    return (f"meter {meter.Meter.__module__}, heads {wire.HeaderCollector.__module__}, "
            f"connections {conn.ConnCore.__module__} and {upstream.UpstreamCore.__module__}, "
            f"exchange {exchange_core.ExchangeCore.__module__}, key ring {lease.RingCore.__module__}, "
            f"limiter {admit.LimiterCore.__module__}, metrics {tally.TallyCore.__module__}, "
            f"access log {access_core.AccessCore.__module__}, head functions "
            f"{'hubcore.gateway._heads' if exchange_core.COMPILED else 'hubcore.gateway.rewrite and routes'}")
WARMUP_REQUESTS = 200

# --instructions: requests after the warm-up in the two counted runs. With
# it they make 500 and 1,900 usage rows, fewer than the usage writer's batch
# (UsageRecorder's 2,000), so that in a counted run the writer's thread
# works only at shutdown: no thread interleaves with the event loop's while
# the requests are served (when one did, the count moved by half a percent
# between runs). Both take some 100 s under callgrind on the shared 2-core
# machine.
INSTRUCTION_RUNS = (300, 1700)
# [server] settings of the counted runs. Under callgrind the hub runs some
# 50 times slower, and its timers fire that much more often per request.
# The usage writer's 0.2 s flush interval, 1,000 requests at full speed,
# would be some 20: how fast the machine ran would decide how many
# transactions a run makes, and an insert that outlasts the interval has its
# batch copied to the spool, which at full speed never happens. Lengthened,
# it leaves the writer a full batch or shutdown to flush at (its cost per row
# is the same in transactions of 100, 500 or 2,000 rows). The token table's
# 0.5 s reload check would run every 40 requests instead of every 2,500.
# A counted run that takes this long is stuck, not slow (one takes a minute).
COUNTED_RUN_TIMEOUT = 900.0
COUNTED_SERVER_EXTRA = "usage_flush_interval = 3600.0\ntoken_reload_interval = 3600.0\n"


class ClientTransport:
    """What HttpProtocol writes to; a response is whole at its last chunk."""

    def __init__(self) -> None:
        self.done: asyncio.Future[None] | None = None
        self.bytes = 0
        self.tail = b""
        self.first_write = 0  # perf_counter_ns of the response's first write

    def write(self, data: bytes) -> None:
        self.writelines((data,))

    def writelines(self, parts: Any) -> None:
        if not self.first_write:
            self.first_write = time.perf_counter_ns()
        for part in parts:
            self.bytes += len(part)
            self.tail = (self.tail + part)[-5:]
        if self.tail == b"0\r\n\r\n" and self.done is not None and not self.done.done():
            self.done.set_result(None)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(RuntimeError("the hub closed the client connection (see its log above)"))

    abort = close

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


class VendorTransport:
    """An upstream connection's transport: each request written is answered
    with the recorded stream in the next loop turn, as a socket read would."""

    def __init__(self, loop: asyncio.AbstractEventLoop, response: bytes) -> None:
        self.loop = loop
        self.response = response
        self.protocol: Any = None
        self.closing = False
        self.sent = 0      # perf_counter_ns of the request's write upstream
        self.answered = 0  # perf_counter_ns of the answer's arrival

    def _answer(self) -> None:
        self.answered = time.perf_counter_ns()
        self.protocol.data_received(self.response)

    def write(self, data: bytes) -> None:
        self.writelines((data,))

    def writelines(self, parts: Any) -> None:
        self.sent = time.perf_counter_ns()
        self.loop.call_soon(self._answer)

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    abort = close

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def request_bytes(token: str, body: bytes) -> list[bytes]:
    headers = payloads.claude_code_headers(
        (b"x-api-key", token.encode()), session="9d5e2c1a-7b3f-4e8d-a6c2-1f0e9d8c7b6a", events=20, pace_ms=0)
    head = b"POST /v1/messages?beta=true HTTP/1.1\r\nhost: 127.0.0.1\r\n" + b"".join(
        n + b": " + v + b"\r\n" for n, v in headers) + b"content-length: %d\r\n\r\n" % len(body)
    data = head + body
    return [data[i:i + READ_SIZE] for i in range(0, len(data), READ_SIZE)]


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from hubcore import config as config_mod, store
    from hubcore.governance import tokens as tokens_mod
    from hubcore.app import App
    from hubcore.http.server import HttpProtocol
    from hubcore.http.client import ConnState, UpstreamConnection
    from hubcore.ops.accesslog import AccessLog

    loop = asyncio.get_running_loop()
    # The latency-tax run's hub configuration; its upstream is never dialled
    # (the pool is filled with replaying connections below).
    text = services.HUB_CONFIG.format(port=0, dir=workdir, upstream="http://127.0.0.1:9", pool=2,
                                      server_extra=COUNTED_SERVER_EXTRA if args.counted else "")
    if args.redis:
        # Limits, key states and sessions shared through a real Redis: its
        # round trips are real socket waits, the rest as above.
        text += f'\n[shared]\nredis = "{args.redis}"\ntimeout = 0.5\n'
    # No dashboard, as in the latency-tax run: it is off the request path,
    # and its default port would refuse a second run (or a hub) beside this one.
    text += '\n[dashboard]\nlisten = ""\n'
    (workdir / "hubcore.toml").write_text(text)
    (workdir / "key-b").write_text(payloads.VENDOR_KEYS[1] + "\n")
    config = config_mod.load(str(workdir / "hubcore.toml"), env={"BENCH_ANTHROPIC_KEY_A": payloads.VENDOR_KEYS[0]})
    conn = store.connect(config.server.database)
    store.migrate(conn)
    _, token = tokens_mod.create(conn, "bench", "hotpath")
    conn.commit()
    conn.close()

    app = App(config, loop)
    devnull = open(os.devnull, "w")
    if args.no_access_log:
        app.hub.access = None
    elif isinstance(app.hub.access, AccessLog):
        app.hub.access.stream = devnull  # formatted and written as in production, to nowhere
    try:
        await app.start()
    except BaseException:
        # As `hubcore serve` does: the usage writer's SQLite thread would
        # keep the process from exiting.
        await app.recorder.close()
        raise
    app.cycles.start()  # the collector as `hubcore serve` has it
    upstream = app.hub.upstreams["anthropic"]
    stream = Stream(20)
    response = (b"HTTP/1.1 200 OK\r\n" + RESPONSE_HEADERS + b"\r\n"
                + payloads.STAMP_PLACEHOLDER.join(stream.whole))
    vendors: list[VendorTransport] = []
    for _ in range(2):
        c = UpstreamConnection(upstream.pool)
        t = VendorTransport(loop, response)
        vendors.append(t)
        t.protocol = c
        c.connection_made(t)  # type: ignore[arg-type]
        c.state = ConnState.IDLE
        upstream.pool.put_idle(c)

    client = ClientTransport()
    proto = HttpProtocol(app.server)
    proto.connection_made(client)  # type: ignore[arg-type]
    reads = request_bytes(token, payloads.BODIES[args.body]())

    # Per request, ns: first read to the write upstream; the answer's
    # arrival to the client's first write; that write to the end of the
    # request's bookkeeping. The first two are what a client waits on.
    phases: tuple[list[int], list[int], list[int]] = ([], [], [])

    # --cold: what a request meets after a client's pause, when the other
    # processes have run in between: caches refilled with other data.
    evict = bytearray(args.cold * 1024 * 1024) if args.cold else None

    async def one() -> None:
        if evict is not None:
            evict[::64] = bytes(len(evict) // 64)  # a write to every cache line
        client.done = loop.create_future()
        client.first_write = 0
        t0 = time.perf_counter_ns()
        for piece in reads:
            proto.data_received(piece)
        await client.done
        # Let the request finish its bookkeeping (usage row, metrics), in
        # its task or in the callback scheduled at its end.
        while proto.busy:
            await asyncio.sleep(0)
        end = time.perf_counter_ns()
        vendor = max(vendors, key=lambda v: v.sent)
        phases[0].append(vendor.sent - t0)
        phases[1].append(client.first_write - vendor.answered)
        phases[2].append(end - client.first_write)

    for _ in range(WARMUP_REQUESTS):
        await one()
    profiler = cProfile.Profile() if args.profile else None
    batches: list[float] = []
    cpu_batches: list[float] = []
    writer_cpu = 0.0
    gc.collect()
    for phase in phases:
        phase.clear()
    for _ in range(args.batches):
        if profiler is not None:
            profiler.enable()
        w0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(args.requests):
            await one()
        batches.append((time.perf_counter() - w0) / args.requests)
        cpu_batches.append((time.thread_time() - c0) / args.requests)
        if profiler is not None:
            profiler.disable()
        # The usage writer's SQLite work runs in its own thread, which gets
        # the GIL only when this one lets go: with no socket waits here that
        # is at the switch interval, so let it catch up between batches
        # (untimed), as it does while the hub waits on its sockets. A
        # counted run leaves its rows to full batches and shutdown.
        t0 = time.process_time() - time.thread_time()
        while not args.counted and app.recorder.stats()["queue_depth"]:
            await asyncio.sleep(0.005)
        writer_cpu += time.process_time() - time.thread_time() - t0
    await app.stop()  # as at SIGTERM: drains, flushes the usage writer
    rows = app.recorder.stats()["written"]
    devnull.close()
    if profiler is not None:
        stats = pstats.Stats(profiler, stream=sys.stdout)
        stats.sort_stats(args.sort).print_stats(args.top)
    return {
        "wall_us": statistics.median(batches) * 1e6,
        "loop_cpu_us": statistics.median(cpu_batches) * 1e6,
        "rows": rows,
        "cpu_batches": [v * 1e6 for v in cpu_batches],
        "writer_us": writer_cpu / (args.batches * args.requests) * 1e6,
        "requests": args.batches * args.requests + WARMUP_REQUESTS,
        "phases_us": [statistics.median(p) / 1e3 for p in phases],
    }


class ChildFailed(RuntimeError):
    """A counted run under callgrind exited with an error or did not end."""


def _text(output: str | bytes | None) -> str:
    # TimeoutExpired carries what was read so far as bytes, whatever the text mode.
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def count_instructions(args: argparse.Namespace, valgrind: str) -> dict[str, Any]:
    """Instructions per request from two runs of this benchmark under
    callgrind (the module docstring says how); raise ChildFailed when a run
    fails."""
    command = [sys.executable, "-m", "bench.hotpath", "--counted", "--batches", "1", "--body", args.body]
    if args.no_access_log:
        command.append("--no-access-log")
    if args.redis:
        command += ["--redis", args.redis]
    # The same string hashes in both runs: dict and set layouts, and so the
    # instructions that walk them, do not change between them.
    env = dict(os.environ, PYTHONHASHSEED="0")
    totals: list[dict[int, int]] = []
    for requests in INSTRUCTION_RUNS:
        print(f"counting: {requests} requests under callgrind ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="hubcore-callgrind-") as d:
            try:
                threads, proc = callgrind.run(valgrind, [*command, "--requests", str(requests)], Path(d),
                                              env=env, timeout=COUNTED_RUN_TIMEOUT)
            except subprocess.TimeoutExpired as e:
                raise ChildFailed(f"the run of {requests} requests under callgrind did not end in "
                                  f"{COUNTED_RUN_TIMEOUT:.0f} s:\n{_text(e.stdout)}{_text(e.stderr)}") from e
        if proc.returncode != 0:
            raise ChildFailed(f"the run of {requests} requests under callgrind failed (exit status "
                              f"{proc.returncode}):\n{proc.stdout}{proc.stderr}")
        totals.append(threads)
    n1, n2 = INSTRUCTION_RUNS
    small, large = totals
    loop = (large[1] - small[1]) / (n2 - n1)
    whole = (sum(large.values()) - sum(small.values())) / (n2 - n1)
    return {
        "instructions_per_request": whole,
        "loop_thread": loop,
        "other_threads": whole - loop,
        "runs": {n: {"requests": n + WARMUP_REQUESTS, "instructions_by_thread": t}
                 for n, t in zip(INSTRUCTION_RUNS, totals)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500, help="requests per batch")
    parser.add_argument("--batches", type=int, default=9)
    parser.add_argument("--body", choices=sorted(payloads.BODIES), default="large")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions by own time")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--sort", default="tottime", help="cProfile sort key (tottime, cumtime, ncalls)")
    parser.add_argument("--no-access-log", action="store_true")
    parser.add_argument("--redis", metavar="URL", help="share state through this Redis ([shared] redis)")
    parser.add_argument("--cold", type=int, default=0, metavar="MIB",
                        help="before each request, write MIB MiB elsewhere to evict the caches (as at c=1)")
    parser.add_argument("--instructions", action="store_true",
                        help="count the hub's instructions per request with callgrind instead (about 100 s)")
    # One of --instructions' runs under callgrind.
    parser.add_argument("--counted", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.instructions:
        return instructions(parser, args)
    with tempfile.TemporaryDirectory(prefix="hubcore-hotpath-") as d:
        result = uvloop.run(run(args, Path(d)))

    print(f"hub request path, {args.body} body, 20-event stream; {compiled_or_twins()}")
    print(f"  per request: {min(result['cpu_batches']):.1f} µs CPU on the event loop's thread in the least "
          f"disturbed of {args.batches} batches of {args.requests} (median {result['loop_cpu_us']:.1f} µs; "
          f"wall {result['wall_us']:.1f} µs)")
    to_vendor, to_client, after = result["phases_us"]
    print(f"  critical path (median wall µs): request in → written upstream {to_vendor:.1f}; "
          f"answer in → first bytes to the client {to_client:.1f}; then to the end of the bookkeeping {after:.1f}")
    print(f"  usage writer thread: {result['writer_us']:.1f} µs CPU per row (written between batches)")
    print("  batches (µs CPU): " + " ".join(f"{v:.0f}" for v in result["cpu_batches"]))
    print(f"  usage rows written: {result['rows']} of {result['requests']} requests")
    return 0 if result["rows"] == result["requests"] else 1


def instructions(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.profile or args.cold:
        # Instructions are what callgrind counts: a profiler's would be
        # counted with them, and evicted caches do not change them.
        parser.error("--instructions takes neither --profile nor --cold")
    valgrind = callgrind.find_valgrind()
    if valgrind is None:
        print("--instructions needs valgrind (its callgrind tool), which is not installed: "
              "apt-get install -y valgrind", file=sys.stderr)
        return 2
    try:
        result = count_instructions(args, valgrind)
    except ChildFailed as e:
        print(e, file=sys.stderr)
        return 1

    n1, n2 = INSTRUCTION_RUNS
    print(f"hub request path, {args.body} body, 20-event stream; {compiled_or_twins()}")
    print(f"  instructions per request: {result['instructions_per_request']:,.0f} (event loop thread "
          f"{result['loop_thread']:,.0f}; usage writer and other threads {result['other_threads']:,.0f})")
    print(f"  callgrind, runs of {n1:,} and {n2:,} requests after {WARMUP_REQUESTS} warm-up ones: "
          f"the difference of their totals over {n2 - n1:,} requests")
    for n, counted in result["runs"].items():
        by_thread = counted["instructions_by_thread"]
        print(f"  {n:,} requests: " + "; ".join(f"thread {t} {by_thread[t]:,}" for t in sorted(by_thread)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
