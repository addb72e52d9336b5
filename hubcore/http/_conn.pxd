# The compiled client connection core's fields and calls, declared here so
# that the Exchange's core (hubcore/gateway/_exchange.pyx) reads the request
# and writes the answer without a Python attribute lookup or call.

from hubcore.http._llhttp cimport llhttp_errno_t
from hubcore.http._parsing cimport ParsingCore
from hubcore.http._wire cimport HeaderCollector, HeaderList


cdef class BodyBudget:
    cdef public Py_ssize_t limit
    cdef public object loop
    cdef public Py_ssize_t in_flight
    cdef public Py_ssize_t freed_since_trim
    cdef public double last_trim
    cdef public object trim_handle

    cpdef bint reserve(self, Py_ssize_t size) except -1
    cpdef release(self, Py_ssize_t size)


cdef class Request(HeaderList):
    cdef public bytes method
    cdef public bytes path
    cdef public bytes target
    cdef public object control
    cdef public list parts
    cdef public Py_ssize_t body_size
    cdef object _body
    cdef public bint keep_alive
    cdef public str http_version
    cdef public object context
    cdef public Py_ssize_t reserved
    cdef public BodyBudget budget

    cdef _fill(self, bytes method, bytes target, HeaderCollector head, list parts, bint keep_alive, str http_version)
    cpdef drop_body(self)


cdef class ConnCore(ParsingCore):
    # (its parser `_http` and header `collector` are ParsingCore's)
    # per-connection
    cdef public object server
    cdef public object config
    cdef public object loop
    cdef public object app
    cdef public object gate
    cdef readonly BodyBudget budget
    cdef public object transport
    cdef public bint reading_paused
    cdef public bint parsing_stopped
    cdef public object pending_reject
    cdef public Request current
    cdef public object parser  # the twin's; None here (see _http)
    cdef object _error  # what a callback of _http's raised, until _parse_failed reads it
    cdef public object phase
    cdef public double deadline
    cdef public double timeout
    cdef public double last_activity
    cdef public object pipeline
    cdef public bint busy
    cdef public object task
    cdef public object handler
    cdef public bint write_paused
    cdef public bint closing
    # What is read of the server and its config per request, as C values
    # (the config is frozen; a reload applies to new connections).
    cdef object _time  # loop.time
    cdef object _read_view  # server.read_view
    cdef const char* _read_buffer  # its address
    cdef const char* _reading_at  # where the transport's current read lands (see get_buffer)
    cdef long long _max_header_bytes
    cdef long long _max_body_bytes
    cdef double _header_timeout
    cdef double _body_timeout
    cdef double _keepalive_timeout
    # per-request (the one being parsed)
    cdef public bytes url
    cdef public bytes method
    cdef public str version
    cdef public object context
    cdef public bint discarding
    cdef public bint chunked
    cdef public Py_ssize_t head_bytes
    cdef public list body_parts
    cdef public Py_ssize_t body_size
    # A body of BODY_WHOLE_BYTES or more: its length, and once a read has
    # brought only part of it, the bytes object it is filled into.
    cdef Py_ssize_t _whole_size
    cdef bytes _whole
    cdef Py_ssize_t _whole_fill
    cdef public Py_ssize_t reserved
    cdef public double body_started
    cdef public bint expect_continue
    cdef public object message_phase
    cdef public bint continue_due

    cdef _received(self, const char* data, Py_ssize_t size)
    cdef _parse_failed(self, llhttp_errno_t err)
    cdef _control_headers(self, list control)
    cdef _reserve(self, Py_ssize_t size)
    cdef _body_at(self, const char* at, Py_ssize_t length)
    cdef _refused_at_head(self, Request request)
    cdef _dispatch(self, Request request)
    cdef _start(self, Request request)
    cdef _end_current(self)
    cdef _request_done(self)
    cdef _finish(self, bint keep_alive)
    cdef _writelines(self, data)
    cdef _set_phase(self, object phase, double now)
