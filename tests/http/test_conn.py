"""A client connection's common request path, both twins (hubcore.http.conn):
the same bytes, whole or split anywhere, give the same requests, the same
refusals with the same statuses, and the same phases and deadlines.

Each twin's core is driven through a subclass that stands in for
server.HttpProtocol's rare paths and records what they were asked."""
from __future__ import annotations

import dataclasses
from collections.abc import Coroutine
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from hubcore.config import ServerConfig
from hubcore.http import _conn_py, conn
from hubcore.http._conn_py import CONTINUE_100, Phase
from tests.http.twins import (
    Transport, both, check_compiled_loaded, check_no_extensions_selects_pure, feed, twin_of,
)

START = 1000.0
READ_BUFFER_BYTES = 64 * 1024
CONFIG = ServerConfig(
    max_header_bytes=1024, max_body_bytes=4096, max_body_bytes_in_flight=8192,
    header_timeout=5.0, body_timeout=7.0, keepalive_timeout=11.0,
)

GET = b"GET /v1/models?limit=2 HTTP/1.1\r\nHost: hub\r\nX-Api-Key: K\r\n\r\n"
POST = (b"POST /v1/messages HTTP/1.1\r\nhost: hub\r\ncontent-type: application/json\r\n"
        b"content-length: 26\r\n\r\n{\"model\": \"m\", \"x\": [1,2]}")
