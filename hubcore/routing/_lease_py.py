"""The key ring's common path (hubcore.routing.keys): a key's state and
counters (_Key), an attempt's hold on one (Lease), and what every request
runs of KeyRing (RingCore: acquire, observe, the common case of release).
The pure-Python twin of `_lease.pyx`; hubcore.routing.lease picks one.

KeyRing subclasses RingCore and keeps the rest in Python: the state
machine (_transition, _expire), failover (_previous_key), the outcome of a
failed attempt (_settle), waiting, the operator, reloads and stats. The
core calls those as Python methods, only when the common case does not
hold (a key whose rest or circuit is over, a failure, a failover).
"""
from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING

from hubcore.config import KeyPolicy, KeySpec
from hubcore.routing.affinity import Affinity
from hubcore.routing.balance import least_loaded
from hubcore.routing.failures import FailureKind
from hubcore.routing.headroom import Headroom, read_index

if TYPE_CHECKING:
    from hubcore.routing.failures import Failure

__all__ = ["KeyState", "Lease", "RingCore", "above_floor", "prefer", "share", "wake"]


# Heads in a row without rate-limit headers after which a key's heads are
# read once per read interval instead of on every answer: one such head may
# be an odd answer (an error page of a proxy between), two say the upstream
# sends none.
BARE_READS_TO_WAIT = 2


class KeyState(enum.Enum):
    HEALTHY = "healthy"
    COOLING = "cooling"  # rate limited until `until`
    OPEN = "open"  # circuit open until `until`
    HALF_OPEN = "half_open"  # the pause is over: the hub's probe is due
    PROBING = "probing"  # the hub's probe is out; its answer decides
    DEAD = "dead"  # the vendor refused the key (401/403); a reload or the operator revives it
    DISABLED = "disabled"  # by an operator, until the operator enables it


_H = KeyState.HEALTHY


class _Key:
    """A key's spec, its state and its counters (one object per label and secret)."""

    __slots__ = (
        "spec",
        "state",
        "until",
        "pause",
        "probe",
        "current",
        "in_flight",
        "requests",
        "rate_limited",
        "errors",
        "consecutive_failures",
        "last_error",
        "room",
        "read_due",
        "bare_reads",
        "rests",
        "held",
        "held_rest",
        "revival",
    )

    def __init__(self, spec: KeySpec) -> None:
        self.spec = spec
        self.state = KeyState.HEALTHY
        # Monotonic time when COOLING or OPEN ends; None in the other states.
        self.until: float | None = None
        # Length of the current (or last) open period, doubled per failed
        # probe and per relapse on probation; 0.0 once a user's request was
        # answered since, so that the next circuit starts from the policy's pause.
        self.pause = 0.0
        # The hub's probe lease, from take_probes() until it is released
        # (whatever the state is by then).
        self.probe: Lease | None = None
        # Smooth weighted round-robin accumulator (of shares: weight x room).
        self.current = 0.0
        self.in_flight = 0
        self.requests = 0
        self.rate_limited = 0
        self.errors = 0
        self.consecutive_failures = 0
        self.last_error: str | None = None
        # What the vendor's rate-limit headers said of the key's room, per model class.
        self.room = Headroom()
        # Monotonic time before which an answer's headers are not read again
        # for a class the key has a reading of, or for any class once heads
        # come without limits (KeyPolicy.headroom_read_interval).
        self.read_due = 0.0
        # Heads read in a row that reported no limits.
        self.bare_reads = 0
        # Model class -> monotonic time its rest after a 429 ends, in any
        # state (a class never named here has no rest of its own).
        self.rests: dict[str, float] = {}
        # Monotonic time before which another hub instance holds the key
        # back (a rest of the whole key, or its circuit open there: see
        # hear); held_rest is the part that is a rest, which a request may
        # wait out.
        self.held = 0.0
        self.held_rest = 0.0
        # The mark of the operator's latest revival of the key on any hub
        # instance, as last heard (see hear); None: none heard.
        self.revival: str | None = None


class Lease:
    """One attempt's hold on a key; give it back with KeyRing.release, once."""

    __slots__ = ("_key", "probe", "released", "model_class")

    def __init__(self, key: _Key, probe: bool, model_class: str = "") -> None:
        self._key = key
        # True for the hub's own probe of an open circuit (take_probes).
        self.probe = probe
        self.released = False
        # The rate-limit class of the request's model (headroom.model_class):
        # its answers' readings and 429s are that class's; "" for unknown.
        self.model_class = model_class

    @property
    def label(self) -> str:
        return self._key.spec.label

    @property
    def secret(self) -> str:
        return self._key.spec.secret

    @property
    def workspace(self) -> str | None:
        return self._key.spec.workspace

    @property
    def org(self) -> str | None:
        return self._key.spec.org

    def __repr__(self) -> str:
        return f"<Lease {self.label!r} probe={self.probe} released={self.released}>"


