# cython: language_level=3
"""A request's common path through the Exchange, compiled: the twin of
`_exchange_py.py` (see there for the contract; tests/gateway/
test_exchange_core.py holds both to it).

The same methods in the same order, on typed fields: the request's state is
C fields (the phase a C int, the flags C ints, the clock readings C
doubles), and what the steps call among themselves (`_admit`,
`_first_attempt`, `_move`, `_write`, `_count_attempt`, `_release_conn`,
`_end`, `_record`, `usage_event`, ...) are C calls, as are the calls on
the connection cores (_conn.pxd, _upstream.pxd) and on the key ring's and
limiter's cores (_lease.pxd, _admit.pxd: acquire, observe, release,
needs_model, admit, an admission's release). What other code calls stays
Python-callable (the connections' callbacks, the subclass's rare paths,
the tests); what the subclass (exchange.Exchange) supplies (`respond`,
`_route`, `ensure_task`, `_scan_body`, `_end_attempt`, ...), and the
router, metrics and recorder, are called as Python methods. A method a
test replaces through the class (`_record`, `_begin_stream`) is cpdef, so
the replacement is still what runs."""

from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromFormat, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_DecodeASCII, PyUnicode_DecodeLatin1
from libc.string cimport memchr, memcmp, memcpy

cdef extern from *:
    # GCC's and Clang's checked arithmetic: true when the result overflowed.
    bint __builtin_smulll_overflow(long long a, long long b, long long* result) nogil
    bint __builtin_saddll_overflow(long long a, long long b, long long* result) nogil

# The connection cores, compiled with this one (setup.py builds all or none;
# an import of this module fails without them, and the pure twin runs): the
# request, its client connection, the upstream connection and the answer's
# head are typed fields, read and called in C.
from hubcore.http._conn cimport ConnCore, Request
from hubcore.http._upstream cimport PoolCore, ResponseHead, UpstreamCore
from hubcore.http._wire cimport HeaderList
# The key ring's and limiter's cores, likewise (built with this one, or
# this one fails to import and the pure twin runs): a ring or limiter that
# is not one of them (a test's fake) is called as a Python object.
from hubcore.governance._admit cimport (
    P_GROUPS, P_PROJECT, P_TOKEN_ID, P_USER, Admission, LimiterCore, principal_field,
)
from hubcore.routing._lease cimport RingCore
# The gateway's functions of the heads (the route, the session, the leading
# model, its rate-limit class, the head the vendor gets and the one the
# client gets), likewise: C calls to their compiled twins.
from hubcore.gateway._heads cimport (
    keeps_alive, leading_model, model_class, request_head, response_framing, response_head, route_for,
    session_from_headers,
)
# The compiled meter and the Reading that keeps its counters, likewise: the
# usage row reads them as C fields.
from hubcore.accounting._meter cimport Meter as CompiledMeter, new_meter
from hubcore.accounting._meter_interpret cimport Reading
from hubcore._slots cimport read_slot, slot_offset
from hubcore.accounting._rows cimport new_event

import logging
import os

from hubcore.accounting.pricing import LOOKUP_MEMO_MAX, TOKENS_PER_PRICE_UNIT, Pricing
from hubcore.accounting.usage import Outcome
from hubcore.config import UpstreamConfig
from hubcore.errors import ANTHROPIC, HubError, MeterError
from hubcore.gateway.answers import ROOT_BODY, ROOT_HEADERS
from hubcore.gateway.rewrite import Framing
from hubcore.gateway.routes import ME_PATH, authenticate, flavour_for_path, printable_path
from hubcore.governance.tokens import Principal, TokenTable
from hubcore.routing.failures import CLIENT_ABORTED, classify, in_stream_failure, retryable

# What is not hot is the Python twin's, shared.
from hubcore.gateway._exchange_py import (
    AUTH_LINES_MAX, JSON_OBJECT_START, _MOVES, _REFUSE_UNPRICED, Phase, _budget_headers, origin_lines,
)

log = logging.getLogger("hubcore.proxy")

# The phases as C ints (the Phase members' values), and each phase's moves
# as a bit set: a move is checked with a shift and a mask, not a dict and a
# frozenset. `phase`, read from Python, is still the Phase member.
cdef enum:
    ADMITTING = 1
    SENDING = 2
    AWAITING_HEAD = 3
    HOLDING_HEAD = 4
    STREAMING = 5
    FINISHING = 6
    DONE = 7

cdef tuple _PHASES = (None,) + tuple(Phase)  # by value
cdef int _ALLOWED[8]
for _old, _news in _MOVES.items():
    _ALLOWED[<int>_old] = 0
    for _new in _news:
        _ALLOWED[<int>_old] |= 1 << <int>_new
assert [int(p) for p in _PHASES[1:]] == list(range(ADMITTING, DONE + 1)), "Phase and the C phases differ"

