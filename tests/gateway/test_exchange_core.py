"""The Exchange's common path, both twins (hubcore.gateway.exchange_core):
the same request, sent on a pooled connection and answered in callbacks,
gives the same bytes to the client, the same phases, the same calls on the
key ring, pool, metrics, recorder and access log, and the same usage row.

Each twin runs with the connection cores it is built with (the compiled
Exchange core calls the compiled ones in C): a client connection and an
upstream connection on those cores, driven as test_conn.py and
test_upstream.py drive them, and fakes for the rest of the hub. The
Exchange's rare paths are a subclass's that records what it was asked."""
from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from hubcore.accounting.usage import Outcome
from hubcore.config import ServerConfig
from hubcore.gateway import _exchange_py, exchange_core
from hubcore.gateway._exchange_py import _MOVES, Phase
from hubcore.gateway.routes import route_for
from hubcore.governance.tokens import Principal
from hubcore.http import _conn_py, _upstream_py
from hubcore.http._conn_py import Phase as ConnPhase
from hubcore.http._upstream_py import ConnState
from tests.http.twins import NO_EXTENSIONS, Transport, check_compiled_loaded, check_no_extensions_selects_pure

REQUEST = (b"POST /v1/messages HTTP/1.1\r\nhost: hub\r\ncontent-type: application/json\r\n"
           b"user-agent: claude-cli/2.1\r\ncontent-length: 45\r\n\r\n"
           b"{\"model\": \"claude-opus-4-6\", \"stream\": true }")
EVENTS = [
    b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-opus-4-6\","
    b"\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\n",
    b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,"
    b"\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n",
    b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},"
    b"\"usage\":{\"output_tokens\":7}}\n\n",
    b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
]
SSE = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
       b"request-id: req_1\r\n\r\n"
       + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in EVENTS) + b"0\r\n\r\n")
JSON_BODY = (b"{\"type\":\"message\",\"model\":\"claude-opus-4-6\",\"stop_reason\":\"end_turn\","
             b"\"usage\":{\"input_tokens\":3,\"output_tokens\":4}}")
JSON = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(JSON_BODY)
        + JSON_BODY)
REFUSED = b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 3\r\ncontent-length: 2\r\n\r\n{}"

CONFIG = ServerConfig(max_header_bytes=4096, max_body_bytes=4096, max_body_bytes_in_flight=8192)


@dataclass
class Twins:
    exchange: ModuleType
    conn: ModuleType
    upstream: ModuleType


PURE = Twins(_exchange_py, _conn_py, _upstream_py)


def compiled() -> Twins:
    return Twins(*(importlib.import_module(name) for name in (
        "hubcore.gateway._exchange", "hubcore.http._conn", "hubcore.http._upstream")))


@pytest.fixture(scope="module", params=["c", "py"])
def twin(request: pytest.FixtureRequest) -> Twins:
    if request.param == "c":
        if NO_EXTENSIONS:
            pytest.skip("HUBCORE_NO_EXTENSIONS is set")
        return compiled()
    return PURE


def twins() -> list[Twins]:
    return [PURE] if NO_EXTENSIONS else [compiled(), PURE]


# -- the hub around an exchange ------------------------------------------------

class Calls:
    """Records every call made on it, by name."""

    def __init__(self, log: list[tuple[Any, ...]], name: str) -> None:
        self._log, self._name = log, name

    def __getattr__(self, method: str) -> Callable[..., None]:
        def call(*args: Any, **kwargs: Any) -> None:
            self._log.append((f"{self._name}.{method}", *args, *sorted(kwargs.items())))
        return call


class Loop:
    def __init__(self) -> None:
        self.now = 1000.0
        self.soon: list[Callable[[], None]] = []

    def time(self) -> float:
        return self.now

    def create_future(self) -> Any:
        from tests.http.test_upstream import Future
        return Future()

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.soon.append(callback)

    def run(self) -> None:
        while self.soon:
            self.soon.pop(0)()


class Lease:
    label = "k1"
    secret = "sk-1"


class Ring:
    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        self.log = log

    def acquire(self, session_id: str | None, model_class: str = "") -> Lease:
        self.log.append(("ring.acquire", session_id, model_class))
        return Lease()

    def observe(self, lease: Lease, index: dict[bytes, bytes]) -> None:
        self.log.append(("ring.observe", lease.label, sorted(index)))

    def release(self, lease: Lease, failure: Any) -> None:
        self.log.append(("ring.release", lease.label, failure))


class Recorder:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def record(self, event: Any) -> None:
        self.events.append(event)


class Access:
    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        self.log = log

    def record(self, event: Any, client: str | None = None) -> None:
        self.log.append(("access.record", event.request_id, client))


