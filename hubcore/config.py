"""Configuration: one TOML file turned into frozen dataclasses.

Every limit and timeout is a named field with its default and unit here; an
unknown or ill-typed field is an error that names the file and the field, and
is raised before anything listens.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from hubcore.database import (
    DEFAULT_POOL_SIZE, DEFAULT_STATEMENT_CACHE_SIZE, PgTarget, is_postgres, url_problem,
)
from hubcore.errors import ConfigError

KIB = 1024
MIB = 1024 * 1024

UPSTREAM_KINDS = ("anthropic", "openai")

# Where the systemd install puts the config (deploy/systemd/hubcore.service,
# README "systemd"): read by every command, `serve` and the management
# commands alike, when neither --config nor $HUBCORE_CONFIG names a file.
SYSTEM_CONFIG = "/etc/hubcore/hubcore.toml"

# The shortest usage retention: the longest calendar budget window, a month,
# is rebuilt at start from its usage rows.
USAGE_RETENTION_MIN_DAYS = 31


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str = "127.0.0.1:8787"
    # A SQLite file, or postgresql://USER@HOST:PORT/DATABASE (hubcore.database).
    database: str = "hubcore.db"
    # PostgreSQL only: the password, as env:NAME, file:PATH or literally;
    # never in the URL, which logs and messages show. Empty: PGPASSWORD or
    # ~/.pgpass, as libpq finds them.
    database_password: str = field(default="", repr=False)
    # PostgreSQL only: prepared statements asyncpg keeps per connection
    # (asyncpg's default); 0 behind a PgBouncer in transaction mode, which
    # cannot keep a connection's prepared statements between transactions.
    pg_statement_cache_size: int = DEFAULT_STATEMENT_CACHE_SIZE
    # PostgreSQL only: connections of the usage writer's pool.
    pg_pool_size: int = DEFAULT_POOL_SIZE
    # Where usage rows go while the database cannot take them; replayed later.
    spool: str = ""  # default: database path + ".spool"
    ops_socket: str = "hubcore-ops.sock"
    ops_socket_mode: int = 0o660
    ops_socket_group: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # Request head (request line + headers). Node allows 16 KiB, nginx 32 KiB;
    # Claude Code's anthropic-beta list and x-stainless-* headers run to a few
    # KiB, so 64 KiB leaves room without inviting abuse. Beyond: 431.
    max_header_bytes: int = 64 * KIB
    # The vendor's own request limit (Anthropic: 32 MB). Beyond: 413.
    max_body_bytes: int = 32 * MIB
    # Seconds to receive a whole request head once its first byte arrived, or
    # the first byte of a new connection (slow-loris guard; nginx: 60 s).
    header_timeout: float = 10.0
    # Seconds between two reads of a request body before giving up (408).
    body_timeout: float = 60.0
    # Seconds an idle keep-alive connection is kept open (nginx: 75 s).
    keepalive_timeout: float = 75.0
    # Open client connections beyond this get a 503 and are closed.
    max_connections: int = 4096
    # Open connections from one client address; beyond: 503 and closed. A
    # team behind one NAT shares an address: Claude Code keeps a handful of
    # connections per developer, so 512 serves about a hundred of them.
    # 0: no per-address cap.
    max_connections_per_address: int = 512
    # Connections that have not yet sent an authenticated request (a new
    # connection, or one whose requests were all refused) may hold at most
    # this many slots; when they do, a new connection evicts the one of them
    # that has waited longest. Clients with a valid token send their head at
    # once, so a flood of silent or token-less connections cannot lock them out.
    max_unauthenticated_connections: int = 1024
    # Bytes of request bodies held in memory across all connections at once
    # (bodies are read only after the token is accepted). A request whose
    # body would go beyond gets 503 with retry-after.
    max_body_bytes_in_flight: int = 512 * MIB
    # Slowest average rate (bytes/s) at which a request body may arrive,
    # after a grace of body_timeout (Apache mod_reqtimeout: MinRate=500).
    # 0: only body_timeout between reads applies.
    min_body_rate: int = 1024
    # After a refusal or a `connection: close` answer, unread input is read
    # and dropped for up to this many seconds and bytes before the close, so
    # the client reads the answer instead of a reset (nginx's lingering_close).
    linger_timeout: float = 2.0
    linger_bytes: int = 1 * MIB
    # SIGTERM: seconds in-flight requests may take to finish.
    drain_timeout: float = 30.0
    # Seconds between checks of the tokens table for changes.
    token_reload_interval: float = 0.5
    log_level: str = "info"
    log_format: str = "text"  # or "json"
    # Operator price file that overrides or extends the built-in prices.
    prices: str = ""
    usage_queue_max: int = 100_000
    usage_flush_interval: float = 0.2
    # Seconds the usage writer waits for a database lock held by another
    # process (a backup, a long report) before it spools the batch instead.
    db_busy_timeout: float = 5.0
    # IANA zone in which the day, week (from Monday) and month budget
    # windows start; the 5-hour window is rolling and zone-free.
    budget_timezone: str = "UTC"
    # Days raw usage rows are kept; older ones are deleted hourly, in small
    # batches (hubcore.accounting.retention). 0: kept for ever. At least
    # USAGE_RETENTION_MIN_DAYS otherwise: monthly budgets are rebuilt at
    # start from the current month's rows.
    usage_retention_days: float = 0.0
    # Seconds between the cyclic garbage collector's full collections, which
    # pause the hub (tens of ms with 1,000 streams open); 0 leaves them to
    # CPython, which runs them as the heap grows (see runtime.CycleCollector).
    gc_full_interval: float = 600.0
    # Label sets (user, project, model) of the spend and token counters on
    # /metrics; past it new ones are counted under "_other" (0: all are).
    # Each set is six series; 2,000 is some 100 users times 20 models.
    metrics_max_series: int = 2000
    # Processes serving the one listening port; "auto" in the file: one per
    # core this process may run on. More than one needs [shared] redis.
    workers: int = 1


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One vendor key as configured. The secret never appears in a repr."""

    secret: str = field(repr=False)
    label: str
    weight: int = 1
    # Lower is better: keys of tier 1 are used only while no key of tier 0 is.
    priority: int = 0
    # Prompt caches live per workspace; rate limits per organisation.
    workspace: str | None = None
    org: str | None = None


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """How the ring reacts to failures and how long sessions stay sticky."""

    # Seconds a key rests after a 429 that says nothing of when to come back.
    cooldown_default: float = 10.0
    # Consecutive failures (5xx, 529, connect failure, timeout, a stream that
    # broke or carried an error event) that open the circuit.
    circuit_threshold: int = 5
    # Seconds the circuit stays open after the vendor answered with failures
    # (5xx, 529, broken streams) before the hub probes the key; doubled after
    # each failed probe and each relapse, up to circuit_pause_max.
    circuit_pause: float = 5.0
    circuit_pause_max: float = 60.0
    # The same after failures to reach the vendor at all (connect failures,
    # timeouts): the probe is as good a test of those as a user's request, so
    # it goes out soon. 1 s at most: recovery from an outage within about a
    # second of the vendor's return (it took 16.8 s when every key waited
    # circuit_pause for a user's request to probe it).
    circuit_probe_pause: float = 0.5
    circuit_probe_pause_max: float = 1.0
    # A session keeps its key this long after its last request (seconds); the
    # table holds at most this many sessions, least recently used dropped first.
    affinity_ttl: float = 3600.0
    affinity_max_sessions: int = 100_000
    # A 429 on one key of an organisation also cools the org's other keys: they
    # share its rate limit. Off by default because workspaces may carry their
    # own, lower limits, and then a sibling key still has capacity.
    cool_whole_org: bool = False
    # A key whose remaining fraction of a rate limit (the vendor's
    # rate-limit headers, per model class) is under this is used only when
    # no other usable key has more: it is about to answer 429. 5% of a
    # per-minute limit is the last 3 seconds of an evenly spent minute.
    headroom_floor: float = 0.05
    # Seconds a key's reading stands before an answer's rate-limit headers
    # are read again, and before a key whose heads come without any is read
    # again (the vendors' limits are per minute; reading every answer costs
    # microseconds each on the request path). 0: every answer.
    headroom_read_interval: float = 0.05

    def __post_init__(self) -> None:
        for name in (
            "cooldown_default", "circuit_pause", "circuit_pause_max",
            "circuit_probe_pause", "circuit_probe_pause_max", "affinity_ttl", "headroom_read_interval",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
        if self.circuit_threshold < 1:
            raise ValueError(f"circuit_threshold: must be at least 1, got {self.circuit_threshold!r}")
        if self.circuit_pause_max < self.circuit_pause:
            raise ValueError("circuit_pause_max: must not be less than circuit_pause")
        if self.circuit_probe_pause_max < self.circuit_probe_pause:
            raise ValueError("circuit_probe_pause_max: must not be less than circuit_probe_pause")
        if self.affinity_max_sessions < 0:
            raise ValueError(f"affinity_max_sessions: must be >= 0, got {self.affinity_max_sessions!r}")
        if not 0.0 <= self.headroom_floor < 1.0:
            raise ValueError(f"headroom_floor: must be a fraction from 0 up to (not including) 1, got {self.headroom_floor!r}")


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    kind: str
    base_url: str
    keys: tuple[KeySpec, ...] = ()
    # CA bundle for the vendor's certificate; empty: the system store.
    ca_file: str = ""
    connect_timeout: float = 10.0
    # Seconds from sending a request to the first response byte. Non-streaming
    # long generations take minutes; the SDKs' own default is 10 minutes.
    first_byte_timeout: float = 600.0
    # Seconds without a byte in a response body (Anthropic pings SSE streams
    # every few seconds, so a silent stream for this long is dead).
    stream_idle_timeout: float = 300.0
    # Idle pooled connections kept per upstream, and for how long (seconds);
    # kept below the vendors' edge idle timeouts so the hub closes first.
    pool_max_idle: int = 64
    pool_idle_timeout: float = 30.0
    # Attempts per request across keys, and their total deadline (seconds).
    max_attempts: int = 4
    retry_deadline: float = 60.0
    # When every key is cooling after 429s, wait this long for one to free up.
    queue_timeout: float = 15.0
    # Seconds the hub's own probe of a key with an open circuit (GET
    # /v1/models) may wait for its first byte, and then between bytes; the
    # vendors answer it in well under a second.
    probe_timeout: float = 10.0
    # -- several upstreams of one kind (hubcore.routing.router) --
    # Lower is preferred: an upstream of priority 1 serves only while no
    # upstream of priority 0 that serves the request has a usable key.
    priority: int = 0
    # Share of the traffic within its priority.
    weight: int = 1
    # Globs of the client model ids it serves; empty: every model.
    models: tuple[str, ...] = ()
    # Client model id (exact, else the first glob that matches, in file
    # order) -> the id this upstream expects; only the body's top-level
    # "model" is rewritten.
    model_map: tuple[tuple[str, str], ...] = ()
    # The cost recorded is the list price of the client's model times this
    # (a relay that bills 0.5x list price: 0.5).
    cost_multiplier: float = 1.0
    # Tokens, users and projects may be restricted to some groups.
    group: str = "default"
    # While none of its keys is usable (circuits open), probe it this often
    # (seconds) so it comes back without a user's request; 0: off.
    health_check_interval: float = 0.0
    # "sticky": a session that moved to a worse priority stays there (its
    # prompt cache does) until its affinity lapses; "immediate": it comes
    # back as soon as this upstream is usable again.
    failback: str = "sticky"
    policy: KeyPolicy = field(default_factory=KeyPolicy)

    def mapped_model(self, model: str) -> str | None:
        """The id this upstream expects for the client's `model`, when its
        model_map names it (exactly, else by the first glob that matches)."""
        for pattern, target in self.model_map:
            if pattern == model:
                return target
        for pattern, target in self.model_map:
            if any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(model, pattern):
                return target
        return None

    @property
    def scheme(self) -> str:
        return urlsplit(self.base_url).scheme

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.base_url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def base_path(self) -> str:
        return urlsplit(self.base_url).path.rstrip("/")


# What a request for a model without a price costs ([pricing] unpriced):
# "estimate": the price of the vendor's most expensive model; "free": 0;
# "refuse": a 400 before it is sent (see accounting.pricing.Pricing).
UNPRICED_RULES = ("estimate", "free", "refuse")


@dataclass(frozen=True, slots=True)
class PricingConfig:
    """The [pricing] table. The price file itself is server.prices."""

    unpriced: str = "estimate"


@dataclass(frozen=True, slots=True)
class DashboardConfig:
    """The [dashboard] table: the web dashboard's own listener, never the
    proxy's port."""

    # "HOST:PORT"; "" turns the dashboard off.
    listen: str = "127.0.0.1:8788"
    # Its own certificate and key (both or neither); without them, plain HTTP.
    tls_cert: str = ""
    tls_key: str = ""
    # Seconds a sign-in lasts, from the moment it was made.
    session_ttl: float = 8 * 3600.0


# What an [[alert]] may ask to hear of (its `events`; hubcore.ops.alerts
# raises them). A group name ("budget", "key", "upstream", "usage") stands
# for every kind in it.
ALERT_EVENTS = (
    "budget.threshold",      # a budget's spend passed one of its thresholds
    "key.dead",              # the vendor refused a key (401/403)
    "key.circuit_open",      # a key's circuit opened after failures in a row
    "upstream.unavailable",  # every key of an upstream cooling, open, dead or disabled
    "upstream.failover",     # a request moved to an upstream of lower priority
    "upstream.recovered",    # an upstream failed over from, or unavailable, has a usable key again
    "usage.degraded",        # usage rows going to the spool, the queue above 80%, database errors
    "shared.degraded",       # [shared] Redis unreachable: limits enforced locally (or refused)
    "shared.recovered",      # [shared] Redis answers again: limits shared again
)
ALERT_FORMATS = ("json", "slack")


@dataclass(frozen=True, slots=True)
class AlertConfig:
    """One [[alert]]: where alerts go and which. The URL is a secret (a
    Slack webhook's path is its key): never in a repr, a log or an error;
    the alert is named by `label`."""

    url: str = field(repr=False)
    # How logs, metrics and `hubcore alert test` name it: `name`, else "alert[N]".
    label: str = ""
    name: str = ""
    format: str = "json"
    events: tuple[str, ...] = ALERT_EVENTS
    # Seconds during which a second alert with the same key (the same
    # budget threshold, the same key's state) is not sent again.
    min_interval: float = 600.0
    # Seconds one delivery may take, connect to last byte of the answer.
    timeout: float = 5.0
    # Deliveries after the first that failed (no answer, 5xx, 408, 429);
    # the n-th waits retry_backoff x 2^(n-1) seconds first.
    retries: int = 2
    retry_backoff: float = 1.0


# What an instance does while Redis cannot be reached ([shared] on_failure):
# "local": enforce each limit divided by the live-instance count from its own
# counters; "closed": refuse requests with a 503 until Redis is back.
ON_FAILURE = ("local", "closed")
REDIS_SCHEMES = ("redis", "rediss")


@dataclass(frozen=True, slots=True)
class SharedConfig:
    """The [shared] table: the Redis through which several hub instances
    (machines, or the workers of one) share rate windows, concurrency slots,
    budget spend, key states and session affinity (hubcore.shared). Without
    `redis` nothing is shared and nothing of it runs."""

    # "redis://[USER@]HOST[:PORT][/DB]", "rediss://" for TLS. Kept without
    # its password, so that it may be printed; see redis_address().
    redis: str = ""
    # From the `password` field (literal, "env:NAME" or "file:/path") or
    # the URL's own; never printed.
    password: str = field(default="", repr=False)
    # CA bundle for a rediss:// server's certificate; empty: the system store.
    ca_file: str = ""
    # Seconds any one call to Redis may take, connecting included, before the
    # hub gives up on it and enforces locally (or refuses: on_failure). A
    # round trip on a LAN takes well under a millisecond; 50 ms bounds what
    # a stalled Redis (a fork, swap, a slow script) adds to a request.
    timeout: float = 0.05
    on_failure: str = "local"
    # Seconds between an instance's announcements of itself; one not heard
    # of for instance_ttl seconds no longer counts as alive.
    heartbeat_interval: float = 1.0
    instance_ttl: float = 5.0
    # Seconds a concurrency slot outlives its instance's last renewal (one
    # every lease_ttl / 3 while its request runs): an instance that dies
    # holding slots gives them back after this long.
    lease_ttl: float = 30.0
    # Every Redis key the hub writes starts with this and a colon, so that
    # several hubs (or other applications) may share one Redis.
    prefix: str = "hubcore"
    # Connections to Redis at most; a call that finds them all busy waits
    # for one within `timeout`.
    max_connections: int = 64
    # Writes sent off the request path (releases, charges, key states,
    # sessions) held while Redis is unreachable; past it the oldest go.
    queue_max: int = 100_000


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstreams: tuple[UpstreamConfig, ...] = ()
    pricing: PricingConfig = field(default_factory=PricingConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    shared: SharedConfig = field(default_factory=SharedConfig)
    source: str = "<built-in defaults>"
    alerts: tuple[AlertConfig, ...] = ()

    @property
    def spool_path(self) -> str:
        if self.server.spool:
            return self.server.spool
        if is_postgres(self.server.database):
            return PG_SPOOL
        return self.server.database + ".spool"


# The spool of a hub on PostgreSQL when server.spool names none: in the
# working directory, as the SQLite default database is.
PG_SPOOL = "hubcore-usage.spool"


def locate(path: str | None, env: dict[str, str], system: str = SYSTEM_CONFIG) -> str | None:
    """The config file a command reads: `path` (--config), else
    $HUBCORE_CONFIG, else `system` when it exists; None: the built-in
    defaults. One function for `serve` and every other command, so that a
    management command finds the database the running hub uses."""
    if path:
        return path
    if env.get("HUBCORE_CONFIG"):
        return env["HUBCORE_CONFIG"]
    # exists(), not readable: a config the user may not read is an error
    # that names it, never a silent fall-back to the defaults.
    return system if os.path.exists(system) else None


def load(path: str | None = None, env: dict[str, str] | None = None, *, system: str = SYSTEM_CONFIG) -> Config:
    """The config from the file `locate` finds, else the built-in defaults."""
    env = dict(os.environ) if env is None else env
    found = locate(path, env, system)
    if found is None:
        return defaults(env)
    return parse(_read(found), source=found, env=env)


def load_server(path: str | None = None, env: dict[str, str] | None = None, *, system: str = SYSTEM_CONFIG) -> ServerConfig:
    """Only the [server] table, checked as `load` checks it: for commands
    that must not resolve vendor keys (under systemd they live in a
    credentials directory only the service can see)."""
    env = dict(os.environ) if env is None else env
    found = locate(path, env, system)
    if found is None:
        return ServerConfig()
    data = _read(found)
    _reject_unknown(data, TOP_LEVEL, found, "")
    return parse_server(data.get("server", {}), found, env)


def load_alerts(path: str | None = None, env: dict[str, str] | None = None, *, system: str = SYSTEM_CONFIG) -> tuple[AlertConfig, ...]:
    """Only the [[alert]] entries, checked as `load` checks them: for
    `hubcore alert test`, which must not resolve vendor keys."""
    env = dict(os.environ) if env is None else env
    found = locate(path, env, system)
    if found is None:
        return ()
    data = _read(found)
    _reject_unknown(data, TOP_LEVEL, found, "")
    return parse_alerts(data.get("alert", []), found, env)


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e


def defaults(env: dict[str, str]) -> Config:
    """Built-in defaults: listen on 127.0.0.1:8787, SQLite in the working
    directory, vendor keys from ANTHROPIC_API_KEY / OPENAI_API_KEY."""
    upstreams = []
    for kind, base_url, var in (
        ("anthropic", "https://api.anthropic.com", "ANTHROPIC_API_KEY"),
        ("openai", "https://api.openai.com", "OPENAI_API_KEY"),
    ):
        keys: tuple[KeySpec, ...] = ()
        if env.get(var):
            keys = (KeySpec(secret=env[var].strip(), label=f"{kind}-env"),)
        upstreams.append(UpstreamConfig(name=kind, kind=kind, base_url=base_url, keys=keys))
    return Config(upstreams=tuple(upstreams))


TOP_LEVEL = {"server", "upstream", "pricing", "dashboard", "alert", "shared"}


def parse(data: dict[str, Any], *, source: str, env: dict[str, str]) -> Config:
    _reject_unknown(data, TOP_LEVEL, source, "")
    server = parse_server(data.get("server", {}), source, env)
    raw_upstreams = data.get("upstream", [])
    if not isinstance(raw_upstreams, list):
        raise ConfigError(f"{source}: upstream: must be an array of tables ([[upstream]])")
    upstreams = []
    names = set()
    for i, raw in enumerate(raw_upstreams):
        where = f"upstream[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: {where}: must be a table")
        upstream = _parse_upstream(raw, source, where, env)
        if upstream.name in names:
            raise ConfigError(f"{source}: {where}.name: duplicate upstream name {upstream.name!r}")
        names.add(upstream.name)
        upstreams.append(upstream)
    pricing = _parse_pricing(data.get("pricing", {}), source)
    dashboard = _parse_dashboard(data.get("dashboard", {}), source)
    shared = parse_shared(data.get("shared", {}), source, env)
    if server.workers > 1 and not shared.redis:
        raise ConfigError(
            f"{source}: server.workers: {server.workers} workers need [shared] redis = \"redis://HOST:PORT/DB\": "
            "each worker is a process with its own counters, so without a store they share, every token's "
            "rpm, concurrency and budgets would be multiplied by the number of workers, and a key that "
            "answered 429 through one worker would not rest in the others"
        )
    alerts = parse_alerts(data.get("alert", []), source, env)
    return Config(
        server=server, upstreams=tuple(upstreams), pricing=pricing, dashboard=dashboard, shared=shared, source=source,
        alerts=alerts,
    )


_ALERT_GROUPS = {group: tuple(k for k in ALERT_EVENTS if k.startswith(group + ".")) for group in ("budget", "key", "upstream", "usage", "shared")}
_ALERT_FIELDS = {f.name for f in dataclasses.fields(AlertConfig)} - {"label"}


def parse_alerts(raw: Any, source: str, env: dict[str, str]) -> tuple[AlertConfig, ...]:
    """The [[alert]] array, every entry checked; errors name the entry and
    field, never the URL."""
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: alert: must be an array of tables ([[alert]])")
    alerts = []
    labels = set()
    for i, entry in enumerate(raw):
        alert = _parse_alert(entry, source, f"alert[{i}]", env)
        if alert.label in labels:
            raise ConfigError(f"{source}: alert[{i}].name: duplicate alert name {alert.label!r}")
        labels.add(alert.label)
        alerts.append(alert)
    return tuple(alerts)


def _parse_alert(raw: Any, source: str, where: str, env: dict[str, str]) -> AlertConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where}: must be a table")
    raw = dict(raw)
    _reject_unknown(raw, _ALERT_FIELDS, source, where + ".")
    if "url" not in raw:
        raise ConfigError(f"{source}: {where}.url: required")
    url = resolve_secret(raw.pop("url"), env, f"{source}: {where}.url")
    check_alert_url(url, f"{source}: {where}.url")
    events = _parse_alert_events(raw.pop("events", list(ALERT_EVENTS)), source, where)
    alert: AlertConfig = _build(AlertConfig, {"url": url, **raw}, source, where)
    if alert.name and not GROUP_NAME.fullmatch(alert.name):
        raise ConfigError(f"{source}: {where}.name: {alert.name!r} is not a name ({GROUP_NAME.pattern})")
    if alert.format not in ALERT_FORMATS:
        raise ConfigError(f"{source}: {where}.format: must be {' or '.join(map(repr, ALERT_FORMATS))}, got {alert.format!r}")
    if alert.timeout <= 0:
        raise ConfigError(f"{source}: {where}.timeout: must be positive")
    if not 0 <= alert.retries <= 10:
        raise ConfigError(f"{source}: {where}.retries: must be from 0 to 10, got {alert.retries}")
    return dataclasses.replace(alert, events=events, label=alert.name or where)


