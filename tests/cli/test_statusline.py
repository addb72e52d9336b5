"""`hubcore statusline`'s own parts: the line it makes of an answer of
GET /hubcore/v1/me, and its start-up, which imports nothing of hubcore's
commands (tests/functional/test_spend_visible.py runs it against a hub)."""
from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from hubcore.cli import statusline
from tests.hubharness import REPO

NOW = 1772614800.0  # 2026-03-04T10:00:00+01:00


def me(today: int = 3_120_000, month: int = 40_000_000, tightest: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "now": NOW,
        "spend": {"today": {"user_micros": today, "token_micros": today}, "month": {"user_micros": month}},
        "tightest": tightest,
    }


def budget(kind: str = "user", window: str = "month", remaining: int = 46_880_000,
           resets: str | None = "2026-04-01T00:00:00+02:00", name: str = "alice") -> dict[str, Any]:
    return {"kind": kind, "name": name, "window": window, "remaining_micros": remaining, "resets": resets}


@pytest.mark.parametrize(("answer", "line"), [
    (me(), "hub $3.12 today · $40.00 this month"),
    (me(tightest=budget()), "hub $3.12 today · $46.88 left this month (resets Apr 1)"),
    (me(tightest=budget("project", name="web")), "hub $3.12 today · $46.88 left this month (project web, resets Apr 1)"),
    (me(tightest=budget(window="total", resets=None)), "hub $3.12 today · $46.88 left in total"),
    (me(tightest=budget("token", "day", 5_000, "2026-03-05T00:00:00+01:00")), "hub $3.12 today · $0.01 left today (resets Mar 5)"),
    (me(tightest=budget(window="5h", resets="2026-03-04T14:30:00+01:00")), "hub $3.12 today · $46.88 left in 5 h (resets 14:30)"),
    (me(today=1_234_567_890_000), "hub $1,234,567.89 today · $40.00 this month"),
])
def test_the_line(answer: dict[str, Any], line: str) -> None:
    assert statusline.render(answer) == line


def test_money_rounds_half_up_from_integers() -> None:
    assert [statusline.usd(m) for m in (0, 4_999, 5_000, 1_005_000, -20_000)] == ["$0.00", "$0.00", "$0.01", "$1.01", "-$0.02"]
    with pytest.raises(TypeError):
        statusline.usd(1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("answer", [
    {}, {"spend": {}}, me(today="3"), me(tightest={"kind": "user"}),  # type: ignore[arg-type]
    me(tightest=budget(resets="yesterday")),
])
def test_an_answer_of_another_shape_makes_no_line(answer: dict[str, Any]) -> None:
    with pytest.raises((KeyError, TypeError, ValueError)):
        statusline.render(answer)


def test_it_starts_without_importing_the_other_commands() -> None:
    code = (
        "import sys\n"
        "from hubcore.cli.main import main\n"
        "assert main(['statusline', '--url', 'http://127.0.0.1:1', '--token', 'x']) == 0\n"
        "heavy = sorted(m for m in sys.modules if m.startswith('hubcore.') and m not in "
        "('hubcore.cli', 'hubcore.cli.main', 'hubcore.cli.statusline'))\n"
        "print(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=30,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"
