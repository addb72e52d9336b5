"""UsageEvent, the one record every request leaves behind, and its row in the
usage table: the column names and the INSERT that stores it. The writer that
takes events into SQLite is accounting.recorder; its spool, accounting.spool.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import sqlite3
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, cast


class Outcome(enum.StrEnum):
    """How a request ended, as its usage row says (a str: stored as is)."""

    OK = "ok"
    CLIENT_ABORTED = "client_aborted"      # the client left before the answer was complete
    UPSTREAM_ERROR = "upstream_error"      # no answer from the vendor, or its error, before any byte
    UPSTREAM_ABORTED = "upstream_aborted"  # the answer broke off after bytes reached the client
    REFUSED = "refused"                    # the hub refused it (token, limits, route)


OUTCOMES = tuple(Outcome)


@dataclass(slots=True)
class UsageEvent:
    # The field order is the usage table's column order (FIELDS) and that of
    # the positional call in gateway.exchange.usage_event: change all three together.
    ts: float                      # unix time the request arrived
    request_id: str                # also sent to the client as x-hubcore-request-id
    endpoint: str                  # route path without query, e.g. "/v1/messages"
    status: int                    # HTTP status the client received
    outcome: str                   # an Outcome
    total_ms: float
    token_id: int | None = None
    user: str | None = None
    project: str | None = None
    upstream: str | None = None
    key_label: str | None = None
    model: str | None = None
    input_tokens: int = 0          # uncached input (Anthropic meaning, both vendors)
    output_tokens: int = 0         # includes reasoning/thinking
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    cache_read: int = 0
    reasoning_tokens: int = 0
    server_tool_requests: int = 0
    stop_reason: str | None = None
    error_type: str | None = None
    cost_micros: int | None = None
    ttfb_ms: float | None = None
    attempts: int = 0
    session_id: str | None = None
    user_agent: str | None = None
    output_estimated: bool = False  # output_tokens is hubcore's estimate, not the vendor's count
    # None: cost_micros is the model's own price. Else the model has no
    # price and this says how the cost was set (accounting.pricing.BASIS_*):
    # "estimate", "free", "refused" or "unknown" (cost_micros None).
    cost_basis: str | None = None
    # The model id sent upstream when the upstream's model_map rewrote the
    # client's; None when the client's id went as it was (see `model`).
    served_model: str | None = None
    # Every attempt, in order, as routing.attempts.AttemptChain renders it:
    # "primary/a:529,backup/c:200". None: the hub answered by itself.
    route: str | None = None


# The usage table's columns carry the same names as UsageEvent's fields.
FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(UsageEvent))
# A row's values in column order; the bound parameters of a multi-row
# INSERT are `hubcore.accounting.rows.insert_values`.
row: Callable[[UsageEvent], tuple[Any, ...]] = attrgetter(*FIELDS)


# sqlite3 binds an exact int, float or str as it is, and sends any other
# value through its adapter lookup, which, for a type that has no adapter,
# formats an AttributeError and drops it: for a row's Nones, its bool and
# its Outcome, some ten a row and half of the usage writer's binding time,
# which holds the GIL the event loop needs. These adapters bind the same
# values (NULL, 0 or 1, the outcome's text) without the lookup. They are
# process-wide, and bind what sqlite3 would bind anyway.
# None -> None with {}.get: a C call, not a Python frame.
sqlite3.register_adapter(type(None), cast(Callable[[None], None], {}.get))
sqlite3.register_adapter(bool, int)
sqlite3.register_adapter(Outcome, str)


def _insert_sizes() -> tuple[int, ...]:
    """Rows per INSERT statement, the largest first: as many as this
    SQLite's limit of bound parameters allows, up to 256, then 32, 4 and 1
    (see insert_chunks)."""
    with closing(sqlite3.connect(":memory:")) as conn:
        parameters = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    largest = max(1, min(256, parameters // len(FIELDS)))
    return (largest, *(size for size in (32, 4, 1) if size < largest))


# A batch goes in as few multi-row INSERT statements as these sizes make.
# Python's sqlite3 lets go of the GIL around each statement's step and must
# take it back after; while the event loop is busy, each retake is a
# handoff between the two threads, a wake-up each way. Under wrk (c=16,
# 90 KB bodies; counted in /proc), the usage writer's thread switched 0.20
# times a request with 33 rows a statement (the most SQLite before 3.32
# takes), 0.15 with 128 and 0.08 with 512. The ceiling of 256 bounds the rest: binding a
# statement's rows holds the GIL throughout (some 3 µs a row, so under a
# millisecond), and only these four sizes are ever prepared, because
# sqlite3 keeps each statement it ran (128 of them) and one of 256 rows
# takes some 650 KB: a statement sized to each batch's remainder would
# keep tens of megabytes.
INSERT_SIZES = _insert_sizes()
ROWS_PER_INSERT = INSERT_SIZES[0]


def insert_chunks(rows: int) -> list[tuple[int, int]]:
    """How `rows` events go in: (rows per statement, statements), the
    largest size first; at most seven statements of 32 rows, seven of 4
    and three of 1."""
    chunks = []
    for size in INSERT_SIZES:
        statements, rows = divmod(rows, size)
        if statements:
            chunks.append((size, statements))
    return chunks


@functools.lru_cache(maxsize=None)
def insert_sql(rows: int) -> str:
    """INSERT of `rows` events. ON CONFLICT DO NOTHING: request_id is UNIQUE,
    so replaying a spool that was partly written already inserts each event
    exactly once (the spelling both engines take, where INSERT OR IGNORE is
    SQLite's alone)."""
    values = f"({', '.join('?' * len(FIELDS))})"
    return (f"INSERT INTO usage ({', '.join(FIELDS)}) VALUES {', '.join([values] * rows)}"
            " ON CONFLICT (request_id) DO NOTHING")


INSERT_SQL = insert_sql(1)
