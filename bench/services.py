"""The processes a latency-tax run starts and watches: the fake vendor,
hubcore as a user runs it, nginx (reverse proxy and static recorded-stream
server) and wrk, found at run time; plus CPU and RSS read from /proc.
"""
from __future__ import annotations

import http.client
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, IO

import orjson

from bench.payloads import VENDOR_KEYS, claude_code_headers

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
NGINX_CANDIDATES = ("nginx", "/usr/sbin/nginx", "/usr/local/nginx/sbin/nginx", "/usr/local/sbin/nginx")


# -- /proc ----------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads (the SQLite writer too)."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # utime, stime


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE


def family(pid: int) -> list[int]:
    """A process and its children: a supervisor's workers, nginx's master's
    workers (one process for a server that runs one)."""
    children: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", "rb") as f:
                children += [int(child) for child in f.read().split()]
    except FileNotFoundError:
        pass
    return [pid, *children]


def family_cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process and its children now running."""
    user = system = 0.0
    for member in family(pid):
        try:
            u, s = cpu_split(member)
        except FileNotFoundError:  # exited between the listing and the read
            continue
        user, system = user + u, system + s
    return user, system


def family_rss_bytes(pid: int) -> int:
    total = 0
    for member in family(pid):
        try:
            total += rss_bytes(member)
        except FileNotFoundError:
            continue
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_connect(port: int, proc: subprocess.Popen[Any], what: str, timeout: float = 20.0) -> None:
    """Until a connection to the port is accepted (the process must stay alive)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what} not accepting on 127.0.0.1:{port} after {timeout:g} s")


def wait_http(port: int, proc: subprocess.Popen[Any], what: str, timeout: float = 20.0) -> None:
    """Until `GET /` on the port answers (the process must stay alive)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
                s.sendall(b"GET / HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} not answering on 127.0.0.1:{port} after {timeout:g} s")


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[Any]
    port: int
    logs: list[IO[Any]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for f in self.logs:
            f.close()


def _python() -> list[str]:
    return [sys.executable]


def _die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the benchmark dies, so that no
    server outlives an interrupted run."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _env(first: str | None = None) -> dict[str, str]:
    """The environment for a child: this checkout importable (after `first`,
    a source tree whose hubcore should be used instead)."""
    env = dict(os.environ)
    paths = [p for p in (first, str(REPO), env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _start_module(workdir: Path, name: str, args: list[str], what: str) -> Service:
    """`python -m ARGS`, which prints the port it listens on as its first line."""
    log = open(workdir / f"{name}.log", "wb")
    proc = subprocess.Popen([*_python(), "-m", *args], stdout=subprocess.PIPE, stderr=log, env=_env(), cwd=REPO,
                            preexec_fn=_die_with_parent)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"{what} did not start (see {workdir / f'{name}.log'})")
    return Service(name, proc, int(line), [log, proc.stdout])


# -- the fake vendor --------------------------------------------------------------
def start_vendor(workdir: Path) -> Service:
    service = _start_module(workdir, "vendor", ["bench.vendor", "--port", "0", "--print-port"], "the fake vendor")
    wait_http(service.port, service.proc, "the fake vendor")
    return service


# -- the floor: a bare Python pass-through proxy (bench/floor.py) ------------------
def start_floor(workdir: Path, upstream_port: int, key: str) -> Service:
    # It prints its port once it listens (a GET / would reach the vendor).
    return _start_module(workdir, "floor", ["bench.floor", "--upstream-port", str(upstream_port), "--key", key],
                         "the floor proxy")


# -- hubcore ----------------------------------------------------------------------
@dataclass
class Hub(Service):
    token: str = ""
    config: Path = Path()
    database: Path = Path()


HUB_CONFIG = """\
# Generated by bench/: what a user writes (token auth, two keys, accounting on).
[server]
listen = "127.0.0.1:{port}"
database = "{dir}/hubcore.db"
ops_socket = "{dir}/ops.sock"
# Every load client comes from 127.0.0.1: up to 1,000 streams at once.
max_connections_per_address = 0
{server_extra}
[[upstream]]
name = "anthropic"
kind = "anthropic"
base_url = "{upstream}"
keys = [
  {{ key = "env:BENCH_ANTHROPIC_KEY_A", label = "key-a" }},
  {{ key = "file:{dir}/key-b", label = "key-b" }},
]
# Keep as many idle vendor connections as the benchmark has in flight, for
# longer than a phase leaves between two batches of one path (the nginx
# reference gets the same upstream keepalive). At the default 30 s a hub
# path opened its 1,000 vendor connections afresh in some rounds and not in
# others, as the order of the paths fell: its streams' time to first byte
# and event p99 followed its place in the rounds.
pool_max_idle = {pool}
pool_idle_timeout = 120.0
"""


# --alert-blackhole: an [[alert]] target that never answers, and a soft
# budget of one micro-dollar on the bench token, which the first request
# passes: from then on a delivery hangs on the target (retried, each attempt
# waiting its whole timeout) while the requests are measured.
ALERT_CONFIG = """
[[alert]]
name = "blackhole"
url = "{url}"
timeout = 30.0
retries = 10
"""
ALERT_BUDGET = ["--budget", "total=0.000001", "--soft"]


class Blackhole:
    """A webhook target that accepts connections and never answers (nor
    reads): a thread of the benchmark's own, stopped with it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, name="blackhole", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/never-answers"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # stopped
            self.held.append(conn)

    def stop(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


class DashboardLoad:
    """What an operator's open dashboard asks of a hub (--dashboard-load):
    the live view every 2 s, as its page refreshes, and the overview every
    10 s, through the admin API with an operator's API token; a thread of
    the benchmark's own, stopped with it."""

    LIVE_EVERY = 2.0
    OVERVIEW_EVERY = 10.0

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.token = token
        self.requests = 0
        self.errors = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, name="dashboard-load", daemon=True)
        self.thread.start()

    def _get(self, path: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path, headers={"authorization": f"Bearer {self.token}"})
            answer = conn.getresponse()
            answer.read()
            self.requests += 1
            if answer.status != 200:
                self.errors += 1
        except OSError:
            self.errors += 1
        finally:
            conn.close()

    def _poll(self) -> None:
        next_overview = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            self._get("/api/v1/live")
            if now >= next_overview:
                self._get("/api/v1/overview")
                next_overview = now + self.OVERVIEW_EVERY
            self._stop.wait(self.LIVE_EVERY)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(15)


