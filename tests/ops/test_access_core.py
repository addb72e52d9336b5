"""The access log's per-request line, both twins (hubcore.ops._access,
compiled, and _access_py): the same usage rows give the same lines, byte
for byte, in text and JSON, and the same buffering. tests/ops/test_accesslog.py
holds the behaviour on whichever twin the run selects.

Each twin gets an AccessLog of its own: hubcore.ops.accesslog loaded again
with hubcore.ops.access_core standing for that twin."""
from __future__ import annotations

import asyncio
import dataclasses
import io
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hubcore.accounting.usage import Outcome, UsageEvent
from hubcore.ops import _access_py, access_core
from tests.http.twins import (
    NO_EXTENSIONS, both, check_compiled_loaded, check_no_extensions_selects_pure, module_on_twin, twin_of,
)

COMPILED = "hubcore.ops._access"


def accesslog_of(twin: ModuleType) -> ModuleType:
    """hubcore.ops.accesslog built on `twin`."""
    return module_on_twin("hubcore.ops.accesslog", "hubcore.ops.access_core", twin, ["AccessCore"])


@pytest.fixture(params=["c", "py"])
def twin(request: pytest.FixtureRequest) -> ModuleType:
    return twin_of(request.param, COMPILED, _access_py)


def test_compiled_twin_loaded() -> None:
    check_compiled_loaded(access_core, [access_core.AccessCore], COMPILED, "hubcore.ops._access_py")


def test_no_extensions_selects_pure_twin() -> None:
    check_no_extensions_selects_pure("hubcore.ops.access_core", "AccessCore", "hubcore.ops._access_py")


async def test_access_log_runs_on_the_twin(twin: ModuleType) -> None:
    out = io.StringIO()
    log = accesslog_of(twin).AccessLog(out, asyncio.get_running_loop(), flush_interval=0.01)
    assert isinstance(log, twin.AccessCore)
    log.record(UsageEvent(ts=1_800_000_000.0, request_id="hc_1", endpoint="/v1/messages", status=200,
                          outcome="ok", total_ms=1.0), "192.0.2.1")
    log.refused(1_800_000_000.5, "hc_2", b"/x", 401, "refused", 0.5, None)
    assert len(log.lines) == 2 and log.timer is not None
    await asyncio.sleep(0.05)
    assert log.lines == [] and log.timer is None
    first, second = out.getvalue().splitlines()
    assert " access hc_1 user=- " in first and first.endswith("client=192.0.2.1")
    assert first[:19] == second[:19]  # the same second: the same stamp


# The compiled twin writes a text line into a C buffer and hands what it
# cannot write there (ints past 64 bits or not exact ints, floats that are
# not finite, text UTF-8 cannot encode, a line past its buffer) to the
# format string: the strategies reach both.
text = st.one_of(st.none(), st.text(max_size=8), st.text(st.characters(codec=None), max_size=4),
                 st.text(min_size=300, max_size=400))
counts = st.one_of(st.integers(0, 10**9), st.integers(-(2**70), 2**70), st.booleans())
# The compiled twin writes `%.3f` by hand below 1e12 ms: values next to a
# rounding tie, on an exact one (an odd number of sixteenths: the only
# doubles whose thousandths end in exactly a half), tiny and large ones.
MILLIS_EDGES = [0.0625, 0.0005, 2.5e-4, 1.0005, -0.0, 1e300, 0.0, 5e-324, 4.9e-4, 0.00049999999999999999,
                999.9995, 999.99949999999, 0.9995, 1e12, 1e12 - 0.0005, 999999999999.9995, 2.0**-14 * 3, 123.4565]
millis = st.one_of(st.floats(0.0, 1e7), st.floats(0.0, 1e13), st.floats(allow_nan=True, allow_infinity=True),
                   st.integers(0, 10**6), st.integers(0, 10**9).map(lambda k: k / 1000 + 0.0005),
                   st.integers(0, 2**30).map(lambda k: (2 * k + 1) / 16), st.sampled_from(MILLIS_EDGES))
