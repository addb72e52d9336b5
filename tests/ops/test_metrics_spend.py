"""Spend and tokens per user, project and model on /metrics, from the usage
events of real requests through a real hub; bounded by metrics_max_series."""
from __future__ import annotations

import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hubcore.ops import client as opsclient
from tests.conftest import upstreams_for
from tests.fakevendor import FakeVendor
from tests.hubharness import HubThread, make_config

SONNET = "claude-sonnet-4-6"
HAIKU = "claude-haiku-4-5-20251001"
MESSAGES = [{"role": "user", "content": "hi"}]
CLASSES = {"input": "input_tokens", "output": "output_tokens", "cache_read": "cache_read",
           "cache_write_5m": "cache_write_5m", "cache_write_1h": "cache_write_1h"}
# (user, project, model, usage the fake vendor reports)
TRAFFIC = [
    ("alice", "web", SONNET, {"input_tokens": 1200, "output_tokens": 300, "cache_read": 5000, "cache_write_5m": 800}),
    ("alice", "web", SONNET, {"input_tokens": 10, "output_tokens": 7, "cache_write_1h": 64}),
    ("alice", "web", HAIKU, {"input_tokens": 900, "output_tokens": 40}),
    ("bob", "mobile", SONNET, {"input_tokens": 50, "output_tokens": 5000}),
    ("bob", "mobile", HAIKU, {"input_tokens": 3, "output_tokens": 2, "cache_read": 70000}),
]


@pytest.fixture
def ops_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="hc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def send_traffic(hub: HubThread) -> list[dict[str, Any]]:
    """TRAFFIC through the hub with the official SDK; the usage rows it left."""
    tokens = {(user, project): hub.mint(user, project) for user, project, _, _ in TRAFFIC}
    for user, project, model, usage in TRAFFIC:
        with anthropic.Anthropic(base_url=hub.url, api_key=tokens[user, project], max_retries=0) as client:
            client.messages.create(model=model, max_tokens=64, messages=MESSAGES,
                                   extra_headers={"x-fake-usage": orjson.dumps(usage).decode()})
    rows = hub.wait_rows(len(TRAFFIC))
    assert len(rows) == len(TRAFFIC) and all(r["cost_micros"] for r in rows)
    return rows


def scrape(hub: HubThread) -> dict[str, Any]:
    status, body = opsclient.fetch(hub.config.server.ops_socket, "/metrics")
    assert status == 200
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def series(families: dict[str, Any], family: str) -> dict[tuple[str, ...], float]:
    fam = families[family]
    assert fam.type == "counter" and fam.documentation
    return {tuple(sorted(s.labels.items())): s.value for s in fam.samples if s.name == family + "_total"}


def expected(rows: list[dict[str, Any]], fold: set[tuple[str, str, str]] = frozenset()) -> tuple[dict[Any, float], dict[Any, float]]:
    """Cost and token series the rows call for; label sets in `fold` go under _other."""
    cost: dict[Any, float] = defaultdict(float)
    tokens: dict[Any, float] = defaultdict(float)
    for r in rows:
        key = (r["user"], r["project"], r["model"])
        user, project, model = ("_other",) * 3 if key in fold else key
        labels = (("model", model), ("project", project), ("user", user))
        cost[labels] += r["cost_micros"] / 1e6
        for token_class, column in CLASSES.items():
            tokens[tuple(sorted((*labels, ("class", token_class))))] += r[column]
    return dict(cost), dict(tokens)


def test_spend_and_tokens_per_user_project_and_model(tmp_path: Path, ops_dir: Path, vendor: FakeVendor) -> None:
    config = make_config(tmp_path, upstreams_for(vendor), ops_socket=str(ops_dir / "ops.sock"))
    with HubThread(config) as hub:
        rows = send_traffic(hub)
        # The counters were fed before each event was queued for the database.
        families = scrape(hub)
    cost, tokens = expected(rows)
    assert len(cost) == 4  # two users, two models each
    got_cost = series(families, "hubcore_usage_cost_usd")
    assert got_cost.keys() == cost.keys()
    for labels, value in cost.items():
        assert got_cost[labels] == pytest.approx(value, rel=1e-12), labels
    assert series(families, "hubcore_usage_tokens") == tokens
    assert series(families, "hubcore_usage_folded") == {(): 0.0}


def test_label_sets_beyond_the_cap_are_counted_under_other(tmp_path: Path, ops_dir: Path, vendor: FakeVendor) -> None:
    config = make_config(tmp_path, upstreams_for(vendor), ops_socket=str(ops_dir / "ops.sock"), metrics_max_series=2)
    with HubThread(config) as hub:
        rows = send_traffic(hub)
        # The counters were fed before each event was queued for the database.
        families = scrape(hub)
    # The first two label sets to arrive keep their names; the rest are one.
    first_two = list(dict.fromkeys((u, p, m) for u, p, m, _ in TRAFFIC))[:2]
    cost, tokens = expected(rows, fold={(r["user"], r["project"], r["model"]) for r in rows} - set(first_two))
    got_cost = series(families, "hubcore_usage_cost_usd")
    assert len(got_cost) == 3 and got_cost.keys() == cost.keys()
    assert sum(got_cost.values()) == pytest.approx(sum(r["cost_micros"] for r in rows) / 1e6, rel=1e-12)
    assert series(families, "hubcore_usage_tokens") == tokens
    assert series(families, "hubcore_usage_folded") == {(): 2.0}  # bob's two requests


def test_a_negative_cap_is_a_config_error() -> None:
    from hubcore import config
    from hubcore.errors import ConfigError

    with pytest.raises(ConfigError, match=r"server\.metrics_max_series: must not be negative"):
        config.parse({"server": {"metrics_max_series": -1}}, source="hub.toml", env={})
    assert config.parse({"server": {}}, source="hub.toml", env={}).server.metrics_max_series == 2000
