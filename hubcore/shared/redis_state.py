"""State several hub instances share through one Redis: rate windows,
concurrency slots and budget spend of tokens, users and projects; what each
instance learnt of the vendor keys (rests after 429s, open circuits, dead
keys); which key each session sticks to. Built only with a [shared] table:
without one nothing here runs, and the request path does no added work.

Data layout (every key under `[shared] prefix`, "hubcore" below; a scope is
"t:<token id>", "u:<user>" or "p:<project>", always last):

    hubcore:instances                 zset  instance id -> ms of its latest beat
    hubcore:instance:<id>             str   host, pid, version; PX instance_ttl
    hubcore:epoch                     str   random id set by the first instance to find none
    hubcore:rpm:<scope>               zset  admission member -> ms admitted; PX 60 s
    hubcore:slots:<scope>             zset  admission member -> ms its lease ends; PX lease_ttl
    hubcore:spend:5h:<scope>          hash  minute -> micro-dollars, 'sum', 'lo' (prelude.lua)
    hubcore:spend:day:<start>:<scope> int   micro-dollars (also week, month); EXPIREAT end + 1 day
    hubcore:spend:total:<scope>       int   micro-dollars
    hubcore:charged:<request id>      str   a charge applied (replays add nothing); EX 1 day
    hubcore:alert:<target>:<key>      str   the instance that sent that alert; PX its min_interval
    hubcore:keys:<upstream>           hash  'c'<label>NUL<class> -> ms a rest ends,
                                            'o'<label> -> ms an open circuit ends,
                                            'd'<label> -> fingerprint of a refused secret,
                                            'n'<label> -> Redis time of an operator's revival
    hubcore:session:<upstream>:<id>   str   key label; PX the upstream's affinity_ttl
    hubcore:charges                   channel the charges each batch applied (instance;
                                            token, user, project, micro-dollars, ts
                                            each), for every instance's own counters
                                            (on_charge_elsewhere); and the mark of an
                                            instance catching up ([id, []], spend.lua)

Every time in Redis is Redis's own clock (the scripts call TIME), and the
scripts answer with durations, so instances whose clocks disagree share one
window. Day, week and month are the hub's calendar periods ([server]
budget_timezone), named by their start as the instance computes it.

The admit script (admit.lua; its header is the contract) is the request
path's one round trip, EVALSHA, loaded at connect and loaded again on
NOSCRIPT: for the token, its user and its project it checks every budget,
then rpm, then concurrency, and only if all pass takes a place in each rpm
window and a slot in each concurrency set; it returns the upstream's key
states and the session's key with it, so the caller admits and picks a key
from one reply (the gateway hands them to the key ring: KeyRing.hear and
pin_session). Everything else is written off the request path: a slot
given back rides on this instance's next admit call (RELEASE_DELAY at
most, else it is queued); charges, key states (KeyRing.listener, through
UpstreamKeys) and sessions go to a bounded queue that one task sends in
pipelined batches; the link task beats, renews the slots of running
requests (every lease_ttl / 3) and reconnects.

Bounds across N instances while Redis answers:
- rpm is exact: no more than `rpm` admissions in any 60 s by Redis's clock,
  whatever N (the check and the take are one atomic script).
- concurrency is exact at admission; a slot is freed when its release
  lands (with this instance's next admission, or RELEASE_DELAY and a send
  after the request ended, which may refuse a request that comes in
  between on another instance, never admit one too many), or lease_ttl
  after its instance last renewed it (an instance that died).
- a budget overshoots by at most what the requests in flight on all
  instances cost, plus charges not yet sent (as on one instance: a budget
  is checked at admission and charged when the usage event is recorded).
- a 429 through one instance rests the key for all once its write lands
  (the sender's next batch): requests the others admitted before may still
  go to it.
- a session's key is the one the last instance to choose for it wrote:
  two instances choosing for a new session at once may each use their own,
  once.

When Redis fails (a call times out, a connection fails, an error answers):
every call is bounded by `timeout` (socket connect and read timeouts, the
pool's wait, and an asyncio timeout around the whole), and the first
failure moves the instance to DEGRADED, logged once. From then on no request
waits for Redis: with on_failure = "local" each is admitted on this
instance's share (hubcore.shared.fallback: rpm, budgets and concurrency
divided by the last known live-instance count, at least 1 each); with
"closed" it is refused with a 503 in the vendor's shape. Writes wait in the
queue (up to queue_max, oldest dropped first). The link task tries again
after 0.1 s, doubling up to heartbeat_interval; when Redis answers it loads
the scripts, beats, and if Redis lost its data (the epoch changed) drops
the queued charges and raises every spend counter to what this instance
knows (`seed`, the larger of the two: no instance counts twice), takes
again the slots of its running requests, then sends the queue and goes
back to SHARED, logged once. Degraded bounds: rpm in any 60 s at most
N x max(1, rpm // N), plus, in the minute Redis went, what it had already
admitted; concurrency at most N x max(1, c // N); a budget at most N x
(budget // N) of what each instance saw charged itself, plus the overshoot
above.

Nothing here raises into the request path but the refusals (Refused, and
the 503 of on_failure = "closed", both HubError), and nothing waits longer
than `timeout` on Redis.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import math
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import orjson
from hiredis import pack_command
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from hubcore import __version__
from hubcore.config import SharedConfig, redis_address, zone
from hubcore.errors import HubError
from hubcore.governance.limiter import (
    Admission,
    BudgetLine,
    Refused,
    budget_refusal,
    concurrency_refusal,
    rpm_refusal,
)
from hubcore.governance.limits import Limits, calendar_periods
from hubcore.governance.storage import ScopeLimits
from hubcore.governance.tokens import Principal
from hubcore.shared.fallback import LocalShare
from hubcore.shared.keyspace import (
    NO_NEWS,
    KeyNews,
    Keyspace,
    Script,
    circuit_field,
    counted,
    dead_field,
    fingerprint,
    load_scripts,
    read_key_states,
    rest_field,
    scope_id,
    scope_part,
)

log = logging.getLogger("hubcore.shared")

# The link to Redis is retried this long after a failure, doubling up to
# heartbeat_interval: a blip of a few hundred ms ends the degraded mode as
# quickly, a Redis that is down costs one probe a heartbeat.
RECONNECT_FIRST = 0.1
# Writes sent in one pipeline; each batch may take `timeout` plus this much
# per write (a charge runs some 30 commands inside Redis).
SEND_BATCH = 256
SEND_TIME_PER_WRITE = 0.0002
# The sender waits this long after the first charge or release of a batch
# for others to join it: a pipeline of its own per request's charge cost a
# hub at c=1 as much CPU as the request itself, and a few ms late is
# nothing to a budget. News of keys and sessions goes at once (the others'
# next requests depend on it), and takes what waits with it.
SEND_LINGER = 0.003
# Keys per seed call after Redis lost its data.
SEED_BATCH = 512
# A request's charge marker outlives any replay of its charge.
CHARGE_MARK_TTL = 86400
# Day, week and month counters are kept this long after their period ends
# (an instance whose clock lags still reads the one it thinks current).
PERIOD_KEEP = 86400
# A slot given back rides on this instance's next admit call (which ZREMs
# it first, at no extra round trip); one that none carried within this
# many seconds is sent on its own. At most RELEASE_CARRY ride on one call.
RELEASE_DELAY = 0.005
RELEASE_CARRY = 64
# Session affinity TTL when the caller names none (KeyPolicy.affinity_ttl's default).
DEFAULT_SESSION_TTL = 3600.0
# How long close() may take to send what is queued.
CLOSE_FLUSH_TIMEOUT = 1.0

# What a call to Redis fails with; anything else is a bug and propagates.
_FAILURES = (RedisError, OSError, asyncio.TimeoutError)
# How long the charges' subscriber waits for a message before it looks at
# the link again (a read with nothing to read is no failure).
FOLLOW_WAIT = 1.0

# Told of every charge another instance applied in Redis: token id, user,
# project, micro-dollars, arrival (unix seconds); see on_charge_elsewhere.
ChargeListener = Callable[[int | None, str | None, str | None, int, float], None]
# Raises a scope's spend in one window to what Redis holds when it is
# below: kind, name, window, micro-dollars; the micro-dollars it added
# (Limiter.raise_spend).
SpendRaiser = Callable[[str, str, str, int], int]


class Link(enum.Enum):
    CONNECTING = "connecting"  # start() has not reached Redis yet
    SHARED = "shared"          # limits and key states go through Redis
    DEGRADED = "degraded"      # Redis failed: local shares (or refusals) until it answers again
    CLOSED = "closed"          # close() ran


class _Event(enum.Enum):
    ANSWERED = enum.auto()  # a call, or the link task's probe, succeeded
    FAILED = enum.auto()    # a call timed out, could not connect, or Redis answered an error
    CLOSE = enum.auto()


# Every change of the link goes through SharedState._move.
_MOVES: dict[tuple[Link, _Event], Link] = {
    (Link.CONNECTING, _Event.ANSWERED): Link.SHARED,
    (Link.CONNECTING, _Event.FAILED): Link.DEGRADED,
    (Link.SHARED, _Event.ANSWERED): Link.SHARED,
    (Link.SHARED, _Event.FAILED): Link.DEGRADED,
    (Link.DEGRADED, _Event.ANSWERED): Link.SHARED,
    (Link.DEGRADED, _Event.FAILED): Link.DEGRADED,
    (Link.CONNECTING, _Event.CLOSE): Link.CLOSED,
    (Link.SHARED, _Event.CLOSE): Link.CLOSED,
    (Link.DEGRADED, _Event.CLOSE): Link.CLOSED,
    (Link.CLOSED, _Event.CLOSE): Link.CLOSED,
    # A call that was out when close() ran answers into nothing.
    (Link.CLOSED, _Event.ANSWERED): Link.CLOSED,
    (Link.CLOSED, _Event.FAILED): Link.CLOSED,
}


# What an instance knows of spend, for seeding a Redis that lost its data
# (governance.limiter.Limiter.spend_report).
SeedSource = Callable[[], Iterable[BudgetLine]]


class Grant:
    """An admitted request's hold, until release(): its concurrency slots
    (in Redis, and counted by this instance), or its local admission; with
    what the instances know against the upstream's keys and the key its
    session sticks to."""

    __slots__ = ("_state", "_member", "_slot_keys", "_scopes", "_local", "keys", "session_key", "shared")

    def __init__(
        self, state: SharedState, member: str | None, slot_keys: tuple[str, ...], scopes: tuple[str, ...],
        local: Admission | None, keys: Mapping[str, KeyNews], session_key: str | None, shared: bool,
    ) -> None:
        self._state: SharedState | None = state
        self._member = member
        self._slot_keys = slot_keys
        self._scopes = scopes
        self._local = local
        # Key label -> what the instances know against it; empty: nothing.
        self.keys = keys
        # The label of the key the session sticks to on this upstream, as any
        # instance last chose it; None: no session, or none chosen yet.
        self.session_key = session_key
        # False: admitted on this instance's share (Redis unreachable).
        self.shared = shared

    def release(self) -> None:
        """Idempotent: a second call does nothing."""
        state, self._state = self._state, None
        if state is not None:
            state._release(self)

    @property
    def released(self) -> bool:
        return self._state is None


# (script or None for a plain command, keys, arguments, what a charge tells
# the other instances once it is applied or None).
_Write = tuple[str | None, tuple[str, ...], tuple[str | int | float, ...], "list[Any] | None"]


class SharedState:
    """One instance's link to the state it shares with the others (see the
    module's docstring). Not thread-safe: it belongs to one event loop.

    `tz` names the budget calendar ([server] budget_timezone);
    `instances_hint` is the instance count assumed until Redis tells
    ([server] workers); `seed` is what this instance knows of spend, read
    when Redis lost its data (default: its own charges since it started).
    `clock` is wall seconds (budget periods, refusal times)."""

    def __init__(
        self, config: SharedConfig, *, tz: str = "UTC", instances_hint: int = 1, seed: SeedSource | None = None,
        clock: Callable[[], float] = time.time, instance_id: str | None = None,
    ) -> None:
        if not config.redis:
            raise ValueError("SharedState needs [shared] redis")
        self.config = config
        self.url = config.redis  # without its password (config.parse_shared)
        self.space = Keyspace(config.prefix)
        self.instance_id = instance_id or os.urandom(6).hex()
        self._tz = zone(tz)
        self._clock = clock
        self._timeout = config.timeout
        self._scripts = load_scripts()
        self._local = LocalShare(tz, clock)
        self._seed: SeedSource = seed if seed is not None else self._local.limiter.spend_report
        self._limits = ScopeLimits()
        self._client: Redis | None = None
        # Connections taken from the client's pool and kept between calls (see _pipeline).
        self._idle: list[Connection] = []
        # the link
        self._link = Link.CONNECTING
        self._instances = max(1, instances_hint)
        self._epoch: str | None = None
        self._degraded_at: float | None = None  # monotonic
        self._degraded_seconds = 0.0
        self.errors: dict[str, int] = {"timeout": 0, "connection": 0, "error": 0}
        self.last_error: str | None = None
        # admissions: member -> slot keys held in Redis, renewed while held
        self._counter = 0
        self._held: dict[str, tuple[str, ...]] = {}
        # (slot key, member) given back, waiting for an admit call to carry them
        self._releases: list[tuple[str, str]] = []
        self._release_timer: asyncio.TimerHandle | None = None
        # writes off the request path
        self._queue: deque[_Write] = deque()
        self.dropped = 0
        self._sending = False
        self._wake_sender = asyncio.Event()
        self._hurry = asyncio.Event()  # a write that must not linger is queued
        self._wake_link = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._set_periods(clock())
        # Told of the charges other instances apply (set before start()):
        # the hub's own Limiter counts everyone's spend with them, so that
        # /me, the budget headers, the dashboard and budget alerts see what
        # all instances spent, not this one's share. Redis still judges.
        self.on_charge_elsewhere: ChargeListener | None = None
        self.charges_heard = 0
        # True while every charge announced is heard: subscribed, and past
        # the mark of the catch-up that subscribing starts.
        self.following_charges = False
        # With it: the spend of every budget raised to what Redis holds each
        # time the charges' subscription starts, for the charges announced
        # while it was down (see _catch_up).
        self.on_spend_elsewhere: SpendRaiser | None = None
        self.catch_ups = 0
        self.caught_up_micros = 0

    # -- life ----------------------------------------------------------------

    async def start(self) -> None:
        """Connect and announce this instance; never raises for Redis: one
        that cannot be reached now starts this instance DEGRADED."""
        self._client = _client(self.config)
        loop = asyncio.get_running_loop()
        await self._reconnect()
        self._tasks = [
            loop.create_task(self._keep_link(), name="hubcore-shared-link"),
            loop.create_task(self._send_forever(), name="hubcore-shared-sender"),
        ]
        if self.on_charge_elsewhere is not None:
            self._tasks.append(loop.create_task(self._follow_charges(), name="hubcore-shared-charges"))

    async def close(self) -> None:
        """Send what is queued (within CLOSE_FLUSH_TIMEOUT), give back held
        slots, leave the instance set, disconnect."""
        await _cancelled(self._tasks)
        self._tasks = []
        self._send_releases()
        client = self._client
        if client is not None and self._link is Link.SHARED:
            for member, slot_keys in self._held.items():
                for key in slot_keys:
                    self._queue.append((None, (), ("ZREM", key, member), None))
            self._held.clear()
            self._queue.append((None, (), ("ZREM", self.space.instances, self.instance_id), None))
            self._queue.append((None, (), ("DEL", self.space.instance(self.instance_id)), None))
            try:
                async with asyncio.timeout(CLOSE_FLUSH_TIMEOUT):
                    while self._queue and self._link is Link.SHARED:
                        batch = self._take_batch()
                        if not await self._send(batch):
                            break
            except asyncio.TimeoutError:
                pass
        if self._queue:
            log.warning("shared state: %d writes to Redis %s not sent at close", len(self._queue), self.url)
        self._move(_Event.CLOSE, "closed")
        if client is not None:
            for conn in self._idle:
                await client.connection_pool.release(conn)
            self._idle.clear()
            await client.aclose()
            self._client = None

    def update_limits(self, limits: ScopeLimits) -> None:
        """The limits of users and projects (tokens' come with each
        Principal), as the hub's Limiter gets them (Limiter.update)."""
        self._limits = limits
        self._local.update(limits)

    # -- the request path ---------------------------------------------------------

    async def admit(
        self, principal: Principal, upstream: str | None = None, session: str | None = None,
        now: float | None = None, *, session_ttl: float = DEFAULT_SESSION_TTL,
    ) -> Grant:
        """Admit a request on what every instance counts, or raise Refused
        (403/429, as the in-memory Limiter words them), or HubError 503 when
        Redis is unreachable and on_failure is "closed". With the grant come
        the news of `upstream`'s keys and the key of `session` there.

        Only rpm, concurrency and budgets are judged here; expiry, groups
        and models stay the hub's Limiter's, which runs first."""
        if now is None:
            now = self._clock()
        if now >= self._boundary:
            self._set_periods(now)
        scopes = self._scopes(principal)
        if self._link is not Link.SHARED:
            return self._admit_locally(principal, scopes, now)
        space = self.space
        self._counter += 1
        member = f"{self.instance_id}:{self._counter:x}"
        carry = self._releases
        if len(carry) > RELEASE_CARRY:
            carry, self._releases = carry[:RELEASE_CARRY], carry[RELEASE_CARRY:]
        elif carry:
            self._releases = []
        keys: list[str] = [
            space.key_states(upstream or ""),
            space.session(upstream or "", session) if session is not None else space.key_states(""),
        ]
        args: list[str | int] = [
            member, int(self.config.lease_ttl * 1000),
            int(session_ttl * 1000) if session is not None else 0, len(scopes), len(carry),
        ]
        for slot_key, released in carry:
            keys.append(slot_key)
            args.append(released)
        for scope, _, limits in scopes:
            scope_keys, scope_args = scope_part(space, scope, limits, self._period_starts)
            keys += scope_keys
            args += scope_args
        try:
            async with asyncio.timeout(self._timeout):
                reply = await self._admit_call(keys, args)
        except BaseException as e:
            # The carried releases may or may not have landed; ZREM again
            # is harmless.
            for slot_key, released in carry:
                self._enqueue(None, (), ("ZREM", slot_key, released), linger=True)
            if not isinstance(e, _FAILURES):
                raise
            self._failed(e, "admit")
            return self._admit_locally(principal, scopes, now)
        if reply[0] == 0:
            raise self._refusal(reply, scopes, now)
        slot_scopes = tuple(scope for scope, _, limits in scopes if limits.concurrency is not None)
        slot_keys = tuple(space.slots(scope) for scope in slot_scopes)
        if slot_keys:
            self._held[member] = slot_keys
            self._local.hold(slot_scopes)
        session_key = reply[2]
        return Grant(
            self, member, slot_keys, slot_scopes, None, read_key_states(reply[1]),
            session_key.decode("utf-8", "replace") if session_key else None, True,
        )

    def _scopes(self, principal: Principal) -> list[tuple[str, str, Limits]]:
        """(scope id, label, limits) of the principal's scopes that Redis counts for."""
        scopes = []
        limits = principal.limits
        if limits is not None and counted(limits):
            scopes.append((scope_id("token", principal.token_id), f"token {principal.token_id}", limits))
        defined = self._limits
        user = defined.users.get(principal.user)
        if user is not None and counted(user):
            scopes.append((scope_id("user", principal.user), f"user {principal.user}", user))
        if principal.project is not None:
            project = defined.projects.get(principal.project)
            if project is not None and counted(project):
                scopes.append((scope_id("project", principal.project), f"project {principal.project}", project))
        return scopes

    def _admit_locally(self, principal: Principal, scopes: list[tuple[str, str, Limits]], now: float) -> Grant:
        if self.config.on_failure == "closed":
            raise HubError(
                503,
                "hubcore cannot reach the state it shares with its other instances and is set to refuse "
                "requests until it can ([shared] on_failure = \"closed\"); retry shortly",
                code="shared_state_unavailable",
                retry_after=max(1.0, math.ceil(self.config.heartbeat_interval)),
            )
        slots = [(scope, label, limits.concurrency) for scope, label, limits in scopes if limits.concurrency is not None]
        admission = self._local.admit(principal, slots, self._instances, now)
        slot_scopes = tuple(scope for scope, _, _ in slots)
        self._local.hold(slot_scopes)
        return Grant(self, None, (), slot_scopes, admission, NO_NEWS, None, False)

    def _release(self, grant: Grant) -> None:
        if grant._scopes:
            self._local.drop(grant._scopes)
        if grant._local is not None:
            grant._local.release()
        member = grant._member
        if member is not None and grant._slot_keys:
            self._held.pop(member, None)
            for key in grant._slot_keys:
                self._releases.append((key, member))
            if self._release_timer is None and self._link is not Link.CLOSED:
                self._release_timer = asyncio.get_running_loop().call_later(RELEASE_DELAY, self._send_releases)

    def _send_releases(self) -> None:
        """Releases no admit call carried go to the sender."""
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        releases, self._releases = self._releases, []
        for slot_key, member in releases:
            self._enqueue(None, (), ("ZREM", slot_key, member), linger=True)

    def _refusal(self, reply: list[Any], scopes: list[tuple[str, str, Limits]], now: float) -> Refused:
        _, index, limit_name, value, extra = reply
        _, label, limits = scopes[index - 1]
        limit = limit_name.decode() if isinstance(limit_name, bytes) else str(limit_name)
        if limit == "rpm":
            return rpm_refusal(label, limits.rpm or 0, now + value / 1000.0, now, self._tz)
        if limit == "concurrency":
            return concurrency_refusal(label, limits.concurrency or 0)
        window = limit.removeprefix("budget_")
        budget = limits.budget(window) or 0
        resets_at: float | None = None
        if budget > 0:
            if window == "5h":
                resets_at = now + extra / 1000.0 if extra >= 0 else None
            elif window == "day":
                resets_at = self._periods[0][1]
            elif window == "week":
                resets_at = self._periods[1][1]
            elif window == "month":
                resets_at = self._periods[2][1]
        return budget_refusal(window, label, value, budget, resets_at, now, self._tz)

    # -- writes off the request path ------------------------------------------------

    def on_usage(self, event: Any) -> None:
        """A UsageRecorder listener (accounting.usage.UsageEvent): charge it."""
        self.charge(event.request_id, event.token_id, event.user, event.project, event.cost_micros, event.ts)

    def charge(
        self, request_id: str, token_id: int | None, user: str | None, project: str | None,
        cost_micros: int | None, ts: float,
    ) -> None:
        """Add a request's cost to its scopes' spend, here at once and in
        Redis once per request id (a replayed send adds nothing)."""
        if not cost_micros or cost_micros < 0:
            return
        self._local.limiter.charge(token_id, user, project, cost_micros, ts)
        if self._link is Link.CLOSED:
            return
        space = self.space
        if ts >= self._boundary:
            self._set_periods(ts)
        periods = self._periods if ts >= self._period_starts[0] else calendar_periods(ts, self._tz)
        day, week, month = periods
        keys = [space.charged(request_id)]
        for kind, name in (("token", token_id), ("user", user), ("project", project)):
            if name is None:
                continue
            scope = scope_id(kind, name)
            keys += [
                space.spend("5h", scope), space.spend("day", scope, day[0]), space.spend("week", scope, week[0]),
                space.spend("month", scope, month[0]), space.spend("total", scope),
            ]
        self._enqueue("charge", tuple(keys), (
            cost_micros, int(ts // 60), CHARGE_MARK_TTL,
            int(day[1]) + PERIOD_KEEP, int(week[1]) + PERIOD_KEEP, int(month[1]) + PERIOD_KEEP,
        ), linger=True, news=[token_id, user, project, cost_micros, ts])

    async def claim(self, name: str, seconds: float) -> bool:
        """Whether this instance is the first to claim `name` in the last
        `seconds` (ops.alerts.Claim). True too when Redis cannot tell: an
        alert twice is better than none."""
        client = self._client
        if client is None or self._link is not Link.SHARED:
            return True
        try:
            async with asyncio.timeout(self._timeout):
                won = await client.set(self.space.alert(name), self.instance_id, nx=True, px=max(1, int(seconds * 1000)))
        except _FAILURES as e:
            log.debug("shared state: could not claim alert %s: %s", name, e)
            return True
        return bool(won)

    async def _follow_charges(self) -> None:
        """Hand each charge another instance applied to on_charge_elsewhere,
        from a subscription of its own, while the link is up.

        Charges announced while the subscription was down (at start, or
        while Redis or the link was away) are never heard. So each time it
        subscribes, it catches up: one script reads what Redis holds of
        every budget's spend and, in the same step, publishes a mark on the
        channel (spend.lua). The charges heard before the mark are in what
        it read and are dropped; the spend read raises this instance's
        (Limiter.raise_spend: the larger of the two, so nothing counts
        twice); the charges after the mark are heard as usual. What can
        still be off, at a resubscription only: a charge another instance
        applied just before the read and announces just after it (counted
        twice here, at most that instance's one batch), and this instance's
        own charges not yet sent to Redis when it reads (their spend is
        raised to Redis's without them; at most the sender's linger of
        charges)."""
        listener = self.on_charge_elsewhere
        assert listener is not None
        mark = orjson.dumps([self.instance_id, []])  # others read it as no charges
        while True:
            while self._link is not Link.SHARED:
                await asyncio.sleep(self.config.heartbeat_interval)
            client = _client(self.config, connections=1)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                async with asyncio.timeout(self._timeout):
                    await pubsub.subscribe(self.space.charges)
                spend = await self._read_spend(mark)
                self.following_charges = spend is None
                while self._link is Link.SHARED:
                    message = await pubsub.get_message(timeout=FOLLOW_WAIT)
                    if message is None:
                        continue
                    if spend is None:
                        self._heard_charge(message["data"], listener)
                    elif message["data"] == mark:
                        self._catch_up(spend)
                        spend = None
                        self.following_charges = True
            except _FAILURES as e:
                # The link task notices and reports a Redis that is gone;
                # this one waits for it to come back.
                log.debug("shared state: the charges' subscription ended: %s", e)
                await asyncio.sleep(self.config.heartbeat_interval)
            finally:
                self.following_charges = False
                try:
                    async with asyncio.timeout(self._timeout):
                        await pubsub.aclose()
                        await client.aclose()
                except _FAILURES:
                    pass

    async def _read_spend(self, mark: bytes) -> list[tuple[BudgetLine, int]] | None:
        """What Redis holds of each budget's spend, read with spend.lua, which
        publishes `mark` on the charges channel in the same step; None when
        this instance has no spend to raise (no budgets, or no raiser)."""
        if self.on_spend_elsewhere is None:
            return None
        now = self._clock()
        if now >= self._boundary:
            self._set_periods(now)
        lines = list(self._seed())
        client = self._client
        if not lines or client is None:
            return None
        keys = [self._spend_key(line)[0] for line in lines]
        kinds = ["r" if line.window == "5h" else "n" for line in lines]
        async with asyncio.timeout(self._timeout):
            held = await self._eval(self._scripts["spend"], keys, [self.space.charges, mark.decode(), *kinds])
        return [(line, int(micros)) for line, micros in zip(lines, held)]

    def _catch_up(self, spend: list[tuple[BudgetLine, int]]) -> None:
        """Raise each budget's spend here to what Redis held (see _follow_charges)."""
        raise_spend = self.on_spend_elsewhere
        assert raise_spend is not None
        self.catch_ups += 1
        for line, micros in spend:
            self.caught_up_micros += raise_spend(line.kind, line.name, line.window, micros)

    def _spend_key(self, line: BudgetLine) -> tuple[str, int]:
        """The Redis key of a budget's spend in its current period, and the
        unix seconds a counter of it may go (0: never; a 5h hash, the total)."""
        scope = scope_id(line.kind, line.name)
        if line.window in ("5h", "total"):
            return self.space.spend(line.window, scope), 0
        day, week, month = self._periods
        period = {"day": day, "week": week, "month": month}[line.window]
        return self.space.spend(line.window, scope, period[0]), int(period[1]) + PERIOD_KEEP

    def _heard_charge(self, data: bytes, listener: ChargeListener) -> None:
        try:
            instance, charges = orjson.loads(data)
            if instance == self.instance_id:
                return
            heard = [(token_id, user, project, int(cost), float(ts)) for token_id, user, project, cost, ts in charges]
        except (orjson.JSONDecodeError, TypeError, ValueError):
            log.warning("shared state: a charge message that is not hubcore's on %s", self.space.charges)
            return
        # Outside the try: a fault of the listener's is not the message's.
        for charge in heard:
            self.charges_heard += 1
            listener(*charge)

    def rested(self, upstream: str, label: str, model_class: str, seconds: float) -> None:
        """A key answered 429: it rests `seconds` for `model_class` ("": the
        whole key) on every instance. Rests only lengthen."""
        self._key_state(upstream, rest_field(label, model_class), max(1, int(seconds * 1000)))

    def circuit_opened(self, upstream: str, label: str, seconds: float) -> None:
        """A key's circuit opened here: the others leave it alone for `seconds`."""
        self._key_state(upstream, circuit_field(label), max(1, int(seconds * 1000)))

    def circuit_closed(self, upstream: str, label: str) -> None:
        self._enqueue(None, (), ("HDEL", self.space.key_states(upstream), circuit_field(label)))

    def key_refused(self, upstream: str, label: str, secret: str) -> None:
        """The vendor refused a key (401/403): dead on every instance that
        has it with this secret, until key_revived."""
        self._key_state(upstream, dead_field(label), fingerprint(secret))

    def key_revived(self, upstream: str, label: str) -> None:
        """An operator enabled the key (or a reload revived it): nothing the
        instances learnt against it stands, as KeyRing.enable ends it all."""
        self._key_state(upstream, "r" + label, 0)

    def remember_session(self, upstream: str, session: str, label: str, ttl: float = DEFAULT_SESSION_TTL) -> None:
        """The session sticks to key `label` on `upstream` for `ttl` seconds."""
        self._enqueue(None, (), ("SET", self.space.session(upstream, session), label, "PX", max(1, int(ttl * 1000))))

    def key_listener(self, upstream: str) -> UpstreamKeys:
        """What `upstream`'s key ring learns, for every instance (KeyRing.listener)."""
        return UpstreamKeys(self, upstream)

    def _key_state(self, upstream: str, field: str, value: str | int) -> None:
        self._enqueue("keystate", (self.space.key_states(upstream),), (field, value))

    def _enqueue(
        self, script: str | None, keys: tuple[str, ...], args: tuple[str | int | float, ...], *, linger: bool = False,
        news: list[Any] | None = None,
    ) -> None:
        """Queue a write for the sender; `linger`: it may wait SEND_LINGER for
        others; `news`: a charge's, published once it is applied."""
        if self._link is Link.CLOSED:
            return
        queue = self._queue
        if len(queue) >= self.config.queue_max:
            queue.popleft()
            self.dropped += 1
        queue.append((script, keys, args, news))
        if not linger:
            self._hurry.set()
        if self._link is Link.SHARED and not self._sending:
            self._wake_sender.set()

    async def flush(self) -> bool:
        """Wait until every queued write was sent (tests, shutdown); False if
        Redis is unreachable and some are left."""
        self._send_releases()
        while self._queue or self._sending:
            if self._link is not Link.SHARED:
                return False
            # Woken while it sends, the sender would go round again with
            # nothing to send, and never be seen idle.
            if not self._sending:
                self._wake_sender.set()
            await asyncio.sleep(0.001)
        return True

    # -- the sender ----------------------------------------------------------------

    async def _send_forever(self) -> None:
        while True:
            await self._wake_sender.wait()
            self._wake_sender.clear()
            self._sending = True
            batch: list[_Write] = []
            try:
                if not self._hurry.is_set() and len(self._queue) < SEND_BATCH:
                    try:
                        async with asyncio.timeout(SEND_LINGER):
                            await self._hurry.wait()
                    except TimeoutError:
                        pass
                self._hurry.clear()
                while self._queue and self._link is Link.SHARED:
                    batch = self._take_batch()
                    if not await self._send(batch):
                        self._requeue(batch)
                        break
                    batch = []
            except asyncio.CancelledError:
                self._requeue(batch)  # close() sends it, if Redis answers
                raise
            finally:
                self._sending = False

    def _take_batch(self) -> list[_Write]:
        queue = self._queue
        return [queue.popleft() for _ in range(min(len(queue), SEND_BATCH))]

    def _requeue(self, batch: list[_Write]) -> None:
        """Put back a batch that may not have landed (every write is
        idempotent: a charge by its marker, the others by what they set)."""
        queue = self._queue
        queue.extendleft(reversed(batch))
        while len(queue) > self.config.queue_max:
            queue.popleft()
            self.dropped += 1

    async def _send(self, batch: list[_Write], again: bool = True) -> bool:
        """One pipeline of writes; False (and DEGRADED) if Redis failed."""
        client = self._client
        if client is None:
            return False
        commands: list[Any] = [
            args if name is None else ("EVALSHA", self._scripts[name].sha, len(keys), *keys, *args)
            for name, keys, args, _ in batch
        ]
        try:
            async with asyncio.timeout(self._timeout + len(batch) * SEND_TIME_PER_WRITE):
                results = await self._pipeline(client, commands)
        except _FAILURES as e:
            self._failed(e, "write")
            return False
        unloaded = []
        for write, result in zip(batch, results):
            if isinstance(result, NoScriptError):
                unloaded.append(write)
            elif isinstance(result, RedisError):
                # Redis refused this write (out of memory, read-only replica):
                # it would be refused again; the others went through.
                self.errors["error"] += 1
                self.last_error = f"{write[0] or write[2][0]}: {result}"
                log.warning("shared state: Redis %s refused a write (%s): %s", self.url, write[0] or write[2][0], result)
        applied = [write[3] for write, result in zip(batch, results) if write[3] is not None and result == 1]
        if applied:
            await self._publish(client, applied)
        if unloaded:
            if not again or not await self._load_scripts_now():
                self._requeue(unloaded)
                return False
            return await self._send(unloaded, again=False)
        return True

    async def _pipeline(self, client: Redis, commands: list[Any]) -> list[Any]:
        """Send `commands` in one write and read their replies, an error
        reply as its exception. redis-py's own pipeline and commands encode
        each argument in Python, time each read, and take a connection from
        the pool each time (a lock, a condition, a timer): through them the
        shared path cost a hub at c=1 several times the CPU of the request
        (bench.hotpath --redis). So commands are packed by hiredis, replies
        read without a timer of their own (the caller bounds the whole),
        and connections, once taken from the pool, are kept here between
        calls. A kept connection that Redis closed meanwhile (it restarted)
        fails before any reply: then every kept one is closed, and the
        commands go once more on a connection the pool checks first."""
        idle = self._idle
        if idle:
            conn = idle.pop()
            results: list[Any] = []
            try:
                await self._exchange(conn, commands, results)
            except RedisConnectionError:
                await self._drop_connections(client, conn)
                if results:
                    raise
            except BaseException:
                await self._drop_connections(client, conn)
                raise
            else:
                self._idle.append(conn)
                return results
        conn = await client.connection_pool.get_connection()
        results = []
        try:
            await self._exchange(conn, commands, results)
        except BaseException:
            await self._drop_connections(client, conn)
            raise
        self._idle.append(conn)
        return results

    @staticmethod
    async def _exchange(conn: Connection, commands: list[Any], results: list[Any]) -> None:
        await conn.send_packed_command(b"".join(pack_command(command) for command in commands), check_health=False)
        for _ in commands:
            try:
                # math.inf: no timer per read; the caller's bounds all.
                results.append(await conn.read_response(timeout=math.inf))
            except ResponseError as error:
                results.append(error)

    async def _drop_connections(self, client: Redis, failed: Connection) -> None:
        """Close `failed` and those kept with it (they likely share its fate),
        and give them back to the pool, which connects them again when asked."""
        pool = client.connection_pool
        kept, self._idle = self._idle, []
        for conn in (failed, *kept):
            await conn.disconnect(nowait=True)
            await pool.release(conn)

    async def _publish(self, client: Redis, charges: list[list[Any]]) -> None:
        """Tell the other instances of the charges a batch applied, in one
        message (a replayed charge that added nothing is not among them).
        Only their counters of everyone's spend hang on it: a message lost
        to a failure is logged, not sent again."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._pipeline(client, [("PUBLISH", self.space.charges, orjson.dumps([self.instance_id, charges]))])
        except _FAILURES as e:
            log.debug("shared state: %d charges not published: %s", len(charges), e)

    # -- the link ----------------------------------------------------------------------

    async def _keep_link(self) -> None:
        """Beat and renew while SHARED; probe with backoff while DEGRADED."""
        backoff = RECONNECT_FIRST
        renew_every = self.config.lease_ttl / 3
        renewed_at = time.monotonic()
        while True:
            if self._link is Link.SHARED:
                backoff = RECONNECT_FIRST
                await self._beat()
                if self._link is Link.SHARED and time.monotonic() - renewed_at >= renew_every:
                    renewed_at = time.monotonic()
                    await self._renew(reassert=False)
                wait = min(self.config.heartbeat_interval, renew_every)
            elif await self._reconnect():
                renewed_at = time.monotonic()
                wait = min(self.config.heartbeat_interval, renew_every)
            else:
                wait = backoff
                backoff = min(backoff * 2, self.config.heartbeat_interval)
            self._wake_link.clear()
            try:
                async with asyncio.timeout(wait):
                    await self._wake_link.wait()
            except asyncio.TimeoutError:
                pass

    async def _beat(self) -> bool:
        """Announce this instance; learn the live count and the epoch."""
        space = self.space
        info = f"{socket.gethostname()} pid {os.getpid()} hubcore {__version__}"
        candidate = os.urandom(8).hex()
        try:
            async with asyncio.timeout(self._timeout):
                count, epoch = await self._eval(
                    self._scripts["heartbeat"],
                    [space.instance(self.instance_id), space.instances, space.epoch],
                    [self.instance_id, int(self.config.instance_ttl * 1000), info, candidate],
                )
        except _FAILURES as e:
            self._failed(e, "heartbeat")
            return False
        self._instances = max(1, int(count))
        epoch_text = epoch.decode() if isinstance(epoch, bytes) else str(epoch)
        known, self._epoch = self._epoch, epoch_text
        if known is not None and epoch_text != known:
            log.warning(
                "shared state: Redis %s lost its data (restarted without persistence, or flushed); "
                "seeding spend from what this instance knows", self.url,
            )
            await self._resync_lost()
        elif known is None and epoch_text == candidate:
            # This instance is the first to find the Redis empty (a new one,
            # or one that lost its data while no instance ran): what it
            # knows of spend (its database, at start) goes in.
            await self._resync_lost()
        return True

    async def _reconnect(self) -> bool:
        """Load the scripts and beat; on success, back to SHARED and send the queue."""
        if not await self._load_scripts_now():
            return False
        if not await self._beat():
            return False
        if self._link is Link.CLOSED:
            return False
        came_back = self._link is Link.DEGRADED
        if came_back:
            # Slots this instance holds may have run out while Redis was away.
            await self._renew(reassert=True)
        self._move(_Event.ANSWERED, "answered")
        if self._queue:
            self._wake_sender.set()
        return True

    async def _load_scripts_now(self) -> bool:
        client = self._client
        if client is None:
            return False
        pipe = client.pipeline(transaction=False)
        for script in self._scripts.values():
            pipe.execute_command("SCRIPT", "LOAD", script.source)
        try:
            async with asyncio.timeout(self._timeout):
                await pipe.execute()
        except _FAILURES as e:
            self._failed(e, "script load")
            return False
        return True

    async def _renew(self, *, reassert: bool) -> None:
        """Extend the leases of the slots this instance holds; `reassert`
        takes again those Redis lost (after an outage or a data loss)."""
        if not self._held:
            return
        keys: list[str] = []
        members: list[str] = []
        for member, slot_keys in self._held.items():
            for key in slot_keys:
                keys.append(key)
                members.append(member)
        script = self._scripts["renew"]
        lease = int(self.config.lease_ttl * 1000)
        for start in range(0, len(keys), SEED_BATCH):
            try:
                async with asyncio.timeout(self._timeout):
                    await self._eval(
                        script, keys[start:start + SEED_BATCH],
                        [lease, "ANY" if reassert else "XX", *members[start:start + SEED_BATCH]],
                    )
            except _FAILURES as e:
                self._failed(e, "renew")
                return

    async def _resync_lost(self) -> None:
        """Redis lost its data: the queued charges are in what this instance
        knows, so they go, and every spend counter is raised to that."""
        kept = deque(write for write in self._queue if write[0] != "charge")
        self._queue = kept
        now = self._clock()
        if now >= self._boundary:
            self._set_periods(now)
        keys: list[str] = []
        args: list[str | int] = []
        for line in self._seed():
            if line.spent_micros <= 0:
                continue
            key, expires = self._spend_key(line)
            keys.append(key)
            args += ["r" if line.window == "5h" else "n", line.spent_micros, expires]
        script = self._scripts["seed"]
        for start in range(0, len(keys), SEED_BATCH):
            try:
                async with asyncio.timeout(self._timeout):
                    await self._eval(script, keys[start:start + SEED_BATCH], args[3 * start:3 * (start + SEED_BATCH)])
            except _FAILURES as e:
                self._failed(e, "seed")
                return
        await self._renew(reassert=True)

    async def _admit_call(self, keys: list[str], args: list[str | int]) -> Any:
        """The admit script's EVALSHA (see _pipeline for why not through
        redis-py's commands). On NOSCRIPT, as _eval. The caller bounds the time."""
        client = self._client
        assert client is not None
        script = self._scripts["admit"]
        (reply,) = await self._pipeline(client, [("EVALSHA", script.sha, len(keys), *keys, *args)])
        if isinstance(reply, NoScriptError):
            return await self._eval(script, keys, args, idempotent=False)
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def _eval(
        self, script: Script, keys: Sequence[str], args: Sequence[str | int | float], *, idempotent: bool = True,
    ) -> Any:
        """EVALSHA, loading the script once if Redis does not have it (a
        restart, SCRIPT FLUSH). The caller bounds the time. An `idempotent`
        script (every one but admit's) that meets a pooled connection Redis
        closed meanwhile (it restarted) goes once more: the pool checks the
        connection it hands out next, as _pipeline's second try does."""
        client = self._client
        assert client is not None
        try:
            try:
                return await client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            except RedisConnectionError:
                if not idempotent:
                    raise
                return await client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.execute_command("SCRIPT", "LOAD", script.source)
            return await client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)

    def _failed(self, error: BaseException, during: str) -> None:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # redis-py (8.2) turns a cancellation that lands while it
            # connects into a ConnectionError: the task was cancelled (a
            # client gone, close()), Redis did not fail.
            raise asyncio.CancelledError() from error
        if isinstance(error, (asyncio.TimeoutError, RedisTimeoutError)):
            kind, why = "timeout", f"no answer within {self._timeout * 1000:g} ms"
        elif isinstance(error, (RedisConnectionError, OSError)):
            kind, why = "connection", str(error) or type(error).__name__
        else:
            kind, why = "error", str(error) or type(error).__name__
        self.errors[kind] += 1
        self.last_error = f"{during}: {why}"
        self._move(_Event.FAILED, self.last_error)

    def _move(self, event: _Event, reason: str) -> None:
        """The one place the link changes (see _MOVES); logs each change once."""
        old = self._link
        new = _MOVES[(old, event)]
        self._link = new
        if new is old:
            return
        if new is Link.DEGRADED:
            self._degraded_at = time.monotonic()
            if self.config.on_failure == "closed":
                then = "refusing requests until it answers (on_failure = \"closed\")"
            else:
                then = f"enforcing limits locally, each divided by {self._instances} instance(s)"
            log.warning("shared state: Redis %s failed (%s); degraded: %s", self.url, reason, then)
            self._wake_link.set()
        elif old is Link.DEGRADED:
            degraded_for = time.monotonic() - (self._degraded_at or time.monotonic())
            self._degraded_seconds += degraded_for
            self._degraded_at = None
            if new is Link.SHARED:
                log.info(
                    "shared state: Redis %s answers again after %.1f s degraded; limits are shared again "
                    "(%d instance(s))", self.url, degraded_for, self._instances,
                )
        elif new is Link.SHARED:
            log.info("shared state: connected to Redis %s as instance %s (%d instance(s))",
                     self.url, self.instance_id, self._instances)

    # -- calendar periods ----------------------------------------------------------

    def _set_periods(self, now: float) -> None:
        self._periods = calendar_periods(now, self._tz)
        self._period_starts = (self._periods[0][0], self._periods[1][0], self._periods[2][0])
        self._boundary = min(end for _, end in self._periods)

    # -- reading -----------------------------------------------------------------------

    @property
    def link(self) -> Link:
        return self._link

    @property
    def degraded(self) -> bool:
        """Not sharing: Redis failed, or has not answered since start."""
        return self._link is Link.DEGRADED or self._link is Link.CONNECTING

    @property
    def instances(self) -> int:
        """Live instances as last counted (the hint until Redis answered)."""
        return self._instances

    def stats(self) -> dict[str, Any]:
        """For /stats and /metrics (ops.metrics.HubMetrics.render_shared)."""
        degraded_for = time.monotonic() - self._degraded_at if self._degraded_at is not None else 0.0
        return {
            "redis": self.url,
            "state": self._link.value,
            "degraded": self.degraded,
            "on_failure": self.config.on_failure,
            "instance_id": self.instance_id,
            "instances": self._instances,
            "errors": dict(self.errors),
            "last_error": self.last_error,
            "queue_depth": len(self._queue),
            "dropped": self.dropped,
            "held_slots": len(self._held),
            "charges_heard": self.charges_heard,
            "following_charges": self.following_charges,
            "catch_ups": self.catch_ups,
            "caught_up_micros": self.caught_up_micros,
            "degraded_seconds": self._degraded_seconds + degraded_for,
        }


