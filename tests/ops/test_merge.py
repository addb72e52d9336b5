"""ops.merge: several workers' /stats, /metrics and command answers as one
hub's. The reference is one HubMetrics that saw every worker's traffic:
what adds up must come out as it would."""
from __future__ import annotations

import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from hubcore.accounting.usage import UsageEvent
from hubcore.ops import merge
from hubcore.ops.metrics import HubMetrics

ROUTES = (("/v1/messages", 200, "ok"), ("/v1/messages", 429, "refused"), ("/v1/responses", 502, "upstream_error"))
UPSTREAMS = ("anthropic", "openai")


def key_row(label: str, *, requests: int, in_flight: int, failures: int, state: str = "healthy",
            priority: int = 0, weight: int = 1) -> dict[str, Any]:
    return {"label": label, "state": state, "until": None, "consecutive_failures": failures,
            "in_flight": in_flight, "requests": requests, "rate_limited": 1, "errors": 0, "last_error": None,
            "priority": priority, "weight": weight, "workspace": "ws", "org": None,
            "headroom": {"sonnet": {"remaining": 0.5, "limit": "tokens", "resets": 100.0}}, "rests": {}}


def replay(metrics: list[HubMetrics], seed: int, n: int = 60) -> None:
    """The same random traffic into the workers (each request to one, as
    SO_REUSEPORT spreads them) and into the last metrics, which sees all."""
    rng = random.Random(seed)
    *workers, whole = metrics
    for i in range(n):
        worker = workers[rng.randrange(len(workers))]
        route, status, outcome = ROUTES[rng.randrange(len(ROUTES))]
        total = rng.choice((0.0002, 0.003, 0.04, 0.9, 7.0, 4000.0))
        ttfb = rng.choice((None, 0.0001, 0.02, 0.5))
        added = rng.choice((None, 0.00006, 0.0002))
        upstream = UPSTREAMS[rng.randrange(2)]
        event = UsageEvent(ts=0.0, request_id=f"r{i}", endpoint=route, status=status, outcome=outcome,
                           total_ms=total * 1000, token_id=1, user=rng.choice(("ann", "bob")), upstream=upstream,
                           model="claude-sonnet-4-6", input_tokens=rng.randrange(100),
                           output_tokens=rng.randrange(100), cost_micros=rng.randrange(1000))
        for m in (worker, whole):
            m.connection_opened()
            m.request_started()
            m.request_finished(route, status, outcome, total, ttfb, added, upstream)
            m.upstream_attempt(upstream, retry=i % 7 == 0)
            if status == 502:
                m.upstream_failed(upstream, "timeout")
            if status == 429:
                m.refuse("rate_limit")
            m.on_usage(event)
            if i % 5 == 0:
                m.connection_closed()


def render(m: HubMetrics, keys: dict[str, list[dict[str, Any]]]) -> str:
    return m.render_prometheus(keys, {"queue_depth": 1, "written": 5, "last_error": None}, 3, "0.1.0",
                               gc={"scheduled": True, "frozen_objects": 10, "full_collections": 1,
                                   "collections_by_generation": [5, 2, 1], "last_full_collection_ms": 4.0})


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32), workers=st.integers(2, 4))
def test_merged_metrics_sum_to_what_one_hub_that_saw_everything_counts(seed: int, workers: int) -> None:
    metrics = [HubMetrics() for _ in range(workers + 1)]
    replay(metrics, seed)
    keys = {"anthropic": [key_row("a1", requests=3, in_flight=1, failures=0)]}
    merged = merge.render_families(merge.merge_metrics([render(m, keys) for m in metrics[:-1]]).values())
    got, whole = samples(merged), samples(render(metrics[-1], keys))
    per_worker = {"hubcore_key_requests_total", "hubcore_key_in_flight_requests", "hubcore_key_rate_limited_total",
                  "hubcore_key_errors_total", "hubcore_usage_queue_depth", "hubcore_usage_written_total",
                  "hubcore_gc_frozen_objects", "hubcore_gc_scheduled_full_collections_total",
                  "hubcore_gc_collections_total"}
    not_summed = set(merge.METRIC_RULES) | {"hubcore_uptime_seconds"}
    assert set(got) == set(whole)
    for (name, labels), value in whole.items():
        if name in per_worker:
            # Each worker reported the same fixed numbers: the hub's are N times them.
            assert got[(name, labels)] == pytest.approx(value * workers), name
        elif name in not_summed or name.startswith("hubcore_event_loop"):
            continue
        else:
            assert got[(name, labels)] == pytest.approx(value), (name, labels)


