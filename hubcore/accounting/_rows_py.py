"""The usage writer's bound values: the pure-Python twin of `_rows.pyx`
(tests/accounting/test_rows.py holds both to it)."""
from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Any

from hubcore.accounting.usage import UsageEvent, row


def insert_values(events: Sequence[UsageEvent]) -> list[Any]:
    """The bound parameters of a multi-row INSERT of `events` (see
    usage.insert_sql), row after row, each in the usage table's column order."""
    return list(chain.from_iterable(map(row, events)))


def new_event(values: tuple[Any, ...]) -> UsageEvent:
    """The UsageEvent of `values`, given in FIELDS order (its positional call)."""
    return UsageEvent(*values)
