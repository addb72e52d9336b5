"""The metrics' per-request recording, pure Python: the twin of
`_tally.pyx` (hubcore.ops.tally picks one).

What every request adds to the hub's instruments (a request started and
finished, three latency histograms, an attempt on an upstream and its
answer, a usage event's cost and tokens) is a few dict and integer
operations; `TallyCore` holds those counters and `Histogram` the
fixed-bucket latency histograms. `HubMetrics` (hubcore.ops.metrics)
subclasses the core and keeps everything else (gauges, rare counters, the
lag sampler, /stats and the Prometheus text) in Python.
"""
from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence

from hubcore.accounting.usage import UsageEvent

# Label sets of the per-user, project and model counters (server.metrics_max_series):
# a few thousand is what a team's users times models comes to, and each set is
# six series. Past the cap, new sets are counted under OTHER_SERIES.
DEFAULT_MAX_SERIES = 2000
OTHER_SERIES = ("_other", "_other", "_other")
# The order of the token counters after cost in TallyCore.usage rows.
TOKEN_CLASSES: tuple[str, ...] = ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h")


class Histogram:
    """Counts of observations in fixed buckets (``le`` upper bounds, seconds)."""

    __slots__ = ("buckets", "counts", "count", "sum")

    def __init__(self, buckets: Sequence[float]) -> None:
        bounds = tuple(float(b) for b in buckets)
        if not bounds or any(b >= c for b, c in zip(bounds, bounds[1:])):
            raise ValueError("histogram buckets must be non-empty and strictly increasing")
        if math.isinf(bounds[-1]):
            bounds = bounds[:-1]          # +Inf is implicit: the last slot of counts
        self.buckets: tuple[float, ...] = bounds
        self.counts: list[int] = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left puts a value equal to a bound into that bound's bucket,
        # which is Prometheus's `le` (less than or equal) meaning.
        self.counts[bisect_left(self.buckets, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """``(le, count of observations <= le)`` per bucket, ending with ``+Inf``."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.buckets, math.inf), self.counts):
            running += n
            out.append((bound, running))
        return out

    def quantile(self, q: float) -> float | None:
        """Estimate the q-quantile by linear interpolation inside its bucket.

        Prometheus's ``histogram_quantile`` rule (observations spread evenly
        inside a bucket; the first bucket starts at 0), except above the last
        finite bound: nothing is known there but "more than that bound", so
        the answer is ``math.inf`` rather than the bound (which would pass an
        hour-long wait off as ten minutes). None without observations.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError("quantile must be within [0, 1]")
        if self.count == 0:
            return None
        rank = q * self.count
        running = 0
        lower = 0.0
        for i, n in enumerate(self.counts):
            if n and running + n >= rank:
                if i == len(self.buckets):
                    return math.inf
                upper = self.buckets[i]
                return lower + (upper - lower) * ((rank - running) / n)
            running += n
            if i < len(self.buckets):
                lower = self.buckets[i]
        raise AssertionError("unreachable: rank <= count")

    def summary(self) -> dict[str, float | int | None]:
        """For /stats: a quantile above ``last_bound`` is null there, and
        ``above_last_bound`` counts the observations that lie beyond it (JSON
        has no infinity; a reader must not take the bound for the value)."""
        out: dict[str, float | int | None] = {"count": self.count, "sum": self.sum}
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            value = self.quantile(q)
            out[name] = None if value is None or math.isinf(value) else value
        out["last_bound"] = self.buckets[-1]
        out["above_last_bound"] = self.counts[-1]
        return out


class TallyCore:
    """The instruments every request records into; HubMetrics' base."""

    def __init__(
        self, ttfb_buckets: Sequence[float], total_buckets: Sequence[float],
        hub_added_buckets: Sequence[float], queue_wait_buckets: Sequence[float], max_series: int,
    ) -> None:
        # requests
        self.in_flight = 0
        self.requests_total = 0
        self.requests: dict[tuple[str, int, str], int] = {}    # (route, status, outcome)
        self.ttfb = Histogram(ttfb_buckets)
        self.total = Histogram(total_buckets)
        self.hub_added = Histogram(hub_added_buckets)
        self.queue_wait = Histogram(queue_wait_buckets)
        # spend and tokens per (user, project, model); see on_usage
        self.usage: dict[tuple[str, str, str], list[int]] = {}
        self.max_series = max_series
        self.usage_folded = 0
        # upstream
        self.upstream_attempts: dict[str, int] = {}            # upstream name
        self.upstream_retries: dict[str, int] = {}
        # Keyed by upstream names, which come from the config, times small
        # fixed sets: bounded without a cap. Statuses (three digits;
        # metrics.NO_ANSWER for none) are put in classes when read, so that
        # counting one is a tuple and a dict update on the request path.
        self.upstream_statuses: dict[tuple[str, int], int] = {}   # (upstream, status)

    def request_started(self) -> None:
        self.in_flight += 1

    def request_finished(
        self, route: str, status: int, outcome: str, total_s: float, ttfb_s: float | None = None,
        hub_added_s: float | None = None, answered_by: str | None = None,
    ) -> None:
        """One request left the hub; pairs with ``request_started``.
        `hub_added_s`: the hub's own share of its time (observe_hub_added);
        `answered_by`: the upstream whose answer, with `status`, went to the
        client (upstream_answered). Both ride on this one call because it is
        made for every request."""
        self.in_flight -= 1
        self.requests_total += 1
        key = (route, status, outcome)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.total.observe(total_s)
        if ttfb_s is not None:
            self.ttfb.observe(ttfb_s)
        if hub_added_s is not None:
            self.hub_added.observe(hub_added_s)
        if answered_by is not None:
            answer = (answered_by, status)
            statuses = self.upstream_statuses
            statuses[answer] = statuses.get(answer, 0) + 1

    def observe_hub_added(self, seconds: float) -> None:
        self.hub_added.observe(seconds)

    def observe_queue_wait(self, seconds: float) -> None:
        """A request waited this long for a vendor key to come back from a rest."""
        self.queue_wait.observe(seconds)

    def on_usage(self, event: UsageEvent) -> None:
        """A usage recorder listener: add an event's cost and tokens to its
        (user, project, model) counters.

        An event with neither cost nor tokens adds nothing and makes no series:
        the model of a refused request is whatever its body said. Past
        ``max_series`` label sets, a new one is counted under OTHER, so the
        exposition stays bounded and the sums stay whole.
        """
        cost = event.cost_micros or 0
        if not (cost or event.input_tokens or event.output_tokens or event.cache_read
                or event.cache_write_5m or event.cache_write_1h):
            return
        usage = self.usage
        key = (event.user or "", event.project or "", event.model or "")
        row = usage.get(key)
        if row is None:
            if len(usage) >= self.max_series and key != OTHER_SERIES:
                self.usage_folded += 1
                key = OTHER_SERIES
                row = usage.get(key)
            if row is None:
                row = usage[key] = [0] * (1 + len(TOKEN_CLASSES))
        row[0] += cost
        row[1] += event.input_tokens
        row[2] += event.output_tokens
        row[3] += event.cache_read
        row[4] += event.cache_write_5m
        row[5] += event.cache_write_1h

    def upstream_attempt(self, upstream: str, *, retry: bool = False) -> None:
        self.upstream_attempts[upstream] = self.upstream_attempts.get(upstream, 0) + 1
        if retry:
            self.upstream_retries[upstream] = self.upstream_retries.get(upstream, 0) + 1

    def upstream_answered(self, upstream: str, status: int) -> None:
        """An attempt on `upstream` got a response head with `status`. Each
        attempt is either answered or unanswered, once."""
        key = (upstream, status)
        statuses = self.upstream_statuses
        statuses[key] = statuses.get(key, 0) + 1
