"""`hubcore prices import`: a LiteLLM-format price map
(model_prices_and_context_window.json, the map other gateways sync from)
into the operator's price file, so new models get a price without a release.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import tomllib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

from hubcore.accounting.pricing import LONG_CONTEXT_FIELD, MICROS_PER_USD, PRICE_FIELDS, PricesError, parse_prices
from hubcore.cli.common import USAGE, CommandError, Subcommands, add_command, load_server

DEFAULT_VENDORS = ("anthropic", "openai")
# The map's modes of the models a coding client talks to; embeddings, images,
# audio and the rest have no place on the hub's routes.
MODES = ("chat", "responses")

# The map's field (USD per token) of each prices.toml field.
_BASE_FIELDS = {
    "input": "input_cost_per_token",
    "output": "output_cost_per_token",
    "cache_read": "cache_read_input_token_cost",
    "cache_write_5m": "cache_creation_input_token_cost",
    "cache_write_1h": "cache_creation_input_token_cost_above_1hr",
}
# Long context: the same fields with "_above_<N>k_tokens"; suffixed again
# (_priority, _flex, _batches) they are other service tiers, not read.
_LONG_FIELD = re.compile(
    r"(input_cost_per_token|output_cost_per_token|cache_read_input_token_cost"
    r"|cache_creation_input_token_cost|cache_creation_input_token_cost_above_1hr)_above_([1-9][0-9]*)k_tokens"
)
_CLASS_OF = {source: name for name, source in _BASE_FIELDS.items()}

USD_PER_TOKEN_TO_PER_MILLION = Decimal(1_000_000)
_GLOB_CHARACTERS = "*?["

# Why an entry was not imported (the summary counts each).
OTHER_VENDOR = "another vendor"
OTHER_MODE = "not a chat or responses model"
PREFIXED = "provider-prefixed key"
GLOB_KEY = "glob character in the key"
NO_PRICE = "no input or output price"
TOO_FINE = "finer than a micro-dollar per million tokens"
THRESHOLDS = "more than one long-context threshold"


class PriceMapError(ValueError):
    """The map cannot be imported; the message names the file and the entry."""


@dataclass(slots=True)
class Imported:
    """What a map gives: per model, prices.toml fields in USD per million
    tokens; and the count of entries left out, by reason."""

    entries: dict[str, dict[str, Decimal]] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)


def add_commands(sub: Subcommands) -> None:
    group = add_command(sub, "prices", "import model prices into the operator price file")
    actions = group.add_subparsers(metavar="ACTION")
    p = add_command(
        actions, "import",
        "read a LiteLLM model_prices_and_context_window.json into the operator price file ([server] prices)",
        run_import,
    )
    p.add_argument("file", metavar="FILE", help="the price map (JSON, USD per token)")
    p.add_argument("--output", metavar="PATH", help="the price file to write (default: the config's [server] prices)")
    p.add_argument("--vendor", default=",".join(DEFAULT_VENDORS), metavar="LIST",
                   help="the map's litellm_provider values to import, comma-separated (default: anthropic,openai)")
    p.add_argument("--dry-run", action="store_true", help="say what would be imported; write nothing")


# -- the map ---------------------------------------------------------------------------

def read_map(text: str, source: str, vendors: Sequence[str]) -> Imported:
    """The entries of a price map whose litellm_provider is one of `vendors`,
    whose mode is chat or responses, whose key is a bare model id (no
    provider prefix, no glob character) and that price input and output.
    Prices are read as the decimals written (no binary float). PriceMapError:
    the text is not a JSON object of objects, or an entry that would be
    imported has a negative or non-numeric price."""
    try:
        # NaN and Infinity become Decimals too, and fail the range check by name.
        document = json.loads(text, parse_float=Decimal, parse_constant=Decimal)
    except json.JSONDecodeError as exc:
        raise PriceMapError(f"{source}: not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise PriceMapError(f"{source}: expected a JSON object of models, got {type(document).__name__}")
    imported = Imported()
    for model, entry in document.items():
        if not isinstance(entry, dict):
            raise PriceMapError(f"{source}: {model}: expected an object, got {type(entry).__name__}")
        reason = _left_out(model, entry, vendors)
        if reason is None:
            prices, reason = _prices(entry, f"{source}: {model}")
            if prices is not None:
                imported.entries[model] = prices
        if reason is not None:
            imported.skipped[reason] += 1
    return imported


def _left_out(model: str, entry: Mapping[str, Any], vendors: Sequence[str]) -> str | None:
    if entry.get("litellm_provider") not in vendors:
        return OTHER_VENDOR
    if entry.get("mode") not in MODES:
        return OTHER_MODE
    if "/" in model:
        # "anthropic/claude-…", "azure/gpt-…": the same model again under a
        # gateway's prefix, never an id the vendor's API reports.
        return PREFIXED
    if any(c in model for c in _GLOB_CHARACTERS):
        return GLOB_KEY
    return None


def _prices(entry: Mapping[str, Any], where: str) -> tuple[dict[str, Decimal] | None, str | None]:
    """(prices.toml fields in USD per million tokens, None), or (None, why not)."""
    per_token: dict[str, Decimal] = {}
    for name, source in _BASE_FIELDS.items():
        value = _usd_per_token(entry.get(source), f"{where}: {source}")
        if value is not None:
            per_token[name] = value
    thresholds = set()
    for source, value in entry.items():
        match = _LONG_FIELD.fullmatch(source)
        if match is None:
            continue
        usd = _usd_per_token(value, f"{where}: {source}")
        if usd is not None:
            thresholds.add(match.group(2))
            per_token[f"{_CLASS_OF[match.group(1)]}_above_{match.group(2)}k"] = usd
    if "input" not in per_token or "output" not in per_token:
        return None, NO_PRICE
    if len(thresholds) > 1:
        return None, THRESHOLDS
    # A cache price the map leaves out is charged as the nearest one it
    # gives: a cached token is at least an input token (OpenAI, which bills
    # no cache writes, never reports one), a 1-hour write at least a 5-minute one.
    per_token.setdefault("cache_read", per_token["input"])
    per_token.setdefault("cache_write_5m", per_token["input"])
    per_token.setdefault("cache_write_1h", per_token["cache_write_5m"])
    per_million = {name: value * USD_PER_TOKEN_TO_PER_MILLION for name, value in per_token.items()}
    # The price file holds whole micro-dollars per million tokens.
    if any((v * MICROS_PER_USD) % 1 for v in per_million.values()):
        return None, TOO_FINE
    return per_million, None


def _usd_per_token(value: Any, where: str) -> Decimal | None:
    if value is None:  # absent, or null: the map does not give it
        return None
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
        raise PriceMapError(f"{where}: expected a number of USD per token, got {value!r}")
    amount = Decimal(value)
    if not amount.is_finite() or amount < 0:
        raise PriceMapError(f"{where}: must be a finite, non-negative number, got {value}")
    return amount


# -- the price file --------------------------------------------------------------------

def render(
    imported: Mapping[str, Mapping[str, Any]], kept: Mapping[str, Mapping[str, Any]], header: Sequence[str],
) -> str:
    """The price file: `header` as comments, then the imported entries (by
    model id), then the operator's other entries in their order."""
    lines = [f"# {line}".rstrip() for line in header]
    lines += ["", "[prices]"]
    lines += [render_entry(model, imported[model]) for model in sorted(imported)]
    if kept:
        lines += ["", "# Kept from the file as it was before this import."]
        lines += [render_entry(pattern, fields) for pattern, fields in kept.items()]
    return "\n".join(lines) + "\n"


