# cython: language_level=3
"""What the compiled connection cores share: llhttp, the parser httptools
wraps (the same version, vendored in hubcore/http/vendor/llhttp/), run on
the core's own `llhttp_t`, and the C functions llhttp calls back. Where the
pure twins hand their reads to httptools, which calls back into Python for
the request line, each header, each piece of the body and the message's
ends, these callbacks call the core's steps in C: `_message_begin`, `_url`,
`_headers_complete`, `_body` and `_message_complete` (the deriving core's:
ConnCore in _conn.pyx for requests, UpstreamCore in _upstream.pyx for
responses), and the header collector's. llhttp is compiled into this
module alone; the cores read the parser's fields (method, version, status,
upgrade) themselves and call it through the methods below.

The callbacks never raise: the exception goes to the core's
`_callback_failed` and the non-zero return stops the parse, with exactly
httptools' return codes and error reasons, so that both twins refuse a bad
message alike."""

from hubcore.http._llhttp cimport (
    HPE_PAUSED_UPGRADE, HPE_USER, HTTP_GET, HTTP_HEAD, HTTP_POST, llhttp_execute, llhttp_get_error_reason,
    llhttp_init, llhttp_method_name, llhttp_method_t, llhttp_resume_after_upgrade, llhttp_set_error_reason,
    llhttp_settings_init, llhttp_settings_t, llhttp_should_keep_alive,
)

cdef bytes _GET = b"GET"
cdef bytes _HEAD = b"HEAD"
cdef bytes _POST = b"POST"


# -- llhttp's callbacks --------------------------------------------------------
# Called with the core as the parser's `data`. A data callback that fails
# reports HPE_USER with the reason httptools gives; the others return -1,
# as httptools' do.

cdef llhttp_settings_t _SETTINGS  # llhttp keeps a pointer to it: module-lived
llhttp_settings_init(&_SETTINGS)


cdef int _stopped(llhttp_t* http, ParsingCore core, BaseException error, const char* reason) noexcept:
    core._callback_failed(error)
    llhttp_set_error_reason(http, reason)
    return HPE_USER


cdef int _on_message_begin(llhttp_t* http) noexcept:
    cdef ParsingCore core = <ParsingCore>http.data
    try:
        core._message_begin()
    except BaseException as e:
        core._callback_failed(e)
        return -1
    return 0


cdef int _on_url(llhttp_t* http, const char* at, size_t length) noexcept:
    cdef ParsingCore core = <ParsingCore>http.data
    try:
        core._url(at[:length])
    except BaseException as e:
        return _stopped(http, core, e, b"`on_url` callback error")
    return 0


cdef int _on_header_field(llhttp_t* http, const char* at, size_t length) noexcept:
    cdef ParsingCore core = <ParsingCore>http.data
    try:
        core.collector._name_span(at, length)
    except BaseException as e:
        return _stopped(http, core, e, b"`on_header_field` callback error")
    return 0


cdef int _on_header_value(llhttp_t* http, const char* at, size_t length) noexcept:
    cdef ParsingCore core = <ParsingCore>http.data
    try:
        core.collector._value_span(at, length)
    except BaseException as e:
        return _stopped(http, core, e, b"`on_header_value` callback error")
    return 0


cdef int _on_headers_complete(llhttp_t* http) noexcept:
    cdef ParsingCore core = <ParsingCore>http.data
    try:
        core.collector._flush()
        core._headers_complete()
    except BaseException as e:
        core._callback_failed(e)
        return -1
    # What llhttp still takes for an upgrade (a request's CONNECT or Upgrade,
    # which the client core refuses first; an answer's 101): 1 skips the
    # body, and the parse stops at the head.
    return 1 if http.upgrade else 0


cdef int _on_body(llhttp_t* http, const char* at, size_t length) noexcept:
    cdef ParsingCore core = <ParsingCore>http.data
    try:
        core._body_at(at, length)
    except BaseException as e:
        return _stopped(http, core, e, b"`on_body` callback error")
    return 0


cdef int _on_chunk_complete(llhttp_t* http) noexcept:
    # After the last chunk: its trailers' last line.
    cdef ParsingCore core = <ParsingCore>http.data
    try:
        core.collector._flush()
    except BaseException as e:
        core._callback_failed(e)
        return -1
    return 0


cdef int _on_message_complete(llhttp_t* http) noexcept:
    cdef ParsingCore core = <ParsingCore>http.data
    try:
        core._message_complete()
    except BaseException as e:
        core._callback_failed(e)
        return -1
    return 0


_SETTINGS.on_message_begin = _on_message_begin
_SETTINGS.on_url = _on_url
_SETTINGS.on_header_field = _on_header_field
_SETTINGS.on_header_value = _on_header_value
_SETTINGS.on_headers_complete = _on_headers_complete
_SETTINGS.on_body = _on_body
_SETTINGS.on_chunk_complete = _on_chunk_complete
_SETTINGS.on_message_complete = _on_message_complete


cdef class ParsingCore:
    """A connection core's parser; see the module's docstring."""

    cdef _start_parser(self, llhttp_type_t kind):
        self.collector = HeaderCollector()
        llhttp_init(&self._http, kind, &_SETTINGS)
        # A borrowed reference: the core owns the parser, so it outlives it.
        self._http.data = <void*>self

    cdef llhttp_errno_t _execute(self, const char* data, Py_ssize_t size):
        cdef llhttp_errno_t err = llhttp_execute(&self._http, data, size)
        # The read's bytes are about to be reused: a header cut off at its
        # end keeps what it has of them as bytes (see the header collector).
        self.collector._own()
        return err

    cdef bint _upgrade_paused(self, llhttp_errno_t err):
        """Whether the parse stopped at an upgrade's head (which neither
        core lets through); the parser is then ready to go on."""
        if err == HPE_PAUSED_UPGRADE and self._http.upgrade:
            llhttp_resume_after_upgrade(&self._http)
            return True
        return False

    cdef str _refusal(self):
        """llhttp's reason for refusing the bytes (a failed callback's is
        the one _stopped set)."""
        return llhttp_get_error_reason(&self._http).decode("latin-1")

    cdef bint _keep_alive(self):
        return llhttp_should_keep_alive(&self._http) != 0

    cdef bytes _method(self):
        """The request's method as llhttp names it, without a new bytes
        object for the usual three."""
        cdef int method = self._http.method
        if method == HTTP_POST:
            return _POST
        if method == HTTP_GET:
            return _GET
        if method == HTTP_HEAD:
            return _HEAD
        return <bytes>llhttp_method_name(<llhttp_method_t>method)

    cdef _callback_failed(self, BaseException error):
        pass  # the reason llhttp keeps is all a core without an override says

    cdef _message_begin(self):
        pass

    cdef _url(self, bytes url):
        pass

    cdef _headers_complete(self):
        pass

    cdef _body(self, bytes piece):
        pass

    cdef _body_at(self, const char* at, Py_ssize_t length):
        # Where the body's bytes lie in the read: a core that can keep them
        # without a bytes object of their own overrides this.
        self._body(at[:length])

    cdef _message_complete(self):
        pass
