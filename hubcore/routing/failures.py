"""What went wrong with one attempt on one key, in one vocabulary: a
response head (`classify`), a transport error (`transport_failure`), an error
event inside a stream (`in_stream_failure`), and whether the request may go
out again (`retryable`). Pure functions; the key ring decides what each
failure does to a key (hubcore.routing.keys).
"""
from __future__ import annotations

import calendar
import email.utils
import enum
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "CIRCUIT_KINDS",
    "CLIENT_ABORTED",
    "CONNECT_FAILED",
    "STREAM_BROKEN",
    "TIMEOUT",
    "TIMEOUT_ERROR_KIND",
    "UNREACHED_KINDS",
    "Failure",
    "FailureKind",
    "TransportError",
    "classify",
    "in_stream_failure",
    "nonnegative_number",
    "parse_duration",
    "parse_rfc3339",
    "retryable",
    "transport_failure",
]


class FailureKind(enum.Enum):
    RATE_LIMITED = "rate_limited"  # 429
    SERVER_ERROR = "server_error"  # 5xx other than 529
    OVERLOADED = "overloaded"  # 529
    CONNECT_FAILED = "connect_failed"
    TIMEOUT = "timeout"
    AUTH_FAILED = "auth_failed"  # 401/403: the key, not the request, is refused
    # 408, 409, or a 4xx the vendor marks `x-should-retry: true`: worth another
    # try, but says nothing against the key.
    TRANSIENT = "transient"
    CLIENT_ABORTED = "client_aborted"  # the client left; no verdict on the key
    # The upstream connection broke or stalled after the client got bytes:
    # the one failure a retry cannot hide from the user.
    STREAM_BROKEN = "stream_broken"


# Failures that count towards a key's circuit breaker.
CIRCUIT_KINDS = frozenset(
    {
        FailureKind.SERVER_ERROR,
        FailureKind.OVERLOADED,
        FailureKind.CONNECT_FAILED,
        FailureKind.TIMEOUT,
        FailureKind.STREAM_BROKEN,
    }
)
# Circuit failures that say the vendor could not be reached at all, which the
# hub's probe tests as well as a user's request would: the short pauses.
UNREACHED_KINDS = frozenset({FailureKind.CONNECT_FAILED, FailureKind.TIMEOUT})
_RETRYABLE_KINDS = CIRCUIT_KINDS | {FailureKind.RATE_LIMITED, FailureKind.AUTH_FAILED, FailureKind.TRANSIENT}


@dataclass(frozen=True, slots=True)
class Failure:
    """What went wrong with one attempt on one key."""

    kind: FailureKind
    status: int | None = None
    # RATE_LIMITED: seconds the key should rest, from the response headers;
    # None means the policy's cooldown_default.
    cooldown: float | None = None
    # The vendor's `x-should-retry`, when it sent one.
    should_retry: bool | None = None

    def describe(self) -> str:
        """Short text for stats (never holds a secret or a response body)."""
        text = self.kind.value.replace("_", " ")
        return text if self.status is None else f"{self.status} {text}"


def retryable(failure: Failure) -> bool:
    """Whether the request may go out again on another key.

    The vendor's `x-should-retry` decides first, except for 401/403: those
    speak of the credential, and the next attempt carries another one (a
    client holding a valid hub token must not see a vendor 401 while other
    keys work). Otherwise what the SDKs retry (408, 409, 429, >= 500,
    connection errors) is retried; CLIENT_ABORTED never is.
    """
    if failure.kind is FailureKind.AUTH_FAILED:
        return True
    if failure.should_retry is not None:
        return failure.should_retry
    return failure.kind in _RETRYABLE_KINDS


def classify(status: int, headers: Iterable[tuple[bytes, bytes]], wall_now: float | None = None) -> Failure | None:
    """Turn an upstream response head into a Failure, or None when it says
    nothing against the key and should reach the client as it is (2xx, 3xx,
    and 4xx about the request itself). `wall_now` (unix time) is the clock
    that RFC 3339 reset times are measured against; default: now.
    """
    if status < 400:
        return None
    should_retry: bool | None = None
    wanted: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name = raw_name.lower()
        if name == b"x-should-retry":
            value = raw_value.strip().lower()
            should_retry = True if value == b"true" else False if value == b"false" else None
        elif status == 429 and (
            name in (b"retry-after", b"retry-after-ms")
            or name.startswith(b"anthropic-ratelimit-")
            or name.startswith(b"x-ratelimit-")
        ):
            wanted[name.decode("latin-1")] = raw_value.decode("latin-1").strip()
    if status == 429:
        cooldown = _rate_limit_cooldown(wanted, time.time() if wall_now is None else wall_now)
        return Failure(FailureKind.RATE_LIMITED, status, cooldown, should_retry)
    if status in (401, 403):
        return Failure(FailureKind.AUTH_FAILED, status, should_retry=should_retry)
    if status == 529:
        return Failure(FailureKind.OVERLOADED, status, should_retry=should_retry)
    if status >= 500:
        return Failure(FailureKind.SERVER_ERROR, status, should_retry=should_retry)
    if status in (408, 409) or should_retry:
        return Failure(FailureKind.TRANSIENT, status, should_retry=should_retry)
    return None


