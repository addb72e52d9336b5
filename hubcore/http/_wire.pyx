# cython: language_level=3, boundscheck=False, wraparound=False
"""HTTP head handling on the hot path, compiled: the twin of `_wire_py.py`
(see there for the contract; tests/test_wire.py holds both to it)."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_SetDefault
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.set cimport PySet_Contains
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdint cimport uint64_t
from libc.string cimport memchr, memcmp, memcpy

cdef extern from "Python.h":
    # A dict with room for `minused` entries, made without the resizes on the way.
    dict _PyDict_NewPresized(Py_ssize_t minused)

CONTROL = frozenset({b"transfer-encoding", b"expect", b"connection"})

cdef bytes _CONTENT_LENGTH = b"content-length"
cdef bytes _TRANSFER_ENCODING = b"transfer-encoding"
cdef bytes _EXPECT = b"expect"
cdef bytes _CONNECTION = b"connection"
cdef bytes _HOST = b"host"
# See _wire_py.FRAMING.
FRAMING = frozenset({b"content-length", b"transfer-encoding", b"host"})


cdef bytes _lower(bytes name):
    """`name.lower()`, without a copy when it is lower-case already (the usual case)."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(name), i
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(name)
    cdef unsigned char* q
    cdef unsigned char c
    for i in range(n):
        if 65 <= p[i] <= 90:
            break
    else:
        return name
    out = PyBytes_FromStringAndSize(NULL, n)
    q = <unsigned char*>PyBytes_AS_STRING(out)
    for i in range(n):
        c = p[i]
        q[i] = c + 32 if 65 <= c <= 90 else c
    return out


cdef inline bint _named(bytes name, bytes wanted):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(name)
    return n == PyBytes_GET_SIZE(wanted) and name == wanted


cdef class HeaderList:
    """See the twin."""

    @property
    def index(self):
        """Each name's first value, made on first use."""
        if self._index is None:
            self._index = index_of(self.headers)
        return self._index

    cpdef header(self, name):
        """The first value of header `name` (lower-case), or None."""
        if self._index is not None:
            return self._index.get(name)
        return first_value(self.headers, name)


# -- headers read whole, kept from one head to the next ---------------------------
#
# Theory of operation. Most of a head's headers come again, byte for byte, in
# the next head on the hub (a client's own headers; a vendor's content type,
# limits and servers), and making each one's name, value and pair anew, and
# letting them go with the request, was most of what a head cost. So a
# header read whole within one read is looked up in a small direct-mapped
# cache of pairs, by a hash of its bytes as they came; a hit appends the
# cached (name, value) tuple, the very object the collector would have made
# (tuples and bytes are immutable, so sharing them changes no result). A
# miss makes the pair as before and, if it is plain (a name already in lower
# case, none of the names _add acts on, no '_', a value of at most
# _PAIR_VALUE_MAX bytes) and no credential (_NOT_KEPT: a key lives no
# longer than the head it came in), keeps it in its slot in place of
# whatever was there. The cache is bounded (_PAIRS slots) and a collision
# only costs a miss: headers chosen to collide slow their own head, nobody
# else's.

cdef enum:
    _PAIRS = 512  # slots, a power of two
    _PAIR_VALUE_MAX = 128  # bytes: a longer value is not kept

cdef list _pairs = [None] * _PAIRS
cdef NameSet _NOT_KEPT = NameSet({b"authorization", b"proxy-authorization", b"x-api-key", b"x-goog-api-key",
                                  b"api-key", b"cookie", b"set-cookie"})


cdef inline uint64_t _mix(uint64_t h, const char* p, Py_ssize_t n) noexcept:
    cdef uint64_t w
    while n >= 8:
        memcpy(&w, p, 8)
        h = (h ^ w) * <uint64_t>0x9E3779B97F4A7C15
        h ^= h >> 32
        p += 8
        n -= 8
    if n:
        w = 0
        memcpy(&w, p, n)
        h = (h ^ w) * <uint64_t>0x9E3779B97F4A7C15
        h ^= h >> 32
    return h


