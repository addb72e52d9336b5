"""What sharing limits through Redis costs a request: SharedState.admit
(+ release, and the sender's work for it) against a local redis-server,
next to a bare PING through the same client and to the in-memory Limiter;
the Redis server's own time per script call (INFO commandstats); latency at
c=1 and c=16; the admit script's behaviour across two instances (rpm 30
over 90 admits, concurrency 2); the degraded path. Then the same cost through
whole hubs: the fake bench vendor, and two `hubcore serve` processes side by
side, one plain and one with [shared] redis, measured in interleaved rounds
by bench/latency_tax.py's machinery: added p50 at c=1 and µs of hub CPU per
request, with and without Redis (`--only calls` or `--only hubs` for one part).

Run `python -m bench.shared` (or `--quick`; `--json FILE` for the figures).
Needs redis-server (apt-get install redis-server). Prints a markdown table;
asserts no timing: the numbers are for reading, side by side from one run.
The exit status is 1 only if the script let through more than its limit.
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import uvloop

from bench import latency_tax, services
from bench.latency_tax import HEADLINE, Bench, Scenario
from bench.services import LoadGen, free_port
from hubcore import config as config_mod
from hubcore.governance.limiter import Limiter, Refused
from hubcore.governance.limits import Limits
from hubcore.governance.storage import ScopeLimits
from hubcore.governance.tokens import Principal
from hubcore.shared.redis_state import SharedState

USD = 1_000_000
# Generous, so that the measured path is the admitting one.
EVERY_LIMIT = Limits(
    rpm=1_000_000, concurrency=10_000,
    budget_5h=10_000 * USD, budget_day=10_000 * USD, budget_week=50_000 * USD,
    budget_month=100_000 * USD, budget_total=1_000_000 * USD,
)


class RedisProcess:
    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.port = free_port()
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(directory), "--logfile", str(directory / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: see {directory / 'redis.log'}")
            time.sleep(0.01)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cpu_seconds(self) -> float:
        """What redis-server says it used, user + system (getrusage: finer
        than /proc's clock ticks, which a few hundred requests barely move)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as s:
            s.sendall(b"INFO cpu\r\n")
            data = b""
            while b"\r\n" not in data:
                data += s.recv(4096)
            head, _, body = data.partition(b"\r\n")
            size = int(head[1:])  # a bulk string: $<length>\r\n<bytes>\r\n
            while len(body) < size:
                body += s.recv(4096)
        fields = dict(line.split(":", 1) for line in body[:size].decode().splitlines() if ":" in line)
        return float(fields["used_cpu_user"]) + float(fields["used_cpu_sys"])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(5)


def config(url: str, timeout: float = 0.5) -> config_mod.SharedConfig:
    # A timeout above any stall a loaded machine may show: the bench
    # measures the shared path, not the fallback.
    return config_mod.parse({"shared": {"redis": url, "timeout": timeout}}, source="bench", env={}).shared


async def measure(n: int, call: Callable[[int], Awaitable[Any]]) -> dict[str, float]:
    """CPU µs per call (this process, all of it: the sender's batches too)
    and wall-clock latency quantiles, at c=1."""
    for i in range(min(200, n)):
        await call(i)
    latencies = []
    cpu0 = time.process_time()
    wall0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        await call(i)
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    latencies.sort()
    return {
        "cpu_us": cpu / n * 1e6,
        "p50_us": latencies[len(latencies) // 2] * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
        "per_s": n / wall,
    }


async def concurrent(n: int, workers: int, call: Callable[[int], Awaitable[Any]]) -> dict[str, float]:
    latencies: list[float] = []

    async def worker(w: int) -> None:
        for i in range(w, n, workers):
            t = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - t)

    cpu0 = time.process_time()
    wall0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(workers)))
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    latencies.sort()
    return {
        "cpu_us": cpu / n * 1e6,
        "p50_us": latencies[len(latencies) // 2] * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
        "per_s": n / wall,
    }


async def redis_usec(state: SharedState) -> float:
    """Microseconds Redis spent in commands, all of them, since it started."""
    client = state._client
    assert client is not None
    info = await client.execute_command("INFO", "commandstats")
    return sum(float(fields["usec"]) for fields in info.values())


async def with_redis_time(state: SharedState, n: int, row: Callable[[], Awaitable[dict[str, float]]]) -> dict[str, float]:
    """The row's figures and Redis's own µs per call (the sender's writes
    for the row included: it is flushed before reading)."""
    before = await redis_usec(state)
    figures = await row()
    await state.flush()
    figures["redis_us"] = (await redis_usec(state) - before) / n
    return figures


async def run(n: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    behaviour: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hubcore-bench-shared-") as tmp:
        redis = RedisProcess(Path(tmp))
        try:
            a = SharedState(config(redis.url), instance_id="bench-a")
            b = SharedState(config(redis.url), instance_id="bench-b")
            await a.start()
            await b.start()
            if a.degraded or b.degraded:
                raise RuntimeError(f"the instances did not reach Redis: {a.last_error or b.last_error}")
            assert a._client is not None
            client = a._client

            async def ping(i: int) -> None:
                await client.execute_command("PING")

            results["PING through the same client (floor)"] = await with_redis_time(a, n, lambda: measure(n, ping))

            bare = Principal(1, "alice", None, "hc-bench")

            async def admit_bare(i: int) -> None:
                (await a.admit(bare, "anthropic")).release()

            results["admit, no counted limit (key states only)"] = await with_redis_time(
                a, n, lambda: measure(n, admit_bare))

            token = Principal(2, "alice", None, "hc-bench", limits=Limits(rpm=1_000_000, concurrency=10_000))

            async def admit_token(i: int) -> None:
                (await a.admit(token, "anthropic", f"session-{i & 63}")).release()

            results["admit + release, token rpm + concurrency, session"] = await with_redis_time(
                a, n, lambda: measure(n, admit_token))

            a.update_limits(ScopeLimits(users={"bob": EVERY_LIMIT}, projects={"web": EVERY_LIMIT}))
            full = Principal(3, "bob", "web", "hc-bench", limits=EVERY_LIMIT)

            async def admit_full(i: int) -> None:
                (await a.admit(full, "anthropic", f"session-{i & 63}")).release()

            results["admit + release, every limit on token, user, project"] = await with_redis_time(
                a, n, lambda: measure(n, admit_full))

            now = time.time()

            async def charge(i: int) -> None:
                a.charge(f"req-{i}", 3, "bob", "web", 1234, now)
                if i % 256 == 255:
                    await a.flush()

            results["charge of token, user, project (queued, sent in batches)"] = await with_redis_time(
                a, n, lambda: measure(n, charge))

            results["c=16: admit + release, token rpm + concurrency, session"] = await with_redis_time(
                a, n, lambda: concurrent(n, 16, admit_token))
            results["c=16: admit + release, every limit"] = await with_redis_time(
                a, n, lambda: concurrent(n, 16, admit_full))

            limiter = Limiter()
            limiter.update(ScopeLimits(users={"bob": EVERY_LIMIT}, projects={"web": EVERY_LIMIT}))

            async def local(i: int) -> None:
                limiter.admit(full, None, now + i * 1e-4).release()

            results["in-memory Limiter admit + release (for scale)"] = await measure(n, local)

            # The script's behaviour across two instances.
            rpm30 = Principal(10, "carol", None, "hc-bench", limits=Limits(rpm=30))
            admitted = 0
            for i in range(90):
                try:
                    (await (a if i % 2 else b).admit(rpm30)).release()
                    admitted += 1
                except Refused:
                    pass
            behaviour["rpm 30, 90 admits alternating over 2 instances: admitted"] = admitted
            pair = Principal(11, "carol", None, "hc-bench", limits=Limits(concurrency=2))
            held = []
            refused = 0
            for i in range(10):
                try:
                    held.append(await (a if i % 2 else b).admit(pair))
                except Refused:
                    refused += 1
            behaviour["concurrency 2, 10 held admits over 2 instances: admitted"] = len(held)
            for grant in held:
                grant.release()

            # Degraded: Redis stopped; the local share answers without waiting.
            redis.stop()
            try:
                await a.admit(token, "anthropic")
            except Refused:
                pass
            behaviour["degraded after Redis stopped"] = a.degraded

            async def degraded(i: int) -> None:
                try:
                    (await a.admit(token, "anthropic")).release()
                except Refused:
                    pass

            results["degraded: admit + release on the local share"] = await measure(n, degraded)
            await a.close()
            await b.close()
        finally:
            if redis.process.poll() is None:
                redis.stop()
    return {"results": results, "behaviour": behaviour}


# -- through whole hubs ---------------------------------------------------------------
REDIS_PATH = "hubcore+redis"
# The same limits on both hubs' tokens, generous so that every request is
# admitted: the plain hub checks and charges them in memory, the other in
# Redis (the admit script per request, the charge queued off the path).
TOKEN_LIMITS = ("--rpm", "1000000", "--concurrency", "10000", "--budget", "day=100000")
SHARED_TABLE = """
[shared]
redis = "{url}"
# Above any stall a loaded machine may show: what is measured is the shared
# path, not the fallback (checked after the run: never degraded).
timeout = 0.5
"""
HUB_SCENARIOS = [HEADLINE, Scenario("small", 20, 0, 1)]


class HubPaths(Bench):
    """latency_tax's Bench over three paths: direct to the vendor, a plain
    hub, and a hub with [shared] redis, both with the same token limits."""

    def __init__(self, plan: latency_tax.Plan, workdir: Path) -> None:
        super().__init__(plan, workdir, clients=1, use_nginx=False, use_wrk=False)
        self.notes = []  # no nginx or wrk here, by design
        self.paths = ["direct", "hubcore", REDIS_PATH]
        self.redis: RedisProcess | None = None
        self.shared_hub: services.Hub | None = None
        self.redis_cpu = 0.0
        self.redis_requests = 0

    def start(self) -> None:
        self.vendor = self._own(services.start_vendor(self.workdir))
        self.redis = self._own(RedisProcess(self.workdir))
        upstream = f"http://127.0.0.1:{self.vendor.port}"
        self.hub = self._own(services.start_hub(self.workdir, "hub", upstream, 64))
        self.shared_hub = self._own(services.start_hub(self.workdir, "hub-redis", upstream, 64,
                                                       extra_config=SHARED_TABLE.format(url=self.redis.url)))
        for hub in (self.hub, self.shared_hub):
            limit_token(hub)
        self.gens = [LoadGen()]
        self.stack.callback(self.gens[0].close)

    def target(self, path: str) -> tuple[int, str, str, int | None]:
        if path == REDIS_PATH:
            assert self.shared_hub is not None
            return self.shared_hub.port, "x-api-key", self.shared_hub.token, self.shared_hub.pid
        return super().target(path)

    def _batch(self, path: str, jobs: list[dict[str, Any]],
               peak: dict[str, int] | None = None) -> tuple[dict[str, Any], float]:
        if path != REDIS_PATH:
            return super()._batch(path, jobs, peak)
        assert self.redis is not None
        before = self.redis.cpu_seconds()
        result, cpu = super()._batch(path, jobs, peak)
        self.redis_cpu += self.redis.cpu_seconds() - before
        self.redis_requests += result["requests"] + result["warmups"]
        return result, cpu

    def shared_stats(self) -> dict[str, Any]:
        from hubcore.ops import client as opsclient

        assert self.shared_hub is not None
        return dict(opsclient.get_stats(str(self.shared_hub.config.parent / "ops.sock"))["shared"])


def limit_token(hub: services.Hub) -> None:
    """TOKEN_LIMITS on the hub's token, told to the running hub (the CLI's ops socket call)."""
    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "hubcore", *args, "--config", str(hub.config)],
                              capture_output=True, text=True, env=services._env(), timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"hubcore {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    (token,) = orjson.loads(cli("token", "list", "--json"))
    cli("token", "update", str(token["id"]), *TOKEN_LIMITS)


def run_hubs(quick: bool) -> dict[str, Any]:
    plan = latency_tax.quick_plan() if quick else latency_tax.full_plan()
    plan.rounds = 3 if quick else 6
    seconds = 1.0 if quick else 2.0
    with tempfile.TemporaryDirectory(prefix="hubcore-bench-shared-hubs-") as tmp:
        bench = HubPaths(plan, Path(tmp))
        try:
            bench.start()
            latency = bench.latency(HUB_SCENARIOS, seconds)
            shared = bench.shared_stats()
        finally:
            bench.close()
    rows = {}
    for case in latency.values():
        paths = case["paths"]
        for path in ("hubcore", REDIS_PATH):
            row = paths[path]
            rows[f"{case['scenario']['name']} | {path}"] = {
                "requests": row["requests"], "errors": row["errors"] + row["bad_streams"],
                "added_total_p50_us": _us(row["added"]["total"]["p50"]),
                "added_total_p99_us": _us(row["added"]["total"]["p99"]),
                "hub_cpu_us": None if row["cpu_s_per_1k"] is None else row["cpu_s_per_1k"] * 1000,
            }
    return {
        "rounds": plan.rounds, "seconds_per_batch": seconds, "rows": rows,
        "redis_cpu_us": bench.redis_cpu / bench.redis_requests * 1e6 if bench.redis_requests else None,
        "shared": {k: shared[k] for k in ("state", "degraded_seconds", "errors", "dropped")},
    }


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e6


def hubs_table(report: dict[str, Any]) -> str:
    shared = report["shared"]
    failures = sum(shared["errors"].values())
    lines = [
        f"Through whole hubs: c=1, {report['rounds']} interleaved rounds of {report['seconds_per_batch']:g} s per "
        f"path (latency_tax's {latency_tax.C1_THINK_MS:g} ms between requests); added = hub minus direct to the "
        "vendor at the same percentile, whole answer; hub CPU = the `hubcore serve` process's, all threads, per "
        f"request. The Redis hub's link after the run: {shared['state']}, {shared['degraded_seconds']:.1f} s "
        f"degraded, {failures} failed calls; redis-server's own CPU: {_fmt(report['redis_cpu_us'])} µs per request.\n",
        "| scenario | hub | requests | errors | added p50 µs | added p99 µs | hub CPU µs/request | p50, CPU vs plain |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = report["rows"]
    for name, row in rows.items():
        plain = rows.get(name.replace(REDIS_PATH, "hubcore"))
        versus = ""
        if plain is not None and plain is not row:
            versus = (f"{_ratio(row['added_total_p50_us'], plain['added_total_p50_us'])}, "
                      f"{_ratio(row['hub_cpu_us'], plain['hub_cpu_us'])}")
        lines.append(f"| {name} | {row['requests']} | {row['errors']} | {_fmt(row['added_total_p50_us'])} | "
                     f"{_fmt(row['added_total_p99_us'])} | {_fmt(row['hub_cpu_us'])} | {versus} |")
    return "\n".join(lines)


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None or b <= 0 else f"{a / b:.1f}x"


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def table(report: dict[str, Any], n: int) -> str:
    lines = [f"{n:,} calls per row, c=1 unless said; hub CPU is this process's (client and sender), "
             "Redis µs its own time in commands; loopback\n",
             "| path | hub CPU µs/call | Redis µs/call | p50 µs | p99 µs | calls/s |", "|---|---:|---:|---:|---:|---:|"]
    for name, row in report["results"].items():
        redis_us = f"{row['redis_us']:.1f}" if "redis_us" in row else ""
        lines.append(
            f"| {name} | {row['cpu_us']:.1f} | {redis_us} | {row['p50_us']:.0f} | {row['p99_us']:.0f} | {row['per_s']:,.0f} |"
        )
    lines += ["", "| behaviour | value |", "|---|---:|"]
    lines += [f"| {name} | {value} |" for name, value in report["behaviour"].items()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer calls")
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    parser.add_argument("--only", choices=("calls", "hubs"),
                        help="calls: SharedState in this process; hubs: through whole hubs (default: both)")
    args = parser.parse_args()
    if shutil.which("redis-server") is None and not Path("/usr/bin/redis-server").exists():
        print("no redis-server: apt-get install redis-server", file=sys.stderr)
        return 2
    report: dict[str, Any] = {}
    exact = True
    if args.only != "hubs":
        n = 2_000 if args.quick else 20_000
        report = uvloop.run(run(n))
        print(table(report, n))
        behaviour = report["behaviour"]
        exact = (behaviour["rpm 30, 90 admits alternating over 2 instances: admitted"] == 30
                 and behaviour["concurrency 2, 10 held admits over 2 instances: admitted"] == 2)
    if args.only != "calls":
        report["hubs"] = run_hubs(args.quick)
        print(("\n" if args.only != "hubs" else "") + hubs_table(report["hubs"]))
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return 0 if exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
