"""The live page and its API in front of a real hub, the fake vendor, the
official SDK and the real CLI: traffic figures, requests and open streams
in flight, each key's state and headroom, a key the vendor answers 429
shown cooling and brought back by the page's reset, enable and disable
seen by `hubcore keys` and audited, CSRF on every action; and in a real
browser, the page refreshing itself and a click on disable."""
from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import anthropic
import orjson
import pytest

from hubcore import store
from hubcore.governance import audit
from tests.dashboard.support import Client, add_operator, admin_api_token, operator_sign_in, submit
from tests.fakevendor import FakeVendor
from tests.hubharness import HubThread, make_config, run_cli

T = TypeVar("T")

KEY_A = "sk-ant-live-first"
KEY_B = "sk-ant-live-second"
KEY_C = "sk-ant-live-third"
EVIL = "<script>alert(1)</script>"
MODEL = "claude-sonnet-4-6"
REST = 600.0  # s the fake vendor's 429s ask for: the rest outlasts any test


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="hc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def vendor() -> Iterator[FakeVendor]:
    reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    # Key b's answers say 62% of its tokens are left: its headroom.
    room = [("anthropic-ratelimit-tokens-limit", "100000"), ("anthropic-ratelimit-tokens-remaining", "62000"),
            ("anthropic-ratelimit-tokens-reset", reset)]
    with FakeVendor(keys={KEY_A: "ok", KEY_B: "ok", KEY_C: "ok"}, retry_after=REST, key_headers={KEY_B: room}) as v:
        yield v


@pytest.fixture
def hub(tmp_path: Path, sock_dir: Path, vendor: FakeVendor) -> Iterator[HubThread]:
    # Priorities make the choice of key certain: a while it may take a
    # request, else b; the third (whose label needs escaping) never.
    upstream = {
        "name": "anthropic", "kind": "anthropic", "base_url": vendor.url,
        "keys": [{"key": KEY_A, "label": "a", "priority": 0}, {"key": KEY_B, "label": "b", "priority": 1},
                 {"key": KEY_C, "label": EVIL, "priority": 2}],
    }
    config = make_config(tmp_path, [upstream], dashboard={"listen": "127.0.0.1:0"},
                         ops_socket=str(sock_dir / "ops.sock"))
    with HubThread(config) as running:
        add_operator(running)
        yield running


SDK = Callable[[HubThread, str], anthropic.Anthropic]


@pytest.fixture
def sdk() -> Iterator[SDK]:
    """Official SDK clients of the hub, closed at the end of the test."""
    made: list[anthropic.Anthropic] = []

    def client(hub: HubThread, token: str) -> anthropic.Anthropic:
        made.append(anthropic.Anthropic(api_key=token, base_url=hub.url, max_retries=0))
        return made[-1]

    yield client
    for each in made:
        each.close()



def ask(client: anthropic.Anthropic, **headers: str) -> None:
    client.messages.create(model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "hi"}],
                           extra_headers=headers or None)


def operator(hub: HubThread) -> Client:
    client = Client(hub.dashboard_url)
    assert client.sign_in().status == 303
    assert client.get("/live").status == 200  # for its CSRF token
    return client


def bearer(hub: HubThread) -> dict[str, str]:
    return {"authorization": f"Bearer {admin_api_token(hub)}"}


def live(client: Client, headers: dict[str, str] | None = None) -> dict[str, Any]:
    answer = client.get("/api/v1/live", headers=headers)
    assert answer.status == 200, answer.text
    data: dict[str, Any] = answer.json()
    return data


def key_row(data: dict[str, Any], label: str, upstream: str = "anthropic") -> dict[str, Any]:
    (up,) = [u for u in data["upstreams"] if u["name"] == upstream]
    (key,) = [k for k in up["keys"] if k["label"] == label]
    return dict(key)


def cli_keys(hub: HubThread, *args: str) -> Any:
    done = run_cli("keys", *args, "--socket", hub.config.server.ops_socket)
    return done


def cli_states(hub: HubThread) -> dict[str, str]:
    done = cli_keys(hub, "--json")
    assert done.returncode == 0, done.stderr
    return {k["label"]: k["state"] for k in orjson.loads(done.stdout)}


def audit_rows(hub: HubThread, action: str = "key") -> list[audit.AuditEntry]:
    conn = store.connect(hub.config.server.database)
    try:
        return audit.read(conn, action=action)
    finally:
        conn.close()


def live_when(client: Client, ready: Callable[[dict[str, Any]], bool],
              headers: dict[str, str] | None = None) -> dict[str, Any]:
    """The live API's answer, once `ready` holds of it."""
    return eventually(lambda: data if ready(data := live(client, headers)) else None)


