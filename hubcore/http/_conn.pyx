# cython: language_level=3
"""A client connection's common request path, compiled: the twin of
`_conn_py.py` (see there for the contract; tests/http/test_conn.py holds
both to it).

The same methods in the same order, on typed fields. Where the twin hands
its reads to httptools, this core runs llhttp itself, the parser httptools
wraps, as a ParsingCore (hubcore/http/_parsing.pyx): llhttp's callbacks
call this core's steps (`_message_begin`, `_url`, `_headers_complete`,
`_body`, `_message_complete`) in C, and the request line's method and
version are read from the parser's fields. `data_received` and
`buffer_updated` stay Python-callable (the transport calls them); what they
call among themselves (`_set_phase`, `_reserve`, `_dispatch`, `_start`,
`_end_current`, the body budget, a Request's `drop_body`) are C calls. The
rare paths are the subclass's (server.HttpProtocol), called as Python
methods."""

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.memoryview cimport PyMemoryView_FromMemory
from libc.string cimport memchr, memcpy

import logging
from collections import deque

from hubcore.http._llhttp cimport HPE_OK, HTTP_REQUEST, llhttp_errno_t
from hubcore.http._parsing cimport ParsingCore
from hubcore.http._wire cimport HeaderCollector, HeaderList

# What is not hot is the Python twin's, shared. (The twin's line_version,
# its read of the version from the request line, has no part here: this
# core reads llhttp's fields.)
from hubcore.http._conn_py import (
    BODY_WHOLE_BYTES, CONTINUE_100, MAX_BODY_PARTS, REFUSED_BODY_DISCARD_BYTES, TRIM_AFTER_BYTES, TRIM_MIN_INTERVAL,
    Phase, RefusedAtHead, Reject, malloc_trim,
)

log = logging.getLogger("hubcore.server")

# The phases as C globals: `phase is _BODY` is a pointer comparison.
cdef object _IDLE = Phase.IDLE
cdef object _HEAD = Phase.HEAD
cdef object _BODY = Phase.BODY
cdef object _BUSY = Phase.BUSY
cdef object _LINGER = Phase.LINGER
cdef object _CLOSED = Phase.CLOSED

cdef bytes _CONTINUE_100 = CONTINUE_100
cdef Py_ssize_t _MAX_BODY_PARTS = MAX_BODY_PARTS
cdef Py_ssize_t _BODY_WHOLE_BYTES = BODY_WHOLE_BYTES
cdef long long _REFUSED_BODY_DISCARD_BYTES = REFUSED_BODY_DISCARD_BYTES
cdef Py_ssize_t _TRIM_AFTER_BYTES = TRIM_AFTER_BYTES
cdef double _TRIM_MIN_INTERVAL = TRIM_MIN_INTERVAL
cdef object _malloc_trim = malloc_trim
cdef str _V11 = "1.1"
cdef str _V10 = "1.0"


cdef class BodyBudget:
    """See _conn_py.BodyBudget."""
    # Its fields are declared in _conn.pxd, as are Request's and ConnCore's.

    def __init__(self, Py_ssize_t limit, loop):
        self.limit = limit
        self.loop = loop
        self.in_flight = 0
        self.freed_since_trim = 0
        self.last_trim = 0.0
        self.trim_handle = None

    cpdef bint reserve(self, Py_ssize_t size) except -1:
        if self.in_flight + size > self.limit:
            return False
        self.in_flight += size
        return True

    cpdef release(self, Py_ssize_t size):
        self.in_flight -= size
        self.freed_since_trim += size
        if self.freed_since_trim >= _TRIM_AFTER_BYTES and self.trim_handle is None and _malloc_trim is not None:
            delay = max(0.0, self.last_trim + _TRIM_MIN_INTERVAL - self.loop.time())
            self.trim_handle = self.loop.call_later(delay, self._trim)

    def _trim(self):
        self.trim_handle = None
        self.freed_since_trim = 0
        self.last_trim = self.loop.time()
        if _malloc_trim is not None:
            _malloc_trim(0)

    def close(self):
        if self.trim_handle is not None:
            self.trim_handle.cancel()
            self.trim_handle = None


