"""The dashboard in a real browser (Debian's chromium and chromium-driver
through Selenium) in front of a real hub, the fake vendor and the real CLI:
developer sign-in, /me's figures against `hubcore usage`, escaping, one
developer never seeing another's figures, CSRF, headers, and the proxy
port serving none of it."""
from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anthropic
import orjson
import pytest

from hubcore.governance.limits import Limits, calendar_periods
from tests.conftest import upstreams_for
from tests.fakevendor import FakeVendor
from tests.dashboard.support import sign_in, submit
from tests.hubharness import HubThread, make_config, run_cli

ZONE = "Asia/Kolkata"  # an offset that is not whole hours, shown on the page
EVIL = "<script>alert(1)</script>"
USAGE = {"x-fake-usage": orjson.dumps({"input_tokens": 12000, "output_tokens": 3000}).decode()}


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubThread]:
    with FakeVendor() as vendor:
        config = make_config(tmp_path, upstreams_for(vendor), dashboard={"listen": "127.0.0.1:0"}, budget_timezone=ZONE)
        with HubThread(config) as running:
            yield running


def spend(hub: HubThread, token: str, times: int) -> None:
    with anthropic.Anthropic(base_url=hub.url, api_key=token, max_retries=0) as client:
        for _ in range(times):
            client.messages.create(model="claude-sonnet-4-6", max_tokens=64,
                                   messages=[{"role": "user", "content": "hi"}], extra_headers=USAGE)


def cli_usage(tmp_path: Path, hub: HubThread, since: float, until: float) -> dict[str, Any]:
    toml = tmp_path / "cli.toml"
    toml.write_text(f'[server]\ndatabase = "{hub.config.server.database}"\nbudget_timezone = "{ZONE}"\n')
    iso = lambda ts: datetime.fromtimestamp(ts, timezone.utc).isoformat()  # noqa: E731
    done = run_cli("usage", "--by", "user", "--format", "json", "--since", iso(since), "--until", iso(until),
                   "--config", str(toml))
    assert done.returncode == 0, done.stderr
    return {group["group"]: group for group in orjson.loads(done.stdout)["groups"]}


def page_figures(browser: Any) -> dict[str, int]:
    from selenium.webdriver.common.by import By

    return {
        period: int(browser.find_element(By.CSS_SELECTOR, f"#spend-{period} [data-field=cost]").get_attribute("data-micros"))
        for period in ("today", "week", "month")
    }


def test_a_developer_signs_in_and_sees_their_own_figures_as_the_cli_reports_them(
    hub: HubThread, browser: Any, tmp_path: Path,
) -> None:
    from selenium.webdriver.common.by import By

    alice = hub.mint_limited("alice", Limits(rpm=50, concurrency=3, budget_day=5_000_000))
    bob = hub.mint(EVIL)
    spend(hub, alice, 2)
    spend(hub, bob, 3)
    hub.wait_rows(5)

    sign_in(browser, hub, alice)
    assert browser.current_url == hub.dashboard_url + "/me"
    browser.save_screenshot(str(tmp_path / "me-alice.png"))
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "UTC+05:30" in browser.find_element(By.ID, "zone").text

    import time
    tz = ZoneInfo(ZONE)
    figures = page_figures(browser)
    for period, (start, end) in zip(("today", "week", "month"), calendar_periods(time.time(), tz)):
        by_user = cli_usage(tmp_path, hub, start, end)
        assert figures[period] == by_user["alice"]["cost_micros"] > 0, period
        # Nothing of bob's: neither his name nor his own total.
        assert str(by_user[EVIL]["cost_micros"]) not in browser.page_source
    assert EVIL not in browser.page_source and "&lt;script&gt;" not in browser.page_source
    limits = browser.find_element(By.ID, "limits-user").text
    assert "50" in limits and "3" in limits
    budgets = browser.find_element(By.ID, "budgets").text
    assert "$5.00" in budgets and "day" in budgets
    bars = browser.find_elements(By.CSS_SELECTOR, "svg#daily rect.bar")
    assert len(bars) == 30 and int(bars[-1].get_attribute("data-micros")) == figures["today"]
    assert "Sign out" in body

    # The other developer: his name shows as text, never runs, and alice's figures are not his.
    sign_in(browser, hub, bob)
    browser.save_screenshot(str(tmp_path / "me-script-user.png"))
    assert browser.find_element(By.ID, "user").text == EVIL
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in browser.page_source
    assert browser.execute_script("return document.querySelectorAll('main script').length") == 0
    bob_figures = page_figures(browser)
    assert bob_figures["today"] != figures["today"] and bob_figures["today"] > 0

    # Signing out ends the session: /me sends back to the sign-in page.
    submit(browser, browser.find_element(By.CSS_SELECTOR, "form[action='/logout'] button"))
    assert browser.current_url == hub.dashboard_url + "/login"
    browser.get(hub.dashboard_url + "/me")
    assert browser.current_url == hub.dashboard_url + "/login"
    browser.save_screenshot(str(tmp_path / "login.png"))


