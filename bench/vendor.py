"""The benchmark's fake Anthropic API: a bare uvloop Protocol that answers
`POST /v1/messages` with precomputed, chunk-framed SSE, all at once or paced.

It parses only what it must (head end, content-length, the key and the
x-bench-* steering headers) and stamps each text delta with its send time, so
that it costs far less per request than any proxy in front of it.
Run: `python -m bench.vendor --port 0 --print-port`.
"""
from __future__ import annotations

import argparse
import asyncio
import email.utils
import resource
import signal
import socket
import sys
import time

import uvloop

from bench.payloads import STAMP_PLACEHOLDER, STAMP_WIDTH, VENDOR_KEYS, anthropic_events

_monotonic = time.monotonic
KEYS = frozenset(k.encode() for k in VENDOR_KEYS)
# Roughly the header set api.anthropic.com sends through Cloudflare; the
# proxies in front must carry all of them.
RESPONSE_HEADERS = (
    b"content-type: text/event-stream; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\n"
    b"connection: keep-alive\r\n"
    b"cache-control: no-cache\r\n"
    b"anthropic-ratelimit-input-tokens-limit: 2000000\r\n"
    b"anthropic-ratelimit-input-tokens-remaining: 1998000\r\n"
    b"anthropic-ratelimit-input-tokens-reset: 2026-03-07T12:00:01Z\r\n"
    b"anthropic-ratelimit-output-tokens-limit: 400000\r\n"
    b"anthropic-ratelimit-output-tokens-remaining: 400000\r\n"
    b"anthropic-ratelimit-output-tokens-reset: 2026-03-07T12:00:01Z\r\n"
    b"anthropic-ratelimit-requests-limit: 4000\r\n"
    b"anthropic-ratelimit-requests-remaining: 3999\r\n"
    b"anthropic-ratelimit-requests-reset: 2026-03-07T12:00:00Z\r\n"
    b"request-id: req_011CUBenchBenchBenchBench1\r\n"
    b"anthropic-organization-id: 6f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0\r\n"
    b"via: 1.1 google\r\n"
    b"cf-cache-status: DYNAMIC\r\n"
    b"x-robots-tag: none\r\n"
    b"server: cloudflare\r\n"
    b"cf-ray: 97a1b2c3d4e5f607-AMS\r\n"
)
ROOT_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n\r\nok\n"
NOT_FOUND = b'{"type":"error","error":{"type":"not_found_error","message":"Not found"}}'
BAD_KEY = b'{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}'
MAX_HEAD = 64 * 1024


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


class Stream:
    """One event count, precomputed: each event chunk-framed and split at its
    stamp, so a send is a join with the current time."""

    def __init__(self, events: int) -> None:
        framed = [_chunk(e) for e in anthropic_events(events)]
        self.events = [e.split(STAMP_PLACEHOLDER) for e in framed]
        self.whole = b"".join(framed).split(STAMP_PLACEHOLDER) + [b"0\r\n\r\n"]
        self.whole[-2:] = [self.whole[-2] + self.whole[-1]]


class _Date:
    """The Date header, rebuilt once a second."""

    def __init__(self) -> None:
        self.second = -1
        self.line = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.line = b"date: " + email.utils.formatdate(now, usegmt=True).encode() + b"\r\n"
        return self.line


class Vendor:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.streams: dict[int, Stream] = {}
        self.date = _Date()
        self.requests = 0

    def stream(self, events: int) -> Stream:
        s = self.streams.get(events)
        if s is None:
            s = self.streams[events] = Stream(events)
        return s

    def head(self) -> bytes:
        return b"HTTP/1.1 200 OK\r\n" + self.date.get() + RESPONSE_HEADERS + b"\r\n"


def _header(head: bytes, name: bytes) -> bytes | None:
    """A header value from a lower-cased head (names are unique here)."""
    i = head.find(b"\r\n" + name + b":")
    if i < 0:
        return None
    i += len(name) + 3
    j = head.find(b"\r\n", i)
    return head[i:j].strip()


