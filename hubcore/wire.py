"""HTTP head handling on the hot path: the compiled twin (`_wire.pyx`) when
built, else the pure-Python one (`_wire_py.py`); `HUBCORE_NO_EXTENSIONS`
(any non-empty value) or a non-CPython interpreter selects the pure twin, as
for the meter (hubcore.sse)."""

import os
import platform
from typing import TYPE_CHECKING

__all__ = ["COMPILED", "CONTROL", "HeaderCollector", "render_head"]

COMPILED = False
if TYPE_CHECKING:
    from hubcore._wire_py import CONTROL, HeaderCollector, render_head
else:
    if not os.environ.get("HUBCORE_NO_EXTENSIONS") and platform.python_implementation() == "CPython":
        try:
            from hubcore._wire import CONTROL, HeaderCollector, render_head

            COMPILED = True
        except ImportError:
            pass
    if not COMPILED:
        from hubcore._wire_py import CONTROL, HeaderCollector, render_head
