"""What the hub leaves to CPython's cyclic garbage collector: nothing on the
request path, and its full collections only on the hub's own schedule."""
from __future__ import annotations

import asyncio
import gc
import http.client
import time
import warnings
import weakref
from pathlib import Path

import orjson

from hubcore.gateway import exchange as proxy

from hubcore.http import server

from hubcore.http import client as upstream
from hubcore.runtime import NEVER, CycleCollector
from tests.conftest import upstreams_for
from tests.fakevendor import FakeVendor
from tests.hubharness import HubThread, make_config


def _alive(kind: type) -> int:
    return sum(1 for o in gc.get_objects() if type(o) is kind)


def _post(hub: HubThread, token: str, headers: dict[str, str], stream: bool = False) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A Messages request on a connection of its own; its response, unread."""
    body = orjson.dumps({"model": "claude-sonnet-4-6", "max_tokens": 16, "stream": stream,
                         "messages": [{"role": "user", "content": "hi"}]})
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=30)
    conn.request("POST", "/v1/messages", body, {
        "x-api-key": token, "content-type": "application/json", "anthropic-version": "2023-06-01", **headers,
    })
    return conn, conn.getresponse()


def test_closed_connections_are_freed_without_the_cyclic_collector(vendor: FakeVendor, tmp_path: Path) -> None:
    # A connection's parser calls its protocol back: unless the hub breaks
    # that cycle when the connection closes, every closed client and
    # upstream connection (some forty objects each) waits for a full
    # collection to be freed.
    config = make_config(tmp_path, upstreams_for(vendor, pool_idle_timeout=0))
    with HubThread(config) as hub:
        token = hub.mint()
        assert hub.app is not None
        with warnings.catch_warnings():
            # What earlier tests of this process left (a client socket they
            # never closed) is not this test's to judge.
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
        gc.disable()
        try:
            for _ in range(10):
                conn, response = _post(hub, token, {"connection": "close"})
                assert response.status == 200
                response.read()
                conn.close()
            deadline = time.monotonic() + 10
            while (hub.app.server.connections or vendor.open_connections) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not hub.app.server.connections and vendor.open_connections == 0
            time.sleep(0.1)
            assert _alive(server.HttpProtocol) == 0
            assert _alive(upstream.UpstreamConnection) == 0
        finally:
            gc.enable()
        assert len(hub.wait_rows(10)) == 10


def test_a_stream_that_fails_midway_leaves_no_cycle_for_the_full_collections(vendor: FakeVendor, tmp_path: Path) -> None:
    # By the end of a long stream its objects are in the oldest generation;
    # were the error that ends it to close a cycle through them, only a full
    # collection (every gc_full_interval) would free the request.
    thresholds = gc.get_threshold()
    gc.set_threshold(thresholds[0], thresholds[1], NEVER)
    try:
        with HubThread(make_config(tmp_path, upstreams_for(vendor))) as hub:
            conn, response = _post(hub, hub.mint(), {
                "x-fake-events": "30", "x-fake-delay-ms": "20", "x-fake-fail-after": "20", "x-fake-fail-mode": "reset",
            }, stream=True)
            assert response.status == 200
            gc.collect(1)
            gc.collect(1)  # the request's objects, alive, move to the oldest generation
            assert b"event: error" in response.read()
            conn.close()
            (row,) = hub.wait_rows(1)
            assert row["outcome"] == "upstream_aborted"
            time.sleep(0.1)
            gc.collect(1)
            assert _alive(proxy.Exchange) == 0
    finally:
        gc.set_threshold(*thresholds)


async def test_full_collections_run_on_schedule_and_free_long_lived_cycles() -> None:
    class Node:
        other: Node

    cycles = CycleCollector(asyncio.get_running_loop(), 0.05)
    thresholds = gc.get_threshold()
    cycles.start()
    try:
        assert gc.get_threshold() == (thresholds[0], thresholds[1], NEVER)
        assert gc.get_freeze_count() > 0
        freed: list[bool] = []
        a, b = Node(), Node()
        a.other, b.other = b, a
        weakref.finalize(a, freed.append, True)
        gc.collect(1)
        gc.collect(1)  # survived twice: in the oldest generation, as a long stream's objects are
        del a, b
        gc.collect(1)
        assert freed == [], "only a full collection finds a cycle in the oldest generation"
        deadline = time.monotonic() + 5
        while not freed and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert freed == [True]
        stats = cycles.stats()
        assert stats["scheduled"] and stats["full_collections"] >= 1 and stats["collected"] >= 2
        assert stats["last_full_collection_ms"] is not None
    finally:
        cycles.stop()
        gc.unfreeze()
    assert gc.get_threshold() == thresholds


async def test_an_interval_of_zero_leaves_the_collector_as_cpython_has_it() -> None:
    thresholds = gc.get_threshold()
    frozen = gc.get_freeze_count()
    cycles = CycleCollector(asyncio.get_running_loop(), 0)
    cycles.start()
    assert gc.get_threshold() == thresholds and gc.get_freeze_count() == frozen
    assert cycles.stats()["scheduled"] is False
    cycles.stop()
