# Every index below is checked by hand against its buffer's length; Cython's
# own bounds check would add a second branch per byte.
# cython: boundscheck=False
# No index is ever negative, so the negative-index fix-up is dead code.
# cython: wraparound=False
# Memoryviews are bound before every use; skip the "is it bound?" test.
# cython: initializedcheck=False
# The only % is on a non-negative count; C division needs no Python fix-up.
# cython: cdivision=True
"""Compiled twin of the streaming meter: the SSE framing, event sorting and delta text counting in C.

Mirrors `_meter_py.py` method for method (same names, same numbers); the few
events that carry usage are decoded with orjson as there, except Anthropic's
message_start and message_delta, walked in place into the members that matter;
what they mean is read by the same code, `_meter_interpret.Reading`.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.stdint cimport uint64_t
from libc.string cimport memchr, memcmp, memcpy

import orjson

from hubcore._meter_errors import MeterError
# What is not per byte lives once, for both twins: the formats, the caps, and
# what each decoded object means (usage, model, stop reason, errors, the text
# of the deltas the walk below leaves to orjson).
from hubcore.accounting import _meter_interpret as _interpret
from hubcore.accounting._meter_interpret import (
    FMT_ANTHROPIC, FMT_OPENAI_CHAT, FMT_OPENAI_RESPONSES, MAX_BODY_SIZE, MAX_EVENT_SIZE,
)
# Reading is compiled with a C layout (_meter_interpret.pxd, cimported by
# _meter.pxd): its counters and calls are struct fields and C calls from here.

cdef enum:
    # Bytes. A buffer that grew past this for one big event is freed after
    # it, so a long stream does not keep its largest event's memory.
    _KEEP_CAPACITY = 64 * 1024

# The formats and what an event is (from its `event:` name or its data's
# "type"), numbered once, in the shared module; as C ints here.
cdef int _FMT_ANTHROPIC = FMT_ANTHROPIC
cdef int _FMT_RESPONSES = FMT_OPENAI_RESPONSES
cdef int _FMT_CHAT = FMT_OPENAI_CHAT
cdef int _SNIFF = _interpret.SNIFF
cdef int _SKIP = _interpret.SKIP
cdef int _A_START = _interpret.A_START
cdef int _A_DELTA = _interpret.A_DELTA
cdef int _A_STOP = _interpret.A_STOP
cdef int _A_BLOCK = _interpret.A_BLOCK
cdef int _ERROR = _interpret.ERROR
cdef int _R_CREATED = _interpret.R_CREATED
cdef int _R_COMPLETED = _interpret.R_COMPLETED
cdef int _R_INCOMPLETE = _interpret.R_INCOMPLETE
cdef int _R_FAILED = _interpret.R_FAILED
cdef int _A_TEXT = _interpret.A_TEXT
cdef int _R_TEXT = _interpret.R_TEXT

cdef object _loads = orjson.loads
cdef object _JSONDecodeError = orjson.JSONDecodeError
cdef const unsigned char* _EMPTY = <const unsigned char*>b""

_NOTHING = (None, False, None, None)
_WANTED_KEYS = {b'"model"': 1, b'"stream"': 2, b'"metadata"': 3, b'"prompt_cache_key"': 4}
_USER_ID_KEY = {b'"user_id"': 1}

# Bytes that open, close or quote a JSON value, bytes that end a scalar, and
# bytes that stand for themselves inside a JSON string (ASCII, not a quote,
# backslash or control character).
cdef unsigned char _STRUCTURAL[256]
cdef unsigned char _SCALAR_END[256]
cdef unsigned char _STR_PLAIN[256]


cdef void _init_tables() noexcept:
    cdef int c
    for c in range(256):
        _STRUCTURAL[c] = 0
        _SCALAR_END[c] = 0
        _STR_PLAIN[c] = 0x20 <= c < 0x80 and c != 34 and c != 92
    for c in b'"{}[]':
        _STRUCTURAL[c] = 1
    for c in b",}] \t\n\r":
        _SCALAR_END[c] = 1


_init_tables()


# -- growable byte buffer -----------------------------------------------------

# Buf (a growable byte buffer) is declared in _meter.pxd.


cdef int _buf_put(Buf* b, const unsigned char* p, Py_ssize_t n) except -1:
    cdef Py_ssize_t need = b.len + n
    cdef Py_ssize_t cap
    cdef unsigned char* grown
    if need > b.cap:
        cap = b.cap * 2 if b.cap else 256
        while cap < need:
            cap *= 2
        grown = <unsigned char*>PyMem_Realloc(b.data, cap)
        if grown == NULL:
            raise MemoryError()
        b.data = grown
        b.cap = cap
    if n:
        memcpy(b.data + b.len, p, n)
    b.len = need
    return 0


cdef void _buf_free(Buf* b) noexcept:
    PyMem_Free(b.data)
    b.data = NULL
    b.len = 0
    b.cap = 0


# -- byte-level helpers --------------------------------------------------------

cdef inline bint _is_ws(unsigned char c) noexcept:
    return c == 32 or c == 10 or c == 13 or c == 9


cdef inline Py_ssize_t _skip_ws(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) noexcept:
    while i < n and _is_ws(p[i]):
        i += 1
    return i


cdef inline Py_ssize_t _eol(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) noexcept:
    """Index of the first \\r or \\n at or after i, or n."""
    cdef const unsigned char* q = <const unsigned char*>memchr(p + i, 10, n - i)
    cdef Py_ssize_t e = n if q == NULL else q - p
    if e > i:
        q = <const unsigned char*>memchr(p + i, 13, e - i)
        if q != NULL:
            e = q - p
    return e


cdef inline bint _eq(const unsigned char* p, Py_ssize_t n, const char* s, Py_ssize_t sn) noexcept:
    return n == sn and memcmp(p, s, sn) == 0


cdef int _lookup(int fmt, const unsigned char* s, Py_ssize_t n) noexcept:
    """The kind of a named event (or data "type"), _SKIP when not one we read."""
    if fmt == _FMT_ANTHROPIC:
        if n == 13:
            if memcmp(s, b"message_start", 13) == 0:
                return _A_START
            if memcmp(s, b"message_delta", 13) == 0:
                return _A_DELTA
        elif _eq(s, n, b"message_stop", 12):
            return _A_STOP
        elif n == 19:
            if memcmp(s, b"content_block_delta", 19) == 0:
                return _A_TEXT
            if memcmp(s, b"content_block_start", 19) == 0:
                return _A_BLOCK
        elif _eq(s, n, b"error", 5):
            return _ERROR
    elif fmt == _FMT_RESPONSES:
        if n > 9 and memcmp(s, b"response.", 9) == 0:
            if _eq(s, n, b"response.created", 16) or _eq(s, n, b"response.in_progress", 20):
                return _R_CREATED
            if _eq(s, n, b"response.completed", 18):
                return _R_COMPLETED
            if _eq(s, n, b"response.incomplete", 19):
                return _R_INCOMPLETE
            if _eq(s, n, b"response.failed", 15):
                return _R_FAILED
            # every response.<...>.delta carries text, but for base64 audio
            if n >= 15 and memcmp(s + n - 6, b".delta", 6) == 0 and not _eq(s, n, b"response.audio.delta", 20):
                return _R_TEXT
        elif _eq(s, n, b"error", 5):
            return _ERROR
    return _SKIP


cdef inline int _name_kind(int fmt, const unsigned char* s, Py_ssize_t n) noexcept:
    if n == 0 or _eq(s, n, b"message", 7):
        return _SNIFF
    return _lookup(fmt, s, n)


cdef bint _sniff_type(const unsigned char* p, Py_ssize_t n, Py_ssize_t* start, Py_ssize_t* end) noexcept:
    """Find `{"type":"<name>"` at the start of p (JSON spaces allowed).

    False when the data starts otherwise or the name holds a backslash: the
    caller then decodes the whole event.
    """
    cdef Py_ssize_t i = _skip_ws(p, 0, n)
    if i >= n or p[i] != 123:
        return False
    i = _skip_ws(p, i + 1, n)
    if i + 6 > n or memcmp(p + i, b'"type"', 6) != 0:
        return False
    i = _skip_ws(p, i + 6, n)
    if i >= n or p[i] != 58:
        return False
    i = _skip_ws(p, i + 1, n)
    if i >= n or p[i] != 34:
        return False
    i += 1
    start[0] = i
    while i < n:
        if p[i] == 34:
            end[0] = i
            return True
        if p[i] == 92:
            return False
        i += 1
    return False


cdef inline bint _member_at(
    const unsigned char* p, Py_ssize_t k, Py_ssize_t n,
    const char* key, Py_ssize_t kn, const char* val, Py_ssize_t vn,
) noexcept:
    """Whether p[k:] is `<key> : <val...>` (key with its quotes, JSON spaces allowed)."""
    cdef Py_ssize_t j
    if k + kn > n or memcmp(p + k, key, kn) != 0:
        return False
    j = _skip_ws(p, k + kn, n)
    if j >= n or p[j] != 58:
        return False
    j = _skip_ws(p, j + 1, n)
    return j + vn <= n and memcmp(p + j, val, vn) == 0


cdef bint _has_member(
    const unsigned char* p, Py_ssize_t n,
    const char* key, Py_ssize_t kn, const char* val, Py_ssize_t vn,
    const char* key2, Py_ssize_t kn2, const char* val2, Py_ssize_t vn2,
) noexcept:
    """Whether a `<key>:<val...>` member (or the second pair, if kn2) appears anywhere.

    A quote preceded by a backslash is inside a JSON string (text that merely
    mentions "usage"); a structural quote never is.
    """
    cdef Py_ssize_t i = 0, k
    cdef const unsigned char* q
    while i < n:
        q = <const unsigned char*>memchr(p + i, 34, n - i)
        if q == NULL:
            return False
        k = q - p
        if k == 0 or p[k - 1] != 92:
            if _member_at(p, k, n, key, kn, val, vn):
                return True
            if kn2 and _member_at(p, k, n, key2, kn2, val2, vn2):
                return True
        i = k + 1
    return False


cdef bint _error_first(const unsigned char* p, Py_ssize_t n) noexcept:
    """Whether the data is an object whose first member is "error"."""
    cdef Py_ssize_t i = _skip_ws(p, 0, n)
    if i >= n or p[i] != 123:
        return False
    i = _skip_ws(p, i + 1, n)
    if i + 7 > n or memcmp(p + i, b'"error"', 7) != 0:
        return False
    i = _skip_ws(p, i + 7, n)
    return i < n and p[i] == 58


# -- counting the text of a delta event -----------------------------------------
#
# Theory of operation. A cut stream's output is estimated from the characters
# of text its deltas carried, as the pure twin finds them: orjson decodes the
# event and the length of each text string is taken. Decoding every delta
# that way made this meter about 15 times slower on bench.meter's Claude Code
# stream (1,200 deltas in 232 KiB), so here the event is walked once in
# place, which costs about 3.7 times the framing alone (some 0.17 us per
# delta): the walk checks that the whole event is JSON orjson would accept,
# follows the path to the text members (a small tree of _N_* nodes per
# format) and counts the characters of their strings as decoded (a UTF-8
# sequence or an escape is one character; an escaped surrogate pair too).
# Whatever it is not sure of -- an escaped key, a repeated wanted key (orjson
# keeps the last), a lone surrogate, an exponent, a very long number, deep
# nesting, anything that is not JSON -- makes it answer -1, and the event goes
# to orjson as in the pure twin (which also counts it in `malformed` when it
# is not JSON). So the walk only ever agrees with orjson or steps aside.
# Anthropic's deltas come spelled one way; `_anthropic_delta_chars` compares
# that spelling whole and walks only the index and the text, which brings the
# cost to about 2.5 times the framing (some 0.09 us per delta).

cdef enum:
    # Nesting past this goes to orjson (real delta events nest 4 deep).
    _MAX_DEPTH = 32
    # Bytes; a longer number goes to orjson. 18 digits always fit the int64
    # orjson reads integers into, and a double without an exponent never
    # overflows.
    _MAX_NUMBER = 18

# Where a value sits in a delta event: what the walk wants from it.
cdef enum:
    _N_NONE = 0  # nothing: validated only
    _N_TEXT = 1  # a string whose characters count
    _N_A_ROOT = 2  # Anthropic content_block_delta: "delta" -> _N_A_DELTA
    _N_A_DELTA = 3  # "text", "thinking", "partial_json" -> _N_TEXT
    _N_R_ROOT = 4  # Responses response.<...>.delta: "delta" -> _N_TEXT
    _N_C_ROOT = 5  # Chat chunk: "choices" -> _N_C_CHOICES
    _N_C_CHOICES = 6  # [_N_C_CHOICE]
    _N_C_CHOICE = 7  # "delta" -> _N_C_DELTA
    _N_C_DELTA = 8  # "content", "reasoning_content", "refusal" -> _N_TEXT; "tool_calls" -> _N_C_CALLS
    _N_C_CALLS = 9  # [_N_C_CALL]
    _N_C_CALL = 10  # "function" -> _N_C_FUNC
    _N_C_FUNC = 11  # "arguments" -> _N_TEXT


cdef extern from *:
    """
    /* How many bytes of a word loaded from memory come before the first byte
       flagged in `m` (m != 0): a count of trailing zeros where the first byte
       is the least significant. Elsewhere HUBCORE_CTZ_BYTES is 0 and the
       caller walks the bytes instead. */
    #if defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    #define HUBCORE_CTZ_BYTES 1
    static inline int hubcore_bytes_before_flag(uint64_t m) { return __builtin_ctzll(m) >> 3; }
    #else
    #define HUBCORE_CTZ_BYTES 0
    static inline int hubcore_bytes_before_flag(uint64_t m) { (void)m; return 0; }
    #endif
    """
    const bint HUBCORE_CTZ_BYTES
    int hubcore_bytes_before_flag(uint64_t m) noexcept nogil


cdef inline uint64_t _special8(uint64_t w) noexcept:
    """The high bit of each of 8 bytes that may end a run of plain string text.

    That is, a non-ASCII byte, a quote, a backslash or a control character
    (the classic has-zero-byte / has-byte-less-than tests). None is ever
    missed, and the first flagged byte is always a real one: a false alarm
    can only follow a real one, where the borrow of the subtraction went.
    """
    cdef uint64_t ones = (~<uint64_t>0) // 255  # 0x0101...01
    cdef uint64_t q = w ^ (ones * 0x22)
    cdef uint64_t b = w ^ (ones * 0x5C)
    return (w | ((q - ones) & ~q) | ((b - ones) & ~b) | ((w - ones * 0x20) & ~w)) & (ones * 0x80)


cdef inline int _hex4(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) noexcept:
    """The value of 4 hex digits at p[i], or -1."""
    cdef int v = 0, k
    cdef unsigned char c
    if i + 4 > n:
        return -1
    for k in range(4):
        c = p[i + k]
        if 48 <= c <= 57:
            v = v * 16 + (c - 48)
        elif 97 <= c <= 102:
            v = v * 16 + (c - 87)
        elif 65 <= c <= 70:
            v = v * 16 + (c - 55)
        else:
            return -1
    return v


cdef inline Py_ssize_t _utf8_len(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) noexcept:
    """Length of the valid UTF-8 sequence at p[i] (no overlong form, no surrogate, <= U+10FFFF), or 0."""
    cdef unsigned char c = p[i]
    cdef unsigned char lo = 0x80, hi = 0xBF
    cdef Py_ssize_t k, j
    if 0xC2 <= c <= 0xDF:
        k = 2
    elif 0xE0 <= c <= 0xEF:
        k = 3
        if c == 0xE0:
            lo = 0xA0
        elif c == 0xED:
            hi = 0x9F
    elif 0xF0 <= c <= 0xF4:
        k = 4
        if c == 0xF0:
            lo = 0x90
        elif c == 0xF4:
            hi = 0x8F
    else:
        return 0
    if i + k > n or not (lo <= p[i + 1] <= hi):
        return 0
    for j in range(2, k):
        if not (0x80 <= p[i + j] <= 0xBF):
            return 0
    return k


cdef Py_ssize_t _jstring(const unsigned char* p, Py_ssize_t i, Py_ssize_t n, Py_ssize_t* chars) noexcept:
    """Index past the JSON string opening at p[i], adding its decoded length to chars; -1 if unsure."""
    cdef Py_ssize_t count = 0, k
    cdef uint64_t w, m
    cdef unsigned char c
    cdef int cp, low
    i += 1
    while True:
        m = 0
        while i + 8 <= n:
            memcpy(&w, p + i, 8)
            m = _special8(w)
            if m:
                break
            count += 8
            i += 8
        # something else is in the next 8 bytes (or the data ends): go to it
        if m and HUBCORE_CTZ_BYTES:
            k = hubcore_bytes_before_flag(m)
            count += k
            i += k
        else:
            while i < n and _STR_PLAIN[p[i]]:
                count += 1
                i += 1
        if i >= n:
            return -1
        c = p[i]
        if c == 34:
            chars[0] += count
            return i + 1
        if c == 92:
            if i + 1 >= n:
                return -1
            c = p[i + 1]
            if c == 117:  # a \u escape: four hex digits follow
                cp = _hex4(p, i + 2, n)
                if cp < 0:
                    return -1
                i += 6
                if 0xD800 <= cp <= 0xDFFF:
                    # a pair is one character; orjson refuses a lone half
                    if cp >= 0xDC00 or i + 1 >= n or p[i] != 92 or p[i + 1] != 117:
                        return -1
                    low = _hex4(p, i + 2, n)
                    if not (0xDC00 <= low <= 0xDFFF):
                        return -1
                    i += 6
            elif c == 34 or c == 92 or c == 47 or c == 98 or c == 102 or c == 110 or c == 114 or c == 116:
                i += 2
            else:
                return -1
            count += 1
        elif c < 0x80:  # a control character
            return -1
        else:
            # non-ASCII text comes in runs
            while True:
                k = _utf8_len(p, i, n)
                if k == 0:
                    return -1
                count += 1
                i += k
                if i >= n or p[i] < 0x80:
                    break


cdef inline Py_ssize_t _jnumber(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) noexcept:
    """Index past the JSON number at p[i] (no exponent), or -1."""
    cdef Py_ssize_t s = i
    if p[i] == 45:  # -
        i += 1
    if i >= n:
        return -1
    if p[i] == 48:  # a leading 0 stands alone
        i += 1
    elif 49 <= p[i] <= 57:
        while i < n and 48 <= p[i] <= 57:
            i += 1
    else:
        return -1
    if i < n and p[i] == 46:  # .
        i += 1
        if i >= n or not (48 <= p[i] <= 57):
            return -1
        while i < n and 48 <= p[i] <= 57:
            i += 1
    if i < n and (p[i] == 101 or p[i] == 69):  # e, E: may overflow a double
        return -1
    return i if i - s <= _MAX_NUMBER else -1


cdef inline int _member_node(int node, const unsigned char* k, Py_ssize_t kn, int* slot) noexcept:
    """The node of member `k` in an object at `node`, and its bit in `slot` (0 if not wanted)."""
    slot[0] = 0
    if node == _N_A_ROOT or node == _N_R_ROOT or node == _N_C_CHOICE:
        if _eq(k, kn, b"delta", 5):
            slot[0] = 1
            return _N_A_DELTA if node == _N_A_ROOT else _N_TEXT if node == _N_R_ROOT else _N_C_DELTA
    elif node == _N_A_DELTA:
        if _eq(k, kn, b"text", 4):
            slot[0] = 1
        elif _eq(k, kn, b"thinking", 8):
            slot[0] = 2
        elif _eq(k, kn, b"partial_json", 12):
            slot[0] = 4
        if slot[0]:
            return _N_TEXT
    elif node == _N_C_ROOT:
        if _eq(k, kn, b"choices", 7):
            slot[0] = 1
            return _N_C_CHOICES
    elif node == _N_C_DELTA:
        if _eq(k, kn, b"content", 7):
            slot[0] = 1
        elif _eq(k, kn, b"reasoning_content", 17):
            slot[0] = 2
        elif _eq(k, kn, b"refusal", 7):
            slot[0] = 4
        elif _eq(k, kn, b"tool_calls", 10):
            slot[0] = 8
            return _N_C_CALLS
        if slot[0]:
            return _N_TEXT
    elif node == _N_C_CALL:
        if _eq(k, kn, b"function", 8):
            slot[0] = 1
            return _N_C_FUNC
    elif node == _N_C_FUNC:
        if _eq(k, kn, b"arguments", 9):
            slot[0] = 1
            return _N_TEXT
    return _N_NONE


cdef Py_ssize_t _jvalue(
    const unsigned char* p, Py_ssize_t i, Py_ssize_t n, int node, int depth, Py_ssize_t* chars,
) noexcept:
    """Index past the JSON value at p[i] (not whitespace), counting the text it holds; -1 if unsure."""
    cdef unsigned char c
    cdef Py_ssize_t ignored = 0, ks
    cdef int child, slot, seen = 0
    if i >= n:
        return -1
    c = p[i]
    if c == 34:
        return _jstring(p, i, n, chars if node == _N_TEXT else &ignored)
    if c == 123 or c == 91:
        if depth >= _MAX_DEPTH:
            return -1
        i = _skip_ws(p, i + 1, n)
        if i < n and p[i] == c + 2:  # } or ]
            return i + 1
        child = _N_NONE
        if c == 91:
            if node == _N_C_CHOICES:
                child = _N_C_CHOICE
            elif node == _N_C_CALLS:
                child = _N_C_CALL
        while True:
            if c == 123:
                if i >= n or p[i] != 34:
                    return -1
                ks = i + 1
                i = _jstring(p, i, n, &ignored)
                if i < 0:
                    return -1
                if node > _N_TEXT:
                    # an escaped key may spell a wanted one; a repeated one
                    # counts only as its last value: orjson decides both
                    if memchr(p + ks, 92, i - 1 - ks) != NULL:
                        return -1
                    child = _member_node(node, p + ks, i - 1 - ks, &slot)
                    if seen & slot:
                        return -1
                    seen |= slot
                i = _skip_ws(p, i, n)
                if i >= n or p[i] != 58:
                    return -1
                i = _skip_ws(p, i + 1, n)
            i = _jvalue(p, i, n, child, depth + 1, chars)
            if i < 0:
                return -1
            i = _skip_ws(p, i, n)
            if i >= n:
                return -1
            if p[i] == 44:  # ,
                i = _skip_ws(p, i + 1, n)
            elif p[i] == c + 2:
                return i + 1
            else:
                return -1
    if c == 45 or 48 <= c <= 57:
        return _jnumber(p, i, n)
    if c == 116 and i + 4 <= n and memcmp(p + i, b"true", 4) == 0:
        return i + 4
    if c == 102 and i + 5 <= n and memcmp(p + i, b"false", 5) == 0:
        return i + 5
    if c == 110 and i + 4 <= n and memcmp(p + i, b"null", 4) == 0:
        return i + 4
    return -1


cdef Py_ssize_t _delta_chars(const unsigned char* p, Py_ssize_t n, int root) noexcept:
    """Characters of text in a delta event, as the pure twin counts them after orjson; -1 if unsure."""
    cdef Py_ssize_t chars = 0
    cdef Py_ssize_t i = _jvalue(p, _skip_ws(p, 0, n), n, root, 0, &chars)
    if i < 0 or _skip_ws(p, i, n) != n:
        return -1
    return chars


cdef inline bint _at(const unsigned char* p, Py_ssize_t i, Py_ssize_t n, const char* s, Py_ssize_t sn) noexcept:
    return i + sn <= n and memcmp(p + i, s, sn) == 0


cdef Py_ssize_t _anthropic_delta_chars(const unsigned char* p, Py_ssize_t n) noexcept:
    """Characters of text in a content_block_delta spelled exactly as Anthropic sends it; -1 otherwise.

    That spelling is `{"type":"content_block_delta","index":<n>,"delta":
    {"type":"<t>","<key>":"<text>"}}` with a text, thinking or input_json
    delta and no spaces. Everything but the text and the index is compared
    whole, so only those two are walked; any other spelling is left to
    `_delta_chars`, which reads them all. On bench.meter's stream this
    halves the cost of counting (the walk spends most of it on the eight
    keys and names around each text, not on the text).
    """
    cdef Py_ssize_t chars = 0
    cdef Py_ssize_t i = 38
    if not _at(p, 0, n, b'{"type":"content_block_delta","index":', 38):
        return -1
    i = _jnumber(p, i, n) if i < n else -1
    if i < 0 or not _at(p, i, n, b',"delta":{"type":"', 18):
        return -1
    i += 18
    if _at(p, i, n, b'text_delta","text":', 19):
        i += 19
    elif _at(p, i, n, b'thinking_delta","thinking":', 27):
        i += 27
    elif _at(p, i, n, b'input_json_delta","partial_json":', 33):
        i += 33
    else:
        return -1
    if i >= n or p[i] != 34:
        return -1
    i = _jstring(p, i, n, &chars)
    if i < 0 or not _at(p, i, n, b"}}", 2) or _skip_ws(p, i + 2, n) != n:
        return -1
    return chars


# -- the usage of message_start and message_delta ---------------------------------
#
# Theory of operation. Every Anthropic stream has one message_start and one
# message_delta, the events whose usage the bill is made of; orjson decoding
# them whole (some 400 and 200 bytes, a dozen members each) was most of the
# meter's cost a stream. Instead they are walked in place like the deltas,
# checking the whole event as `_jvalue` does, and only the members Reading
# reads from them (`_event`, `_anthropic_message`, `_anthropic_usage`) are
# kept, in a _Usage struct: the message's (or the delta's) model and stop
# reason as spans of the event's bytes, and the usage object's counts as C
# integers. Reading takes them as it takes orjson's objects: the strings
# where they are strings, and the counts by `_anthropic_counts`, which
# `_anthropic_usage` calls with what it reads of a decoded usage object. A
# repeated member sets its part of the struct again (an object member
# clears what the one before it left), so the last one stands, as in
# orjson. A wanted member whose value is not what the walk reads (an
# escaped string, a float, a negative number, an array, an escaped key, a
# number where an object goes) or anything not sure sends the event to
# orjson, as in the pure twin.

cdef enum:
    _U_LEAF = 0  # a string, a count, true, false or null
    _U_START = 1  # message_start: "message" -> _U_MESSAGE
    _U_MESSAGE = 2  # "model", "stop_reason"; "usage" -> _U_USAGE
    _U_DELTA_ROOT = 3  # message_delta: "delta" -> _U_DELTA; "usage" -> _U_USAGE
    _U_DELTA = 4  # "stop_reason"
    _U_USAGE = 5  # the counts; "cache_creation" -> _U_SPLIT, "output_tokens_details" -> _U_DETAILS,
    #               "server_tool_use" -> _U_TOOLS
    _U_SPLIT = 6  # "ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens"
    _U_DETAILS = 7  # "thinking_tokens"
    _U_TOOLS = 8  # every member (Reading sums the counts of those named *_requests)

# The counts of a usage object Reading reads, in `_anthropic_counts`'s order.
cdef enum:
    _C_INPUT = 0
    _C_OUTPUT = 1
    _C_CACHE_READ = 2
    _C_WRITE_5M = 3
    _C_WRITE_1H = 4
    _C_WRITE_TOTAL = 5
    _C_THINKING = 6
    _COUNTS = 7

# What a member is to Reading (_usage_member): a count (_C_*), or one of these.
cdef enum:
    _M_UNREAD = -1
    _M_MESSAGE = 100
    _M_DELTA = 101
    _M_MODEL = 102
    _M_STOP = 103
    _M_USAGE = 104
    _M_SPLIT = 105
    _M_DETAILS = 106
    _M_TOOLS = 107
    _M_TOOL = 108

cdef enum:
    # server_tool_use members kept (a member repeated is one); more sends
    # the event to orjson. Vendors send one or two.
    _TOOLS_MAX = 8


cdef struct _Tool:
    const unsigned char* key  # plain (unescaped), valid UTF-8
    Py_ssize_t kn
    long long count  # -1: not a count


cdef struct _Usage:
    # The string members: a span of the event's bytes (plain, valid UTF-8),
    # or NULL where the member is missing or not a string.
    const unsigned char* model
    Py_ssize_t model_n
    const unsigned char* stop
    Py_ssize_t stop_n
    bint usage  # the usage member is an object: its counts follow
    long long counts[_COUNTS]  # -1: missing, or not a count (Reading's _count gives None)
    bint tools  # its server_tool_use is an object
    int ntools
    _Tool tool[_TOOLS_MAX]


cdef inline void _clear_usage(_Usage* u) noexcept:
    cdef int c
    u.usage = False
    for c in range(_COUNTS):
        u.counts[c] = -1
    u.tools = False
    u.ntools = 0


cdef int _usage_member(int node, const unsigned char* k, Py_ssize_t kn, int* child) noexcept:
    """What member `k` of an object at `node` is to Reading (a _C_ count or
    an _M_ kind), and the node of its value."""
    # Written out, not looked up in a table of (bytes, member, node): a loop
    # over such a table cost 0.3 us more a stream (of 5.7, bench.meter's).
    child[0] = _U_LEAF
    if node == _U_START:
        if _eq(k, kn, b"message", 7):
            child[0] = _U_MESSAGE
            return _M_MESSAGE
    elif node == _U_MESSAGE:
        if _eq(k, kn, b"model", 5):
            return _M_MODEL
        if _eq(k, kn, b"stop_reason", 11):
            return _M_STOP
        if _eq(k, kn, b"usage", 5):
            child[0] = _U_USAGE
            return _M_USAGE
    elif node == _U_DELTA_ROOT:
        if _eq(k, kn, b"delta", 5):
            child[0] = _U_DELTA
            return _M_DELTA
        if _eq(k, kn, b"usage", 5):
            child[0] = _U_USAGE
            return _M_USAGE
    elif node == _U_DELTA:
        if _eq(k, kn, b"stop_reason", 11):
            return _M_STOP
    elif node == _U_USAGE:
        if _eq(k, kn, b"input_tokens", 12):
            return _C_INPUT
        if _eq(k, kn, b"output_tokens", 13):
            return _C_OUTPUT
        if _eq(k, kn, b"cache_read_input_tokens", 23):
            return _C_CACHE_READ
        if _eq(k, kn, b"cache_creation_input_tokens", 27):
            return _C_WRITE_TOTAL
        if _eq(k, kn, b"cache_creation", 14):
            child[0] = _U_SPLIT
            return _M_SPLIT
        if _eq(k, kn, b"output_tokens_details", 21):
            child[0] = _U_DETAILS
            return _M_DETAILS
        if _eq(k, kn, b"server_tool_use", 15):
            child[0] = _U_TOOLS
            return _M_TOOLS
    elif node == _U_SPLIT:
        if _eq(k, kn, b"ephemeral_5m_input_tokens", 25):
            return _C_WRITE_5M
        if _eq(k, kn, b"ephemeral_1h_input_tokens", 25):
            return _C_WRITE_1H
    elif node == _U_DETAILS:
        if _eq(k, kn, b"thinking_tokens", 15):
            return _C_THINKING
    elif node == _U_TOOLS:
        return _M_TOOL
    return _M_UNREAD


cdef Py_ssize_t _usage_leaf(
    const unsigned char* p, Py_ssize_t i, Py_ssize_t n, long long* count, const unsigned char** text,
    Py_ssize_t* text_n,
) noexcept:
    """Read the scalar at p[i] as orjson decodes it: a count into `count`
    (else -1 there), a string's span into `text` (else NULL there); the
    index past it, or -1 if unsure."""
    cdef Py_ssize_t j, ignored = 0
    cdef long long v = 0
    cdef unsigned char c = p[i]
    count[0] = -1
    text[0] = NULL
    if c == 34:
        j = _jstring(p, i, n, &ignored)
        if j < 0 or memchr(p + i + 1, 92, j - i - 2) != NULL:
            return -1
        text[0] = p + i + 1
        text_n[0] = j - i - 2
        return j
    if 48 <= c <= 57:
        # a count: digits only (a fraction or a sign goes to orjson); _jnumber
        # checks the spelling and keeps it within 18 digits
        j = _jnumber(p, i, n)
        if j < 0:
            return -1
        while i < j:
            if not 48 <= p[i] <= 57:
                return -1
            v = v * 10 + (p[i] - 48)
            i += 1
        count[0] = v
        return j
    if c == 110 and _at(p, i, n, b"null", 4):
        return i + 4
    if c == 116 and _at(p, i, n, b"true", 4):
        return i + 4
    if c == 102 and _at(p, i, n, b"false", 5):
        return i + 5
    return -1


cdef int _keep_tool(_Usage* u, const unsigned char* k, Py_ssize_t kn, long long count) noexcept:
    """server_tool_use's member `k`: its count kept, a repeated key's
    replacing the one before (the last stands, as in a dict); -1 if there
    are more than _TOOLS_MAX."""
    cdef int t
    for t in range(u.ntools):
        if u.tool[t].kn == kn and memcmp(u.tool[t].key, k, kn) == 0:
            u.tool[t].count = count
            return 0
    if u.ntools == _TOOLS_MAX:
        return -1
    u.tool[u.ntools].key = k
    u.tool[u.ntools].kn = kn
    u.tool[u.ntools].count = count
    u.ntools += 1
    return 0


cdef Py_ssize_t _usage_object(
    const unsigned char* p, Py_ssize_t i, Py_ssize_t n, int node, int depth, _Usage* u,
) noexcept:
    """Walk the object at p[i] ('{'), keeping the members Reading reads in `u`; the index past it, or -1."""
    cdef Py_ssize_t ks, kn, ignored = 0, text_n = 0
    cdef int child, member
    cdef long long count
    cdef const unsigned char* text
    if depth >= _MAX_DEPTH:
        return -1
    i = _skip_ws(p, i + 1, n)
    if i < n and p[i] == 125:  # }
        return i + 1
    while True:
        if i >= n or p[i] != 34:
            return -1
        ks = i + 1
        i = _jstring(p, i, n, &ignored)
        if i < 0:
            return -1
        kn = i - 1 - ks
        # an escaped key may spell a wanted one: orjson decides
        if memchr(p + ks, 92, kn) != NULL:
            return -1
        member = _usage_member(node, p + ks, kn, &child)
        i = _skip_ws(p, i, n)
        if i >= n or p[i] != 58:
            return -1
        i = _skip_ws(p, i + 1, n)
        if i >= n:
            return -1
        if member == _M_UNREAD:
            i = _jvalue(p, i, n, _N_NONE, depth + 1, &ignored)
        elif child == _U_LEAF:
            i = _usage_leaf(p, i, n, &count, &text, &text_n)
            if member < _COUNTS:
                u.counts[member] = count
            elif member == _M_MODEL:
                u.model = text
                u.model_n = text_n
            elif member == _M_STOP:
                u.stop = text
                u.stop_n = text_n
            elif i >= 0 and _keep_tool(u, p + ks, kn, count) < 0:  # _M_TOOL
                return -1
        else:
            # An object member: what the one before it left is cleared
            # (it replaced that one whole); null leaves nothing.
            if member == _M_MESSAGE:
                u.model = u.stop = NULL
                _clear_usage(u)
            elif member == _M_DELTA:
                u.stop = NULL
            elif member == _M_USAGE:
                _clear_usage(u)
            elif member == _M_SPLIT:
                u.counts[_C_WRITE_5M] = u.counts[_C_WRITE_1H] = -1
            elif member == _M_DETAILS:
                u.counts[_C_THINKING] = -1
            else:  # _M_TOOLS
                u.tools = False
                u.ntools = 0
            if p[i] == 123:
                if member == _M_USAGE:
                    u.usage = True
                elif member == _M_TOOLS:
                    u.tools = True
                i = _usage_object(p, i, n, child, depth + 1, u)
            elif _at(p, i, n, b"null", 4):
                i += 4
            else:
                return -1
        if i < 0:
            return -1
        i = _skip_ws(p, i, n)
        if i >= n:
            return -1
        if p[i] == 44:  # ,
            i = _skip_ws(p, i + 1, n)
        elif p[i] == 125:
            return i + 1
        else:
            return -1


cdef bint _walk_usage(const unsigned char* p, Py_ssize_t n, int root, _Usage* u) noexcept:
    """Walk a message_start (`root` _U_START) or message_delta (_U_DELTA_ROOT)
    event into `u`, as orjson would decode it; False if unsure."""
    cdef Py_ssize_t i = _skip_ws(p, 0, n)
    u.model = u.stop = NULL
    _clear_usage(u)
    if i >= n or p[i] != 123:
        return False
    i = _usage_object(p, i, n, root, 0, u)
    return i >= 0 and _skip_ws(p, i, n) == n


cdef inline object _count_of(long long count):
    return None if count < 0 else count


cdef object _tool_requests(_Usage* u):
    """What Reading makes of server_tool_use: the sum of the counts of its
    members named *_requests; None if it is not an object."""
    cdef long long total = 0
    cdef int t
    if not u.tools:
        return None
    for t in range(u.ntools):
        # each count is below 10**18 and there are at most 8: no overflow
        if u.tool[t].count >= 0 and u.tool[t].kn >= 9 and memcmp(u.tool[t].key + u.tool[t].kn - 9, b"_requests", 9) == 0:
            total += u.tool[t].count
    return total


cdef int _read_usage(Reading reading, _Usage* u, bint start) except -1:
    """Reading's `_event` of the event walked into `u`: message_start's
    message (`_anthropic_message`) or message_delta's delta and usage."""
    if u.model != NULL:
        reading.model = PyUnicode_DecodeUTF8(<const char*>u.model, u.model_n, NULL)
    if u.stop != NULL:
        reading.stop_reason = PyUnicode_DecodeUTF8(<const char*>u.stop, u.stop_n, NULL)
    if u.usage:
        if reading._anthropic_counts(
            _count_of(u.counts[_C_INPUT]), _count_of(u.counts[_C_OUTPUT]), _count_of(u.counts[_C_CACHE_READ]),
            _count_of(u.counts[_C_WRITE_5M]), _count_of(u.counts[_C_WRITE_1H]),
            _count_of(u.counts[_C_WRITE_TOTAL]), _count_of(u.counts[_C_THINKING]), _tool_requests(u),
        ) and not start:
            # message_delta follows the last content block: its output count is final
            reading._final_usage = True
    return 0


