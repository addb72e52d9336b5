"""The latency tax: what hubcore adds to a request, side by side with a direct
connection to the vendor and with nginx as a plain reverse proxy, all on
127.0.0.1, measured in interleaved rounds; a markdown table on stdout and a
JSON file. Run `python -m bench` (full) or `python -m bench --quick` (smoke).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench import payloads, services
from bench.services import Hub, LoadGen, Service
from bench.vendor import raise_fd_limit

PATHS = ("direct", "nginx", "hubcore")
ALT = "hubcore-alt"  # --compare: a second hubcore source tree, measured alongside
FLOOR = "python floor"  # saturation only: bench/floor.py, a bare pass-through proxy on hubcore's stack
# --workers N: concurrency of the saturation runs that compare N processes
# with one (issue 20: "requests/s at c=64").
WORKERS_CONNECTIONS = 64
RESULTS = Path(__file__).resolve().parent / "results"
CLIENT_CREDENTIAL = "client-credential-nginx-swaps-it"
MB = 1024 * 1024

# The latency targets hubcore holds itself to, checked against this run's figures.
TARGET_ADDED_RATIO = 2.0          # c=1 headline: hubcore-added p50 <= 2x nginx-added p50
TARGET_ADDED_P99 = 0.001          # s: c=1 headline: hubcore-added p99
TARGET_RPS_SHARE = 0.5            # c=16: hubcore req/s >= 50% of nginx's
TARGET_CPU_RATIO = 2.5            # c=16: hubcore CPU per request (user + system) <= 2.5x nginx's
TARGET_EVENT_P99 = 0.005          # s: 1,000 open paced streams, added per-event delay p99
TARGET_STREAMS_RSS = 200 * MB
TARGET_IDLE_RSS = 60 * MB
TARGET_WORKERS_SPEEDUP = 0.85     # per worker: workers = 2 gives >= 1.7x the req/s of one, at c=64


@dataclass(frozen=True)
class Scenario:
    body: str
    events: int
    pace_ms: float
    concurrency: int

    @property
    def name(self) -> str:
        pace = f"paced {self.pace_ms:g} ms" if self.pace_ms else "unpaced"
        return f"{self.body} body, {self.events} ev, {pace}"

    @property
    def key(self) -> str:
        return f"{self.body}/{self.events}ev/{'pace' + format(self.pace_ms, 'g') + 'ms' if self.pace_ms else 'nopace'}/c{self.concurrency}"


HEADLINE = Scenario("large", 20, 0, 1)
# At c=1 each connection pauses this long between requests: a user's next
# request finds the proxy idle, so what is measured is the latency a client
# feels, not the previous request's bookkeeping (usage row, access log) that a
# back-to-back loop would queue it behind. c >= 16 and wrk run back to back.
C1_THINK_MS = 2.0


@dataclass
class Plan:
    rounds: int
    c1: list[Scenario]
    c1_seconds: float            # per batch, unpaced; paced batches get 2x
    sweep: list[Scenario]
    sweep_seconds: float
    streams: int
    stream_events: int
    stream_pace_ms: float
    stream_ramp: float
    stream_body: str
    stream_rounds: int           # open-streams phase: rounds, in round_order
    wrk: list[tuple[str, int]]   # (body, connections)
    wrk_seconds: float
    wrk_rounds: int


def full_plan() -> Plan:
    c1 = [Scenario(body, events, pace, 1) for pace in (0.0, 2.0) for body in ("large", "small") for events in (20, 300)]
    return Plan(
        rounds=4, c1=c1, c1_seconds=0.6,
        sweep=[Scenario("large", 20, 0, 16), Scenario("large", 20, 0, 256)], sweep_seconds=1.0,
        streams=1000, stream_events=60, stream_pace_ms=100.0, stream_ramp=2.0, stream_body="large",
        stream_rounds=3, wrk=[("large", 16), ("small", 16), ("large", 256)], wrk_seconds=3.0, wrk_rounds=2,
    )


def with_workers(plan: Plan) -> Plan:
    """The plan of a --workers run: the saturation phase also at c=64, in
    runs long enough for both hubs' numbers to settle."""
    extra = [("large", WORKERS_CONNECTIONS), ("small", WORKERS_CONNECTIONS)]
    return dataclasses.replace(plan, wrk=[*plan.wrk, *(w for w in extra if w not in plan.wrk)],
                               wrk_seconds=max(plan.wrk_seconds, 3.0), wrk_rounds=max(plan.wrk_rounds, 2))


def workers_path(name: str, workers: int) -> str:
    return f"{name} x{workers}"


# --workers: hubcore as one process with [shared] redis, as each worker has
# it: what N processes gain, apart from what sharing through Redis costs.
REDIS_PATH = "hubcore +redis"


def quick_plan() -> Plan:
    return Plan(
        rounds=2, c1=[HEADLINE, Scenario("small", 300, 0, 1), Scenario("large", 20, 2.0, 1)], c1_seconds=0.25,
        sweep=[Scenario("large", 20, 0, 16)], sweep_seconds=0.3,
        streams=200, stream_events=20, stream_pace_ms=100.0, stream_ramp=0.5, stream_body="large",
        stream_rounds=1, wrk=[("large", 16)], wrk_seconds=1.0, wrk_rounds=1,
    )


