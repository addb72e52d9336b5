# cython: language_level=3
"""The key ring's common path, compiled: the twin of `_lease_py.py` (see
there for the contract; tests/routing/test_lease_core.py holds both to it).

The same methods in the same order, on typed fields: a key's state and
counters and a lease are cdef classes, so that acquire's session fast
path, its pass over a ring of several keys, observe's early returns and
release's common case read them as C fields. What KeyRing keeps in Python
(_expire, _previous_key, _settle) the core calls as Python methods, only
when the common case does not hold."""

cimport cython
from cpython.dict cimport PyDict_GetItem
from cpython.unicode cimport PyUnicode_CheckExact
from cpython.object cimport PyObject

from hubcore._slots cimport read_slot, slot_offset

from hubcore.config import KeySpec
from hubcore.routing._lease_py import BARE_READS_TO_WAIT, KeyState, prefer
from hubcore.routing.failures import FailureKind
from hubcore.routing.headroom import Headroom, read_index

# A key's spec, read by its slots (see hubcore/_slots.pxd): the lease and
# the selection read its label, priority, weight and secret on every request.
cdef type _KeySpec = KeySpec
cdef Py_ssize_t _LABEL = slot_offset(KeySpec, "label")
cdef Py_ssize_t _PRIORITY = slot_offset(KeySpec, "priority")
cdef Py_ssize_t _WEIGHT = slot_offset(KeySpec, "weight")
cdef Py_ssize_t _SECRET = slot_offset(KeySpec, "secret")


cdef inline object _label(_Key key):
    return read_slot(key.spec, _KeySpec, _LABEL, "label")


cdef inline object _priority(_Key key):
    return read_slot(key.spec, _KeySpec, _PRIORITY, "priority")

# The states as C globals: `key.state is _H` is a pointer comparison.
cdef object _H = KeyState.HEALTHY
cdef object _C = KeyState.COOLING
cdef object _RATE_LIMITED = FailureKind.RATE_LIMITED
cdef object _read_index = read_index
cdef long _BARE_READS_TO_WAIT = BARE_READS_TO_WAIT
cdef object _prefer = prefer
cdef frozenset _NOTHING_TRIED = frozenset()


# The classes' fields, and the methods the Exchange's core calls in C, are
# declared in _lease.pxd.

cdef class _Key:
    """See _lease_py._Key."""

    def __init__(self, spec):
        self.spec = spec
        self.state = _H
        self.until = None
        self.pause = 0.0
        self.probe = None
        self.current = 0.0
        self.in_flight = 0
        self.requests = 0
        self.rate_limited = 0
        self.errors = 0
        self.consecutive_failures = 0
        self.last_error = None
        self.room = Headroom()
        self.read_due = 0.0
        self.bare_reads = 0
        self.rests = {}
        self.held = 0.0
        self.held_rest = 0.0
        self.revival = None


# One Lease per attempt: kept instances spare the allocator a round trip.
@cython.freelist(8)
cdef class Lease:
    """See _lease_py.Lease."""

    def __init__(self, _Key key, probe, str model_class=""):
        self._key = key
        self.probe = probe
        self.released = False
        self.model_class = model_class

    @property
    def label(self):
        return _label(self._key)

    @property
    def secret(self):
        return read_slot(self._key.spec, _KeySpec, _SECRET, "secret")

    @property
    def workspace(self):
        return self._key.spec.workspace

    @property
    def org(self):
        return self._key.spec.org

    def __repr__(self):
        return f"<Lease {self.label!r} probe={self.probe} released={self.released}>"


cdef inline Lease _lease(_Key key, str model_class):
    # Lease(key, probe=False, model_class=...) from C would pack its
    # arguments and parse them in __init__.
    cdef Lease lease = Lease.__new__(Lease)
    lease._key = key
    lease.probe = False
    lease.released = False
    lease.model_class = model_class
    return lease


cdef inline int _check_lease(Lease lease) except -1:
    # A cpdef method's typed argument may be None (`not None` is for def
    # ones): the Python twin would fail reading its attributes.
    if lease is None:
        raise AttributeError("'NoneType' object has no attribute 'released'")
    return 0


