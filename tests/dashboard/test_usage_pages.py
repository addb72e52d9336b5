"""The overview (/ and /api/v1/overview) and the usage page (/usage, its
CSV and JSON, /api/v1/usage) in front of a real hub: figures equal to the
real `hubcore usage`, local days across Berlin's DST changes and Kolkata's
half-hour offset, bad fields, a developer kept out; and in a real browser:
an operator reads both pages after requests through the proxy, downloads
what they offer, and a user named like a script stays text."""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode
from zoneinfo import ZoneInfo

import anthropic
import orjson
import pytest

from hubcore import store
from hubcore.accounting import report, rollup
from hubcore.accounting.rows import insert_values
from hubcore.accounting.usage import FIELDS, UsageEvent
from hubcore.dashboard import charts
from hubcore.dashboard.views import usage as usage_view
from hubcore.governance.limits import Limits
from tests.conftest import upstreams_for
from tests.dashboard.support import Client, add_operator, admin_api_token, operator_sign_in, submit
from tests.fakevendor import FakeVendor
from tests.hubharness import HubThread, make_config, run_cli
from tests.storage.conftest import INSERT_USAGE

BERLIN = "Europe/Berlin"
KOLKATA = "Asia/Kolkata"
EVIL = "<script>alert(1)</script>"
SPRING = datetime(2026, 3, 29, 1, tzinfo=timezone.utc).timestamp()   # 02:00 CET -> 03:00 CEST
AUTUMN = datetime(2026, 10, 25, 1, tzinfo=timezone.utc).timestamp()  # 03:00 CEST -> 02:00 CET
USAGE = {"x-fake-usage": orjson.dumps({"input_tokens": 12000, "output_tokens": 3000, "cache_read": 40000}).decode()}


@contextmanager
def start_hub(tmp_path: Path, zone: str) -> Iterator[HubThread]:
    with FakeVendor() as vendor:
        config = make_config(tmp_path, upstreams_for(vendor), dashboard={"listen": "127.0.0.1:0"}, budget_timezone=zone)
        with HubThread(config) as running:
            add_operator(running)
            yield running


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubThread]:
    with start_hub(tmp_path, BERLIN) as running:
        yield running


@pytest.fixture
def operator(hub: HubThread) -> Client:
    client = Client(hub.dashboard_url)
    assert client.sign_in().status == 303
    return client


def event(ts: float, request_id: str, **fields: Any) -> UsageEvent:
    base: dict[str, Any] = dict(ts=ts, request_id=request_id, endpoint="/v1/messages", status=200, outcome="ok",
                                total_ms=900.0)
    base.update(fields)
    return UsageEvent(**base)


def insert(hub: HubThread, events: Sequence[UsageEvent]) -> None:
    """Rows as the hub's writer stores them, on either engine (a request id
    stored already is skipped, and the rest are added to the rollups)."""
    conn = store.connect(hub.config.server.database)
    try:
        with store.immediate(conn), rollup.adding(conn):
            conn.executemany(INSERT_USAGE, [_values(e) for e in events])
    finally:
        conn.close()


def _values(event: UsageEvent) -> list[Any]:
    values = insert_values([event])
    values[FIELDS.index("output_estimated")] = int(event.output_estimated)
    return values


def raw_per_local_day(hub: HubThread, zone: str) -> dict[str, list[int]]:
    """[requests, cost] per local date, summed from the raw rows in Python."""
    found: dict[str, list[int]] = {}
    for row in hub.usage_rows():
        day = datetime.fromtimestamp(row["ts"], ZoneInfo(zone)).date().isoformat()
        total = found.setdefault(day, [0, 0])
        total[0] += 1
        total[1] += row["cost_micros"] or 0
    return found


def cli(tmp_path: Path, hub: HubThread, *args: str) -> str:
    toml = tmp_path / "cli.toml"
    toml.write_text(f'[server]\ndatabase = "{hub.config.server.database}"\n'
                    f'budget_timezone = "{hub.config.server.budget_timezone}"\n')
    done = run_cli("usage", *args, "--config", str(toml))
    assert done.returncode == 0, done.stderr
    return done.stdout


def local_midnight(day: date, zone: str) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(zone))


