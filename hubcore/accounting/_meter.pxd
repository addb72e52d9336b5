# The compiled meter's layout, declared here so that the exchange core
# (hubcore/gateway/_exchange.pyx) reads its counters as C fields when it
# builds the usage row.

cimport cython

from hubcore.accounting._meter_interpret cimport Reading


# A growable byte buffer.
cdef struct Buf:
    unsigned char* data
    Py_ssize_t len
    Py_ssize_t cap


# final: its C calls are direct calls, not through a method table.
@cython.final
cdef class Meter:


    cdef readonly int fmt
    cdef readonly bint sse
    # the counters (model, tokens, stop reason, error...), read from the
    # decoded objects by the shared code and returned by its properties (_meter.pyx)
    cdef Reading _reading
    cdef readonly Py_ssize_t events
    cdef readonly Py_ssize_t malformed
    cdef readonly Py_ssize_t delta_chars
    cdef bint _closed
    # SSE framing
    cdef Py_ssize_t _max_event
    cdef Buf _tail
    cdef bint _discarding
    cdef bint _after_cr
    # the event being assembled: its first data line stays a view into the
    # caller's buffer until the event ends or the buffer does
    cdef int _kind
    cdef Py_ssize_t _ndata
    cdef Py_ssize_t _dlen
    cdef bint _poisoned
    cdef bint _has_view
    cdef const unsigned char* _view
    cdef Py_ssize_t _view_len
    cdef Buf _acc
    # non-SSE body
    cdef Py_ssize_t _max_body
    cdef bytearray _body
    cdef bint _overflow

    cdef int _start(self, fmt, bint sse, Py_ssize_t max_event_size, Py_ssize_t max_body_size) except -1
    cdef int _feed_bytes(self, bytes data) except -1
    cdef int _feed_at(self, data, const unsigned char* p, Py_ssize_t n) except -1
    cdef int _feed_sse(self, const unsigned char* p, Py_ssize_t n) except -1
    cdef Py_ssize_t _past_eol(self, const unsigned char* p, Py_ssize_t j, Py_ssize_t n) noexcept
    cdef int _line(self, const unsigned char* s, Py_ssize_t n) except -1
    cdef int _data(self, const unsigned char* v, Py_ssize_t vn) except -1
    cdef void _poison(self) noexcept
    cdef int _dispatch(self) except -1
    cdef int _event(self, int kind, const unsigned char* d, Py_ssize_t dn) except -1
    cdef int _chat_event(self, const unsigned char* d, Py_ssize_t dn) except -1
    cdef object _loads(self, const unsigned char* d, Py_ssize_t dn)
    cdef _close_body(self)


# Meter(fmt, sse), for the exchange core.
cdef Meter new_meter(fmt, bint sse)