cdef object _as_bytes(object data):
    if type(data) is bytes or type(data) is bytearray:
        return data
    return memoryview(data).cast("B")


# -- the meter ----------------------------------------------------------------
#
# Theory of operation. feed() walks the caller's buffer line by line with
# memchr and does not copy it, with two exceptions: the unfinished last line
# (kept in _tail for the next feed, never more than the event cap) and the
# data of an event still open when the buffer ends (kept in _acc). An event's
# first data line is only remembered as a pointer (_view) into the buffer; it
# is copied into _acc when a second data line arrives or the buffer ends
# first. At the blank line the event is sorted by its `event:` name, else by
# the first bytes of its data, and only the few usage-bearing kinds reach
# orjson; text deltas are walked in place for their characters (see "counting
# the text of a delta event") and decoded only where that walk is unsure.

cdef class Meter:
    """Counts one response's tokens from its bytes, fed in pieces as they pass."""
    # Its fields and C calls are declared in _meter.pxd, where the exchange
    # core (hubcore/gateway/_exchange.pyx) reads the counters.

    def __init__(self, fmt, sse, *, Py_ssize_t max_event_size=MAX_EVENT_SIZE,
                 Py_ssize_t max_body_size=MAX_BODY_SIZE):
        self._start(fmt, sse, max_event_size, max_body_size)

    cdef int _start(self, fmt, bint sse, Py_ssize_t max_event_size, Py_ssize_t max_body_size) except -1:
        self._reading = Reading(fmt)  # raises MeterError for an unknown format
        if max_event_size < 1 or max_body_size < 0:
            raise MeterError("size caps must be positive")
        self.fmt = fmt
        self.sse = sse
        self.events = 0
        self.malformed = 0
        self.delta_chars = 0
        self._closed = False
        self._max_event = max_event_size
        self._discarding = False
        self._after_cr = False
        self._kind = _SNIFF
        self._ndata = 0
        self._dlen = 0
        self._poisoned = False
        self._has_view = False
        self._max_body = max_body_size
        self._body = bytearray()
        self._overflow = False
        return 0

    def __dealloc__(self):
        _buf_free(&self._tail)
        _buf_free(&self._acc)

    # The counters the shared Reading keeps, as C-level getters: a
    # __getattr__ that forwarded them cost a Python call per read, some ten
    # per request when the usage row is built.
    @property
    def model(self):
        return self._reading.model

    @property
    def input_tokens(self):
        return self._reading.input_tokens

    @property
    def cache_write_5m(self):
        return self._reading.cache_write_5m

    @property
    def cache_write_1h(self):
        return self._reading.cache_write_1h

    @property
    def cache_read(self):
        return self._reading.cache_read

    @property
    def reasoning_tokens(self):
        return self._reading.reasoning_tokens

    @property
    def server_tool_requests(self):
        return self._reading.server_tool_requests

    @property
    def stop_reason(self):
        return self._reading.stop_reason

    @property
    def error_type(self):
        return self._reading.error_type

    @property
    def completed(self):
        return self._reading.completed

    @property
    def output_tokens(self):
        """The vendor's count; before its final usage, at least the estimate from the deltas."""
        return self._reading._output_tokens(self.delta_chars)

    @property
    def output_estimated(self):
        """Whether `output_tokens` is the estimate (the stream was cut before its final usage)."""
        return self._reading._output_estimated(self.delta_chars)

    # -- input ----------------------------------------------------------------

    def feed(self, data) -> None:
        cdef const unsigned char[:] view
        if type(data) is bytes:
            self._feed_bytes(data)
            return
        if self._closed:
            raise MeterError("feed() after close()")
        data = _as_bytes(data)
        view = data
        if view.shape[0]:
            self._feed_at(data, &view[0], view.shape[0])

    cdef int _feed_bytes(self, bytes data) except -1:
        """feed() of bytes (what the exchange core hands over), read in
        place: a typed memoryview of it was an object made per call."""
        if self._closed:
            raise MeterError("feed() after close()")
        return self._feed_at(data, <const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))

    cdef int _feed_at(self, data, const unsigned char* p, Py_ssize_t n) except -1:
        """The `n` bytes of `data` at `p`: a non-SSE body's kept up to the cap."""
        if n == 0:
            return 0
        if self.sse:
            return self._feed_sse(p, n)
        if self._overflow:
            return 0
        if len(self._body) + n > self._max_body:
            self._overflow = True
            self._body = bytearray()
        else:
            self._body += data
        return 0

    def close(self) -> None:
        cdef Py_ssize_t tl
        if self._closed:
            return
        self._closed = True
        if not self.sse:
            self._close_body()
            return
        if self._discarding:
            self._discarding = False
            self._poison()
        elif self._tail.len:
            # the body ended without a line end: the SDKs drop such an event,
            # but its numbers are real (a vendor bills them), so keep them
            tl = self._tail.len
            self._tail.len = 0
            self._line(self._tail.data, tl)
        self._dispatch()
        _buf_free(&self._tail)
        _buf_free(&self._acc)

    cdef int _feed_sse(self, const unsigned char* p, Py_ssize_t n) except -1:
        cdef Py_ssize_t i = 0, j, tl
        if self._after_cr:
            self._after_cr = False
            if p[0] == 10:
                i = 1
        if self._discarding or self._tail.len:
            j = _eol(p, i, n)
            if j == n:
                if not self._discarding:
                    if self._tail.len + (n - i) > self._max_event:
                        self._discarding = True
                        _buf_free(&self._tail)
                    else:
                        _buf_put(&self._tail, p + i, n - i)
                return 0
            if self._discarding:
                self._discarding = False
                self._poison()
            elif self._tail.len + (j - i) > self._max_event:
                _buf_free(&self._tail)
                self._poison()
            else:
                _buf_put(&self._tail, p + i, j - i)
                # the line stays in the tail buffer until this feed ends
                tl = self._tail.len
                self._tail.len = 0
                self._line(self._tail.data, tl)
            i = self._past_eol(p, j, n)
        while i < n:
            j = _eol(p, i, n)
            if j == n:
                break
            if j - i > self._max_event:
                self._poison()
            else:
                self._line(p + i, j - i)
            i = self._past_eol(p, j, n)
        if self._has_view:
            # the event goes on past this buffer: keep its data
            self._has_view = False
            _buf_put(&self._acc, self._view, self._view_len)
        if self._tail.cap > _KEEP_CAPACITY:
            _buf_free(&self._tail)
        if i < n:
            if n - i > self._max_event:
                self._discarding = True
            else:
                _buf_put(&self._tail, p + i, n - i)
        return 0

    cdef Py_ssize_t _past_eol(self, const unsigned char* p, Py_ssize_t j, Py_ssize_t n) noexcept:
        if p[j] == 13:
            if j + 1 < n:
                return j + 2 if p[j + 1] == 10 else j + 1
            self._after_cr = True
        return j + 1

    # -- SSE fields and events --------------------------------------------------

    cdef int _line(self, const unsigned char* s, Py_ssize_t n) except -1:
        if n == 0:
            return self._dispatch()
        if s[0] == 100:  # d
            if n >= 4 and memcmp(s, b"data", 4) == 0:
                if n == 4:
                    self._data(s + 4, 0)
                elif s[4] == 58:
                    if n > 5 and s[5] == 32:
                        self._data(s + 6, n - 6)
                    else:
                        self._data(s + 5, n - 5)
        elif s[0] == 101:  # e
            if n >= 5 and memcmp(s, b"event", 5) == 0:
                if n == 5:
                    self._kind = _SNIFF
                elif s[5] == 58:
                    if n > 6 and s[6] == 32:
                        self._kind = _name_kind(self.fmt, s + 7, n - 7)
                    else:
                        self._kind = _name_kind(self.fmt, s + 6, n - 6)
        return 0

    cdef int _data(self, const unsigned char* v, Py_ssize_t vn) except -1:
        if self._poisoned:
            return 0
        if self._ndata == 0:
            self._view = v
            self._view_len = vn
            self._has_view = True
            self._dlen = vn
        else:
            self._dlen += 1 + vn
            if self._dlen > self._max_event:
                self._poison()
                return 0
            if self._has_view:
                self._has_view = False
                _buf_put(&self._acc, self._view, self._view_len)
            _buf_put(&self._acc, <const unsigned char*>b"\n", 1)
            _buf_put(&self._acc, v, vn)
        self._ndata += 1
        return 0

    cdef void _poison(self) noexcept:
        self._poisoned = True
        self._has_view = False
        self._acc.len = 0

    cdef int _dispatch(self) except -1:
        cdef int kind = self._kind
        cdef bint poisoned = self._poisoned
        cdef const unsigned char* d
        cdef Py_ssize_t dn
        if self._ndata == 0 and not poisoned:
            self._kind = _SNIFF
            return 0
        if self._has_view:
            d = self._view
            dn = self._view_len
        else:
            d = self._acc.data
            dn = self._acc.len
        if d == NULL:
            d = _EMPTY
        # reset first; the accumulated bytes stay put until the next event
        self._kind = _SNIFF
        self._ndata = 0
        self._dlen = 0
        self._poisoned = False
        self._has_view = False
        self._acc.len = 0
        self.events += 1
        if poisoned:
            self.malformed += 1
            return 0
        self._event(kind, d, dn)
        if self._acc.cap > _KEEP_CAPACITY:
            _buf_free(&self._acc)
        return 0

    cdef int _event(self, int kind, const unsigned char* d, Py_ssize_t dn) except -1:
        cdef Py_ssize_t ts = 0, te = 0, chars
        cdef _Usage usage
        if self.fmt == _FMT_CHAT:
            return self._chat_event(d, dn)
        if kind == _SNIFF:
            if not _sniff_type(d, dn, &ts, &te):
                self.delta_chars += self._reading._untyped(self._loads(d, dn))
                return 0
            kind = _lookup(self.fmt, d + ts, te - ts)
        if kind == _SKIP:
            return 0
        if kind == _A_STOP:
            self._reading._stop()
            return 0
        if kind == _A_TEXT or kind == _R_TEXT:
            chars = _anthropic_delta_chars(d, dn) if kind == _A_TEXT else -1
            if chars < 0:
                chars = _delta_chars(d, dn, _N_A_ROOT if kind == _A_TEXT else _N_R_ROOT)
            if chars >= 0:
                self.delta_chars += chars
                return 0
        elif kind == _A_BLOCK and not _has_member(d, dn, b'"type"', 6, b'"fallback"', 10, NULL, 0, NULL, 0):
            return 0
        if kind == _R_CREATED and self._reading.model is not None:
            return 0
        if (kind == _A_START or kind == _A_DELTA) and _walk_usage(
                d, dn, _U_START if kind == _A_START else _U_DELTA_ROOT, &usage):
            _read_usage(self._reading, &usage, kind == _A_START)
            return 0
        obj = self._loads(d, dn)
        self.delta_chars += self._reading._event(kind, obj)
        return 0

    cdef int _chat_event(self, const unsigned char* d, Py_ssize_t dn) except -1:
        cdef Py_ssize_t chars
        cdef bint whole
        if _eq(d, dn, b"[DONE]", 6):
            self._reading._done()
            return 0
        whole = (
            _has_member(d, dn, b'"usage"', 7, b"{", 1, b'"finish_reason"', 15, b'"', 1)
            or _error_first(d, dn)
        )
        if not whole and self._reading.model is not None:
            # a plain text chunk: only its text counts
            chars = _delta_chars(d, dn, _N_C_ROOT)
            if chars >= 0:
                self.delta_chars += chars
                return 0
        self.delta_chars += self._reading._chunk(self._loads(d, dn), whole)
        return 0

    cdef object _loads(self, const unsigned char* d, Py_ssize_t dn):
        """The decoded JSON, or None (counted in `malformed`) when it is not JSON."""
        try:
            return _loads(PyBytes_FromStringAndSize(<const char*>d, dn))
        except _JSONDecodeError:
            self.malformed += 1
            return None

    cdef _close_body(self):
        cdef bytearray body
        if self._overflow:
            self.malformed += 1
            return
        body = self._body
        self._body = bytearray()
        try:
            obj = _loads(body)
        except _JSONDecodeError:
            self.malformed += 1
            obj = None
        self._reading._unstreamed(obj)