class RingCore:
    """What every request runs of a KeyRing (see hubcore.routing.keys for
    the contract of each method); the fields are KeyRing's, set by its
    __init__ and replace_specs."""

    policy: KeyPolicy
    _clock: Callable[[], float]
    _wall_clock: Callable[[], float]
    _keys: dict[str, _Key]
    _sessions: Affinity[_Key]
    _waiters: set[asyncio.Future[None]]
    _best_priority: int

    if TYPE_CHECKING:
        # What KeyRing keeps in Python, called when the common case does not
        # hold: declared for type checkers, defined by the subclass.
        def _expire(self, key: _Key, now: float) -> None:
            ...

        def _previous_key(self, previous: Lease | None, sticky: _Key | None, tried: AbstractSet[str]) -> _Key | None:
            ...

        def _settle(self, lease: Lease, key: _Key, failure: Failure | None) -> None:
            ...

    # -- selection ---------------------------------------------------------

    def acquire(
        self,
        session_id: str | None = None,
        tried: AbstractSet[str] = frozenset(),
        reason: Failure | None = None,
        previous: Lease | None = None,
        model_class: str = "",
    ) -> Lease | None:
        """A lease on the best HEALTHY key not in `tried` and not resting for
        `model_class` (headroom.model_class of the request's model; "" when
        unknown), or None if there is none.

        Best: the lowest priority tier; there, keys with at least the
        policy's headroom_floor of their room left for the class (the
        vendor's latest reading), or if none has, those with the most room;
        the session's key if it is among them (or every key is under the
        floor); else, when failing over (`reason`), a key of another org
        after a 429 and of the same workspace after other failures, relative
        to `previous` (the failed lease; default: the session's key, or the
        one key in `tried`); then the least loaded per weight x room, ties by
        smooth weighted round-robin (see pick). The chosen key becomes the
        session's key.
        """
        now = self._clock()
        if session_id is not None:
            entry = self._sessions.entries.get(session_id)
            if entry is not None:
                key = entry[0]
                # The common case, decided without looking at the other keys:
                # the session's key is healthy, untried, still in the ring, in
                # its best tier whatever state the others are in, not resting
                # for the class, and its latest reading is not under the floor.
                if (
                    entry[1] > now
                    and key.state is _H
                    and key.until is None
                    and key.spec.priority == self._best_priority
                    and key.spec.label not in tried
                    and model_class not in key.rests
                    and key.held <= now
                    and self._keys.get(key.spec.label) is key
                    # Its room, as above_floor judges it: the one key of a
                    # ring is used whatever its room; another needs no
                    # reading in force under the floor (or at nothing).
                    and (len(self._keys) == 1
                         or (reading := key.room.by_class.get(model_class)) is None
                         or (reading.fraction >= self.policy.headroom_floor and reading.fraction > 0.0)
                         or reading.until <= self._wall_clock())
                ):
                    key.in_flight += 1
                    key.requests += 1
                    # Affinity.remember, inline: every request of a session comes here.
                    sessions = self._sessions.entries
                    sessions[session_id] = (key, now + self._sessions.ttl)
                    sessions.move_to_end(session_id)
                    return Lease(key, probe=False, model_class=model_class)
        # The usable keys of the best tier, in one pass (loops, not
        # comprehensions: this runs for every request of a ring of several keys).
        best: list[_Key] = []
        tier = 0
        for key in self._keys.values():
            # KeyRing._expire, called only when it has something to do.
            if (key.until is not None and key.until <= now) or key.rests:
                self._expire(key, now)
            if key.state is not _H or key.spec.label in tried or model_class in key.rests or key.held > now:
                continue
            priority = key.spec.priority
            if not best or priority < tier:
                best = [key]
                tier = priority
            elif priority == tier:
                best.append(key)
        if not best:
            return None
        rooms: dict[_Key, float] | None = None
        roomy, all_low = best, False
        if len(best) > 1:
            wall = self._wall_clock()
            rooms = {}
            for key in best:
                rooms[key] = key.room.fraction(model_class, wall)
            roomy, all_low = above_floor(best, rooms, self.policy.headroom_floor)

        sticky = self._sessions.get(session_id, now) if session_id is not None else None
        # A session keeps its key under the floor only when every key is:
        # its prompt cache is worth more than a few points of room.
        if sticky is not None and (sticky in roomy or (all_low and sticky in best)):
            chosen = sticky
        else:
            before = self._previous_key(previous, sticky, tried)
            if before is not None:
                if reason is not None:
                    away_from_org = reason.kind is FailureKind.RATE_LIMITED
                else:
                    # The session moves without a fresh failure: its key is
                    # resting (for the class), broken, gone, short of room, or
                    # in a worse tier than now usable.
                    away_from_org = before.state is KeyState.COOLING or model_class in before.rests
                roomy = prefer(roomy, before, away_from_org)
            chosen = pick(roomy, rooms)

        lease = Lease(chosen, probe=False, model_class=model_class)
        chosen.in_flight += 1
        chosen.requests += 1
        if session_id is not None:
            self._sessions.remember(session_id, chosen, now)
        return lease

    # -- outcomes ------------------------------------------------------------

    def reading_due(self, lease: Lease, model_class: str | None = None) -> bool:
        """Whether `observe` would read an answer's head for this lease now
        (see there): asked first, a caller need not index a head that would
        not be read."""
        if len(self._keys) == 1:
            return False
        return _due(lease._key, lease.model_class if model_class is None else model_class, self._clock())

    def observe(self, lease: Lease, headers: Mapping[bytes, bytes], model_class: str | None = None) -> None:
        """Keep what an answer's rate-limit headers say of the lease's key's
        room, for the lease's model class (or `model_class`, when the caller
        learnt it after acquiring). `headers`: by lower-case name, first
        value each (ResponseHead.index). Call it once per answer head, error
        or not, before release; a head without limits changes nothing.
        Reading an Anthropic head with four limits costs some 20k
        instructions, so a ring of one key reads nothing (there is no choice
        for the room to weigh), a key whose class has a reading reads again
        only once `headroom_read_interval` has passed, and so does a key
        whose last BARE_READS_TO_WAIT heads read had no limits (an upstream
        or relay that sends none)."""
        if len(self._keys) == 1:
            # Nothing to choose between: the reading would only be shown.
            return
        key = lease._key
        cls = lease.model_class if model_class is None else model_class
        now = self._clock()
        if not _due(key, cls, now):
            return
        reading = read_index(headers, self._wall_clock())
        key.read_due = now + self.policy.headroom_read_interval
        if reading is None:
            key.bare_reads += 1
        else:
            key.bare_reads = 0
            key.room.update(cls, reading)

    def release(self, lease: Lease, failure: Failure | None = None) -> None:
        """Give a lease back with its outcome: None for success (any answer
        that says nothing against the key), else the Failure."""
        if lease.released:
            raise RuntimeError(f"{lease!r} released twice")
        lease.released = True
        key = lease._key
        key.in_flight -= 1
        if failure is None and key.state is _H and key.consecutive_failures == 0 and key.probe is None:
            # The common case, in which _transition would change nothing.
            self._notify()
            return
        self._settle(lease, key, failure)

    def _notify(self) -> None:
        for waiter in self._waiters:
            wake(waiter)


