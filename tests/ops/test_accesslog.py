"""The buffered access log: one line per request, written on a timer; refused
requests summarised per client address instead of logged one by one."""
from __future__ import annotations

import asyncio
import http.client
import io
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import anthropic
import orjson
import pytest

from hubcore.ops.accesslog import AccessLog, RefusalLog
from hubcore.accounting.usage import UsageEvent
from tests.conftest import upstreams_for
from tests.fakevendor import FakeVendor
from tests.hubharness import HubThread, make_config


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
    assert "cr=100 cost_micros=123 ttfb_ms=3.250 total_ms=12.500 attempts=1 endpoint=/v1/messages" in lines[0]
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
    assert data["level"] == "info" and data["msg"] == "access" and data["ts"] == event(7).ts


# One regular expression for every access line in text mode, with or without a usage row.
ACCESS_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d access (?P<id>\S+) user=(?P<user>\S+) project=\S+ model=\S+ key=\S+ "
    r"status=(?P<status>\d+) outcome=\S+ in=\d+ out=\d+ cw5m=\d+ cw1h=\d+ cr=\d+ cost_micros=(\d+|-) "
    r"ttfb_ms=(\d+\.\d{3}|-) total_ms=\d+\.\d{3} attempts=\d+ endpoint=(?P<endpoint>\S+) client=(?P<client>\S+)"
)


async def test_a_refused_line_has_the_format_of_a_usage_line() -> None:
    loop = asyncio.get_running_loop()
    out, out_json = io.StringIO(), io.StringIO()
    for log in (AccessLog(out, loop), AccessLog(out_json, loop, json=True)):
        log.record(event(1), "192.0.2.7")
        # A path is the client's: escaped into one token, and bounded.
        log.refused(1_800_000_000.5, "hc_2", b"/v1/\x1b[2J x%" + b"a" * 300, 401, "refused", 0.25, None)
        log.close()
    usage, refused = out.getvalue().splitlines()
    assert (m := ACCESS_LINE.fullmatch(usage)) and m["client"] == "192.0.2.7" and m["endpoint"] == "/v1/messages"
    assert (m := ACCESS_LINE.fullmatch(refused)), refused
    assert m["user"] == "-" and m["status"] == "401" and m["client"] == "-"
    assert m["endpoint"].startswith("/v1/%1B[2J%20x%25aaa") and m["endpoint"].endswith("a...")
    usage_json, refused_json = (orjson.loads(line) for line in out_json.getvalue().splitlines())
    assert usage_json.keys() == refused_json.keys()
    assert refused_json["level"] == "info" and refused_json["status"] == 401 and refused_json["user"] is None
    assert usage_json["client"] == "192.0.2.7" and refused_json["total_ms"] == 0.25


# -- refused requests: one line per address and status per window ------------------------

