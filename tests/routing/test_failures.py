"""Failure classification: response heads (statuses, x-should-retry, the
rest a 429 asks for), transport errors, error events inside a stream, and
which failures may be retried on another key."""
from __future__ import annotations

import pytest

from hubcore.http.client import ConnectFailed, ConnectionClosed, UpstreamError, UpstreamTimeout
from hubcore.routing.failures import (
    CIRCUIT_KINDS,
    CLIENT_ABORTED,
    CONNECT_FAILED,
    STREAM_BROKEN,
    TIMEOUT,
    Failure,
    FailureKind,
    classify,
    in_stream_failure,
    parse_rfc3339,
    retryable,
    transport_failure,
)

WALL_START = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def rate_limited(cooldown: float | None = None) -> Failure:
    return Failure(FailureKind.RATE_LIMITED, 429, cooldown)


# -- response heads ----------------------------------------------------------------


def test_classify_statuses() -> None:
    assert classify(200, []) is None
    assert classify(400, []) is None
    assert classify(404, [(b"x-should-retry", b"false")]) is None
    assert classify(413, []) is None
    failure = classify(500, [])
    assert failure is not None and failure.kind is FailureKind.SERVER_ERROR and failure.status == 500
    assert classify(503, []) == Failure(FailureKind.SERVER_ERROR, 503)
    assert classify(529, []) == Failure(FailureKind.OVERLOADED, 529)
    assert classify(401, []) == Failure(FailureKind.AUTH_FAILED, 401)
    assert classify(403, []) == Failure(FailureKind.AUTH_FAILED, 403)
    assert classify(408, []) == Failure(FailureKind.TRANSIENT, 408)
    assert classify(409, []) == Failure(FailureKind.TRANSIENT, 409)
    assert classify(429, [], wall_now=WALL_START) == Failure(FailureKind.RATE_LIMITED, 429, None)


def test_retryable_follows_sdk_rules_and_x_should_retry() -> None:
    for status in (408, 409, 429, 500, 502, 529, 401, 403):
        failure = classify(status, [], wall_now=WALL_START)
        assert failure is not None and retryable(failure), status

    no = [(b"X-Should-Retry", b"false")]
    for status in (429, 500, 529, 409):
        failure = classify(status, no, wall_now=WALL_START)
        assert failure is not None and failure.should_retry is False and not retryable(failure), status

    # A 4xx the vendor marks retryable is retried, and is no mark against the key.
    failure = classify(400, [(b"x-should-retry", b"true")])
    assert failure == Failure(FailureKind.TRANSIENT, 400, should_retry=True) and retryable(failure)

    # A refused key is retried on another key whatever the header says: it
    # speaks of the credential, and the next attempt carries a different one.
    failure = classify(401, no)
    assert failure is not None and failure.kind is FailureKind.AUTH_FAILED and retryable(failure)


def test_429_cooldown_prefers_retry_after_ms_then_retry_after() -> None:
    h = [(b"retry-after", b"7"), (b"retry-after-ms", b"6500")]
    assert classify(429, h, wall_now=WALL_START) == rate_limited(6.5)
    assert classify(429, [(b"Retry-After", b"7")], wall_now=WALL_START) == rate_limited(7.0)
    date = [(b"retry-after", b"Thu, 01 Jan 2026 00:00:30 GMT")]
    assert classify(429, date, wall_now=WALL_START) == rate_limited(30.0)
    assert classify(429, date, wall_now=WALL_START + 60) == rate_limited(0.0)
    # Retry-after beats the reset headers.
    both = [(b"retry-after", b"2"), (b"anthropic-ratelimit-requests-remaining", b"0"),
            (b"anthropic-ratelimit-requests-reset", b"2026-01-01T00:01:00Z")]
    assert classify(429, both, wall_now=WALL_START) == rate_limited(2.0)
    # Unparsable values fall through to the default.
    assert classify(429, [(b"retry-after", b"soon"), (b"retry-after-ms", b"-3")], wall_now=WALL_START) == rate_limited(None)