def test_metrics_that_do_not_add_up_are_worker_0s_or_the_worst() -> None:
    one, two = HubMetrics(), HubMetrics()
    one.sample_lag(0.001)
    two.sample_lag(0.25)
    texts = [
        render(one, {"anthropic": [key_row("a1", requests=2, in_flight=0, failures=1, priority=1, weight=3)]}),
        render(two, {"anthropic": [key_row("a1", requests=5, in_flight=2, failures=4, priority=1, weight=3)]}),
    ]
    got = samples(merge.render_families(merge.merge_metrics(texts).values()))
    key = (("key", "a1"), ("upstream", "anthropic"))
    assert got[("hubcore_key_weight", key)] == 3 and got[("hubcore_key_priority", key)] == 1
    assert got[("hubcore_key_requests_total", key)] == 7 and got[("hubcore_key_in_flight_requests", key)] == 2
    assert got[("hubcore_key_consecutive_failures", key)] == 4
    assert got[("hubcore_key_state", (*key[:1], ("state", "healthy"), key[1]))] == 1
    assert got[("hubcore_tokens_loaded", ())] == 3
    assert got[("hubcore_build_info", (("version", "0.1.0"),))] == 1
    assert got[("hubcore_event_loop_lag_seconds", ())] == 0.25


def test_a_sample_only_one_worker_has_is_kept_and_families_keep_their_order() -> None:
    a = "# HELP x_total X.\n# TYPE x_total counter\nx_total{k=\"a\"} 1\n# HELP y Y.\n# TYPE y gauge\ny 2.5\n"
    b = "# HELP x_total X.\n# TYPE x_total counter\nx_total{k=\"b\"} 4\nx_total{k=\"a\"} 2\n# HELP z Z.\n# TYPE z gauge\nz 1\n"
    text = merge.render_families(merge.merge_metrics([a, b]).values())
    assert text == (
        "# HELP x_total X.\n# TYPE x_total counter\nx_total{k=\"a\"} 3\nx_total{k=\"b\"} 4\n"
        "# HELP y Y.\n# TYPE y gauge\ny 2.5\n# HELP z Z.\n# TYPE z gauge\nz 1\n"
    )


def test_label_values_with_spaces_quotes_and_newlines_survive() -> None:
    m = HubMetrics()
    m.refuse('weird "reason" with spaces\nand a line')
    text = m.render_prometheus()
    merged = merge.render_families(merge.merge_metrics([text, text]).values())
    (refused,) = [s for f in text_string_to_metric_families(merged) for s in f.samples
                  if s.name == "hubcore_refused_total"]
    assert refused.labels["reason"] == 'weird "reason" with spaces\nand a line' and refused.value == 2


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_latency_quantiles_come_from_the_merged_buckets(seed: int) -> None:
    metrics = [HubMetrics() for _ in range(3)]
    replay(metrics, seed)
    families = merge.merge_metrics([m.render_prometheus() for m in metrics[:2]])
    summaries = merge.latency_summaries(families)
    whole = metrics[2].snapshot()["latency_s"]
    assert set(summaries) == {"ttfb", "total", "hub_added", "queue_wait"}
    for name, summary in summaries.items():
        for field in ("count", "above_last_bound", "last_bound"):
            assert summary[field] == whole[name][field], (name, field)
        assert summary["sum"] == pytest.approx(whole[name]["sum"])
        for q in ("p50", "p90", "p99"):
            assert summary[q] == (pytest.approx(whole[name][q]) if whole[name][q] is not None else None), (name, q)


