"""HTTP head handling on the hot path: the compiled twin (`_wire.pyx`) when
built, else the pure-Python one (`_wire_py.py`); `HUBCORE_NO_EXTENSIONS`
(any non-empty value) or a non-CPython interpreter selects the pure twin, as
for the meter (hubcore.accounting.meter)."""

import os
import platform
from types import SimpleNamespace
from typing import TYPE_CHECKING

__all__ = ["COMPILED", "CONTROL", "NO_CALLBACKS", "HeaderCollector", "render_head"]

# The callbacks of a closed connection's parser: none. A live parser holds
# its connection's bound methods, a reference cycle that would keep a closed
# connection's objects until a full collection; connection_lost (server.py,
# upstream.py) swaps in a parser built on this instead.
NO_CALLBACKS = SimpleNamespace()

COMPILED = False
if TYPE_CHECKING:
    from hubcore.http._wire_py import CONTROL, HeaderCollector, render_head
else:
    if not os.environ.get("HUBCORE_NO_EXTENSIONS") and platform.python_implementation() == "CPython":
        try:
            from hubcore.http._wire import CONTROL, HeaderCollector, render_head

            COMPILED = True
        except ImportError:
            pass
    if not COMPILED:
        from hubcore.http._wire_py import CONTROL, HeaderCollector, render_head
