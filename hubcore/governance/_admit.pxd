# The compiled limiter's fields and calls, declared here so that the
# Exchange's core (hubcore/gateway/_exchange.pyx) admits a request, asks
# whether it needs the model and releases its admission as C calls on a
# typed limiter and admission, without a Python attribute lookup or
# argument parsing.


cdef class _Scope:
    cdef public str label
    cdef public long in_flight
    cdef public object hits
    cdef public object total
    cdef public object total_base
    cdef public double day_start
    cdef public object day_base
    cdef public double week_start
    cdef public object week_base
    cdef public double month_start
    cdef public object month_base
    cdef public object periods
    cdef public double counts_from
    cdef public dict resets
    cdef public object buckets
    cdef public object rolling


cdef class Admission:
    cdef public tuple _scopes

    cpdef release(self)


cdef class LimiterCore:
    cdef public object tz
    cdef public object _clock
    cdef public dict _tokens
    cdef public dict _users
    cdef public dict _projects
    cdef public object _limits
    cdef public dict _warn_tokens
    cdef public dict _warn_users
    cdef public dict _warn_projects
    cdef public object on_crossing
    cdef public bint judges_rates
    cdef public object _periods
    cdef public tuple _day
    cdef public tuple _week
    cdef public tuple _month
    cdef public double _day_start
    cdef public double _boundary

    cdef _admit_request(self, principal, model, now, bint model_required)
    cpdef bint needs_model(self, principal) except -1
    cpdef on_usage(self, event)
    cpdef charge(self, token_id, user, project, cost_micros, ts)
    cdef int _charge(self, token_id, user, project, cost_micros, ts) except -1
    cdef int _add_cost(self, _Scope scope, cost, ts, double t, long long minute) except -1


# The fields of a Principal that principal_field reads from its slots.
cdef enum:
    P_TOKEN_ID
    P_USER
    P_PROJECT
    P_LIMITS
    P_GROUPS
    P_FIELDS

cdef object principal_field(object principal, int field)
