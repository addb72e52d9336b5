"""/tokens and /api/v1/tokens, /users, /projects against a real hub, the fake
vendor, the official anthropic SDK at the proxy and the real CLI: tokens
created (shown once), used and revoked with the proxy following at once
(its own reload is an hour away), limits set and cleared, budget bars and
"reset this window's spend" surviving a restart, CSRF, developers refused,
every bad input a JSON error naming its field, audit rows for every change;
and the same in a real browser, with the escaping of a hostile user name."""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anthropic
import orjson
import pytest

from hubcore import store
from hubcore.governance import audit, tokens
from hubcore.governance.storage import read_limits
from tests.conftest import upstreams_for
from tests.dashboard.support import (
    OPERATOR, Answer, Client, add_operator, admin_api_token, operator_sign_in, submit,
)
from tests.fakevendor import FakeVendor
from tests.hubharness import HubThread, make_config, run_cli

ZONE = "Europe/Berlin"
SONNET = "claude-sonnet-4-6"
HAIKU = "claude-haiku-4-5"
EVIL = "<script>alert(1)</script>"
# 12,000 input and 3,000 output tokens of Sonnet: $0.081 a request.
COSTLY = {"x-fake-usage": orjson.dumps({"input_tokens": 12000, "output_tokens": 3000}).decode()}


@pytest.fixture
def vendor() -> Iterator[FakeVendor]:
    with FakeVendor() as running:
        yield running


@pytest.fixture
def config(vendor: FakeVendor, tmp_path: Path) -> Any:
    # An hour between the hub's own polls of the tokens table: only the
    # dashboard's (or the CLI's) immediate refresh can make a change live
    # within a test.
    return make_config(tmp_path, upstreams_for(vendor), dashboard={"listen": "127.0.0.1:0"},
                       budget_timezone=ZONE, token_reload_interval=3600)


@pytest.fixture
def hub(config: Any) -> Iterator[HubThread]:
    with HubThread(config) as running:
        add_operator(running)
        yield running


class Api:
    """The admin API as a script calls it: an admin API token, JSON bodies."""

    def __init__(self, hub: HubThread) -> None:
        self.client = Client(hub.dashboard_url)
        self.auth = {"authorization": f"Bearer {admin_api_token(hub)}"}

    def get(self, path: str) -> Answer:
        return self.client.get(path, headers=self.auth)

    def send(self, method: str, path: str, obj: Any = None) -> Answer:
        return self.client.send_json(method, path, obj, csrf=False, headers=self.auth)

    def raw(self, method: str, path: str, body: bytes, content_type: str = "application/json") -> Answer:
        return self.client.request(method, path, body, {"content-type": content_type, **self.auth})


def ask(hub: HubThread, token: str, model: str = SONNET, headers: dict[str, str] | None = None) -> Any:
    with anthropic.Anthropic(base_url=hub.url, api_key=token, max_retries=0) as client:
        return client.messages.create(model=model, max_tokens=64, messages=[{"role": "user", "content": "hi"}],
                                      extra_headers=headers or {})


def refused(hub: HubThread, token: str, model: str = SONNET) -> anthropic.APIStatusError:
    with pytest.raises(anthropic.APIStatusError) as info:
        ask(hub, token, model)
    return info.value


def refused_after_charge(hub: HubThread, token: str) -> anthropic.APIStatusError:
    """A budget charge lands when the usage event is recorded: poll briefly."""
    deadline = time.monotonic() + 10
    while True:
        try:
            ask(hub, token)
        except anthropic.PermissionDeniedError as e:
            return e
        assert time.monotonic() < deadline, "the budget was never enforced"
        time.sleep(0.05)


def audit_rows(hub: HubThread) -> list[audit.AuditEntry]:
    conn = store.connect(hub.config.server.database)
    try:
        return list(reversed(audit.read(conn, limit=1000)))
    finally:
        conn.close()


def changes_of(hub: HubThread) -> list[tuple[str, str | None]]:
    return [(e.action, e.target) for e in audit_rows(hub) if not e.action.startswith("admin.")]


def token_count(hub: HubThread) -> int:
    conn = store.connect(hub.config.server.database)
    try:
        return int(conn.execute("SELECT count(*) FROM tokens").fetchone()[0])
    finally:
        conn.close()