def _rate_limit_cooldown(headers: dict[str, str], wall_now: float) -> float | None:
    """Seconds to rest after a 429: `retry-after-ms`, else `retry-after`, else
    the earliest reset among the exhausted limits (remaining == 0), else None.

    Earliest, not latest: the vendors' limits are token buckets and `reset` is
    when a bucket is full again; capacity trickles back long before, so the
    latest full refill would rest the key far longer than needed.
    """
    seconds = nonnegative_number(headers.get("retry-after-ms"))
    if seconds is not None:
        return seconds / 1000.0
    retry_after = headers.get("retry-after")
    if retry_after is not None:
        seconds = nonnegative_number(retry_after)
        if seconds is not None:
            return seconds
        when = _http_date(retry_after)
        if when is not None:
            return max(0.0, when - wall_now)
    earliest: float | None = None
    for name, value in headers.items():
        delay: float | None = None
        if name.startswith("anthropic-ratelimit-") and name.endswith("-remaining") and value == "0":
            reset = headers.get(name[: -len("remaining")] + "reset")
            when = parse_rfc3339(reset) if reset is not None else None
            delay = None if when is None else max(0.0, when - wall_now)
        elif name.startswith("x-ratelimit-remaining-") and value == "0":
            # OpenAI: x-ratelimit-reset-<limit> is a duration such as "6m0s".
            reset = headers.get("x-ratelimit-reset-" + name[len("x-ratelimit-remaining-") :])
            delay = parse_duration(reset) if reset is not None else None
        if delay is not None and (earliest is None or delay < earliest):
            earliest = delay
    return earliest


def nonnegative_number(text: str | bytes | None) -> float | None:
    """A header's value (as text or as its bytes) as a finite number >= 0;
    None when it is not one."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _http_date(text: str) -> float | None:
    try:
        return email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)


def parse_rfc3339(text: str) -> float | None:
    """Unix time of an RFC 3339 timestamp (any number of fractional digits,
    `Z` or a numeric offset); None when it is not one."""
    m = _RFC3339.fullmatch(text.strip())
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    if not (1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1]):
        return None
    # Second 60 is a leap second: RFC 3339 allows it, timegm counts it as :00 of the next minute.
    if hour > 23 or minute > 59 or second > 60:
        return None
    value = float(calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)))
    if m.group(7):
        value += float("0." + m.group(7))
    if m.group(9):
        offset = int(m.group(10)) * 3600 + int(m.group(11)) * 60
        value -= offset if m.group(9) == "+" else -offset
    return value


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|h|m|s))+")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(text: str) -> float | None:
    """Seconds of a Go-style duration as OpenAI writes its rate-limit resets
    ("6m0s", "1.5s", "120ms"); None when it is not one."""
    if not _DURATION.fullmatch(text):
        return None
    return sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(text))


# The failures that need no detail, shared rather than built per attempt.
CONNECT_FAILED = Failure(FailureKind.CONNECT_FAILED)
TIMEOUT = Failure(FailureKind.TIMEOUT)
CLIENT_ABORTED = Failure(FailureKind.CLIENT_ABORTED)
# The vendor failed after the client got bytes: counted like a 5xx (the long
# pauses), as it is the one failure no retry hides from the user.
STREAM_BROKEN = Failure(FailureKind.STREAM_BROKEN)

# The `kind` of the HTTP client's errors that ran out of time waiting for
# the vendor (hubcore.http.client.UpstreamTimeout). A connect that timed out
# is a connect failure ("connect_failed"), like a refused one.
TIMEOUT_ERROR_KIND = "timeout"


class TransportError(Protocol):
    """What the key ring needs of an error talking to the vendor
    (hubcore.http.client.UpstreamError): its kind, one word."""

    @property
    def kind(self) -> str: ...


def transport_failure(error: TransportError, *, midstream: bool = False) -> Failure:
    """What an exchange with the vendor that failed without an answer to
    judge says against the key: a broken stream once the client got bytes
    (`midstream`), else a timeout or, for anything else (refused, reset,
    closed, a TLS or protocol error), a failure to reach the vendor."""
    if midstream:
        return STREAM_BROKEN
    return TIMEOUT if error.kind == TIMEOUT_ERROR_KIND else CONNECT_FAILED


# An `error` event inside a 200 stream counts against the key like the
# status the vendor would have answered with before streaming.
_IN_STREAM = {
    "overloaded_error": Failure(FailureKind.OVERLOADED, 529),
    "api_error": Failure(FailureKind.SERVER_ERROR, 500),  # Anthropic
    "server_error": Failure(FailureKind.SERVER_ERROR, 500),  # OpenAI
}


def in_stream_failure(error_type: str | None) -> Failure | None:
    """What the `error` event a stream carried (its type, as the meter read
    it; None: no error event) says against the key: the vendor overloaded or
    failing mid-answer; None for any other error, which is about the request."""
    return None if error_type is None else _IN_STREAM.get(error_type)