def start_dashboard_load(hub: Hub, dashboard_port: int, source: str | None = None) -> DashboardLoad:
    """An operator on `hub` (`hubcore admin add`, `hubcore admin token`, as
    a user would) and the load of their open dashboard."""
    env = _env(source)
    added = subprocess.run([*_python(), "-m", "hubcore", "admin", "add", "bench", "--password-stdin",
                            "--config", str(hub.config)], input="bench dashboard password\n",
                           capture_output=True, text=True, env=env, timeout=60)
    if added.returncode != 0:
        raise RuntimeError(f"hubcore admin add failed: {added.stderr.strip()}")
    minted = subprocess.run([*_python(), "-m", "hubcore", "admin", "token", "bench", "--config", str(hub.config)],
                            capture_output=True, text=True, env=env, timeout=60)
    if minted.returncode != 0:
        raise RuntimeError(f"hubcore admin token failed: {minted.stderr.strip()}")
    return DashboardLoad(dashboard_port, minted.stdout.strip().splitlines()[-1])


def _has_dashboard(source: str | None) -> bool:
    """Whether the tree hubcore runs from knows the [dashboard] table (trees
    from before it refuse the table; --compare may run one)."""
    return (Path(source or REPO) / "hubcore" / "dashboard").is_dir()


def start_hub(workdir: Path, name: str, upstream: str, pool: int, source: str | None = None,
              launcher: list[str] | None = None, alert_url: str | None = None, dashboard_port: int = 0,
              budget: bool = False, workers: int = 1, redis_url: str | None = None,
              extra_config: str = "") -> Hub:
    """`hubcore token create` then `hubcore serve --config`, as a user would
    (hubcore imported from `source` when given: to compare two trees;
    `launcher` replaces `python -m hubcore`, e.g. to run it under a profiler;
    `alert_url`: an [[alert]] target, with a soft budget that the first
    request passes, see ALERT_CONFIG; `budget`: that soft budget without
    the target, for the hub an --alert-blackhole run compares with (so that
    only the hanging target differs); `dashboard_port`: the dashboard's
    listener, else none: several hubs of a run would all want its default
    port); `redis_url`: [shared] redis; `workers` > 1: [server] workers,
    which need `redis_url`, and returned once every worker listens;
    `extra_config`: TOML tables appended to its config)."""
    d = workdir / name
    d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (d / "key-b").write_text(VENDOR_KEYS[1] + "\n")
    config = d / "hubcore.toml"
    server_extra = f"workers = {workers}\n" if workers > 1 else ""
    text = HUB_CONFIG.format(port=port, dir=d, upstream=upstream, pool=pool, server_extra=server_extra)
    if redis_url is not None:
        text += f'\n[shared]\nredis = "{redis_url}"\n'

    if alert_url is not None:
        text += ALERT_CONFIG.format(url=alert_url)
    if _has_dashboard(source):
        text += f'\n[dashboard]\nlisten = "{f"127.0.0.1:{dashboard_port}" if dashboard_port else ""}"\n'
    config.write_text(text + extra_config)
    env = _env(source)
    env["BENCH_ANTHROPIC_KEY_A"] = VENDOR_KEYS[0]
    # `token create` makes no database unless given --init, which trees from
    # before it do not know (--compare runs them): an empty file is a new
    # SQLite database to both.
    (d / "hubcore.db").touch()
    made = subprocess.run([*_python(), "-m", "hubcore", "token", "create", "--config", str(config),
                           "--user", "bench", "--project", "latency-tax",
                           *(ALERT_BUDGET if alert_url is not None or budget else [])],
                          capture_output=True, text=True, env=env, cwd=d, timeout=60)
    if made.returncode != 0:
        raise RuntimeError(f"hubcore token create failed: {made.stderr.strip()}")
    token = made.stdout.strip().splitlines()[-1]
    out = open(d / "stdout.log", "wb")
    err = open(d / "hubcore.log", "wb")
    proc = subprocess.Popen([*(launcher or [*_python(), "-m", "hubcore"]), "serve", "--config", str(config)],
                            stdout=out, stderr=err, env=env, cwd=d, preexec_fn=_die_with_parent)
    hub = Hub(name, proc, port, [out, err], token=token, config=config, database=d / "hubcore.db")
    wait_http(port, proc, f"hubcore ({d / 'hubcore.log'})")
    if workers > 1:
        wait_workers(d / "ops.sock", proc, f"hubcore ({d / 'hubcore.log'})")
    return hub