def eventually(check: Callable[[], T | None], timeout: float = 10.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def rest_key_a(hub: HubThread, vendor: FakeVendor, client: anthropic.Anthropic) -> None:
    """The vendor answers 429 to key a: the request goes out again on b,
    and a rests for the model's class."""
    vendor.set_key_behaviour(KEY_A, 429)
    hits = vendor.hits
    ask(client)
    assert vendor.hits[KEY_A] == hits[KEY_A] + 1 and vendor.hits[KEY_B] == hits[KEY_B] + 1
    vendor.set_key_behaviour(KEY_A, "ok")


# -- the API ----------------------------------------------------------------------------


def test_the_live_api_shows_traffic_and_every_keys_state_to_a_token_or_a_session(
    hub: HubThread, sdk: SDK, vendor: FakeVendor,
) -> None:
    client = sdk(hub, hub.mint("alice", "apollo"))
    for _ in range(3):
        ask(client)
    anonymous = Client(hub.dashboard_url)
    assert anonymous.get("/api/v1/live").status == 401
    assert anonymous.get("/live").headers["location"] == "/login"

    token = bearer(hub)
    # The last answer reached the SDK a moment before the hub's bookkeeping of it.
    data = live_when(anonymous, lambda d: d["in_flight"] == 0, token)
    assert data["requests_total"] >= 3 and data["rate_10s"] > 0 and data["rate_60s"] > 0
    assert data["in_flight"] == 0 and data["streams"] == 0 and data["requests"] == []
    assert data["timezone"] == hub.config.server.budget_timezone
    (up,) = data["upstreams"]
    assert (up["name"], up["kind"], up["health"], up["keys_usable"]) == ("anthropic", "anthropic", "ok", 3)
    assert up["attempts"] == 3 and up["answers"] == {"2xx": 3} and up["errors"] == {}
    assert [k["label"] for k in up["keys"]] == ["a", "b", EVIL]
    assert key_row(data, "a")["requests"] == 3 and key_row(data, "a")["state"] == "healthy"

    # A session sees the same; /api/v1/keys is `hubcore keys --json`.
    session = operator(hub)
    assert [u["name"] for u in live(session)["upstreams"]] == ["anthropic"]
    keys = session.get("/api/v1/keys").json()["keys"]
    listed = orjson.loads(cli_keys(hub, "--json").stdout)
    assert [(k["upstream"], k["label"], k["state"]) for k in keys] == \
        [(k["upstream"], k["label"], k["state"]) for k in listed]
    assert set(keys[0]) == set(listed[0])
    for answer in (session.get("/api/v1/live"), session.get("/api/v1/keys"), session.get("/live")):
        assert not any(secret in answer.text for secret in (KEY_A, KEY_B, KEY_C))

    # A developer sees none of it.
    developer = Client(hub.dashboard_url)
    developer.sign_in(token=hub.mint("dev"))
    assert developer.get("/api/v1/live").status == 403
    assert developer.get("/api/v1/keys").status == 403
    assert developer.get("/live").status == 403
    assert developer.send_json("POST", "/api/v1/keys/a/disable", None).status == 403
    assert cli_states(hub)["a"] == "healthy"


def test_a_key_the_vendor_answers_429_shows_cooling_and_the_pages_reset_brings_it_back(
    hub: HubThread, sdk: SDK, vendor: FakeVendor,
) -> None:
    client = sdk(hub, hub.mint())
    ask(client)
    rest_key_a(hub, vendor, client)
    session = operator(hub)
    data = live(session)
    a = key_row(data, "a")
    assert a["rate_limited"] == 1 and list(a["rests"]) == ["sonnet"]
    assert a["rests"]["sonnet"] == pytest.approx(time.time() + REST, abs=30)
    # What the vendor's answers said of the keys' room: a's 429 had none left.
    assert a["headroom"]["sonnet"]["remaining"] == 0.0
    assert key_row(data, "b")["headroom"]["sonnet"]["remaining"] == pytest.approx(0.62)
    assert data["upstreams"][0]["health"] == "degraded"
    assert data["upstreams"][0]["errors"] == {"rate_limited": 1}
    # Requests of that class go to b meanwhile.
    hits = vendor.hits
    ask(client)
    assert vendor.hits[KEY_A] == hits[KEY_A] and vendor.hits[KEY_B] == hits[KEY_B] + 1

    page = session.get("/live")
    assert page.status == 200
    row = page.text.split('data-row="key anthropic a"')[1].split("</tr>")[0]
    assert 'data-state="healthy"' in row and "sonnet cooling until" in row
    assert '<meter min="0" max="1" low="0.1" high="0.5" optimum="1" value="0.0000">0%</meter>' in row
    assert 'action="/live/keys/a/reset"' in row
    b_row = page.text.split('data-row="key anthropic b"')[1].split("</tr>")[0]
    assert "sonnet 62% of tokens" in b_row and 'action="/live/keys/b/reset"' not in b_row

    answer = session.post("/live/keys/a/reset")
    assert answer.status == 303 and answer.headers["location"] == "/live?key=a&did=reset"
    page = session.get(answer.headers["location"])
    assert '<p class="flash" role="status" id="live-flash">Key a reset.</p>' in page.text
    a = key_row(live(session), "a")
    assert a["state"] == "healthy" and a["rests"] == {}
    hits = vendor.hits
    ask(client)
    assert vendor.hits[KEY_A] == hits[KEY_A] + 1 and vendor.hits[KEY_B] == hits[KEY_B]

    (entry,) = audit_rows(hub, "key.reset")
    assert (entry.actor, entry.target, entry.origin) == ("admin:root", "key a", "dashboard 127.0.0.1")
    assert entry.before["anthropic"]["state"] == "healthy" and list(entry.before["anthropic"]["rests"]) == ["sonnet"]
    assert entry.after == {"anthropic": "healthy"}


def test_disable_and_enable_from_the_page_and_the_api_show_in_hubcore_keys_and_are_audited(hub: HubThread) -> None:
    session = operator(hub)
    answer = session.post("/live/keys/b/disable")
    assert answer.status == 303 and answer.headers["location"] == "/live?key=b&did=disable"
    assert cli_states(hub) == {"a": "healthy", "b": "disabled", EVIL: "healthy"}
    page = session.get("/live")
    row = page.text.split('data-row="key anthropic b"')[1].split("</tr>")[0]
    assert 'data-state="disabled"' in row and 'action="/live/keys/b/enable"' in row

    token = bearer(hub)
    api = Client(hub.dashboard_url)
    enabled = api.send_json("POST", "/api/v1/keys/b/enable", None, csrf=False, headers=token)
    assert enabled.status == 200
    assert enabled.json() == {"label": "b", "enabled": True, "states": {"anthropic": "healthy"}, "stored": True}
    assert cli_states(hub)["b"] == "healthy"
    # The key with the awkward label, by its percent-encoded path.
    path = f"/api/v1/keys/{quote(EVIL, safe='')}/disable"
    assert api.send_json("POST", path, None, csrf=False, headers=token).json()["states"] == {"anthropic": "disabled"}
    assert cli_states(hub)[EVIL] == "disabled"

    rows = audit_rows(hub)
    assert [(e.action, e.target, e.actor, e.origin) for e in reversed(rows)] == [
        ("key.disable", "key b", "admin:root", "dashboard 127.0.0.1"),
        ("key.enable", "key b", "admin:root", "api 127.0.0.1"),
        ("key.disable", f"key {EVIL}", "admin:root", "api 127.0.0.1"),
    ]
    assert rows[-1].before == {"anthropic": "healthy"} and rows[-1].after == {"anthropic": "disabled"}

    # Escaped on the page, with the label percent-encoded in its form's action.
    page = session.get("/live").text
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert f'action="/live/keys/{quote(EVIL, safe="")}/enable"' in page


def test_an_action_without_the_csrf_token_is_refused_and_changes_nothing(hub: HubThread) -> None:
    session = operator(hub)
    for path in ("/live/keys/a/disable", "/live/keys/a/reset"):
        refused = session.post(path, csrf=False)
        assert refused.status == 403 and "CSRF" in refused.text
        assert session.post(path, {"csrf": "forged"}, csrf=False).status == 403
    refused = session.send_json("POST", "/api/v1/keys/a/disable", None, csrf=False)
    assert refused.status == 403 and refused.json()["error"]["type"] == "permission_error"
    assert cli_states(hub)["a"] == "healthy"
    assert audit_rows(hub) == []


def test_an_unknown_key_is_404_and_a_get_is_405(hub: HubThread) -> None:
    session = operator(hub)
    for action in ("enable", "disable", "reset"):
        missing = session.send_json("POST", f"/api/v1/keys/nope/{action}", None)
        assert missing.status == 404
        assert missing.json() == {"error": {"type": "not_found_error", "message": "no key labelled 'nope'"}}
    page = session.post("/live/keys/nope/reset")
    assert page.status == 404 and "no key labelled &#x27;nope&#x27;" in page.text and 'href="/live"' in page.text
    wrong = session.get("/api/v1/keys/a/disable")
    assert wrong.status == 405 and wrong.headers["allow"] == "POST"
    assert audit_rows(hub) == []


# -- hubcore keys reset, over the ops socket --------------------------------------------


def test_keys_reset_over_the_ops_socket_ends_the_rest_and_is_audited(
    hub: HubThread, sdk: SDK, vendor: FakeVendor,
) -> None:
    client = sdk(hub, hub.mint())
    rest_key_a(hub, vendor, client)
    listed = orjson.loads(cli_keys(hub, "--json").stdout)
    assert [list(k["rests"]) for k in listed if k["label"] == "a"] == [["sonnet"]]
    shown = cli_keys(hub)
    assert "sonnet resting" in shown.stdout

    done = cli_keys(hub, "reset", "a")
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "key a reset: anthropic healthy", "")
    hits = vendor.hits
    ask(client)
    assert vendor.hits[KEY_A] == hits[KEY_A] + 1
    as_json = cli_keys(hub, "reset", "a", "--json")
    assert orjson.loads(as_json.stdout) == {"label": "a", "states": {"anthropic": "healthy"}, "audited": True}
    entries = audit_rows(hub, "key.reset")
    assert [(e.actor, e.origin, e.target) for e in entries] == [("cli", "cli", "key a")] * 2

    # A key the vendor refused stays dead: the CLI says what revives it.
    vendor.set_key_behaviour(KEY_A, 401)
    ask(client)
    done = cli_keys(hub, "reset", "a")
    assert done.returncode == 0
    assert done.stdout.splitlines() == [
        "key a reset: anthropic dead", "(a dead or disabled key comes back with `hubcore keys enable a`)",
    ]
    missing = cli_keys(hub, "reset", "nope")
    assert missing.returncode == 1 and missing.stdout == "" and "no key labelled 'nope'" in missing.stderr
    assert cli_keys(hub, "reset").returncode == 2


