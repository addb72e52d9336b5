"""Alerts: what an operator or a manager must hear of (a budget threshold
passed, a vendor key dead, an upstream out of keys, a failover, the usage
writer in trouble), posted to the [[alert]] webhooks off the request path.

Theory of operation. Events come from hooks, never from the request path's
common case: the Limiter's `on_crossing` (a charge passed a threshold), each
key ring's `listener` (a key changed state, where the ring logs it), the
Hub's `on_failover` (an attempt moved to another upstream), and a look at the
usage writer's stats once a second. Each becomes an `Alert`, which `emit`
hands to every target that wants its kind: one dictionary lookup decides
whether the target sent the same alert key within its `min_interval`, and
the alert joins the target's queue or, when QUEUE_MAX wait already, is
dropped (counted, logged once per overflow). `emit` never awaits, never
raises, and holds at most QUEUE_MAX alerts and DEDUPE_MAX keys per target,
whatever the burst. One task per target posts its queue in order, one at a
time, on hubcore's own HTTP/1.1 client (a pool of one kept-alive
connection, TLS for https): an answer 2xx is sent; no answer, 5xx, 408 or
429 is tried again after `retry_backoff` x 2^n seconds, `retries` times;
then, or on any other answer, the alert is dropped with a log line and a
count by reason. A target that never answers costs its own task one
`timeout` per attempt and nothing else.

The webhook URL is a secret (a Slack webhook's path is its key): logs,
errors, stats and the CLI name a target by its label (`name`, else
"alert[N]"), and the words of a failure are made here, never copied from an
exception that could carry the host.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit
from zoneinfo import ZoneInfo

import orjson

from hubcore import __version__
from hubcore.config import ALERT_EVENTS, AlertConfig, UpstreamConfig
from hubcore.governance.limiter import BudgetCrossing
from hubcore.governance.limits import format_time, format_usd
from hubcore.http.client import ConnectFailed, Pool, UpstreamError, UpstreamTimeout, client_ssl_context
from hubcore.http.deadlines import sweep_interval
from hubcore.routing.keys import KeyRing, KeyState

log = logging.getLogger("hubcore.alerts")

# Alerts waiting per target. A webhook takes a few a second; 256 is minutes
# of a flood, and each queued alert is a few hundred bytes.
QUEUE_MAX = 256
# Alert keys remembered per target for min_interval; the oldest go first.
# Keys are budgets' thresholds, keys and upstreams: a few hundred in a team.
DEDUPE_MAX = 4096
# Seconds between looks at the usage writer (its queue, spool and database).
USAGE_WATCH_INTERVAL = 1.0
# The usage queue is reported once it is this full.
USAGE_QUEUE_ALERT = 0.8
# Bytes of a webhook's answer read (and then dropped): Slack says "ok".
ANSWER_LIMIT = 64 * 1024
# Seconds the alerts queued at shutdown (the last requests' budget
# thresholds, say) have to go out before they are dropped.
SHUTDOWN_GRACE = 2.0

SEVERITIES = ("info", "warning", "critical")
TEST_EVENT = "test"
DROP_REASONS = ("queue_full", "timeout", "unreachable", "rejected", "reload", "shutdown")
_RETRY_STATUSES = frozenset({408, 425, 429})
_CIRCUIT = frozenset({KeyState.OPEN, KeyState.HALF_OPEN, KeyState.PROBING})
_WINDOW_NAMES = {"5h": "5-hour", "day": "daily", "week": "weekly", "month": "monthly", "total": "total"}


# -- what is sent ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Alert:
    """One event for the webhooks. `key` identifies it for min_interval:
    alerts with the same key are the same news."""

    kind: str                 # one of config.ALERT_EVENTS, or TEST_EVENT
    severity: str             # one of SEVERITIES
    summary: str              # one line for a person
    details: dict[str, Any]   # the facts, for machines
    key: str
    ts: float = field(default_factory=time.time)


def render_body(alert: Alert, fmt: str, hub: str) -> bytes:
    """The request body in `fmt`:

    json: {"event": kind, "severity": "info"|"warning"|"critical",
    "summary": one line, "details": {...}, "ts": RFC 3339 UTC, "hub": host}
    slack: {"text": "[hub] SEVERITY: summary"} (Slack, Mattermost, Rocket.Chat
    and others take it)."""
    if fmt == "slack":
        return orjson.dumps({"text": f"[hubcore {hub}] {alert.severity.upper()}: {alert.summary}"})
    return orjson.dumps({
        "event": alert.kind, "severity": alert.severity, "summary": alert.summary,
        "details": alert.details, "ts": format_time(alert.ts), "hub": hub,
    })


def budget_alert(crossing: BudgetCrossing, tz: ZoneInfo | None = None) -> Alert:
    """A budget threshold passed (Limiter.on_crossing)."""
    c = crossing
    spent, limit = format_usd(c.spent_micros), format_usd(c.limit_micros)
    refusing = not c.soft and c.spent_micros >= c.limit_micros
    if refusing:
        consequence = "its requests are refused"
    elif c.soft:
        consequence = "soft budget: requests go on"
    else:
        consequence = "requests are refused at 100%"
    resets = "never resets" if c.resets_at is None else f"resets {format_time(c.resets_at, tz)}"
    # A calendar window's next period is news again: its end is in the key.
    period = f":{c.resets_at:.0f}" if c.window in ("day", "week", "month") and c.resets_at is not None else ""
    return Alert(
        "budget.threshold", "critical" if refusing else "warning",
        f"{c.scope} passed {c.threshold}% of its {_WINDOW_NAMES.get(c.window, c.window)} budget: "
        f"{spent} of {limit} ({consequence}; {resets})",
        {
            "scope": c.scope, "kind": c.kind, "name": c.name, "window": c.window, "threshold_percent": c.threshold,
            "spent_micros": c.spent_micros, "limit_micros": c.limit_micros,
            "spent_usd": format_usd(c.spent_micros, symbol="", grouping=False),
            "limit_usd": format_usd(c.limit_micros, symbol="", grouping=False),
            "soft": c.soft, "refusing": refusing,
            "resets_at": None if c.resets_at is None else format_time(c.resets_at),
        },
        f"budget.threshold:{c.kind}:{c.name}:{c.window}:{c.threshold}{period}",
    )


def key_alert(upstream: str, label: str, old: KeyState, new: KeyState, reason: str) -> Alert | None:
    """A key's change of state worth an alert: dead, or its circuit opened
    (not the turns of the probe cycle of a circuit already open)."""
    details = {"upstream": upstream, "key": label, "from": old.value, "to": new.value, "reason": reason}
    if new is KeyState.DEAD:
        return Alert(
            "key.dead", "critical",
            f"upstream {upstream} key {label} is dead ({reason}): out of service until a reload "
            f"or `hubcore keys enable {label}`",
            details, f"key.dead:{upstream}:{label}",
        )
    if new is KeyState.OPEN and old not in _CIRCUIT:
        return Alert(
            "key.circuit_open", "warning",
            f"upstream {upstream} key {label}: circuit open ({reason}); the hub probes it until it answers",
            details, f"key.circuit_open:{upstream}:{label}",
        )
    return None


# -- delivery -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Answer:
    """What one delivery got: `status` (None: no answer) or `error`, and
    whether to try again; `reason` is the dropped counter's label."""

    status: int | None = None
    error: str | None = None
    reason: str = ""
    retryable: bool = False

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def describe(self) -> str:
        return f"answered {self.status}" if self.status is not None else (self.error or "failed")


