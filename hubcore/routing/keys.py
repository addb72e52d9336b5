"""The vendor key ring: which key a request goes out on, and what each key's
answers say about its health (cooling after 429s, circuit breaker, dead keys)
and its room (the vendors' rate-limit headers, per model class), with session
affinity so prompt caches survive. Sans-IO except the two waits; what an
answer says is classified by hubcore.routing.failures and read by
hubcore.routing.headroom, and the hub's probes of open circuits are sent by
hubcore.gateway.probe.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from collections.abc import Set as AbstractSet
from typing import Any, Protocol

# The key settings are configuration values; re-exported for the ring's callers.
from hubcore.config import KeyPolicy, KeySpec
from hubcore.routing.affinity import Affinity

# Failure and its classifiers are re-exported here until every caller imports
# them from hubcore.routing.failures.
from hubcore.routing.failures import (
    CIRCUIT_KINDS,
    UNREACHED_KINDS,
    Failure,
    FailureKind,
    classify,
    parse_rfc3339,
    retryable,
)
from hubcore.routing.headroom import MAX_CLASSES

# A key's state and counters, a lease, and what every request runs of the
# ring: compiled when built (hubcore.routing.lease).
from hubcore.routing.lease import KeyState, Lease, RingCore, _Key
from hubcore.routing.lease import wake as _wake

__all__ = [
    "Failure",
    "FailureKind",
    "KeyListener",
    "KeyPolicy",
    "KeyReport",
    "KeyRing",
    "KeySpec",
    "KeyState",
    "Lease",
    "classify",
    "parse_rfc3339",
    "retryable",
]


# Every change of a key's state is one line here (see KeyRing._transition).
log = logging.getLogger("hubcore.keys")

# Told of every change of a key's state, where it is logged: (ring, label,
# old state, new state, reason). Called inside the ring's own calls: it must
# not call back into the ring, except to read `states()`.
StateListener = Callable[["KeyRing", str, "KeyState", "KeyState", str], None]


# ---------------------------------------------------------------------------
# Theory of operation: one key's state machine.
#
# Everything that moves a key between states goes through KeyRing._transition,
# which looks the (state, event) pair up in _TRANSITIONS; a missing pair is a
# bug and raises. Events come from four places:
#   - release() turns an attempt's outcome into ANSWERED / LIMITED / FAULT /
#     TRIP / REJECTED / ABORTED (and ORG_LIMITED for the org's other keys);
#   - time: a COOLING or OPEN key whose `until` has passed gets EXPIRED, lazily,
#     whenever the ring looks at it (no timers run for keys);
#   - the hub's prober: take_probes() moves a HALF_OPEN key to PROBING (PROBE),
#     and the probe lease's release decides, as above;
#   - the operator and reloads: DISABLE / ENABLE / RESET / RELOADED. The
#     operator's word overrides what the ring learned: ENABLE makes any key
#     HEALTHY (a dead key revived, a rest or an open circuit ended), RESET
#     ends the rests and closes the circuit of a key in service but leaves a
#     dead or disabled key as it is (reviving one takes ENABLE), and a
#     DISABLE sticks to the label, over reloads that rotate its secret or
#     drop and re-add it, as the stored switch does over restarts
#     (restore_disabled).
# Users' requests go to HEALTHY keys only. An open circuit closes only on the
# answer of the hub's own probe (a cheap request, see hubcore.gateway.probe):
# a user's request that probed a broken key failed in front of that user,
# mid-stream where no retry could hide it. While the circuit is OPEN, HALF_OPEN or
# PROBING, answers to requests that were sent before it opened are STALE: they
# change counters, not the state. Rate-limit news and a refused key are never
# stale.
#
# The probe proves less than a user's request (a list of models may come back
# while messages fail), so a key it closes is on probation: its failure count
# stands one short of the threshold, and the pause of the circuit a relapse
# opens again is doubled; a user's success ends the probation (see `pause`).
#
# Beside the state, per model class: the vendors' limits are per class (a
# 429 on an Opus model says nothing of Sonnet), so a 429 to a request whose
# lease names a class rests the key for that class only (_Key.rests, with the
# org's other keys under cool_whole_org), and leaves its state alone: no
# request of that class gets the key until the rest ends, the others do. A
# 429 without a class (a model the hub could not name, the hub's probe) cools
# the whole key, as above. And each answer's rate-limit headers (observe)
# give the key's room per class, which weighs the choice among usable keys
# (see acquire); a rest and a reading are the vendor's word, so a reload that
# keeps the key keeps them, and only the operator's ENABLE or RESET ends a rest.
#
# Each change of state is logged once, with its reason; an event that leaves
# the state as it was (the 429s of a key already cooling) says nothing. The
# probe cycle of an open circuit (open, half-open, probing, open again) is
# at DEBUG: during an outage it turns once a second per key. A class's rest
# is logged as that class's change, healthy -> cooling when it starts and
# back when it is over, with the class.
# ---------------------------------------------------------------------------


# Several hub instances ([shared] redis, hubcore.shared) learn of the same
# keys. What this ring learns from the vendor goes out through `listener`
# (rests, circuits opening and closing, refused keys, the operator's
# revival), from _transition and _rest_class; what the others learnt comes
# in through hear(), outside the state machine: a rest for a model class is
# a rest like one of this ring's own, and a rest of the whole key or an open
# circuit elsewhere holds the key back (`held`) until it ends, without a
# state of its own: this ring's probe never runs for another's circuit, and
# a key the vendor refused elsewhere, with the same secret, is DEAD here too.
# Nothing heard is told again.


class KeyReport(Protocol):
    """What the hub's other instances know against one key
    (shared.keyspace.KeyNews); durations in seconds from now."""

    @property
    def rests(self) -> Mapping[str, float]: ...  # model class ("": the whole key) -> seconds
    @property
    def circuit(self) -> float | None: ...
    @property
    def revival(self) -> str | None: ...  # the mark of the operator's latest revival or reset
    def dead_for(self, secret: str) -> bool: ...


class KeyListener(Protocol):
    """Told what a ring learns of its keys from the vendor, for the hub's
    other instances (shared.redis_state.UpstreamKeys). Never blocks."""

    def rested(self, label: str, model_class: str, seconds: float) -> None: ...
    def circuit_opened(self, label: str, seconds: float) -> None: ...
    def circuit_closed(self, label: str) -> None: ...
    def refused(self, label: str, secret: str) -> None: ...
    def revived(self, label: str) -> None: ...


class _Event(enum.Enum):
    ANSWERED = enum.auto()  # the vendor answered and the key worked
    LIMITED = enum.auto()  # 429 on this key
    ORG_LIMITED = enum.auto()  # 429 on another key of the same org (cool_whole_org)
    FAULT = enum.auto()  # a circuit failure below the threshold (or the probe's)
    TRIP = enum.auto()  # the circuit failure that reaches the threshold
    REJECTED = enum.auto()  # 401/403
    ABORTED = enum.auto()  # the client left (or the probe was cancelled)
    STALE = enum.auto()  # an answer from before the circuit opened
    EXPIRED = enum.auto()  # the cooling or open period is over
    PROBE = enum.auto()  # the hub's prober sends its probe
    DISABLE = enum.auto()
    ENABLE = enum.auto()
    RESET = enum.auto()  # the operator ends the rests and closes the circuit
    RELOADED = enum.auto()  # SIGHUP kept this key (same label, same secret)


_H, _C, _O, _HO, _PR, _D, _X = (
    KeyState.HEALTHY,
    KeyState.COOLING,
    KeyState.OPEN,
    KeyState.HALF_OPEN,
    KeyState.PROBING,
    KeyState.DEAD,
    KeyState.DISABLED,
)
_E = _Event
_OUTCOMES = (_E.ANSWERED, _E.LIMITED, _E.ORG_LIMITED, _E.FAULT, _E.REJECTED, _E.ABORTED)

_TRANSITIONS: dict[tuple[KeyState, _Event], KeyState] = {
    (_H, _E.ANSWERED): _H,
    (_H, _E.LIMITED): _C,
    (_H, _E.ORG_LIMITED): _C,
    (_H, _E.FAULT): _H,
    (_H, _E.TRIP): _O,
    (_H, _E.REJECTED): _D,
    (_H, _E.ABORTED): _H,
    (_H, _E.DISABLE): _X,
    (_H, _E.ENABLE): _H,
    (_H, _E.RESET): _H,
    (_H, _E.RELOADED): _H,
    # A late success does not end a rest that a newer 429 started.
    (_C, _E.ANSWERED): _C,
    (_C, _E.LIMITED): _C,
    (_C, _E.ORG_LIMITED): _C,
    (_C, _E.FAULT): _C,
    (_C, _E.TRIP): _O,
    (_C, _E.REJECTED): _D,
    (_C, _E.ABORTED): _C,
    (_C, _E.EXPIRED): _H,
    (_C, _E.DISABLE): _X,
    (_C, _E.ENABLE): _H,
    (_C, _E.RESET): _H,
    (_C, _E.RELOADED): _C,
    # No lease is handed out while OPEN: every answer is stale, except that a
    # 429 pushes the end of the pause out to the end of the rest.
    (_O, _E.STALE): _O,
    (_O, _E.LIMITED): _O,
    (_O, _E.ORG_LIMITED): _O,
    (_O, _E.REJECTED): _D,
    (_O, _E.EXPIRED): _HO,
    (_O, _E.DISABLE): _X,
    (_O, _E.ENABLE): _H,
    (_O, _E.RESET): _H,
    (_O, _E.RELOADED): _O,
    # Waiting for the prober. A (stale) 429 proves the vendor answers, so the
    # circuit closes and the key rests.
    (_HO, _E.PROBE): _PR,
    (_HO, _E.STALE): _HO,
    (_HO, _E.LIMITED): _C,
    # The org is out of capacity: wait for it (still OPEN), then probe.
    (_HO, _E.ORG_LIMITED): _O,
    (_HO, _E.REJECTED): _D,
    (_HO, _E.DISABLE): _X,
    (_HO, _E.ENABLE): _H,
    (_HO, _E.RESET): _H,
    (_HO, _E.RELOADED): _HO,
    # The probe's answer decides (the rest are stale, as while OPEN); one that
    # gave no verdict leaves the probe due.
    (_PR, _E.ANSWERED): _H,
    (_PR, _E.LIMITED): _C,
    (_PR, _E.FAULT): _O,
    (_PR, _E.ABORTED): _HO,
    (_PR, _E.STALE): _PR,
    (_PR, _E.ORG_LIMITED): _O,
    (_PR, _E.REJECTED): _D,
    (_PR, _E.DISABLE): _X,
    (_PR, _E.ENABLE): _H,
    # The probe still out answers a healthy key: as a user's request would.
    (_PR, _E.RESET): _H,
    (_PR, _E.RELOADED): _PR,
    **{(_D, event): _D for event in _OUTCOMES},
    (_D, _E.DISABLE): _X,
    (_D, _E.ENABLE): _H,
    # The vendor refused the key: a reset is no word that it takes it again.
    (_D, _E.RESET): _D,
    (_D, _E.RELOADED): _H,
    **{(_X, event): _X for event in _OUTCOMES},
    (_X, _E.DISABLE): _X,
    (_X, _E.ENABLE): _H,
    (_X, _E.RESET): _X,
    (_X, _E.RELOADED): _X,
}

_OUTCOME_EVENTS = {
    **{kind: _E.FAULT for kind in CIRCUIT_KINDS},
    FailureKind.RATE_LIMITED: _E.LIMITED,
    FailureKind.AUTH_FAILED: _E.REJECTED,
    FailureKind.TRANSIENT: _E.ANSWERED,
    FailureKind.CLIENT_ABORTED: _E.ABORTED,
}


class KeyRing(RingCore):
    """The keys of one upstream: selection, health and session affinity.

    Not thread-safe: it belongs to one event loop. `clock` is monotonic
    seconds (injectable for tests); `wall_clock` only converts times for display.

    What every request runs (acquire, observe, release up to its common
    case) is the core's, compiled when built (hubcore.routing.lease); the
    rest is here, and the core calls _expire, _previous_key and _settle
    when the common case does not hold.
    """

    def __init__(
        self,
        name: str,
        specs: Iterable[KeySpec],
        policy: KeyPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.policy = policy if policy is not None else KeyPolicy()
        self._clock = clock
        self._wall_clock = wall_clock
        self._keys: dict[str, _Key] = {}
        # Session id -> its key, by monotonic time.
        self._sessions: Affinity[_Key] = Affinity(self.policy.affinity_ttl, self.policy.affinity_max_sessions)
        self._waiters: set[asyncio.Future[None]] = set()
        # The prober's: woken only when a circuit opens or its pause ends, not
        # by every release as users' waiters are.
        self._probe_waiters: set[asyncio.Future[None]] = set()
        # Labels the operator disabled, kept while no key has the label (a
        # reload may bring it back; see restore_disabled).
        self._disabled: set[str] = set()
        # Told of every state change (hubcore.ops.alerts); None: nobody listens.
        self.state_listener: StateListener | None = None
        # Told what the ring learns, for the hub's other instances ([shared]).
        self.listener: KeyListener | None = None
        self.replace_specs(specs)

    # -- selection ---------------------------------------------------------

    def _previous_key(self, previous: Lease | None, sticky: _Key | None, tried: AbstractSet[str]) -> _Key | None:
        if previous is not None:
            return previous._key
        if sticky is not None:
            return sticky
        if len(tried) == 1:
            (label,) = tried
            return self._keys.get(label)
        return None

    # -- affinity ------------------------------------------------------------

    def pin_session(self, session_id: str, label: str) -> None:
        """The session sticks to key `label` from now on, as if chosen here
        (another hub instance chose it: hubcore.shared). A label the ring
        does not have is ignored; acquire still judges the key's health."""
        key = self._keys.get(label)
        if key is not None:
            self._sessions.remember(session_id, key, self._clock())

    def hear(self, news: Mapping[str, KeyReport]) -> None:
        """What the hub's other instances know against keys of this ring (by
        label; see the theory above): rests and open circuits hold keys back
        until they end, a refused secret is dead here too. Nothing heard is
        told to the listener again."""
        now = self._clock()
        for label, report in news.items():
            key = self._keys.get(label)
            if key is None:
                continue
            revival = report.revival
            if revival is not None and revival != key.revival:
                # An operator revived or reset the key on another instance
                # (the rests and refusals written before it are gone): the
                # word holds here too, before any news written after it.
                key.revival = revival
                self._expire(key, now)
                event = _E.ENABLE if key.state is _D else _E.RESET
                self._transition(key, event, now, None, cause="operator reset on another hub instance", heard=True)
            if report.dead_for(key.spec.secret):
                if key.state is not _D and key.state is not _X:
                    self._transition(key, _E.REJECTED, now, None, cause="refused by the vendor through another hub instance")
                continue
            for model_class, seconds in report.rests.items():
                ends = now + seconds
                if model_class:
                    earlier = key.rests.get(model_class)
                    if earlier is None or earlier < ends:
                        key.rests[model_class] = ends
                        if earlier is None:
                            self._log_class(key, model_class, _H, _C, f"{seconds:.3g}s rest after a 429 through another hub instance")
                elif ends > key.held_rest:
                    self._hold(key, now, ends, f"{seconds:.3g}s rest after a 429 through another hub instance")
                    key.held_rest = ends
            if report.circuit is not None:
                ends = now + report.circuit
                if ends > key.held:
                    self._hold(key, now, ends, f"circuit open for {report.circuit:.3g}s on another hub instance")

    def _hold(self, key: _Key, now: float, ends: float, reason: str) -> None:
        if key.held <= now and log.isEnabledFor(logging.INFO):
            log.info("upstream %s key %s: held back (%s)", self.name, key.spec.label, reason,
                     extra={"upstream": self.name, "label": key.spec.label, "reason": reason})
        key.held = max(key.held, ends)

    def session_count(self) -> int:
        """Sessions in the affinity table (expired ones may linger until looked at)."""
        return len(self._sessions)

    # -- outcomes ------------------------------------------------------------

    def _settle(self, lease: Lease, key: _Key, failure: Failure | None) -> None:
        """release() past its common case: the outcome moves the key (or
        its class) or ends its probe."""
        now = self._clock()
        self._expire(key, now)
        # The probe slot is freed only by the probe itself, so at most one is
        # ever out; its answer decides only while the key is still PROBING.
        is_probe = key.probe is lease and key.state is _PR
        if key.probe is lease:
            key.probe = None

        if failure is None:
            event = _E.ANSWERED
        else:
            event = _OUTCOME_EVENTS[failure.kind]
            if failure.kind is FailureKind.RATE_LIMITED:
                key.rate_limited += 1
            elif failure.kind is not FailureKind.CLIENT_ABORTED:
                key.errors += 1
            if failure.kind is not FailureKind.CLIENT_ABORTED:
                key.last_error = failure.describe()
        if key.state in (_O, _HO, _PR) and not is_probe and event in (_E.ANSWERED, _E.FAULT, _E.ABORTED):
            event = _E.STALE
        elif event is _E.FAULT and key.state in (_H, _C):
            if key.consecutive_failures + 1 >= self.policy.circuit_threshold:
                event = _E.TRIP

        rest_until = None
        if event is _E.LIMITED:
            assert failure is not None
            cooldown = self.policy.cooldown_default if failure.cooldown is None else failure.cooldown
            rest_until = now + cooldown
            model_class = lease.model_class
            # A class of its own only for a class the key knows or has room
            # for (MAX_CLASSES, as for readings); else the whole key rests.
            if model_class and not is_probe and (model_class in key.rests or len(key.rests) < MAX_CLASSES):
                self._rest_class(key, model_class, now, rest_until, failure)
                if key.state is _H or key.state is _C:
                    # The vendor answered, as for a whole-key 429: no failure
                    # in a row, and a user's answer ends the probation.
                    key.consecutive_failures = 0
                    key.pause = 0.0
                if self.policy.cool_whole_org and key.spec.org is not None:
                    for other in self._keys.values():
                        if other is not key and other.spec.org == key.spec.org:
                            self._rest_class(other, model_class, now, rest_until, failure, cause=key.spec.label)
                self._notify()
                return
        self._transition(key, event, now, rest_until, failure, probe=is_probe)
        if rest_until is not None and self.policy.cool_whole_org and key.spec.org is not None:
            for other in self._keys.values():
                if other is not key and other.spec.org == key.spec.org:
                    self._expire(other, now)
                    self._transition(other, _E.ORG_LIMITED, now, rest_until, cause=key.spec.label)
        self._notify()

    def _expire(self, key: _Key, now: float) -> None:
        if key.until is not None and key.until <= now:
            self._transition(key, _E.EXPIRED, now, None)
        if key.rests:
            for model_class, until in list(key.rests.items()):
                if until <= now:
                    del key.rests[model_class]
                    self._log_class(key, model_class, _C, _H, "rest over")

    def _rest_class(
        self, key: _Key, model_class: str, now: float, rest_until: float, failure: Failure, cause: str | None = None
    ) -> None:
        """Rest the key for one model class until `rest_until` (a rest only
        lengthens); `cause` is the label of the org's key that got the 429."""
        self._expire(key, now)
        earlier = key.rests.get(model_class)
        if earlier is not None and earlier >= rest_until:
            return
        key.rests[model_class] = rest_until
        if self.listener is not None:
            self.listener.rested(key.spec.label, model_class, rest_until - now)
        if earlier is None:
            event = _E.LIMITED if cause is None else _E.ORG_LIMITED
            self._log_class(key, model_class, _H, _C, _reason(key, event, _H, now, rest_until, failure, False, cause, self.policy))

    def _log_class(self, key: _Key, model_class: str, old: KeyState, new: KeyState, reason: str) -> None:
        """A class's rest began or ended: that class's change of state."""
        if log.isEnabledFor(logging.INFO):
            log.info(
                "upstream %s key %s (%s): %s -> %s (%s)",
                self.name, key.spec.label, model_class, old.value, new.value, reason,
                extra={
                    "upstream": self.name,
                    "label": key.spec.label,
                    "model_class": model_class,
                    "old_state": old.value,
                    "new_state": new.value,
                    "reason": reason,
                },
            )

    def _transition(
        self,
        key: _Key,
        event: _Event,
        now: float,
        rest_until: float | None,
        failure: Failure | None = None,
        *,
        probe: bool = False,
        cause: str | None = None,
        heard: bool = False,
    ) -> None:
        """The one place a key changes state (see _TRANSITIONS). `heard`: the
        move follows another hub instance's word, not told back to them. `failure`
        (TRIP, FAULT) chooses the pause of the circuit it opens; it, `probe`
        (the hub's probe answered) and `cause` (the other key of an
        ORG_LIMITED, the operator's reason) only word the log line."""
        old = key.state
        try:
            new = _TRANSITIONS[(old, event)]
        except KeyError:
            raise RuntimeError(f"key {key.spec.label!r}: no transition from {old.name} on {event.name}") from None
        key.state = new

        if event is _E.ANSWERED and old is _PR:
            # The hub's probe closed the circuit: on probation.
            key.consecutive_failures = self.policy.circuit_threshold - 1
        elif event in (_E.ANSWERED, _E.LIMITED):
            key.consecutive_failures = 0
            if new is _H or new is _C:
                key.pause = 0.0
        elif event in (_E.FAULT, _E.TRIP):
            key.consecutive_failures += 1
        elif (event is _E.ENABLE and old is not _H) or event is _E.RESET or (event is _E.RELOADED and old is _D):
            key.consecutive_failures = 0
            key.pause = 0.0
        if event is _E.ENABLE or event is _E.RESET:
            # The operator's word: every class's rest ends too, and what
            # other instances said against the key.
            key.rests.clear()
            key.held = key.held_rest = 0.0
            # A reading of no room left is the 429's own word, which the
            # operator's contradicts; readings with room stay the vendor's.
            key.room.forget_exhausted()

        # Rests and pauses only ever lengthen, except that a failed probe sets
        # the doubled pause from now.
        earlier = key.until if key.until is not None and old in (_C, _O) else -math.inf
        rest = rest_until if rest_until is not None else -math.inf
        if new is _C:
            key.until = max(earlier, rest)
        elif new is _O and event in (_E.TRIP, _E.FAULT):
            key.pause = self._next_pause(key.pause, failure)
            key.until = max(earlier, now + key.pause)
        elif new is _O:
            key.until = max(earlier, rest)
        else:
            key.until = None
        if (new is _O or new is _HO) and self._probe_waiters:
            # A circuit opened, or its probe is due again: the prober's timer
            # may be set for later than that, or not at all.
            for waiter in self._probe_waiters:
                _wake(waiter)
        if self.listener is not None and not heard:
            self._tell(self.listener, key, event, old, new, now, cause)
        if new is not old:
            level = _log_level(old, new)
            state_listener = self.state_listener
            logged = log.isEnabledFor(level)
            if logged or state_listener is not None:
                reason = _reason(key, event, old, now, rest_until, failure, probe, cause, self.policy)
                if logged:
                    log.log(
                        level,
                        "upstream %s key %s: %s -> %s (%s)",
                        self.name, key.spec.label, old.value, new.value, reason,
                        extra={
                            "upstream": self.name,
                            "label": key.spec.label,
                            "old_state": old.value,
                            "new_state": new.value,
                            "reason": reason,
                        },
                    )
                if state_listener is not None:
                    state_listener(self, key.spec.label, old, new, reason)

    @staticmethod
    def _tell(
        listener: KeyListener, key: _Key, event: _Event, old: KeyState, new: KeyState, now: float, cause: str | None,
    ) -> None:
        """What a move says for the hub's other instances (see hear)."""
        label = key.spec.label
        if (event is _E.LIMITED or event is _E.ORG_LIMITED) and new is _C and key.until is not None:
            listener.rested(label, "", key.until - now)
        if new is _O and (event is _E.TRIP or event is _E.FAULT) and key.until is not None:
            listener.circuit_opened(label, key.until - now)
        if old in _CIRCUIT_STATES and (new is _H or new is _C):
            listener.circuit_closed(label)
        # A refusal heard from another instance comes with its cause: not told again.
        if event is _E.REJECTED and new is _D and old is not _D and cause is None:
            listener.refused(label, key.spec.secret)
        if event is _E.ENABLE or (event is _E.RELOADED and old is _D) or (event is _E.RESET and new is _H):
            listener.revived(label)

    def _next_pause(self, pause: float, failure: Failure | None) -> float:
        """The pause of a circuit that opens after `pause` (0.0: none since a
        user's success): the policy's first pause for the kind of failure,
        else twice the last, within that kind's bounds."""
        policy = self.policy
        if failure is not None and failure.kind in UNREACHED_KINDS:
            first, most = policy.circuit_probe_pause, policy.circuit_probe_pause_max
        else:
            first, most = policy.circuit_pause, policy.circuit_pause_max
        if pause == 0.0:
            return first
        return min(max(pause * 2, first), most)

    # -- waiting ---------------------------------------------------------------

    def next_available_in(self, tried: AbstractSet[str] = frozenset(), model_class: str = "") -> float | None:
        """Seconds until some key not in `tried` may be usable for a request
        of `model_class`: 0.0 if one is now, the end of the soonest rest
        after a 429 (COOLING, or resting for that class), else None.

        An open circuit does not count: it closes only when the hub's probe
        comes back, at a time nobody knows, and a request waiting for it would
        only wait for a 503 (see next_probe_in)."""
        now = self._clock()
        soonest: float | None = None
        for key in self._keys.values():
            if key.spec.label in tried:
                continue
            self._expire(key, now)
            state = key.state
            if state is not _H and state is not _C:
                continue
            held = key.held > now
            if held and key.held_rest < key.held:
                continue  # a circuit open elsewhere: not waited for, as one open here
            class_rest = key.rests.get(model_class)
            if state is _H and class_rest is None and not held:
                return 0.0
            ends = class_rest if class_rest is not None else -math.inf
            if state is _C:
                assert key.until is not None
                ends = max(ends, key.until)
            if held:
                ends = max(ends, key.held_rest)
            wait = ends - now
            if soonest is None or wait < soonest:
                soonest = wait
        return soonest

    def next_probe_in(self, *, pending: bool = False) -> float | None:
        """Seconds until the hub's prober has a key to probe: 0.0 if one is
        due (see take_probes), else the end of the soonest open period; None
        if no circuit is open. `pending` counts a probe that is out as 0.0
        too: a hint for clients on when to come back."""
        now = self._clock()
        soonest: float | None = None
        for key in self._keys.values():
            self._expire(key, now)
            state = key.state
            if state is _HO or state is _PR:
                if pending or _probe_due(key):
                    return 0.0
            elif state is _O:
                assert key.until is not None
                wait = key.until - now
                if soonest is None or wait < soonest:
                    soonest = wait
        return soonest

    def take_probes(self) -> list[Lease]:
        """A probe lease on each key whose open period is over (HALF_OPEN,
        then PROBING until the lease is released with the probe's outcome)."""
        now = self._clock()
        leases = []
        for key in self._keys.values():
            self._expire(key, now)
            if _probe_due(key):
                self._transition(key, _E.PROBE, now, None)
                lease = key.probe = Lease(key, probe=True)
                key.in_flight += 1
                key.requests += 1
                leases.append(lease)
        return leases

    def rate_limited(self, model_class: str = "") -> bool:
        """Whether some key is resting after a 429 (COOLING, or healthy but
        resting for `model_class`): the hub's own answer is then a 429, not
        the 503 of keys that are broken or gone."""
        now = self._clock()
        for key in self._keys.values():
            self._expire(key, now)
            if key.state is KeyState.COOLING or (
                key.state is _H and (model_class in key.rests or key.held_rest > now)
            ):
                return True
        return False

    async def wait_available(
        self, timeout: float, tried: AbstractSet[str] = frozenset(), model_class: str = ""
    ) -> bool:
        """Wait until a key not in `tried` may be usable for a request of
        `model_class`; False after `timeout` seconds.

        Woken by any release or operator change, or by a timer at the moment
        the earliest rest ends; never polls.
        """
        return await self._wait(lambda: self.next_available_in(tried, model_class), self._waiters, timeout)

    async def wait_probe_due(self) -> None:
        """Wait until a key's open period is over (see take_probes): woken
        when a circuit opens or a probe gave no verdict, or by a timer at the
        end of the earliest open period; never polls."""
        await self._wait(self.next_probe_in, self._probe_waiters, None)

    async def _wait(
        self, delay_of: Callable[[], float | None], waiters: set[asyncio.Future[None]], timeout: float | None
    ) -> bool:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            delay = delay_of()
            if delay == 0.0:
                return True
            if deadline is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                delay = remaining if delay is None else min(delay, remaining)
            waiter: asyncio.Future[None] = loop.create_future()
            waiters.add(waiter)
            timer = None if delay is None else loop.call_later(delay, _wake, waiter)
            try:
                await waiter
            finally:
                if timer is not None:
                    timer.cancel()
                waiters.discard(waiter)

    # -- operator --------------------------------------------------------------

    def disable(self, label: str) -> KeyState | None:
        """Take the key out of service until enable(); its state after (None:
        no key has that label). The label stays disabled over reloads."""
        key = self._keys.get(label)
        if key is None:
            return None
        self._disabled.add(label)
        self._transition(key, _E.DISABLE, self._clock(), None, cause="operator disable")
        return key.state

    def enable(self, label: str) -> KeyState | None:
        """Put the key back in service, HEALTHY whatever the ring thought of
        it (dead, resting, circuit open); its state after (None: no key has
        that label)."""
        key = self._keys.get(label)
        if key is None:
            return None
        self._disabled.discard(label)
        self._transition(key, _E.ENABLE, self._clock(), None, cause="operator enable")
        self._notify()
        return key.state

    def reset(self, label: str) -> KeyState | None:
        """End the key's rests after 429s (the whole key's and every model
        class's) and close its circuit, with its failure count and pause
        back to nothing: the operator says the vendor takes it again. A dead
        or disabled key stays so (enable() revives it). Its state after
        (None: no key has that label)."""
        key = self._keys.get(label)
        if key is None:
            return None
        now = self._clock()
        self._expire(key, now)
        for model_class in key.rests:
            self._log_class(key, model_class, _C, _H, "operator reset")
        self._transition(key, _E.RESET, now, None, cause="operator reset")
        self._notify()
        return key.state

    def follow_switches(self, disabled: Collection[str]) -> list[str]:
        """The labels the operator disabled as the database has them now,
        switched on another hub instance: those not disabled here are
        disabled, those disabled here and no longer listed are enabled. The
        moves are not told to the other instances (they made them); what
        changed, as "disabled LABEL" / "enabled LABEL"."""
        changed = []
        now = self._clock()
        for label in sorted(set(disabled) - self._disabled):
            self._disabled.add(label)
            key = self._keys.get(label)
            if key is not None:
                self._transition(key, _E.DISABLE, now, None, cause="operator disable on another hub instance", heard=True)
            changed.append(f"disabled {label}")
        for label in sorted(self._disabled - set(disabled)):
            self._disabled.discard(label)
            key = self._keys.get(label)
            if key is not None:
                self._transition(key, _E.ENABLE, now, None, cause="operator enable on another hub instance", heard=True)
            changed.append(f"enabled {label}")
        if changed:
            self._notify()
        return changed

    def restore_disabled(self, labels: Iterable[str]) -> None:
        """The labels the operator disabled before a restart (stored): those
        configured are disabled now, the others when a reload adds them."""
        for label in labels:
            self._disabled.add(label)
            key = self._keys.get(label)
            if key is not None:
                self._transition(key, _E.DISABLE, self._clock(), None, cause="operator disable, stored")

    def replace_specs(self, specs: Iterable[KeySpec], policy: KeyPolicy | None = None) -> None:
        """Reload: keys whose label and secret stay keep their state and counters
        (DEAD ones revive); a changed secret starts afresh, except that a label
        the operator disabled stays disabled; removed keys go, and their
        outstanding leases release harmlessly."""
        if policy is not None:
            self.policy = policy
            self._sessions.ttl, self._sessions.limit = policy.affinity_ttl, policy.affinity_max_sessions
        keys: dict[str, _Key] = {}
        now = self._clock()
        for spec in specs:
            if spec.label in keys:
                raise ValueError(f"upstream {self.name!r}: duplicate key label {spec.label!r}")
            key = self._keys.get(spec.label)
            if key is not None and key.spec.secret == spec.secret:
                key.spec = spec
                self._transition(key, _E.RELOADED, now, None)
            else:
                key = _Key(spec)
                if spec.label in self._disabled:
                    self._transition(key, _E.DISABLE, now, None, cause="operator disable, kept over the reload")
            keys[spec.label] = key
        for key in keys.values():
            # Weights may have changed: restart the round-robin from even.
            key.current = 0
        self._keys = keys
        self._best_priority = min((key.spec.priority for key in keys.values()), default=0)
        self._notify()

    # -- stats -------------------------------------------------------------------

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def states(self) -> dict[str, KeyState]:
        """Each key's state as it stands, without looking at the clock (a
        rest that is over reads as COOLING until the ring next looks): safe
        to call from a StateListener."""
        return {label: key.state for label, key in self._keys.items()}

    @property
    def in_flight(self) -> int:
        """Attempts out on the ring's keys now (the hub's probes included)."""
        return sum(key.in_flight for key in self._keys.values())

    def snapshot(self) -> list[dict[str, Any]]:
        """Each key's state and counters for stats; never the secret. `until` is
        unix time; `requests` counts the hub's probes with the users'
        attempts; `errors` counts every failure but 429s (`rate_limited`) and
        client aborts. `headroom` maps a model class to the vendor's latest
        reading still in force (`remaining` fraction, which `limit`, unix
        time it `resets`); `rests` a model class resting after a 429 to the
        unix time its rest ends."""
        now = self._clock()
        wall = self._wall_clock()
        rows = []
        for key in self._keys.values():
            self._expire(key, now)
            spec = key.spec
            rows.append(
                {
                    "label": spec.label,
                    "state": key.state.value,
                    "until": None if key.until is None else wall + (key.until - now),
                    "consecutive_failures": key.consecutive_failures,
                    "in_flight": key.in_flight,
                    "requests": key.requests,
                    "rate_limited": key.rate_limited,
                    "errors": key.errors,
                    "last_error": key.last_error,
                    "priority": spec.priority,
                    "weight": spec.weight,
                    "workspace": spec.workspace,
                    "org": spec.org,
                    "headroom": key.room.snapshot(wall),
                    "rests": {cls: wall + (until - now) for cls, until in key.rests.items()},
                }
            )
        return rows

    def __repr__(self) -> str:
        return f"<KeyRing {self.name!r} keys={len(self._keys)}>"