cdef bytes _path_of(bytes target):
    """`target.partition(b"?")[0]`, without the tuple and its other two pieces."""
    cdef const char* start = PyBytes_AS_STRING(target)
    cdef const char* mark = <const char*>memchr(start, 63, PyBytes_GET_SIZE(target))  # '?'
    if mark == NULL:
        return target
    return start[:mark - start]


cdef class Request(HeaderList):
    """See _conn_py.Request."""

    def __init__(self, bytes method, bytes target, HeaderCollector head, list parts, bint keep_alive, str http_version):
        self._fill(method, target, head, parts, keep_alive, http_version)

    cdef _fill(self, bytes method, bytes target, HeaderCollector head, list parts, bint keep_alive, str http_version):
        cdef Py_ssize_t size = 0
        self.method = method
        self.target = target
        self.path = _path_of(target)
        self.headers = head.headers  # names lower-cased, in order received
        self._index = None
        # Transfer-Encoding, Expect and Connection, in order (None: none came).
        self.control = head.control
        # The body as the reads brought it: it can go upstream as it is, and
        # is joined only when something reads it whole (see `body`).
        if len(parts) > _MAX_BODY_PARTS:
            parts = [b"".join(parts)]
        self.parts = parts
        for part in parts:
            size += len(part)
        self.body_size = size
        self._body = b"" if not parts else parts[0] if len(parts) == 1 else None
        self.keep_alive = keep_alive
        self.http_version = http_version
        # What the application's gate said of the head (see server.Gate).
        self.context = None
        # Bytes of the in-flight body budget this request holds.
        self.reserved = 0
        self.budget = None

    @property
    def body(self):
        """The whole body, joined on first use."""
        body = self._body
        if body is None:
            body = self._body = b"".join(self.parts)
            self.parts = [body]
        return body

    cpdef drop_body(self):
        """Let go of the body (up to max_body_bytes) once nothing can resend it."""
        self._body = b""
        self.parts = []
        if self.reserved:
            assert self.budget is not None
            self.budget.release(self.reserved)
            self.reserved = 0


cdef Request _new_request(bytes method, bytes target, HeaderCollector head, list parts, bint keep_alive, str http_version):
    # Request(...) from C would pack a tuple and parse it in __init__.
    cdef Request request = Request.__new__(Request)
    request._fill(method, target, head, parts, keep_alive, http_version)
    return request


cdef const char* _address_of(object buffer) except NULL:
    """Where the server's read buffer is. It stays there while the
    connection lives: the core holds the memoryview that exports it, and a
    bytearray with an export cannot be resized."""
    cdef Py_buffer view
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
    PyBuffer_Release(&view)
    return <const char*>view.buf


