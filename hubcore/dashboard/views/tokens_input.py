"""What the tokens pages' forms and their API take: the fields of a change
(a form's strings or a JSON object's values) read into a LimitEdits, a note,
a token's owner, through the parsers the CLI's flags use
(hubcore.governance.limit_edits), so a value means the same in both.

A field that is absent keeps its limit; one given as null, "" or `none`
clears it (a page's form sends every field, so a blank one is "no limit");
anything else is the new value. An error names its field.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from datetime import tzinfo
from typing import Any, TypeVar
from urllib.parse import quote, unquote

from hubcore.dashboard.web import BadParameter
from hubcore.governance.limit_edits import (
    CLEAR, Clear, LimitEdits, parse_amount, parse_expiry, parse_groups, parse_models, parse_positive, parse_warn_at,
    parse_window,
)
from hubcore.governance.limits import WINDOWS

T = TypeVar("T")
BUDGET_FIELDS = tuple(f"budget_{window}" for window in WINDOWS)
LIMIT_FIELDS = ("rpm", "concurrency", *BUDGET_FIELDS, "soft", "warn_at", "models", "expires", "groups")
# What a page's form carries besides its fields; never a field of the change.
FORM_ONLY = frozenset({"csrf"})
# A name of a user or project, or a note: a line of text, not a document.
MAX_NAME = 200
MAX_NOTE = 1000


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise BadParameter(f"{name}: expected a string, not {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    return {bool: "a boolean", list: "a list", dict: "an object", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__)


def _reading(name: str, parse: Callable[[str], T], text: str) -> T:
    try:
        return parse(text)
    except ValueError as e:
        raise BadParameter(f"{name}: {e}") from None


def _positive(name: str, value: Any) -> int | Clear:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return _reading(name, parse_positive, _text(name, value))


def _amount(name: str, value: Any) -> int | Clear:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise BadParameter(f"{name}: a budget must be a non-negative amount in USD, not {value!r}")
        value = str(value)
    return _reading(name, parse_amount, _text(name, value))


def _listed(name: str, value: Any) -> str:
    """A JSON list of strings as the comma-separated text the parsers read."""
    if isinstance(value, list):
        if not all(isinstance(item, str) for item in value):
            raise BadParameter(f"{name}: expected a list of strings")
        if any("," in item for item in value):
            raise BadParameter(f"{name}: a name or pattern cannot hold a comma")
        return ",".join(value)
    return _text(name, value)


def _expiry(name: str, value: Any, tz: tzinfo) -> float | Clear:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise BadParameter(f"{name}: expected unix seconds or an ISO 8601 time, not {value!r}")
        return float(value)
    return _reading(name, lambda text: parse_expiry(text, tz), _text(name, value))


def _blank(value: Any) -> bool:
    return value is None or value == [] or (isinstance(value, str) and not value.strip())


def _soft(value: Any) -> bool:
    """`soft`: true makes the budgets of the change (else every budget) soft,
    false hard, as the CLI's --soft and --hard."""
    if isinstance(value, bool):
        return value
    text = _text("soft", value).strip().lower()
    if text in ("true", "soft", "on", "1"):
        return True
    if text in ("false", "hard", "off", "0"):
        return False
    raise BadParameter(f"soft: expected true or false, not {value!r}")


def _warn_at(value: Any) -> tuple[int, ...] | Clear:
    """`warn_at`: percentages as a list of numbers or "50,80,100", as --warn-at."""
    if isinstance(value, list):
        if not all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            raise BadParameter("warn_at: expected a list of whole percentages")
        value = ",".join(str(item) for item in value)
    return _reading("warn_at", parse_warn_at, _text("warn_at", value))


def limit_edits(fields: Mapping[str, Any], tz: tzinfo) -> LimitEdits:
    """The limit fields of a change. An expiry without an offset is in `tz`,
    the reporting zone every time on the pages is shown in. `soft` and
    `warn_at` apply to the budgets the change sets, else to every budget the
    scope has (as the CLI's --soft, --hard and --warn-at)."""
    values: dict[str, Any] = {}
    budgets = []
    for name in LIMIT_FIELDS:
        if name not in fields:
            continue
        value = fields[name]
        if name == "soft":
            if value is not None:
                values["soft"] = _soft(value)
            continue
        if name == "warn_at":
            values["warn_at"] = CLEAR if _blank(value) else _warn_at(value)
            continue
        if _blank(value):
            parsed: Any = CLEAR
        elif name in ("rpm", "concurrency"):
            parsed = _positive(name, value)
        elif name in BUDGET_FIELDS:
            parsed = _amount(name, value)
        elif name == "models":
            parsed = _reading(name, parse_models, _listed(name, value))
        elif name == "groups":
            parsed = _reading(name, parse_groups, _listed(name, value))
        else:
            parsed = _expiry(name, value, tz)
        if name in BUDGET_FIELDS:
            budgets.append((name.removeprefix("budget_"), parsed))
        else:
            values["expires_at" if name == "expires" else name] = parsed
    return LimitEdits(budgets=tuple(budgets), **values)


def check_fields(fields: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    """A field the change does not take is a mistake (a typo would otherwise
    change nothing, silently)."""
    unknown = sorted(set(fields) - set(allowed) - FORM_ONLY)
    if unknown:
        raise BadParameter(f"{unknown[0]}: not a field of this change; the fields are {', '.join(allowed)}")


def note(fields: Mapping[str, Any]) -> str | None:
    """The note field: None when absent (keep), "" to clear it."""
    if "note" not in fields:
        return None
    if fields["note"] is None:
        return ""
    text = _text("note", fields["note"]).strip()
    if len(text) > MAX_NOTE:
        raise BadParameter(f"note: at most {MAX_NOTE} characters, not {len(text)}")
    return text


def name_field(fields: Mapping[str, Any], field: str, *, required: bool) -> str | None:
    """A user's or project's name from a field: surrounding blanks dropped."""
    value = fields.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise BadParameter(f"{field}: required")
        return None
    return checked_name(field, _text(field, value).strip())


def checked_name(field: str, name: str) -> str:
    if not name:
        raise BadParameter(f"{field}: must not be empty")
    if len(name) > MAX_NAME:
        raise BadParameter(f"{field}: at most {MAX_NAME} characters, not {len(name)}")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise BadParameter(f"{field}: must not hold control characters")
    return name


def window_field(fields: Mapping[str, Any]) -> str:
    value = fields.get("window")
    if value is None:
        raise BadParameter(f"window: required, one of {', '.join(WINDOWS)}")
    return _reading("window", parse_window, _text("window", value))


def token_id(text: str) -> int:
    """A token id from a path segment."""
    if not text.isdigit() or len(text) > 18:
        raise BadParameter(f"id: expected a token id (a whole number), got {unquote(text)!r}")
    return int(text)


def path_name(segment: str) -> str:
    """A user's or project's name from its (percent-encoded) path segment."""
    try:
        return unquote(segment, errors="strict")
    except UnicodeDecodeError:
        raise BadParameter(f"name: not UTF-8 once decoded: {segment!r}") from None


def path_segment(name: str) -> str:
    """A name as one path segment: every '/' and '%' encoded."""
    return quote(name, safe="")
