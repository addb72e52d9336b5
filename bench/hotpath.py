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

Compare two trees by running each: `PYTHONPATH=TREE python -m bench.hotpath`.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from bench import payloads, services
from bench.vendor import RESPONSE_HEADERS, Stream

READ_SIZE = 64 * 1024


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

    loop = asyncio.get_running_loop()
    # The latency-tax run's hub configuration; its upstream is never dialled
    # (the pool is filled with replaying connections below).
    text = services.HUB_CONFIG.format(port=0, dir=workdir, upstream="http://127.0.0.1:9", pool=2, server_extra="")
    if args.redis:
        # Limits, key states and sessions shared through a real Redis: its
        # round trips are real socket waits, the rest as above.
        text += f'\n[shared]\nredis = "{args.redis}"\ntimeout = 0.5\n'
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
    elif app.hub.access is not None:
        app.hub.access.stream = devnull  # formatted and written as in production, to nowhere
    await app.start()
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

    for _ in range(200):
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
        # (untimed), as it does while the hub waits on its sockets.
        t0 = time.process_time() - time.thread_time()
        while app.recorder.stats()["queue_depth"]:
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
        "requests": args.batches * args.requests + 200,
        "phases_us": [statistics.median(p) / 1e3 for p in phases],
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
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hubcore-hotpath-") as d:
        result = uvloop.run(run(args, Path(d)))
    from hubcore.accounting import meter as sse

    print(f"hub request path, {args.body} body, 20-event stream; meter {sse.Meter.__module__}")
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


if __name__ == "__main__":
    sys.exit(main())
