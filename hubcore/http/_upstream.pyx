# cython: language_level=3
"""An upstream connection's common response path, compiled: the twin of
`_upstream_py.py` (see there for the contract; tests/http/test_upstream.py
holds both to it).

The same methods in the same order, on typed fields. Where the twin hands
its reads to httptools, this core runs llhttp itself, as a ParsingCore
(hubcore/http/_parsing.pyx), as the client connection's core does: llhttp's
callbacks call this core's `_headers_complete`, `_body` and
`_message_complete` in C, and the status comes from the parser's fields.
`data_received`, `on_message_complete` and what the Exchange calls stay
Python-callable, while what they call among themselves (`_deliver`,
building the ResponseHead, the pool's `_put_idle`, the header collector's
`reset`) are C calls. The rare paths are the subclass's
(client.UpstreamConnection), called as Python methods."""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.list cimport PyList_Clear

import time
from collections import deque

from hubcore.http._llhttp cimport HPE_OK, HTTP_RESPONSE, llhttp_errno_t
from hubcore.http._parsing cimport ParsingCore
from hubcore.http._wire cimport HeaderCollector, HeaderList

# What is not hot is the Python twin's, shared.
from hubcore.http._upstream_py import ConnState, UpstreamError

# The states as C globals: `state is _IDLE` is a pointer comparison.
cdef object _CONNECTING = ConnState.CONNECTING
cdef object _IDLE = ConnState.IDLE
cdef object _SENDING = ConnState.SENDING
cdef object _RECEIVING = ConnState.RECEIVING
cdef object _DONE = ConnState.DONE
cdef object _CLOSED = ConnState.CLOSED

cdef object _monotonic = time.monotonic


cdef class ResponseHead(HeaderList):
    """See _upstream_py.ResponseHead."""
    # Its fields are declared in _upstream.pxd, as are UpstreamCore's and
    # PoolCore's, where the Exchange's core reads them.

    def __init__(self, int status, HeaderCollector head, bint keep_alive):
        self._fill(status, head, keep_alive)

    cdef _fill(self, int status, HeaderCollector head, bint keep_alive):
        self.status = status
        self.headers = head.headers  # names lower-cased, in order
        self._index = None
        self.keep_alive = keep_alive
        self.content_length = head.content_length if head.content_length >= 0 else None
        self.chunked = False
        if head.control is not None:
            for name, value in head.control:
                if name == b"transfer-encoding":
                    self.chunked = b"chunked" in value.lower()


cdef ResponseHead _new_head(int status, HeaderCollector head, bint keep_alive):
    # ResponseHead(...) from C would pack a tuple and parse it in __init__.
    cdef ResponseHead response = ResponseHead.__new__(ResponseHead)
    response._fill(status, head, keep_alive)
    return response


