"""/requests and /api/v1/requests: the latest usage rows, filtered by user,
project, model, outcome, status and time (in the reporting zone), paged by
keyset; one row's detail; over plain HTTP and in a real browser in front of
a real hub, the fake vendor and the anthropic SDK."""
from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode
from zoneinfo import ZoneInfo

import anthropic
import orjson
import pytest

from hubcore import store
from hubcore.accounting.rows import insert_values
from hubcore.accounting.usage import FIELDS, UsageEvent, insert_sql
from hubcore.dashboard.views import requests as requests_view
from hubcore.governance.limits import format_time, format_usd
from tests.conftest import upstreams_for
from tests.dashboard.support import Client, add_operator, admin_api_token, operator_sign_in, submit
from tests.fakevendor import ANTHROPIC_KEY, FakeVendor
from tests.hubharness import HubThread, make_config
from tests.pgserver import PgDatabase, pg_server_database

ZONE = "Europe/Berlin"
EVIL = "<script>alert(1)</script>"
# 2026-03-29: Berlin moves from UTC+01:00 to UTC+02:00 at 01:00 UTC.
DST_DAY = datetime(2026, 3, 29, tzinfo=ZoneInfo(ZONE)).timestamp()


@pytest.fixture
def vendor() -> Iterator[FakeVendor]:
    with FakeVendor() as running:
        yield running


@pytest.fixture
def hub(tmp_path: Path, vendor: FakeVendor) -> Iterator[HubThread]:
    config = make_config(tmp_path, upstreams_for(vendor), dashboard={"listen": "127.0.0.1:0"}, budget_timezone=ZONE)
    with HubThread(config) as running:
        add_operator(running)
        yield running


def operator(hub: HubThread) -> Client:
    client = Client(hub.dashboard_url)
    assert client.sign_in().status == 303
    return client


def store_rows(hub: HubThread, events: list[UsageEvent]) -> list[dict[str, Any]]:
    """Rows stored with the usage writer's own INSERT; returned as the table has them."""
    conn = store.connect(hub.config.server.database)
    try:
        with store.immediate(conn):
            for event in events:
                conn.execute(insert_sql(1), insert_values([event]))
        cursor = conn.execute(f"SELECT id, {', '.join(FIELDS)} FROM usage ORDER BY id")
        return [dict(zip(("id", *FIELDS), row)) for row in cursor]
    finally:
        conn.close()


USERS = ("alice", "bob", "carol")
MODELS = ("claude-sonnet-4-6", "claude-haiku-4-5")
OUTCOME_STATUS = (("ok", 200), ("ok", 200), ("ok", 200), ("upstream_error", 529), ("refused", 429),
                  ("client_aborted", 200))


def varied_events(count: int, start: float) -> list[UsageEvent]:
    """`count` rows an hour apart from `start`, written out of time order (as
    a long request's row lands after shorter, later ones), with every
    filter's values in turn."""
    events = []
    for i in range(count):
        outcome, status = OUTCOME_STATUS[i % len(OUTCOME_STATUS)]
        events.append(UsageEvent(
            ts=start + i * 3600.0, request_id=f"req-{i:04d}", endpoint="/v1/messages", status=status, outcome=outcome,
            total_ms=1000.0 + i, token_id=1 + i % 3, user=USERS[i % 3], project=f"proj-{i % 2}",
            upstream="anthropic", key_label="a" if i % 2 else "b", model=MODELS[i % 2], input_tokens=100 + i,
            output_tokens=10 + i, cache_read=1000 * i, cost_micros=1000 + i, ttfb_ms=200.0 + i, attempts=1,
            route=f"anthropic/{'a' if i % 2 else 'b'}:{status}",
        ))
    # Rows land in the order requests end: swap neighbours so ids do not follow ts.
    for i in range(0, count - 1, 4):
        events[i], events[i + 1] = events[i + 1], events[i]
    return events


def newest_first(rows: list[dict[str, Any]]) -> list[int]:
    return [row["id"] for row in sorted(rows, key=lambda r: (r["ts"], r["id"]), reverse=True)]


