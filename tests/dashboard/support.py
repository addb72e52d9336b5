"""The dashboard tests' shared parts: a real Chromium through Selenium (the
`browser` fixture), operators added as the CLI adds them, and an HTTP
client that keeps its cookies and the page's CSRF token, for the tests
that need no browser."""
from __future__ import annotations

import http.client
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import orjson
import pytest

from hubcore import store
from hubcore.governance import admins
from tests.hubharness import HubThread

OPERATOR = "root"
PASSWORD = "correct horse battery"


def browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver (chromium-driver)", driver)) if not path]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        reason = f"no {', '.join(missing)}: apt-get install chromium chromium-driver; pip install selenium"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser tests: {reason}")
        pytest.skip(reason)
    assert chromium and driver
    return chromium, driver


@pytest.fixture
def browser() -> Iterator[Any]:
    chromium, driver = browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,1400"):
        options.add_argument(flag)
    drv = webdriver.Chrome(service=Service(driver), options=options)
    drv.set_page_load_timeout(30)
    try:
        yield drv
    finally:
        drv.quit()


def sign_in(browser: Any, hub: HubThread, token: str) -> None:
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    browser.get(hub.dashboard_url + "/login")
    browser.find_element(By.ID, "token").send_keys(token)
    submit(browser, browser.find_element(By.CSS_SELECTOR, "form[action='/login'] button"))


def submit(browser: Any, button: Any) -> None:
    """Click a form's button and wait until the page it loads replaced this
    one (a click returns before the navigation it starts)."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    page = browser.find_element(By.TAG_NAME, "html")

    def replaced(_: Any) -> bool:
        # Chromium says so as a stale element, or, caught mid-navigation, as
        # a node that "does not belong to the document".
        try:
            page.is_enabled()
        except WebDriverException:
            return True
        return False

    button.click()
    WebDriverWait(browser, 10).until(replaced)


def operator_sign_in(browser: Any, hub: HubThread, name: str = OPERATOR, password: str = PASSWORD) -> None:
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    browser.get(hub.dashboard_url + "/login")
    browser.find_element(By.ID, "name").send_keys(name)
    browser.find_element(By.ID, "password").send_keys(password)
    submit(browser, browser.find_elements(By.CSS_SELECTOR, "form[action='/login'] button")[1])


def add_operator(hub: HubThread | str | Path, name: str = OPERATOR, password: str = PASSWORD) -> None:
    """An operator account, as `hubcore admin add` stores it."""
    database = hub.config.server.database if isinstance(hub, HubThread) else hub
    conn = store.connect(database)
    try:
        admins.add(conn, name, password, time.time())
    finally:
        conn.close()


def admin_api_token(hub: HubThread, name: str = OPERATOR) -> str:
    """An admin API token of `name`, as `hubcore admin token` mints it."""
    conn = store.connect(hub.config.server.database)
    try:
        return admins.create_token(conn, name, time.time())[1]
    finally:
        conn.close()


_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class Answer:
    status: int
    headers: Mapping[str, str]   # lower-case names; the last of repeated ones
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return orjson.loads(self.body)


class Client:
    """One browser's worth of state over plain HTTP: cookies, and the CSRF
    token of the last page that carried one. Redirects are not followed."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.cookies: dict[str, str] = {}
        self.csrf = ""

    def request(self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None) -> Answer:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            sent = dict(headers or {})
            if self.cookies:
                sent["cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            data = response.read()
            for name, value in response.getheaders():
                if name.lower() == "set-cookie":
                    key, _, rest = value.partition("=")
                    val = rest.split(";", 1)[0]
                    if "Max-Age=0" in value:
                        self.cookies.pop(key, None)
                    else:
                        self.cookies[key] = val
            answer = Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
        finally:
            conn.close()
        found = _CSRF.search(answer.body.decode("utf-8", "replace")) if answer.headers.get(
            "content-type", "").startswith("text/html") else None
        if found:
            self.csrf = found.group(1)
        return answer

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> Answer:
        return self.request("GET", path, headers=headers)

    def post(self, path: str, form: Mapping[str, Any] | None = None, *, csrf: bool = True,
             headers: Mapping[str, str] | None = None) -> Answer:
        """A form post; with the current CSRF token unless csrf=False."""
        fields = dict(form or {})
        if csrf:
            fields.setdefault("csrf", self.csrf)
        body = urlencode(fields).encode()
        return self.request("POST", path, body, {"content-type": "application/x-www-form-urlencoded", **(headers or {})})

    def send_json(self, method: str, path: str, obj: Any, *, csrf: bool = True,
                  headers: Mapping[str, str] | None = None) -> Answer:
        """A JSON request; with the session's CSRF token in X-CSRF-Token unless csrf=False."""
        sent = {"content-type": "application/json", **(headers or {})}
        if csrf:
            sent["x-csrf-token"] = self.csrf
        return self.request(method, path, orjson.dumps(obj), sent)

    def sign_in(self, *, token: str | None = None, name: str = OPERATOR, password: str = PASSWORD) -> Answer:
        """Sign in as a developer (token) or an operator; the answer to the POST."""
        self.get("/login")
        form = {"token": token} if token is not None else {"name": name, "password": password}
        answer = self.post("/login", form)
        if answer.status == 303:
            self.get(answer.headers["location"])  # the landing page, for its CSRF token
        return answer
