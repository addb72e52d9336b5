"""The in-memory Limiter: admits or refuses each request in O(1) from the
counters of its token, user and project, and charges each request's cost to
them as its usage event is recorded.

Overshoot. A budget is checked when a request is admitted and charged when its
usage event is recorded; a request in flight is never cut off. So a scope can
overshoot a budget by at most (requests in flight when it ran out) x (the most
one request costs): set `concurrency` to bound it.

Thresholds. A soft budget is never checked at admission; a budget with
thresholds (limits.Limits.thresholds) is watched in `charge()`, which raises a
BudgetCrossing through `on_crossing` when one charge takes the spend of a
window from below a threshold to at or above it.

Spend resets. An operator may start a scope's window afresh at a moment R
(storage's spend_resets): from then on only requests that arrived at R or
later count there, live and in every rebuild. The live counters learn of R
when the hub reloads limits, a few milliseconds after it was stored; a
request that arrived after R and ended in between is forgiven by the
running hub but counted by the next rebuild, which never forgives more
than what arrived before R.
"""
from __future__ import annotations

import math
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from hubcore.config import zone
from hubcore.database import floor_of
from hubcore.errors import HubError
from hubcore.governance.limits import SCOPE_KINDS, WINDOWS, Limits, calendar_periods, format_time, format_usd
from hubcore.governance.storage import ScopeLimits, load_scope_limits
from hubcore.governance.tokens import Principal

# A scope's counters, an admission, and what every request runs of the
# Limiter: compiled when built (hubcore.governance.admit).
from hubcore.governance.admit import BUCKET_SECONDS, Admission, LimiterCore, _Scope
from hubcore.governance.admit import NEVER as _NEVER

# Requests per minute are counted over a sliding 60-second window.
RPM_WINDOW = 60.0
ROLLING_BUCKETS = 5 * 3600 // BUCKET_SECONDS
# Nothing says when an in-flight request will end; one second keeps clients
# retrying briskly without hammering (the header's smallest unit).
CONCURRENCY_RETRY_AFTER = 1.0

# Token ids per `IN (...)` of a rebuild's query (SQLite allows 32766 parameters).
_IDS_PER_QUERY = 500

_WINDOW_NAMES = {
    "5h": "5-hour rolling",
    "day": "daily",
    "week": "weekly",
    "month": "monthly",
    "total": "total",
}


def _format_wait(seconds: float) -> str:
    seconds = max(0, math.ceil(seconds))
    if seconds < 120:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 120:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    return f"{hours // 24} d {hours % 24} h"


# -- refusals -------------------------------------------------------------------

class Refused(HubError):
    """A request a limit refuses: 429 for rate and concurrency, 403 otherwise.

    `limit` names the rule ("rpm", "concurrency", "budget_day", "models",
    "expires_at", "unreadable", "groups"), `scope` whose rule it is ("token 12",
    "user alice"), `resets_at` when it lifts (unix seconds; None: not by
    itself). `code` is the OpenAI-style finer reason. `budget`: the budgets
    of the refused principal, when any applies (see BudgetView).
    """

    budget: BudgetView | None = None

    def __init__(
        self, status: int, code: str, message: str, *, limit: str, scope: str,
        resets_at: float | None = None, retry_after: float | None = None,
    ) -> None:
        error_type = "rate_limit_error" if status == 429 else "permission_error"
        super().__init__(status, message, error_type=error_type, code=code, retry_after=retry_after)
        self.limit = limit
        self.scope = scope
        self.resets_at = resets_at


def groups_refusal(principal: Principal) -> Refused:
    """The 403 for a principal whose token, user and project restrict it to
    upstream groups with none in common (`principal.groups` empty), naming
    each restriction."""
    label = f"token {principal.token_id}"
    said = "; ".join(
        f"{scope} allows {','.join(groups)}" if groups else f"{scope} has limits that cannot be read"
        for scope, groups in principal.group_rules
    )
    return Refused(
        403, "no_upstream_group",
        f"{label} may use no upstream group: {said}; no group is allowed by all of them" if said
        else f"{label} may use no upstream group",
        limit="groups", scope=label,
    )


def rpm_refusal(label: str, rpm: int, frees_at: float, now: float, tz: ZoneInfo) -> Refused:
    """The 429 of a full rpm window that frees a place at `frees_at`, worded
    alike whether this instance or the hub's shared state counted it."""
    # Whole seconds, rounded up: a client that waits exactly retry-after
    # must find the place free.
    wait = float(max(1, math.ceil(frees_at - now)))
    return Refused(
        429, "rate_limit_exceeded",
        f"rate limit of {label} reached: {rpm} requests per minute; "
        f"retry in {_format_wait(wait)} (at {format_time(frees_at, tz)})",
        limit="rpm", scope=label, resets_at=frees_at, retry_after=wait,
    )


def concurrency_refusal(label: str, concurrency: int) -> Refused:
    return Refused(
        429, "concurrency_limit_exceeded",
        f"concurrency limit of {label} reached: {concurrency} requests in flight; "
        f"retry when one of them ends",
        limit="concurrency", scope=label, retry_after=CONCURRENCY_RETRY_AFTER,
    )


