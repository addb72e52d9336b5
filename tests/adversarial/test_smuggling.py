"""A request smuggling corpus: every framing a front end and a back end might
read differently, each followed by a second request that must never reach
the vendor unless the hub answered it as a request of its own.

The hub re-frames what it forwards (its own Content-Length, no
Transfer-Encoding), so the vendor cannot be desynchronised by a body; what
must hold is that an ambiguous head is refused outright, and that whatever
the hub does accept, it answers and forwards one for one.
"""
from __future__ import annotations

import pytest

from tests.adversarial.conftest import assert_alive, exchange, request, statuses, vendor_answered
from tests.fakevendor import FakeVendor
from tests.hubharness import HubThread

SMUGGLED_MARK = b"x-smuggled: yes\r\n"

# Framing that must be refused (400-class) with nothing forwarded: the
# headers after the request line and the fixed headers, then the body bytes.
REFUSE: dict[str, bytes] = {
    "cl-te": b"content-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-cl": b"transfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n0\r\n\r\n",
    "cl-te-zero": b"content-length: 0\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    "duplicate-cl-equal": b"content-length: 2\r\ncontent-length: 2\r\n\r\n{}",
    "duplicate-cl-differ": b"content-length: 2\r\ncontent-length: 40\r\n\r\n{}",
    "duplicate-cl-zero": b"content-length: 0\r\ncontent-length: 2\r\n\r\n{}",
    "cl-list": b"content-length: 2, 2\r\n\r\n{}",
    "cl-list-differ": b"content-length: 2, 3\r\n\r\n{}",
    "cl-plus": b"content-length: +2\r\n\r\n{}",
    "cl-minus": b"content-length: -2\r\n\r\n{}",
    "cl-hex": b"content-length: 0x2\r\n\r\n{}",
    "cl-suffix": b"content-length: 2x\r\n\r\n{}",
    "cl-underscore": b"content-length: 1_0\r\n\r\n{}",
    "cl-huge": b"content-length: 99999999999999999999999\r\n\r\n{}",
    "cl-space-in-name": b"content length: 2\r\n\r\n{}",
    "cl-space-before-colon": b"content-length : 2\r\n\r\n{}",
    "cl-empty": b"content-length: \r\n\r\n{}",
    "cl-vtab": b"content-length: \x0b2\r\n\r\n{}",
    "cl-nul": b"content-length: 2\x00\r\n\r\n{}",
    "te-space-before-colon": b"transfer-encoding : chunked\r\n\r\n0\r\n\r\n",
    "te-tab-before-colon": b"transfer-encoding\t: chunked\r\n\r\n0\r\n\r\n",
    "te-identity": b"transfer-encoding: identity\r\n\r\n0\r\n\r\n",
    "te-identity-cl": b"transfer-encoding: identity\r\ncontent-length: 2\r\n\r\n{}",
    "te-gzip": b"transfer-encoding: gzip\r\n\r\n0\r\n\r\n",
    "te-gzip-chunked": b"transfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "te-chunked-gzip": b"transfer-encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "te-chunked-identity": b"transfer-encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "te-chunked-chunked": b"transfer-encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
    "te-twice": b"transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-twice-other": b"transfer-encoding: chunked\r\ntransfer-encoding: x\r\n\r\n0\r\n\r\n",
    "te-xchunked": b"transfer-encoding: xchunked\r\n\r\n0\r\n\r\n",
    "te-chunk": b"transfer-encoding: chunk\r\n\r\n0\r\n\r\n",
    "te-quoted": b'transfer-encoding: "chunked"\r\n\r\n0\r\n\r\n',
    "te-vtab": b"transfer-encoding: \x0bchunked\r\n\r\n0\r\n\r\n",
    "te-formfeed": b"transfer-encoding: \x0cchunked\r\n\r\n0\r\n\r\n",
    "te-nul": b"transfer-encoding: chunked\x00\r\n\r\n0\r\n\r\n",
    "te-obs-fold": b"transfer-encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
    "te-obs-fold-tab": b"transfer-encoding: x\r\n\tchunked\r\n\r\n0\r\n\r\n",
    "te-cr-only": b"transfer-encoding: chunked\r\r\n\r\n0\r\n\r\n",
    "te-underscore-name": b"transfer_encoding: chunked\r\ncontent-length: 5\r\n\r\n0\r\n\r\n",
    "cl-underscore-name": b"content_length: 40\r\ncontent-length: 2\r\n\r\n{}",
    "te-underscore-mixed-case": b"Transfer_Encoding: chunked\r\ncontent-length: 5\r\n\r\n0\r\n\r\n",
    "host-underscore-name": b"x-a: b\r\nhost_: evil\r\nho_st: evil\r\ncontent-length: 2\r\n\r\n{}",
    "obs-fold": b"x-folded: a\r\n b\r\ncontent-length: 2\r\n\r\n{}",
    "obs-fold-tab": b"x-folded: a\r\n\tb\r\ncontent-length: 2\r\n\r\n{}",
    "header-without-colon": b"x-no-colon\r\ncontent-length: 2\r\n\r\n{}",
    "header-cr-in-value": b"x-cr: a\rb\r\ncontent-length: 2\r\n\r\n{}",
    "header-nul-in-name": b"x-n\x00ul: a\r\ncontent-length: 2\r\n\r\n{}",
    "header-space-in-name": b"x bad: a\r\ncontent-length: 2\r\n\r\n{}",
    "header-leading-space": b" x-lead: a\r\ncontent-length: 2\r\n\r\n{}",
    "chunk-size-hex-prefix": b"transfer-encoding: chunked\r\n\r\n0x2\r\n{}\r\n0\r\n\r\n",
    "chunk-size-negative": b"transfer-encoding: chunked\r\n\r\n-2\r\n{}\r\n0\r\n\r\n",
    "chunk-size-overflow": b"transfer-encoding: chunked\r\n\r\nfffffffffffffffff2\r\n{}\r\n0\r\n\r\n",
    "chunk-size-space": b"transfer-encoding: chunked\r\n\r\n2 2\r\n{}\r\n0\r\n\r\n",
    "chunk-missing-crlf": b"transfer-encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n",
    "chunk-data-too-long": b"transfer-encoding: chunked\r\n\r\n1\r\n{}\r\n0\r\n\r\n",
    "chunk-size-empty": b"transfer-encoding: chunked\r\n\r\n\r\n{}\r\n0\r\n\r\n",
    "chunk-size-not-hex": b"transfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
}