def api_pages(client: Client, query: dict[str, Any], headers: dict[str, str] | None = None) -> list[int]:
    """Every page of /api/v1/requests for `query`, following next_before."""
    ids: list[int] = []
    after = None
    while True:
        page = client.get("/api/v1/requests?" + urlencode({**query, **({"before": after} if after else {})}),
                          headers=headers)
        assert page.status == 200, page.text
        body = page.json()
        ids += [row["id"] for row in body["rows"]]
        after = body["next_before"]
        if after is None:
            return ids
        if body["searched_to"] is None:
            assert len(body["rows"]) == int(query.get("limit", requests_view.PAGE_ROWS))


def test_every_filter_and_the_keyset_pages_give_the_rows_newest_first(hub: HubThread) -> None:
    rows = store_rows(hub, varied_events(130, DST_DAY - 48 * 3600))
    client = operator(hub)
    token = {"authorization": f"Bearer {admin_api_token(hub)}"}
    assert api_pages(client, {}) == newest_first(rows)
    assert api_pages(client, {"limit": 7}, token) == newest_first(rows)
    cases: list[tuple[dict[str, Any], Any]] = [
        ({"user": "bob"}, lambda r: r["user"] == "bob"),
        ({"project": "proj-1"}, lambda r: r["project"] == "proj-1"),
        ({"model": "claude-haiku-4-5"}, lambda r: r["model"] == "claude-haiku-4-5"),
        ({"outcome": "upstream_error"}, lambda r: r["outcome"] == "upstream_error"),
        ({"status": 429}, lambda r: r["status"] == 429),
        ({"user": "alice", "model": "claude-haiku-4-5", "outcome": "ok"},
         lambda r: r["user"] == "alice" and r["model"] == "claude-haiku-4-5" and r["outcome"] == "ok"),
        ({"user": "carol", "status": 200, "project": "proj-0"},
         lambda r: r["user"] == "carol" and r["status"] == 200 and r["project"] == "proj-0"),
        # Local times of the reporting zone, across the DST change (05:00 on
        # the 29th is 4 hours after its midnight): from is inclusive, until exclusive.
        ({"from": "2026-03-28T12:00", "until": "2026-03-29T05:00"},
         lambda r: DST_DAY - 12 * 3600 <= r["ts"] < DST_DAY + 4 * 3600),
        ({"from": "2026-03-28", "user": "alice"},
         lambda r: r["ts"] >= DST_DAY - 86400 and r["user"] == "alice"),
        ({"until": "2026-03-28T00:00:00+01:00", "outcome": "ok", "project": "proj-1"},
         lambda r: r["ts"] < DST_DAY - 86400 and r["outcome"] == "ok" and r["project"] == "proj-1"),
        ({"user": "nobody"}, lambda r: False),
        ({"user": "bob", "project": "proj-nowhere"}, lambda r: False),
    ]
    for query, keep in cases:
        expected = newest_first([r for r in rows if keep(r)])
        assert api_pages(client, {**query, "limit": 4}) == expected, query
        assert api_pages(client, query) == expected, query


def test_the_page_shows_fifty_rows_with_older_and_newest_links(hub: HubThread) -> None:
    rows = store_rows(hub, varied_events(60, time.time() - 80 * 3600))
    client = operator(hub)
    page = client.get("/requests")
    assert page.status == 200 and 'aria-current="page"' in page.text
    shown = [int(i) for i in re.findall(r'<tr data-id="(\d+)">', page.text)]
    assert shown == newest_first(rows)[:50]
    older = re.search(r'<a id="older" href="([^"]+)"', page.text)
    assert older and 'id="newest"' not in page.text
    second = client.get(older.group(1).replace("&amp;", "&"))
    assert [int(i) for i in re.findall(r'<tr data-id="(\d+)">', second.text)] == newest_first(rows)[50:]
    assert 'id="older"' not in second.text and 'id="newest" href="/requests?"' in second.text
    # The filters stay in the Older link and the form.
    filtered = client.get("/requests?user=alice&limit=5&from=7d")
    older = re.search(r'<a id="older" href="([^"]+)"', filtered.text)
    assert older and "user=alice" in older.group(1) and "limit=5" in older.group(1) and "from=7d" in older.group(1)
    assert 'id="filter-user" value="alice"' in filtered.text
    assert '<option value="alice">' in filtered.text  # the form suggests the users it knows
    # Each row links to its detail, whose time is in the reporting zone.
    newest = next(r for r in rows if r["id"] == newest_first(rows)[0])
    assert f'<a href="/requests/{newest["id"]}">{format_time(newest["ts"], ZoneInfo(ZONE))}</a>' in page.text