cdef Py_ssize_t _DEFAULT_MAX_EVENT = MAX_EVENT_SIZE
cdef Py_ssize_t _DEFAULT_MAX_BODY = MAX_BODY_SIZE


cdef Meter new_meter(fmt, bint sse):
    """Meter(fmt, sse) with the default caps, for the exchange core: a C
    call where the type call packs and parses its arguments."""
    cdef Meter meter = Meter.__new__(Meter)
    meter._start(fmt, sse, _DEFAULT_MAX_EVENT, _DEFAULT_MAX_BODY)
    return meter


# -- request scanning -----------------------------------------------------------

cdef Py_ssize_t _skip_string(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) noexcept:
    """Index past the string opening at p[i], or -1 if it never closes."""
    cdef Py_ssize_t j = i + 1, k, s
    cdef const unsigned char* q
    while True:
        q = <const unsigned char*>memchr(p + j, 34, n - j)
        if q == NULL:
            return -1
        k = q - p
        s = k - 1
        while s > i and p[s] == 92:
            s -= 1
        if (k - 1 - s) % 2 == 0:
            return k + 1
        j = k + 1


cdef Py_ssize_t _skip_value(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) noexcept:
    """Index past the value starting at p[i] (not whitespace), or -1."""
    cdef unsigned char c = p[i]
    cdef Py_ssize_t depth = 0
    if c == 34:
        return _skip_string(p, i, n)
    if c == 123 or c == 91:
        while i < n:
            c = p[i]
            if not _STRUCTURAL[c]:
                i += 1
                continue
            if c == 34:
                i = _skip_string(p, i, n)
                if i < 0:
                    return -1
                continue
            if c == 123 or c == 91:
                depth += 1
            else:
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return -1
    while i < n and not _SCALAR_END[p[i]]:
        i += 1
    return i


