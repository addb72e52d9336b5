"""What the hub sets up in its process rather than in its objects: logging
to stderr (text, or one JSON object a line), glibc's malloc thresholds, and
when CPython's cyclic garbage collector runs its full collections."""
from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, TextIO

import orjson

from hubcore.config import Config


# -- logging ----------------------------------------------------------------------

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ts (unix seconds), level,
    logger, msg, and a traceback in `exc` (never on lines of its own)."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except (TypeError, ValueError) as e:
            # A call whose arguments do not fit its format: say so on the
            # line rather than let logging print its own complaint as text.
            message = f"{record.msg!r} % {record.args!r} (unformattable: {e})"
        data: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": message,
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            data["exc"] = record.exc_text
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        try:
            return orjson.dumps(data).decode()
        except TypeError:
            # orjson refuses lone surrogates (a file name decoded with
            # surrogateescape): escape them instead of losing the line.
            return orjson.dumps({k: v.encode("utf-8", "backslashreplace").decode() if isinstance(v, str) else v
                                 for k, v in data.items()}).decode()


def setup_logging(config: Config, stream: TextIO | None = None) -> None:
    """Send every log record of the process to stderr, as text or, with
    `log_format = "json"`, one JSON object a line.

    The handler sits on the root logger, so records of asyncio and of any
    library take the same shape as hubcore's; hubcore's own records are
    kept at the configured level, the others from warning up. In JSON mode
    warnings and uncaught exceptions (main thread or not) become records
    too, so nothing the running hub writes is a line of plain text.
    """
    level = logging.getLevelName(config.server.log_level.upper())
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    json = config.server.log_format == "json"
    handler.setFormatter(JsonFormatter() if json else logging.Formatter(TEXT_FORMAT))
    # One access line per request: skip the record fields no format here
    # prints (the caller's file and line, process and thread names).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(level, logging.WARNING))
    hubcore = logging.getLogger("hubcore")
    hubcore.handlers[:] = []
    hubcore.setLevel(level)
    hubcore.propagate = True
    if json:
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("hubcore").critical("uncaught exception", exc_info=(kind, value, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None or issubclass(args.exc_type, SystemExit):
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("hubcore").critical(
        "uncaught exception in thread %s", name, exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


# -- malloc -----------------------------------------------------------------------

# glibc's mallopt() parameters and the hub's values for them (bytes).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MALLOC_TUNING = ((M_TRIM_THRESHOLD, 8 * 1024 * 1024), (M_MMAP_THRESHOLD, 1024 * 1024))
MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def tune_malloc(environ: Mapping[str, str] = os.environ) -> bool:
    """Keep freed request buffers for reuse instead of returning them to the
    system at once; True if applied.

    Each request passes some 200 KB through buffers of 26 to 256 KB (socket
    reads, the body). glibc gives the top of its heap back to the system
    whenever more than 128 KB is free there, so at 16 concurrent requests the
    heap shrank and grew back all the time: about 11 page faults per request,
    a third of the hub's system time. Up to 8 MB free is now kept, and blocks
    under 1 MB come from the heap (glibc would raise both limits itself only
    after freeing blocks it had mmap()ed, which these are not). A no-op off
    glibc, or when the operator sets glibc's MALLOC_* variables.
    """
    if any(name in environ for name in MALLOC_ENV):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in MALLOC_TUNING)


# -- the cyclic garbage collector ------------------------------------------------

# A generation-2 threshold no count of younger collections reaches.
NEVER = 1 << 30


class CycleCollector:
    """When CPython's cyclic collector runs its full collections: every
    `interval` seconds, on a timer, rather than when its heuristics fire.

    A full collection walks every object the collector tracks, and the event
    loop waits for it: with 1,000 streams open one took 15 to 40 ms, and
    every request that arrived meanwhile waited that long for its first
    byte. CPython runs them as the heap grows, that is, exactly while many
    streams open at once. The hub's request path makes no reference cycles,
    so its garbage goes by reference counting and young collections; full
    collections only catch the rare long-lived cycle (an exception kept by a
    long stream), and once every ten minutes (the default) is often enough
    for that. `start` also freezes what startup made (modules,
    configuration, tables): no collection walks those again. An interval
    of 0 leaves the collector as CPython has it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        self.loop = loop
        self.interval = interval
        self.started = False
        self.full_collections = 0
        self.collected = 0
        self.last_pause_ms: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._thresholds: tuple[int, int, int] | None = None

    def start(self) -> None:
        if self.interval <= 0 or self.started:
            return
        gc.collect()
        gc.freeze()
        self._thresholds = gc.get_threshold()
        young, middle, _ = self._thresholds
        gc.set_threshold(young, middle, NEVER)
        self.started = True
        self._timer = self.loop.call_later(self.interval, self._collect)

    def _collect(self) -> None:
        started = time.perf_counter()
        self.collected += gc.collect(2)
        self.last_pause_ms = (time.perf_counter() - started) * 1000.0
        self.full_collections += 1
        self._timer = self.loop.call_later(self.interval, self._collect)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._thresholds is not None:
            gc.set_threshold(*self._thresholds)
            self._thresholds = None

    def stats(self) -> dict[str, Any]:
        return {
            "scheduled": self.started,
            "frozen_objects": gc.get_freeze_count(),
            "full_collections": self.full_collections,
            "collected": self.collected,
            "last_full_collection_ms": self.last_pause_ms,
            "collections_by_generation": [g["collections"] for g in gc.get_stats()],
        }
