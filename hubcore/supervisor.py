"""`hubcore serve` with [server] workers = N > 1: a supervisor that runs N
hubs, each a `hubcore serve` process of its own on the one port
(SO_REUSEPORT), and is the one process an operator and systemd see.

Theory of operation. The supervisor runs no hub. It does once what must
happen once (checks, the schema migration, the first token), then starts
each worker as a fresh interpreter with HUBCORE_WORKER="i/N" in its
environment: a worker is a whole hub (app.serve) but for its ops socket
(`<ops_socket>.w<i>`), its spool (`<spool>.w<i>`, worker 0 keeps the
plain one) and the dashboard (worker 0 only). Limits, budgets, key states
and sessions are shared through [shared] redis, which several workers
need. The supervisor
- knows a worker is up when its ops socket answers /stats, and sends
  READY=1 to systemd once all are; it opens the hub's own ops socket,
  which sums the workers' answers (ops.aggregate);
- passes SIGHUP on to every worker, and SIGTERM / SIGINT, then waits for
  all of them to drain and exit;
- starts a worker that exited again, after 0.5 s doubling to 30 s (back to
  0.5 s once one ran a minute); a worker that fails its first start stops
  the hub (exit 1), its reason in the log above the supervisor's line;
- asks every worker's ops socket every few seconds: one that has not
  answered for half the systemd watchdog interval (WATCHDOG_USEC), or
  STUCK_AFTER without one, has a stuck loop: it is killed (SIGKILL) and
  started again. The supervisor pings the watchdog after each round, so a
  stuck worker costs the service that worker's restart, not a restart of
  the whole service.
"""
from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import glob
import logging
import os
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hubcore import __version__, store
from hubcore import app as app_mod
from hubcore import config as config_mod
from hubcore.config import Config
from hubcore.errors import ConfigError
from hubcore.ops import sdnotify
from hubcore.ops.aggregate import AggregateOpsServer, ask
from hubcore.ops.client import OpsClientError

log = logging.getLogger("hubcore.supervisor")

WORKER_ENV = "HUBCORE_WORKER"            # "i/N" in a worker's environment
SUPERVISOR_ENV = "HUBCORE_SUPERVISOR"    # the supervisor's pid, in a worker's
# What a worker must not inherit: systemd talks to the supervisor alone
# (NotifyAccess=main), and its watchdog is the supervisor's.
SUPERVISOR_ONLY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")

RESTART_DELAY_FIRST = 0.5    # s before a worker that exited is started again, doubled each time
RESTART_DELAY_MAX = 30.0     # s
RESTART_DELAY_RESET = 60.0   # s a worker must have run for the delay to start from the first again
START_TIMEOUT = 120.0        # s a worker may take to open its ops socket (migrations, a spool replay)
# A worker whose ops socket has not answered for this long, with no systemd
# watchdog to take half of (WatchdogSec=30 in the unit gives the same 15 s
# plus a margin), has a stuck event loop.
STUCK_AFTER = 30.0           # s
HEALTH_INTERVAL = 2.0        # s between rounds of asking every worker
STARTING_INTERVAL = 0.05     # s between asks while a worker starts
HEALTH_TIMEOUT = 2.0         # s a worker has to answer one ask
# Beyond drain_timeout, what a worker may take to flush its usage queue and
# close (the recorder's own bound is 30 s); then it is killed.
STOP_GRACE = 40.0            # s


# -- a worker's side --------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class WorkerSlot:
    index: int
    count: int


def worker_slot(environ: Mapping[str, str] = os.environ) -> WorkerSlot | None:
    """The slot this process serves in, when a supervisor started it."""
    value = environ.get(WORKER_ENV)
    if not value:
        return None
    index, _, count = value.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise ConfigError(f"{WORKER_ENV}={value!r}: not a worker slot (i/N)")
    return WorkerSlot(int(index), int(count))


def worker_socket(ops_socket: str, index: int) -> str:
    return f"{ops_socket}.w{index}"


def sibling_sockets(config: Config, slot: WorkerSlot) -> list[str]:
    """The ops sockets of the workers other than `slot`, whose part of the
    live view the dashboard (in worker 0) asks for; `config` is the hub's,
    before worker_config."""
    return [worker_socket(config.server.ops_socket, i) for i in range(slot.count) if i != slot.index]


def worker_spool(spool: str, index: int) -> str:
    # Worker 0 keeps the plain path, so that a hub going from one process
    # to several (or back) replays what the single process spooled.
    return spool if index == 0 else f"{spool}.w{index}"


