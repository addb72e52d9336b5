"""One configured upstream as the hub runs it: its connection pool, its key
ring, the prober of its open circuits, and the head lines every request to it
carries. A reload hands it a new config, which it applies whole.

Theory of operation: applying a reload. `prepare` builds what a new config
needs and can fail to build (a pool whose TLS context loads `ca_file`) and
changes nothing, so the app can prepare every upstream before it applies any:
a config that fails for one applies to none. `apply` then swaps it all in at
once, between two callbacks of the loop. A request reads `pool`,
`host_header`, `base_path` and `auth_header` afresh for every attempt, so its
next attempt goes to the new origin; an attempt already sent finishes on its
connection of the old pool, which the old pool then closes instead of
keeping it for reuse (Pool.retire). What a request read of `config` when it
started (its attempts and deadline) stays as it read it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hubcore import store
from hubcore.config import KeyPolicy, KeySpec, UpstreamConfig
from hubcore.errors import ConfigError
from hubcore.gateway.exchange_core import UpstreamRuntimeCore
from hubcore.gateway.probe import Prober
from hubcore.http.client import Pool, client_ssl_context
from hubcore.http.deadlines import sweep_interval
from hubcore.routing.keys import KeyRing


def pool_settings(config: UpstreamConfig) -> tuple[Any, ...]:
    """What a pool is built from: the origin, TLS, connect and idle settings.
    A reload that changes any of them gets a new pool."""
    ca_file = config.ca_file if config.scheme == "https" else ""
    return (
        config.scheme, config.host, config.port, ca_file,
        config.connect_timeout, config.pool_max_idle, config.pool_idle_timeout,
    )


def sweep_every(config: UpstreamConfig) -> float:
    """How often the pool looks at its connections' deadlines: often enough
    for the shortest timeout that requests and probes on it use."""
    return sweep_interval(
        config.first_byte_timeout, config.stream_idle_timeout, config.pool_idle_timeout, config.probe_timeout,
    )


def ring_policy(config: UpstreamConfig) -> KeyPolicy:
    """The key ring's policy: the configured one, with no circuit paused for
    longer than `health_check_interval` when that is set, so the hub's probe
    finds an upstream back within that interval of its return without a
    user's request having to try it."""
    policy, interval = config.policy, config.health_check_interval
    if interval <= 0:
        return policy
    return dataclasses.replace(
        policy,
        circuit_pause=min(policy.circuit_pause, interval),
        circuit_pause_max=min(policy.circuit_pause_max, interval),
        circuit_probe_pause=min(policy.circuit_probe_pause, interval),
        circuit_probe_pause_max=min(policy.circuit_probe_pause_max, interval),
    )


def new_pool(config: UpstreamConfig, loop: asyncio.AbstractEventLoop) -> Pool:
    """A pool for `config`'s origin (OSError, ssl.SSLError among them, when
    its `ca_file` cannot be loaded)."""
    ssl_context = client_ssl_context(config.ca_file) if config.scheme == "https" else None
    return Pool(
        loop,
        config.host,
        config.port,
        ssl_context,
        connect_timeout=config.connect_timeout,
        max_idle=config.pool_max_idle,
        idle_timeout=config.pool_idle_timeout,
        sweep_every=sweep_every(config),
    )


def config_changes(old: UpstreamConfig, new: UpstreamConfig) -> list[str]:
    """What differs between two configs of one upstream, a phrase per field
    or key, for the reload's log and answer. Keys are named by their label;
    no secret, and no credentials a base_url may carry, is ever shown."""
    changes = []
    for f in dataclasses.fields(UpstreamConfig):
        if f.name in ("keys", "policy"):
            continue
        before, after = getattr(old, f.name), getattr(new, f.name)
        if before != after:
            if f.name == "base_url":
                before, after = _without_userinfo(before), _without_userinfo(after)
            changes.append(f"{f.name} {_show(before)} -> {_show(after)}")
    for f in dataclasses.fields(KeyPolicy):
        before, after = getattr(old.policy, f.name), getattr(new.policy, f.name)
        if before != after:
            changes.append(f"{f.name} {_show(before)} -> {_show(after)}")
    changes.extend(_key_changes(old.keys, new.keys))
    return changes


def _key_changes(old: tuple[KeySpec, ...], new: tuple[KeySpec, ...]) -> list[str]:
    before = {spec.label: spec for spec in old}
    after = {spec.label: spec for spec in new}
    changes = [f"key {label} added" for label in after if label not in before]
    changes += [f"key {label} removed" for label in before if label not in after]
    for label, spec in after.items():
        was = before.get(label)
        if was is None:
            continue
        if was.secret != spec.secret:
            changes.append(f"key {label}: new secret")
        for f in dataclasses.fields(KeySpec):
            if f.name != "secret" and getattr(was, f.name) != getattr(spec, f.name):
                changes.append(f"key {label}: {f.name} {_show(getattr(was, f.name))} -> {_show(getattr(spec, f.name))}")
    return changes


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _show(value: object) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}"
    return repr(value)


