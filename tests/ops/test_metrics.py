"""HubMetrics and Histogram: bucket rules, quantile estimates, /stats and Prometheus output."""
from __future__ import annotations

import asyncio
import math
import time

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from hubcore.accounting.usage import UsageEvent
from hubcore.ops.metrics import KEY_STATES, RATE_WINDOW, Histogram, HubMetrics

WEIRD_LABEL = 'team "a"\\prod\nline2'

KEYS = {
    "anthropic": [
        {"label": "a", "state": "healthy", "until": None, "consecutive_failures": 0,
         "in_flight": 2, "requests": 40, "rate_limited": 1, "errors": 0, "last_error": None,
         "priority": 0, "weight": 3, "workspace": "ws-a", "org": "org-1",
         "secret": "sk-ant-must-not-leak"},
        # `until` is set again by the tests that read it: an import-time
        # value would have passed by the time a long suite reaches them.
        {"label": WEIRD_LABEL, "state": "cooling", "until": None,
         "consecutive_failures": 0, "in_flight": 0, "requests": 7, "rate_limited": 5,
         "errors": 0, "last_error": "429 rate_limit_error", "priority": 1, "weight": 1,
         "workspace": "ws-b", "org": "org-2"},
    ],
    "openai": [
        {"label": "o1", "state": "brand_new_state", "until": None, "consecutive_failures": 3,
         "in_flight": 0, "requests": 3, "rate_limited": 0, "errors": 3, "last_error": "boom",
         "priority": 0, "weight": 1, "workspace": None, "org": None},
    ],
}
WRITER = {"queue_depth": 4, "written": 120, "spooled": 2, "replayed": 1, "spool_pending": 1,
          "unpriced": 3, "last_error": "database is locked"}


def busy_metrics() -> HubMetrics:
    m = HubMetrics()
    for _ in range(3):
        m.connection_opened()
    m.connection_closed()
    for route, status, outcome, total, ttfb in (
        ("/v1/messages", 200, "ok", 2.0, 0.4),
        ("/v1/messages", 200, "ok", 12.0, 0.9),
        ("/v1/messages", 429, "refused", 0.001, None),
        ("/v1/responses", 502, "upstream_error", 0.3, None),
    ):
        m.request_started()
        m.request_finished(route, status, outcome, total, ttfb)
    m.request_started()                     # one still in flight
    m.observe_hub_added(0.0003)
    m.observe_hub_added(0.0004)
    m.upstream_attempt("anthropic")
    m.upstream_attempt("anthropic", retry=True)
    m.upstream_attempt("openai")
    m.refuse("rate_limit")
    m.refuse("rate_limit")
    m.refuse("budget")
    m.sample_lag(0.002)
    m.sample_lag(0.0005)
    return m


# -- Histogram -------------------------------------------------------------------------

def test_value_on_a_bound_counts_in_that_bucket() -> None:
    h = Histogram((1.0, 2.0, 4.0))
    for v in (0.0, 1.0, 1.0000001, 2.0, 4.0, 4.5, 100.0):
        h.observe(v)
    assert h.counts == [2, 2, 1, 2]
    assert h.cumulative() == [(1.0, 2), (2.0, 4), (4.0, 5), (math.inf, 7)]
    assert h.count == 7
    assert h.sum == pytest.approx(112.5000001)


def test_quantiles_interpolate_inside_the_bucket() -> None:
    h = Histogram((1.0, 2.0, 4.0))
    for v in [0.5] * 4 + [1.5] * 4 + [3.0] * 2:
        h.observe(v)
    assert h.quantile(0.5) == pytest.approx(1.25)    # rank 5: 1/4 into (1, 2]
    assert h.quantile(0.9) == pytest.approx(3.0)     # rank 9: 1/2 into (2, 4]
    assert h.quantile(0.99) == pytest.approx(3.9)
    assert h.quantile(0.2) == pytest.approx(0.5)     # rank 2: half of [0, 1]
    summary = h.summary()
    assert summary["count"] == 10 and summary["p50"] == pytest.approx(1.25)