def hub(twins: Twins, log: list[tuple[Any, ...]]) -> Any:
    """A hub on the twin's core (the compiled Exchange core holds a HubCore
    and reads what it needs of it as C fields)."""

    class Hub(twins.exchange.HubCore):  # type: ignore[name-defined]
        def __init__(self) -> None:
            super().__init__(None)
            self.loop = Loop()
            self.metrics = Calls(log, "metrics")
            self.recorder = Recorder()
            self.access = Access(log)
            self.prices = None
            self.shared = None

        def request_id(self) -> str:
            return "hc_test0001"

    return Hub()


class Server:
    """What the client connection's core reads of server.Server."""

    def __init__(self, twin: ModuleType, app: Any) -> None:
        self.config = CONFIG
        self.loop = Loop()
        self.app = app
        self.body_budget = twin.BodyBudget(CONFIG.max_body_bytes_in_flight, self.loop)
        self.read_view = memoryview(bytearray(64 * 1024))
        self.tasks: set[Any] = set()
        self.draining = False
        self.gate = None


def client(twins: Twins, log: list[tuple[Any, ...]]) -> Any:
    """A client connection on the twin's core that holds the requests it reads."""

    class Client(twins.conn.ConnCore):  # type: ignore[name-defined]
        peer = "127.0.0.1"

        def __init__(self, server: Server) -> None:
            super().__init__(server)
            self.requests: list[Any] = []

        def close_gracefully(self) -> None:
            log.append(("client.close_gracefully",))

        def close(self) -> None:
            log.append(("client.close",))

        def run_task(self, coro: Coroutine[Any, Any, None]) -> None:
            coro.close()
            log.append(("client.run_task",))

        def pause_reading(self) -> None:
            self.reading_paused = True

        def resume_reading(self) -> None:
            self.reading_paused = False

    def app(request: Any, protocol: Any) -> None:
        protocol.requests.append(request)

    proto = Client(Server(twins.conn, app))
    proto.transport = Transport()
    proto.set_phase(ConnPhase.HEAD)
    return proto


def pool(twins: Twins) -> Any:
    """A pool on the twin's core with one idle connection on it."""

    class Pool(twins.upstream.PoolCore):  # type: ignore[name-defined]
        def forget(self, conn: Any) -> None:
            self.active.discard(conn)

    class Connection(twins.upstream.UpstreamCore):  # type: ignore[name-defined]
        closed = 0

        def close(self) -> None:
            self.closed += 1
            self.state = ConnState.CLOSED
            self.pool.forget(self)

        def resume_reading(self) -> None:
            self.reading_paused = False

        def pause_reading(self) -> None:
            self.reading_paused = True

    the_pool = Pool(Loop(), 4, 60.0, SimpleNamespace(start=lambda: None, handle=None))
    conn = Connection(the_pool)
    conn.transport = Transport()
    conn.state = ConnState.IDLE
    the_pool.idle.append(conn)
    return the_pool


def exchange_class(twins: Twins, log: list[tuple[Any, ...]]) -> type:
    class Exchange(twins.exchange.ExchangeCore):  # type: ignore[name-defined]
        """Stands in for exchange.Exchange's rare paths."""

        def ensure_task(self) -> None:
            log.append(("exchange.ensure_task", self.phase))
            self.in_callbacks = False

        def _scan_body(self) -> None:
            log.append(("exchange._scan_body",))
            self.scanned = True

        def _end_attempt(self, outcome: int | str) -> None:
            log.append(("exchange._end_attempt", outcome))

        def _mapped_body(self, config: Any) -> None:
            return None

        def _share_session_key(self, cfg: Any, label: str) -> None:
            log.append(("exchange._share_session_key", label))

    return Exchange