class Webhook:
    """Where one target's alerts go: the request head for its URL and a pool
    of one kept-alive connection (made on the first post, on the loop)."""

    def __init__(self, config: AlertConfig) -> None:
        self.config = config
        parts = urlsplit(config.url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.tls else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        authority = parts.netloc.rpartition("@")[2]
        lines = [
            b"POST " + target.encode() + b" HTTP/1.1",
            b"host: " + authority.encode("idna") if not authority.isascii() else b"host: " + authority.encode(),
            b"content-type: application/json",
            b"user-agent: hubcore/" + __version__.encode(),
            b"accept-encoding: identity",
        ]
        if parts.username is not None:
            # Credentials in the URL: basic auth, as curl does with them.
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            lines.append(b"authorization: Basic " + base64.b64encode(pair.encode()))
        self._head = b"\r\n".join(lines) + b"\r\n"
        self._pool: Pool | None = None

    def _get_pool(self) -> Pool:
        if self._pool is None:
            timeout = self.config.timeout
            self._pool = Pool(
                asyncio.get_running_loop(), self.host, self.port,
                client_ssl_context() if self.tls else None,
                connect_timeout=timeout, max_idle=1, idle_timeout=30.0,
                sweep_every=sweep_interval(timeout),
            )
        return self._pool

    async def post(self, body: bytes) -> Answer:
        """One delivery of `body`, within the target's `timeout`."""
        timeout = self.config.timeout
        try:
            async with asyncio.timeout(timeout):
                return await self._post(body)
        except TimeoutError:
            return Answer(error=f"no answer within {timeout:g} s", reason="timeout", retryable=True)

    async def _post(self, body: bytes) -> Answer:
        pool = self._get_pool()
        head = self._head + b"content-length: %d\r\n\r\n" % len(body)
        timeout = self.config.timeout
        for fresh in (False, True):
            conn = None if fresh else pool.take_idle()
            reused = conn is not None
            try:
                if conn is None:
                    conn = await pool.connect()
                answer = await conn.send(head, [body], timeout, timeout)
                await conn.read_body(ANSWER_LIMIT)
            except UpstreamError as e:
                if conn is not None:
                    conn.close()
                if reused and e.before_response:
                    continue  # the kept-alive connection had been closed by the peer
                return _failed(e)
            except BaseException:
                if conn is not None:
                    conn.close()
                raise
            conn.release()
            status = answer.status
            if 200 <= status < 300:
                return Answer(status=status)
            retry = status >= 500 or status in _RETRY_STATUSES
            return Answer(status=status, reason="rejected", retryable=retry)
        raise AssertionError("unreachable: the second round uses a fresh connection")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def _failed(error: UpstreamError) -> Answer:
    """An Answer for a failure, in words of our own: the client's messages
    name the host and port, which belong to the secret URL."""
    cause = error.__cause__
    if isinstance(error, UpstreamTimeout) or "timed out" in str(error):
        return Answer(error="timed out", reason="timeout", retryable=True)
    if isinstance(error, ConnectFailed):
        if isinstance(cause, socket.gaierror):
            why = "cannot resolve the host name"
        elif isinstance(cause, ssl.SSLError):
            why = f"TLS handshake failed: {cause.reason or 'unknown reason'}"
        elif isinstance(cause, OSError) and cause.errno:
            # os.strerror: asyncio's own text names the address.
            why = f"cannot connect: {os.strerror(cause.errno)}"
        else:
            why = "cannot connect"
        return Answer(error=why, reason="unreachable", retryable=True)
    if error.before_response:
        return Answer(error="connection closed before an answer", reason="unreachable", retryable=True)
    return Answer(error="connection broke during the answer", reason="unreachable", retryable=True)


class Target:
    """One [[alert]] as the hub runs it: its queue, its delivery task, the
    alert keys it sent lately, its counters."""

    def __init__(self, config: AlertConfig, hub: str, clock: Callable[[], float]) -> None:
        self.config = config
        self.label = config.label
        self.hub = hub
        self.kinds = frozenset(config.events)
        self._clock = clock
        self.webhook = Webhook(config)
        self.queue: deque[Alert] = deque()
        self.sent_at: OrderedDict[str, float] = OrderedDict()  # alert key -> monotonic time queued
        self.task: asyncio.Task[None] | None = None
        self.delivering: Alert | None = None
        self._wake: asyncio.Event | None = None
        self.overflowing = 0          # alerts dropped since the queue filled
        self.sent = 0
        self.deduplicated = 0
        self.dropped: dict[str, int] = {}
        self.claim: Claim | None = None

    # -- on the emitter's side: never awaits -----------------------------------------

    def offer(self, alert: Alert) -> None:
        if alert.kind not in self.kinds:
            return
        now = self._clock()
        sent_at = self.sent_at
        last = sent_at.get(alert.key)
        if last is not None and now - last < self.config.min_interval:
            self.deduplicated += 1
            return
        if len(self.queue) >= QUEUE_MAX:
            self._drop("queue_full")
            if not self.overflowing:
                log.warning("alert %s: queue full (%d alerts waiting): dropping alerts until it drains",
                            self.label, QUEUE_MAX)
            self.overflowing += 1
            return
        sent_at[alert.key] = now
        sent_at.move_to_end(alert.key)
        if len(sent_at) > DEDUPE_MAX:
            sent_at.popitem(last=False)
        self.queue.append(alert)
        self._ensure_task()
        if self._wake is not None:
            self._wake.set()

    def _ensure_task(self) -> None:
        if self.task is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # not started yet: the queue waits for the next offer on the loop
            self._wake = asyncio.Event()
            self.task = loop.create_task(self._run(), name=f"hubcore-alert-{self.label}")

    def _drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    # -- the delivery task -------------------------------------------------------------

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            while not self.queue:
                wake.clear()
                await wake.wait()
            alert = self.queue.popleft()
            if self.overflowing and len(self.queue) < QUEUE_MAX:
                log.warning("alert %s: queue has room again; %d alerts were dropped while it was full",
                            self.label, self.overflowing)
                self.overflowing = 0
            if self.claim is not None and not await self.claim(f"{self.label}:{alert.key}", self.config.min_interval):
                self.deduplicated += 1  # another instance sent it
                continue
            self.delivering = alert
            try:
                await self.deliver(alert)
            except Exception:
                # A bug here must not end the target's deliveries.
                log.exception("alert %s: delivering a %s alert failed", self.label, alert.kind)
                self._drop("rejected")
            finally:
                self.delivering = None

    async def deliver(self, alert: Alert) -> Answer:
        """Post `alert`, trying again as the config says; count the outcome."""
        body = render_body(alert, self.config.format, self.hub)
        attempts = 1 + self.config.retries
        answer = Answer()
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self.config.retry_backoff * 2 ** (attempt - 1))
            answer = await self.webhook.post(body)
            if answer.ok:
                self.sent += 1
                log.debug("alert %s: sent %s alert (%d)", self.label, alert.kind, answer.status)
                return answer
            if not answer.retryable:
                break
        self._drop(answer.reason or "rejected")
        log.warning(
            "alert %s: %s alert dropped after %d attempt%s: %s (%s)", self.label, alert.kind, attempt + 1,
            "" if attempt == 0 else "s", answer.describe(), alert.summary,
        )
        return answer

    def close(self, reason: str) -> int:
        """Stop delivering; what was still queued is dropped as `reason`."""
        if self.task is not None:
            self.task.cancel()
            self.task = None
        pending = len(self.queue) + (self.delivering is not None)
        self.delivering = None
        if pending:
            self._drop(reason, pending)
            log.warning("alert %s: %d queued alerts dropped (%s)", self.label, pending, reason)
            self.queue.clear()
        self.webhook.close()
        return pending