def test_quantile_edges() -> None:
    h = Histogram((0.1, 1.0, math.inf))
    assert h.buckets == (0.1, 1.0)              # +Inf given explicitly is the implicit one
    assert h.quantile(0.5) is None
    h.observe(50.0)
    assert h.quantile(0.99) == math.inf         # in +Inf: beyond the last bound, not the bound
    summary = h.summary()
    assert summary["p99"] is None and summary["last_bound"] == 1.0 and summary["above_last_bound"] == 1
    with pytest.raises(ValueError):
        h.quantile(1.5)
    with pytest.raises(ValueError):
        Histogram((1.0, 1.0))
    with pytest.raises(ValueError):
        Histogram(())


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(min_value=0.0, max_value=20.0), min_size=1, max_size=60),
    q=st.floats(min_value=0.01, max_value=1.0),
)
def test_quantile_estimate_lies_in_the_true_quantiles_bucket(values: list[float], q: float) -> None:
    bounds = (0.5, 1.0, 2.5, 5.0, 10.0)
    h = Histogram(bounds)
    for v in values:
        h.observe(v)
    true = sorted(values)[math.ceil(q * len(values)) - 1]
    estimate = h.quantile(q)
    assert estimate is not None
    if true > bounds[-1]:
        assert estimate == math.inf
    else:
        i = next(i for i, b in enumerate(bounds) if true <= b)
        lower = bounds[i - 1] if i else 0.0
        assert lower - 1e-9 <= estimate <= bounds[i] + 1e-9


# -- HubMetrics recording -------------------------------------------------------------------

def test_gauges_and_counters_follow_the_calls() -> None:
    m = busy_metrics()
    assert m.connections_open == 2 and m.connections_total == 3
    assert m.in_flight == 1
    assert m.requests_total == 4
    assert m.requests[("/v1/messages", 200, "ok")] == 2
    assert m.ttfb.count == 2 and m.total.count == 4 and m.hub_added.count == 2
    assert m.upstream_attempts == {"anthropic": 2, "openai": 1}
    assert m.upstream_retries == {"anthropic": 1}
    assert m.refused == {"rate_limit": 2, "budget": 1}
    assert m.loop_lag == 0.0005 and m.loop_lag_max == 0.002


def test_request_rate_covers_the_last_minute() -> None:
    now = [1000.0]
    m = HubMetrics(clock=lambda: now[0])
    # 10 requests per second for 3 minutes, then 1 per second for 2 minutes;
    # one sample per 0.5 s as the lag sampler would take.
    for per_step, steps in ((lambda i: 5), 360), ((lambda i: i % 2), 240):
        for i in range(steps):
            now[0] += 0.5
            for _ in range(per_step(i)):
                m.request_started()
                m.request_finished("/v1/messages", 200, "ok", 0.1)
            m.sample_lag(0.0)
    assert m.request_rate() == pytest.approx(1.0, rel=0.05)
    oldest = m._rate_samples[0][0]
    assert now[0] - oldest >= RATE_WINDOW
    assert now[0] - m._rate_samples[1][0] < RATE_WINDOW
    assert m.uptime == pytest.approx(300.0)


def test_request_rate_over_a_shorter_window_sees_a_burst_the_minute_smooths() -> None:
    now = [1000.0]
    m = HubMetrics(clock=lambda: now[0])
    # 1 request per second for a minute and a half, then 20 per second for 5 s.
    for per_step, steps in ((lambda i: i % 2), 180), ((lambda i: 10), 10):
        for i in range(steps):
            now[0] += 0.5
            for _ in range(per_step(i)):
                m.request_started()
                m.request_finished("/v1/messages", 200, "ok", 0.1)
            m.sample_lag(0.0)
    # The last 10 s: 5 s at 1/s and 5 s at 20/s.
    assert m.request_rate(10.0) == pytest.approx(10.5, rel=0.06)
    assert m.request_rate(60.0) == m.request_rate() == pytest.approx((55 + 100) / 60, rel=0.05)
    # Younger than the window: since the start.
    fresh = HubMetrics(clock=lambda: now[0])
    fresh.sample_lag(0.0)
    now[0] += 2.0
    fresh.request_started()
    fresh.request_finished("/v1/messages", 200, "ok", 0.1)
    assert fresh.request_rate(10.0) == pytest.approx(0.5)


