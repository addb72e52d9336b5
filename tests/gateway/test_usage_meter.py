"""The usage row as each twin reads it from a real meter: the compiled one
reads the compiled meter's counters as C fields of its Reading, the pure one
reads the pure meter's properties; both rows are the row built from a plain
copy of those properties, for whole, cut and failed streams of recorded
bytes, fed whole and in small pieces."""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from hubcore.accounting import _meter_py
from hubcore.accounting.meter import FMT_ANTHROPIC, FMT_OPENAI_RESPONSES
from hubcore.accounting.usage import Outcome, UsageEvent
from hubcore.gateway import _exchange_py
from hubcore.governance.tokens import Principal
from tests.http.twins import twin_of

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ALICE = Principal(token_id=7, user="alice", project="web", prefix="hc_x")
COUNTERS = ("model", "input_tokens", "output_tokens", "cache_write_5m", "cache_write_1h", "cache_read",
            "reasoning_tokens", "server_tool_requests", "stop_reason", "output_estimated", "error_type",
            "completed")
# Every counter: a cache write split, cache reads, thinking tokens, server tools.
SERVER_TOOLS = (FIXTURES / "message_delta_fields_response.txt").read_bytes()
ERROR_EVENT = (b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
               b"\n\n")
RESPONSES = (
    b'event: response.created\ndata: {"type":"response.created","response":{"model":"gpt-5.4"}}\n\n'
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"Hello there"}\n\n'
    b'event: response.completed\ndata: {"type":"response.completed","response":{"model":"gpt-5.4",'
    b'"status":"completed","usage":{"input_tokens":30,"input_tokens_details":{"cached_tokens":12},'
    b'"output_tokens":9,"output_tokens_details":{"reasoning_tokens":4}}}}\n\n'
)
STREAMS = {
    "whole": (FMT_ANTHROPIC, SERVER_TOOLS),
    # Cut before message_delta: the output is the estimate from the deltas.
    "cut": (FMT_ANTHROPIC, SERVER_TOOLS[:SERVER_TOOLS.index(b"event: message_delta")]),
    "error": (FMT_ANTHROPIC, SERVER_TOOLS[:SERVER_TOOLS.index(b"event: content_block_stop")] + ERROR_EVENT),
    "responses": (FMT_OPENAI_RESPONSES, RESPONSES),
}


@pytest.fixture(params=["c", "py"])
def twins(request: pytest.FixtureRequest) -> tuple[ModuleType, ModuleType]:
    """(exchange twin, meter twin) as a hub built on either runs them."""
    exchange = twin_of(request.param, "hubcore.gateway._exchange", _exchange_py)
    meter = importlib.import_module("hubcore.accounting._meter") if request.param == "c" else _meter_py
    return exchange, meter


def row(exchange: ModuleType, meter: object, served_model: str | None = None) -> UsageEvent:
    return exchange.usage_event(  # type: ignore[no-any-return]
        1700000000.0, "hc_1", "/v1/messages", 200, Outcome.OK, 40.0, ALICE, "anthropic", "k-1", "from-body",
        None, 12.5, 1, "session-1", "claude-cli/2.0", True, meter, "anthropic", None, served_model, None, 1.0,
    )


@pytest.mark.parametrize("stream", sorted(STREAMS))
@pytest.mark.parametrize("piece", [None, 7])
def test_the_row_reads_a_real_meter_as_its_properties(
    twins: tuple[ModuleType, ModuleType], stream: str, piece: int | None
) -> None:
    exchange, meters = twins
    fmt, body = STREAMS[stream]
    meter = meters.Meter(fmt, True)
    for at in range(0, len(body), piece or len(body)):
        meter.feed(body[at:at + (piece or len(body))])
    meter.close()
    copy = SimpleNamespace(**{name: getattr(meter, name) for name in COUNTERS})
    for served_model in (None, "served-id"):
        assert row(exchange, meter, served_model) == row(exchange, copy, served_model)
    got = row(exchange, meter)
    # The streams do reach each branch the row reads.
    if stream == "whole":
        assert (got.outcome, got.output_estimated) == (Outcome.OK, False)
        assert (got.input_tokens, got.cache_write_5m, got.cache_read, got.reasoning_tokens) == (40, 12, 7, 3)
        assert got.server_tool_requests > 0
    elif stream == "cut":
        assert got.outcome == Outcome.UPSTREAM_ABORTED and got.output_estimated
    elif stream == "error":
        assert got.error_type == "overloaded_error" and got.outcome == Outcome.UPSTREAM_ABORTED
    else:
        assert (got.model, got.input_tokens, got.cache_read, got.reasoning_tokens) == ("gpt-5.4", 18, 12, 4)
