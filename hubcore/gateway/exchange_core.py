"""A request's common path through the Exchange (its first attempt sent
from the read that completed the request, the answer streamed from the
upstream's callbacks, the usage row and the metrics), and the hub's start
of each request (its gate, id and Exchange, `HubCore`), and what each
attempt reads of its upstream (`UpstreamRuntimeCore`): the compiled twin
(`_exchange.pyx`) when built, else the pure-Python one (`_exchange_py.py`);
`HUBCORE_NO_EXTENSIONS` (any non-empty value) or a non-CPython interpreter
selects the pure twin, as for the connection cores (hubcore.http.conn,
hubcore.http.upstream)."""

from typing import TYPE_CHECKING

from hubcore import load_twin
from hubcore.gateway._exchange_py import _MOVES, Phase

__all__ = ["COMPILED", "ExchangeCore", "HubCore", "Phase", "UpstreamRuntimeCore", "_MOVES", "usage_event"]

if TYPE_CHECKING:
    from hubcore.gateway._exchange_py import ExchangeCore, HubCore, UpstreamRuntimeCore, usage_event

    COMPILED = False
else:
    _twin, COMPILED = load_twin("hubcore.gateway._exchange", "hubcore.gateway._exchange_py")
    ExchangeCore, HubCore, usage_event = _twin.ExchangeCore, _twin.HubCore, _twin.usage_event
    UpstreamRuntimeCore = _twin.UpstreamRuntimeCore
