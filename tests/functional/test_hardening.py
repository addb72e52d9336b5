"""What an attacker without a token, a token holder sending odd requests, and
a client that sends garbage after a good request can do: each case as the
probe found it, over raw sockets against a real hub and fake vendor.
"""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from tests.fakevendor import FakeVendor
from tests.functional.test_server import (  # noqa: F401  (close_wires, no_handler_failures: autouse fixtures)
    GET_ROOT,
    PLAIN_BODY,
    STREAM_BODY,
    Wire,
    assert_anthropic_error,
    assert_serving,
    close_wires,
    hub_token,
    messages_request,
    no_handler_failures,
    running_hub,
)

MIB = 1024 * 1024


def big_request_head(length: int, credentials: bytes = b"") -> bytes:
    return (
        b"POST /v1/messages HTTP/1.1\r\nhost: hub\r\n" + credentials
        + b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % length
    )


# -- 1. no body is read before the token is accepted ------------------------------

@pytest.mark.parametrize("credentials", [b"", b"x-api-key: hc-wrong\r\n"], ids=["missing", "unknown"])
def test_a_large_body_without_a_valid_token_is_refused_from_its_head(tmp_path: Path, vendor: FakeVendor, credentials: bytes) -> None:
    with running_hub(tmp_path, vendor, max_body_bytes=32 * MIB) as hub:
        hub_token(hub)
        wire = Wire(hub.port)
        wire.send(big_request_head(31 * MIB, credentials) + b"{" + b" " * 1000)
        # The 401 comes before the client sent its body, which is never read.
        answer = wire.response()
        assert_anthropic_error(answer, 401, "authentication_error")
        assert answer.headers["connection"] == "close"
        assert hub.app is not None
        assert hub.app.server.body_budget.in_flight == 0
        assert vendor.requests == []


def test_a_refused_small_body_is_drained_and_keep_alive_holds(tmp_path: Path, vendor: FakeVendor) -> None:
    with running_hub(tmp_path, vendor) as hub:
        hub_token(hub)
        wire = Wire(hub.port)
        wire.send(messages_request("hc-wrong") + messages_request("hc-wrong"))
        for _ in range(2):
            assert_anthropic_error(wire.response(), 401, "authentication_error")
        assert_serving(wire)


def test_expect_100_without_a_token_gets_the_refusal_not_a_continue(tmp_path: Path, vendor: FakeVendor) -> None:
    with running_hub(tmp_path, vendor) as hub:
        wire = Wire(hub.port)
        wire.send(big_request_head(1000, b"expect: 100-continue\r\n"))
        answer = wire.response()
        assert_anthropic_error(answer, 401, "authentication_error")


def test_bodies_in_flight_are_capped_across_connections(tmp_path: Path, vendor: FakeVendor) -> None:
    with running_hub(tmp_path, vendor, max_body_bytes=64 * 1024, max_body_bytes_in_flight=100 * 1024) as hub:
        token = hub_token(hub)
        auth = b"x-api-key: " + token.encode() + b"\r\nanthropic-version: 2023-06-01\r\n"
        holder = Wire(hub.port)
        holder.send(big_request_head(60 * 1024, auth) + b"{")  # holds 60 KiB of the 100
        time.sleep(0.05)
        assert hub.app is not None and hub.app.server.body_budget.in_flight == 60 * 1024
        second = Wire(hub.port)
        second.send(big_request_head(60 * 1024, auth))
        answer = second.response()
        assert_anthropic_error(answer, 503, None)
        assert answer.headers["retry-after"] == "1"
        # Once the first body is in and answered, its share is free again.
        body = PLAIN_BODY[:-1] + b" " * (60 * 1024 - len(PLAIN_BODY)) + b"}"
        holder.send(body[1:])
        assert holder.response().status == 200
        assert hub.app.server.body_budget.in_flight == 0
        third = Wire(hub.port)
        third.send(big_request_head(60 * 1024, auth) + body)
        assert third.response().status == 200


# -- 2. connection slots -------------------------------------------------------------

