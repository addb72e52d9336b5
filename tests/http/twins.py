"""What the twin tests of the compiled connection cores share
(tests/http/test_conn.py, test_upstream.py): which twins this run has, a
transport that keeps what is written, feeding a stream in pieces, and the
checks that the selecting module loaded the twin it should."""
from __future__ import annotations

import importlib
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