class Run:
    """One request through one twin, from its bytes to its usage row."""

    def __init__(self, twins: Twins) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.hub = hub(twins, self.log)
        self.client = client(twins, self.log)
        self.pool = pool(twins)
        self.conn = self.pool.idle[0]
        self.upstream = upstream = twins.exchange.UpstreamRuntimeCore()
        upstream.config = SimpleNamespace(
            name="vendor", kind="anthropic", scheme="https", host="api.vendor", port=443, base_path="",
            first_byte_timeout=30.0, stream_idle_timeout=60.0, model_map={}, cost_multiplier=1.0,
        )
        upstream.address(upstream.config)
        upstream.ring = Ring(self.log)
        upstream.pool = self.pool
        self.client.data_received(REQUEST)
        (request,) = self.client.requests
        self.exchange = exchange_class(twins, self.log)(self.hub, request, self.client)
        self.client.handler = self.exchange
        exchange = self.exchange
        exchange.route = route_for(b"/v1/messages")
        exchange.principal = Principal(7, "ada", "lab", "hc_ab")
        exchange.model = "claude-opus-4-6"
        exchange.upstream = self.upstream
        self.phases = [exchange.phase]

    def send(self) -> None:
        exchange = self.exchange
        exchange._enter(Phase.SENDING)
        exchange._first_attempt(self.upstream)
        self.phases.append(exchange.phase)

    def answer(self, response: bytes, cuts: list[int] = []) -> None:
        at = 0
        for cut in [*cuts, len(response)]:
            self.conn.data_received(response[at:cut])
            self.phases.append(self.exchange.phase)
            at = cut
        self.hub.loop.run()
        self.phases.append(self.exchange.phase)

    def summary(self) -> dict[str, Any]:
        exchange = self.exchange
        events = [
            {k: v for k, v in vars(e).items() if k not in ("ts", "total_ms", "ttfb_ms")} if hasattr(e, "__dict__")
            else {k: getattr(e, k) for k in e.__slots__ if k not in ("ts", "total_ms", "ttfb_ms")}
            for e in self.hub.recorder.events
        ]
        log = [entry if entry[0] != "metrics.request_finished" else entry[:4] for entry in self.log]
        return {
            "phases": self.phases,
            "written_upstream": self.conn.transport.written,
            "written_to_client": b"".join(self.client.transport.written),
            "log": log,
            "events": events,
            "state": (exchange.status, exchange.outcome, exchange.attempts, exchange.key_label, exchange.keep_alive,
                      exchange.chunked, exchange.sse_body, exchange.in_callbacks, exchange.lease is not None, exchange.conn is self.conn,
                      exchange.last_data, exchange.error_type, exchange.attempt_open),
            "pool": (len(self.pool.idle), len(self.pool.active), self.conn.state, self.conn.closed),
            "client": (self.client.busy, self.client.phase),
            "request_body": (exchange.request.parts, exchange.request.body_size),
        }

    def clock_readings(self) -> list[Any]:
        e = self.exchange
        return [e.t0, e.sent_at, e.head_at, e.ttfb, e.ended]


def run(twins: Twins, response: bytes, cuts: list[int] = []) -> Run:
    r = Run(twins)
    r.send()
    r.answer(response, cuts)
    return r


# -- tests ---------------------------------------------------------------------

def test_compiled_twin_loaded() -> None:
    check_compiled_loaded(exchange_core, [exchange_core.ExchangeCore], "hubcore.gateway._exchange",
                          "hubcore.gateway._exchange_py")


def test_no_extensions_selects_pure_twin() -> None:
    check_no_extensions_selects_pure("hubcore.gateway.exchange_core", "ExchangeCore", "hubcore.gateway._exchange_py")


def test_a_streamed_answer_goes_through_and_is_recorded(twin: Twins) -> None:
    r = run(twin, SSE, [len(SSE) - 40])
    e = r.exchange
    assert r.phases == [Phase.ADMITTING, Phase.AWAITING_HEAD, Phase.STREAMING, Phase.FINISHING, Phase.DONE]
    head, _, body = b"".join(r.client.transport.written).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"x-hubcore-request-id: hc_test0001" in head
    assert body.endswith(b"0\r\n\r\n") and b"message_stop" in body
    assert r.conn.transport.written[0].startswith(b"POST /v1/messages HTTP/1.1\r\n")
    (event,) = r.hub.recorder.events
    assert (event.status, event.outcome, event.model, event.input_tokens, event.output_tokens) == (
        200, Outcome.OK, "claude-opus-4-6", 12, 7)
    assert (event.route, event.user_agent, event.attempts) == ("vendor/k1:200", "claude-cli/2.1", 1)
    assert ("ring.release", "k1", None) in r.log and ("access.record", "hc_test0001", "127.0.0.1") in r.log
    assert [entry[0] for entry in r.log if entry[0].startswith("metrics")] == [
        "metrics.upstream_attempt", "metrics.request_finished"]
    # The upstream connection went back to the pool, the client's waits for the next request.
    assert list(r.pool.idle) == [r.conn] and e.conn is None and e.lease is None
    assert not r.client.busy and r.client.phase is ConnPhase.IDLE
    assert e.request.parts == []
    t0, sent_at, head_at, ttfb, ended = r.clock_readings()
    assert t0 <= sent_at <= head_at <= ttfb <= ended


def test_a_json_answer_goes_through_in_one_read(twin: Twins) -> None:
    r = run(twin, JSON)
    assert r.phases == [Phase.ADMITTING, Phase.AWAITING_HEAD, Phase.FINISHING, Phase.DONE]
    assert b"".join(r.client.transport.written).endswith(b"\r\n\r\n" + JSON_BODY)
    (event,) = r.hub.recorder.events
    assert (event.input_tokens, event.output_tokens, event.stop_reason) == (3, 4, "end_turn")