# -- in flight -----------------------------------------------------------------------------


def test_an_open_stream_shows_in_flight_while_it_runs(hub: HubThread, sdk: SDK) -> None:
    session = operator(hub)
    client = sdk(hub, hub.mint("streamer", "apollo"))
    started = threading.Event()
    finished = threading.Event()
    failure: list[BaseException] = []

    def stream() -> None:
        try:
            with client.messages.stream(
                model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "hi"}],
                extra_headers={"x-fake-events": "12", "x-fake-delay-ms": "250"},
            ) as events:
                for _ in events:
                    started.set()
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            failure.append(e)
        finally:
            finished.set()

    worker = threading.Thread(target=stream)
    worker.start()
    try:
        assert started.wait(10)
        data = live_when(session, lambda d: d["streams"] == 1)
        assert data["in_flight"] >= 1
        (request,) = data["requests"]
        assert request["id"].startswith("hc_") and request["stream"] is True and request["phase"] == "streaming"
        assert (request["user"], request["project"], request["model"]) == ("streamer", "apollo", MODEL)
        assert (request["upstream"], request["key"], request["attempts"]) == ("anthropic", "a", 1)
        assert key_row(data, "a")["in_flight"] == 1 and data["upstreams"][0]["in_flight"] == 1
        fragment = session.get("/live/fragment")
        assert fragment.status == 200 and "<html" not in fragment.text
        assert f'data-row="request {request["id"]}" data-phase="streaming" data-stream="1"' in fragment.text
        assert '<dd id="open-streams">1</dd>' in fragment.text
    finally:
        worker.join(30)
    assert finished.is_set() and not failure, failure
    data = live_when(session, lambda d: d["in_flight"] == 0)
    assert data["streams"] == 0 and data["requests"] == []
    assert '<p id="requests-none">No requests in flight.</p>' in session.get("/live/fragment").text