def cli_config(tmp_path: Path, hub: HubThread) -> Path:
    server = hub.config.server
    toml = tmp_path / "cli.toml"
    toml.write_text(
        f'[server]\ndatabase = "{server.database}"\nops_socket = "{server.ops_socket}"\n'
        f'budget_timezone = "{ZONE}"\ntoken_reload_interval = 3600\n'
    )
    return toml


def assert_no_secret_in_audit(hub: HubThread, token: str) -> None:
    for entry in audit_rows(hub):
        text = orjson.dumps(entry.to_dict()).decode()
        assert token not in text and token[:20] not in text
        assert tokens.hash_token(token).hex() not in text


# -- the API ---------------------------------------------------------------------------------


def test_the_api_creates_a_token_shown_once_that_the_proxy_takes_at_once_and_refuses_once_revoked(
    hub: HubThread,
) -> None:
    api = Api(hub)
    created = api.send("POST", "/api/v1/tokens", {
        "user": "alice", "project": "web", "note": "ci bot", "rpm": 60, "budget_day": "5", "budget_total": 100,
        "models": ["claude-*"], "expires": "2030-01-01",
    })
    assert created.status == 201, created.text
    shown = created.json()
    token, token_id = shown["token"], shown["id"]
    assert token.startswith("hc-") and shown["prefix"] == token[:9]
    assert (shown["user"], shown["project"], shown["note"], shown["status"]) == ("alice", "web", "ci bot", "active")
    assert shown["limits"] == {"rpm": 60, "budget_micros": {"day": 5_000_000, "total": 100_000_000},
                               "models": ["claude-*"], "expires_at": shown["expires_at"]}
    # Midnight in the reporting zone (Berlin: UTC+1 in winter).
    assert shown["expires_at"] == 1893452400.0
    assert [b["window"] for b in shown["budgets"]] == ["day", "total"]

    # The proxy takes it now: its own poll of the tokens table is an hour away.
    assert ask(hub, token).type == "message"
    # Never shown again: not by one token, not in the list.
    again = api.get(f"/api/v1/tokens/{token_id}")
    assert again.status == 200 and token not in again.text and "token" not in again.json()
    assert again.json()["effective_groups"] is None
    listed = api.get("/api/v1/tokens").json()["tokens"]
    assert [t["id"] for t in listed] == [token_id] and token not in orjson.dumps(listed).decode()

    gone = api.send("DELETE", f"/api/v1/tokens/{token_id}")
    assert gone.status == 200 and gone.json()["status"] == "revoked"
    error = refused(hub, token)
    assert error.status_code == 403 and "revoked" in error.message
    assert api.get("/api/v1/tokens").json()["tokens"] == []
    assert [t["id"] for t in api.get("/api/v1/tokens?all=true").json()["tokens"]] == [token_id]
    twice = api.send("DELETE", f"/api/v1/tokens/{token_id}")
    assert twice.status == 409 and twice.json()["error"] == {
        "type": "conflict_error", "message": f"token {token_id} is revoked"}

    rows = [e for e in audit_rows(hub) if not e.action.startswith("admin.")]
    assert [(e.action, e.target) for e in rows] == [("token.create", f"token {token_id}"),
                                                      ("token.revoke", f"token {token_id}")]
    assert all(e.actor == f"admin:{OPERATOR}" and e.origin == "api 127.0.0.1" for e in rows)
    assert rows[0].after["limits"]["rpm"] == 60 and rows[1].after == {"state": "revoked"}
    assert_no_secret_in_audit(hub, token)


