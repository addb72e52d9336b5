"""How heads change on their way through the hub: the request head the
vendor gets (hop-by-hop headers out, the hub's key in) and the response head
the client gets (the framing the hub writes the body with). Pure functions
of plain values, returning the head's bytes.
"""
from __future__ import annotations

import enum
import math
import re
import time

import orjson

from hubcore.governance.limits import format_usd
from hubcore.http.server import status_line
from hubcore.http.wire import render_head

# Hop-by-hop headers (RFC 9110 7.6.1) and the ones the hub sets itself.
REQUEST_DROP = frozenset(
    {
        b"host", b"content-length", b"transfer-encoding", b"connection", b"keep-alive",
        b"proxy-connection", b"te", b"trailer", b"upgrade", b"expect",
        b"proxy-authorization", b"x-api-key", b"authorization", b"accept-encoding",
    }
)
RESPONSE_DROP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
        b"te", b"trailer", b"upgrade", b"content-length",
    }
)
# The hub reads what it meters: a compressed body would have to be inflated.
ACCEPT_IDENTITY = b"accept-encoding: identity\r\n"


def request_head(
    method: bytes,
    target: bytes,
    base_path: bytes,
    host_line: bytes,
    auth_line: bytes,
    headers: list[tuple[bytes, bytes]],
    control: list[tuple[bytes, bytes]] | None,
    body_size: int,
) -> bytes:
    """The head of a request as the vendor gets it: the client's target under
    the upstream's base path, the client's headers (lower-cased, in order)
    less the hop-by-hop ones and those named in Connection, then the
    upstream's Host and key lines, and the length of the body as the hub
    sends it (whole, never chunked). `control` holds the request's
    Transfer-Encoding, Expect and Connection headers (see wire.HeaderCollector)."""
    start = b"%s %s%s HTTP/1.1\r\n%s" % (method, base_path, target, host_line)
    drop: frozenset[bytes] | set[bytes] = REQUEST_DROP
    for name, value in control or ():
        if name == b"connection":
            # Headers named in Connection are hop-by-hop too (RFC 9110 7.6.1).
            named = {t.strip().lower() for t in value.split(b",")}
            if not named <= drop:
                drop = drop | named
    tail = auth_line + ACCEPT_IDENTITY
    if body_size or method == b"POST":
        tail += b"content-length: %d\r\n" % body_size
    return render_head(start, headers, drop, tail + b"\r\n")


# A JSON string (escapes included) or a bracket: everything between them is
# whitespace, punctuation, numbers and literals, which cannot hide either.
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\]]')
_WHITESPACE = b" \t\r\n"


def with_model(body: bytes, model: str) -> bytes | None:
    """`body` with the value of its top-level "model" replaced by `model`,
    every other byte as the client sent it; None when the body has no
    top-level "model" whose value is a string (it then goes as it is, and
    the vendor answers it). Every top-level "model" is replaced, should the
    key be repeated: parsers differ on which one counts."""
    spans: list[tuple[int, int]] = []
    depth = 0
    value_at = -1  # where the string value of a "model" key starts
    for token in _JSON_TOKEN.finditer(body):
        start = token.start()
        first = body[start]
        if first == 0x22:  # a string
            if start == value_at:
                spans.append((start, token.end()))
            elif depth == 1:
                after = _skip_whitespace(body, token.end())
                if after < len(body) and body[after] == 0x3A and _is_model_key(token.group()):
                    value_at = _skip_whitespace(body, after + 1)
        elif first == 0x7B or first == 0x5B:  # { [
            depth += 1
        else:
            depth -= 1
    if not spans:
        return None
    replacement = orjson.dumps(model)
    pieces = []
    done = 0
    for start, end in spans:
        pieces += [body[done:start], replacement]
        done = end
    pieces.append(body[done:])
    return b"".join(pieces)