def budget_refusal(
    window: str, label: str, spent: int, limit: int, resets_at: float | None, now: float, tz: ZoneInfo,
) -> Refused:
    """The 403 of a spent budget; `resets_at` None: it never resets by itself."""
    if resets_at is None:
        when = "it does not reset by itself; an administrator can raise it"
    else:
        when = f"it resets at {format_time(resets_at, tz)} (in {_format_wait(resets_at - now)})"
    return Refused(
        403, "budget_exceeded",
        f"{_WINDOW_NAMES[window]} budget of {label} is spent: {format_usd(spent)} of {format_usd(limit)}; {when}",
        limit="budget_" + window, scope=label, resets_at=resets_at,
    )


# -- threshold crossings -----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BudgetCrossing:
    """A charge took a scope's spend in a window past a threshold of its
    budget: `threshold` percent of `limit_micros`."""

    kind: str                 # token, user or project
    name: str
    window: str
    threshold: int            # percent
    spent_micros: int
    limit_micros: int
    soft: bool
    resets_at: float | None   # None: `total`, or nothing to age out
    ts: float                 # the charge's request time

    @property
    def scope(self) -> str:
        return f"{self.kind} {self.name}"


CrossingListener = Callable[[BudgetCrossing], None]


def crossed(before: int, after: int, limit: int, percents: tuple[int, ...]) -> int | None:
    """The highest of `percents` (ascending) of `limit` that spend going from
    `before` to `after` reached (before < its amount <= after), or None. One
    charge that passes several reports the highest: the others say less."""
    found = None
    for percent in percents:
        # The amount, rounded up: 80% of 1 micro-dollar is reached at 1.
        amount = -(-limit * percent // 100)
        if amount > after:
            break
        if before < amount:
            found = percent
    return found


# -- counters ---------------------------------------------------------------------

class BudgetedAdmission(Admission):
    """The Admission of a request that some budget of its token, user or project applies to."""

    __slots__ = ("budget",)

    def __init__(self, scopes: tuple[_Scope, ...], budget: BudgetView) -> None:
        super().__init__(scopes)
        self.budget = budget


@dataclass(frozen=True, slots=True)
class BudgetLine:
    """One budget and its spend, for `hubcore usage --budgets` and ops."""

    kind: str
    name: str
    window: str
    limit_micros: int
    spent_micros: int
    resets_at: float | None   # None: `total`, or a zero budget
    soft: bool = False        # never refuses
    warn_at: tuple[int, ...] = ()  # thresholds in percent, soft defaults applied

    @property
    def remaining_micros(self) -> int:
        return max(0, self.limit_micros - self.spent_micros)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind, "name": self.name, "window": self.window,
            "limit_micros": self.limit_micros, "spent_micros": self.spent_micros,
            "remaining_micros": self.remaining_micros, "resets_at": self.resets_at,
        }
        # Only when set: a hard budget without thresholds reads as before.
        if self.soft:
            out["soft"] = True
        if self.warn_at:
            out["warn_at"] = list(self.warn_at)
        return out