async def test_loop_lag_sampler_sees_a_blocked_loop() -> None:
    m = HubMetrics(lag_interval=0.05)
    m.start()
    await asyncio.sleep(0)                   # let the sampler take its first timestamp
    time.sleep(0.3)                          # hold the loop, as a blocking callback would
    async with asyncio.timeout(5):
        while m.loop_lag_max < 0.2:
            await asyncio.sleep(0.01)
    task = m._lag_task
    await m.stop()
    assert task is not None and task.done()
    assert m._lag_task is None
    await m.stop()                           # idempotent


# -- /stats snapshot ------------------------------------------------------------------------

def test_snapshot_is_json_ready_and_drops_unknown_key_fields() -> None:
    m = busy_metrics()
    snap = m.snapshot(KEYS, WRITER, tokens_loaded=12, version="9.9.9")
    decoded = orjson.loads(orjson.dumps(snap))          # plain, string-keyed values only
    assert decoded["version"] == "9.9.9"
    assert decoded["tokens_loaded"] == 12
    assert decoded["connections"] == {"open": 2, "total": 3}
    assert decoded["in_flight"] == 1
    assert decoded["requests"]["total"] == 4
    assert decoded["requests"]["by_status"] == {"200": 2, "429": 1, "502": 1}
    assert decoded["requests"]["by_outcome"] == {"ok": 2, "refused": 1, "upstream_error": 1}
    assert {"route": "/v1/messages", "status": 200, "outcome": "ok", "count": 2} in \
        decoded["requests"]["by_route"]
    assert decoded["latency_s"]["total"]["count"] == 4
    assert decoded["latency_s"]["hub_added"]["p50"] == pytest.approx(m.hub_added.quantile(0.5))
    assert decoded["upstream"] == {
        "anthropic": {"attempts": 2, "retries": 1, "requests": {}, "errors": {}, "failovers": {}},
        "openai": {"attempts": 1, "retries": 0, "requests": {}, "errors": {}, "failovers": {}},
    }
    assert decoded["refused"] == {"budget": 1, "rate_limit": 2}
    assert decoded["writer"] == WRITER
    assert decoded["loop_lag_s"] == {"last": 0.0005, "max": 0.002}
    assert [k["label"] for k in decoded["keys"]["anthropic"]] == ["a", WEIRD_LABEL]
    assert "sk-ant-must-not-leak" not in orjson.dumps(snap).decode()
    assert decoded["keys"]["anthropic"][0]["workspace"] == "ws-a"


# -- Prometheus text ------------------------------------------------------------------------

