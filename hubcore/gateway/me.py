"""GET /hubcore/v1/me on the proxy port: the caller's own spend today, this
week and this month, each budget over its token, user and project, and its
rate and concurrency limits, for `hubcore statusline` and any script holding
a hub token. Read from the limiter's in-memory counters on the event loop,
never from the usage table: the answer costs microseconds and never waits.
"""
from __future__ import annotations

from typing import Any, Protocol
from zoneinfo import ZoneInfo

import orjson

from hubcore.governance.limiter import BudgetLine, binding_order
from hubcore.governance.limits import Limits, format_time
from hubcore.governance.tokens import Principal

Period = tuple[float, float]
ME_HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
# The calendar windows the answer sums, by the name it gives them.
PERIODS = (("today", "day"), ("week", "week"), ("month", "month"))


class Ledger(Protocol):
    """The spend counters and limits the answer reads (governance.limiter.Limiter)."""

    @property
    def tz(self) -> ZoneInfo: ...
    def spent(self, kind: str, name: str | int, window: str, now: float | None = None) -> int: ...
    def scope_budgets(self, kind: str, name: str | int, now: float | None = None) -> list[BudgetLine]: ...
    def scope_limits(self, kind: str, name: str | int) -> Limits | None: ...
    def periods(self, now: float | None = None) -> tuple[Period, Period, Period]: ...


def me_report(ledger: Ledger, principal: Principal, now: float) -> dict[str, Any]:
    """What /hubcore/v1/me answers `principal` as of `now` (unix seconds).

    `spend`: micro-dollars of the token and of its user (all the user's
    tokens) in the current day, week and month of the hub's budget timezone,
    each with its start and end. `budgets`: every budget of the token, its
    user and its project, with the numbers `hubcore usage --budgets` shows,
    and `resets` as RFC 3339 in that timezone (null: never by itself);
    `tightest`: the one with the least left, as the x-hubcore-budget-*
    headers name it (null: no budget applies). `limits`: rpm and concurrency
    of each scope (null: none set)."""
    tz = ledger.tz
    token = str(principal.token_id)
    scopes = [("token", token), ("user", principal.user)]
    if principal.project is not None:
        scopes.append(("project", principal.project))
    spend = {}
    for (label, window), (start, end) in zip(PERIODS, ledger.periods(now)):
        spend[label] = {
            "start": start, "end": end,
            "token_micros": ledger.spent("token", token, window, now),
            "user_micros": ledger.spent("user", principal.user, window, now),
        }
    budgets = [line for kind, name in scopes for line in ledger.scope_budgets(kind, name, now)]
    tightest = min(budgets, key=binding_order, default=None)
    return {
        "token": {"id": principal.token_id, "prefix": principal.prefix},
        "user": principal.user,
        "project": principal.project,
        "timezone": tz.key,
        "now": now,
        "spend": spend,
        "budgets": [_budget(line, tz) for line in budgets],
        "tightest": None if tightest is None else _budget(tightest, tz),
        "limits": {kind: _rates(ledger.scope_limits(kind, name)) for kind, name in scopes},
    }


def me_body(ledger: Ledger, principal: Principal, now: float) -> bytes:
    return orjson.dumps(me_report(ledger, principal, now))


def _budget(line: BudgetLine, tz: ZoneInfo) -> dict[str, Any]:
    out = line.to_dict()
    out["resets"] = None if line.resets_at is None else format_time(line.resets_at, tz)
    return out


def _rates(limits: Limits | None) -> dict[str, int | None] | None:
    if limits is None or (limits.rpm is None and limits.concurrency is None):
        return None
    return {"rpm": limits.rpm, "concurrency": limits.concurrency}
