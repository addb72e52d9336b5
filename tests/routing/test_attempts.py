"""AttemptChain: the usage row's `route`, rendered from the attempts a request took."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hubcore.routing.attempts import MAX_ATTEMPTS_SHOWN, AttemptChain


def test_no_attempt_renders_none() -> None:
    chain = AttemptChain()
    assert chain.render() is None
    assert chain.count == 0 and chain.last_upstream is None


def test_one_attempt() -> None:
    chain = AttemptChain()
    assert chain.add("anthropic", "key-a", 200) is None
    assert chain.render() == "anthropic/key-a:200"
    assert chain.count == 1 and chain.last_upstream == "anthropic"


def test_a_failover_chain_in_order() -> None:
    chain = AttemptChain()
    chain.add("primary", "a", 529)
    chain.add("primary", "b", "connect")
    chain.add("backup", "c", 200)
    assert chain.render() == "primary/a:529,primary/b:connect,backup/c:200"
    assert chain.count == 3


def test_add_names_the_upstream_a_request_moved_from() -> None:
    chain = AttemptChain()
    assert chain.add("primary", "a", 529) is None           # the first attempt moved from nowhere
    assert chain.add("primary", "b", 429) is None           # another key, same upstream
    assert chain.add("backup", "c", "timeout") == "primary"
    assert chain.add("primary", "a", 200) == "backup"       # a failback is a move too


@pytest.mark.parametrize(
    ("outcome", "word"),
    [
        # The words themselves, and the HTTP client's error kinds
        # (hubcore.http.client: UpstreamError and its subclasses).
        ("connect", "connect"), ("timeout", "timeout"), ("reset", "reset"),
        ("connect_failed", "connect"), ("connection_closed", "reset"), ("upstream_error", "reset"),
    ],
)
def test_attempts_without_an_answer_say_why_in_one_word(outcome: str, word: str) -> None:
    chain = AttemptChain()
    chain.add("openai", "o1", outcome)
    assert chain.render() == f"openai/o1:{word}"


def test_a_long_chain_is_cut_and_counts_the_rest() -> None:
    chain = AttemptChain()
    for i in range(MAX_ATTEMPTS_SHOWN + 5):
        chain.add("primary", f"k{i}", 529)
    rendered = chain.render()
    assert rendered is not None
    parts = rendered.split(",")
    assert len(parts) == MAX_ATTEMPTS_SHOWN + 1
    assert parts[0] == "primary/k0:529"
    assert parts[MAX_ATTEMPTS_SHOWN - 1] == f"primary/k{MAX_ATTEMPTS_SHOWN - 1}:529"
    assert parts[-1] == "+5 more"
    assert chain.count == MAX_ATTEMPTS_SHOWN + 5


def test_moves_past_the_shown_attempts_are_still_reported() -> None:
    chain = AttemptChain()
    for i in range(MAX_ATTEMPTS_SHOWN):
        chain.add("primary", f"k{i}", 503)
    assert chain.add("backup", "c", 200) == "primary"
    assert chain.last_upstream == "backup"


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(["k1", "k2"]),
                          st.one_of(st.integers(100, 599), st.sampled_from(["connect", "timeout", "reset"]))),
                max_size=40))
def test_render_lists_every_shown_attempt_in_order(attempts: list[tuple[str, str, int | str]]) -> None:
    chain = AttemptChain()
    for upstream, key, outcome in attempts:
        chain.add(upstream, key, outcome)
    expected = [f"{u}/{k}:{o}" for u, k, o in attempts[:MAX_ATTEMPTS_SHOWN]]
    if len(attempts) > MAX_ATTEMPTS_SHOWN:
        expected.append(f"+{len(attempts) - MAX_ATTEMPTS_SHOWN} more")
    assert chain.render() == (",".join(expected) if expected else None)