# -- the operator's key switches (the key_switches table) ------------------------------


def load_disabled_keys(db: sqlite3.Connection) -> dict[str, set[str]]:
    """The labels the operator disabled, per upstream name (the key_switches table)."""
    disabled: dict[str, set[str]] = {}
    for upstream, label in db.execute("SELECT upstream, label FROM key_switches WHERE enabled = 0"):
        disabled.setdefault(upstream, set()).add(label)
    return disabled


def restore_key_switches(db: sqlite3.Connection, upstreams: Iterable[UpstreamRuntime]) -> None:
    """At start: the keys the operator disabled are disabled again (a reload
    keeps them so: KeyRing.replace_specs)."""
    disabled = load_disabled_keys(db)
    for upstream in upstreams:
        upstream.ring.restore_disabled(disabled.get(upstream.config.name, ()))


def store_key_switches(
    database: str | Path, switches: Iterable[tuple[str, str, bool]], now: float, busy_timeout: float,
    also: Callable[[sqlite3.Connection], object] | None = None,
) -> None:
    """Store (upstream, label, enabled) switches in one transaction, on a
    connection of their own: blocking, for a worker thread. sqlite3.Error
    when the database cannot take them within `busy_timeout` seconds.
    `also` runs in the same transaction (the change's audit row)."""
    conn = store.connect(database)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO key_switches (upstream, label, enabled, changed_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (upstream, label) DO UPDATE SET enabled = excluded.enabled, changed_at = excluded.changed_at",
                [(upstream, label, int(enabled), now) for upstream, label, enabled in switches],
            )
            if also is not None:
                also(conn)
    finally:
        conn.close()


@dataclass(frozen=True, slots=True)
class Reconfig:
    """A new config for one upstream, ready to apply (UpstreamRuntime.prepare)."""

    config: UpstreamConfig
    # The pool for the new origin or settings; None: the current one stays.
    pool: Pool | None
    changes: list[str]


class UpstreamRuntime(UpstreamRuntimeCore):
    """One configured upstream: its connection pool, its key ring, and the
    prober that brings keys with open circuits back (started by the app).
    What each attempt reads of it (its config, pool, ring and head lines,
    `auth_header`) is its core's (gateway.exchange_core)."""

    def __init__(self, config: UpstreamConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.config = config
        self.pool = new_pool(config, loop)
        # Pools a reload replaced whose connections were busy: closed at
        # shutdown if still so.
        self.retired: list[Pool] = []
        self.ring = KeyRing(config.name, list(config.keys), ring_policy(config))
        self.prober = Prober(self, loop)
        self.address(config)

    # -- as the router sees it (routing.router.Candidate) -------------------------

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def priority(self) -> int:
        return self.config.priority

    @property
    def weight(self) -> int:
        return self.config.weight

    @property
    def group(self) -> str:
        return self.config.group

    @property
    def models(self) -> tuple[str, ...]:
        return self.config.models

    @property
    def failback(self) -> str:
        return self.config.failback

    @property
    def in_flight(self) -> int:
        return self.ring.in_flight

    def usable(self) -> bool:
        return self.ring.next_available_in() == 0.0

    # -- reload ------------------------------------------------------------------

    def prepare(self, config: UpstreamConfig) -> Reconfig:
        """Everything `config` needs that can fail, built without changing
        anything: a new pool if the origin, TLS, connect or idle settings
        change (ConfigError if its `ca_file` cannot be loaded)."""
        if (config.name, config.kind) != (self.config.name, self.config.kind):
            raise ValueError(f"upstream {self.config.name!r} cannot become {config.name!r} ({config.kind})")
        pool = None
        if pool_settings(config) != pool_settings(self.config):
            try:
                pool = new_pool(config, self.loop)
            except OSError as e:  # ssl.SSLError is one
                raise ConfigError(
                    f"upstream {config.name!r}: ca_file {config.ca_file!r}: cannot load: {e.strerror or e}"
                ) from e
        return Reconfig(config, pool, config_changes(self.config, config))

    def apply(self, reconfig: Reconfig) -> list[str]:
        """Switch to a prepared config (see the module's theory of operation);
        what changed, a phrase each. The keys are always replaced: keys the
        vendor refused are tried again (KeyRing.replace_specs)."""
        config = reconfig.config
        changes = list(reconfig.changes)
        if reconfig.pool is not None:
            old, self.pool = self.pool, reconfig.pool
            busy = old.retire()
            self.retired = [pool for pool in self.retired if pool.active]
            if busy:
                self.retired.append(old)
            changes.append(f"new connection pool ({busy} requests in flight finish on the old one)")
        else:
            self.pool.sweeper.interval = sweep_every(config)
        self.ring.replace_specs(list(config.keys), ring_policy(config))
        self.address(config)
        self.config = config
        return changes

    # -- lifetime ----------------------------------------------------------------

    def start(self) -> None:
        self.prober.start()

    def close(self) -> None:
        self.prober.close()
        self.pool.close()
        for pool in self.retired:
            pool.close()
        self.retired = []
