# cython: language_level=3
"""The gateway's pure functions of a request's heads on its common path,
compiled: the twins of rewrite.request_head and rewrite.response_head (the
head the vendor gets and the one the client gets), rewrite.response_framing
and rewrite.keeps_alive (how the client's answer is framed and whether its
connection stays open), routes.route_for,
routes.session_from_headers, routes.leading_model and headroom.model_class
(see there for the contracts; tests/gateway/test_heads_twins.py holds both
twins to the same results on the same inputs).

The same steps in the same order, on typed arguments, called in C by the
Exchange's core (_heads.pxd) instead of as Python functions, some ten calls
a request. Only the compiled Exchange calls them: it is built with this
module (setup.py builds all or none; without it the compiled Exchange does
not import), and the pure Exchange calls the Python functions."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeLatin1
from libc.string cimport memcmp, memcpy

from hubcore._digits cimport write_decimal

from hubcore.gateway.rewrite import ACCEPT_IDENTITY, REQUEST_DROP, RESPONSE_DROP, Framing
from hubcore.gateway.routes import MODEL_ID, MODELS_PREFIX, OPENAI_MODELS, ROUTES, SESSION_HEADERS
from hubcore.http.server import STATUS_LINES, status_line
# render_pieces is compiled with this module (setup.py builds all or none):
# a C call.
from hubcore.http._wire cimport NameSet, Piece, first_value, piece_of, render_pieces
from hubcore.routing import headroom

cdef frozenset _REQUEST_DROP = REQUEST_DROP
# The same names for render_pieces, which looks each head's names up in them
# without hashing them.
cdef NameSet _REQUEST_DROP_NAMES = NameSet(REQUEST_DROP)
cdef NameSet _RESPONSE_DROP_NAMES = NameSet(RESPONSE_DROP)
cdef bytes _ACCEPT_IDENTITY = ACCEPT_IDENTITY
# Connection header values whose tokens all name headers in REQUEST_DROP,
# as request_head found them; at most this many, of at most this size,
# whatever clients send.
cdef set _CONNECTION_DROPPED = set()
cdef Py_ssize_t _CONNECTION_VALUES_MAX = 64
cdef Py_ssize_t _CONNECTION_VALUE_BYTES = 64
cdef dict _STATUS_LINES = STATUS_LINES
cdef object _status_line = status_line
# Content lengths written by _length_line; a larger one (none reaches the
# hub: its parser takes at most 18 digits) with %.
cdef object _LONG_LONG_LIMIT = 2 ** 63
# The framings as C globals: `framing is _LENGTH` is a pointer comparison.
cdef object _LENGTH = Framing.LENGTH
cdef object _CHUNKED = Framing.CHUNKED
cdef object _BODILESS = Framing.BODILESS
cdef object _UNTIL_CLOSE = Framing.UNTIL_CLOSE
cdef dict _ROUTES = ROUTES
# The one route whose endpoint is "/v1/models" (route_for compares the
# objects, not their endpoint strings).
cdef object _MODELS = ROUTES[b"/v1/models"]
assert [route for route in ROUTES.values() if route.endpoint == "/v1/models"] == [_MODELS]
cdef object _OPENAI_MODELS = OPENAI_MODELS
cdef bytes _MODELS_PREFIX = MODELS_PREFIX
cdef Py_ssize_t _MODELS_PREFIX_LEN = len(MODELS_PREFIX)
cdef object _MODEL_ID = MODEL_ID
cdef tuple _SESSION_HEADERS = SESSION_HEADERS
# headroom's memo itself (cleared, never replaced), and the function that
# fills it on a miss.
cdef dict _classes = headroom._classes
cdef object _model_class = headroom.model_class


# -- rewrite ------------------------------------------------------------------

cdef inline Piece _literal(const char* s, Py_ssize_t size):
    cdef Piece piece
    piece.data = s
    piece.size = size
    return piece


cdef Piece _length_line(char* buf, Py_ssize_t length):
    """`content-length: <length>` CRLF (length >= 0), written into `buf`
    (48 bytes) digit by digit: snprintf parsed its format on every call."""
    cdef char digits[24]
    cdef int at = 16
    cdef int n = write_decimal(digits + 24, <unsigned long long>length)
    memcpy(buf, b"content-length: ", 16)
    memcpy(buf + at, digits + 24 - n, n)
    at += n
    buf[at] = 13
    buf[at + 1] = 10
    return _literal(buf, at + 2)


cpdef bytes request_head(bytes method, bytes target, bytes base_path, bytes host_line, bytes auth_line,
                         list headers, control, Py_ssize_t body_size):
    """See rewrite.request_head."""
    # Its start and tail go to render_pieces as they are, not joined into
    # bytes of their own first (nor formatted with %, which parses its
    # format on every call).
    cdef Piece before[6]
    cdef Piece after[4]  # at most: auth, accept, length, the end
    cdef char length[48]
    cdef Py_ssize_t nafter = 2
    cdef object drop = _REQUEST_DROP
    if method is None or target is None or base_path is None or host_line is None or auth_line is None:
        raise TypeError("request_head() takes bytes, not None")
    if headers is None:
        raise TypeError("request_head() takes a list of headers, not None")
    for name, value in control or ():
        if name == b"connection":
            # Headers named in Connection are hop-by-hop too (RFC 9110 7.6.1).
            # Clients send one or two values ("keep-alive"), which name only
            # headers dropped anyway: remembered, they make no set.
            if value in _CONNECTION_DROPPED:
                continue
            named = {t.strip().lower() for t in value.split(b",")}
            if named <= _REQUEST_DROP:
                if len(_CONNECTION_DROPPED) < _CONNECTION_VALUES_MAX and len(value) <= _CONNECTION_VALUE_BYTES:
                    _CONNECTION_DROPPED.add(value)
            elif not named <= drop:
                drop = drop | named
    if drop is _REQUEST_DROP:
        drop = _REQUEST_DROP_NAMES
    before[0] = piece_of(method)
    before[1] = _literal(b" ", 1)
    before[2] = piece_of(base_path)
    before[3] = piece_of(target)
    before[4] = _literal(b" HTTP/1.1\r\n", 11)
    before[5] = piece_of(host_line)
    after[0] = piece_of(auth_line)
    after[1] = piece_of(_ACCEPT_IDENTITY)
    if body_size or method == b"POST":
        after[2] = _length_line(length, body_size)
        nafter = 3
    after[nafter] = _literal(b"\r\n", 2)
    return render_pieces(before, 6, headers, drop, after, nafter + 1)


cpdef bytes response_head(int status, list headers, framing, content_length, bint keep_alive, str request_id,
                          list budget=None):
    """See rewrite.response_head."""
    cdef Piece before
    cdef Piece after[7]  # at most: the id (3), budget, framing, close, the end
    cdef Py_ssize_t nafter = 0, id_size
    cdef const char* id_text
    cdef char length[48]
    # The pieces point into these: they live until the head is made.
    cdef bytes budget_lines = None, long_length = None
    if headers is None:
        raise TypeError("response_head() takes a list of headers, not None")
    # server.status_line, inline.
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _status_line(status)
    before = piece_of(line)
    # Its UTF-8, as the twin's encode() (kept in the str, not made anew).
    id_text = PyUnicode_AsUTF8AndSize(request_id, &id_size)
    after[0] = _literal(b"x-hubcore-request-id: ", 22)
    after[1] = _literal(id_text, id_size)
    after[2] = _literal(b"\r\n", 2)
    nafter = 3
    if budget is not None:
        budget_lines = b"".join([b"%s: %s\r\n" % pair for pair in budget])
        after[nafter] = piece_of(budget_lines)
        nafter += 1
    if framing is _LENGTH:
        assert content_length is not None
        if type(content_length) is int and 0 <= content_length < _LONG_LONG_LIMIT:
            after[nafter] = _length_line(length, <Py_ssize_t>content_length)
        else:
            long_length = b"content-length: %d\r\n" % content_length
            after[nafter] = piece_of(long_length)
        nafter += 1
    elif framing is _CHUNKED:
        after[nafter] = _literal(b"transfer-encoding: chunked\r\n", 28)
        nafter += 1
    if not keep_alive:
        after[nafter] = _literal(b"connection: close\r\n", 19)
        nafter += 1
    after[nafter] = _literal(b"\r\n", 2)
    return render_pieces(&before, 1, headers, _RESPONSE_DROP_NAMES, after, nafter + 1)


cpdef response_framing(int status, content_length, bint client_http11):
    if content_length is not None:
        return _LENGTH
    if status == 204 or status == 304:
        return _BODILESS  # they end at their head (see the twin)
    if client_http11:
        return _CHUNKED
    return _UNTIL_CLOSE


cpdef bint keeps_alive(framing, bint client_keep_alive):
    return client_keep_alive and framing is not _UNTIL_CLOSE


# -- routes -------------------------------------------------------------------

cpdef route_for(bytes path, list headers=None):
    """See routes.route_for."""
    route = _ROUTES.get(path)
    if route is None and path.startswith(_MODELS_PREFIX) and _MODEL_ID.fullmatch(path, _MODELS_PREFIX_LEN):
        route = _MODELS
    if route is _MODELS and headers is not None and first_value(headers, b"anthropic-version") is None:
        return _OPENAI_MODELS
    return route


cpdef session_from_headers(list headers):
    """See routes.session_from_headers."""
    for name in _SESSION_HEADERS:
        value = first_value(headers, name)
        if value:
            if type(value) is bytes:  # as a parsed head's are: a C call
                return PyUnicode_DecodeLatin1(PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value), NULL)
            return value.decode("latin-1")
    return None


cdef inline bint _space(unsigned char c) noexcept:
    # \s of a bytes pattern: space, \t, \n, \v, \f, \r.
    return c == 32 or 9 <= c <= 13


cdef inline bint _id_char(unsigned char c) noexcept:
    # [A-Za-z0-9._:@+/-]
    return (48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122 or c == 46 or c == 95 or c == 58 or c == 64
            or c == 43 or c == 47 or c == 45)


cpdef leading_model(bytes body_start):
    """See routes.leading_model: its pattern, matched by hand at the body's
    start (a scan of some forty bytes, where the regex engine costs a call
    and a match object), step by step in the pattern's order."""
    cdef const unsigned char* p = <const unsigned char*>body_start
    cdef Py_ssize_t n = len(body_start), i = 0, start
    if n == 0 or p[0] != 123:  # '{'
        return None
    i = 1
    while i < n and _space(p[i]):
        i += 1
    if n - i < 7 or memcmp(p + i, b'"model"', 7) != 0:
        return None
    i += 7
    while i < n and _space(p[i]):
        i += 1
    if i >= n or p[i] != 58:  # ':'
        return None
    i += 1
    while i < n and _space(p[i]):
        i += 1
    if i >= n or p[i] != 34:  # '"'
        return None
    i += 1
    start = i
    while i < n and _id_char(p[i]):
        i += 1
    # The longest run of id characters: 1 to 256 of them, then the quote.
    if i == start or i - start > 256 or i >= n or p[i] != 34:
        return None
    return body_start[start:i].decode("ascii")


# -- headroom -----------------------------------------------------------------

cpdef str model_class(model):
    """See headroom.model_class: its memo read in C; a miss is its own call."""
    if not model:
        return ""
    found = _classes.get(model)
    if found is None:
        return _model_class(model)
    return found
