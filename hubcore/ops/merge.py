"""One hub's answers made of its workers' ([server] workers > 1): /stats
merged, /metrics samples of one name and labels merged, and the answers
of a command every worker carried out made one. Pure functions of the
workers' answers, in worker order; the supervisor fetches them.

The rule is the sum: a worker's requests, connections, spend, errors and
histogram buckets add up to the hub's. What a sum would falsify is named
below: the state of a vendor key, its priority and weight, the tokens
loaded and the live-instance count are the same in every worker (shared
through Redis or read from one database), so worker 0's is the hub's;
loop lag and a failure flag are the worst worker's.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from hubcore.ops.metrics import Histogram

Merge = Callable[[list[Any]], Any]


# -- values ---------------------------------------------------------------------

def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def first(values: list[Any]) -> Any:
    """Worker 0's value, else the next worker's that has one."""
    return next((v for v in values if v is not None), None)


def total(values: list[Any]) -> Any:
    numbers = [v for v in values if _is_number(v)]
    return sum(numbers) if numbers else first(values)


def largest(values: list[Any]) -> Any:
    numbers = [v for v in values if _is_number(v)]
    return max(numbers) if numbers else first(values)


def every(values: list[Any]) -> Any:
    """A flag true of the hub only when every worker that has it says so."""
    present = [v for v in values if v is not None]
    return all(present) if present else None


def _default(values: list[Any]) -> Any:
    """Numbers add up, flags are raised by any worker, dicts merge key by
    key, anything else (a string, a list) is worker 0's."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if all(_is_number(v) for v in present):
        return sum(present)
    if all(isinstance(v, bool) for v in present):
        return any(present)
    if all(isinstance(v, Mapping) for v in present):
        return _merge_dicts(present)
    return present[0]


def _rows_by(*identity: str, rules: Mapping[str, Merge] | None = None) -> Merge:
    """A list of dicts, one row per identity in the order rows first come,
    the rows of one identity merged field by field."""
    fields = {**dict.fromkeys(identity, first), **(rules or {})}

    def merge(lists: list[Any]) -> list[dict[str, Any]]:
        groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
        for rows in lists:
            for row in rows or ():
                groups.setdefault(tuple(row.get(name) for name in identity), []).append(row)
        return [_merge_dicts(rows, fields=fields) for rows in groups.values()]

    return merge


def _elementwise_sum(lists: list[Any]) -> list[Any]:
    present = [values for values in lists if values is not None]
    width = max((len(values) for values in present), default=0)
    return [sum(values[i] for values in present if i < len(values)) for i in range(width)]


# A key's state, rest and reading are shared through Redis and its priority
# and weight come from the one config: worker 0's. Its counters add up; its
# failures in a row are the closest worker's to opening the circuit.
KEY_ROW_RULES: dict[str, Merge] = {
    "state": first, "until": first, "priority": first, "weight": first, "headroom": first, "rests": first,
    "workspace": first, "org": first, "last_error": first,
    "consecutive_failures": largest,
}


def _key_rings(rings: list[Any]) -> dict[str, Any]:
    merge = _rows_by("label", rules=KEY_ROW_RULES)
    names: dict[str, None] = {}
    for ring in rings:
        names.update(dict.fromkeys(ring or {}))
    return {name: merge([ring.get(name) for ring in rings if ring]) for name in names}


# Paths into /stats (a "*" stands for any key) whose values do not add up.
STATS_RULES: dict[tuple[str, ...], Merge] = {
    ("version",): first,
    ("pid",): first,
    ("started_at",): first,
    ("uptime_s",): first,
    ("tokens_loaded",): first,
    ("loop_lag_s", "*"): largest,
    # A quantile of workers put together lies between the least and the
    # greatest of theirs: the greatest is an upper bound, replaced by the
    # exact value when the buckets are at hand (latency_summaries).
    ("latency_s", "*", "p50"): largest,
    ("latency_s", "*", "p90"): largest,
    ("latency_s", "*", "p99"): largest,
    ("latency_s", "*", "last_bound"): first,
    ("requests", "by_route"): _rows_by("route", "status", "outcome"),
    ("keys",): _key_rings,
    ("gc", "last_full_collection_ms"): largest,
    ("gc", "collections_by_generation"): _elementwise_sum,
    ("alerts", "targets"): _rows_by("alert", rules={"format": first, "events": first}),
    ("shared", "instances"): first,
    ("shared", "instance_id"): first,
    # Seconds the hub was degraded, not worker-seconds.
    ("shared", "degraded_seconds"): largest,
    # The hub hears every charge only when each of its workers does.
    ("shared", "following_charges"): every,
}


