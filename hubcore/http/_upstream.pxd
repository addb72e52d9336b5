# The compiled upstream connection core's fields and calls, declared here so
# that the Exchange's core (hubcore/gateway/_exchange.pyx) reads the answer's
# head and sends, attaches and releases without a Python attribute lookup
# or call.

from hubcore.http._llhttp cimport llhttp_errno_t
from hubcore.http._parsing cimport ParsingCore
from hubcore.http._wire cimport HeaderCollector, HeaderList


cdef class ResponseHead(HeaderList):
    cdef public int status
    cdef public bint keep_alive
    cdef public object content_length
    cdef public bint chunked

    cdef _fill(self, int status, HeaderCollector head, bint keep_alive)


cdef class PoolCore:
    cdef public object loop
    cdef public Py_ssize_t max_idle
    cdef public double idle_timeout
    cdef public object idle
    cdef public set active
    cdef public object sweeper
    cdef public bint retired
    cdef object _time  # loop.time

    cdef UpstreamCore _take_idle(self)
    cdef _put_idle(self, UpstreamCore conn)


cdef class UpstreamCore(ParsingCore):
    # (its parser `_http` and header `collector` are ParsingCore's)
    # per-connection
    cdef public PoolCore pool
    cdef public object loop
    cdef public object transport
    cdef readonly list body_parts
    cdef public object parser  # the twin's; None here (see _http)
    cdef public object state
    cdef public bint reused
    cdef public bint reading_paused
    cdef object _time  # loop.time
    # per-request
    cdef public object head_future
    cdef public object on_head
    cdef public object on_fail
    cdef public ResponseHead head
    cdef public double head_at
    cdef public object sink
    cdef public list held
    cdef public bint complete
    cdef public object failure
    cdef public double deadline
    cdef public double last_activity
    cdef public double first_byte_timeout
    cdef public double idle_timeout

    cdef _parse_failed(self, llhttp_errno_t err)
    cdef _deliver(self)
    cdef _send(self, head, body, double first_byte_timeout, double idle_timeout, on_head, on_fail)
    cdef _attach(self, sink)
    cdef _release(self)
