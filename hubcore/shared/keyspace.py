"""Where hubcore's shared state lives in Redis, and the pure work around the
scripts: key names, the Lua sources, the admit call's layout and the reading
of its reply. No I/O (hubcore.shared.redis_state does that)."""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources

from hubcore.governance.limits import Limits

# Budget windows in the order the admit script checks them (the Limiter's).
BUDGET_WINDOWS = ("5h", "day", "week", "month", "total")
# A session id longer than this is keyed by its SHA-256: ids come from
# clients, and a key should not be a megabyte.
SESSION_ID_MAX = 128
# Separates a key's label from a model class in a rest's field: labels and
# class names are config and model ids, never a NUL.
FIELD_SEP = "\0"
REST, CIRCUIT, DEAD, REVIVAL = "c", "o", "d", "n"


# -- the scripts ------------------------------------------------------------------

SCRIPT_NAMES = ("admit", "charge", "heartbeat", "keystate", "seed", "renew", "spend")


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str


def load_scripts() -> dict[str, Script]:
    """Every script, each prelude.lua followed by its own file (package data)."""
    folder = resources.files("hubcore.shared")
    prelude = folder.joinpath("prelude.lua").read_text(encoding="utf-8")
    scripts = {}
    for name in SCRIPT_NAMES:
        source = prelude + "\n" + folder.joinpath(f"{name}.lua").read_text(encoding="utf-8")
        scripts[name] = Script(name, source, hashlib.sha1(source.encode()).hexdigest())
    return scripts


# -- key names ----------------------------------------------------------------------

def scope_id(kind: str, name: str | int) -> str:
    """"t:12", "u:alice", "p:web": the last part of every key of a scope, so
    that a name holding colons cannot make two keys one."""
    return f"{kind[0]}:{name}"


class Keyspace:
    """The names of hubcore's keys under one prefix ([shared] prefix)."""

    __slots__ = ("prefix", "instances", "epoch", "charges")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.instances = f"{prefix}:instances"
        self.epoch = f"{prefix}:epoch"
        # A pub/sub channel, not a key: the charges each batch applied, for
        # the instances' own counters (SharedState.on_charge_elsewhere).
        self.charges = f"{prefix}:charges"

    def instance(self, instance_id: str) -> str:
        return f"{self.prefix}:instance:{instance_id}"

    def rpm(self, scope: str) -> str:
        return f"{self.prefix}:rpm:{scope}"

    def slots(self, scope: str) -> str:
        return f"{self.prefix}:slots:{scope}"

    def spend(self, window: str, scope: str, period_start: float | None = None) -> str:
        """A budget's counter: day, week and month by their period's start
        (unix seconds), so a new period starts from nothing; 5h is a hash of
        minute buckets (see prelude.lua); total is one counter."""
        if period_start is None:
            return f"{self.prefix}:spend:{window}:{scope}"
        return f"{self.prefix}:spend:{window}:{int(period_start)}:{scope}"

    def alert(self, name: str) -> str:
        """Held by the instance that sends an alert, for its min_interval."""
        return f"{self.prefix}:alert:{name}"

    def charged(self, request_id: str) -> str:
        return f"{self.prefix}:charged:{request_id}"

    def key_states(self, upstream: str) -> str:
        return f"{self.prefix}:keys:{upstream}"

    def session(self, upstream: str, session_id: str) -> str:
        if len(session_id) > SESSION_ID_MAX:
            session_id = "sha256:" + hashlib.sha256(session_id.encode()).hexdigest()
        return f"{self.prefix}:session:{upstream}:{session_id}"


def rest_field(label: str, model_class: str) -> str:
    return f"{REST}{label}{FIELD_SEP}{model_class}"


def circuit_field(label: str) -> str:
    return CIRCUIT + label


def dead_field(label: str) -> str:
    return DEAD + label


def fingerprint(secret: str) -> str:
    """Names a vendor key's secret without revealing it: 12 hex digits of its
    SHA-256. A label whose secret changed (rotated) is not the dead key."""
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


# -- the admit call -------------------------------------------------------------------

