"""Server-side dashboard sessions: random ids in memory, each with its own
CSRF token, ended by logout, by their time-to-live or by a restart."""
from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

SESSION_ID_BYTES = 32
CSRF_BYTES = 32
# Sessions held at once; the oldest goes first when a sign-in would pass it
# (a flood of sign-ins with one valid token cannot grow memory without end).
MAX_SESSIONS = 10_000


@dataclass(slots=True)
class Session:
    id: str
    csrf: str
    expires_at: float
    # A developer's: the hub token it was opened with, in memory only (every
    # request looks it up again, so revoking the token ends the session at
    # once) and its user. An operator's: the operator's name.
    token: bytes = b""
    user: str = ""
    operator: str | None = None
    account_version: float = 0.0   # the operator's, at sign-in (admins.account_version)


class Sessions:
    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._by_id: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def open(self, token: bytes = b"", user: str = "", *, operator: str | None = None,
             account_version: float = 0.0) -> Session:
        """A developer's session (token, user) or an operator's (operator)."""
        now = self._clock()
        self._sweep(now)
        while len(self._by_id) >= MAX_SESSIONS:
            del self._by_id[next(iter(self._by_id))]  # dicts keep insertion order: the oldest
        session = Session(
            id=secrets.token_urlsafe(SESSION_ID_BYTES),
            csrf=secrets.token_urlsafe(CSRF_BYTES),
            expires_at=now + self.ttl,
            token=token,
            user=user,
            operator=operator,
            account_version=account_version,
        )
        self._by_id[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._by_id.get(session_id)
        if session is None:
            return None
        if self._clock() >= session.expires_at:
            del self._by_id[session_id]
            return None
        return session

    def close(self, session_id: str) -> None:
        self._by_id.pop(session_id, None)

    def close_operator(self, name: str) -> int:
        """End every session of operator `name` (removed, or its password
        changed); how many there were."""
        ended = [sid for sid, s in self._by_id.items() if s.operator == name]
        for sid in ended:
            del self._by_id[sid]
        return len(ended)

    def _sweep(self, now: float) -> None:
        expired = [sid for sid, s in self._by_id.items() if now >= s.expires_at]
        for sid in expired:
            del self._by_id[sid]


def same_secret(given: str | None, expected: str) -> bool:
    """Whether `given` is `expected`, in time that does not depend on where they differ."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())
