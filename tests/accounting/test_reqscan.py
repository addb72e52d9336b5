"""scan_request and session_from_user_id: the request fields routing and accounting need."""

from __future__ import annotations

import importlib
import json
import os
from types import ModuleType
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hubcore.accounting import _meter_py as _sse_py
from hubcore.accounting.meter import session_from_user_id

SESSION = "4f8c2a6e-9b1d-4e37-a5c0-7d2e8f1b3a96"
DEVICE = "a3" * 32
ACCOUNT = "0b7e6c5d-1a2f-4b3c-8d9e-0f1a2b3c4d5e"

# A trimmed Claude Code request: "model" and "stream" also appear nested (a
# tool schema property, a message's text), metadata comes after the big parts.
CLAUDE_CODE_REQUEST = (
    b'{"model":"claude-opus-4-6","messages":[{"role":"user","content":[{"type":"text",'
    b'"text":"Set \\"model\\": \\"gpt\\" and \\"stream\\": true in config.json, \\\\ then run it"}]},'
    b'{"role":"assistant","content":[{"type":"tool_use","id":"toolu_01","name":"Edit",'
    b'"input":{"file_path":"/src/config.json","old_string":"{\\"model\\":1}","new_string":"{}"}}]}],'
    b'"system":[{"type":"text","text":"x-anthropic-billing-header: cc_version=2.1.3"},'
    b'{"type":"text","text":"You are Claude Code.","cache_control":{"type":"ephemeral"}}],'
    b'"tools":[{"name":"Task","description":"Launch an agent","input_schema":{"type":"object",'
    b'"properties":{"model":{"type":"string","enum":["sonnet","opus"]},"stream":{"type":"boolean"}}}}],'
    b'"metadata":{"user_id":"user_' + DEVICE.encode() + b"_account_" + ACCOUNT.encode()
    + b"_session_" + SESSION.encode() + b'"},"max_tokens":32000,"thinking":{"type":"enabled",'
    b'"budget_tokens":31999},"stream":true}'
)

CODEX_REQUEST = (
    b'{\n  "model": "gpt-5-codex",\n  "instructions": "You are Codex, based on GPT-5.",\n'
    b'  "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}],\n'
    b'  "tools": [], "tool_choice": "auto", "parallel_tool_calls": false,\n'
    b'  "reasoning": {"effort": "medium", "summary": "auto"}, "store": false, "stream": true,\n'
    b'  "include": ["reasoning.encrypted_content"],\n'
    b'  "prompt_cache_key": "0199a3c2-5f1e-7d40-9b6a-2c8e4f1d3a57"\n}'
)


@pytest.fixture(scope="module", params=["c", "py"])
def twin(request: pytest.FixtureRequest) -> ModuleType:
    if request.param == "c" and os.environ.get("HUBCORE_NO_EXTENSIONS"):
        pytest.skip("HUBCORE_NO_EXTENSIONS is set")
    return importlib.import_module("hubcore.accounting._meter" if request.param == "c" else "hubcore.accounting._meter_py")


def expected(doc: bytes) -> tuple[Any, bool, Any, Any]:
    """What a full parse says, written apart from both twins."""
    obj = orjson.loads(doc)
    if not isinstance(obj, dict):
        return (None, False, None, None)
    md = obj.get("metadata")
    uid = md.get("user_id") if isinstance(md, dict) else None
    model, pck = obj.get("model"), obj.get("prompt_cache_key")
    return (
        model if isinstance(model, str) else None,
        obj.get("stream") is True,
        uid if isinstance(uid, str) else None,
        pck if isinstance(pck, str) else None,
    )


def test_claude_code_request(twin: ModuleType) -> None:
    model, stream, uid, pck = twin.scan_request(CLAUDE_CODE_REQUEST)
    assert (model, stream, pck) == ("claude-opus-4-6", True, None)
    assert uid == f"user_{DEVICE}_account_{ACCOUNT}_session_{SESSION}"
    assert session_from_user_id(uid) == SESSION
    assert twin.scan_request(CLAUDE_CODE_REQUEST) == expected(CLAUDE_CODE_REQUEST)


def test_codex_request(twin: ModuleType) -> None:
    assert twin.scan_request(CODEX_REQUEST) == ("gpt-5-codex", True, None, "0199a3c2-5f1e-7d40-9b6a-2c8e4f1d3a57")


@pytest.mark.parametrize(
    ("body", "want"),
    [
        (b'{"model":"a","model":"b"}', ("b", False, None, None)),
        (b'{"model":"a","model":7}', (None, False, None, None)),
        (b'{"stream":true,"stream":false}', (None, False, None, None)),
        (b'{"stream":"true"}', (None, False, None, None)),
        (b'{"stream" :\ttrue }', (None, True, None, None)),
        (b'{"metadata":{"user_id":"u"},"metadata":{}}', (None, False, None, None)),
        (b'{"metadata":{"user_id":"u","user_id":"v"}}', (None, False, "v", None)),
        (b'{"metadata":{"user_id":null}}', (None, False, None, None)),
        (b'{"mod\\u0065l":"caf\\u00e9 \\ud83d\\ude00","\\u0073tream":true}', ("caf\u00e9 \U0001f600", True, None, None)),
        (b'{"x":{"model":"nested"},"y":["model",{"stream":true}]}', (None, False, None, None)),
        (b'{"a":"\\\\","model":"after an escaped backslash"}', ("after an escaped backslash", False, None, None)),
        (b'{"a":"\\"model\\":\\"no\\"","prompt_cache_key":"k"}', (None, False, None, "k")),
        (b"[1,2]", (None, False, None, None)),
        (b"", (None, False, None, None)),
    ],
)
def test_top_level_fields_like_orjson(twin: ModuleType, body: bytes, want: tuple[Any, ...]) -> None:
    assert twin.scan_request(body) == want
    if body:
        assert want == expected(body)