def counted(limits: Limits | None) -> bool:
    """Whether Redis counts anything for a scope with these limits."""
    return limits is not None and (
        limits.rpm is not None or limits.concurrency is not None or bool(limits.budgets)
    )


def scope_part(
    space: Keyspace, scope: str, limits: Limits, periods: tuple[float, float, float],
) -> tuple[list[str], list[str | int]]:
    """The keys and arguments of one scope in an admit call (see admit.lua):
    rpm window, slots, then one key per budget; `periods` are the starts of
    the current day, week and month."""
    keys: list[str] = [space.rpm(scope), space.slots(scope)]
    args: list[str | int] = [limits.rpm or 0, limits.concurrency or 0, len(limits.budgets)]
    for window, limit in limits.budgets:
        keys.append(space.spend(window, scope, _period_start(window, periods)))
        args += [window, limit]
    return keys, args


def _period_start(window: str, periods: tuple[float, float, float]) -> float | None:
    if window == "day":
        return periods[0]
    if window == "week":
        return periods[1]
    if window == "month":
        return periods[2]
    return None


# -- the reply ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class KeyNews:
    """What the instances together know against one vendor key (a key with
    no news is healthy as far as they know). Durations are seconds from when
    the reply was read."""

    # Model class -> seconds its rest after a 429 lasts; "" rests the whole key.
    rests: Mapping[str, float] = field(default_factory=dict)
    # Seconds its circuit stays open (an instance saw it fail), None: closed.
    circuit: float | None = None
    # The fingerprint of the secret the vendor refused, None: not refused.
    dead: str | None = None
    # The mark (Redis's ms) of the latest revival or reset an operator made
    # on any instance; None: none since Redis has had the key's states.
    revival: str | None = None

    def resting(self, model_class: str) -> float | None:
        """Seconds left of the longer of the key's whole rest and its rest for
        `model_class`; None when neither."""
        whole = self.rests.get("")
        own = self.rests.get(model_class) if model_class else None
        if whole is None:
            return own
        return whole if own is None else max(whole, own)

    def dead_for(self, secret: str) -> bool:
        return self.dead is not None and self.dead == fingerprint(secret)


NO_NEWS: Mapping[str, KeyNews] = {}


def read_key_states(flat: list[bytes | int]) -> Mapping[str, KeyNews]:
    """The admit reply's key states (field, value pairs) by key label."""
    if not flat:
        return NO_NEWS
    rests: dict[str, dict[str, float]] = {}
    circuits: dict[str, float] = {}
    dead: dict[str, str] = {}
    revivals: dict[str, str] = {}
    for i in range(0, len(flat), 2):
        name = flat[i]
        value = flat[i + 1]
        text = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
        kind, rest = text[:1], text[1:]
        if kind == DEAD:
            dead[rest] = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
        elif kind == REVIVAL:
            revivals[rest] = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
        elif kind == CIRCUIT:
            circuits[rest] = int(value) / 1000.0
        elif kind == REST:
            label, _, model_class = rest.partition(FIELD_SEP)
            rests.setdefault(label, {})[model_class] = int(value) / 1000.0
    return {
        label: KeyNews(rests.get(label, {}), circuits.get(label), dead.get(label), revivals.get(label))
        for label in rests.keys() | circuits.keys() | dead.keys() | revivals.keys()
    }


# -- a share of a limit ---------------------------------------------------------------------

def divided(limits: Limits, instances: int) -> Limits:
    """The share of `limits` one of `instances` instances enforces alone:
    rpm and budgets divided (rpm at least 1), nothing else (concurrency is
    counted apart, the other limits are the in-memory Limiter's)."""
    n = max(1, instances)

    def part(limit: int | None) -> int | None:
        return None if limit is None else limit // n

    return Limits(
        rpm=None if limits.rpm is None else max(1, limits.rpm // n),
        budget_5h=part(limits.budget_5h), budget_day=part(limits.budget_day), budget_week=part(limits.budget_week),
        budget_month=part(limits.budget_month), budget_total=part(limits.budget_total),
    )


def share(limit: int, instances: int) -> int:
    """One instance's share of a count limit (concurrency): at least 1."""
    return max(1, limit // max(1, instances))
