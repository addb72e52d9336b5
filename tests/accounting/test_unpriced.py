"""Models without a price: the [pricing] unpriced rule (estimate, free,
refuse), the estimate's reference price, the one warning per model, the
per-model count, the row's cost_basis and what the report makes of it."""
from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hubcore import config as config_mod, store
from hubcore.accounting import recorder as recorder_mod
from hubcore.accounting import report
from hubcore.accounting.pricing import (
    ESTIMATE, FREE, REFUSE, UNPRICED_LOG_MAX, PriceTable, Pricing, parse_prices, reference_price, vendor_of,
)
from hubcore.accounting.recorder import UsageRecorder
from hubcore.accounting.usage import FIELDS, UsageEvent
from hubcore.cli import render
from hubcore.errors import ConfigError
from hubcore.ops.metrics import HubMetrics

TABLE = """
[prices]
"claude-cheap*"  = { input = 1,  cache_write_5m = 1.25,  cache_write_1h = 2,  cache_read = 0.1, output = 5 }
"claude-big*"    = { input = 15, cache_write_5m = 18.75, cache_write_1h = 30, cache_read = 1.5, output = 75 }
# Same output price as claude-big but a lower input price: output decides, then input.
"claude-odd"     = { input = 10, cache_write_5m = 12.5,  cache_write_1h = 20, cache_read = 1,   output = 75 }
"gpt-small"      = { input = 0.25, cache_write_5m = 0, cache_write_1h = 0, cache_read = 0.025, output = 2 }
"gpt-large-20*"  = { input = 2,  cache_write_5m = 0, cache_write_1h = 0, cache_read = 0.2, output = 16 }
"o3"             = { input = 2,  cache_write_5m = 0, cache_write_1h = 0, cache_read = 0.5, output = 8 }
# No vendor can be told from the name: never a reference.
"house-model"    = { input = 99, cache_write_5m = 0, cache_write_1h = 0, cache_read = 0,   output = 999 }
"""

TOKENS = (1000, 2000, 300, 400, 5000)  # input, output, cache_write_5m, cache_write_1h, cache_read


def table() -> PriceTable:
    return PriceTable(parse_prices(TABLE, "<test>"))


def by_hand(prices: tuple[int, int, int, int, int], tokens: tuple[int, int, int, int, int] = TOKENS) -> int:
    """Micro-dollars for `tokens` at (input, output, cw5m, cw1h, read) micro-dollars per million."""
    total = sum(t * p for t, p in zip(tokens, prices))
    return (total + 500_000) // 1_000_000


BIG = (15_000_000, 75_000_000, 18_750_000, 30_000_000, 1_500_000)
GPT_LARGE = (2_000_000, 16_000_000, 0, 0, 200_000)


def cost(pricing: Pricing, vendor: str | None, model: str | None, *, forwarded: bool = True) -> tuple[int | None, str | None]:
    i, o, w5, w1, r = TOKENS
    return pricing.cost(vendor, model, i, o, w5, w1, r, forwarded=forwarded)


# -- the reference price -----------------------------------------------------------

def test_vendor_of_a_pattern() -> None:
    assert vendor_of("claude-opus-4-1*") == "anthropic"
    assert [vendor_of(p) for p in ("gpt-5", "gpt-5-20*", "o3", "o4-mini", "chatgpt-4o*", "codex-mini*")] == ["openai"] * 6
    assert vendor_of("house-model") is None
    assert vendor_of("omni-x") is None  # "o" then a letter: not an o-series model


def test_the_reference_is_the_vendors_most_expensive_model_by_output_then_input() -> None:
    t = table()
    big = reference_price(t, "anthropic")
    assert big is not None and big.pattern == "claude-big*"   # 75 out, 15 in beats 75 out, 10 in
    gpt = reference_price(t, "openai")
    assert gpt is not None and gpt.pattern == "gpt-large-20*"
    assert reference_price(t, None) is None
    assert reference_price(PriceTable([]), "anthropic") is None


def test_the_builtin_references() -> None:
    t = PriceTable.load()
    anthropic = reference_price(t, "anthropic")
    openai = reference_price(t, "openai")
    assert anthropic is not None and (anthropic.output, anthropic.input) == (75_000_000, 15_000_000)
    assert openai is not None and openai.output == max(p.output for p in t.entries if vendor_of(p.pattern) == "openai")


# -- the three rules -------------------------------------------------------------

