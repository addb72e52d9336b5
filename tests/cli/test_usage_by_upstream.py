"""`hubcore usage --by upstream` and `--by served_model`, as a real
subprocess on a real SQLite file holding rows of requests that failed over
between upstreams, in the three formats."""
from __future__ import annotations

import csv
import io
import os
import subprocess
from pathlib import Path

import orjson
import pytest

from hubcore import store
from hubcore.accounting.usage import FIELDS, INSERT_SQL, UsageEvent
from tests.hubharness import REPO, hubcore_cmd

SONNET = "claude-sonnet-4-5"
SONNET_DATED = "claude-sonnet-4-5-20250929"


def event(n: int, upstream: str | None, cost: int, **fields: object) -> UsageEvent:
    values: dict[str, object] = dict(
        ts=1_767_225_600.0 + n, request_id=f"req-{n}", endpoint="/v1/messages", status=200,
        outcome="ok", total_ms=10.0, user="alice", upstream=upstream, model=SONNET,
        input_tokens=100 * n, output_tokens=10 * n, cost_micros=cost,
        key_label=None if upstream is None else "k",
    )
    values.update(fields)
    return UsageEvent(**values)  # type: ignore[arg-type]


EVENTS = [
    event(1, "primary", 3_000_000, route="primary/k:200"),
    event(2, "primary", 1_000_000, route="primary/k:200"),
    # Failed over: the row names the upstream that answered, and the model it was asked for.
    event(3, "backup", 500_000, served_model=SONNET_DATED, route="primary/k:529,backup/k:200"),
    event(4, "backup", 0, status=529, outcome="upstream_error", input_tokens=0, output_tokens=0,
          route="primary/k:529,backup/k:529"),
    # Refused by the hub: no upstream, no route.
    event(5, None, 0, status=429, outcome="refused", input_tokens=0, output_tokens=0),
]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "hubcore.toml"
    db = tmp_path / "hub.db"
    path.write_text(f'[server]\ndatabase = "{db}"\nops_socket = "{tmp_path / "ops.sock"}"\n')
    # The database of a hub that has run (commands create none unasked).
    conn = store.connect(db)
    try:
        conn.executemany(INSERT_SQL, [tuple(getattr(e, f) for f in FIELDS) for e in EVENTS])
        conn.commit()
    finally:
        conn.close()
    return path


def usage(config: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUBCORE_", "ANTHROPIC_", "OPENAI_"))}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(hubcore_cmd("usage", *args, "--config", str(config)),
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    # stderr names the database read, and says nothing else.
    assert done.stderr.startswith("hubcore: database ") and done.stderr.count("\n") == 1, done.stderr
    return done.stdout


def test_by_upstream_table(config: Path) -> None:
    lines = usage(config, "--by", "upstream").splitlines()
    assert lines[0].startswith("usage by upstream, beginning to now")
    cells = {line.split()[0]: line.split() for line in lines[2:] if line and not line.startswith("-")}
    assert list(cells) == ["upstream", "primary", "backup", "(none)", "total"]
    # requests, cost $, errors
    assert (cells["primary"][1], cells["primary"][8], cells["primary"][-1]) == ("2", "4.0000", "0")
    assert (cells["backup"][1], cells["backup"][8], cells["backup"][-1]) == ("2", "0.5000", "1")
    assert (cells["(none)"][1], cells["(none)"][-1]) == ("1", "1")
    assert (cells["total"][1], cells["total"][8]) == ("5", "4.5000")


def test_by_upstream_json(config: Path) -> None:
    document = orjson.loads(usage(config, "--by", "upstream", "--format", "json"))
    assert document["by"] == "upstream"
    assert [(g["group"], g["requests"], g["cost_micros"], g["errors"]) for g in document["groups"]] == [
        ("primary", 2, 4_000_000, 0), ("backup", 2, 500_000, 1), (None, 1, 0, 1),
    ]
    assert document["total"]["requests"] == 5


def test_by_upstream_csv(config: Path) -> None:
    rows = list(csv.DictReader(io.StringIO(usage(config, "--by", "upstream", "--format", "csv"))))
    assert [(r["group"], r["requests"], r["cost_usd"]) for r in rows] == [
        ("primary", "2", "4.000000"), ("backup", "2", "0.500000"), ("", "1", "0.000000"), ("TOTAL", "5", "4.500000"),
    ]


def test_by_served_model_names_what_the_upstream_was_asked_for(config: Path) -> None:
    # --by model stays the client's id (prices are by it); --by served_model
    # is the id the upstream got: the mapped one, else the client's own.
    by_model = orjson.loads(usage(config, "--by", "model", "--format", "json"))
    assert [(g["group"], g["requests"]) for g in by_model["groups"]] == [(SONNET, 5)]
    served = orjson.loads(usage(config, "--by", "served_model", "--format", "json"))
    assert served["by"] == "served_model"
    assert [(g["group"], g["requests"], g["cost_micros"]) for g in served["groups"]] == [
        (SONNET, 4, 4_000_000), (SONNET_DATED, 1, 500_000),
    ]
    table = usage(config, "--by", "served_model")
    assert table.startswith("usage by served_model,")
    assert SONNET_DATED in table
    rows = list(csv.DictReader(io.StringIO(usage(config, "--by", "served_model", "--format", "csv"))))
    assert [r["group"] for r in rows] == [SONNET, SONNET_DATED, "TOTAL"]