# The outcomes as C globals: `outcome is _OK` is a pointer comparison.
cdef object _OK = Outcome.OK
cdef object _CLIENT_ABORTED = Outcome.CLIENT_ABORTED
cdef object _UPSTREAM_ERROR = Outcome.UPSTREAM_ERROR
cdef object _REFUSED = Outcome.REFUSED
cdef object _UPSTREAM_ABORTED = Outcome.UPSTREAM_ABORTED
cdef const char* _HEX_DIGITS = b"0123456789abcdef"
cdef object _Pricing = Pricing
cdef object _CHUNKED = Framing.CHUNKED
cdef object _CLIENT_ABORTED_FAILURE = CLIENT_ABORTED
cdef object _HubError = HubError
cdef type _Principal = Principal
# What the request path reads of its upstream's config, from its slots
# (hubcore/_slots.pxd; of its Principal: _admit.principal_field).
cdef type _UpstreamConfig = UpstreamConfig
cdef Py_ssize_t _KEYS = slot_offset(UpstreamConfig, "keys")
cdef Py_ssize_t _NAME = slot_offset(UpstreamConfig, "name")
cdef Py_ssize_t _FIRST_BYTE_TIMEOUT = slot_offset(UpstreamConfig, "first_byte_timeout")
cdef Py_ssize_t _STREAM_IDLE_TIMEOUT = slot_offset(UpstreamConfig, "stream_idle_timeout")
cdef Py_ssize_t _MODEL_MAP = slot_offset(UpstreamConfig, "model_map")
cdef Py_ssize_t _COST_MULTIPLIER = slot_offset(UpstreamConfig, "cost_multiplier")
cdef object _TokenTable = TokenTable
cdef object _MeterError = MeterError
cdef str _ME_ROUTE = ME_PATH.decode()
cdef bytes _ME_PATH = ME_PATH
cdef object _JSON_OBJECT_START = JSON_OBJECT_START

# The clock readings a request keeps that may be unset (None to Python):
# a C double below zero, which neither clock gives.
cdef double _UNSET = -1.0


cdef inline double _clock(int clock):
    # time.monotonic() and time.time() read these clocks, without the call
    # and the float object.
    cdef timespec now
    clock_gettime(clock, &now)
    return now.tv_sec + now.tv_nsec * 1e-9


cdef inline object _maybe(double value):
    return None if value < 0.0 else value


cdef inline object _decode(value):
    """See the twin's _decode (a C call for bytes, not a method and a codec lookup)."""
    if type(value) is bytes:
        return PyUnicode_DecodeLatin1(PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value), NULL)
    return value.decode("latin-1") if value is not None else None


# The calls on the key ring, the limiter and an admission: C calls on their
# compiled cores (KeyRing, Limiter and BudgetedAdmission subclass them),
# Python calls on anything else.
cdef frozenset _NOTHING_TRIED = frozenset()


cdef inline object _acquire(ring, session_id, str model_class):
    if isinstance(ring, RingCore):
        # A C call takes the defaults before model_class positionally.
        return (<RingCore>ring).acquire(session_id, _NOTHING_TRIED, None, None, model_class)
    return ring.acquire(session_id, model_class=model_class)


cdef inline int _observe(ring, lease, ResponseHead head) except -1:
    # The head is indexed only for a ring that will read it now (a key
    # whose reading stands reads nothing until its interval has passed).
    if isinstance(ring, RingCore):
        if (<RingCore>ring).reading_due(lease):
            (<RingCore>ring).observe(lease, head.index)
    else:
        ring.observe(lease, head.index)
    return 0


cdef inline int _release(ring, lease, failure) except -1:
    if isinstance(ring, RingCore):
        (<RingCore>ring).release(lease, failure)
    else:
        ring.release(lease, failure)
    return 0


cdef inline bint _needs_model(limiter, principal) except -1:
    if isinstance(limiter, LimiterCore):
        return (<LimiterCore>limiter).needs_model(principal)
    return limiter.needs_model(principal)


cdef inline object _admit_with(limiter, principal, model, double now, bint model_required):
    if isinstance(limiter, LimiterCore):
        return (<LimiterCore>limiter)._admit_request(principal, model, now, model_required)
    return limiter.admit(principal, model, now, model_required=model_required)


cdef Py_ssize_t _AUTH_LINES_MAX = AUTH_LINES_MAX


cdef class UpstreamRuntimeCore:
    """See _exchange_py.UpstreamRuntimeCore: read by the Exchange's core as
    C fields, its auth line a C call."""

    cdef public object config
    cdef public PoolCore pool
    cdef public object ring
    cdef public bytes host_header
    cdef public bytes base_path
    cdef public bint auth_anthropic
    cdef public dict _auth_lines

    def __cinit__(self):
        self.host_header = self.base_path = b""

    def address(self, config):
        """See the twin."""
        self.host_header, self.base_path, self.auth_anthropic = origin_lines(config)
        self._auth_lines = {}

    cpdef bytes auth_header(self, str secret):
        cdef dict lines = self._auth_lines
        line = lines.get(secret)
        if line is None:
            if len(lines) >= _AUTH_LINES_MAX:
                lines.clear()
            name = b"x-api-key: " if self.auth_anthropic else b"authorization: Bearer "
            line = lines[secret] = name + secret.encode() + b"\r\n"
        return line


