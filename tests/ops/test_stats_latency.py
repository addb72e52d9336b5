"""`hubcore stats` latencies against real requests: its p50 must agree with the
access log's figures for the same requests, within the buckets' resolution,
from tens of microseconds to minutes; a wait for a key shows as that wait."""
from __future__ import annotations

import io
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hubcore.ops import client as opsclient
from hubcore.ops.metrics import LATENCY_BUCKETS, HubMetrics
from tests.conftest import upstreams_for
from tests.fakevendor import FakeVendor
from tests.hubharness import HubThread, make_config, run_cli

MODEL = "claude-sonnet-4-6"
MESSAGES = [{"role": "user", "content": "hi"}]
# The estimate of a quantile lies in the bucket of the true quantile, so it is
# off by at most the widest ratio of two neighbouring bounds.
RESOLUTION = max(b / a for a, b in pairwise(LATENCY_BUCKETS))


@pytest.fixture
def ops_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="hc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_hub(tmp_path: Path, ops_dir: Path, upstreams: list[dict[str, Any]]) -> HubThread:
    return HubThread(make_config(tmp_path, upstreams, ops_socket=str(ops_dir / "ops.sock"), log_format="json"))


def capture_access_log(hub: HubThread) -> io.StringIO:
    assert hub.app is not None and hub.app.hub.access is not None
    out = io.StringIO()
    hub.app.hub.access.stream = out
    return out


def access_lines(hub: HubThread, out: io.StringIO) -> list[dict[str, Any]]:
    assert hub.app is not None and hub.app.hub.access is not None
    access = hub.app.hub.access

    async def flush() -> None:
        access.flush()

    hub.call(flush())
    return [orjson.loads(line) for line in out.getvalue().splitlines()]


def stats_after(hub: HubThread, requests: int) -> dict[str, Any]:
    """`hubcore stats --json` from the real CLI, once the hub has counted `requests`."""
    sock = hub.config.server.ops_socket

    def counted() -> bool:
        return int(opsclient.get_stats(sock)["requests"]["total"]) >= requests

    poll(counted)
    result = run_cli("stats", "--json", "--socket", sock)
    assert result.returncode == 0, result.stderr
    stats: dict[str, Any] = orjson.loads(result.stdout)
    return stats


