"""The compiled functions of a request's heads (gateway/_heads.pyx, which
the compiled Exchange calls in C) against their pure twins (rewrite's
request_head and response_head, routes' route_for, session_from_headers and
leading_model, headroom's model_class): the same results for the same
inputs, and the same exception where one raises."""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hubcore.gateway import rewrite, routes
from hubcore.gateway.rewrite import Framing
from hubcore.routing import headroom
from tests.http.twins import NO_EXTENSIONS

NAMES = st.sampled_from(
    [*sorted(rewrite.REQUEST_DROP), *sorted(rewrite.RESPONSE_DROP), b"x-hop", b"x-kept", b"content-type",
     b"anthropic-version", b"request-id"]
) | st.binary(min_size=1, max_size=12)
VALUES = st.binary(max_size=24)
HEADERS = st.lists(st.tuples(NAMES, VALUES), max_size=12)
CONNECTION = st.lists(st.sampled_from([b"keep-alive", b"X-Hop", b" x-kept ", b"te", b"close", b""]), max_size=4).map(
    lambda names: b",".join(names))
CONTROL = st.none() | st.lists(
    st.tuples(st.sampled_from([b"connection", b"transfer-encoding", b"expect"]), CONNECTION), max_size=3)


def compiled() -> ModuleType:
    if NO_EXTENSIONS:
        pytest.skip("HUBCORE_NO_EXTENSIONS is set")
    try:
        return importlib.import_module("hubcore.gateway._heads")
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("hubcore.gateway._heads is not built: `pip install -e .` builds it")
        pytest.skip("hubcore.gateway._heads is not built here")


def outcome(call: Any, *args: Any) -> Any:
    try:
        return call(*args)
    except Exception as e:  # the same exception type from both twins
        return type(e)


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from([b"POST", b"GET", b"HEAD", b"DELETE"]),
    target=st.sampled_from([b"/v1/messages", b"/v1/messages?beta=true", b"/v1/models/x"]),
    base_path=st.sampled_from([b"", b"/base"]),
    headers=HEADERS,
    control=CONTROL,
    body_size=st.integers(min_value=0, max_value=10**12),
)
def test_request_head_twins_give_the_same_bytes(
    method: bytes, target: bytes, base_path: bytes, headers: list[tuple[bytes, bytes]],
    control: list[tuple[bytes, bytes]] | None, body_size: int,
) -> None:
    args = (method, target, base_path, b"host: api.anthropic.com\r\n", b"x-api-key: sk-1\r\n", headers, control,
            body_size)
    assert outcome(compiled().request_head, *args) == outcome(rewrite.request_head, *args)


@settings(max_examples=300, deadline=None)
@given(
    status=st.sampled_from([200, 204, 304, 400, 429, 500, 529, 599, 799]),
    headers=HEADERS,
    framing=st.sampled_from(list(Framing)),
    # Past 2**63 the compiled head formats with % instead of in C.
    content_length=st.none() | st.integers(min_value=0, max_value=10**12) | st.sampled_from([2**63 - 1, 2**63, 10**30]),
    keep_alive=st.booleans(),
    request_id=st.text(max_size=16),
    budget=st.none() | st.lists(st.tuples(st.binary(min_size=1, max_size=12), VALUES), max_size=2),
)
def test_response_head_twins_give_the_same_bytes(
    status: int, headers: list[tuple[bytes, bytes]], framing: Framing, content_length: int | None,
    keep_alive: bool, request_id: str, budget: list[tuple[bytes, bytes]] | None,
) -> None:
    args = (status, headers, framing, content_length, keep_alive, request_id, budget)
    assert outcome(compiled().response_head, *args) == outcome(rewrite.response_head, *args)


@given(
    status=st.sampled_from([100, 200, 204, 206, 304, 400, 429, 500]) | st.integers(min_value=100, max_value=999),
    content_length=st.none() | st.integers(min_value=0, max_value=10**12),
    client_http11=st.booleans(),
    client_keep_alive=st.booleans(),
)
def test_framing_and_keep_alive_twins_agree(
    status: int, content_length: int | None, client_http11: bool, client_keep_alive: bool,
) -> None:
    heads = compiled()
    framing = heads.response_framing(status, content_length, client_http11)
    assert framing is rewrite.response_framing(status, content_length, client_http11)
    for each in Framing:
        assert heads.keeps_alive(each, client_keep_alive) == rewrite.keeps_alive(each, client_keep_alive)


