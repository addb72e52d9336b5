"""Which upstream a request goes to, when several of its kind are configured:
the candidates that serve its model and its principal's groups, the best
priority tier that has a usable key, a weighted choice within it, and the
session's upstream while it stays usable. Sans-IO: the upstreams are seen
through `Candidate`; their key rings say whether they can serve.

Theory of operation.
- Candidates: the upstreams of the route's kind whose `models` globs match
  the request's model (all of them when it names none that any glob
  restricts) and whose `group` the principal may use (every group when it is
  unrestricted).
- Tiers: the lowest `priority` with a usable key wins; a tier whose keys are
  all cooling, open, dead or disabled is passed over, and so is every
  upstream this request already failed on (`tried`), which is how a failed
  attempt moves to the next candidate.
- Within a tier: the fewest requests in flight per unit of weight, ties by
  smooth weighted round-robin (the key ring's rule), so sequential traffic
  splits exactly by weight and concurrent traffic by load.
- Sessions: a session stays on its upstream while that one is a usable
  candidate, even when it is in a worse tier than the best usable one (its
  prompt cache lives there), unless the better tier's upstream says
  `failback = "immediate"`. A session with no upstream yet, or whose upstream
  is no longer usable, takes the tier choice and keeps it.
"""
from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from hubcore.routing.affinity import Affinity
from hubcore.routing.balance import least_loaded

__all__ = ["Candidate", "Considered", "Router"]

FAILBACK_IMMEDIATE = "immediate"
# Model ids come from request bodies: the memo of glob matches is bounded.
MATCH_MEMO_MAX = 4096


class Candidate(Protocol):
    """What the router needs of an upstream."""

    @property
    def name(self) -> str: ...
    @property
    def priority(self) -> int: ...
    @property
    def weight(self) -> int: ...
    @property
    def group(self) -> str: ...
    @property
    def models(self) -> tuple[str, ...]: ...
    @property
    def failback(self) -> str: ...
    @property
    def in_flight(self) -> int: ...

    def usable(self) -> bool:
        """Whether one of its keys could take a request now."""
        ...


@dataclass(slots=True)
class Considered:
    """One upstream's part in a decision, for `hubcore route explain`."""

    name: str
    priority: int
    weight: int
    excluded: str | None  # why it cannot take the request, or None
    probability: float = 0.0  # of being chosen for a request without a session


C = TypeVar("C", bound=Candidate)


@dataclass(slots=True)
class _Turn(Generic[C]):
    """An upstream as routing.balance weighs it."""

    upstream: C
    current: float = 0.0  # smooth weighted round-robin accumulator

    @property
    def in_flight(self) -> int:
        return self.upstream.in_flight


@dataclass(slots=True)
class Router(Generic[C]):
    """The upstreams of one kind, in configuration order."""

    upstreams: Sequence[C]
    affinity_ttl: float = 3600.0
    affinity_max_sessions: int = 100_000
    clock: Callable[[], float] = time.monotonic
    _turns: dict[str, _Turn[C]] = field(default_factory=dict)
    _sessions: Affinity[str] = field(init=False)
    _serves: dict[tuple[str, str], bool] = field(default_factory=dict)
    single: C | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._turns = {u.name: _Turn(u) for u in self.upstreams}
        # Session id -> the name of its upstream.
        self._sessions = Affinity(self.affinity_ttl, self.affinity_max_sessions)
        # The one upstream when there is nothing to choose (no model or group
        # restriction to check): the common case costs an attribute read.
        self.single = self._single()

    def _single(self) -> C | None:
        if len(self.upstreams) == 1:
            only = self.upstreams[0]
            if not only.models and only.group == "default":
                return only
        return None

    def reconfigured(self) -> None:
        """The upstreams' settings changed (a reload): forget what was
        worked out from the old ones. Sessions stay where they are."""
        self._serves.clear()
        self._turns = {u.name: _Turn(u) for u in self.upstreams}
        self.single = self._single()

    def candidates(self, model: str | None, groups: AbstractSet[str] | None) -> list[C]:
        """The upstreams that may serve `model` for a principal of `groups`
        (None: unrestricted), in configuration order."""
        return [u for u in self.upstreams if self._exclusion(u, model, groups) is None]

    def choose(
        self,
        model: str | None,
        groups: AbstractSet[str] | None = None,
        session_id: str | None = None,
        tried: AbstractSet[str] = frozenset(),
    ) -> C | None:
        """The upstream for the next attempt, or None when every candidate
        is spent (tried, or without a usable key)."""
        usable = [u for u in self.candidates(model, groups) if u.name not in tried and u.usable()]
        if not usable:
            return None
        tier = min(u.priority for u in usable)
        best = [u for u in usable if u.priority == tier]
        if session_id is not None:
            stay = self._session_upstream(session_id, usable)
            if stay is not None and (stay.priority == tier or not any(u.failback == FAILBACK_IMMEDIATE for u in best)):
                self._remember(session_id, stay)
                return stay
        chosen = self._pick(best)
        if session_id is not None:
            self._remember(session_id, chosen)
        return chosen

    def explain(self, model: str | None, groups: AbstractSet[str] | None = None) -> list[Considered]:
        """Every upstream of the kind, in the order they are considered,
        with why it is left out or its chance of being chosen."""
        rows = []
        usable: list[Candidate] = []
        for u in sorted(self.upstreams, key=lambda u: u.priority):
            excluded = self._exclusion(u, model, groups)
            if excluded is None and not u.usable():
                excluded = "no usable key (every key cooling, open, dead or disabled)"
            if excluded is None:
                usable.append(u)
            rows.append(Considered(u.name, u.priority, u.weight, excluded))
        if usable:
            tier = min(u.priority for u in usable)
            total = sum(u.weight for u in usable if u.priority == tier)
            for row in rows:
                if row.excluded is None:
                    if row.priority == tier:
                        row.probability = row.weight / total
                    else:
                        row.excluded = f"priority {row.priority}: tier {tier} has a usable upstream"
        return rows

    # -- what a candidate is ----------------------------------------------------

    def _exclusion(self, upstream: Candidate, model: str | None, groups: AbstractSet[str] | None) -> str | None:
        if groups is not None and upstream.group not in groups:
            return f"group {upstream.group!r} is not one of the principal's ({', '.join(sorted(groups))})"
        if upstream.models and model is not None and not self._matches(upstream, model):
            return f"does not serve {model!r} (models: {', '.join(upstream.models)})"
        return None

    def _matches(self, upstream: Candidate, model: str) -> bool:
        memo_key = (upstream.name, model)
        found = self._serves.get(memo_key)
        if found is None:
            found = any(fnmatch.fnmatchcase(model, pattern) for pattern in upstream.models)
            if len(self._serves) >= MATCH_MEMO_MAX:
                self._serves.clear()
            self._serves[memo_key] = found
        return found

    def _pick(self, tier: list[C]) -> C:
        # The key ring's rule (routing.balance), by weight.
        if len(tier) == 1:
            return tier[0]
        turns = [self._turns[u.name] for u in tier]
        return least_loaded(turns, [u.weight for u in tier]).upstream

    # -- sessions -----------------------------------------------------------------

    def _session_upstream(self, session_id: str, usable: Iterable[C]) -> C | None:
        name = self._sessions.get(session_id, self.clock())
        if name is None:
            return None
        for u in usable:
            if u.name == name:
                return u
        return None

    def _remember(self, session_id: str, upstream: Candidate) -> None:
        self._sessions.remember(session_id, upstream.name, self.clock())

    def session_count(self) -> int:
        return len(self._sessions)