cdef inline int _check_upstream(UpstreamRuntimeCore upstream) except -1:
    # What reading a field of None would raise in the twin, rather than
    # the C read through a null pointer (Python calls these with an upstream).
    if upstream is None:
        raise AttributeError("'NoneType' object has no attribute 'config'")
    return 0


cdef class HubCore:
    """See _exchange_py.HubCore: a request's start, its gate and its id,
    without a Python frame for a request on a known route with a token seen
    before."""

    cdef public object tokens
    # The hub's (exchange.Hub): its Exchange class, and what each Exchange
    # reads of it, so that the Exchange's core reads them as C fields.
    cdef public object exchange_type
    cdef public object metrics
    cdef public object loop
    cdef public object limiter
    cdef public object prices
    cdef public dict routers
    cdef public object recorder
    cdef public object access
    cdef public object shared
    cdef char _id_prefix[16]
    cdef Py_ssize_t _id_prefix_len
    # Public for the twins' tests (the pure twin's is an attribute).
    cdef public unsigned long long _id_counter

    def __init__(self, tokens):
        self.tokens = tokens
        prefix = ("hc_" + os.urandom(4).hex()).encode("ascii")
        memcpy(self._id_prefix, <const char*>prefix, len(prefix) + 1)
        self._id_prefix_len = len(prefix)
        self._id_counter = 0

    def handle(self, request, protocol):
        exchange = self.exchange_type(self, request, protocol)
        protocol.handler = exchange
        try:
            exchange.begin()
        except Exception as e:
            # A bug: raised again in the task, which logs it (server.py).
            exchange.failure = e
            exchange.in_callbacks = False
        metrics = self.metrics
        if metrics is not None:
            metrics.request_started()
        if exchange.in_callbacks:
            return None
        return self._run(exchange)

    cpdef str request_id(self):
        # The twin's "%s%010x", written digit by digit: parsing the format
        # was most of an snprintf's cost.
        cdef char text[48]
        cdef Py_ssize_t n = self._id_prefix_len, digits = 10, at
        cdef unsigned long long rest
        self._id_counter += 1
        rest = self._id_counter
        while digits < 16 and (rest >> (4 * digits)) != 0:
            digits += 1
        memcpy(text, self._id_prefix, n)
        at = n + digits
        while at > n:
            at -= 1
            text[at] = _HEX_DIGITS[rest & 15]
            rest >>= 4
        return PyUnicode_DecodeASCII(text, n + digits, NULL)

    def gate(self, protocol, bytes method, bytes target, head):
        cdef PyObject* found
        cdef const char* t = PyBytes_AS_STRING(target)
        cdef const char* q = <const char*>memchr(t, 63, PyBytes_GET_SIZE(target))  # '?'
        path = target if q == NULL else PyBytes_FromStringAndSize(t, q - t)
        if path == b"/":
            return None
        if route_for(path) is None and path != _ME_PATH:
            return _HubError(404, f"no route for {printable_path(path)}")
        principal = None
        # The server's head is a HeaderCollector: its header() a C call.
        token = (<HeaderList>head).header(b"x-api-key") if isinstance(head, HeaderList) else head.header(b"x-api-key")
        if type(token) is bytes and PyBytes_GET_SIZE(token) and type(self.tokens) is _TokenTable:
            seen = self.tokens.seen
            if type(seen) is dict:
                found = PyDict_GetItem(seen, token)
                principal = <object>found if found != NULL else None
            else:
                principal = seen.get(token)
        if principal is None:
            # Bearer tokens, tokens not seen since the last reload, refusals:
            # the twin's steps.
            principal = authenticate(self.tokens, head.index)
        if isinstance(principal, _Principal) and not protocol.trusted:
            protocol.trust()
        return principal


