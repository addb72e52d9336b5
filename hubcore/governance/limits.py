"""The limits set on tokens, users and projects, as values: requests per
minute, in-flight requests, USD budgets, model allow-lists, expiry, the
upstream groups they may use; the budget windows, and how amounts and
moments read. governance.storage keeps them in the database;
governance.limiter enforces them.

Windows. `5h` is rolling: spend in the current minute and the 299 before it
(per-minute buckets). `day`, `week` (Monday 00:00) and `month` (the 1st, 00:00)
are calendar windows in the Limiter's timezone (`tz`, an IANA name such as
"Europe/Berlin"; default "UTC"), so they follow daylight-saving changes.
`total` never resets. A spend is placed in a window by the usage event's `ts`
(when the request arrived), exactly as `Limiter.rebuild()` places rows from
the table.

Soft budgets and thresholds. A budget is hard (it refuses requests once
spent) unless its window is in `soft`: a soft budget never refuses. Any
budget may carry warning thresholds in percent of its limit (`warn_at`); a
soft budget without its own warns at SOFT_WARN_AT, a hard one at none. The
Limiter raises a BudgetCrossing when a charge takes spend past one.

Groups. Each `[[upstream]]` belongs to one `group`; a token, user or project
may be restricted to some groups. A request may use the groups every
restriction set on its token, user and project allows (their intersection;
`effective_groups`), every group when none is set.
"""
from __future__ import annotations

import fnmatch
import logging
import math
import re
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson

# An upstream group's name: the config's `group` and `--groups` take the same.
from hubcore.config import GROUP_NAME

log = logging.getLogger("hubcore.limits")

WINDOWS = ("5h", "day", "week", "month", "total")
SCOPE_KINDS = ("token", "user", "project")
MICROS_PER_USD = 1_000_000
# The thresholds (percent of the limit) of a soft budget that names none: a
# manager hears of the project passing 80% of its month, and of the end.
SOFT_WARN_AT = (80, 100)
# A threshold is a whole percentage; past 1000% a soft budget means nothing.
WARN_AT_MAX = 1000
_FIELDS = frozenset({"rpm", "concurrency", "budget_micros", "models", "expires_at", "groups", "soft", "warn_at"})


