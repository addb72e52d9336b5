"""A request's common path through the Exchange, the pure-Python twin of
`_exchange.pyx`: what every request sent in callbacks does, from its
admission and its first attempt's key and write to its usage row and
metrics (`begin` → `_admit`, `_first_attempt` … `_write_request`,
`_on_head` → `_begin_stream`, `on_data`/`on_complete` → `_write`,
`_finish` → `_stream_done`, `_release_conn`, `_release_lease`,
`_end` → `_record`, `report`); and what the hub does for each request
before its Exchange (`HubCore`: `handle`, `gate`, `request_id`).
`hubcore.gateway.exchange_core` picks a twin; exchange.py's `Exchange`
subclasses its `ExchangeCore` and keeps what is rare (routing among several
upstreams, the hub's own answers and refusals, retries in the task,
failures, shared state, shutdown), and its `Hub` subclasses `HubCore`.

The twins behave the same (tests/gateway/test_exchange_core.py runs both
through the same steps). What is not hot lives here once and the compiled
twin imports it: the phases and their moves, the budget headers.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import os
import re
import time
from typing import TYPE_CHECKING

from hubcore.accounting import meter as sse
from hubcore.accounting.usage import Outcome, UsageEvent
from hubcore.config import UpstreamConfig
from hubcore.errors import ANTHROPIC, HubError, MeterError
from hubcore.gateway.answers import ROOT_BODY, ROOT_HEADERS
from hubcore.gateway.rewrite import Framing, budget_headers, keeps_alive, request_head, response_framing, response_head
from hubcore.gateway.routes import (
    ME_PATH, Route, authenticate, flavour_for_path, leading_model, printable_path, route_for, session_from_headers,
)
from hubcore.governance.tokens import Principal, TokenTable
from hubcore.routing.attempts import AttemptChain
from hubcore.routing.failures import CLIENT_ABORTED, Failure, classify, in_stream_failure, retryable
from hubcore.routing.headroom import model_class
from hubcore.routing.keys import Lease

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine
    from typing import Any

    from hubcore.gateway.exchange import Admission, Budget, Hub, Metrics, Pricer, SharedGrant
    from hubcore.gateway.upstreams import UpstreamRuntime
    from hubcore.http.client import ResponseHead, UpstreamConnection, UpstreamError
    from hubcore.http.server import HttpProtocol, Request
    from hubcore.http.wire import HeaderCollector

log = logging.getLogger("hubcore.proxy")


# ---------------------------------------------------------------------------
# Theory of operation: one request's phases.
#
# An Exchange changes phase only through Exchange._enter, which looks the
# move up in _MOVES; a move the table lacks is a bug and raises.
#
#   ADMITTING      route, token, limits. A refusal, or the hub's own `/`, is
#                  answered at once (FINISHING).
#   SENDING        a key and a connection are chosen and the request is
#                  written; a rest to wait out or a connection to open is
#                  waited for here. Every failed attempt comes back here;
#                  when none more will be made the hub answers (FINISHING).
#   AWAITING_HEAD  the request is written. A retryable head is read whole
#                  and dropped (back to SENDING).
#   HOLDING_HEAD   a head to pass on, held until the first body bytes go out
#                  with it: a failure before them can still be retried.
#   STREAMING      bytes reached the client: no retry can hide a failure
#                  now, the stream ends with an error event (FINISHING).
#   FINISHING      the answer is complete: the key, the connection and the
#                  usage row are left to do.
#   DONE           recorded. Any phase can end here at once: the client
#                  left, the drain timeout cut the request, or a bug.
#
# Two things are not phases, because they cut across them:
# - `gone`: the client left. That can happen in any phase; it changes what
#   the next step does (nothing more is written), not where the request is.
# - `in_callbacks`: who moves the request on. One sent on a pooled
#   connection is moved by the connections' callbacks, with no task, from
#   begin() to _finish(); whatever takes it off that path (a retry, a
#   failure, the client leaving, shutdown) hands it to a task for good
#   (ensure_task), in whatever phase it is then.
# ---------------------------------------------------------------------------


class Phase(enum.IntEnum):
    # An IntEnum hashes in C: a move's lookup in _MOVES costs some 60 ns
    # more than a plain attribute store, against 250 ns with enum.Enum's
    # Python-level __hash__ (six moves a request). The compiled twin keeps
    # the phase as its C int.
    ADMITTING = 1
    SENDING = 2
    AWAITING_HEAD = 3
    HOLDING_HEAD = 4
    STREAMING = 5
    FINISHING = 6
    DONE = 7


_MOVES: dict[Phase, frozenset[Phase]] = {
    Phase.ADMITTING: frozenset({Phase.SENDING, Phase.FINISHING, Phase.DONE}),
    Phase.SENDING: frozenset({Phase.AWAITING_HEAD, Phase.FINISHING, Phase.DONE}),
    Phase.AWAITING_HEAD: frozenset({Phase.HOLDING_HEAD, Phase.SENDING, Phase.DONE}),
    # FINISHING without STREAMING: the client left while its connection was
    # being opened, and the vendor's answer, written to nobody, completed.
    Phase.HOLDING_HEAD: frozenset({Phase.STREAMING, Phase.SENDING, Phase.FINISHING, Phase.DONE}),
    Phase.STREAMING: frozenset({Phase.FINISHING, Phase.DONE}),
    Phase.FINISHING: frozenset({Phase.DONE}),
    Phase.DONE: frozenset(),
}

# The members the request path names, as module globals: an attribute of an
# Enum class is looked up through EnumType.__getattr__'s slow hook (some
# 130 ns in CPython 3.11, where a global takes 20), a dozen times a request.
_SENDING, _AWAITING_HEAD, _HOLDING_HEAD, _STREAMING, _FINISHING, _DONE = (
    Phase.SENDING, Phase.AWAITING_HEAD, Phase.HOLDING_HEAD, Phase.STREAMING, Phase.FINISHING, Phase.DONE,
)
_OK, _CLIENT_ABORTED, _UPSTREAM_ERROR, _UPSTREAM_ABORTED, _REFUSED = (
    Outcome.OK, Outcome.CLIENT_ABORTED, Outcome.UPSTREAM_ERROR, Outcome.UPSTREAM_ABORTED, Outcome.REFUSED,
)
_CHUNKED = Framing.CHUNKED
# The [pricing] unpriced rule under which a model without a price is refused.
_REFUSE_UNPRICED = "refuse"
# A JSON object after optional whitespace; matched in place, never copied.
JSON_OBJECT_START = re.compile(rb"[ \t\r\n]*\{")


# Most auth lines an upstream keeps for reuse: keys rotated by many reloads
# would grow them.
AUTH_LINES_MAX = 1024


def origin_lines(config: UpstreamConfig) -> tuple[bytes, bytes, bool]:
    """The host line and base path of requests to `config`'s origin, and
    whether their auth line is Anthropic's (`x-api-key`) or a bearer token."""
    default_port = 443 if config.scheme == "https" else 80
    host = config.host if config.port == default_port else f"{config.host}:{config.port}"
    return b"host: " + host.encode() + b"\r\n", config.base_path.encode(), config.kind == "anthropic"


