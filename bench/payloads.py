"""What the latency-tax benchmark puts on the wire: Claude Code-shaped request
bodies and headers, and realistic Anthropic SSE streams whose text deltas carry
the fake vendor's send time (so a client can time each event's transit).
"""
from __future__ import annotations

import random
import uuid
from collections.abc import Callable

import orjson

SEED = 20260307
LARGE_BODY_BYTES = 90 * 1024
VENDOR_KEYS = ("sk-ant-bench-key-a", "sk-ant-bench-key-b")
ROUTE = b"/v1/messages?beta=true"

# A text delta starts with STAMP_MARK then a fixed-width CLOCK_MONOTONIC send
# time written by the vendor; CLOCK_MONOTONIC is one clock for every process
# on the machine, so the client subtracts it from its own arrival time.
STAMP_MARK = b'"text":"@'
STAMP_WIDTH = 17  # b"%017.6f": seconds since boot, microseconds
STAMP_PLACEHOLDER = b"0" * STAMP_WIDTH
# Every stream carries these around its text deltas.
FIXED_EVENTS = 6  # message_start, content_block_start, ping, content_block_stop, message_delta, message_stop
MIN_EVENTS = FIXED_EVENTS + 1

WORDS = (
    "the function returns a new list of tokens and keeps the cache warm so that later calls are cheap; "
    "def class import return await async self None True False if else for while try except with yield "
    "`config.toml` \"path\" {\"key\": 1} \\n tab\tend naïve café — ✓ src/app.py:42 TODO(agent) "
    "Read the file before editing it. Prefer small, focused changes and run the tests afterwards."
).split(" ")
TOOL_NAMES = (
    "Task", "Bash", "Glob", "Grep", "ExitPlanMode", "Read", "Edit", "MultiEdit", "Write", "NotebookEdit",
    "WebFetch", "TodoWrite", "WebSearch", "BashOutput", "KillShell", "SlashCommand", "ListMcpResources",
    "ReadMcpResource", "mcp__github__create_pull_request", "mcp__github__get_issue",
)


def _text(rng: random.Random, size: int) -> str:
    out: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(WORDS)
        out.append(word)
        length += len(word) + 1
    return " ".join(out)[:size]


def _tool(rng: random.Random, name: str) -> dict[str, object]:
    props: dict[str, object] = {}
    for i in range(rng.randint(2, 6)):
        kind = rng.choice(("string", "number", "boolean", "array"))
        prop: dict[str, object] = {"type": kind, "description": _text(rng, rng.randint(40, 220))}
        if kind == "array":
            prop["items"] = {"type": "object", "properties": {"old_string": {"type": "string"}, "new_string": {"type": "string"}},
                             "required": ["old_string", "new_string"], "additionalProperties": False}
        props[f"param_{i}"] = prop
    return {
        "name": name,
        "description": _text(rng, rng.randint(600, 2800)),
        "input_schema": {
            "type": "object", "properties": props, "required": sorted(props)[:2],
            "additionalProperties": False, "$schema": "http://json-schema.org/draft-07/schema#",
        },
    }


def user_id(session: str) -> str:
    """Claude Code's metadata.user_id, in its JSON-string form."""
    return orjson.dumps({"device_id": "5f" * 32, "account_uuid": "0c3b1e6a-2d4f-4b8e-9a71-3c5d7e9f1a2b",
                         "session_id": session}).decode()


def large_body(size: int = LARGE_BODY_BYTES, seed: int = SEED) -> bytes:
    """A Claude Code turn: billing header + long system prompt, 20 tools, a
    conversation with tool calls and results, metadata.user_id, stream on."""
    rng = random.Random(seed)
    session = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    tools = [_tool(rng, name) for name in TOOL_NAMES]
    messages: list[dict[str, object]] = [
        {"role": "user", "content": [{"type": "text", "text": "<system-reminder>" + _text(rng, 1500) + "</system-reminder>"},
                                     {"type": "text", "text": _text(rng, 300)}]},
    ]
    body: dict[str, object] = {}
    turn = 0
    while True:
        body = {
            "model": "claude-opus-4-6",
            "messages": messages,
            "temperature": 1,
            "system": [
                {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.0.14.a3f; cc_entrypoint=cli"},
                {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": _text(random.Random(seed + 1), 14000), "cache_control": {"type": "ephemeral"}},
            ],
            "tools": tools,
            "metadata": {"user_id": user_id(session)},
            "max_tokens": 32000,
            "thinking": {"budget_tokens": 31999, "type": "enabled"},
            "stream": True,
        }
        encoded = orjson.dumps(body)
        if len(encoded) >= size:
            return encoded
        turn += 1
        tool_id = f"toolu_01{turn:022d}"
        messages.append({"role": "assistant", "content": [
            {"type": "thinking", "thinking": _text(rng, rng.randint(100, 600)), "signature": "Eq" + "Qk" * 120},
            {"type": "text", "text": _text(rng, rng.randint(20, 300))},
            {"type": "tool_use", "id": tool_id, "name": rng.choice(TOOL_NAMES),
             "input": {"file_path": "/work/src/app.py", "old_string": _text(rng, 120), "new_string": _text(rng, 140)}},
        ]})
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": tool_id, "content": _text(rng, rng.randint(200, 2500))},
        ]})


