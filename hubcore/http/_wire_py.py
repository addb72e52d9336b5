"""HTTP head handling on the hot path, the pure-Python twin of `_wire.pyx`.

httptools calls `on_header` once per header of every request and response:
about 45 calls per proxied request. `HeaderCollector` is that callback, and
`render_head` writes a head back out; the compiled twin does both without a
Python frame per header. The two twins behave the same (tests/http/test_wire.py
runs both); `hubcore.http.wire` picks one.
"""
from __future__ import annotations

# Headers that frame the message or manage the connection: noted as they
# come, and judged once the head is complete.
CONTROL = frozenset({b"transfer-encoding", b"expect", b"connection"})
# Names some servers read as these when they map "_" to "-" (CGI, WSGI): a
# vendor stack that did would frame the request differently from the hub.
FRAMING = frozenset({b"content-length", b"transfer-encoding", b"host"})


class HeaderList:
    """A message's headers, names lower-cased, in order (`headers`), read by
    name: `header(name)` is a name's first value, by a scan of the list
    until `index` (each name's first value) is asked for, which makes it
    once. A request's few lookups cost less as scans than hashing its
    twenty-odd names into a dict. Request and ResponseHead are such lists,
    and so is the collector that gathers them."""

    __slots__ = ("headers", "_index")

    headers: list[tuple[bytes, bytes]]
    _index: dict[bytes, bytes] | None

    @property
    def index(self) -> dict[bytes, bytes]:
        """Each name's first value, made on first use."""
        index = self._index
        if index is None:
            index = self._index = index_of(self.headers)
        return index

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower-case), or None."""
        if self._index is not None:
            return self._index.get(name)
        return first_value(self.headers, name)


class HeaderCollector(HeaderList):
    """Collects one message's headers (see HeaderList).

    Also keeps, as it goes: the head's size (each header counted as
    `name: value` plus CRLF), Content-Length as an int (-1 when absent), the
    Transfer-Encoding, Expect and Connection headers for the caller to judge,
    and how many Host headers came (RFC 9112 wants exactly one). `reset()`
    starts the next message; the previous message keeps the list it was
    given. `seal()` ends the head: fields after it (a chunked body's
    trailers) are counted in `size` but not kept, so they never pass as
    headers.
    """

    __slots__ = ("size", "content_length", "control", "hosts", "sealed")

    def __init__(self) -> None:
        self.headers = []
        self._index = None
        self.size = 0
        self.content_length = -1
        self.control: list[tuple[bytes, bytes]] | None = None
        self.hosts = 0
        self.sealed = False

    def reset(self) -> None:
        self.headers = []
        self._index = None
        self.size = 0
        self.content_length = -1
        self.control = None
        self.hosts = 0
        self.sealed = False

    def seal(self) -> None:
        self.sealed = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.size += len(name) + len(value) + 4
        if self.sealed:
            return
        name = name.lower()
        if name == b"content-length":
            # Digits only: llhttp has checked the value, and int() would
            # also take signs, spaces and underscores.
            if not value.isdigit() or len(value) > 18:
                raise ValueError(f"invalid Content-Length {value!r}")
            self.content_length = int(value)
        elif name in CONTROL:
            if self.control is None:
                self.control = []
            self.control.append((name, value))
        elif name == b"host":
            self.hosts += 1
        elif b"_" in name and name.replace(b"_", b"-").strip(b"-") in FRAMING:
            raise ValueError(f"header name {name!r} may be read as a framing header")
        self.headers.append((name, value))
        self._index = None


def first_value(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header `name` in `headers`, or None."""
    for n, value in headers:
        if n == name:
            return value
    return None


def index_of(headers: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """Each name in `headers` with its first value."""
    index: dict[bytes, bytes] = {}
    for name, value in headers:
        index.setdefault(name, value)
    return index


def render_head(start: bytes, headers: list[tuple[bytes, bytes]], drop: frozenset[bytes] | set[bytes], tail: bytes) -> bytes:
    """`start`, then `name: value` CRLF for every header whose name is not in
    `drop`, then `tail`, as one bytes object."""
    parts = [start]
    for name, value in headers:
        if name not in drop:
            parts.append(b"%s: %s\r\n" % (name, value))
    parts.append(tail)
    return b"".join(parts)