def test_merged_stats_sum_counters_and_keep_what_is_shared() -> None:
    metrics = [HubMetrics() for _ in range(3)]
    replay(metrics, seed=7)
    ring = [
        {"anthropic": [key_row("a1", requests=4, in_flight=1, failures=2, state="cooling"),
                       key_row("a2", requests=1, in_flight=0, failures=0)]},
        {"anthropic": [key_row("a1", requests=6, in_flight=0, failures=3, state="cooling"),
                       key_row("a2", requests=2, in_flight=1, failures=0)]},
    ]
    shared = [{"redis": "redis://h:1/0", "state": "shared", "degraded": False, "instances": 2, "instance_id": "aa",
               "errors": {"timeout": 1}, "queue_depth": 3, "degraded_seconds": 1.5, "last_error": None,
               "following_charges": True, "charges_heard": 4, "catch_ups": 1, "caught_up_micros": 100},
              {"redis": "redis://h:1/0", "state": "shared", "degraded": True, "instances": 2, "instance_id": "bb",
               "errors": {"timeout": 2, "connection": 1}, "queue_depth": 0, "degraded_seconds": 4.0,
               "last_error": "boom", "following_charges": False, "charges_heard": 5, "catch_ups": 2,
               "caught_up_micros": 50}]
    stats = []
    for i, m in enumerate(metrics[:2]):
        m.sample_lag(0.01 * (i + 1))
        snapshot = m.snapshot(ring[i], {"written": 10 * (i + 1), "last_error": None}, 5, "0.1.0", shared=shared[i])
        snapshot["draining"] = False
        snapshot["gc"] = {"scheduled": True, "full_collections": i, "collections_by_generation": [1, 2, 3 + i],
                          "last_full_collection_ms": 3.0 * (i + 1)}
        snapshot["alerts"] = {"sent": i + 1, "dropped": {}, "targets": [{"alert": "ops", "format": "slack",
                                                                         "events": ["budget"], "sent": i + 1}]}
        stats.append(snapshot)
    merged = merge.merge_stats(stats)
    whole = metrics[2].snapshot()

    assert merged["requests"]["total"] == whole["requests"]["total"] == 60
    assert merged["requests"]["by_status"] == whole["requests"]["by_status"]
    assert merged["requests"]["by_outcome"] == whole["requests"]["by_outcome"]
    assert sorted(merged["requests"]["by_route"], key=str) == sorted(whole["requests"]["by_route"], key=str)
    assert merged["connections"] == whole["connections"]
    assert merged["in_flight"] == whole["in_flight"]
    assert merged["upstream"] == whole["upstream"]
    assert merged["refused"] == whole["refused"]
    for name in ("ttfb", "total", "hub_added"):
        assert merged["latency_s"][name]["count"] == whole["latency_s"][name]["count"]
        # Without the buckets: an upper bound, the slower worker's.
        assert merged["latency_s"][name]["p50"] == max(s["latency_s"][name]["p50"] or 0 for s in stats) or None
    assert merged["pid"] == stats[0]["pid"] and merged["version"] == "0.1.0"
    assert merged["tokens_loaded"] == 5
    assert merged["loop_lag_s"]["last"] == 0.02
    assert merged["writer"] == {"written": 30, "last_error": None}
    a1, a2 = merged["keys"]["anthropic"]
    assert (a1["label"], a1["requests"], a1["in_flight"], a1["consecutive_failures"], a1["state"]) == \
        ("a1", 10, 1, 3, "cooling")
    assert (a1["priority"], a1["weight"], a1["headroom"]) == (0, 1, ring[0]["anthropic"][0]["headroom"])
    assert (a2["label"], a2["requests"], a2["in_flight"]) == ("a2", 3, 1)
    assert merged["shared"]["degraded"] is True and merged["shared"]["last_error"] == "boom"
    assert merged["shared"]["instances"] == 2 and merged["shared"]["errors"] == {"timeout": 3, "connection": 1}
    assert (merged["shared"]["instance_id"], merged["shared"]["queue_depth"]) == ("aa", 3)
    assert merged["shared"]["degraded_seconds"] == 4.0  # the hub's seconds degraded, not the workers' sum
    # One worker not hearing the others' charges: the hub does not hear them all.
    assert merged["shared"]["following_charges"] is False
    assert (merged["shared"]["charges_heard"], merged["shared"]["catch_ups"],
            merged["shared"]["caught_up_micros"]) == (9, 3, 150)
    assert merged["gc"] == {"scheduled": True, "full_collections": 1, "collections_by_generation": [2, 4, 7],
                            "last_full_collection_ms": 6.0}
    assert merged["alerts"]["sent"] == 3
    assert merged["alerts"]["targets"] == [{"alert": "ops", "format": "slack", "events": ["budget"], "sent": 3}]
    assert merged["draining"] is False


