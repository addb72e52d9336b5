"""Throughput of the streaming meter and the request scanner, compiled vs pure vs a full parse.

Run `python -m bench.meter` (or `--quick`). Prints a markdown table; asserts
nothing: the numbers are for reading, side by side from one run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import time
from collections.abc import Callable
from types import ModuleType

import orjson

from hubcore.accounting import _meter_py as _sse_py

SEED = 20260301
# Bytes per read as a proxy sees them from a TLS upstream: a record is up to
# 16 KiB, streams mostly arrive in small ones.
CHUNK_SIZES = (1024, 1460, 2048, 2920, 4096, 8192, 16384)
WORDS = (
    "the function returns a new list of tokens and keeps the cache warm so that later calls are cheap "
    "def class import return await async self None True False if else for while try except with yield "
    "`config.toml` \"path\" {\"key\": 1} \\n tab\tend Unicode: naïve café — ✓"
).split(" ")


def _sse(name: str, obj: dict[str, object]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def _text(rng: random.Random, lo: int, hi: int) -> str:
    out: list[str] = []
    size = rng.randint(lo, hi)
    while sum(map(len, out)) < size:
        out.append(rng.choice(WORDS))
    return " ".join(out)[:size]


def claude_code_stream(deltas: int = 1200, seed: int = SEED) -> bytes:
    """A Claude Code turn: thinking, text, then a tool call with a large input, with cache usage."""
    rng = random.Random(seed)
    usage = {
        "input_tokens": 3, "cache_creation_input_tokens": 1834, "cache_read_input_tokens": 48211,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 1834},
        "output_tokens": 1, "service_tier": "standard",
    }
    out = [_sse("message_start", {"type": "message_start", "message": {
        "id": "msg_01BenchBenchBenchBenchBench", "type": "message", "role": "assistant", "model": "claude-opus-4-6",
        "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}})]
    blocks = (("thinking", deltas // 5), ("text", deltas * 2 // 5), ("tool_use", deltas - deltas // 5 - deltas * 2 // 5))
    for index, (kind, count) in enumerate(blocks):
        if kind == "thinking":
            start: dict[str, object] = {"type": "thinking", "thinking": "", "signature": ""}
        elif kind == "text":
            start = {"type": "text", "text": ""}
        else:
            start = {"type": "tool_use", "id": "toolu_01BenchBenchBench", "name": "Write", "input": {}}
        out.append(_sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": start}))
        for i in range(count):
            if kind == "thinking":
                delta: dict[str, object] = {"type": "thinking_delta", "thinking": _text(rng, 10, 120)}
            elif kind == "text":
                delta = {"type": "text_delta", "text": _text(rng, 2, 60)}
            else:
                delta = {"type": "input_json_delta", "partial_json": orjson.dumps(_text(rng, 20, 200)).decode()[1:-1]}
            out.append(_sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))
            if i % 97 == 0:
                out.append(b'event: ping\ndata: {"type": "ping"}\n\n')
        if kind == "thinking":
            out.append(_sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": {
                "type": "signature_delta", "signature": "EqQBCgIYAhIM" + "A" * 300}}))
        out.append(_sse("content_block_stop", {"type": "content_block_stop", "index": index}))
    out.append(_sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                                      "usage": {**usage, "output_tokens": 4012}}))
    out.append(_sse("message_stop", {"type": "message_stop"}))
    return b"".join(out)


def chunked(data: bytes, seed: int = SEED) -> list[bytes]:
    rng = random.Random(seed)
    pieces, i = [], 0
    while i < len(data):
        n = rng.choice(CHUNK_SIZES)
        pieces.append(data[i : i + n])
        i += n
    return pieces


def claude_code_request(size: int = 90_000, seed: int = SEED) -> bytes:
    """A Claude Code request body: long system prompt, many tool schemas, a conversation."""
    rng = random.Random(seed)
    tools = [
        {"name": f"Tool{i}", "description": _text(rng, 300, 1500), "input_schema": {
            "type": "object", "$schema": "http://json-schema.org/draft-07/schema#", "additionalProperties": False,
            "required": ["path", "model"], "properties": {
                "path": {"type": "string", "description": _text(rng, 40, 200)},
                "model": {"type": "string", "enum": ["sonnet", "opus", "haiku"]},
                "stream": {"type": "boolean"}, "limit": {"type": "number", "minimum": 0},
                "edits": {"type": "array", "items": {"type": "object", "properties": {
                    "old_string": {"type": "string"}, "new_string": {"type": "string"}}}}}}}
        for i in range(18)
    ]
    messages: list[dict[str, object]] = []
    body: dict[str, object] = {"model": "claude-opus-4-6", "max_tokens": 32000}
    while True:
        body.update(
            messages=messages,
            system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.3; cc_entrypoint=cli"},
                    {"type": "text", "text": _text(rng, 12000, 12000), "cache_control": {"type": "ephemeral"}}],
            tools=tools,
            metadata={"user_id": "user_" + "ab" * 32 + "_account__session_4f8c2a6e-9b1d-4e37-a5c0-7d2e8f1b3a96"},
            thinking={"type": "enabled", "budget_tokens": 31999},
            stream=True,
        )
        encoded = orjson.dumps(body)
        if len(encoded) >= size:
            return encoded
        messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"toolu_{len(messages)}",
                                                      "content": _text(rng, 200, 3000)}]})
        messages.append({"role": "assistant", "content": [
            {"type": "text", "text": _text(rng, 20, 400)},
            {"type": "tool_use", "id": f"toolu_{len(messages)}", "name": "Tool3",
             "input": {"path": "/src/app.py", "edits": [{"old_string": _text(rng, 20, 300), "new_string": "x"}]}}]})


def naive_meter(pieces: list[bytes]) -> int:
    """What a gateway without a meter does: split lines, orjson.loads every data line."""
    buf = b""
    output = 0
    for piece in pieces:
        buf += piece
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.startswith(b"data:"):
                event = orjson.loads(line[5:])
                usage = event.get("usage") or (event.get("message") or {}).get("usage")
                if usage:
                    output = usage.get("output_tokens", output)
    return output


def best_time(fn: Callable[[], object], repeat: int, number: int) -> float:
    """Seconds per call, best of `repeat` rounds of `number` calls (a shared machine is noisy)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def meter_run(twin: ModuleType, pieces: list[bytes]) -> Callable[[], object]:
    def run() -> object:
        m = twin.Meter(twin.FMT_ANTHROPIC, True)
        for piece in pieces:
            m.feed(piece)
        m.close()
        return m.output_tokens

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, for a smoke run")
    args = parser.parse_args()
    repeat, scale = (3, 1) if args.quick else (7, 5)

    compiled: ModuleType | None = None
    if not os.environ.get("HUBCORE_NO_EXTENSIONS"):
        try:
            compiled = importlib.import_module("hubcore.accounting._meter")
        except ImportError:
            compiled = None

    stream = claude_code_stream()
    pieces = chunked(stream)
    events = stream.count(b"\n\n")
    request = claude_code_request()
    want = (meter_run(_sse_py, pieces)(), naive_meter(pieces))
    if compiled is not None:
        assert meter_run(compiled, pieces)() == want[0] == want[1], "twins disagree; fix before timing"

    rows: list[tuple[str, str, int, float]] = []
    if compiled is not None:
        rows.append(("meter", "compiled `_meter`", len(stream), best_time(meter_run(compiled, pieces), repeat, 4 * scale)))
    rows.append(("meter", "pure `_meter_py`", len(stream), best_time(meter_run(_sse_py, pieces), repeat, scale)))
    rows.append(("meter", "naive: orjson.loads every data line", len(stream),
                 best_time(lambda: naive_meter(pieces), repeat, scale)))
    if compiled is not None:
        rows.append(("scan_request", "compiled `_meter`", len(request),
                     best_time(lambda: compiled.scan_request(request), repeat, 40 * scale)))
    rows.append(("scan_request", "pure `_meter_py` (orjson, then fields)", len(request),
                 best_time(lambda: _sse_py.scan_request(request), repeat, 10 * scale)))
    rows.append(("scan_request", "pure walker `_meter_py._walk`", len(request),
                 best_time(lambda: _sse_py._walk(request), repeat, scale)))
    rows.append(("scan_request", "orjson.loads (full parse)", len(request),
                 best_time(lambda: orjson.loads(request), repeat, 10 * scale)))

    print(f"Claude Code stream: {len(stream) / 1024:.0f} KiB, {events} events, {len(pieces)} reads of 1-16 KiB; "
          f"request body: {len(request) / 1024:.0f} KiB\n")
    print("| subject | implementation | MB/s | µs per call | vs pure twin |")
    print("|---|---|---:|---:|---:|")
    pure = {subject: secs for subject, name, _, secs in rows if name.startswith("pure `")}
    for subject, name, size, secs in rows:
        print(f"| {subject} | {name} | {size / secs / 1e6:,.0f} | {secs * 1e6:,.1f} | {pure[subject] / secs:.1f}x |")
    if compiled is None:
        print("\n(compiled twin not loaded: build it with `python setup.py build_ext --inplace`)")


if __name__ == "__main__":
    main()
