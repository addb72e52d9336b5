"""Request targets that try to reach vendor endpoints outside the hub's
routes with the hub's key: every spelling of a dot segment, an encoded
slash or dot, a NUL, a backslash, an overlong UTF-8 dot, under every route
prefix. None may reach the vendor; each is a 4xx in the vendor's shape."""
from __future__ import annotations

import itertools

import orjson
import pytest

from tests.adversarial.conftest import PLAIN_BODY, exchange, responses
from tests.fakevendor import FakeVendor
from tests.hubharness import HubThread

PREFIXES = [b"/v1/models/", b"/v1/models/claude-sonnet-4-6/", b"/v1/messages/", b"/v1/messages/count_tokens/", b"/v1/"]
DOTS = [b"..", b"%2e%2e", b"%2E%2E", b".%2e", b"%2e.", b"%252e%252e", b"%c0%ae%c0%ae", b"%u002e%u002e",
        b".%00.", b"\xef\xbc\x8e\xef\xbc\x8e", b"...", b"./.."]
SEPARATORS = [b"/", b"%2f", b"%2F", b"%5c", b"\\", b"%252f", b";/"]
TARGETS = [b"v1/files", b"v1/messages/batches", b"v1/organizations/api_keys"]


def targets() -> list[bytes]:
    out = []
    for prefix, dots, sep, target in itertools.product(PREFIXES, DOTS, SEPARATORS, TARGETS):
        out.append(prefix + dots + sep + dots + sep + target)
    return out


ALL = targets()


def test_there_are_many_spellings() -> None:
    assert len(ALL) >= 1000


@pytest.mark.parametrize("part", range(4))
def test_no_spelling_reaches_the_vendor(module_hub: HubThread, module_vendor: FakeVendor, module_token: str, part: int) -> None:
    before = len(module_vendor.requests)
    batch = ALL[part::4]
    for method in (b"GET", b"POST"):
        # Pipelined on keep-alive connections, 50 at a time: a 404 keeps the
        # connection, so every answer comes back on it, in order.
        for start in range(0, len(batch), 50):
            group = batch[start : start + 50]
            data = b"".join(
                method + b" " + target + b"?beta=true HTTP/1.1\r\nhost: hub\r\nx-api-key: " + module_token.encode()
                + b"\r\ncontent-length: %d\r\n\r\n" % (len(PLAIN_BODY) if method == b"POST" else 0)
                + (PLAIN_BODY if method == b"POST" else b"")
                for target in group
            ) + b"GET / HTTP/1.1\r\nhost: hub\r\nconnection: close\r\n\r\n"
            received = exchange(module_hub.port, data, quiet=5)
            answers = responses(received)
            # Each target is refused: a 404 in the vendor's shape, or a 400
            # where the bytes are not a valid request target at all (and the
            # connection ends there).
            for status, _ in answers[:-1]:
                assert status in (400, 404), (status, group)
            if answers[-1][0] == 200:
                assert len(answers) == len(group) + 1
            else:
                assert answers[-1][0] == 400
    module_vendor.wait_idle()
    assert module_vendor.requests[before:] == []


def test_a_404_names_no_vendor_detail(module_hub: HubThread, module_token: str) -> None:
    received = exchange(module_hub.port, b"GET /v1/models/../../v1/files HTTP/1.1\r\nhost: hub\r\nx-api-key: "
                        + module_token.encode() + b"\r\nconnection: close\r\n\r\n")
    body = orjson.loads(received.partition(b"\r\n\r\n")[2])
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