def test_the_detail_has_every_figure_of_the_row(hub: HubThread) -> None:
    event = UsageEvent(
        ts=DST_DAY + 7200.5, request_id="req-detail", endpoint="/v1/messages", status=200, outcome="ok",
        total_ms=4321.5, token_id=7, user="alice", project="web", upstream="backup", key_label="team-b",
        model="claude-sonnet-4-6", input_tokens=1234, output_tokens=567, cache_write_5m=89, cache_write_1h=1011,
        cache_read=121314, reasoning_tokens=15, server_tool_requests=2, stop_reason="tool_use", cost_micros=987654,
        ttfb_ms=812.25, attempts=2, session_id="sess-42", user_agent="claude-cli/2.1.197 (external, cli)",
        cost_basis="estimate", served_model="relay-sonnet", route="primary/a:529,backup/team-b:200",
    )
    (row,) = store_rows(hub, [event])
    client = operator(hub)
    detail = client.get(f"/api/v1/requests/{row['id']}").json()
    assert {k: detail[k] for k in row if k != "output_estimated"} == {k: v for k, v in row.items() if k != "output_estimated"}
    assert detail["output_estimated"] is False
    # Two hours after midnight on the day the clocks skip 02:00-03:00.
    assert detail["time"] == "2026-03-29T03:00:00+02:00"
    assert detail["route_chain"] == [{"upstream": "primary", "key": "a", "status": 529},
                                     {"upstream": "backup", "key": "team-b", "status": 200}]
    page = client.get(f"/requests/{row['id']}")
    assert page.status == 200
    for key, value in (("input_tokens", 1234), ("output_tokens", 567), ("cache_write_5m", 89),
                       ("cache_write_1h", 1011), ("cache_read", 121314), ("reasoning_tokens", 15)):
        assert f'id="tokens-{key}"' in page.text and f'data-value="{value}">{value:,}<' in page.text
    for text in ("2026-03-29T03:00:00+02:00", "req-detail", "relay-sonnet", "team-b", "backup", "sess-42",
                 "claude-cli/2.1.197 (external, cli)", "812 ms", "4,322 ms", 'data-micros="987654"',
                 format_usd(987654), "estimated", "tool_use"):
        assert text in page.text, text
    assert '<span class="upstream">primary</span>/<span class="key">a</span> → <span class="status">529</span>' in page.text
    assert "Request " + str(row["id"]) in page.text


def test_a_route_reads_as_its_attempts_in_order() -> None:
    assert requests_view.route_chain(None) == []
    assert requests_view.route_chain("primary/a:529,primary/b:connect,backup/c:200,+3 more") == [
        {"upstream": "primary", "key": "a", "status": 529}, {"upstream": "primary", "key": "b", "status": "connect"},
        {"upstream": "backup", "key": "c", "status": 200}, {"more": 3}]
    # A key label may hold a colon: the outcome is after the last one.
    assert requests_view.route_chain("relay/k:1:timeout") == [{"upstream": "relay", "key": "k:1", "status": "timeout"}]


def test_bad_ids_and_fields_are_clear_400s_and_absent_rows_404s(hub: HubThread) -> None:
    store_rows(hub, varied_events(3, time.time() - 3600))
    client = operator(hub)
    for path, message in (
        ("/api/v1/requests/abc", "id: expected a request's number, got 'abc'"),
        ("/api/v1/requests/-1", "id: expected a request's number, got '-1'"),
        ("/api/v1/requests?status=abc", "status: expected a whole number, got 'abc'"),
        ("/api/v1/requests?status=42", "status: must be 100..599, not 42"),
        ("/api/v1/requests?outcome=great", "outcome: must be one of ok, client_aborted, upstream_error, "
                                           "upstream_aborted, refused, not 'great'"),
        ("/api/v1/requests?from=yesterday-ish", "from: cannot read time"),
        ("/api/v1/requests?from=2026-03-02&until=2026-03-01", "until: must be later than from"),
        ("/api/v1/requests?limit=0", "limit: must be 1..500, not 0"),
        ("/api/v1/requests?before=x", "before: expected a whole number, got 'x'"),
    ):
        answer = client.get(path)
        assert answer.status == 400 and answer.json()["error"]["type"] == "invalid_request_error", path
        assert message in answer.json()["error"]["message"], (path, answer.text)
    missing = client.get("/api/v1/requests/999999")
    assert missing.status == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert "no request 999999" in missing.json()["error"]["message"]
    for path in ("/requests/abc", "/requests?status=abc"):
        answer = client.get(path)
        assert answer.status == 400 and answer.headers["content-type"].startswith("text/html"), path
    page = client.get("/requests/999999")
    assert page.status == 404 and "No request 999999" in page.text and "Sign out" in page.text
    # A cursor whose row retention removed: nothing older is left.
    assert client.get("/api/v1/requests?before=999999").json() == {
        "rows": [], "next_before": None, "searched_to": None, "timezone": ZONE}
    assert client.get("/requests").status == 200  # still serving


