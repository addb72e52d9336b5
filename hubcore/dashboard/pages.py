"""The dashboard's HTML: whole pages rendered on the server, every dynamic
string through html.escape, no inline script or style (the CSP allows
neither), the chart as SVG."""
from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from html import escape
from zoneinfo import ZoneInfo

from hubcore.dashboard.mine import Mine
from hubcore.governance.limiter import BudgetLine
from hubcore.governance.limits import Limits, format_time, format_usd

_PERIOD_TITLES = {"today": "Today", "week": "This week", "month": "This month"}
_WINDOW_TITLES = {"5h": "5 hours (rolling)", "day": "day", "week": "week", "month": "month", "total": "total"}


def zone_label(tz: ZoneInfo, now: float) -> str:
    """The zone's name and its current offset: "Europe/Berlin (UTC+01:00)"."""
    offset = datetime.fromtimestamp(now, tz).isoformat()[-6:]
    offset = "+00:00" if offset[0] not in "+-" else offset
    return f"{tz.key} (UTC{offset})"


def _layout(title: str, body: str, header: str = "") -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{escape(title)} · hubcore</title>"
        "<link rel=\"stylesheet\" href=\"/static/dashboard.css\"></head>"
        f"<body><header><span class=\"brand\">hubcore</span>{header}</header><main>{body}</main></body></html>\n"
    )


# The operator's pages, in the order of the navigation bar: (path, title).
OPERATOR_NAV = (
    ("/", "Overview"), ("/usage", "Usage"), ("/requests", "Requests"), ("/live", "Live"),
    ("/tokens", "Tokens"), ("/audit", "Audit"),
)


def operator_page(*, title: str, active: str, operator: str, csrf: str, tz: ZoneInfo, now: float, body: str,
                  scripts: Sequence[str] = ()) -> str:
    """A whole operator page: the navigation bar (`active` is the current
    path), who is signed in, the reporting zone, sign-out, then `body`.
    `scripts`: files under /static/ the page loads (no inline script: the
    CSP forbids it)."""
    current = ' aria-current="page"'
    links = "".join(
        f"<a href=\"{path}\"{current if path == active else ''}>{escape(name)}</a>"
        for path, name in OPERATOR_NAV
    )
    header = (
        f"<nav>{links}</nav><span class=\"who\">{escape(operator)} · "
        f"<span id=\"zone\">{escape(zone_label(tz, now))}</span></span>"
        f"<form class=\"signout\" method=\"post\" action=\"/logout\">{csrf_field(csrf)}"
        "<button type=\"submit\">Sign out</button></form>"
    )
    tail = "".join(f"<script src=\"/static/{escape(name)}\" defer></script>" for name in scripts)
    return _layout(title, body + tail, header)


def csrf_field(csrf: str) -> str:
    """The hidden field every form of a signed-in page carries."""
    return f"<input type=\"hidden\" name=\"csrf\" value=\"{escape(csrf)}\">"


def login_page(csrf: str, token_error: str | None = None, operator_error: str | None = None, name: str = "") -> str:
    def error(text: str | None) -> str:
        return f"<p class=\"error\" role=\"alert\">{escape(text)}</p>" if text else ""

    hidden = f"<input type=\"hidden\" name=\"csrf\" value=\"{escape(csrf)}\">"
    return _layout("Sign in", (
        "<h1>Sign in</h1>"
        "<section><h2>Developers</h2>"
        f"{error(token_error)}"
        f"<form method=\"post\" action=\"/login\">{hidden}"
        "<label for=\"token\">Hub token</label>"
        "<input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"off\" required>"
        "<button type=\"submit\">Sign in</button></form></section>"
        "<section><h2>Operators</h2>"
        f"{error(operator_error)}"
        f"<form method=\"post\" action=\"/login\">{hidden}"
        f"<label for=\"name\">Name</label><input id=\"name\" name=\"name\" autocomplete=\"username\" value=\"{escape(name)}\">"
        "<label for=\"password\">Password</label>"
        "<input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"current-password\">"
        "<button type=\"submit\">Sign in</button></form></section>"
    ))


def me_page(
    *, user: str, project: str | None, token_prefix: str, csrf: str, mine: Mine, tz: ZoneInfo, now: float,
    budgets: Sequence[BudgetLine], token_limits: Limits | None,
) -> str:
    zone = zone_label(tz, now)
    spend = "".join(
        f"<tr id=\"spend-{p.name}\"><th scope=\"row\">{_PERIOD_TITLES[p.name]}</th>"
        f"<td class=\"num\" data-field=\"requests\">{p.requests}</td>"
        f"<td class=\"num\" data-field=\"input\">{p.input}</td>"
        f"<td class=\"num\" data-field=\"output\">{p.output}</td>"
        f"<td class=\"num\" data-field=\"cost\" data-micros=\"{p.cost_micros}\">{escape(format_usd(p.cost_micros))}</td>"
        f"<td>{escape(format_time(p.start, tz))}</td></tr>"
        for p in mine.periods
    )
    return _layout(f"{user}", (
        f"<h1>Usage of <span id=\"user\">{escape(user)}</span></h1>"
        f"<p>Project: {escape(project or '-')} · token {escape(token_prefix)}… · "
        f"times in <span id=\"zone\">{escape(zone)}</span></p>"
        f"<form method=\"post\" action=\"/logout\"><input type=\"hidden\" name=\"csrf\" value=\"{escape(csrf)}\">"
        "<button type=\"submit\">Sign out</button></form>"
        "<section><h2>Spend</h2><table id=\"spend\"><thead><tr><th></th><th>Requests</th><th>Input tokens</th>"
        f"<th>Output tokens</th><th>Cost</th><th>Since</th></tr></thead><tbody>{spend}</tbody></table></section>"
        f"<section><h2>Budgets</h2>{_budgets(budgets, tz)}</section>"
        f"<section><h2>Limits</h2>{_limits(token_limits, mine.user_limits)}</section>"
        f"<section><h2>Daily spend, last {len(mine.days)} days</h2>{daily_chart(mine.days)}</section>"
    ))


