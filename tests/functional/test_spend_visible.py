"""Spend where developers look (issue 21): the x-hubcore-budget-* headers on
every answer to a principal some budget applies to, GET /hubcore/v1/me on the
proxy port, and `hubcore statusline`, against a real hub in front of the
fake vendor, through the official SDK and the real CLI."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import http.client
from dataclasses import dataclass
from urllib.parse import urlsplit

import anthropic
import orjson
import pytest

from hubcore.governance.limits import Limits, calendar_periods
from tests.conftest import upstreams_for
from tests.fakevendor import FakeVendor
from tests.hubharness import REPO, HubThread, free_port, hubcore_cmd, make_config, run_cli

TZ = "Europe/Berlin"   # not UTC: the resets header must still be in UTC
USD = 1_000_000
MODEL = "claude-sonnet-4-6"
MESSAGES = [{"role": "user", "content": "hi"}]
BUDGET_HEADERS = ("x-hubcore-budget-remaining", "x-hubcore-budget-resets")
# How far `hubcore statusline` may go past its 200 ms deadline on a shared,
# busy test machine (thread start, scheduling) before the test calls it slow.
DEADLINE_SLACK = 0.25
SLOW_OK = ("--timeout", "3")


@pytest.fixture
def hub(vendor: FakeVendor, tmp_path: Path) -> Iterator[HubThread]:
    with HubThread(make_config(tmp_path, upstreams_for(vendor), budget_timezone=TZ)) as h:
        yield h


@pytest.fixture
def config_file(hub: HubThread, tmp_path: Path) -> Path:
    """A config file naming the hub's database, for the CLI."""
    path = tmp_path / "hubcore.toml"
    path.write_text(
        f'[server]\ndatabase = "{hub.config.server.database}"\nops_socket = "{tmp_path / "ops.sock"}"\n'
        f'budget_timezone = "{TZ}"\n'
    )
    return path


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUBCORE_", "ANTHROPIC_", "OPENAI_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def token_id(hub: HubThread, token: str) -> int:
    assert hub.app is not None
    principal = hub.app.tokens.lookup(token.encode())
    assert principal is not None
    return principal.token_id


def client(hub: HubThread, token: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=hub.url, api_key=token, timeout=10, max_retries=0)


def ask(sdk: anthropic.Anthropic, stream: bool = False) -> Any:
    """One request; its raw response (headers, and the body read whole)."""
    raw = sdk.messages.with_raw_response.create(model=MODEL, max_tokens=16, messages=MESSAGES, stream=stream)
    raw.parse()  # the body (or the whole stream), so that the request ends
    return raw


def charged(hub: HubThread, rows: int) -> list[dict[str, Any]]:
    """The hub's usage rows once `rows` are written; each request's cost is
    in the limiter from the moment its row was made."""
    found = hub.wait_rows(rows)
    assert len(found) == rows, found
    return found


def spent(rows: list[dict[str, Any]], since: float, **who: Any) -> int:
    return sum(r["cost_micros"] or 0 for r in rows if r["ts"] >= since and all(r[k] == v for k, v in who.items()))


def utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def dollars(micros: int) -> str:
    """The header's spelling: cents, or every digit when not whole cents."""
    whole, fraction = divmod(micros, USD)
    if fraction % 10_000 == 0:
        return f"{whole}.{fraction // 10_000:02d}"
    return f"{whole}.{fraction:06d}".rstrip("0")


def periods(now: float | None = None) -> tuple[tuple[float, float], ...]:
    return calendar_periods(time.time() if now is None else now, ZoneInfo(TZ))


# -- the headers -------------------------------------------------------------------

def test_no_budget_no_budget_headers_but_the_request_id(hub: HubThread) -> None:
    token = hub.mint("alice", "web")
    hub.set_limits("user", "alice", Limits(rpm=100, concurrency=4))  # limits, but no budget
    with client(hub, token) as sdk:
        for stream in (False, True):
            raw = ask(sdk, stream)
            assert raw.status_code == 200
            assert re.fullmatch(r"hc_[0-9a-f]{8}[0-9a-f]{10}", raw.headers["x-hubcore-request-id"])
            for name in BUDGET_HEADERS:
                assert name not in raw.headers, (stream, name)