cdef object _string_at(const unsigned char* p, Py_ssize_t start, Py_ssize_t end):
    if p[start] != 34:
        return None
    try:
        v = _loads(PyBytes_FromStringAndSize(<const char*>p + start, end - start))
    except _JSONDecodeError:
        return None
    return v if type(v) is str else None


cdef int _key_is(const unsigned char* p, Py_ssize_t start, Py_ssize_t end, dict wanted) except -1:
    cdef bytes raw = PyBytes_FromStringAndSize(<const char*>p + start, end - start)
    w = wanted.get(raw)
    if w is not None:
        return w
    if memchr(p + start, 92, end - start) == NULL:
        return 0
    key = _string_at(p, start, end)
    if key is None:
        return 0
    return wanted.get(b'"' + (<str>key).encode() + b'"', 0)


cdef list _members(const unsigned char* p, Py_ssize_t i, Py_ssize_t n, dict wanted):
    """(which, value start, value end) for the wanted keys of the object at p[i], in order.

    Stops quietly where the JSON stops making sense.
    """
    cdef list found = []
    cdef Py_ssize_t ks, ke, vs
    cdef int which
    i += 1
    while True:
        i = _skip_ws(p, i, n)
        if i >= n or p[i] != 34:
            return found
        ks = i
        i = _skip_string(p, i, n)
        if i < 0:
            return found
        ke = i
        i = _skip_ws(p, i, n)
        if i >= n or p[i] != 58:
            return found
        i = _skip_ws(p, i + 1, n)
        if i >= n:
            return found
        vs = i
        i = _skip_value(p, i, n)
        if i < 0 or i == vs:
            return found
        # only keys of the right length can be wanted (or carry escapes)
        if (ke - ks) <= 18 or memchr(p + ks, 92, ke - ks) != NULL:
            which = _key_is(p, ks, ke, wanted)
            if which:
                found.append((which, vs, i))
        i = _skip_ws(p, i, n)
        if i >= n or p[i] != 44:
            return found
        i += 1