def test_estimate_charges_the_whole_price_sheet_of_the_reference() -> None:
    pricing = Pricing(table(), ESTIMATE)
    assert cost(pricing, "anthropic", "claude-new-9") == (by_hand(BIG), "estimate")
    # OpenAI bills no cache writes: the reference's own sheet says 0 for them.
    assert cost(pricing, "openai", "gpt-new") == (by_hand(GPT_LARGE), "estimate")


def test_estimate_without_a_reference_leaves_the_cost_unknown() -> None:
    pricing = Pricing(PriceTable([]), ESTIMATE)
    assert cost(pricing, "anthropic", "claude-new-9") == (None, "unknown")


def test_free_costs_nothing_and_says_so() -> None:
    assert cost(Pricing(table(), FREE), "anthropic", "claude-new-9") == (0, "free")


def test_refuse_marks_what_was_refused_and_estimates_what_got_through() -> None:
    pricing = Pricing(table(), REFUSE)
    assert pricing.refuses("anthropic", "claude-new-9")
    assert not pricing.refuses("anthropic", "claude-big-2") and not pricing.refuses("anthropic", None)
    assert not Pricing(table(), ESTIMATE).refuses("anthropic", "claude-new-9")
    assert cost(pricing, "anthropic", "claude-new-9", forwarded=False) == (0, "refused")
    # The vendor's answer named a model the request did not (so it could not
    # be refused): estimated, never free.
    assert cost(pricing, "anthropic", "claude-new-9", forwarded=True) == (by_hand(BIG), "estimate")


@pytest.mark.parametrize("rule", [ESTIMATE, FREE, REFUSE])
def test_a_priced_model_or_none_is_not_unpriced(rule: str) -> None:
    pricing = Pricing(table(), rule)
    cheap = (1_000_000, 5_000_000, 1_250_000, 2_000_000, 100_000)
    assert cost(pricing, "anthropic", "claude-cheap-2-20250101") == (by_hand(cheap), None)
    assert cost(pricing, "anthropic", None) == (None, None)


def test_the_rule_is_checked() -> None:
    with pytest.raises(ValueError, match="unpriced"):
        Pricing(table(), "cheap")


# Dated snapshots and aliases of every family the built-in table prices, as
# the vendors' answers name them: none may be taken for an unknown model.
KNOWN_IDS = (
    "claude-opus-4-6", "claude-opus-4-5", "claude-opus-4-5-20251101", "claude-opus-4-1", "claude-opus-4-1-20250805",
    "claude-opus-4-0", "claude-opus-4-20250514", "claude-sonnet-4-6", "claude-sonnet-4-5",
    "claude-sonnet-4-5-20250929", "claude-sonnet-4-0", "claude-sonnet-4-20250514", "claude-haiku-4-5",
    "claude-haiku-4-5-20251001", "claude-3-5-haiku-latest", "claude-3-5-haiku-20241022",
    "claude-3-7-sonnet-latest", "claude-3-7-sonnet-20250219",
    "gpt-5", "gpt-5-2025-08-07", "gpt-5-mini", "gpt-5-mini-2025-08-07", "gpt-5-nano", "gpt-5-nano-2025-08-07",
    "gpt-5-codex", "gpt-5.1", "gpt-5.1-2025-11-13", "gpt-5.1-codex", "gpt-5.1-codex-mini",
)


@pytest.mark.parametrize("model", KNOWN_IDS)
def test_dated_snapshots_and_aliases_of_known_families_are_priced(model: str) -> None:
    pricing = Pricing(PriceTable.load(), REFUSE)
    vendor = "openai" if model.startswith("gpt") else "anthropic"
    assert not pricing.refuses(vendor, model)
    assert cost(pricing, vendor, model)[1] is None


def test_families_keep_their_own_prices() -> None:
    t = PriceTable.load()
    assert t.price_for("gpt-5-mini-2025-08-07").output == 2_000_000  # type: ignore[union-attr]
    assert t.price_for("gpt-5-nano-2025-08-07").output == 400_000  # type: ignore[union-attr]
    assert t.price_for("gpt-5.1-2025-11-13").output == 10_000_000  # type: ignore[union-attr]
    assert t.price_for("claude-3-7-sonnet-20250219").output == 15_000_000  # type: ignore[union-attr]


# -- the warning -----------------------------------------------------------------

def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "hubcore.pricing" and r.levelno == logging.WARNING]