def _due(key: _Key, model_class: str, now: float) -> bool:
    """Whether an answer's head for `model_class` on `key` is to be read at
    `now`: always once the read interval has passed; before it, only for a
    class without a reading, unless the key's last BARE_READS_TO_WAIT heads
    read had no limits."""
    return not (now < key.read_due and (model_class in key.room.by_class or key.bare_reads >= BARE_READS_TO_WAIT))


def prefer(candidates: list[_Key], before: _Key, away_from_org: bool) -> list[_Key]:
    """Narrow the failover candidates, each step only if something is left:
    after a 429 to other orgs (same-org keys share the limit), then to the
    failed key's workspace (it holds the session's prompt cache)."""
    org = before.spec.org
    if away_from_org and org is not None:
        elsewhere = [key for key in candidates if key.spec.org != org]
        if elsewhere:
            candidates = elsewhere
    workspace = before.spec.workspace
    if workspace is not None:
        same = [key for key in candidates if key.spec.workspace == workspace]
        if same:
            candidates = same
    return candidates


def above_floor(candidates: list[_Key], rooms: Mapping[_Key, float], floor: float) -> tuple[list[_Key], bool]:
    """The candidates with at least `floor` of their room left (and some):
    a key under it is about to answer 429, so it is chosen only when no
    other key has more; when every key is under it, those with the most,
    and True (every key is low)."""
    roomy = []
    most = -1.0
    for key in candidates:
        room = rooms[key]
        if room >= floor and room > 0.0:
            roomy.append(key)
        elif room > most:
            most = room
    if roomy:
        return roomy, False
    return [key for key in candidates if rooms[key] == most], True


def share(key: _Key, rooms: Mapping[_Key, float] | None) -> float:
    """A key's share of the traffic: its weight times its room. Keys with no
    room at all are candidates together only when none has any (see
    above_floor): then by weight."""
    room = 1.0 if rooms is None else rooms[key]
    return key.spec.weight * room if room > 0.0 else float(key.spec.weight)


def pick(candidates: list[_Key], rooms: Mapping[_Key, float] | None) -> _Key:
    # Each key's share is its weight times its room (1.0 where no reading
    # is in force); routing.balance spreads by it.
    if len(candidates) == 1:
        return candidates[0]
    return least_loaded(candidates, [share(key, rooms) for key in candidates])


def wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