def test_429_cooldown_from_earliest_exhausted_reset() -> None:
    headers = [
        (b"anthropic-ratelimit-requests-remaining", b"0"),
        (b"anthropic-ratelimit-requests-reset", b"2026-01-01T00:00:05.5Z"),
        (b"anthropic-ratelimit-tokens-remaining", b"0"),
        (b"anthropic-ratelimit-tokens-reset", b"2026-01-01T01:00:03+01:00"),
        # Not exhausted: its earlier reset does not count.
        (b"anthropic-ratelimit-input-tokens-remaining", b"1200"),
        (b"anthropic-ratelimit-input-tokens-reset", b"2026-01-01T00:00:01Z"),
    ]
    failure = classify(429, headers, wall_now=WALL_START)
    assert failure is not None and failure.cooldown == pytest.approx(3.0)
    # A reset already in the past means: no rest at all.
    past = [(b"anthropic-ratelimit-output-tokens-remaining", b"0"),
            (b"anthropic-ratelimit-output-tokens-reset", b"2025-12-31T23:59:00Z")]
    assert classify(429, past, wall_now=WALL_START) == rate_limited(0.0)


def test_429_cooldown_from_openai_reset_durations() -> None:
    headers = [
        (b"x-ratelimit-remaining-requests", b"0"),
        (b"x-ratelimit-reset-requests", b"6m0s"),
        (b"x-ratelimit-remaining-tokens", b"0"),
        (b"x-ratelimit-reset-tokens", b"1.5s"),
    ]
    assert classify(429, headers, wall_now=WALL_START) == rate_limited(1.5)
    ms = [(b"x-ratelimit-remaining-tokens", b"0"), (b"x-ratelimit-reset-tokens", b"1m20ms")]
    failure = classify(429, ms, wall_now=WALL_START)
    assert failure is not None and failure.cooldown == pytest.approx(60.02)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-01T00:00:00Z", WALL_START),
        ("2026-01-01T00:00:01.25Z", WALL_START + 1.25),
        ("2026-01-01t00:00:02.123456789z", WALL_START + 2.123456789),
        ("2026-01-01T02:00:00+02:00", WALL_START),
        ("2025-12-31T19:30:00-04:30", WALL_START),
        ("2026-01-01 00:00:00Z", WALL_START),
        ("2016-12-31T23:59:60Z", 1_483_228_800.0),
    ],
)
def test_parse_rfc3339(text: str, expected: float) -> None:
    assert parse_rfc3339(text) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "text", ["", "soon", "2026-01-01", "2026-01-01T00:00:00", "2026-02-30T00:00:00Z", "2026-01-01T24:00:00Z", "1767225600"]
)
def test_parse_rfc3339_rejects(text: str) -> None:
    assert parse_rfc3339(text) is None


# -- transport errors and in-stream errors -------------------------------------------


def test_transport_errors_by_kind() -> None:
    # A connect that timed out is a failure to connect (the short pauses),
    # not a timeout waiting for an answer.
    assert transport_failure(ConnectFailed("connect to x:443 timed out after 10 s")) == CONNECT_FAILED
    assert transport_failure(ConnectionClosed("upstream closed the connection")) == CONNECT_FAILED
    assert transport_failure(UpstreamError("invalid response from upstream")) == CONNECT_FAILED
    assert transport_failure(UpstreamTimeout("no response from upstream within 1 s")) == TIMEOUT
    stalled = UpstreamTimeout("upstream stream idle for 1 s", before_response=False)
    assert transport_failure(stalled) == TIMEOUT
    # Once the client got bytes, whatever broke is a broken stream.
    for error in (stalled, ConnectionClosed("gone", before_response=False)):
        assert transport_failure(error, midstream=True) == STREAM_BROKEN
    assert {CONNECT_FAILED.kind, TIMEOUT.kind, STREAM_BROKEN.kind} <= CIRCUIT_KINDS
    assert retryable(CONNECT_FAILED) and retryable(TIMEOUT)
    assert not retryable(CLIENT_ABORTED)


def test_in_stream_errors_count_like_the_status_they_stand_for() -> None:
    assert in_stream_failure(None) is None
    assert in_stream_failure("overloaded_error") == Failure(FailureKind.OVERLOADED, 529)
    assert in_stream_failure("api_error") == Failure(FailureKind.SERVER_ERROR, 500)  # Anthropic
    assert in_stream_failure("server_error") == Failure(FailureKind.SERVER_ERROR, 500)  # OpenAI
    # About the request, not the key.
    for error_type in ("invalid_request_error", "rate_limit_error", "", "upstream_aborted"):
        assert in_stream_failure(error_type) is None, error_type