class Lines(logging.Handler):
    """The access logger's lines, as the journal would get them."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def access_lines() -> Iterator[Lines]:
    logger = logging.getLogger("hubcore.access")
    handler, level = Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def summaries(lines: list[str]) -> list[tuple[int, str, int]]:
    """(count, address, status) of each summary line."""
    return [(int(m[1]), m[2], int(m[3])) for line in lines if (m := SUMMARY.fullmatch(line))]


SUMMARY = re.compile(r"(\d+) more requests from (\S+) refused with (\d+) in the last [\d.]+ s")


async def test_refusals_are_counted_within_a_window_and_summarised_after_it(access_lines: Lines) -> None:
    refusals = RefusalLog(asyncio.get_running_loop(), logging.getLogger("hubcore.access"), window=10.0)
    assert refusals.admit("192.0.2.7", 401, 100.0)  # the first is logged in full
    assert not any(refusals.admit("192.0.2.7", 401, 100.0 + i / 100) for i in range(1, 300))
    assert refusals.admit("192.0.2.7", 404, 101.0)  # another status: its own window
    assert refusals.admit("198.51.100.1", 401, 101.0)  # another address: its own window
    assert not refusals.admit("198.51.100.1", 401, 102.0)
    refusals.expire(109.9)
    assert access_lines.lines == []
    refusals.expire(110.0)
    assert summaries(access_lines.lines) == [(299, "192.0.2.7", 401)]  # a window with no count says nothing
    refusals.expire(111.0)
    assert summaries(access_lines.lines) == [(299, "192.0.2.7", 401), (1, "198.51.100.1", 401)]
    assert refusals.windows == {}
    assert refusals.admit("192.0.2.7", 401, 111.5)  # a new window: logged in full again
    refusals.close()


async def test_a_window_past_its_end_is_summarised_before_the_next_refusal_opens_one(access_lines: Lines) -> None:
    refusals = RefusalLog(asyncio.get_running_loop(), logging.getLogger("hubcore.access"), window=10.0)
    refusals.admit("192.0.2.7", 401, 100.0)
    refusals.admit("192.0.2.7", 401, 105.0)
    assert refusals.admit("192.0.2.7", 401, 110.0)  # the timer has not run yet
    assert summaries(access_lines.lines) == [(1, "192.0.2.7", 401)]
    refusals.close()


async def test_the_oldest_window_is_summarised_early_when_too_many_are_open(access_lines: Lines) -> None:
    refusals = RefusalLog(asyncio.get_running_loop(), logging.getLogger("hubcore.access"), window=10.0, max_windows=3)
    for n in range(3):
        refusals.admit(f"192.0.2.{n}", 401, 100.0 + n)
        refusals.admit(f"192.0.2.{n}", 401, 100.5 + n)
    assert refusals.admit("192.0.2.200", 401, 103.0)
    assert len(refusals.windows) == 3 and ("192.0.2.0", 401) not in refusals.windows
    assert summaries(access_lines.lines) == [(1, "192.0.2.0", 401)]  # evicted, its count kept
    refusals.close()  # shutdown says what is still counted
    assert sorted(summaries(access_lines.lines)) == [(1, f"192.0.2.{n}", 401) for n in range(3)]


async def test_the_timer_ends_windows_on_its_own(access_lines: Lines) -> None:
    loop = asyncio.get_running_loop()
    refusals = RefusalLog(loop, logging.getLogger("hubcore.access"), window=0.05)
    refusals.admit("192.0.2.7", 401, loop.time())
    refusals.admit("192.0.2.7", 401, loop.time())
    await asyncio.sleep(0.03)
    refusals.admit("192.0.2.8", 403, loop.time())
    refusals.admit("192.0.2.8", 403, loop.time())
    await asyncio.sleep(0.2)
    assert summaries(access_lines.lines) == [(1, "192.0.2.7", 401), (1, "192.0.2.8", 403)]
    assert refusals.windows == {}


def bad_token_requests(hub: HubThread, count: int, source: str) -> list[int]:
    """`count` requests with a wrong token from `source`, over keep-alive
    connections (reopened when the hub closes one); their statuses."""
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=10, source_address=(source, 0))
    statuses = []
    try:
        for _ in range(count):
            conn.request("GET", "/v1/models", headers={"x-api-key": "hc-wrong-token"})
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
    finally:
        conn.close()
    return statuses


def test_a_wrong_token_flood_writes_a_few_lines_that_count_it(
    vendor: FakeVendor, tmp_path: Path, access_lines: Lines,
) -> None:
    out = io.StringIO()
    with HubThread(make_config(tmp_path, upstreams_for(vendor))) as hub:
        assert hub.app is not None and hub.app.hub.access is not None
        hub.app.hub.access.stream = out
        # 127.0.0.2 is loopback too: a second client address.
        statuses = bad_token_requests(hub, 400, "127.0.0.1") + bad_token_requests(hub, 100, "127.0.0.2")
        assert statuses == [401] * 500
        assert summaries(access_lines.lines) == []  # the 10 s windows are still open
    # Stopping the hub writes the buffered lines and summarises the windows.
    full = [m for line in out.getvalue().splitlines() if (m := ACCESS_LINE.fullmatch(line))]
    assert [(m["status"], m["endpoint"], m["client"]) for m in full] == [
        ("401", "/v1/models", "127.0.0.1"), ("401", "/v1/models", "127.0.0.2")]
    assert len(access_lines.lines) == 2, access_lines.lines
    assert sorted(summaries(access_lines.lines)) == [(99, "127.0.0.2", 401), (399, "127.0.0.1", 401)]
    assert all("hc-wrong-token" not in line for line in access_lines.lines + [out.getvalue()])


def test_a_hub_writes_one_line_format_for_served_and_refused_requests(
    vendor: FakeVendor, tmp_path: Path, access_lines: Lines,
) -> None:
    out = io.StringIO()
    with HubThread(make_config(tmp_path, upstreams_for(vendor))) as hub:
        assert hub.app is not None and hub.app.hub.access is not None
        hub.app.hub.access.stream = out
        with anthropic.Anthropic(base_url=hub.url, api_key=hub.mint("alice", "web"), max_retries=0) as client:
            reply = client.messages.with_raw_response.create(
                model="claude-sonnet-4-6", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
        assert bad_token_requests(hub, 1, "127.0.0.1") == [401]
    lines = out.getvalue().splitlines()
    matches = [ACCESS_LINE.fullmatch(line) for line in lines]
    assert len(lines) == 2 and all(matches), lines
    served, refused = matches
    assert served is not None and refused is not None
    assert served["id"] == reply.headers["x-hubcore-request-id"] and served["user"] == "alice"
    assert (served["status"], served["client"]) == ("200", "127.0.0.1")
    assert (refused["status"], refused["user"], refused["client"]) == ("401", "-", "127.0.0.1")
    assert access_lines.lines == []  # nothing else on the access logger
