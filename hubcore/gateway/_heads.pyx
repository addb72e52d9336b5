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

from cpython.bytes cimport PyBytes_FromFormat
from libc.string cimport memcmp

from hubcore.gateway.rewrite import ACCEPT_IDENTITY, REQUEST_DROP, RESPONSE_DROP, Framing
from hubcore.gateway.routes import MODEL_ID, MODELS_PREFIX, OPENAI_MODELS, ROUTES, SESSION_HEADERS
from hubcore.http.server import STATUS_LINES, status_line
# render_head is compiled with this module (setup.py builds all or none):
# a C call.
from hubcore.http._wire cimport NameSet, first_value, render_head
from hubcore.routing import headroom

cdef frozenset _REQUEST_DROP = REQUEST_DROP
# The same names for render_head, which looks each head's names up in them
# without hashing them.
cdef NameSet _REQUEST_DROP_NAMES = NameSet(REQUEST_DROP)
cdef NameSet _RESPONSE_DROP_NAMES = NameSet(RESPONSE_DROP)
cdef bytes _ACCEPT_IDENTITY = ACCEPT_IDENTITY
cdef dict _STATUS_LINES = STATUS_LINES
cdef object _status_line = status_line
# Content lengths written with PyBytes_FromFormat (%zd); a larger one (none
# reaches the hub: its parser takes at most 18 digits) with %.
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

cpdef bytes request_head(bytes method, bytes target, bytes base_path, bytes host_line, bytes auth_line,
                         list headers, control, Py_ssize_t body_size):
    """See rewrite.request_head."""
    # Joined, not formatted with %: bytes formatting parses its format on
    # every call, and cost more than the rest of the head.
    cdef bytes start = b"".join((method, b" ", base_path, target, b" HTTP/1.1\r\n", host_line))
    cdef object drop = _REQUEST_DROP
    cdef bytes tail
    for name, value in control or ():
        if name == b"connection":
            # Headers named in Connection are hop-by-hop too (RFC 9110 7.6.1).
            named = {t.strip().lower() for t in value.split(b",")}
            if not named <= drop:
                drop = drop | named
    if drop is _REQUEST_DROP:
        drop = _REQUEST_DROP_NAMES
    if body_size or method == b"POST":
        tail = b"".join((auth_line, _ACCEPT_IDENTITY, PyBytes_FromFormat(b"content-length: %zd\r\n", body_size), b"\r\n"))
    else:
        tail = b"".join((auth_line, _ACCEPT_IDENTITY, b"\r\n"))
    return render_head(start, headers, drop, tail)


cpdef bytes response_head(int status, list headers, framing, content_length, bint keep_alive, str request_id,
                          list budget=None):
    """See rewrite.response_head."""
    # Joined once (see request_head).
    cdef list tail = [b"x-hubcore-request-id: ", request_id.encode(), b"\r\n"]
    if budget is not None:
        tail += [b"%s: %s\r\n" % pair for pair in budget]
    if framing is _LENGTH:
        assert content_length is not None
        if type(content_length) is int and 0 <= content_length < _LONG_LONG_LIMIT:
            tail.append(PyBytes_FromFormat(b"content-length: %zd\r\n", <Py_ssize_t>content_length))
        else:
            tail.append(b"content-length: %d\r\n" % content_length)
    elif framing is _CHUNKED:
        tail.append(b"transfer-encoding: chunked\r\n")
    if not keep_alive:
        tail.append(b"connection: close\r\n")
    tail.append(b"\r\n")
    # server.status_line, inline.
    line = _STATUS_LINES.get(status)
    return render_head(line if line is not None else _status_line(status), headers, _RESPONSE_DROP_NAMES,
                       b"".join(tail))


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