def mixed_rows(around: float) -> list[UsageEvent]:
    """A day of traffic of three users over two upstreams, a few failures, an unpriced model."""
    users = [("alice", "apollo", 1), ("bob", "zeta", 2), (EVIL, None, 3)]
    rows = []
    for i in range(150):
        user, project, token_id = users[i % 3]
        rows.append(event(
            around + i * 577.7, f"mixed-{i}", user=user, project=project, token_id=token_id,
            upstream=("anthropic", "backup")[i % 2], key_label=("key-a", "key-b", None)[i % 3],
            model=("claude-sonnet-4-6", "claude-opus-4-6", "mystery")[i % 3],
            served_model=None if i % 4 else "claude-sonnet-4-6-20260101",
            outcome="ok" if i % 7 else "upstream_error", status=200 if i % 7 else 529,
            input_tokens=100 + i, output_tokens=50 + i, cache_read=1000 * i, cache_write_5m=i, cache_write_1h=2 * i,
            reasoning_tokens=i % 5, cost_micros=None if i % 3 == 2 else 1000 + 37 * i,
            cost_basis="unknown" if i % 3 == 2 else None, ttfb_ms=200.0 + 13 * i,
        ))
    return rows


# -- local days ------------------------------------------------------------------------------


def test_day_totals_across_berlins_dst_changes_are_the_raw_rows_per_local_day(hub: HubThread, operator: Client) -> None:
    rows = []
    for change in (SPRING, AUTUMN):
        rows += [event(change - 2 * 86400 + i * 600 + 13, f"{change}-{i}", user="alice", cost_micros=100 + i)
                 for i in range(4 * 144)]
    insert(hub, rows)
    raw = raw_per_local_day(hub, BERLIN)
    assert raw["2026-03-29"][0] == 23 * 6 and raw["2026-10-25"][0] == 25 * 6  # the short and the long day
    for first, last in (("2026-03-28", "2026-03-30"), ("2026-10-24", "2026-10-26")):
        until = (date.fromisoformat(last) + timedelta(days=1)).isoformat()
        api = operator.get(f"/api/v1/usage?by=day&since={first}&until={until}").json()
        want = {day: totals for day, totals in raw.items() if first <= day <= last}
        assert {g["group"]: [g["requests"], g["cost_micros"]] for g in api["groups"]} == want
        assert api["total"]["requests"] == sum(n for n, _ in want.values())
        # The page's range: local dates, `until` included.
        page = operator.get(f"/usage?by=day&from={first}&until={last}")
        assert page.status == 200
        for day, (requests, cost) in want.items():
            row = page.text.split(f'<tr data-group="{day}">', 1)[1].split("</tr>", 1)[0]
            assert f'data-field="requests" data-value="{requests}"' in row
            assert f'data-field="cost" data-micros="{cost}"' in row
    everything = operator.get("/api/v1/usage?by=day").json()
    assert everything["total"]["requests"] == len(rows) and len(everything["groups"]) == 10


def test_kolkatas_days_start_at_18_30_utc(tmp_path: Path) -> None:
    with start_hub(tmp_path, KOLKATA) as hub:
        midnight = datetime(2026, 3, 30, tzinfo=ZoneInfo(KOLKATA)).timestamp()
        insert(hub, [event(midnight - 0.5, "before", user="a", cost_micros=5),
                     event(midnight, "at", user="a", cost_micros=7),
                     event(midnight + 86400 - 1, "end", user="a", cost_micros=11)])
        client = Client(hub.dashboard_url)
        client.sign_in()
        days = client.get("/api/v1/usage?by=day").json()["groups"]
        assert [(g["group"], g["cost_micros"]) for g in days] == [("2026-03-29", 5), ("2026-03-30", 18)]
        # A range that starts mid-hour reads that hour's rows one by one.
        since = quote(datetime.fromtimestamp(midnight - 0.25, timezone.utc).isoformat())
        part = client.get(f"/api/v1/usage?by=user&since={since}").json()
        assert part["total"]["cost_micros"] == 18
        page = client.get("/usage?by=day&from=2026-03-29&until=2026-03-30")
        assert 'data-group="2026-03-29"' in page.text and "UTC+05:30" in page.text


# -- the same numbers as hubcore usage -------------------------------------------------------------


