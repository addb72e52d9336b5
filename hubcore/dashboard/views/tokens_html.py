"""The HTML of /tokens and the pages under it: the lists of tokens, users
and projects, one token's or user's or project's page with its budget bars
and its forms, the answer that shows a new token once. Every dynamic string
goes through html.escape; the bars are <meter> elements (no inline style:
the CSP forbids it); every form carries the session's CSRF field."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from html import escape
from zoneinfo import ZoneInfo

from hubcore.dashboard import pages
from hubcore.dashboard.views.tokens_input import path_segment
from hubcore.governance.limiter import BudgetLine
from hubcore.governance.limits import WINDOWS, Limits, format_time, format_usd
from hubcore.governance.storage import ScopeInfo
from hubcore.governance.tokens import Principal, TokenInfo

WINDOW_TITLES = {"5h": "5 hours (rolling)", "day": "Day", "week": "Week", "month": "Month", "total": "Total"}
# What a page says after the change a form made (?done=...): never the
# value of anything, which the page shows itself.
DONE = {
    "created": "The token is created. Its value was shown once and is not kept.",
    "revoked": "The token is revoked: the proxy refuses it from now on.",
    "limits": "Saved. The proxy applies the new limits from now on.",
    "reset": "The window's spend was reset: what was spent before now no longer counts against its budget.",
}
BudgetsOf = Mapping[tuple[str, str], Sequence[BudgetLine]]


def scope_url(kind: str, name: str | int) -> str:
    """The page of a token, user or project."""
    if kind == "token":
        return f"/tokens/{int(name)}"
    return f"/tokens/{kind}s/{path_segment(str(name))}"


def _time(ts: float | None, tz: ZoneInfo, absent: str = "-") -> str:
    return escape(format_time(ts, tz)) if ts is not None else absent


def _short_time(ts: float | None, tz: ZoneInfo, absent: str = "-") -> str:
    """A list's moment: to the minute, the whole time as its title (the
    header names the zone)."""
    if ts is None:
        return absent
    full = escape(format_time(ts, tz))
    return f"<time datetime=\"{full}\" title=\"{full}\">{full[:10]} {full[11:16]}</time>"


def _usd_field(micros: int | None) -> str:
    """An amount as a form's field holds it: 5.00, 1.234567."""
    return "" if micros is None else format_usd(micros, symbol="", grouping=False)


def _local_input(ts: float | None, tz: ZoneInfo) -> str:
    """A moment as the expiry field holds it: in the reporting zone, no offset."""
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, tz).replace(tzinfo=None).isoformat(timespec="seconds")


def flash(done: str | None, window: str | None) -> str:
    text = DONE.get(done or "")
    if text is None:
        return ""
    if done == "reset" and window in WINDOWS:
        text = f"The {WINDOW_TITLES[window].lower()} spend was reset: what was spent before now no longer counts."
    return f"<p class=\"flash\" id=\"flash\" role=\"status\">{escape(text)}</p>"


# -- limits ---------------------------------------------------------------------------


def _readable(limits: Limits | None) -> Limits:
    return limits if limits is not None and limits.error is None else Limits()


def _unreadable(limits: Limits | None) -> str:
    if limits is None or limits.error is None:
        return ""
    return f"<span class=\"error\">unreadable, every request refused: {escape(limits.error)}</span>"


def limits_cell(limits: Limits | None) -> str:
    """A list's cell: rpm, concurrency, models and groups, those set."""
    if limits is not None and limits.error is not None:
        return _unreadable(limits)
    lim = _readable(limits)
    parts = []
    if lim.rpm is not None:
        parts.append(f"rpm {lim.rpm}")
    if lim.concurrency is not None:
        parts.append(f"concurrency {lim.concurrency}")
    if lim.models:
        parts.append(f"models {', '.join(lim.models)}")
    if lim.groups:
        parts.append(f"groups {', '.join(lim.groups)}")
    return "<br>".join(escape(part) for part in parts) or "-"


def _listed(items: Sequence[str] | None) -> str:
    return escape(", ".join(items)) if items else "any"


def _unlimited(value: int | None) -> str:
    return "unlimited" if value is None else str(value)


def _budget_summary(limits: Limits | None) -> str:
    if limits is None or limits.error is not None or not limits.budgets:
        return "-"
    return escape(" · ".join(f"{window} {format_usd(micros)}" for window, micros in limits.budgets))


