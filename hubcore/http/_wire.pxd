# The compiled header collector's fields and calls, declared here so that
# the connection core (_conn.pyx) reads and calls them without a Python
# attribute lookup, some ten times a request.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE


cdef class HeaderList:
    cdef public list headers
    cdef dict _index  # made on first use of `index`

    cpdef header(self, name)


cdef class HeaderCollector(HeaderList):
    cdef public Py_ssize_t size
    cdef public long long content_length
    cdef public object control
    cdef public Py_ssize_t hosts
    cdef public bint sealed

    # The header being read by llhttp, in pieces: its name and value so far,
    # as spans of the read being parsed (a length of -1: none) or as bytes.
    cdef bytes _name
    cdef bytes _value
    cdef const char* _name_at
    cdef Py_ssize_t _name_len
    cdef const char* _value_at
    cdef Py_ssize_t _value_len

    cpdef reset(self)
    cpdef seal(self)
    # For the compiled connection cores, which run llhttp (see _wire.pyx).
    cdef bint _add(self, bytes name, bytes value) except -1
    cdef _add_whole(self, const char* name, Py_ssize_t nn, const char* value, Py_ssize_t vn)
    cdef _name_span(self, const char* at, Py_ssize_t n)
    cdef _value_span(self, const char* at, Py_ssize_t n)
    cdef int _own(self) except -1
    cdef _flush(self)

cdef class NameSet:
    cdef readonly frozenset names
    cdef tuple _by_length  # for each length, the names of that length

    cdef bint has(self, object name) except -1

# A header's first value by a scan, and the index made from a list: C calls
# from the connection cores, the Exchange's core and the head functions.
cpdef first_value(list headers, name)
cpdef dict index_of(list headers)

# The head every request writes twice (gateway/_heads.pyx): a C call, and
# the same from a start and a tail in pieces (a pointer and a size each).
cdef struct Piece:
    const char* data
    Py_ssize_t size

cdef inline Piece piece_of(bytes b):
    cdef Piece piece
    piece.data = PyBytes_AS_STRING(b)
    piece.size = PyBytes_GET_SIZE(b)
    return piece

cpdef bytes render_head(bytes start, list headers, object drop, bytes tail)
cdef bytes render_pieces(const Piece* before, Py_ssize_t nbefore, list headers, object drop,
                         const Piece* after, Py_ssize_t nafter)