cdef class ConnCore(ParsingCore):
    """See _conn_py.ConnCore."""
    # Its fields are declared in _conn.pxd, where the Exchange's core
    # (hubcore/gateway/_exchange.pyx) reads them.

    def __init__(self, server):
        config = server.config
        # per-connection
        self.server = server
        self.config = config
        self.loop = server.loop
        self.app = server.app
        self.gate = server.gate
        self.budget = server.body_budget
        self.transport = None
        self.reading_paused = False
        self.parsing_stopped = False
        self.pending_reject = None
        self.current = None
        # The twin's httptools parser; this core parses with `_http`.
        self.parser = None
        self._start_parser(HTTP_REQUEST)
        self._error = None
        self.phase = _IDLE
        self.deadline = 0.0
        self.timeout = 0.0
        self.last_activity = 0.0
        self.pipeline = deque()
        self.busy = False
        self.task = None
        self.handler = None
        self.write_paused = False
        self.closing = False
        self._time = self.loop.time
        self._read_view = server.read_view
        self._read_buffer = _address_of(self._read_view)
        self._reading_at = self._read_buffer
        self._max_header_bytes = config.max_header_bytes
        self._max_body_bytes = config.max_body_bytes
        self._header_timeout = config.header_timeout
        self._body_timeout = config.body_timeout
        self._keepalive_timeout = config.keepalive_timeout
        # per-request
        self.url = b""
        self.method = b""
        self.version = ""
        self.context = None
        self.discarding = False
        self.chunked = False
        self.head_bytes = 0
        self.body_parts = []
        self.body_size = 0
        self._whole_size = 0
        self._whole = None
        self._whole_fill = 0
        self.reserved = 0
        self.body_started = 0.0
        self.expect_continue = False
        self.message_phase = _IDLE
        self.continue_due = False

    # -- reading -----------------------------------------------------------
    def get_buffer(self, sizehint):
        # Once a read has brought only part of a long body, the reads of
        # the rest land in the bytes object it is kept in (see
        # BODY_WHOLE_BYTES), not in the read buffer: no copy, and no join
        # (_body_at copied that first part). The view lends no more than
        # the body still lacks, so a read never takes the next request's
        # bytes into it; and that object is seen by no one before its last
        # byte is in (the request is made only then).
        cdef Py_ssize_t fill = self._whole_fill, missing
        cdef bytes whole = self._whole
        cdef char* at
        if whole is not None and self.message_phase is _BODY and not self.parsing_stopped:
            missing = PyBytes_GET_SIZE(whole) - fill
            if missing > 0:
                at = PyBytes_AS_STRING(whole) + fill
                self._reading_at = at
                return PyMemoryView_FromMemory(at, missing, PyBUF_WRITE)
        self._reading_at = self._read_buffer
        return self._read_view

    def buffer_updated(self, Py_ssize_t nbytes):
        # A C call on where get_buffer pointed the read: once or twice a request.
        self._received(self._reading_at, nbytes)

    def data_received(self, data):
        cdef Py_buffer view
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self._received(<const char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cdef _received(self, const char* data, Py_ssize_t size):
        # Called with what the transport read; nothing may keep `data` (it
        # is the server's read buffer): the callbacks take copies.
        cdef double now
        cdef llhttp_errno_t err
        if self.phase is _LINGER or self.parsing_stopped:
            self._linger_drop(size)
            return
        now = self.last_activity = self._time()
        if self.phase is _IDLE:
            self._set_phase(_HEAD, now)
        if self.message_phase is not _BODY:
            # Counted before parsing, so a head that never ends is caught
            # even when it arrives while an earlier request is answered.
            self.head_bytes += size
        err = self._execute(data, size)
        if err != HPE_OK:
            self._parse_failed(err)
            return
        if self.message_phase is _HEAD and self.head_bytes > self._max_header_bytes:
            self._reject(431, f"request head larger than {self._max_header_bytes} bytes")
        elif self.message_phase is _BODY and self.collector.size > self._max_header_bytes:
            # Trailers of a chunked body still coming: counted with the head they follow.
            self._reject(431, f"request head and trailers larger than {self._max_header_bytes} bytes")

    cdef _parse_failed(self, llhttp_errno_t err):
        # Where the twin catches httptools' exceptions: what a callback
        # raised, or llhttp's own reason for refusing the bytes.
        reason = self._error
        self._error = None
        if self._upgrade_paused(err):
            self._reject(400, "protocol upgrades are not supported")
        elif isinstance(reason, RefusedAtHead):
            self._refused_at_head(reason.request)
        elif isinstance(reason, Reject):
            self._reject(reason.status, reason.message, reason.headers)
        elif isinstance(reason, ValueError):
            # The header collector's refusal says what is wrong.
            self._reject(400, f"malformed HTTP request: {reason}")
        else:
            self._reject(400, f"malformed HTTP request: {self._refusal()}")

    # -- what llhttp's callbacks call (never await) --------------------------
    cdef _callback_failed(self, BaseException error):
        self._error = error  # for _parse_failed, which says why

    cdef _message_begin(self):
        self.url = b""
        self.collector.reset()
        self.body_parts = []
        self.body_size = 0
        self._whole_size = 0
        self._whole = None
        self._whole_fill = 0
        self.reserved = 0
        self.discarding = False
        self.chunked = False
        self.expect_continue = False
        self.continue_due = False
        self.message_phase = _HEAD

    cdef _url(self, bytes url):
        self.url = url if not self.url else self.url + url

    cdef _headers_complete(self):
        cdef HeaderCollector head = self.collector
        cdef long long length
        cdef int major = self._http.http_major, minor = self._http.http_minor
        head.seal()  # a chunked body's trailers are not headers
        if len(self.url) + head.size > self._max_header_bytes:
            raise Reject(431, f"request head larger than {self._max_header_bytes} bytes")
        method = self.method = self._method()
        if major == 1 and minor == 1:
            version = _V11
        elif major == 1 and minor == 0:
            version = _V10
        else:
            version = f"{major}.{minor}"
        self.version = version
        if version != "1.1" and version != "1.0":
            raise Reject(505, f"HTTP/{version} is not supported; hubcore speaks HTTP/1.1")
        if method == b"CONNECT":
            raise Reject(405, "CONNECT is not supported: hubcore is not a forward proxy")
        if head.hosts != 1 and (head.hosts > 1 or version == "1.1"):
            # RFC 9112 3.2: a 1.1 request without exactly one Host is a 400.
            raise Reject(400, "a request must carry exactly one Host header")
        if head.control is not None:
            self._control_headers(head.control)
        if head.header(b"upgrade") is not None:
            raise Reject(400, "protocol upgrades (WebSocket, h2c) are not supported")
        length = head.content_length
        if length > self._max_body_bytes:
            raise Reject(413, f"request body larger than {self._max_body_bytes} bytes")
        context = self.gate(self, method, self.url, head) if self.gate is not None else None
        self.context = context
        if isinstance(context, BaseException):
            # A client waiting for 100 Continue gets the refusal instead.
            if self.expect_continue or self.chunked or length > _REFUSED_BODY_DISCARD_BYTES:
                request = _new_request(method, self.url, head, [], False, version)
                request.context = context
                raise RefusedAtHead(request)
            self.discarding = True
        elif length > 0:
            self._reserve(length)
            if length >= _BODY_WHOLE_BYTES:
                self._whole_size = length
        self.message_phase = _BODY
        if not self.busy:
            # While an earlier request is answered the client is waiting for
            # us, not we for it: no body timer until that answer is done.
            self._set_phase(_BODY, self.last_activity)  # this read's time
            self.body_started = self.last_activity
        if self.expect_continue and length != 0 and self.transport is not None:
            if not self.busy:
                self.transport.write(_CONTINUE_100)
            else:
                # Written now it would land inside the running response.
                self.continue_due = True

    cdef _control_headers(self, list control):
        for name, value in control:
            if name == b"expect":
                if value.lower() != b"100-continue":
                    raise Reject(417, "unsupported Expect header")
                self.expect_continue = True
            elif name == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    # Only plain chunked framing is understood end to end;
                    # anything else is a classic smuggling vector.
                    raise Reject(400, "unsupported Transfer-Encoding")
                self.chunked = True

    cdef _reserve(self, Py_ssize_t size):
        cdef Py_ssize_t extra = size - self.reserved
        if not self.budget.reserve(extra):
            raise Reject(503, "hubcore holds as many request bodies as it may; retry shortly",
                         ((b"retry-after", b"1"),))
        self.reserved = size

    cdef _body_at(self, const char* at, Py_ssize_t length):
        cdef Py_ssize_t fill = self._whole_fill
        cdef bytes whole = self._whole
        cdef char* end
        if whole is None:
            if self._whole_size == 0 or length == self._whole_size:
                # A short body's piece, or a long body read whole at once.
                self._body(at[:length])
                return
            # A long body's first piece: the object it is kept in, filled
            # here and by the reads get_buffer lends it to; nothing else
            # sees it before it is full.
            whole = self._whole = PyBytes_FromStringAndSize(NULL, self._whole_size)
        # llhttp hands over no more than Content-Length announced.
        assert length <= PyBytes_GET_SIZE(whole) - fill
        end = PyBytes_AS_STRING(whole) + fill
        if at != end:  # in the read buffer, not read in place
            memcpy(end, at, length)
        self._whole_fill = fill + length
        self.body_size += length

    cdef _body(self, bytes body):
        cdef Py_ssize_t size = self.body_size + PyBytes_GET_SIZE(body)
        self.body_size = size
        if size > self._max_body_bytes:
            raise Reject(413, f"request body larger than {self._max_body_bytes} bytes")
        if self.discarding:
            return
        if size > self.reserved:
            # A chunked body (or one longer than announced, which llhttp
            # does not let through): reserved as it comes.
            self._reserve(size)
        self.body_parts.append(body)

    cdef _message_complete(self):
        cdef Request request
        if self.collector.size > self._max_header_bytes:
            raise Reject(431, f"request head and trailers larger than {self._max_header_bytes} bytes")
        if self._whole is not None:
            self.body_parts = [self._whole]
            self._whole = None
        request = _new_request(
            self.method,
            self.url,
            self.collector,
            self.body_parts,
            self._keep_alive(),
            self.version,
        )
        request.context = self.context
        self.context = None
        if self.reserved:
            request.reserved = self.reserved
            request.budget = self.budget
            self.reserved = 0
        self.body_parts = []
        self.message_phase = _IDLE
        self.continue_due = False
        self.head_bytes = 0
        self._dispatch(request)

    cdef _refused_at_head(self, Request request):
        self.parsing_stopped = True
        self.message_phase = _IDLE
        self.head_bytes = 0
        self._dispatch(request)

    # -- running requests --------------------------------------------------
    cdef _dispatch(self, Request request):
        if not self.busy:
            self._start(request)
        else:
            # A pipelined request: answer in order, stop reading meanwhile.
            self.pipeline.append(request)
            self.pause_reading()

    cdef _start(self, Request request):
        self._set_phase(_BUSY, -1.0)
        self.busy = True
        self.current = request
        coro = self.app(request, self)
        if coro is not None:
            self.run_task(coro)

    def _on_task_done(self, task):
        self.server.tasks.discard(task)
        self.task = None
        if not task.cancelled() and task.exception() is not None:
            log.error("request handler failed", exc_info=task.exception())
            self._end_current()
            self.close()
            return
        self.request_done()

    cdef _end_current(self):
        self.handler = None
        self.busy = False
        request = self.current
        self.current = None
        if request is not None:
            request.drop_body()

    def request_done(self):
        """The current request is answered and its bookkeeping done: start
        the next pipelined one, or wait for the next request."""
        self._request_done()

    cdef _request_done(self):
        self._end_current()
        if self.phase is _CLOSED or self.closing:
            return
        if self.pipeline:
            self._start(self.pipeline.popleft())
            return
        if self.pending_reject is not None:
            # Every request before the bad bytes has its answer: now refuse them.
            reject = self.pending_reject
            self.pending_reject = None
            self._reject(reject.status, reject.message, reject.headers)
            return
        # ReadFlow.resume_reading does nothing unless reading is paused:
        # asked only then, the usual request makes no Python call here.
        if self.reading_paused:
            self.resume_reading()
        if self.server.draining:
            self.close()
            return
        # Part of the next request may have arrived meanwhile: time it from now.
        self._set_phase(self.message_phase, -1.0)
        if self.continue_due and self.transport is not None:
            self.continue_due = False
            self.transport.write(_CONTINUE_100)

    def finish(self, keep_alive):
        """The response is fully written; close unless it may be kept alive."""
        self._finish(keep_alive)

    cdef _finish(self, bint keep_alive):
        if not keep_alive:
            self.close_gracefully()

    def writelines(self, data):
        self._writelines(data)

    # The Exchange's core calls these three in C (see _conn.pxd).
    cdef _writelines(self, data):
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(data)

    # -- timeouts ------------------------------------------------------------
    def set_phase(self, phase):
        """Enter `phase`, timed from now (for the subclass)."""
        self._set_phase(phase, -1.0)

    cdef _set_phase(self, object phase, double now):
        # `now` < 0 stands for the twin's None (read the clock): loop time
        # is never negative.
        cdef double timeout
        if self.phase is _LINGER or self.phase is _CLOSED:
            return  # closing: only the linger deadline applies
        self.phase = phase
        if phase is _HEAD:
            timeout = self._header_timeout
        elif phase is _BODY:
            timeout = self._body_timeout
        elif phase is _IDLE:
            timeout = self._keepalive_timeout
        else:
            self.deadline = 0.0
            return
        if now < 0:
            now = self._time()
        self.last_activity = now
        self.timeout = timeout
        self.deadline = now + timeout if timeout > 0 else 0.0