def round_order(paths: list[str], r: int) -> list[str]:
    """The paths' order in round `r`: the rounds of a Williams design, so
    that over len(paths) rounds (2 x that for an odd count) each path runs
    once in each place and right after each other path once (a rotation
    had each path always run right after the same other one)."""
    n = len(paths)
    first = [0]
    for i in range(1, n):
        first.append((i + 1) // 2 if i % 2 else n - i // 2)
    row = [paths[(j + r) % n] for j in first]
    return row[::-1] if n % 2 and (r // n) % 2 else row


# -- statistics ---------------------------------------------------------------------
def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def summary(values: list[float]) -> dict[str, float | None]:
    s = sorted(values)
    return {"p50": percentile(s, 50), "p90": percentile(s, 90), "p99": percentile(s, 99), "n": len(s)}


def diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


@dataclass
class Tally:
    """One path's samples for one scenario, merged over rounds."""

    ttfb: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    transit: list[float] = field(default_factory=list)
    requests: int = 0
    warmups: int = 0
    errors: int = 0
    bad_streams: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    error_sample: str = ""

    def add(self, result: dict[str, Any], cpu: float) -> None:
        self.ttfb += result["ttfb"]
        self.total += result["total"]
        self.transit += result["transit"]
        self.requests += result["requests"]
        self.warmups += result["warmups"]
        self.errors += result["errors"]
        self.bad_streams += result["bad_streams"]
        self.wall += result["wall"]
        self.cpu += cpu
        self.error_sample = self.error_sample or result["error_sample"]

    def figures(self) -> dict[str, Any]:
        return {
            "requests": self.requests, "errors": self.errors, "bad_streams": self.bad_streams,
            "error_sample": self.error_sample or None,
            "rps": self.requests / self.wall if self.wall else None,
            "ttfb": summary(self.ttfb), "total": summary(self.total), "event_transit": summary(self.transit),
            # CPU of the proxy process (hub or nginx) per 1,000 requests; its
            # warm-up requests ran inside the sampled window too.
            "cpu_s_per_1k": self.cpu / (self.requests + self.warmups) * 1000 if self.requests + self.warmups else None,
        }


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {"ttfb": [], "total": [], "transit": [], "requests": 0, "warmups": 0, "errors": 0,
                              "bad_streams": 0, "wall": 0.0, "error_sample": ""}
    for r in results:
        for k in ("ttfb", "total", "transit"):
            merged[k] += r[k]
        for k in ("requests", "warmups", "errors", "bad_streams"):
            merged[k] += r[k]
        merged["wall"] = max(merged["wall"], r["wall"])
        merged["error_sample"] = merged["error_sample"] or r["error_sample"]
    return merged


def add_deltas(rows: dict[str, dict[str, Any]]) -> None:
    """Added time against direct, and hubcore-added / nginx-added."""
    direct = rows.get("direct")
    if direct is None:
        return
    for path, row in rows.items():
        if path == "direct":
            continue
        row["added"] = {
            metric: {q: diff(row[metric][q], direct[metric][q]) for q in ("p50", "p90", "p99")}
            for metric in ("ttfb", "total", "event_transit")
        }
    ngx = rows.get("nginx")
    for name in ("hubcore", ALT):
        hub = rows.get(name)
        if hub is not None and ngx is not None and "added" in hub and "added" in ngx:
            hub["ratio_to_nginx"] = {
                metric: {q: ratio(hub["added"][metric][q], ngx["added"][metric][q]) for q in ("p50", "p99")}
                for metric in ("ttfb", "total", "event_transit")
            }


# -- the run ------------------------------------------------------------------------
class Bench:
    def __init__(self, plan: Plan, workdir: Path, clients: int, use_nginx: bool, use_wrk: bool,
                 hub_source: str | None = None, alt_source: str | None = None, alert_blackhole: bool = False,
                 dashboard_load: bool = False, workers: int = 1) -> None:
        self.plan = plan
        # --workers N: the saturation phase also measures hubcore with
        # [server] workers = N and nginx with worker_processes N.
        self.workers = workers
        self.redis: Any = None
        self.hub_workers: Hub | None = None     # hubcore, N workers, in front of `static`
        self.hub_redis: Hub | None = None       # hubcore, one process with [shared] redis, in front of `static`
        self.proxy_workers: Service | None = None  # nginx, N worker processes, in front of `static`
        # --alert-blackhole: the measured hub has an [[alert]] target that never answers.
        self.alert_blackhole = alert_blackhole
        # --dashboard-load: an operator's open dashboard polls the measured hub.
        self.dashboard_load = dashboard_load
        self.dashboard: services.DashboardLoad | None = None
        self.hub_source = hub_source
        self.alt_source = alt_source
        self.workdir = workdir
        self.clients = clients
        self.notes: list[str] = []
        self.nginx_bin = services.find_nginx() if use_nginx else None
        self.wrk_bin = services.find_wrk() if use_wrk else None
        if self.nginx_bin is None:
            self.notes.append("nginx not found: the nginx reference path and the saturation phase are skipped "
                              "(install it, e.g. `apt-get install -y nginx`).")
        if self.wrk_bin is None:
            self.notes.append("wrk not found: the saturation phase (req/s) is skipped (`apt-get install -y wrk`).")
        self.paths = [p for p in PATHS if p != "nginx" or self.nginx_bin] + ([ALT] if alt_source else [])
        self.stack = ExitStack()
        self.vendor: Service | None = None
        self.hub: Hub | None = None
        self.proxy: Service | None = None       # nginx reverse proxy, one worker
        self.static: Service | None = None      # nginx answering a recorded stream
        self.hub_static: Hub | None = None      # hubcore in front of `static`
        self.alt: Hub | None = None             # --compare: the other tree's hub
        self.alt_static: Hub | None = None
        self.floor: Service | None = None       # bench/floor.py in front of `static`
        self.proxy_static_port = 0
        self.gens: list[LoadGen] = []
        self.hub_sent = 0
        self.idle_rss: int | None = None
        self.rss_peak: dict[str, int] = {}

    # -- services --------------------------------------------------------------------
    def start(self) -> None:
        self.vendor = self._own(services.start_vendor(self.workdir))
        pool = max(1024, self.plan.streams + 64)
        alert_url = None
        if self.alert_blackhole:
            alert_url = self._own(services.Blackhole()).url
            self.notes.append("--alert-blackhole: hubcore has an [[alert]] target that never answers, and a soft "
                              "budget its first request passes; an alert delivery hangs on it while requests are "
                              "measured (the --compare hub has the same soft budget and no target; the saturation "
                              "hubs have neither).")
        dashboard_port = services.free_port() if self.dashboard_load else 0
        self.hub = self._own(services.start_hub(self.workdir, "hub", f"http://127.0.0.1:{self.vendor.port}", pool,
                                                     self.hub_source, alert_url=alert_url,
                                                     dashboard_port=dashboard_port))
        if self.dashboard_load:
            self.dashboard = self._own(services.start_dashboard_load(self.hub, dashboard_port, self.hub_source))
            self.notes.append("--dashboard-load: an operator's dashboard polls hubcore's admin API, the live view "
                              "every 2 s and the overview every 10 s, while requests are measured (the --compare "
                              "hub and the saturation hubs have none).")
        if self.alt_source:
            self.alt = self._own(services.start_hub(self.workdir, "hub-alt", f"http://127.0.0.1:{self.vendor.port}", pool,
                                                    self.alt_source, budget=self.alert_blackhole))
        time.sleep(1.0)  # let start-up allocations settle before the idle reading
        self.idle_rss = services.rss_bytes(self.hub.pid)
        saturation = self.nginx_bin is not None and self.wrk_bin is not None
        if self.nginx_bin is not None:
            if saturation:
                static_port = services.free_port()
                recorded = payloads.recorded_stream(HEADLINE.events)
                body = services.NGINX_STATIC_SERVER.format(port=static_port, body=services.nginx_string(recorded))
                self.static = self._own(services.start_nginx(self.nginx_bin, self.workdir, "nginx-static", body, [static_port]))
                got = services.fetch(static_port)
                if not got.endswith(b"\r\n\r\n" + recorded):
                    raise RuntimeError("nginx does not serve the recorded stream byte for byte")
                self.hub_static = self._own(services.start_hub(
                    self.workdir, "hub-static", f"http://127.0.0.1:{static_port}", pool, self.hub_source))
                if self.alt_source:
                    self.alt_static = self._own(services.start_hub(
                        self.workdir, "hub-alt-static", f"http://127.0.0.1:{static_port}", pool, self.alt_source))
                self.floor = self._own(services.start_floor(self.workdir, static_port, payloads.VENDOR_KEYS[0]))
                if self.workers > 1:
                    self._start_workers(static_port, pool)
            proxy_port = services.free_port()
            d = self.workdir / "nginx-proxy"
            body = services.NGINX_PROXY_SERVER.format(dir=d, name="vendor", upstream_port=self.vendor.port,
                                                      pool=pool, port=proxy_port, key=payloads.VENDOR_KEYS[0])
            ports = [proxy_port]
            if self.static is not None:
                self.proxy_static_port = services.free_port()
                body += services.NGINX_PROXY_SERVER.format(dir=d, name="static", upstream_port=self.static.port,
                                                           pool=pool, port=self.proxy_static_port, key=payloads.VENDOR_KEYS[0])
                ports.append(self.proxy_static_port)
            self.proxy = self._own(services.start_nginx(self.nginx_bin, self.workdir, "nginx-proxy", body, ports))
        self.gens = [LoadGen() for _ in range(self.clients)]
        for gen in self.gens:
            self.stack.callback(gen.close)

    def _start_workers(self, static_port: int, pool: int) -> None:
        """hubcore with [server] workers = N (and the redis-server that
        needs) and nginx with N worker processes, both in front of `static`."""
        from bench.shared import RedisProcess

        assert self.nginx_bin is not None  # run() measures workers only beside nginx
        (self.workdir / "redis").mkdir(exist_ok=True)
        self.redis = self._own(RedisProcess(self.workdir / "redis"))
        self.hub_workers = self._own(services.start_hub(
            self.workdir, "hub-workers", f"http://127.0.0.1:{static_port}", pool, self.hub_source,
            workers=self.workers, redis_url=self.redis.url))
        self.hub_redis = self._own(services.start_hub(
            self.workdir, "hub-redis", f"http://127.0.0.1:{static_port}", pool, self.hub_source,
            redis_url=self.redis.url))
        port = services.free_port()
        d = self.workdir / "nginx-workers"
        body = services.NGINX_PROXY_SERVER.format(dir=d, name="static", upstream_port=static_port, pool=pool,
                                                  port=port, key=payloads.VENDOR_KEYS[0])
        self.proxy_workers = self._own(services.start_nginx(self.nginx_bin, self.workdir, "nginx-workers", body, [port],
                                                            workers=self.workers))
        self.notes.append(f"--workers {self.workers}: the saturation phase also runs hubcore with [server] workers = "
                          f"{self.workers} (sharing state through a local redis-server) and nginx with "
                          f"worker_processes {self.workers}, as `{workers_path('hubcore', self.workers)}` and "
                          f"`{workers_path('nginx', self.workers)}` (their CPU and RSS are those of all their "
                          f"processes), and `{REDIS_PATH}`: one hubcore process with the same [shared] redis.")

    def _own(self, service: Any) -> Any:
        self.stack.callback(service.stop)
        return service

    def close(self) -> None:
        self.stack.close()

    def target(self, path: str) -> tuple[int, str, str, int | None]:
        """(port, auth header, credential, pid of the proxy process) for a path."""
        assert self.vendor is not None and self.hub is not None
        if path == "direct":
            return self.vendor.port, "x-api-key", payloads.VENDOR_KEYS[0], None
        if path == "nginx":
            assert self.proxy is not None
            return self.proxy.port, "x-api-key", CLIENT_CREDENTIAL, self.proxy.pid
        if path == ALT:
            assert self.alt is not None
            return self.alt.port, "x-api-key", self.alt.token, self.alt.pid
        return self.hub.port, "x-api-key", self.hub.token, self.hub.pid

    def _jobs(self, path: str, sc: Scenario, **extra: Any) -> list[dict[str, Any]]:
        port, auth_name, auth_value, _ = self.target(path)
        n = max(1, min(len(self.gens), sc.concurrency // 8 or 1))
        shares = [sc.concurrency // n + (1 if i < sc.concurrency % n else 0) for i in range(n)]
        return [dict(host="127.0.0.1", port=port, auth_name=auth_name, auth_value=auth_value, body=sc.body,
                     events=sc.events, pace_ms=sc.pace_ms, concurrency=share, **extra) for share in shares]

    def _sample_rss(self, path: str, pid: int | None) -> None:
        if pid is not None:
            self.rss_peak[path] = max(self.rss_peak.get(path, 0), services.rss_bytes(pid))

    def _batch(self, path: str, jobs: list[dict[str, Any]], peak: dict[str, int] | None = None) -> tuple[dict[str, Any], float]:
        pid = self.target(path)[3]

        def sample() -> None:
            self._sample_rss(path, pid)
            if peak is not None and pid is not None:
                peak["rss"] = max(peak.get("rss", 0), services.rss_bytes(pid))

        cpu0 = services.cpu_seconds(pid) if pid else 0.0
        result = merge(services.run_jobs(self.gens, jobs, sample))
        cpu = services.cpu_seconds(pid) - cpu0 if pid else 0.0
        sample()
        if path == "hubcore":
            self.hub_sent += result["requests"] + result["warmups"]
        return result, cpu

    # -- phases --------------------------------------------------------------------------
    def latency(self, scenarios: list[Scenario], seconds: float) -> dict[str, dict[str, Any]]:
        """Every scenario on every path, in rounds; the path order changes
        each round (round_order) so that drift, warm caches and the path
        run just before favour none."""
        tallies = {(sc, p): Tally() for sc in scenarios for p in self.paths}
        for r in range(self.plan.rounds):
            for sc in scenarios:
                for path in round_order(self.paths, r):
                    duration = seconds * (2 if sc.pace_ms else 1)
                    think = C1_THINK_MS if sc.concurrency == 1 else 0.0
                    result, cpu = self._batch(path, self._jobs(path, sc, duration=duration, think_ms=think))
                    tallies[sc, path].add(result, cpu)
        out: dict[str, dict[str, Any]] = {}
        for sc in scenarios:
            rows = {p: tallies[sc, p].figures() for p in self.paths}
            add_deltas(rows)
            out[sc.key] = {"scenario": sc.__dict__ | {"name": sc.name}, "paths": rows}
        return out

    def open_streams(self) -> dict[str, Any]:
        """`streams` paced streams open at once per path: per-event transit
        and the proxy's memory. In rounds whose path order changes, as in
        `latency`: in one pass in a fixed order, the time to first byte
        while a thousand streams open moved by a factor of five between
        runs, and favoured whichever path went first."""
        plan = self.plan
        sc = Scenario(plan.stream_body, plan.stream_events, plan.stream_pace_ms, plan.streams)
        tallies = {path: Tally() for path in self.paths}
        before: dict[str, int | None] = {}
        peaks: dict[str, dict[str, int]] = {path: {} for path in self.paths}
        for r in range(plan.stream_rounds):
            for path in round_order(self.paths, r):
                pid = self.target(path)[3]
                if path not in before:
                    before[path] = services.rss_bytes(pid) if pid else None
                result, cpu = self._batch(path, self._jobs(path, sc, once=True, ramp=plan.stream_ramp, warmup=False),
                                          peaks[path])
                tallies[path].add(result, cpu)
        rows: dict[str, Any] = {}
        for path in self.paths:
            row = tallies[path].figures()
            row["rss_before"] = before[path]
            row["rss_peak"] = peaks[path].get("rss")
            rows[path] = row
        add_deltas(rows)
        return {"scenario": sc.__dict__ | {"name": f"{plan.streams} open streams, {sc.name}", "ramp_s": plan.stream_ramp,
                                           "rounds": plan.stream_rounds},
                "paths": rows}

    def saturation(self) -> dict[str, Any] | None:
        if self.wrk_bin is None or self.static is None or self.hub_static is None or self.proxy is None:
            return None
        bodies = {}
        for name, make in payloads.BODIES.items():
            f = self.workdir / f"body-{name}.json"
            f.write_bytes(make())
            bodies[name] = f
        targets = {
            "direct": (self.static.port, payloads.VENDOR_KEYS[0], self.static.pid),
            "nginx": (self.proxy_static_port, CLIENT_CREDENTIAL, self.proxy.pid),
            "hubcore": (self.hub_static.port, self.hub_static.token, self.hub_static.pid),
        }
        if self.alt_static is not None:
            targets[ALT] = (self.alt_static.port, self.alt_static.token, self.alt_static.pid)
        if self.floor is not None:
            targets[FLOOR] = (self.floor.port, CLIENT_CREDENTIAL, self.floor.pid)
        if self.hub_workers is not None and self.proxy_workers is not None:
            targets[workers_path("nginx", self.workers)] = (self.proxy_workers.port, CLIENT_CREDENTIAL,
                                                            self.proxy_workers.pid)
            targets[workers_path("hubcore", self.workers)] = (self.hub_workers.port, self.hub_workers.token,
                                                              self.hub_workers.pid)
        if self.hub_redis is not None:
            targets[REDIS_PATH] = (self.hub_redis.port, self.hub_redis.token, self.hub_redis.pid)
        paths = list(targets)
        runs: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
        for r in range(self.plan.wrk_rounds):
            for body, conns in self.plan.wrk:
                for path in round_order(paths, r):
                    port, credential, pid = targets[path]
                    script = self.workdir / f"wrk-{path}-{body}.lua"
                    services.wrk_script(script, bodies[body], (b"x-api-key", credential.encode()), HEADLINE.events)
                    # A process and its workers (--workers), all of one for the others.
                    user0, sys0 = services.family_cpu_split(pid)
                    result = services.run_wrk(self.wrk_bin, port, script, conns, self.plan.wrk_seconds)
                    user1, sys1 = services.family_cpu_split(pid)
                    result["cpu"] = (user1 - user0) + (sys1 - sys0)
                    result["cpu_sys"] = sys1 - sys0
                    result["rss"] = services.family_rss_bytes(pid)
                    runs.setdefault((body, conns, path), []).append(result)
        out: dict[str, Any] = {}
        for (body, conns, path), results in runs.items():
            n = len(results)
            requests = sum(r.get("requests", 0) for r in results)
            row = {
                "rps": sum(r["rps"] for r in results) / n,
                "p50": sum(r.get("p50", 0.0) for r in results) / n,
                "p99": sum(r.get("p99", 0.0) for r in results) / n,
                "errors": sum(r["errors"] for r in results),
                "error_kinds": dict(sum((Counter(r["error_kinds"]) for r in results), Counter())),
                "requests": requests,
                # "direct" is the static nginx itself: its CPU is the vendor's, not a proxy's.
                "cpu_s_per_1k": sum(r["cpu"] for r in results) / requests * 1000 if requests else None,
                "cpu_sys_s_per_1k": sum(r["cpu_sys"] for r in results) / requests * 1000 if requests else None,
                "rss": max(r["rss"] for r in results),
            }
            out.setdefault(f"{body}/c{conns}", {"body": body, "connections": conns, "paths": {}})["paths"][path] = row
        for case in out.values():
            paths = case["paths"]
            case["hubcore_share_of_nginx_rps"] = ratio(paths["hubcore"]["rps"], paths["nginx"]["rps"])
            if ALT in paths:
                case["alt_share_of_nginx_rps"] = ratio(paths[ALT]["rps"], paths["nginx"]["rps"])
            if FLOOR in paths:
                case["floor_share_of_nginx_rps"] = ratio(paths[FLOOR]["rps"], paths["nginx"]["rps"])
            hub_n, ngx_n = workers_path("hubcore", self.workers), workers_path("nginx", self.workers)
            if hub_n in paths:
                case["workers"] = {
                    "workers": self.workers,
                    "hubcore_speedup": ratio(paths[hub_n]["rps"], paths["hubcore"]["rps"]),
                    "speedup_over_redis": ratio(paths[hub_n]["rps"], paths[REDIS_PATH]["rps"]),
                    "nginx_speedup": ratio(paths[ngx_n]["rps"], paths["nginx"]["rps"]),
                    "hubcore_share_of_nginx_rps": ratio(paths[hub_n]["rps"], paths[ngx_n]["rps"]),
                }
        return out

    def accounting_check(self) -> dict[str, Any]:
        """Every request the hub answered must become a usage row."""
        assert self.hub is not None
        deadline = time.monotonic() + 10
        rows = services.usage_rows(self.hub.database)
        while rows < self.hub_sent and time.monotonic() < deadline:
            time.sleep(0.2)
            rows = services.usage_rows(self.hub.database)
        return {"hub_requests": self.hub_sent, "usage_rows": rows}


def environment(nginx_bin: str | None, wrk_bin: str | None) -> dict[str, Any]:
    from hubcore import __version__
    from hubcore.accounting import meter as sse
    from hubcore.gateway import exchange_core
    from hubcore.http import conn, upstream, wire
    from hubcore.governance import admit
    from hubcore.ops import access_core, tally
    from hubcore.routing import lease

    def run(cmd: list[str]) -> str:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr).strip() else ""

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hubcore": __version__,
        "commit": run(["git", "-C", str(services.REPO), "rev-parse", "--short", "HEAD"]),
        "meter": sse.Meter.__module__,
        "wire": wire.HeaderCollector.__module__,
        "connections": f"{conn.ConnCore.__module__}, {upstream.UpstreamCore.__module__}",
        "exchange": exchange_core.ExchangeCore.__module__,
        "key_ring": lease.RingCore.__module__,
        "limiter": admit.LimiterCore.__module__,
        "metrics": tally.TallyCore.__module__,
        "access_log": access_core.AccessCore.__module__,
        # The compiled Exchange calls the compiled head functions; the pure one, Python's.
        "head_functions": "hubcore.gateway._heads" if exchange_core.COMPILED else "hubcore.gateway.rewrite and routes",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "loadavg_at_start": os.getloadavg()[0],
        "nginx": services.nginx_version(nginx_bin) if nginx_bin else None,
        "wrk": " ".join(run([wrk_bin, "-v"]).split()[:2]) if wrk_bin else None,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """hubcore's targets against this run's figures (met None: not measured)."""
    out = []
    head = report["latency"].get(HEADLINE.key, {}).get("paths", {})
    hub = head.get("hubcore", {})
    r = hub.get("ratio_to_nginx", {}).get("total", {}).get("p50")
    hub_p50 = hub.get("added", {}).get("total", {}).get("p50")
    ngx_p50 = head.get("nginx", {}).get("added", {}).get("total", {}).get("p50")
    figure = None if r is None else f"{r:.2f}x ({_us(hub_p50)} vs {_us(ngx_p50)} µs)"
    if r is None and hub_p50 is not None and ngx_p50 is not None:
        figure = f"nginx added {_us(ngx_p50)} µs (≤ 0: no ratio); hubcore added {_us(hub_p50)} µs"
    out.append({"target": "c=1, 90 KB body, 20 events: hubcore-added p50 ≤ 2x nginx-added p50",
                "figure": figure, "met": None if r is None else r <= TARGET_ADDED_RATIO})
    p99 = hub.get("added", {}).get("total", {}).get("p99")
    out.append({"target": "c=1, 90 KB body, 20 events: hubcore-added p99 ≤ 1 ms",
                "figure": None if p99 is None else f"{_us(p99)} µs", "met": None if p99 is None else p99 <= TARGET_ADDED_P99})
    sat: dict[str, Any] = (report.get("saturation") or {}).get("large/c16") or {}
    share = sat.get("hubcore_share_of_nginx_rps")
    out.append({"target": "c=16: hubcore req/s ≥ 50% of nginx (one worker each)",
                "figure": None if share is None else f"{share * 100:.0f}% ({sat['paths']['hubcore']['rps']:.0f} vs {sat['paths']['nginx']['rps']:.0f} req/s, 90 KB body)",
                "met": None if share is None else share >= TARGET_RPS_SHARE})
    floor_share = sat.get("floor_share_of_nginx_rps")
    if floor_share is not None:
        out[-1]["note"] = f"{FLOOR}: {floor_share * 100:.0f}%"
    hub_cpu = sat.get("paths", {}).get("hubcore", {}).get("cpu_s_per_1k")
    ngx_cpu = sat.get("paths", {}).get("nginx", {}).get("cpu_s_per_1k")
    cpu = ratio(hub_cpu, ngx_cpu)
    out.append({"target": "c=16, 90 KB body: hubcore CPU per request (user + system) ≤ 2.5x nginx's",
                "figure": None if cpu is None else f"{cpu:.2f}x ({hub_cpu * 1000:.0f} vs {ngx_cpu * 1000:.0f} µs)",
                "met": None if cpu is None else cpu <= TARGET_CPU_RATIO})
    streams = report["open_streams"]
    hub_s = streams["paths"].get("hubcore", {})
    ev99 = hub_s.get("added", {}).get("event_transit", {}).get("p99")
    n = streams["scenario"]["concurrency"]
    peak = hub_s.get("rss_peak")
    stream_targets = [
        {"target": f"{n} open paced streams: added per-event delay p99 ≤ 5 ms",
         "figure": None if ev99 is None else f"{ev99 * 1000:.2f} ms", "met": None if ev99 is None else ev99 <= TARGET_EVENT_P99},
        {"target": f"{n} open paced streams: hub RSS ≤ 200 MB",
         "figure": None if peak is None else f"{peak / MB:.0f} MB", "met": None if peak is None else peak <= TARGET_STREAMS_RSS},
    ]
    if n < 1000:
        for t in stream_targets:
            t["note"] = f"quick mode opens {n} streams, not 1,000"
    out += stream_targets
    workers_case = (report.get("saturation") or {}).get(f"large/c{WORKERS_CONNECTIONS}", {}).get("workers")
    if workers_case is not None:
        count, speedup = workers_case["workers"], workers_case["hubcore_speedup"]
        want = TARGET_WORKERS_SPEEDUP * count
        out.append({"target": f"c={WORKERS_CONNECTIONS}, 90 KB body: hubcore with workers = {count} ≥ {want:.2g}x the "
                              "req/s of workers = 1",
                    "figure": None if speedup is None else f"{speedup:.2f}x (nginx: {_x(workers_case['nginx_speedup'])})",
                    "met": None if speedup is None else speedup >= want})
    idle = report["hub_idle_rss"]
    out.append({"target": "idle hub RSS ≤ 60 MB", "figure": None if idle is None else f"{idle / MB:.1f} MB",
                "met": None if idle is None else idle <= TARGET_IDLE_RSS})
    return out


# -- output ---------------------------------------------------------------------------
def _us(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e6:.0f}"


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def _n(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def _mb(value: int | None) -> str:
    return "–" if value is None else f"{value / MB:.1f}"


def render(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"## hubcore latency tax — {'quick' if report['quick'] else 'full'} run, {env['date']}",
        "",
        f"hubcore {env['hubcore']} ({env['commit'] or 'no commit'}, meter `{env['meter']}`, heads `{env.get('wire', '?')}`, connections `{env.get('connections', '?')}`, exchange `{env.get('exchange', '?')}`), Python {env['python']}, "
        f"{env['cpus']} CPUs ({env['cpu_model']}), load average at start {env['loadavg_at_start']:.2f}; "
        f"nginx {env['nginx'] or 'absent'}; {env['wrk'] or 'wrk absent'}. All on 127.0.0.1; "
        "times in µs; *added* = path minus direct at the same percentile; *event* = arrival of each SSE text "
        "delta minus the vendor's send time; CPU = proxy process CPU seconds per 1,000 requests; "
        f"at c=1 each client waits {C1_THINK_MS:g} ms between requests (as a user does), at c ≥ 16 none."
        + (f" Path `{ALT}` is hubcore run from `{env['compare']}`." if env.get("compare") else ""),
        "",
    ]
    for note in report["notes"]:
        lines.append(f"> {note}")
    if report["notes"]:
        lines.append("")
    lines += [
        "### Latency",
        "",
        "| scenario | c | path | req/s | TTFB p50 | p90 | p99 | total p50 | p90 | p99 | added p50 | added p99 | event p50 | event p99 | event added p50 | event added p99 | CPU s/1k | errors |",
        "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    ratio_rows = []
    for case in report["latency"].values():
        sc = case["scenario"]
        for path, row in case["paths"].items():
            added = row.get("added", {})
            lines.append(
                f"| {sc['name']} | {sc['concurrency']} | {path} | {_n(row['rps'])} | "
                f"{_us(row['ttfb']['p50'])} | {_us(row['ttfb']['p90'])} | {_us(row['ttfb']['p99'])} | "
                f"{_us(row['total']['p50'])} | {_us(row['total']['p90'])} | {_us(row['total']['p99'])} | "
                f"{_us(added.get('total', {}).get('p50'))} | {_us(added.get('total', {}).get('p99'))} | "
                f"{_us(row['event_transit']['p50'])} | {_us(row['event_transit']['p99'])} | "
                f"{_us(added.get('event_transit', {}).get('p50'))} | {_us(added.get('event_transit', {}).get('p99'))} | "
                f"{'–' if row['cpu_s_per_1k'] is None or path == 'direct' else format(row['cpu_s_per_1k'], '.3f')} | "
                f"{row['errors'] + row['bad_streams']} |"
            )
        for name in ("hubcore", ALT):
            hub = case["paths"].get(name, {})
            if "ratio_to_nginx" not in hub:
                continue
            ngx = case["paths"]["nginx"]
            ratio_rows.append(
                f"| {sc['name']} | {sc['concurrency']} | {name} | {_us(hub['added']['total']['p50'])} | {_us(ngx['added']['total']['p50'])} | "
                f"{_x(hub['ratio_to_nginx']['total']['p50'])} | {_us(hub['added']['total']['p99'])} | {_us(ngx['added']['total']['p99'])} | "
                f"{_x(hub['ratio_to_nginx']['total']['p99'])} | {_us(hub['added']['event_transit']['p50'])} | "
                f"{_us(ngx['added']['event_transit']['p50'])} |"
            )
    if ratio_rows:
        lines += [
            "",
            "### hubcore-added / nginx-added (total time)",
            "",
            "| scenario | c | proxy | added p50 | nginx added p50 | ratio p50 | added p99 | nginx added p99 | ratio p99 | event added p50 | nginx event added p50 |",
            "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|",
            *ratio_rows,
        ]
    streams = report["open_streams"]
    lines += [
        "",
        f"### {streams['scenario']['name']} (ramp {streams['scenario']['ramp_s']:g} s, "
        f"{streams['scenario'].get('rounds', 1)} round(s), in a balanced order)",
        "",
        "| path | streams ok | events | TTFB p50 | p99 | event p50 | event p90 | event p99 | event added p50 | event added p99 | RSS before MB | RSS peak MB | CPU s/1k | errors |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for path, row in streams["paths"].items():
        added = row.get("added", {}).get("event_transit", {})
        ok = row["requests"] - row["errors"] - row["bad_streams"]
        lines.append(
            f"| {path} | {ok} | {row['event_transit']['n']} | {_us(row['ttfb']['p50'])} | {_us(row['ttfb']['p99'])} | "
            f"{_us(row['event_transit']['p50'])} | {_us(row['event_transit']['p90'])} | {_us(row['event_transit']['p99'])} | "
            f"{_us(added.get('p50'))} | {_us(added.get('p99'))} | {_mb(row['rss_before'])} | {_mb(row['rss_peak'])} | "
            f"{'–' if row['cpu_s_per_1k'] is None or path == 'direct' else format(row['cpu_s_per_1k'], '.3f')} | "
            f"{row['errors'] + row['bad_streams']} |"
        )
    lines.append(f"\nhubcore idle RSS before any load: {_mb(report['hub_idle_rss'])} MB.")
    sat = report.get("saturation")
    if sat:
        lines += [
            "",
            "### Saturation (wrk, one thread; upstream: nginx `return 200` with the recorded 20-event stream)",
            "",
            "| body | connections | path | req/s | share of nginx | latency p50 | p99 | CPU s/1k | of which system | RSS MB | errors |",
            "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        if any(FLOOR in case["paths"] for case in sat.values()):
            lines[-3:-3] = [
                "",
                f"`{FLOOR}` is bench/floor.py: a bare pass-through proxy on hubcore's stack (Python, uvloop, "
                "httptools, hubcore's head rendering; no auth, limits, metering, accounting or logs). hubcore's CPU above it is the cost "
                "of its features; its own CPU above nginx's is the cost of the language and the stack.",
            ]
        for case in sat.values():
            ngx_rps = case["paths"]["nginx"]["rps"]
            for path, row in case["paths"].items():
                cpu = "–" if path == "direct" or row["cpu_s_per_1k"] is None else f"{row['cpu_s_per_1k']:.3f}"
                cpu_sys = "–" if path == "direct" or row["cpu_sys_s_per_1k"] is None else f"{row['cpu_sys_s_per_1k']:.3f}"
                share = "–" if path == "direct" or not ngx_rps else f"{row['rps'] / ngx_rps * 100:.0f}%"
                lines.append(
                    f"| {case['body']} | {case['connections']} | {path} | {row['rps']:.0f} | "
                    f"{share} | {_us(row['p50'])} | {_us(row['p99'])} | "
                    f"{cpu} | {cpu_sys} | {_mb(row['rss'])} | {row['errors']} |"
                )
        workers_rows = [
            f"| {case['body']} | {case['connections']} | {_x(w['hubcore_speedup'])} | {_x(w['speedup_over_redis'])} | "
            f"{_x(w['nginx_speedup'])} | "
            f"{'–' if w['hubcore_share_of_nginx_rps'] is None else format(w['hubcore_share_of_nginx_rps'] * 100, '.0f') + '%'} |"
            for case in sat.values() if (w := case.get("workers"))
        ]
        if workers_rows:
            n = next(case["workers"]["workers"] for case in sat.values() if case.get("workers"))
            lines += [
                "",
                f"### {n} workers against one (req/s, same rounds)",
                "",
                f"| body | connections | hubcore x{n} / hubcore | hubcore x{n} / {REDIS_PATH} | nginx x{n} / nginx "
                f"| hubcore x{n} share of nginx x{n} |",
                "|---|--:|--:|--:|--:|--:|",
                *workers_rows,
            ]
    acct = report["accounting"]
    lines += ["", f"Accounting: {acct['usage_rows']} usage rows for {acct['hub_requests']} requests through the hub."]
    lines += ["", "### Targets", "", "| target | this run | met |", "|---|---|---|"]
    for t in report["targets"]:
        met = "–" if t["met"] is None else ("yes" if t["met"] else "**no**")
        note = f" ({t['note']})" if t.get("note") else ""
        lines.append(f"| {t['target']} | {t['figure'] or 'not measured'}{note} | {met} |")
    return "\n".join(lines) + "\n"


@contextmanager
def workdir(path: str | None, keep: bool) -> Iterator[Path]:
    if path:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        yield p
        return
    d = Path(tempfile.mkdtemp(prefix="hubcore-bench-"))
    try:
        yield d
    finally:
        if keep:
            print(f"(work directory kept: {d})", file=sys.stderr)
        else:
            shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run in under a minute (CI); figures are rough")
    parser.add_argument("--json", default=str(RESULTS / "latest.json"), help="where to write the figures (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=1, help="load generator processes for c >= 16 (default: 1)")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx reference even when installed")
    parser.add_argument("--no-wrk", action="store_true", help="skip the wrk saturation phase even when installed")
    parser.add_argument("--workdir", help="put configs, databases and logs here (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    parser.add_argument("--hubcore-path", help="run the hub from this source tree (its hubcore/ package) instead of this checkout")
    parser.add_argument("--alert-blackhole", action="store_true",
                        help="give the hub an [[alert]] webhook that never answers, with an alert hanging on it "
                             "from the first request: its latency must not move (with --compare on this tree, "
                             "the other hub gets the same soft budget and no target)")
    parser.add_argument("--dashboard-load", action="store_true",
                        help="poll the hub's dashboard API as an operator's open live page and overview do: the "
                             "latency must move by no more than its noise (compare with --compare on this tree)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help=f"also measure, at saturation, hubcore with [server] workers = N (and a redis-server "
                             f"for it) and nginx with worker_processes N, at c={WORKERS_CONNECTIONS} too "
                             "(needs nginx, wrk and redis-server)")
    parser.add_argument("--compare", metavar="TREE",
                        help=f"also measure a hub run from this source tree, as path {ALT!r}, interleaved with the others (A/B a change)")
    args = parser.parse_args(argv)
    raise_fd_limit()
    # SIGTERM unwinds like Ctrl-C, so the servers are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plan = quick_plan() if args.quick else full_plan()
    if args.workers < 1:
        parser.error("--workers: at least 1")
    if args.workers > 1:
        plan = with_workers(plan)
    started = time.monotonic()
    with workdir(args.workdir, args.keep) as wd:
        bench = Bench(plan, wd, max(1, args.clients), not args.no_nginx, not args.no_wrk, args.hubcore_path, args.compare,
                      args.alert_blackhole, args.dashboard_load, args.workers)
        try:
            bench.start()
            print(f"bench: services up in {wd}; measuring {', '.join(bench.paths)}…", file=sys.stderr)
            report: dict[str, Any] = {
                "quick": args.quick,
                "environment": environment(bench.nginx_bin, bench.wrk_bin) | {
                    "hubcore_path": args.hubcore_path, "compare": args.compare, "alert_blackhole": args.alert_blackhole,
                    "dashboard_load": args.dashboard_load, "workers": args.workers,
                },
                "notes": bench.notes,
                "plan": plan,
                "hub_idle_rss": bench.idle_rss,
            }
            report["latency"] = bench.latency(plan.c1, plan.c1_seconds)
            print("bench: c=1 done", file=sys.stderr)
            report["latency"] |= bench.latency(plan.sweep, plan.sweep_seconds)
            print("bench: concurrency sweep done", file=sys.stderr)
            report["open_streams"] = bench.open_streams()
            print("bench: open streams done", file=sys.stderr)
            report["saturation"] = bench.saturation()
            report["hub_rss_peak"] = bench.rss_peak.get("hubcore")
            report["accounting"] = bench.accounting_check()
            if bench.dashboard is not None:
                report["dashboard_load"] = {"requests": bench.dashboard.requests, "errors": bench.dashboard.errors}
        finally:
            bench.close()
    report["targets"] = targets(report)
    report["failures"] = failures(report)
    if report.get("dashboard_load", {}).get("errors"):
        report["failures"].append(f"the dashboard load got {report['dashboard_load']['errors']} failed answers")
    report["seconds"] = round(time.monotonic() - started, 1)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    sys.stdout.write(render(report))
    print(f"\n({report['seconds']:g} s; figures in {out})")
    for failure in report["failures"]:
        print(f"bench: FAILED: {failure}", file=sys.stderr)
    # Speed is never a failure; wrong answers and lost usage rows are.
    return 1 if report["failures"] else 0


def failures(report: dict[str, Any]) -> list[str]:
    """Requests that did not get the vendor's stream, and usage rows missing."""
    out = []
    cases = list(report["latency"].values()) + [report["open_streams"]]
    for case in cases:
        for path, row in case["paths"].items():
            if row["errors"] or row["bad_streams"]:
                out.append(f"{case['scenario']['name']} via {path}: {row['errors']} errors, {row['bad_streams']} bad streams; "
                           f"first: {row['error_sample']}")
    for case in (report.get("saturation") or {}).values():
        for path, row in case["paths"].items():
            if row["errors"]:
                kinds = ", ".join(f"{kind} {n}" for kind, n in row["error_kinds"].items())
                out.append(f"wrk {case['body']} body c={case['connections']} via {path}: {row['errors']} errors ({kinds})")
    acct = report["accounting"]
    if acct["usage_rows"] != acct["hub_requests"]:
        out.append(f"accounting: {acct['usage_rows']} usage rows for {acct['hub_requests']} requests through the hub")
    return out
