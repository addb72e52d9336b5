"""The hub's own probes of keys whose circuit is open: one cheap request
(`GET /v1/models` with that key) per key and pause, so that no user's request
is ever the one that finds out whether a broken key works again.

The key ring decides when a probe is due and what its answer means
(KeyRing.take_probes, KeyRing.release); this module only sends it.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from hubcore.config import UpstreamConfig
from hubcore.http.client import Pool, UpstreamError
from hubcore.routing.failures import CLIENT_ABORTED, CONNECT_FAILED, Failure, classify, transport_failure
from hubcore.routing.keys import KeyRing, Lease

log = logging.getLogger("hubcore.probe")

# The models list is a few KiB; what is beyond is read and dropped.
BODY_LIMIT = 64 * 1024
# The API version the probe asks for (any version lists the models).
ANTHROPIC_VERSION = b"2023-06-01"
NO_VERDICT = CLIENT_ABORTED
PROBE_BROKE = CONNECT_FAILED


class Upstream(Protocol):
    """What a probe needs of an upstream (gateway.upstreams.UpstreamRuntime)."""

    config: UpstreamConfig
    pool: Pool
    ring: KeyRing
    host_header: bytes
    base_path: bytes

    def auth_header(self, secret: str) -> bytes: ...


def probe_head(upstream: Upstream, secret: str) -> bytes:
    """The probe's request head: the models list, with the key to judge."""
    head = b"GET %s/v1/models HTTP/1.1\r\n%s%s" % (upstream.base_path, upstream.host_header, upstream.auth_header(secret))
    if upstream.config.kind == "anthropic":
        head += b"anthropic-version: " + ANTHROPIC_VERSION + b"\r\n"
    return head + b"user-agent: hubcore-probe\r\naccept-encoding: identity\r\n\r\n"


async def probe(upstream: Upstream, secret: str) -> Failure | None:
    """Send one probe on a fresh connection (which proves the vendor can be
    reached; it goes to the pool afterwards) and judge its answer as any
    answer is judged: None when it says nothing against the key (2xx, and a
    4xx about the request itself, such as a relay without a models list)."""
    timeout = upstream.config.probe_timeout
    try:
        conn = await upstream.pool.connect()
    except UpstreamError as e:
        return transport_failure(e)
    try:
        head = await conn.send(probe_head(upstream, secret), [], timeout, timeout)
        await conn.read_body(BODY_LIMIT)
    except UpstreamError as e:
        conn.close()
        return transport_failure(e)
    except BaseException:
        conn.close()
        raise
    conn.release()
    return classify(head.status, head.headers)



class Prober:
    """Sends the probes of one upstream's ring as they fall due: one task that
    waits for the ring (no polling), and a task per probe out."""

    def __init__(self, upstream: Upstream, loop: asyncio.AbstractEventLoop) -> None:
        self.upstream = upstream
        self.loop = loop
        self._task: asyncio.Task[None] | None = None
        self._probes: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        if self._task is None:
            self._task = self.loop.create_task(self._run())

    def close(self) -> None:
        """Stop probing; a probe that is out is cancelled and gives no verdict."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for task in list(self._probes):
            task.cancel()

    async def _run(self) -> None:
        # A reload keeps the ring and replaces its keys, which take_probes sees.
        ring = self.upstream.ring
        while True:
            await ring.wait_probe_due()
            for lease in ring.take_probes():
                task = self.loop.create_task(self._probe(ring, lease))
                self._probes.add(task)
                task.add_done_callback(self._probes.discard)

    async def _probe(self, ring: KeyRing, lease: Lease) -> None:
        failure: Failure | None = NO_VERDICT
        try:
            failure = await probe(self.upstream, lease.secret)
        except Exception:
            # A bug, not the vendor; but a probe without a verdict is due
            # again at once, so it counts as failed and repeats only as often
            # as the growing pause allows.
            log.exception("upstream %s: the probe of key %s failed", ring.name, lease.label)
            failure = PROBE_BROKE
        finally:
            # The ring logs what the answer does to the key (hubcore.keys).
            ring.release(lease, failure)
