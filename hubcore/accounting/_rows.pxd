# The request path's UsageEvent maker, a C call from gateway/_exchange.pyx,
# and the reader of an event's fields by their slots for the compiled
# listeners that read an event on every request (ops/_tally.pyx,
# ops/_access.pyx).
cpdef object new_event(tuple values)

# UsageEvent's fields in FIELDS order (_rows.pyx checks the order at import).
cdef enum:
    F_TS
    F_REQUEST_ID
    F_ENDPOINT
    F_STATUS
    F_OUTCOME
    F_TOTAL_MS
    F_TOKEN_ID
    F_USER
    F_PROJECT
    F_UPSTREAM
    F_KEY_LABEL
    F_MODEL
    F_INPUT_TOKENS
    F_OUTPUT_TOKENS
    F_CACHE_WRITE_5M
    F_CACHE_WRITE_1H
    F_CACHE_READ
    F_REASONING_TOKENS
    F_SERVER_TOOL_REQUESTS
    F_STOP_REASON
    F_ERROR_TYPE
    F_COST_MICROS
    F_TTFB_MS
    F_ATTEMPTS
    F_SESSION_ID
    F_USER_AGENT
    F_OUTPUT_ESTIMATED
    F_COST_BASIS
    F_SERVED_MODEL
    F_ROUTE

cdef object event_field(object event, int field)


# The usage recorder's per-request part (accounting.recorder.UsageRecorder
# is its subclass); its fields are the subclass's too.
cdef class RecorderCore:
    cdef public Py_ssize_t _queue_max
    cdef public Py_ssize_t _batch_max
    cdef public list _listeners
    cdef public object _queue
    cdef public object _wake
    cdef public bint _closed

    cpdef record(self, event)