def parse(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(families: dict[str, object], family: str, sample: str | None = None) -> list[tuple[dict[str, str], float]]:
    fam = families[family]
    name = sample or family
    return [(s.labels, s.value) for s in fam.samples if s.name == name]  # type: ignore[attr-defined]


def test_prometheus_text_parses_and_matches_the_instruments() -> None:
    m = busy_metrics()
    text = m.render_prometheus(KEYS, WRITER, tokens_loaded=12, version='1.2.3"x')
    families = parse(text)
    for fam in families.values():
        assert fam.documentation, f"{fam.name} has no HELP"          # type: ignore[attr-defined]
        assert fam.name.startswith("hubcore_")                       # type: ignore[attr-defined]

    assert samples(families, "hubcore_build_info") == [({"version": '1.2.3"x'}, 1.0)]
    assert samples(families, "hubcore_connections_open") == [({}, 2.0)]
    assert families["hubcore_connections"].type == "counter"          # type: ignore[attr-defined]
    assert samples(families, "hubcore_connections", "hubcore_connections_total") == [({}, 3.0)]
    assert samples(families, "hubcore_in_flight_requests") == [({}, 1.0)]
    requests = {(lb["route"], lb["status"], lb["outcome"]): v
                for lb, v in samples(families, "hubcore_requests", "hubcore_requests_total")}
    assert requests == {("/v1/messages", "200", "ok"): 2.0, ("/v1/messages", "429", "refused"): 1.0,
                        ("/v1/responses", "502", "upstream_error"): 1.0}
    refused = {lb["reason"]: v for lb, v in samples(families, "hubcore_refused", "hubcore_refused_total")}
    assert refused == {"rate_limit": 2.0, "budget": 1.0}
    retries = samples(families, "hubcore_upstream_retries", "hubcore_upstream_retries_total")
    assert retries == [({"upstream": "anthropic"}, 1.0)]
    assert samples(families, "hubcore_event_loop_lag_max_seconds") == [({}, 0.002)]
    assert samples(families, "hubcore_tokens_loaded") == [({}, 12.0)]
    assert samples(families, "hubcore_usage_queue_depth") == [({}, 4.0)]
    assert samples(families, "hubcore_usage_written", "hubcore_usage_written_total") == [({}, 120.0)]
    assert samples(families, "hubcore_usage_writer_failing") == [({}, 1.0)]


def test_prometheus_shows_the_garbage_collector() -> None:
    gc_stats = {"scheduled": True, "frozen_objects": 25000, "full_collections": 3, "collected": 10,
                "last_full_collection_ms": 12.5, "collections_by_generation": [400, 36, 4]}
    families = parse(HubMetrics().render_prometheus(gc=gc_stats))
    by_generation = {lb["generation"]: v for lb, v in samples(families, "hubcore_gc_collections", "hubcore_gc_collections_total")}
    assert by_generation == {"0": 400.0, "1": 36.0, "2": 4.0}
    assert samples(families, "hubcore_gc_frozen_objects") == [({}, 25000.0)]
    assert samples(families, "hubcore_gc_scheduled_full_collections",
                   "hubcore_gc_scheduled_full_collections_total") == [({}, 3.0)]
    assert samples(families, "hubcore_gc_last_full_collection_seconds") == [({}, 0.0125)]
    # Left to CPython: its own counts only.
    plain = parse(HubMetrics().render_prometheus(gc={**gc_stats, "scheduled": False}))
    assert "hubcore_gc_collections" in plain and "hubcore_gc_frozen_objects" not in plain


@pytest.mark.parametrize("family, attr", [
    ("hubcore_ttfb_seconds", "ttfb"),
    ("hubcore_request_duration_seconds", "total"),
    ("hubcore_hub_added_seconds", "hub_added"),
    ("hubcore_queue_wait_seconds", "queue_wait"),
])
def test_prometheus_histograms_are_cumulative_with_inf(family: str, attr: str) -> None:
    m = busy_metrics()
    families = parse(m.render_prometheus())
    assert families[family].type == "histogram"                      # type: ignore[attr-defined]
    hist: Histogram = getattr(m, attr)
    buckets = [(float(lb["le"]), v) for lb, v in samples(families, family, family + "_bucket")]
    assert buckets == [(b, float(n)) for b, n in hist.cumulative()]
    assert buckets[-1][0] == math.inf
    assert samples(families, family, family + "_count") == [({}, float(hist.count))]
    assert samples(families, family, family + "_sum")[0][1] == pytest.approx(hist.sum)


def test_prometheus_key_series_one_hot_state_and_escaped_labels() -> None:
    m = busy_metrics()
    KEYS["anthropic"][1]["until"] = time.time() + 30.0
    text = m.render_prometheus(KEYS, WRITER, tokens_loaded=0, version="x")
    assert "sk-ant-must-not-leak" not in text
    assert 'key="team \\"a\\"\\\\prod\\nline2"' in text          # escaped on the wire
    families = parse(text)
    state = samples(families, "hubcore_key_state")
    per_key: dict[tuple[str, str], dict[str, float]] = {}
    for labels, value in state:
        per_key.setdefault((labels["upstream"], labels["key"]), {})[labels["state"]] = value
    assert set(per_key) == {("anthropic", "a"), ("anthropic", WEIRD_LABEL), ("openai", "o1")}
    for (_, key), states in per_key.items():
        assert sum(states.values()) == 1.0, key
        assert set(KEY_STATES) <= set(states)
    assert per_key[("anthropic", "a")]["healthy"] == 1.0
    assert per_key[("anthropic", WEIRD_LABEL)]["cooling"] == 1.0
    assert per_key[("openai", "o1")]["brand_new_state"] == 1.0     # unknown states still show

    limited = {lb["key"]: v for lb, v in
               samples(families, "hubcore_key_rate_limited", "hubcore_key_rate_limited_total")}
    assert limited == {"a": 1.0, WEIRD_LABEL: 5.0, "o1": 0.0}
    failures = {lb["key"]: v for lb, v in samples(families, "hubcore_key_consecutive_failures")}
    assert failures["o1"] == 3.0
    unavailable = {lb["key"]: v for lb, v in samples(families, "hubcore_key_unavailable_seconds")}
    assert unavailable["a"] == 0.0 and 0.0 < unavailable[WEIRD_LABEL] <= 30.0
    info = {lb["key"]: lb for lb, _ in samples(families, "hubcore_key_info")}
    assert info["a"]["workspace"] == "ws-a" and info["a"]["org"] == "org-1"
    assert info["o1"]["workspace"] == ""


def test_prometheus_empty_hub_still_parses() -> None:
    families = parse(HubMetrics().render_prometheus())
    assert samples(families, "hubcore_requests", "hubcore_requests_total") == []
    assert samples(families, "hubcore_usage_writer_failing") == [({}, 0.0)]
    assert samples(families, "hubcore_ttfb_seconds", "hubcore_ttfb_seconds_count") == [({}, 0.0)]


# -- spend and tokens per user, project and model ---------------------------------------------

def usage(user: str | None, project: str | None, model: str | None, cost: int | None, **tokens: int) -> UsageEvent:
    return UsageEvent(ts=1.0, request_id="hc_1", endpoint="/v1/messages", status=200, outcome="ok",
                      total_ms=1.0, user=user, project=project, model=model, cost_micros=cost, **tokens)


def test_usage_counters_add_up_and_skip_events_that_used_nothing() -> None:
    m = HubMetrics()
    m.on_usage(usage(WEIRD_LABEL, None, "claude-sonnet-4-6", 1_500_000, input_tokens=10, cache_read=7))
    m.on_usage(usage(WEIRD_LABEL, None, "claude-sonnet-4-6", 250_000, output_tokens=3))
    m.on_usage(usage("bob", "p", "unknown-model", None, input_tokens=5))   # unpriced: tokens only
    m.on_usage(usage("bob", "p", "whatever-the-body-said", 0))            # refused: no series
    families = parse(m.render_prometheus())
    cost = {(lb["user"], lb["project"], lb["model"]): v
            for lb, v in samples(families, "hubcore_usage_cost_usd", "hubcore_usage_cost_usd_total")}
    assert cost == {(WEIRD_LABEL, "", "claude-sonnet-4-6"): 1.75, ("bob", "p", "unknown-model"): 0.0}
    tokens = {(lb["user"], lb["class"]): v
              for lb, v in samples(families, "hubcore_usage_tokens", "hubcore_usage_tokens_total")}
    assert tokens[(WEIRD_LABEL, "input")] == 10 and tokens[(WEIRD_LABEL, "output")] == 3
    assert tokens[(WEIRD_LABEL, "cache_read")] == 7 and tokens[("bob", "input")] == 5
    assert len(tokens) == 2 * 5


def test_a_cap_of_zero_counts_everything_under_other() -> None:
    m = HubMetrics(max_series=0)
    m.on_usage(usage("alice", "web", "claude-sonnet-4-6", 100, input_tokens=1))
    m.on_usage(usage("bob", None, "gpt-5", 200, output_tokens=2))
    assert m.usage == {("_other", "_other", "_other"): [300, 1, 2, 0, 0, 0]}
    assert m.usage_folded == 2


def test_key_headroom_per_class_reaches_stats_and_metrics() -> None:
    resets = time.time() + 60.0
    keys = {
        "anthropic": [
            {"label": "a", "state": "healthy", "until": None,
             "headroom": {"sonnet": {"remaining": 0.62, "limit": "tokens", "resets": resets},
                          "opus": {"remaining": 0.0, "limit": "requests", "resets": resets}},
             "rests": {"opus": resets}},
            {"label": WEIRD_LABEL, "state": "healthy", "until": None, "headroom": {}, "rests": {}},
        ],
    }
    stats = HubMetrics().snapshot(keys)
    assert stats["keys"]["anthropic"][0]["headroom"] == keys["anthropic"][0]["headroom"]
    assert stats["keys"]["anthropic"][0]["rests"] == {"opus": resets}
    families = parse(HubMetrics().render_prometheus(keys))
    assert families["hubcore_key_headroom_ratio"].type == "gauge"  # type: ignore[attr-defined]
    assert sorted((lb["upstream"], lb["key"], lb["class"], v) for lb, v in
                  samples(families, "hubcore_key_headroom_ratio")) == [
        ("anthropic", "a", "opus", 0.0), ("anthropic", "a", "sonnet", 0.62),
    ]