def test_a_retryable_head_hands_the_request_to_its_task(twin: Twins) -> None:
    r = run(twin, REFUSED)
    e = r.exchange
    assert r.phases[-1] is Phase.AWAITING_HEAD and ("exchange.ensure_task", Phase.AWAITING_HEAD) in r.log
    assert ("metrics.upstream_answered", "vendor", 429) in r.log
    assert e.head is None and e.head_failure is not None and r.client.transport.written == []


@pytest.mark.parametrize("response", [SSE, JSON, REFUSED], ids=["sse", "json", "refused"])
def test_both_twins_agree(response: bytes) -> None:
    cut = [len(response) // 2]
    summaries = [run(twins_, response, cut).summary() for twins_ in twins()]
    assert all(s == summaries[0] for s in summaries[1:])


def test_the_client_leaving_mid_stream_is_recorded_as_such(twin: Twins) -> None:
    r = Run(twin)
    r.send()
    r.conn.data_received(SSE[:len(SSE) // 2])
    r.exchange.gone = True
    r.conn.data_received(SSE[len(SSE) // 2:])
    r.hub.loop.run()
    (event,) = r.hub.recorder.events
    assert event.outcome is Outcome.CLIENT_ABORTED and r.exchange.phase is Phase.DONE


@pytest.mark.parametrize(("old", "new"), list(itertools.product(Phase, Phase)), ids=lambda p: p.name)
def test_each_twin_makes_exactly_the_moves_of_the_table(twin: Twins, old: Phase, new: Phase) -> None:
    cls = exchange_class(twin, [])
    exchange = cls.__new__(cls)
    exchange.request_id = "hc_test"
    exchange.phase = old
    if new in _MOVES[old]:
        exchange._enter(new)
        assert exchange.phase is new
    else:
        with pytest.raises(RuntimeError, match=f"hc_test: no move from {old.name} to {new.name}"):
            exchange._enter(new)
        assert exchange.phase is old


def test_a_new_exchange_reads_as_the_twin_class_defaults(twin: Twins) -> None:
    cls = exchange_class(twin, [])
    exchange = cls.__new__(cls)
    assert exchange.phase is Phase.ADMITTING
    assert (exchange.ttfb, exchange.sent_at, exchange.head_at, exchange.ended) == (None, None, None, None)
    assert (exchange.outcome, exchange.keep_alive, exchange.attempts, exchange.status, exchange.last_data) == (
        Outcome.OK, True, 0, 0, b"")
    exchange.ttfb = 5.0
    assert exchange.ttfb == 5.0
    exchange.ttfb = None
    assert exchange.ttfb is None


def test_an_upstreams_head_lines_are_made_once_and_kept(twin: Twins) -> None:
    """What each attempt reads of its upstream (UpstreamRuntimeCore): the
    host line (its port only when not the scheme's), the base path, and the
    auth line of each key, made at its first use and the same bytes after,
    as the vendor's kind spells it; at most AUTH_LINES_MAX of them kept."""
    upstream = twin.exchange.UpstreamRuntimeCore()
    config = SimpleNamespace(kind="anthropic", scheme="https", host="api.vendor", port=443, base_path="/v9")
    upstream.address(config)
    assert (upstream.host_header, upstream.base_path) == (b"host: api.vendor\r\n", b"/v9")
    line = upstream.auth_header("sk-one")
    assert line == b"x-api-key: sk-one\r\n" and upstream.auth_header("sk-one") is line
    upstream.address(SimpleNamespace(kind="openai", scheme="http", host="10.0.0.2", port=8080, base_path=""))
    assert (upstream.host_header, upstream.base_path) == (b"host: 10.0.0.2:8080\r\n", b"")
    assert upstream.auth_header("sk-one") == b"authorization: Bearer sk-one\r\n"
    for i in range(twin.exchange.AUTH_LINES_MAX + 5):
        assert upstream.auth_header(f"sk-{i}") == b"authorization: Bearer sk-%d\r\n" % i
    assert len(upstream._auth_lines) <= twin.exchange.AUTH_LINES_MAX


def test_the_hubs_upstreams_are_the_loaded_core() -> None:
    """The Exchange's core reads the hub's upstreams through their core: the
    compiled one when built (its fields are C fields, its auth line a C call)."""
    from hubcore.gateway.upstreams import UpstreamRuntime

    assert issubclass(UpstreamRuntime, exchange_core.UpstreamRuntimeCore)
    assert exchange_core.UpstreamRuntimeCore.__module__ == (
        "hubcore.gateway._exchange_py" if NO_EXTENSIONS else "hubcore.gateway._exchange")
