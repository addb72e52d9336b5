"""Per-upstream counters: attempts by status class, errors by kind and
failovers between upstreams, in /stats JSON, in `hubcore stats` and in
Prometheus text read back by prometheus_client's parser."""
from __future__ import annotations

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hubcore.ops import client as opsclient
from hubcore.ops.metrics import UPSTREAM_ERROR_KINDS, UPSTREAM_STATUS_CLASSES, HubMetrics
from hubcore.routing.failures import FailureKind

WEIRD = 'eu "west"\\2'


def failed_over() -> HubMetrics:
    """Three requests: one answered by primary, one that failed over from
    primary (a 529, then a refused connection) to backup, one that went to
    backup and on to WEIRD after a timeout and failed there with a 503."""
    m = HubMetrics()
    m.upstream_attempt("primary")
    m.upstream_answered("primary", 200)

    m.upstream_attempt("primary")
    m.upstream_answered("primary", 529)
    m.upstream_failed("primary", FailureKind.OVERLOADED)
    m.upstream_attempt("primary", retry=True)
    m.upstream_unanswered("primary", FailureKind.CONNECT_FAILED)
    m.failover("primary", "backup")
    m.upstream_attempt("backup", retry=True)
    m.upstream_answered("backup", 200)

    m.upstream_attempt("backup")
    m.upstream_unanswered("backup", "timeout")
    m.failover("backup", WEIRD)
    m.upstream_attempt(WEIRD, retry=True)
    m.upstream_answered(WEIRD, 503)
    m.upstream_failed(WEIRD, "server_error")
    return m


def families(m: HubMetrics) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(m.render_prometheus())}


def series(fams: dict[str, object], family: str, *labels: str) -> dict[tuple[str, ...], float]:
    fam = fams[family]
    assert fam.type == "counter"  # type: ignore[attr-defined]
    return {
        tuple(s.labels[name] for name in labels): s.value
        for s in fam.samples  # type: ignore[attr-defined]
        if s.name == family + "_total"
    }


def test_prometheus_counts_attempts_by_status_class() -> None:
    fams = families(failed_over())
    assert series(fams, "hubcore_upstream_requests", "upstream", "status_class") == {
        ("primary", "2xx"): 1.0, ("primary", "5xx"): 1.0, ("primary", "none"): 1.0,
        ("backup", "2xx"): 1.0, ("backup", "none"): 1.0,
        (WEIRD, "5xx"): 1.0,
    }


def test_prometheus_counts_errors_by_kind() -> None:
    fams = families(failed_over())
    assert series(fams, "hubcore_upstream_errors", "upstream", "kind") == {
        ("primary", "overloaded"): 1.0, ("primary", "connect_failed"): 1.0,
        ("backup", "timeout"): 1.0, (WEIRD, "server_error"): 1.0,
    }


def test_prometheus_counts_failovers_from_one_upstream_to_another() -> None:
    fams = families(failed_over())
    assert series(fams, "hubcore_upstream_failovers", "from", "to") == {
        ("primary", "backup"): 1.0, ("backup", WEIRD): 1.0,
    }
    # The attempt counter of before is still there.
    attempts = series(fams, "hubcore_upstream_attempts", "upstream")
    assert attempts == {("primary",): 3.0, ("backup",): 2.0, (WEIRD,): 1.0}


def test_a_fresh_hub_declares_the_families_with_no_series() -> None:
    fams = families(HubMetrics())
    for name in ("hubcore_upstream_requests", "hubcore_upstream_errors", "hubcore_upstream_failovers"):
        assert fams[name].documentation  # type: ignore[attr-defined]
        assert series(fams, name) == {}


@pytest.mark.parametrize(
    ("status", "status_class"),
    [(100, "2xx"), (200, "2xx"), (204, "2xx"), (304, "3xx"), (400, "4xx"), (429, "4xx"),
     (499, "4xx"), (500, "5xx"), (529, "5xx"), (599, "5xx"), (999, "5xx")],
)
def test_status_classes_are_a_fixed_set(status: int, status_class: str) -> None:
    m = HubMetrics()
    m.upstream_answered("u", status)
    assert m.upstream_requests == {("u", status_class): 1}
    assert status_class in UPSTREAM_STATUS_CLASSES


def test_error_kinds_are_a_fixed_set() -> None:
    m = HubMetrics()
    for kind in FailureKind:
        m.upstream_failed("u", kind)
    m.upstream_failed("u", "no_such_kind")
    m.upstream_unanswered("u", FailureKind.CLIENT_ABORTED)
    kinds = {kind for _, kind in m.upstream_errors}
    assert kinds <= set(UPSTREAM_ERROR_KINDS)
    # The client leaving says nothing against the upstream; an unknown kind is "other".
    assert "client_aborted" not in kinds
    assert m.upstream_errors[("u", "other")] == 1
    assert {"connect_failed", "timeout", "server_error", "overloaded", "rate_limited",
            "auth_failed", "stream_broken"} <= kinds
    # The attempt the client left still had no answer.
    assert m.upstream_requests == {("u", "none"): 1}


def test_stats_json_has_a_block_per_upstream() -> None:
    snap = orjson.loads(orjson.dumps(failed_over().snapshot()))
    assert snap["upstream"]["primary"] == {
        "attempts": 3, "retries": 1,
        "requests": {"2xx": 1, "5xx": 1, "none": 1},
        "errors": {"connect_failed": 1, "overloaded": 1},
        "failovers": {"backup": 1},
    }
    assert snap["upstream"]["backup"]["failovers"] == {WEIRD: 1}
    assert snap["upstream"][WEIRD] == {
        "attempts": 1, "retries": 1, "requests": {"5xx": 1}, "errors": {"server_error": 1}, "failovers": {},
    }


def test_hubcore_stats_shows_a_line_per_upstream() -> None:
    text = opsclient.format_stats(orjson.loads(orjson.dumps(failed_over().snapshot())))
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("upstream"))
    assert lines[start:start + 4] == [
        'upstream    backup: 2 attempts, 1 retries; 2xx 1, none 1; timeout 1; failed over to eu "west"\\2 1',
        '            eu "west"\\2: 1 attempts, 1 retries; 5xx 1; server_error 1',
        "            primary: 3 attempts, 1 retries; 2xx 1, 5xx 1, none 1; connect_failed 1, overloaded 1; "
        "failed over to backup 1",
        "",
    ]


def test_hubcore_stats_reads_a_hub_without_the_new_counters() -> None:
    # A hub from before them sends attempts and retries only.
    text = opsclient.format_stats({"upstream": {"anthropic": {"attempts": 2, "retries": 1}}})
    assert "upstream    anthropic: 2 attempts, 1 retries\n" in text
