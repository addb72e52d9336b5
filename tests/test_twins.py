"""The compiled modules and their pure-Python twins: which one a process
loads (hubcore/__init__.py's import rule, setup.py's COMPILED_FROM_SOURCE).

The whole suite runs on both (.ci/run runs it again with
HUBCORE_NO_EXTENSIONS=1); these tests check that each run really is on the
twin it claims to be, so that a run "on the twins" cannot quietly run the
compiled code, nor an edited source quietly run its old build."""
from __future__ import annotations

import ast
import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hubcore

ROOT = Path(__file__).parents[1]
NO_EXTENSIONS = bool(os.environ.get("HUBCORE_NO_EXTENSIONS"))
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def compiled_from_source() -> list[str]:
    """setup.py's list, read without running setup()."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "COMPILED_FROM_SOURCE" for target in node.targets
        ):
            return [str(value) for value in ast.literal_eval(node.value)]
    raise AssertionError("setup.py has no COMPILED_FROM_SOURCE")


MODULES = [path[:-3].replace("/", ".") for path in compiled_from_source()]


def loaded_files(env: dict[str, str]) -> list[str]:
    program = "import importlib, sys\nfor name in sys.argv[1:]: print(importlib.import_module(name).__file__)"
    result = subprocess.run(
        [sys.executable, "-c", program, *MODULES], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_the_list_names_existing_sources() -> None:
    assert "hubcore.accounting._meter_interpret" in MODULES
    for path in compiled_from_source():
        assert (ROOT / path).is_file(), path


def test_under_no_extensions_every_module_loads_from_its_source() -> None:
    files = loaded_files({**os.environ, "HUBCORE_NO_EXTENSIONS": "1"})
    assert files == [str(ROOT / (name.replace(".", "/") + ".py")) for name in MODULES]


def test_without_it_every_module_runs_compiled_where_the_build_made_it() -> None:
    built = [(ROOT / (name.replace(".", "/") + SUFFIX)).exists() for name in MODULES]
    if not all(built):
        if os.environ.get("CI") == "true" and not NO_EXTENSIONS:
            pytest.fail("the extensions are not built: `pip install -e .` builds them")
        pytest.skip("the extensions are not built here")
    env = {k: v for k, v in os.environ.items() if k != "HUBCORE_NO_EXTENSIONS"}
    stale = [name for name in MODULES if hubcore._Twins(False)._stale(
        str(ROOT / (name.replace(".", "/") + ".py")), name)]
    files = loaded_files(env)
    for name, file in zip(MODULES, files):
        expected = ".py" if name in stale else SUFFIX
        assert file.endswith(expected), (name, file)


def twin_files(tmp_path: Path, *, generated_c: bool = True) -> tuple[Path, Path]:
    source = tmp_path / "probe.py"
    source.write_text("WHICH = 'source'\n")
    built = tmp_path / ("probe" + SUFFIX)
    built.write_bytes(b"")  # never loaded: only its time is read
    if generated_c:
        (tmp_path / "probe.c").write_text("")
    return source, built


def test_in_a_checkout_a_source_edited_after_its_build_is_what_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    source, built = twin_files(tmp_path)
    os.utime(built, (1_000_000, 1_000_000))
    os.utime(source, (2_000_000, 2_000_000))
    twins = hubcore._Twins(source_only=False)
    for _ in range(2):
        spec = twins.find_spec("hubcore.probe", [str(tmp_path)])
        assert spec is not None and spec.origin == str(source)
        assert isinstance(spec.loader, importlib.machinery.SourceFileLoader)
    # Said once per module, on stderr (stdout may be a command's answer).
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("probe.py changed after it was compiled") == 1


def test_a_build_newer_than_its_source_is_left_to_the_normal_import(tmp_path: Path) -> None:
    source, built = twin_files(tmp_path)
    os.utime(source, (1_000_000, 1_000_000))
    os.utime(built, (2_000_000, 2_000_000))
    assert hubcore._Twins(source_only=False).find_spec("hubcore.probe", [str(tmp_path)]) is None
    # Only hubcore's own modules are looked at.
    assert hubcore._Twins(source_only=True).find_spec("probe", [str(tmp_path)]) is None


def test_an_installed_package_runs_what_was_built_whatever_the_file_times(tmp_path: Path) -> None:
    # An installed wheel has no generated .c beside its files, and its
    # files' times say only in what order they were unpacked.
    source, built = twin_files(tmp_path, generated_c=False)
    os.utime(built, (1_000_000, 1_000_000))
    os.utime(source, (2_000_000, 2_000_000))
    assert hubcore._Twins(source_only=False).find_spec("hubcore.probe", [str(tmp_path)]) is None
    spec = hubcore._Twins(source_only=True).find_spec("hubcore.probe", [str(tmp_path)])
    assert spec is not None and spec.origin == str(source)


def test_load_twin_falls_back_to_the_pure_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    from hubcore import load_twin
    from hubcore.http import _wire_py

    # An extension that was not built: the twin, said so.
    assert load_twin("hubcore.http._not_built", "hubcore.http._wire_py") == (_wire_py, False)
    monkeypatch.setenv("HUBCORE_NO_EXTENSIONS", "1")
    assert load_twin("hubcore.http._wire", "hubcore.http._wire_py") == (_wire_py, False)
    monkeypatch.setenv("HUBCORE_NO_EXTENSIONS", "")
    if not NO_EXTENSIONS:
        module, compiled = load_twin("hubcore.http._wire", "hubcore.http._wire_py")
        assert compiled and module.__file__.endswith(SUFFIX)
