# What the compiled connection cores share: their llhttp parser and its
# callbacks (_parsing.pyx). ConnCore (_conn.pxd) and UpstreamCore
# (_upstream.pxd) derive from it.

from hubcore.http._llhttp cimport llhttp_errno_t, llhttp_t, llhttp_type_t
from hubcore.http._wire cimport HeaderCollector


cdef class ParsingCore:
    cdef llhttp_t _http  # run by _execute; its fields are read directly
    cdef readonly HeaderCollector collector

    cdef _start_parser(self, llhttp_type_t kind)
    cdef llhttp_errno_t _execute(self, const char* data, Py_ssize_t size)
    cdef bint _upgrade_paused(self, llhttp_errno_t err)
    cdef str _refusal(self)
    cdef bint _keep_alive(self)
    cdef bytes _method(self)

    # The steps llhttp's callbacks run: the deriving core's.
    cdef _callback_failed(self, BaseException error)
    cdef _message_begin(self)
    cdef _url(self, bytes url)
    cdef _headers_complete(self)
    cdef _body(self, bytes piece)
    cdef _body_at(self, const char* at, Py_ssize_t length)
    cdef _message_complete(self)