cdef class ExchangeCore:
    """See _exchange_py.ExchangeCore."""

    cdef public HubCore hub
    cdef public object loop
    cdef public Request request
    cdef public ConnCore protocol
    cdef public str request_id
    cdef public double ts
    cdef public double t0
    # The response head, held until the first body bytes go with it.
    cdef public list pending_head
    cdef int _phase
    cdef double _ttfb
    cdef double _sent_at
    cdef double _head_at
    cdef double _ended
    cdef public double queued
    cdef public object route
    cdef public object flavour
    cdef public object principal
    cdef public object model
    cdef public bint scanned
    cdef public object session_id
    cdef public UpstreamRuntimeCore upstream
    cdef public object mapped
    cdef public object chain
    cdef public str attempt_upstream
    cdef public bint attempt_open
    cdef public object lease
    cdef public object admission
    cdef public object grant
    cdef public object shared_session_key
    cdef public object key_label
    cdef public bint keep_alive
    cdef public int attempts
    cdef public int status
    cdef public object outcome
    cdef public object error_type
    cdef public object meter
    cdef public UpstreamCore conn
    cdef public ResponseHead head
    cdef public object head_failure
    cdef public bint in_callbacks
    cdef public bint gone
    cdef public bint chunked
    cdef public bint sse_body
    cdef public object done
    cdef public bytes last_data
    cdef public object refusal
    cdef public object sending
    cdef public object failure

    def __cinit__(self):
        # What a request starts with (the twin's class attributes); C
        # fields not named here start as None, 0 or False.
        self._phase = ADMITTING
        self._ttfb = self._sent_at = self._head_at = self._ended = _UNSET
        self.queued = 0.0
        self.flavour = ANTHROPIC
        self.attempt_upstream = ""
        self.keep_alive = True
        self.outcome = _OK
        self.last_data = b""
        self.pending_head = []

    def __init__(self, HubCore hub, Request request, ConnCore protocol):
        self.hub = hub
        self.loop = hub.loop
        self.request = request
        self.protocol = protocol
        self.request_id = hub.request_id()
        self.ts = _clock(CLOCK_REALTIME)
        # Latencies are measured on CLOCK_MONOTONIC (time.monotonic()), not
        # loop.time(): see the twin.
        self.t0 = _clock(CLOCK_MONOTONIC)

    # -- what Python reads as objects ----------------------------------------
    @property
    def phase(self):
        return _PHASES[self._phase]

    @phase.setter
    def phase(self, value):
        self._phase = <int>Phase(value)

    @property
    def ttfb(self):
        return _maybe(self._ttfb)

    @ttfb.setter
    def ttfb(self, value):
        self._ttfb = _UNSET if value is None else value

    @property
    def sent_at(self):
        return _maybe(self._sent_at)

    @sent_at.setter
    def sent_at(self, value):
        self._sent_at = _UNSET if value is None else value

    @property
    def head_at(self):
        return _maybe(self._head_at)

    @head_at.setter
    def head_at(self, value):
        self._head_at = _UNSET if value is None else value

    @property
    def ended(self):
        return _maybe(self._ended)

    @ended.setter
    def ended(self, value):
        self._ended = _UNSET if value is None else value

    # -- phases ----------------------------------------------------------------
    def _enter(self, phase):
        """The one place the phase changes (see _MOVES)."""
        self._move(phase)

    cdef int _move(self, int phase) except -1:
        if not (_ALLOWED[self._phase] >> phase) & 1:
            raise RuntimeError(
                f"request {self.request_id}: no move from {_PHASES[self._phase].name} to {_PHASES[phase].name}")
        self._phase = phase
        return 0

    # -- admission and the first attempt ----------------------------------------
    def begin(self):
        """See the twin."""
        try:
            upstream = self.upstream = self._admit()
            if upstream is not None and self.hub.shared is None:
                self._move(SENDING)
                self._first_attempt(upstream)
        except _HubError as e:
            self.refusal = e

    cpdef _admit(self):
        """Route, authenticate and admit the request (HubError if refused);
        the upstream to send it to, or None once answered here."""
        cdef Request request = self.request
        cdef bytes path = request.path
        cdef bytes method = request.method
        cdef bint refusing_unpriced
        cdef HubCore hub
        cdef UpstreamRuntimeCore upstream
        if path == b"/":
            if method != b"GET" and method != b"HEAD":
                raise _HubError(405, "method not allowed")
            self.respond(200, ROOT_HEADERS, ROOT_BODY, head_only=method == b"HEAD")
            return None
        self.route = route = route_for(path, request.headers)
        self.flavour = route.flavour if route is not None else flavour_for_path(path)
        context = request.context
        if isinstance(context, _HubError):
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
        assert isinstance(context, _Principal), "a request the gate did not judge"
        principal = self.principal = context
        if method not in route.methods:
            raise _HubError(405, f"{method.decode()} is not allowed on {route.endpoint}")
        hub = self.hub
        limiter = hub.limiter
        prices = hub.prices
        refusing_unpriced = prices is not None and prices.unpriced == _REFUSE_UNPRICED
        if method == b"POST":
            self._check_body()
            self.session_id = session_from_headers(request.headers)
            # The body is read for the model and session before the send
            # only when the request cannot go out without them (see the twin).
            if (self.session_id is None or refusing_unpriced
                    or (limiter is not None and _needs_model(limiter, principal))):
                self._scan_body()
            else:
                # The model picks the key's rate-limit class; Claude Code
                # writes it first, where it is read without a scan.
                self.model = leading_model(request.parts[0]) if request.parts else None
        kind = route.kind
        router = hub.routers.get(kind)
        groups = principal_field(principal, P_GROUPS)
        upstream = router.single if router is not None and groups is None else None
        if upstream is None:
            upstream = self._route(kind, router)
            assert upstream is not None, "_route returns an upstream or raises"
        if not read_slot(upstream.config, _UpstreamConfig, _KEYS, "keys"):
            raise _HubError(503, f"no {kind} upstream key is configured; the hub operator must add one")
        if refusing_unpriced and prices is not None and prices.refuses(kind, self.model):
            raise _HubError(
                400, f"model {self.model!r} has no price on this hub, and its setting "
                f'[pricing] unpriced = "refuse" refuses requests for models without one; '
                "ask the hub operator to add its price",
                code="model_not_priced",
            )
        if limiter is not None:
            self.admission = _admit_with(limiter, principal, self.model, self.ts, self.scanned)
        return upstream

    cpdef _first_attempt(self, UpstreamRuntimeCore upstream):
        """See the twin."""
        _check_upstream(upstream)
        cdef PoolCore pool
        cdef UpstreamCore conn
        lease = _acquire(upstream.ring, self.session_id, model_class(self.model))
        if lease is None:
            return
        self.lease = lease
        pool = upstream.pool
        conn = pool._take_idle()
        if conn is not None:
            self.conn = conn
            self._count_attempt(upstream.config, lease)
            self._write_request(upstream, conn, self._request_head(upstream, lease.secret))
            self.sending = conn
            self.in_callbacks = True

    cpdef _count_attempt(self, cfg, lease):
        label = self.key_label = lease.label
        if self.grant is not None and self.session_id is not None and label != self.shared_session_key:
            self._share_session_key(cfg, label)
        self.attempts += 1
        name = self.attempt_upstream = read_slot(cfg, _UpstreamConfig, _NAME, "name")
        self.attempt_open = True
        metrics = self.hub.metrics
        if metrics is not None:
            metrics.upstream_attempt(name, retry=self.attempts > 1)

    cpdef _write_request(self, UpstreamRuntimeCore upstream, UpstreamCore conn, bytes head):
        _check_upstream(upstream)
        cfg = upstream.config
        parts = self.request.parts if self.mapped is None else self.mapped[1]
        conn._send(
            head, parts, read_slot(cfg, _UpstreamConfig, _FIRST_BYTE_TIMEOUT, "first_byte_timeout"),
            read_slot(cfg, _UpstreamConfig, _STREAM_IDLE_TIMEOUT, "stream_idle_timeout"), self._on_head,
            self.ensure_task,
        )
        self._move(AWAITING_HEAD)
        self._sent_at = _clock(CLOCK_MONOTONIC)

    cpdef bytes _request_head(self, UpstreamRuntimeCore upstream, secret):
        """See the twin."""
        _check_upstream(upstream)
        cdef Request request = self.request
        cdef Py_ssize_t body_size = request.body_size
        self.mapped = None
        config = upstream.config
        if read_slot(config, _UpstreamConfig, _MODEL_MAP, "model_map") and request.method == b"POST":
            self.mapped = self._mapped_body(config)
            if self.mapped is not None:
                body_size = len(self.mapped[1][0])
        return request_head(
            request.method, request.target, upstream.base_path, upstream.host_header, upstream.auth_header(secret),
            request.headers, request.control, body_size,
        )

    # -- the answer --------------------------------------------------------------
    def _on_head(self, ResponseHead head):
        """See the twin."""
        # classify's first rule, without the call: an answer below 400 says
        # nothing against the key.
        cdef UpstreamRuntimeCore upstream = self.upstream
        failure = self.head_failure = None if head.status < 400 else classify(head.status, head.headers)
        lease = self.lease
        if lease is not None and upstream is not None:
            # The rate-limit headers of every answer: the room the key has left.
            _observe(upstream.ring, lease, head)
        if failure is None or not retryable(failure):
            self._begin_stream(head)  # its answer is counted with the request (see report)
        else:
            metrics = self.hub.metrics
            if metrics is not None:
                metrics.upstream_answered(self.attempt_upstream, head.status)
            self.ensure_task()  # the retry

    cpdef _begin_stream(self, ResponseHead head):
        cdef int status
        cdef Request request
        cdef UpstreamCore conn = self.conn
        assert conn is not None
        self._move(HOLDING_HEAD)
        self.head = head
        self._head_at = conn.head_at
        status = self.status = head.status
        content_type = head.header(b"content-type")
        self.sse_body = (type(content_type) is bytes and PyBytes_GET_SIZE(content_type) >= 17
                         and memcmp(PyBytes_AS_STRING(content_type), b"text/event-stream", 17) == 0)
        route = self.route
        if route is not None and 200 <= status < 300:
            fmt = route.fmt
            if fmt:
                self.meter = new_meter(fmt, self.sse_body)
        request = self.request
        content_length = head.content_length
        framing = response_framing(status, content_length, request.http_version == "1.1")
        self.chunked = framing is _CHUNKED
        keep_alive = keeps_alive(framing, request.keep_alive and not self.hub_draining())
        self.keep_alive = keep_alive
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
        conn._attach(self)

    def on_data(self, list parts):
        """See the twin."""
        if not self.gone:
            self._write(parts[0] if len(parts) == 1 else b"".join(parts), False)

    def on_complete(self, list parts):
        """See the twin."""
        if not self.gone:
            self._write(parts[0] if len(parts) == 1 else b"".join(parts), True)
        if self.in_callbacks:
            if self._phase != FINISHING:
                # The bookkeeping runs once this read's callbacks are over
                # (the connection goes back to the pool there).
                self._move(FINISHING)
                self.loop.call_soon(self._finish)
            return
        self._move(FINISHING)
        done = self.done
        if done is not None and not done.done():
            done.set_result(None)

    cdef _write(self, bytes data, bint end):
        cdef bint first = self._phase == HOLDING_HEAD
        cdef list out
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
        if first:
            # The response head goes out with the first body bytes.
            out = self.pending_head
            self.pending_head = []
            self._move(STREAMING)
            self._ttfb = _clock(CLOCK_MONOTONIC)
        else:
            out = []
        if size:
            self.last_data = data
            if self.chunked:
                out.append(PyBytes_FromFormat(b"%x\r\n", <int>size))  # b"%x\r\n" % size
                out.append(data)
                out.append(b"\r\n")
            else:
                out.append(data)
        if end and self.chunked:
            out.append(b"0\r\n\r\n")
        if out:
            self.protocol._writelines(out)
        meter = self.meter
        if meter is not None and size:
            try:
                if type(meter) is CompiledMeter and type(data) is bytes:
                    (<CompiledMeter>meter)._feed_bytes(data)  # a C call
                else:
                    meter.feed(data)
            except _MeterError as e:
                log.warning("request %s: metering stopped: %s", self.request_id, e)
                self.meter = None
        if first:
            if end:
                self._close_meter()  # whole: a JSON answer names its model only now
            self._scan_unless_named()  # before the body is let go
            # No retry is possible from here on (see the twin).
            self.request.drop_body()

    cpdef _close_meter(self):
        """The body has ended: the meter's numbers are final (idempotent)."""
        meter = self.meter
        if meter is not None:
            try:
                meter.close()
            except _MeterError as e:
                log.warning("request %s: metering failed at the end of the body: %s", self.request_id, e)

    cpdef _check_body(self):
        """See the twin."""
        cdef Request request = self.request
        first = request.parts[0][:1] if request.parts else b""
        if first != b"{" and _JSON_OBJECT_START.match(request.body) is None:
            raise _HubError(400, "request body must be a JSON object")

    cpdef _scan_unless_named(self):
        """See the twin."""
        cdef Request request
        meter = self.meter
        if self.scanned:
            return
        request = self.request
        if request.parts and request.method == b"POST" and (meter is None or meter.model is None):
            self._scan_body()

    cpdef bint hub_draining(self) except -1:
        return self.protocol.server.draining

    # -- the end -----------------------------------------------------------------
    def _finish(self):
        """See the twin."""
        cdef ConnCore protocol = self.protocol
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
        protocol._request_done()

    cpdef _stream_done(self):
        self._release_conn()
        self.protocol._finish(self.keep_alive)

    cpdef _release_conn(self):
        cdef UpstreamCore conn = self.conn
        self.conn = None
        if conn is not None:
            conn._release()

    cpdef _release_lease(self, lease, failure):
        """See the twin."""
        cdef UpstreamRuntimeCore upstream = self.upstream
        if lease is not None and upstream is not None:
            if failure is None:
                meter = self.meter
                error_type = meter.error_type if meter is not None else None
                # in_stream_failure of no error event is None, without the call.
                failure = None if error_type is None else in_stream_failure(error_type)
            _release(upstream.ring, lease, failure)
            self.lease = None

    cpdef _end(self):
        self._move(DONE)
        admission = self.admission
        if admission is not None:
            if isinstance(admission, Admission):
                (<Admission>admission).release()
            else:
                admission.release()
        if self.grant is not None:
            self.grant.release()
        self._record()

    cpdef _record(self):
        cdef double now
        cdef HubCore hub
        cdef UpstreamRuntimeCore upstream
        if self.lease is not None and self.upstream is not None:
            _release(self.upstream.ring, self.lease, _CLIENT_ABORTED_FAILURE)
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
        now = self._ended = _clock(CLOCK_MONOTONIC)
        if principal is None or route is None:
            self._log(now, None)
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
                route_text = f"{self.attempt_upstream}/{self.key_label or '-'}:{outcome}"
            else:
                self._end_attempt(outcome)
                route_text = chain.render()
        else:
            route_text = chain.render() if chain is not None else None
        upstream = self.upstream
        upstream_name = None
        cost_multiplier = 1.0
        if upstream is not None:
            cfg = upstream.config
            upstream_name = read_slot(cfg, _UpstreamConfig, _NAME, "name")
            cost_multiplier = read_slot(cfg, _UpstreamConfig, _COST_MULTIPLIER, "cost_multiplier")
        hub = self.hub
        event = usage_event(
            self.ts, self.request_id, route.endpoint, self.status, self.outcome, (now - self.t0) * 1000.0,
            principal, upstream_name, self.key_label, self.model,
            self.error_type, (self._ttfb - self.t0) * 1000.0 if self._ttfb >= 0.0 else None, self.attempts,
            self.session_id, _decode(self.request.header(b"user-agent")), self.sse_body, self.meter, route.kind,
            hub.prices, self.mapped[0] if self.mapped is not None else None,
            route_text,
            cost_multiplier,
        )
        hub.recorder.record(event)
        self._log(now, event)

    cdef _log(self, double now, event):
        access = self.hub.access
        if access is None:
            return
        client = self.protocol.peer
        if event is not None:
            access.record(event, client)
            return
        # Refused without a valid token: see the twin.
        if self.status >= 400 and not access.refusals.admit(client or "-", self.status, self.loop.time()):
            return
        access.refused(self.ts, self.request_id, self.request.path, self.status, self.outcome,
                       (now - self.t0) * 1000.0, client)

    cpdef report(self):
        """The request has ended: count it in the hub's metrics, if kept."""
        cdef double now, t0 = self.t0
        metrics = self.hub.metrics
        if metrics is None:
            return
        # The end the access log has, so that its figures and the stats agree.
        now = self._ended if self._ended >= 0.0 else _clock(CLOCK_MONOTONIC)
        if self.route is not None:
            route = self.route.endpoint
        else:
            path = self.request.path
            route = "/" if path == b"/" else _ME_ROUTE if path == _ME_PATH else "other"
        ttfb = self._ttfb - t0 if self._ttfb >= 0.0 else None
        hub_added = None
        if self.attempts == 1 and self._sent_at >= 0.0 and self._head_at >= 0.0 and self._ttfb >= 0.0:
            # The hub's own share: see the twin.
            hub_added = max(0.0, self._sent_at - t0 - self.queued) + max(0.0, self._ttfb - self._head_at)
        # The answer that went to the client (one retried is counted by _on_head).
        answered_by = self.attempt_upstream if self.head is not None else None
        metrics.request_finished(route, self.status, self.outcome, now - t0, ttfb, hub_added, answered_by)
        if self.queued:
            metrics.observe_queue_wait(self.queued)
        if self.outcome is _REFUSED:
            metrics.refuse(self.error_type or str(self.status))


