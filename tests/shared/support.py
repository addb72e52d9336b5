"""Hubs in one test process for the shared-state tests: SharedState
instances, each with its own client, as two hubs would have."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from hubcore import config as config_mod
from hubcore.config import SharedConfig
from hubcore.governance.limits import Limits
from hubcore.governance.tokens import Principal
from hubcore.shared.redis_state import Link, SharedState

# Generous for the tests that check what is shared: on a loaded 2-core
# machine a round trip can take tens of ms. The tests of the bound set
# their own tiny timeout.
SHARED_TIMEOUT = 0.5


def shared_config(url: str, **fields: Any) -> SharedConfig:
    data = {"redis": url, "timeout": SHARED_TIMEOUT, "heartbeat_interval": 0.2, "instance_ttl": 1.0, **fields}
    return config_mod.parse({"shared": data}, source="<test>", env={}).shared


def principal(token_id: int = 1, user: str = "alice", project: str | None = None, **limits: Any) -> Principal:
    return Principal(token_id, user, project, "hc-test", limits=Limits(**limits) if limits else None)


@asynccontextmanager
async def hubs(config: SharedConfig, count: int = 2, *, linked: bool = True,
               **options: Any) -> AsyncIterator[list[SharedState]]:
    """`count` instances, started; closed at the end. `linked`: each with
    its link up first. Start returns degraded when Redis answers its first
    calls late (a loaded machine, a test's tiny timeout), and comes back
    at the next beat; a test of what is shared must not begin before."""
    states = [SharedState(config, instance_id=f"hub{i}", **options) for i in range(count)]
    try:
        for state in states:
            await state.start()
        if linked:
            await until(lambda: all(state.link is Link.SHARED for state in states), timeout=10.0)
        yield states
    finally:
        for state in states:
            await state.close()


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def counted_instances(states: list[SharedState]) -> None:
    """Until every instance has counted all of them (a beat each)."""
    await until(lambda: all(state.instances == len(states) for state in states))


async def shared_again(state: SharedState) -> None:
    await until(lambda: state.link is Link.SHARED)