@pytest.mark.parametrize("tightest", ["token", "user", "project"])
def test_the_headers_name_the_tightest_budget_of_token_user_and_project(hub: HubThread, tightest: str) -> None:
    token = hub.mint("alice", "web")
    # One budget per scope; the tightest one is $1, the others $20 or more.
    sizes = {"token": 30 * USD, "user": 20 * USD, "project": 25 * USD}
    sizes[tightest] = 1 * USD
    windows = {"token": "day", "user": "week", "project": "month"}
    hub.set_limits("token", token_id(hub, token), Limits(budget_day=sizes["token"]))
    hub.set_limits("user", "alice", Limits(budget_week=sizes["user"]))
    hub.set_limits("project", "web", Limits(budget_month=sizes["project"]))
    window_end = dict(zip(("day", "week", "month"), (end for _, end in periods())))
    with client(hub, token) as sdk:
        first = ask(sdk)
        # Read as the answer's head went out: nothing spent yet.
        assert first.headers["x-hubcore-budget-remaining"] == dollars(sizes[tightest])
        assert first.headers["x-hubcore-budget-resets"] == utc(window_end[windows[tightest]])
        cost = charged(hub, 1)[0]["cost_micros"]
        assert cost and 0 < cost < USD
        second = ask(sdk, stream=True)
    assert second.headers["x-hubcore-budget-remaining"] == dollars(sizes[tightest] - cost)
    assert second.headers["x-hubcore-budget-resets"] == utc(window_end[windows[tightest]])


def test_a_spend_elsewhere_moves_the_tightest_budget(hub: HubThread) -> None:
    """Another token of the same user spends: the user's budget, not this
    token's, is now the one with the least left."""
    token, other = hub.mint("alice"), hub.mint("alice")
    hub.set_limits("token", token_id(hub, token), Limits(budget_total=2 * USD))
    hub.set_limits("user", "alice", Limits(budget_day=2 * USD))
    with client(hub, other) as spender:
        ask(spender)
    cost = charged(hub, 1)[0]["cost_micros"]
    with client(hub, token) as sdk:
        raw = ask(sdk)
    assert raw.headers["x-hubcore-budget-remaining"] == dollars(2 * USD - cost)
    assert raw.headers["x-hubcore-budget-resets"] == utc(periods()[0][1])


def test_a_total_budget_has_no_reset(hub: HubThread) -> None:
    token = hub.mint("alice")
    hub.set_limits("token", token_id(hub, token), Limits(budget_total=7 * USD))
    with client(hub, token) as sdk:
        raw = ask(sdk)
    assert raw.headers["x-hubcore-budget-remaining"] == "7.00"
    assert "x-hubcore-budget-resets" not in raw.headers


def test_refusals_carry_the_budget_headers(hub: HubThread) -> None:
    spent_token = hub.mint("bob")
    hub.set_limits("token", token_id(hub, spent_token), Limits(budget_day=0, budget_month=10 * USD))
    with client(hub, spent_token) as sdk, pytest.raises(anthropic.PermissionDeniedError) as refused:
        sdk.messages.create(model=MODEL, max_tokens=16, messages=MESSAGES)
    headers = refused.value.response.headers
    assert "budget" in refused.value.message
    assert headers["x-hubcore-budget-remaining"] == "0.00"
    # A zero budget never lifts by itself: no reset to name.
    assert "x-hubcore-budget-resets" not in headers

    limited = hub.mint("carol")
    hub.set_limits("token", token_id(hub, limited), Limits(rpm=1, budget_month=10 * USD))
    with client(hub, limited) as sdk:
        ask(sdk)
        with pytest.raises(anthropic.RateLimitError) as throttled:
            sdk.messages.create(model=MODEL, max_tokens=16, messages=MESSAGES)
    headers = throttled.value.response.headers
    cost = charged(hub, 3)[1]["cost_micros"]
    assert headers["x-hubcore-budget-remaining"] == dollars(10 * USD - cost)
    assert headers["x-hubcore-budget-resets"] == utc(periods()[2][1])
    assert "x-hubcore-request-id" in headers

    # A refusal without any budget says nothing of budgets.
    plain = hub.mint("dave")
    hub.set_limits("token", token_id(hub, plain), Limits(rpm=1))
    with client(hub, plain) as sdk:
        ask(sdk)
        with pytest.raises(anthropic.RateLimitError) as bare:
            sdk.messages.create(model=MODEL, max_tokens=16, messages=MESSAGES)
    assert not any(name in bare.value.response.headers for name in BUDGET_HEADERS)