def limit_fields(limits: Limits | None, tz: ZoneInfo, zone: str) -> str:
    """The inputs of every limit, holding `limits`; a blank one is no limit."""
    lim = limits if limits is not None and limits.error is None else Limits()

    def field(name: str, label: str, value: str, hint: str = "", kind: str = "text") -> str:
        extra = f" inputmode=\"{kind}\"" if kind != "text" else ""
        return (
            f"<label>{escape(label)} <input name=\"{name}\" value=\"{escape(value)}\"{extra}"
            f" placeholder=\"{escape(hint)}\"></label>"
        )

    budgets = "".join(
        field(f"budget_{window}", f"{WINDOW_TITLES[window]} budget, USD", _usd_field(lim.budget(window)),
              "no budget", "decimal")
        for window in WINDOWS
    )
    return (
        "<fieldset class=\"limits\"><legend>Limits (leave a field blank for no limit)</legend>"
        + field("rpm", "Requests per minute", "" if lim.rpm is None else str(lim.rpm), "unlimited", "numeric")
        + field("concurrency", "Requests in flight at once", "" if lim.concurrency is None else str(lim.concurrency),
                "unlimited", "numeric")
        + budgets
        + field("models", "Models (shell patterns, comma-separated)", ",".join(lim.models), "any model, e.g. claude-sonnet-*")
        + field("groups", "Upstream groups (comma-separated)", ",".join(lim.groups), "every group")
        + field("expires", f"Expires (ISO 8601; without an offset in {zone})", _local_input(lim.expires_at, tz),
                "never, e.g. 2026-07-01T18:00")
        + "</fieldset>"
    )


# -- budget bars ----------------------------------------------------------------------


# A bar turns to the meter's warning colour at 80% of its budget.
HIGH_SHARE = 0.8


def _meter(line: BudgetLine, label: str = "") -> str:
    """Spent of limit as a <meter>, full when the budget is spent (a zero
    budget is full at once)."""
    top = max(line.limit_micros, 1)
    value = top if line.spent_micros >= line.limit_micros else line.spent_micros
    title = f" title=\"{escape(label)}\"" if label else ""
    return (
        f"<meter min=\"0\" max=\"{top}\" value=\"{value}\" high=\"{top * HIGH_SHARE:.0f}\""
        f" optimum=\"0\"{title}>{escape(label)}</meter>"
    )