def test_the_usage_api_and_downloads_are_hubcore_usages_json_and_csv(
    hub: HubThread, operator: Client, tmp_path: Path,
) -> None:
    around = datetime(2026, 3, 28, 20, tzinfo=timezone.utc).timestamp()
    insert(hub, mixed_rows(around))
    since, until = "2026-03-28T00:00:00+01:00", "2026-03-30T00:00:00+02:00"
    for by in ("user", "project", "model", "key", "upstream", "token", "served_model"):
        wanted = orjson.loads(cli(tmp_path, hub, "--by", by, "--format", "json", "--since", since, "--until", until))
        api = operator.get(f"/api/v1/usage?{urlencode({'by': by, 'since': since, 'until': until})}")
        assert api.status == 200 and api.json() == wanted, by
        assert api.json()["total"]["errors"] > 0 and api.json()["total"]["unpriced"] > 0
    # A partial hour at each end: the rows are read one by one there.
    odd_since, odd_until = "2026-03-28T21:17:03+00:00", "2026-03-29T09:41:59+00:00"
    wanted = orjson.loads(cli(tmp_path, hub, "--by", "key", "--format", "json", "--since", odd_since, "--until", odd_until))
    assert operator.get(f"/api/v1/usage?{urlencode({'by': 'key', 'since': odd_since, 'until': odd_until})}").json() == wanted
    # Everything, as the CLI without --since.
    assert operator.get("/api/v1/usage?by=model").json() == orjson.loads(cli(tmp_path, hub, "--by", "model", "--format", "json"))
    # The page's downloads: local dates, until included.
    query = urlencode({"by": "user", "from": "2026-03-28", "until": "2026-03-29"})
    csv_answer = operator.get(f"/usage.csv?{query}")
    assert csv_answer.headers["content-type"] == "text/csv; charset=utf-8"
    assert csv_answer.headers["content-disposition"] == 'attachment; filename="usage-by-user-2026-03-28-2026-03-29.csv"'
    assert csv_answer.text == cli(tmp_path, hub, "--by", "user", "--format", "csv", "--since", since, "--until", until)
    json_answer = operator.get(f"/usage.json?{query}")
    assert json_answer.json() == orjson.loads(cli(tmp_path, hub, "--by", "user", "--format", "json", "--since", since,
                                                  "--until", until))
    assert operator.get(f"/usage?{query}&format=csv").text == csv_answer.text
    assert operator.get(f"/usage?{query}&format=json").json() == json_answer.json()
    # An admin API token reads the same.
    token = admin_api_token(hub)
    assert Client(hub.dashboard_url).get(f"/api/v1/usage?{urlencode({'by': 'user', 'since': since, 'until': until})}",
                                         headers={"authorization": f"Bearer {token}"}).json() == json_answer.json()


def test_the_usage_page_shows_every_group_escaped_with_its_total(hub: HubThread, operator: Client) -> None:
    insert(hub, mixed_rows(time.time() - 3 * 86400))
    page = operator.get("/usage?by=user")
    assert page.status == 200
    assert "<script>alert" not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    api = operator.get("/api/v1/usage?by=user&since=7d").json()
    total = page.text.split('<tr id="usage-total">', 1)[1]
    assert f'data-field="requests" data-value="{api["total"]["requests"]}"' in total
    assert f'data-field="cost" data-micros="{api["total"]["cost_micros"]}"' in total
    # Every group of `hubcore usage`, served_model last.
    assert set(usage_view.PAGE_GROUPS) == set(report.GROUPS) and usage_view.PAGE_GROUPS[-1] == "served_model"
    for by in usage_view.PAGE_GROUPS:
        answer = operator.get(f"/usage?by={by}")
        assert answer.status == 200 and f'<option value="{by}" selected>' in answer.text, by
    assert 'id="download-csv" href="/usage.csv?by=served_model&amp;from=' in answer.text
    assert "No usage in this range." in operator.get("/usage?from=2020-01-01&until=2020-01-02").text


def test_bad_fields_are_refused_with_a_reason_and_the_server_goes_on(operator: Client) -> None:
    for path, reason in (
        ("/usage?by=colour", "by: choose one of"),
        ("/usage?from=yesterday", "from: cannot read time"),
        ("/usage?from=2026-03-10&until=2026-03-01", "from: must be before until"),
        ("/usage?format=xml", "format: choose one of"),
        ("/?by=key", "by: choose one of user, project, model"),
        ("/?bucket=week", "bucket: choose one of day, hour"),
    ):
        answer = operator.get(path)
        assert answer.status == 400 and answer.headers["content-type"].startswith("text/html"), path
        assert reason in answer.text, path
    for path, reason in (
        ("/api/v1/usage?by=colour", "by: choose one of"),
        ("/api/v1/usage?since=soon", "since: cannot read time"),
        ("/api/v1/usage?since=1d&until=2d", "since: must be before until"),
        ("/api/v1/overview?bucket=week", "bucket: choose one of"),
    ):
        answer = operator.get(path)
        assert answer.status == 400 and answer.json()["error"]["type"] == "invalid_request_error", path
        assert reason in answer.json()["error"]["message"], path
    assert operator.get("/usage").status == 200


