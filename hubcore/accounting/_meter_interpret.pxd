# The compiled Reading's layout: a C struct and C-level method calls instead
# of slot descriptors and bound-method lookups, for the compiled meter
# (_meter.pyx) and for Reading's own code. The .py stays the one source of
# what the counters mean; the pure twin runs it as Python.

cimport cython

# A vendor's count as sent, or None: a C call from the methods below.
cpdef _count(v)

cdef class Reading:
    cdef public object fmt
    cdef public object model
    cdef public object input_tokens
    cdef public object cache_write_5m
    cdef public object cache_write_1h
    cdef public object cache_read
    cdef public object reasoning_tokens
    cdef public object server_tool_requests
    cdef public object stop_reason
    cdef public object error_type
    cdef public object completed
    cdef public object _output_reported
    cdef public object _final_usage
    cdef public object _oa_input
    cdef public object _oa_cached

    cpdef _output_tokens(self, delta_chars)
    cpdef _output_estimated(self, delta_chars)
    cpdef _error(self, kind)
    cpdef _stop(self)
    cpdef _done(self)
    @cython.locals(event=dict)
    cpdef _event(self, kind, obj)
    cpdef _untyped(self, obj)
    cpdef _chunk(self, obj, whole)
    cpdef _unstreamed(self, obj)
    # Every caller checked that these are dicts.
    cpdef _anthropic_message(self, dict msg)
    @cython.locals(counts=dict)
    cpdef _anthropic_usage(self, usage)
    cpdef bint _anthropic_counts(self, input_tokens, output, cache_read, write_5m, write_1h, write_total, thinking,
                                 tool_requests) except -1
    cpdef _cache_write_total(self, total)
    @cython.locals(counts=dict)
    cpdef _openai_usage(self, usage, inp, out, inp_details, out_details)
    cpdef _responses_obj(self, dict resp, status_default)
    cpdef _chat_obj(self, dict obj)
