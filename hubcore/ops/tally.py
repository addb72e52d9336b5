"""The metrics' per-request recording (TallyCore, Histogram): the compiled
twin (`_tally.pyx`) when built, else the pure-Python one (`_tally_py.py`);
`HUBCORE_NO_EXTENSIONS` (any non-empty value) or a non-CPython interpreter
selects the pure twin, as for the connection cores (hubcore.http.conn)."""

from typing import TYPE_CHECKING

from hubcore import load_twin
from hubcore.ops._tally_py import DEFAULT_MAX_SERIES, OTHER_SERIES, TOKEN_CLASSES

__all__ = ["COMPILED", "DEFAULT_MAX_SERIES", "OTHER_SERIES", "TOKEN_CLASSES", "Histogram", "TallyCore"]

if TYPE_CHECKING:
    from hubcore.ops._tally_py import Histogram, TallyCore

    COMPILED = False
else:
    _twin, COMPILED = load_twin("hubcore.ops._tally", "hubcore.ops._tally_py")
    Histogram, TallyCore = _twin.Histogram, _twin.TallyCore