def test_a_developer_reads_neither_page_nor_api(hub: HubThread) -> None:
    client = Client(hub.dashboard_url)
    client.sign_in(token=hub.mint("dev"))
    for path in ("/usage", "/usage.csv", "/usage.json"):
        assert client.get(path).status == 403, path
    for path in ("/api/v1/usage", "/api/v1/overview"):
        answer = client.get(path)
        assert answer.status == 403 and answer.json()["error"]["type"] == "permission_error", path
    assert Client(hub.dashboard_url).get("/api/v1/usage").status == 401


# -- the overview ------------------------------------------------------------------------------


def test_the_overview_api_gives_the_figures_of_hubcore_usage(hub: HubThread, operator: Client, tmp_path: Path) -> None:
    now = time.time()
    today = datetime.fromtimestamp(now, ZoneInfo(BERLIN)).date()
    # Traffic today, yesterday, 10 and 40 days ago; twelve users so the chart needs "other".
    rows = []
    for back, count in ((0, 30), (1, 20), (10, 10), (40, 5)):
        midnight = local_midnight(today - timedelta(days=back), BERLIN).timestamp()
        start = max(midnight, now - 3000) if back == 0 else midnight + 3600
        for i in range(count):
            rows.append(event(min(start + i * 60, now - 1), f"o-{back}-{i}", user=f"user{i % 12:02d}",
                              project=("apollo", "zeta")[i % 2], model="claude-sonnet-4-6",
                              outcome="ok" if i % 5 else "upstream_error", cost_micros=1000 * (i + 1),
                              input_tokens=100, cache_read=300, ttfb_ms=float(100 + 10 * i)))
    insert(hub, rows)
    hub.set_limits("user", "user00", Limits(budget_day=50_000))
    overview = operator.get("/api/v1/overview").json()
    assert overview["timezone"] == BERLIN
    for period, days in (("today", 1), ("7d", 7), ("30d", 30)):
        since = local_midnight(today - timedelta(days=days - 1), BERLIN).isoformat()
        total = orjson.loads(cli(tmp_path, hub, "--by", "user", "--format", "json", "--since", since))["total"]
        (got,) = [p for p in overview["periods"] if p["period"] == period]
        assert (got["requests"], got["errors"], got["cost_micros"]) == (total["requests"], total["errors"], total["cost_micros"])
        assert got["error_rate"] == pytest.approx(total["errors"] / total["requests"])
        assert got["cache_hit_ratio"] == pytest.approx(total["cache_hit_ratio"])
        assert got["since"] == since
    # TTFB percentiles of today's 30 rows (100..390 ms): within a bin (9 %) of the exact ones.
    (today_figures,) = [p for p in overview["periods"] if p["period"] == "today"]
    assert today_figures["ttfb_p50_ms"] == pytest.approx(240, rel=0.1)
    assert today_figures["ttfb_p99_ms"] == pytest.approx(390, rel=0.1)
    chart = overview["chart"]
    assert chart["bucket"] == "day" and chart["by"] == "user" and len(chart["buckets"]) == 30
    assert chart["rest"] is True and chart["series"][-1] == "other" and len(chart["series"]) == 9
    per_day = raw_per_local_day(hub, BERLIN)
    for bucket in chart["buckets"]:
        assert bucket["total_micros"] == per_day.get(bucket["label"], [0, 0])[1]
        assert sum(bucket["series_micros"]) == bucket["total_micros"]
    users = orjson.loads(cli(tmp_path, hub, "--by", "user", "--format", "json", "--since",
                             local_midnight(today - timedelta(days=29), BERLIN).isoformat()))["groups"]
    assert [(u["user"], u["cost_micros"]) for u in overview["top_users"]] == [(g["group"], g["cost_micros"]) for g in users][:10]
    assert {p["project"] for p in overview["top_projects"]} == {"apollo", "zeta"}
    (budget,) = overview["budgets"]
    assert (budget["kind"], budget["name"], budget["window"], budget["limit_micros"]) == ("user", "user00", "day", 50_000)
    # By hour and by model: the last 48 hours.
    hourly = operator.get("/api/v1/overview?bucket=hour&by=model").json()["chart"]
    assert len(hourly["buckets"]) == 48 and hourly["series"] == ["claude-sonnet-4-6"]
    recent = sum(r.cost_micros or 0 for r in rows if r.ts >= datetime.fromisoformat(hourly["buckets"][0]["start"]).timestamp())
    assert sum(b["total_micros"] for b in hourly["buckets"]) == recent