def test_names_render_as_text_never_as_markup(hub: HubThread) -> None:
    event = UsageEvent(ts=time.time() - 60, request_id="req-evil", endpoint="/v1/messages", status=200, outcome="ok",
                       total_ms=10.0, token_id=1, user=EVIL, project=EVIL, model=EVIL, session_id=EVIL,
                       user_agent=EVIL, key_label=EVIL, upstream="anthropic", route=f"anthropic/{EVIL}:200")
    (row,) = store_rows(hub, [event])
    client = operator(hub)
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    for path in ("/requests", f"/requests/{row['id']}", "/requests?" + urlencode({"user": EVIL})):
        page = client.get(path)
        assert page.status == 200 and EVIL not in page.text and escaped in page.text, path
    assert client.get("/api/v1/requests?user=" + quote(EVIL)).json()["rows"][0]["user"] == EVIL


def test_a_developer_gets_403_on_the_pages_and_the_api(hub: HubThread) -> None:
    (row,) = store_rows(hub, varied_events(1, time.time() - 60))
    client = Client(hub.dashboard_url)
    assert client.sign_in(token=hub.mint("dev")).headers["location"] == "/me"
    for path in ("/requests", f"/requests/{row['id']}"):
        page = client.get(path)
        assert page.status == 403 and "Operators only" in page.text and "alice" not in page.text, path
    for path in ("/api/v1/requests", f"/api/v1/requests/{row['id']}", "/api/v1/requests?user=alice"):
        answer = client.get(path)
        assert answer.status == 403 and answer.json()["error"]["type"] == "permission_error", path
    assert Client(hub.dashboard_url).get("/api/v1/requests").status == 401
    assert Client(hub.dashboard_url).get("/requests").headers["location"] == "/login"


def test_the_openapi_description_has_both_routes(hub: HubThread) -> None:
    paths = Client(hub.dashboard_url).get("/api/v1/openapi.json").json()["paths"]
    listing = paths["/api/v1/requests"]["get"]
    assert {p["name"] for p in listing["parameters"]} == {
        "user", "project", "model", "outcome", "status", "from", "until", "before", "limit"}
    assert set(paths["/api/v1/requests/{id}"]["get"]["responses"]) >= {"200", "400", "404"}


def test_on_sqlite_a_filtered_page_reads_one_index_in_order(tmp_path: Path) -> None:
    """Whatever the filters, the page's query reads an index in (ts, id)
    order: no sort, no scan of the table. SQLite's plan, on a SQLite file
    whatever HUBCORE_TEST_DATABASE says (INDEXED BY and EXPLAIN QUERY PLAN
    are SQLite's; PostgreSQL's plans are the next test's)."""
    conn = store.connect(tmp_path / "plans.db")
    try:
        for query in (
            requests_view.RequestQuery((), None, None, None, 50),
            requests_view.RequestQuery((("user", "a"),), 1.0, 2.0, None, 50),
            requests_view.RequestQuery((("project", "p"), ("status", 200)), None, None, None, 50),
            requests_view.RequestQuery((("model", "m"), ("outcome", "ok")), 1.0, None, None, 50),
        ):
            where = requests_view.bounds(conn, query)
            assert where is not None
            index, _ = requests_view.choose_index(conn, query, where)
            terms = [f"{c} = ?" for c, _ in query.filters] + where.terms
            plan = " ".join(row[3] for row in conn.execute(
                f"EXPLAIN QUERY PLAN SELECT * FROM usage INDEXED BY {index} WHERE {' AND '.join(terms) or '1'} "
                "ORDER BY ts DESC, id DESC LIMIT 51", [v for _, v in query.filters] + where.params))
            assert "USING INDEX" in plan and "TEMP B-TREE" not in plan, (query, plan)
    finally:
        conn.close()