def test_one_warning_per_model_naming_model_vendor_and_rule(caplog: pytest.LogCaptureFixture) -> None:
    pricing = Pricing(table(), ESTIMATE)
    with caplog.at_level(logging.WARNING, logger="hubcore.pricing"):
        for _ in range(3):
            cost(pricing, "anthropic", "claude-new-9")
        cost(pricing, "openai", "gpt-new")
        cost(pricing, "anthropic", "claude-big-7")  # priced: no word
    lines = warnings(caplog)
    assert len(lines) == 2, lines
    assert "'claude-new-9'" in lines[0] and "anthropic" in lines[0] and 'unpriced = "estimate"' in lines[0]
    assert "claude-big*" in lines[0]  # what it is charged as
    assert "'gpt-new'" in lines[1] and "openai" in lines[1]


def test_a_reload_keeps_the_warnings_given_unless_the_rule_changed(caplog: pytest.LogCaptureFixture) -> None:
    first = Pricing(table(), ESTIMATE)
    with caplog.at_level(logging.WARNING, logger="hubcore.pricing"):
        cost(first, "anthropic", "claude-new-9")
        same = Pricing(table(), ESTIMATE, previous=first)
        cost(same, "anthropic", "claude-new-9")
        assert len(warnings(caplog)) == 1
        free = Pricing(table(), FREE, previous=same)
        cost(free, "anthropic", "claude-new-9")
        cost(free, "anthropic", "claude-new-9")
    lines = warnings(caplog)
    assert len(lines) == 2 and 'unpriced = "free"' in lines[1]


def test_the_warnings_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    pricing = Pricing(table(), FREE)
    with caplog.at_level(logging.WARNING, logger="hubcore.pricing"):
        for i in range(UNPRICED_LOG_MAX + 50):
            cost(pricing, "anthropic", f"claude-typo-{i}")
    lines = warnings(caplog)
    assert len(lines) == UNPRICED_LOG_MAX + 1
    assert "no longer logged one by one" in lines[-1]


# -- config ------------------------------------------------------------------------

def parse(pricing: Any) -> config_mod.Config:
    return config_mod.parse({"pricing": pricing}, source="hub.toml", env={})


def test_the_pricing_table_of_the_config() -> None:
    assert config_mod.parse({}, source="hub.toml", env={}).pricing.unpriced == "estimate"
    assert parse({"unpriced": "free"}).pricing.unpriced == "free"
    assert parse({"unpriced": "refuse"}).pricing.unpriced == "refuse"
    with pytest.raises(ConfigError, match=r'^hub.toml: pricing.unpriced: must be "estimate", "free" or "refuse", got \'cheap\'$'):
        parse({"unpriced": "cheap"})
    with pytest.raises(ConfigError, match=r"^hub.toml: pricing.unpriced: expected str, got int$"):
        parse({"unpriced": 0})
    with pytest.raises(ConfigError, match=r"^hub.toml: pricing.surcharge: unknown field$"):
        parse({"surcharge": 2})


# -- the row, the count, the metric ------------------------------------------------

def event(i: int, model: str | None, cost_micros: int | None, cost_basis: str | None) -> UsageEvent:
    return UsageEvent(
        1_700_000_000.0 + i, f"req-{i}", "/v1/messages", 200, "ok", 10.0, 1, "alice", None, "anthropic", "k",
        model, 10, 20, cost_micros=cost_micros, cost_basis=cost_basis,
    )


def test_cost_basis_was_appended_after_the_columns_before_it() -> None:
    # Fields are only ever appended: later ones (served_model, route) follow it.
    assert FIELDS[FIELDS.index("cost_basis") - 1] == "output_estimated"
    assert FIELDS.index("cost_basis") < FIELDS.index("served_model")


async def test_the_recorder_counts_unpriced_requests_per_model_with_bounded_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recorder_mod, "UNPRICED_MODELS_MAX", 3)
    recorder = UsageRecorder(tmp_path / "hub.db", tmp_path / "hub.spool")
    models = ["m-a", "m-a", "m-b", "m-c", "m-d", "m-e", "m-a"]
    for i, model in enumerate(models):
        recorder.record(event(i, model, 5, "estimate"))
    recorder.record(event(90, "claude-known", 7, None))
    recorder.record(event(91, None, None, None))
    recorder.record(event(92, "m-old", None, None))  # no pricing at all: still unpriced
    stats = recorder.stats()
    assert stats["unpriced"] == len(models) + 1
    assert stats["unpriced_models"] == {"m-a": 3, "m-b": 1, "m-c": 1, "_other": 3}
    await recorder.close()

    text = HubMetrics().render_prometheus(writer=stats)
    assert "# TYPE hubcore_unpriced_requests_total counter" in text
    assert 'hubcore_unpriced_requests_total{model="m-a"} 3' in text
    assert 'hubcore_unpriced_requests_total{model="_other"} 3' in text