@pytest.mark.parametrize(
    ("body", "want"),
    [
        (b'{"model":"claude-x","messages":[{"role":"us', ("claude-x", False, None, None)),
        (b'{"stream":true,"model":"unterminated', (None, True, None, None)),
        (b'{"model":"a" "stream":true}', ("a", False, None, None)),
        (b"\xff\xfe{", (None, False, None, None)),
        (b'{"model":"\xff"}', (None, False, None, None)),
    ],
)
def test_invalid_json_gives_what_it_can(twin: ModuleType, body: bytes, want: tuple[Any, ...]) -> None:
    assert twin.scan_request(body) == want


def test_accepts_bytes_like(twin: ModuleType) -> None:
    for body in (bytearray(CODEX_REQUEST), memoryview(CODEX_REQUEST)):
        assert twin.scan_request(body)[0] == "gpt-5-codex"


# -- generated documents -------------------------------------------------------


class Obj(list):  # type: ignore[type-arg]
    """A JSON object as (key, value) pairs, so that keys may repeat."""


KEYS = st.sampled_from(["model", "stream", "metadata", "user_id", "prompt_cache_key", "messages", "é", "mode"]) | st.text(
    max_size=6
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(['"usage":{', "\\", '"', "model", '{"model":"x"}'])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.lists(st.tuples(KEYS, inner), max_size=4).map(Obj),
    max_leaves=20,
)
DOCS = st.lists(st.tuples(KEYS, VALUES), max_size=8).map(Obj)
SPACES = st.sampled_from(["", " ", "\n  ", "\t", "\r\n"])


def dump(v: object, draw: Any) -> str:
    """JSON text for v, with drawn spacing and string escapes (orjson would always write the same)."""
    if isinstance(v, Obj):
        members = [dump_str(k, draw) + draw(SPACES) + ":" + draw(SPACES) + dump(x, draw) for k, x in v]
        return "{" + draw(SPACES) + ("," + draw(SPACES)).join(members) + draw(SPACES) + "}"
    if isinstance(v, list):
        return "[" + ",".join(draw(SPACES) + dump(x, draw) for x in v) + "]"
    if isinstance(v, str):
        return dump_str(v, draw)
    return json.dumps(v)


def dump_str(s: str, draw: Any) -> str:
    if not draw(st.booleans()):
        return json.dumps(s, ensure_ascii=draw(st.booleans()))
    # escape some characters that need no escaping, as some encoders do
    out = []
    for ch in s:
        if ord(ch) < 0x10000 and draw(st.booleans()):
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(json.dumps(ch, ensure_ascii=False)[1:-1])
    return '"' + "".join(out) + '"'


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=DOCS, data=st.data())
def test_agrees_with_orjson_on_generated_documents(doc: Obj, data: st.DataObject) -> None:
    text = (data.draw(SPACES) + dump(doc, data.draw) + data.draw(SPACES)).encode()
    want = expected(text)
    assert _sse_py.scan_request(text) == want
    assert _sse_py._walk(text) == want  # the walk the pure twin keeps for invalid bodies
    if not os.environ.get("HUBCORE_NO_EXTENSIONS"):
        assert importlib.import_module("hubcore.accounting._meter").scan_request(text) == want


JSONISH = st.lists(
    st.sampled_from([b"{", b"}", b"[", b"]", b'"', b"\\", b":", b",", b" ", b"true", b"1", b'"model"', b'"stream"',
                     b'"metadata"', b'"user_id"', b'"prompt_cache_key"', b'"x"', b'\\"', b"\\u0065", b"\xff"])
    | st.binary(max_size=4),
    max_size=40,
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(body=JSONISH | st.binary(max_size=64))
def test_twins_agree_on_any_bytes(body: bytes) -> None:
    py = _sse_py.scan_request(body)
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        assert py == _sse_py._walk(body)
    if not os.environ.get("HUBCORE_NO_EXTENSIONS"):
        assert importlib.import_module("hubcore.accounting._meter").scan_request(body) == py


# -- session ids -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("user_id", "want"),
    [
        (json.dumps({"device_id": DEVICE, "account_uuid": ACCOUNT, "session_id": SESSION}), SESSION),
        (json.dumps({"device_id": DEVICE, "account_uuid": "", "session_id": SESSION.upper()}), SESSION),
        (f"user_{DEVICE}_account_{ACCOUNT}_session_{SESSION}", SESSION),
        (f"user_{DEVICE}_account__session_{SESSION}", SESSION),
        (json.dumps({"device_id": DEVICE, "session_id": "not-a-uuid"}), None),
        (json.dumps({"device_id": DEVICE}), None),
        ('{"session_id": ', None),
        (json.dumps([SESSION]), None),
        (f"user_{DEVICE}_account_{ACCOUNT}_session_{SESSION}x", None),
        (f"user_{DEVICE[:-2]}_account__session_{SESSION}", None),
        ("", None),
        ("anything", None),
    ],
)
def test_session_from_user_id(user_id: str, want: str | None) -> None:
    assert session_from_user_id(user_id) == want