def test_the_examples_of_the_rewrite_tests_give_the_same_bytes() -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"999"), (b"connection", b"x")]
    for args in [
        (200, headers, Framing.LENGTH, 120, True, "hc_1", None),
        (204, [(b"x-a", b"1")], Framing.BODILESS, None, True, "hc_1", None),
        (529, [], Framing.CHUNKED, None, False, "hc_2", [(b"x-hubcore-budget-remaining", b"1.50")]),
        (200, headers, Framing.UNTIL_CLOSE, None, False, "hc_3", None),
    ]:
        assert compiled().response_head(*args) == rewrite.response_head(*args)
    control = [(b"transfer-encoding", b"chunked"), (b"connection", b"keep-alive, X-Hop ,x-other-hop")]
    for args2 in [
        (b"POST", b"/v1/messages", b"/base", b"host: h\r\n", b"x-api-key: k\r\n", headers, control, 2),
        (b"GET", b"/v1/models", b"", b"host: h\r\n", b"authorization: Bearer k\r\n", headers, None, 0),
    ]:
        assert compiled().request_head(*args2) == rewrite.request_head(*args2)


PATHS = st.sampled_from(
    [*routes.ROUTES, b"/", b"/hubcore/v1/me", b"/v1/models/claude-sonnet-4-5", b"/v1/models/", b"/v1/models/a/b",
     b"/v1/models/%2e%2e", b"/v1/models/.x", b"/v1/messagesx", b"/v1/complete"]
) | st.binary(max_size=24).map(lambda tail: b"/v1/models/" + tail)


@settings(max_examples=300, deadline=None)
@given(path=PATHS, headers=st.none() | st.lists(st.tuples(
    st.sampled_from([b"anthropic-version", b"x-api-key", b"host"]), st.binary(max_size=8)), max_size=5))
def test_route_for_twins_give_the_same_route(path: bytes, headers: list[tuple[bytes, bytes]] | None) -> None:
    assert compiled().route_for(path, headers) is routes.route_for(path, headers)


@settings(max_examples=300, deadline=None)
@given(headers=st.lists(st.tuples(
    st.sampled_from([*routes.SESSION_HEADERS, b"x-api-key"]), st.binary(max_size=8)), max_size=6))
def test_session_from_headers_twins_give_the_same_session(headers: list[tuple[bytes, bytes]]) -> None:
    session = routes.session_from_headers(headers)
    assert compiled().session_from_headers(headers) == session
    # The first non-empty value of the first session header that has one.
    index = {}
    for name, value in headers:
        index.setdefault(name, value)
    firsts = [index.get(name) for name in routes.SESSION_HEADERS]
    assert session == next((v.decode("latin-1") for v in firsts if v), None)


# Bodies that start as routes._LEADING_MODEL wants, or nearly: each part
# right or a near miss (other whitespace, another key, a missing quote,
# characters outside a model id, ids of 0 to 300 characters).
SPACES = st.text(st.sampled_from(" \t\n\r\x0b\x0c\xa0\x1c"), max_size=3).map(lambda t: t.encode("latin-1"))
MODEL_IDS = st.text(st.sampled_from("aZ09._:@+/-") | st.characters(max_codepoint=255), max_size=4).map(
    lambda t: t.encode("latin-1")) | st.sampled_from([b"", b"m" * 255, b"m" * 256, b"m" * 257, b"m" * 300])
LEADING = st.tuples(
    st.sampled_from([b"{", b"{", b"[", b""]), SPACES, st.sampled_from([b'"model"', b'"model"', b'"Model"', b'"mode"', b"model"]),
    SPACES, st.sampled_from([b":", b":", b"="]), SPACES, st.sampled_from([b'"', b'"', b""]), MODEL_IDS,
    st.sampled_from([b'"', b'"', b"", b"\\"]), st.binary(max_size=4),
).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(start=st.sampled_from([b'{"model":"claude-opus-4-1","max_tokens":1}', b'{ "model" : "gpt-5.1"', b'{"max_tokens":1,"model":"x"}',
                              b'{"model":"a\\u0062"}', b"", b"[]"]) | st.binary(max_size=40) | LEADING)
@example(start=b'{"model":"' + b"m" * 256 + b'"}')
@example(start=b'{"model":"' + b"m" * 257 + b'"}')
@example(start=b'{\x0b"model"\x0c:\r\n\t "claude-opus-4-1"')
@example(start=b'{"model":"claude\x1copus"')
def test_leading_model_twins_give_the_same_model(start: bytes) -> None:
    assert compiled().leading_model(start) == routes.leading_model(start)


@settings(max_examples=300, deadline=None)
@given(model=st.none() | st.sampled_from(
    ["", "claude-opus-4-1-20250805", "claude-sonnet-4-5", "claude-3-5-haiku-latest", "gpt-5.1-2025-11-13"]) | st.text(max_size=20))
def test_model_class_twins_give_the_same_class(model: str | None) -> None:
    assert compiled().model_class(model) == headroom.model_class(model)