def test_the_overview_page_renders_every_part_without_script(hub: HubThread, operator: Client) -> None:
    insert(hub, mixed_rows(time.time() - 86400))
    page = operator.get("/")
    assert page.status == 200
    for part in ('id="periods"', 'id="spend-chart"', 'id="spend-chart-legend"', 'id="top-users"', 'id="top-projects"',
                 'id="budgets-closest"', "<title>", 'data-micros="'):
        assert part in page.text, part
    assert "<script" not in page.text.split("<main>", 1)[1]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    by_project = operator.get("/?by=project&bucket=hour")
    assert '<option value="project" selected>' in by_project.text and '<option value="hour" selected>' in by_project.text
    assert 'data-series="apollo"' in by_project.text


def test_the_chart_carries_its_figures_escaped_on_a_round_scale() -> None:
    svg = charts.stacked_bars(chart_id="c", labels=["2026-03-01", "2026-03-02"], ticks=["03-01", "03-02"],
                              series=[EVIL, "other"], values=[[1500, 0], [250, 750]], rest=True, caption=EVIL)
    assert "<script" not in svg and svg.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 4
    assert 'data-top-micros="2000"' in svg
    assert '<g class="bar" data-bucket="2026-03-01" data-total-micros="1500">' in svg
    assert 'class="seg s-other"' in svg and 'data-series="other" data-micros="750"' in svg
    assert "<title>2026-03-02 · other: $0.00075</title>" in svg
    assert '<li data-series="other" data-micros="750">' in svg  # the legend
    assert [charts.nice_ceiling(v) for v in (0, 1, 3, 1500, 2600, 10 ** 6, 10 ** 6 + 1)] == [
        0, 1, 5, 2000, 5000, 10 ** 6, 2 * 10 ** 6]
    empty = charts.stacked_bars(chart_id="e", labels=["a"], ticks=["a"], series=[], values=[[]])
    assert "no spend in this range" in empty and "<ul" not in empty


def test_the_openapi_description_has_both_routes(operator: Client) -> None:
    paths = operator.get("/api/v1/openapi.json").json()["paths"]
    assert [p["name"] for p in paths["/api/v1/usage"]["get"]["parameters"]] == ["by", "since", "until"]
    assert [p["name"] for p in paths["/api/v1/overview"]["get"]["parameters"]] == ["by", "bucket"]


# -- in a real browser ----------------------------------------------------------------------------


def spend(hub: HubThread, token: str, times: int) -> None:
    with anthropic.Anthropic(base_url=hub.url, api_key=token, max_retries=0) as client:
        for _ in range(times):
            client.messages.create(model="claude-sonnet-4-6", max_tokens=64,
                                   messages=[{"role": "user", "content": "hi"}], extra_headers=USAGE)


def fetch(browser: Any, href: str) -> str:
    """What following a download link gives, fetched by the page with its own session."""
    text: str = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {credentials: 'same-origin'}).then(r => r.text()).then(done);", href)
    return text