class VendorProtocol(asyncio.Protocol):
    __slots__ = ("vendor", "transport", "buf", "body_left", "req_head", "stream", "next_event", "timer", "t0", "pace")

    def __init__(self, vendor: Vendor) -> None:
        # per-connection
        self.vendor = vendor
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.body_left = 0
        # per-request
        self.req_head = b""  # lower-cased, ends with CRLF
        self.stream: Stream | None = None
        self.next_event = 0
        self.timer: asyncio.TimerHandle | None = None
        self.t0 = 0.0
        self.pace = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.body_left:
            if len(data) <= self.body_left:
                self.body_left -= len(data)
                if self.body_left == 0:
                    self._respond()
                return
            data = data[self.body_left:]
            self.body_left = 0
            self._respond()
        self.buf = self.buf + data if self.buf else data
        while self.buf and self.stream is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD and self.transport is not None:
                    self.transport.abort()
                return
            head = self.buf[:end + 2].lower()
            rest = self.buf[end + 4:]
            self.req_head = head
            length = int(_header(head, b"content-length") or 0)
            if len(rest) < length:
                self.buf = b""
                self.body_left = length - len(rest)
                return
            self.buf = rest[length:]
            self._respond()

    def _respond(self) -> None:
        head = self.req_head
        transport = self.transport
        if transport is None:
            return
        vendor = self.vendor
        vendor.requests += 1
        if head.startswith(b"get / ") or head.startswith(b"head / "):
            transport.write(ROOT_RESPONSE)
            return
        if not head.startswith(b"post /v1/messages"):
            self._error(404, b"Not Found", NOT_FOUND)
            return
        if _header(head, b"x-api-key") not in KEYS:
            self._error(401, b"Unauthorized", BAD_KEY)
            return
        events = int(_header(head, b"x-bench-events") or 20)
        pace = float(_header(head, b"x-bench-pace-ms") or 0) / 1000.0
        stream = vendor.stream(events)
        if pace <= 0:
            stamp = b"%017.6f" % _monotonic()
            transport.writelines((vendor.head(), stamp.join(stream.whole)))
            return
        # Paced: event k leaves at t0 + k * pace (absolute, so timer lateness
        # does not accumulate); later requests on this connection wait.
        self.stream = stream
        self.pace = pace
        self.t0 = vendor.loop.time()
        self.next_event = 0
        transport.write(vendor.head())
        self._send_next()

    def _send_next(self) -> None:
        self.timer = None
        stream = self.stream
        transport = self.transport
        if stream is None or transport is None:
            return
        pieces = stream.events[self.next_event]
        if len(pieces) == 1:
            transport.write(pieces[0])
        else:
            transport.write((b"%017.6f" % _monotonic()).join(pieces))
        self.next_event += 1
        if self.next_event < len(stream.events):
            self.timer = self.vendor.loop.call_at(self.t0 + self.next_event * self.pace, self._send_next)
            return
        transport.write(b"0\r\n\r\n")
        self.stream = None
        if self.buf:
            self.data_received(b"")

    def _error(self, status: int, reason: bytes, body: bytes) -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
            % (status, reason, len(body), self.vendor.date.get(), body)
        )


assert len(b"%017.6f" % 12345.0) == STAMP_WIDTH


async def serve(host: str, port: int, print_port: bool) -> None:
    loop = asyncio.get_running_loop()
    vendor = Vendor(loop)
    for events in (20, 300):
        vendor.stream(events)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = await loop.create_server(lambda: VendorProtocol(vendor), sock=sock, backlog=4096)
    if print_port:
        print(sock.getsockname()[1], flush=True)
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    loop.add_signal_handler(signal.SIGINT, stop.set_result, None)
    await stop
    server.close()


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--print-port", action="store_true")
    args = parser.parse_args()
    raise_fd_limit()
    uvloop.run(serve(args.host, args.port, args.print_port))
    sys.exit(0)


if __name__ == "__main__":
    main()