def test_on_postgresql_a_page_reads_an_index_chosen_by_the_statistics(pg_database: PgDatabase) -> None:
    """PostgreSQL takes no index hint: with the statistics ANALYZE keeps,
    its planner never reads the whole table for a page. Where many rows
    match it reads an index newest first (an incremental sort orders rows
    of equal ts by id) and stops at the page's end; a rare user's few rows
    it finds on that user's index."""
    conn = store.connect(pg_server_database(pg_database))
    try:
        conn.execute(
            "INSERT INTO usage (ts, request_id, endpoint, status, outcome, total_ms, user, project, model)"
            " SELECT 1700000000.0 + i, 'r' || i, '/v1/messages', CASE WHEN i % 5 = 0 THEN 529 ELSE 200 END,"
            " CASE WHEN i % 5 = 0 THEN 'upstream_error' ELSE 'ok' END, 1.0,"
            " CASE WHEN i % 1000 = 0 THEN 'rare' ELSE 'u' || (i % 20) END, 'p' || (i % 7), 'm' || (i % 3)"
            " FROM generate_series(1, 20000) AS i")
        conn.execute("ANALYZE usage")
        for query, index, in_order in (
            (requests_view.RequestQuery((), None, None, None, 50), "usage_ts", True),
            (requests_view.RequestQuery((("user", "rare"),), None, None, None, 50), "usage_user_ts", False),
            (requests_view.RequestQuery((("user", "u3"),), 1_700_000_100.0, 1_700_019_000.0, None, 50), None, True),
            (requests_view.RequestQuery((("project", "p1"), ("status", 200)), None, None, None, 50), None, True),
            (requests_view.RequestQuery((("model", "m1"), ("outcome", "ok")), 1.0, None, None, 50), None, True),
        ):
            where = requests_view.bounds(conn, query)
            assert where is not None
            terms = [f"{c} = ?" for c, _ in query.filters] + where.terms
            plan = "\n".join(row[0] for row in conn.execute(
                f"EXPLAIN SELECT * FROM usage WHERE {' AND '.join(terms) or '1 = 1'} ORDER BY ts DESC, id DESC LIMIT 51",
                [v for _, v in query.filters] + where.params))
            assert "Seq Scan" not in plan, (query, plan)
            # "Index Scan Backward using usage_ts on usage", "Bitmap Index Scan on usage_user_ts"
            assert index is None or re.search(rf"(using|Index Scan on) {index} ", plan + " "), (query, plan)
            if in_order:
                assert "Index Scan Backward using " in plan and "Incremental Sort" in plan, (query, plan)
    finally:
        conn.close()