def test_connections_per_address_are_capped(tmp_path: Path, vendor: FakeVendor) -> None:
    with running_hub(tmp_path, vendor, max_connections_per_address=3) as hub:
        held = [Wire(hub.port) for _ in range(3)]
        for wire in held:
            assert_serving(wire)
        extra = Wire(hub.port)
        answer = extra.response()
        assert answer.status == 503 and "per-address connection limit" in answer.json()["error"]["message"]
        extra.close()
        held.pop().close()
        time.sleep(0.1)
        assert_serving(Wire(hub.port))


def test_silent_connections_cannot_lock_out_a_client_with_a_token(tmp_path: Path, vendor: FakeVendor) -> None:
    with running_hub(tmp_path, vendor, max_connections=40, max_unauthenticated_connections=10, header_timeout=30.0) as hub:
        token = hub_token(hub)
        # Trusted keep-alive connections, then a flood of silent ones, more than
        # both limits allow.
        trusted = [Wire(hub.port) for _ in range(5)]
        for wire in trusted:
            wire.send(messages_request(token))
            assert wire.response().status == 200
        silent = [Wire(hub.port) for _ in range(60)]
        time.sleep(0.2)
        # New clients with a token get in and are served, again and again.
        for _ in range(5):
            wire = Wire(hub.port)
            wire.send(messages_request(token))
            assert wire.response().status == 200
        for wire in trusted:
            wire.send(messages_request(token))
            assert wire.response().status == 200
        assert hub.app is not None
        assert len(hub.app.server.untrusted) <= 10
        # The silent ones were closed, oldest first; the newest are still open.
        closed = [w for w in silent if w.answered()]
        assert len(closed) >= 50
        assert not silent[-1].answered()


def test_a_body_slower_than_the_minimum_rate_is_timed_out(tmp_path: Path, vendor: FakeVendor) -> None:
    # Each piece comes well within body_timeout, but the body as a whole at
    # 20 bytes/s, under min_body_rate.
    with running_hub(tmp_path, vendor, body_timeout=0.5, min_body_rate=200) as hub:
        token = hub_token(hub)
        wire = Wire(hub.port)
        request = messages_request(token, PLAIN_BODY + b" " * 400)
        head_end = request.index(b"\r\n\r\n") + 4
        wire.send(request[:head_end])
        started = time.monotonic()
        answer = None
        for i in range(head_end, len(request), 4):
            if wire.answered():
                answer = wire.response()
                break
            try:
                wire.send(request[i : i + 4])
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.2)
        answer = answer or wire.response()
        assert answer.status == 408 and "slower than 200 bytes/s" in answer.json()["error"]["message"]
        assert time.monotonic() - started < 5
        assert vendor.requests == []


# -- 3. only the routes reach the vendor --------------------------------------------

OUTSIDE_TARGETS = [
    b"/v1/models/../../v1/files",
    b"/v1/models/%2e%2e/%2e%2e/v1/files",
    b"/v1/models/%2E%2E%2F%2E%2E%2Fv1%2Ffiles",
    b"/v1/models/..%2f..%2fv1%2ffiles",
    b"/v1/models/..",
    b"/v1/models/.",
    b"/v1/models/.hidden",
    b"/v1/models/claude/../../../v1/organizations/me",
    b"/v1/models/claude%00",
    b"/v1/models/claude%2fx",
    b"/v1/models/x/y",
    b"/v1/models//v1/files",
    b"/v1/models/",
    b"/v1/messages/../files",
    b"/v1/messages/batches",
    b"/v1/./messages",
    b"/v1//messages",
    b"/v1/files",
    b"/v1/organizations/api_keys",
    b"//v1/messages",
    b"/V1/messages",
    b"http://api.anthropic.com/v1/files",
]