def _budgets(lines: Sequence[BudgetLine], tz: ZoneInfo) -> str:
    if not lines:
        return "<p id=\"budgets\">No budgets are set on your token or your user.</p>"
    rows = "".join(
        f"<tr><td>{escape(line.kind)}</td><td>{escape(_WINDOW_TITLES.get(line.window, line.window))}</td>"
        f"<td class=\"num\" data-micros=\"{line.spent_micros}\">{escape(format_usd(line.spent_micros))}</td>"
        f"<td class=\"num\" data-micros=\"{line.limit_micros}\">{escape(format_usd(line.limit_micros))}</td>"
        f"<td class=\"num\" data-micros=\"{line.remaining_micros}\">{escape(format_usd(line.remaining_micros))}</td>"
        f"<td>{escape(format_time(line.resets_at, tz)) if line.resets_at is not None else '-'}</td></tr>"
        for line in lines
    )
    return (
        "<table id=\"budgets\"><thead><tr><th>Scope</th><th>Window</th><th>Spent</th><th>Limit</th>"
        f"<th>Remaining</th><th>Resets</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _limits(token: Limits | None, user: Limits | None) -> str:
    def cell(value: int | None) -> str:
        return "unlimited" if value is None else str(value)

    rows = "".join(
        f"<tr id=\"limits-{kind}\"><td>{kind}</td><td class=\"num\">{cell(lim.rpm if lim else None)}</td>"
        f"<td class=\"num\">{cell(lim.concurrency if lim else None)}</td></tr>"
        for kind, lim in (("token", token), ("user", user))
    )
    return (
        "<table id=\"limits\"><thead><tr><th>Scope</th><th>Requests per minute</th><th>Concurrent requests</th>"
        f"</tr></thead><tbody>{rows}</tbody></table>"
    )


CHART_WIDTH, CHART_HEIGHT, CHART_PAD = 720, 180, 24


def daily_chart(days: Sequence[tuple[object, int]]) -> str:
    """Bars of spend per day as SVG, each with its date and amount as a tooltip."""
    top = max((micros for _, micros in days), default=0)
    slot = (CHART_WIDTH - 2 * CHART_PAD) / max(len(days), 1)
    plot = CHART_HEIGHT - 2 * CHART_PAD
    bars = []
    for i, (day, micros) in enumerate(days):
        height = plot * micros / top if top else 0.0
        x = CHART_PAD + i * slot
        y = CHART_PAD + plot - height
        label = f"{day}: {format_usd(micros)}"
        bars.append(
            f"<rect class=\"bar\" x=\"{x + 1:.1f}\" y=\"{y:.1f}\" width=\"{max(slot - 2, 1):.1f}\" "
            f"height=\"{height:.1f}\" data-day=\"{escape(str(day))}\" data-micros=\"{micros}\">"
            f"<title>{escape(label)}</title></rect>"
        )
    first, last = (str(days[0][0]), str(days[-1][0])) if days else ("", "")
    return (
        f"<svg id=\"daily\" viewBox=\"0 0 {CHART_WIDTH} {CHART_HEIGHT}\" role=\"img\" "
        f"aria-label=\"daily spend, highest {escape(format_usd(top))}\">"
        f"<line class=\"axis\" x1=\"{CHART_PAD}\" y1=\"{CHART_HEIGHT - CHART_PAD}\" "
        f"x2=\"{CHART_WIDTH - CHART_PAD}\" y2=\"{CHART_HEIGHT - CHART_PAD}\"/>"
        + "".join(bars)
        + f"<text x=\"{CHART_PAD}\" y=\"{CHART_HEIGHT - 6}\">{escape(first)}</text>"
        f"<text x=\"{CHART_WIDTH - CHART_PAD}\" y=\"{CHART_HEIGHT - 6}\" text-anchor=\"end\">{escape(last)}</text>"
        f"<text x=\"{CHART_PAD}\" y=\"{CHART_PAD - 8}\">{escape(format_usd(top))}</text></svg>"
    )


def message_page(title: str, text: str) -> str:
    return _layout(title, f"<h1>{escape(title)}</h1><p>{escape(text)}</p><p><a href=\"/login\">Sign in</a></p>")
