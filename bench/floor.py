"""The floor: the least a reverse proxy written on hubcore's stack (Python,
uvloop, httptools) does per request, measured beside nginx and hubcore in the
saturation phase of `python -m bench`.

It parses the request, forwards its head (hop-by-hop headers dropped, the
vendor key swapped in, as the nginx reference does; rendered by hubcore's
compiled `render_head`, from hubcore's header lists) and body on a pooled
keep-alive connection, parses the answer and passes it back, re-framed like
hubcore frames it. It does none of what hubcore does for a request beyond
that: no token check, limits, key ring, timeouts, metering, pricing, usage
row, access log or metrics. The gap between this path and hubcore is the
cost of those features; the gap between this path and nginx is the cost of
the language and the stack.

Not a product: a benchmark reference. One request at a time per client
connection (wrk does not pipeline); bad input closes the connection.

    python -m bench.floor --port P --upstream-port U --key K
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from types import SimpleNamespace
from typing import Any

import httptools
import uvloop

from hubcore.gateway import rewrite as proxy
from hubcore.http.server import status_line
from hubcore.http.wire import render_head

# hubcore's own lists of what a proxy must not pass on, and its head
# rendering and status lines; the answer's
# Content-Length goes through as it came (hubcore writes its own).
RESPONSE_DROP = proxy.RESPONSE_DROP - {b"content-length"}


def feed(parser: Any, transport: asyncio.Transport | None, data: bytes) -> bool:
    """Parse what a read brought; False (the connection closed) if it is not HTTP."""
    try:
        parser.feed_data(data)
    except httptools.HttpParserError:
        if transport is not None:
            transport.close()
        return False
    return True


class Upstream(asyncio.Protocol):
    """One pooled connection to the vendor; carries one request at a time."""

    def __init__(self, pool: list[Upstream]) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.client: Client | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.parts: list[bytes] = []
        self.chunked = False
        self.parser = httptools.HttpResponseParser(SimpleNamespace(
            on_header=lambda name, value: self.headers.append((name.lower(), value)),
            on_headers_complete=self.on_headers_complete,
            on_body=self.parts.append,
            on_message_complete=self.on_message_complete,
        ))

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None and self.client.transport is not None:
            self.client.transport.close()
        self.client = None

    def data_received(self, data: bytes) -> None:
        if not feed(self.parser, self.transport, data):
            return
        if self.parts and self.client is not None:
            self.client.write_body(self.parts, False, self.chunked)
            self.parts.clear()

    def on_headers_complete(self) -> None:
        assert self.client is not None
        self.chunked = not any(name == b"content-length" for name, _ in self.headers)
        tail = b"transfer-encoding: chunked\r\n\r\n" if self.chunked else b"\r\n"
        self.client.head = render_head(status_line(self.parser.get_status_code()), self.headers, RESPONSE_DROP, tail)
        self.headers = []

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.write_body(self.parts, True, self.chunked)
        self.parts.clear()
        if self.parser.should_keep_alive():
            self.pool.append(self)
        elif self.transport is not None:
            self.transport.close()


class Client(asyncio.Protocol):
    """One client connection."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.head: bytes | None = None
        self.parser = httptools.HttpRequestParser(SimpleNamespace(
            on_url=self.on_url,
            on_header=lambda name, value: self.headers.append((name.lower(), value)),
            on_body=self.body.append,
            on_message_complete=self.on_message_complete,
        ))

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        feed(self.parser, self.transport, data)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        # The parser appends to this very list: copied out, then emptied.
        body = self.body[:]
        self.body.clear()
        start = b"%s %s HTTP/1.1\r\n%s" % (self.parser.get_method(), self.url, self.proxy.host_line)
        tail = self.proxy.key_line + b"content-length: %d\r\n\r\n" % sum(map(len, body))
        head = render_head(start, self.headers, proxy.REQUEST_DROP, tail)
        self.url = b""
        self.headers = []
        self.proxy.send(self, [head, *body])

    def write_body(self, parts: list[bytes], end: bool, chunked: bool) -> None:
        out = []
        if self.head is not None:
            out.append(self.head)
            self.head = None
        data = b"".join(parts)
        if chunked:
            if data:
                out += (b"%x\r\n" % len(data), data, b"\r\n")
            if end:
                out.append(b"0\r\n\r\n")
        elif data:
            out.append(data)
        if out and self.transport is not None:
            self.transport.writelines(out)


class Proxy:
    def __init__(self, upstream_port: int, key: str) -> None:
        self.upstream_port = upstream_port
        self.host_line = b"host: 127.0.0.1:%d\r\n" % upstream_port
        self.key_line = b"x-api-key: " + key.encode() + b"\r\n"
        self.pool: list[Upstream] = []

    def send(self, client: Client, pieces: list[bytes]) -> None:
        """On a pooled connection at once, like hubcore's common path; else
        in a task that opens one."""
        if self.pool:
            self._send_on(self.pool.pop(), client, pieces)
        else:
            asyncio.get_running_loop().create_task(self._connect_and_send(client, pieces))

    async def _connect_and_send(self, client: Client, pieces: list[bytes]) -> None:
        try:
            _, conn = await asyncio.get_running_loop().create_connection(
                lambda: Upstream(self.pool), "127.0.0.1", self.upstream_port)
        except OSError:
            if client.transport is not None:
                client.transport.close()
            return
        self._send_on(conn, client, pieces)

    def _send_on(self, conn: Upstream, client: Client, pieces: list[bytes]) -> None:
        conn.client = client
        assert conn.transport is not None
        conn.transport.writelines(pieces)


async def serve(port: int, upstream_port: int, key: str) -> None:
    proxy = Proxy(upstream_port, key)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(proxy), "127.0.0.1", port, backlog=1024)
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    print(server.sockets[0].getsockname()[1], flush=True)
    await stop
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--key", required=True, help="the vendor key sent upstream")
    args = parser.parse_args(argv)
    uvloop.run(serve(args.port, args.upstream_port, args.key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