def test_limits_set_and_cleared_through_the_api_bind_the_proxy_at_once(hub: HubThread) -> None:
    api = Api(hub)
    created = api.send("POST", "/api/v1/tokens", {"user": "bob", "project": "web"}).json()
    token, token_id = created["token"], created["id"]

    answer = api.send("PATCH", f"/api/v1/tokens/{token_id}", {"rpm": 1, "note": "limited"})
    assert answer.status == 200 and answer.json()["limits"] == {"rpm": 1} and answer.json()["note"] == "limited"
    ask(hub, token)
    assert refused(hub, token).status_code == 429
    assert api.send("PATCH", f"/api/v1/tokens/{token_id}", {"rpm": None}).json()["limits"] == {}
    ask(hub, token)

    user = api.send("PATCH", "/api/v1/users/bob", {"models": "claude-haiku-*", "concurrency": "2"})
    assert user.status == 200, user.text
    assert user.json()["limits"] == {"concurrency": 2, "models": ["claude-haiku-*"]}
    assert user.json()["tokens"] == [token_id]
    error = refused(hub, token, SONNET)
    assert error.status_code == 403 and "not allowed for user bob" in error.message
    assert ask(hub, token, HAIKU).type == "message"
    assert api.send("PATCH", "/api/v1/users/bob", {"models": "none"}).json()["limits"] == {"concurrency": 2}
    ask(hub, token, SONNET)

    project = api.send("PATCH", "/api/v1/projects/web", {"expires": "2001-01-01T00:00:00+00:00"})
    assert project.json()["expires_at"] == 978307200.0
    error = refused(hub, token)
    assert error.status_code == 403 and "project web expired" in error.message
    assert api.send("PATCH", "/api/v1/projects/web", {"expires": ""}).json()["expires_at"] is None
    ask(hub, token)

    users = api.get("/api/v1/users").json()["users"]
    assert [(u["name"], u["limits"]) for u in users] == [("bob", {"concurrency": 2})]
    assert [p["name"] for p in api.get("/api/v1/projects").json()["projects"]] == ["web"]
    assert changes_of(hub) == [
        ("token.create", f"token {token_id}"), ("token.update", f"token {token_id}"),
        ("token.update", f"token {token_id}"), ("user.set", "user bob"), ("user.set", "user bob"),
        ("project.set", "project web"), ("project.set", "project web"),
    ]
    rows = audit_rows(hub)
    assert rows[-2].before is None and rows[-2].after == {"note": None, "limits": {"expires_at": 978307200.0}}
    assert rows[-1].before == {"note": None, "limits": {"expires_at": 978307200.0}}


def test_reset_spend_from_the_api_and_the_cli_reaches_the_proxy_and_outlives_a_restart(
    config: Any, tmp_path: Path,
) -> None:
    with HubThread(config) as hub:
        add_operator(hub)
        api = Api(hub)
        token = api.send("POST", "/api/v1/tokens", {"user": "carol"}).json()["token"]
        assert api.send("PATCH", "/api/v1/users/carol", {"budget_day": "0.05"}).status == 200
        ask(hub, token, headers=COSTLY)
        hub.wait_rows(1)
        error = refused_after_charge(hub, token)
        assert "daily budget of user carol is spent" in error.message
        (bar,) = api.get("/api/v1/users/carol").json()["budgets"]
        assert (bar["window"], bar["spent_micros"], bar["limit_micros"]) == ("day", 81_000, 50_000)

        reset = api.send("POST", "/api/v1/users/carol/reset-spend", {"window": "day"})
        assert reset.status == 200, reset.text
        assert reset.json()["forgiven_micros"] == 81_000 and reset.json()["window"] == "day"
        (bar,) = api.get("/api/v1/users/carol").json()["budgets"]
        assert bar["spent_micros"] == 0 and bar["remaining_micros"] == 50_000
        # The CLI's report, rebuilt from the usage rows, honours the reset.
        toml = cli_config(tmp_path, hub)
        done = run_cli("usage", "--budgets", "user:carol", "--format", "json", "--config", str(toml))
        assert done.returncode == 0, done.stderr
        assert [b["spent_micros"] for b in orjson.loads(done.stdout)["budgets"]] == [0]
        assert ask(hub, token).type == "message"
        cheap = hub.wait_rows(3)[-1]["cost_micros"]
        (bar,) = api.get("/api/v1/users/carol").json()["budgets"]
        assert 0 < bar["spent_micros"] == cheap < 81_000
        # Only that window of that scope: the user's week, the token's day hold every cent.
        done = run_cli("user", "show", "carol", "--json", "--config", str(toml))
        assert orjson.loads(done.stdout)["budgets"][0]["spent_micros"] == cheap
        token_id = api.get("/api/v1/tokens").json()["tokens"][0]["id"]
        done = run_cli("token", "show", str(token_id), "--json", "--config", str(toml))
        spend = {w["window"]: w["spent_micros"] for w in orjson.loads(done.stdout)["spend"]}
        assert spend["day"] == spend["week"] == 81_000 + cheap

    with HubThread(config) as hub:
        # Rebuilt from the usage rows at start: the reset holds.
        assert ask(hub, token, headers=COSTLY).type == "message"
        hub.wait_rows(3)
        refused_after_charge(hub, token)
        # The CLI's reset, told to the hub over the ops socket.
        done = run_cli("user", "reset-spend", "carol", "--window", "day", "--config", str(cli_config(tmp_path, hub)))
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("user carol: day spend reset; $0.081189 spent before ")
        assert cheap == 189
        assert ask(hub, token).type == "message"
        rows = [e for e in audit_rows(hub) if e.action == "user.reset_spend"]
        assert [(e.actor.split(":")[0], e.origin, e.before) for e in rows] == [
            ("admin", "api 127.0.0.1", {"window": "day", "spent_micros": 81_000}),
            ("cli", "cli", {"window": "day", "spent_micros": 81_000 + cheap}),
        ]
        assert rows[1].after["spent_micros"] == 0 and rows[1].target == "user carol"


