"""Governance end to end: rpm, concurrency, budgets, model allow-lists, expiry
and revocation, enforced by a real hub in front of the fake vendor and seen
through the official anthropic SDK."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest

from hubcore import store

from hubcore.governance import tokens
from hubcore.governance.limits import Limits, format_usd
from hubcore.governance.storage import write_limits
from tests.conftest import upstreams_for
from tests.fakevendor import FakeVendor
from tests.hubharness import HubThread, make_config, run_cli

SONNET = "claude-sonnet-4-6"
OPUS = "claude-opus-4-6"
COSTLY = {"x-fake-usage": orjson.dumps({"input_tokens": 100000, "output_tokens": 10000}).decode()}

_clients: list[anthropic.Anthropic] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


def client(hub: HubThread, token: str) -> anthropic.Anthropic:
    c = anthropic.Anthropic(base_url=hub.url, api_key=token, max_retries=0)
    _clients.append(c)
    return c


def ask(c: anthropic.Anthropic, model: str = SONNET, headers: dict[str, str] | None = None) -> Any:
    return c.messages.create(
        model=model, max_tokens=64, messages=[{"role": "user", "content": "hi"}],
        extra_headers=headers or {},
    )


def token_with(hub: HubThread, user: str, limits: Limits | None, project: str | None = None) -> tuple[int, str]:
    """Mint a token, store its limits and make the running hub see them now."""
    conn = store.connect(hub.config.server.database)
    try:
        token_id, value = tokens.create(conn, user, project)
        if limits is not None:
            assert write_limits(conn, "token", token_id, limits)
        conn.commit()
    finally:
        conn.close()
    refresh(hub)
    return token_id, value


def error_type(err: anthropic.APIStatusError) -> str:
    body = err.body
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    return str(body["error"]["type"])


def refresh(hub: HubThread) -> None:
    assert hub.app is not None
    hub.call(hub.app.refresh_tokens(force=True))


def test_rpm_refuses_the_fourth_request_with_retry_after(hub: HubThread, vendor: FakeVendor) -> None:
    _, value = token_with(hub, "alice", Limits(rpm=3))
    c = client(hub, value)
    for _ in range(3):
        ask(c)
    with pytest.raises(anthropic.RateLimitError) as info:
        ask(c)
    err = info.value
    assert err.status_code == 429
    assert error_type(err) == "rate_limit_error"
    retry_after = float(err.response.headers["retry-after"])
    assert 1 <= retry_after <= 60
    assert "3 requests per minute" in err.message
    assert len(vendor.requests) == 3
    rows = hub.wait_rows(4)
    assert [r["outcome"] for r in rows] == ["ok", "ok", "ok", "refused"]
    assert rows[-1]["status"] == 429


def test_concurrency_refuses_a_third_stream_until_one_ends(hub: HubThread, vendor: FakeVendor) -> None:
    _, value = token_with(hub, "alice", Limits(concurrency=2))
    c = client(hub, value)
    slow = {"x-fake-events": "20", "x-fake-delay-ms": "50"}
    opened = [threading.Event(), threading.Event()]
    release = [threading.Event(), threading.Event()]
    results: dict[int, str] = {}

    def hold(i: int) -> None:
        with c.messages.stream(model=SONNET, max_tokens=64, messages=[{"role": "user", "content": "hi"}], extra_headers=slow) as s:
            opened[i].set()
            release[i].wait(10)
            results[i] = "".join(s.text_stream)

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        for e in opened:
            assert e.wait(10)
        with pytest.raises(anthropic.RateLimitError) as info:
            ask(c)
        assert error_type(info.value) == "rate_limit_error"
        assert "retry-after" in info.value.response.headers
        assert "concurrency" in info.value.message
        release[0].set()
        threads[0].join(15)
        assert results.get(0)
        # The slot is freed when the hub finishes the exchange, just after the
        # client has read the last byte: retry briefly.
        deadline = time.monotonic() + 10
        while True:
            try:
                assert ask(c).type == "message"
                break
            except anthropic.RateLimitError:
                assert time.monotonic() < deadline, "the ended stream never freed its slot"
                time.sleep(0.05)
        assert threads[1].is_alive(), "the second stream should still be held open"
    finally:
        for e in release:
            e.set()
        for t in threads:
            t.join(15)
    assert results.get(1)
    outcomes = [r["outcome"] for r in hub.wait_rows(4)]
    assert outcomes.count("ok") == 3 and set(outcomes) == {"ok", "refused"}


def test_day_budget_refuses_after_a_costly_request(hub: HubThread, vendor: FakeVendor) -> None:
    _, value = token_with(hub, "alice", Limits(budget_day=10_000))
    c = client(hub, value)
    assert ask(c, OPUS, COSTLY).usage.input_tokens == 100000
    hub.wait_rows(1)
    err = refused_after_charge(hub, c)
    assert err.status_code == 403
    assert error_type(err) == "permission_error"
    assert "daily budget" in err.message and "$0.01" in err.message
    assert "resets at" in err.message
    assert len(vendor.requests) == 1


def refused_after_charge(hub: HubThread, c: anthropic.Anthropic, model: str = SONNET) -> anthropic.PermissionDeniedError:
    """The charge lands when the usage event is recorded; poll briefly for it."""
    deadline = time.monotonic() + 10
    while True:
        try:
            ask(c, model)
        except anthropic.PermissionDeniedError as e:
            return e
        assert time.monotonic() < deadline, "the budget was never enforced"
        time.sleep(0.05)


def set_user_budget(database: str, user: str, micros: int) -> None:
    conn = store.connect(database)
    try:
        write_limits(conn, "user", user, Limits(budget_day=micros))
        conn.commit()
    finally:
        conn.close()


def test_user_budget_holds_across_two_tokens(hub: HubThread, vendor: FakeVendor) -> None:
    set_user_budget(hub.config.server.database, "bob", 10_000)
    _, first = token_with(hub, "bob", None)
    _, second = token_with(hub, "bob", None)
    _, other = token_with(hub, "carol", None)
    ask(client(hub, first), OPUS, COSTLY)
    hub.wait_rows(1)
    err = refused_after_charge(hub, client(hub, second))
    assert "user bob" in err.message and "daily budget" in err.message
    # Another user is untouched by bob's spend.
    assert ask(client(hub, other)).type == "message"


def test_budget_survives_a_restart(vendor: FakeVendor, tmp_path: Path) -> None:
    config = make_config(tmp_path, upstreams_for(vendor))
    with HubThread(config) as hub:
        _, value = token_with(hub, "alice", Limits(budget_day=10_000))
        ask(client(hub, value), OPUS, COSTLY)
        assert hub.wait_rows(1)[0]["outcome"] == "ok"
    with HubThread(config) as hub:
        with pytest.raises(anthropic.PermissionDeniedError) as info:
            ask(client(hub, value))
        assert "daily budget" in info.value.message
    assert len(vendor.requests) == 1


def test_model_allow_list(hub: HubThread, vendor: FakeVendor) -> None:
    _, value = token_with(hub, "alice", Limits(models=("claude-sonnet-*",)))
    c = client(hub, value)
    with pytest.raises(anthropic.PermissionDeniedError) as info:
        ask(c, OPUS)
    assert error_type(info.value) == "permission_error"
    assert OPUS in info.value.message and "claude-sonnet-*" in info.value.message
    assert ask(c, SONNET).type == "message"
    assert [r.json()["model"] for r in vendor.requests] == [SONNET]


def test_model_allow_list_reads_the_model_of_a_request_that_names_its_session(hub: HubThread, vendor: FakeVendor) -> None:
    # A session header lets the hub choose a key without reading the body,
    # which it then reads only after the request went out; an allow-list
    # must still see the model first, at the token's scope and the user's.
    session = {"x-claude-code-session-id": "5d0c7a4e-1b2f-4c3d-9e8f-0a1b2c3d4e5f"}
    _, value = token_with(hub, "alice", Limits(models=("claude-sonnet-*",)))
    with pytest.raises(anthropic.PermissionDeniedError):
        ask(client(hub, value), OPUS, session)
    conn = store.connect(hub.config.server.database)
    try:
        assert write_limits(conn, "user", "bob", Limits(models=("claude-sonnet-*",)))
        conn.commit()
    finally:
        conn.close()
    _, bobs = token_with(hub, "bob", None)  # reloads the limits too
    with pytest.raises(anthropic.PermissionDeniedError):
        ask(client(hub, bobs), OPUS, session)
    assert ask(client(hub, bobs), SONNET, session).type == "message"
    assert [r.json()["model"] for r in vendor.requests] == [SONNET]


def test_a_refused_request_that_names_its_session_leaves_a_row_with_its_model(hub: HubThread, vendor: FakeVendor) -> None:
    session = {"x-claude-code-session-id": "5d0c7a4e-1b2f-4c3d-9e8f-0a1b2c3d4e5f"}
    _, value = token_with(hub, "alice", Limits(rpm=1))
    c = client(hub, value)
    ask(c, SONNET, session)
    with pytest.raises(anthropic.RateLimitError):
        ask(c, OPUS, session)
    rows = hub.wait_rows(2)
    assert [(r["outcome"], r["model"], r["session_id"]) for r in rows] == [
        ("ok", SONNET, session["x-claude-code-session-id"]),
        ("refused", OPUS, session["x-claude-code-session-id"]),
    ]


def test_expired_and_revoked_tokens_refused(hub: HubThread, vendor: FakeVendor) -> None:
    _, expired = token_with(hub, "alice", Limits(expires_at=time.time() - 60))
    with pytest.raises(anthropic.PermissionDeniedError) as info:
        ask(client(hub, expired))
    assert "expired" in info.value.message

    token_id, live = token_with(hub, "alice", None)
    c = client(hub, live)
    assert ask(c).type == "message"
    conn = store.connect(hub.config.server.database)
    try:
        assert tokens.revoke(conn, token_id)
        conn.commit()
    finally:
        conn.close()
    refresh(hub)
    with pytest.raises(anthropic.PermissionDeniedError) as info:
        ask(c)
    assert error_type(info.value) == "permission_error"
    assert "revoked" in info.value.message
    assert len(vendor.requests) == 1


def test_cli_usage_budgets_shows_spend(vendor: FakeVendor, tmp_path: Path) -> None:
    config = make_config(tmp_path, upstreams_for(vendor))
    toml = tmp_path / "hub.toml"
    toml.write_text(
        f'[server]\ndatabase = "{config.server.database}"\n\n'
        f'[[upstream]]\nname = "anthropic"\nkind = "anthropic"\nbase_url = "{vendor.url}"\nkeys = ["sk-ant-good"]\n'
    )
    created = run_cli("token", "create", "--init", "--user", "dave", "--budget", "day=0.01", "--config", str(toml))
    assert created.returncode == 0, created.stderr
    value = next(w for w in created.stdout.split() if len(w) > 20)
    with HubThread(config) as hub:
        refresh(hub)
        ask(client(hub, value), OPUS, COSTLY)
        (row,) = hub.wait_rows(1)
    assert row["cost_micros"] > 10_000
    out = run_cli("usage", "--budgets", "--config", str(toml))
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("token:"))
    fields = line.split()
    assert fields[1] == "day" and fields[2] == "$0.01"
    spent = format_usd(row["cost_micros"])
    assert spent in fields[3:], (spent, line)
    as_json = run_cli("usage", "--budgets", "--format", "json", "--config", str(toml))
    assert as_json.returncode == 0, as_json.stderr
    (budget,) = orjson.loads(as_json.stdout)["budgets"]
    assert budget["spent_micros"] == row["cost_micros"]
    assert budget["limit_micros"] == 10_000
