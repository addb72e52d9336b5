"""The running hub: wires config, database, tokens, usage writer, upstreams,
the client-facing server and the signals together, and takes them down in
order (stop accepting, drain, flush usage)."""
from __future__ import annotations

import asyncio
import grp
import logging
import os
import signal
import sqlite3
import ssl
import sys
import time
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import orjson

from hubcore import __version__, config as config_mod, store
from hubcore.database import is_postgres, target as database_target

from hubcore.ops import sdnotify
from hubcore.ops.accesslog import AccessLog
from hubcore.config import Config
from hubcore.dashboard.server import DashboardServer
from hubcore.errors import ConfigError
from hubcore.governance.limiter import Limiter
from hubcore.governance import audit, tokens as tokens_mod
from hubcore.governance.limits import calendar_periods, effective_groups
from hubcore.governance.storage import ScopeLimits, load_scope_limits, read_limits
from hubcore.ops.alerts import Alerts
from hubcore.ops.aggregate import ask
from hubcore.ops.client import OpsClientError
from hubcore.ops.merge import LIVE_REQUESTS_SHOWN, merge_live
from hubcore.ops.metrics import KEY_FIELDS, HubMetrics
from hubcore.ops.server import KeyReset, KeySwitched, OpsServer
from hubcore.runtime import CycleCollector
from hubcore.accounting.pricing import Pricing
from hubcore.gateway.exchange import Exchange, Hub, Phase
from hubcore.gateway.upstreams import load_disabled_keys, restore_key_switches, store_key_switches
from hubcore.http.client import client_ssl_context
from hubcore.http.server import Server, server_ssl_context
from hubcore.governance.tokens import TokenTable
from hubcore.accounting.recorder import UsageRecorder
from hubcore.accounting.retention import Retention

if TYPE_CHECKING:
    from hubcore.shared.redis_state import SharedState

log = logging.getLogger("hubcore")
_T = TypeVar("_T")

# Where `serve` leaves the token it mints on an empty database: in the
# database's directory, the service's state directory under systemd.
FIRST_TOKEN_FILE = "first-token"

# Seconds storing an operator's key switch waits for a locked database (at
# most server.db_busy_timeout): well inside the 5 s the CLI waits for the
# answer, which then says that the switch holds until a restart only.
KEY_SWITCH_BUSY_TIMEOUT = 2.0

# Seconds another worker has to answer worker 0's dashboard with its live
# view (App.live_view): the page refreshes every 2 s, and a worker that is
# slower is left out and named missing rather than holding the page.
LIVE_ASK_TIMEOUT = 0.5


class StartFailed(OSError):
    """A start step failed for a reason the operator must fix; the message
    names the step and the address or path."""