@pytest.mark.parametrize(("status", "error"), [(400, anthropic.BadRequestError), (500, anthropic.InternalServerError)],
                         ids=["passed-on", "given-up-after-retries"])
def test_vendor_errors_carry_the_budget_headers(hub: HubThread, status: int, error: type[Exception]) -> None:
    """A vendor's error passed on as it came (400), or the hub's answer once
    every attempt failed (500, retried): both name the budget."""
    token = hub.mint("hank")
    hub.set_limits("token", token_id(hub, token), Limits(budget_week=12 * USD))
    with client(hub, token) as sdk, pytest.raises(error) as failed:
        sdk.messages.create(model=MODEL, max_tokens=16, messages=MESSAGES,
                            extra_headers={"x-fake-status": str(status)})
    headers = failed.value.response.headers  # type: ignore[attr-defined]
    assert failed.value.response.status_code == status  # type: ignore[attr-defined]
    assert headers["x-hubcore-budget-remaining"] == "12.00"
    assert headers["x-hubcore-budget-resets"] == utc(periods()[1][1])


def test_a_spent_day_budget_refuses_with_its_reset(hub: HubThread) -> None:
    token = hub.mint("erin")
    with client(hub, token) as sdk:
        ask(sdk)
        cost = charged(hub, 1)[0]["cost_micros"]
        hub.set_limits("token", token_id(hub, token), Limits(budget_day=cost, budget_month=50 * USD))
        with pytest.raises(anthropic.PermissionDeniedError) as refused:
            sdk.messages.create(model=MODEL, max_tokens=16, messages=MESSAGES)
    headers = refused.value.response.headers
    assert headers["x-hubcore-budget-remaining"] == "0.00"
    assert headers["x-hubcore-budget-resets"] == utc(periods()[0][1])


# -- GET /hubcore/v1/me -------------------------------------------------------------

@dataclass
class Answer:
    status_code: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return orjson.loads(self.text)


def get_me(url: str, token: str | None = None, bearer: bool = True, method: str = "GET") -> Answer:
    headers = {}
    if token is not None:
        headers = {"authorization": f"Bearer {token}"} if bearer else {"x-api-key": token}
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request(method, "/hubcore/v1/me", headers=headers)
        response = conn.getresponse()
        body = response.read().decode()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, body)
    finally:
        conn.close()


