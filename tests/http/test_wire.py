"""HTTP head handling on the hot path, both twins: the header collector that
httptools calls per header, and the head renderer."""
from __future__ import annotations

import importlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, strategies as st

from hubcore.http import _wire_py

from hubcore.http import wire

NO_EXTENSIONS = bool(os.environ.get("HUBCORE_NO_EXTENSIONS"))


@pytest.fixture(scope="module", params=["c", "py"])
def twin(request: pytest.FixtureRequest) -> ModuleType:
    if request.param == "c":
        if NO_EXTENSIONS:
            pytest.skip("HUBCORE_NO_EXTENSIONS is set")
        return importlib.import_module("hubcore.http._wire")
    return _wire_py


def collect(twin: ModuleType, headers: list[tuple[bytes, bytes]]) -> object:
    c = twin.HeaderCollector()
    for name, value in headers:
        c.on_header(name, value)
    return c


def test_compiled_twin_loaded() -> None:
    """Fails where the build should have produced the compiled twin but it did not load."""
    want = not NO_EXTENSIONS and platform.python_implementation() == "CPython"
    assert wire.COMPILED is want
    assert wire.HeaderCollector.__module__ == ("hubcore.http._wire" if want else "hubcore.http._wire_py")


def test_no_extensions_selects_pure_twin() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import hubcore.http.wire as w; print(w.COMPILED, w.HeaderCollector.__module__)"],
        cwd=Path(__file__).parents[2], env={**os.environ, "HUBCORE_NO_EXTENSIONS": "1"},
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert out.stdout.split() == ["False", "hubcore.http._wire_py"]


def test_names_lower_cased_order_and_duplicates_kept(twin: ModuleType) -> None:
    c = collect(twin, [(b"X-Api-Key", b"K"), (b"anthropic-beta", b"a"), (b"Anthropic-Beta", b"b"), (b"\xc9X", b"v")])
    assert c.headers == [(b"x-api-key", b"K"), (b"anthropic-beta", b"a"), (b"anthropic-beta", b"b"), (b"\xc9x", b"v")]
    # The index keeps each name's first value, as a lookup by name should.
    assert c.index == {b"x-api-key": b"K", b"anthropic-beta": b"a", b"\xc9x": b"v"}
    assert c.size == sum(len(n) + len(v) + 4 for n, v in c.headers)
    assert c.content_length == -1 and c.control is None


def test_content_length_parsed(twin: ModuleType) -> None:
    assert collect(twin, [(b"Content-Length", b"0")]).content_length == 0
    assert collect(twin, [(b"content-length", b"91234")]).content_length == 91234
    assert collect(twin, [(b"content-length", b"9" * 18)]).content_length == int("9" * 18)


@pytest.mark.parametrize("value", [b"", b"+5", b"-1", b" 5", b"5 ", b"1_000", b"0x10", b"9" * 19, "５".encode()])
def test_content_length_other_than_digits_refused(twin: ModuleType, value: bytes) -> None:
    c = twin.HeaderCollector()
    with pytest.raises(ValueError):
        c.on_header(b"Content-Length", value)


def test_control_headers_noted_in_order(twin: ModuleType) -> None:
    c = collect(twin, [(b"Host", b"x"), (b"Transfer-Encoding", b"chunked"), (b"EXPECT", b"100-continue"),
                       (b"connection", b"keep-alive, x-hop"), (b"transfer-encoding", b"gzip")])
    assert c.control == [(b"transfer-encoding", b"chunked"), (b"expect", b"100-continue"),
                         (b"connection", b"keep-alive, x-hop"), (b"transfer-encoding", b"gzip")]
    assert c.headers[0] == (b"host", b"x") and len(c.headers) == 5


def test_reset_starts_a_new_message_and_leaves_the_old_one(twin: ModuleType) -> None:
    c = collect(twin, [(b"a", b"1"), (b"content-length", b"3"), (b"expect", b"100-continue")])
    headers, index = c.headers, c.index
    c.reset()
    assert (c.headers, c.index, c.size, c.content_length, c.control) == ([], {}, 0, -1, None)
    c.on_header(b"b", b"2")
    assert headers == [(b"a", b"1"), (b"content-length", b"3"), (b"expect", b"100-continue")]
    assert index == {b"a": b"1", b"content-length": b"3", b"expect": b"100-continue"}
    assert c.headers == [(b"b", b"2")]


def test_the_index_is_made_on_first_use_and_header_reads_the_first_value(twin: ModuleType) -> None:
    # Names are looked up by a scan of the list; the index, each name's
    # first value, is made when asked for, kept until the list changes, and
    # gone with reset().
    for count in (0, 3, 48):
        headers = [(f"X-H{i}".encode(), str(i).encode()) for i in range(count)] + [(b"X-H0", b"again")]
        c = twin.HeaderCollector()
        for name, value in headers:
            c.on_header(name, value)
        assert c.header(b"x-h0") == (b"0" if count else b"again")
        assert c.header(b"X-H0") is None and c.header(b"absent") is None and c.header("x-h0") is None
        first = c.index
        assert first == {n.lower(): v for n, v in reversed(headers)} and c.index is first
        c.on_header(b"Late", b"1")
        assert c.index is not first and c.index[b"late"] == b"1" and c.header(b"late") == b"1"
        c.reset()
        c.on_header(b"B", b"2")
        assert c.index == {b"b": b"2"} and c.headers == [(b"b", b"2")] and c.header(b"b") == b"2"


@given(headers=st.lists(st.tuples(st.sampled_from([b"a", b"b", b"ab", b"x-api-key", b""]), st.binary(max_size=4)),
                        max_size=12),
       name=st.sampled_from([b"a", b"b", b"ab", b"x-api-key", b"", b"zz"]))
