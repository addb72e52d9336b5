"""The hub's own instruments: counters (spend and tokens per user, project and
model among them), gauges and fixed-bucket latency histograms.

Recording is a few integer operations on the request path; turning them into
``/stats`` JSON or Prometheus text happens only when the ops socket asks.
"""
from __future__ import annotations

import asyncio
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from hubcore.routing.failures import FailureKind
from hubcore.ops.tally import DEFAULT_MAX_SERIES, TOKEN_CLASSES, Histogram, TallyCore
from hubcore.routing.keys import KeyState

# Upper bounds in seconds, on a log scale with seven steps a decade (1, 1.5,
# 2, 3, 4, 5, 7.5): no bound is more than 1.5 times the one below it, so a
# quantile read from them is within that factor of the true one anywhere in
# the range. The range is what the hub measures: its own share of a request
# takes tens of microseconds, a first token from a millisecond (a cached
# answer, a relay next door) to minutes (a long prompt with extended thinking,
# the 600 s first_byte_timeout), and a whole stream can run for an hour.
LATENCY_STEPS: tuple[str, ...] = ("1", "1.5", "2", "3", "4", "5", "7.5")


def log_buckets(low: float, high: float, steps: Sequence[str] = LATENCY_STEPS) -> tuple[float, ...]:
    """Every ``step * 10**n`` within [low, high], then ``high`` itself.

    Built from decimal strings, so the bounds (and the ``le`` labels) are the
    short numbers they look like: 7.5e-05, not 7.500000000000001e-05.
    """
    bounds = sorted(
        value
        for exponent in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
        for step in steps
        if low <= (value := float(f"{step}e{exponent}")) <= high
    )
    if bounds[-1] != high:
        bounds.append(float(high))
    return tuple(bounds)


# 50 us to 10 minutes: time to first byte, the hub's own share, a wait for a key.
LATENCY_BUCKETS: tuple[float, ...] = log_buckets(50e-6, 600.0)
TTFB_BUCKETS = HUB_ADDED_BUCKETS = QUEUE_WAIT_BUCKETS = LATENCY_BUCKETS
# A whole request: the same, on to an hour.
TOTAL_BUCKETS: tuple[float, ...] = LATENCY_BUCKETS + (900.0, 1200.0, 1800.0, 2700.0, 3600.0)

LOOP_LAG_INTERVAL = 0.5          # seconds between event-loop lag samples
RATE_WINDOW = 60.0               # seconds over which /stats reports req/s

# Key states rendered one-hot (like kube-state-metrics), so a dashboard can
# count keys per state even when none is in it: every state of the key ring.
KEY_STATES: tuple[str, ...] = tuple(state.value for state in KeyState)

# What a key-ring snapshot may carry into /stats and /metrics. Anything else a
# provider puts in the dict is dropped, so a secret can never leak this way.
KEY_FIELDS: tuple[str, ...] = (
    "label", "state", "until", "consecutive_failures", "in_flight", "requests",
    "rate_limited", "errors", "last_error", "priority", "weight", "workspace", "org",
    "headroom", "rests",
)
WRITER_FIELDS: tuple[str, ...] = (
    "queue_depth", "written", "spooled", "replayed", "spool_pending", "unpriced", "last_error",
)
# What the shared state's stats (shared.redis_state.SharedState.stats) carry
# into /stats: the Redis URL is kept without its password there.
SHARED_FIELDS: tuple[str, ...] = (
    "redis", "state", "degraded", "on_failure", "instance_id", "instances", "errors", "last_error",
    "queue_depth", "dropped", "held_slots", "degraded_seconds",
    "following_charges", "charges_heard", "catch_ups", "caught_up_micros",
)

# The status_class label of hubcore_upstream_requests_total: what an attempt
# was answered with, or "none" (no answer: refused, reset, timed out). A
# fixed set, so a vendor's odd status cannot make new series: 1xx (never a
# final answer) counts as 2xx, anything past 599 as 5xx.
UPSTREAM_STATUS_CLASSES: tuple[str, ...] = ("2xx", "3xx", "4xx", "5xx", "none")
_STATUS_CLASS_OF: tuple[str, ...] = ("2xx", "2xx", "2xx", "3xx", "4xx", "5xx")  # by status // 100, up to 5
NO_ANSWER = 0  # the status an attempt without an answer is counted under


