"""A client connection's common request path (reading a request, handing it
over, getting ready for the next): the compiled twin (`_conn.pyx`) when
built, else the pure-Python one (`_conn_py.py`); `HUBCORE_NO_EXTENSIONS`
(any non-empty value) or a non-CPython interpreter selects the pure twin, as
for head handling (hubcore.http.wire)."""

from typing import TYPE_CHECKING

from hubcore import load_twin
from hubcore.http._conn_py import (
    CONTINUE_100, MAX_BODY_PARTS, REFUSED_BODY_DISCARD_BYTES, Phase, RefusedAtHead, Reject,
)

__all__ = [
    "COMPILED", "CONTINUE_100", "MAX_BODY_PARTS", "REFUSED_BODY_DISCARD_BYTES",
    "BodyBudget", "ConnCore", "Phase", "RefusedAtHead", "Reject", "Request",
]

if TYPE_CHECKING:
    from hubcore.http._conn_py import BodyBudget, ConnCore, Request

    COMPILED = False
else:
    _twin, COMPILED = load_twin("hubcore.http._conn", "hubcore.http._conn_py")
    BodyBudget, ConnCore, Request = _twin.BodyBudget, _twin.ConnCore, _twin.Request
