"""What the CLI prints for people and scripts: tables, money, times, limits,
and the usage and budget reports as a table, JSON or CSV.

Money and moments read as in the hub's refusals: format_usd and format_time
are the package's one formatting of each, and live in governance, which
refuses requests with them.
"""
from __future__ import annotations

import csv
import io
import time
from collections.abc import Container, Sequence
from zoneinfo import ZoneInfo

import orjson

from hubcore.accounting.report import Row
from hubcore.dashboard import reports
from hubcore.governance.limiter import BudgetLine
from hubcore.governance.limits import Limits, format_time, format_usd
from hubcore.governance.tokens import Principal, TokenInfo

__all__ = [
    "FORMATS",
    "budget_csv",
    "budget_json",
    "budget_kind",
    "budget_table",
    "check_format",
    "format_time",
    "format_usd",
    "groups_text",
    "limits_text",
    "table",
    "token_detail",
    "token_table",
    "usage_report",
    "utc_minute",
]

FORMATS = ("table", "json", "csv")


# -- the pieces ------------------------------------------------------------------

def table(rows: Sequence[Sequence[str] | None], right: Container[int] = ()) -> list[str]:
    """Rows, the header first, as lines: each cell padded to its column's
    widest, two spaces apart, right-aligned in the columns `right`, trailing
    blanks trimmed. A None row is a rule of dashes under every column."""
    cells = [row for row in rows if row is not None]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = []
    for row in rows:
        if row is None:
            lines.append("  ".join("-" * width for width in widths))
        else:
            lines.append("  ".join(
                cell.rjust(width) if i in right else cell.ljust(width)
                for i, (cell, width) in enumerate(zip(row, widths))
            ).rstrip())
    return lines


def utc_minute(ts: float) -> str:
    """Unix seconds as `2026-03-04 10:00`, in UTC: a listing's column."""
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))


def limits_text(limits: Limits | None, tz: ZoneInfo | None = None) -> str:
    """One line: `rpm 60, concurrency 4, day $5.00, models claude-sonnet-*`."""
    if limits is None:
        return "no limits"
    if limits.error is not None:
        return f"unreadable ({limits.error})"
    parts = []
    if limits.rpm is not None:
        parts.append(f"rpm {limits.rpm}")
    if limits.concurrency is not None:
        parts.append(f"concurrency {limits.concurrency}")
    for window, micros in limits.budgets:
        parts.append(f"{window} {format_usd(micros)}{budget_kind(limits.is_soft(window), limits.warns_at(window))}")
    if limits.models:
        parts.append("models " + ",".join(limits.models))
    if limits.expires_at is not None:
        parts.append("expires " + format_time(limits.expires_at, tz))
    if limits.groups:
        parts.append("groups " + ",".join(limits.groups))
    return ", ".join(parts) or "no limits"


def budget_kind(soft: bool, warn_at: Sequence[int]) -> str:
    """What a budget's amount is followed by: nothing for a hard budget
    without thresholds (as before there were others), ` soft`,
    ` (warn 50,80%)`, ` soft (warn 80,100%)`."""
    text = " soft" if soft else ""
    if warn_at:
        text += f" (warn {','.join(map(str, warn_at))}%)"
    return text


def groups_text(principal: Principal) -> str:
    """The upstream groups a token's requests may use: `any`, `cheap,fast`,
    or with the restrictions they come from when its user or project has
    some: `fast (token 7: cheap,fast; user alice: fast,slow)`, `none (...)`."""
    groups = principal.groups
    if groups is None:
        return "any"
    allowed = ",".join(sorted(groups)) or "none"
    own = f"token {principal.token_id}"
    if all(scope == own and rule for scope, rule in principal.group_rules):
        return allowed
    said = "; ".join(
        f"{scope}: {','.join(rule) if rule else 'unreadable limits'}" for scope, rule in principal.group_rules
    )
    return f"{allowed} ({said})"


def _lines(lines: Sequence[str]) -> str:
    return "".join(line + "\n" for line in lines)


# -- tokens ----------------------------------------------------------------------

def token_table(rows: Sequence[TokenInfo]) -> str:
    """`hubcore token list`: prefixes, never tokens."""
    body: list[Sequence[str] | None] = [
        ("ID", "PREFIX", "USER", "PROJECT", "CREATED", "REVOKED", "LAST USED", "LIMITS"),
    ]
    for r in rows:
        body.append((
            str(r.id), f"{r.prefix}…", r.user, r.project or "-", utc_minute(r.created_at),
            "-" if r.revoked_at is None else utc_minute(r.revoked_at),
            "never" if r.last_used_at is None else utc_minute(r.last_used_at),
            "-" if r.limits is None else limits_text(r.limits),
        ))
    return _lines(table(body))