_CIRCUIT_STATES = frozenset({_O, _HO, _PR})


def _log_level(old: KeyState, new: KeyState) -> int:
    """A key leaving service is a warning, the probe cycle of an open
    circuit (once a second per key in an outage) is debug, the rest info."""
    if old in _CIRCUIT_STATES and new in _CIRCUIT_STATES:
        return logging.DEBUG
    if new is _D or new is _X or new is _O:
        return logging.WARNING
    return logging.INFO


def _reason(
    key: _Key,
    event: _Event,
    old: KeyState,
    now: float,
    rest_until: float | None,
    failure: Failure | None,
    probe: bool,
    cause: str | None,
    policy: KeyPolicy,
) -> str:
    """Why a key changed state, for the log: the vendor's answer, the
    operator, time or a reload; never a secret."""
    if event is _E.LIMITED:
        assert failure is not None
        said = "vendor 429 to the probe" if probe else "vendor 429"
        if failure.cooldown is None:
            return f"{said}, no retry-after: {policy.cooldown_default:g}s rest"
        return f"{said}, retry-after {failure.cooldown:g}s"
    if event is _E.ORG_LIMITED:
        rest = 0.0 if rest_until is None else rest_until - now
        return f"vendor 429 on key {cause} of the same org, {rest:g}s rest"
    if event is _E.REJECTED:
        if cause is not None:
            return cause
        status = failure.status if failure is not None else None
        return f"vendor {status} to the probe" if probe else f"vendor {status}"
    if event is _E.TRIP:
        last = failure.describe() if failure is not None else "unknown"
        return f"{key.consecutive_failures} failures in a row, last {last}"
    if event is _E.FAULT:
        return f"probe failed: {failure.describe() if failure is not None else 'unknown'}"
    if event is _E.ANSWERED:
        return "probe ok"
    if event is _E.ABORTED:
        return "probe gave no verdict"
    if event is _E.EXPIRED:
        return "rest over" if old is _C else "pause over, probe due"
    if event is _E.PROBE:
        return "probe sent"
    if event is _E.RELOADED:
        return "reload"
    # DISABLE, ENABLE and RESET: the operator, now or before a restart or reload.
    return cause or event.name.lower()


def _probe_due(key: _Key) -> bool:
    # HALF_OPEN, and not still waiting for a probe from before the circuit
    # last opened (one that outlived its PROBING period): one probe at a time.
    return key.state is _HO and key.probe is None
