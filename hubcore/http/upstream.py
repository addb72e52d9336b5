"""An upstream connection's common response path (writing a request,
reading its response, going back to the pool): the compiled twin
(`_upstream.pyx`) when built, else the pure-Python one (`_upstream_py.py`);
`HUBCORE_NO_EXTENSIONS` (any non-empty value) or a non-CPython interpreter
selects the pure twin, as for the client connection's core
(hubcore.http.conn)."""

import os
import platform
from typing import TYPE_CHECKING

from hubcore.http._upstream_py import (
    BodySink, ConnectFailed, ConnectionClosed, ConnState, UpstreamError, UpstreamTimeout,
)

__all__ = [
    "COMPILED", "BodySink", "ConnState", "ConnectFailed", "ConnectionClosed", "PoolCore", "ResponseHead",
    "UpstreamCore", "UpstreamError", "UpstreamTimeout",
]

COMPILED = False
if TYPE_CHECKING:
    from hubcore.http._upstream_py import PoolCore, ResponseHead, UpstreamCore
else:
    if not os.environ.get("HUBCORE_NO_EXTENSIONS") and platform.python_implementation() == "CPython":
        try:
            from hubcore.http._upstream import PoolCore, ResponseHead, UpstreamCore

            COMPILED = True
        except ImportError:
            pass
    if not COMPILED:
        from hubcore.http._upstream_py import PoolCore, ResponseHead, UpstreamCore
