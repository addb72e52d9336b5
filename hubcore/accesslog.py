"""The access log: one line per request, buffered and written on a timer.

Going through `logging` costs about fifty Python calls and a write(2) per
request, a visible share of the hub's own latency; like nginx's
`access_log ... buffer=`, lines are formatted with one %-operation, kept in a
list, and written together at most `flush_interval` seconds later (and at
shutdown). Never a token, key or body: only the usage row's fields.
"""
from __future__ import annotations

import asyncio
import time
from typing import TextIO

import orjson

from hubcore.usage import UsageEvent

# Seconds a line may wait in the buffer; short enough for `journalctl -f`.
FLUSH_INTERVAL = 0.2

TEXT_LINE = (
    "%s access %s user=%s project=%s model=%s key=%s status=%d outcome=%s in=%d out=%d "
    "cw5m=%d cw1h=%d cr=%d cost_micros=%s ttfb_ms=%s total_ms=%.1f attempts=%d\n"
)


class AccessLog:
    def __init__(self, stream: TextIO, loop: asyncio.AbstractEventLoop, json: bool = False, flush_interval: float = FLUSH_INTERVAL) -> None:
        self.stream = stream
        self.loop = loop
        self.json = json
        self.flush_interval = flush_interval
        self.lines: list[str] = []
        self.timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""

    def record(self, event: UsageEvent) -> None:
        if self.json:
            line = orjson.dumps(
                {"ts": event.ts, "logger": "hubcore.access", **{k: getattr(event, k) for k in _JSON_FIELDS}}
            ).decode() + "\n"
        else:
            line = TEXT_LINE % (
                self._timestamp(event.ts), event.request_id, event.user, event.project, event.model,
                event.key_label, event.status, event.outcome, event.input_tokens, event.output_tokens,
                event.cache_write_5m, event.cache_write_1h, event.cache_read, event.cost_micros,
                "-" if event.ttfb_ms is None else "%.1f" % event.ttfb_ms, event.total_ms, event.attempts,
            )
        self.lines.append(line)
        if self.timer is None:
            self.timer = self.loop.call_later(self.flush_interval, self.flush)

    def _timestamp(self, ts: float) -> str:
        second = int(ts)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return self._stamp

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.lines:
            text = "".join(self.lines)
            self.lines = []
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr closed or full: the usage rows still hold every field

    def close(self) -> None:
        self.flush()


_JSON_FIELDS = (
    "request_id", "user", "project", "model", "key_label", "endpoint", "status", "outcome",
    "input_tokens", "output_tokens", "cache_write_5m", "cache_write_1h", "cache_read",
    "reasoning_tokens", "cost_micros", "ttfb_ms", "total_ms", "attempts",
)
