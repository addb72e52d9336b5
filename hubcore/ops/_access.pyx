# cython: language_level=3
"""The access log's per-request line, compiled: the twin of `_access_py.py`
(see there for the contract; tests/ops/test_access_core.py holds both to
it).

The same steps in the same order; what changes is that `record` is a C
method and the stamp and the buffer are C calls on typed fields rather
than two more Python calls per request, and that a text line is written
field by field into a C buffer (`_text_line`) rather than by `str %`.
`_timestamp` and `_append` stay callable from Python (AccessLog.refused
uses them) through thin wrappers."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
from cpython.object cimport PyObject_Str
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_CheckExact, PyUnicode_DecodeUTF8
from libc.math cimport frexp, isfinite, ldexp, signbit
from libc.stdio cimport snprintf
from libc.string cimport memchr, memcpy

from hubcore._digits cimport write_decimal
from hubcore.accounting._rows cimport (
    F_ATTEMPTS, F_CACHE_READ, F_CACHE_WRITE_1H, F_CACHE_WRITE_5M, F_COST_MICROS, F_ENDPOINT, F_INPUT_TOKENS,
    F_KEY_LABEL, F_MODEL, F_OUTCOME, F_OUTPUT_TOKENS, F_PROJECT, F_REQUEST_ID, F_STATUS, F_TOTAL_MS, F_TS,
    F_TTFB_MS, F_USER, event_field,
)

import time

from hubcore.ops._access_py import _JSON_FIELDS, TEXT_LINE, _json_line

cdef str _TEXT_LINE = TEXT_LINE  # typed, so `%` is PyUnicode_Format

# A text line is written into a C buffer of this size, field by field, as
# TEXT_LINE's conversions would write it. A line that does not fit, or a
# field that is not of the type its conversion expects on the common path
# (an int that is not an exact int or does not fit 64 bits, a float that
# is not a finite exact float, a str that UTF-8 cannot encode), is made
# with TEXT_LINE instead: the same text either way. The literal pieces of
# _text_line are TEXT_LINE's (tests/ops/test_access_core.py holds the
# lines of both twins byte for byte).
cdef enum:
    LINE_MAX = 1024


cdef struct _Line:
    char buf[LINE_MAX]
    Py_ssize_t n


cdef inline bint _bytes(_Line* line, const char* s, Py_ssize_t size) noexcept:
    if line.n + size > LINE_MAX:
        return False
    memcpy(line.buf + line.n, s, size)
    line.n += size
    return True


cdef inline bint _lit(_Line* line, bytes text) noexcept:
    return _bytes(line, PyBytes_AS_STRING(text), PyBytes_GET_SIZE(text))


cdef bint _str(_Line* line, value) except -1:
    """`%s` of `value`: str(value) (an Outcome's text), in UTF-8."""
    cdef Py_ssize_t size
    cdef const char* s
    if not PyUnicode_CheckExact(value):
        value = PyObject_Str(value)
    try:
        s = PyUnicode_AsUTF8AndSize(value, &size)
    except UnicodeEncodeError:
        return False  # a lone surrogate: TEXT_LINE's text has it
    return _bytes(line, s, size)


cdef bint _int(_Line* line, value) except -1:
    """`%d` (or `%s`) of an exact int that fits 64 bits, in decimal."""
    cdef int overflow = 0
    cdef long long v
    cdef unsigned long long u
    cdef char digits[24]
    cdef int i = 24
    if not PyLong_CheckExact(value):
        return False
    v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow:
        return False
    # Negated as unsigned: the most negative value has no positive twin.
    u = (0ULL - <unsigned long long>v) if v < 0 else <unsigned long long>v
    i -= write_decimal(digits + i, u)
    if v < 0:
        i -= 1
        digits[i] = 45  # '-'
    return _bytes(line, digits + i, 24 - i)


# The fast path of `%.3f`: a time in milliseconds under this many (31
# years; a request's times are far below it) is written from its exact
# binary value by integer arithmetic, without printf.
cdef double _MILLIS_EXACT_BELOW = 1e12

cdef unsigned long long _thousandths(double v) noexcept:
    """round(v * 1000) for 0 <= v < _MILLIS_EXACT_BELOW, computed on v's
    exact binary value and rounded half to even, as Python's and C's `%.3f`
    round it: v is m * 2**-shift for an integer m of at most 53 bits, so
    v * 1000 is m * 1000 (below 2**63, exact) shifted right by `shift`."""
    cdef int exponent
    cdef double fraction
    cdef unsigned long long m, scaled, quotient, rest, half
    cdef int shift
    if v == 0.0:
        return 0
    fraction = frexp(v, &exponent)  # v = fraction * 2**exponent, 0.5 <= fraction < 1
    m = <unsigned long long>ldexp(fraction, 53)  # exact: 53 bits at most
    shift = 53 - exponent  # at least 13: v < 1e12 < 2**40
    if shift >= 64:
        return 0  # v * 1000 < 2**63 / 2**64: under a half
    scaled = m * 1000
    quotient = scaled >> shift
    rest = scaled & ((1ULL << shift) - 1)
    half = 1ULL << (shift - 1)
    if rest > half or (rest == half and (quotient & 1)):
        quotient += 1
    return quotient


cdef bint _millis(_Line* line, value) except -1:
    """`%.3f` of a finite exact float: written from its exact binary value,
    correctly rounded, as Python and C's printf write it (by hand below
    _MILLIS_EXACT_BELOW, else by snprintf); NaN and the infinities are
    spelled differently, and take TEXT_LINE, as does a number snprintf
    writes with a decimal comma (a process whose LC_NUMERIC some library
    changed)."""
    cdef double v
    cdef int written
    cdef unsigned long long whole
    cdef char digits[32]
    cdef int i = 32, k
    if not PyFloat_CheckExact(value):
        return False
    v = PyFloat_AS_DOUBLE(value)
    if not isfinite(v):
        return False
    if 0.0 <= v < _MILLIS_EXACT_BELOW and not signbit(v):
        whole = _thousandths(v)
        for k in range(3):  # the thousandths, zeros included
            i -= 1
            digits[i] = <char>(48 + whole % 10)
            whole //= 10
        i -= 1
        digits[i] = 46  # '.'
        i -= write_decimal(digits + i, whole)
        return _bytes(line, digits + i, 32 - i)
    written = snprintf(line.buf + line.n, LINE_MAX - line.n, "%.3f", v)
    if written < 0 or written >= LINE_MAX - line.n or memchr(line.buf + line.n, 44, written) != NULL:
        return False
    line.n += written
    return True


cdef tuple _FIELDS = _JSON_FIELDS
cdef object _strftime = time.strftime
cdef object _localtime = time.localtime


cdef class AccessCore:
    """See _access_py.AccessCore."""

    cdef public object loop
    cdef public bint json
    cdef public double flush_interval
    cdef public list lines
    cdef public object timer
    cdef long long _second
    cdef str _stamp

    def __init__(self, loop, bint json, double flush_interval):
        self.loop = loop
        self.json = json
        self.flush_interval = flush_interval
        self.lines = []
        self.timer = None
        self._second = -1
        self._stamp = ""

    cpdef record(self, event, client=None):
        """See the twin."""
        if self.json:
            line = _json_line(event.ts, {k: getattr(event, k) for k in _FIELDS}, client)
        else:
            line = self._text_line(event, client)
        self._add(line)

    cdef str _text_line(self, event, client):
        """TEXT_LINE % (the event's fields), written into a C buffer (see
        LINE_MAX), else by TEXT_LINE itself."""
        cdef _Line line
        line.n = 0
        stamp = self._stamp_of(event_field(event, F_TS))
        ttfb_ms = event_field(event, F_TTFB_MS)
        cost_micros = event_field(event, F_COST_MICROS)
        if (
            _str(&line, stamp) and _lit(&line, b" access ") and _str(&line, event_field(event, F_REQUEST_ID))
            and _lit(&line, b" user=") and _str(&line, event_field(event, F_USER) or "-")
            and _lit(&line, b" project=") and _str(&line, event_field(event, F_PROJECT) or "-")
            and _lit(&line, b" model=") and _str(&line, event_field(event, F_MODEL) or "-")
            and _lit(&line, b" key=") and _str(&line, event_field(event, F_KEY_LABEL) or "-")
            and _lit(&line, b" status=") and _int(&line, event_field(event, F_STATUS))
            and _lit(&line, b" outcome=") and _str(&line, event_field(event, F_OUTCOME))
            and _lit(&line, b" in=") and _int(&line, event_field(event, F_INPUT_TOKENS))
            and _lit(&line, b" out=") and _int(&line, event_field(event, F_OUTPUT_TOKENS))
            and _lit(&line, b" cw5m=") and _int(&line, event_field(event, F_CACHE_WRITE_5M))
            and _lit(&line, b" cw1h=") and _int(&line, event_field(event, F_CACHE_WRITE_1H))
            and _lit(&line, b" cr=") and _int(&line, event_field(event, F_CACHE_READ))
            and _lit(&line, b" cost_micros=")
            and (_lit(&line, b"-") if cost_micros is None else _int(&line, cost_micros))
            and _lit(&line, b" ttfb_ms=")
            and (_lit(&line, b"-") if ttfb_ms is None else _millis(&line, ttfb_ms))
            and _lit(&line, b" total_ms=") and _millis(&line, event_field(event, F_TOTAL_MS))
            and _lit(&line, b" attempts=") and _int(&line, event_field(event, F_ATTEMPTS))
            and _lit(&line, b" endpoint=") and _str(&line, event_field(event, F_ENDPOINT))
            and _lit(&line, b" client=") and _str(&line, client or "-")
            and _lit(&line, b"\n")
        ):
            return PyUnicode_DecodeUTF8(line.buf, line.n, NULL)
        return _TEXT_LINE % (
            stamp, event.request_id, event.user or "-", event.project or "-",
            event.model or "-", event.key_label or "-", event.status, event.outcome, event.input_tokens,
            event.output_tokens, event.cache_write_5m, event.cache_write_1h, event.cache_read,
            "-" if cost_micros is None else cost_micros,
            "-" if ttfb_ms is None else "%.3f" % ttfb_ms, event.total_ms, event.attempts,
            event.endpoint, client or "-",
        )

    def _append(self, line):
        self._add(line)

    def _timestamp(self, double ts):
        return self._stamp_of(ts)

    cdef _add(self, line):
        self.lines.append(line)
        if self.timer is None:
            self.timer = self.loop.call_later(self.flush_interval, self.flush)

    cdef str _stamp_of(self, double ts):
        # int(ts): C truncates toward zero as int() does (ts is a unix time).
        cdef long long second = <long long>ts
        if second != self._second:
            self._second = second
            self._stamp = _strftime("%Y-%m-%d %H:%M:%S", _localtime(second))
        return self._stamp