def test_a_value_only_some_workers_have_is_kept() -> None:
    assert merge.merge_stats([{"a": {"x": 1}}, {"a": {"y": 2}, "b": "s"}]) == {"a": {"x": 1, "y": 2}, "b": "s"}
    assert merge.merge_stats([{"writer": {"last_error": None}}, {"writer": {"last_error": "locked"}}]) == \
        {"writer": {"last_error": "locked"}}


# -- command answers ---------------------------------------------------------------------

def test_answers_all_ok_keep_worker_0s_body_and_say_each() -> None:
    status, reply = merge.merge_answers([
        (0, 200, {"label": "a1", "enabled": False, "states": {"anthropic": "disabled"}, "stored": True}),
        (1, 200, {"label": "a1", "enabled": False, "states": {"anthropic": "disabled"}, "stored": True}),
    ])
    assert status == 200
    assert reply["states"] == {"anthropic": "disabled"} and reply["stored"] is True
    assert [w["index"] for w in reply["workers"]] == [0, 1]


def test_answers_take_the_oldest_generation_and_every_warning() -> None:
    status, reply = merge.merge_answers([(0, 200, {"generation": 9}), (1, 200, {"generation": 7}),
                                         (2, 200, {"generation": 9})])
    assert (status, reply["generation"]) == (200, 7)
    _, reply = merge.merge_answers([
        (0, 200, {"label": "a", "states": {}, "stored": False, "warning": "not stored (locked)"}),
        (1, 200, {"label": "a", "states": {}, "stored": True}),
    ])
    assert reply["stored"] is False and reply["warning"] == "not stored (locked)"


def test_reload_answers_differing_are_told_per_worker() -> None:
    status, reply = merge.merge_answers([(0, 200, {"ok": True, "message": "reloaded"}),
                                         (1, 200, {"ok": True, "message": "reloaded; upstream x: new"})])
    assert status == 200 and reply["ok"] is True
    assert reply["message"] == "worker 0: reloaded; worker 1: reloaded; upstream x: new"


def test_one_failure_fails_the_whole_and_names_the_worker() -> None:
    status, reply = merge.merge_answers([(0, 200, {"ok": True, "message": "reloaded"}),
                                         (1, 500, {"ok": False, "error": "line 3: bad"})])
    assert status == 500
    assert reply["ok"] is False and reply["error"] == "worker 1: line 3: bad"


def test_the_same_refusal_from_every_worker_is_said_once() -> None:
    status, reply = merge.merge_answers([(0, 404, {"error": "no key labelled 'x'"}),
                                         (1, 404, {"error": "no key labelled 'x'"})])
    assert status == 404 and reply["error"] == "no key labelled 'x'"


# -- formatting --------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "text"), [
    (3.0, "3"), (0.25, "0.25"), (math.inf, "+Inf"), (-math.inf, "-Inf"), (1e-05, "1e-05"), (2.0**60, repr(2.0**60)),
])
def test_values_print_as_prometheus_reads_them(value: float, text: str) -> None:
    assert merge.format_value(value) == text


def test_nan_prints_as_nan() -> None:
    assert merge.format_value(math.nan) == "NaN"


