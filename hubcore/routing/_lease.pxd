# The compiled key ring's fields and calls, declared here so that the
# Exchange's core (hubcore/gateway/_exchange.pyx) acquires, observes and
# releases a lease as C calls on a typed ring, without a Python attribute
# lookup or argument parsing.


cdef class _Key:
    cdef public object spec
    cdef public object state
    cdef public object until
    cdef public double pause
    cdef public object probe
    cdef public double current
    cdef public long in_flight
    cdef public long requests
    cdef public long rate_limited
    cdef public long errors
    cdef public long consecutive_failures
    cdef public object last_error
    cdef public object room
    cdef public double read_due
    cdef public long bare_reads
    cdef public dict rests
    cdef public double held
    cdef public double held_rest
    cdef public object revival


cdef class Lease:
    cdef public _Key _key
    cdef public bint probe
    cdef public bint released
    cdef public str model_class


cdef class RingCore:
    cdef public object policy
    cdef public object _clock
    cdef public object _wall_clock
    cdef public dict _keys
    cdef public object _sessions
    cdef public set _waiters
    cdef public long _best_priority

    cpdef Lease acquire(self, session_id=*, tried=*, reason=*, previous=*, str model_class=*)
    cdef Lease _acquire_among(self, double now, session_id, tried, reason, previous, str model_class)
    cpdef bint reading_due(self, Lease lease, model_class=*) except -1
    cpdef observe(self, Lease lease, headers, model_class=*)
    cpdef release(self, Lease lease, failure=*)
    cdef void _wake_waiters(self) except *