# -- the cost of the common request ----------------------------------------------

# Pricing.cost is three Python calls a request (cost, price_for,
# Price.cost_micros) and some 8,000 instructions. Its common case, a model
# with a price of its own at the list price (no multiplier) and below any
# long-context threshold, is the sum of five products, done here in C from
# the price's five figures, kept by model id for the Pricing they came from
# (a reload makes a new Pricing, which empties them). Everything else (no
# price, an estimate, a multiplier, long context, counts past 64 bits) is
# Pricing.cost's, as in the twin.
cdef object _priced_by = None
cdef dict _price_rows = {}
cdef object _NOT_LISTED = object()   # a model with no price of its own, or one C does not take
cdef long long _UNIT = TOKENS_PER_PRICE_UNIT
cdef long long _HALF = TOKENS_PER_PRICE_UNIT // 2
# What a count or a figure may be in C: four counts add up within 64 bits
# (the long-context test); products and sums are checked as they are made.
cdef object _LIMIT = 2 ** 60

cdef object _price_row(price):
    """A Price's five per-million figures and its long-context threshold
    (-1: none), as a tuple of ints; _NOT_LISTED for no price or figures C
    does not take (not plain ints from 0 up to 2**60)."""
    if price is None:
        return _NOT_LISTED
    above = price.long_context_above
    figures = (price.input, price.cache_write_5m, price.cache_write_1h, price.cache_read, price.output)
    for figure in (figures if above is None else figures + (above,)):
        if type(figure) is not int or not 0 <= figure < _LIMIT:
            return _NOT_LISTED
    return figures + (-1 if above is None else above,)