@pytest.mark.parametrize(("method", "path", "body", "status", "said"), [
    ("POST", "/api/v1/tokens", {}, 400, "user: required"),
    ("POST", "/api/v1/tokens", {"user": ["a"]}, 400, "user: expected a string, not a list"),
    ("POST", "/api/v1/tokens", {"user": "a", "rpm": 0}, 400, "rpm: expected a positive integer or 'none', not '0'"),
    ("POST", "/api/v1/tokens", {"user": "a", "rpm": "fast"}, 400, "rpm: expected a positive integer"),
    ("POST", "/api/v1/tokens", {"user": "a", "rpm": True}, 400, "rpm: expected a string, not a boolean"),
    ("POST", "/api/v1/tokens", {"user": "a", "budget_day": "lots"}, 400, "budget_day: not an amount in USD: 'lots'"),
    ("POST", "/api/v1/tokens", {"user": "a", "budget_week": -1}, 400, "budget_week: a budget must be a non-negative"),
    ("POST", "/api/v1/tokens", {"user": "a", "expires": "tomorrow"}, 400, "expires: not an ISO 8601 time"),
    ("POST", "/api/v1/tokens", {"user": "a", "groups": "cheap,,fast"}, 400, "groups: has an empty name"),
    ("POST", "/api/v1/tokens", {"user": "a", "groups": ["a b"]}, 400, "groups: 'a b' is not a group name"),
    ("POST", "/api/v1/tokens", {"user": "a", "models": [1]}, 400, "models: expected a list of strings"),
    ("POST", "/api/v1/tokens", {"user": "a", "rmp": 5}, 400, "rmp: not a field of this change"),
    ("POST", "/api/v1/tokens", {"user": "a\nb"}, 400, "user: must not hold control characters"),
    ("POST", "/api/v1/tokens", [1], 400, "the body must be a JSON object"),
    ("PATCH", "/api/v1/tokens/1", {}, 400, "nothing to update: give note or one of rpm"),
    ("PATCH", "/api/v1/tokens/1", {"concurrency": 0.5}, 400, "concurrency: expected a string, not a number"),
    ("PATCH", "/api/v1/tokens/999", {"rpm": 1}, 404, "token 999 does not exist"),
    ("PATCH", "/api/v1/tokens/abc", {"rpm": 1}, 400, "id: expected a token id"),
    ("GET", "/api/v1/tokens/999", None, 404, "token 999 does not exist"),
    ("GET", "/api/v1/tokens?all=maybe", None, 400, "all: expected true or false, got 'maybe'"),
    ("DELETE", "/api/v1/tokens/999", None, 404, "token 999 does not exist"),
    ("GET", "/api/v1/users/nobody", None, 404, "no user nobody"),
    ("GET", "/api/v1/projects/nowhere", None, 404, "no project nowhere"),
    ("PATCH", "/api/v1/users/alice", {"budget_5h": "x"}, 400, "budget_5h: not an amount in USD"),
    ("PATCH", "/api/v1/users/alice", {"note": 5}, 400, "note: expected a string, not a number"),
    ("POST", "/api/v1/users/nobody/reset-spend", {"window": "day"}, 404, "no user nobody"),
    ("POST", "/api/v1/users/alice/reset-spend", {"window": "year"}, 400, "window: expected a budget window"),
    ("POST", "/api/v1/users/alice/reset-spend", {}, 400, "window: required"),
    ("POST", "/api/v1/tokens/1/reset-spend", {"window": "day", "x": 1}, 400, "x: not a field of this change"),
    ("POST", "/api/v1/tokens/999/reset-spend", {"window": "day"}, 404, "token 999 does not exist"),
])
def test_every_bad_input_is_a_json_error_naming_its_field_and_changes_nothing(
    hub: HubThread, method: str, path: str, body: Any, status: int, said: str,
) -> None:
    api = Api(hub)
    assert api.send("POST", "/api/v1/tokens", {"user": "alice"}).status == 201
    before = (changes_of(hub), token_count(hub))
    answer = api.send(method, path, body) if body is not None else (
        api.get(path) if method == "GET" else api.send(method, path))
    assert answer.status == status, answer.text
    error = answer.json()["error"]
    assert said in error["message"], error
    assert error["type"] == {400: "invalid_request_error", 404: "not_found_error"}[status]
    assert (changes_of(hub), token_count(hub)) == before