usage_events = st.builds(
    UsageEvent,
    ts=st.floats(1.0e9, 2.0e9), request_id=st.text(min_size=1, max_size=8), endpoint=st.text(max_size=8),
    status=st.integers(100, 599), outcome=st.sampled_from(["ok", "refused", "upstream_error", *Outcome]),
    total_ms=millis, user=text, project=text, model=text, key_label=text,
    input_tokens=counts, output_tokens=st.integers(0, 10**9), cache_write_5m=st.integers(0, 10**6),
    cache_write_1h=st.integers(0, 10**6), cache_read=counts, reasoning_tokens=st.integers(0, 10**6),
    cost_micros=st.one_of(st.none(), counts), ttfb_ms=st.one_of(st.none(), millis),
    attempts=st.integers(0, 5),
)


class Loop:
    """call_later recorded, never run: the buffer stays as record left it."""

    def __init__(self) -> None:
        self.timers: list[Any] = []

    def call_later(self, delay: float, callback: Any) -> object:
        self.timers.append((delay, callback))
        return object()


@pytest.mark.skipif(NO_EXTENSIONS, reason="HUBCORE_NO_EXTENSIONS is set: only the pure twin")
@settings(max_examples=300, deadline=None)
@given(events=st.lists(st.tuples(usage_events, st.one_of(st.none(), st.text(max_size=8))), max_size=12),
       json=st.booleans())
def test_both_twins_write_the_same_lines(events: list[tuple[UsageEvent, str | None]], json: bool) -> None:
    results = []
    for twin in both(COMPILED, _access_py):
        loop = Loop()
        log = accesslog_of(twin).AccessLog(io.StringIO(), loop, json=json)  # type: ignore[arg-type]
        raised = []
        for event, client in events:
            try:
                log.record(event, client)
            except TypeError as e:  # JSON of an int past 64 bits: orjson's refusal, in both twins
                raised.append(str(e))
        results.append((list(log.lines), [delay for delay, _ in loop.timers], raised))
    assert results[0] == results[1]


@pytest.mark.skipif(NO_EXTENSIONS, reason="HUBCORE_NO_EXTENSIONS is set: only the pure twin")
def test_milliseconds_are_written_as_percent_three_f_writes_them() -> None:
    """The compiled line's ttfb_ms and total_ms are `%.3f` of the exact
    value, ties to even: at the edges, on every exact tie under 1 s (odd
    sixteenths of a ms) and next to the ties of the first 3 ms."""
    values = MILLIS_EDGES + [k / 16 for k in range(1, 16_000, 2)] + [k / 1000 + 0.0005 for k in range(3000)]
    compiled = accesslog_of(twin_of("c", COMPILED, _access_py))
    for ms in values:
        log = compiled.AccessLog(io.StringIO(), Loop(), json=False)
        log.record(UsageEvent(ts=1.7e9, request_id="r", endpoint="/v1/messages", status=200, outcome="ok",
                              total_ms=ms, ttfb_ms=ms), None)
        (line,) = log.lines
        assert f" ttfb_ms={'%.3f' % ms} total_ms={'%.3f' % ms} " in line, ms


def test_a_line_reads_any_event_by_its_fields(twin: ModuleType) -> None:
    """The compiled twin reads an exact UsageEvent's fields from its slots
    (accounting._rows.event_field); a subclass of it or a stand-in with the
    same fields is read by name and gives the same line, and a field that
    is unset raises as reading it does."""
    fields = dict(ts=1_800_000_000.25, request_id="hc_9", endpoint="/v1/messages", status=200, outcome=Outcome.OK,
                  total_ms=12.5, user="ada", project="lab", model="claude-opus-4-6", key_label="k1",
                  input_tokens=5, output_tokens=7, cache_read=3, cost_micros=42, ttfb_ms=1.5, attempts=1)

    class Event(UsageEvent):
        __slots__ = ("extra",)

    def line(event: Any) -> str:
        log = accesslog_of(twin).AccessLog(io.StringIO(), Loop())
        log.record(event, "192.0.2.1")
        (text,) = log.lines
        return str(text)

    exact = line(UsageEvent(**fields))  # type: ignore[arg-type]
    assert " user=ada project=lab model=claude-opus-4-6 key=k1 status=200 outcome=ok in=5 out=7 " in exact
    assert line(Event(**fields)) == exact  # type: ignore[arg-type]
    stand_in = dataclasses.asdict(UsageEvent(**fields))  # type: ignore[arg-type]
    assert line(SimpleNamespace(**stand_in)) == exact
    unset = UsageEvent(**fields)  # type: ignore[arg-type]
    del unset.model
    with pytest.raises(AttributeError, match="model"):
        line(unset)
