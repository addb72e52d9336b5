"""/live: the hub now (requests in flight and open streams, requests per
second, each upstream's health, each vendor key's state, load and
rate-limit headroom) and the operator's key actions (enable, disable, and
reset: end the rests after 429s and close the circuit), each audited by the
hub; with their /api/v1 twins.

Everything comes from the running hub's memory on the loop (App.live and
App.keys: a walk of the open connections and the key rings), never from the
database; with several workers, each other worker's part is asked on its
ops socket (App.live_view). Only the rendering runs in a worker thread. The
page is whole without JavaScript (a refresh link); static/live.js fetches
/live/fragment, the same tables, every 2 s and patches them in.
"""
from __future__ import annotations

import asyncio
import time
from datetime import datetime
from html import escape
from typing import Any, Protocol
from urllib.parse import quote, unquote, urlencode
from zoneinfo import ZoneInfo

from hubcore.dashboard import pages, web
from hubcore.dashboard.web import Access, Request, Route
from hubcore.http.h11server import Reply

REFRESH_SECONDS = 2  # live.js's interval, said on the page
FRAGMENT = "/live/fragment"
ACTIONS = ("enable", "disable", "reset")
_DONE = {"enable": "enabled", "disable": "disabled", "reset": "reset"}


class Switched(Protocol):
    """What enabling or disabling a key did (ops.server.KeySwitched)."""

    @property
    def states(self) -> dict[str, str]: ...
    @property
    def not_stored(self) -> str | None: ...


class Reset(Protocol):
    """What resetting a key did (ops.server.KeyReset)."""

    @property
    def states(self) -> dict[str, str]: ...
    @property
    def not_audited(self) -> str | None: ...


class LiveHub(Protocol):
    """What this view asks of the running hub (hubcore.app.App)."""

    async def live_view(self) -> dict[str, Any]: ...
    def keys(self) -> list[dict[str, Any]]: ...
    async def set_key_enabled(
        self, label: str, enabled: bool, *, actor: str = ..., origin: str = ...,
    ) -> Switched | None: ...
    async def reset_key(self, label: str, *, actor: str = ..., origin: str = ...) -> Reset | None: ...


def _hub(request: Request) -> LiveHub | None:
    hub: LiveHub | None = request.server.hub
    return hub


def _no_hub(request: Request) -> Reply:
    message = "this dashboard runs without a hub: nothing is live"
    if request.wants_json:
        return web.api_error(503, message, "api_error")
    return web.html(pages.message_page("No hub", message), 503)


# -- the key actions ---------------------------------------------------------------


async def _act(hub: LiveHub, request: Request, label: str, action: str) -> dict[str, Any] | None:
    """Apply `action` to the key `label` in every upstream that has one, as
    the ops socket's /keys/{label}/{action} does, audited under the
    request's actor and origin; its answer in the ops socket's shape, or None
    when no upstream has such a key."""
    if action == "reset":
        reset = await hub.reset_key(label, actor=request.actor, origin=request.origin)
        if reset is None:
            return None
        answer: dict[str, Any] = {"label": label, "states": reset.states, "audited": reset.not_audited is None}
        if reset.not_audited is not None:
            answer["warning"] = f"not audited ({reset.not_audited}): the audit trail misses this reset"
        return answer
    enabled = action == "enable"
    switched = await hub.set_key_enabled(label, enabled, actor=request.actor, origin=request.origin)
    if switched is None:
        return None
    answer = {"label": label, "enabled": enabled, "states": switched.states, "stored": switched.not_stored is None}
    if switched.not_stored is not None:
        answer["warning"] = f"not stored ({switched.not_stored}): a restart forgets this change"
    return answer


def _key_action(action: str, *, api: bool) -> web.Handler:
    async def handler(request: Request) -> Reply:
        hub = _hub(request)
        if hub is None:
            return _no_hub(request)
        label = unquote(request.path_params["label"])
        answer = await _act(hub, request, label, action)
        if answer is None:
            message = f"no key labelled {label!r}"
            if api:
                return web.api_error(404, message)
            return web.html(_page_message(request, "No such key", message), 404)
        if api:
            return web.json_reply(answer)
        query = {"key": label, "did": action}
        if "warning" in answer:
            query["warning"] = "stored" if action != "reset" else "audited"
        return web.redirect("/live?" + urlencode(query))

    return handler