cdef inline bint _as_count(object tokens, long long* out):
    """A token count as a C long long: False for anything but a plain int
    from 0 up to 2**60 (left to Pricing.cost)."""
    if type(tokens) is not int or not 0 <= tokens < _LIMIT:
        return False
    out[0] = tokens
    return True


cdef object _list_price_cost(prices, model, input_tokens, output_tokens, cache_write_5m, cache_write_1h,
                             cache_read, double multiplier):
    """Price.cost_micros at the list price, in C, for the common case (see
    above); None when Pricing.cost is to answer."""
    global _priced_by, _price_rows
    cdef long long counts[5]
    cdef long long figures[5]
    cdef long long total = 0, product
    cdef int i
    if multiplier != 1.0 or type(model) is not str or type(prices) is not _Pricing:
        return None
    if prices is not _priced_by:
        _price_rows = {}
        _priced_by = prices
    row = _price_rows.get(model)
    if row is None:
        row = _price_row(prices.table.price_for(model))
        if len(_price_rows) >= LOOKUP_MEMO_MAX:
            _price_rows.clear()
        _price_rows[model] = row
    if row is _NOT_LISTED:
        return None
    if not (_as_count(input_tokens, &counts[0]) and _as_count(cache_write_5m, &counts[1])
            and _as_count(cache_write_1h, &counts[2]) and _as_count(cache_read, &counts[3])
            and _as_count(output_tokens, &counts[4])):
        return None
    above = <long long>(<tuple>row)[5]
    if above >= 0 and counts[0] + counts[1] + counts[2] + counts[3] > above:
        return None  # long-context prices
    for i in range(5):
        figures[i] = (<tuple>row)[i]
        if __builtin_smulll_overflow(counts[i], figures[i], &product) or \
                __builtin_saddll_overflow(total, product, &total):
            return None
    # Both non-negative: C's division rounds down as Python's // does.
    if __builtin_saddll_overflow(total, _HALF, &total):
        return None
    return total // _UNIT


