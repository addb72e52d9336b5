"""The Exchange: one request through the hub, from auth to the usage row.

auth → route → key → send (retrying on another key while nothing has
reached the client) → stream the response through the meter → record.

The Exchange orchestrates; what it decides is in pure functions beside it:
routes.py (route, token, session), rewrite.py (the heads on their way
through), answers.py (the hub's own answers) and `usage_event`.

What every request does (its admission and first attempt, sent from the
read that completed it, the answer streamed from the upstream's callbacks,
the usage row and the metrics) is the core's, `ExchangeCore`
(hubcore.gateway.exchange_core, compiled when built), with the request's
phases (the theory of operation is in `_exchange_py.py`); `Exchange` keeps
what is rare: routing among several upstreams, the hub's own answers and
refusals, retries in the task, failures, shared state, shutdown.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from hubcore.accounting import meter as sse
from hubcore.accounting.usage import UsageEvent
from hubcore.config import Config, UpstreamConfig
from hubcore.errors import HubError, MeterError
from hubcore.routing.attempts import AttemptChain
from hubcore.routing.failures import (
    CIRCUIT_KINDS, STREAM_BROKEN, Failure, FailureKind, retryable, transport_failure,
)
from hubcore.routing.headroom import model_class
from hubcore.routing.keys import KeyReport, KeyRing, Lease
from hubcore.routing.router import Router
from hubcore.gateway.answers import give_up, refusal_headers, render_http_error, sse_error_event
from hubcore.gateway.me import ME_HEADERS, Ledger, me_body
from hubcore.gateway.rewrite import with_model
from hubcore.gateway.routes import ME_PATH
from hubcore.gateway.upstreams import UpstreamRuntime
from hubcore.gateway._exchange_py import (
    _CLIENT_ABORTED, _DONE, _FINISHING, _HOLDING_HEAD, _REFUSED, _SENDING, _STREAMING, _UPSTREAM_ABORTED,
    _UPSTREAM_ERROR, JSON_OBJECT_START, _budget_headers,
)
# Phase and _MOVES are named here as they always were (app.py, the tests).
from hubcore.gateway.exchange_core import _MOVES, ExchangeCore, HubCore, Phase, usage_event
from hubcore.governance.limiter import Refused, groups_refusal
from hubcore.governance.tokens import Principal, TokenTable
from hubcore.http.client import ResponseHead, UpstreamError, UpstreamTimeout

log = logging.getLogger("hubcore.proxy")


# Bytes of an error body the hub reads before deciding to retry.
ERROR_BODY_LIMIT = 1024 * 1024


# -- the Hub's collaborators, as the gateway calls them ------------------------

class Recorder(Protocol):
    """Takes the usage event of every request with a principal
    (accounting.recorder.UsageRecorder: off the request path)."""

    def record(self, event: UsageEvent) -> None: ...


class Pricer(Protocol):
    """Prices a request's tokens (accounting.pricing.Pricing), and says what a
    model without a price costs: `unpriced` is the [pricing] rule."""

    @property
    def unpriced(self) -> str: ...
    def refuses(self, vendor: str | None, model: str | None) -> bool: ...
    def cost(
        self, vendor: str | None, model: str | None, input_tokens: int, output_tokens: int,
        cache_write_5m: int = 0, cache_write_1h: int = 0, cache_read: int = 0, *, forwarded: bool = True,
        multiplier: float = 1.0,
    ) -> tuple[int | None, str | None]: ...


class BudgetFigures(Protocol):
    @property
    def remaining_micros(self) -> int: ...
    @property
    def resets_at(self) -> float | None: ...


class Budget(Protocol):
    """The budgets over one request (governance.limiter.BudgetView)."""

    def tightest(self, now: float | None = None) -> BudgetFigures: ...


class Admission(Protocol):
    """An admitted request's hold on the limiter's in-flight counts, and
    its budgets (None: no budget applies to the principal)."""

    @property
    def budget(self) -> Budget | None: ...
    def release(self) -> None: ...


class Admitter(Ledger, Protocol):
    """Limits and budgets (governance.limiter.Limiter): `admit` raises a
    HubError to refuse; the Ledger part answers /hubcore/v1/me."""

    def needs_model(self, principal: Principal) -> bool: ...
    def admit(self, principal: Principal, model: str | None, now: float, *, model_required: bool) -> Admission: ...


class SharedGrant(Protocol):
    """A request's hold on the limits the hub's instances count together
    (shared.redis_state.Grant), with the key its session sticks to there."""

    @property
    def session_key(self) -> str | None: ...
    @property
    def keys(self) -> Mapping[str, KeyReport]: ...  # by label: what the instances know against a key
    def release(self) -> None: ...


class SharedAdmitter(Protocol):
    """What the hub's instances count together ([shared] redis;
    shared.redis_state.SharedState): rpm, concurrency and budgets of token,
    user and project, and sessions' keys. One awaited call a request,
    bounded by [shared] timeout; raises a HubError to refuse."""

    async def admit(
        self, principal: Principal, upstream: str | None = None, session: str | None = None,
        now: float | None = None, *, session_ttl: float = ...,
    ) -> SharedGrant: ...
    def remember_session(self, upstream: str, session: str, label: str, ttl: float = ...) -> None: ...


class Metrics(Protocol):
    """What the gateway counts (ops.metrics.HubMetrics)."""

    def request_started(self) -> None: ...
    def request_finished(self, route: str, status: int, outcome: str, total_s: float, ttfb_s: float | None = None,
                         hub_added_s: float | None = None, answered_by: str | None = None) -> None: ...
    def observe_hub_added(self, seconds: float) -> None: ...
    def observe_queue_wait(self, seconds: float) -> None: ...
    def upstream_attempt(self, upstream: str, *, retry: bool = False) -> None: ...
    def upstream_answered(self, upstream: str, status: int) -> None: ...
    def upstream_unanswered(self, upstream: str, kind: FailureKind) -> None: ...
    def upstream_failed(self, upstream: str, kind: FailureKind) -> None: ...
    def failover(self, from_upstream: str, to_upstream: str) -> None: ...
    def refuse(self, reason: str) -> None: ...


class RefusalCounter(Protocol):
    def admit(self, address: str, status: int, now: float) -> bool:
        """True if this refusal is to be logged in full; False if counted."""
        ...


class AccessSink(Protocol):
    """The access log (ops.accesslog.AccessLog): one line per request with a
    principal, from its usage event; refusals of the others, summarised."""

    @property
    def refusals(self) -> RefusalCounter: ...
    def record(self, event: UsageEvent, client: str | None = None) -> None: ...
    def refused(self, ts: float, request_id: str, path: bytes, status: int, outcome: str,
                total_ms: float, client: str | None) -> None: ...
    def close(self) -> None: ...  # by the app, at shutdown


class Hub(HubCore):
    """Everything the Exchange needs, shared by all connections; its gate
    and request ids are the core's (HubCore)."""

    # How the HTTP layer words its own refusals (server.ErrorRenderer).
    render_error = staticmethod(render_http_error)

    def __init__(
        self, config: Config, loop: asyncio.AbstractEventLoop, tokens: TokenTable, recorder: Recorder,
        prices: Pricer | None, metrics: Metrics | None = None, limiter: Admitter | None = None,
        shared: SharedAdmitter | None = None,
    ) -> None:
        super().__init__(tokens)
        self.exchange_type = Exchange
        self.config = config
        self.limiter = limiter
        # With [shared] redis only: then each request awaits its admission
        # across instances in its task, and none is sent from begin().
        self.shared = shared
        self.access: AccessSink | None = None
        self.loop = loop
        self.recorder = recorder
        self.prices = prices
        self.metrics = metrics
        # By name; and a router per kind (the routes' upstream kinds), which
        # chooses among that kind's upstreams for each attempt.
        self.upstreams: dict[str, UpstreamRuntime] = {
            upstream.name: UpstreamRuntime(upstream, loop) for upstream in config.upstreams
        }
        self.routers: dict[str, Router] = {}
        for runtime in self.upstreams.values():
            kind = runtime.config.kind
            if kind not in self.routers:
                policy = runtime.config.policy
                self.routers[kind] = Router(
                    [u for u in self.upstreams.values() if u.config.kind == kind],
                    affinity_ttl=policy.affinity_ttl, affinity_max_sessions=policy.affinity_max_sessions,
                )
        # Told of each failover, (from, to), after it is counted (the alerts:
        # hubcore.ops.alerts); only failing attempts come this way.
        self.on_failover: Callable[[UpstreamConfig, UpstreamConfig], None] | None = None

    async def _run(self, exchange: Exchange) -> None:
        try:
            await exchange.run()
        finally:
            exchange.report()

    def close(self) -> None:
        for upstream in self.upstreams.values():
            upstream.close()


