"""The access log: one line per request, buffered and written on a timer.

Going through `logging` costs about fifty Python calls and a write(2) per
request, a visible share of the hub's own latency; like nginx's
`access_log ... buffer=`, lines are formatted with one %-operation, kept in a
list, and written together at most `flush_interval` seconds later (and at
shutdown). Never a token, key or body: only the usage row's fields.

Requests refused before a token was accepted leave no usage row; their lines
have the same format, with `-` for what they lack, at most one per client
address and status every `REFUSAL_WINDOW` seconds, then one summary line
through `logging` (`RefusalLog`). With `log_format = "json"` each line is a
JSON object with the fields every log record has (ts, level, logger, msg).
"""
from __future__ import annotations

import asyncio
import logging
from typing import TextIO

from hubcore.ops.access_core import _JSON_FIELDS, TEXT_LINE, AccessCore, _json_line

# Seconds a line may wait in the buffer; short enough for `journalctl -f`.
FLUSH_INTERVAL = 0.2
# A client retrying a wrong token in a loop wrote one line per try: 105,000
# lines in the journal for 105,000 tries. Per client address and status, the
# first refusal of a window is logged in full and the others counted.
REFUSAL_WINDOW = 10.0  # seconds
# Windows open at once (some 300 bytes each: 3 MB at most); beyond it the
# oldest is summarised early, so a flood from many addresses cannot grow
# memory and no count is lost.
REFUSAL_WINDOWS_MAX = 10_000
SUMMARY_LINE = "%d more requests from %s refused with %d in the last %.1f s"

MAX_PATH_TEXT = 200  # bytes of a refused request's path shown; a path is the client's to choose


class AccessLog(AccessCore):
    """The access log of one hub process. The line of each usage row and the
    buffer are its base's (hubcore.ops.access_core: compiled when built)."""

    def __init__(self, stream: TextIO, loop: asyncio.AbstractEventLoop, json: bool = False, flush_interval: float = FLUSH_INTERVAL) -> None:
        super().__init__(loop, json, flush_interval)
        self.stream = stream
        self.refusals = RefusalLog(loop, logging.getLogger("hubcore.access"))

    def refused(self, ts: float, request_id: str, path: bytes, status: int, outcome: str,
                total_ms: float, client: str | None) -> None:
        """The line of a request refused before a token was accepted (no
        usage row): the same fields, empty where it had none."""
        endpoint = printable_path(path)
        if self.json:
            fields = dict(_REFUSED_FIELDS, request_id=request_id, endpoint=endpoint, status=status,
                          outcome=outcome, total_ms=total_ms)
            line = _json_line(ts, fields, client)
        else:
            line = TEXT_LINE % (
                self._timestamp(ts), request_id, "-", "-", "-", "-", status, outcome, 0, 0, 0, 0, 0, "-", "-",
                total_ms, 0, endpoint, client or "-",
            )
        self._append(line)

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
        self.refusals.close()


class RefusalLog:
    """Which refused requests are logged one by one, and the summaries of the rest.

    Theory of operation: the first refusal from an (address, status) opens a
    window of `window` seconds and is logged in full by the caller (`admit`
    returns True); the refusals that follow inside the window are only
    counted. When the window ends, a count above zero becomes one summary
    line, and the next refusal opens a new window. Windows are kept in a
    dict in the order they opened, so the oldest is always first: one timer,
    set for the oldest, ends them, and eviction at `max_windows` takes the
    front too. Times are the loop's clock.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, logger: logging.Logger, window: float = REFUSAL_WINDOW,
                 max_windows: int = REFUSAL_WINDOWS_MAX) -> None:
        self.loop = loop
        self.logger = logger
        self.window = window
        self.max_windows = max_windows
        # (address, status) -> [when the window opened, refusals counted and not logged]
        self.windows: dict[tuple[str, int], list[float]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def admit(self, address: str, status: int, now: float) -> bool:
        """True if this refusal is to be logged in full; False if it was counted."""
        key = (address, status)
        entry = self.windows.get(key)
        if entry is not None:
            if now < entry[0] + self.window:
                entry[1] += 1
                return False
            self._end(key, now)  # ended; the timer has not run yet
        elif len(self.windows) >= self.max_windows:
            self._end(next(iter(self.windows)), now)
        self.windows[key] = [now, 0]
        if self._timer is None:
            self._timer = self.loop.call_at(now + self.window, self._sweep)
        return True

    def expire(self, now: float) -> None:
        """Summarise the windows that ended by `now`."""
        windows = self.windows
        while windows:
            key = next(iter(windows))
            if windows[key][0] + self.window > now:
                break
            self._end(key, now)

    def close(self) -> None:
        """Summarise every open window now (at shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = self.loop.time()
        while self.windows:
            self._end(next(iter(self.windows)), now)

    def _sweep(self) -> None:
        self._timer = None
        self.expire(self.loop.time())
        if self.windows:
            opened = next(iter(self.windows.values()))[0]
            self._timer = self.loop.call_at(opened + self.window, self._sweep)

    def _end(self, key: tuple[str, int], now: float) -> None:
        opened, count = self.windows.pop(key)
        if count:
            self.logger.info(SUMMARY_LINE, count, key[0], key[1], now - opened)


# A refused request's values of the fields it has no usage for.
_REFUSED_FIELDS: dict[str, object] = {
    **dict.fromkeys(_JSON_FIELDS, None),
    **dict.fromkeys(("input_tokens", "output_tokens", "cache_write_5m", "cache_write_1h", "cache_read",
                     "reasoning_tokens", "attempts"), 0),
}


def printable_path(path: bytes) -> str:
    """A request path as one token of a log line: bytes outside printable
    ASCII (and spaces) percent-escaped, at most MAX_PATH_TEXT of them."""
    text = "".join(chr(b) if 0x21 <= b <= 0x7E and b != 0x25 else "%%%02X" % b for b in path[:MAX_PATH_TEXT])
    return text + "..." if len(path) > MAX_PATH_TEXT else text