# -- pages and API -------------------------------------------------------------------


async def live_api(request: Request) -> Reply:
    hub = _hub(request)
    if hub is None:
        return _no_hub(request)
    return web.json_reply({**await hub.live_view(), "timezone": web.zone_of(request).key})


async def keys_api(request: Request) -> Reply:
    hub = _hub(request)
    if hub is None:
        return _no_hub(request)
    return web.json_reply({"keys": hub.keys()})


async def live_page(request: Request) -> Reply:
    hub = _hub(request)
    if hub is None:
        return _no_hub(request)
    live = await hub.live_view()
    tz = web.zone_of(request)
    assert request.operator is not None
    operator, csrf, flash = request.operator, request.csrf, _flash(request)

    def render() -> str:
        body = (
            "<h1>Live</h1>"
            f"{flash}"
            "<p class=\"live-note\"><span id=\"live-auto\">These figures are as of the time shown.</span> "
            "<a id=\"live-refresh\" href=\"/live\">Refresh</a></p>"
            f"<div id=\"live\" data-source=\"{FRAGMENT}\" data-interval=\"{REFRESH_SECONDS}\">"
            f"{render_fragment(live, csrf, tz)}</div>"
        )
        return pages.operator_page(title="Live", active="/live", operator=operator, csrf=csrf, tz=tz,
                                   now=live["now"], body=body, scripts=["live.js"])

    return web.html(await asyncio.to_thread(render))


async def live_fragment(request: Request) -> Reply:
    """The live page's tables alone: what live.js fetches to refresh them."""
    hub = _hub(request)
    if hub is None:
        return _no_hub(request)
    live = await hub.live_view()
    html = await asyncio.to_thread(render_fragment, live, request.csrf, web.zone_of(request))
    return web.html(html)


def _flash(request: Request) -> str:
    """The word on the action just taken (after its redirect): the key and
    what was done; the table shows the state it is in now."""
    did, label = request.query.get("did"), request.query.get("key")
    if did not in _DONE or not label:
        return ""
    text = f"Key {label} {_DONE[did]}."
    warning = request.query.get("warning")
    if warning == "stored":
        text += " The hub could not store the change: a restart forgets it."
    elif warning == "audited":
        text += " The hub could not write its audit row."
    return f"<p class=\"flash\" role=\"status\" id=\"live-flash\">{escape(text)}</p>"


def _page_message(request: Request, title: str, text: str) -> str:
    assert request.operator is not None
    tz = web.zone_of(request)
    body = f"<h1>{escape(title)}</h1><p>{escape(text)}</p><p><a href=\"/live\">Back to the live view</a></p>"
    return pages.operator_page(title=title, active="/live", operator=request.operator, csrf=request.csrf,
                               tz=tz, now=time.time(), body=body)


# -- rendering -------------------------------------------------------------------------


def render_fragment(live: dict[str, Any], csrf: str, tz: ZoneInfo) -> str:
    """The live tables: traffic, upstreams, keys (with their actions), and
    the requests in flight. Times in `tz`, whose name the page's header shows."""
    now = live["now"]
    return (
        _traffic(live, tz)
        + _upstreams(live["upstreams"], now)
        + _keys(live["upstreams"], csrf, tz, now)
        + _requests(live["requests"], live["requests_not_shown"])
    )


def _figure(ident: str, title: str, value: str) -> str:
    return f"<div><dt>{escape(title)}</dt><dd id=\"{ident}\">{escape(value)}</dd></div>"


