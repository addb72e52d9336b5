"""The access log's per-request line (AccessCore): the compiled twin
(`_access.pyx`) when built, else the pure-Python one (`_access_py.py`);
`HUBCORE_NO_EXTENSIONS` (any non-empty value) or a non-CPython interpreter
selects the pure twin, as for the connection cores (hubcore.http.conn)."""

from typing import TYPE_CHECKING

from hubcore import load_twin
from hubcore.ops._access_py import _JSON_FIELDS, TEXT_LINE, _json_line

__all__ = ["COMPILED", "TEXT_LINE", "AccessCore", "_JSON_FIELDS", "_json_line"]

if TYPE_CHECKING:
    from hubcore.ops._access_py import AccessCore

    COMPILED = False
else:
    _twin, COMPILED = load_twin("hubcore.ops._access", "hubcore.ops._access_py")
    AccessCore = _twin.AccessCore