def test_the_page_is_whole_without_javascript_and_loads_its_script_as_a_file(hub: HubThread) -> None:
    session = operator(hub)
    page = session.get("/live")
    assert page.status == 200 and page.headers["content-security-policy"] == "default-src 'self'"
    assert '<a id="live-refresh" href="/live">Refresh</a>' in page.text
    assert '<script src="/static/live.js" defer></script>' in page.text
    assert page.text.count("<script") == 1 and " style=" not in page.text and " onclick" not in page.text
    for figure in ("in-flight", "open-streams", "rate-10s", "rate-60s", "requests-total"):
        assert f'<dd id="{figure}">' in page.text
    for table in ('id="upstreams"', 'id="keys"', 'id="requests-none"'):
        assert table in page.text
    script = session.get("/static/live.js")
    assert script.status == 200 and script.headers["content-type"].startswith("text/javascript")
    assert b"/live/fragment" not in script.body  # the page names its source: data-source
    assert 'data-source="/live/fragment"' in page.text
    # The fragment needs a session as the page does; signed out, it redirects.
    assert Client(hub.dashboard_url).get("/live/fragment").headers["location"] == "/login"


def test_the_openapi_description_has_the_live_and_key_routes(hub: HubThread) -> None:
    spec = Client(hub.dashboard_url).get("/api/v1/openapi.json").json()
    paths = spec["paths"]
    assert {"get"} == set(paths["/api/v1/live"]) == set(paths["/api/v1/keys"])
    for action in ("enable", "disable", "reset"):
        operation = paths[f"/api/v1/keys/{{label}}/{action}"]["post"]
        assert operation["parameters"][0]["name"] == "label" and operation["parameters"][0]["in"] == "path"
        assert {"200", "401", "404"} <= set(operation["responses"])