class UpstreamRuntimeCore:
    """What each attempt reads of an upstream as the hub runs it
    (gateway.upstreams.UpstreamRuntime, which sets all of it): its config,
    connection pool and key ring, and the head lines of requests to its
    origin."""

    if TYPE_CHECKING:
        config: UpstreamConfig
        pool: Any
        ring: Any

    host_header = b""
    base_path = b""
    auth_anthropic = False

    def address(self, config: UpstreamConfig) -> None:
        """The head lines of requests to `config`'s origin."""
        self.host_header, self.base_path, self.auth_anthropic = origin_lines(config)
        self._auth_lines: dict[str, bytes] = {}

    def auth_header(self, secret: str) -> bytes:
        lines = self._auth_lines
        line = lines.get(secret)
        if line is None:
            if len(lines) >= AUTH_LINES_MAX:
                lines.clear()
            name = b"x-api-key: " if self.auth_anthropic else b"authorization: Bearer "
            line = lines[secret] = name + secret.encode() + b"\r\n"
        return line


class HubCore:
    """What the hub does for every request before its Exchange: the gate
    that judges its head (server.Gate) and its request id. The hub
    (exchange.Hub) is this and the rest of what the Exchange needs."""

    if TYPE_CHECKING:
        # The hub's: its Exchange class, its metrics, and the task of a
        # request that does not go on in callbacks.
        exchange_type: Callable[..., ExchangeCore]
        metrics: Metrics | None

        def _run(self, exchange: Any) -> Coroutine[Any, Any, None]: ...

    def __init__(self, tokens: TokenTable) -> None:
        self.tokens = tokens
        self._id_prefix = "hc_" + os.urandom(4).hex()
        self._id_counter = 0

    def handle(self, request: Request, protocol: HttpProtocol) -> Coroutine[Any, Any, None] | None:
        """Take a request: what needs no waiting, up to its first write
        upstream, is done now, in the read that completed it. A request sent
        on a pooled connection goes on in callbacks (see Exchange.ensure_task);
        any other runs in the coroutine returned (the server's task for this
        request), which is then created off the path the client waits on."""
        exchange = self.exchange_type(self, request, protocol)
        protocol.handler = exchange  # type: ignore[assignment]
        try:
            exchange.begin()
        except Exception as e:
            # A bug: raised again in the task, which logs it (server.py).
            exchange.failure = e
            exchange.in_callbacks = False
        if self.metrics is not None:
            self.metrics.request_started()
        if exchange.in_callbacks:
            return None
        return self._run(exchange)

    def request_id(self) -> str:
        self._id_counter += 1
        return "%s%010x" % (self._id_prefix, self._id_counter)

    def gate(self, protocol: HttpProtocol, method: bytes, target: bytes, head: HeaderCollector) -> Principal | HubError | None:
        """Judge a request head before its body is read (server.Gate): a
        HubError for a target with no route or a missing, unknown or revoked
        token, which is answered without reading the body; else the caller's
        Principal (None for the hub's own root)."""
        path = target.partition(b"?")[0]
        if path == b"/":
            return None
        if route_for(path) is None and path != ME_PATH:
            return HubError(404, f"no route for {printable_path(path)}")
        principal = authenticate(self.tokens, head.index)
        if isinstance(principal, Principal):
            protocol.trust()
        return principal