# Request lines that must be refused outright.
REFUSE_LINES: dict[str, bytes] = {
    "http-1.2": b"POST /v1/messages HTTP/1.2\r\n",
    "http-2.0": b"POST /v1/messages HTTP/2.0\r\n",
    "http-0.9": b"POST /v1/messages\r\n",
    "lower-version": b"POST /v1/messages http/1.1\r\n",
    "tab-separator": b"POST\t/v1/messages HTTP/1.1\r\n",
    "trailing-space": b"POST /v1/messages HTTP/1.1 \r\n",
    "method-lower": b"post /v1/messages HTTP/1.1\r\n",
    "method-unknown": b"BREW /v1/messages HTTP/1.1\r\n",
    "method-empty": b" /v1/messages HTTP/1.1\r\n",
    "target-nul": b"POST /v1/mess\x00ages HTTP/1.1\r\n",
    "target-space": b"POST /v1/mess ages HTTP/1.1\r\n",
    "connect": b"CONNECT api.anthropic.com:443 HTTP/1.1\r\n",
}

# Framing that is unusual but well-defined: the hub may accept it, and then
# must answer and forward one for one.
EITHER: dict[str, bytes] = {
    "chunked": b"transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "chunked-upper": b"transfer-encoding: CHUNKED\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "chunked-padded": b"transfer-encoding:   chunked   \r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "chunk-extension": b"transfer-encoding: chunked\r\n\r\n2;name=value\r\n{}\r\n0\r\n\r\n",
    "chunk-extension-quoted": b'transfer-encoding: chunked\r\n\r\n2;a="b;c"\r\n{}\r\n0\r\n\r\n',
    "chunk-upper-hex": b"transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "chunk-leading-zeros": b"transfer-encoding: chunked\r\n\r\n0002\r\n{}\r\n0\r\n\r\n",
    "chunked-trailer": b"transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nx-trailer: smuggled\r\n\r\n",
    "chunked-trailer-cl": b"transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\ncontent-length: 50\r\n\r\n",
    "cl-leading-zeros": b"content-length: 0002\r\n\r\n{}",
    "cl-upper-name": b"CONTENT-LENGTH: 2\r\n\r\n{}",
    "cl-padded": b"content-length:    2   \r\n\r\n{}",
    "cl-zero": b"content-length: 0\r\n\r\n",
    "no-body-framing": b"\r\n",
    "connection-close": b"connection: close\r\ncontent-length: 2\r\n\r\n{}",
    "connection-names-auth": b"connection: x-api-key\r\ncontent-length: 2\r\n\r\n{}",
    "connection-names-cl": b"connection: content-length\r\ncontent-length: 2\r\n\r\n{}",
    "keep-alive-header": b"connection: keep-alive\r\nkeep-alive: timeout=5\r\ncontent-length: 2\r\n\r\n{}",
    "expect-continue": b"expect: 100-continue\r\ncontent-length: 2\r\n\r\n{}",
    "expect-other": b"expect: 200-ok\r\ncontent-length: 2\r\n\r\n{}",
    "upgrade-h2c": b"connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQCAAAAAAIAAAAA\r\ncontent-length: 2\r\n\r\n{}",
    "upgrade-websocket": b"connection: upgrade\r\nupgrade: websocket\r\ncontent-length: 2\r\n\r\n{}",
    "bare-lf-headers": b"content-length: 2\n\n{}",
    "host-twice": b"host: other\r\ncontent-length: 2\r\n\r\n{}",
    "long-header": b"x-long: " + b"a" * 8000 + b"\r\ncontent-length: 2\r\n\r\n{}",
    "many-headers": b"".join(b"x-h%d: v\r\n" % i for i in range(200)) + b"content-length: 2\r\n\r\n{}",
    "absolute-form": b"content-length: 2\r\n\r\n{}",
    "two-spaces": b"content-length: 2\r\n\r\n{}",
    "header-underscore-other": b"x_custom_header: 1\r\ncontent-length: 2\r\n\r\n{}",
    "header-empty-value": b"x-empty:\r\ncontent-length: 2\r\n\r\n{}",
}


