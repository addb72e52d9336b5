"""The metrics' per-request recording, both twins (hubcore.ops._tally,
compiled, and _tally_py): the same sequences of requests, attempts, answers
and usage events give the same counters and histograms, and HubMetrics built
on either gives the same /stats and Prometheus text. tests/ops/test_metrics.py
holds the behaviour on whichever twin the run selects.

Each twin gets a HubMetrics of its own: hubcore.ops.metrics loaded again with
hubcore.ops.tally standing for that twin."""
from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hubcore.accounting.usage import UsageEvent
from hubcore.ops import _tally_py, tally
from tests.http.twins import (
    NO_EXTENSIONS, both, check_compiled_loaded, check_no_extensions_selects_pure, module_on_twin, twin_of,
)

COMPILED = "hubcore.ops._tally"


def metrics_of(twin: ModuleType) -> ModuleType:
    """hubcore.ops.metrics built on `twin`."""
    return module_on_twin("hubcore.ops.metrics", "hubcore.ops.tally", twin, ["Histogram", "TallyCore"])


@pytest.fixture(params=["c", "py"])
def twin(request: pytest.FixtureRequest) -> ModuleType:
    return twin_of(request.param, COMPILED, _tally_py)


def test_compiled_twin_loaded() -> None:
    check_compiled_loaded(tally, [tally.Histogram, tally.TallyCore], COMPILED, "hubcore.ops._tally_py")


def test_no_extensions_selects_pure_twin() -> None:
    check_no_extensions_selects_pure("hubcore.ops.tally", "TallyCore", "hubcore.ops._tally_py")


def test_hub_metrics_runs_on_the_twin(twin: ModuleType) -> None:
    m = metrics_of(twin).HubMetrics(clock=lambda: 0.0)
    assert isinstance(m, twin.TallyCore) and isinstance(m.total, twin.Histogram)
    m.request_started()
    m.request_finished("/v1/messages", 200, "ok", 0.5, 0.1, 30e-6, "anthropic")
    assert (m.in_flight, m.requests_total, m.total.count, m.ttfb.count, m.hub_added.count) == (0, 1, 1, 1, 1)
    assert m.upstream_statuses == {("anthropic", 200): 1}
    m.connection_opened()  # HubMetrics' own attributes sit beside the core's
    assert m.connections_open == 1


def test_histogram_edges_on_the_twin(twin: ModuleType) -> None:
    h = twin.Histogram((1.0, 2.0, math.inf))
    assert h.buckets == (1.0, 2.0)
    for v in (1.0, 2.0, 2.5, math.nan, -1.0, 0):
        h.observe(v)
    assert h.counts == [4, 1, 1] and h.count == 6
    assert math.isnan(h.sum)
    with pytest.raises(ValueError):
        twin.Histogram((1.0, 1.0))
    with pytest.raises(ValueError):
        twin.Histogram(())
    with pytest.raises(ValueError):
        h.quantile(1.5)


ROUTES = ("/v1/messages", "/v1/messages/count_tokens", "other")
UPSTREAMS = ("anthropic", "relay")
PEOPLE = (None, "", "ann", "bob", "_other")
latency = st.one_of(st.none(), st.floats(0.0, 5000.0), st.sampled_from([50e-6, 1.0, 600.0, 3600.0, 7200.0]))
operations = st.lists(
    st.one_of(
        st.tuples(st.just("finished"), st.sampled_from(ROUTES), st.sampled_from([200, 400, 429, 500, 529]),
                  st.sampled_from(["ok", "refused", "upstream_error"]), st.floats(0.0, 5000.0),
                  latency, latency, st.one_of(st.none(), st.sampled_from(UPSTREAMS))),
        st.tuples(st.just("attempt"), st.sampled_from(UPSTREAMS), st.booleans()),
        st.tuples(st.just("answered"), st.sampled_from(UPSTREAMS), st.sampled_from([0, 200, 503])),
        st.tuples(st.just("queue_wait"), st.floats(0.0, 900.0)),
        st.tuples(st.just("hub_added"), st.floats(0.0, 1.0)),
        st.tuples(st.just("usage"), st.sampled_from(PEOPLE), st.sampled_from(PEOPLE),
                  st.sampled_from(("claude-opus-4", None)), st.one_of(st.none(), st.integers(0, 10**12)),
                  st.lists(st.integers(0, 10**6), min_size=5, max_size=5)),
    ),
    max_size=60,
)


def apply(m: Any, op: tuple[Any, ...]) -> None:
    name, *args = op
    if name == "finished":
        m.request_started()
        m.request_finished(*args)
    elif name == "attempt":
        m.upstream_attempt(args[0], retry=args[1])
    elif name == "answered":
        m.upstream_answered(*args)
    elif name == "queue_wait":
        m.observe_queue_wait(args[0])
    elif name == "hub_added":
        m.observe_hub_added(args[0])
    else:
        user, project, model, cost, tokens = args
        m.on_usage(UsageEvent(
            ts=0.0, request_id="r", endpoint="/v1/messages", status=200, outcome="ok", total_ms=1.0,
            user=user, project=project, model=model,
            input_tokens=tokens[0], output_tokens=tokens[1], cache_write_5m=tokens[2], cache_write_1h=tokens[3],
            cache_read=tokens[4], cost_micros=cost,
        ))


def state(m: Any) -> tuple[Any, ...]:
    histograms = [(h.buckets, h.counts, h.count, h.sum, h.cumulative(), h.summary())
                  for h in (m.ttfb, m.total, m.hub_added, m.queue_wait)]
    return (m.in_flight, m.requests_total, m.requests, m.usage, m.usage_folded, m.upstream_attempts,
            m.upstream_retries, m.upstream_statuses, histograms)


@pytest.mark.skipif(NO_EXTENSIONS, reason="HUBCORE_NO_EXTENSIONS is set: only the pure twin")
@settings(max_examples=150, deadline=None)
@given(ops=operations, max_series=st.integers(0, 4))
def test_both_twins_give_the_same_counters_stats_and_prometheus_text(
    ops: list[tuple[Any, ...]], max_series: int,
) -> None:
    results = []
    for twin in both(COMPILED, _tally_py):
        m = metrics_of(twin).HubMetrics(clock=lambda: 0.0, max_series=max_series)
        m.started_at = 0.0
        for op in ops:
            apply(m, op)
        stats = m.snapshot()
        stats.pop("uptime_s", None)
        stats.pop("started_at", None)
        results.append((state(m), stats, m.render_prometheus(version="x")))
    assert results[0] == results[1]
