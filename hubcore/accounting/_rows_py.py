"""The usage writer's bound values, the request path's UsageEvent maker
and the usage recorder's `record`: the pure-Python twin of `_rows.pyx`
(tests/accounting/test_rows.py holds both to it)."""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any

from hubcore.accounting.usage import UsageEvent, row

# The recorder's (accounting.recorder): operators filter on it.
log = logging.getLogger("hubcore.usage")

Listener = Callable[[UsageEvent], None]


def insert_values(events: Sequence[UsageEvent]) -> list[Any]:
    """The bound parameters of a multi-row INSERT of `events` (see
    usage.insert_sql), row after row, each in the usage table's column order."""
    return list(chain.from_iterable(map(row, events)))


def new_event(values: tuple[Any, ...]) -> UsageEvent:
    """The UsageEvent of `values`, given in FIELDS order (its positional call)."""
    return UsageEvent(*values)


class RecorderCore:
    """What accounting.recorder.UsageRecorder does for every request:
    `record`. The rest, rare or off the request path (the count of unpriced
    models, the spool when the queue is full or closed, the writer), is the
    subclass's."""

    def __init__(self, queue_max: int, batch_max: int) -> None:
        self._queue_max = queue_max
        self._batch_max = batch_max
        self._listeners: list[Listener] = []
        self._queue: deque[UsageEvent] = deque()
        self._wake = asyncio.Event()
        self._closed = False

    if TYPE_CHECKING:
        # The rare paths, written once in UsageRecorder.
        def _count_unpriced(self, model: str) -> None: ...
        def _overflow(self, event: UsageEvent) -> None: ...

    def record(self, event: UsageEvent) -> None:
        """Queue one event for writing. Non-blocking; never raises.

        Call it from the event loop's thread (the queue and the spool are not
        locked), like every other method of the recorder.
        """
        model = event.model
        if model is not None and (event.cost_basis is not None or event.cost_micros is None):
            self._count_unpriced(model)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("usage listener %r failed", listener)
        queue = self._queue
        if self._closed or len(queue) >= self._queue_max:
            self._overflow(event)
            return
        queue.append(event)
        n = len(queue)
        if n == 1 or n >= self._batch_max:
            self._wake.set()