# -- the hub's alerts ---------------------------------------------------------------------

UsageStats = Callable[[], Mapping[str, Any]]
# Whether this instance is the first of the hub's instances to send an alert
# of this name within these seconds (shared.redis_state.SharedState.claim):
# an event every instance sees (a key dead through one of them, an upstream
# down) reaches the webhook once, not once per instance.
Claim = Callable[[str, float], Awaitable[bool]]


class Alerts:
    """Every [[alert]] target of the running hub, and the hooks that feed
    them. Everything runs on the event loop thread."""

    def __init__(
        self, configs: Iterable[AlertConfig], *, timezone: ZoneInfo | None = None, hub: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hub = hub or socket.gethostname()
        self.timezone = timezone
        self._clock = clock
        self.targets: list[Target] = [Target(c, self.hub, clock) for c in configs]
        self._claim: Claim | None = None
        # Counters of targets a reload removed, kept so /metrics only grows.
        self._retired_sent = 0
        self._retired_dropped: dict[str, int] = {}
        self._retired_deduplicated = 0
        self._kinds = self._wanted()
        # The rings watched (by upstream name) and upstreams waiting for a
        # usable key after a failover away from them or none being usable.
        self._rings: dict[str, KeyRing] = {}
        self._down: set[str] = set()
        self._usage_task: asyncio.Task[None] | None = None
        self._shared_task: asyncio.Task[None] | None = None
        self._closed = False

    def share_with(self, claim: Claim) -> None:
        """Send each alert once across the hub's instances (see Claim)."""
        self._claim = claim
        for target in self.targets:
            target.claim = claim

    def _wanted(self) -> frozenset[str]:
        return frozenset(kind for target in self.targets for kind in target.kinds)

    def wants(self, kind: str) -> bool:
        return kind in self._kinds

    # -- the one entry ------------------------------------------------------------------

    def emit(self, alert: Alert) -> None:
        """Queue `alert` for every target that wants it; never blocks or raises."""
        if alert.kind not in self._kinds or self._closed:
            return
        for target in self.targets:
            target.offer(alert)

    # -- the hooks ----------------------------------------------------------------------

    def on_crossing(self, crossing: BudgetCrossing) -> None:
        """governance.limiter.Limiter.on_crossing."""
        if "budget.threshold" in self._kinds:
            self.emit(budget_alert(crossing, self.timezone))

    def watch(self, ring: KeyRing) -> None:
        """Hear of every change of state of the ring's keys."""
        self._rings[ring.name] = ring
        ring.state_listener = self.on_key_state

    def on_key_state(self, ring: KeyRing, label: str, old: KeyState, new: KeyState, reason: str) -> None:
        """routing.keys.StateListener: runs inside the ring's own calls, so
        a bug here is logged, never raised into the ring."""
        try:
            self._key_state(ring, label, old, new, reason)
        except Exception:
            log.exception("alerts: the change of key %s of upstream %s raised no alert", label, ring.name)

    def _key_state(self, ring: KeyRing, label: str, old: KeyState, new: KeyState, reason: str) -> None:
        alert = key_alert(ring.name, label, old, new, reason)
        if alert is not None:
            self.emit(alert)
        if new is KeyState.HEALTHY:
            if ring.name in self._down:
                self._down.discard(ring.name)
                self.emit(Alert(
                    "upstream.recovered", "info",
                    f"upstream {ring.name} has a usable key again ({label}: {reason}); requests go to it again",
                    {"upstream": ring.name, "key": label, "reason": reason},
                    f"upstream.recovered:{ring.name}",
                ))
        elif old is KeyState.HEALTHY and KeyState.HEALTHY not in ring.states().values():
            self._down.add(ring.name)
            states = ", ".join(f"{key} {state.value}" for key, state in ring.states().items())
            self.emit(Alert(
                "upstream.unavailable", "critical",
                f"upstream {ring.name} has no usable key: {states}",
                {"upstream": ring.name, "keys": {k: s.value for k, s in ring.states().items()}, "reason": reason},
                f"upstream.unavailable:{ring.name}",
            ))

    def on_failover(self, source: UpstreamConfig, target: UpstreamConfig) -> None:
        """gateway.exchange.Hub.on_failover: only a move to a lower priority
        (a higher number) is news; within a tier it is load spreading."""
        if target.priority <= source.priority:
            return
        ring = self._rings.get(source.name)
        if ring is not None and KeyState.HEALTHY not in ring.states().values():
            # Its return is heard of when one of its keys is healthy again.
            self._down.add(source.name)
        self.emit(Alert(
            "upstream.failover", "warning",
            f"requests fail over from upstream {source.name} (priority {source.priority}) "
            f"to {target.name} (priority {target.priority})",
            {"from": source.name, "to": target.name, "from_priority": source.priority,
             "to_priority": target.priority},
            f"upstream.failover:{source.name}:{target.name}",
        ))

    # -- the usage writer ---------------------------------------------------------------

    def watch_usage(self, stats: UsageStats, queue_max: int, interval: float = USAGE_WATCH_INTERVAL) -> None:
        """Look at the usage writer's stats every `interval` seconds (a look
        costs a dict; the writer itself is left alone) and raise
        usage.degraded when rows start going to the spool, the queue passes
        USAGE_QUEUE_ALERT of `queue_max`, or the database fails."""
        if self._usage_task is None:
            self._usage_task = asyncio.get_running_loop().create_task(
                self._watch_usage(stats, queue_max, interval), name="hubcore-alerts-usage",
            )

    async def _watch_usage(self, stats: UsageStats, queue_max: int, interval: float) -> None:
        first = stats()
        spooled = int(first.get("spooled", 0))
        # Conditions in force: each is news when it begins.
        active: set[str] = set()
        while True:
            await asyncio.sleep(interval)
            try:
                now = stats()
                spooled = self._look_at_usage(now, spooled, queue_max, active)
            except Exception:
                log.exception("alerts: looking at the usage writer failed")

    def _look_at_usage(self, stats: Mapping[str, Any], spooled_before: int, queue_max: int, active: set[str]) -> int:
        spooled = int(stats.get("spooled", 0))
        depth = int(stats.get("queue_depth", 0))
        error = stats.get("last_error")
        found = {
            # Rows went to the spool since the last look; the condition lasts
            # until the spool is replayed (pending 0), not one look.
            "spool": spooled > spooled_before or ("spool" in active and bool(stats.get("spool_pending"))),
            "queue": depth >= USAGE_QUEUE_ALERT * queue_max,
            "database": stats.get("db_healthy") is False,
        }
        for condition, now_true in found.items():
            if not now_true:
                active.discard(condition)
                continue
            if condition in active:
                continue
            active.add(condition)
            if not self.wants("usage.degraded"):
                continue
            if condition == "spool":
                summary = f"usage rows are going to the spool ({spooled - spooled_before} in the last look)"
            elif condition == "queue":
                summary = f"usage queue {depth} of {queue_max} ({100 * depth // max(queue_max, 1)}% full)"
            else:
                summary = "usage database failing; rows go to the spool"
            if error:
                summary += f": {error}"
            self.emit(Alert(
                "usage.degraded", "critical" if condition == "database" else "warning", summary,
                {"condition": condition, "queue_depth": depth, "queue_max": queue_max, "spooled": spooled,
                 "spool_pending": stats.get("spool_pending"), "last_error": error},
                f"usage.degraded:{condition}",
            ))
        return spooled

    def watch_shared(self, stats: UsageStats, interval: float = USAGE_WATCH_INTERVAL) -> None:
        """Look at the shared state's stats ([shared] Redis) every `interval`
        seconds and raise shared.degraded when the hub stops sharing limits
        (Redis unreachable: it enforces its share locally, or refuses), and
        shared.recovered when it shares them again."""
        if self._shared_task is None:
            self._shared_task = asyncio.get_running_loop().create_task(
                self._watch_shared(stats, interval), name="hubcore-alerts-shared",
            )

    async def _watch_shared(self, stats: UsageStats, interval: float) -> None:
        degraded = False
        while True:
            await asyncio.sleep(interval)
            try:
                degraded = self._look_at_shared(stats(), degraded)
            except Exception:
                log.exception("alerts: looking at the shared state failed")

    def _look_at_shared(self, stats: Mapping[str, Any], was_degraded: bool) -> bool:
        degraded = bool(stats.get("degraded"))
        if degraded == was_degraded:
            return degraded
        details = {"redis": stats.get("redis"), "on_failure": stats.get("on_failure"),
                   "instances": stats.get("instances"), "last_error": stats.get("last_error")}
        if degraded and self.wants("shared.degraded"):
            refusing = stats.get("on_failure") == "closed"
            summary = (f"shared state: Redis {stats.get('redis')} unreachable; "
                       + ("requests are refused until it answers" if refusing
                          else "each instance enforces its share of every limit locally"))
            if stats.get("last_error"):
                summary += f": {stats['last_error']}"
            self.emit(Alert("shared.degraded", "critical" if refusing else "warning", summary, details,
                            "shared.degraded"))
        elif not degraded and self.wants("shared.recovered"):
            self.emit(Alert("shared.recovered", "info",
                            f"shared state: Redis {stats.get('redis')} answers again; limits are shared again",
                            details, "shared.recovered"))
        return degraded

    # -- reload, stats, end -------------------------------------------------------------

    def configure(self, configs: Iterable[AlertConfig]) -> list[str]:
        """A reload: targets whose config is unchanged keep their queue and
        memory of what they sent; the others are replaced (what they still
        had queued is dropped). What changed, a phrase each, by label."""
        kept = {target.config: target for target in self.targets}
        targets = []
        changes = []
        for config in configs:
            target = kept.pop(config, None)
            if target is None:
                target = Target(config, self.hub, self._clock)
                target.claim = self._claim
                changes.append(f"alert {config.label}: new settings")
            targets.append(target)
        for target in kept.values():
            target.close("reload")
            self._retire(target)
            if not any(t.label == target.label for t in targets):
                changes.append(f"alert {target.label}: removed")
        self.targets = targets
        self._kinds = self._wanted()
        return changes

    def _retire(self, target: Target) -> None:
        self._retired_sent += target.sent
        self._retired_deduplicated += target.deduplicated
        for reason, n in target.dropped.items():
            self._retired_dropped[reason] = self._retired_dropped.get(reason, 0) + n

    def stats(self) -> dict[str, Any]:
        """Counters for /stats and /metrics: never a URL."""
        dropped = dict(self._retired_dropped)
        for target in self.targets:
            for reason, n in target.dropped.items():
                dropped[reason] = dropped.get(reason, 0) + n
        return {
            "sent": self._retired_sent + sum(t.sent for t in self.targets),
            "dropped": dropped,
            "deduplicated": self._retired_deduplicated + sum(t.deduplicated for t in self.targets),
            "queued": sum(len(t.queue) for t in self.targets),
            "targets": [
                {"alert": t.label, "format": t.config.format, "events": list(t.config.events), "queued": len(t.queue),
                 "sent": t.sent, "dropped": dict(t.dropped), "deduplicated": t.deduplicated}
                for t in self.targets
            ],
        }

    async def close(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Shutdown: alerts still queued have `grace` seconds to go out; then
        delivery stops, and what is left is dropped (logged, counted)."""
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while loop.time() < deadline and any(t.queue or t.delivering is not None for t in self.targets):
            await asyncio.sleep(0.02)
        for task in (self._usage_task, self._shared_task):
            if task is not None:
                task.cancel()
        self._usage_task = self._shared_task = None
        for ring in self._rings.values():
            if ring.state_listener == self.on_key_state:
                ring.state_listener = None
        for target in self.targets:
            target.close("shutdown")


# -- `hubcore alert test` -----------------------------------------------------------------

def alert_for_test(hub: str | None = None) -> Alert:
    name = hub or socket.gethostname()
    return Alert(
        TEST_EVENT, "info", f"test alert from hubcore on {name}: this target works",
        {"events": list(ALERT_EVENTS)}, TEST_EVENT,
    )


async def send_test(configs: Iterable[AlertConfig], hub: str | None = None) -> list[tuple[AlertConfig, Answer]]:
    """One test alert to every target at once, one attempt each (no queue,
    no dedup, whatever its `events`): each target's answer, in config order."""
    name = hub or socket.gethostname()
    alert = alert_for_test(name)
    webhooks = [Webhook(config) for config in configs]

    async def one(webhook: Webhook) -> Answer:
        try:
            return await webhook.post(render_body(alert, webhook.config.format, name))
        finally:
            webhook.close()

    answers = await asyncio.gather(*(one(w) for w in webhooks))
    return [(w.config, a) for w, a in zip(webhooks, answers)]
