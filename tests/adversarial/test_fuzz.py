"""A bounded, seeded fuzz of request bytes: valid requests mutated at the
byte level (flips, insertions of the bytes that matter to HTTP framing,
deletions, duplications, truncations), each sent on its own connection.
The hub must answer or close every one, never log a handler failure, never
send the vendor malformed HTTP or a path outside the routes, and keep
serving. Reproducible: the seed is fixed, and a failure names its case."""
from __future__ import annotations

import random
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

from hubcore.gateway.routes import route_for
from tests.adversarial.conftest import PLAIN_BODY, assert_alive, request
from tests.fakevendor import FakeVendor
from tests.hubharness import HubThread

SEED = 20261205
CASES = 2000
QUIET = 0.5
# Bytes that change how HTTP is framed or read.
INTERESTING = [b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b";", b",", b"\x00", b"\x7f", b"\xff", b"\x80",
               b"0", b"-", b"+", b"%", b"/", b".", b"..", b"%2e", b"%2f", b"?", b"#", b"\\",
               b"chunked", b"content-length: ", b"transfer-encoding: ", b"\r\n\r\n", b"0\r\n\r\n"]


def bases(token: str) -> list[bytes]:
    chunked = (b"POST /v1/messages HTTP/1.1\r\nhost: hub\r\nx-api-key: " + token.encode()
               + b"\r\nanthropic-version: 2023-06-01\r\ntransfer-encoding: chunked\r\n\r\n"
               + b"%x\r\n%s\r\n0\r\n\r\n" % (len(PLAIN_BODY), PLAIN_BODY))
    return [
        request(token),
        request(token, extra=b"x-claude-code-session-id: s-1\r\n"),
        request(token, path=b"/v1/messages/count_tokens"),
        chunked,
        b"GET /v1/models/claude-sonnet-4-6 HTTP/1.1\r\nhost: hub\r\nx-api-key: " + token.encode() + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: hub\r\n\r\n",
        request(token) + request(token),  # pipelined
    ]


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        at = rng.randrange(len(out) + 1)
        if op == 0 and out:
            out[min(at, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            out[at:at] = rng.choice(INTERESTING)
        elif op == 2:
            del out[at : at + rng.randint(1, 16)]
        elif op == 3:
            end = min(len(out), at + rng.randint(1, 40))
            out[at:at] = out[at:end]
        elif op == 4:
            del out[at:]
        else:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(out)


def send(port: int, data: bytes) -> bytes:
    """Send on a new connection; what comes back until the hub closes or is
    quiet for QUIET seconds (an incomplete request waits for more, as it should)."""
    with socket.create_connection(("127.0.0.1", port), timeout=QUIET) as sock:
        received = b""
        try:
            sock.sendall(data)
            while chunk := sock.recv(65536):
                received += chunk
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            pass
        return received


@pytest.mark.parametrize("part", range(4))
def test_fuzzed_requests(module_hub: HubThread, module_vendor: FakeVendor, module_token: str, part: int) -> None:
    rng = random.Random(SEED + part)
    base = bases(module_token)
    cases = [mutate(rng, rng.choice(base)) for _ in range(CASES // 4)]
    answered = 0
    with ThreadPoolExecutor(max_workers=32) as pool:
        for start in range(0, len(cases), 100):
            for received in pool.map(lambda data: send(module_hub.port, data), cases[start : start + 100]):
                answered += received.startswith(b"HTTP/1.1 ")
            assert_alive(module_hub.port, module_token)
    # Most mutations leave something the hub answers (a refusal or the
    # vendor's answer); the rest are incomplete and wait, as they should.
    assert answered > len(cases) // 2
    module_vendor.wait_idle()
    module_vendor.check()
    for forwarded in module_vendor.requests:
        path = forwarded.target.partition("?")[0].encode()
        assert route_for(path) is not None, forwarded.target
    assert_alive(module_hub.port, module_token)