def scan_request(body) -> tuple:
    """(model, stream, metadata.user_id, prompt_cache_key) from a request body's top level.

    Walks the top-level object, skipping nested values without building them,
    and decodes only the wanted values; agrees with a full orjson parse on
    every valid document (duplicate keys: the last wins, as in orjson).
    """
    cdef const unsigned char[:] view = _as_bytes(body)
    cdef Py_ssize_t n = view.shape[0]
    cdef const unsigned char* p
    cdef Py_ssize_t i
    if n == 0:
        return _NOTHING
    p = &view[0]
    i = _skip_ws(p, 0, n)
    if i >= n or p[i] != 123:
        return _NOTHING
    model = uid = pck = None
    stream = False
    for which, vs, ve in _members(p, i, n, _WANTED_KEYS):
        if which == 1:
            model = _string_at(p, vs, ve)
        elif which == 2:
            stream = _eq(p + <Py_ssize_t>vs, <Py_ssize_t>ve - <Py_ssize_t>vs, b"true", 4)
        elif which == 3:
            uid = None
            if p[<Py_ssize_t>vs] == 123:
                for _, us, ue in _members(p, vs, n, _USER_ID_KEY):
                    uid = _string_at(p, us, ue)
        else:
            pck = _string_at(p, vs, ve)
    return model, stream, uid, pck
