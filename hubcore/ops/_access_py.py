"""The access log's per-request line, pure Python: the twin of
`_access.pyx` (hubcore.ops.access_core picks one).

`AccessCore` formats the line of a request that left a usage row and adds
it to the buffer, starting the flush timer when the buffer was empty;
`AccessLog` (hubcore.ops.accesslog) subclasses it and keeps the rest (the
lines of refused requests, the flush, the refusal summaries) in Python.
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import orjson

from hubcore.accounting.usage import UsageEvent

# One format for every access line, with or without a usage row: `-` where
# a request had no such thing (a refused request has no user, model or key).
TEXT_LINE = (
    "%s access %s user=%s project=%s model=%s key=%s status=%d outcome=%s in=%d out=%d "
    "cw5m=%d cw1h=%d cr=%d cost_micros=%s ttfb_ms=%s total_ms=%.3f attempts=%d endpoint=%s client=%s\n"
)

_JSON_FIELDS = (
    "request_id", "user", "project", "model", "key_label", "endpoint", "status", "outcome",
    "input_tokens", "output_tokens", "cache_write_5m", "cache_write_1h", "cache_read",
    "reasoning_tokens", "cost_micros", "ttfb_ms", "total_ms", "attempts",
)


def _json_line(ts: float, fields: dict[str, object], client: str | None) -> str:
    """An access line as the JSON log formatter shapes every record
    (runtime.JsonFormatter): ts, level, logger, msg, then the fields."""
    return orjson.dumps(
        {"ts": ts, "level": "info", "logger": "hubcore.access", "msg": "access", **fields, "client": client}
    ).decode() + "\n"


class AccessCore:
    """The buffer of access lines and the line of each usage row."""

    def __init__(self, loop: asyncio.AbstractEventLoop, json: bool, flush_interval: float) -> None:
        self.loop = loop
        self.json = json
        self.flush_interval = flush_interval
        self.lines: list[str] = []
        self.timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""

    def record(self, event: UsageEvent, client: str | None = None) -> None:
        """The line of a request that left a usage row."""
        if self.json:
            line = _json_line(event.ts, {k: getattr(event, k) for k in _JSON_FIELDS}, client)
        else:
            line = TEXT_LINE % (
                self._timestamp(event.ts), event.request_id, event.user or "-", event.project or "-",
                event.model or "-", event.key_label or "-", event.status, event.outcome, event.input_tokens,
                event.output_tokens, event.cache_write_5m, event.cache_write_1h, event.cache_read,
                "-" if event.cost_micros is None else event.cost_micros,
                "-" if event.ttfb_ms is None else "%.3f" % event.ttfb_ms, event.total_ms, event.attempts,
                event.endpoint, client or "-",
            )
        self._append(line)

    def _append(self, line: str) -> None:
        self.lines.append(line)
        if self.timer is None:
            self.timer = self.loop.call_later(self.flush_interval, self.flush)

    def _timestamp(self, ts: float) -> str:
        second = int(ts)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return self._stamp

    if TYPE_CHECKING:
        def flush(self) -> None: ...  # AccessLog's