class App:
    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.loop = loop
        self.tokens = TokenTable()
        self.recorder = UsageRecorder(
            config.server.database,
            config.spool_path,
            queue_max=config.server.usage_queue_max,
            flush_interval=config.server.usage_flush_interval,
            busy_timeout_ms=int(config.server.db_busy_timeout * 1000),
            timezone=config.server.budget_timezone,
        )
        self.prices = Pricing.load(_path_or_none(config.server.prices), config.pricing.unpriced)
        self.metrics = HubMetrics(max_series=config.server.metrics_max_series)
        # Budgets are charged from each usage event as it is recorded, not
        # after the database write.
        self.limiter = Limiter(config.server.budget_timezone)
        self.recorder.add_listener(self.limiter.on_usage)
        # Spend and tokens per user, project and model for /metrics, from the same events.
        self.recorder.add_listener(self.metrics.on_usage)
        # Limits, key states and sessions shared with the hub's other
        # instances, with a [shared] table only: without one, none of it
        # is imported, and the request path is as it was.
        self.shared: SharedState | None = None
        if config.shared.redis:
            from hubcore.shared.redis_state import SharedState

            self.shared = SharedState(
                config.shared, tz=config.server.budget_timezone, instances_hint=config.server.workers,
                seed=self.limiter.spend_report,
            )
            self.recorder.add_listener(self.shared.on_usage)
            self.limiter.judges_rates = False
            self.shared.on_charge_elsewhere = self.limiter.charge_elsewhere
            self.shared.on_spend_elsewhere = self.limiter.raise_spend
        self.hub = Hub(config, loop, self.tokens, self.recorder, self.prices, self.metrics, self.limiter, self.shared)
        if self.shared is not None:
            for name, upstream in self.hub.upstreams.items():
                upstream.ring.listener = self.shared.key_listener(name)
        # Alerts hear of budget thresholds, key states and failovers through
        # hooks off the request path's common case (hubcore.ops.alerts).
        self.alerts = Alerts(config.alerts, timezone=self.limiter.tz)
        self.limiter.on_crossing = self.alerts.on_crossing
        self.hub.on_failover = self.alerts.on_failover
        for upstream in self.hub.upstreams.values():
            self.alerts.watch(upstream.ring)
        self.server = Server(config.server, self.hub.handle, loop, self.metrics, gate=self.hub.gate, render_error=self.hub.render_error)
        if logging.getLevelName(config.server.log_level.upper()) <= logging.INFO:
            self.hub.access = AccessLog(sys.stderr, loop, json=config.server.log_format == "json")
        self.ops: OpsServer | None = None
        if config.server.ops_socket:
            self.ops = OpsServer(
                config.server.ops_socket,
                self,
                mode=config.server.ops_socket_mode,
                group=config.server.ops_socket_group or None,
            )
        # The ops sockets of the hub's other workers (hubcore.supervisor),
        # asked for their part of the dashboard's live view: set by serve()
        # in worker 0, the one with the dashboard.
        self.sibling_ops_sockets: list[str] = []
        self.dashboard: DashboardServer | None = None
        if config.dashboard.listen:
            self.dashboard = DashboardServer(
                config.dashboard, database=config.server.database, timezone=config.server.budget_timezone,
                tokens=self.tokens, limiter=self.limiter, hub=self,
            )
        self.retention: Retention | None = None
        if config.server.usage_retention_days:
            budget_zone = self.limiter.tz
            self.retention = Retention(
                config.server.database, config.server.usage_retention_days,
                # No row of a budget period still current goes (a week can
                # start in the previous month).
                keep_since=lambda now: min(start for start, _ in calendar_periods(now, budget_zone)),
                busy_timeout_ms=int(config.server.db_busy_timeout * 1000),
            )
        self.watchdog = sdnotify.Watchdog()
        self.db: sqlite3.Connection | None = None
        self.addresses: list[tuple[str, int]] = []
        self.dashboard_addresses: list[tuple[str, int]] = []
        self.started = time.time()
        self.stopped = asyncio.Event()
        self._reloader: asyncio.Task[None] | None = None
        # PostgreSQL: the LISTEN for token changes made anywhere (pgstore.listen_tokens).
        self._listener: asyncio.Task[None] | None = None
        # Key switches are stored one at a time, in the order they were made.
        self._key_switch_lock = asyncio.Lock()
        # Counts the operator's switches made through this instance (see refresh_tokens).
        self._key_switches = 0
        # The poll, SIGHUP and the ops socket all refresh the token table:
        # one at a time, so an older read never lands after a newer one and
        # the worker threads never share the connection at once.
        self._refresh_lock = asyncio.Lock()
        # Reads of self.db under way in worker threads (see _read_db).
        self._db_reads: set[asyncio.Future[Any]] = set()
        # Started by serve() only: the collector is the whole process's.
        self.cycles = CycleCollector(loop, config.server.gc_full_interval)

    async def start(self, sock: Any = None, *, reuse_port: bool = False) -> list[tuple[str, int]]:
        """Open everything and listen; `reuse_port`: as one of several
        workers on the port (SO_REUSEPORT), each with a listener of its own."""
        cfg = self.config.server
        # check_same_thread=False: refreshes run in a worker thread, one at a time.
        try:
            self.db = store.connect(cfg.database, check_same_thread=False)
        except sqlite3.Error as e:  # a PostgreSQL server that cannot be reached, foremost
            raise StartFailed(str(e)) from e
        self.tokens.refresh(self.db, force=True)
        # Before any request: a key the operator disabled stays out of service.
        restore_key_switches(self.db, self.hub.upstreams.values())
        await self.recorder.start()
        # After the spool replay, before any request: a restart never resets a budget.
        limits = load_scope_limits(self.db)
        self.limiter.update(limits)
        self.limiter.rebuild(self.db)
        if self.shared is not None:
            self.shared.update_limits(limits)
            # Bounded by [shared] timeout: a Redis that is down starts the
            # hub degraded, never stops it.
            await self.shared.start()
        ssl_context = server_ssl_context(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None
        host, port = config_mod.parse_listen(cfg.listen)
        try:
            self.addresses = await self.server.start(host, port, ssl=ssl_context, sock=sock, reuse_port=reuse_port)
        except OSError as e:
            raise StartFailed(f"cannot listen on {cfg.listen}: {e.strerror or e}") from e
        if self.dashboard is not None:
            self.dashboard_addresses = await self._start_dashboard()
        self._reloader = self.loop.create_task(self._watch_tokens())
        if is_postgres(cfg.database):
            from hubcore import pgstore

            # Changes made anywhere arrive within milliseconds; the poll
            # above stays as the fallback while the listening connection is down.
            self._listener = self.loop.create_task(
                pgstore.listen_tokens(database_target(cfg.database), self.refresh_tokens)
            )
        for upstream in self.hub.upstreams.values():
            upstream.start()  # the hub's probes of keys whose circuits are open
        self.metrics.start()
        self.alerts.watch_usage(self.recorder.stats, cfg.usage_queue_max)
        if self.shared is not None:
            self.alerts.watch_shared(self.shared.stats)
            self.alerts.share_with(self.shared.claim)
        if self.ops is not None:
            try:
                await self.ops.start()
            except LookupError as e:  # an ops_socket_group gone since start_problem() looked
                raise StartFailed(f"cannot open the ops socket {self.ops.path}: {e}") from e
            except OSError as e:
                why = store.directory_problem(self.ops.path) or e.strerror or str(e)
                raise StartFailed(f"cannot open the ops socket {self.ops.path}: {why}") from e
        if self.retention is not None:
            # After the budgets' rebuild, which must see the rows as they were.
            self.retention.start()
        self.watchdog.start()
        sdnotify.ready(f"listening on {cfg.listen}")
        return self.addresses

    async def _start_dashboard(self) -> list[tuple[str, int]]:
        """The dashboard's own listener, after the proxy's; never the proxy's port."""
        assert self.dashboard is not None
        cfg = self.config.dashboard
        dashboard_ssl = server_ssl_context(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None
        host, port = config_mod.parse_listen(cfg.listen)
        try:
            addresses = await self.dashboard.start(host, port, ssl=dashboard_ssl)
        except OSError as e:
            raise StartFailed(f"cannot listen on {cfg.listen} (dashboard): {e.strerror or e}") from e
        for bound_host, bound_port in addresses:
            log.info("dashboard listening on %s://%s:%d", "https" if cfg.tls_cert else "http", bound_host, bound_port)
        return addresses

    # -- the ops socket's handler --------------------------------------------
    def _key_snapshots(self) -> dict[str, list[dict[str, Any]]]:
        return {u.config.name: u.ring.snapshot() for u in self.hub.upstreams.values()}

    def stats(self) -> dict[str, Any]:
        snapshot = self.metrics.snapshot(
            self._key_snapshots(), self.recorder.stats(), len(self.tokens), __version__,
            shared=self.shared.stats() if self.shared is not None else None,
        )
        snapshot["draining"] = self.server.draining
        snapshot["gc"] = self.cycles.stats()
        snapshot["alerts"] = self.alerts.stats()
        return snapshot

    def keys(self) -> list[dict[str, Any]]:
        """Every vendor key's state and counters, one row per upstream and
        label with `upstream` set: what `hubcore keys --json` prints."""
        return [
            {"upstream": name, **{f: row[f] for f in KEY_FIELDS if f in row}}
            for name, rows in self._key_snapshots().items()
            for row in rows
        ]

    def live(self) -> dict[str, Any]:
        """The dashboard's live view, from memory on the loop: traffic now
        (in flight, open streams, requests per second over the last 10 s and
        minute), the requests in flight, and each upstream's health with its
        keys'. It walks the open client connections, not the requests as they
        come: the proxy's path counts nothing more for it."""
        metrics = self.metrics
        now, mono = time.time(), time.monotonic()
        running = [
            handler for conn in self.server.connections
            if isinstance(handler := conn.handler, Exchange) and handler.phase is not Phase.DONE
        ]
        running.sort(key=lambda exchange: exchange.t0)
        statuses = metrics.upstream_requests
        upstreams = []
        for runtime in self.hub.upstreams.values():
            name = runtime.config.name
            keys = [{f: row[f] for f in KEY_FIELDS if f in row} for row in runtime.ring.snapshot()]
            usable = sum(1 for k in keys if k["state"] == "healthy")
            upstreams.append({
                "name": name, "kind": runtime.config.kind, "priority": runtime.config.priority,
                "health": _health(keys, usable), "keys_usable": usable,
                "next_available_s": runtime.ring.next_available_in(),
                "in_flight": runtime.ring.in_flight,
                "attempts": metrics.upstream_attempts.get(name, 0),
                "retries": metrics.upstream_retries.get(name, 0),
                "answers": {cls: n for (up, cls), n in sorted(statuses.items()) if up == name},
                "errors": {kind: n for (up, kind), n in sorted(metrics.upstream_errors.items()) if up == name},
                "connections": {"busy": len(runtime.pool.active), "idle": len(runtime.pool.idle)},
                "keys": keys,
            })
        return {
            "now": now,
            "uptime_s": metrics.uptime,
            "draining": self.server.draining,
            "connections_open": metrics.connections_open,
            "in_flight": metrics.in_flight,
            "streams": sum(1 for e in running if e.phase is Phase.STREAMING and e.sse_body),
            "requests_total": metrics.requests_total,
            "rate_10s": metrics.request_rate(10.0),
            "rate_60s": metrics.request_rate(60.0),
            "loop_lag_s": metrics.loop_lag,
            "requests": [_in_flight_row(e, mono) for e in running[:LIVE_REQUESTS_SHOWN]],
            "requests_not_shown": max(0, len(running) - LIVE_REQUESTS_SHOWN),
            "upstreams": upstreams,
        }

    async def live_view(self) -> dict[str, Any]:
        """The dashboard's live view of the whole hub: this process's (live),
        and with several workers every other worker's, asked on its ops
        socket and merged (ops.merge.merge_live). A worker that does not
        answer within LIVE_ASK_TIMEOUT is left out, and named so."""
        own = self.live()
        if not self.sibling_ops_sockets:
            return own
        others = await asyncio.gather(*(self._ask_live(path) for path in self.sibling_ops_sockets))
        return merge_live([own, *others], LIVE_REQUESTS_SHOWN)

    async def _ask_live(self, path: str) -> dict[str, Any] | None:
        try:
            status, _, body = await ask(path, "/live", timeout=LIVE_ASK_TIMEOUT)
        except OpsClientError as e:
            log.debug("live view: %s did not answer: %s", path, e)
            return None
        if status != 200:
            return None
        live: dict[str, Any] = orjson.loads(body)
        return live

    def metrics_text(self) -> str:
        return self.metrics.render_prometheus(
            self._key_snapshots(), self.recorder.stats(), len(self.tokens), __version__, gc=self.cycles.stats(),
            alerts=self.alerts.stats(),
            shared=self.shared.stats() if self.shared is not None else None,
        )

    async def explain_route(
        self, model: str | None, kind: str | None = None, token_id: int | None = None, user: str | None = None,
    ) -> dict[str, Any]:
        """`hubcore route explain`: for each route kind (or `kind`), every
        upstream in the order the router considers them, why it is left out
        or its chance of taking a request for `model` without a session, and
        the state and chance of each of its keys. The principal's groups come
        from the token `token_id` (its token, user and project) or the user
        `user`; neither: unrestricted."""
        who, groups = "anyone (no group restriction)", None
        if token_id is not None or user is not None:
            db = self.db
            if db is None:
                raise LookupError("the hub has no database open")
            async with self._refresh_lock:
                who, groups = await self._read_db(_principal_groups, db, token_id, user)
        kinds = [kind] if kind is not None else list(self.hub.routers)
        routes = []
        for name in kinds:
            router = self.hub.routers.get(name)
            if router is None:
                raise LookupError(f"no upstream of kind {name!r}")
            upstreams = []
            for row in router.explain(model, groups):
                runtime = self.hub.upstreams[row.name]
                upstreams.append({
                    "name": row.name, "priority": row.priority, "weight": row.weight, "group": runtime.group,
                    "excluded": row.excluded, "probability": row.probability,
                    "sends_model": runtime.config.mapped_model(model) if model is not None else None,
                    "cost_multiplier": runtime.config.cost_multiplier,
                    "keys": key_chances(runtime.ring.snapshot()),
                })
            routes.append({"kind": name, "upstreams": upstreams})
        return {"model": model, "principal": who, "groups": None if groups is None else sorted(groups), "routes": routes}

    async def set_key_enabled(
        self, label: str, enabled: bool, *, actor: str = "cli", origin: str = "cli", record: bool = True,
    ) -> KeySwitched | None:
        """`hubcore keys enable|disable LABEL` (or the dashboard's, which
        names its own actor and origin): at once in every upstream with such
        a key (the ring logs each change), then stored for restarts with its
        audit row, off the loop (not with `record` False: another worker of
        the hub stores it). None when no upstream has the label."""
        before, states = {}, {}
        for upstream in self.hub.upstreams.values():
            ring = upstream.ring
            if label not in ring.labels:
                continue
            before[upstream.config.name] = next(
                (row["state"] for row in ring.snapshot() if row["label"] == label), None
            )
            state = ring.enable(label) if enabled else ring.disable(label)
            if state is not None:
                states[upstream.config.name] = state.value
        if not states:
            return None
        self._key_switches += 1
        if not record:
            return KeySwitched(states)
        switches = [(name, label, enabled) for name in states]
        busy_timeout = min(self.config.server.db_busy_timeout, KEY_SWITCH_BUSY_TIMEOUT)

        def audit_row(conn: sqlite3.Connection) -> None:
            # Here, not in the CLI: every caller of the hub's switch leaves a row.
            audit.record(conn, actor, "key.enable" if enabled else "key.disable", f"key {label}",
                         before, dict(states), origin)

        # Asked for before anything here awaits, and handed out in order: the
        # writes keep the order of the switches.
        async with self._key_switch_lock:
            try:
                await asyncio.to_thread(
                    store_key_switches, self.config.server.database, switches, time.time(), busy_timeout,
                    audit_row,
                )
            except (sqlite3.Error, store.SchemaTooNew) as e:
                log.warning("key %s %s but not stored, a restart forgets it: %s",
                            label, "enabled" if enabled else "disabled", e)
                return KeySwitched(states, not_stored=str(e))
        return KeySwitched(states)

    async def reset_key(
        self, label: str, *, actor: str = "cli", origin: str = "cli", record: bool = True,
    ) -> KeyReset | None:
        """`hubcore keys reset LABEL` (or the dashboard's): end the rests
        after 429s and close the circuit of the key with that label in every
        upstream that has one, at once (the ring logs each change; a dead or
        disabled key stays so), then write its audit row off the loop (not
        with `record` False: another worker of the hub writes it). None
        when no upstream has the label."""
        before: dict[str, Any] = {}
        states: dict[str, str] = {}
        for upstream in self.hub.upstreams.values():
            ring = upstream.ring
            if label not in ring.labels:
                continue
            row = next((row for row in ring.snapshot() if row["label"] == label), None)
            state = ring.reset(label)
            if row is None or state is None:
                continue
            before[upstream.config.name] = {"state": row["state"], "until": row["until"], "rests": row["rests"]}
            states[upstream.config.name] = state.value
        if not states:
            return None
        if not record:
            return KeyReset(states)
        busy_timeout = min(self.config.server.db_busy_timeout, KEY_SWITCH_BUSY_TIMEOUT)

        def audit_row(conn: sqlite3.Connection) -> None:
            audit.record(conn, actor, "key.reset", f"key {label}", before, dict(states), origin)

        # In the order of the operator's key actions, as the switches are.
        async with self._key_switch_lock:
            try:
                await asyncio.to_thread(_write_audit_row, self.config.server.database, busy_timeout, audit_row)
            except (sqlite3.Error, store.SchemaTooNew) as e:
                log.warning("key %s reset but its audit row could not be written: %s", label, e)
                return KeyReset(states, not_audited=str(e))
        return KeyReset(states)

    def _follow_key_switches(self, disabled: dict[str, set[str]]) -> None:
        """The keys disabled as the database has them: switches another
        instance made reach this one's rings (KeyRing.follow_switches, which
        logs each move)."""
        for name, upstream in self.hub.upstreams.items():
            upstream.ring.follow_switches(disabled.get(name, set()))

    async def refresh_tokens_now(self) -> int:
        """POST /tokens/refresh: the CLI changed tokens or limits."""
        await self.refresh_tokens(force=True)
        return self.tokens.generation

    async def _watch_tokens(self) -> None:
        """Pick up created and revoked tokens without a restart."""
        interval = self.config.server.token_reload_interval
        while True:
            await asyncio.sleep(interval)
            await self.refresh_tokens()

    async def refresh_tokens(self, force: bool = False) -> None:
        db = self.db
        if db is None:
            return
        def refresh() -> tuple[ScopeLimits, dict[str, set[str]]] | None:
            # Read in a worker thread; apply on the loop.
            if not self.tokens.refresh(db, force):
                return None
            return load_scope_limits(db), load_disabled_keys(db)

        try:
            async with self._refresh_lock:
                switches_before = self._key_switches
                loaded = await self._read_db(refresh)
                if loaded is not None:
                    limits, disabled = loaded
                    self.limiter.update(limits)
                    if self.shared is not None:
                        self.shared.update_limits(limits)
                    log.info("tokens and limits reloaded: %d active tokens", len(self.tokens))
                    # A switch made here while the read ran may be newer than
                    # what it read; its own write moves the generation again.
                    if switches_before == self._key_switches:
                        self._follow_key_switches(disabled)
        except sqlite3.Error as e:
            log.warning("could not reload tokens (keeping the current table): %s", e)

    def _read_db(self, read: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """Run `read(*args)` on self.db in a worker thread. Cancelling the
        await leaves the thread running (a thread cannot be stopped), so
        stop() waits for every read under way before it closes the
        connection: closing it under another thread's query crashes the
        process."""
        reading = asyncio.ensure_future(asyncio.to_thread(read, *args))
        self._db_reads.add(reading)
        reading.add_done_callback(self._read_done)
        return asyncio.shield(reading)

    def _read_done(self, reading: asyncio.Future[Any]) -> None:
        self._db_reads.discard(reading)
        if not reading.cancelled():
            # Marked as retrieved: the caller's await reports an error, or
            # was cancelled and has nobody to report it to.
            reading.exception()

    async def reload(self) -> tuple[bool, str]:
        """SIGHUP: reload upstreams (origin, pool settings, keys, policy),
        tokens and prices; a broken config is rejected with a logged error
        and the old one stays, whole. The answer says what changed."""
        sdnotify.reloading()
        try:
            new = config_mod.load(self.config_path)
            prices = Pricing.load(_path_or_none(new.server.prices), new.pricing.unpriced, previous=self.prices)
            # Everything that can fail is built before anything is applied.
            reconfigs = []
            for upstream in new.upstreams:
                runtime = self.hub.upstreams.get(upstream.name)
                if runtime is not None:
                    reconfigs.append((runtime, runtime.prepare(upstream)))
        except (ConfigError, OSError, ValueError) as e:
            log.error("reload rejected, keeping the running configuration: %s", e)
            sdnotify.ready("reload rejected; running the previous configuration")
            return False, str(e)
        self.prices = prices
        self.hub.prices = prices
        # The new targets first: keys a reload revives are news for them.
        changes = self.alerts.configure(new.alerts)
        for runtime, reconfig in reconfigs:
            changes += [f"upstream {runtime.config.name}: {change}" for change in runtime.apply(reconfig)]
        for router in self.hub.routers.values():
            router.reconfigured()
        for change in changes:
            log.info("reload: %s", change)
        # Upstreams come and go only with a restart: say so rather than
        # report a reload that left them out as a success without a word.
        names = {upstream.name for upstream in new.upstreams}
        kept = {runtime.config.name for runtime in self.hub.upstreams.values()}
        ignored = [f"upstream {name}: new; not started until a restart" for name in sorted(names - kept)]
        ignored += [f"upstream {name}: gone from the file; serving until a restart" for name in sorted(kept - names)]
        for change in ignored:
            log.warning("reload: %s", change)
        await self.refresh_tokens(force=True)
        log.info("configuration reloaded from %s", new.source)
        sdnotify.ready("configuration reloaded")
        return True, "; ".join(["reloaded", *changes, *ignored])

    async def stop(self) -> None:
        """SIGTERM: stop accepting, drain in-flight requests, flush usage."""
        log.info("shutting down: draining up to %g s", self.config.server.drain_timeout)
        sdnotify.stopping()
        await self.server.shutdown(self.config.server.drain_timeout)
        if self.dashboard is not None:
            await self.dashboard.close()
        if self.retention is not None:
            await self.retention.stop()  # after the batch under way
        if self._reloader is not None:
            self._reloader.cancel()
        if self._listener is not None:
            self._listener.cancel()
        self.cycles.stop()
        await self.alerts.close()
        self.hub.close()
        if self.hub.access is not None:
            self.hub.access.close()
        await self.recorder.close()
        if self.shared is not None:
            # After the recorder: the last charges are queued by then.
            await self.shared.close()
        if self.ops is not None:
            await self.ops.close()
        await self.watchdog.stop()
        await self.metrics.stop()
        if self._db_reads:
            await asyncio.wait(self._db_reads)
        if self.db is not None:
            self.db.close()
        log.info("stopped")
        self.stopped.set()

    def on_signal(self, sig: int) -> None:
        """SIGTERM and SIGINT stop the hub, SIGHUP reloads it (see StartSignals)."""
        if sig == signal.SIGHUP:
            self._on_hup()
        else:
            self._on_stop_signal()

    def _on_stop_signal(self) -> None:
        if not self.server.draining:
            self.loop.create_task(self.stop())

    def _on_hup(self) -> None:
        self.loop.create_task(self.reload())


def _principal_groups(db: sqlite3.Connection, token_id: int | None, user: str | None) -> tuple[str, frozenset[str] | None]:
    """Who `route explain` asks for, and the upstream groups it may use."""
    if token_id is not None:
        found = tokens_mod.principal(db, token_id)
        if found is None:
            raise LookupError(f"no token with id {token_id}")
        return f"token {token_id} (user {found.user}, project {found.project or '-'})", found.groups
    assert user is not None
    return f"user {user}", effective_groups(read_limits(db, "user", user))


def _write_audit_row(database: str, busy_timeout: float, row: Callable[[sqlite3.Connection], object]) -> None:
    """Write an audit row on a connection of its own: blocking, for a worker thread."""
    conn = store.connect(database)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        with store.immediate(conn):
            row(conn)
    finally:
        conn.close()


def _health(keys: list[dict[str, Any]], usable: int) -> str:
    """An upstream's health from its keys: "ok" when every key is in service
    with no rest, "degraded" when some are out or resting, "down" when none
    takes a request now ("no keys" without any)."""
    if not keys:
        return "no keys"
    if not usable:
        return "down"
    if usable < len(keys) or any(k["rests"] for k in keys):
        return "degraded"
    return "ok"


def _in_flight_row(exchange: Exchange, mono: float) -> dict[str, Any]:
    """What the live view shows of one request in flight: who, what, where
    it went, how far it got; never its body or a secret."""
    principal = exchange.principal
    meter = exchange.meter
    upstream = exchange.upstream
    return {
        "id": exchange.request_id,
        "started": exchange.ts,
        "age_s": mono - exchange.t0,
        "user": principal.user if principal is not None else None,
        "project": principal.project if principal is not None else None,
        "model": exchange.model or (meter.model if meter is not None else None),
        "upstream": upstream.config.name if upstream is not None else None,
        "key": exchange.key_label,
        "phase": exchange.phase.name.lower(),
        "stream": exchange.sse_body,
        "attempts": exchange.attempts,
    }


def key_chances(snapshot: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each key of a ring's snapshot with its chance of taking a request
    without a session: the healthy keys of the best priority share it by
    weight; every other key says why not."""
    healthy = [k for k in snapshot if k["state"] == "healthy"]
    tier = min((k["priority"] for k in healthy), default=None)
    total = sum(k["weight"] for k in healthy if k["priority"] == tier)
    rows = []
    for k in snapshot:
        if k["state"] != "healthy":
            why: str | None = k["state"]
        elif k["priority"] != tier:
            why = f"priority {k['priority']}: keys of priority {tier} are healthy"
        else:
            why = None
        chance = k["weight"] / total if why is None and total else 0.0
        rows.append({"label": k["label"], "state": k["state"], "until": k["until"], "excluded": why, "probability": chance})
    return rows


def _path_or_none(path: str) -> Any:
    from pathlib import Path

    return Path(path) if path else None


def start_problem(config: Config, *, missing_directories: bool = False) -> str | None:
    """The first thing found that would stop the hub from starting, as one
    line naming the field and the path or name; None when nothing is. Run by
    `serve` before anything starts and by `check-config`, which passes over
    state directories that do not exist yet (`missing_directories`)."""
    return (
        state_path_problem(config, missing_directories=missing_directories)
        or ops_group_problem(config)
        or tls_file_problem(config)
        or workers_problem(config)
    )


def state_paths(config: Config) -> list[tuple[str, str]]:
    """(field, path) of each file the hub creates in a state directory."""
    server = config.server
    return [
        (name, path)
        for name, path in (("database", server.database), ("spool", config.spool_path), ("ops_socket", server.ops_socket))
        if path and not is_postgres(path)
    ]


def state_path_problem(config: Config, *, missing_directories: bool = False) -> str | None:
    """The first of the database, spool and ops socket whose directory the hub
    cannot create files in (or, for the database, an existing file it cannot
    write), as one line naming the field and the path; None when all look
    usable. Checked before anything starts, so that the spool, which is
    first written only when the database fails, fails now."""
    for name, path in state_paths(config):
        if missing_directories and not os.path.exists(os.path.dirname(os.path.abspath(path))):
            continue
        problem = store.path_problem(path) if name == "database" else store.directory_problem(path)
        if problem is not None:
            return f"{name} {path}: {problem}"
    return None


def workers_problem(config: Config) -> str | None:
    """What several workers cannot start with: a port each worker would
    pick for itself, or no ops socket, through which the supervisor watches
    its workers and answers for them."""
    server = config.server
    if server.workers <= 1:
        return None
    if config_mod.parse_listen(server.listen)[1] == 0:
        return (f"listen {server.listen}: port 0 would give each of the {server.workers} workers "
                "(server.workers) a port of its own: name a port")
    if not server.ops_socket:
        return (f"ops_socket: server.workers = {server.workers} needs the ops socket: the supervisor "
                "watches its workers and answers for them through it")
    return None


def ops_group_problem(config: Config) -> str | None:
    """An ops_socket_group that names no group on this machine."""
    group = config.server.ops_socket_group
    if not config.server.ops_socket or not group or group.isdigit():
        return None
    try:
        grp.getgrnam(group)
    except KeyError:
        return f"ops_socket_group: no group named {group!r}"
    return None


def tls_file_problem(config: Config) -> str | None:
    """A CA bundle of an upstream, or the hub's own certificate and key,
    that will not load; the words are those of a reload that meets it."""
    for upstream in config.upstreams:
        if upstream.ca_file and upstream.scheme == "https":
            try:
                client_ssl_context(upstream.ca_file)
            except OSError as e:  # ssl.SSLError is one
                return f"upstream {upstream.name!r}: ca_file {upstream.ca_file!r}: cannot load: {_ssl_reason(e)}"
    for table, tls in (("server", config.server), ("dashboard", config.dashboard)):
        if tls.tls_cert and (table == "server" or config.dashboard.listen):
            try:
                server_ssl_context(tls.tls_cert, tls.tls_key)
            except OSError as e:
                where = "" if table == "server" else "dashboard."
                return f"{where}tls_cert {tls.tls_cert!r} / {where}tls_key {tls.tls_key!r}: cannot load: {_ssl_reason(e)}"
    return None


def _ssl_reason(error: OSError) -> str:
    # "[X509: NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found (_ssl.c:4154)"
    # says no more than its reason code.
    if isinstance(error, ssl.SSLError) and error.reason:
        return str(error.reason).replace("_", " ").lower()
    return error.strerror or str(error)


def first_token(config: Config) -> tuple[int, str, Path] | None:
    """On a database without tokens, mint one for user "admin" so the hub is
    usable at once; return its id, the token and the file it was written to.

    The token goes to a file only the hub's user can read, not to the log or
    stdout: under systemd both end in the journal, which the groups adm and
    systemd-journal read. serve() logs only its path, once the hub listens;
    a start that fails takes it back (withdraw_first_token).
    """
    from hubcore.governance import tokens

    path = first_token_path(config)
    conn = store.connect(config.server.database)
    written = False
    try:
        # IMMEDIATE: two hubs started at once on a new database mint one token.
        conn.execute("BEGIN IMMEDIATE")
        if conn.execute("SELECT count(*) FROM tokens").fetchone()[0]:
            conn.execute("ROLLBACK")
            return None
        token_id, token = tokens.create(conn, "admin", note="first token, made by hubcore serve")
        _write_private(path, token + "\n")
        written = True
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if written:
            path.unlink(missing_ok=True)  # its token was never stored: it would open nothing
        raise
    finally:
        conn.close()
    return token_id, token, path


def first_token_path(config: Config) -> Path:
    # Beside the database, or beside the spool when the database is a
    # PostgreSQL server's: the hub's state directory either way.
    local = config.spool_path if is_postgres(config.server.database) else config.server.database
    return Path(os.path.abspath(local)).parent / FIRST_TOKEN_FILE


def announce_first_token(made: tuple[int, str, Path] | None, show_token: Callable[[str], None] | None) -> None:
    """Once the hub listens: where the token first_token minted is (None:
    none was), and the token itself to `show_token`."""
    if made is None:
        return
    _, token, path = made
    log.warning(
        "no hub tokens yet: created one for user 'admin' in %s (readable by this user only); "
        "use it as ANTHROPIC_AUTH_TOKEN / OPENAI_API_KEY, then delete the file", path,
    )
    if show_token is not None:
        show_token(token)


def withdraw_first_token(config: Config, token_id: int) -> None:
    """Take back the token first_token minted for a start that then failed:
    the next start, which may be on another port or with a fixed config,
    mints and announces its own."""
    first_token_path(config).unlink(missing_ok=True)
    conn = store.connect(config.server.database)
    try:
        conn.execute("DELETE FROM tokens WHERE id = ?", (token_id,))
    finally:
        conn.close()


def _write_private(path: Path, text: str) -> None:
    """Write `text` to a new file with mode 0600 from the moment it exists."""
    # A file left there belongs to an earlier database (this one has no
    # token): its token opens nothing now.
    path.unlink(missing_ok=True)
    # O_EXCL: never write into a file (or through a symlink) someone else
    # made, whose mode could be wider than 0600.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with open(fd, "w", encoding="ascii") as f:
        f.write(text)
        f.flush()
        os.fsync(fd)


class SignalTarget(Protocol):
    def on_signal(self, sig: int) -> None: ...


class StartSignals:
    """The stop and reload signals of `hubcore serve`, from before the start
    to the end. The proxy listens before the dashboard and the ops socket
    open, so a supervisor's SIGTERM can come in between (right after the
    port answers): it is held until the start ends, then acted on, instead
    of killing the process or being lost; from then on each signal goes to
    the app as it comes.

    The same handlers serve throughout: the loop runs a signal's handler as
    a callback queued when it reads the signal from its wake-up pipe, and
    one queued behind the step that ends the start still runs the handler
    that was installed when the signal came."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.held: list[int] = []
        self.target: SignalTarget | None = None
        for sig in self.SIGNALS:
            loop.add_signal_handler(sig, self.on_signal, sig)

    def on_signal(self, sig: int) -> None:
        if self.target is None:
            self.held.append(sig)
        else:
            self.target.on_signal(sig)

    def release(self, target: SignalTarget) -> None:
        """The start has ended: `target` takes the signals from now on, and
        those held are acted on; a stop wins over a reload."""
        self.target = target
        stops = [sig for sig in self.held if sig != signal.SIGHUP]
        if stops:
            target.on_signal(stops[0])
        elif self.held:
            target.on_signal(signal.SIGHUP)
        self.held.clear()


async def serve(
    config: Config, config_path: str | None, show_token: Callable[[str], None] | None = None, *, worker: bool = False,
    sibling_ops_sockets: Sequence[str] = (),
) -> int:
    """Run the hub until it is stopped; 1 when it cannot start. On a
    database without tokens the first token is minted before the listener
    opens (so that its file exists once clients can connect), taken back if
    the start fails, and handed to `show_token` once the hub listens.
    `worker`: one of several workers (hubcore.supervisor), on a port they
    share; the supervisor minted the first token. `sibling_ops_sockets`:
    the other workers', whose part of the live view the dashboard asks for."""
    loop = asyncio.get_running_loop()
    try:
        app = App(config, loop, config_path)
    except OSError as e:  # start_problem() finds the known ones first, with their field
        log.error("cannot start: %s", e)
        return 1
    app.sibling_ops_sockets = list(sibling_ops_sockets)
    try:
        made = None if worker else first_token(config)
    except store.CannotOpen as e:  # a PostgreSQL server that cannot be reached, foremost
        log.error("cannot start: %s", e)
        await app.recorder.close()
        return 1
    except (OSError, sqlite3.Error) as e:
        log.error("cannot write the first hub token: %s", e)
        await app.recorder.close()
        return 1
    signals = StartSignals(loop)
    try:
        addresses = await app.start(reuse_port=worker)
    except OSError as e:
        # StartFailed names its step; anything else (a TLS file, the spool) names its file.
        log.error("%s", e if isinstance(e, StartFailed) else f"cannot start: {e}")
        if made is not None:
            try:
                withdraw_first_token(config, made[0])
            except (OSError, sqlite3.Error) as withdrawn:
                log.error("could not take back the first hub token (id %d): %s; revoke it", made[0], withdrawn)
        await app.recorder.close()
        if app.shared is not None:
            await app.shared.close()
        return 1
    announce_first_token(made, show_token)
    app.cycles.start()
    for host, port in addresses:
        scheme = "https" if config.server.tls_cert else "http"
        log.info("hubcore %s listening on %s://%s:%d", __version__, scheme, host, port)
    signals.release(app)
    await app.stopped.wait()
    return 0