def case_bytes(token: str, framing: bytes, line: bytes = b"POST /v1/messages HTTP/1.1\r\n") -> bytes:
    smuggled = request(token, extra=SMUGGLED_MARK)
    return (line + b"host: hub\r\nx-api-key: " + token.encode()
            + b"\r\nanthropic-version: 2023-06-01\r\n" + framing + smuggled)


def vendor_requests_after(vendor: FakeVendor, before: int) -> list:
    vendor.wait_idle()
    return vendor.requests[before:]


CASES = (
    [(f"refuse-{name}", "refuse", framing, None) for name, framing in REFUSE.items()]
    + [(f"refuse-line-{name}", "refuse", b"content-length: 2\r\n\r\n{}", line) for name, line in REFUSE_LINES.items()]
    + [(f"either-{name}", "either", framing, None) for name, framing in EITHER.items()]
)


def test_the_corpus_is_large() -> None:
    assert len(CASES) >= 98


@pytest.mark.parametrize(("name", "expect", "framing", "line"), CASES, ids=[c[0] for c in CASES])
def test_smuggling_case(module_hub: HubThread, module_vendor: FakeVendor, module_token: str,
                        name: str, expect: str, framing: bytes, line: bytes | None) -> None:
    before = len(module_vendor.requests)
    if name == "either-absolute-form":
        line = b"POST http://hub/v1/messages HTTP/1.1\r\n"
    elif name == "either-two-spaces":
        line = b"POST  /v1/messages HTTP/1.1\r\n"
    received = exchange(module_hub.port, case_bytes(module_token, framing, line or b"POST /v1/messages HTTP/1.1\r\n"))
    answers = statuses(received)
    forwarded = vendor_requests_after(module_vendor, before)
    module_vendor.check()  # the hub never sent the vendor malformed HTTP
    assert answers, f"no answer at all: {received[:200]!r}"
    if expect == "refuse":
        assert 400 <= answers[0] < 500 or answers[0] == 505, answers
        assert forwarded == [], [r.target for r in forwarded]
    else:
        # Every request that reached the vendor was answered as a request of
        # its own: the vendor's answers match what reached it.
        assert len(forwarded) == vendor_answered(received), (answers, [r.target for r in forwarded])
        smuggled = [r for r in forwarded if ("x-smuggled", "yes") in r.headers]
        assert len(smuggled) <= max(0, len(answers) - 1)
    for r in forwarded:
        assert r.target == "/v1/messages"
        assert not any(n.lower() in ("transfer-encoding", "x-trailer") for n, _ in r.headers)
    assert_alive(module_hub.port, module_token)