def _skip_whitespace(body: bytes, i: int) -> int:
    n = len(body)
    while i < n and body[i] in _WHITESPACE:
        i += 1
    return i


def _is_model_key(token: bytes) -> bool:
    if token == b'"model"':
        return True
    # The same key spelled with escapes ("mod\u0065l").
    return b"\\" in token and orjson.loads(token) == "model"


class Framing(enum.Enum):
    """How the hub delimits a response body it passes on."""

    LENGTH = "length"            # the vendor's Content-Length, passed on
    CHUNKED = "chunked"          # chunked again, for an HTTP/1.1 client
    BODILESS = "bodiless"        # 204 and 304 end at their head
    UNTIL_CLOSE = "until-close"  # an HTTP/1.0 client: the body ends with the connection


# As module globals: an Enum class's attributes are looked up through
# EnumType.__getattr__'s slow hook (see exchange.py), on every response here.
_LENGTH, _CHUNKED, _BODILESS, _UNTIL_CLOSE = Framing.LENGTH, Framing.CHUNKED, Framing.BODILESS, Framing.UNTIL_CLOSE


def response_framing(status: int, content_length: int | None, client_http11: bool) -> Framing:
    """The framing of a response body with the vendor's `status` and
    `content_length` (None: chunked or close-delimited upstream)."""
    if content_length is not None:
        return _LENGTH
    if status == 204 or status == 304:
        # They end at their head (RFC 9112 6.3): framing a body for them
        # would put bytes on the wire the client reads as the start of the
        # next response.
        return _BODILESS
    if client_http11:
        return _CHUNKED
    return _UNTIL_CLOSE


def keeps_alive(framing: Framing, client_keep_alive: bool) -> bool:
    """Whether the client's connection can carry another request after this
    response (`client_keep_alive`: the client and the hub would keep it)."""
    return client_keep_alive and framing is not _UNTIL_CLOSE


def response_head(
    status: int,
    headers: list[tuple[bytes, bytes]],
    framing: Framing,
    content_length: int | None,
    keep_alive: bool,
    request_id: str,
    budget: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    """The head of the vendor's response as the client gets it: the vendor's
    headers less the hop-by-hop ones, then the hub's request id, the
    principal's `budget` headers (see budget_headers) when one applies, the
    body's framing and, unless `keep_alive`, `connection: close`."""
    tail = b"x-hubcore-request-id: " + request_id.encode() + b"\r\n"
    if budget is not None:
        tail += b"".join(b"%s: %s\r\n" % pair for pair in budget)
    if framing is _LENGTH:
        assert content_length is not None
        tail += b"content-length: %d\r\n" % content_length
    elif framing is _CHUNKED:
        tail += b"transfer-encoding: chunked\r\n"
    if not keep_alive:
        tail += b"connection: close\r\n"
    return render_head(status_line(status), headers, RESPONSE_DROP, tail + b"\r\n")


def budget_headers(remaining_micros: int, resets_at: float | None) -> list[tuple[bytes, bytes]]:
    """The headers that tell a client what is left of its tightest budget:
    `x-hubcore-budget-remaining` in US dollars as a plain decimal, exact
    (cents, or every digit down to the micro-dollar: "46.88", "0.004512"),
    and `x-hubcore-budget-resets`, RFC 3339 in UTC, unless it never resets
    by itself (a total budget)."""
    headers = [(b"x-hubcore-budget-remaining", format_usd(remaining_micros, symbol="", grouping=False).encode())]
    if resets_at is not None:
        global _spelt_resets
        if _spelt_resets[0] != resets_at:
            _spelt_resets = (resets_at, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(resets_at)).encode())
        headers.append((b"x-hubcore-budget-resets", _spelt_resets[1]))
    return headers


# The reset time last spelt: answers in a row mostly name the same one (the
# end of a day, week or month), and spelling it costs more than the rest
# of the two headers together (2 of 4 us).
_spelt_resets: tuple[float, bytes] = (math.nan, b"")