def test_a_revoked_or_unknown_token_gets_the_form_again_with_401(hub: HubThread, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    for token in (hub.mint_revoked(), "hc_not-a-token"):
        sign_in(browser, hub, token)
        assert browser.current_url == hub.dashboard_url + "/login"
        assert "unknown or revoked" in browser.find_element(By.CSS_SELECTOR, ".error").text
    browser.save_screenshot(str(tmp_path / "login-refused.png"))
    # An unknown operator gets the operator form's own error, the name kept.
    browser.get(hub.dashboard_url + "/login")
    browser.find_element(By.ID, "name").send_keys("root")
    browser.find_element(By.ID, "password").send_keys("hunter2")
    submit(browser, browser.find_elements(By.CSS_SELECTOR, "form[action='/login'] button")[1])
    assert browser.find_element(By.CSS_SELECTOR, ".error").text == "wrong name or password"
    assert browser.find_element(By.ID, "name").get_attribute("value") == "root"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _open(request: urllib.request.Request) -> tuple[int, Any, bytes]:
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=10) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def _session_cookie(hub: HubThread, token: str) -> str:
    status, headers, _ = _open(urllib.request.Request(hub.dashboard_url + "/login"))
    login_cookie = next(c for c in headers.get_all("set-cookie") if c.startswith("hubcore_login="))
    csrf = login_cookie.split(";")[0].split("=", 1)[1]
    form = f"csrf={csrf}&token={token}".encode()
    status, headers, _ = _open(urllib.request.Request(
        hub.dashboard_url + "/login", data=form, headers={"cookie": f"hubcore_login={csrf}"}))
    assert status == 303
    cookie = next(c for c in headers.get_all("set-cookie") if c.startswith("hubcore_session="))
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/"):
        assert attribute in cookie
    return cookie.split(";")[0]


def test_logout_without_the_csrf_token_is_refused(hub: HubThread) -> None:
    cookie = _session_cookie(hub, hub.mint("carol"))
    status, _, _ = _open(urllib.request.Request(hub.dashboard_url + "/logout", data=b"", headers={"cookie": cookie}))
    assert status == 403
    status, _, body = _open(urllib.request.Request(hub.dashboard_url + "/me", headers={"cookie": cookie}))
    assert status == 200 and b"carol" in body  # still signed in
    csrf = body.split(b'name="csrf" value="', 1)[1].split(b'"', 1)[0].decode()
    status, _, _ = _open(urllib.request.Request(
        hub.dashboard_url + "/logout", data=b"", headers={"cookie": cookie, "x-csrf-token": csrf}))
    assert status == 303
    status, headers, _ = _open(urllib.request.Request(hub.dashboard_url + "/me", headers={"cookie": cookie}))
    assert status == 303 and headers["location"] == "/login"


def test_every_dashboard_answer_carries_the_security_headers(hub: HubThread) -> None:
    cookie = _session_cookie(hub, hub.mint("dave"))
    for path, cache in (("/login", "no-store"), ("/me", "no-store"), ("/nowhere", "no-store"),
                        ("/static/dashboard.css", "max-age")):
        status, headers, _ = _open(urllib.request.Request(hub.dashboard_url + path, headers={"cookie": cookie}))
        assert headers["content-security-policy"] == "default-src 'self'", path
        assert headers["x-frame-options"] == "DENY", path
        assert headers["referrer-policy"] == "same-origin", path
        assert headers["x-content-type-options"] == "nosniff", path
        assert cache in headers["cache-control"], path


def test_the_proxy_port_serves_no_dashboard_page(hub: HubThread) -> None:
    for path in ("/login", "/me", "/static/dashboard.css"):
        status, _, _ = _open(urllib.request.Request(hub.url + path))
        assert status == 404, path
