# The compiled header collector's fields and calls, declared here so that
# the connection core (_conn.pyx) reads and calls them without a Python
# attribute lookup, some ten times a request.

cdef class HeaderCollector:
    cdef public list headers
    cdef public dict index
    cdef public Py_ssize_t size
    cdef public long long content_length
    cdef public object control
    cdef public Py_ssize_t hosts
    cdef public bint sealed
    cdef readonly Py_ssize_t expected

    cpdef reset(self)
    cpdef seal(self)

# The head every request writes twice (gateway/_heads.pyx): a C call.
cpdef bytes render_head(bytes start, list headers, object drop, bytes tail)