def test_first_value_and_index_of_twins_agree(headers: list[tuple[bytes, bytes]], name: bytes) -> None:
    expected_index: dict[bytes, bytes] = {}
    for n, v in headers:
        expected_index.setdefault(n, v)
    for t in [_wire_py] + ([] if NO_EXTENSIONS else [importlib.import_module("hubcore.http._wire")]):
        assert t.first_value(headers, name) == expected_index.get(name)
        assert t.index_of(headers) == expected_index


def test_render_head(twin: ModuleType) -> None:
    headers = [(b"host", b"h"), (b"x-api-key", b"secret"), (b"accept", b"*/*"), (b"x-empty", b"")]
    start = b"POST /v1/messages HTTP/1.1\r\n"
    tail = b"x-api-key: vendor\r\n\r\n"
    assert twin.render_head(start, headers, frozenset({b"host", b"x-api-key"}), tail) == (
        start + b"accept: */*\r\nx-empty: \r\n" + tail)
    assert twin.render_head(start, headers, {b"accept"}, b"") == (
        start + b"host: h\r\nx-api-key: secret\r\nx-empty: \r\n")
    assert twin.render_head(b"", [], frozenset(), b"\r\n") == b"\r\n"
    # More headers than the compiled twin keeps the places of on its stack.
    many = [(b"x-%d" % i, b"v%d" % i) for i in range(300)]
    assert twin.render_head(start, many, {b"x-7", b"x-299"}, tail) == (
        start + b"".join(b"%s: %s\r\n" % h for h in many if h[0] not in (b"x-7", b"x-299")) + tail)


header_name = st.binary(min_size=1, max_size=12)
header_list = st.lists(st.tuples(header_name, st.binary(max_size=40)), max_size=90)


@given(headers=header_list, drop=st.sets(header_name, max_size=5))
def test_twins_agree(headers: list[tuple[bytes, bytes]], drop: set[bytes]) -> None:
    twins = [_wire_py] + ([] if NO_EXTENSIONS else [importlib.import_module("hubcore.http._wire")])
    expected_render = b"S" + b"".join(n + b": " + v + b"\r\n" for n, v in headers if n not in drop) + b"T"
    for t in twins:
        assert t.render_head(b"S", headers, frozenset(drop), b"T") == expected_render
        c = t.HeaderCollector()
        for name, value in headers:
            if name.lower() != b"content-length":
                c.on_header(name, value)
        kept = [(n.lower(), v) for n, v in headers if n.lower() != b"content-length"]
        assert c.headers == kept
        assert c.index == {n: v for n, v in reversed(kept)}
        assert c.size == sum(len(n) + len(v) + 4 for n, v in kept)
        assert c.control == ([(n, v) for n, v in kept if n in wire.CONTROL] or None)


def test_host_headers_are_counted(twin: ModuleType) -> None:
    assert collect(twin, [(b"a", b"1")]).hosts == 0
    assert collect(twin, [(b"Host", b"h")]).hosts == 1
    assert collect(twin, [(b"host", b"h"), (b"HOST", b"g")]).hosts == 2


@pytest.mark.parametrize("name", [b"content_length", b"Transfer_Encoding", b"_host", b"host_"])
def test_a_name_that_reads_as_a_framing_header_with_dashes_is_refused(twin: ModuleType, name: bytes) -> None:
    with pytest.raises(ValueError, match="framing header"):
        collect(twin, [(name, b"5")])


def test_other_underscored_names_pass(twin: ModuleType) -> None:
    c = collect(twin, [(b"x_custom", b"1"), (b"content_type", b"2")])
    assert c.headers == [(b"x_custom", b"1"), (b"content_type", b"2")]


def test_fields_after_seal_are_counted_not_kept(twin: ModuleType) -> None:
    c = collect(twin, [(b"host", b"h")])
    c.seal()
    c.on_header(b"x-trailer", b"v")
    c.on_header(b"content-length", b"99")
    assert c.headers == [(b"host", b"h")] and c.content_length == -1
    assert c.size == len(b"host") + 1 + 4 + len(b"x-trailer") + 1 + 4 + len(b"content-length") + 2 + 4
    c.reset()
    c.on_header(b"a", b"b")
    assert c.headers == [(b"a", b"b")]


names = st.binary(max_size=70)


@pytest.mark.skipif(NO_EXTENSIONS, reason="the compiled twin's NameSet; HUBCORE_NO_EXTENSIONS is set")
@given(members=st.sets(names, max_size=12), probes=st.lists(names, max_size=12),
       headers=header_list)
def test_a_name_set_holds_what_its_set_holds(members: set[bytes], probes: list[bytes],
                                             headers: list[tuple[bytes, bytes]]) -> None:
    # By length and bytes, without hashing: the same answers as the set,
    # names of 64 bytes and more included, and the same head from render_head.
    compiled = importlib.import_module("hubcore.http._wire")
    name_set = compiled.NameSet(members)
    for probe in [*probes, *members, *(m + b"x" for m in members), *(m[:-1] for m in members if m)]:
        assert (probe in name_set) == (probe in members)
    assert "text" not in name_set and None not in name_set
    assert sorted(name_set) == sorted(members) and len(name_set) == len(members)
    drop = frozenset(members) | {n for n, _ in headers[:2]}
    assert compiled.render_head(b"S", headers, compiled.NameSet(drop), b"T") == (
        compiled.render_head(b"S", headers, drop, b"T"))


def test_a_name_set_holds_bytes_only() -> None:
    if NO_EXTENSIONS:
        pytest.skip("the compiled twin's NameSet; HUBCORE_NO_EXTENSIONS is set")
    with pytest.raises(TypeError):
        importlib.import_module("hubcore.http._wire").NameSet({b"a", "b"})
