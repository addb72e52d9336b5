"""Session affinity: which key, or which upstream, a session sticks to, so
that its prompt cache (which lives where its requests went) keeps working.
One table per key ring and per router."""
from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

__all__ = ["Affinity"]

T = TypeVar("T")


class Affinity(Generic[T]):
    """Session id -> what it sticks to, for `ttl` seconds after its latest
    request; at most `limit` sessions (0: none kept), least recently used
    dropped first.

    Every touch moves the entry to the end with the same TTL, so the order
    is also the expiry order: expired entries are dropped from the front
    whenever one is looked up, and no timer runs. `entries` is open to the
    key ring's fast path, which reads an entry and its expiry directly.
    """

    __slots__ = ("entries", "limit", "ttl")

    def __init__(self, ttl: float, limit: int) -> None:
        self.entries: OrderedDict[str, tuple[T, float]] = OrderedDict()
        self.ttl = ttl
        self.limit = limit

    def get(self, session_id: str, now: float) -> T | None:
        """What the session sticks to, if its affinity has not lapsed."""
        entries = self.entries
        while entries:
            oldest = next(iter(entries.values()))
            if oldest[1] > now:
                break
            entries.popitem(last=False)
        entry = entries.get(session_id)
        if entry is None or entry[1] <= now:
            return None
        return entry[0]

    def remember(self, session_id: str, value: T, now: float) -> None:
        """The session sticks to `value` for another `ttl` seconds."""
        if self.limit == 0:
            return
        entries = self.entries
        entries[session_id] = (value, now + self.ttl)
        entries.move_to_end(session_id)
        while len(entries) > self.limit:
            entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self.entries)