cdef inline Py_ssize_t _pair_slot(const char* name, Py_ssize_t nn, const char* value, Py_ssize_t vn) noexcept:
    cdef uint64_t h = _mix(_mix(<uint64_t>nn * 1315423911 + <uint64_t>vn, name, nn), value, vn)
    return <Py_ssize_t>((h ^ (h >> 29)) & (_PAIRS - 1))


cdef inline bint _pair_is(object pair, const char* name, Py_ssize_t nn, const char* value, Py_ssize_t vn) noexcept:
    cdef object n = <object>PyTuple_GET_ITEM(pair, 0)
    cdef object v = <object>PyTuple_GET_ITEM(pair, 1)
    return (PyBytes_GET_SIZE(n) == nn and PyBytes_GET_SIZE(v) == vn
            and memcmp(PyBytes_AS_STRING(n), name, nn) == 0 and memcmp(PyBytes_AS_STRING(v), value, vn) == 0)


cdef class HeaderCollector(HeaderList):
    # Its fields are declared in _wire.pxd, where _conn.pyx reads them.

    def __init__(self):
        self.reset()

    cpdef reset(self):
        self.headers = []
        self._index = None
        self.size = 0
        self.content_length = -1
        self.control = None
        self.hosts = 0
        self.sealed = False
        self._name = None
        self._value = None
        self._name_len = -1
        self._value_len = -1

    cpdef seal(self):
        self.sealed = True

    def on_header(self, bytes name not None, bytes value not None):
        self._add(name, value)

    # llhttp hands a header's name and value over in pieces, each a span of
    # the read it parses: a header is added when the next one starts, or the
    # head ends (or a chunked body's trailers do), as httptools adds it. A
    # span is only good while its read is parsed: one a header still holds
    # when the read ends is kept as bytes (_own), and the rest of its name
    # or value joined to them.
    cdef _name_span(self, const char* at, Py_ssize_t n):
        if self._value is not None or self._value_len >= 0:
            self._flush()
        if self._name is not None:
            self._name = self._name + at[:n]
        elif self._name_len >= 0:
            self._name = self._name_at[:self._name_len] + at[:n]
            self._name_len = -1
        else:
            self._name_at = at
            self._name_len = n

    cdef _value_span(self, const char* at, Py_ssize_t n):
        if self._value is not None:
            self._value = self._value + at[:n]
        elif self._value_len >= 0:
            self._value = self._value_at[:self._value_len] + at[:n]
            self._value_len = -1
        else:
            self._value_at = at
            self._value_len = n

    cdef int _own(self) except -1:
        # A span is held only while no bytes are (see _name_span).
        if self._name_len >= 0:
            self._name = self._name_at[:self._name_len]
            self._name_len = -1
        if self._value_len >= 0:
            self._value = self._value_at[:self._value_len]
            self._value_len = -1
        return 0

    cdef _flush(self):
        cdef bytes name, value
        cdef Py_ssize_t nn = self._name_len, vn = self._value_len
        if nn >= 0 and vn >= 0:
            self._name_len = self._value_len = -1
            self._add_whole(self._name_at, nn, self._value_at, vn)
            return
        if self._value is None and self._value_len < 0:
            return
        name = self._name if self._name_len < 0 else self._name_at[:self._name_len]
        value = self._value if self._value_len < 0 else self._value_at[:self._value_len]
        self._name = self._value = None
        self._name_len = self._value_len = -1
        self._add(b"" if name is None else name, value)

    cdef _add_whole(self, const char* name, Py_ssize_t nn, const char* value, Py_ssize_t vn):
        """A header read whole: the cached pair of its bytes, else the pair made and added (see above)."""
        cdef Py_ssize_t slot = -1
        cdef object pair
        cdef bytes made
        if vn <= _PAIR_VALUE_MAX:
            slot = _pair_slot(name, nn, value, vn)
            pair = <object>PyList_GET_ITEM(_pairs, slot)
            if pair is not None and _pair_is(pair, name, nn, value, vn):
                # _add's work for a plain header
                self.size += nn + vn + 4
                if not self.sealed:
                    self.headers.append(pair)
                    self._index = None
                return
        made = name[:nn]
        if self._add(made, value[:vn]) and slot >= 0:
            pair = <object>PyList_GET_ITEM(self.headers, PyList_GET_SIZE(self.headers) - 1)  # the one just added
            # its name was lower case as it came, and it is no credential
            if <object>PyTuple_GET_ITEM(pair, 0) is made and not _NOT_KEPT.has(made):
                _pairs[slot] = pair

    cdef bint _add(self, bytes name, bytes value) except -1:
        """on_header's work, called in C: names and values are bytes.
        Whether the header is a plain one, appended and nothing else."""
        cdef Py_ssize_t i, n
        cdef const unsigned char* v
        cdef long long length = 0
        cdef bint plain = False
        self.size += PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 4
        if self.sealed:
            return False
        name = _lower(name)
        if _named(name, _CONTENT_LENGTH):
            n = PyBytes_GET_SIZE(value)
            v = <const unsigned char*>PyBytes_AS_STRING(value)
            if n == 0 or n > 18:
                raise ValueError(f"invalid Content-Length {value!r}")
            for i in range(n):
                if not 48 <= v[i] <= 57:
                    raise ValueError(f"invalid Content-Length {value!r}")
                length = length * 10 + (v[i] - 48)
            self.content_length = length
        elif _named(name, _TRANSFER_ENCODING) or _named(name, _EXPECT) or _named(name, _CONNECTION):
            if self.control is None:
                self.control = []
            self.control.append((name, value))
        elif _named(name, _HOST):
            self.hosts += 1
        elif memchr(PyBytes_AS_STRING(name), 95, PyBytes_GET_SIZE(name)) != NULL:  # '_'
            if name.replace(b"_", b"-").strip(b"-") in FRAMING:
                raise ValueError(f"header name {name!r} may be read as a framing header")
        else:
            plain = True
        self.headers.append((name, value))
        self._index = None
        return plain