def test_hubcore_stats_names_each_worker() -> None:
    from hubcore.ops.client import format_stats

    text = format_stats({"workers": [{"index": 0, "pid": 11, "up": True, "restarts": 0},
                                     {"index": 1, "pid": 12, "up": False, "restarts": 2}]})
    assert "workers     0 pid 11 up, 1 pid 12 DOWN (2 restarts)" in text


# -- the dashboard's live view --------------------------------------------------------

def live_view(*, now: float, in_flight: int, ages: list[float], hidden: int, draining: bool = False,
              lag: float = 0.001, busy: int = 1, state: str = "healthy") -> dict[str, Any]:
    """One worker's App.live(), with `ages` the requests it lists."""
    return {
        "now": now, "uptime_s": 100.0 + now, "draining": draining, "connections_open": in_flight + 1,
        "in_flight": in_flight, "streams": in_flight, "requests_total": 10 * in_flight,
        "rate_10s": 1.5, "rate_60s": 0.5, "loop_lag_s": lag,
        "requests": [{"id": f"r{now}-{age}", "age_s": age} for age in ages], "requests_not_shown": hidden,
        "upstreams": [{
            "name": "anthropic", "kind": "anthropic", "priority": 0, "health": "healthy", "keys_usable": 1,
            "next_available_s": None, "in_flight": in_flight, "attempts": 3, "retries": 1,
            "answers": {"2xx": 3}, "errors": {"timeout": 1} if busy > 1 else {},
            "connections": {"busy": busy, "idle": 2},
            "keys": [key_row("a", requests=3, in_flight=in_flight, failures=busy, state=state)],
        }],
    }


def test_live_views_add_up_and_list_the_oldest_requests_of_every_worker() -> None:
    first = live_view(now=10.0, in_flight=3, ages=[5.0, 1.0, 0.5], hidden=0, lag=0.002, state="healthy")
    second = live_view(now=11.0, in_flight=4, ages=[9.0, 2.0, 0.1], hidden=1, draining=True, busy=3,
                       state="cooling")
    merged = merge.merge_live([first, second], shown=4)
    assert merged["now"] == 11.0 and merged["uptime_s"] == 110.0  # the latest clock, worker 0's uptime
    assert merged["in_flight"] == 7 and merged["streams"] == 7 and merged["connections_open"] == 9
    assert merged["requests_total"] == 70 and merged["rate_10s"] == 3.0 and merged["rate_60s"] == 1.0
    assert merged["loop_lag_s"] == 0.002 and merged["draining"] is True
    assert [(r["age_s"], r["worker"]) for r in merged["requests"]] == [(9.0, 1), (5.0, 0), (2.0, 1), (1.0, 0)]
    # Two listed but cut here, and the one worker 1 did not list.
    assert merged["requests_not_shown"] == 3
    (upstream,) = merged["upstreams"]
    assert upstream["in_flight"] == 7 and upstream["attempts"] == 6 and upstream["retries"] == 2
    assert upstream["answers"] == {"2xx": 6} and upstream["errors"] == {"timeout": 1}
    assert upstream["connections"] == {"busy": 4, "idle": 4}
    (key,) = upstream["keys"]
    # Shared through Redis: worker 0's state; counters add up; failures are the worst worker's.
    assert key["state"] == "healthy" and key["in_flight"] == 7 and key["requests"] == 6
    assert key["consecutive_failures"] == 3
    assert merged["workers"] == [{"index": 0, "answered": True, "in_flight": 3},
                                 {"index": 1, "answered": True, "in_flight": 4}]


def test_a_worker_that_did_not_answer_is_named_and_left_out_of_the_live_view() -> None:
    first = live_view(now=10.0, in_flight=2, ages=[3.0, 1.0], hidden=0)
    merged = merge.merge_live([first, None, first], shown=50)
    assert merged["in_flight"] == 4 and len(merged["requests"]) == 4
    assert [r["worker"] for r in merged["requests"]] == [0, 2, 0, 2]
    assert [(w["answered"], w["in_flight"]) for w in merged["workers"]] == [(True, 2), (False, None), (True, 2)]