def test_filters_with_few_rows_in_common_read_a_bounded_window_per_page(
    hub: HubThread, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # alice has 40 rows in proj-0 and one in proj-1, the oldest; bob 30 in proj-1.
    events = [UsageEvent(ts=1_700_000_000.0 + i, request_id=f"r{i}", endpoint="/v1/messages", status=200,
                         outcome="ok", total_ms=1.0, user=user, project=project)
              for i, (user, project) in enumerate([("alice", "proj-1")] + [("alice", "proj-0")] * 40
                                                   + [("bob", "proj-1")] * 30)]
    rows = store_rows(hub, events)
    monkeypatch.setattr(requests_view, "SCAN_BUDGET", 20)
    monkeypatch.setattr(requests_view, "SCAN_STEP", 5)
    client = operator(hub)
    # Both filters have 20 rows or more: each page reads 20 of alice's
    # rows (her index has the fewest) and says how far back it searched.
    first = client.get("/api/v1/requests?user=alice&project=proj-1").json()
    assert first["rows"] == [] and first["next_before"] == rows[21]["id"]
    assert first["searched_to"] == format_time(rows[21]["ts"], ZoneInfo(ZONE))
    assert api_pages(client, {"user": "alice", "project": "proj-1"}) == [rows[0]["id"]]
    page = client.get("/requests?user=alice&project=proj-1")
    assert "No requests match these filters so far." in page.text
    assert 'id="searched"' in page.text and f"before={rows[21]['id']}" in page.text
    # Filters with many rows in common fill their pages as before.
    assert api_pages(client, {"user": "alice", "project": "proj-0", "limit": 7}) == newest_first(rows[1:41])
    assert api_pages(client, {"user": "bob", "outcome": "ok", "limit": 50}) == newest_first(rows[41:])


# -- in a real browser ---------------------------------------------------------------------


def test_an_operator_filters_pages_and_opens_a_request_in_the_browser(
    hub: HubThread, browser: Any, tmp_path: Path,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    usage = {"x-fake-usage": orjson.dumps({"input_tokens": 1500, "output_tokens": 420, "cache_read": 9000,
                                           "cache_write_5m": 300}).decode()}
    alice, evil = hub.mint("alice", "web"), hub.mint(EVIL, "ops")
    with anthropic.Anthropic(base_url=hub.url, api_key=alice, max_retries=0) as sdk:
        for _ in range(53):
            sdk.messages.create(model="claude-sonnet-4-6", max_tokens=64,
                                messages=[{"role": "user", "content": "hi"}], extra_headers=usage)
    with anthropic.Anthropic(base_url=hub.url, api_key=evil, max_retries=0) as sdk:
        sdk.messages.create(model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi"}])
    rows = hub.wait_rows(54)
    assert len(rows) == 54

    operator_sign_in(browser, hub)
    browser.get(hub.dashboard_url + "/requests")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#requests tbody tr")) == 50
    # The other user's name shows as text; no script of it runs or exists.
    assert EVIL in browser.find_element(By.ID, "requests").text
    assert browser.execute_script("return document.querySelectorAll('main script').length") == 0
    browser.save_screenshot(str(tmp_path / "requests.png"))

    # Filter by user and outcome with the form.
    browser.find_element(By.ID, "filter-user").send_keys("alice")
    Select(browser.find_element(By.ID, "filter-outcome")).select_by_value("ok")
    submit(browser, browser.find_element(By.CSS_SELECTOR, "#request-filters button"))
    alice_rows = [r for r in rows if r["user"] == "alice"]
    shown = [int(tr.get_attribute("data-id")) for tr in browser.find_elements(By.CSS_SELECTOR, "#requests tbody tr")]
    assert shown == newest_first(alice_rows)[:50]
    submit(browser, browser.find_element(By.ID, "older"))
    shown = [int(tr.get_attribute("data-id")) for tr in browser.find_elements(By.CSS_SELECTOR, "#requests tbody tr")]
    assert shown == newest_first(alice_rows)[50:]
    assert browser.find_elements(By.ID, "older") == []

    # The detail of the oldest: its figures are the row's.
    row = next(r for r in rows if r["id"] == shown[-1])
    submit(browser, browser.find_element(By.CSS_SELECTOR, f"tr[data-id='{row['id']}'] a"))
    assert browser.current_url == f"{hub.dashboard_url}/requests/{row['id']}"
    for key in ("input_tokens", "output_tokens", "cache_write_5m", "cache_write_1h", "cache_read", "reasoning_tokens"):
        cell = browser.find_element(By.CSS_SELECTOR, f"#tokens-{key} td")
        assert int(cell.get_attribute("data-value")) == row[key], key
    assert row["input_tokens"] == 1500 and row["cache_read"] == 9000
    cost = browser.find_element(By.CSS_SELECTOR, "#field-cost [data-micros]")
    assert int(cost.get_attribute("data-micros")) == row["cost_micros"] > 0
    assert cost.text == format_usd(row["cost_micros"])
    text = {field: browser.find_element(By.CSS_SELECTOR, f"#field-{field} td").text
            for field in ("time", "request_id", "user", "model", "upstream", "key_label", "status", "outcome",
                          "attempts", "ttfb", "total", "user_agent")}
    assert text["time"] == format_time(row["ts"], ZoneInfo(ZONE))
    assert text["request_id"] == row["request_id"] and text["user"] == "alice"
    assert text["model"] == "claude-sonnet-4-6" and text["upstream"] == row["upstream"] == "anthropic"
    assert text["key_label"] == row["key_label"] and text["status"] == "200" and text["outcome"] == "ok"
    assert text["attempts"] == str(row["attempts"]) == "1"
    assert text["ttfb"] == f"{row['ttfb_ms']:,.0f} ms" and text["total"] == f"{row['total_ms']:,.0f} ms"
    assert text["user_agent"] == row["user_agent"]
    assert browser.find_element(By.CSS_SELECTOR, "#route li").text == f"anthropic/{row['key_label']} → 200"
    assert ANTHROPIC_KEY not in browser.page_source  # labels only, never a vendor key
    browser.save_screenshot(str(tmp_path / "request-detail.png"))