def budget_bars(lines: Sequence[BudgetLine], tz: ZoneInfo, *, reset_action: str | None = None, csrf: str = "") -> str:
    """A bar per budget: spent of limit, what remains, when it resets; with
    `reset_action`, each with its "reset this window's spend" button."""
    if not lines:
        return "<p class=\"no-budgets\">No budgets set.</p>"
    rows = []
    for line in lines:
        label = f"{format_usd(line.spent_micros)} of {format_usd(line.limit_micros)}"
        over = " over" if line.spent_micros >= line.limit_micros else ""
        reset = ""
        if reset_action is not None:
            reset = (
                f"<td><form method=\"post\" action=\"{escape(reset_action)}\" class=\"reset\">"
                f"{pages.csrf_field(csrf)}<input type=\"hidden\" name=\"window\" value=\"{escape(line.window)}\">"
                "<button type=\"submit\">Reset this window's spend</button></form></td>"
            )
        rows.append(
            f"<tr class=\"budget{over}\" data-window=\"{escape(line.window)}\" data-spent=\"{line.spent_micros}\""
            f" data-limit=\"{line.limit_micros}\">"
            f"<th scope=\"row\">{escape(WINDOW_TITLES.get(line.window, line.window))}</th>"
            f"<td>{_meter(line, label)}</td>"
            f"<td class=\"num\">{escape(format_usd(line.spent_micros))}</td>"
            f"<td class=\"num\">{escape(format_usd(line.limit_micros))}</td>"
            f"<td class=\"num\">{escape(format_usd(line.remaining_micros))}</td>"
            f"<td>{_time(line.resets_at, tz, 'never')}</td>{reset}</tr>"
        )
    action = "<th></th>" if reset_action is not None else ""
    return (
        "<table class=\"budgets\"><thead><tr><th>Window</th><th>Spent of limit</th><th>Spent</th><th>Limit</th>"
        f"<th>Remaining</th><th>Resets</th>{action}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _mini_bars(lines: Sequence[BudgetLine], limits: Limits | None) -> str:
    """A list's cell: one small bar per budget, or the budgets alone where
    the hub counts no spend (a revoked token)."""
    if not lines:
        return _budget_summary(limits)
    return "".join(
        f"<span class=\"mini\" data-window=\"{escape(line.window)}\">{escape(line.window)} "
        f"{_meter(line)} "
        f"{escape(format_usd(line.spent_micros))} / {escape(format_usd(line.limit_micros))}</span>"
        for line in lines
    )


# -- the lists ------------------------------------------------------------------------


def _user_link(name: str) -> str:
    return f"<a href=\"{escape(scope_url('user', name))}\">{escape(name)}</a>"


def _project_link(name: str | None) -> str:
    return "-" if name is None else f"<a href=\"{escape(scope_url('project', name))}\">{escape(name)}</a>"


def _token_rows(infos: Sequence[TokenInfo], budgets: BudgetsOf, tz: ZoneInfo, now: float, csrf: str) -> str:
    rows = []
    for info in infos:
        status = info.status(now)
        limits = info.limits
        revoke = ""
        if status != "revoked":
            revoke = (
                f"<form method=\"post\" action=\"/tokens/{info.id}/revoke\" class=\"inline\">{pages.csrf_field(csrf)}"
                f"<button type=\"submit\">Revoke</button></form>"
            )
        revoked = f"<br>{_short_time(info.revoked_at, tz)}" if info.revoked_at is not None else ""
        rows.append(
            f"<tr data-id=\"{info.id}\" class=\"{escape(status)}\"><td><a href=\"/tokens/{info.id}\">{info.id}</a></td>"
            f"<td><code class=\"prefix\">{escape(info.prefix)}…</code></td><td>{_user_link(info.user)}</td>"
            f"<td>{_project_link(info.project)}</td><td>{escape(info.note or '')}</td>"
            f"<td>{_short_time(info.created_at, tz)}</td><td>{_short_time(_readable(limits).expires_at, tz, 'never')}</td>"
            f"<td>{escape(status)}{revoked}</td><td>{limits_cell(limits)}</td>"
            f"<td>{_mini_bars(budgets.get(('token', str(info.id)), ()), limits)}</td>"
            f"<td class=\"actions\"><a href=\"/tokens/{info.id}\">Edit</a> {revoke}</td></tr>"
        )
    return "".join(rows)


def _scope_rows(kind: str, scopes: Sequence[ScopeInfo], budgets: BudgetsOf, tz: ZoneInfo) -> str:
    rows = []
    for scope in scopes:
        limits = scope.limits
        tokens = len(scope.active_tokens)
        revoked = f" (+{scope.revoked_tokens} revoked)" if scope.revoked_tokens else ""
        rows.append(
            f"<tr data-name=\"{escape(scope.name)}\"><td><a href=\"{escape(scope_url(kind, scope.name))}\">"
            f"{escape(scope.name)}</a></td><td class=\"num\">{tokens}{revoked}</td>"
            f"<td>{escape(scope.note or '')}</td><td>{limits_cell(limits)}</td>"
            f"<td>{_short_time(_readable(limits).expires_at, tz, 'never')}</td>"
            f"<td>{_mini_bars(budgets.get((kind, scope.name), ()), limits)}</td></tr>"
        )
    return "".join(rows)


_SCOPE_HEAD = (
    "<thead><tr><th>Name</th><th>Active tokens</th><th>Note</th><th>Limits</th><th>Expires</th>"
    "<th>Budgets: spent of limit</th></tr></thead>"
)


def tokens_page(
    *, infos: Sequence[TokenInfo], users: Sequence[ScopeInfo], projects: Sequence[ScopeInfo], budgets: BudgetsOf,
    tz: ZoneInfo, now: float, csrf: str, show_revoked: bool, notice: str,
) -> str:
    """The body of /tokens: create a token, then the tokens, users and projects."""
    zone = pages.zone_label(tz, now)
    revoked_link = (
        "<a href=\"/tokens#tokens\">Hide revoked tokens</a>" if show_revoked
        else "<a href=\"/tokens?revoked=show#tokens\">Show revoked tokens</a>"
    )
    token_table = (
        "<table id=\"token-list\"><thead><tr><th>ID</th><th>Prefix</th><th>User</th><th>Project</th><th>Note</th>"
        "<th>Created</th><th>Expires</th><th>Status</th><th>Limits</th><th>Budgets: spent of limit</th><th></th></tr>"
        f"</thead><tbody>{_token_rows(infos, budgets, tz, now, csrf)}</tbody></table>"
        if infos else "<p id=\"no-tokens\">No tokens yet.</p>"
    )

    def scope_section(kind: str, title: str, scopes: Sequence[ScopeInfo]) -> str:
        table = (
            f"<table id=\"{kind}-list\">{_SCOPE_HEAD}<tbody>{_scope_rows(kind, scopes, budgets, tz)}</tbody></table>"
            if scopes else f"<p>No {kind}s yet: a {kind} appears with its first token or its first limits.</p>"
        )
        return (
            f"<section id=\"{kind}s\"><h2>{title}</h2>{table}"
            f"<details><summary>Set the limits of a {kind}</summary>"
            f"<form method=\"post\" action=\"/tokens/{kind}s\" id=\"new-{kind}\">{pages.csrf_field(csrf)}"
            f"<label>Name <input name=\"name\" required></label>"
            f"<label>Note <input name=\"note\"></label>{limit_fields(None, tz, zone)}"
            "<button type=\"submit\">Save limits</button></form></details></section>"
        )

    return (
        "<h1>Tokens, users and projects</h1>"
        "<nav class=\"sections\"><a href=\"#tokens\">Tokens</a> <a href=\"#create\">Create a token</a> "
        "<a href=\"#users\">Users</a> <a href=\"#projects\">Projects</a></nav>"
        f"{notice}"
        f"<section id=\"tokens\"><h2>Tokens</h2><p>{revoked_link}</p>{token_table}</section>"
        "<section id=\"create\"><h2>Create a token</h2>"
        f"<form method=\"post\" action=\"/tokens\" id=\"create-token\">{pages.csrf_field(csrf)}"
        "<label>User <input name=\"user\" required autocomplete=\"off\"></label>"
        "<label>Project <input name=\"project\" autocomplete=\"off\" placeholder=\"none\"></label>"
        "<label>Note <input name=\"note\" autocomplete=\"off\"></label>"
        f"{limit_fields(None, tz, zone)}<button type=\"submit\">Create token</button></form>"
        "<p>The token is shown once, on the page that answers this form.</p></section>"
        + scope_section("user", "Users", users)
        + scope_section("project", "Projects", projects)
    )


# -- one token, user or project ----------------------------------------------------------------


def _facts(rows: Sequence[tuple[str, str]]) -> str:
    """A definition table; the values are HTML already escaped."""
    return "<table class=\"facts\">" + "".join(
        f"<tr><th scope=\"row\">{escape(name)}</th><td>{value}</td></tr>" for name, value in rows
    ) + "</table>"


def _limit_facts(limits: Limits | None, tz: ZoneInfo) -> list[tuple[str, str]]:
    lim = _readable(limits)
    facts = [("Limits", _unreadable(limits))] if limits is not None and limits.error is not None else []
    return facts + [
        ("Requests per minute", _unlimited(lim.rpm)),
        ("Requests in flight", _unlimited(lim.concurrency)),
        ("Budgets", _budget_summary(limits)),
        ("Models", _listed(lim.models)),
        ("Expires", _time(lim.expires_at, tz, "never")),
    ]


def _effective_groups(principal: Principal | None) -> str:
    if principal is None or principal.groups is None:
        return "any"
    allowed = ", ".join(sorted(principal.groups)) or "none"
    said = "; ".join(f"{scope}: {', '.join(rule) if rule else 'unreadable limits'}"
                     for scope, rule in principal.group_rules)
    return escape(f"{allowed} ({said})" if said else allowed)


def token_page(
    *, info: TokenInfo, principal: Principal | None, budgets: Sequence[BudgetLine], tz: ZoneInfo, now: float,
    csrf: str, notice: str,
) -> str:
    status = info.status(now)
    facts = _facts([
        ("Token", f"{info.id} (<code>{escape(info.prefix)}…</code>)"),
        ("User", _user_link(info.user)),
        ("Project", _project_link(info.project)),
        ("Note", escape(info.note or "-")),
        ("Created", _time(info.created_at, tz)),
        ("Last used", _time(info.last_used_at, tz, "never")),
        ("Status", f"<span id=\"status\">{escape(status)}</span>"
                   + (f" at {_time(info.revoked_at, tz)}" if info.revoked_at is not None else "")),
        *_limit_facts(info.limits, tz),
        ("Upstream groups", _effective_groups(principal)),
    ])
    body = f"<h1>Token {info.id}</h1><p><a href=\"/tokens#tokens\">All tokens</a></p>{notice}{facts}"
    if status == "revoked":
        return body + "<p>A revoked token changes no more; its usage stays in the reports.</p>"
    zone = pages.zone_label(tz, now)
    return body + (
        f"<section id=\"budgets\"><h2>Budgets</h2>"
        f"{budget_bars(budgets, tz, reset_action=f'/tokens/{info.id}/reset-spend', csrf=csrf)}</section>"
        f"<section id=\"edit\"><h2>Note and limits</h2>"
        f"<form method=\"post\" action=\"/tokens/{info.id}/limits\" id=\"limits-form\">{pages.csrf_field(csrf)}"
        f"<label>Note <input name=\"note\" value=\"{escape(info.note or '')}\"></label>"
        f"{limit_fields(info.limits, tz, zone)}<button type=\"submit\">Save</button></form></section>"
        f"<section id=\"revoke\"><h2>Revoke</h2><p>The proxy refuses a revoked token at once; this cannot be undone.</p>"
        f"<form method=\"post\" action=\"/tokens/{info.id}/revoke\" id=\"revoke-form\">{pages.csrf_field(csrf)}"
        "<button type=\"submit\">Revoke this token</button></form></section>"
    )


def scope_page(
    *, scope: ScopeInfo, budgets: Sequence[BudgetLine], tz: ZoneInfo, now: float, csrf: str, notice: str,
) -> str:
    kind, name = scope.kind, scope.name
    url = scope_url(kind, name)
    tokens = ", ".join(f"<a href=\"/tokens/{token_id}\">{token_id}</a>" for token_id in scope.active_tokens) or "none"
    if scope.revoked_tokens:
        tokens += f" ({scope.revoked_tokens} revoked)"
    facts = _facts([
        ("Note", escape(scope.note or "-")),
        ("Active tokens", tokens),
        *_limit_facts(scope.limits, tz),
        ("Upstream groups", _listed(_readable(scope.limits).groups)),
    ])
    zone = pages.zone_label(tz, now)
    return (
        f"<h1>{escape(kind.capitalize())} <span id=\"scope-name\">{escape(name)}</span></h1>"
        f"<p><a href=\"/tokens#{kind}s\">All {kind}s</a></p>{notice}{facts}"
        f"<section id=\"budgets\"><h2>Budgets</h2>"
        f"{budget_bars(budgets, tz, reset_action=f'{url}/reset-spend', csrf=csrf)}</section>"
        f"<section id=\"edit\"><h2>Note and limits</h2>"
        f"<form method=\"post\" action=\"{escape(url)}/limits\" id=\"limits-form\">{pages.csrf_field(csrf)}"
        f"<label>Note <input name=\"note\" value=\"{escape(scope.note or '')}\"></label>"
        f"{limit_fields(scope.limits, tz, zone)}<button type=\"submit\">Save</button></form></section>"
    )


def created_page(*, token_id: int, token: str, user: str, project: str | None) -> str:
    """The answer to the create form: the token, this once."""
    owner = f"user {user}" + (f", project {project}" if project else "")
    return (
        f"<h1>Token {token_id} created</h1>"
        f"<p>For {escape(owner)}. Copy it now: <strong>it is shown only once</strong>, here; the hub keeps only "
        "its hash.</p>"
        f"<p><code id=\"new-token\" class=\"secret\">{escape(token)}</code></p>"
        "<p>Clients send it as <code>x-api-key</code> or <code>Authorization: Bearer</code>.</p>"
        # A query, not only a fragment: this answer's own address is /tokens.
        f"<p><a href=\"/tokens/{token_id}\">Token {token_id}</a> · "
        "<a href=\"/tokens?done=created#tokens\" id=\"all-tokens\">All tokens</a></p>"
    )


def refused_page(title: str, message: str, back: str) -> str:
    return (
        f"<h1>{escape(title)}</h1><p class=\"error\" role=\"alert\">{escape(message)}</p>"
        f"<p><a href=\"{escape(back)}\">Back</a></p>"
    )