cpdef first_value(list headers, name):
    """See the twin. A scan that compares lengths before bytes: for the
    handful of names a request looks up, cheaper than hashing every name
    into a dict."""
    cdef Py_ssize_t i, count, size
    cdef const char* wanted
    cdef object item, key
    if headers is None:
        raise TypeError("first_value() takes a list, not None")
    count = PyList_GET_SIZE(headers)
    if type(name) is not bytes:
        for n, value in headers:
            if n == name:
                return value
        return None
    size = PyBytes_GET_SIZE(name)
    wanted = PyBytes_AS_STRING(name)
    for i in range(count):
        item = <object>PyList_GET_ITEM(headers, i)
        if type(item) is not tuple or PyTuple_GET_SIZE(item) != 2:
            raise TypeError("headers must be (name, value) tuples")
        key = <object>PyTuple_GET_ITEM(item, 0)
        if type(key) is bytes:
            if PyBytes_GET_SIZE(key) == size and memcmp(PyBytes_AS_STRING(key), wanted, size) == 0:
                return <object>PyTuple_GET_ITEM(item, 1)
        elif key == name:
            return <object>PyTuple_GET_ITEM(item, 1)
    return None


cpdef dict index_of(list headers):
    """See the twin (made once per head, when something asks for it)."""
    if headers is None:
        raise TypeError("index_of() takes a list, not None")
    cdef dict index = _PyDict_NewPresized(PyList_GET_SIZE(headers))
    for name, value in headers:
        PyDict_SetDefault(index, name, value)
    return index


cdef enum:
    _NAME_BUCKETS = 64  # names of 64 bytes and more share the last bucket


cdef class NameSet:
    """A fixed set of header names (bytes) that answers `in` by length and
    bytes, with no hashing: render_head asks it of every header of every
    head, and a parsed header's name is a new object each message, whose
    hash would be computed on each lookup. Made once from a set; `names`
    is that set, for everything else."""

    def __init__(self, names):
        buckets = [[] for _ in range(_NAME_BUCKETS)]
        self.names = frozenset(names)
        for name in self.names:
            if type(name) is not bytes:
                raise TypeError("a NameSet holds bytes")
            buckets[min(PyBytes_GET_SIZE(name), _NAME_BUCKETS - 1)].append(name)
        self._by_length = tuple(tuple(bucket) for bucket in buckets)

    cdef bint has(self, object name) except -1:
        cdef Py_ssize_t size, i, count
        cdef tuple bucket
        cdef object member
        if type(name) is not bytes:
            return name in self.names
        size = PyBytes_GET_SIZE(name)
        bucket = <tuple>PyTuple_GET_ITEM(self._by_length, size if size < _NAME_BUCKETS else _NAME_BUCKETS - 1)
        count = PyTuple_GET_SIZE(bucket)
        for i in range(count):
            member = <object>PyTuple_GET_ITEM(bucket, i)
            if (PyBytes_GET_SIZE(member) == size
                    and memcmp(PyBytes_AS_STRING(member), PyBytes_AS_STRING(name), size) == 0):
                return True
        return False

    def __contains__(self, name):
        return self.has(name)

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


