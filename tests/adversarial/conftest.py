"""One hub and fake vendor per module for the adversarial suite: the cases are
many and each is small, so they share a hub and check it still serves."""
from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import upstreams_for
from tests.fakevendor import FakeVendor
from tests.hubharness import HubThread, make_config

PLAIN_BODY = b'{"model":"claude-sonnet-4-6","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}'
# How long a case waits for the hub to answer or close before moving on.
QUIET = 1.0


@pytest.fixture(scope="module")
def module_vendor() -> Iterator[FakeVendor]:
    with FakeVendor() as v:
        yield v


@pytest.fixture(scope="module")
def module_hub(module_vendor: FakeVendor, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubThread]:
    tmp: Path = tmp_path_factory.mktemp("hub")
    server: dict[str, Any] = {"header_timeout": 2.0, "body_timeout": 2.0, "linger_timeout": 0.5}
    with HubThread(make_config(tmp, upstreams_for(module_vendor), **server)) as hub:
        yield hub


@pytest.fixture(scope="module")
def module_token(module_hub: HubThread) -> str:
    return module_hub.mint("mallory", "adversarial")


@pytest.fixture(autouse=True)
def no_handler_failures(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Bad input is answered, never crashed on."""
    yield
    failures = [r.getMessage() for r in caplog.records if r.name.startswith("hubcore") and r.levelno >= logging.ERROR]
    assert failures == []


def request(token: str, body: bytes = PLAIN_BODY, *, extra: bytes = b"", path: bytes = b"/v1/messages") -> bytes:
    return (
        b"POST " + path + b" HTTP/1.1\r\nhost: hub\r\nx-api-key: " + token.encode()
        + b"\r\nanthropic-version: 2023-06-01\r\ncontent-type: application/json\r\n" + extra
        + b"content-length: %d\r\n\r\n" % len(body) + body
    )


def exchange(port: int, data: bytes, quiet: float = QUIET) -> bytes:
    """Send `data` on a new connection; everything the hub sends until it
    closes or stays quiet for `quiet` seconds."""
    with socket.create_connection(("127.0.0.1", port), timeout=quiet) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            received += chunk
        return received


def responses(received: bytes) -> list[tuple[int, dict[bytes, bytes]]]:
    """Every response in `received` (status, lower-cased headers), in order,
    read by their framing (Content-Length, chunked, or to the end)."""
    out: list[tuple[int, dict[bytes, bytes]]] = []
    rest = received
    while rest.startswith(b"HTTP/1.1 "):
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.split(b"\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
        status = int(lines[0].split(b" ")[1])
        out.append((status, headers))
        if b"content-length" in headers:
            rest = rest[int(headers[b"content-length"]):]
        elif headers.get(b"transfer-encoding") == b"chunked":
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                if not size_line:
                    return out
                size = int(size_line.split(b";")[0], 16)
                rest = rest[size + 2:]
                if size == 0:
                    break
        elif status >= 200:
            break
    return out


def statuses(received: bytes) -> list[int]:
    return [status for status, _ in responses(received)]


def vendor_answered(received: bytes) -> int:
    """How many responses came from the fake vendor (it names its organisation)."""
    return sum(1 for _, headers in responses(received) if b"anthropic-organization-id" in headers)


def assert_alive(port: int, token: str) -> None:
    answer = exchange(port, request(token, extra=b"connection: close\r\n"), quiet=10)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
