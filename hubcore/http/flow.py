"""What the two sides of the hub's HTTP connections share: pausing and
resuming a transport's reading (flow control), and detaching a closed
connection's parser.

The client side (http/server.py) pauses reading while a pipelined request
waits its turn or a refusal is answered; the vendor side (http/client.py)
pauses when the client it streams to cannot keep up. Both calls are
idempotent, so callers need not track who paused last (uvicorn's
FlowControl)."""
from __future__ import annotations

import asyncio
from typing import Any

from hubcore.http.wire import NO_CALLBACKS


class ReadFlow:
    """A protocol's reading, paused and resumed idempotently. Mixed into a
    protocol class, which sets `transport` in connection_made."""

    transport: asyncio.Transport | None = None
    reading_paused = False

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        transport = self.transport
        if self.reading_paused and transport is not None and not transport.is_closing():
            self.reading_paused = False
            transport.resume_reading()


def detached(parser_type: Any) -> Any:
    """A parser of `parser_type` with no callbacks, to replace a closed
    connection's: a live parser holds its connection's bound methods, a
    reference cycle that would keep the connection's objects until a full
    collection."""
    return parser_type(NO_CALLBACKS)
