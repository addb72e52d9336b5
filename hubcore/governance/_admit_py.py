"""The Limiter's request path (hubcore.governance.limiter): a scope's
counters (_Scope), an admitted request's hold on them (Admission), and what
every request runs of the Limiter (LimiterCore: admit, needs_model, the
charge of its cost). The pure-Python twin of `_admit.pyx`;
hubcore.governance.admit picks one.

Limiter subclasses LimiterCore and keeps the rest in Python: the checks of
a principal that some limit applies to (_admit_limited), a charge in
another period or before a spend reset (_credit, _add_bucket), threshold
crossings (_add_watched), the calendar periods (_advance), reloads,
rebuilds and reports. The core calls those as Python methods, only when
the common case does not hold.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from hubcore.governance.limits import Limits
from hubcore.governance.storage import ScopeLimits
from hubcore.governance.tokens import Principal

if TYPE_CHECKING:
    from hubcore.governance.limiter import BudgetView, CrossingListener

__all__ = ["BUCKET_SECONDS", "NEVER", "NO_RESETS", "Admission", "LimiterCore", "Spend", "_Scope"]

BUCKET_SECONDS = 60
NEVER = -math.inf
NO_RESETS: dict[str, float] = {}


class Spend(Protocol):
    """What the Limiter reads of a usage event (accounting's UsageEvent): who
    spent how much, for a request that arrived when."""

    @property
    def token_id(self) -> int | None: ...
    @property
    def user(self) -> str | None: ...
    @property
    def project(self) -> str | None: ...
    @property
    def cost_micros(self) -> int | None: ...
    @property
    def ts(self) -> float: ...


class _Scope:
    """Counters of one token, user or project. Spend is in micro-dollars."""

    __slots__ = (
        "label", "in_flight", "hits", "total", "total_base", "day_start", "day_base", "week_start", "week_base",
        "month_start", "month_base", "periods", "counts_from", "resets", "buckets", "rolling",
    )

    def __init__(self, label: str) -> None:
        self.label = label
        self.in_flight = 0
        self.hits: deque[float] | None = None     # admit times in the last minute, while rpm is set
        self.clear_spend()

    def clear_spend(self) -> None:
        self.total = 0
        # Spend in the period starting at *_start is total - *_base: a charge
        # in the current day then only adds to total. Read against another
        # period a window counts as zero (it resets lazily). The `total`
        # window is total - total_base: nonzero only after a spend reset.
        self.total_base = 0
        self.day_start = self.week_start = self.month_start = -math.inf
        self.day_base = self.week_base = self.month_base = 0
        # The Limiter's current periods object once *_start are all current.
        self.periods: object = None
        # While periods is current: a charge of a request that arrived at
        # counts_from or later counts in every window (the start of the day,
        # or a later spend reset); an earlier one takes the slow path.
        self.counts_from = math.inf
        # window -> the moment its spend counts from (spend resets); None: none.
        self.resets: dict[str, float] | None = None
        self.buckets: deque[list[int]] | None = None   # [minute, micros], oldest first
        self.rolling = 0


class Admission:
    """An admitted request's hold on the in-flight counters; release() once it ends."""

    __slots__ = ("_scopes",)

    # The budgets over the request (BudgetedAdmission); on the class, None,
    # for a principal without any: the common case pays nothing for them.
    budget: BudgetView | None = None

    def __init__(self, scopes: tuple[_Scope, ...]) -> None:
        self._scopes: tuple[_Scope, ...] | None = scopes

    def release(self) -> None:
        """Idempotent: a second call does nothing."""
        scopes, self._scopes = self._scopes, None
        if scopes is not None:
            for scope in scopes:
                scope.in_flight -= 1

    @property
    def released(self) -> bool:
        return self._scopes is None


class LimiterCore:
    """What every request runs of a Limiter (see hubcore.governance.limiter
    for the contract of each method); the fields are Limiter's, set by its
    __init__, update() and _set_periods()."""

    _clock: Callable[[], float]
    _tokens: dict[int, _Scope]
    _users: dict[str, _Scope]
    _projects: dict[str, _Scope]
    _limits: ScopeLimits
    _warn_tokens: dict[int, Limits]
    _warn_users: dict[str, Limits]
    _warn_projects: dict[str, Limits]
    on_crossing: CrossingListener | None
    judges_rates: bool
    _periods: object
    _day: tuple[float, float]
    _week: tuple[float, float]
    _month: tuple[float, float]
    _day_start: float
    _boundary: float

    if TYPE_CHECKING:
        # What Limiter keeps in Python, called when the common case does not
        # hold: declared for type checkers, defined by the subclass.
        def _advance(self, now: float) -> None:
            ...

        def _admit_limited(
            self, principal: Principal, model: str | None, now: float, model_required: bool,
            scopes: tuple[_Scope, ...], token: Limits | None, user: Limits | None, project: Limits | None,
        ) -> Admission:
            ...

        def _add_watched(
            self, scope: _Scope, limits: Limits, kind: str, name: str, cost: int, ts: float, minute: int,
        ) -> None:
            ...

        def _credit(
            self, scope: _Scope, amount: int, in_day: int, in_week: int, in_month: int, in_total: int | None = None,
        ) -> None:
            ...

        def _add_bucket(self, scope: _Scope, minute: int, cost: int) -> None:
            ...

    # -- the request path --------------------------------------------------------

    def admit(
        self, principal: Principal, model: str | None = None, now: float | None = None,
        *, model_required: bool = False,
    ) -> Admission:
        """Admit a request or raise Refused. `model` None (no model in the
        request, e.g. GET /v1/models) passes the model allow-lists unless
        `model_required` (a request body the hub could not read a model from
        must not slip past an allow-list)."""
        if now is None:
            now = self._clock()
        if now >= self._boundary:
            self._advance(now)
        token = self._tokens.get(principal.token_id)
        if token is None:
            token = self._tokens[principal.token_id] = _Scope(f"token {principal.token_id}")
        user = self._users.get(principal.user)
        if user is None:
            user = self._users[principal.user] = _Scope(f"user {principal.user}")
        defined = self._limits
        token_limits = principal.limits
        user_limits = defined.users.get(principal.user)
        project_limits = None
        if principal.project is None:
            scopes: tuple[_Scope, ...] = (token, user)
        else:
            project = self._projects.get(principal.project)
            if project is None:
                project = self._projects[principal.project] = _Scope(f"project {principal.project}")
            scopes = (token, user, project)
            project_limits = defined.projects.get(principal.project)
        # principal.groups: a user's or project's groups restriction reaches
        # the token table before update() brings its limits here.
        if (token_limits is not None or user_limits is not None or project_limits is not None
                or principal.groups is not None):
            return self._admit_limited(principal, model, now, model_required, scopes,
                                       token_limits, user_limits, project_limits)
        for scope in scopes:
            scope.in_flight += 1
        return Admission(scopes)

    def needs_model(self, principal: Principal) -> bool:
        """Whether admitting `principal` depends on the request's model: a
        model allow-list applies to its token, user or project. When none
        does, the hub need not read the model before the request goes out."""
        defined = self._limits
        for limits in (
            principal.limits,
            defined.users.get(principal.user),
            defined.projects.get(principal.project) if principal.project is not None else None,
        ):
            if limits is not None and limits.model_re is not None:
                return True
        return False

    # -- spend ---------------------------------------------------------------

    def on_usage(self, event: Spend) -> None:
        """A UsageRecorder listener: charge each event as it is recorded."""
        self.charge(event.token_id, event.user, event.project, event.cost_micros, event.ts)

    def charge(
        self, token_id: int | None, user: str | None, project: str | None,
        cost_micros: int | None, ts: float,
    ) -> None:
        """Add a request's cost to its token's, user's and project's windows."""
        if not cost_micros or cost_micros < 0:
            return
        if ts >= self._boundary:
            self._advance(ts)
        minute = int(ts // BUCKET_SECONDS)
        add = self._add
        if token_id is not None:
            scope = self._tokens.get(token_id)
            if scope is None:
                scope = self._tokens[token_id] = _Scope(f"token {token_id}")
            if self._warn_tokens and (watched := self._warn_tokens.get(token_id)) is not None:
                self._add_watched(scope, watched, "token", str(token_id), cost_micros, ts, minute)
            else:
                add(scope, cost_micros, ts, minute)
        if user is not None:
            scope = self._users.get(user)
            if scope is None:
                scope = self._users[user] = _Scope(f"user {user}")
            if self._warn_users and (watched := self._warn_users.get(user)) is not None:
                self._add_watched(scope, watched, "user", user, cost_micros, ts, minute)
            else:
                add(scope, cost_micros, ts, minute)
        if project is not None:
            scope = self._projects.get(project)
            if scope is None:
                scope = self._projects[project] = _Scope(f"project {project}")
            if self._warn_projects and (watched := self._warn_projects.get(project)) is not None:
                self._add_watched(scope, watched, "project", project, cost_micros, ts, minute)
            else:
                add(scope, cost_micros, ts, minute)

    def _add(self, scope: _Scope, cost: int, ts: float, minute: int) -> None:
        # The day starts no earlier than its week and month: a charge in the
        # current day of a scope already in the current periods (and after
        # its spend resets) is in every window, and total - *_base moves with
        # total alone.
        if scope.periods is self._periods and ts >= scope.counts_from:
            scope.total += cost
        else:
            # A cost from before a period's start (a request that arrived
            # yesterday and ended today) belongs to a period already over;
            # one from before a spend reset, to the spend it forgave.
            resets = scope.resets or NO_RESETS
            self._credit(
                scope, cost,
                cost if ts >= self._day_start and ts >= resets.get("day", NEVER) else 0,
                cost if ts >= self._week[0] and ts >= resets.get("week", NEVER) else 0,
                cost if ts >= self._month[0] and ts >= resets.get("month", NEVER) else 0,
                cost if ts >= resets.get("total", NEVER) else 0,
            )
            if ts < resets.get("5h", NEVER):
                return
        buckets = scope.buckets
        if buckets and buckets[-1][0] == minute:
            buckets[-1][1] += cost
            scope.rolling += cost
        else:
            self._add_bucket(scope, minute, cost)