def _traffic(live: dict[str, Any], tz: ZoneInfo) -> str:
    moment = datetime.fromtimestamp(live["now"], tz)
    draining = "<p class=\"warning\" id=\"draining\">The hub is shutting down: draining its requests.</p>" \
        if live["draining"] else ""
    # With several workers (App.live_view): the figures are every worker's
    # that answered; one that did not is named, its requests missing here.
    missing = [str(w["index"]) for w in live.get("workers", ()) if not w["answered"]]
    if missing:
        draining += (
            f"<p class=\"warning\" id=\"workers-missing\">Worker{'s' if len(missing) > 1 else ''} "
            f"{escape(', '.join(missing))} did not answer in time: "
            f"{'their' if len(missing) > 1 else 'its'} requests are not counted here.</p>"
        )
    return (
        "<section id=\"live-traffic\"><h2>Traffic <span class=\"as-of\">as of "
        f"<time id=\"live-as-of\" datetime=\"{escape(moment.isoformat(timespec='seconds'))}\">"
        f"{escape(moment.strftime('%H:%M:%S'))}</time></span></h2><dl class=\"figures\">"
        + _figure("in-flight", "In flight", str(live["in_flight"]))
        + _figure("open-streams", "Open streams", str(live["streams"]))
        + _figure("rate-10s", "Requests/s, last 10 s", f"{live['rate_10s']:.2f}")
        + _figure("rate-60s", "Requests/s, last minute", f"{live['rate_60s']:.2f}")
        + _figure("requests-total", "Requests since start", str(live["requests_total"]))
        + _figure("connections-open", "Client connections", str(live["connections_open"]))
        + f"</dl>{draining}</section>"
    )


def _counts(counts: dict[str, int]) -> str:
    return " · ".join(f"{name} {n}" for name, n in counts.items()) or "-"


