"""hubcore: a self-hosted gateway between AI coding clients and vendor APIs.

The package is built in layers; a module imports only from its own layer or
from those below it (tests/test_layers.py checks every import):

    cli/, app.py, runtime.py,       top: commands, wiring, process set-up,
    supervisor.py                   the processes of several workers
    gateway/   ops/   dashboard/    the request path; the ops socket; the web dashboard
                                    (strangers to each other)
    shared/                         state shared between instances through Redis
                                    (the gateway's, with a [shared] table)
    governance/   accounting/       who may do what; what it cost
    routing/   http/                sans-IO key and upstream choice; HTTP/1.1
    errors, config, store           foundations (with _meter_errors)

Within a row the packages are strangers: governance imports no accounting,
http no routing.
"""

import importlib
import os
import platform
import sys
from importlib.machinery import EXTENSION_SUFFIXES, SOURCE_SUFFIXES, FileFinder, ModuleSpec, SourceFileLoader
from types import ModuleType
from typing import Sequence

__version__ = "0.1.0"

# Some plain-Python modules (setup.py's COMPILED_FROM_SOURCE) are compiled
# by Cython beside their sources when extensions are built; the source is
# their pure-Python twin. Python would load the compiled file whenever it
# lies there, so two cases load the source instead: under
# HUBCORE_NO_EXTENSIONS every module of the package, and in a source
# checkout (where the build leaves its generated .c) a module whose .py
# changed after its build, so that an edit is never silently ignored.


class _Twins:
    """A meta-path finder for hubcore's modules: the source twin where the
    rules above want it, else None (the normal finders go on)."""

    def __init__(self, source_only: bool) -> None:
        self.source_only = source_only
        self._finders: dict[str, FileFinder] = {}
        self._warned: set[str] = set()

    def find_spec(self, fullname: str, path: Sequence[str] | None = None, target: object = None) -> ModuleSpec | None:
        if path is None or not fullname.startswith("hubcore."):
            return None
        tail = fullname.rpartition(".")[2]
        for entry in path:
            source = os.path.join(entry, tail + ".py")
            if not os.path.isfile(source):
                continue
            if not self.source_only and not self._stale(source, fullname):
                return None
            finder = self._finders.get(entry)
            if finder is None:
                finder = self._finders[entry] = FileFinder(entry, (SourceFileLoader, SOURCE_SUFFIXES))
            return finder.find_spec(fullname, target)  # type: ignore[arg-type]
        return None

    def _stale(self, source: str, fullname: str) -> bool:
        stem = source[:-3]
        if not os.path.exists(stem + ".c"):
            return False  # an installed package: what was built is what runs
        built = [stem + suffix for suffix in EXTENSION_SUFFIXES if os.path.exists(stem + suffix)]
        if not built or os.path.getmtime(source) <= os.path.getmtime(built[0]):
            return False
        if fullname not in self._warned:
            self._warned.add(fullname)
            print(f"hubcore: {source} changed after it was compiled; running it from source "
                  "(rebuild: pip install -e .)", file=sys.stderr)
        return True


sys.meta_path.insert(0, _Twins(bool(os.environ.get("HUBCORE_NO_EXTENSIONS"))))


def load_twin(compiled: str, pure: str) -> tuple[ModuleType, bool]:
    """The Cython extension `compiled` and True, or its pure-Python twin
    `pure` and False: the twin under HUBCORE_NO_EXTENSIONS (any non-empty
    value), on an interpreter other than CPython, and when the extension
    was not built. The modules that pick one (accounting.meter, http.wire,
    http.conn, http.upstream, gateway.exchange_core, routing.lease,
    governance.admit, ops.tally, ops.access_core, accounting.rows,
    accounting.sqlitewriter) show type checkers the twin."""
    if not os.environ.get("HUBCORE_NO_EXTENSIONS") and platform.python_implementation() == "CPython":
        try:
            return importlib.import_module(compiled), True
        except ImportError:
            pass
    return importlib.import_module(pure), False
