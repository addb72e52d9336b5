"""What the twin tests of the compiled cores share (tests/http/test_conn.py,
test_upstream.py, and those of the key ring, limiter, metrics and access
log): which twins this run has, a module built on a given twin, a transport
that keeps what is written, feeding a stream in pieces, and the checks that
the selecting module loaded the twin it should."""
from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

NO_EXTENSIONS = bool(os.environ.get("HUBCORE_NO_EXTENSIONS"))


def twin_of(param: str, compiled: str, pure: ModuleType) -> ModuleType:
    """The twin a fixture parameter names: "c" the compiled one (skipped
    under HUBCORE_NO_EXTENSIONS), anything else the pure one."""
    if param == "c":
        if NO_EXTENSIONS:
            pytest.skip("HUBCORE_NO_EXTENSIONS is set")
        return importlib.import_module(compiled)
    return pure


def both(compiled: str, pure: ModuleType) -> list[ModuleType]:
    """Every twin this run has."""
    return [pure] if NO_EXTENSIONS else [importlib.import_module(compiled), pure]


_BUILT: dict[tuple[str, str], ModuleType] = {}


def module_on_twin(module: str, selector: str, twin: ModuleType, names: list[str]) -> ModuleType:
    """`module` (e.g. hubcore.routing.keys) executed afresh with its selector
    module (hubcore.routing.lease) giving `names` from `twin`, so that the
    Python built on a core runs on either twin in one process; made once per
    twin, and not registered in sys.modules."""
    built = _BUILT.get((module, twin.__name__))
    if built is not None:
        return built
    found = importlib.util.find_spec(module)
    assert found is not None and found.loader is not None
    built = importlib.util.module_from_spec(found)
    on_twin = ModuleType(selector)
    on_twin.__dict__.update(vars(importlib.import_module(selector)))
    on_twin.__dict__.update({name: getattr(twin, name) for name in names})
    saved = sys.modules[selector]
    sys.modules[selector] = on_twin
    try:
        found.loader.exec_module(built)
    finally:
        sys.modules[selector] = saved
    taken = [name for name in names if hasattr(built, name)]
    assert taken and all(getattr(built, name) is getattr(twin, name) for name in taken), \
        f"{module} did not take {names} from {twin.__name__}"
    _BUILT[module, twin.__name__] = built
    return built


class Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writelines(self, data: list[bytes]) -> None:
        self.written.extend(data)

    def is_closing(self) -> bool:
        return self.closing


def feed(proto: Any, data: bytes, cuts: list[int] = [], before_each: Callable[[], None] | None = None) -> None:
    """`data` to proto.data_received, cut at `cuts`; `before_each` runs before every read."""
    at = 0
    for cut in [*sorted(cuts), len(data)]:
        if cut > at:
            if before_each is not None:
                before_each()
            proto.data_received(data[at:cut])
            at = cut


def check_compiled_loaded(selector: ModuleType, classes: list[type], compiled: str, pure: str) -> None:
    """Fails where the build should have produced the compiled twin but the
    selecting module did not load it (or loaded it where it must not)."""
    want = not NO_EXTENSIONS and platform.python_implementation() == "CPython"
    assert selector.COMPILED is want
    assert {cls.__module__ for cls in classes} == {compiled if want else pure}


def check_no_extensions_selects_pure(selector: str, cls: str, pure: str) -> None:
    program = f"import {selector} as s; print(s.COMPILED, s.{cls}.__module__)"
    out = subprocess.run(
        [sys.executable, "-c", program], cwd=Path(__file__).parents[2],
        env={**os.environ, "HUBCORE_NO_EXTENSIONS": "1"}, capture_output=True, text=True, timeout=60, check=True,
    )
    assert out.stdout.split() == ["False", pure]
