"""The key ring's common path (a key's state, a lease, acquire, observe and
the common case of release): the compiled twin (`_lease.pyx`) when built,
else the pure-Python one (`_lease_py.py`); `HUBCORE_NO_EXTENSIONS` (any
non-empty value) or a non-CPython interpreter selects the pure twin, as
for the connection cores (hubcore.http.conn)."""

from typing import TYPE_CHECKING

from hubcore import load_twin
from hubcore.routing._lease_py import KeyState, above_floor, prefer, share

__all__ = ["COMPILED", "KeyState", "Lease", "RingCore", "_Key", "above_floor", "pick", "prefer", "share", "wake"]

if TYPE_CHECKING:
    from hubcore.routing._lease_py import Lease, RingCore, _Key, pick, wake

    COMPILED = False
else:
    _twin, COMPILED = load_twin("hubcore.routing._lease", "hubcore.routing._lease_py")
    Lease, RingCore, _Key, pick, wake = _twin.Lease, _twin.RingCore, _twin._Key, _twin.pick, _twin.wake
