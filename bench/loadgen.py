"""The benchmark's load generator: raw keep-alive HTTP/1.1 over uvloop, in a
process of its own, timing each request's first byte, its end and the transit
time of every stamped SSE event (client arrival minus vendor send time).

Driven by JSON lines on stdin, one job each, answered by one JSON line on
stdout (`python -m bench.loadgen`; see `Job` for the fields).
"""
from __future__ import annotations

import asyncio
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httptools
import orjson
import uvloop

from bench.payloads import BODIES, STAMP_MARK, STAMP_WIDTH, request_head
from bench.vendor import raise_fd_limit

_monotonic = time.monotonic
STAMP_RE = re.compile(re.escape(STAMP_MARK) + rb"([0-9.]{%d})" % STAMP_WIDTH)
STOP_EVENT = b"event: message_stop\n"


@dataclass
class Job:
    host: str
    port: int
    auth_name: str
    auth_value: str
    body: str = "large"          # a key of payloads.BODIES
    events: int = 20
    pace_ms: float = 0.0
    concurrency: int = 1
    duration: float = 1.0        # seconds of measured requests per connection loop
    once: bool = False           # one request per connection (open-streams phase)
    ramp: float = 0.0            # seconds over which connections start (once mode)
    warmup: bool = True          # one unmeasured request per connection first
    think_ms: float = 0.0        # pause between a connection's requests


@dataclass
class Results:
    ttfb: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    transit: list[float] = field(default_factory=list)
    requests: int = 0
    warmups: int = 0             # unmeasured requests (connection warm-up)
    errors: int = 0              # non-200 answers and broken connections
    bad_streams: int = 0         # 200 but not the events the vendor sent
    statuses: dict[str, int] = field(default_factory=dict)
    wall: float = 0.0
    error_sample: str = ""


class ClientConnection(asyncio.Protocol):
    """One keep-alive connection making one request at a time. Parsing is
    httptools (C), and a read's stamps are found by one regex pass, so the
    client's own work per read stays small and alike on every path."""

    def __init__(self, head: bytes, body: bytes, events: int) -> None:
        # per-connection
        self.head = head
        self.body = body
        self.expected_events = events
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.record: Results | None = None
        # per-request
        self.done: asyncio.Future[bool] | None = None
        self.t_send = 0.0
        self.t_first = 0.0
        self.status = 0
        self.keep_alive = True
        self.parts: list[bytes] = []
        self.ev = b""
        self.complete = False
        self.events = 0
        self.saw_stop = False
        self.error_body = b""

    # -- asyncio.Protocol --------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.done is not None and not self.done.done():
            self._end(ok=False, why=f"connection lost: {exc or 'closed by peer'}")

    def data_received(self, data: bytes) -> None:
        now = _monotonic()
        if self.done is None:
            return
        if self.t_first == 0.0:
            self.t_first = now
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._end(ok=False, why=f"bad response: {e}")
            if self.transport is not None:
                self.transport.abort()
            return
        if self.parts:
            parts, self.parts = self.parts, []
            self._payload(parts[0] if len(parts) == 1 else b"".join(parts), now)
        if self.complete:
            self._finish(now)

    # -- httptools callbacks -------------------------------------------------
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.parts.append(body)

    def on_message_complete(self) -> None:
        self.complete = True

    # -- per read ------------------------------------------------------------
    def _payload(self, data: bytes, now: float) -> None:
        if self.status != 200:
            self.error_body += data[:2000]
            return
        ev = self.ev + data if self.ev else data
        last = ev.rfind(b"\n\n")
        if last < 0:
            self.ev = ev
            return
        done = ev[:last + 2]
        self.ev = ev[last + 2:]
        self.events += done.count(b"\n\n")
        if STOP_EVENT in done:
            self.saw_stop = True
        record = self.record
        if record is not None:
            record.transit.extend([now - float(s) for s in STAMP_RE.findall(done)])

    def _finish(self, now: float) -> None:
        record = self.record
        if record is not None and self.status == 200:
            record.ttfb.append(self.t_first - self.t_send)
            record.total.append(now - self.t_send)
        ok = self.status == 200 and self.events == self.expected_events and self.saw_stop
        why = ""
        if self.status != 200:
            why = f"status {self.status}: {self.error_body[:300].decode('utf-8', 'replace')}"
        elif not ok:
            why = f"stream of {self.events} events (expected {self.expected_events}), message_stop seen: {self.saw_stop}"
        self._end(ok=ok, why=why)
        if not self.keep_alive and self.transport is not None:
            self.transport.close()

    def _end(self, ok: bool, why: str = "") -> None:
        record = self.record
        if record is not None:
            record.requests += 1
            key = str(self.status or "conn")
            record.statuses[key] = record.statuses.get(key, 0) + 1
            if not ok:
                if self.status == 200:
                    record.bad_streams += 1
                else:
                    record.errors += 1
                if not record.error_sample:
                    record.error_sample = why
        done, self.done = self.done, None
        if done is not None and not done.done():
            done.set_result(ok)

    # -- used by the driver ------------------------------------------------------
    def request(self, record: Results | None) -> asyncio.Future[bool]:
        assert self.transport is not None
        self.record = record
        self.done = done = asyncio.get_running_loop().create_future()
        self.t_first = 0.0
        self.parts = []
        self.ev = self.error_body = b""
        self.complete = False
        self.events = 0
        self.saw_stop = False
        self.status = 0
        self.t_send = _monotonic()
        self.transport.writelines((self.head, self.body))
        return done