def wait_workers(ops_socket: Path, proc: subprocess.Popen[Any], what: str, timeout: float = 60.0) -> None:
    """Until the supervisor's ops socket says every worker listens."""
    from hubcore.ops import client as opsclient

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before its workers listened")
        try:
            if all(w["up"] for w in opsclient.get_stats(str(ops_socket))["workers"]):
                return
        except opsclient.OpsClientError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not every worker listens after {timeout:g} s")


def usage_rows(database: Path) -> int:
    import sqlite3

    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)
    try:
        return int(conn.execute("SELECT count(*) FROM usage").fetchone()[0])
    finally:
        conn.close()


# -- nginx ------------------------------------------------------------------------
def find_nginx() -> str | None:
    for candidate in NGINX_CANDIDATES:
        path = shutil.which(candidate)
        if path:
            return path
    return None


def nginx_version(binary: str) -> str:
    done = subprocess.run([binary, "-v"], capture_output=True, text=True)
    return (done.stderr or done.stdout).strip().split("/")[-1]


# One process that is its own worker (master_process off): the reference is
# "nginx, one worker", and the benchmark samples that very pid. With N
# workers (--workers), a master and N worker processes, sampled together.
NGINX_MAIN = """\
daemon off;
{processes}
worker_rlimit_nofile 16384;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  client_body_temp_path {dir}/client_body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  client_max_body_size 32m;
  # Request bodies stay in memory, as hubcore keeps them.
  client_body_buffer_size 256k;
{body}
}}
"""

NGINX_PROXY_SERVER = """\
  access_log {dir}/access-{name}.log combined buffer=64k flush=1s;
  upstream {name} {{
    server 127.0.0.1:{upstream_port};
    keepalive {pool};
    keepalive_requests 1000000;
    keepalive_timeout 120s;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://{name};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 600s;
      # The gateway's job, done the nginx way: the client's credential out,
      # the vendor key in.
      proxy_set_header Authorization "";
      proxy_set_header x-api-key "{key}";
    }}
  }}
"""

NGINX_STATIC_SERVER = """\
  access_log off;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      default_type text/event-stream;
      return 200 '{body}';
    }}
  }}
"""


def nginx_string(data: bytes) -> str:
    """`data` as the inside of a single-quoted nginx config string."""
    text = data.decode()
    if "$" in text:
        raise ValueError("a `return` text with $ would be read as variables")
    return text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


