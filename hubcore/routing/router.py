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
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Protocol

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


@dataclass(slots=True)
class _Turn:
    current: int = 0  # smooth weighted round-robin accumulator


@dataclass(slots=True)
class Router:
    """The upstreams of one kind, in configuration order."""

    upstreams: Sequence[Candidate]
    affinity_ttl: float = 3600.0
    affinity_max_sessions: int = 100_000
    clock: Callable[[], float] = time.monotonic
    _turns: dict[str, _Turn] = field(default_factory=dict)
    _sessions: OrderedDict[str, tuple[str, float]] = field(default_factory=OrderedDict)
    _serves: dict[tuple[str, str], bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._turns = {u.name: _Turn() for u in self.upstreams}

    @property
    def single(self) -> Candidate | None:
        """The one upstream when there is nothing to choose (no model or
        group restriction to check): the common case costs a lookup."""
        if len(self.upstreams) == 1:
            only = self.upstreams[0]
            if not only.models and only.group == "default":
                return only
        return None

    def reconfigured(self) -> None:
        """The upstreams' settings changed (a reload): forget what was
        worked out from the old ones. Sessions stay where they are."""
        self._serves.clear()
        self._turns = {u.name: _Turn() for u in self.upstreams}

    def candidates(self, model: str | None, groups: AbstractSet[str] | None) -> list[Candidate]:
        """The upstreams that may serve `model` for a principal of `groups`
        (None: unrestricted), in configuration order."""
        return [u for u in self.upstreams if self._exclusion(u, model, groups) is None]

    def choose(
        self,
        model: str | None,
        groups: AbstractSet[str] | None = None,
        session_id: str | None = None,
        tried: AbstractSet[str] = frozenset(),
    ) -> Candidate | None:
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

    def _pick(self, tier: list[Candidate]) -> Candidate:
        # The key ring's rule (KeyRing._pick): least in flight per weight,
        # compared by cross-multiplying, ties by smooth weighted round-robin.
        tied = [tier[0]]
        for u in tier[1:]:
            lhs = u.in_flight * tied[0].weight
            rhs = tied[0].in_flight * u.weight
            if lhs < rhs:
                tied = [u]
            elif lhs == rhs:
                tied.append(u)
        if len(tied) == 1:
            return tied[0]
        total = 0
        chosen = tied[0]
        for u in tied:
            turn = self._turns.setdefault(u.name, _Turn())
            turn.current += u.weight
            total += u.weight
            if turn.current > self._turns[chosen.name].current:
                chosen = u
        self._turns[chosen.name].current -= total
        return chosen

    # -- sessions -----------------------------------------------------------------

    def _session_upstream(self, session_id: str, usable: Iterable[Candidate]) -> Candidate | None:
        now = self.clock()
        sessions = self._sessions
        while sessions:
            oldest = next(iter(sessions.values()))
            if oldest[1] > now:
                break
            sessions.popitem(last=False)
        entry = sessions.get(session_id)
        if entry is None:
            return None
        for u in usable:
            if u.name == entry[0]:
                return u
        return None

    def _remember(self, session_id: str, upstream: Candidate) -> None:
        if self.affinity_max_sessions == 0:
            return
        self._sessions[session_id] = (upstream.name, self.clock() + self.affinity_ttl)
        self._sessions.move_to_end(session_id)
        while len(self._sessions) > self.affinity_max_sessions:
            self._sessions.popitem(last=False)

    def session_count(self) -> int:
        return len(self._sessions)