class BudgetView:
    """The budgets over one request's token, user and project, read when the
    hub writes its answer's head (the gateway's x-hubcore-budget-* headers).
    Made at admission, and only for a principal that some budget applies to."""

    __slots__ = ("_limiter", "_budgeted")

    def __init__(self, limiter: Limiter, budgeted: tuple[tuple[str, str, Limits, _Scope], ...]) -> None:
        self._limiter = limiter
        self._budgeted = budgeted  # (kind, name, limits, counters), each with a budget

    def lines(self, now: float | None = None) -> list[BudgetLine]:
        """Spend against each budget, as `hubcore usage --budgets` has it."""
        limiter = self._limiter
        if now is None:
            now = limiter._clock()
        limiter._advance(now)
        lines: list[BudgetLine] = []
        for kind, name, limits, state in self._budgeted:
            lines += limiter._budget_lines(kind, name, state, limits, now)
        return lines

    def tightest(self, now: float | None = None) -> BudgetLine:
        """The budget with the least left in USD; of several with as little
        left, the one that binds longest (see binding_order). The same as
        min(self.lines(now), key=binding_order), made without a line for
        every budget: this runs on every answer to a budgeted principal."""
        limiter = self._limiter
        if now is None:
            now = limiter._clock()
        limiter._advance(now)
        oldest_kept = int(now // BUCKET_SECONDS) - ROLLING_BUCKETS + 1
        best: tuple[str, str, str, int, int, float | None] | None = None
        best_key = (math.inf, 0.0)
        for kind, name, limits, state in self._budgeted:
            buckets = state.buckets
            if buckets and buckets[0][0] < oldest_kept:
                limiter._expire(state, oldest_kept)
            for window, limit in limits.budgets:
                spent = limiter._spent(state, window)
                remaining = limit - spent if spent < limit else 0
                if remaining > best_key[0]:
                    continue
                resets_at = limiter._reset_of(state, window, limit, spent)
                key = _binding_key(remaining, window, limit, resets_at)
                if best is None or key < best_key:
                    best, best_key = (kind, name, window, limit, spent, resets_at), key
        assert best is not None, "a BudgetView holds at least one budget"
        return BudgetLine(*best)


def binding_order(line: BudgetLine) -> tuple[float, float]:
    """Sorts budgets tightest first: least left in USD; of as little left,
    the one that binds longest."""
    return _binding_key(line.remaining_micros, line.window, line.limit_micros, line.resets_at)


def _binding_key(remaining: int, window: str, limit: int, resets_at: float | None) -> tuple[float, float]:
    if resets_at is None:
        # A total or zero budget never lifts; a 5-hour one with nothing in
        # its window has nothing to lift.
        resets_at = math.inf if window == "total" or limit == 0 else 0.0
    return remaining, -resets_at


class Limiter(LimiterCore):
    """In-memory counters for every scope and the checks against them.

    Theory of operation. Each token, user and project has a `_Scope` of
    counters, created on first use and kept across `update()`, which only
    swaps the limit definitions. `admit()` runs every check before it changes
    anything (a refused request consumes no rate), in a fixed order: expiry,
    upstream groups, model, budget, rpm, concurrency, each over the token,
    user and project.
    Costs come from `charge()`; every scope keeps its total, its current
    day/week/month (reset lazily when a period boundary passes; the current
    periods are computed once per boundary, not per request) and per-minute
    buckets of the last 5 hours with their running sum. rpm keeps the admit
    times of the last minute in a deque bounded by the limit, which makes
    "the (N+1)th request within 60 s" exact. Everything runs on the event
    loop thread; nothing here locks.

    What every request runs (admit up to its checks, needs_model, charge,
    an Admission's release) is the core's, compiled when built
    (hubcore.governance.admit); the core calls _admit_limited, _advance,
    _credit, _add_bucket and _add_watched when the common case does not
    hold.
    """

    def __init__(self, tz: str = "UTC", clock: Callable[[], float] = time.time) -> None:
        self.tz = zone(tz)
        self._clock = clock
        self._tokens: dict[int, _Scope] = {}
        self._users: dict[str, _Scope] = {}
        self._projects: dict[str, _Scope] = {}
        self._limits = ScopeLimits()
        # The scopes whose budgets have thresholds, by kind: charge() looks
        # only at these (empty dicts: one truth test per charge).
        self._warn_tokens: dict[int, Limits] = {}
        self._warn_users: dict[str, Limits] = {}
        self._warn_projects: dict[str, Limits] = {}
        # Told of every threshold crossed (the alerts); called on the loop, in charge().
        self.on_crossing: CrossingListener | None = None
        # False when the hub's instances share their counts ([shared] redis):
        # then rpm, concurrency and budgets are judged on what all of them
        # count (shared.redis_state), and a request this one admitted but the
        # shared state refused must not fill this instance's rpm window.
        # Expiry, groups and models are judged here either way, and spend and
        # requests in flight are still counted for /me and the dashboard.
        self.judges_rates = True
        self._set_periods(clock())

    # -- configuration -------------------------------------------------------

    def update(self, limits: ScopeLimits) -> None:
        """Apply newly loaded limit definitions; counters are kept, except
        that a spend reset not applied yet starts its window afresh."""
        self._limits = limits
        self._warn_tokens = {k: v for k, v in limits.tokens.items() if v.thresholds}
        self._warn_users = {k: v for k, v in limits.users.items() if v.thresholds}
        self._warn_projects = {k: v for k, v in limits.projects.items() if v.thresholds}
        for (kind, name), windows in limits.resets.items():
            for window, at in windows.items():
                self.reset_spend(kind, name, window, at)

    def reset_spend(self, kind: str, name: str | int, window: str, at: float, now: float | None = None) -> None:
        """Count `kind name`'s spend in `window` from `at` on (a stored spend
        reset, see the module's docstring). Idempotent: a reset at or before
        the one the scope holds for the window changes nothing."""
        if window not in WINDOWS:
            raise ValueError(f"unknown budget window {window!r}; choose one of {', '.join(WINDOWS)}")
        self._advance(self._clock() if now is None else now)
        scope = self._scope(kind, name)
        if scope is None:
            # Created now: a late charge from before `at` must find the reset.
            scope = self._scopes_for(*_scope_key(kind, name))[0]
        resets = scope.resets
        if resets is None:
            resets = scope.resets = {}
        if resets.get(window, _NEVER) >= at:
            return
        resets[window] = at
        if scope.periods is not self._periods:
            self._credit(scope, 0, 0, 0, 0)   # into the current periods, spending nothing
        if window == "5h":
            # Whole minutes after `at` arrived after it; its own minute is
            # forgiven with the ones before (see the module's docstring).
            buckets, minute = scope.buckets, int(at // BUCKET_SECONDS)
            while buckets and buckets[0][0] <= minute:
                scope.rolling -= buckets.popleft()[1]
        elif window == "total":
            scope.total_base = scope.total
        elif at >= self._starts()[window]:
            # A reset before the window's current period changes nothing in it.
            setattr(scope, f"{window}_base", scope.total)
        scope.counts_from = max(self._day_start, *resets.values())

    def reload(self, conn: sqlite3.Connection) -> None:
        self.update(load_scope_limits(conn))

    # -- the request path --------------------------------------------------------

    def _admit_limited(
        self, principal: Principal, model: str | None, now: float, model_required: bool,
        scopes: tuple[_Scope, ...], token_limits: Limits | None, user_limits: Limits | None,
        project_limits: Limits | None,
    ) -> Admission:
        """admit() past its common case: a limit applies to the token, user
        or project (`*_limits`, `scopes` their counters in that order), or a
        groups restriction to the principal. Every check, then the hold,
        with the budgets over the request."""
        checks = []
        if token_limits is not None:
            checks.append((token_limits, scopes[0]))
        if user_limits is not None:
            checks.append((user_limits, scopes[1]))
        if project_limits is not None:
            checks.append((project_limits, scopes[2]))
        try:
            self._check(checks, model, now, model_required, principal)
        except Refused as refused:
            refused.budget = self._budget_view(principal, scopes, token_limits, user_limits, project_limits)
            raise
        budget = self._budget_view(principal, scopes, token_limits, user_limits, project_limits)
        for scope in scopes:
            scope.in_flight += 1
        if budget is not None:
            return BudgetedAdmission(scopes, budget)
        return Admission(scopes)

    def _budget_view(
        self, principal: Principal, scopes: tuple[_Scope, ...],
        token: Limits | None, user: Limits | None, project: Limits | None,
    ) -> BudgetView | None:
        """The budgets among the limits of a request's token, user and
        project (`scopes` their counters, in that order); None when none has any."""
        budgeted = []
        if token is not None and token.budgets:
            budgeted.append(("token", str(principal.token_id), token, scopes[0]))
        if user is not None and user.budgets:
            budgeted.append(("user", principal.user, user, scopes[1]))
        if project is not None and project.budgets:
            budgeted.append(("project", str(principal.project), project, scopes[2]))
        return BudgetView(self, tuple(budgeted)) if budgeted else None

    def _check(
        self, checks: list[tuple[Limits, _Scope]], model: str | None, now: float, model_required: bool,
        principal: Principal,
    ) -> None:
        for limits, scope in checks:
            if limits.error is not None:
                raise Refused(
                    403, "limits_unreadable",
                    f"the limits of {scope.label} cannot be read ({limits.error}); an administrator must set them again",
                    limit="unreadable", scope=scope.label,
                )
            if limits.expires_at is not None and now >= limits.expires_at:
                raise Refused(
                    403, "token_expired" if scope.label.startswith("token") else "expired",
                    f"{scope.label} expired at {format_time(limits.expires_at, self.tz)}",
                    limit="expires_at", scope=scope.label,
                )
        groups = principal.groups
        if groups is not None and not groups:
            raise groups_refusal(principal)
        if model is not None:
            for limits, scope in checks:
                if limits.model_re is not None and limits.model_re.match(model) is None:
                    raise Refused(
                        403, "model_not_allowed",
                        f"model {model!r} is not allowed for {scope.label} (allowed: {', '.join(limits.models)})",
                        limit="models", scope=scope.label,
                    )
        elif model_required:
            for limits, scope in checks:
                if limits.model_re is not None:
                    raise Refused(
                        403, "model_not_allowed",
                        f"{scope.label} may only use some models (allowed: {', '.join(limits.models)}), "
                        "and this request names none the hub could read",
                        limit="models", scope=scope.label,
                    )
        if not self.judges_rates:
            return
        oldest_kept = int(now // BUCKET_SECONDS) - ROLLING_BUCKETS + 1
        day, week, month = self._day[0], self._week[0], self._month[0]
        for limits, scope in checks:
            if limits.hard_budgets:
                # Inlined: this runs on every request of a budgeted scope.
                # Soft budgets have no cap: they never refuse.
                buckets = scope.buckets
                if buckets and buckets[0][0] < oldest_kept:
                    self._expire(scope, oldest_kept)
                if (
                    ((b := limits.cap_5h) is not None and scope.rolling >= b)
                    or ((b := limits.cap_day) is not None
                        and (scope.total - scope.day_base if scope.day_start == day else 0) >= b)
                    or ((b := limits.cap_week) is not None
                        and (scope.total - scope.week_base if scope.week_start == week else 0) >= b)
                    or ((b := limits.cap_month) is not None
                        and (scope.total - scope.month_base if scope.month_start == month else 0) >= b)
                    or ((b := limits.cap_total) is not None and scope.total - scope.total_base >= b)
                ):
                    self._refuse_budget(limits, scope, now)
        for limits, scope in checks:
            rpm = limits.rpm
            if rpm is not None:
                hits = scope.hits
                if hits is None:
                    hits = scope.hits = deque()
                horizon = now - RPM_WINDOW
                while hits and hits[0] <= horizon:
                    hits.popleft()
                if len(hits) >= rpm:
                    # After a lowered limit more than rpm hits may be held:
                    # the oldest len - rpm + 1 of them must age out first.
                    raise rpm_refusal(scope.label, rpm, hits[len(hits) - rpm] + RPM_WINDOW, now, self.tz)
        for limits, scope in checks:
            concurrency = limits.concurrency
            if concurrency is not None and scope.in_flight >= concurrency:
                raise concurrency_refusal(scope.label, concurrency)
        # Every check passed: only now does this request count against rpm.
        for limits, scope in checks:
            if limits.rpm is not None and scope.hits is not None:
                scope.hits.append(now)

    def _refuse_budget(self, limits: Limits, scope: _Scope, now: float) -> None:
        for window, limit in limits.hard_budgets:
            spent = self._spent(scope, window)
            if spent >= limit:
                resets_at = self._resets_at(scope, window, limit)
                raise budget_refusal(window, scope.label, spent, limit, resets_at, now, self.tz)

    # -- spend ---------------------------------------------------------------

    def charge_elsewhere(
        self, token_id: int | None, user: str | None, project: str | None, cost_micros: int, ts: float,
    ) -> None:
        """A charge another hub instance applied (shared.redis_state): counted
        here like one's own, except that a threshold it crosses is that
        instance's to announce, not this one's."""
        on_crossing, self.on_crossing = self.on_crossing, None
        try:
            self.charge(token_id, user, project, cost_micros, ts)
        finally:
            self.on_crossing = on_crossing

    def raise_spend(self, kind: str, name: str, window: str, micros: int, now: float | None = None) -> int:
        """Raise the spend of scope (kind, name) in `window` to `micros` when
        it is below: what another instance's count says (shared.redis_state,
        after this one missed charges). Only that window moves, and no
        threshold is announced (the charges were another instance's). A 5h
        spend is raised in the current minute: it then ages out later than
        it would have, never sooner. The micro-dollars added."""
        if window not in WINDOWS:
            raise ValueError(f"unknown budget window {window!r}; choose one of {', '.join(WINDOWS)}")
        if now is None:
            now = self._clock()
        self._advance(now)
        scope = self._scope(kind, name)
        if scope is None:
            scope = _Scope(f"{kind} {name}")
            if kind == "token":
                self._tokens[int(name)] = scope
            elif kind == "user":
                self._users[name] = scope
            else:
                self._projects[name] = scope
        # Each window's period made the current one (a charge of nothing),
        # and the 5h buckets that aged out dropped.
        self._credit(scope, 0, 0, 0, 0)
        minute = int(now // BUCKET_SECONDS)
        self._expire(scope, minute - ROLLING_BUCKETS + 1)
        missing = micros - self._spent(scope, window)
        if missing <= 0:
            return 0
        if window == "day":
            scope.day_base -= missing
        elif window == "week":
            scope.week_base -= missing
        elif window == "month":
            scope.month_base -= missing
        elif window == "total":
            scope.total_base -= missing
        else:
            self._add_bucket(scope, minute, missing)
        return missing

    def _add_watched(
        self, scope: _Scope, limits: Limits, kind: str, name: str, cost: int, ts: float, minute: int,
    ) -> None:
        """_add for a scope with thresholds: its spend in each warned window
        before and after, and a BudgetCrossing for each window where a
        threshold lies in between.

        Why nothing is remembered of thresholds sent: spend in a calendar
        window only grows within its period, so a threshold is passed once
        per period; and rebuild() at start sets the spend without a charge,
        so thresholds already passed before a restart are not passed again.
        The 5-hour window falls as its minutes age out and may pass a
        threshold again later: that is news, and the alerts' min_interval
        keeps it from repeating within minutes."""
        self._expire(scope, minute - ROLLING_BUCKETS + 1)
        spent = self._spent
        before = [spent(scope, window) for window, _, _ in limits.thresholds]
        self._add(scope, cost, ts, minute)
        listener = self.on_crossing
        if listener is None:
            return
        for (window, limit, percents), was in zip(limits.thresholds, before):
            now_spent = spent(scope, window)
            percent = crossed(was, now_spent, limit, percents)
            if percent is not None:
                listener(BudgetCrossing(
                    kind, name, window, percent, now_spent, limit, limits.is_soft(window),
                    self._reset_of(scope, window, limit, now_spent), ts,
                ))

    def rebuild(self, conn: sqlite3.Connection, now: float | None = None) -> None:
        """Recompute all spend from the usage table, e.g. at start, so a
        restart never resets a budget. In-flight and rpm counters are kept.
        Call it before the server takes requests (charges of events not yet
        in the table would be lost)."""
        if now is None:
            now = self._clock()
        # One read transaction: usage retention (accounting.retention) moves
        # spend from usage rows to usage_carried in one commit, and the sums
        # must see it on one side only.
        own_transaction = not conn.in_transaction
        if own_transaction:
            conn.execute("BEGIN")
        try:
            self._rebuild(conn, now)
        finally:
            if own_transaction:
                conn.execute("COMMIT")

    def _rebuild(self, conn: sqlite3.Connection, now: float) -> None:
        for table in (self._tokens, self._users, self._projects):
            for scope in table.values():
                scope.clear_spend()
        self._set_periods(now)
        day, week, month = self._day[0], self._week[0], self._month[0]
        # A token's user and project never change, so spend is summed per
        # token (over the covering index usage_token_ts_cost, without a sort)
        # and credited to the token's user and project from the tokens table.
        owners: dict[int, tuple[str | None, str | None]] = {
            token_id: (user, project) for token_id, user, project in conn.execute("SELECT id, user, project FROM tokens")
        }

        def owner(token_id: int) -> tuple[str | None, str | None]:
            found = owners.get(token_id)
            if found is None:
                # Not in the tokens table (a database assembled by hand):
                # the usage rows themselves say whose it was.
                row = conn.execute("SELECT user, project FROM usage WHERE token_id = ? LIMIT 1", (token_id,)).fetchone()
                if row is None:
                    row = conn.execute("SELECT user, project FROM usage_carried WHERE token_id = ?", (token_id,)).fetchone()
                found = owners[token_id] = (row[0], row[1]) if row else (None, None)
            return found

        rows = conn.execute(
            "SELECT token_id, SUM(cost_micros),"
            " SUM(CASE WHEN ts >= ? THEN cost_micros ELSE 0 END),"
            " SUM(CASE WHEN ts >= ? THEN cost_micros ELSE 0 END),"
            " SUM(CASE WHEN ts >= ? THEN cost_micros ELSE 0 END)"
            " FROM usage WHERE token_id IS NOT NULL AND cost_micros > 0 GROUP BY token_id",
            (day, week, month),
        )
        for token_id, total, in_day, in_week, in_month in rows.fetchall():
            user, project = owner(token_id)
            for scope in self._scopes_for(token_id, user, project):
                self._credit(scope, total, in_day, in_week, in_month)
        # The spend of rows usage retention removed, which arrived before
        # every current period: it counts in `total` alone.
        rows = conn.execute("SELECT token_id, cost_micros FROM usage_carried WHERE cost_micros > 0")
        for token_id, total in rows.fetchall():
            user, project = owner(token_id)
            for scope in self._scopes_for(token_id, user, project):
                self._credit(scope, total, 0, 0, 0)
        first_minute = int(now // BUCKET_SECONDS) - ROLLING_BUCKETS + 1
        rows = conn.execute(
            f"SELECT token_id, {floor_of(f'ts / {BUCKET_SECONDS}')} AS minute, SUM(cost_micros)"
            " FROM usage WHERE ts >= ? AND token_id IS NOT NULL AND cost_micros > 0"
            " GROUP BY token_id, minute ORDER BY minute",
            (first_minute * BUCKET_SECONDS,),
        )
        for token_id, minute, spent in rows.fetchall():
            user, project = owner(token_id)
            for scope in self._scopes_for(token_id, user, project):
                self._add_bucket(scope, int(minute), spent)
        for (kind, name), windows in self._limits.resets.items():
            if kind == "token":
                token_ids = [int(name)]
            else:
                token_ids = [t for t, found in owners.items() if found[0 if kind == "user" else 1] == name]
            self._forget_before(conn, kind, name, windows, token_ids, first_minute)

    @staticmethod
    def _carried(conn: sqlite3.Connection, token_ids: list[int]) -> int:
        """What usage retention removed of these tokens' rows (usage_carried).
        Retention keeps at least 31 days of rows, so this spend arrived
        before a total reset of the last month: it is taken out with what
        was spent before the reset. A total reset older than the kept rows
        forgives with it what was spent between the reset and the oldest
        kept row, which a rebuild can no longer tell apart."""
        total = 0
        for i in range(0, len(token_ids), _IDS_PER_QUERY):
            chunk = token_ids[i:i + _IDS_PER_QUERY]
            (found,) = conn.execute(
                f"SELECT COALESCE(SUM(cost_micros), 0) FROM usage_carried WHERE token_id IN ({','.join('?' * len(chunk))})",
                chunk,
            ).fetchone()
            total += int(found)
        return total

    def _forget_before(
        self, conn: sqlite3.Connection, kind: str, name: str, windows: dict[str, float], token_ids: list[int],
        first_minute: int,
    ) -> None:
        """After a rebuild: take out of `kind name`'s windows what its tokens
        spent before each window's reset."""
        scope = self._scopes_for(*_scope_key(kind, name))[0]
        scope.resets = dict(windows)
        self._credit(scope, 0, 0, 0, 0)   # into the current periods (and counts_from), spending nothing
        starts = self._starts()

        def spent(since: float, until: float) -> int:
            total = 0
            for i in range(0, len(token_ids), _IDS_PER_QUERY):
                chunk = token_ids[i:i + _IDS_PER_QUERY]
                (found,) = conn.execute(
                    f"SELECT COALESCE(SUM(cost_micros), 0) FROM usage WHERE token_id IN ({','.join('?' * len(chunk))})"
                    " AND ts >= ? AND ts < ? AND cost_micros > 0", (*chunk, since, until),
                ).fetchone()
                total += int(found)
            return total

        for window, at in windows.items():
            if window == "total":
                scope.total_base += spent(_NEVER, at) + self._carried(conn, token_ids)
            elif window == "5h":
                since = first_minute * BUCKET_SECONDS
                if at > since and scope.buckets:
                    for i in range(0, len(token_ids), _IDS_PER_QUERY):
                        chunk = token_ids[i:i + _IDS_PER_QUERY]
                        for minute, amount in conn.execute(
                            f"SELECT {floor_of(f'ts / {BUCKET_SECONDS}')}, SUM(cost_micros) FROM usage WHERE token_id IN"
                            f" ({','.join('?' * len(chunk))}) AND ts >= ? AND ts < ? AND cost_micros > 0 GROUP BY 1",
                            (*chunk, since, at),
                        ):
                            self._add_bucket(scope, int(minute), -int(amount))
                    # A minute wholly before the reset is gone, not a bucket of zero.
                    scope.buckets = deque(bucket for bucket in scope.buckets if bucket[1])
            elif at > starts[window]:
                base = f"{window}_base"
                setattr(scope, base, getattr(scope, base) + spent(starts[window], at))

    def _scopes_for(self, token_id: int | None, user: str | None, project: str | None) -> list[_Scope]:
        scopes = []
        if token_id is not None:
            scope = self._tokens.get(token_id)
            if scope is None:
                scope = self._tokens[token_id] = _Scope(f"token {token_id}")
            scopes.append(scope)
        if user is not None:
            scope = self._users.get(user)
            if scope is None:
                scope = self._users[user] = _Scope(f"user {user}")
            scopes.append(scope)
        if project is not None:
            scope = self._projects.get(project)
            if scope is None:
                scope = self._projects[project] = _Scope(f"project {project}")
            scopes.append(scope)
        return scopes

    def _credit(
        self, scope: _Scope, amount: int, in_day: int, in_week: int, in_month: int, in_total: int | None = None,
    ) -> None:
        """Add `amount` to the total, of which `in_*` fell in the current
        periods and `in_total` (default: all of it) after any reset of the
        total."""
        if in_total is not None:
            scope.total_base += amount - in_total
        total = scope.total
        start = self._day_start
        if scope.day_start != start:
            scope.day_start, scope.day_base = start, total
        scope.day_base += amount - in_day
        start = self._week[0]
        if scope.week_start != start:
            scope.week_start, scope.week_base = start, total
        scope.week_base += amount - in_week
        start = self._month[0]
        if scope.month_start != start:
            scope.month_start, scope.month_base = start, total
        scope.month_base += amount - in_month
        scope.total = total + amount
        scope.periods = self._periods
        resets = scope.resets
        scope.counts_from = self._day_start if not resets else max(self._day_start, *resets.values())

    @staticmethod
    def _add_bucket(scope: _Scope, minute: int, cost: int) -> None:
        buckets = scope.buckets
        if buckets is None:
            buckets = scope.buckets = deque()
        if not buckets or buckets[-1][0] < minute:
            buckets.append([minute, cost])
        elif buckets[-1][0] == minute:
            buckets[-1][1] += cost
        else:
            if minute <= buckets[-1][0] - ROLLING_BUCKETS:
                return  # older than the whole window
            # A late charge (long request): usually a few buckets from the end.
            i = len(buckets) - 1
            while i >= 0 and buckets[i][0] > minute:
                i -= 1
            if i >= 0 and buckets[i][0] == minute:
                buckets[i][1] += cost
            else:
                buckets.insert(i + 1, [minute, cost])
        scope.rolling += cost

    @staticmethod
    def _expire(scope: _Scope, oldest_kept: int) -> None:
        """Drop the 5h buckets before minute `oldest_kept`."""
        buckets = scope.buckets
        while buckets and buckets[0][0] < oldest_kept:
            scope.rolling -= buckets.popleft()[1]

    def _spent(self, scope: _Scope, window: str) -> int:
        if window == "day":
            return scope.total - scope.day_base if scope.day_start == self._day_start else 0
        if window == "week":
            return scope.total - scope.week_base if scope.week_start == self._week[0] else 0
        if window == "month":
            return scope.total - scope.month_base if scope.month_start == self._month[0] else 0
        if window == "5h":
            return scope.rolling
        return scope.total - scope.total_base

    def _starts(self) -> dict[str, float]:
        """The start of each calendar window's current period."""
        return {"day": self._day_start, "week": self._week[0], "month": self._month[0]}

    def _resets_at(self, scope: _Scope, window: str, limit: int) -> float | None:
        """When spend falls below `limit` again without new charges."""
        if limit <= 0 or window == "total":
            return None
        if window == "day":
            return self._day[1]
        if window == "week":
            return self._week[1]
        if window == "month":
            return self._month[1]
        # 5h: the time enough of the oldest buckets have aged out.
        excess = scope.rolling - limit + 1
        for minute, cost in scope.buckets or ():
            excess -= cost
            if excess <= 0:
                return float((minute + ROLLING_BUCKETS) * BUCKET_SECONDS)
        return None

    # -- calendar periods ----------------------------------------------------------

    def _set_periods(self, now: float) -> None:
        self._periods = periods = calendar_periods(now, self.tz)
        self._day, self._week, self._month = periods
        self._day_start = self._day[0]
        self._boundary = min(self._day[1], self._week[1], self._month[1])

    def _advance(self, now: float) -> None:
        # Periods only move forward: a charge dated in an older period does
        # not drag the limiter back.
        if now >= self._boundary:
            self._set_periods(now)

    # -- reading ---------------------------------------------------------------

    def _scope(self, kind: str, name: str | int) -> _Scope | None:
        if kind == "token":
            return self._tokens.get(int(name))
        if kind == "user":
            return self._users.get(str(name))
        if kind == "project":
            return self._projects.get(str(name))
        raise ValueError(f"unknown scope kind {kind!r}; choose one of {', '.join(SCOPE_KINDS)}")

    def in_flight(self, kind: str, name: str | int) -> int:
        scope = self._scope(kind, name)
        return scope.in_flight if scope is not None else 0

    def spent(self, kind: str, name: str | int, window: str, now: float | None = None) -> int:
        """Micro-dollars spent by a scope in a window, as of `now`."""
        if window not in WINDOWS:
            raise ValueError(f"unknown budget window {window!r}; choose one of {', '.join(WINDOWS)}")
        if now is None:
            now = self._clock()
        self._advance(now)
        scope = self._scope(kind, name)
        if scope is None:
            return 0
        self._expire(scope, int(now // BUCKET_SECONDS) - ROLLING_BUCKETS + 1)
        return self._spent(scope, window)

    def spend_report(self, now: float | None = None, scope: tuple[str, str] | None = None) -> list[BudgetLine]:
        """Spend against every budget defined (or those of one (kind, name))."""
        if now is None:
            now = self._clock()
        self._advance(now)
        defined = self._limits
        if scope is not None:
            # One scope (a dashboard page's): its limits alone, not a pass over all.
            kind, name = scope
            if kind not in SCOPE_KINDS or (kind == "token" and not name.isdigit()):
                return []
            return self.scope_budgets(kind, name, now)
        entries: list[tuple[str, str, Limits]] = []
        entries += [("token", str(i), lim) for i, lim in sorted(defined.tokens.items())]
        entries += [("user", n, lim) for n, lim in sorted(defined.users.items())]
        entries += [("project", n, lim) for n, lim in sorted(defined.projects.items())]
        lines = []
        for kind, name, limits in entries:
            state = self._scope(kind, name) or _Scope(f"{kind} {name}")
            lines += self._budget_lines(kind, name, state, limits, now)
        return lines

    def scope_budgets(self, kind: str, name: str | int, now: float | None = None) -> list[BudgetLine]:
        """Spend against the budgets of one scope, as spend_report has them,
        without walking every other scope's."""
        if now is None:
            now = self._clock()
        self._advance(now)
        limits = self.scope_limits(kind, name)
        if limits is None or not limits.budgets:
            return []
        state = self._scope(kind, name) or _Scope(f"{kind} {name}")
        return self._budget_lines(kind, str(name), state, limits, now)

    def scope_limits(self, kind: str, name: str | int) -> Limits | None:
        """The limits set on a token, user or project, as last loaded (None: none)."""
        defined = self._limits
        if kind == "token":
            return defined.tokens.get(int(name))
        if kind == "user":
            return defined.users.get(str(name))
        if kind == "project":
            return defined.projects.get(str(name))
        raise ValueError(f"unknown scope kind {kind!r}; choose one of {', '.join(SCOPE_KINDS)}")

    def periods(self, now: float | None = None) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
        """(start, end) of the current day, week and month in the limiter's timezone."""
        self._advance(self._clock() if now is None else now)
        return self._day, self._week, self._month

    def _budget_lines(self, kind: str, name: str, state: _Scope, limits: Limits, now: float) -> list[BudgetLine]:
        """Spend against each budget of one scope (periods already advanced to `now`)."""
        self._expire(state, int(now // BUCKET_SECONDS) - ROLLING_BUCKETS + 1)
        lines = []
        for window, limit in limits.budgets:
            spent = self._spent(state, window)
            lines.append(BudgetLine(
                kind, name, window, limit, spent, self._reset_of(state, window, limit, spent),
                limits.is_soft(window), limits.warns_at(window),
            ))
        return lines

    def _reset_of(self, state: _Scope, window: str, limit: int, spent: int) -> float | None:
        """The reset time a report shows: when spend falls below a spent
        budget; for a 5-hour one not spent, when its oldest spend ages out."""
        if window == "5h" and spent < limit:
            return None if not state.buckets else float((state.buckets[0][0] + ROLLING_BUCKETS) * BUCKET_SECONDS)
        return self._resets_at(state, window, limit)


def _scope_key(kind: str, name: str | int) -> tuple[int | None, str | None, str | None]:
    """(token id, user, project) naming one scope, for Limiter._scopes_for."""
    if kind == "token":
        return int(name), None, None
    if kind == "user":
        return None, str(name), None
    if kind == "project":
        return None, None, str(name)
    raise ValueError(f"unknown scope kind {kind!r}; choose one of {', '.join(SCOPE_KINDS)}")


def budget_report(
    conn: sqlite3.Connection, tz: str = "UTC", now: float | None = None,
    scope: tuple[str, str] | None = None,
) -> list[BudgetLine]:
    """Spend against budgets computed from the database alone (for the CLI)."""
    limiter = Limiter(tz)
    limiter.reload(conn)
    limiter.rebuild(conn, now)
    return limiter.spend_report(now, scope)
