"""The usage writer's bound values (`insert_values`), the request path's
UsageEvent maker (`new_event`) and the usage recorder's per-request part
(`RecorderCore`): the compiled twin (`_rows.pyx`) when built, else the
pure-Python one (`_rows_py.py`); `HUBCORE_NO_EXTENSIONS` (any non-empty
value) or a non-CPython interpreter selects the pure twin, as for the
connection cores (hubcore.http.conn)."""

from typing import TYPE_CHECKING

from hubcore import load_twin

__all__ = ["COMPILED", "RecorderCore", "insert_values", "new_event"]

if TYPE_CHECKING:
    from hubcore.accounting._rows_py import RecorderCore, insert_values, new_event

    COMPILED = False
else:
    _twin, COMPILED = load_twin("hubcore.accounting._rows", "hubcore.accounting._rows_py")
    insert_values = _twin.insert_values
    new_event = _twin.new_event
    RecorderCore = _twin.RecorderCore