@pytest.mark.parametrize("target", OUTSIDE_TARGETS)
def test_a_path_outside_the_routes_is_404_and_never_forwarded(tmp_path: Path, vendor: FakeVendor, target: bytes) -> None:
    with running_hub(tmp_path, vendor) as hub:
        token = hub_token(hub)
        wire = Wire(hub.port)
        for method in (b"GET", b"POST"):
            body = PLAIN_BODY if method == b"POST" else b""
            wire.send(method + b" " + target + b" HTTP/1.1\r\nhost: hub\r\nx-api-key: " + token.encode()
                      + b"\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
            assert_anthropic_error(wire.response(), 404, "not_found_error")
        assert vendor.requests == []


@pytest.mark.parametrize("target", [b"/v1/models/a\x00b", b"/v1/models/a b", b"/v1/models/a\tb"])
def test_control_bytes_in_a_target_are_refused(tmp_path: Path, vendor: FakeVendor, target: bytes) -> None:
    with running_hub(tmp_path, vendor) as hub:
        token = hub_token(hub)
        wire = Wire(hub.port)
        wire.send(b"GET " + target + b" HTTP/1.1\r\nhost: hub\r\nx-api-key: " + token.encode() + b"\r\n\r\n")
        assert wire.response().status in (400, 404)
        assert vendor.requests == []


@pytest.mark.parametrize("model", [b"claude-sonnet-4-6", b"gpt-5.1", b"claude-3-opus@20240229"])
def test_a_plain_model_id_is_forwarded(tmp_path: Path, vendor: FakeVendor, model: bytes) -> None:
    with running_hub(tmp_path, vendor) as hub:
        token = hub_token(hub)
        wire = Wire(hub.port)
        wire.send(b"GET /v1/models/" + model + b" HTTP/1.1\r\nhost: hub\r\nx-api-key: " + token.encode() + b"\r\n\r\n")
        wire.response()
        (request,) = vendor.requests
        assert request.target == "/v1/models/" + model.decode()


# -- 7. a good request, then garbage --------------------------------------------------

@pytest.mark.parametrize("garbage", [b"\x16\x03\x01\x00\xa5garbage\r\n\r\n", b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/1.1\r\nbad header\r\n\r\n"])
def test_a_request_followed_by_garbage_gets_its_answer_then_a_400(tmp_path: Path, vendor: FakeVendor, garbage: bytes) -> None:
    with running_hub(tmp_path, vendor) as hub:
        token = hub_token(hub)
        wire = Wire(hub.port)
        wire.send(messages_request(token, STREAM_BODY, extra=b"x-fake-events: 8\r\nx-fake-delay-ms: 20\r\n") + garbage)
        first = wire.response()
        assert first.status == 200 and b"event: message_stop" in first.body
        assert_anthropic_error(wire.response(), 400, "invalid_request_error")
        assert wire.rest() == b""
        (row,) = hub.wait_rows(1)
        assert row["outcome"] == "ok" and row["status"] == 200 and row["output_tokens"] > 1
        vendor.wait_idle()
        assert len(vendor.requests) == 1


# -- 11. refusals the client can read -------------------------------------------------

def test_connect_is_405(tmp_path: Path, vendor: FakeVendor) -> None:
    with running_hub(tmp_path, vendor) as hub:
        wire = Wire(hub.port)
        wire.send(b"CONNECT api.anthropic.com:443 HTTP/1.1\r\nhost: api.anthropic.com:443\r\n\r\n")
        answer = wire.response()
        assert answer.status == 405 and answer.headers["connection"] == "close"
        assert wire.rest() == b""


def test_websocket_upgrade_is_400(tmp_path: Path, vendor: FakeVendor) -> None:
    with running_hub(tmp_path, vendor) as hub:
        token = hub_token(hub)
        wire = Wire(hub.port)
        wire.send(b"GET /v1/messages HTTP/1.1\r\nhost: hub\r\nx-api-key: " + token.encode()
                  + b"\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\n"
                  b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        answer = wire.response()
        assert_anthropic_error(answer, 400, "invalid_request_error")
        assert "upgrade" in answer.json()["error"]["message"]
        assert vendor.requests == []


@pytest.mark.parametrize("hosts", [b"", b"host: a\r\nhost: b\r\n"], ids=["none", "two"])
def test_http11_without_exactly_one_host_is_400(tmp_path: Path, vendor: FakeVendor, hosts: bytes) -> None:
    with running_hub(tmp_path, vendor) as hub:
        token = hub_token(hub)
        wire = Wire(hub.port)
        wire.send(b"POST /v1/messages HTTP/1.1\r\n" + hosts + b"x-api-key: " + token.encode()
                  + b"\r\ncontent-length: %d\r\n\r\n" % len(PLAIN_BODY) + PLAIN_BODY)
        answer = wire.response()
        assert answer.status == 400 and "Host" in answer.json()["error"]["message"]
        assert vendor.requests == []


def test_http10_without_host_is_served(tmp_path: Path, vendor: FakeVendor) -> None:
    with running_hub(tmp_path, vendor) as hub:
        sock = socket.create_connection(("127.0.0.1", hub.port), timeout=5)
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        sock.close()
        assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"hubcore\n")


def test_a_refusal_with_unread_input_is_read_by_the_client_not_reset(tmp_path: Path, vendor: FakeVendor) -> None:
    # A 413 from the head while the client still sends its body: the hub must
    # linger, reading and dropping, so the client reads the answer.
    with running_hub(tmp_path, vendor, max_body_bytes=4096) as hub:
        token = hub_token(hub)
        wire = Wire(hub.port)
        wire.send(big_request_head(512 * 1024, b"x-api-key: " + token.encode() + b"\r\n"))
        try:
            for _ in range(64):
                wire.send(b" " * 8192)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = wire.response()
        assert answer.status == 413


def test_garbage_with_trailing_input_is_answered_not_reset(tmp_path: Path, vendor: FakeVendor) -> None:
    with running_hub(tmp_path, vendor) as hub:
        wire = Wire(hub.port)
        wire.send(b"BREW /pot HTTP/1.1\r\nhost: x\r\n\r\n" + b"x" * 200_000)
        assert wire.response().status == 400


def test_keep_alive_survives_every_hardening_refusal(tmp_path: Path, vendor: FakeVendor) -> None:
    # The ones that keep the connection (small refused bodies, 404s) leave it usable.
    with running_hub(tmp_path, vendor) as hub:
        token = hub_token(hub)
        wire = Wire(hub.port)
        wire.send(messages_request(token, path=b"/v1/models/../x"))
        assert wire.response().status == 404
        wire.send(messages_request("hc-nope"))
        assert wire.response().status == 401
        wire.send(GET_ROOT)
        assert wire.response().status == 200
        wire.send(messages_request(token))
        assert wire.response().status == 200


# -- 8. the drain timeout ends streams with an error event ------------------------------

def test_a_stream_cut_by_the_drain_timeout_ends_with_an_error_event(tmp_path: Path, vendor: FakeVendor) -> None:
    received: list[bytes] = []
    ended_whole: list[bool] = []

    def read(wire: Wire) -> None:
        try:
            for chunk in wire.chunks():
                received.append(chunk)
            ended_whole.append(True)  # the terminating zero-length chunk came
        except (EOFError, OSError):
            ended_whole.append(False)

    with running_hub(tmp_path, vendor, drain_timeout=0.3) as hub:
        token = hub_token(hub)
        wire = Wire(hub.port)
        wire.send(messages_request(token, STREAM_BODY, extra=b"x-fake-events: 60\r\nx-fake-delay-ms: 50\r\n"))
        status, headers = wire.head()
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        reader = threading.Thread(target=read, args=(wire,))
        reader.start()
        time.sleep(0.2)
    reader.join(10)
    assert ended_whole == [True]
    body = b"".join(received)
    assert b"event: message_stop" not in body
    last_event = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last_event.startswith(b"event: error\ndata: ")
    assert b"drain timeout" in last_event
    (row,) = hub.wait_rows(1)
    assert (row["outcome"], row["error_type"]) == ("upstream_aborted", "hub_shutdown")


def test_trailers_never_pass_as_headers_and_count_against_the_head_limit(tmp_path: Path, vendor: FakeVendor) -> None:
    with running_hub(tmp_path, vendor, max_header_bytes=2048) as hub:
        token = hub_token(hub)
        head = (b"POST /v1/messages HTTP/1.1\r\nhost: hub\r\nx-api-key: " + token.encode()
                + b"\r\nanthropic-version: 2023-06-01\r\ntransfer-encoding: chunked\r\n\r\n")
        chunked = b"%x\r\n%s\r\n0\r\n" % (len(PLAIN_BODY), PLAIN_BODY)
        wire = Wire(hub.port)
        wire.send(head + chunked + b"x-trailer: t\r\nanthropic-beta: injected\r\n\r\n")
        assert wire.response().status == 200
        (forwarded,) = vendor.requests
        assert not any(name in ("x-trailer", "anthropic-beta") for name, _ in forwarded.headers)
        wire.send(head + chunked + b"".join(b"x-t%d: %s\r\n" % (i, b"v" * 100) for i in range(40)) + b"\r\n")
        assert wire.response().status == 431
        assert len(vendor.requests) == 1