class ClientGone(Exception):
    pass


class Exchange(ExchangeCore):
    """One request: implements the server's Handler and the upstream's BodySink.
    Where it is, is its `phase` (see the theory of operation in _exchange_py.py)."""

    # -- Handler (server side) ---------------------------------------------
    def client_gone(self) -> None:
        self.gone = True
        if self.conn is not None:
            self.conn.close()
        self.ensure_task()
        done = self.done
        if done is not None and not done.done():
            done.set_exception(ClientGone())

    def ensure_task(self) -> None:
        """Go on in the task from here: what a request sent in callbacks
        meets off its common path (a retryable answer, a failure, the client
        leaving, shutdown) is handled by `run`, which then finds its first
        attempt sent and its futures set as these callbacks left them."""
        if not self.in_callbacks or self.phase is _FINISHING or self.phase is _DONE:
            return
        self.in_callbacks = False
        if self.head is not None and self.done is None:
            self.done = self.loop.create_future()  # what _stream awaits
        self.protocol.run_task(self.hub._run(self))

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn.pause_reading()

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.resume_reading()

    # -- the request ---------------------------------------------------------
    async def run(self) -> None:
        try:
            if self.failure is not None:
                raise self.failure
            if self.refusal is not None:
                raise self.refusal
            if self.upstream is not None:
                if self.hub.shared is not None:
                    await self._admit_shared(self.upstream)
                await self._proxy(self.upstream)
        except HubError as e:
            self.refuse(e)
        except ClientGone:
            self.outcome = _CLIENT_ABORTED
        except asyncio.CancelledError:
            if self.gone:
                # The client left while the vendor had not answered yet.
                self.outcome = _CLIENT_ABORTED
            else:
                # The drain timeout ran out at shutdown: the hub cut this request.
                committed = self.phase is _STREAMING or self.phase is _FINISHING
                self.outcome = _UPSTREAM_ABORTED if committed else _UPSTREAM_ERROR
                self.error_type = "hub_shutdown"
                if committed:
                    self._release_conn_closed()
                    self._end_with_error_event("hubcore is shutting down and its drain timeout ran out")
            raise
        finally:
            self._end()

    async def _admit_shared(self, upstream: UpstreamRuntime) -> None:
        """Admit on what every instance counts (one round trip, or this
        instance's share while Redis is unreachable); the session keeps the
        key any instance last chose for it."""
        shared, principal = self.hub.shared, self.principal
        assert shared is not None and principal is not None
        grant = self.grant = await shared.admit(
            principal, upstream.config.name, self.session_id, self.ts,
            session_ttl=upstream.config.policy.affinity_ttl,
        )
        if grant.keys:
            upstream.ring.hear(grant.keys)
        if grant.session_key is not None and self.session_id is not None:
            self.shared_session_key = grant.session_key
            upstream.ring.pin_session(self.session_id, grant.session_key)
        self._enter(_SENDING)

    def _share_session_key(self, cfg: UpstreamConfig, label: str) -> None:
        """The session goes out on key `label`, not the one the instances
        knew (a new session, or one that moved): tell them, as the attempt
        starts, long before its answer ends."""
        shared, session_id = self.hub.shared, self.session_id
        if shared is not None and session_id is not None:
            self.shared_session_key = label
            shared.remember_session(cfg.name, session_id, label, cfg.policy.affinity_ttl)

    def _answer_me(self, principal: object) -> None:
        """GET /hubcore/v1/me: the caller's spend, budgets and limits, from
        the limiter's counters (see gateway.me). It is no request to a vendor:
        it takes no rate or concurrency slot and leaves no usage row."""
        request = self.request
        assert isinstance(principal, Principal) and request.path == ME_PATH, "a request the gate did not judge"
        if request.method != b"GET":
            raise HubError(405, f"{request.method.decode('latin-1')} is not allowed on {ME_PATH.decode()}")
        limiter = self.hub.limiter
        if limiter is None:
            raise HubError(503, "this hub keeps no spend counters")
        self.respond(200, ME_HEADERS, me_body(limiter, principal, self.ts))

    def _route(self, kind: str, router: Router | None) -> UpstreamRuntime:
        """The first attempt's upstream among several of `kind` (or one that
        serves only some models or groups): see routing.router. A request
        none of them may serve is refused; one whose candidates have no
        usable key now goes to the best of them, whose key ring gives the
        honest answer (a rest to wait out, or the 503 of open circuits)."""
        if router is None:
            raise HubError(503, f"no {kind} upstream key is configured; the hub operator must add one")
        groups = self._groups()
        if groups is not None and not groups and self.principal is not None:
            # Token, user and project allow no group in common (the limiter
            # refuses it too, but routing comes first).
            raise groups_refusal(self.principal)
        if self.model is None and not self.scanned and self.request.method == b"POST":
            # The model a body writes first (leading_model, in _admit) is
            # enough to route by: a 90 KB body is not parsed for it.
            self._scan_body()
        chosen = router.choose(self.model, groups, self.session_id)
        if chosen is not None:
            return chosen
        candidates = [u for u in router.candidates(self.model, groups) if u.config.keys]
        if candidates:
            return min(candidates, key=lambda u: u.priority)
        if router.candidates(self.model, groups):
            raise HubError(503, f"no {kind} upstream key is configured; the hub operator must add one")
        model = "a request without a model" if self.model is None else f"model {self.model!r}"
        if groups is not None:
            raise HubError(
                403, f"no {kind} upstream of your groups ({', '.join(sorted(groups))}) serves {model}",
                error_type="permission_error", code="group_not_allowed",
            )
        raise HubError(400, f"no {kind} upstream of this hub serves {model}", code="model_not_served")

    def _groups(self) -> frozenset[str] | None:
        """The upstream groups the principal may use; None: every one."""
        principal = self.principal
        return principal.groups if principal is not None else None

    def _move_on(self, upstream: UpstreamRuntime, spent: set[str]) -> UpstreamRuntime | None:
        """Another upstream of the route's kind with a usable key, for the
        next attempt after `upstream` failed or has no key left (it becomes
        the request's upstream, and the move is counted); None when every
        candidate is spent. `spent` collects the upstreams given up."""
        route = self.route
        router = self.hub.routers.get(route.kind) if route is not None else None
        if router is None or router.single is not None:
            return None
        spent.add(upstream.config.name)
        moved = router.choose(self.model, self._groups(), self.session_id, spent)
        if moved is not None:
            self.upstream = moved
            if self.hub.metrics is not None:
                self.hub.metrics.failover(upstream.config.name, moved.config.name)
            if self.hub.on_failover is not None:
                self.hub.on_failover(upstream.config, moved.config)
        return moved

    def _scan_body(self) -> None:
        """Read model, metadata.user_id and prompt_cache_key from a POST
        body; the session falls back to the latter two."""
        self.scanned = True
        body = self.request.body
        try:
            model, stream, user_id, cache_key = sse.scan_request(body)
        except MeterError:
            model = user_id = cache_key = None
        self.model = model
        if self.session_id is None:
            if user_id:
                self.session_id = sse.session_from_user_id(user_id)
            elif cache_key:
                self.session_id = cache_key

    # -- talking to the vendor ---------------------------------------------
    async def _proxy(self, upstream: UpstreamRuntime) -> None:
        # The first upstream's attempts and deadline hold for the whole
        # request, whichever upstreams its attempts go to.
        cfg = upstream.config
        max_attempts = cfg.max_attempts
        deadline = self.t0 + cfg.retry_deadline
        # Time queued for a resting key counts against the retry deadline too.
        queue_deadline = min(self.t0 + cfg.queue_timeout, deadline)
        ring = upstream.ring
        # The vendors' rate limits are per model class: a key resting after a
        # 429 for one class serves the others ("" when the model is unknown).
        rate_class = model_class(self.model)
        tried: set[str] = set()  # key labels, on the current upstream
        spent: set[str] = set()  # upstreams this request moved away from
        reason: Failure | None = None
        previous: Lease | None = None
        last_error: tuple[ResponseHead, bytes] | None = None
        last_exc: UpstreamError | None = None
        first = self.lease  # taken (and maybe sent) by _first_attempt
        while True:
            if self.gone and (first is None or self.sending is None):
                # Whatever comes next would be for nobody (and paid for). A
                # request begin() already sent goes on to be recorded as sent.
                raise ClientGone()
            lease: Lease | None
            counted = False
            if first is not None:
                lease, first = first, None
                counted = self.attempts > 0  # sent by _first_attempt
            else:
                lease = ring.acquire(self.session_id, tried, reason, previous, model_class=rate_class)
                if lease is None:
                    # Another upstream with a usable key now beats waiting
                    # for a rest here.
                    moved = self._move_on(upstream, spent)
                    if moved is not None:
                        upstream, ring = moved, moved.ring
                        tried, previous, reason = set(), None, None
                        continue
                    if await self._wait_for_key(ring, deadline, queue_deadline, rate_class):
                        tried.clear()
                        continue
                    rate_limited_for = (
                        ring.next_available_in(model_class=rate_class) if ring.rate_limited(rate_class) else None
                    )
                    self._give_up(upstream, last_error, last_exc, rate_limited_for)
                    return
            self.lease = previous = lease
            if not counted:
                self._count_attempt(upstream.config, lease)
            tried.add(lease.label)
            final = self.attempts >= max_attempts or self.loop.time() >= deadline
            try:
                head = await self._send(upstream, lease)
            except UpstreamError as e:
                reason = transport_failure(e)
                ring.release(lease, reason)
                self.lease = None
                self._end_attempt(e.kind)
                if self.hub.metrics is not None:
                    self.hub.metrics.upstream_unanswered(upstream.config.name, reason.kind)
                last_exc, last_error = e, None
                if final:
                    self._give_up(upstream, None, e, None)
                    return
            else:
                failure = self.head_failure  # judged by _on_head, before the future woke this task
                if failure is not None and retryable(failure):
                    try:
                        body = await self.conn.read_body(ERROR_BODY_LIMIT) if self.conn else b""
                    except UpstreamError:
                        body = b""
                    self._release_conn()
                    self._enter(_SENDING)
                    ring.release(lease, failure)
                    self.lease = None
                    self._end_attempt(head.status)
                    if self.hub.metrics is not None:
                        self.hub.metrics.upstream_failed(upstream.config.name, failure.kind)
                    last_error, last_exc = (head, body), None
                    reason = failure
                    if final:
                        self._give_up(upstream, last_error, None, None)
                        return
                else:
                    try:
                        await self._stream(head)
                    except _RetryBeforeFirstByte as e:
                        reason = transport_failure(e.error)
                        ring.release(lease, reason)
                        self.lease = None
                        # Answered, then cut before a byte reached the client:
                        # its status would read as a success.
                        self._end_attempt(e.error.kind)
                        if self.hub.metrics is not None:
                            self.hub.metrics.upstream_failed(upstream.config.name, reason.kind)
                        last_exc, last_error = e.error, None
                        if final:
                            self._give_up(upstream, None, e.error, None)
                            return
                    else:
                        # A mid-stream abort has already given the lease back, with its failure.
                        if self.lease is lease:
                            self._release_lease(lease, failure)
                        return
            if reason is not None and reason.kind in CIRCUIT_KINDS:
                # The upstream itself failed (unreachable, 5xx, 529, timed
                # out): the next attempt goes to another upstream if one can
                # take it, else to another key of this one.
                moved = self._move_on(upstream, spent)
                if moved is not None:
                    upstream, ring = moved, moved.ring
                    tried, previous, reason = set(), None, None

    def _end_attempt(self, outcome: int | str) -> None:
        """An attempt that will not be the request's last ended with
        `outcome` (its HTTP status, or the HTTP client's word for no usable
        answer): one link of the route. The last attempt is not added: see
        _record."""
        if self.attempt_open:
            self.attempt_open = False
            chain = self.chain
            if chain is None:
                chain = self.chain = AttemptChain()
            chain.add(self.attempt_upstream, self.key_label or "-", outcome)

    async def _wait_for_key(self, ring: KeyRing, deadline: float, queue_deadline: float, rate_class: str) -> bool:
        """No untried key is usable: whether to go round the keys again.

        At once when a key already tried is usable again (max_attempts and the
        deadline bound that); after a wait when keys rest after 429s and one
        frees up within the queue time; not at all when none would, nor for
        open circuits, which come back only when the hub's probe does (waiting
        then only delays the same answer, by up to the queue time).
        """
        wait = ring.next_available_in(model_class=rate_class)
        now = self.loop.time()
        if wait is None:
            return False
        if wait == 0.0:
            return now < deadline
        if now + wait > queue_deadline:
            return False
        # Wait for a key, or for the client to leave (client_gone fails self.done).
        gone = self.done = self.loop.create_future()
        waiting = self.loop.create_task(ring.wait_available(queue_deadline - now, model_class=rate_class))
        started = time.monotonic()
        try:
            await asyncio.wait((waiting, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.queued += time.monotonic() - started
            self.done = None
            if not waiting.done():
                waiting.cancel()
        if gone.done():
            await gone  # raises ClientGone
        return waiting.result()

    async def _send(self, upstream: UpstreamRuntime, lease: Lease) -> ResponseHead:
        sending, self.sending = self.sending, None
        head: bytes | None = None
        for fresh in (False, True):
            if sending is not None:
                conn, sending = sending, None  # the first attempt's, written by begin()
            else:
                if head is None:
                    head = self._request_head(upstream, lease.secret)
                idle = None if fresh else upstream.pool.take_idle()
                conn = idle if idle is not None else await upstream.pool.connect()
                self.conn = conn
                self._write_request(upstream, conn, head)
            try:
                response = await conn.head_waiter()
                self.head_at = conn.head_at
                return response
            except UpstreamError as e:
                conn.close()
                self.conn = None
                self._enter(_SENDING)
                # A pooled connection the vendor closed while idle fails
                # before any response byte: that is a stale socket, not the
                # vendor refusing; try once more on a fresh connection.
                if not (conn.reused and e.before_response and not isinstance(e, UpstreamTimeout)):
                    raise
        raise AssertionError("unreachable")

    def _mapped_body(self, config: UpstreamConfig) -> tuple[str, list[bytes]] | None:
        """(the upstream's model id, the body carrying it) when `config`'s
        model_map names one for the request's model; None: the body goes as
        the client sent it (no map applies, or no top-level string model)."""
        if self.model is None and not self.scanned:
            self._scan_body()
        model = self.model
        target = config.mapped_model(model) if model is not None else None
        if target is None or target == model:
            return None
        body = with_model(self.request.body, target)
        return None if body is None else (target, [body])

    async def _stream(self, head: ResponseHead) -> None:
        """Pass the response through: head held until the first body byte (so
        a stream that dies before it can still be retried), then every chunk
        written as it arrives and fed to the meter. `_on_head` has already
        begun it, in the read that brought `head`."""
        done = self.done
        assert self.head is head and done is not None
        try:
            await done
        except UpstreamError as e:
            # The future holds e, whose traceback holds this frame: dropped,
            # or the three (old by the end of a long stream) outlive the
            # request in a cycle that only a full collection finds.
            done = None
            if self.phase is _HOLDING_HEAD:
                self._release_conn()
                self._enter(_SENDING)
                raise _RetryBeforeFirstByte(e) from e
            self._abort_midstream(e)
            return
        finally:
            self.done = None
        self._stream_done()

    # -- BodySink (upstream side) ---------------------------------------------
    def on_error(self, exc: UpstreamError) -> None:
        self.ensure_task()
        done = self.done
        if done is not None and not done.done():
            done.set_exception(exc)

    def _abort_midstream(self, exc: UpstreamError) -> None:
        """The vendor failed after the client got bytes: end the stream the
        protocol's way so the client's SDK raises instead of hanging."""
        self.outcome = _UPSTREAM_ABORTED
        self.error_type = "upstream_aborted"
        self._enter(_FINISHING)
        self._release_conn()
        if self.lease is not None and self.upstream is not None:
            self.upstream.ring.release(self.lease, STREAM_BROKEN)
            self.lease = None
            if self.hub.metrics is not None:
                self.hub.metrics.upstream_failed(self.upstream.config.name, FailureKind.STREAM_BROKEN)
        self._end_with_error_event(f"upstream stream failed: {exc}")

    def _end_with_error_event(self, message: str) -> None:
        """End a response the client is receiving so that its SDK raises: an
        SSE stream gets an `error` event and its last chunk, whole; any other
        body can only be cut."""
        if self.gone:
            return
        if self.sse_body and self.chunked:
            event = sse_error_event(self.flavour, message)
            if not self.last_data.endswith(b"\n\n"):
                # The vendor's last read ended inside an event: end that
                # line and event first, or the error would be read as part of it.
                event = b"\n\n" + event
            self.protocol.writelines((b"%x\r\n" % len(event), event, b"\r\n", b"0\r\n\r\n"))
            # The stream is framed correctly, but the client cannot reuse
            # what it thinks is a failed connection reliably; close it.
            self.protocol.finish(False)
        else:
            self.protocol.abort()

    def _release_conn_closed(self) -> None:
        """Close the upstream connection mid-answer: nothing more of it may
        reach the client, and it cannot go back to the pool."""
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    # -- answers the hub makes itself ------------------------------------------
    def respond(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, *, head_only: bool = False,
        budget: Budget | None = None,
    ) -> None:
        """Answer from the hub; with the budget headers when a budget
        applies (`budget`, else the admitted request's)."""
        self._enter(_FINISHING)
        self.status = status
        self.ttfb = time.monotonic()
        headers = headers + [(b"x-hubcore-request-id", self.request_id.encode())]
        if budget is None and self.admission is not None:
            budget = self.admission.budget
        if budget is not None:
            headers += _budget_headers(budget)
        self.protocol.send_response(status, headers, body, keep_alive=self.request.keep_alive and not self.hub_draining(), head_only=head_only)

    def refuse(self, error: HubError) -> None:
        # The hub's own answers are refusals, except when it has no upstream to offer.
        self.outcome = _UPSTREAM_ERROR if error.status >= 500 else _REFUSED
        self.error_type = error.code or error.error_type or str(error.status)
        # A limit's refusal still says what is left of the principal's budgets.
        budget = error.budget if isinstance(error, Refused) else None
        self.respond(error.status, refusal_headers(error), error.body(self.flavour), budget=budget)

    def _give_up(self, upstream: UpstreamRuntime, last_error: tuple[ResponseHead, bytes] | None, last_exc: UpstreamError | None, rate_limited_for: float | None) -> None:
        """No attempt succeeded and none more will be made: answer as
        answers.give_up says."""
        probe_in = None
        if rate_limited_for is None and last_error is None and last_exc is None:
            # Asked only when no key could be tried: the ring expires the
            # rests that are over as it looks.
            probe_in = upstream.ring.next_probe_in(pending=True)
        vendor_error = None if last_error is None else (last_error[0].status, last_error[0].headers, last_error[1])
        status, headers, body, self.error_type = give_up(
            self.flavour, upstream.config.name, self.attempts, rate_limited_for, vendor_error, last_exc, probe_in,
        )
        self.outcome = _UPSTREAM_ERROR
        self.respond(status, headers, body)

    # -- the usage row -----------------------------------------------------------

class _RetryBeforeFirstByte(Exception):
    def __init__(self, error: UpstreamError) -> None:
        super().__init__(str(error))
        self.error = error
