"""Reading the vendors' rate-limit headers into a key's room (headroom.py)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hubcore.routing.failures import parse_rfc3339
from hubcore.routing.headroom import MAX_CLASSES, Headroom, Reading, model_class, read

NOW = parse_rfc3339("2026-12-05T12:00:00Z")
assert NOW is not None


def h(**values: str) -> list[tuple[bytes, bytes]]:
    return [(name.replace("_", "-").encode(), value.encode()) for name, value in values.items()]


def test_anthropic_tightest_limit_wins() -> None:
    headers = h(
        Anthropic_RateLimit_Requests_Limit="4000", anthropic_ratelimit_requests_remaining="3600",
        anthropic_ratelimit_requests_reset="2026-12-05T12:00:06Z",
        anthropic_ratelimit_input_tokens_limit="400000", anthropic_ratelimit_input_tokens_remaining="20000",
        anthropic_ratelimit_input_tokens_reset="2026-12-05T12:00:30Z",
        anthropic_ratelimit_output_tokens_limit="80000", anthropic_ratelimit_output_tokens_remaining="80000",
        anthropic_ratelimit_output_tokens_reset="2026-12-05T12:00:01Z",
        request_id="req_1",
    )
    assert read(headers, NOW) == Reading(0.05, NOW + 30, "input-tokens")


def test_openai_durations_count_from_now() -> None:
    headers = h(
        x_ratelimit_limit_requests="500", x_ratelimit_remaining_requests="450", x_ratelimit_reset_requests="120ms",
        x_ratelimit_limit_tokens="30000", x_ratelimit_remaining_tokens="3000", x_ratelimit_reset_tokens="6m0s",
    )
    assert read(headers, NOW) == Reading(0.1, NOW + 360, "tokens")


def test_unified_utilization_and_rejection() -> None:
    headers = h(
        anthropic_ratelimit_unified_status="allowed",
        anthropic_ratelimit_unified_5h_utilization="0.25", anthropic_ratelimit_unified_5h_reset=str(int(NOW) + 3600),
        anthropic_ratelimit_unified_7d_utilization="0.5", anthropic_ratelimit_unified_7d_reset=str(int(NOW) + 86400),
    )
    assert read(headers, NOW) == Reading(0.5, NOW + 86400, "unified-7d")
    rejected = h(anthropic_ratelimit_unified_status="rejected", anthropic_ratelimit_unified_reset=str(int(NOW) + 60))
    assert read(rejected, NOW) == Reading(0.0, NOW + 60, "unified")


@pytest.mark.parametrize("headers", [
    [],
    h(content_type="application/json"),
    # A limit without its reset, a zero or missing limit, values that are not numbers or times:
    h(anthropic_ratelimit_requests_limit="100", anthropic_ratelimit_requests_remaining="5"),
    h(anthropic_ratelimit_requests_limit="0", anthropic_ratelimit_requests_remaining="0",
      anthropic_ratelimit_requests_reset="2026-12-05T12:00:06Z"),
    h(anthropic_ratelimit_tokens_limit="lots", anthropic_ratelimit_tokens_remaining="5",
      anthropic_ratelimit_tokens_reset="2026-12-05T12:00:06Z"),
    h(x_ratelimit_limit_tokens="100", x_ratelimit_remaining_tokens="5", x_ratelimit_reset_tokens="soon"),
    h(anthropic_ratelimit_unified_5h_utilization="nan", anthropic_ratelimit_unified_5h_reset="1"),
])
def test_headers_that_report_no_usable_limit_read_as_none(headers: list[tuple[bytes, bytes]]) -> None:
    assert read(headers, NOW) is None


@given(st.lists(st.tuples(st.binary(max_size=40), st.binary(max_size=40)), max_size=12),
       st.sampled_from(["anthropic-ratelimit-", "x-ratelimit-", ""]))
def test_any_headers_read_to_none_or_a_fraction_in_range(pairs: list[tuple[bytes, bytes]], prefix: str) -> None:
    headers = [(prefix.encode() + name, value) for name, value in pairs]
    reading = read(headers, NOW)
    assert reading is None or 0.0 <= reading.fraction <= 1.0


def test_headroom_forgets_a_reading_once_its_limit_resets() -> None:
    room = Headroom()
    assert room.fraction("opus", NOW) == 1.0
    room.update("opus", Reading(0.05, NOW + 10, "tokens"))
    assert room.fraction("opus", NOW) == 0.05
    assert room.fraction("sonnet", NOW) == 1.0  # another class has its own limit
    assert room.snapshot(NOW) == {"opus": {"remaining": 0.05, "limit": "tokens", "resets": NOW + 10}}
    assert room.fraction("opus", NOW + 10) == 1.0
    assert room.snapshot(NOW + 10) == {}


@pytest.mark.parametrize(("model", "cls"), [
    ("claude-opus-4-6", "opus"),
    ("claude-3-opus-20240229", "opus"),
    ("claude-sonnet-4-5-20250929", "sonnet"),
    ("claude-haiku-4-5", "haiku"),
    ("gpt-5.1-2025-11-13", "gpt-5.1"),
    ("gpt-5.1-codex", "gpt-5.1-codex"),
    ("GPT-5", "gpt-5"),
    (None, ""),
])
def test_model_class(model: str | None, cls: str) -> None:
    assert model_class(model) == cls


def test_headroom_keeps_a_bounded_number_of_classes() -> None:
    room = Headroom()
    for i in range(MAX_CLASSES):
        room.update(f"model-{i}", Reading(0.5, NOW + 100 + i, "tokens"))
    room.update("model-0", Reading(0.4, NOW + 100, "tokens"))
    assert len(room.snapshot(NOW)) == MAX_CLASSES
    # A new class pushes out the reading that resets first.
    room.update("new", Reading(0.5, NOW + 1000, "tokens"))
    snapshot = room.snapshot(NOW)
    assert len(snapshot) == MAX_CLASSES and "new" in snapshot and "model-0" not in snapshot