# -- the limits ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Limits:
    """What one token, user or project may do; None or () means unlimited."""

    rpm: int | None = None
    concurrency: int | None = None
    budget_5h: int | None = None       # micro-dollars
    budget_day: int | None = None
    budget_week: int | None = None
    budget_month: int | None = None
    budget_total: int | None = None
    models: tuple[str, ...] = ()       # shell-style globs; empty: any model
    expires_at: float | None = None    # unix seconds
    groups: tuple[str, ...] = ()       # upstream groups it may use; empty: every group
    soft: tuple[str, ...] = ()         # windows whose budget never refuses, in WINDOWS order
    # (window, percents ascending) of the budgets with thresholds of their own
    warn_at: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # Set when stored limits could not be read: every request is refused
    # (fail closed) with this text until an operator rewrites them.
    error: str | None = None
    # derived in __post_init__
    budgets: tuple[tuple[str, int], ...] = field(default=(), init=False, repr=False, compare=False)
    model_re: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)
    # The budgets that refuse: (window, micros), and each window's alone
    # (None when it has none or it is soft), read by Limiter.admit's check.
    hard_budgets: tuple[tuple[str, int], ...] = field(default=(), init=False, repr=False, compare=False)
    cap_5h: int | None = field(default=None, init=False, repr=False, compare=False)
    cap_day: int | None = field(default=None, init=False, repr=False, compare=False)
    cap_week: int | None = field(default=None, init=False, repr=False, compare=False)
    cap_month: int | None = field(default=None, init=False, repr=False, compare=False)
    cap_total: int | None = field(default=None, init=False, repr=False, compare=False)
    # (window, limit micros, percents) of every budget that warns, soft defaults applied.
    thresholds: tuple[tuple[str, int, tuple[int, ...]], ...] = field(
        default=(), init=False, repr=False, compare=False,
    )

    def __post_init__(self) -> None:
        for name in ("rpm", "concurrency"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        budgets = []
        for window in WINDOWS:
            value = self.budget(window)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"budget {window} must be a non-negative integer of micro-dollars, not {value!r}")
            budgets.append((window, value))
        object.__setattr__(self, "budgets", tuple(budgets))
        self._check_soft_and_warn_at()
        if not isinstance(self.models, tuple) or not all(isinstance(m, str) and m for m in self.models):
            raise ValueError(f"models must be a tuple of non-empty patterns, not {self.models!r}")
        if self.models:
            pattern = "|".join(fnmatch.translate(m) for m in self.models)
            object.__setattr__(self, "model_re", re.compile(pattern))
        if self.expires_at is not None and (
            not isinstance(self.expires_at, (int, float)) or isinstance(self.expires_at, bool)
            or not math.isfinite(self.expires_at)
        ):
            raise ValueError(f"expires_at must be unix seconds, not {self.expires_at!r}")
        if not isinstance(self.groups, tuple):
            raise ValueError(f"groups must be a tuple of group names, not {self.groups!r}")
        for name in self.groups:
            check_group_name(name)
        if len(set(self.groups)) != len(self.groups):
            raise ValueError(f"groups name a group twice: {', '.join(self.groups)}")

    def _check_soft_and_warn_at(self) -> None:
        budgeted = {window for window, _ in self.budgets}
        if not isinstance(self.soft, tuple) or not all(isinstance(w, str) for w in self.soft):
            raise ValueError(f"soft must be a tuple of budget windows, not {self.soft!r}")
        for window in self.soft:
            if window not in budgeted:
                raise ValueError(f"soft names the {window!r} window, which has no budget")
        if list(self.soft) != sorted(set(self.soft), key=WINDOWS.index):
            raise ValueError(f"soft must name each window once, in the order {', '.join(WINDOWS)}: {self.soft!r}")
        if not isinstance(self.warn_at, tuple):
            raise ValueError(f"warn_at must be a tuple of (window, percents), not {self.warn_at!r}")
        own: dict[str, tuple[int, ...]] = {}
        for entry in self.warn_at:
            if not (isinstance(entry, tuple) and len(entry) == 2):
                raise ValueError(f"warn_at entries are (window, percents), not {entry!r}")
            window, percents = entry
            if window not in budgeted:
                raise ValueError(f"warn_at names the {window!r} window, which has no budget")
            if window in own:
                raise ValueError(f"warn_at names the {window!r} window twice")
            own[window] = check_warn_at(percents)
        if [w for w, _ in self.warn_at] != sorted(own, key=WINDOWS.index):
            raise ValueError(f"warn_at must list its windows in the order {', '.join(WINDOWS)}")
        hard = tuple((w, v) for w, v in self.budgets if w not in self.soft)
        object.__setattr__(self, "hard_budgets", hard)
        for window, value in hard:
            object.__setattr__(self, "cap_" + window, value)
        thresholds = []
        for window, value in self.budgets:
            percents = own.get(window, SOFT_WARN_AT if window in self.soft else ())
            if percents:
                thresholds.append((window, value, percents))
        object.__setattr__(self, "thresholds", tuple(thresholds))

    def budget(self, window: str) -> int | None:
        value: int | None = getattr(self, "budget_" + window)
        return value

    def is_soft(self, window: str) -> bool:
        return window in self.soft

    def warns_at(self, window: str) -> tuple[int, ...]:
        """The thresholds of the budget of `window` in percent (soft defaults applied)."""
        for w, _, percents in self.thresholds:
            if w == window:
                return percents
        return ()

    @property
    def empty(self) -> bool:
        return self == Limits()

    def to_dict(self) -> dict[str, Any]:
        """The stored JSON shape; unset limits are left out."""
        out: dict[str, Any] = {}
        if self.rpm is not None:
            out["rpm"] = self.rpm
        if self.concurrency is not None:
            out["concurrency"] = self.concurrency
        if self.budgets:
            out["budget_micros"] = dict(self.budgets)
        if self.models:
            out["models"] = list(self.models)
        if self.expires_at is not None:
            out["expires_at"] = float(self.expires_at)
        if self.groups:
            out["groups"] = list(self.groups)
        # Left out when unset, so that a row without soft budgets or
        # thresholds reads as before on a hub that predates them.
        if self.soft:
            out["soft"] = list(self.soft)
        if self.warn_at:
            out["warn_at"] = {window: list(percents) for window, percents in self.warn_at}
        return out

    def to_json(self) -> str | None:
        """The `limits` column's value; None when nothing is limited."""
        data = self.to_dict()
        return orjson.dumps(data).decode() if data else None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Limits:
        if not isinstance(data, dict):
            raise ValueError("limits must be a JSON object")
        # An unknown field makes the limits unreadable, which refuses the
        # scope's requests: a hub older than a field fails closed on it.
        # Rows without `soft` and `warn_at` (written before them) read as
        # hard budgets without thresholds.
        unknown = set(data) - _FIELDS
        if unknown:
            raise ValueError(f"unknown limit fields: {', '.join(sorted(unknown))}")
        budgets = data.get("budget_micros") or {}
        if not isinstance(budgets, dict):
            raise ValueError("budget_micros must be an object of window: micro-dollars")
        bad = set(budgets) - set(WINDOWS)
        if bad:
            raise ValueError(f"unknown budget windows: {', '.join(sorted(bad))}")
        models = data.get("models") or []
        if not isinstance(models, list):
            raise ValueError("models must be a list of patterns")
        groups = data.get("groups", [])
        if not isinstance(groups, list):
            raise ValueError("groups must be a list of group names")
        soft = data.get("soft", [])
        if not isinstance(soft, list) or not all(isinstance(w, str) for w in soft):
            raise ValueError("soft must be a list of budget windows")
        warn_at = data.get("warn_at", {})
        if not isinstance(warn_at, dict) or not all(isinstance(p, list) for p in warn_at.values()):
            raise ValueError("warn_at must be an object of window: [percent, ...]")
        return cls(
            rpm=data.get("rpm"),
            concurrency=data.get("concurrency"),
            models=tuple(models),
            expires_at=data.get("expires_at"),
            groups=tuple(groups),
            soft=tuple(w for w in WINDOWS if w in soft) if set(soft) <= set(WINDOWS) else tuple(soft),
            warn_at=tuple(
                (w, tuple(warn_at[w])) for w in sorted(warn_at, key=lambda w: WINDOWS.index(w) if w in WINDOWS else -1)
            ),
            **{"budget_" + w: v for w, v in budgets.items()},
        )

    @classmethod
    def from_json(cls, text: str | bytes | None) -> Limits | None:
        """Parse a `limits` column; None for NULL or `{}`. Raises ValueError."""
        if text is None:
            return None
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            raise ValueError(f"limits are not JSON: {e}") from e
        limits = cls.from_dict(data)
        return None if limits.empty else limits


