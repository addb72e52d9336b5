"""An upstream connection's common response path (writing a request,
reading its response, going back to the pool): the compiled twin
(`_upstream.pyx`) when built, else the pure-Python one (`_upstream_py.py`);
`HUBCORE_NO_EXTENSIONS` (any non-empty value) or a non-CPython interpreter
selects the pure twin, as for the client connection's core
(hubcore.http.conn)."""

from typing import TYPE_CHECKING

from hubcore import load_twin
from hubcore.http._upstream_py import (
    BodySink, ConnectFailed, ConnectionClosed, ConnState, UpstreamError, UpstreamTimeout,
)

__all__ = [
    "COMPILED", "BodySink", "ConnState", "ConnectFailed", "ConnectionClosed", "PoolCore", "ResponseHead",
    "UpstreamCore", "UpstreamError", "UpstreamTimeout",
]

if TYPE_CHECKING:
    from hubcore.http._upstream_py import PoolCore, ResponseHead, UpstreamCore

    COMPILED = False
else:
    _twin, COMPILED = load_twin("hubcore.http._upstream", "hubcore.http._upstream_py")
    PoolCore, ResponseHead, UpstreamCore = _twin.PoolCore, _twin.ResponseHead, _twin.UpstreamCore
