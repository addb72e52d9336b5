"""bench/dashboard.py: the quick run as CI runs it (every GET route of the
dashboard's table timed against a real hub), its database cache, and which
routes it asks for."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from bench import dashboard
from bench.services import free_port
from hubcore import store
from hubcore.config import DashboardConfig
from hubcore.dashboard.server import DashboardServer
from hubcore.dashboard.web import Access, Request, Route
from hubcore.governance import tokens
from hubcore.governance.limiter import Limiter
from hubcore.governance.tokens import TokenTable
from hubcore.http.h11server import Reply
from tests.hubharness import REPO

ROWS = 5000


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "bench.dashboard", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)


def test_a_quick_run_times_every_get_route_of_the_table_and_reuses_its_database(tmp_path: Path) -> None:
    database, report = tmp_path / "bench.db", tmp_path / "timings.json"
    done = run("--quick", "--rows", str(ROWS), "--database", str(database), "--json", str(report))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"### Dashboard with {ROWS:,} usage rows: {dashboard.QUICK_ROUNDS} rounds per route" in done.stdout
    assert "routes timed:" in done.stdout and "built" in done.stderr
    timed = orjson.loads(report.read_bytes())["routes"]
    routes = DashboardServer(DashboardConfig(), database=str(database), timezone="UTC", tokens=TokenTable(),
                             limiter=Limiter()).routes
    wanted = {r.path for r in routes if r.method == "GET" and r.access in (Access.OPERATOR, Access.DEVELOPER)}
    assert wanted <= {t["route"] for t in timed}
    assert {"/requests?user=nobody", "/api/v1/requests?status=418"} <= {t["route"] for t in timed}
    for t in timed:
        assert len(t["ms"]) == dashboard.QUICK_ROUNDS and all(s < 400 for s in t["statuses"]), t
    detail = next(t for t in timed if t["route"] == "/requests/{id}")
    assert detail["path"].removeprefix("/requests/").isdigit()
    # Cached by path: the second run builds nothing.
    again = run("--quick", "--rows", str(ROWS), "--rounds", "1", "--database", str(database))
    assert again.returncode == 0 and f"reusing {database} ({ROWS:,} usage rows)" in again.stderr, again.stderr


def test_a_database_it_did_not_build_is_left_alone(tmp_path: Path) -> None:
    database = tmp_path / "hub.db"
    conn = store.connect(database)
    try:
        tokens.create(conn, "alice")
    finally:
        conn.close()
    done = run("--rows", "10", "--database", str(database))
    assert done.returncode != 0 and "holds tokens this benchmark did not make: not touching it" in done.stderr
    assert dashboard.usage_count(database) == 0


async def _page(request: Request) -> Reply:
    raise AssertionError("never called")


def test_path_parameters_get_sample_values_and_unknown_ones_are_reported() -> None:
    samples = dashboard.Samples(request_id=42, old_request_id=21, token_id=7, user="u", project="p",
                                other_project="q", model="m", upstream="anthropic", key_label="a",
                                developer_token="hc_x")
    routes = [
        Route("GET", "/requests/{id}", _page, Access.OPERATOR),
        Route("GET", "/tokens/{id}", _page, Access.OPERATOR),
        Route("GET", "/api/v1/keys/{label}", _page, Access.OPERATOR),
        Route("GET", "/widgets/{id}", _page, Access.OPERATOR),
        Route("POST", "/tokens", _page, Access.OPERATOR),
        Route("GET", "/login", _page, Access.PUBLIC),
        Route("GET", "/me", _page, Access.DEVELOPER),
    ]
    chosen, skipped = dashboard.targets(routes, samples)
    assert [(t.path, t.who) for t in chosen] == [
        ("/requests/42", "operator"), ("/tokens/7", "operator"), ("/api/v1/keys/a", "api"), ("/me", "developer")]
    assert skipped == ["/widgets/{id}: no sample value for its parameter (add one to PARAMETERS)"]


def test_a_hub_start_refused_because_a_picked_port_was_taken_is_tried_on_fresh_ports(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    picks = iter([taken.getsockname()[1]])
    monkeypatch.setattr(dashboard, "free_port", lambda: next(picks, None) or free_port())
    try:
        with dashboard.hub(tmp_path / "hub.db", tmp_path) as (dashboard_port, proc):
            assert proc.poll() is None
            socket.create_connection(("127.0.0.1", dashboard_port), timeout=5).close()
    finally:
        taken.close()
    assert proc.poll() is not None  # stopped on leaving
    assert "a port was taken before hubcore bound it; starting again (attempt 2)" in capsys.readouterr().err


def test_a_hub_that_fails_to_start_for_another_reason_says_what_its_log_ends_with(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dashboard, "HUB_CONFIG", dashboard.HUB_CONFIG.replace('kind = "anthropic"', 'kind = "nope"'))
    with pytest.raises(SystemExit) as exited:
        with dashboard.hub(tmp_path / "hub.db", tmp_path):
            raise AssertionError("the hub should not have started")
    said = str(exited.value)
    assert "exited with status" in said and "upstream[0].kind: must be one of" in said and str(tmp_path / "hub.log") in said