class ExchangeCore:
    """The state of one request and what every request does with it; the
    subclass (exchange.Exchange) supplies the rare paths it calls:
    `respond`, `_answer_me`, `_route`, `ensure_task`,
    `_end_attempt`, `_scan_body`, `_mapped_body`, `_share_session_key`."""

    # What a request starts with, as class attributes: an instance stores only
    # what changes, which spares some thirty stores on every request.
    phase = Phase.ADMITTING
    ttfb: float | None = None
    sent_at: float | None = None
    head_at: float | None = None
    queued = 0.0  # seconds spent waiting for a resting key (_wait_for_key)
    ended: float | None = None  # when the usage row was made: the metrics' end too
    route: Route | None = None
    flavour = ANTHROPIC
    principal: Principal | None = None
    model: str | None = None
    scanned = False  # model and session read from the body
    session_id: str | None = None
    upstream: UpstreamRuntime | None = None
    # (model id, body) of the latest attempt when its upstream's model_map
    # rewrote the body's model; None: the client's body went as it is.
    mapped: tuple[str, list[bytes]] | None = None
    # The attempts before the latest, as the usage row's route (None while
    # there was one); the latest is open (its outcome not known yet) from
    # _count_attempt to _end_attempt or _route_text.
    chain: AttemptChain | None = None
    attempt_upstream = ""
    attempt_open = False
    lease: Lease | None = None
    admission: Admission | None = None
    grant: SharedGrant | None = None
    shared_session_key: str | None = None  # the session's key as the instances know it
    key_label: str | None = None
    keep_alive = True
    attempts = 0
    status = 0
    outcome = Outcome.OK
    error_type: str | None = None
    meter: sse.Meter | None = None
    # streaming state
    conn: UpstreamConnection | None = None
    head: ResponseHead | None = None
    head_failure: Failure | None = None  # what the latest response head says against its key
    # Sent by begin() and moved on by callbacks, with no task, until the
    # answer completes (FINISHING) or something needs the task's awaits.
    in_callbacks = False
    # The client left (in any phase).
    gone = False
    chunked = False
    sse_body = False
    # What the task awaits: the end of the answer's body, or the client
    # leaving while it waits for a key (client_gone fails it).
    done: asyncio.Future[None] | None = None
    # The body bytes of the vendor's latest read, as written to the client.
    last_data = b""
    # set by begin(): the refusal to answer with, the connection the first
    # attempt was written on (whose head the task awaits if it takes over),
    # or an unexpected exception (a bug), for run() to take up
    refusal: HubError | None = None
    sending: UpstreamConnection | None = None
    failure: Exception | None = None

    if TYPE_CHECKING:
        from hubcore.routing.router import Router

        def respond(
            self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, *, head_only: bool = False,
            budget: Budget | None = None,
        ) -> None: ...
        def _answer_me(self, principal: object) -> None: ...
        def _route(self, kind: str, router: Router | None) -> UpstreamRuntime: ...
        def ensure_task(self) -> None: ...
        def _end_attempt(self, outcome: int | str) -> None: ...
        def _scan_body(self) -> None: ...
        def _mapped_body(self, config: UpstreamConfig) -> tuple[str, list[bytes]] | None: ...
        def _share_session_key(self, cfg: UpstreamConfig, label: str) -> None: ...
        def on_error(self, exc: UpstreamError) -> None: ...

    def __init__(self, hub: Hub, request: Request, protocol: HttpProtocol) -> None:
        self.hub = hub
        self.loop = hub.loop
        self.request = request
        self.protocol = protocol
        self.request_id = hub.request_id()
        self.ts = time.time()
        # Latencies are measured with time.monotonic(), not loop.time():
        # uvloop's loop clock counts whole milliseconds and stands still
        # within a loop iteration, so the hub's own share (tens of
        # microseconds) read as 0 or 1 ms. Both clocks are CLOCK_MONOTONIC,
        # so deadlines set from t0 and checked against loop.time() agree to
        # within that millisecond.
        self.t0 = time.monotonic()
        # The response head, held until the first body bytes go with it.
        self.pending_head: list[bytes] = []

    def _enter(self, phase: Phase) -> None:
        """The one place the phase changes (see _MOVES)."""
        if phase not in _MOVES[self.phase]:
            raise RuntimeError(f"request {self.request_id}: no move from {self.phase.name} to {phase.name}")
        self.phase = phase

    # -- admission and the first attempt ----------------------------------------
    def begin(self) -> None:
        """Admit the request and, when a key and a pooled connection are at
        hand, send it: no step up to that write waits, so none needs the
        task (see Hub.handle). `run` does everything else."""
        try:
            upstream = self.upstream = self._admit()
            if upstream is not None and self.hub.shared is None:
                self._enter(_SENDING)
                self._first_attempt(upstream)
        except HubError as e:
            self.refusal = e

    def _admit(self) -> UpstreamRuntime | None:
        """Route, authenticate and admit the request (HubError if refused);
        the upstream to send it to, or None once answered here."""
        request = self.request
        if request.path == b"/":
            if request.method not in (b"GET", b"HEAD"):
                raise HubError(405, "method not allowed")
            self.respond(200, ROOT_HEADERS, ROOT_BODY, head_only=request.method == b"HEAD")
            return None
        self.route = route = route_for(request.path, request.headers)
        self.flavour = route.flavour if route else flavour_for_path(request.path)
        context = request.context
        if isinstance(context, HubError):
            if context.status == 404:
                self.route = None  # the row and metrics say "other", as for any unrouted path
            raise context  # refused at its head: the body was never read
        if route is None:
            # The one path Hub.gate passes without a route, authenticated:
            # the caller's own spend.
            self._answer_me(context)
            return None
        # Hub.gate routed and authenticated the head: anything else came
        # with a Principal.
        assert isinstance(context, Principal), "a request the gate did not judge"
        self.principal = context
        if request.method not in route.methods:
            raise HubError(405, f"{request.method.decode()} is not allowed on {route.endpoint}")
        limiter = self.hub.limiter
        prices = self.hub.prices
        refusing_unpriced = prices is not None and prices.unpriced == _REFUSE_UNPRICED
        if request.method == b"POST":
            self._check_body()
            self.session_id = session_from_headers(request.headers)
            # The body is read for the model and session before the send
            # only when the request cannot go out without them (a model
            # allow-list, a session to keep on its key, a model without a
            # price to refuse); otherwise only if the vendor's answer does
            # not name the model (see _write).
            if (self.session_id is None or refusing_unpriced
                    or (limiter is not None and limiter.needs_model(self.principal))):
                self._scan_body()
            else:
                # The model picks the key's rate-limit class; Claude Code
                # writes it first, where it is read without a scan.
                self.model = leading_model(request.parts[0]) if request.parts else None
        router = self.hub.routers.get(route.kind)
        upstream = router.single if router is not None and self.principal.groups is None else None
        if upstream is None:
            upstream = self._route(route.kind, router)
        if not upstream.config.keys:
            raise HubError(503, f"no {route.kind} upstream key is configured; the hub operator must add one")
        if refusing_unpriced and prices is not None and prices.refuses(route.kind, self.model):
            raise HubError(
                400, f"model {self.model!r} has no price on this hub, and its setting "
                f'[pricing] unpriced = "refuse" refuses requests for models without one; '
                "ask the hub operator to add its price",
                code="model_not_priced",
            )
        if limiter is not None:
            self.admission = limiter.admit(
                self.principal, self.model, self.ts,
                model_required=self.scanned,
            )
        return upstream


    def _first_attempt(self, upstream: UpstreamRuntime) -> None:
        """Take the first attempt's key and, on a pooled connection, send the
        request; `_proxy` goes on from there, and does what is left undone
        here (a key to wait for, a connection to open)."""
        lease = upstream.ring.acquire(self.session_id, model_class=model_class(self.model))
        if lease is None:
            return
        self.lease = lease
        conn = upstream.pool.take_idle()
        if conn is not None:
            self.conn = conn
            self._count_attempt(upstream.config, lease)
            self._write_request(upstream, conn, self._request_head(upstream, lease.secret))
            self.sending = conn
            self.in_callbacks = True

    def _count_attempt(self, cfg: UpstreamConfig, lease: Lease) -> None:
        self.key_label = lease.label
        if self.grant is not None and self.session_id is not None and lease.label != self.shared_session_key:
            self._share_session_key(cfg, lease.label)
        self.attempts += 1
        self.attempt_upstream = cfg.name
        self.attempt_open = True
        if self.hub.metrics is not None:
            self.hub.metrics.upstream_attempt(cfg.name, retry=self.attempts > 1)

    def _write_request(self, upstream: UpstreamRuntime, conn: UpstreamConnection, head: bytes) -> None:
        """Send an attempt on `conn`: its head comes to _on_head, a failure
        before it to the task (ensure_task), which awaits conn.head_waiter()."""
        cfg = upstream.config
        parts = self.request.parts if self.mapped is None else self.mapped[1]
        conn.write_request(head, parts, cfg.first_byte_timeout, cfg.stream_idle_timeout, self._on_head, self.ensure_task)
        self._enter(_AWAITING_HEAD)
        self.sent_at = time.monotonic()

    def _request_head(self, upstream: UpstreamRuntime, secret: str) -> bytes:
        """The head of an attempt on `upstream`; sets the body it goes with
        (the client's, or the one with the model its model_map names)."""
        request = self.request
        body_size = request.body_size
        self.mapped = None
        if upstream.config.model_map and request.method == b"POST":
            self.mapped = self._mapped_body(upstream.config)
            if self.mapped is not None:
                body_size = len(self.mapped[1][0])
        return request_head(
            request.method, request.target, upstream.base_path, upstream.host_header, upstream.auth_header(secret),
            request.headers, request.control, body_size,
        )

    def _on_head(self, head: ResponseHead) -> None:
        """The response head, as the connection reads it: a response that will
        not be retried starts streaming here, so the body chunks of the same
        read go out at once rather than after this request's task wakes up.
        The task then finds it streaming (see _stream)."""
        failure = self.head_failure = classify(head.status, head.headers)
        lease = self.lease
        if lease is not None and self.upstream is not None:
            # The rate-limit headers of every answer: the room the key has left.
            self.upstream.ring.observe(lease, head.index)
        if failure is None or not retryable(failure):
            self._begin_stream(head)  # its answer is counted with the request (see report)
        else:
            if self.hub.metrics is not None:
                self.hub.metrics.upstream_answered(self.attempt_upstream, head.status)
            self.ensure_task()  # the retry

    def _begin_stream(self, head: ResponseHead) -> None:
        conn = self.conn
        assert conn is not None
        self._enter(_HOLDING_HEAD)
        self.head = head
        self.head_at = conn.head_at
        status = self.status = head.status
        content_type = head.header(b"content-type") or b""
        self.sse_body = content_type.startswith(b"text/event-stream")
        route = self.route
        if route is not None and route.fmt and 200 <= status < 300:
            self.meter = sse.Meter(route.fmt, self.sse_body)
        request = self.request
        content_length = head.content_length
        framing = response_framing(status, content_length, request.http_version == "1.1")
        self.chunked = framing is _CHUNKED
        keep_alive = self.keep_alive = keeps_alive(framing, request.keep_alive and not self.hub_draining())
        admission = self.admission
        budget = admission.budget if admission is not None else None
        self.pending_head = [response_head(
            status, head.headers, framing, content_length, keep_alive, self.request_id,
            None if budget is None else _budget_headers(budget),
        )]
        if not self.in_callbacks:
            self.done = self.loop.create_future()
        if self.protocol.write_paused:
            conn.pause_reading()
        conn.attach(self)

    def on_data(self, parts: list[bytes]) -> None:
        """Everything one upstream read brought, as one chunk in one write: a
        read of 20 SSE events costs one writev, not 20."""
        if not self.gone:
            self._write(parts[0] if len(parts) == 1 else b"".join(parts), False)

    def on_complete(self, parts: list[bytes]) -> None:
        """The last chunks and the end of the body, in one write."""
        if not self.gone:
            self._write(parts[0] if len(parts) == 1 else b"".join(parts), True)
        if self.in_callbacks:
            if self.phase is not _FINISHING:
                # The bookkeeping runs once this read's callbacks are over
                # (the connection goes back to the pool there).
                self._enter(_FINISHING)
                self.loop.call_soon(self._finish)
            return
        self._enter(_FINISHING)
        done = self.done
        if done is not None and not done.done():
            done.set_result(None)

    def _write(self, data: bytes, end: bool) -> None:
        first = self.phase is _HOLDING_HEAD
        if first:
            # The response head goes out with the first body bytes.
            out = self.pending_head
            self.pending_head = []
            self._enter(_STREAMING)
            self.ttfb = time.monotonic()
        else:
            out = []
        if data:
            self.last_data = data
            if self.chunked:
                out += (b"%x\r\n" % len(data), data, b"\r\n")
            else:
                out.append(data)
        if end and self.chunked:
            out.append(b"0\r\n\r\n")
        if out:
            self.protocol.writelines(out)
        meter = self.meter
        if meter is not None and data:
            try:
                meter.feed(data)
            except MeterError as e:
                log.warning("request %s: metering stopped: %s", self.request_id, e)
                self.meter = None
        if first:
            if end:
                self._close_meter()  # whole: a JSON answer names its model only now
            self._scan_unless_named()  # before the body is let go
            # No retry is possible from here on: a long stream need not keep
            # a request body of up to 32 MiB alive. Freed after the write, which
            # the client waits on, and the free (of large blocks) need not.
            self.request.drop_body()

    def _close_meter(self) -> None:
        """The body has ended: the meter's numbers are final (idempotent)."""
        meter = self.meter
        if meter is not None:
            try:
                meter.close()
            except MeterError as e:
                log.warning("request %s: metering failed at the end of the body: %s", self.request_id, e)

    def _check_body(self) -> None:
        request = self.request
        first = request.parts[0][:1] if request.parts else b""
        if first != b"{" and JSON_OBJECT_START.match(request.body) is None:
            raise HubError(400, "request body must be a JSON object")

    def _scan_unless_named(self) -> None:
        """The usage row's model comes from the vendor's answer, which names
        it in its first event; the body is read for it only when no answer
        did (an error, an unmetered or cut answer, none at all)."""
        meter = self.meter
        if (not self.scanned and self.request.parts and self.request.method == b"POST"
                and (meter is None or meter.model is None)):
            self._scan_body()

    def hub_draining(self) -> bool:
        return self.protocol.server.draining

    def _finish(self) -> None:
        """The answer to a request run in callbacks is complete: the rest of
        what `_stream`, `_proxy`, `run` and `Hub._run` do after it."""
        protocol = self.protocol
        try:
            try:
                self._stream_done()
                self._release_lease(self.lease, self.head_failure)
            finally:
                self._end()
                self.report()
        except Exception:
            log.exception("request handler failed")
            protocol.close()
        protocol.request_done()

    def _stream_done(self) -> None:
        self._release_conn()
        self.protocol.finish(self.keep_alive)

    def _release_conn(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.release()

    def _release_lease(self, lease: Lease | None, failure: Failure | None) -> None:
        """The answer streamed to its end: its key goes back with what the
        head said against it, or what an error event in the stream did."""
        if lease is not None and self.upstream is not None:
            meter = self.meter
            self.upstream.ring.release(lease, failure or in_stream_failure(meter.error_type if meter is not None else None))
            self.lease = None

    def _end(self) -> None:
        self._enter(_DONE)
        if self.admission is not None:
            self.admission.release()
        if self.grant is not None:
            self.grant.release()
        self._record()

    def _record(self) -> None:
        if self.lease is not None and self.upstream is not None:
            self.upstream.ring.release(self.lease, CLIENT_ABORTED)
            self.lease = None
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.gone and self.outcome is _OK:
            self.outcome = _CLIENT_ABORTED
        elif self.outcome is _OK and self.status >= 400:
            self.outcome = _UPSTREAM_ERROR
        principal = self.principal
        route = self.route
        now = self.ended = time.monotonic()
        if principal is None or route is None:
            self._log(now)
            return  # unauthenticated: no row (a flood of them must not fill the database)
        self._close_meter()
        self._scan_unless_named()  # refused, or failed before a byte: the body is still here
        # The route: almost every request takes one attempt, written with one
        # f-string and no AttemptChain made.
        chain = self.chain
        if self.attempt_open:
            head = self.head
            outcome = head.status if head is not None else "client_gone" if self.gone else "none"
            if chain is None:
                self.attempt_open = False
                route_text: str | None = f"{self.attempt_upstream}/{self.key_label or '-'}:{outcome}"
            else:
                self._end_attempt(outcome)
                route_text = chain.render()
        else:
            route_text = chain.render() if chain is not None else None
        upstream, ttfb = self.upstream, self.ttfb
        event = usage_event(
            self.ts, self.request_id, route.endpoint, self.status, self.outcome, (now - self.t0) * 1000.0,
            principal, upstream.config.name if upstream is not None else None, self.key_label, self.model,
            self.error_type, (ttfb - self.t0) * 1000.0 if ttfb is not None else None, self.attempts,
            self.session_id, _decode(self.request.header(b"user-agent")), self.sse_body, self.meter, route.kind,
            self.hub.prices, self.mapped[0] if self.mapped is not None else None,
            route_text,
            upstream.config.cost_multiplier if upstream is not None else 1.0,
        )
        self.hub.recorder.record(event)
        self._log(now, event)

    def _log(self, now: float, event: UsageEvent | None = None) -> None:
        access = self.hub.access
        if access is None:
            return
        client = self.protocol.peer
        if event is not None:
            access.record(event, client)
            return
        # Refused without a valid token: a client looping on a wrong token
        # gets one line per window, not one per try (see RefusalLog, which
        # keeps the loop's time).
        if self.status >= 400 and not access.refusals.admit(client or "-", self.status, self.loop.time()):
            return
        access.refused(self.ts, self.request_id, self.request.path, self.status, self.outcome,
                       (now - self.t0) * 1000.0, client)

    def report(self) -> None:
        """The request has ended: count it in the hub's metrics, if kept."""
        metrics = self.hub.metrics
        if metrics is None:
            return
        # The end the access log has, so that its figures and the stats agree.
        now = self.ended if self.ended is not None else time.monotonic()
        if self.route is not None:
            route = self.route.endpoint
        else:
            path = self.request.path
            route = "/" if path == b"/" else ME_PATH.decode() if path == ME_PATH else "other"
        ttfb = self.ttfb - self.t0 if self.ttfb is not None else None
        hub_added = None
        if self.attempts == 1 and self.sent_at is not None and self.head_at is not None and self.ttfb is not None:
            # The hub's own share: before the request went upstream (less
            # any wait for a resting key, counted on its own), and between
            # the vendor's first byte and the client's.
            hub_added = max(0.0, self.sent_at - self.t0 - self.queued) + max(0.0, self.ttfb - self.head_at)
        # The answer that went to the client (one retried is counted by _on_head).
        answered_by = self.attempt_upstream if self.head is not None else None
        metrics.request_finished(route, self.status, self.outcome, now - self.t0, ttfb, hub_added, answered_by)
        if self.queued:
            metrics.observe_queue_wait(self.queued)
        if self.outcome is _REFUSED:
            metrics.refuse(self.error_type or str(self.status))


def usage_event(
    ts: float,
    request_id: str,
    endpoint: str,
    status: int,
    outcome: Outcome,
    total_ms: float,
    principal: Principal,
    upstream: str | None,
    key_label: str | None,
    model: str | None,
    error_type: str | None,
    ttfb_ms: float | None,
    attempts: int,
    session_id: str | None,
    user_agent: str | None,
    sse_body: bool,
    meter: sse.Meter | None,
    vendor: str,
    prices: Pricer | None,
    served_model: str | None = None,
    route: str | None = None,
    cost_multiplier: float = 1.0,
) -> UsageEvent:
    """The usage row of a request that has ended, from the exchange's final
    values and its meter's numbers (None: nothing was metered). The meter's
    word goes on the model and, when the exchange has none, the error type;
    an event stream the meter did not see complete was cut. `vendor` (the
    route's upstream kind) is whose most expensive model prices a model
    without a price, when the [pricing] rule says to estimate.
    `served_model`: the id an upstream's model_map sent in place of the
    client's; the row keeps the client's (prices are by it), since the
    vendor's answer names the one it was asked for. `cost_multiplier`: the
    serving upstream's, applied to the list price of the client's model."""
    if meter is None:
        input_tokens = output_tokens = cache_write_5m = cache_write_1h = cache_read = 0
        reasoning_tokens = server_tool_requests = 0
        stop_reason = None
        output_estimated = False
    else:
        if served_model is None:
            model = meter.model or model
        input_tokens, output_tokens = meter.input_tokens, meter.output_tokens
        cache_write_5m, cache_write_1h, cache_read = meter.cache_write_5m, meter.cache_write_1h, meter.cache_read
        reasoning_tokens, server_tool_requests = meter.reasoning_tokens, meter.server_tool_requests
        stop_reason = meter.stop_reason
        # A stream cut before its final usage: output estimated from the
        # deltas that passed (hubcore.accounting.meter), and the row says so.
        output_estimated = meter.output_estimated
        if meter.error_type and error_type is None:
            error_type = meter.error_type
        if outcome is _OK and sse_body and not meter.completed:
            outcome = _UPSTREAM_ABORTED
    # Priced even without a meter (errors, count_tokens): a known model
    # that used no tokens cost 0. A model without a price is charged as the
    # [pricing] rule says, and cost_basis says how.
    if prices is None:
        cost_micros = cost_basis = None
    else:
        cost_micros, cost_basis = prices.cost(
            vendor, model, input_tokens, output_tokens, cache_write_5m, cache_write_1h, cache_read,
            forwarded=attempts > 0, multiplier=cost_multiplier,
        )
    # Positional, in UsageEvent's field order: a call by keyword costs
    # more than twice as much, on every request.
    return UsageEvent(
        ts,
        request_id,
        endpoint,
        status,
        outcome,
        total_ms,
        principal.token_id,
        principal.user,
        principal.project,
        upstream,
        key_label,
        model,
        input_tokens,
        output_tokens,
        cache_write_5m,
        cache_write_1h,
        cache_read,
        reasoning_tokens,
        server_tool_requests,
        stop_reason,
        error_type,
        cost_micros,
        ttfb_ms,
        attempts,
        session_id,
        user_agent,
        output_estimated,
        cost_basis,
        served_model,
        route,
    )


def _budget_headers(budget: Budget) -> list[tuple[bytes, bytes]]:
    tightest = budget.tightest()
    return budget_headers(tightest.remaining_micros, tightest.resets_at)


def _decode(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None
