"""The buffered access log: one line per request, written on a timer."""
from __future__ import annotations

import asyncio
import io

import orjson

from hubcore.accesslog import AccessLog
from hubcore.usage import UsageEvent


def event(n: int) -> UsageEvent:
    return UsageEvent(
        ts=1_800_000_000.0 + n, request_id=f"hc_{n}", endpoint="/v1/messages", status=200,
        outcome="ok", total_ms=12.5, user="alice", project="web", key_label="a",
        model="claude-sonnet-4-6", input_tokens=10, output_tokens=5, cache_read=100,
        cost_micros=123, ttfb_ms=3.25, attempts=1,
    )


async def test_lines_are_buffered_then_written_together() -> None:
    out = io.StringIO()
    log = AccessLog(out, asyncio.get_running_loop(), flush_interval=0.05)
    for n in range(3):
        log.record(event(n))
    assert out.getvalue() == ""  # nothing written per request
    await asyncio.sleep(0.2)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert " access hc_0 user=alice project=web model=claude-sonnet-4-6 key=a status=200 outcome=ok " in lines[0]
    assert "cr=100 cost_micros=123 ttfb_ms=3.2" in lines[0] and lines[0].endswith("attempts=1")
    log.record(event(3))
    log.close()  # shutdown writes what is left at once
    assert len(out.getvalue().splitlines()) == 4


async def test_json_lines_parse() -> None:
    out = io.StringIO()
    log = AccessLog(out, asyncio.get_running_loop(), json=True)
    log.record(event(7))
    log.close()
    (line,) = out.getvalue().splitlines()
    data = orjson.loads(line)
    assert data["request_id"] == "hc_7" and data["cache_read"] == 100 and data["logger"] == "hubcore.access"