def status_class(status: int) -> str:
    """The status_class label of an upstream's answer (NO_ANSWER: "none")."""
    if status == NO_ANSWER:
        return "none"
    return _STATUS_CLASS_OF[min(max(status // 100, 0), 5)]


# The kind label of hubcore_upstream_errors_total: routing.failures'
# vocabulary, less the client leaving (no verdict on the upstream); a kind
# from elsewhere is counted as "other".
UPSTREAM_ERROR_KINDS: tuple[str, ...] = (
    *(kind.value for kind in FailureKind if kind is not FailureKind.CLIENT_ABORTED), "other",
)
_ERROR_KIND_OF: dict[object, str] = {
    **{kind: kind.value for kind in FailureKind}, **{kind.value: kind.value for kind in FailureKind},
}
_NOT_AN_UPSTREAM_ERROR = FailureKind.CLIENT_ABORTED.value

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HubMetrics(TallyCore):
    """Every instrument of one hub process; plain attributes, mutated in place.
    What every request records is its base's (hubcore.ops.tally: compiled
    when built); the rest is here."""

    def __init__(
        self,
        *,
        ttfb_buckets: Sequence[float] = TTFB_BUCKETS,
        total_buckets: Sequence[float] = TOTAL_BUCKETS,
        hub_added_buckets: Sequence[float] = HUB_ADDED_BUCKETS,
        queue_wait_buckets: Sequence[float] = QUEUE_WAIT_BUCKETS,
        max_series: int = DEFAULT_MAX_SERIES,
        lag_interval: float = LOOP_LAG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(ttfb_buckets, total_buckets, hub_added_buckets, queue_wait_buckets, max_series)
        self._clock = clock              # monotonic seconds; injectable for tests
        self.started_at = time.time()
        self._started_mono = clock()
        # client connections
        self.connections_open = 0
        self.connections_total = 0
        # requests (the per-request counters and histograms: TallyCore)
        self.refused: dict[str, int] = {}                      # reason
        # upstream (attempts, retries, statuses: TallyCore)
        self.upstream_errors: dict[tuple[str, str], int] = {}     # (upstream, error kind)
        self.upstream_failovers: dict[tuple[str, str], int] = {}  # (from upstream, to upstream)
        # event loop
        self.loop_lag = 0.0
        self.loop_lag_max = 0.0
        self._lag_interval = lag_interval
        self._lag_task: asyncio.Task[None] | None = None
        self._rate_samples: deque[tuple[float, int]] = deque()

    # -- recording (hot path: keep these to a few dict/int operations) --------

    def connection_opened(self) -> None:
        self.connections_open += 1
        self.connections_total += 1

    def connection_closed(self) -> None:
        self.connections_open -= 1

    def upstream_unanswered(self, upstream: str, kind: FailureKind | str) -> None:
        """An attempt on `upstream` ended with no response head: counted in
        status class "none" and as an error of `kind` (connect_failed, timeout)."""
        key = (upstream, NO_ANSWER)
        statuses = self.upstream_statuses
        statuses[key] = statuses.get(key, 0) + 1
        self.upstream_failed(upstream, kind)

    def upstream_failed(self, upstream: str, kind: FailureKind | str) -> None:
        """An answered attempt on `upstream` failed (5xx, 529, 429, 401, or
        the stream broke): one error of `kind`, a FailureKind or its value."""
        name = _ERROR_KIND_OF.get(kind, "other")
        if name == _NOT_AN_UPSTREAM_ERROR:
            return
        key = (upstream, name)
        self.upstream_errors[key] = self.upstream_errors.get(key, 0) + 1

    @property
    def upstream_requests(self) -> dict[tuple[str, str], int]:
        """Attempts by (upstream, status class), UPSTREAM_STATUS_CLASSES."""
        out: dict[tuple[str, str], int] = {}
        for (upstream, status), n in self.upstream_statuses.items():
            key = (upstream, status_class(status))
            out[key] = out.get(key, 0) + n
        return out

    def failover(self, from_upstream: str, to_upstream: str) -> None:
        """A request moved from one upstream to another before its first byte."""
        key = (from_upstream, to_upstream)
        self.upstream_failovers[key] = self.upstream_failovers.get(key, 0) + 1

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    # -- event-loop lag sampler ----------------------------------------------

    def start(self) -> None:
        """Start sampling loop lag (and the req/s window); needs a running loop."""
        if self._lag_task is None or self._lag_task.done():
            self._rate_samples.append((self._clock(), self.requests_total))
            self._lag_task = asyncio.get_running_loop().create_task(
                self._sample_forever(), name="hubcore-loop-lag")

    async def stop(self) -> None:
        task, self._lag_task = self._lag_task, None
        if task is not None and not task.done():
            task.cancel()
            # wait() rather than `await task`: the task's CancelledError stays
            # inside it, while a cancellation of stop() itself still propagates.
            await asyncio.wait({task})

    async def _sample_forever(self) -> None:
        # Theory of operation: a sleep of `interval` that returns late was
        # late because callbacks ahead of it held the loop; the surplus is the
        # delay every socket event saw at that moment.
        loop = asyncio.get_running_loop()
        interval = self._lag_interval
        while True:
            before = loop.time()
            await asyncio.sleep(interval)
            self.sample_lag(max(0.0, loop.time() - before - interval))

    def sample_lag(self, lag: float) -> None:
        """Record one lag sample and one point of the request-rate window."""
        self.loop_lag = lag
        if lag > self.loop_lag_max:
            self.loop_lag_max = lag
        now = self._clock()
        samples = self._rate_samples
        samples.append((now, self.requests_total))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW:
            samples.popleft()

    # -- reading ---------------------------------------------------------------

    @property
    def uptime(self) -> float:
        return self._clock() - self._started_mono

    def request_rate(self, window: float = RATE_WINDOW) -> float:
        """Requests per second over the last `window` seconds (at most
        RATE_WINDOW; since start before that), from the samples the lag
        sampler takes every LOOP_LAG_INTERVAL: the window is that much longer
        at most, and reading it costs the request path nothing."""
        samples = self._rate_samples
        now = self._clock()
        t0, n0 = samples[0] if samples else (self._started_mono, 0)
        # Newest first: the latest sample at least `window` old starts it.
        for t, n in reversed(samples):
            if now - t >= window:
                t0, n0 = t, n
                break
        elapsed = now - t0
        return (self.requests_total - n0) / elapsed if elapsed > 0 else 0.0

    def snapshot(
        self,
        keys: Mapping[str, Iterable[Mapping[str, Any]]] | None = None,
        writer: Mapping[str, Any] | None = None,
        tokens_loaded: int = 0,
        version: str = "",
        shared: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Everything for ``GET /stats``: JSON-ready (string keys, plain values).

        ``keys`` maps an upstream name to its key ring's per-key dicts (fields
        in KEY_FIELDS, ``until`` as unix time or None, ``headroom`` and
        ``rests`` per model class as KeyRing.snapshot gives them); ``writer``
        is the usage writer's stats (WRITER_FIELDS); ``shared`` the shared
        state's (SHARED_FIELDS), only with a [shared] table.
        """
        by_status: dict[str, int] = {}
        by_outcome: dict[str, int] = {}
        by_route: list[dict[str, Any]] = []
        for (route, status, outcome), n in sorted(self.requests.items()):
            by_status[str(status)] = by_status.get(str(status), 0) + n
            by_outcome[outcome] = by_outcome.get(outcome, 0) + n
            by_route.append({"route": route, "status": status, "outcome": outcome, "count": n})
        return {
            "version": version,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "uptime_s": self.uptime,
            "connections": {"open": self.connections_open, "total": self.connections_total},
            "in_flight": self.in_flight,
            "requests": {
                "total": self.requests_total,
                "rate_1m": self.request_rate(),
                "by_status": by_status,
                "by_outcome": by_outcome,
                "by_route": by_route,
            },
            "latency_s": {
                "ttfb": self.ttfb.summary(),
                "total": self.total.summary(),
                "hub_added": self.hub_added.summary(),
                "queue_wait": self.queue_wait.summary(),
            },
            "upstream": self._upstream_snapshot(),
            "refused": dict(sorted(self.refused.items())),
            "loop_lag_s": {"last": self.loop_lag, "max": self.loop_lag_max},
            "tokens_loaded": tokens_loaded,
            "writer": _pick(writer or {}, WRITER_FIELDS),
            "keys": {
                upstream: [_pick(k, KEY_FIELDS) for k in ring]
                for upstream, ring in (keys or {}).items()
            },
            **({"shared": _pick(shared, SHARED_FIELDS)} if shared is not None else {}),
        }

    def _upstream_snapshot(self) -> dict[str, dict[str, Any]]:
        """Per upstream: attempts, retries, attempts by status class, errors
        by kind, and failovers from it by the upstream they went to."""
        out: dict[str, dict[str, Any]] = {}

        def block(name: str) -> dict[str, Any]:
            entry = out.get(name)
            if entry is None:
                entry = out[name] = {
                    "attempts": self.upstream_attempts.get(name, 0),
                    "retries": self.upstream_retries.get(name, 0),
                    "requests": {}, "errors": {}, "failovers": {},
                }
            return entry

        for name in self.upstream_attempts.keys() | self.upstream_retries.keys():
            block(name)
        for (name, category), n in sorted(self.upstream_requests.items()):
            block(name)["requests"][category] = n
        for (name, kind), n in sorted(self.upstream_errors.items()):
            block(name)["errors"][kind] = n
        for (source, target), n in sorted(self.upstream_failovers.items()):
            block(source)["failovers"][target] = n
            block(target)
        return dict(sorted(out.items()))

    def render_prometheus(
        self,
        keys: Mapping[str, Iterable[Mapping[str, Any]]] | None = None,
        writer: Mapping[str, Any] | None = None,
        tokens_loaded: int = 0,
        version: str = "",
        *,
        key_states: Sequence[str] = KEY_STATES,
        gc: Mapping[str, Any] | None = None,
        alerts: Mapping[str, Any] | None = None,
        shared: Mapping[str, Any] | None = None,
    ) -> str:
        """Everything for ``GET /metrics`` in the Prometheus text format 0.0.4;
        ``gc`` is the hub's garbage-collector stats (runtime.CycleCollector.stats),
        ``alerts`` its alert targets' counters (ops.alerts.Alerts.stats),
        ``shared`` the shared state's (render_shared), only with a [shared] table."""
        out = _Exposition()
        out.family("hubcore_build_info", "gauge", "Version of the running hub; always 1.")
        out.sample("hubcore_build_info", 1, version=version)
        out.family("hubcore_start_time_seconds", "gauge", "Unix time the hub process started.")
        out.sample("hubcore_start_time_seconds", self.started_at)
        out.family("hubcore_uptime_seconds", "gauge", "Seconds since the hub process started.")
        out.sample("hubcore_uptime_seconds", self.uptime)

        out.family("hubcore_connections_open", "gauge", "Client connections open now.")
        out.sample("hubcore_connections_open", self.connections_open)
        out.family("hubcore_connections_total", "counter", "Client connections accepted.")
        out.sample("hubcore_connections_total", self.connections_total)
        out.family("hubcore_in_flight_requests", "gauge", "Requests being served now.")
        out.sample("hubcore_in_flight_requests", self.in_flight)

        out.family("hubcore_requests_total", "counter",
                   "Requests finished, by route, status sent to the client and outcome.")
        for (route, status, outcome), n in sorted(self.requests.items()):
            out.sample("hubcore_requests_total", n, route=route, status=str(status), outcome=outcome)
        out.family("hubcore_refused_total", "counter", "Requests the hub refused itself, by reason.")
        for reason, n in sorted(self.refused.items()):
            out.sample("hubcore_refused_total", n, reason=reason)

        out.histogram("hubcore_ttfb_seconds", self.ttfb,
                      "Time from request received to first response byte sent to the client.")
        out.histogram("hubcore_request_duration_seconds", self.total,
                      "Time from request received to the last response byte sent.")
        out.histogram("hubcore_hub_added_seconds", self.hub_added,
                      "Latency the hub itself added: request complete to upstream send, "
                      "plus upstream first byte to client first byte; waits for a key excluded.")
        out.histogram("hubcore_queue_wait_seconds", self.queue_wait,
                      "Time a request waited for a vendor key to come back from a rest after 429s "
                      "(only requests that waited).")
        self._render_usage(out)

        out.family("hubcore_upstream_attempts_total", "counter",
                   "Requests sent to an upstream, retries included.")
        for name, n in sorted(self.upstream_attempts.items()):
            out.sample("hubcore_upstream_attempts_total", n, upstream=name)
        out.family("hubcore_upstream_retries_total", "counter",
                   "Attempts that retried a failed attempt on another key.")
        for name, n in sorted(self.upstream_retries.items()):
            out.sample("hubcore_upstream_retries_total", n, upstream=name)
        out.family("hubcore_upstream_requests_total", "counter",
                   "Attempts sent to an upstream, by the class of the status it answered with "
                   "(2xx, 3xx, 4xx, 5xx; none: no answer).")
        for (name, category), n in sorted(self.upstream_requests.items()):
            out.sample("hubcore_upstream_requests_total", n, upstream=name, status_class=category)
        out.family("hubcore_upstream_errors_total", "counter",
                   "Failed attempts on an upstream, by kind (connect_failed, timeout, server_error, "
                   "overloaded, rate_limited, auth_failed, transient, stream_broken).")
        for (name, kind), n in sorted(self.upstream_errors.items()):
            out.sample("hubcore_upstream_errors_total", n, upstream=name, kind=kind)
        out.family("hubcore_upstream_failovers_total", "counter",
                   "Requests that moved from one upstream to another before their first byte.")
        for (source, target), n in sorted(self.upstream_failovers.items()):
            out.sample("hubcore_upstream_failovers_total", n, **{"from": source, "to": target})

        out.family("hubcore_event_loop_lag_seconds", "gauge",
                   "Delay of the latest event-loop lag probe.")
        out.sample("hubcore_event_loop_lag_seconds", self.loop_lag)
        out.family("hubcore_event_loop_lag_max_seconds", "gauge",
                   "Largest event-loop lag probe since start.")
        out.sample("hubcore_event_loop_lag_max_seconds", self.loop_lag_max)

        out.family("hubcore_tokens_loaded", "gauge", "Hub tokens in the in-memory table.")
        out.sample("hubcore_tokens_loaded", tokens_loaded)

        self._render_writer(out, writer or {})
        self._render_gc(out, gc or {})
        if alerts is not None:
            self._render_alerts(out, alerts)
        if shared is not None:
            self.render_shared(out, shared)
        self._render_keys(out, keys or {}, key_states)
        return out.text()

    @staticmethod
    def _render_alerts(out: _Exposition, alerts: Mapping[str, Any]) -> None:
        out.family("hubcore_alerts_sent_total", "counter", "Alerts a webhook accepted (2xx).")
        out.sample("hubcore_alerts_sent_total", alerts.get("sent", 0))
        out.family("hubcore_alerts_dropped_total", "counter",
                   "Alerts given up, by reason: queue_full, timeout, unreachable, rejected (an answer "
                   "not 2xx, or retries used up), reload, shutdown.")
        for reason, n in sorted(alerts.get("dropped", {}).items()):
            out.sample("hubcore_alerts_dropped_total", n, reason=reason)
        out.family("hubcore_alerts_deduplicated_total", "counter",
                   "Alerts not sent because the same alert went out within its min_interval.")
        out.sample("hubcore_alerts_deduplicated_total", alerts.get("deduplicated", 0))
        out.family("hubcore_alerts_queued", "gauge", "Alerts waiting for delivery, all targets.")
        out.sample("hubcore_alerts_queued", alerts.get("queued", 0))

    def _render_usage(self, out: _Exposition) -> None:
        rows = sorted(self.usage.items())
        out.family("hubcore_usage_cost_usd_total", "counter",
                   "Cost of the requests recorded, in US dollars, by user, project and model "
                   "(at most server.metrics_max_series label sets; the rest under \"_other\").")
        for (user, project, model), row in rows:
            out.sample("hubcore_usage_cost_usd_total", row[0] / 1e6, user=user, project=project, model=model)
        out.family("hubcore_usage_tokens_total", "counter",
                   "Tokens of the requests recorded, by user, project, model and class "
                   "(output includes reasoning).")
        for (user, project, model), row in rows:
            for i, token_class in enumerate(TOKEN_CLASSES, 1):
                out.sample("hubcore_usage_tokens_total", row[i],
                           user=user, project=project, model=model, **{"class": token_class})
        out.family("hubcore_usage_folded_total", "counter",
                   "Usage events counted under user, project and model \"_other\" because "
                   "server.metrics_max_series label sets were already in use.")
        out.sample("hubcore_usage_folded_total", self.usage_folded)

    @staticmethod
    def _render_gc(out: _Exposition, gc: Mapping[str, Any]) -> None:
        by_generation = gc.get("collections_by_generation")
        if by_generation is not None:
            out.family("hubcore_gc_collections_total", "counter",
                       "Python garbage collections, by generation (2: full; each pauses the hub).")
            for generation, n in enumerate(by_generation):
                out.sample("hubcore_gc_collections_total", n, generation=str(generation))
        if gc.get("scheduled"):
            out.family("hubcore_gc_frozen_objects", "gauge",
                       "Objects made at startup, which no collection walks.")
            out.sample("hubcore_gc_frozen_objects", gc.get("frozen_objects", 0))
            out.family("hubcore_gc_scheduled_full_collections_total", "counter",
                       "Full collections run on the hub's timer (server.gc_full_interval).")
            out.sample("hubcore_gc_scheduled_full_collections_total", gc.get("full_collections", 0))
            last = gc.get("last_full_collection_ms")
            if last is not None:
                out.family("hubcore_gc_last_full_collection_seconds", "gauge",
                           "How long the latest scheduled full collection paused the hub.")
                out.sample("hubcore_gc_last_full_collection_seconds", last / 1000.0)

    @staticmethod
    def render_shared(out: _Exposition, shared: Mapping[str, Any]) -> None:
        """The link to the Redis that instances share state through."""
        out.family("hubcore_shared_degraded", "gauge",
                   "1 while this instance cannot share state through Redis and enforces limits "
                   "on its own share (or refuses: [shared] on_failure).")
        out.sample("hubcore_shared_degraded", 1 if shared.get("degraded") else 0)
        out.family("hubcore_shared_instances", "gauge", "Live hub instances, as last counted in Redis.")
        out.sample("hubcore_shared_instances", shared.get("instances", 0))
        out.family("hubcore_shared_errors_total", "counter",
                   "Failed calls to Redis, by kind (timeout, connection, error: Redis answered an error).")
        for kind, n in sorted((shared.get("errors") or {}).items()):
            out.sample("hubcore_shared_errors_total", n, kind=str(kind))
        out.family("hubcore_shared_queue_depth", "gauge",
                   "Writes to Redis (releases, charges, key states, sessions) waiting to be sent.")
        out.sample("hubcore_shared_queue_depth", shared.get("queue_depth", 0))
        out.family("hubcore_shared_writes_dropped_total", "counter",
                   "Writes to Redis dropped because the queue was full ([shared] queue_max).")
        out.sample("hubcore_shared_writes_dropped_total", shared.get("dropped", 0))
        out.family("hubcore_shared_degraded_seconds_total", "counter", "Seconds spent degraded since start.")
        out.sample("hubcore_shared_degraded_seconds_total", float(shared.get("degraded_seconds", 0.0)))

    @staticmethod
    def _render_writer(out: _Exposition, writer: Mapping[str, Any]) -> None:
        for field, kind, help_text in (
            ("queue_depth", "gauge", "Usage events waiting for the writer."),
            ("written", "counter", "Usage events written to the database."),
            ("spooled", "counter", "Usage events spooled to disk while the database failed."),
            ("replayed", "counter", "Spooled usage events written back to the database."),
            ("spool_pending", "gauge", "Usage events in the spool, not yet replayed."),
            ("unpriced", "counter", "Usage events for a model without a price."),
        ):
            value = writer.get(field)
            if value is None:
                continue
            name = f"hubcore_usage_{field}" + ("_total" if kind == "counter" else "")
            out.family(name, kind, help_text)
            out.sample(name, value)
        unpriced_models = writer.get("unpriced_models")
        if unpriced_models is not None:
            out.family("hubcore_unpriced_requests_total", "counter",
                       "Requests for a model without a price, by model (charged as [pricing] unpriced says).")
            for model, count in sorted(unpriced_models.items()):
                out.sample("hubcore_unpriced_requests_total", count, model=str(model))
        out.family("hubcore_usage_writer_failing", "gauge",
                   "1 while the usage writer's latest attempt failed.")
        out.sample("hubcore_usage_writer_failing", 1 if writer.get("last_error") else 0)

    @staticmethod
    def _render_keys(
        out: _Exposition, keys: Mapping[str, Iterable[Mapping[str, Any]]], key_states: Sequence[str],
    ) -> None:
        rows = [(upstream, k) for upstream, ring in sorted(keys.items()) for k in ring]
        now = time.time()
        out.family("hubcore_key_info", "gauge", "Vendor keys and their workspace and organisation.")
        for upstream, k in rows:
            out.sample("hubcore_key_info", 1, upstream=upstream, key=str(k.get("label", "")),
                       workspace=str(k.get("workspace") or ""), org=str(k.get("org") or ""))
        out.family("hubcore_key_state", "gauge", "Vendor key state, one series per state (1 = current).")
        for upstream, k in rows:
            current = str(k.get("state", ""))
            states = list(key_states)
            if current not in states:
                states.append(current)
            for state in states:
                out.sample("hubcore_key_state", 1 if state == current else 0,
                           upstream=upstream, key=str(k.get("label", "")), state=state)
        out.family("hubcore_key_unavailable_seconds", "gauge",
                   "Seconds until a cooling or open key may be used again (0 when usable).")
        for upstream, k in rows:
            until = k.get("until")
            remaining = max(0.0, float(until) - now) if until is not None else 0.0
            out.sample("hubcore_key_unavailable_seconds", remaining,
                       upstream=upstream, key=str(k.get("label", "")))
        out.family("hubcore_key_headroom_ratio", "gauge",
                   "Fraction left of the vendor's tightest rate limit on this key for a model class, "
                   "from its latest answer's rate-limit headers; no series once that limit has reset.")
        for upstream, k in rows:
            for model_class, reading in sorted((k.get("headroom") or {}).items()):
                out.sample("hubcore_key_headroom_ratio", float(reading.get("remaining", 1.0)),
                           upstream=upstream, key=str(k.get("label", "")), **{"class": str(model_class)})
        for field, name, kind, help_text in (
            ("in_flight", "hubcore_key_in_flight_requests", "gauge", "Requests on this key now."),
            ("consecutive_failures", "hubcore_key_consecutive_failures", "gauge",
             "Failures in a row counted by the circuit breaker."),
            ("priority", "hubcore_key_priority", "gauge", "Configured priority (lower is tried first)."),
            ("weight", "hubcore_key_weight", "gauge", "Configured weight within its priority."),
            ("requests", "hubcore_key_requests_total", "counter", "Attempts sent with this key."),
            ("rate_limited", "hubcore_key_rate_limited_total", "counter",
             "429 answers received on this key."),
            ("errors", "hubcore_key_errors_total", "counter",
             "Failed attempts on this key (5xx, 529, connect errors, timeouts)."),
        ):
            out.family(name, kind, help_text)
            for upstream, k in rows:
                value = k.get(field)
                if value is not None:
                    out.sample(name, value, upstream=upstream, key=str(k.get("label", "")))


def _pick(d: Mapping[str, Any], fields: Sequence[str]) -> dict[str, Any]:
    return {f: d[f] for f in fields if f in d}


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float | int | bool) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Exposition:
    """Builds text exposition lines; every family gets HELP and TYPE once."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self._lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self._lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float | int | bool, **labels: str) -> None:
        if labels:
            body = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            self._lines.append(f"{name}{{{body}}} {_number(value)}")
        else:
            self._lines.append(f"{name} {_number(value)}")

    def histogram(self, name: str, hist: Histogram, help_text: str) -> None:
        self.family(name, "histogram", help_text)
        for bound, running in hist.cumulative():
            self.sample(f"{name}_bucket", running, le=_number(bound))
        self.sample(f"{name}_sum", hist.sum)
        self.sample(f"{name}_count", hist.count)

    def text(self) -> str:
        self._lines.append("")
        return "\n".join(self._lines)