def test_a_body_that_is_not_json_or_a_form_is_refused(hub: HubThread) -> None:
    api = Api(hub)
    answer = api.raw("POST", "/api/v1/tokens", b"{user")
    assert answer.status == 400 and answer.json()["error"]["message"].startswith("the body is not JSON")
    # A form is as good as JSON for the API.
    answer = api.raw("POST", "/api/v1/tokens", b"user=dora&budget_day=2", "application/x-www-form-urlencoded")
    assert answer.status == 201 and answer.json()["limits"] == {"budget_micros": {"day": 2_000_000}}
    assert api.send("POST", f"/api/v1/tokens/{answer.json()['id']}", {}).status == 405


def test_the_openapi_description_has_every_tokens_operation(hub: HubThread) -> None:
    spec = Client(hub.dashboard_url).get("/api/v1/openapi.json").json()["paths"]
    expected = {
        "/api/v1/tokens": {"get", "post"}, "/api/v1/tokens/{id}": {"get", "patch", "delete"},
        "/api/v1/tokens/{id}/reset-spend": {"post"},
        **{f"/api/v1/{kind}": {"get"} for kind in ("users", "projects")},
        **{f"/api/v1/{kind}/{{name}}": {"get", "patch"} for kind in ("users", "projects")},
        **{f"/api/v1/{kind}/{{name}}/reset-spend": {"post"} for kind in ("users", "projects")},
    }
    for path, methods in expected.items():
        assert set(spec[path]) == methods, path
        for operation in spec[path].values():
            assert operation["summary"] and operation["tags"] == ["tokens"]
    create = spec["/api/v1/tokens"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert create["required"] == ["user"] and "budget_day" in create["properties"]


# -- sessions: CSRF, forms, developers --------------------------------------------------------


def test_a_form_without_its_csrf_token_is_refused_and_changes_nothing(hub: HubThread) -> None:
    client = Client(hub.dashboard_url)
    client.sign_in()
    token_id = Api(hub).send("POST", "/api/v1/tokens", {"user": "erin"}).json()["id"]
    before = (changes_of(hub), token_count(hub))
    for path, form in (("/tokens", {"user": "mallory"}), (f"/tokens/{token_id}/revoke", {}),
                       (f"/tokens/{token_id}/limits", {"rpm": "1"}), ("/tokens/users/erin/limits", {"rpm": "1"}),
                       ("/tokens/users/erin/reset-spend", {"window": "day"}), ("/tokens/users", {"name": "x"})):
        assert client.post(path, form, csrf=False).status == 403, path
        assert client.post(path, {**form, "csrf": "forged"}, csrf=False).status == 403, path
    for method, path, body in (("POST", "/api/v1/tokens", {"user": "mallory"}),
                               ("PATCH", f"/api/v1/tokens/{token_id}", {"rpm": 1}),
                               ("DELETE", f"/api/v1/tokens/{token_id}", None)):
        answer = client.send_json(method, path, body, csrf=False)
        assert answer.status == 403 and "CSRF" in answer.json()["error"]["message"], path
    assert (changes_of(hub), token_count(hub)) == before
    # With the session's token in the header, the API takes the session.
    client.get("/tokens")
    assert client.send_json("PATCH", f"/api/v1/tokens/{token_id}", {"rpm": 7}).json()["limits"] == {"rpm": 7}
    (row,) = [e for e in audit_rows(hub) if e.action == "token.update"]
    assert row.actor == f"admin:{OPERATOR}" and row.origin == "api 127.0.0.1"


def test_the_forms_change_redirect_back_and_show_the_token_once(hub: HubThread) -> None:
    client = Client(hub.dashboard_url)
    client.sign_in()
    page = client.get("/tokens")
    assert page.status == 200 and 'id="create-token"' in page.text and 'aria-current="page"' in page.text
    created = client.post("/tokens", {"user": "fay", "project": "ops", "note": "", "rpm": "", "budget_day": "3",
                                      "models": "", "groups": "", "expires": ""})
    assert created.status == 200 and "it is shown only once" in created.text
    token = created.text.split('<code id="new-token" class="secret">', 1)[1].split("<", 1)[0]
    assert token.startswith("hc-") and "location" not in created.headers
    assert ask(hub, token).type == "message"
    (token_id,) = [t["id"] for t in Api(hub).get("/api/v1/tokens").json()["tokens"]]
    for path in ("/tokens", f"/tokens/{token_id}", "/tokens/users/fay", "/tokens/projects/ops", "/api/v1/tokens"):
        shown = client.get(path)
        assert shown.status == 200 and token not in shown.text, path

    saved = client.post(f"/tokens/{token_id}/limits", {"note": "laptop", "rpm": "30", "budget_day": "",
                                                       "groups": "", "models": "", "expires": "2030-06-01T12:00"})
    assert saved.status == 303 and saved.headers["location"] == f"/tokens/{token_id}?done=limits"
    page = client.get(saved.headers["location"])
    assert 'id="flash"' in page.text and 'value="laptop"' in page.text and 'value="2030-06-01T12:00:00"' in page.text
    limits = Api(hub).get(f"/api/v1/tokens/{token_id}").json()["limits"]
    assert limits == {"rpm": 30, "expires_at": 1906538400.0}   # noon in Berlin, summer time (UTC+2)

    bad = client.post(f"/tokens/{token_id}/limits", {"rpm": "many"})
    assert bad.status == 400 and "rpm: expected a positive integer" in bad.text
    assert f'href="/tokens/{token_id}"' in bad.text   # back to the form's page
    assert client.post("/tokens/77/limits", {"rpm": "1"}).status == 404

    kept = client.post("/tokens/users", {"name": "gus", "budget_week": "10"})
    assert kept.status == 303 and kept.headers["location"] == "/tokens/users/gus?done=limits"
    assert "$10.00" in client.get("/tokens/users/gus").text
    reset = client.post("/tokens/users/gus/reset-spend", {"window": "week"})
    assert reset.status == 303 and reset.headers["location"] == "/tokens/users/gus?done=reset&window=week"
    assert "The week spend was reset" in client.get(reset.headers["location"]).text

    revoked = client.post(f"/tokens/{token_id}/revoke")
    assert revoked.status == 303 and revoked.headers["location"] == f"/tokens/{token_id}?done=revoked"
    assert refused(hub, token).status_code == 403
    assert client.post(f"/tokens/{token_id}/revoke").status == 409
    assert client.get("/tokens/999").status == 404
    assert changes_of(hub) == [
        ("token.create", f"token {token_id}"), ("token.update", f"token {token_id}"), ("user.set", "user gus"),
        ("user.reset_spend", "user gus"), ("token.revoke", f"token {token_id}"),
    ]
    assert all(e.origin == "dashboard 127.0.0.1" for e in audit_rows(hub) if e.action != "admin.sign_in")
    assert_no_secret_in_audit(hub, token)


def test_a_developer_is_refused_every_page_and_operation(hub: HubThread) -> None:
    dev_token = hub.mint("dev")
    token_id = Api(hub).send("POST", "/api/v1/tokens", {"user": "dev"}).json()["id"]
    client = Client(hub.dashboard_url)
    assert client.sign_in(token=dev_token).headers["location"] == "/me"
    before = (changes_of(hub), token_count(hub))
    for path in ("/tokens", f"/tokens/{token_id}", "/tokens/users/dev", "/tokens/projects/x"):
        assert client.get(path).status == 403, path
    for path, form in (("/tokens", {"user": "dev"}), (f"/tokens/{token_id}/revoke", {}),
                       (f"/tokens/{token_id}/limits", {"rpm": "1"}), ("/tokens/users/dev/limits", {}),
                       ("/tokens/users/dev/reset-spend", {"window": "day"}), (f"/tokens/{token_id}/reset-spend", {})):
        assert client.post(path, form).status == 403, path
    for method, path in (("GET", "/api/v1/tokens"), ("POST", "/api/v1/tokens"), ("GET", f"/api/v1/tokens/{token_id}"),
                         ("PATCH", f"/api/v1/tokens/{token_id}"), ("DELETE", f"/api/v1/tokens/{token_id}"),
                         ("POST", f"/api/v1/tokens/{token_id}/reset-spend"), ("GET", "/api/v1/users"),
                         ("GET", "/api/v1/users/dev"), ("PATCH", "/api/v1/users/dev"),
                         ("POST", "/api/v1/users/dev/reset-spend"), ("GET", "/api/v1/projects"),
                         ("PATCH", "/api/v1/projects/x"), ("POST", "/api/v1/projects/x/reset-spend")):
        answer = client.send_json(method, path, {"rpm": 1, "window": "day", "user": "dev"})
        assert answer.status == 403 and answer.json()["error"]["type"] == "permission_error", (method, path)
    assert (changes_of(hub), token_count(hub)) == before


def test_names_are_escaped_and_path_encoded(hub: HubThread) -> None:
    api = Api(hub)
    odd = "a/b %c"
    for user in (EVIL, odd):
        assert api.send("POST", "/api/v1/tokens", {"user": user, "project": user, "note": user}).status == 201
    client = Client(hub.dashboard_url)
    client.sign_in()
    page = client.get("/tokens").text
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert f'href="/tokens/users/{quote(EVIL, safe="")}"' in page
    assert 'href="/tokens/users/a%2Fb%20%25c"' in page
    user_page = client.get(f"/tokens/users/{quote(EVIL, safe='')}")
    assert user_page.status == 200 and EVIL not in user_page.text
    assert '<span id="scope-name">&lt;script&gt;alert(1)&lt;/script&gt;</span>' in user_page.text
    assert api.get(f"/api/v1/users/{quote(odd, safe='')}").json()["name"] == odd
    saved = api.send("PATCH", f"/api/v1/projects/{quote(odd, safe='')}", {"rpm": 3})
    assert saved.status == 200 and saved.json()["name"] == odd and saved.json()["limits"] == {"rpm": 3}


# -- in a browser ------------------------------------------------------------------------------


def test_in_a_browser_create_use_revoke_budget_and_reset(hub: HubThread, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    bob = hub.mint("bob")
    hub.mint(EVIL, EVIL)
    operator_sign_in(browser, hub)
    browser.get(hub.dashboard_url + "/tokens")
    form = browser.find_element(By.ID, "create-token")
    form.find_element(By.NAME, "user").send_keys("alice")
    form.find_element(By.NAME, "project").send_keys("web")
    form.find_element(By.NAME, "note").send_keys("laptop")
    form.find_element(By.NAME, "budget_month").send_keys("20")
    submit(browser, form.find_element(By.CSS_SELECTOR, "button[type=submit]"))
    token = browser.find_element(By.ID, "new-token").text
    assert token.startswith("hc-") and "?" not in browser.current_url
    browser.save_screenshot(str(tmp_path / "token-created.png"))

    # At the proxy at once, and on no page again.
    assert ask(hub, token).type == "message"
    submit(browser, browser.find_element(By.ID, "all-tokens"))
    assert "shown once" in browser.find_element(By.ID, "flash").text
    (row,) = [r for r in browser.find_elements(By.CSS_SELECTOR, "#token-list tbody tr") if "laptop" in r.text]
    token_id = int(row.get_attribute("data-id"))
    assert "alice" in row.text and "web" in row.text and "$20.00" in row.text
    assert token not in browser.page_source
    browser.get(f"{hub.dashboard_url}/tokens/{token_id}")
    assert token not in browser.page_source
    assert browser.find_element(By.CSS_SELECTOR, "tr.budget[data-window=month]").get_attribute("data-limit") == "20000000"

    submit(browser, browser.find_element(By.CSS_SELECTOR, "#revoke-form button"))
    assert browser.current_url.endswith(f"/tokens/{token_id}?done=revoked")
    assert browser.find_element(By.ID, "status").text == "revoked"
    error = refused(hub, token)
    assert error.status_code == 403 and "revoked" in error.message

    # A user's budget, its bar, its spend and the reset of its window.
    browser.get(hub.dashboard_url + "/tokens/users/bob")
    field = browser.find_element(By.CSS_SELECTOR, "#limits-form input[name=budget_day]")
    field.clear()
    field.send_keys("0.05")
    submit(browser, browser.find_element(By.CSS_SELECTOR, "#limits-form button[type=submit]"))
    assert browser.current_url.endswith("/tokens/users/bob?done=limits")
    bar = browser.find_element(By.CSS_SELECTOR, "tr.budget[data-window=day]")
    assert (bar.get_attribute("data-spent"), bar.get_attribute("data-limit")) == ("0", "50000")
    ask(hub, bob, headers=COSTLY)
    hub.wait_rows(2)
    refused_after_charge(hub, bob)
    browser.refresh()
    bar = browser.find_element(By.CSS_SELECTOR, "tr.budget[data-window=day]")
    assert bar.get_attribute("data-spent") == "81000" and "over" in bar.get_attribute("class")
    assert "$0.081" in bar.text and "$0.05" in bar.text
    assert bar.find_element(By.TAG_NAME, "meter").get_attribute("value") == "50000"
    browser.save_screenshot(str(tmp_path / "user-budget.png"))
    submit(browser, bar.find_element(By.CSS_SELECTOR, "form.reset button"))
    assert browser.current_url.endswith("/tokens/users/bob?done=reset&window=day")
    assert "spend was reset" in browser.find_element(By.ID, "flash").text
    assert browser.find_element(By.CSS_SELECTOR, "tr.budget[data-window=day]").get_attribute("data-spent") == "0"
    assert ask(hub, bob).type == "message"

    # The list: every token, user and project, a hostile name as text.
    browser.get(hub.dashboard_url + "/tokens?revoked=show")
    users = browser.find_element(By.ID, "user-list").text
    assert EVIL in users and "bob" in users and "alice" in users
    assert browser.execute_script("return document.querySelectorAll('main script').length") == 0
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in browser.page_source
    assert [e.get_attribute("data-id") for e in browser.find_elements(By.CSS_SELECTOR, "#token-list tbody tr")] == [
        "1", "2", str(token_id)]
    browser.save_screenshot(str(tmp_path / "tokens.png"))
    browser.find_element(By.ID, "users").location_once_scrolled_into_view
    browser.save_screenshot(str(tmp_path / "tokens-users.png"))
    assert [(e.action, e.actor) for e in audit_rows(hub) if not e.action.startswith("admin.")] == [
        ("token.create", f"admin:{OPERATOR}"), ("token.revoke", f"admin:{OPERATOR}"),
        ("user.set", f"admin:{OPERATOR}"), ("user.reset_spend", f"admin:{OPERATOR}"),
    ]


def test_the_api_makes_a_budget_soft_with_thresholds_as_the_cli_does(hub: HubThread) -> None:
    """soft and warn_at ride the same edit as the CLI's --soft and --warn-at:
    on the budgets the change sets, else on every budget; without a budget
    they are refused and nothing changes."""
    api = Client(hub.dashboard_url)
    bearer = {"authorization": f"Bearer {admin_api_token(hub)}"}
    refused = api.send_json("PATCH", "/api/v1/users/carol", {"soft": True}, csrf=False, headers=bearer)
    assert refused.status == 400 and "budget" in refused.json()["error"]["message"]
    answer = api.send_json("PATCH", "/api/v1/users/carol", {"budget_month": 500, "soft": True, "warn_at": [50, 90]},
                           csrf=False, headers=bearer)
    assert answer.status == 200, answer.text
    conn = store.connect(hub.config.server.database)
    try:
        limits = read_limits(conn, "user", "carol")
    finally:
        conn.close()
    assert limits.soft == ("month",) and limits.warn_at == (("month", (50, 90)),)
    bad = api.send_json("PATCH", "/api/v1/users/carol", {"warn_at": [0]}, csrf=False, headers=bearer)
    assert bad.status == 400 and bad.json()["error"]["message"].startswith("warn_at: ")
    hard = api.send_json("PATCH", "/api/v1/users/carol", {"soft": False}, csrf=False, headers=bearer)
    assert hard.status == 200
    conn = store.connect(hub.config.server.database)
    try:
        assert read_limits(conn, "user", "carol").soft == ()
    finally:
        conn.close()
