# cython: language_level=3
"""The Limiter's request path, compiled: the twin of `_admit_py.py` (see
there for the contract; tests/governance/test_admit_core.py holds both to
it).

The same methods in the same order, on typed fields: a scope's counters
and an admission are cdef classes, so that admit, needs_model, the charge
of a request's cost and an admission's release read them as C fields.
Spend stays in Python ints (a rebuild may sum it on PostgreSQL, as
Decimal); in-flight counts and period starts are C numbers. What Limiter
keeps in Python (_admit_limited, _advance, _credit, _add_bucket,
_add_watched) the core calls as Python methods, only when the common case
does not hold."""

cimport cython
from libc.math cimport copysign, floor, fmod

from hubcore._slots cimport read_slot, slot_offset

import math

from hubcore.governance._admit_py import BUCKET_SECONDS, NEVER, NO_RESETS
from hubcore.governance.storage import ScopeLimits
from hubcore.governance.tokens import Principal

cdef double _BUCKET_SECONDS = BUCKET_SECONDS
cdef double _NEVER = NEVER
cdef dict _NO_RESETS = NO_RESETS
cdef double _INF = math.inf

# What admit and needs_model (and the Exchange's core, through
# principal_field) read of a Principal and of the stored limits on every
# request, from their slots (hubcore/_slots.pxd).
cdef type _Principal = Principal
cdef Py_ssize_t _PRINCIPAL_OFFSETS[P_FIELDS]
cdef list _PRINCIPAL_NAMES = [None] * P_FIELDS
for _field, _name in (
    (P_TOKEN_ID, "token_id"), (P_USER, "user"), (P_PROJECT, "project"), (P_LIMITS, "limits"), (P_GROUPS, "groups"),
):
    _PRINCIPAL_OFFSETS[_field] = slot_offset(Principal, _name)
    _PRINCIPAL_NAMES[_field] = _name
cdef type _ScopeLimits = ScopeLimits
cdef Py_ssize_t _USERS_LIMITS = slot_offset(ScopeLimits, "users")
cdef Py_ssize_t _PROJECTS_LIMITS = slot_offset(ScopeLimits, "projects")


cdef object principal_field(object principal, int field):
    """`getattr(principal, name)` of the P_ constant `field`, from its slot
    for an exact Principal."""
    return read_slot(principal, _Principal, _PRINCIPAL_OFFSETS[field], <str>_PRINCIPAL_NAMES[field])


# The classes' fields, and the methods the Exchange's core calls in C, are
# declared in _admit.pxd.

cdef class _Scope:
    """See _admit_py._Scope."""

    def __init__(self, str label):
        self.label = label
        self.in_flight = 0
        self.hits = None
        self.clear_spend()

    def clear_spend(self):
        self.total = 0
        self.total_base = 0
        self.day_start = self.week_start = self.month_start = -_INF
        self.day_base = self.week_base = self.month_base = 0
        self.periods = None
        self.counts_from = _INF
        self.resets = None
        self.buckets = None
        self.rolling = 0


# One Admission per request: kept instances spare the allocator a round trip.
@cython.freelist(8)
cdef class Admission:
    """See _admit_py.Admission."""

    # The budgets over the request (BudgetedAdmission); on the class, None,
    # for a principal without any: the common case pays nothing for them.
    budget = None

    def __init__(self, tuple scopes):
        self._scopes = scopes

    cpdef release(self):
        cdef tuple scopes = self._scopes
        cdef _Scope scope
        self._scopes = None
        if scopes is not None:
            for scope in scopes:
                scope.in_flight -= 1

    @property
    def released(self):
        return self._scopes is None


cdef inline Admission _admission(tuple scopes):
    # Admission(scopes) from C would pack a tuple and parse it in __init__.
    cdef Admission admission = Admission.__new__(Admission)
    admission._scopes = scopes
    return admission


cdef inline long long _minute(double ts):
    """int(ts // BUCKET_SECONDS), by CPython's float floor division (a
    quotient just under a whole minute stays in the minute before)."""
    cdef double mod = fmod(ts, _BUCKET_SECONDS)
    cdef double div = (ts - mod) / _BUCKET_SECONDS
    cdef double floordiv
    if mod and mod < 0:
        div -= 1.0
    if div:
        floordiv = floor(div)
        if div - floordiv > 0.5:
            floordiv += 1.0
    else:
        floordiv = copysign(0.0, ts / _BUCKET_SECONDS)
    return <long long>floordiv