def render_entry(pattern: str, fields: Mapping[str, Any]) -> str:
    """One line of the [prices] table: the five prices, then any long-context ones."""
    order = [name for name in PRICE_FIELDS if name in fields]
    order += sorted((name for name in fields if name not in PRICE_FIELDS), key=_long_field_order)
    body = ", ".join(f"{name} = {_number(fields[name])}" for name in order)
    return f"{_toml_key(pattern)} = {{ {body} }}"


def _long_field_order(name: str) -> int:
    match = LONG_CONTEXT_FIELD.fullmatch(name)
    return PRICE_FIELDS.index(match.group(1)) if match else len(PRICE_FIELDS)


def _number(value: Any) -> str:
    """Decimal notation, never an exponent: 6.25, 0.005, 10."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return format(Decimal(value).normalize(), "f")


def _toml_key(key: str) -> str:
    # A TOML basic string: JSON's escapes are TOML's, but for DEL, which TOML
    # wants escaped and JSON leaves alone.
    return json.dumps(key, ensure_ascii=False).replace("\x7f", "\\u007f")


def read_price_file(path: Path) -> dict[str, dict[str, Any]] | None:
    """The entries of an existing price file, as written (None: no file).
    CommandError: a file the hub could not load either."""
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CommandError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        parse_prices(text, str(path))
    except PricesError as exc:
        raise CommandError(f"{exc}; fix it or pass another --output") from None
    table = tomllib.loads(text, parse_float=Decimal).get("prices", {})
    return {pattern: dict(fields) for pattern, fields in table.items()}


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` whole: the hub reloading meanwhile reads the old file or the new one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, "utf-8")
        if path.exists():
            os.chmod(temporary, path.stat().st_mode & 0o7777)
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise CommandError(f"cannot write {path}: {exc.strerror}") from None


# -- the command -----------------------------------------------------------------------

def run_import(args: argparse.Namespace) -> int:
    """`hubcore prices import FILE [--output PATH] [--vendor LIST] [--dry-run]`."""
    vendors = tuple(v.strip() for v in args.vendor.split(",") if v.strip())
    if not vendors:
        raise CommandError("--vendor: expected a comma-separated list of litellm_provider values", USAGE)
    target = args.output or load_server(args).prices
    if not target:
        raise CommandError("no price file to write: set [server] prices in the config or pass --output", USAGE)
    source = Path(args.file)
    try:
        raw = source.read_bytes()
    except OSError as exc:
        raise CommandError(f"{source}: cannot read: {exc.strerror}") from None
    try:
        imported = read_map(raw.decode("utf-8"), str(source), vendors)
    except UnicodeDecodeError:
        raise CommandError(f"{source}: not JSON: not UTF-8 text") from None
    except PriceMapError as exc:
        raise CommandError(str(exc)) from None

    path = Path(target)
    before = read_price_file(path)
    replaced = [pattern for pattern in (before or {}) if pattern in imported.entries]
    kept = {pattern: fields for pattern, fields in (before or {}).items() if pattern not in imported.entries}
    header = _header(source, raw, len(imported.entries), vendors, len(kept))
    text = render(imported.entries, kept, header)
    try:
        parse_prices(text, str(path))
    except PricesError as exc:  # a bug here, never the operator's doing
        raise CommandError(f"the price file rendered does not parse: {exc}") from None

    out = [f"imported {len(imported.entries)} models from {source} "
           f"(vendors: {', '.join(vendors)}; modes: {', '.join(MODES)})"]
    skipped = sum(imported.skipped.values())
    reasons = ", ".join(f"{n} {why}" for why, n in sorted(imported.skipped.items(), key=lambda r: (-r[1], r[0])))
    out.append(f"skipped {skipped}: {reasons}" if skipped else "skipped 0")
    if before is not None:
        out.append(f"kept {_entries(len(kept))} of the file unchanged; replaced {len(replaced)}{_names(replaced)}")
    if args.dry_run:
        out.append(f"dry run: nothing written to {path}")
    else:
        write_atomically(path, text)
        # Absolute: a relative [server] prices is relative to where the hub runs.
        out.append(f"wrote {os.path.abspath(path)}")
        when = "" if not args.output else " if its config's [server] prices names this file"
        out.append(f"the running hub takes the new prices on `hubcore reload` (or SIGHUP){when}")
    print("\n".join(out))
    return 0


def _names(patterns: Sequence[str], most: int = 5) -> str:
    if not patterns:
        return ""
    shown = ", ".join(patterns[:most])
    more = f" and {len(patterns) - most} more" if len(patterns) > most else ""
    return f" ({shown}{more})"


def _header(source: Path, raw: bytes, count: int, vendors: Sequence[str], kept: int) -> list[str]:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return [
        "hubcore operator prices, in US dollars per million tokens: the format of",
        "hubcore/accounting/prices.toml, whose entries these override and extend.",
        "",
        f"Written by `hubcore prices import` at {when}: {count} models from",
        f"{source.resolve()} (sha256 {digest}),",
        "a LiteLLM model_prices_and_context_window.json map (USD per token x 10^6),",
        f"litellm_provider {', '.join(vendors)}, mode {', '.join(MODES)}; "
        f"{_entries(kept)} of the previous file kept (their comments are not).",
        "A cache price the map leaves out is charged as uncached input (a 1-hour",
        "write as the 5-minute one). <class>_above_<N>k: when a request's input",
        "(uncached + cache writes + cache reads) exceeds N thousand tokens, every",
        "class of it is charged its _above_ price where one is given.",
    ]


def _entries(n: int) -> str:
    return f"{n} {'entry' if n == 1 else 'entries'}"