cdef enum:
    # Headers whose places render_pieces keeps on the stack; a head with
    # more keeps them in memory it asks for.
    _KEPT_ON_STACK = 64


cdef bytes render_pieces(const Piece* before, Py_ssize_t nbefore, list headers, object drop,
                         const Piece* after, Py_ssize_t nafter):
    """The pieces `before`, then `name: value` CRLF for every header whose
    name is not in `drop`, then the pieces `after`, as one bytes object:
    render_head for callers that hold a head's start and tail in pieces,
    which it writes without joining them first."""
    cdef Py_ssize_t count, i, j, total = 0, at = 0, ln, lv, nkept = 0
    cdef Py_ssize_t kept_on_stack[_KEPT_ON_STACK]
    cdef Py_ssize_t* kept = kept_on_stack
    cdef object item, name, value
    cdef char* out
    cdef bint by_length = type(drop) is NameSet
    count = PyList_GET_SIZE(headers)
    for i in range(nbefore):
        total += before[i].size
    for i in range(nafter):
        total += after[i].size
    if count > _KEPT_ON_STACK:
        kept = <Py_ssize_t*>PyMem_Malloc(count * sizeof(Py_ssize_t))
        if kept == NULL:
            raise MemoryError()
    try:
        for i in range(count):
            item = <object>PyList_GET_ITEM(headers, i)
            if type(item) is not tuple or PyTuple_GET_SIZE(item) != 2:
                raise TypeError("headers must be (name, value) tuples")
            name = <object>PyTuple_GET_ITEM(item, 0)
            value = <object>PyTuple_GET_ITEM(item, 1)
            if type(name) is not bytes or type(value) is not bytes:
                raise TypeError("header names and values must be bytes")
            if by_length:
                if (<NameSet>drop).has(name):
                    continue
            elif PySet_Contains(drop, name):
                continue
            kept[nkept] = i
            nkept += 1
            total += PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 4
        result = PyBytes_FromStringAndSize(NULL, total)
        out = PyBytes_AS_STRING(result)
        for i in range(nbefore):
            memcpy(out + at, before[i].data, before[i].size)
            at += before[i].size
        for j in range(nkept):
            # The items counted above: no Python code has run since (a bytes
            # object is not tracked by the collector, so making one starts
            # no collection and no finalizer).
            item = <object>PyList_GET_ITEM(headers, kept[j])
            name = <object>PyTuple_GET_ITEM(item, 0)
            value = <object>PyTuple_GET_ITEM(item, 1)
            ln = PyBytes_GET_SIZE(name)
            lv = PyBytes_GET_SIZE(value)
            memcpy(out + at, PyBytes_AS_STRING(name), ln)
            at += ln
            out[at] = 58   # ':'
            out[at + 1] = 32   # ' '
            at += 2
            memcpy(out + at, PyBytes_AS_STRING(value), lv)
            at += lv
            out[at] = 13
            out[at + 1] = 10
            at += 2
        for i in range(nafter):
            memcpy(out + at, after[i].data, after[i].size)
            at += after[i].size
    finally:
        if kept != kept_on_stack:
            PyMem_Free(kept)
    return result


cpdef bytes render_head(bytes start, list headers, object drop, bytes tail):
    cdef Piece before, after
    # A C call from the gateway's head functions (_heads.pyx); from Python,
    # None is refused as a def's `not None` would refuse it.
    if start is None or headers is None or drop is None or tail is None:
        raise TypeError("render_head() takes bytes, a list, a set (or a NameSet) and bytes, not None")
    before = piece_of(start)
    after = piece_of(tail)
    return render_pieces(&before, 1, headers, drop, &after, 1)