def start_nginx(binary: str, workdir: Path, name: str, body: str, ports: list[int], workers: int = 1) -> Service:
    d = workdir / name
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    conf = d / "nginx.conf"
    if workers == 1:
        processes = "master_process off;\nworker_processes 1;"
    else:
        # As root, the workers would run as nobody, who cannot use the work directory.
        processes = f"master_process on;\nworker_processes {workers};" + ("\nuser root;" if os.geteuid() == 0 else "")
    conf.write_text(NGINX_MAIN.format(dir=d, body=body, processes=processes))
    log = open(d / "stderr.log", "wb")
    proc = subprocess.Popen([binary, "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")],
                            stdout=log, stderr=log, preexec_fn=_die_with_parent)
    service = Service(name, proc, ports[0], [log])
    for port in ports:
        wait_http(port, proc, f"nginx {name} ({d / 'error.log'})")
    return service


def fetch(port: int, method: str = "POST", body: bytes = b"{}") -> bytes:
    """One request's whole response (head and body), for checking a server."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"%s / HTTP/1.1\r\nhost: bench\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
                  % (method.encode(), len(body), body))
        parts = []
        while chunk := s.recv(65536):
            parts.append(chunk)
    return b"".join(parts)


# -- wrk --------------------------------------------------------------------------
def find_wrk() -> str | None:
    return shutil.which("wrk")


def wrk_script(path: Path, body_file: Path, auth: tuple[bytes, bytes], events: int) -> None:
    lines = ['wrk.method = "POST"', f'local f = assert(io.open("{body_file}", "rb"))',
             "wrk.body = f:read(\"*a\")", "f:close()"]
    for name, value in claude_code_headers(auth, session="9d5e2c1a-7b3f-4e8d-a6c2-1f0e9d8c7b6a", events=events, pace_ms=0):
        lines.append(f'wrk.headers["{name.decode()}"] = "{value.decode()}"')
    path.write_text("\n".join(lines) + "\n")


_WRK_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _wrk_time(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"wrk time {text!r}")
    return float(m.group(1)) * _WRK_UNITS[m.group(2)]


def run_wrk(binary: str, port: int, script: Path, connections: int, duration: float, threads: int = 1) -> dict[str, Any]:
    threads = min(threads, connections)
    cmd = [binary, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
           "-s", str(script), f"http://127.0.0.1:{port}/v1/messages?beta=true"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    out = done.stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if done.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or out.strip()}")
    result: dict[str, Any] = {"rps": float(m.group(1)), "errors": 0}
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if m:
        result["requests"] = int(m.group(1))
    for q, value in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", out, re.M):
        result[f"p{q}"] = _wrk_time(value)
    # Errors by kind, so that a failed run says which: answers that were not
    # 2xx/3xx, or wrk's socket errors.
    kinds: dict[str, int] = {}
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        kinds["non-2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        kinds.update(zip(("connect", "read", "write", "timeout"), map(int, m.groups())))
    result["error_kinds"] = {k: n for k, n in kinds.items() if n}
    result["errors"] = sum(kinds.values())
    return result


# -- the load generator -------------------------------------------------------------
class LoadGen:
    """A `python -m bench.loadgen` process; jobs in, results out, while the
    caller samples the servers."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([*_python(), "-m", "bench.loadgen"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=_env(), cwd=REPO, preexec_fn=_die_with_parent)
        assert self.proc.stdout is not None
        if not orjson.loads(self.proc.stdout.readline() or b"{}").get("ready"):
            raise RuntimeError("the load generator did not start")

    def submit(self, job: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(orjson.dumps(job) + b"\n")
        self.proc.stdin.flush()

    def result(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the load generator exited ({self.proc.poll()})")
        return dict(orjson.loads(line))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_jobs(gens: list[LoadGen], jobs: list[dict[str, Any]], sample: Callable[[], None] | None = None,
             every: float = 0.05) -> list[dict[str, Any]]:
    """Run one job per generator at once; call `sample` every `every` s until all answer."""
    sel = selectors.DefaultSelector()
    for gen, job in zip(gens, jobs):
        gen.submit(job)
        assert gen.proc.stdout is not None
        sel.register(gen.proc.stdout, selectors.EVENT_READ, gen)
    results: dict[int, dict[str, Any]] = {}
    pending = len(jobs)
    while pending:
        if sample is not None:
            sample()
        for key, _ in sel.select(timeout=every):
            gen = key.data
            results[id(gen)] = gen.result()
            sel.unregister(key.fileobj)
            pending -= 1
    sel.close()
    return [results[id(g)] for g in gens[:len(jobs)]]
