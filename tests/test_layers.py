"""The layering rule of hubcore/__init__.py, checked on the source: every
`hubcore.*` import of every module (inside functions and under TYPE_CHECKING
too) goes to its own layer or one below."""
from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hubcore"

# What each part of hubcore may import. A part is a top-level module or
# package of hubcore; "" is the package itself (`from hubcore import
# __version__`).
FOUNDATIONS = frozenset({"", "errors", "_meter_errors", "config", "store", "database", "pgstore"})
BELOW_GATEWAY = FOUNDATIONS | {"http", "routing", "governance", "accounting"}
EVERYTHING = None  # the top: commands and wiring
ALLOWED: dict[str, frozenset[str] | None] = {
    **{part: FOUNDATIONS for part in FOUNDATIONS},
    "http": FOUNDATIONS | {"http"},
    "routing": FOUNDATIONS | {"routing"},
    "governance": FOUNDATIONS | {"governance"},
    "accounting": FOUNDATIONS | {"accounting"},
    # Above governance and routing, whose limits and key states it shares;
    # below the request path that calls it.
    "shared": FOUNDATIONS | {"governance", "routing", "shared"},
    "gateway": BELOW_GATEWAY | {"gateway", "shared"},
    "ops": BELOW_GATEWAY | {"ops"},
    "dashboard": BELOW_GATEWAY | {"dashboard"},
    "cli": EVERYTHING,
    "app": EVERYTHING,
    "supervisor": EVERYTHING,
    "runtime": EVERYTHING,
    "__main__": EVERYTHING,
}

# Cython sources are not Python: their imports are found by their shape.
_PYX_IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+c?import\b|c?import\s+([\w.]+))", re.MULTILINE)


def part_of(name: str) -> str:
    """The part of hubcore that dotted `name` (a module, or a name in one) belongs to."""
    parts = name.split(".")
    if parts[0] != "hubcore" or len(parts) == 1:
        return ""
    return parts[1] if parts[1] in ALLOWED else ""


def imports(module: str, source: str, *, package: bool = False) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every hubcore name that Python `source` imports."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module if package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            # `from hubcore import store` imports a module, `from hubcore
            # import __version__` a name of the package: part_of tells them apart.
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == "hubcore" or name.startswith("hubcore."):
                yield node.lineno, name


def pyx_imports(source: str) -> Iterator[tuple[int, str]]:
    for match in _PYX_IMPORT.finditer(source):
        name = match.group(1) or match.group(2)
        if name == "hubcore" or name.startswith("hubcore."):
            yield source.count("\n", 0, match.start()) + 1, name


def violations(module: str, source: str, *, package: bool = False, pyx: bool = False) -> list[str]:
    """One line per import of `module` that the table does not allow."""
    own = part_of(module)
    allowed = ALLOWED[own]
    if allowed is EVERYTHING:
        return []
    found = pyx_imports(source) if pyx else imports(module, source, package=package)
    return [
        f"{module}:{line} imports {name}: {own or 'hubcore'} may import only {', '.join(sorted(p or 'hubcore' for p in allowed))}"
        for line, name in found
        if part_of(name) not in allowed
    ]


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*")):
        if path.suffix not in (".py", ".pyx") or "__pycache__" in path.parts:
            continue
        dotted = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if dotted[-1] == "__init__":
            dotted = dotted[:-1]
        yield ".".join(dotted), path


def test_every_part_of_hubcore_has_a_layer() -> None:
    unplaced = {
        path.relative_to(PACKAGE).parts[0].removesuffix(path.suffix)
        for _, path in modules()
        if path.parent != PACKAGE or path.stem != "__init__"
    } - set(ALLOWED)
    assert not unplaced, f"add to the layer table in tests/test_layers.py and hubcore/__init__.py: {sorted(unplaced)}"


def test_every_module_imports_only_its_layer_and_below() -> None:
    found = []
    for module, path in modules():
        source = path.read_text(encoding="utf-8")
        found += violations(module, source, package=path.stem == "__init__", pyx=path.suffix == ".pyx")
    assert not found, "\n".join(found)


def test_the_checker_sees_python_imports() -> None:
    source = "from hubcore import store, __version__\nimport hubcore.errors\n"
    assert [name for _, name in imports("hubcore.http.server", source)] == [
        "hubcore.store", "hubcore.__version__", "hubcore.errors",
    ]
    assert part_of("hubcore.__version__") == "" and part_of("hubcore.store") == "store"


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("hubcore.http.server", "from hubcore.gateway.exchange import Hub\n"),
        ("hubcore.config", "def f():\n    from hubcore.governance import limits\n"),
        ("hubcore.governance.limits", "from typing import TYPE_CHECKING\n"
                                      "if TYPE_CHECKING:\n    from hubcore.accounting.usage import UsageEvent\n"),
        ("hubcore.routing.keys", "import hubcore.ops.metrics\n"),
        ("hubcore.gateway.exchange", "from hubcore.ops.accesslog import AccessLog\n"),
        ("hubcore.ops.server", "from hubcore import cli\n"),
        ("hubcore.http.server", "from ..governance import tokens\n"),
        ("hubcore.store", "from hubcore import app\n"),
    ],
    ids=["http-gateway", "config-governance-lazy", "governance-accounting-typing", "routing-ops",
         "gateway-ops", "ops-cli", "relative", "store-app"],
)
def test_the_checker_refuses_a_lower_layer_importing_a_higher_one(module: str, source: str) -> None:
    found = violations(module, source)
    assert len(found) == 1 and found[0].startswith(f"{module}:"), found


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("hubcore.http.server", "from hubcore.config import ServerConfig\nfrom hubcore.http import wire\n"),
        ("hubcore.gateway.exchange", "from hubcore.routing.keys import KeyRing\nfrom hubcore.accounting import meter\n"),
        ("hubcore.ops.metrics", "from hubcore.routing.keys import KeyState\n"),
        ("hubcore.governance.tokens", "from . import limits\n"),
        ("hubcore.cli.main", "from hubcore import app\nfrom hubcore.ops import client\n"),
        ("hubcore.config", "from hubcore import __version__\nfrom hubcore.errors import ConfigError\n"),
    ],
)
def test_the_checker_allows_own_layer_and_below(module: str, source: str) -> None:
    assert violations(module, source) == []


def test_the_checker_reads_cython_imports() -> None:
    source = "# cython: language_level=3\nfrom hubcore._meter_errors import MeterError\ncimport cython\nfrom hubcore.ops import metrics\n"
    assert violations("hubcore.accounting._meter", source, pyx=True) == [
        "hubcore.accounting._meter:4 imports hubcore.ops: accounting may import only "
        "_meter_errors, accounting, config, database, errors, hubcore, pgstore, store",
    ]
