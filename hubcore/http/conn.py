"""A client connection's common request path (reading a request, handing it
over, getting ready for the next): the compiled twin (`_conn.pyx`) when
built, else the pure-Python one (`_conn_py.py`); `HUBCORE_NO_EXTENSIONS`
(any non-empty value) or a non-CPython interpreter selects the pure twin, as
for head handling (hubcore.http.wire)."""

import os
import platform
from typing import TYPE_CHECKING

from hubcore.http._conn_py import (
    CONTINUE_100, MAX_BODY_PARTS, REFUSED_BODY_DISCARD_BYTES, Phase, RefusedAtHead, Reject,
)

__all__ = [
    "COMPILED", "CONTINUE_100", "MAX_BODY_PARTS", "REFUSED_BODY_DISCARD_BYTES",
    "BodyBudget", "ConnCore", "Phase", "RefusedAtHead", "Reject", "Request",
]

COMPILED = False
if TYPE_CHECKING:
    from hubcore.http._conn_py import BodyBudget, ConnCore, Request
else:
    if not os.environ.get("HUBCORE_NO_EXTENSIONS") and platform.python_implementation() == "CPython":
        try:
            from hubcore.http._conn import BodyBudget, ConnCore, Request

            COMPILED = True
        except ImportError:
            pass
    if not COMPILED:
        from hubcore.http._conn_py import BodyBudget, ConnCore, Request
