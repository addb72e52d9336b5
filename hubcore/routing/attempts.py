"""AttemptChain: the attempts one request took, upstream by upstream and key
by key, as the usage row's `route` ("primary/a:529,backup/c:200"). Pure and
sans-IO: the exchange adds each attempt as it ends and renders once.
"""
from __future__ import annotations

__all__ = ["MAX_ATTEMPTS_SHOWN", "NO_ANSWER_WORDS", "AttemptChain"]

# Attempts written out in a route; the rest are counted (",+3 more"). A
# request's attempts are bounded by max_attempts and its deadline, but a
# misconfigured ring could make dozens: the row stays a few hundred bytes.
MAX_ATTEMPTS_SHOWN = 16

# The word an attempt that got no answer to judge shows in place of a status,
# by the HTTP client's error kind (hubcore.http.client.UpstreamError.kind) or
# by the word itself. Any other text is shown as it is given.
NO_ANSWER_WORDS: dict[str, str] = {
    "connect": "connect",
    "timeout": "timeout",
    "reset": "reset",
    "connect_failed": "connect",
    # closed, reset or unreadable once the request was sent
    "connection_closed": "reset",
    "upstream_error": "reset",
}


class AttemptChain:
    """The attempts of one request, in order.

    Theory of operation: almost every request takes one attempt, so the
    first is held in three slots and rendered with one f-string; a list is
    made only for a second attempt, and holds each later attempt already
    rendered. Past MAX_ATTEMPTS_SHOWN, attempts are only counted.
    """

    __slots__ = ("count", "last_upstream", "_key", "_outcome", "_first_upstream", "_rest")

    def __init__(self) -> None:
        self.count = 0                          # attempts added, shown or not
        self.last_upstream: str | None = None   # the upstream of the latest attempt
        self._first_upstream: str | None = None
        self._key = ""
        self._outcome: int | str = 0
        self._rest: list[str] | None = None     # attempts 2..MAX_ATTEMPTS_SHOWN, rendered

    def add(self, upstream: str, key: str, outcome: int | str) -> str | None:
        """Add an attempt: on `upstream` with the key labelled `key`, ended by
        `outcome`, the HTTP status it was answered with or, with no answer, the
        HTTP client's error kind or its word (NO_ANSWER_WORDS). For an answer
        whose body broke before its first byte went to the client, give the
        error's kind: the status alone would read as a success.

        Returns the upstream the request moved from when this attempt went to
        another upstream than the one before (a failover, or a failback), else
        None.
        """
        if isinstance(outcome, str):
            outcome = NO_ANSWER_WORDS.get(outcome, outcome)
        previous = self.last_upstream
        self.last_upstream = upstream
        count = self.count = self.count + 1
        if count == 1:
            self._first_upstream, self._key, self._outcome = upstream, key, outcome
            return None
        if count <= MAX_ATTEMPTS_SHOWN:
            rest = self._rest
            if rest is None:
                rest = self._rest = []
            rest.append(f"{upstream}/{key}:{outcome}")
        return previous if previous != upstream else None

    def render(self) -> str | None:
        """The route: attempts comma separated, `upstream/key:outcome` each,
        then `+N more` when some were not shown; None before any attempt
        (a request the hub answered by itself)."""
        if not self.count:
            return None
        first = f"{self._first_upstream}/{self._key}:{self._outcome}"
        rest = self._rest
        if rest is None:
            return first
        hidden = self.count - MAX_ATTEMPTS_SHOWN
        if hidden > 0:
            return ",".join([first, *rest, f"+{hidden} more"])
        return ",".join([first, *rest])
