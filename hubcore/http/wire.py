"""HTTP head handling on the hot path: the compiled twin (`_wire.pyx`) when
built, else the pure-Python one (`_wire_py.py`); `HUBCORE_NO_EXTENSIONS`
(any non-empty value) or a non-CPython interpreter selects the pure twin, as
for the meter (hubcore.accounting.meter)."""

from types import SimpleNamespace
from typing import TYPE_CHECKING

from hubcore import load_twin

__all__ = ["COMPILED", "CONTROL", "NO_CALLBACKS", "HeaderCollector", "HeaderList", "first_value", "index_of", "render_head"]

# The callbacks of a closed connection's parser: none. A live parser holds
# its connection's bound methods, a reference cycle that would keep a closed
# connection's objects until a full collection; connection_lost (server.py,
# upstream.py) swaps in a parser built on this instead.
NO_CALLBACKS = SimpleNamespace()

if TYPE_CHECKING:
    from hubcore.http._wire_py import CONTROL, HeaderCollector, HeaderList, first_value, index_of, render_head

    COMPILED = False
else:
    _twin, COMPILED = load_twin("hubcore.http._wire", "hubcore.http._wire_py")
    CONTROL, HeaderCollector, render_head = _twin.CONTROL, _twin.HeaderCollector, _twin.render_head
    HeaderList, first_value, index_of = _twin.HeaderList, _twin.first_value, _twin.index_of