cdef class UpstreamCore(ParsingCore):
    """See _upstream_py.UpstreamCore."""

    def __init__(self, PoolCore pool):
        # per-connection
        self.pool = pool
        self.loop = pool.loop
        self.transport = None
        # Body chunks go into a list, emptied after each delivery (as the
        # twin's, whose httptools binds its append once).
        self.body_parts = []
        # The twin's httptools parser; this core parses with `_http`.
        self.parser = None
        self._start_parser(HTTP_RESPONSE)
        self.state = _CONNECTING
        self.reused = False
        self.reading_paused = False
        self._time = self.loop.time
        # per-request
        self.head_future = None  # made only when asked (head_waiter)
        self.on_head = None
        self.on_fail = None
        self.head = None
        self.head_at = 0.0
        self.sink = None
        self.held = []
        self.complete = False
        self.failure = None
        self.deadline = 0.0
        self.last_activity = 0.0
        self.first_byte_timeout = 0.0
        self.idle_timeout = 0.0

    # -- reading -----------------------------------------------------------
    def data_received(self, data):
        cdef Py_buffer view
        cdef llhttp_errno_t err
        self.last_activity = self._time()
        if self.state is _IDLE:
            # A pooled connection must be silent; bytes now mean the server
            # is confused or closing. Never reuse it.
            self.close()
            return
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            err = self._execute(<const char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        if err != HPE_OK:
            self._parse_failed(err)
        elif self.body_parts:
            self._deliver()

    cdef _parse_failed(self, llhttp_errno_t err):
        # Where the twin catches httptools' exceptions and says their reason
        # (what a callback raised is not kept: the reason is llhttp's, as the
        # twin's is).
        if self._upgrade_paused(err):
            self._fail(UpstreamError("upstream tried to upgrade the connection", before_response=self.head is None))
        else:
            self._fail(UpstreamError(f"invalid response from upstream: {self._refusal()}",
                                     before_response=self.head is None))

    # -- what llhttp's callbacks call ----------------------------------------
    cdef _headers_complete(self):
        cdef int status = self._http.status_code
        cdef ResponseHead head
        if status < 200:
            self.collector.reset()  # 1xx interim response: the real one follows
            return
        self.collector.seal()  # a chunked body's trailers are not the head's
        head = _new_head(status, self.collector, self._keep_alive())
        self.head = head
        # time.monotonic(), not the loop's clock: the gateway measures the
        # hub's own share of a request against it (see Exchange.t0).
        self.head_at = _monotonic()
        self.state = _RECEIVING
        self.deadline = self.last_activity + self.idle_timeout if self.idle_timeout > 0 else 0.0
        fut = self.head_future
        if fut is not None and not fut.done():
            fut.set_result(head)
        if self.on_head is not None:
            self.on_head(head)

    cdef _body(self, bytes piece):
        self.body_parts.append(piece)

    def deliver(self):
        """Hand the chunks read so far to the sink, or hold them (for the subclass)."""
        self._deliver()

    cdef _deliver(self):
        cdef list parts = self.body_parts
        sink = self.sink
        if sink is not None:
            sink.on_data(parts)
        else:
            self.held.extend(parts)
        PyList_Clear(parts)  # parts.clear() would be a method lookup and a call

    def on_message_complete(self):
        """The body is whole (the subclass's call for one the close ends)."""
        self._message_complete()

    cdef _message_complete(self):
        cdef list parts
        if self.head is None:
            return  # end of a 1xx interim response
        self.complete = True
        self.state = _DONE
        self.deadline = 0.0
        sink = self.sink
        if sink is not None:
            parts = self.body_parts
            sink.on_complete(parts)
            PyList_Clear(parts)
        # else the chunks wait in `held` (data_received delivers them there)
        # for attach(), which completes the sink.

    # -- used by the Exchange ----------------------------------------------
    def send(self, head, body, double first_byte_timeout, double idle_timeout, on_head=None, on_fail=None):
        """See _upstream_py.UpstreamCore.send."""
        self._send(head, body, first_byte_timeout, idle_timeout, on_head, on_fail)
        return self.head_waiter()

    def write_request(self, head, body, double first_byte_timeout, double idle_timeout, on_head=None, on_fail=None):
        """See _upstream_py.UpstreamCore.write_request."""
        self._send(head, body, first_byte_timeout, idle_timeout, on_head, on_fail)

    # The Exchange's core calls _send, _attach and _release in C (see _upstream.pxd).
    cdef _send(self, head, body, double first_byte_timeout, double idle_timeout, on_head, on_fail):
        # The twin's write_request.
        cdef double now
        assert self.transport is not None
        self.on_head = on_head
        self.on_fail = on_fail
        self.head_future = None
        self.state = _SENDING
        self.collector.reset()
        self.head = None
        self.sink = None
        self.held = []
        PyList_Clear(self.body_parts)
        self.complete = False
        self.failure = None
        self.first_byte_timeout = first_byte_timeout
        self.idle_timeout = idle_timeout
        if body:
            self.transport.writelines([head, *body])
        else:
            self.transport.write(head)
        now = self.last_activity = self._time()
        self.deadline = now + first_byte_timeout if first_byte_timeout > 0 else 0.0

    def attach(self, sink):
        """Start delivering the body to `sink` (held chunks first)."""
        self._attach(sink)

    cdef _attach(self, sink):
        cdef list held = self.held
        self.sink = sink
        self.held = []
        if self.complete:
            sink.on_complete(held)
            return
        if held:
            sink.on_data(held)
        if self.failure is not None:
            sink.on_error(self.failure)

    def release(self):
        """Give the connection back: pooled if the response completed cleanly."""
        self._release()

    cdef _release(self):
        self.sink = None
        self.head_future = None
        self.on_head = None
        self.on_fail = None
        if (
            self.state is _DONE
            and self.head is not None
            and self.head.keep_alive
            and self.transport is not None
            and not self.transport.is_closing()
        ):
            # ReadFlow.resume_reading does nothing unless reading is paused:
            # asked only then, the usual request makes no Python call here.
            if self.reading_paused:
                self.resume_reading()
            self.state = _IDLE
            self.pool._put_idle(self)
        else:
            self.close()


cdef class PoolCore:
    """See _upstream_py.PoolCore."""

    def __init__(self, loop, Py_ssize_t max_idle, double idle_timeout, sweeper):
        self.loop = loop
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.idle = deque()
        self.active = set()
        self.sweeper = sweeper
        self.retired = False
        self._time = loop.time

    def take_idle(self):
        """A pooled connection that is still usable, or None."""
        return self._take_idle()

    cdef UpstreamCore _take_idle(self):
        cdef UpstreamCore conn
        idle = self.idle
        while idle:
            conn = idle.pop()  # most recently used: least likely closed by the peer
            conn.deadline = 0.0
            if conn.state is _IDLE and conn.transport is not None and not conn.transport.is_closing():
                conn.reused = True
                self.active.add(conn)
                return conn
        return None

    def put_idle(self, UpstreamCore conn):
        """Keep `conn` for reuse, or close it (for callers outside the core)."""
        self._put_idle(conn)

    cdef _put_idle(self, UpstreamCore conn):
        self.active.discard(conn)
        if self.retired or len(self.idle) >= self.max_idle or self.idle_timeout <= 0:
            conn.close()
            return
        self.idle.append(conn)
        conn.deadline = self._time() + self.idle_timeout
        # Once per request: the sweeper is nearly always running already, and
        # its start() would be a Python call that does nothing.
        sweeper = self.sweeper
        if sweeper.handle is None:
            sweeper.start()