class Driver:
    def __init__(self, job: Job) -> None:
        self.job = job
        self.body = BODIES[job.body]()
        self.auth = (job.auth_name.encode(), job.auth_value.encode())
        self.host = f"{job.host}:{job.port}"
        self.results = Results()

    def _head(self) -> bytes:
        job = self.job
        return request_head(self.host, self.auth, len(self.body), session=str(uuid.uuid4()),
                            events=job.events, pace_ms=job.pace_ms)

    async def _connect(self) -> ClientConnection:
        loop = asyncio.get_running_loop()
        conn = ClientConnection(self._head(), self.body, self.job.events)
        await loop.create_connection(lambda: conn, self.job.host, self.job.port)
        return conn

    async def _request(self, conn: ClientConnection | None, record: Results | None) -> ClientConnection | None:
        """One request on `conn` (reconnecting when it was closed); the
        connection to use next, or None after a failure to connect."""
        if conn is None or conn.closed:
            try:
                conn = await self._connect()
            except OSError as e:
                if record is not None:
                    record.requests += 1
                    record.errors += 1
                    record.statuses["connect"] = record.statuses.get("connect", 0) + 1
                    record.error_sample = record.error_sample or f"connect: {e}"
                return None
        await conn.request(record)
        return conn

    async def run(self) -> Results:
        job = self.job
        if job.once:
            return await self._run_once()
        conns: list[ClientConnection | None] = [None] * job.concurrency
        results = self.results
        think = job.think_ms / 1000.0
        if job.warmup:
            conns = list(await asyncio.gather(*(self._request(None, None) for _ in conns)))
            results.warmups = sum(1 for c in conns if c is not None)
        t0 = _monotonic()
        end = t0 + job.duration

        async def loop(k: int) -> None:
            conn = conns[k]
            while True:
                conn = await self._request(conn, results)
                if conn is None:
                    await asyncio.sleep(0.01)
                if _monotonic() >= end:
                    break
                if think:
                    await asyncio.sleep(think)
            if conn is not None and conn.transport is not None:
                conn.transport.close()

        await asyncio.gather(*(loop(k) for k in range(job.concurrency)))
        results.wall = _monotonic() - t0
        return results

    async def _run_once(self) -> Results:
        """Every connection opens (spread over the ramp), makes one request,
        and stays until its stream ends: `concurrency` streams open at once."""
        job = self.job
        results = self.results
        t0 = _monotonic()
        step = job.ramp / job.concurrency if job.concurrency else 0.0

        async def one(k: int) -> None:
            delay = t0 + k * step - _monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            conn = await self._request(None, results)
            if conn is not None and conn.transport is not None:
                conn.transport.close()

        await asyncio.gather(*(one(k) for k in range(job.concurrency)))
        results.wall = _monotonic() - t0
        return results


async def serve_jobs() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    while True:
        line = await reader.readline()
        if not line:
            return
        job = Job(**orjson.loads(line))
        results = await Driver(job).run()
        out.write(orjson.dumps(results.__dict__) + b"\n")
        out.flush()


def run_local(job: Job) -> dict[str, Any]:
    """Run one job in this process (for tries from a shell)."""
    results: Results = uvloop.run(Driver(job).run())
    return results.__dict__


def main() -> None:
    raise_fd_limit()
    uvloop.run(serve_jobs())


if __name__ == "__main__":
    main()
