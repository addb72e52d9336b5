"""Operators on the dashboard over plain HTTP: sign-in with name and
password, the lockout after repeated failures (audited), sessions that end
when the account changes, admin API tokens, CSRF on every change, a
developer kept out of operator pages and API, and the OpenAPI description."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hubcore import store
from hubcore.governance import admins, audit
from hubcore.governance.throttle import MAX_FAILURES
from tests.conftest import upstreams_for
from tests.dashboard.support import OPERATOR, PASSWORD, Client, add_operator, admin_api_token
from tests.fakevendor import FakeVendor
from tests.hubharness import HubThread, make_config, run_cli


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubThread]:
    with FakeVendor() as vendor:
        config = make_config(tmp_path, upstreams_for(vendor), dashboard={"listen": "127.0.0.1:0"})
        with HubThread(config) as running:
            add_operator(running)
            yield running


def audit_rows(hub: HubThread) -> list[audit.AuditEntry]:
    conn = store.connect(hub.config.server.database)
    try:
        return audit.read(conn)
    finally:
        conn.close()


def test_an_operator_signs_in_lands_on_the_overview_and_the_sign_in_is_audited(hub: HubThread) -> None:
    client = Client(hub.dashboard_url)
    answer = client.sign_in()
    assert answer.status == 303 and answer.headers["location"] == "/"
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    page = client.get("/audit")
    assert page.status == 200 and OPERATOR in page.text
    assert 'href="/usage"' in page.text and 'aria-current="page"' in page.text
    (entry,) = [e for e in audit_rows(hub) if e.action == "admin.sign_in"]
    assert entry.actor == f"admin:{OPERATOR}" and entry.origin == "dashboard 127.0.0.1"
    # /login with a session goes back in, and /me is not an operator's.
    assert client.get("/login").headers["location"] == "/"
    assert client.get("/me").headers["location"] == "/"


def test_a_wrong_password_is_refused_and_the_tenth_failure_locks_the_name(hub: HubThread) -> None:
    client = Client(hub.dashboard_url)
    for _ in range(MAX_FAILURES):
        answer = client.sign_in(password="not the password")
        assert answer.status == 401 and "wrong name or password" in answer.text
    # Locked: even the right password is refused now, without a check.
    answer = client.sign_in()
    assert answer.status == 429 and "too many failed sign-ins; try again in 15 minutes" in answer.text
    locks = [e for e in audit_rows(hub) if e.action == "admin.locked_out"]
    assert len(locks) == 1 and locks[0].target == f"admin {OPERATOR}"
    assert locks[0].after["address"] == "127.0.0.1" and locks[0].after["failures"] == MAX_FAILURES
    # Another operator from another name is locked too: the address is.
    add_operator(hub, "second", PASSWORD)
    assert Client(hub.dashboard_url).sign_in(name="second").status == 429


def test_removing_an_operator_or_changing_the_password_ends_their_sessions(hub: HubThread, tmp_path: Path) -> None:
    client = Client(hub.dashboard_url)
    client.sign_in()
    assert client.get("/audit").status == 200
    toml = tmp_path / "cli.toml"
    toml.write_text(f'[server]\ndatabase = "{hub.config.server.database}"\n')
    done = run_cli("admin", "passwd", OPERATOR, "--password-stdin", "--config", str(toml), input_text="another long password\n")
    assert done.returncode == 0, done.stderr
    assert client.get("/audit").headers["location"] == "/login"
    assert client.sign_in(password="another long password").status == 303
    conn = store.connect(hub.config.server.database)
    try:
        admins.remove(conn, OPERATOR)
    finally:
        conn.close()
    assert client.get("/audit").headers["location"] == "/login"


def test_every_change_needs_the_sessions_csrf_token(hub: HubThread) -> None:
    client = Client(hub.dashboard_url)
    client.sign_in()
    assert client.post("/logout", csrf=False).status == 403
    assert client.post("/logout", {"csrf": "forged"}, csrf=False).status == 403
    assert client.get("/audit").status == 200  # still signed in
    assert client.post("/logout").status == 303
    assert client.get("/audit").headers["location"] == "/login"


def test_the_api_takes_an_admin_token_or_a_session_and_answers_json(hub: HubThread) -> None:
    token = admin_api_token(hub)
    anonymous = Client(hub.dashboard_url)
    refused = anonymous.get("/api/v1/audit")
    assert refused.status == 401 and refused.json()["error"]["type"] == "authentication_error"
    bad = anonymous.get("/api/v1/audit", headers={"authorization": "Bearer hca-not-a-token"})
    assert bad.status == 401 and "unknown or revoked" in bad.json()["error"]["message"]
    answer = anonymous.get("/api/v1/audit", headers={"authorization": f"Bearer {token}"})
    assert answer.status == 200 and answer.headers["content-type"] == "application/json"
    assert answer.json() == {"entries": [], "next_before": None}
    assert token not in answer.text
    client = Client(hub.dashboard_url)
    client.sign_in()
    entries = client.get("/api/v1/audit?limit=1").json()["entries"]
    assert [e["action"] for e in entries] == ["admin.sign_in"]
    assert client.get("/api/v1/audit?limit=0").json()["error"]["message"] == "limit: must be 1..1000, not 0"
    assert client.get("/api/v1/nothing").status == 404


def test_a_developer_sees_only_their_own_view_in_pages_and_api(hub: HubThread) -> None:
    client = Client(hub.dashboard_url)
    assert client.sign_in(token=hub.mint("dev")).headers["location"] == "/me"
    assert client.get("/").headers["location"] == "/me"
    assert client.get("/audit").status == 403
    forbidden = client.get("/api/v1/audit")
    assert forbidden.status == 403 and forbidden.json()["error"]["type"] == "permission_error"
    mine = client.get("/api/v1/me").json()
    assert mine["user"] == "dev" and [p["period"] for p in mine["spend"]] == ["today", "week", "month"]
    assert Client(hub.dashboard_url).get("/api/v1/me").status == 401


def test_the_audit_page_escapes_and_pages_by_keyset(hub: HubThread) -> None:
    conn = store.connect(hub.config.server.database)
    try:
        for n in range(5):
            audit.record(conn, "cli:<b>x</b>", "token.create", f"token {n}", None, {"note": "<script>"}, "cli")
    finally:
        conn.close()
    client = Client(hub.dashboard_url)
    client.sign_in()
    page = client.get("/audit?limit=2&action=token")
    assert page.text.count('<tr data-id="') == 2
    assert "<script>" not in page.text and "&lt;b&gt;x&lt;/b&gt;" in page.text
    assert 'id="older" href="/audit?action=token&amp;limit=2&amp;before=4"' in page.text
    older = client.get("/audit?action=token&limit=2&before=4")
    assert [line.split('"')[0] for line in older.text.split('<tr data-id="')[1:]] == ["3", "2"]


def test_the_openapi_description_names_every_api_route(hub: HubThread) -> None:
    spec = Client(hub.dashboard_url).get("/api/v1/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    assert {"/api/v1/audit", "/api/v1/me"} <= set(spec["paths"])
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_an_unknown_page_is_404_and_a_wrong_method_405(hub: HubThread) -> None:
    client = Client(hub.dashboard_url)
    assert client.get("/nothing").status == 404
    answer = client.request("DELETE", "/login")
    assert answer.status == 405 and answer.headers["allow"] == "GET, POST"