# -- in a real browser ------------------------------------------------------------------


def test_in_a_browser_the_page_refreshes_by_itself_and_disable_is_a_click(
    hub: HubThread, sdk: SDK, browser: Any, tmp_path: Path,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    operator_sign_in(browser, hub)
    browser.get(hub.dashboard_url + "/live")
    assert browser.title.startswith("Live")

    def figure(ident: str) -> int:
        return int(browser.find_element(By.ID, ident).text)

    WebDriverWait(browser, 10).until(
        lambda b: b.find_element(By.ID, "live-auto").text.startswith("Refreshing by itself"))
    # A mark on this very document: a reload would wipe it.
    browser.execute_script("document.documentElement.setAttribute('data-mark', 'kept')")
    before = figure("requests-total")
    client = sdk(hub, hub.mint())
    for _ in range(3):
        ask(client)
    WebDriverWait(browser, 10).until(lambda b: figure("requests-total") >= before + 3)
    assert browser.find_element(By.TAG_NAME, "html").get_attribute("data-mark") == "kept"
    assert browser.find_element(By.CSS_SELECTOR, "tr[data-key='a'] [data-field='requests']").text == "3"
    browser.save_screenshot(str(tmp_path / "live-refreshed.png"))

    submit(browser, browser.find_element(By.CSS_SELECTOR, "form[action='/live/keys/b/disable'] button"))
    assert browser.current_url == hub.dashboard_url + "/live?key=b&did=disable"
    assert browser.find_element(By.ID, "live-flash").text == "Key b disabled."
    row = browser.find_element(By.CSS_SELECTOR, "tr[data-key='b']")
    assert row.get_attribute("data-state") == "disabled"
    assert row.find_element(By.CSS_SELECTOR, ".state").text == "disabled"
    assert cli_states(hub)["b"] == "disabled"
    # An enable button is where the disable one was; the label with markup reads as text.
    assert row.find_elements(By.CSS_SELECTOR, "form[action='/live/keys/b/enable'] button")
    assert browser.find_elements(By.XPATH, f"//th[text()='{EVIL}']")
    browser.save_screenshot(str(tmp_path / "live.png"))
    assert (tmp_path / "live.png").stat().st_size > 0

    # The key's state changed behind the page's back shows on the next refresh.
    done = cli_keys(hub, "enable", "b")
    assert done.returncode == 0, done.stderr
    WebDriverWait(browser, 10).until(
        lambda b: b.find_element(By.CSS_SELECTOR, "tr[data-key='b']").get_attribute("data-state") == "healthy")


def test_the_fragment_names_a_worker_that_did_not_answer() -> None:
    from zoneinfo import ZoneInfo

    from hubcore.dashboard.views.live import render_fragment
    from hubcore.ops.merge import merge_live

    own = {"now": 1_800_000_000.0, "uptime_s": 5.0, "draining": False, "connections_open": 1, "in_flight": 1,
           "streams": 0, "requests_total": 3, "rate_10s": 0.0, "rate_60s": 0.0, "loop_lag_s": 0.0,
           "requests": [], "requests_not_shown": 0, "upstreams": []}
    whole = render_fragment(merge_live([own, own], 50), "csrf", ZoneInfo("UTC"))
    assert "workers-missing" not in whole and 'id="in-flight">2</dd>' in whole  # both workers'
    missing = render_fragment(merge_live([own, None, None], 50), "csrf", ZoneInfo("UTC"))
    assert "Workers 1, 2 did not answer in time: their requests are not counted here." in missing
    one = render_fragment(merge_live([own, None], 50), "csrf", ZoneInfo("UTC"))
    assert "Worker 1 did not answer in time: its requests are not counted here." in one