def test_me_equals_usage_budgets_for_the_same_token(hub: HubThread, config_file: Path) -> None:
    token = hub.mint("alice", "web")
    tid = token_id(hub, token)
    other = hub.mint("alice", "web")
    hub.set_limits("token", tid, Limits(budget_day=3 * USD, budget_5h=2 * USD, rpm=60))
    hub.set_limits("user", "alice", Limits(budget_week=20 * USD, budget_total=100 * USD, concurrency=3))
    hub.set_limits("project", "web", Limits(budget_month=40 * USD))
    hub.set_limits("user", "zed", Limits(budget_day=1 * USD))  # someone else's: not in the answer
    with client(hub, token) as sdk, client(hub, other) as second:
        for _ in range(2):
            ask(sdk)
        ask(second, stream=True)
    rows = charged(hub, 3)

    me = get_me(hub.url, token)
    assert me.status_code == 200 and me.headers["content-type"] == "application/json"
    assert me.headers["cache-control"] == "no-store" and "x-hubcore-request-id" in me.headers
    answer = me.json()
    done = run_cli("usage", "--budgets", "--format", "json", "--config", str(config_file), env=cli_env())
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    mine = {("token", str(tid)), ("user", "alice"), ("project", "web")}
    expected = [line for line in report["budgets"] if (line["kind"], line["name"]) in mine]
    assert len(expected) == 5
    fields = ("kind", "name", "window", "limit_micros", "spent_micros", "remaining_micros", "resets_at")
    assert [{k: line[k] for k in fields} for line in answer["budgets"]] == expected
    # One scope at a time too, as `--budgets token:ID` shows it.
    done = run_cli("usage", "--budgets", f"token:{tid}", "--format", "json", "--config", str(config_file), env=cli_env())
    assert [{k: line[k] for k in fields} for line in answer["budgets"][:2]] == orjson.loads(done.stdout)["budgets"]

    day, week, month = periods(answer["now"])
    assert answer["timezone"] == TZ and answer["user"] == "alice" and answer["project"] == "web"
    assert answer["token"]["id"] == tid and token.startswith(answer["token"]["prefix"])
    for label, (start, end) in (("today", day), ("week", week), ("month", month)):
        assert answer["spend"][label] == {
            "start": start, "end": end,
            "token_micros": spent(rows, start, token_id=tid),
            "user_micros": spent(rows, start, user="alice"),
        }
    assert answer["spend"]["today"]["user_micros"] > answer["spend"]["today"]["token_micros"] > 0
    # Resets as the CLI's table shows them: in the budget timezone.
    day_line = next(b for b in answer["budgets"] if b["window"] == "day")
    assert day_line["resets"] == datetime.fromtimestamp(day[1], ZoneInfo(TZ)).isoformat(timespec="seconds")
    assert next(b for b in answer["budgets"] if b["window"] == "total")["resets"] is None
    tightest = min(answer["budgets"], key=lambda b: b["remaining_micros"])
    assert answer["tightest"] == tightest and tightest["window"] == "5h"
    assert answer["limits"] == {
        "token": {"rpm": 60, "concurrency": None}, "user": {"rpm": None, "concurrency": 3}, "project": None,
    }
    # The x-api-key spelling is as good; the question is no request to a vendor.
    assert get_me(hub.url, token, bearer=False).json()["budgets"] == answer["budgets"]
    assert len(hub.usage_rows()) == 3


def test_me_without_budgets_answers_spend_from_the_counters(hub: HubThread) -> None:
    token = hub.mint("frank")
    assert get_me(hub.url, token).json()["spend"]["month"]["token_micros"] == 0
    with client(hub, token) as sdk:
        ask(sdk)
    rows = charged(hub, 1)
    answer = get_me(hub.url, token).json()
    assert answer["budgets"] == [] and answer["tightest"] is None and answer["project"] is None
    assert answer["limits"] == {"token": None, "user": None}
    assert answer["spend"]["today"]["token_micros"] == rows[0]["cost_micros"] > 0


def test_me_refuses_a_missing_or_bad_token_like_any_request(hub: HubThread) -> None:
    for token in (None, "hc-not-a-token", ""):
        answer = get_me(hub.url, token)
        assert answer.status_code == 401, token
        assert answer.json()["type"] == "error" and answer.json()["error"]["type"] == "authentication_error"
    revoked = get_me(hub.url, hub.mint_revoked())
    assert revoked.status_code == 403 and revoked.json()["error"]["type"] == "permission_error"
    not_get = get_me(hub.url, hub.mint("gina"), method="POST")
    assert not_get.status_code == 405 and not_get.json()["type"] == "error"
    assert hub.usage_rows() == []


def test_me_is_never_served_on_the_dashboard_listener(vendor: FakeVendor, tmp_path: Path) -> None:
    config = make_config(tmp_path, upstreams_for(vendor), dashboard={"listen": "127.0.0.1:0"})
    with HubThread(config) as hub:
        token = hub.mint("alice")
        assert hub.dashboard_url
        on_dashboard = get_me(hub.dashboard_url, token)
        assert on_dashboard.status_code == 404
        assert "spend" not in on_dashboard.text
        assert get_me(hub.url, token).status_code == 200


# -- hubcore statusline --------------------------------------------------------------

def statusline(*args: str, stdin: bytes | None = b"", **env: str) -> tuple[subprocess.CompletedProcess[bytes], float]:
    started = time.monotonic()
    done = subprocess.run(
        hubcore_cmd("statusline", *args), input=stdin, capture_output=True, env=cli_env(**env), timeout=30,
    )
    return done, time.monotonic() - started