class UpstreamKeys:
    """One upstream's routing.keys.KeyListener: what its ring learns from
    the vendor goes to every instance (queued, off the request path)."""

    __slots__ = ("_state", "upstream")

    def __init__(self, state: SharedState, upstream: str) -> None:
        self._state = state
        self.upstream = upstream

    def rested(self, label: str, model_class: str, seconds: float) -> None:
        self._state.rested(self.upstream, label, model_class, seconds)

    def circuit_opened(self, label: str, seconds: float) -> None:
        self._state.circuit_opened(self.upstream, label, seconds)

    def circuit_closed(self, label: str) -> None:
        self._state.circuit_closed(self.upstream, label)

    def refused(self, label: str, secret: str) -> None:
        self._state.key_refused(self.upstream, label, secret)

    def revived(self, label: str) -> None:
        self._state.key_revived(self.upstream, label)


async def _cancelled(tasks: Iterable[asyncio.Task[None]]) -> None:
    """Cancel `tasks` and wait until each has ended, cancelling again any
    that went on: a cancellation that lands as a client library's own
    timeout expires can be taken for that timeout and swallowed."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.error("shared state: task %s failed", task.get_name(), exc_info=task.exception())


def _client(config: SharedConfig, connections: int | None = None) -> Redis:
    """A redis-py asyncio client whose every step is bounded by `timeout`:
    connect, each read, the wait for a pooled connection; no retries (the
    caller falls back at once rather than wait out a retry's backoff)."""
    address = redis_address(config.redis)
    kwargs: dict[str, Any] = {
        "host": address.host, "port": address.port, "db": address.db,
        "username": address.username, "password": config.password or None,
        "socket_timeout": config.timeout, "socket_connect_timeout": config.timeout,
        "retry": Retry(NoBackoff(), 0),
        "client_name": "hubcore",
    }
    if address.tls:
        kwargs["connection_class"] = SSLConnection
        if config.ca_file:
            kwargs["ssl_ca_certs"] = config.ca_file
    else:
        kwargs["connection_class"] = Connection
    pool = BlockingConnectionPool(
        max_connections=connections or config.max_connections, timeout=config.timeout, **kwargs,
    )
    # from_pool: the client owns the pool, and aclose() closes its connections.
    return Redis.from_pool(pool)
