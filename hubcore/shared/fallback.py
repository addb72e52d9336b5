"""Local enforcement while Redis cannot be reached: each counted limit
divided by the last known number of live instances, from this instance's
own counters (hubcore.shared.redis_state decides when)."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

from hubcore.governance.limiter import CONCURRENCY_RETRY_AFTER, Admission, Limiter, Refused
from hubcore.governance.limits import Limits
from hubcore.governance.storage import ScopeLimits
from hubcore.governance.tokens import Principal
from hubcore.shared.keyspace import divided, share


class LocalShare:
    """This instance's share of every limit, and its own counts.

    rpm and budgets are an in-memory Limiter's, over limits divided by the
    instance count; that Limiter is charged with every usage event of this
    instance, shared or not, so that its spend is current when Redis goes.
    Concurrency is counted here for every request this instance holds,
    admitted through Redis or not: when Redis goes, the requests still
    running count against the share at once.
    """

    def __init__(self, tz: str = "UTC", clock: Callable[[], float] = time.time) -> None:
        self.limiter = Limiter(tz, clock)
        self._limits = ScopeLimits()
        self._instances = 0  # what the limiter's limits are divided by; 0: not yet
        self._tokens: dict[Limits, Limits] = {}
        # Scope id -> requests this instance holds (shared or local).
        self.in_flight: dict[str, int] = {}

    def update(self, limits: ScopeLimits) -> None:
        """New limit definitions, divided at once: the Limiter's spend report
        (what this instance knows of spend) covers the budgets they define."""
        self._limits = limits
        self._divide(self._instances or 1)

    def hold(self, scopes: Sequence[str]) -> None:
        in_flight = self.in_flight
        for scope in scopes:
            in_flight[scope] = in_flight.get(scope, 0) + 1

    def drop(self, scopes: Sequence[str]) -> None:
        in_flight = self.in_flight
        for scope in scopes:
            left = in_flight[scope] - 1
            if left:
                in_flight[scope] = left
            else:
                del in_flight[scope]

    def admit(
        self, principal: Principal, slots: Sequence[tuple[str, str, int]], instances: int, now: float,
    ) -> Admission:
        """Admit on this instance's share or raise Refused. `slots`: (scope
        id, label, concurrency) of each scope with a concurrency limit. The
        caller holds the slots (hold) once admitted; release the Admission
        and drop them when the request ends."""
        if instances != self._instances:
            self._divide(instances)
        # Concurrency before the Limiter takes a place in the rpm window: a
        # refused request takes nothing.
        for scope, label, concurrency in slots:
            allowed = share(concurrency, instances)
            if self.in_flight.get(scope, 0) >= allowed:
                raise Refused(
                    429, "concurrency_limit_exceeded",
                    f"concurrency limit of {label} reached: {allowed} requests in flight on this instance "
                    f"(its share of {concurrency} while the hub's shared state is unreachable); "
                    "retry when one of them ends",
                    limit="concurrency", scope=label, retry_after=CONCURRENCY_RETRY_AFTER,
                )
        limits = principal.limits
        if limits is not None:
            token = self._tokens.get(limits)
            if token is None:
                token = self._tokens[limits] = divided(limits, instances)
            limits = token
        # Groups, models and expiry are the hub's own Limiter's, which has
        # judged this request already.
        local = dataclasses.replace(principal, limits=limits, groups=None, group_rules=())
        return self.limiter.admit(local, None, now)

    def _divide(self, instances: int) -> None:
        known = self._limits
        self.limiter.update(ScopeLimits(
            tokens={token: divided(limits, instances) for token, limits in known.tokens.items()},
            users={name: divided(limits, instances) for name, limits in known.users.items()},
            projects={name: divided(limits, instances) for name, limits in known.projects.items()},
            owners=known.owners,
        ))
        self._tokens.clear()
        self._instances = instances
