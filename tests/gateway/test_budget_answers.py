"""The answers built from a principal's budgets: the x-hubcore-budget-*
headers (gateway.rewrite) and the body of GET /hubcore/v1/me (gateway.me),
from a Limiter on a fake clock."""
from __future__ import annotations

import orjson

from hubcore.gateway import rewrite
from hubcore.gateway.me import me_body, me_report
from hubcore.gateway.rewrite import Framing
from hubcore.governance.limits import Limits
from tests.governance.test_budget_view import DAY_END, MONTH_END, T0, TZ, USD, WEEK_END, at, limiter_with, who


def test_me_report_from_the_counters() -> None:
    token = Limits(budget_day=2 * USD, rpm=30)
    limiter = limiter_with(token, Limits(budget_month=50 * USD, concurrency=4))
    limiter.charge(1, "alice", "web", 1_250_000, T0 - 60)
    limiter.charge(7, "alice", "web", 250_000, at("2026-03-02T09:00:00"))    # Monday, the user's other token
    limiter.charge(1, "alice", "web", 1_000_000, at("2026-02-27T09:00:00"))  # last month
    report = me_report(limiter, who(token), T0)
    assert report["spend"] == {
        "today": {"start": at("2026-03-04T00:00:00"), "end": DAY_END, "token_micros": 1_250_000, "user_micros": 1_250_000},
        "week": {"start": at("2026-03-02T00:00:00"), "end": WEEK_END, "token_micros": 1_250_000, "user_micros": 1_500_000},
        "month": {"start": at("2026-03-01T00:00:00"), "end": MONTH_END, "token_micros": 1_250_000, "user_micros": 1_500_000},
    }
    assert [(b["kind"], b["window"], b["remaining_micros"], b["resets"]) for b in report["budgets"]] == [
        ("token", "day", 750_000, "2026-03-05T00:00:00+01:00"),
        ("user", "month", 48_500_000, "2026-04-01T00:00:00+02:00"),  # summer time by then
    ]
    assert report["tightest"] == report["budgets"][0]
    assert report["limits"] == {"token": {"rpm": 30, "concurrency": None}, "user": {"rpm": None, "concurrency": 4},
                                "project": None}
    assert report["timezone"] == TZ and report["token"] == {"id": 1, "prefix": "hc-test"}
    assert orjson.loads(me_body(limiter, who(token), T0)) == report
    nobody = me_report(limiter, who(None, token_id=9, user="zoe", project=None), T0)
    assert nobody["budgets"] == [] and nobody["tightest"] is None and nobody["spend"]["month"]["user_micros"] == 0
    assert nobody["limits"] == {"token": None, "user": None}


# -- the headers -----------------------------------------------------------------

def test_budget_headers_are_plain_dollars_and_utc() -> None:
    assert rewrite.budget_headers(46_880_000, MONTH_END) == [
        (b"x-hubcore-budget-remaining", b"46.88"), (b"x-hubcore-budget-resets", b"2026-03-31T22:00:00Z"),
    ]
    assert rewrite.budget_headers(4_512, None) == [(b"x-hubcore-budget-remaining", b"0.004512")]
    assert rewrite.budget_headers(0, DAY_END)[0] == (b"x-hubcore-budget-remaining", b"0.00")
    assert rewrite.budget_headers(1_234_567_000_000, None) == [(b"x-hubcore-budget-remaining", b"1234567.00")]


def test_response_head_with_budget_headers() -> None:
    plain = rewrite.response_head(200, [(b"x-a", b"1")], Framing.CHUNKED, None, True, "hc_1")
    budget = rewrite.budget_headers(3_000_000, DAY_END)
    head = rewrite.response_head(200, [(b"x-a", b"1")], Framing.CHUNKED, None, True, "hc_1", budget)
    assert head == plain.replace(
        b"x-hubcore-request-id: hc_1\r\n",
        b"x-hubcore-request-id: hc_1\r\nx-hubcore-budget-remaining: 3.00\r\n"
        b"x-hubcore-budget-resets: 2026-03-04T23:00:00Z\r\n",
    )