def check_warn_at(percents: object) -> tuple[int, ...]:
    """`percents` if they are thresholds: whole percentages from 1 to
    WARN_AT_MAX, ascending, each once; else ValueError saying what they are."""
    if not isinstance(percents, tuple) or not percents:
        raise ValueError(f"warn_at needs at least one percentage, not {percents!r}")
    for p in percents:
        if not isinstance(p, int) or isinstance(p, bool) or not 1 <= p <= WARN_AT_MAX:
            raise ValueError(f"a threshold is a whole percentage from 1 to {WARN_AT_MAX}, not {p!r}")
    if list(percents) != sorted(set(percents)):
        raise ValueError(f"thresholds must be ascending and each given once: {', '.join(map(str, percents))}")
    return percents


def check_group_name(name: object) -> str:
    """`name` if it is a group name; else ValueError saying what one is."""
    if not isinstance(name, str) or GROUP_NAME.fullmatch(name) is None:
        raise ValueError(
            f"{name!r} is not a group name: 1 to 64 of the letters A-Z and a-z, the digits, '_', '.' and '-'"
        )
    return name


def effective_groups(*scopes: Limits | None) -> frozenset[str] | None:
    """The upstream groups a request may use, given the limits of its token,
    user and project: the intersection of the groups restrictions among them,
    None (every group) when none restricts. An empty set: no group at all.
    Unreadable limits allow no group (fail closed, as everywhere else)."""
    allowed: frozenset[str] | None = None
    for limits in scopes:
        if limits is None:
            continue
        if limits.error is not None:
            return frozenset()
        if limits.groups:
            allowed = frozenset(limits.groups) if allowed is None else allowed.intersection(limits.groups)
    return allowed


def parse_column(text: str | bytes | None, label: str) -> Limits | None:
    """A stored `limits` value, failing closed: unreadable limits refuse everything."""
    try:
        return Limits.from_json(text)
    except ValueError as e:
        log.error("limits of %s cannot be read, refusing its requests: %s", label, e)
        return Limits(error=str(e))


# -- how amounts and moments read ---------------------------------------------------
# The one money and time formatting of the package: refusals use them here,
# the CLI through hubcore.cli.render.

def format_usd(micros: int, places: int | None = None, *, symbol: str = "$", grouping: bool = True) -> str:
    """Micro-dollars as dollars, exactly (integer arithmetic, no float).

    `places` None: cents, or every digit when the amount is not whole cents
    ("$5.00", "$1.234567"); 0 to 6: that many places, rounded half up.
    `symbol` goes before the sign ("$-0.01"); `grouping` separates thousands
    with commas ("$12,345.00")."""
    strip = places is None and micros % 10_000 != 0
    if places is None:
        places = 6 if strip else 2
    if not 0 <= places <= 6:
        raise ValueError(f"places must be 0 to 6, not {places!r}")
    sign = "-" if micros < 0 else ""
    scale = 10 ** (6 - places)
    whole, fraction = divmod((abs(micros) + scale // 2) // scale, 10 ** places)
    text = f"{symbol}{sign}{whole:,}" if grouping else f"{symbol}{sign}{whole}"
    if not places:
        return text
    digits = f"{fraction:0{places}d}"
    return f"{text}.{digits.rstrip('0') if strip else digits}"


def format_time(ts: float, tz: ZoneInfo | None = None) -> str:
    """Unix seconds as ISO 8601 to the second, in `tz` (default UTC)."""
    return datetime.fromtimestamp(ts, tz or ZoneInfo("UTC")).isoformat(timespec="seconds")


def calendar_periods(ts: float, tz: ZoneInfo) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
    """(start, end) in unix seconds of the day, week (from Monday) and month holding `ts` in `tz`."""
    today = datetime.fromtimestamp(ts, tz).date()

    def at(d: date) -> float:
        return datetime(d.year, d.month, d.day, tzinfo=tz).timestamp()

    monday = today - timedelta(days=today.weekday())
    first = today.replace(day=1)
    next_month = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    return (
        (at(today), at(today + timedelta(days=1))),
        (at(monday), at(monday + timedelta(days=7))),
        (at(first), at(next_month)),
    )