def _parse_alert_events(raw: Any, source: str, where: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw or not all(isinstance(e, str) for e in raw):
        raise ConfigError(f'{source}: {where}.events: must be a non-empty array of event kinds, e.g. ["budget", "key.dead"]')
    wanted: set[str] = set()
    for name in raw:
        if name in ALERT_EVENTS:
            wanted.add(name)
        elif name in _ALERT_GROUPS:
            wanted.update(_ALERT_GROUPS[name])
        else:
            known = ", ".join([*_ALERT_GROUPS, *ALERT_EVENTS])
            raise ConfigError(f"{source}: {where}.events: unknown event kind {name!r}; known: {known}")
    return tuple(kind for kind in ALERT_EVENTS if kind in wanted)


def check_alert_url(url: str, where: str) -> None:
    """An http(s) URL with a host; the error never repeats it (it is a secret)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        raise ConfigError(f"{where}: not a URL (its port is not a number)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: expected an http:// or https:// URL with a host")


def _parse_pricing(raw: Any, source: str) -> PricingConfig:
    pricing: PricingConfig = _build(PricingConfig, raw, source, "pricing")
    if pricing.unpriced not in UNPRICED_RULES:
        choices = ", ".join(f'"{rule}"' for rule in UNPRICED_RULES[:-1]) + f' or "{UNPRICED_RULES[-1]}"'
        raise ConfigError(f"{source}: pricing.unpriced: must be {choices}, got {pricing.unpriced!r}")
    return pricing


def _parse_dashboard(raw: Any, source: str) -> DashboardConfig:
    dashboard: DashboardConfig = _build(DashboardConfig, raw, source, "dashboard")
    if dashboard.listen:
        _parse_listen(dashboard.listen, f"{source}: dashboard.listen")
    if bool(dashboard.tls_cert) != bool(dashboard.tls_key):
        raise ConfigError(f"{source}: dashboard.tls_cert / dashboard.tls_key: set both or neither")
    if dashboard.session_ttl <= 0:
        raise ConfigError(f"{source}: dashboard.session_ttl: must be positive")
    return dashboard


def parse_server(raw: Any, source: str, env: dict[str, str] | None = None) -> ServerConfig:
    """The [server] table, every field checked. `env` resolves the database
    password when a connection is made (None: the environment then)."""
    if isinstance(raw, dict) and "ops_socket_mode" in raw:
        raw = {**raw, "ops_socket_mode": file_mode(raw["ops_socket_mode"], f"{source}: server.ops_socket_mode")}
    if isinstance(raw, dict) and "workers" in raw:
        raw = {**raw, "workers": worker_count(raw["workers"], f"{source}: server.workers")}
    server: ServerConfig = _build(ServerConfig, raw, source, "server")
    if server.log_format not in ("text", "json"):
        raise ConfigError(f'{source}: server.log_format: must be "text" or "json"')
    if server.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{source}: server.log_level: must be debug, info, warning or error")
    _parse_listen(server.listen, f"{source}: server.listen")
    try:
        zone(server.budget_timezone)
    except ValueError:
        raise ConfigError(f"{source}: server.budget_timezone: unknown time zone {server.budget_timezone!r}") from None
    if bool(server.tls_cert) != bool(server.tls_key):
        raise ConfigError(f"{source}: server.tls_cert / server.tls_key: set both or neither")
    for name in ("max_header_bytes", "max_body_bytes", "max_connections", "usage_queue_max",
                 "max_unauthenticated_connections", "max_body_bytes_in_flight"):
        if getattr(server, name) <= 0:
            raise ConfigError(f"{source}: server.{name}: must be positive")
    for name in ("max_connections_per_address", "min_body_rate", "linger_bytes", "linger_timeout",
                 "metrics_max_series", "pg_statement_cache_size"):
        if getattr(server, name) < 0:
            raise ConfigError(f"{source}: server.{name}: must not be negative")
    retention = server.usage_retention_days
    if not math.isfinite(retention):
        raise ConfigError(f"{source}: server.usage_retention_days: must be a number of days (0: keep every row)")
    if 0 < retention < USAGE_RETENTION_MIN_DAYS:
        raise ConfigError(
            f"{source}: server.usage_retention_days: {retention:g} is too short: monthly budgets are rebuilt at "
            f"start from the month's usage rows, so keep at least {USAGE_RETENTION_MIN_DAYS} days (0: keep every row)"
        )
    return _database_target(server, source, env)


def _database_target(server: ServerConfig, source: str, env: dict[str, str] | None) -> ServerConfig:
    """server.database as a PgTarget when it is a PostgreSQL URL, checked."""
    if not server.database:
        raise ConfigError(f"{source}: server.database: must not be empty")
    if not is_postgres(server.database):
        if server.database_password:
            raise ConfigError(f"{source}: server.database_password: only a PostgreSQL database "
                              "(server.database = \"postgresql://...\") takes a password")
        return server
    problem = url_problem(server.database)
    if problem is not None:
        # The URL itself is not repeated: it may hold the password it must not.
        raise ConfigError(f"{source}: server.database: {problem}")
    if server.pg_pool_size < 1:
        raise ConfigError(f"{source}: server.pg_pool_size: must be at least 1")
    where = f"{source}: server.database_password"
    if server.database_password.startswith("file:") or server.database_password.startswith("env:"):
        if server.database_password in ("file:", "env:"):
            raise ConfigError(f"{where}: names no file or variable")

    def resolve(ref: str) -> str:
        return resolve_secret(ref, dict(os.environ) if env is None else env, where)

    target = PgTarget(
        server.database, server.database_password, statement_cache_size=server.pg_statement_cache_size,
        pool_size=server.pg_pool_size, resolve=resolve,
    )
    return dataclasses.replace(server, database=target)


# More workers than this is a typo (a port number, a byte count).
MAX_WORKERS = 1024


def worker_count(value: Any, where: str) -> int:
    """[server] workers: a whole number from 1, or "auto" for one per core
    this process may run on (its CPU affinity, which a container's cpuset
    narrows, not the machine's count)."""
    if value == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_WORKERS:
        raise ConfigError(f'{where}: must be a whole number from 1 to {MAX_WORKERS} or "auto", got {value!r}')
    return value


def mask_url(url: str) -> str:
    """`url` with its password, if any, as "***": for every message that quotes it."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where [shared] redis points, as the client connects to it."""

    tls: bool
    host: str
    port: int
    db: int
    username: str | None


def redis_address(url: str, where: str = "shared.redis") -> RedisAddress:
    """The parts of a redis:// or rediss:// URL; ConfigError naming `where`
    (and the URL, its password masked) when it is not one."""
    shown = mask_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port or 6379
    except ValueError as e:
        raise ConfigError(f"{where}: {shown!r} is not a URL: {e}") from None
    if parts.scheme not in REDIS_SCHEMES or not parts.hostname:
        raise ConfigError(f'{where}: expected "redis://HOST:PORT/DB" (or rediss:// for TLS), got {shown!r}')
    if parts.query or parts.fragment:
        raise ConfigError(f"{where}: {shown!r}: options after ? or # are not read; the other [shared] fields set them")
    db_text = parts.path.strip("/") or "0"
    if not db_text.isdigit():
        raise ConfigError(f"{where}: {shown!r}: the database after the host must be a number, e.g. /0")
    return RedisAddress(
        tls=parts.scheme == "rediss", host=parts.hostname, port=port, db=int(db_text),
        username=unquote(parts.username) if parts.username else None,
    )


def parse_shared(raw: Any, source: str, env: dict[str, str]) -> SharedConfig:
    """The [shared] table, every field checked; the password, from the URL
    or the `password` field, is kept apart from the URL."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: shared: must be a table")
    raw = dict(raw)
    url = raw.pop("redis", "")
    password_ref = raw.pop("password", None)
    shared: SharedConfig = _build(SharedConfig, raw, source, "shared", exclude={"redis", "password"})
    if not isinstance(url, str):
        raise ConfigError(f"{source}: shared.redis: expected str, got {type(url).__name__}")
    if not url:
        if raw or password_ref is not None:
            named = ", ".join(sorted([*raw, *(["password"] if password_ref is not None else [])]))
            raise ConfigError(f"{source}: shared.redis: required: [shared] sets {named} but names no Redis to share through")
        return shared
    if url.startswith(("env:", "file:")):
        # The whole URL may hold the password (REDIS_URL as hosts hand it out).
        url = resolve_secret(url, env, f"{source}: shared.redis")
    redis_address(url, f"{source}: shared.redis")
    parts = urlsplit(url)
    password = unquote(parts.password) if parts.password else ""
    if password_ref is not None:
        if password:
            raise ConfigError(f"{source}: shared.password: the URL in shared.redis has a password too; set it in one place")
        password = resolve_secret(password_ref, env, f"{source}: shared.password")
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        url = parts._replace(netloc=f"{parts.username}@{host}" if parts.username else host).geturl()
    where = f"{source}: shared"
    for name in ("timeout", "heartbeat_interval", "instance_ttl", "lease_ttl"):
        value = getattr(shared, name)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{where}.{name}: must be a positive number of seconds, got {value!r}")
    if shared.instance_ttl <= shared.heartbeat_interval:
        raise ConfigError(
            f"{where}.instance_ttl: must be longer than heartbeat_interval ({shared.heartbeat_interval:g} s; "
            "three times is usual), or a live instance drops out of the count between two beats"
        )
    if shared.lease_ttl < 10 * shared.timeout:
        raise ConfigError(
            f"{where}.lease_ttl: must be at least ten times timeout ({shared.timeout:g} s): slots are renewed "
            "every lease_ttl / 3, and a renewal may take up to timeout"
        )
    if shared.on_failure not in ON_FAILURE:
        raise ConfigError(f'{where}.on_failure: must be "local" or "closed", got {shared.on_failure!r}')
    if not re.fullmatch(r"[A-Za-z0-9_.{}-]{1,64}", shared.prefix):
        raise ConfigError(f"{where}.prefix: 1 to 64 of the letters, digits, '_', '.', '-', '{{' and '}}', got {shared.prefix!r}")
    for name in ("max_connections", "queue_max"):
        if getattr(shared, name) < 1:
            raise ConfigError(f"{where}.{name}: must be at least 1")
    if shared.ca_file and not url.startswith("rediss:"):
        raise ConfigError(f"{where}.ca_file: only read for a rediss:// (TLS) URL")
    return dataclasses.replace(shared, redis=url, password=password)


def file_mode(value: Any, where: str) -> int:
    """A permission mode written as an octal string ("0660") or a TOML octal
    integer (0o660). A TOML integer is decimal, so `660` means 0o1224: one
    above 0o777 is refused with the spelling that was meant."""
    fix = 'write an octal mode such as 0o660 or "0660"'
    if isinstance(value, str):
        digits = value.strip().lower().removeprefix("0o")
        if not re.fullmatch(r"[0-7]{1,4}", digits) or int(digits, 8) > 0o777:
            raise ConfigError(f"{where}: {value!r} is not a file mode; {fix}")
        return int(digits, 8)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{where}: expected an octal mode, got {type(value).__name__}; {fix}")
    if 0 <= value <= 0o777:
        return value
    if re.fullmatch(r"[0-7]{3}", str(value)):
        fix = f'write 0o{value} or "0{value}"'
    raise ConfigError(f"{where}: {value} is not a file mode (a TOML integer is decimal: {value} is {value:#o}); {fix}")


def zone(tz: str) -> ZoneInfo:
    """The IANA time zone `tz`; ValueError naming it when it does not exist."""
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ValueError(f"unknown timezone {tz!r} (use an IANA name such as 'UTC' or 'Europe/Berlin')") from e


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def _parse_listen(listen: str, where: str) -> None:
    try:
        host, port = parse_listen(listen)
    except ValueError:
        raise ConfigError(f'{where}: expected "HOST:PORT", got {listen!r}') from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{where}: port {port} out of range")


def with_listen(config: Config, listen: str, where: str = "--listen") -> Config:
    """`config` listening on `listen` instead (`serve --listen`)."""
    _parse_listen(listen, where)
    return dataclasses.replace(config, server=dataclasses.replace(config.server, listen=listen))


_POLICY_FIELDS = {f.name for f in dataclasses.fields(KeyPolicy)}
_UPSTREAM_FIELDS = {f.name for f in dataclasses.fields(UpstreamConfig)} - {"policy"} | _POLICY_FIELDS


def _parse_upstream(raw: dict[str, Any], source: str, where: str, env: dict[str, str]) -> UpstreamConfig:
    raw = dict(raw)
    # Before the required fields: `base_ur` is a typo of base_url, not a
    # missing base_url.
    _reject_unknown(raw, _UPSTREAM_FIELDS, source, where + ".")
    for required in ("name", "kind", "base_url"):
        if required not in raw:
            raise ConfigError(f"{source}: {where}.{required}: required")
    name = raw["name"]
    if raw["kind"] not in UPSTREAM_KINDS:
        raise ConfigError(f"{source}: {where}.kind: must be one of {', '.join(UPSTREAM_KINDS)}")
    parts = urlsplit(str(raw["base_url"]))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{source}: {where}.base_url: expected http(s)://host[:port], got {raw['base_url']!r}")
    if parts.path.rstrip("/").endswith("/v1"):
        # Refused rather than stripped: the SDKs' base URLs end in /v1, the
        # hub's upstream origins do not, and every call would otherwise go
        # to /v1/v1/... and come back 404.
        fixed = raw["base_url"].rstrip("/").removesuffix("/v1")
        raise ConfigError(
            f"{source}: {where}.base_url: {raw['base_url']!r} ends in /v1, which the hub adds itself "
            f"(clients' paths start with /v1); write {fixed!r}"
        )
    raw_keys = raw.pop("keys", [])
    if not isinstance(raw_keys, list):
        raise ConfigError(f"{source}: {where}.keys: must be an array")
    models = _parse_models(raw.pop("models", []), source, where)
    model_map = _parse_model_map(raw.pop("model_map", {}), source, where)
    policy_raw = {k: raw.pop(k) for k in list(raw) if k in _POLICY_FIELDS}
    try:
        policy = _build(KeyPolicy, policy_raw, source, where)
    except ValueError as e:
        raise ConfigError(f"{source}: {where}: {e}") from None
    upstream = _build(UpstreamConfig, raw, source, where, exclude={"keys", "policy", "models", "model_map"})
    keys = []
    labels = set()
    for j, raw_key in enumerate(raw_keys):
        spec = _parse_key(raw_key, source, f"{where}.keys[{j}]", f"{name}-{j + 1}", env)
        if spec.label in labels:
            raise ConfigError(f"{source}: {where}.keys[{j}].label: duplicate label {spec.label!r}")
        labels.add(spec.label)
        keys.append(spec)
    if upstream.max_attempts < 1:
        raise ConfigError(f"{source}: {where}.max_attempts: must be at least 1")
    if upstream.probe_timeout <= 0:
        # 0 would mean no timeout: a probe the vendor never answers would
        # keep its key out of service for good.
        raise ConfigError(f"{source}: {where}.probe_timeout: must be positive")
    if upstream.weight < 1:
        raise ConfigError(f"{source}: {where}.weight: must be at least 1")
    if not math.isfinite(upstream.cost_multiplier):
        raise ConfigError(f"{source}: {where}.cost_multiplier: must be a finite number >= 0")
    if not GROUP_NAME.fullmatch(upstream.group) or upstream.group.lower() == "none":
        # "none" is what `--groups none` clears a restriction with: no
        # token could name such a group.
        raise ConfigError(f"{source}: {where}.group: {upstream.group!r} is not a group name "
                          f"({GROUP_NAME.pattern}, and not \"none\")")
    if upstream.failback not in FAILBACKS:
        raise ConfigError(f"{source}: {where}.failback: must be {' or '.join(map(repr, FAILBACKS))}")
    return dataclasses.replace(upstream, keys=tuple(keys), policy=policy, models=models, model_map=model_map)


# Group names, as tokens, users and projects name them too.
GROUP_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
FAILBACKS = ("sticky", "immediate")


def _parse_models(raw: Any, source: str, where: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(m, str) and m for m in raw):
        raise ConfigError(f'{source}: {where}.models: must be an array of model ids or globs, e.g. ["claude-sonnet-*"]')
    return tuple(raw)


def _parse_model_map(raw: Any, source: str, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, dict):
        raise ConfigError(f'{source}: {where}.model_map: must be a table, e.g. {{ "claude-sonnet-4-6" = "relay-sonnet" }}')
    pairs = []
    for model, target in raw.items():
        if not model:
            raise ConfigError(f"{source}: {where}.model_map: a client model id must not be empty")
        if not isinstance(target, str) or not target.strip():
            raise ConfigError(f"{source}: {where}.model_map.{model}: the upstream's model id must be a non-empty string")
        pairs.append((model, target))
    return tuple(pairs)


_KEY_FIELDS = {"key", "label", "weight", "priority", "workspace", "org"}


def _parse_key(raw: Any, source: str, where: str, default_label: str, env: dict[str, str]) -> KeySpec:
    if isinstance(raw, str):
        raw = {"key": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where}: must be a string or a table")
    _reject_unknown(raw, _KEY_FIELDS, source, where + ".")
    if "key" not in raw:
        raise ConfigError(f"{source}: {where}.key: required")
    secret = resolve_secret(raw["key"], env, f"{source}: {where}.key")
    weight = raw.get("weight", 1)
    priority = raw.get("priority", 0)
    if not isinstance(weight, int) or weight < 1:
        raise ConfigError(f"{source}: {where}.weight: must be an integer >= 1")
    if not isinstance(priority, int):
        raise ConfigError(f"{source}: {where}.priority: must be an integer")
    for name in ("label", "workspace", "org"):
        if name in raw and not isinstance(raw[name], str):
            raise ConfigError(f"{source}: {where}.{name}: must be a string")
    return KeySpec(
        secret=secret,
        label=raw.get("label", default_label),
        weight=weight,
        priority=priority,
        workspace=raw.get("workspace"),
        org=raw.get("org"),
    )


_VAR = re.compile(r"\$(\w+)|\$\{(\w+)\}")


def resolve_secret(ref: Any, env: dict[str, str], where: str) -> str:
    """Resolve a key reference: "env:NAME", "file:/path" ($VAR expanded, for
    systemd's $CREDENTIALS_DIRECTORY), or a literal key. The error messages
    name the reference, never the secret."""
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{where}: must be a non-empty string")
    if ref.startswith("env:"):
        name = ref[4:]
        value = env.get(name, "").strip()
        if not value:
            raise ConfigError(f"{where}: environment variable {name} is not set or empty")
        return value
    if ref.startswith("file:"):
        def expand(m: re.Match[str]) -> str:
            name = m.group(1) or m.group(2)
            if name not in env:
                hint = ""
                if name == "CREDENTIALS_DIRECTORY":
                    # systemd sets it for the service alone (LoadCredential=).
                    hint = ("; systemd sets it for the service only: outside it, name the directory that holds "
                            "the credential files, e.g. CREDENTIALS_DIRECTORY=/etc/hubcore/keys")
                raise ConfigError(f"{where}: ${name} is not set (in {ref!r}){hint}")
            return env[name]

        path = _VAR.sub(expand, ref[5:])
        try:
            value = Path(path).read_text().strip()
        except OSError as e:
            raise ConfigError(f"{where}: cannot read key file {path}: {e.strerror}") from e
        if not value:
            raise ConfigError(f"{where}: key file {path} is empty")
        return value
    return ref.strip()


def _reject_unknown(raw: dict[str, Any], known: set[str], source: str, prefix: str) -> None:
    for name in raw:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            guess = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{source}: {prefix}{name}: unknown field{guess}")


def _build(cls: Any, raw: Any, source: str, where: str, exclude: frozenset[str] | set[str] = frozenset()) -> Any:
    """Build dataclass `cls` from a TOML table, checking names and types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where}: must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in exclude}
    _reject_unknown(raw, set(fields), source, where + ".")
    values = {}
    for name, value in raw.items():
        expected = fields[name].type
        expected = expected if isinstance(expected, str) else expected.__name__
        if expected == "float" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        ok = {
            "str": isinstance(value, str),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, float),
            "bool": isinstance(value, bool),
        }.get(expected, True)
        if not ok:
            raise ConfigError(f"{source}: {where}.{name}: expected {expected}, got {type(value).__name__}")
        if expected == "float" and value < 0:
            raise ConfigError(f"{source}: {where}.{name}: must not be negative")
        values[name] = value
    return cls(**values)
