"""The usage recorder on both engines: batches keep every column, a spool
replayed over rows already stored inserts each once; and on PostgreSQL, a
server stopped for seconds during writes and started again loses no row,
counts none twice, and never holds up record()."""
from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

from hubcore import store
from hubcore.accounting.recorder import UsageRecorder
from hubcore.accounting.spool import Spool
from hubcore.accounting.usage import FIELDS, UsageEvent
from tests.accounting.test_usage import make_event
from tests.pgserver import PgDatabase, PgServer
from tests.storage.conftest import pg_server_database


def stored(database: str) -> list[dict[str, Any]]:
    conn = store.connect(database)
    try:
        cur = conn.execute(f"SELECT {', '.join(FIELDS)} FROM usage ORDER BY request_id")
        return [dict(zip(FIELDS, row)) for row in cur.fetchall()]
    finally:
        conn.close()


def as_row(event: UsageEvent) -> dict[str, Any]:
    row = dataclasses.asdict(event)
    row["output_estimated"] = int(event.output_estimated)
    return row


async def test_batches_keep_every_column(database: str, tmp_path: Path) -> None:
    # A flush interval longer than a first connection takes: no batch is
    # copied to the spool while its write waits.
    recorder = UsageRecorder(database, tmp_path / "usage.spool", flush_interval=0.5, batch_max=64)
    await recorder.start()
    events = [make_event(i, output_estimated=i % 2 == 0, cost_basis="estimate" if i % 3 == 0 else None,
                         served_model="relay" if i % 5 == 0 else None, ttfb_ms=None if i % 7 == 0 else 1.25,
                         route="primary/a:200") for i in range(300)]
    for event in events:
        recorder.record(event)
    await recorder.close()
    assert recorder.stats()["written"] == 300, recorder.stats()
    assert stored(database) == [as_row(e) for e in events]


async def test_a_replayed_spool_inserts_each_row_once(database: str, tmp_path: Path) -> None:
    spool_path = tmp_path / "usage.spool"
    first = UsageRecorder(database, spool_path, flush_interval=0.02)
    await first.start()
    for i in range(10):
        first.record(make_event(i))
    await first.close()
    # A spool whose first half is in the database already, as after a crash
    # between a write and the truncation of its spooled copy.
    spool = Spool(spool_path)
    spool.open()
    spool.append([make_event(i) for i in range(5, 15)], sync=True)
    spool.close()
    second = UsageRecorder(database, spool_path, flush_interval=0.02)
    await second.start()
    stats = second.stats()
    await second.close()
    assert (stats["replayed"], stats["ignored"], stats["spool_pending"]) == (5, 5, 0)
    assert [r["request_id"] for r in stored(database)] == [f"req-{i:06d}" for i in range(15)]


async def test_postgresql_stopped_during_writes_loses_and_doubles_no_row(
    pg_server: PgServer, pg_database: PgDatabase, tmp_path: Path,
) -> None:
    database = pg_server_database(pg_database)
    recorder = UsageRecorder(database, tmp_path / "usage.spool", flush_interval=0.05, retry_max=0.5)
    await recorder.start()
    loop = asyncio.get_running_loop()
    slowest = 0.0
    sent = 0
    unhealthy_seen = False

    async def record_for(seconds: float) -> None:
        nonlocal sent, slowest, unhealthy_seen
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            started = time.perf_counter()
            recorder.record(make_event(sent))
            slowest = max(slowest, time.perf_counter() - started)
            sent += 1
            unhealthy_seen = unhealthy_seen or not recorder.stats()["db_healthy"]
            await asyncio.sleep(0.005)

    await record_for(0.5)
    stopping = loop.run_in_executor(None, pg_server.stop)
    await record_for(3.0)
    await stopping
    starting = loop.run_in_executor(None, pg_server.start)
    await record_for(1.0)
    await starting
    await record_for(0.5)
    # Back: the spool drains into the database within the retry backoff.
    for _ in range(200):
        if recorder.stats()["spool_pending"] == 0 and recorder.stats()["db_healthy"]:
            break
        await asyncio.sleep(0.05)
    await recorder.close()
    stats = recorder.stats()
    assert unhealthy_seen and stats["spooled"] > 0, "the outage went through the spool"
    assert stats["spool_pending"] == 0
    assert slowest < 0.05, f"record() took {slowest * 1000:.1f} ms during the outage"
    ids = [r["request_id"] for r in stored(database)]
    assert ids == [f"req-{i:06d}" for i in range(sent)], "every row once"