# -- the schema and the report -------------------------------------------------------

def test_the_migration_marks_old_rows_without_a_cost(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    # The schema just before the migration that adds cost_basis (found by
    # its text: later migrations follow it).
    before = next(i for i, script in enumerate(store.MIGRATIONS) if "ADD COLUMN cost_basis" in script)
    conn = sqlite3.connect(path)
    for script in store.MIGRATIONS[:before]:
        conn.executescript(script)
    conn.execute(f"PRAGMA user_version = {before}")
    columns = "ts, request_id, endpoint, status, outcome, total_ms, model, cost_micros"
    conn.execute(f"INSERT INTO usage ({columns}) VALUES (1, 'r1', '/v1/messages', 200, 'ok', 1, 'mystery', NULL)")
    conn.execute(f"INSERT INTO usage ({columns}) VALUES (2, 'r2', '/v1/messages', 200, 'ok', 1, 'claude-sonnet-4-6', 5)")
    conn.execute(f"INSERT INTO usage ({columns}) VALUES (3, 'r3', '/v1/models', 200, 'ok', 1, NULL, NULL)")
    conn.commit()
    conn.close()
    conn = store.connect(path)
    try:
        basis = dict(conn.execute("SELECT request_id, cost_basis FROM usage").fetchall())
    finally:
        conn.close()
    assert basis == {"r1": "unknown", "r2": None, "r3": None}


def insert(conn: sqlite3.Connection, events: list[UsageEvent]) -> None:
    from hubcore.accounting.rows import insert_values
    from hubcore.accounting.usage import INSERT_SQL

    for e in events:
        conn.execute(INSERT_SQL, insert_values([e]))


@pytest.fixture
def db(tmp_path: Path) -> Callable[[list[UsageEvent]], sqlite3.Connection]:
    def make(events: list[UsageEvent]) -> sqlite3.Connection:
        conn = store.connect(tmp_path / "hub.db")
        insert(conn, events)
        return conn
    return make


def test_the_report_counts_unpriced_and_estimated_requests(db: Callable[[list[UsageEvent]], sqlite3.Connection]) -> None:
    conn = db([
        event(1, "claude-new-9", 900, "estimate"),
        event(2, "claude-new-9", 800, "estimate"),
        event(3, "claude-free", 0, "free"),
        event(4, "claude-sonnet-4-6", 100, None),
        event(5, "mystery", None, "unknown"),
    ])
    rows, total = report.query(conn, "model")
    by = {r.group: r for r in rows}
    assert (by["claude-new-9"].unpriced, by["claude-new-9"].estimated, by["claude-new-9"].cost_micros) == (2, 2, 1700)
    assert (by["claude-free"].unpriced, by["claude-free"].estimated) == (1, 0)
    assert (by["claude-sonnet-4-6"].unpriced, by["claude-sonnet-4-6"].estimated) == (0, 0)
    assert (by["mystery"].unpriced, by["mystery"].estimated) == (1, 0)
    assert (total.unpriced, total.estimated) == (4, 2)

    text = render.usage_report(rows, total, "model", None, None, "table")
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    # A cost that holds an estimate says so, and the note says what that means.
    assert "~0.0017" in lines["claude-new-9"]
    assert "~" not in lines["claude-sonnet-4-6"] and "~" not in lines["claude-free"]
    assert "~0.0018" in lines["total"]
    assert "~ includes estimated cost" in text
    csv_text = render.usage_report(rows, total, "model", None, None, "csv")
    header = csv_text.splitlines()[0].split(",")
    assert header[-1] == "estimated"
    json_text = render.usage_report(rows, total, "model", None, None, "json")
    assert '"estimated": 2' in json_text

    # Nothing estimated in the span: no marker, no note.
    since, until = 1_700_000_004.0, 1_700_000_005.0
    plain = render.usage_report(*report.query(conn, "model", since, until), "model", since, until, "table")
    assert "~" not in plain and "estimated" not in plain