cdef class LimiterCore:
    """See _admit_py.LimiterCore."""

    # -- the request path --------------------------------------------------------

    def admit(self, principal, model=None, now=None, *, bint model_required=False):
        return self._admit_request(principal, model, now, model_required)

    # admit's steps, which the Exchange's core calls in C (admit keeps its
    # keyword-only argument as a def method): a subclass overriding admit
    # is not seen there.
    cdef _admit_request(self, principal, model, now, bint model_required):
        if now is None:
            now = self._clock()
        if <double>now >= self._boundary:
            self._advance(now)
        cdef _Scope token, user, project = None
        cdef tuple scopes
        cdef dict users_limits, projects_limits
        token_id = principal_field(principal, P_TOKEN_ID)
        token = self._tokens.get(token_id)
        if token is None:
            token = self._tokens[token_id] = _Scope(f"token {token_id}")
        name = principal_field(principal, P_USER)
        user = self._users.get(name)
        if user is None:
            user = self._users[name] = _Scope(f"user {name}")
        defined = self._limits
        token_limits = principal_field(principal, P_LIMITS)
        users_limits = read_slot(defined, _ScopeLimits, _USERS_LIMITS, "users")
        user_limits = users_limits.get(name)
        project_limits = None
        name = principal_field(principal, P_PROJECT)
        if name is None:
            scopes = (token, user)
        else:
            project = self._projects.get(name)
            if project is None:
                project = self._projects[name] = _Scope(f"project {name}")
            scopes = (token, user, project)
            projects_limits = read_slot(defined, _ScopeLimits, _PROJECTS_LIMITS, "projects")
            project_limits = projects_limits.get(name)
        # principal.groups: a user's or project's groups restriction reaches
        # the token table before update() brings its limits here.
        if (token_limits is not None or user_limits is not None or project_limits is not None
                or principal_field(principal, P_GROUPS) is not None):
            return self._admit_limited(principal, model, now, model_required, scopes,
                                       token_limits, user_limits, project_limits)
        token.in_flight += 1
        user.in_flight += 1
        if project is not None:
            project.in_flight += 1
        return _admission(scopes)

    cpdef bint needs_model(self, principal) except -1:
        cdef dict users_limits, projects_limits
        defined = self._limits
        limits = principal_field(principal, P_LIMITS)
        if limits is not None and limits.model_re is not None:
            return True
        user = principal_field(principal, P_USER)
        users_limits = read_slot(defined, _ScopeLimits, _USERS_LIMITS, "users")
        limits = users_limits.get(user)
        if limits is not None and limits.model_re is not None:
            return True
        project = principal_field(principal, P_PROJECT)
        if project is not None:
            projects_limits = read_slot(defined, _ScopeLimits, _PROJECTS_LIMITS, "projects")
            limits = projects_limits.get(project)
            if limits is not None and limits.model_re is not None:
                return True
        return False

    # -- spend ---------------------------------------------------------------

    cpdef on_usage(self, event):
        self._charge(event.token_id, event.user, event.project, event.cost_micros, event.ts)

    cpdef charge(self, token_id, user, project, cost_micros, ts):
        self._charge(token_id, user, project, cost_micros, ts)

    cdef int _charge(self, token_id, user, project, cost_micros, ts) except -1:
        if not cost_micros or cost_micros < 0:
            return 0
        cdef double t = ts
        if t >= self._boundary:
            self._advance(ts)
        cdef long long minute = _minute(t)
        cdef _Scope scope
        if token_id is not None:
            scope = self._tokens.get(token_id)
            if scope is None:
                scope = self._tokens[token_id] = _Scope(f"token {token_id}")
            if self._warn_tokens and (watched := self._warn_tokens.get(token_id)) is not None:
                self._add_watched(scope, watched, "token", str(token_id), cost_micros, ts, minute)
            else:
                self._add_cost(scope, cost_micros, ts, t, minute)
        if user is not None:
            scope = self._users.get(user)
            if scope is None:
                scope = self._users[user] = _Scope(f"user {user}")
            if self._warn_users and (watched := self._warn_users.get(user)) is not None:
                self._add_watched(scope, watched, "user", user, cost_micros, ts, minute)
            else:
                self._add_cost(scope, cost_micros, ts, t, minute)
        if project is not None:
            scope = self._projects.get(project)
            if scope is None:
                scope = self._projects[project] = _Scope(f"project {project}")
            if self._warn_projects and (watched := self._warn_projects.get(project)) is not None:
                self._add_watched(scope, watched, "project", project, cost_micros, ts, minute)
            else:
                self._add_cost(scope, cost_micros, ts, t, minute)
        return 0

    def _add(self, _Scope scope, cost, ts, minute):
        self._add_cost(scope, cost, ts, ts, minute)

    cdef int _add_cost(self, _Scope scope, cost, ts, double t, long long minute) except -1:
        # `ts` the request's time as given, `t` the same as a C double.
        cdef dict resets
        cdef list last
        # The day starts no earlier than its week and month: a charge in the
        # current day of a scope already in the current periods (and after
        # its spend resets) is in every window, and total - *_base moves with
        # total alone.
        if scope.periods is self._periods and t >= scope.counts_from:
            scope.total += cost
        else:
            # A cost from before a period's start (a request that arrived
            # yesterday and ended today) belongs to a period already over;
            # one from before a spend reset, to the spend it forgave.
            resets = scope.resets or _NO_RESETS
            self._credit(
                scope, cost,
                cost if t >= self._day_start and t >= <double>resets.get("day", _NEVER) else 0,
                cost if t >= <double>self._week[0] and t >= <double>resets.get("week", _NEVER) else 0,
                cost if t >= <double>self._month[0] and t >= <double>resets.get("month", _NEVER) else 0,
                cost if t >= <double>resets.get("total", _NEVER) else 0,
            )
            if t < <double>resets.get("5h", _NEVER):
                return 0
        buckets = scope.buckets
        if buckets and buckets[-1][0] == minute:
            last = buckets[-1]
            last[1] += cost
            scope.rolling += cost
        else:
            self._add_bucket(scope, minute, cost)
        return 0