def poll(probe: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def median_rank(values: list[float]) -> float:
    """The value of rank ceil(n/2), the one a histogram's p50 estimates."""
    return sorted(values)[math.ceil(0.5 * len(values)) - 1]


def assert_within_resolution(estimate: float | None, true: float, what: str) -> None:
    assert estimate is not None, what
    assert true / RESOLUTION <= estimate <= true * RESOLUTION, (
        f"{what}: stats says {estimate * 1e3:.3f} ms, the access log {true * 1e3:.3f} ms "
        f"(resolution x{RESOLUTION:g})")


def assert_histograms_valid(text: str, count: int) -> None:
    """The latency histograms as Prometheus reads them: `le` increasing and
    ending in +Inf, counts cumulative, +Inf equal to _count."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("hubcore_ttfb_seconds", "hubcore_request_duration_seconds", "hubcore_hub_added_seconds"):
        family = families[name]
        assert family.type == "histogram"
        buckets = [(float(s.labels["le"]), s.value) for s in family.samples if s.name == name + "_bucket"]
        bounds, counts = zip(*buckets)
        assert list(bounds) == sorted(set(bounds)) and bounds[-1] == math.inf
        assert list(counts) == sorted(counts) and counts[-1] == count
        assert [s.value for s in family.samples if s.name == name + "_count"] == [count]


def test_buckets_resolve_tens_of_microseconds_to_minutes() -> None:
    assert LATENCY_BUCKETS[0] <= 50e-6 and LATENCY_BUCKETS[-1] >= 600.0
    assert RESOLUTION <= 1.5


@pytest.mark.parametrize("delay_ms, count, parallel", [(1, 25, 1), (2000, 5, 5)], ids=["1ms", "2s"])
def test_stats_p50_agrees_with_the_access_log(
    tmp_path: Path, ops_dir: Path, vendor: FakeVendor, delay_ms: int, count: int, parallel: int,
) -> None:
    with start_hub(tmp_path, ops_dir, upstreams_for(vendor)) as hub:
        out = capture_access_log(hub)
        client = anthropic.Anthropic(base_url=hub.url, api_key=hub.mint("alice"), max_retries=0)
        headers = {"x-fake-first-byte-delay-ms": str(delay_ms)}

        def ask(_: int) -> None:
            client.messages.create(model=MODEL, max_tokens=8, messages=MESSAGES, extra_headers=headers)

        with client, ThreadPoolExecutor(parallel) as pool:
            list(pool.map(ask, range(count)))
        stats = stats_after(hub, count)
        lines = access_lines(hub, out)
        status, metrics = opsclient.fetch(hub.config.server.ops_socket, "/metrics")
    assert status == 200
    assert_histograms_valid(metrics.decode(), count)
    assert len(lines) == count and {line["status"] for line in lines} == {200}
    latency = stats["latency_s"]
    assert latency["ttfb"]["count"] == count and latency["total"]["count"] == count
    assert_within_resolution(latency["ttfb"]["p50"], median_rank([line["ttfb_ms"] / 1e3 for line in lines]), "ttfb")
    assert_within_resolution(latency["total"]["p50"], median_rank([line["total_ms"] / 1e3 for line in lines]), "total")
    assert median_rank([line["ttfb_ms"] for line in lines]) >= delay_ms


def test_a_wait_for_a_key_shows_as_that_wait(tmp_path: Path, ops_dir: Path) -> None:
    """The only key rests 3 s after a 429 (max_attempts 1: that request gets
    the 429); the next request waits for it, and stats shows a 3 s queue wait
    while the hub's own share stays tiny."""
    with FakeVendor(retry_after=3.0) as vendor, \
            start_hub(tmp_path, ops_dir, upstreams_for(vendor, max_attempts=1)) as hub:
        out = capture_access_log(hub)
        with anthropic.Anthropic(base_url=hub.url, api_key=hub.mint("alice"), max_retries=0) as client:
            with pytest.raises(anthropic.RateLimitError):
                client.messages.create(model=MODEL, max_tokens=8, messages=MESSAGES,
                                       extra_headers={"x-fake-status": "429"})
            client.messages.create(model=MODEL, max_tokens=8, messages=MESSAGES)
        stats = stats_after(hub, 2)
        lines = access_lines(hub, out)
        text = run_cli("stats", "--socket", hub.config.server.ops_socket)
    assert text.returncode == 0, text.stderr
    waited = next(line for line in lines if line["status"] == 200)
    assert waited["ttfb_ms"] > 2000.0, waited
    latency = stats["latency_s"]
    assert latency["queue_wait"]["count"] == 1
    # The wait is the request's time to first byte, all but the vendor's answer.
    assert_within_resolution(latency["queue_wait"]["p50"], waited["ttfb_ms"] / 1e3, "queue wait")
    assert latency["hub_added"]["p50"] < 0.1, latency["hub_added"]
    row = next(line for line in text.stdout.splitlines() if line.startswith("queue wait"))
    assert row.split()[2].endswith("s") and 2.0 <= float(row.split()[2][:-1]) <= 3.0 * RESOLUTION, row


def test_a_quantile_beyond_the_last_bound_says_so() -> None:
    """Not the bound itself: an hour-long stream is not a 10-minute one."""
    metrics = HubMetrics()
    for _ in range(3):
        metrics.request_started()
        metrics.request_finished("/v1/messages", 200, "ok", 5000.0, 900.0)
    summary = orjson.loads(orjson.dumps(metrics.snapshot()))["latency_s"]
    assert summary["ttfb"]["p50"] is None and summary["ttfb"]["above_last_bound"] == 3
    assert summary["ttfb"]["last_bound"] == LATENCY_BUCKETS[-1]
    text = opsclient.format_stats({"latency_s": summary})
    row = next(line for line in text.splitlines() if line.startswith("ttfb"))
    assert row.split()[1:3] == [">", opsclient.format_duration(LATENCY_BUCKETS[-1])], row