cdef inline bint _due(_Key key, cls, double now) except -1:
    """See the twin's _due."""
    return not (now < key.read_due and (cls in key.room.by_class or key.bare_reads >= _BARE_READS_TO_WAIT))


cdef class RingCore:
    """See _lease_py.RingCore."""

    # -- selection ---------------------------------------------------------

    cpdef Lease acquire(self, session_id=None, tried=_NOTHING_TRIED, reason=None, previous=None,
                        str model_class=""):
        cdef double now = self._clock()
        cdef _Key key
        cdef object entry, sessions, reading
        cdef PyObject* found
        if session_id is not None:
            # The sessions are an OrderedDict: written through its own
            # methods (a dict's C calls would skip its order); read as the
            # dict it is (reading moves nothing), in C for an exact str.
            sessions = self._sessions.entries
            if PyUnicode_CheckExact(session_id) and isinstance(sessions, dict):
                found = PyDict_GetItem(sessions, session_id)
                entry = <object>found if found != NULL else None
            else:
                entry = sessions.get(session_id)
            if entry is not None:
                key = <_Key?>(<tuple?>entry)[0]
                # The common case, decided without looking at the other keys:
                # the session's key is healthy, untried, still in the ring, in
                # its best tier whatever state the others are in, not resting
                # for the class, and its latest reading is not under the floor.
                if (
                    <double>(<tuple>entry)[1] > now
                    and key.state is _H
                    and key.until is None
                    and _priority(key) == self._best_priority
                    and _label(key) not in tried
                    and model_class not in key.rests
                    and key.held <= now
                    and self._keys.get(_label(key)) is key
                ):
                    # Its room, as above_floor judges it: the one key of a
                    # ring is used whatever its room; another needs no
                    # reading in force under the floor (or at nothing).
                    if len(self._keys) != 1:
                        reading = key.room.by_class.get(model_class)
                        if not (reading is None
                                or (reading.fraction >= self.policy.headroom_floor and reading.fraction > 0.0)
                                or reading.until <= self._wall_clock()):
                            return self._acquire_among(now, session_id, tried, reason, previous, model_class)
                    key.in_flight += 1
                    key.requests += 1
                    # Affinity.remember, inline: every request of a session comes here.
                    sessions[session_id] = (key, now + self._sessions.ttl)
                    sessions.move_to_end(session_id)
                    return _lease(key, model_class)
        return self._acquire_among(now, session_id, tried, reason, previous, model_class)

    cdef Lease _acquire_among(self, double now, session_id, tried, reason, previous, str model_class):
        # The usable keys of the best tier, in one pass.
        cdef list best = []
        cdef long tier = 0, priority
        cdef _Key key, chosen, sticky, before
        cdef dict rooms = None
        cdef list roomy
        cdef bint all_low = False, away_from_org
        cdef double wall
        for key in self._keys.values():
            # KeyRing._expire, called only when it has something to do.
            if (key.until is not None and <double>key.until <= now) or key.rests:
                self._expire(key, now)
            if key.state is not _H or _label(key) in tried or model_class in key.rests or key.held > now:
                continue
            priority = _priority(key)
            if not best or priority < tier:
                best = [key]
                tier = priority
            elif priority == tier:
                best.append(key)
        if not best:
            return None
        roomy = best
        if len(best) > 1:
            wall = self._wall_clock()
            rooms = {}
            for key in best:
                rooms[key] = <double>key.room.fraction(model_class, wall)
            roomy, all_low = _above_floor(best, rooms, self.policy.headroom_floor)

        sticky = self._sessions.get(session_id, now) if session_id is not None else None
        # A session keeps its key under the floor only when every key is:
        # its prompt cache is worth more than a few points of room.
        if sticky is not None and (sticky in roomy or (all_low and sticky in best)):
            chosen = sticky
        else:
            before = self._previous_key(previous, sticky, tried)
            if before is not None:
                if reason is not None:
                    away_from_org = reason.kind is _RATE_LIMITED
                else:
                    # The session moves without a fresh failure: its key is
                    # resting (for the class), broken, gone, short of room, or
                    # in a worse tier than now usable.
                    away_from_org = before.state is _C or model_class in before.rests
                roomy = _prefer(roomy, before, away_from_org)
            chosen = _pick(roomy, rooms)

        lease = _lease(chosen, model_class)
        chosen.in_flight += 1
        chosen.requests += 1
        if session_id is not None:
            self._sessions.remember(session_id, chosen, now)
        return lease

    # -- outcomes ------------------------------------------------------------

    cpdef bint reading_due(self, Lease lease, model_class=None) except -1:
        """See the twin."""
        if len(self._keys) == 1:
            return False
        _check_lease(lease)
        return _due(lease._key, lease.model_class if model_class is None else model_class, self._clock())

    cpdef observe(self, Lease lease, headers, model_class=None):
        _check_lease(lease)
        if len(self._keys) == 1:
            # Nothing to choose between: the reading would only be shown.
            return
        cdef _Key key = lease._key
        cls = lease.model_class if model_class is None else model_class
        cdef double now = self._clock()
        if not _due(key, cls, now):
            return
        reading = _read_index(headers, self._wall_clock())
        key.read_due = now + self.policy.headroom_read_interval
        if reading is None:
            key.bare_reads += 1
        else:
            key.bare_reads = 0
            key.room.update(cls, reading)

    cpdef release(self, Lease lease, failure=None):
        _check_lease(lease)
        if lease.released:
            raise RuntimeError(f"{lease!r} released twice")
        lease.released = True
        cdef _Key key = lease._key
        key.in_flight -= 1
        if failure is None and key.state is _H and key.consecutive_failures == 0 and key.probe is None:
            # The common case, in which _transition would change nothing.
            self._wake_waiters()
            return
        self._settle(lease, key, failure)

    def _notify(self):
        self._wake_waiters()

    cdef void _wake_waiters(self) except *:
        if self._waiters:
            for waiter in self._waiters:
                _wake(waiter)


