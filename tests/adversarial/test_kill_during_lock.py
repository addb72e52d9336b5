"""kill -9 of a `hubcore serve` whose database another process holds locked:
the usage rows of every request served before the kill survive, through the
spool and its replay on the next start, each exactly once."""
from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.fakevendor import COMPLETED, OPENAI_KEY, FakeVendor
from tests.hubharness import mint
from tests.functional.test_lifecycle import KEY_ONE, DatabaseLock, Serve, eventually, request

REQUESTS = 100
PACE_S = 0.02  # 100 requests over about two seconds, as steady traffic would come
FLUSH_INTERVAL_S = 0.05
# Far longer than the lock is held: the writer is stuck inside one busy wait
# for the whole test, the case that used to keep rows in memory.
BUSY_TIMEOUT_S = 20.0
# How long after the last response every row must be in the spool: many flush
# intervals, for a loaded machine, and well inside the busy timeout.
SPOOL_DEADLINE_S = 2.0


@pytest.fixture
def vendor() -> Iterator[FakeVendor]:
    with FakeVendor(keys={KEY_ONE: "ok", OPENAI_KEY: "ok"}) as v:
        yield v


@pytest.fixture
def serve(tmp_path: Path, vendor: FakeVendor) -> Iterator[Serve]:
    s = Serve(tmp_path, vendor, usage_flush_interval=FLUSH_INTERVAL_S, db_busy_timeout=BUSY_TIMEOUT_S)
    yield s
    s.close()


def spooled_request_ids(spool: Path) -> set[str]:
    if not spool.exists():
        return set()
    return {orjson.loads(line)["request_id"] for line in spool.read_bytes().splitlines() if line.strip()}


def test_kill_9_under_a_database_lock_loses_no_served_request(serve: Serve, vendor: FakeVendor) -> None:
    token = mint(serve.db, "kill")
    serve.start()
    spool = Path(str(serve.db) + ".spool")
    lock = DatabaseLock(serve.db)
    try:
        sent = []
        for _ in range(REQUESTS):
            status, request_id, body = request(serve.port, token)
            assert status == 200 and request_id, body
            sent.append(request_id)
            time.sleep(PACE_S)
        eventually(lambda: spooled_request_ids(spool) >= set(sent), timeout=SPOOL_DEADLINE_S,
                   what="every served request's row in the spool")
        assert serve.proc is not None
        serve.proc.kill()
        assert serve.wait() == -signal.SIGKILL
    finally:
        lock.release()
    assert serve.rows() == [], "the lock held: nothing reached the database before the kill"

    serve.start()  # replays the spool the killed process left
    served = [r for r in vendor.requests if r.path == "/v1/messages" and r.outcome == COMPLETED]
    assert len(served) == REQUESTS
    eventually(lambda: len(serve.rows()) >= len(served), what="replay on start")
    counts = Counter(r["request_id"] for r in serve.rows())
    assert counts == Counter(sent), "every served request exactly once"
    serve.signal(signal.SIGTERM)
    assert serve.wait() == 0
    assert spool.stat().st_size == 0
