"""The Limiter's request path (a scope's counters, an admission, admit,
needs_model and the charge of a request's cost): the compiled twin
(`_admit.pyx`) when built, else the pure-Python one (`_admit_py.py`);
`HUBCORE_NO_EXTENSIONS` (any non-empty value) or a non-CPython interpreter
selects the pure twin, as for the connection cores (hubcore.http.conn)."""

from typing import TYPE_CHECKING

from hubcore import load_twin
from hubcore.governance._admit_py import BUCKET_SECONDS, NEVER, NO_RESETS, Spend

__all__ = ["BUCKET_SECONDS", "COMPILED", "NEVER", "NO_RESETS", "Admission", "LimiterCore", "Spend", "_Scope"]

if TYPE_CHECKING:
    from hubcore.governance._admit_py import Admission, LimiterCore, _Scope

    COMPILED = False
else:
    _twin, COMPILED = load_twin("hubcore.governance._admit", "hubcore.governance._admit_py")
    Admission, LimiterCore, _Scope = _twin.Admission, _twin.LimiterCore, _twin._Scope