def token_detail(
    info: TokenInfo, status: str, spend: Sequence[tuple[str, int, BudgetLine | None]], zone: ZoneInfo,
    principal: Principal | None = None,
) -> str:
    """`hubcore token show`: the token's facts, then its spend per budget
    window, (window, micro-dollars, its budget line or None) each; times in
    `zone`, the budget time zone. `principal`, the token as the hub loads it,
    adds the upstream groups its requests may use when they are restricted."""

    def moment(ts: float | None, absent: str) -> str:
        return absent if ts is None else format_time(ts, zone)

    if status == "revoked":
        state = f"revoked at {moment(info.revoked_at, '-')}"
    elif status == "expired":
        assert info.limits is not None and info.limits.expires_at is not None
        state = f"expired at {moment(info.limits.expires_at, '-')}"
    else:
        state = status
    facts = [
        ("token", f"{info.id} ({info.prefix}…)"),
        ("user", info.user),
        ("project", info.project or "-"),
        ("note", info.note or "-"),
        ("created", moment(info.created_at, "-")),
        ("last used", moment(info.last_used_at, "never")),
        ("status", state),
        ("limits", limits_text(info.limits, zone)),
    ]
    if principal is not None and principal.groups is not None:
        facts.append(("upstream groups", groups_text(principal)))
    width = max(len(name) for name, _ in facts) + 2
    lines = [(name + ":").ljust(width) + value for name, value in facts]
    rows: list[Sequence[str] | None] = [("WINDOW", "SPENT", "BUDGET", "REMAINING", "RESETS")]
    for window, spent, line in spend:
        if line is None:
            rows.append((window, format_usd(spent), "-", "-", "-"))
        else:
            rows.append((
                window + budget_kind(line.soft, line.warn_at), format_usd(spent), format_usd(line.limit_micros),
                format_usd(line.remaining_micros), moment(line.resets_at, "never"),
            ))
    lines += ["", f"spend (day, week and month in {zone.key}):", *table(rows, right=(1, 2, 3))]
    return _lines(lines)


# -- budgets ---------------------------------------------------------------------

def budget_table(lines: Sequence[BudgetLine], zone: ZoneInfo) -> str:
    rows: list[Sequence[str] | None] = [("SCOPE", "WINDOW", "LIMIT", "SPENT", "REMAINING", "USED", "RESETS")]
    for line in lines:
        used = f"{100 * line.spent_micros / line.limit_micros:.0f}%" if line.limit_micros else "-"
        resets = "never" if line.resets_at is None else format_time(line.resets_at, zone)
        rows.append((
            f"{line.kind}:{line.name}", line.window + budget_kind(line.soft, line.warn_at), format_usd(line.limit_micros),
            format_usd(line.spent_micros), format_usd(line.remaining_micros), used, resets,
        ))
    return _lines(table(rows))


def budget_csv(lines: Sequence[BudgetLine], zone: ZoneInfo) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["kind", "name", "window", "limit_usd", "spent_usd", "remaining_usd", "resets_at"])
    for line in lines:
        writer.writerow([
            line.kind, line.name, line.window, _plain_usd(line.limit_micros),
            _plain_usd(line.spent_micros), _plain_usd(line.remaining_micros),
            "" if line.resets_at is None else format_time(line.resets_at, zone),
        ])
    return out.getvalue()


def budget_json(lines: Sequence[BudgetLine], tz: str, now: float) -> str:
    return orjson.dumps({"timezone": tz, "now": now, "budgets": [line.to_dict() for line in lines]}).decode() + "\n"


def _plain_usd(micros: int) -> str:
    """Six places, no symbol or separators: the exact amount, for scripts."""
    return format_usd(micros, 6, symbol="", grouping=False)


# -- usage -----------------------------------------------------------------------

def usage_report(
    rows: Sequence[Row], total: Row, by: str, since: float | None, until: float | None, fmt: str = "table",
) -> str:
    """The usage report in `fmt` (one of FORMATS); `day` groups by UTC date."""
    check_format(fmt)
    if fmt == "json":
        # The document the dashboard exports for the same report, key for key.
        return orjson.dumps(reports.usage_document(rows, total, by, since, until), option=orjson.OPT_INDENT_2).decode()
    if fmt == "csv":
        return reports.usage_csv(rows, total, by)
    return _usage_table(rows, total, by, since, until)


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _group_label(row: Row) -> str:
    """A group as a table names it: by token, `12 alice (ci bot)`."""
    if row.group is None:
        return "(none)"
    label = row.group if row.user is None else f"{row.group} {row.user}"
    return label if row.note is None else f"{label} ({row.note})"


def _usage_table(rows: Sequence[Row], total: Row, by: str, since: float | None, until: float | None) -> str:
    header = [by, "requests", "input", "output", "cache w 5m", "cache w 1h",
              "cache read", "reasoning", "cost $", "unpriced", "cache hit", "errors"]

    def cells(row: Row, label: str) -> list[str]:
        hit = row.cache_hit
        return [
            label, f"{row.requests:,}", f"{row.input:,}", f"{row.output:,}",
            f"{row.cache_write_5m:,}", f"{row.cache_write_1h:,}", f"{row.cache_read:,}",
            f"{row.reasoning:,}", ("~" if row.estimated else "") + format_usd(row.cost_micros, 4, symbol=""),
            f"{row.unpriced:,}",
            "-" if hit is None else f"{hit:.1%}", f"{row.errors:,}",
        ]

    body = [cells(r, _group_label(r)) for r in rows]
    start = "beginning" if since is None else format_time(since)
    end = "now" if until is None else format_time(until)
    title = f"usage by {by}, {start} to {end} (UTC)"
    lines = table([header, None, *body, None, cells(total, "total")], right=range(1, len(header)))
    if total.estimated:
        lines += ["", f"~ includes estimated cost: {total.estimated:,} requests for models without a price, "
                  "charged at the prices of their vendor's most expensive model"]
    return "\n".join([title, "", *lines]) + "\n"
