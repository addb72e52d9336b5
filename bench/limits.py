"""Cost of the limits on the request path: admit + release + charge per request
with 10,000 tokens loaded, next to the token-table dict lookup every request
already pays.

Run `python -m bench.limits` (or `--quick`). Prints a markdown table; asserts
nothing: the numbers are for reading, side by side from one run.
"""
from __future__ import annotations

import argparse
import hashlib
import random
import time
from collections.abc import Callable

from hubcore.governance.limiter import Limiter, Refused
from hubcore.governance.limits import Limits
from hubcore.governance.storage import ScopeLimits
from hubcore.governance.tokens import Principal

SEED = 20260301
TOKENS = 10_000
USERS = 1_000
PROJECTS = 100
START = 1_772_618_400.0  # 2026-03-04T10:00:00Z
# Fake time advances this much per request: 2,000 requests/s across the hub.
STEP = 0.0005
USD = 1_000_000


def every_limit(seed: int) -> Limits:
    # Generous values, so that the measured path is the admitting one.
    return Limits(
        rpm=10_000, concurrency=64,
        budget_5h=10_000 * USD, budget_day=10_000 * USD, budget_week=50_000 * USD,
        budget_month=100_000 * USD, budget_total=1_000_000 * USD,
        models=("claude-sonnet-*", "claude-opus-*", "claude-haiku-*", "gpt-5*"),
        expires_at=START + 365 * 86400 + seed,
    )


def principals(limited: bool) -> list[Principal]:
    return [
        Principal(
            token_id=i, user=f"user-{i % USERS}", project=f"project-{i % PROJECTS}" if i % 4 else None,
            prefix="hc-bench", limits=every_limit(i) if limited else None,
        )
        for i in range(TOKENS)
    ]


def scope_limits(limited: bool) -> ScopeLimits:
    if not limited:
        return ScopeLimits()
    return ScopeLimits(
        users={f"user-{i}": every_limit(i) for i in range(USERS)},
        projects={f"project-{i}": every_limit(i) for i in range(PROJECTS)},
    )


def bench_lookup(n: int) -> float:
    """The baseline: the token table's dict lookup by hash (hash not included)."""
    table = {hashlib.sha256(b"hc-%d" % i).digest(): i for i in range(TOKENS)}
    keys = list(table)
    get = table.get
    t0 = time.perf_counter_ns()
    for i in range(n):
        get(keys[i % TOKENS])
    return (time.perf_counter_ns() - t0) / n / 1000


def bench_limiter(n: int, limited: bool, overlap: int = 4) -> float:
    """admit + release + charge per request; `overlap` requests in flight."""
    rng = random.Random(SEED)
    people = principals(limited)
    limiter = Limiter("Europe/Berlin", clock=lambda: START)
    limiter.update(scope_limits(limited))
    costs = [rng.randint(1, 50_000) for _ in range(1024)]
    models = ["claude-sonnet-4-6", "claude-opus-4-6", "claude-haiku-4-5", "gpt-5"]
    admit, charge = limiter.admit, limiter.charge
    ring: list = [None] * overlap
    t0 = time.perf_counter_ns()
    for i in range(n):
        now = START + i * STEP
        p = people[i % TOKENS]
        admission = admit(p, models[i & 3], now)
        slot = i % overlap
        previous = ring[slot]
        if previous is not None:
            previous[0].release()
            q = previous[1]
            charge(q.token_id, q.user, q.project, costs[i & 1023], now)
        ring[slot] = (admission, p)
    return (time.perf_counter_ns() - t0) / n / 1000


def bench_refused(n: int) -> float:
    """A token over its rpm: every request is refused (the exception path)."""
    limiter = Limiter(clock=lambda: START)
    p = Principal(token_id=1, user="u", project=None, prefix="hc-bench", limits=Limits(rpm=1))
    limiter.admit(p, None, START)
    t0 = time.perf_counter_ns()
    for i in range(n):
        try:
            limiter.admit(p, None, START + 1 + i * 1e-6)
        except Refused:
            pass
    return (time.perf_counter_ns() - t0) / n / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    args = parser.parse_args()
    n = 50_000 if args.quick else 400_000
    runs: list[tuple[str, Callable[[], float]]] = [
        ("baseline: token-table dict lookup", lambda: bench_lookup(n)),
        ("admit+release+charge, no limits set", lambda: bench_limiter(n, False)),
        ("admit+release+charge, every limit on token, user and project", lambda: bench_limiter(n, True)),
        ("refused (rpm), message and exception built", lambda: bench_refused(n // 4)),
    ]
    print(f"{TOKENS:,} tokens, {USERS:,} users, {PROJECTS} projects; {n:,} requests per row\n")
    print("| path | µs/request |")
    print("|---|---:|")
    for name, run in runs:
        best = min(run() for _ in range(3))
        print(f"| {name} | {best:.2f} |")


if __name__ == "__main__":
    main()