cdef tuple _above_floor(list candidates, dict rooms, double floor):
    """See _lease_py.above_floor."""
    cdef list roomy = []
    cdef double most = -1.0, room
    cdef _Key key
    for key in candidates:
        room = rooms[key]
        if room >= floor and room > 0.0:
            roomy.append(key)
        elif room > most:
            most = room
    if roomy:
        return roomy, False
    return [key for key in candidates if <double>rooms[key] == most], True


cdef inline double _share(_Key key, dict rooms) except? -1.0:
    """See _lease_py.share."""
    cdef double room = 1.0 if rooms is None else rooms[key]
    cdef double weight = read_slot(key.spec, _KeySpec, _WEIGHT, "weight")
    return weight * room if room > 0.0 else weight


cdef _Key _pick(list candidates, dict rooms):
    """See _lease_py.pick: routing.balance.least_loaded's steps, on the
    keys' typed fields."""
    cdef Py_ssize_t n = len(candidates), i
    if n == 1:
        return candidates[0]
    cdef list shares = [_share(key, rooms) for key in candidates]
    cdef double lightest = float("inf"), after, share, total = 0.0
    cdef _Key candidate, chosen = None
    for i in range(n):
        candidate = candidates[i]
        share = shares[i]
        after = (candidate.in_flight + 1) / share
        if after < lightest:
            lightest = after
    for i in range(n):
        candidate = candidates[i]
        share = shares[i]
        if candidate.in_flight / share < lightest:
            candidate.current += share
            total += share
            if chosen is None or candidate.current > chosen.current:
                chosen = candidate
    assert chosen is not None  # the lightest is always below its own load after this request
    chosen.current -= total
    return chosen


cdef inline void _wake(waiter) except *:
    if not waiter.done():
        waiter.set_result(None)


def pick(candidates, rooms):
    """See _lease_py.pick."""
    return _pick(candidates, rooms)


def wake(waiter):
    """See _lease_py.wake."""
    _wake(waiter)