CHUNKED = (b"POST /v1/messages HTTP/1.1\r\nhost: hub\r\ntransfer-encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
CLOSE_10 = b"GET / HTTP/1.0\r\n\r\n"
EXPECT = b"POST /v1/messages HTTP/1.1\r\nhost: hub\r\nexpect: 100-continue\r\ncontent-length: 3\r\n\r\n"
# Refused by the gate (see Server.gate below): a path under /refused.
REFUSED_SMALL = b"POST /refused HTTP/1.1\r\nhost: hub\r\ncontent-length: 4\r\n\r\nbody" + GET
REFUSED_CHUNKED = b"POST /refused HTTP/1.1\r\nhost: hub\r\ntransfer-encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n"

REJECTED = {
    "head too large": (b"GET / HTTP/1.1\r\nhost: hub\r\nx-big: " + b"a" * 1100 + b"\r\n\r\n", 431),
    "head never ends": (b"GET / HTTP/1.1\r\nhost: hub\r\nx-big: " + b"a" * 1100, 431),
    "connect": (b"CONNECT hub:443 HTTP/1.1\r\nhost: hub:443\r\n\r\n", 405),
    "no host": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "two hosts": (b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n", 400),
    "expectation": (b"POST / HTTP/1.1\r\nhost: hub\r\nexpect: magic\r\ncontent-length: 1\r\n\r\nx", 417),
    "transfer coding": (b"POST / HTTP/1.1\r\nhost: hub\r\ntransfer-encoding: gzip, chunked\r\n\r\n", 400),
    "upgrade": (b"GET / HTTP/1.1\r\nhost: hub\r\nupgrade: websocket\r\n\r\n", 400),
    "body by length": (b"POST / HTTP/1.1\r\nhost: hub\r\ncontent-length: 5000\r\n\r\n", 413),
    "body chunked": (b"POST / HTTP/1.1\r\nhost: hub\r\ntransfer-encoding: chunked\r\n\r\n"
                     + (b"800\r\n" + b"x" * 2048 + b"\r\n") * 3, 413),
    "malformed": (b"GET / HTTP/1.1\r\nhost hub\r\n\r\n", 400),
    "trailers too large": (b"POST / HTTP/1.1\r\nhost: hub\r\ntransfer-encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n"
                           b"x-trailer: " + b"t" * 1100 + b"\r\n\r\n", 431),
}


@pytest.fixture(scope="module", params=["c", "py"])
def twin(request: pytest.FixtureRequest) -> ModuleType:
    return twin_of(request.param, "hubcore.http._conn", _conn_py)


def twins() -> list[ModuleType]:
    return both("hubcore.http._conn", _conn_py)


class Loop:
    def __init__(self) -> None:
        self.now = START

    def time(self) -> float:
        return self.now


class Server:
    """What the core reads of server.Server."""

    def __init__(self, twin: ModuleType, app: Any, config: ServerConfig = CONFIG) -> None:
        self.config = config
        self.loop = Loop()
        self.app = app
        self.body_budget = twin.BodyBudget(config.max_body_bytes_in_flight, self.loop)
        self.read_view = memoryview(bytearray(READ_BUFFER_BYTES))
        self.tasks: set[Any] = set()
        self.draining = False

    @staticmethod
    def gate(protocol: Any, method: bytes, target: bytes, head: Any) -> Any:
        return PermissionError("refused") if target.startswith(b"/refused") else ("ok", method, target)


def connection(twin: ModuleType, answer: bool = False, config: ServerConfig = CONFIG) -> Any:
    """A connection on `twin`'s core; `answer`: each request is answered at once."""

    class Recorder(twin.ConnCore):
        def __init__(self, server: Server) -> None:
            super().__init__(server)
            self.requests: list[Any] = []
            self.rejects: list[int] = []
            self.reasons: list[str] = []
            self.lingered = 0
            self.closed_gracefully = False

        def _reject(self, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
            # As HttpProtocol's does, short of answering.
            self.deadline = 0.0
            self.parsing_stopped = True
            self.rejects.append(status)
            self.reasons.append(message)

        def _linger_drop(self, size: int) -> None:
            self.lingered += size

        def close(self) -> None:
            self.closing = True

        def close_gracefully(self) -> None:
            self.closed_gracefully = True

        def run_task(self, coro: Coroutine[Any, Any, None]) -> None:
            raise AssertionError("the App of these tests answers in callbacks")

        def pause_reading(self) -> None:
            self.reading_paused = True

        def resume_reading(self) -> None:
            self.reading_paused = False

    def app(request: Any, protocol: Any) -> None:
        protocol.requests.append(request)
        if answer:
            protocol.request_done()

    proto = Recorder(Server(twin, app, config))
    proto.transport = Transport()
    proto.set_phase(Phase.HEAD)
    return proto


def read(proto: Any, data: bytes, cuts: list[int] = []) -> None:
    """`data` as the transport hands it over: each read into the buffer
    get_buffer lends, no more than it holds, then buffer_updated; a read
    also ends at each of `cuts`."""
    at = 0
    for cut in [*sorted(cuts), len(data)]:
        while at < cut:
            with memoryview(proto.get_buffer(-1)) as buffer:
                size = min(len(buffer), cut - at)
                buffer[:size] = data[at:at + size]
            proto.buffer_updated(size)
            at += size


def summary(proto: Any) -> dict[str, Any]:
    """What both twins must agree on, after a stream."""
    return {
        "requests": [
            (r.method, r.target, r.path, r.headers, r.index, r.control, r.body, r.body_size, r.keep_alive,
             r.http_version, r.context if not isinstance(r.context, BaseException) else repr(r.context))
            for r in proto.requests
        ],
        "rejects": proto.rejects,
        "reasons": proto.reasons,
        "phase": proto.phase,
        "message_phase": proto.message_phase,
        "deadline": proto.deadline,
        "busy": proto.busy,
        "parsing_stopped": proto.parsing_stopped,
        "in_flight": proto.budget.in_flight,
        "written": proto.transport.written,
        "lingered": proto.lingered,
    }


def test_compiled_twin_loaded() -> None:
    check_compiled_loaded(conn, [conn.ConnCore, conn.Request, conn.BodyBudget], "hubcore.http._conn", "hubcore.http._conn_py")


def test_no_extensions_selects_pure_twin() -> None:
    check_no_extensions_selects_pure("hubcore.http.conn", "ConnCore", "hubcore.http._conn_py")


def test_a_request_is_handed_over_and_the_connection_waits_for_the_next(twin: ModuleType) -> None:
    proto = connection(twin)
    assert proto.phase is Phase.HEAD and proto.deadline == START + 5.0
    feed(proto, GET)
    (request,) = proto.requests
    assert (request.method, request.target, request.path) == (b"GET", b"/v1/models?limit=2", b"/v1/models")
    assert request.headers == [(b"host", b"hub"), (b"x-api-key", b"K")]
    assert request.header(b"x-api-key") == b"K" and request.header(b"cookie") is None
    assert request.control is None and request.keep_alive and request.http_version == "1.1"
    assert request.context == ("ok", b"GET", b"/v1/models?limit=2")
    assert (request.body, request.parts, request.body_size) == (b"", [], 0)
    assert proto.phase is Phase.BUSY and proto.busy and proto.current is request and proto.deadline == 0.0
    proto.loop.now = START + 3
    proto.request_done()
    assert proto.phase is Phase.IDLE and not proto.busy and proto.current is None
    assert proto.deadline == START + 3 + 11.0 and proto.last_activity == START + 3


def test_a_body_is_kept_as_read_and_its_budget_released_when_done(twin: ModuleType) -> None:
    proto = connection(twin)
    head, body = POST.split(b"\r\n\r\n")
    feed(proto, head + b"\r\n\r\n")
    assert proto.phase is Phase.BODY and proto.deadline == START + 7.0 and proto.budget.in_flight == 26
    feed(proto, body[:10])
    feed(proto, body[10:])
    (request,) = proto.requests
    assert request.parts == [body[:10], body[10:]] and request.body_size == 26
    assert request.body == body and request.parts == [body]
    assert proto.budget.in_flight == 26
    proto.request_done()
    assert proto.budget.in_flight == 0 and request.parts == [] and request.body == b""


def test_a_chunked_body_is_reserved_as_it_comes(twin: ModuleType) -> None:
    proto = connection(twin)
    second = CHUNKED.index(b"6\r\n")
    feed(proto, CHUNKED[:second])
    assert proto.budget.in_flight == 5 and proto.chunked
    feed(proto, CHUNKED[second:])
    (request,) = proto.requests
    assert request.body == b"hello world" and request.control == [(b"transfer-encoding", b"chunked")]
    assert proto.budget.in_flight == 11
    proto.request_done()
    assert proto.budget.in_flight == 0


# Bodies longer than the read buffer of these tests' Server (64 KB).
LONG = dataclasses.replace(CONFIG, max_body_bytes=512 * 1024, max_body_bytes_in_flight=1024 * 1024)


def long_post(size: int) -> tuple[bytes, bytes]:
    body = b"".join(b"%07d," % i for i in range(size // 8 + 1))[:size]
    return b"POST /v1/messages HTTP/1.1\r\nhost: hub\r\ncontent-length: %d\r\n\r\n" % size, body


@settings(max_examples=120, deadline=None)
@given(st.integers(min_value=1, max_value=200_000), st.lists(st.integers(min_value=0, max_value=210_000), max_size=5),
       st.sampled_from([b"", GET, POST, CHUNKED]))
def test_a_body_of_announced_length_arrives_whole_however_the_reads_fall(size: int, cuts: list[int], then: bytes) -> None:
    head, body = long_post(size)
    data = head + body + then
    results = []
    for twin in twins():
        proto = connection(twin, config=LONG)
        read(proto, data, [c for c in cuts if c < len(data)])
        first = proto.requests[0]
        assert first.body_size == size and b"".join(first.parts) == body
        # A long body is one bytes object, whichever twin read it.
        assert len(first.parts) == 1 or size < _conn_py.BODY_WHOLE_BYTES
        proto.request_done()
        results.append(summary(proto))
    assert all(result == results[0] for result in results)
    assert len(results[0]["requests"]) == (2 if then else 1)
    assert results[0]["in_flight"] == (len(POST.partition(b"\r\n\r\n")[2]) if then is POST else 11 if then is CHUNKED else 0)


def test_a_long_body_is_read_where_it_is_kept(twin: ModuleType) -> None:
    """What of a long body its head's read did not bring, the compiled core
    reads into the bytes object it keeps the body in: get_buffer lends that
    object's missing part rather than the read buffer. The twin reads into
    the read buffer; both keep the body as one object."""
    proto = connection(twin, config=LONG)
    head, body = long_post(100_000)
    lent: list[int] = []

    def read_lent(data: bytes) -> None:
        at = 0
        while at < len(data):
            with memoryview(proto.get_buffer(-1)) as buffer:
                lent.append(len(buffer))
                size = min(len(buffer), len(data) - at)
                buffer[:size] = data[at:at + size]
            proto.buffer_updated(size)
            at += size

    read_lent(head + body)
    (first,) = proto.requests
    assert first.parts == [body] and type(first.parts[0]) is bytes and first.body == body
    proto.request_done()
    read_lent(GET + head + body[:90_000])
    second = proto.requests[1]
    assert (second.method, second.target) == (b"GET", b"/v1/models?limit=2")
    buffer = READ_BUFFER_BYTES
    if twin is _conn_py:
        assert set(lent) == {buffer}
    else:
        # The core's own C fields, not its subclass's instance dict (where
        # an undeclared field would land, looked up on every read).
        assert not {"_whole", "_whole_size", "_whole_fill"} & set(vars(proto))
        # The head and the body's start | the rest of the body, in place |
        # the GET, the next head and its body's start | the rest, in place.
        assert lent == [buffer, 100_000 - (buffer - len(head)), buffer, 100_000 - (buffer - len(GET) - len(head))]
    # A refusal ends the lending: the rest is read to be dropped.
    proto._reject(408, "the body took too long")
    assert len(proto.get_buffer(-1)) == buffer


def test_a_key_is_never_kept_past_its_request(twin: ModuleType) -> None:
    """The compiled header collector hands the next head the pairs it made
    for the last (see _wire.pyx), but never a credential's: the same
    request twice shares its plain header and not its key."""
    head = b"GET /v1/models HTTP/1.1\r\nhost: hub\r\nx-api-key: K\r\nauthorization: Bearer K\r\naccept: */*\r\n\r\n"
    proto = connection(twin)
    feed(proto, head)
    proto.request_done()
    feed(proto, head)
    first, second = proto.requests
    assert first.headers == second.headers == [
        (b"host", b"hub"), (b"x-api-key", b"K"), (b"authorization", b"Bearer K"), (b"accept", b"*/*")]
    shared = {a[0] for a, b in zip(first.headers, second.headers) if a is b}
    assert shared == (set() if twin is _conn_py else {b"accept"})


def test_the_request_after_a_long_body_in_the_same_read_is_parsed(twin: ModuleType) -> None:
    proto = connection(twin, answer=True, config=LONG)
    head, body = long_post(40_000)
    read(proto, head + body + GET)
    first, second = proto.requests
    assert first.body_size == 40_000 and (second.method, second.target) == (b"GET", b"/v1/models?limit=2")
    assert second.headers == [(b"host", b"hub"), (b"x-api-key", b"K")]
    assert proto.rejects == [] and proto.budget.in_flight == 0


def test_the_rest_of_a_long_body_cut_short_by_a_refusal_is_dropped(twin: ModuleType) -> None:
    proto = connection(twin, config=LONG)
    head, body = long_post(100_000)
    read(proto, head + body[:20_000])
    proto._reject(408, "the body took too long")  # as the sweeper's timeout does
    read(proto, body[20_000:])
    assert proto.requests == [] and proto.rejects == [408]
    assert proto.lingered == 80_000  # dropped, not kept


def test_a_long_body_refused_at_its_head_is_not_kept(twin: ModuleType) -> None:
    proto = connection(twin, answer=True, config=LONG)
    head, body = long_post(100_000)
    read(proto, head.replace(b"/v1/messages", b"/refused") + body)
    (request,) = proto.requests
    assert isinstance(request.context, PermissionError) and request.parts == [] and proto.budget.in_flight == 0


def test_many_small_pieces_are_joined_at_once(twin: ModuleType) -> None:
    proto = connection(twin)
    chunks = b"".join(b"1\r\n%c\r\n" % c for c in b"abcdefghijklmnopqrst")
    feed(proto, b"POST / HTTP/1.1\r\nhost: hub\r\ntransfer-encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")
    (request,) = proto.requests
    assert request.parts == [b"abcdefghijklmnopqrst"] and request.body_size == 20


def test_http_10_is_not_kept_alive(twin: ModuleType) -> None:
    proto = connection(twin)
    feed(proto, CLOSE_10)
    (request,) = proto.requests
    assert not request.keep_alive and request.http_version == "1.0" and request.path == b"/"


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_refusals_and_their_statuses(twin: ModuleType, name: str) -> None:
    data, status = REJECTED[name]
    proto = connection(twin)
    feed(proto, data)
    assert proto.rejects == [status] and proto.requests == [] and proto.parsing_stopped
    assert proto.budget.in_flight == proto.reserved  # released by HttpProtocol._reject, not stood in for here
    feed(proto, GET)
    assert proto.lingered == len(GET) and proto.requests == []


def test_a_full_body_budget_is_a_503(twin: ModuleType) -> None:
    proto = connection(twin)
    assert proto.budget.reserve(8192 - 10)
    feed(proto, POST)
    assert proto.rejects == [503]
    proto.budget.release(8192 - 10)


def test_a_refused_head_with_a_small_body_has_it_read_and_dropped(twin: ModuleType) -> None:
    proto = connection(twin, answer=True)
    feed(proto, REFUSED_SMALL)
    refused, following = proto.requests
    assert isinstance(refused.context, PermissionError) and refused.body == b"" and refused.keep_alive
    assert following.path == b"/v1/models" and not proto.parsing_stopped
    assert proto.budget.in_flight == 0


def test_a_refused_chunked_head_stops_parsing(twin: ModuleType) -> None:
    proto = connection(twin)
    feed(proto, REFUSED_CHUNKED)
    (refused,) = proto.requests
    assert isinstance(refused.context, PermissionError) and not refused.keep_alive and refused.body == b""
    assert proto.parsing_stopped and proto.message_phase is Phase.IDLE and proto.head_bytes == 0
    assert proto.lingered == 0
    feed(proto, GET)
    assert proto.lingered == len(GET)


def test_pipelined_requests_wait_their_turn_with_reading_paused(twin: ModuleType) -> None:
    proto = connection(twin)
    feed(proto, GET + POST + CLOSE_10)
    assert len(proto.requests) == 1 and len(proto.pipeline) == 2 and proto.reading_paused
    proto.request_done()
    assert [r.method for r in proto.requests] == [b"GET", b"POST"] and proto.requests[1].body_size == 26
    proto.request_done()
    assert len(proto.requests) == 3 and not proto.pipeline
    proto.request_done()
    assert not proto.reading_paused and proto.phase is Phase.IDLE and proto.budget.in_flight == 0


def test_expect_100_is_answered_before_the_body_or_after_the_running_answer(twin: ModuleType) -> None:
    proto = connection(twin)
    feed(proto, EXPECT)
    assert proto.transport.written == [CONTINUE_100]
    feed(proto, b"abc")
    assert proto.requests[0].body == b"abc"
    # Pipelined behind a running request: owed, and written once it is done.
    feed(proto, EXPECT)
    assert proto.transport.written == [CONTINUE_100] and proto.continue_due
    assert proto.message_phase is Phase.BODY and proto.phase is Phase.BUSY
    proto.request_done()
    assert proto.transport.written == [CONTINUE_100, CONTINUE_100] and proto.phase is Phase.BODY


def test_a_finished_answer_closes_unless_kept_alive(twin: ModuleType) -> None:
    proto = connection(twin)
    proto.writelines([b"a", b"b"])
    proto.finish(True)
    assert not proto.closed_gracefully and proto.transport.written == [b"a", b"b"]
    proto.finish(False)
    assert proto.closed_gracefully
    proto.transport.closing = True
    proto.writelines([b"c"])
    assert proto.transport.written == [b"a", b"b"]


def test_a_draining_server_closes_the_connection_after_its_answer(twin: ModuleType) -> None:
    proto = connection(twin)
    feed(proto, GET)
    proto.server.draining = True
    proto.request_done()
    assert proto.closing and proto.phase is Phase.BUSY


def test_the_body_budget_gives_memory_back_after_enough_was_freed(twin: ModuleType) -> None:
    calls: list[tuple[float, Any]] = []

    class TimerLoop(Loop):
        def call_later(self, delay: float, callback: Any) -> Any:
            calls.append((delay, callback))
            return object()

    budget = twin.BodyBudget(100 * 1024 * 1024, TimerLoop())
    assert budget.reserve(64 * 1024 * 1024) and not budget.reserve(64 * 1024 * 1024)
    budget.release(64 * 1024 * 1024)
    assert budget.in_flight == 0
    if _conn_py.malloc_trim is None:
        assert calls == []
        return
    ((delay, callback),) = calls
    assert delay == 0.0
    callback()
    assert budget.freed_since_trim == 0 and budget.trim_handle is None and budget.last_trim == START


# The request line's version: 1.0 after 1.1 in one read, empty lines before
# a request line, a version llhttp refuses (the Python twin reads it from
# the read a message starts with, else asks the parser; the compiled core
# reads llhttp's fields).
VERSIONS = [GET + CLOSE_10, CLOSE_10 + GET, b"\r\n" + CLOSE_10, b"\r\n\r\n" + GET + b"\r\n" + CLOSE_10,
            b"GET / HTTP/1.2\r\nhost: hub\r\n\r\n", b"GET / HTTP/2.0\r\nhost: hub\r\n\r\n",
            b"GET / HTTP/1.1 \r\nhost: hub\r\n\r\n", b"GET /a HTTP/1.0\nhost: hub\n\n"]
# What a callback refuses or llhttp does, each with its reason: the compiled
# core runs llhttp without httptools and must say what the twin says.
MALFORMED = [
    b"POST / HTTP/1.1\r\nhost: hub\r\ncontent_length: 5\r\nx-a: b\r\n\r\n",  # refused by the collector mid-head
    b"POST / HTTP/1.1\r\nhost: hub\r\ncontent_length: 5\r\n\r\n",  # ... at the head's end
    b"POST / HTTP/1.1\r\nhost: hub\r\ncontent-length: 5x\r\n\r\n",
    b"POST / HTTP/1.1\r\nhost: hub\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nx",
    b"POST / HTTP/1.1\r\nhost: hub\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    b"GET / HTTP/1.1\r\nhost: hub\r\nx-folded: a\r\n b\r\n\r\n",
    b"BREW / HTTP/1.1\r\nhost: hub\r\n\r\n",
    b"GET /\x01 HTTP/1.1\r\nhost: hub\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: hub\r\nconnection: upgrade\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: hub\r\nconnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n",  # bytes after close
    b"OPTIONS * HTTP/1.1\r\nhost: hub\r\n\r\n",
    b"DELETE /v1/x HTTP/1.1\r\nHOST: hub\r\nX-Mixed-Case: V\r\n\r\n",
]
# A chunked body with trailers, one of them the last line before the end.
TRAILERS = (b"POST /v1/messages HTTP/1.1\r\nhost: hub\r\ntransfer-encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\nx-sum: 1\r\nx-last: 2\r\n\r\n" + GET)
STREAMS = [GET, POST, CHUNKED, TRAILERS, CLOSE_10, GET + POST + GET, REFUSED_SMALL, REFUSED_CHUNKED, *VERSIONS,
           *MALFORMED, *(data for data, _ in REJECTED.values())]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(STREAMS), st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
       st.booleans())
def test_the_twins_agree_on_any_stream_split_anywhere(data: bytes, cuts: list[int], answer: bool) -> None:
    results = []
    for twin in twins():
        proto = connection(twin, answer=answer)
        feed(proto, data, [c for c in cuts if c < len(data)])
        results.append(summary(proto))
        # As the transport reads, into the server's read buffer.
        proto = connection(twin, answer=answer)
        read(proto, data, [c for c in cuts if c < len(data)])
        results.append(summary(proto))
    assert all(result == results[0] for result in results)
    # And one piece or many, the same requests.
    whole = connection(twins()[0], answer=answer)
    feed(whole, data)
    assert summary(whole)["requests"] == results[0]["requests"]


LINES = {
    b"GET / HTTP/1.1\r\nhost: hub\r\n\r\n": "1.1",
    b"POST /v1/messages?beta=true HTTP/1.0\r\n": "1.0",
    b"GET / HTTP/1.1\r\n": "1.1",
    b"GET / HTTP/1.1": None,           # not ended yet
    b"GET / HTTP/1.1\n": None,        # a bare LF: the parser's to judge
    b"\r\nGET / HTTP/1.1\r\n": None,  # an empty line first
    b"GET / HTTP/1.2\r\n": None,
    b"GET / HTTP/2.0\r\n": None,
    b"GET / http/1.1\r\n": None,
    b"GET / HTTP/1.1 \r\n": None,
    b"HTTP/1.1\r\n": None,           # too short to have a method and a target
    b" HTTP/1.1\r\n": "1.1",         # the parser refuses it: its version is never read
    b"": None,
    b"x" * 9000 + b" HTTP/1.1\r\n": None,  # the line is looked for in the first 8 KiB only
}


@pytest.mark.parametrize("data", sorted(LINES))
def test_line_version(data: bytes) -> None:
    assert _conn_py.line_version(data) == LINES[data]
    assert _conn_py.line_version(memoryview(bytearray(data))) == LINES[data]


class CountingParser:
    """The connection's parser, counting the version reads asked of it."""

    def __init__(self, parser: Any) -> None:
        self.parser = parser
        self.asked = 0

    def feed_data(self, data: Any) -> None:
        self.parser.feed_data(data)

    def get_method(self) -> bytes:
        return bytes(self.parser.get_method())

    def get_http_version(self) -> str:
        self.asked += 1
        return str(self.parser.get_http_version())

    def should_keep_alive(self) -> bool:
        return bool(self.parser.should_keep_alive())


@pytest.mark.parametrize("data, cuts, reason", [
    (MALFORMED[0], [], "header name b'content_length' may be read as a framing header"),
    (MALFORMED[1], [], "header name b'content_length' may be read as a framing header"),
    (MALFORMED[1], [30, 41], "header name b'content_length' may be read as a framing header"),  # the name in pieces
    (MALFORMED[2], [], "Invalid character in Content-Length"),
    (MALFORMED[6], [], "Invalid method encountered"),
    (MALFORMED[9], [], "Data after `Connection: close`"),
])
def test_a_malformed_request_is_refused_saying_why(twin: ModuleType, data: bytes, cuts: list[int], reason: str) -> None:
    proto = connection(twin, answer=True)
    read(proto, data, cuts)
    assert proto.rejects == [400]
    assert proto.reasons == [f"malformed HTTP request: {reason}"]


@pytest.mark.parametrize("data, cuts, asked, versions", [
    (GET, [], 0, ["1.1"]),                            # the line whole in the read the message starts with
    (GET, [5], 1, ["1.1"]),                           # the line cut: the parser is asked
    (GET, [len(GET) - 3], 0, ["1.1"]),                # the head cut after the line
    (CLOSE_10, [], 0, ["1.0"]),
    (GET + CLOSE_10, [], 1, ["1.1", "1.0"]),          # the second message starts inside a read
    (GET + CLOSE_10, [len(GET)], 0, ["1.1", "1.0"]),  # each message starts a read
    (CLOSE_10 + GET, [], 0, ["1.0"]),                 # 1.0 is not kept alive: the GET is not parsed
    (b"\r\n" + CLOSE_10, [], 1, ["1.0"]),             # an empty line before the request line
])
def test_the_parser_is_asked_the_version_only_when_the_read_does_not_say(
        twin: ModuleType, data: bytes, cuts: list[int], asked: int, versions: list[str]) -> None:
    proto = connection(twin, answer=True)
    if twin is _conn_py:
        parser = proto.parser = CountingParser(proto.parser)
    else:
        # The compiled core has no parser object to ask: it reads llhttp's fields.
        assert proto.parser is None
    feed(proto, data, cuts)
    assert [r.http_version for r in proto.requests] == versions
    if twin is _conn_py:
        assert parser.asked == asked