def test_statusline_prints_its_line_against_a_running_hub(hub: HubThread) -> None:
    token = hub.mint("alice", "web")
    with client(hub, token) as sdk:
        ask(sdk)
        ask(sdk)
    rows = charged(hub, 2)
    today = spent(rows, periods()[0][0], user="alice")
    # Claude Code's way: the client's own settings, and the session JSON on stdin.
    session = orjson.dumps({"session_id": "abc", "model": {"id": MODEL}, "workspace": {"current_dir": "/tmp"}})
    # A generous deadline: a busy test machine must not blank the line
    # (the 200 ms default is held to by the unanswering servers below).
    done, _ = statusline(*SLOW_OK, stdin=session, ANTHROPIC_BASE_URL=hub.url, ANTHROPIC_AUTH_TOKEN=token)
    assert done.returncode == 0 and done.stderr == b""
    month_spend = spent(rows, periods()[2][0], user="alice")
    assert done.stdout.decode() == f"hub ${today / USD:,.2f} today · ${month_spend / USD:,.2f} this month\n"

    hub.set_limits("project", "web", Limits(budget_month=50 * USD))
    done, _ = statusline(*SLOW_OK, "--url", hub.url, "--token", token)
    month_end = datetime.fromtimestamp(periods()[2][1], ZoneInfo(TZ))
    left = 50 * USD - spent(rows, periods()[2][0], project="web")
    assert done.returncode == 0
    assert done.stdout.decode() == (
        f"hub ${today / USD:,.2f} today · ${left / USD:,.2f} left this month "
        f"(project web, resets {month_end:%b} {month_end.day})\n"
    )
    # ANTHROPIC_API_KEY (sent as x-api-key) serves as well.
    done, _ = statusline(*SLOW_OK, ANTHROPIC_BASE_URL=hub.url + "/", ANTHROPIC_API_KEY=token)
    assert done.stdout.decode().startswith(f"hub ${today / USD:,.2f} today · ")


def test_statusline_trusts_the_ca_claude_code_is_given(vendor: FakeVendor, tmp_path: Path) -> None:
    """A hub on HTTPS under a private CA: trusted through NODE_EXTRA_CA_CERTS
    (as Claude Code is), and without it the line is simply absent."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file, ca_file = tmp_path / "hub.crt", tmp_path / "hub.key", tmp_path / "ca.pem"
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    config = make_config(tmp_path, upstreams_for(vendor), tls_cert=str(cert_file), tls_key=str(key_file))
    with HubThread(config) as tls_hub:
        assert tls_hub.url.startswith("https://")
        token = tls_hub.mint("alice")
        done, _ = statusline(*SLOW_OK, ANTHROPIC_BASE_URL=tls_hub.url, ANTHROPIC_AUTH_TOKEN=token,
                             NODE_EXTRA_CA_CERTS=str(ca_file))
        assert done.stdout == "hub $0.00 today · $0.00 this month\n".encode() and done.returncode == 0
        done, _ = statusline(*SLOW_OK, ANTHROPIC_BASE_URL=tls_hub.url, ANTHROPIC_AUTH_TOKEN=token)
        assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")


def test_statusline_does_not_wait_for_an_open_stdin(hub: HubThread) -> None:
    """Claude Code may keep its end of stdin open: the line comes anyway."""
    token = hub.mint("alice")
    proc = subprocess.Popen(
        hubcore_cmd("statusline", *SLOW_OK), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=cli_env(ANTHROPIC_BASE_URL=hub.url, ANTHROPIC_AUTH_TOKEN=token),
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(b'{"session_id": "abc"}')
    proc.stdin.flush()
    try:
        assert proc.wait(timeout=10) == 0
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            pipe.close()
    assert out == "hub $0.00 today · $0.00 this month\n".encode()


def test_statusline_prints_nothing_when_the_hub_is_down() -> None:
    port = free_port()  # nothing listens there: connection refused
    done, _ = statusline(ANTHROPIC_BASE_URL=f"http://127.0.0.1:{port}", ANTHROPIC_AUTH_TOKEN="hc-x")
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")


def test_statusline_prints_nothing_without_settings() -> None:
    for env in ({}, {"ANTHROPIC_BASE_URL": "http://127.0.0.1:1"}, {"ANTHROPIC_AUTH_TOKEN": "hc-x"},
                {"ANTHROPIC_BASE_URL": "not a url", "ANTHROPIC_AUTH_TOKEN": "hc-x"}):
        done, _ = statusline(**env)
        assert (done.returncode, done.stdout, done.stderr) == (0, b"", b""), env


def test_statusline_prints_nothing_with_a_bad_token(hub: HubThread) -> None:
    done, _ = statusline(ANTHROPIC_BASE_URL=hub.url, ANTHROPIC_AUTH_TOKEN="hc-not-a-token")
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")


@pytest.fixture(params=["silent", "dribbling"])
def unanswering_server(request: pytest.FixtureRequest) -> Iterator[int]:
    """A port that accepts connections and never finishes an answer: says
    nothing at all, or sends a head one byte every 50 ms, so that no single
    read ever times out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()
    dribble = request.param == "dribbling"

    def serve(conn: socket.socket) -> None:
        head = b"HTTP/1.1 200 OK\r\n" + b"x-padding: " + b"a" * 100_000
        for byte in head:
            if stop.wait(0.05):
                return
            try:
                conn.sendall(bytes((byte,)))
            except OSError:
                return

    def accept() -> None:
        while not stop.is_set():
            try:
                conn = listener.accept()[0]
            except OSError:
                continue
            held.append(conn)
            if dribble:
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    listener.close()