def worker_config(config: Config, slot: WorkerSlot) -> Config:
    """The config of worker `slot`: its own ops socket and spool (two
    processes never append to one file), the dashboard in worker 0 only
    (its sessions live in that process's memory)."""
    server = dataclasses.replace(
        config.server,
        workers=slot.count,
        ops_socket=worker_socket(config.server.ops_socket, slot.index),
        spool=worker_spool(config.spool_path, slot.index),
    )
    dashboard = config.dashboard if slot.index == 0 else dataclasses.replace(config.dashboard, listen="")
    return dataclasses.replace(config, server=server, dashboard=dashboard)


def follow_supervisor(environ: Mapping[str, str] = os.environ) -> bool:
    """Have the kernel send SIGTERM (a drain) to this worker when its
    supervisor dies, even by kill -9; False when it is already gone."""
    PR_SET_PDEATHSIG = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not glibc/Linux: the parent check below still holds
        pass
    parent = environ.get(SUPERVISOR_ENV, "")
    return not parent.isdigit() or os.getppid() == int(parent)


class _WorkerLogName(logging.Filter):
    """Each worker's records name it: `hubcore[w1]`."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.suffix = f"[w{index}]"

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.endswith(self.suffix):
            record.name += self.suffix
        return True


def name_worker_logs(index: int) -> None:
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerLogName(index))


# -- the supervisor's side -----------------------------------------------------------

def port_problem(listen: str) -> str | None:
    """Why the workers could not listen on `listen`: a bind without
    SO_REUSEPORT fails where any process listens already, even another
    hub's workers, which the workers' own binds (with it) would join."""
    host, port = config_mod.parse_listen(listen)
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return f"cannot listen on {listen}: {e.strerror}"
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as e:
                return f"cannot listen on {listen}: {e.strerror or e}"
    return None


def left_spools(config: Config) -> list[tuple[str, int]]:
    """Spools of worker slots this hub does not run (it ran more workers
    before) that still hold events: (path, slot)."""
    found = []
    for path in glob.glob(glob.escape(config.spool_path) + ".w*"):
        suffix = path.rpartition(".w")[2]
        if suffix.isdigit() and int(suffix) >= config.server.workers and os.path.getsize(path) > 0:
            found.append((path, int(suffix)))
    return sorted(found, key=lambda found: found[1])


def exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class Worker:
    """One worker slot and the process serving it now."""

    def __init__(self, index: int, socket_path: str) -> None:
        self.index = index
        self.socket = socket_path
        self.process: asyncio.subprocess.Process | None = None
        self.started = 0.0             # monotonic time of its latest start
        self.up = False                # its ops socket answered since that start
        self.answered = 0.0            # monotonic time it last answered
        self.restarts = 0
        self.delay = RESTART_DELAY_FIRST
        self.reload_pending = False    # a SIGHUP that came while it started
        self.killed_stuck = False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.process is not None
            try:
                self.process.send_signal(sig)
            except ProcessLookupError:
                pass

    def row(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "pid": self.process.pid if self.process is not None else None,
            "up": self.running and self.up,
            "restarts": self.restarts,
        }


class Supervisor:
    """Runs `config.server.workers` workers until stopped (WorkerRoster for
    the ops socket)."""

    def __init__(self, config: Config, config_path: str | None, listen: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.listen = listen
        self.count = config.server.workers
        self.started_at = time.time()
        self.workers = [Worker(i, worker_socket(config.server.ops_socket, i)) for i in range(self.count)]
        self.ready = False
        self.stopping = False
        self.stuck_after, self.watchdog = _stuck_after(sdnotify.watchdog_interval())
        self._changed = asyncio.Event()      # a worker came up or failed its start, or a stop began
        self._stop = asyncio.Event()
        self._failed: tuple[Worker, int] | None = None
        self._unclean = False                # a worker exited other than by a drain while stopping
        self._tasks: list[asyncio.Task[None]] = []

    # -- WorkerRoster ----------------------------------------------------------------

    def listening(self) -> list[tuple[int, str]]:
        return [(w.index, w.socket) for w in self.workers if w.running and w.up]

    def roster(self) -> list[dict[str, Any]]:
        return [w.row() for w in self.workers]

    def starting(self) -> str | None:
        if self.ready:
            return None
        up = sum(1 for w in self.workers if w.running and w.up)
        return f"starting: {up} of {self.count} workers listen"

    # -- the run -----------------------------------------------------------------------

    async def run(self, show_token: Callable[[str], None] | None = None) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        cfg = self.config.server
        problem = port_problem(cfg.listen)
        if problem is not None:
            log.error("%s", problem)
            return 1
        try:
            made = app_mod.first_token(self.config)  # migrates the schema, once for all workers
        except (OSError, sqlite3.Error, store.SchemaTooNew) as e:
            log.error("cannot start: %s", e)
            return 1
        for path, slot in left_spools(self.config):
            log.warning("%s holds usage events of worker %d, which this hub no longer runs: they are "
                        "replayed when a hub with server.workers > %d starts", path, slot, slot)
        ops = AggregateOpsServer(cfg.ops_socket, self, mode=cfg.ops_socket_mode, group=cfg.ops_socket_group or None)
        try:
            await ops.start()
        except (OSError, LookupError) as e:
            why = store.directory_problem(ops.path) if isinstance(e, OSError) else None
            log.error("cannot open the ops socket %s: %s", ops.path, why or getattr(e, "strerror", None) or e)
            self._withdraw(made)
            return 1
        try:
            return await self._serve(made, show_token)
        finally:
            await ops.close()

    async def _serve(self, made: tuple[int, str, Any] | None, show_token: Callable[[str], None] | None) -> int:
        log.info("hubcore %s starting %d workers on %s", __version__, self.count, self.config.server.listen)
        self._tasks = [asyncio.get_running_loop().create_task(self._keep(w), name=f"hubcore-worker-{w.index}")
                       for w in self.workers]
        health = asyncio.get_running_loop().create_task(self._watch(), name="hubcore-worker-health")
        try:
            while True:
                self._changed.clear()
                if self.stopping or self._failed or all(w.up for w in self.workers):
                    break
                await self._changed.wait()
            if self._failed is not None and not self.stopping:
                worker, code = self._failed
                log.error("worker %d %s before it listened (its reason is logged above); stopping the others",
                          worker.index, exit_text(code))
                self.stop()
                await self._stopped()
                self._withdraw(made)
                return 1
            if not self.stopping:
                self._announce(made, show_token)
            await self._stop.wait()
            return await self._stopped()
        finally:
            health.cancel()
            for task in self._tasks:
                task.cancel()

    def _announce(self, made: tuple[int, str, Any] | None, show_token: Callable[[str], None] | None) -> None:
        self.ready = True
        cfg = self.config.server
        scheme = "https" if cfg.tls_cert else "http"
        host, port = config_mod.parse_listen(cfg.listen)
        log.info("hubcore %s listening on %s://%s:%d with %d workers (pids %s)", __version__, scheme, host, port,
                 self.count, " ".join(str(w.process.pid) for w in self.workers if w.process is not None))
        app_mod.announce_first_token(made, show_token)
        sdnotify.ready(f"listening on {cfg.listen} with {self.count} workers")

    def _withdraw(self, made: tuple[int, str, Any] | None) -> None:
        if made is None:
            return
        try:
            app_mod.withdraw_first_token(self.config, made[0])
        except (OSError, sqlite3.Error) as e:
            log.error("could not take back the first hub token (id %d): %s; revoke it", made[0], e)

    # -- one worker slot ------------------------------------------------------------------

    async def _keep(self, worker: Worker) -> None:
        """Run the slot's worker until the hub stops, starting it again
        after it exits."""
        while not self.stopping:
            try:
                await self._spawn(worker)
            except OSError as e:
                log.error("cannot start worker %d: %s", worker.index, e)
                code = 127
            else:
                assert worker.process is not None
                code = await worker.process.wait()
            worker.up = False
            if self.stopping:
                if code not in (0, -signal.SIGTERM):
                    log.error("worker %d %s while stopping", worker.index, exit_text(code))
                    self._unclean = True
                return
            if not self.ready:
                # Before the hub listened: a broken port or config, not a crash.
                self._failed = self._failed or (worker, code)
                self._changed.set()
                return
            ran = time.monotonic() - worker.started
            if ran >= RESTART_DELAY_RESET:
                worker.delay = RESTART_DELAY_FIRST
            why = "its event loop was stuck, " if worker.killed_stuck else ""
            log.error("worker %d %s after %.1f s; %sstarting it again in %g s",
                      worker.index, exit_text(code), ran, why, worker.delay)
            delay, worker.delay = worker.delay, min(worker.delay * 2, RESTART_DELAY_MAX)
            worker.restarts += 1
            await self._sleep_unless_stopping(delay)

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            pass

    async def _spawn(self, worker: Worker) -> None:
        args = ["serve"]
        if self.config_path is not None:
            args += ["--config", self.config_path]
        if self.listen is not None:
            args += ["--listen", self.listen]
        env = {k: v for k, v in os.environ.items() if k not in SUPERVISOR_ONLY_ENV}
        env[WORKER_ENV] = f"{worker.index}/{self.count}"
        env[SUPERVISOR_ENV] = str(os.getpid())
        worker.up = worker.killed_stuck = worker.reload_pending = False
        worker.started = time.monotonic()
        # A fresh interpreter, never a fork of this one: its event loop and
        # threads stay here. A session of its own: a Ctrl-C on the terminal
        # reaches the supervisor alone, which passes it on once.
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hubcore", *args, env=env, stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        log.info("worker %d started (pid %d)", worker.index, worker.process.pid)

    # -- health ---------------------------------------------------------------------------

    async def _watch(self) -> None:
        """Ask every worker's ops socket, round after round: mark the ones
        that came up, kill the ones that stopped answering, and ping the
        systemd watchdog once a round is done."""
        while True:
            await asyncio.gather(*(self._ask(w) for w in self.workers))
            if self.watchdog:
                sdnotify.watchdog_ping()
            starting = any(w.running and not w.up for w in self.workers)
            await asyncio.sleep(STARTING_INTERVAL if starting else self._interval())

    def _interval(self) -> float:
        return min(HEALTH_INTERVAL, self.stuck_after / 4)

    async def _ask(self, worker: Worker) -> None:
        if not worker.running:
            return
        assert worker.process is not None
        pid = worker.process.pid
        try:
            await ask(worker.socket, "/stats", timeout=min(HEALTH_TIMEOUT, self.stuck_after / 2))
        except OpsClientError:
            now = time.monotonic()
            if not worker.running or worker.process.pid != pid:
                return
            if worker.up and now - worker.answered > self.stuck_after:
                log.error("worker %d (pid %d) has not answered on its ops socket for %.0f s: killing it",
                          worker.index, pid, now - worker.answered)
                worker.killed_stuck = True
                worker.signal(signal.SIGKILL)
            elif not worker.up and now - worker.started > START_TIMEOUT:
                log.error("worker %d (pid %d) did not open its ops socket within %g s: killing it",
                          worker.index, pid, START_TIMEOUT)
                worker.signal(signal.SIGKILL)
            return
        if not worker.running or worker.process.pid != pid:
            return
        worker.answered = time.monotonic()
        if not worker.up:
            worker.up = True
            if self.ready:
                log.info("worker %d (pid %d) is back", worker.index, pid)
            if worker.reload_pending:
                worker.signal(signal.SIGHUP)
            self._changed.set()

    # -- signals --------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: every worker reloads; one still starting, once it is up."""
        log.info("SIGHUP: reloading every worker")
        try:
            workers = config_mod.load(self.config_path).server.workers
            if workers != self.count:
                log.warning("server.workers is %d in the file, %d run: a change of it applies at the next start",
                            workers, self.count)
        except (ConfigError, OSError):
            pass  # each worker says what is wrong with the file
        for worker in self.workers:
            if worker.running and worker.up:
                worker.signal(signal.SIGHUP)
            else:
                worker.reload_pending = True

    def stop(self) -> None:
        """SIGTERM, SIGINT: every worker drains and exits, then the supervisor."""
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping: every worker drains up to %g s", self.config.server.drain_timeout)
        sdnotify.stopping()
        for worker in self.workers:
            worker.signal(signal.SIGTERM)
        self._stop.set()
        self._changed.set()

    async def _stopped(self) -> int:
        """After a stop: wait for every worker to exit, killing any still
        running past its drain and flush; 0 when each drained and exited."""
        grace = self.config.server.drain_timeout + STOP_GRACE
        _, late = await asyncio.wait(self._tasks, timeout=grace)
        if late:
            for worker in self.workers:
                if worker.running:
                    log.error("worker %d did not stop within %g s: killing it", worker.index, grace)
                    worker.signal(signal.SIGKILL)
            await asyncio.wait(late)
            return 1
        if self._unclean:
            return 1
        log.info("stopped")
        return 0


def _stuck_after(watchdog: float | None) -> tuple[float, bool]:
    """How long a worker may leave its ops socket unanswered, and whether
    systemd's watchdog is to be pinged."""
    if watchdog is None:
        return STUCK_AFTER, False
    return watchdog / 2, True


async def supervise(
    config: Config, config_path: str | None, listen: str | None = None,
    show_token: Callable[[str], None] | None = None,
) -> int:
    """Run the hub as `config.server.workers` workers until stopped; 1 when
    it cannot start."""
    return await Supervisor(config, config_path, listen).run(show_token)
