"""Shutdown and the token table's reads: the hub reads its database for
token changes in a worker thread, which a cancelled await leaves running.
Closing the connection under that thread's query crashed the process
(a segmentation fault in sqlite3), so stop() waits for the read first."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from hubcore.governance import tokens
from tests.conftest import upstreams_for
from tests.fakevendor import FakeVendor
from tests.hubharness import HubThread, make_config


def test_stop_waits_for_a_token_read_under_way_before_closing_the_database(
    vendor: FakeVendor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    reading, release = threading.Event(), threading.Event()
    outcomes: list[object] = []
    real_generation = tokens.generation

    def held_generation(conn: object) -> int:
        # Only the poll's read in a worker thread is held; the start's own
        # read runs on the loop's thread.
        if threading.current_thread() is hub.thread:
            return real_generation(conn)  # type: ignore[arg-type]
        reading.set()
        release.wait(10)
        try:
            value = real_generation(conn)  # type: ignore[arg-type]
        except Exception as e:  # a closed database: what stop() must not do
            outcomes.append(e)
            raise
        outcomes.append(value)
        return value

    monkeypatch.setattr(tokens, "generation", held_generation)
    hub = HubThread(make_config(tmp_path, upstreams_for(vendor), token_reload_interval=0.05))
    with hub:
        app = hub.app
        assert app is not None
        assert reading.wait(10), "the token poll never read the database"
        stopping = asyncio.run_coroutine_threadsafe(app.stop(), hub.loop)
        # stop() cancels the poll, drains and flushes; then it must wait for
        # the read, which is held until released.
        with pytest.raises(TimeoutError):
            stopping.result(timeout=1.0)
        assert outcomes == []
        release.set()
        stopping.result(timeout=30)
        hub.app = None  # stopped here, not again on leaving
    assert len(outcomes) == 1 and isinstance(outcomes[0], int), outcomes