def test_an_operator_reads_the_overview_and_usage_pages_as_hubcore_usage_reports_them(
    browser: Any, tmp_path: Path,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    with start_hub(tmp_path, KOLKATA) as hub:
        alice = hub.mint("alice", "apollo")
        hub.set_limits("user", "alice", Limits(budget_day=5_000_000))
        evil = hub.mint(EVIL, "zeta")
        spend(hub, alice, 3)
        spend(hub, evil, 2)
        assert len(hub.wait_rows(5)) == 5
        operator_sign_in(browser, hub)
        assert browser.current_url == hub.dashboard_url + "/"
        browser.save_screenshot(str(tmp_path / "overview.png"))
        assert "UTC+05:30" in browser.find_element(By.ID, "zone").text

        today = datetime.now(ZoneInfo(KOLKATA)).date()
        for period, days in (("today", 1), ("7d", 7), ("30d", 30)):
            since = local_midnight(today - timedelta(days=days - 1), KOLKATA).isoformat()
            total = orjson.loads(cli(tmp_path, hub, "--by", "user", "--format", "json", "--since", since))["total"]
            row = browser.find_element(By.ID, f"period-{period}")
            cost = int(row.find_element(By.CSS_SELECTOR, "[data-field=cost]").get_attribute("data-micros"))
            requests = int(row.find_element(By.CSS_SELECTOR, "[data-field=requests]").get_attribute("data-value"))
            assert (cost, requests) == (total["cost_micros"], total["requests"]) and requests == 5, period
        by_user = {g["group"]: g for g in orjson.loads(cli(
            tmp_path, hub, "--by", "user", "--format", "json", "--since",
            local_midnight(today, KOLKATA).isoformat()))["groups"]}
        # Today's bar holds both users, as the CLI counts them.
        segments = browser.find_elements(By.CSS_SELECTOR, "svg#spend-chart g.bar:last-of-type rect.seg")
        assert {s.get_attribute("data-series"): int(s.get_attribute("data-micros")) for s in segments} == {
            name: g["cost_micros"] for name, g in by_user.items()}
        top = browser.find_element(By.ID, "top-users")
        assert EVIL in top.text  # as text
        assert browser.execute_script("return document.querySelectorAll('main script').length") == 0
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in browser.page_source
        budget = browser.find_element(By.CSS_SELECTOR, "#budgets-closest tbody tr")
        assert "user alice" in budget.text and "$5.00" in budget.text
        spent = int(budget.find_element(By.CSS_SELECTOR, "[data-field=spent]").get_attribute("data-micros"))
        assert spent == by_user["alice"]["cost_micros"]

        # The chart's choices are a plain form: stacked by project now.
        Select(browser.find_element(By.ID, "chart-by")).select_by_value("project")
        submit(browser, browser.find_element(By.CSS_SELECTOR, "form.chart-controls button"))
        assert "by=project" in browser.current_url
        legend = {li.get_attribute("data-series") for li in browser.find_elements(By.CSS_SELECTOR, "#spend-chart-legend li")}
        assert legend == {"apollo", "zeta"}

        submit(browser, browser.find_element(By.LINK_TEXT, "Usage"))
        assert browser.find_element(By.TAG_NAME, "h1").text == "Usage"
        browser.save_screenshot(str(tmp_path / "usage.png"))
        since = local_midnight(today - timedelta(days=6), KOLKATA).isoformat()
        until = local_midnight(today + timedelta(days=1), KOLKATA).isoformat()
        wanted = orjson.loads(cli(tmp_path, hub, "--by", "user", "--format", "json", "--since", since, "--until", until))
        shown = {}
        for row in browser.find_elements(By.CSS_SELECTOR, "table#usage tbody tr"):
            shown[row.get_attribute("data-group")] = (
                int(row.find_element(By.CSS_SELECTOR, "[data-field=requests]").get_attribute("data-value")),
                int(row.find_element(By.CSS_SELECTOR, "[data-field=cost]").get_attribute("data-micros")),
            )
        assert shown == {g["group"]: (g["requests"], g["cost_micros"]) for g in wanted["groups"]}
        assert browser.find_element(By.CSS_SELECTOR, f"table#usage tr[data-group='{EVIL}'] th").text == EVIL
        csv_href = browser.find_element(By.ID, "download-csv").get_attribute("href")
        json_href = browser.find_element(By.ID, "download-json").get_attribute("href")
        assert fetch(browser, csv_href) == cli(tmp_path, hub, "--by", "user", "--format", "csv", "--since", since,
                                               "--until", until)
        assert orjson.loads(fetch(browser, json_href)) == wanted

        # Grouped by model over a range of dates typed in.
        Select(browser.find_element(By.ID, "by")).select_by_value("model")
        field = browser.find_element(By.ID, "from")
        field.clear()
        field.send_keys(today.isoformat())
        submit(browser, browser.find_element(By.CSS_SELECTOR, "form.filters button"))
        models = {row.get_attribute("data-group") for row in browser.find_elements(By.CSS_SELECTOR, "table#usage tbody tr")}
        assert models == {"claude-sonnet-4-6"}
        browser.save_screenshot(str(tmp_path / "usage-by-model.png"))
