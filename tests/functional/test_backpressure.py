"""Backpressure through a real `hubcore serve` process: a client that stops
reading, then reads slowly, from a fast 50 MB stream keeps the hub's memory
bounded (VmRSS from /proc), the vendor is held back, and every byte arrives.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.fakevendor import ANTHROPIC_KEY, BULK_DELTA_BYTES, COMPLETED, FakeVendor
from tests.hubharness import REPO, free_port, hubcore_cmd, wait_listening

STREAM_BYTES = 50 * 1024 * 1024  # text in the stream (x-fake-bytes)
# Generous: the hub's own buffers are a few water marks (KiB); a hub that
# buffered the stream instead of pausing its upstream read would hold most
# of the 50 MB while the client is not reading.
RSS_HEADROOM = 32 * 1024 * 1024
PAUSE_S = 1.5           # the client reads nothing for this long
SLOW_READ = 64 * 1024   # bytes per recv while reading slowly
SLOW_READ_GAP_S = 0.001
TRANSFER_DEADLINE_S = 60.0
BODY = b'{"model":"claude-sonnet-4-6","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"bulk"}]}'


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def request_bytes(token: str, extra: bytes = b"") -> bytes:
    return (
        b"POST /v1/messages HTTP/1.1\r\nhost: hub\r\nx-api-key: " + token.encode()
        + b"\r\nanthropic-version: 2023-06-01\r\ncontent-type: application/json\r\nconnection: close\r\n"
        + extra + b"content-length: %d\r\n\r\n" % len(BODY) + BODY
    )


def dechunk(data: bytes) -> bytes:
    out = []
    pos = 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(data[end + 2 : end + 2 + size])
        assert data[end + 2 + size : end + 4 + size] == b"\r\n"
        pos = end + 4 + size


def text_of(events_blob: bytes) -> Iterator[str]:
    for event in events_blob.split(b"\n\n"):
        if event.startswith(b"event: content_block_delta\n"):
            yield orjson.loads(event.split(b"data: ", 1)[1])["delta"]["text"]


@pytest.fixture
def served_hub(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, str, FakeVendor]]:
    with FakeVendor() as vendor:
        port = free_port()
        config = tmp_path / "hubcore.toml"
        config.write_text(
            f"""
[server]
listen = "127.0.0.1:{port}"
database = "{tmp_path / 'hub.db'}"
ops_socket = "{tmp_path / 'ops.sock'}"
log_level = "warning"

[[upstream]]
name = "anthropic"
kind = "anthropic"
base_url = "{vendor.url}"
keys = ["{ANTHROPIC_KEY}"]

# Off: the default port would be shared by every hub on the machine.
[dashboard]
listen = ""
"""
        )
        with open(tmp_path / "hub.log", "w") as log:
            proc = subprocess.Popen(hubcore_cmd("serve", "--config", str(config)), stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO)
        try:
            wait_listening(port, proc)
            # Not a terminal: the first token is in a file beside the database.
            token = (tmp_path / "first-token").read_text().strip()
            assert token, (tmp_path / "hub.log").read_text()
            yield proc, port, token, vendor
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, (tmp_path / "hub.log").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            proc.stdout.close()  # type: ignore[union-attr]
        vendor.check()


def test_slow_reader_keeps_hub_memory_bounded(served_hub: tuple[subprocess.Popen[str], int, str, FakeVendor]) -> None:
    proc, port, token, vendor = served_hub
    # Warm up every code path of a stream so the baseline includes them.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as warm:
        warm.sendall(request_bytes(token, b"x-fake-bytes: 1048576\r\n"))
        while warm.recv(1 << 20):
            pass
    baseline = rss_bytes(proc.pid)
    peak = baseline
    deadline = time.monotonic() + TRANSFER_DEADLINE_S

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # A small receive buffer so the kernel cannot absorb the stream for us.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(request_bytes(token, b"x-fake-bytes: %d\r\n" % STREAM_BYTES))
        received = [sock.recv(SLOW_READ)]
        vendor_requests = vendor.wait_for_requests(2)
        stream_request = vendor_requests[1]

        # Phase 1: read nothing. The hub must stop reading upstream, so the
        # vendor stalls far short of the end and the hub's memory stays flat.
        pause_end = time.monotonic() + PAUSE_S
        while time.monotonic() < pause_end:
            peak = max(peak, rss_bytes(proc.pid))
            time.sleep(0.05)
        sent_while_paused = stream_request.events_sent * BULK_DELTA_BYTES
        assert sent_while_paused < STREAM_BYTES // 2, f"the vendor sent {sent_while_paused} bytes to a client that read nothing"

        # Phase 2: read slowly to the end, sampling the hub as we go.
        reads = 0
        while True:
            chunk = sock.recv(SLOW_READ)
            if not chunk:
                break
            received.append(chunk)
            reads += 1
            if reads % 32 == 0:
                peak = max(peak, rss_bytes(proc.pid))
                assert time.monotonic() < deadline, "the transfer took too long"
            time.sleep(SLOW_READ_GAP_S)

    assert peak - baseline < RSS_HEADROOM, f"hub RSS grew by {(peak - baseline) / 2**20:.1f} MiB (baseline {baseline / 2**20:.1f} MiB)"

    raw = b"".join(received)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding: chunked" in head.lower()
    events = dechunk(body)
    texts = list(text_of(events))
    assert sum(len(t) for t in texts) == STREAM_BYTES
    assert len(set(texts[:-1])) == 1 and texts[0].startswith("lorem ipsum")  # intact, not interleaved
    assert events.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    vendor.wait_idle()
    assert stream_request.outcome == COMPLETED
