# cython: language_level=3
"""The metrics' per-request recording, compiled: the twin of `_tally_py.py`
(see there for the contract; tests/ops/test_tally.py holds both to it).

The same methods in the same order, on typed fields: the counters are C
integers and the histograms cdef classes whose bounds are also kept as a C
array, so that request_finished's three observations are a binary search
over doubles and three C increments, with no Python call between them."""

cimport cython
from libc.math cimport isinf
from libc.stdlib cimport free, malloc

from hubcore.accounting._rows cimport (
    F_CACHE_READ, F_CACHE_WRITE_1H, F_CACHE_WRITE_5M, F_COST_MICROS, F_INPUT_TOKENS, F_MODEL, F_OUTPUT_TOKENS,
    F_PROJECT, F_USER, event_field,
)

# Label sets of the per-user, project and model counters: see the twin.
DEFAULT_MAX_SERIES = 2000
OTHER_SERIES = ("_other", "_other", "_other")
TOKEN_CLASSES = ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h")
cdef tuple _OTHER_SERIES = OTHER_SERIES
cdef Py_ssize_t _ROW = 1 + len(TOKEN_CLASSES)
cdef double _INF = float("inf")


@cython.auto_pickle(False)
cdef class Histogram:
    """See _tally_py.Histogram. `buckets` is read-only here: the bounds
    are also held in a C array for observe."""

    cdef readonly tuple buckets
    cdef public list counts
    cdef public long long count
    cdef public double sum
    cdef double *_bounds
    cdef Py_ssize_t _n

    def __init__(self, buckets):
        bounds = tuple(float(b) for b in buckets)
        if not bounds or any(b >= c for b, c in zip(bounds, bounds[1:])):
            raise ValueError("histogram buckets must be non-empty and strictly increasing")
        if isinf(bounds[-1]):
            bounds = bounds[:-1]          # +Inf is implicit: the last slot of counts
        cdef Py_ssize_t n = len(bounds), i
        cdef double *array = <double *>malloc((n if n else 1) * sizeof(double))
        if array == NULL:
            raise MemoryError()
        for i in range(n):
            array[i] = bounds[i]
        free(self._bounds)
        self._bounds = array
        self._n = n
        self.buckets = bounds
        self.counts = [0] * (n + 1)
        self.count = 0
        self.sum = 0.0

    def __dealloc__(self):
        free(self._bounds)

    cpdef observe(self, double value):
        # bisect_left over the C array: a value equal to a bound goes into
        # that bound's bucket (Prometheus's `le`), NaN into the first, as
        # with the twin's bisect_left over the tuple.
        cdef Py_ssize_t lo = 0, hi = self._n, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if self._bounds[mid] < value:
                lo = mid + 1
            else:
                hi = mid
        counts = self.counts
        counts[lo] += 1
        self.count += 1
        self.sum += value

    def cumulative(self):
        """See the twin."""
        out = []
        running = 0
        for bound, n in zip((*self.buckets, _INF), self.counts):
            running += n
            out.append((bound, running))
        return out

    def quantile(self, double q):
        """See the twin."""
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
                    return _INF
                upper = self.buckets[i]
                return lower + (upper - lower) * ((rank - running) / n)
            running += n
            if i < len(self.buckets):
                lower = self.buckets[i]
        raise AssertionError("unreachable: rank <= count")

    def summary(self):
        """See the twin."""
        out = {"count": self.count, "sum": self.sum}
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            value = self.quantile(q)
            out[name] = None if value is None or isinf(value) else value
        out["last_bound"] = self.buckets[-1]
        out["above_last_bound"] = self.counts[-1]
        return out


cdef class TallyCore:
    """See _tally_py.TallyCore."""

    cdef public long long in_flight
    cdef public long long requests_total
    cdef public dict requests
    cdef public Histogram ttfb
    cdef public Histogram total
    cdef public Histogram hub_added
    cdef public Histogram queue_wait
    cdef public dict usage
    cdef public Py_ssize_t max_series
    cdef public long long usage_folded
    cdef public dict upstream_attempts
    cdef public dict upstream_retries
    cdef public dict upstream_statuses

    def __init__(self, ttfb_buckets, total_buckets, hub_added_buckets, queue_wait_buckets, Py_ssize_t max_series):
        self.in_flight = 0
        self.requests_total = 0
        self.requests = {}
        self.ttfb = Histogram(ttfb_buckets)
        self.total = Histogram(total_buckets)
        self.hub_added = Histogram(hub_added_buckets)
        self.queue_wait = Histogram(queue_wait_buckets)
        self.usage = {}
        self.max_series = max_series
        self.usage_folded = 0
        self.upstream_attempts = {}
        self.upstream_retries = {}
        self.upstream_statuses = {}

    cpdef request_started(self):
        self.in_flight += 1

    cpdef request_finished(
        self, route, status, outcome, double total_s, ttfb_s=None, hub_added_s=None, answered_by=None,
    ):
        """See the twin."""
        self.in_flight -= 1
        self.requests_total += 1
        key = (route, status, outcome)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        # C calls on the typed histograms.
        self.total.observe(total_s)
        if ttfb_s is not None:
            self.ttfb.observe(ttfb_s)
        if hub_added_s is not None:
            self.hub_added.observe(hub_added_s)
        if answered_by is not None:
            answer = (answered_by, status)
            statuses = self.upstream_statuses
            statuses[answer] = statuses.get(answer, 0) + 1

    cpdef observe_hub_added(self, double seconds):
        self.hub_added.observe(seconds)

    cpdef observe_queue_wait(self, double seconds):
        """See the twin."""
        self.queue_wait.observe(seconds)

    cpdef on_usage(self, event):
        """See the twin."""
        cost = event_field(event, F_COST_MICROS) or 0
        input_tokens = event_field(event, F_INPUT_TOKENS)
        output_tokens = event_field(event, F_OUTPUT_TOKENS)
        cache_read = event_field(event, F_CACHE_READ)
        cache_write_5m = event_field(event, F_CACHE_WRITE_5M)
        cache_write_1h = event_field(event, F_CACHE_WRITE_1H)
        if not (cost or input_tokens or output_tokens or cache_read or cache_write_5m or cache_write_1h):
            return
        usage = self.usage
        key = (
            event_field(event, F_USER) or "", event_field(event, F_PROJECT) or "", event_field(event, F_MODEL) or "",
        )
        row = usage.get(key)
        if row is None:
            if len(usage) >= self.max_series and key != _OTHER_SERIES:
                self.usage_folded += 1
                key = _OTHER_SERIES
                row = usage.get(key)
            if row is None:
                row = usage[key] = [0] * _ROW
        row[0] += cost
        row[1] += input_tokens
        row[2] += output_tokens
        row[3] += cache_read
        row[4] += cache_write_5m
        row[5] += cache_write_1h

    def upstream_attempt(self, upstream, *, bint retry=False):
        attempts = self.upstream_attempts
        attempts[upstream] = attempts.get(upstream, 0) + 1
        if retry:
            retries = self.upstream_retries
            retries[upstream] = retries.get(upstream, 0) + 1

    cpdef upstream_answered(self, upstream, status):
        """See the twin."""
        key = (upstream, status)
        statuses = self.upstream_statuses
        statuses[key] = statuses.get(key, 0) + 1