def test_statusline_gives_up_on_a_hub_that_never_answers_within_its_deadline(unanswering_server: int) -> None:
    url = f"http://127.0.0.1:{unanswering_server}"
    refused_port = free_port()
    # The interpreter's start is the same in both: what differs is the wait.
    starts = [statusline(ANTHROPIC_BASE_URL=f"http://127.0.0.1:{refused_port}", ANTHROPIC_AUTH_TOKEN="hc-x")[1]
              for _ in range(3)]
    waits = []
    for _ in range(3):
        done, took = statusline(ANTHROPIC_BASE_URL=url, ANTHROPIC_AUTH_TOKEN="hc-x")
        assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
        waits.append(took)
    assert min(waits) >= 0.2, "it gave up before its deadline"
    assert min(waits) - min(starts) < 0.2 + DEADLINE_SLACK, (waits, starts)
    # --timeout sets the deadline.
    done, took = statusline("--timeout", "0.05", ANTHROPIC_BASE_URL=url, ANTHROPIC_AUTH_TOKEN="hc-x")
    assert done.stdout == b"" and took - min(starts) < 0.05 + DEADLINE_SLACK


def answering_server(response: bytes) -> tuple[socket.socket, threading.Thread]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.recv(65536)
            conn.sendall(response)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nnot json!",
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n[]",
    b'HTTP/1.1 200 OK\r\ncontent-length: 13\r\n\r\n{"spend": {}}',
    b'HTTP/1.1 500 Internal Server Error\r\ncontent-length: 2\r\n\r\n{}',
    b"SSH-2.0-OpenSSH_9.6\r\n",
], ids=["bad-json", "not-an-object", "wrong-shape", "http-500", "not-http"])
def test_statusline_prints_nothing_for_a_bad_answer(response: bytes) -> None:
    listener, thread = answering_server(response)
    try:
        done, _ = statusline(ANTHROPIC_BASE_URL=f"http://127.0.0.1:{listener.getsockname()[1]}",
                             ANTHROPIC_AUTH_TOKEN="hc-x")
        assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
    finally:
        listener.close()
        thread.join(5)


def test_statusline_exits_0_when_its_reader_has_gone() -> None:
    """A prompt that stopped reading: writing the line fails, the exit status does not."""
    body = b'{"now": 1772614800.0, "spend": {"today": {"user_micros": 1}, "month": {"user_micros": 2}}, "tightest": null}'
    listener, thread = answering_server(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            hubcore_cmd("statusline", *SLOW_OK), stdout=write_end, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            env=cli_env(ANTHROPIC_BASE_URL=f"http://127.0.0.1:{listener.getsockname()[1]}", ANTHROPIC_AUTH_TOKEN="hc-x"),
            timeout=30,
        )
    finally:
        os.close(write_end)
        listener.close()
        thread.join(5)
    assert (done.returncode, done.stderr) == (0, b"")
