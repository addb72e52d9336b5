"""The real Claude Code CLI against a real hub: it works through the hub, and
it fails at once, with the hub's message, on every refusal that retrying
cannot fix (it retries silently for a minute on anything it believes is
transient, so a refusal worded wrong shows up here as a hang).

The binary is `claude` on PATH, or $HUBCORE_CLAUDE_CODE (.ci/run installs it
from the npm registry). Without it the tests skip, except in CI.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hubcore.governance.limits import Limits
from tests.conftest import upstreams_for
from tests.fakevendor import ANTHROPIC_KEY, FakeVendor, expected_text
from tests.hubharness import HubThread, make_config

# What the issue promises: Claude Code with a bad token exits within 5 s.
FAILS_WITHIN = 5.0


def claude_binary() -> str:
    found = os.environ.get("HUBCORE_CLAUDE_CODE") or shutil.which("claude")
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("Claude Code is not installed: .ci/run installs it with npm and sets HUBCORE_CLAUDE_CODE")
    pytest.skip("Claude Code is not installed (npm install @anthropic-ai/claude-code, or set HUBCORE_CLAUDE_CODE)")


def run_claude(hub: HubThread, token: str, home: Path, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    """`claude -p` as a developer runs it with the hub as its base URL: its
    own home (no login, no settings of this machine's user), no traffic but
    the API's."""
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": hub.url,
        "ANTHROPIC_AUTH_TOKEN": token,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
    }
    started = time.monotonic()
    result = subprocess.run(
        [claude_binary(), "-p", "Say hello.", "--model", "claude-sonnet-4-6"],
        capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL,
    )
    return result, time.monotonic() - started


def test_claude_code_works_through_the_hub(vendor: FakeVendor, tmp_path: Path) -> None:
    claude_binary()
    with HubThread(make_config(tmp_path, upstreams_for(vendor))) as hub:
        result, _ = run_claude(hub, hub.mint("dev"), tmp_path / "home")
        assert result.returncode == 0, result.stderr
        assert expected_text().strip() in result.stdout
        assert all(r.key == ANTHROPIC_KEY for r in vendor.requests)
        rows = hub.wait_rows(len([r for r in vendor.requests if r.path == "/v1/messages"]))
        assert rows and {r["user"] for r in rows} == {"dev"}


REFUSALS: dict[str, tuple[Callable[[HubThread], str], str]] = {
    "unknown token": (lambda hub: "hc-not-a-token", "invalid hub token"),
    "revoked token": (lambda hub: hub.mint_revoked(), "hub token revoked"),
    "budget spent": (lambda hub: hub.mint_limited("spent", Limits(budget_day=0)), "budget"),
    "model not allowed": (lambda hub: hub.mint_limited("narrow", Limits(models=("gpt-nothing-*",))), "not allowed"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_claude_code_fails_at_once_on_a_final_refusal(vendor: FakeVendor, tmp_path: Path, case: str) -> None:
    claude_binary()
    make_token, message = REFUSALS[case]
    with HubThread(make_config(tmp_path, upstreams_for(vendor))) as hub:
        result, took = run_claude(hub, make_token(hub), tmp_path / "home")
        assert result.returncode != 0
        assert message in result.stdout + result.stderr
        assert took < FAILS_WITHIN, f"Claude Code took {took:.1f} s: it retried the hub's refusal"
        assert vendor.requests == []


def test_claude_code_fails_at_once_when_no_key_is_configured(vendor: FakeVendor, tmp_path: Path) -> None:
    claude_binary()
    upstreams = upstreams_for(vendor)
    upstreams[0]["keys"] = []
    with HubThread(make_config(tmp_path, upstreams)) as hub:
        result, took = run_claude(hub, hub.mint("dev"), tmp_path / "home")
        assert result.returncode != 0
        assert "no anthropic upstream key is configured" in result.stdout + result.stderr
        assert took < FAILS_WITHIN, f"Claude Code took {took:.1f} s: it retried the hub's 503"


def test_claude_code_fails_at_once_when_every_key_is_refused(vendor: FakeVendor, tmp_path: Path) -> None:
    claude_binary()
    vendor.set_key_behaviour(ANTHROPIC_KEY, 401)
    with HubThread(make_config(tmp_path, upstreams_for(vendor))) as hub:
        result, took = run_claude(hub, hub.mint("dev"), tmp_path / "home")
        assert result.returncode != 0
        assert "the hub operator must replace" in result.stdout + result.stderr
        assert took < FAILS_WITHIN, f"Claude Code took {took:.1f} s: it retried the hub's 503"