def _rule(path: tuple[str, ...], rules: Mapping[tuple[str, ...], Merge]) -> Merge | None:
    for pattern, merge in rules.items():
        if len(pattern) == len(path) and all(p in ("*", k) for p, k in zip(pattern, path)):
            return merge
    return None


def _merge_dicts(
    dicts: Sequence[Mapping[str, Any]], rules: Mapping[tuple[str, ...], Merge] | None = None,
    path: tuple[str, ...] = (), *, fields: Mapping[str, Merge] | None = None,
) -> dict[str, Any]:
    """Dicts merged key by key: by the rule of the key's path (`rules`), or
    of its name (`fields`, for the rows of a list), else by _default."""
    keys: dict[str, None] = {}
    for d in dicts:
        keys.update(dict.fromkeys(d))
    out: dict[str, Any] = {}
    for key in keys:
        values = [d.get(key) for d in dicts]
        here = (*path, key)
        merge = fields.get(key) if fields is not None else _rule(here, rules) if rules else None
        present = [v for v in values if v is not None]
        if merge is not None:
            out[key] = merge(values)
        elif present and all(isinstance(v, Mapping) for v in present):
            out[key] = _merge_dicts(present, rules, here)
        else:
            out[key] = _default(values)
    return out


def merge_stats(stats: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The /stats of a hub made of the workers' /stats, in worker order."""
    return _merge_dicts(stats, STATS_RULES)


# -- the dashboard's live view --------------------------------------------------------

# The in-flight requests the live view lists, oldest first; the rest are counted.
LIVE_REQUESTS_SHOWN = 50

# Fields of an upstream's live row that are the same in every worker (its
# config, and its keys' health, shared through Redis): worker 0's.
LIVE_UPSTREAM_RULES: dict[str, Merge] = {
    "kind": first, "priority": first, "health": first, "keys_usable": first, "next_available_s": first,
    "keys": _rows_by("label", rules=KEY_ROW_RULES),
}
LIVE_RULES: dict[tuple[str, ...], Merge] = {
    ("now",): largest,
    ("uptime_s",): first,
    ("loop_lag_s",): largest,
    ("upstreams",): _rows_by("name", rules=LIVE_UPSTREAM_RULES),
}


def merge_live(lives: Sequence[Mapping[str, Any] | None], shown: int) -> dict[str, Any]:
    """The live view (App.live) of a hub made of its workers', in worker
    order; None for a worker that did not answer in time. Counts add up;
    the requests in flight are every worker's, the oldest `shown` of them
    listed (each with its worker), the rest counted; `workers` says which
    answered, so the page can say whose requests are missing."""
    answered = [(index, live) for index, live in enumerate(lives) if live is not None]
    merged = _merge_dicts([live for _, live in answered], LIVE_RULES)
    running = [
        {**row, "worker": index} for index, live in answered for row in live.get("requests", ())
    ]
    running.sort(key=lambda row: row.get("age_s") or 0.0, reverse=True)
    hidden = sum(live.get("requests_not_shown", 0) for _, live in answered)
    merged["requests"] = running[:shown]
    merged["requests_not_shown"] = hidden + max(0, len(running) - shown)
    merged["workers"] = [
        {"index": index, "answered": live is not None, "in_flight": None if live is None else live.get("in_flight")}
        for index, live in enumerate(lives)
    ]
    return merged


# -- Prometheus text ----------------------------------------------------------------

# Families whose samples do not add up across workers, and how they merge.
METRIC_RULES: dict[str, Merge] = {
    "hubcore_build_info": first,
    "hubcore_start_time_seconds": first,
    "hubcore_uptime_seconds": first,
    "hubcore_tokens_loaded": first,
    "hubcore_shared_instances": first,
    "hubcore_key_info": first,
    "hubcore_key_state": first,
    "hubcore_key_unavailable_seconds": first,
    "hubcore_key_headroom_ratio": first,
    "hubcore_key_priority": first,
    "hubcore_key_weight": first,
    "hubcore_key_consecutive_failures": largest,
    "hubcore_event_loop_lag_seconds": largest,
    "hubcore_event_loop_lag_max_seconds": largest,
    "hubcore_gc_last_full_collection_seconds": largest,
    "hubcore_usage_writer_failing": largest,
    "hubcore_shared_degraded": largest,
    "hubcore_shared_degraded_seconds_total": largest,
}


class Family:
    """One metric family of an exposition: its HELP and TYPE lines and its
    samples, each keyed by its name and label text as written."""

    __slots__ = ("help", "name", "samples", "type")

    def __init__(self, name: str) -> None:
        self.name = name
        self.help: str | None = None
        self.type: str | None = None
        self.samples: dict[str, float] = {}


def parse_exposition(text: str) -> dict[str, Family]:
    """The families of a Prometheus text exposition (0.0.4) as hubcore
    writes it: HELP and TYPE before a family's samples, no timestamps."""
    families: dict[str, Family] = {}
    current: Family | None = None
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                current = families.get(parts[2]) or families.setdefault(parts[2], Family(parts[2]))
                rest = parts[3] if len(parts) > 3 else ""
                if parts[1] == "HELP":
                    current.help = rest
                else:
                    current.type = rest
            continue
        series, _, value = line.rpartition(" ")
        name = series.partition("{")[0]
        if current is None or not _belongs(name, current):
            current = families.get(name) or families.setdefault(name, Family(name))
        current.samples[series] = float(value)
    return families


def _belongs(sample: str, family: Family) -> bool:
    if sample == family.name:
        return True
    suffixes = ("_bucket", "_sum", "_count") if family.type == "histogram" else ()
    return any(sample == family.name + suffix for suffix in suffixes)


def merge_families(expositions: Sequence[Mapping[str, Family]]) -> dict[str, Family]:
    """Families of one name merged: each sample (name and labels) summed
    across the expositions, or merged by METRIC_RULES; families and samples
    in the order they first come."""
    out: dict[str, Family] = {}
    for families in expositions:
        for name, family in families.items():
            merged = out.get(name)
            if merged is None:
                merged = out[name] = Family(name)
                merged.help, merged.type = family.help, family.type
    for name, merged in out.items():
        merge = METRIC_RULES.get(name, total)
        series: dict[str, list[Any]] = {}
        for families in expositions:
            found = families.get(name)
            for key, value in (found.samples.items() if found is not None else ()):
                series.setdefault(key, []).append(value)
        merged.samples = {key: merge(values) for key, values in series.items()}
    return out


def render_families(families: Iterable[Family]) -> str:
    lines: list[str] = []
    for family in families:
        if family.help is not None:
            lines.append(f"# HELP {family.name} {family.help}")
        if family.type is not None:
            lines.append(f"# TYPE {family.name} {family.type}")
        lines += [f"{series} {format_value(value)}" for series, value in family.samples.items()]
    lines.append("")
    return "\n".join(lines)


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def gauge(name: str, help_text: str, samples: Mapping[str, float]) -> Family:
    """A family of the supervisor's own: `samples` maps label text
    ('worker="0"', or "" for none) to a value."""
    family = Family(name)
    family.help, family.type = help_text, "gauge"
    family.samples = {f"{name}{{{labels}}}" if labels else name: value for labels, value in samples.items()}
    return family


def counter(name: str, help_text: str, samples: Mapping[str, float]) -> Family:
    family = gauge(name, help_text, samples)
    family.type = "counter"
    return family


def merge_metrics(texts: Sequence[str]) -> dict[str, Family]:
    """The workers' /metrics texts as the hub's merged families."""
    return merge_families([parse_exposition(text) for text in texts])


# /stats' latency summaries and the histograms they are read from.
LATENCY_HISTOGRAMS = {
    "ttfb": "hubcore_ttfb_seconds",
    "total": "hubcore_request_duration_seconds",
    "hub_added": "hubcore_hub_added_seconds",
    "queue_wait": "hubcore_queue_wait_seconds",
}


def histogram_of(family: Family) -> Histogram | None:
    """The Histogram a merged histogram family describes; None when it has
    no buckets."""
    bounds: list[tuple[float, float]] = []
    prefix = f'{family.name}_bucket{{le="'
    for series, value in family.samples.items():
        if series.startswith(prefix):
            bounds.append((float(series[len(prefix):].rstrip('"}')), value))
    bounds.sort()
    finite = [(le, n) for le, n in bounds if not math.isinf(le)]
    if not finite:
        return None
    histogram = Histogram([le for le, _ in finite])
    previous = 0.0
    for i, (_, running) in enumerate(bounds):
        histogram.counts[i] = int(running - previous)
        previous = running
    histogram.count = int(family.samples.get(f"{family.name}_count", previous))
    histogram.sum = family.samples.get(f"{family.name}_sum", 0.0)
    return histogram


def latency_summaries(families: Mapping[str, Family]) -> dict[str, dict[str, Any]]:
    """/stats' latency summaries (Histogram.summary) of the merged buckets:
    quantiles of all the workers' requests together."""
    out = {}
    for name, metric in LATENCY_HISTOGRAMS.items():
        family = families.get(metric)
        histogram = histogram_of(family) if family is not None else None
        if histogram is not None:
            out[name] = histogram.summary()
    return out


# -- commands carried out by every worker -------------------------------------------

def merge_answers(answers: Sequence[tuple[int, int, Any]]) -> tuple[int, dict[str, Any]]:
    """One answer made of the workers' (index, status, JSON body) to a
    command each carried out: 200 only if every worker said 200, with
    worker 0's body, the flags that say a step was done ("ok", "stored",
    "audited") true only if true for all, a "generation" the oldest held,
    and the warnings of all; else the first failure's status with every
    failing worker's error. `workers` says what each answered."""
    workers = [{"index": index, "status": status, "answer": body} for index, status, body in answers]
    failed = [(index, status, body) for index, status, body in answers if status != 200]
    if failed:
        # The same refusal from each (no such key): said once, as a worker says it.
        errors = {_error_text(body) for _, _, body in failed}
        if len(failed) == len(answers) and len(errors) == 1:
            reply = dict(failed[0][2]) if isinstance(failed[0][2], Mapping) else {"error": errors.pop()}
        else:
            reply = {"error": "; ".join(f"worker {index}: {_error_text(body)}" for index, _, body in failed)}
        if any(isinstance(body, Mapping) and "ok" in body for _, _, body in answers):
            reply["ok"] = False
        reply["workers"] = workers
        return failed[0][1], reply
    bodies = [body for _, _, body in answers if isinstance(body, Mapping)]
    reply = dict(bodies[0]) if bodies else {}
    for flag in ("ok", "stored", "audited"):
        if any(flag in body for body in bodies):
            reply[flag] = all(body.get(flag, True) for body in bodies)
    generations = [body["generation"] for body in bodies if isinstance(body.get("generation"), int)]
    if generations:
        reply["generation"] = min(generations)
    messages = list(dict.fromkeys(str(body["message"]) for body in bodies if body.get("message")))
    if len(messages) > 1:
        reply["message"] = "; ".join(
            f"worker {index}: {body['message']}" for index, _, body in answers
            if isinstance(body, Mapping) and body.get("message"))
    warnings = list(dict.fromkeys(str(body["warning"]) for body in bodies if body.get("warning")))
    if warnings:
        reply["warning"] = "; ".join(warnings)
    reply["workers"] = workers
    return 200, reply


def _error_text(body: Any) -> str:
    if isinstance(body, Mapping):
        return str(body.get("error") or body.get("message") or dict(body))
    return str(body)