def small_body(seed: int = SEED) -> bytes:
    """A one-line question (an SDK script, a quick haiku call)."""
    rng = random.Random(seed)
    session = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return orjson.dumps({
        "model": "claude-haiku-4-5", "max_tokens": 512, "stream": True,
        "messages": [{"role": "user", "content": "Summarise this commit message in five words: fix the pool's idle timer."}],
        "metadata": {"user_id": user_id(session)},
    })


BODIES: dict[str, Callable[[], bytes]] = {"large": large_body, "small": small_body}


def claude_code_headers(auth: tuple[bytes, bytes], *, session: str, events: int, pace_ms: float) -> list[tuple[bytes, bytes]]:
    """Claude Code's request headers (its set and order) without host and
    content-length, plus x-bench-events / x-bench-pace-ms for the fake vendor."""
    return [
        (b"connection", b"keep-alive"),
        (b"accept", b"application/json"),
        (b"anthropic-beta", b"claude-code-20250219,interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14,context-management-2025-06-27"),
        (b"anthropic-dangerous-direct-browser-access", b"true"),
        (b"anthropic-version", b"2023-06-01"),
        auth,
        (b"content-type", b"application/json"),
        (b"user-agent", b"claude-cli/2.0.14 (external, cli)"),
        (b"x-app", b"cli"),
        (b"x-claude-code-session-id", session.encode()),
        (b"x-stainless-arch", b"x64"),
        (b"x-stainless-helper-method", b"stream"),
        (b"x-stainless-lang", b"js"),
        (b"x-stainless-os", b"Linux"),
        (b"x-stainless-package-version", b"0.60.0"),
        (b"x-stainless-retry-count", b"0"),
        (b"x-stainless-runtime", b"node"),
        (b"x-stainless-runtime-version", b"v22.19.0"),
        (b"x-stainless-timeout", b"600"),
        (b"accept-encoding", b"gzip, deflate, br, zstd"),
        (b"x-bench-events", b"%d" % events),
        (b"x-bench-pace-ms", repr(float(pace_ms)).encode()),
    ]


def request_head(host: str, auth: tuple[bytes, bytes], body_len: int, *, session: str, events: int, pace_ms: float) -> bytes:
    lines = [b"POST " + ROUTE + b" HTTP/1.1", b"host: " + host.encode()]
    lines += [name + b": " + value for name, value in claude_code_headers(auth, session=session, events=events, pace_ms=pace_ms)]
    lines.append(b"content-length: %d" % body_len)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _sse(name: str, data: dict[str, object]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def anthropic_events(events: int, seed: int = SEED) -> list[bytes]:
    """One streamed Messages answer of exactly `events` SSE events; every text
    delta starts with a stamp placeholder the vendor overwrites."""
    if events < MIN_EVENTS:
        raise ValueError(f"a stream has at least {MIN_EVENTS} events")
    rng = random.Random(seed + events)
    deltas = events - FIXED_EVENTS
    usage = {
        "input_tokens": 3, "cache_creation_input_tokens": 1834, "cache_read_input_tokens": 48211,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 1834},
        "output_tokens": 1, "service_tier": "standard",
    }
    out = [
        _sse("message_start", {"type": "message_start", "message": {
            "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant", "model": "claude-opus-4-6",
            "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}}),
        _sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        b'event: ping\ndata: {"type": "ping"}\n\n',
    ]
    for _ in range(deltas):
        text = "@" + STAMP_PLACEHOLDER.decode() + " " + _text(rng, rng.randint(4, 60))
        out.append(_sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                "delta": {"type": "text_delta", "text": text}}))
    out.append(_sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
    out.append(_sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                      "usage": {"input_tokens": 3, "cache_creation_input_tokens": 1834,
                                                "cache_read_input_tokens": 48211, "output_tokens": deltas * 9}}))
    out.append(_sse("message_stop", {"type": "message_stop"}))
    return out


def recorded_stream(events: int) -> bytes:
    """The whole stream as one body (stamps left at zero), for a static server."""
    return b"".join(anthropic_events(events))