cdef tuple _meter_counts(meter):
    """A meter's model, token counts, stop reason, whether the output is
    estimated, error type and completion, in that order."""
    cdef Reading reading
    cdef Py_ssize_t delta_chars
    if type(meter) is CompiledMeter:
        # C fields of the meter's Reading, which its properties return: not
        # a dozen attribute lookups.
        reading = (<CompiledMeter>meter)._reading
        delta_chars = (<CompiledMeter>meter).delta_chars
        return (reading.model, reading.input_tokens, reading._output_tokens(delta_chars), reading.cache_write_5m,
                reading.cache_write_1h, reading.cache_read, reading.reasoning_tokens, reading.server_tool_requests,
                reading.stop_reason, reading._output_estimated(delta_chars), reading.error_type, reading.completed)
    # The pure twin's meter, or a test's.
    return (meter.model, meter.input_tokens, meter.output_tokens, meter.cache_write_5m, meter.cache_write_1h,
            meter.cache_read, meter.reasoning_tokens, meter.server_tool_requests, meter.stop_reason,
            meter.output_estimated, meter.error_type, meter.completed)


cpdef usage_event(
    double ts, str request_id, str endpoint, int status, outcome, double total_ms, principal, upstream, key_label,
    model, error_type, ttfb_ms, int attempts, session_id, user_agent, bint sse_body, meter, vendor, prices,
    served_model=None, route=None, double cost_multiplier=1.0,
):
    """See the twin: the usage row of a request that has ended. A C call
    from _record."""
    cdef bint output_estimated
    if meter is None:
        input_tokens = output_tokens = cache_write_5m = cache_write_1h = cache_read = 0
        reasoning_tokens = server_tool_requests = 0
        stop_reason = None
        output_estimated = False
    else:
        (metered_model, input_tokens, output_tokens, cache_write_5m, cache_write_1h, cache_read, reasoning_tokens,
         server_tool_requests, stop_reason, output_estimated, meter_error, completed) = _meter_counts(meter)
        if served_model is None:
            model = metered_model or model
        # A stream cut before its final usage: output estimated (see the twin).
        if error_type is None and meter_error:
            error_type = meter_error
        if outcome is _OK and sse_body and not completed:
            outcome = _UPSTREAM_ABORTED
    # Priced even without a meter (see the twin).
    if prices is None:
        cost_micros = cost_basis = None
    else:
        cost_micros = _list_price_cost(prices, model, input_tokens, output_tokens, cache_write_5m, cache_write_1h,
                                       cache_read, cost_multiplier)
        if cost_micros is not None:
            cost_basis = None
        else:
            cost_micros, cost_basis = prices.cost(
                vendor, model, input_tokens, output_tokens, cache_write_5m, cache_write_1h, cache_read,
                forwarded=attempts > 0, multiplier=cost_multiplier,
            )
    # In UsageEvent's field order; new_event fills its slots in C.
    return new_event((
        ts,
        request_id,
        endpoint,
        status,
        outcome,
        total_ms,
        principal_field(principal, P_TOKEN_ID),
        principal_field(principal, P_USER),
        principal_field(principal, P_PROJECT),
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
    ))