def _upstreams(upstreams: list[dict[str, Any]], now: float) -> str:
    rows = []
    for up in upstreams:
        health = up["health"]
        text = health
        if health == "down" and up["next_available_s"] is not None:
            text = f"down: a key may take requests in {_duration(up['next_available_s'])}"
        elif health == "down":
            text = "down: no key takes requests"
        connections = up["connections"]
        rows.append(
            f"<tr data-row=\"upstream {escape(up['name'])}\" data-upstream=\"{escape(up['name'])}\" "
            f"data-health=\"{escape(health)}\">"
            f"<th scope=\"row\">{escape(up['name'])}</th><td>{escape(up['kind'])}</td>"
            f"<td><span class=\"health health-{escape(health.replace(' ', '-'))}\">{escape(text)}</span></td>"
            f"<td class=\"num\">{up['keys_usable']} of {len(up['keys'])}</td>"
            f"<td class=\"num\" data-field=\"in_flight\">{up['in_flight']}</td>"
            f"<td class=\"num\" data-field=\"attempts\">{up['attempts']}</td>"
            f"<td>{escape(_counts(up['answers']))}</td><td>{escape(_counts(up['errors']))}</td>"
            f"<td>{connections['busy']} busy, {connections['idle']} idle</td></tr>"
        )
    if not rows:
        return "<section id=\"live-upstreams\"><h2>Upstreams</h2><p>No upstreams are configured.</p></section>"
    return (
        "<section id=\"live-upstreams\"><h2>Upstreams</h2><table id=\"upstreams\"><thead><tr>"
        "<th>Upstream</th><th>Kind</th><th>Health</th><th>Keys in service</th><th>In flight</th>"
        "<th>Attempts</th><th>Answers</th><th>Errors</th><th>Connections</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def _keys(upstreams: list[dict[str, Any]], csrf: str, tz: ZoneInfo, now: float) -> str:
    rows = []
    for up in upstreams:
        for key in up["keys"]:
            label = key["label"]
            rows.append(
                f"<tr data-row=\"key {escape(up['name'])} {escape(label)}\" data-upstream=\"{escape(up['name'])}\" "
                f"data-key=\"{escape(label)}\" data-state=\"{escape(key['state'])}\">"
                f"<td>{escape(up['name'])}</td><th scope=\"row\">{escape(label)}</th>"
                f"<td class=\"state-cell\">{_state(key, tz, now)}</td>"
                f"<td class=\"num\" data-field=\"in_flight\">{key['in_flight']}</td>"
                f"<td class=\"num\" data-field=\"requests\">{key['requests']}</td>"
                f"<td class=\"num\" data-field=\"rate_limited\">{key['rate_limited']}</td>"
                f"<td class=\"num\" data-field=\"errors\">{key['errors']}</td>"
                f"<td class=\"num\" data-field=\"consecutive_failures\">{key['consecutive_failures']}</td>"
                f"<td>{_headroom(key, tz, now)}</td>"
                f"<td class=\"last-error\">{escape(key['last_error'] or '-')}</td>"
                f"<td class=\"actions\">{_actions(key, csrf)}</td></tr>"
            )
    if not rows:
        return "<section id=\"live-keys\"><h2>Vendor keys</h2><p>No vendor keys are loaded.</p></section>"
    return (
        "<section id=\"live-keys\"><h2>Vendor keys</h2>"
        "<p class=\"hint\">An action applies to the key with that label in every upstream that has one, "
        "and is recorded in the audit trail.</p>"
        "<div class=\"scroll\"><table id=\"keys\"><thead><tr><th>Upstream</th><th>Key</th><th>State</th>"
        "<th>In flight</th><th>Requests</th><th>429s</th><th>Errors</th><th>Failures in a row</th>"
        "<th>Rate-limit headroom</th><th>Last error</th><th>Actions</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div></section>"
    )


# A key's state as the page words it: (badge class, text); {until} is the
# end of the rest or of the circuit's pause.
_STATES = {
    "healthy": ("ok", "ok"),
    "cooling": ("cooling", "cooling until {until}"),
    "open": ("open", "circuit open until {until}"),
    "half_open": ("open", "circuit open: probe due"),
    "probing": ("open", "circuit open: probing"),
    "dead": ("dead", "dead: the vendor refused it"),
    "disabled": ("disabled", "disabled"),
}
_RESETTABLE = frozenset({"cooling", "open", "half_open", "probing"})


def _state(key: dict[str, Any], tz: ZoneInfo, now: float) -> str:
    state = key["state"]
    badge, text = _STATES.get(state, ("other", state))
    until = key["until"]
    text = text.format(until=_until(until, tz, now) if until is not None else "-")
    parts = [f"<span class=\"state state-{badge}\">{escape(text)}</span>"]
    for model_class, rest_until in sorted(key["rests"].items()):
        parts.append(
            f"<span class=\"rest\" data-class=\"{escape(model_class)}\">{escape(model_class)} cooling until "
            f"{escape(_until(rest_until, tz, now))}</span>"
        )
    return "".join(parts)


def _headroom(key: dict[str, Any], tz: ZoneInfo, now: float) -> str:
    readings = sorted(key["headroom"].items())
    if not readings:
        return "<span class=\"none\">no reading</span>"
    parts = []
    for model_class, reading in readings:
        remaining = float(reading["remaining"])
        percent = f"{remaining * 100:.1f}%" if 0 < remaining < 0.01 else f"{remaining * 100:.0f}%"
        parts.append(
            f"<div class=\"room\" data-class=\"{escape(model_class)}\" data-remaining=\"{remaining:.4f}\">"
            f"<meter min=\"0\" max=\"1\" low=\"0.1\" high=\"0.5\" optimum=\"1\" value=\"{remaining:.4f}\">"
            f"{escape(percent)}</meter> {escape(model_class or 'any model')} {escape(percent)} of "
            f"{escape(str(reading.get('limit', '?')))}, "
            f"resets {escape(_clock(float(reading['resets']), tz, now))}</div>"
        )
    return "".join(parts)


def _actions(key: dict[str, Any], csrf: str) -> str:
    label, state = key["label"], key["state"]
    path = f"/live/keys/{quote(label, safe='')}"
    every = f"in every upstream with a key labelled {label}"

    def form(action: str, text: str, title: str) -> str:
        return (
            f"<form method=\"post\" action=\"{escape(path)}/{action}\" class=\"key-action\">"
            f"{pages.csrf_field(csrf)}<button type=\"submit\" class=\"{action}\" title=\"{escape(title)}\">"
            f"{escape(text)}</button></form>"
        )

    if state in ("dead", "disabled"):
        forms = [form("enable", "Enable", f"put it back in service, {every}")]
    else:
        forms = [form("disable", "Disable", f"take it out of service until enabled, {every}")]
    if state in _RESETTABLE or key["rests"] or key["consecutive_failures"]:
        forms.append(form("reset", "Reset cooldown / close circuit",
                          f"end its rests after 429s and close its circuit, {every}"))
    return "".join(forms)


_PHASES = {
    "admitting": "admitting", "sending": "sending", "awaiting_head": "waiting for the vendor",
    "holding_head": "answer starting", "streaming": "answering", "finishing": "finishing",
}


def _requests(requests: list[dict[str, Any]], not_shown: int) -> str:
    if not requests:
        return ("<section id=\"live-requests\"><h2>Requests in flight</h2>"
                "<p id=\"requests-none\">No requests in flight.</p></section>")
    rows = "".join(
        f"<tr data-row=\"request {escape(r['id'])}\" data-phase=\"{escape(r['phase'])}\" "
        f"data-stream=\"{'1' if r['stream'] else '0'}\">"
        f"<td><code>{escape(r['id'])}</code></td><td>{escape(r['user'] or '-')}</td>"
        f"<td>{escape(r['project'] or '-')}</td><td>{escape(r['model'] or '-')}</td>"
        f"<td>{escape(r['upstream'] or '-')}</td><td>{escape(r['key'] or '-')}</td>"
        f"<td>{escape(_PHASES.get(r['phase'], r['phase']))}</td><td>{'stream' if r['stream'] else '-'}</td>"
        f"<td class=\"num\">{escape(_duration(r['age_s']))}</td></tr>"
        for r in requests
    )
    more = f"<p id=\"requests-more\">And {not_shown} more, not listed.</p>" if not_shown else ""
    return (
        "<section id=\"live-requests\"><h2>Requests in flight</h2><table id=\"requests\"><thead><tr>"
        "<th>Request</th><th>User</th><th>Project</th><th>Model</th><th>Upstream</th><th>Key</th>"
        f"<th>Phase</th><th>Stream</th><th>Running for</th></tr></thead><tbody>{rows}</tbody></table>{more}</section>"
    )


def _clock(ts: float, tz: ZoneInfo, now: float) -> str:
    """A time of day in `tz`; with its date when a day or more away."""
    shape = "%Y-%m-%d %H:%M" if abs(ts - now) >= 86400 else "%H:%M:%S"
    return datetime.fromtimestamp(ts, tz).strftime(shape)


def _until(ts: float, tz: ZoneInfo, now: float) -> str:
    return f"{_clock(ts, tz, now)} ({_duration(max(0.0, ts - now))} left)"


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 120:
        return f"{minutes:.0f} min"
    return f"{minutes / 60:.1f} h"


_LABEL = {"name": "label", "in": "path", "required": True, "schema": {"type": "string"},
          "description": "the key's label (percent-encode a /)"}
_NOT_FOUND = {"404": {"$ref": "#/components/responses/Error"}}
_API_ACTIONS = {
    "enable": ("Put a vendor key back in service (a dead key too), in every upstream with that label",
               "label, enabled, states (upstream -> state after), stored; warning when not stored"),
    "disable": ("Take a vendor key out of service until it is enabled, in every upstream with that label",
                "label, enabled, states (upstream -> state after), stored; warning when not stored"),
    "reset": ("End a vendor key's rests after 429s and close its circuit, in every upstream with that label "
              "(a dead or disabled key stays so)",
              "label, states (upstream -> state after), audited; warning when not audited"),
}

ROUTES = [
    Route("GET", "/live", live_page, Access.OPERATOR),
    Route("GET", FRAGMENT, live_fragment, Access.OPERATOR),
    *(Route("POST", f"/live/keys/{{label}}/{action}", _key_action(action, api=False), Access.OPERATOR)
      for action in ACTIONS),
    Route("GET", "/api/v1/live", live_api, Access.OPERATOR, api={
        "summary": "The hub now: traffic, requests in flight, upstreams' health and their keys",
        "tags": ["live"],
        "responses": {"200": {"description": (
            "in_flight, streams, rate_10s, rate_60s, requests_total, connections_open, requests (the oldest "
            "in flight) and requests_not_shown, upstreams (health, counters, keys as `hubcore keys --json` "
            "without upstream), timezone")}},
    }),
    Route("GET", "/api/v1/keys", keys_api, Access.OPERATOR, api={
        "summary": "Every vendor key's state, load and rate-limit headroom",
        "tags": ["keys"],
        "responses": {"200": {"description": "keys: the rows of `hubcore keys --json`"}},
    }),
    *(Route("POST", f"/api/v1/keys/{{label}}/{action}", _key_action(action, api=True), Access.OPERATOR, api={
        "summary": summary,
        "tags": ["keys"],
        "parameters": [_LABEL],
        "responses": {"200": {"description": answer}, **_NOT_FOUND},
    }) for action, (summary, answer) in _API_ACTIONS.items()),
]
