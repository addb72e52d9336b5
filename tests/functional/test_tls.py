"""TLS on both sides of the hub: to the vendor (configured CA, SNI, hostname
check, pooled TLS connections) and on the hub's own listener, with a test CA
from trustme and the official SDKs as clients.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest
import trustme

from tests.conftest import upstreams_for
from tests.fakevendor import ANTHROPIC_KEY, OPENAI_KEY, FakeVendor, client_ssl_context
from tests.hubharness import HubThread, make_config

MESSAGES: list[anthropic.types.MessageParam] = [{"role": "user", "content": "hello over TLS"}]
MODEL = "claude-sonnet-4-6"


def write_ca(ca: trustme.CA, path: Path) -> str:
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def refresh(h: HubThread) -> str:
    return h.mint("alice", "tls")


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_vendor(ca: trustme.CA) -> Iterator[FakeVendor]:
    with FakeVendor(tls=ca) as v:
        yield v


def test_upstream_tls_with_a_configured_ca(tmp_path: Path, ca: trustme.CA, tls_vendor: FakeVendor) -> None:
    assert tls_vendor.url.startswith("https://localhost:")
    ca_file = write_ca(ca, tmp_path / "vendor-ca.pem")
    config = make_config(tmp_path, upstreams_for(tls_vendor, ca_file=ca_file))
    with HubThread(config) as h:
        token = refresh(h)
        claude = anthropic.Anthropic(base_url=h.url, api_key=token, max_retries=0, timeout=10)
        with claude.messages.stream(model=MODEL, max_tokens=32, messages=MESSAGES, extra_headers={"x-fake-events": "7"}) as stream:
            text = "".join(stream.text_stream)
        assert text == "".join(f"word{i} " for i in range(7))
        assert claude.messages.create(model=MODEL, max_tokens=8, messages=MESSAGES).type == "message"
        gpt = openai.OpenAI(base_url=h.url + "/v1", api_key=token, max_retries=0, timeout=10)
        events = list(gpt.responses.create(model="gpt-5-codex", input="hi", stream=True))
        assert events[-1].type == "response.completed"
        rows = h.wait_rows(3)
        assert [r["outcome"] for r in rows] == ["ok", "ok", "ok"]
        claude.close()
        gpt.close()
    tls_vendor.check()
    assert [r.key for r in tls_vendor.requests] == [ANTHROPIC_KEY, ANTHROPIC_KEY, OPENAI_KEY]
    # The vendor saw its own name in Host, and the TLS connection was pooled
    # (one per upstream kind: both point at the same origin, each has its pool).
    assert {r.header("host") for r in tls_vendor.requests} == {f"localhost:{tls_vendor.port}"}
    assert tls_vendor.connections_accepted == 2


def test_upstream_tls_with_the_wrong_ca_is_502_without_the_key(
    tmp_path: Path, tls_vendor: FakeVendor, caplog: pytest.LogCaptureFixture
) -> None:
    other = trustme.CA()
    ca_file = write_ca(other, tmp_path / "wrong-ca.pem")
    upstreams = [{"name": "anthropic", "kind": "anthropic", "base_url": tls_vendor.url, "keys": [ANTHROPIC_KEY], "ca_file": ca_file, "max_attempts": 2}]
    caplog.set_level(logging.DEBUG)
    with HubThread(make_config(tmp_path, upstreams)) as h:
        token = refresh(h)
        claude = anthropic.Anthropic(base_url=h.url, api_key=token, max_retries=0, timeout=10)
        with pytest.raises(anthropic.APIStatusError) as info:
            claude.messages.create(model=MODEL, max_tokens=8, messages=MESSAGES)
        response = info.value.response
        assert response.status_code == 502
        assert response.headers["x-should-retry"] == "false"
        message = info.value.body["error"]["message"]  # type: ignore[index]
        assert "TLS" in message and "CERTIFICATE_VERIFY_FAILED" in message, message
        assert f"localhost:{tls_vendor.port}" in message
        for where in (response.text, str(dict(response.headers))):
            assert ANTHROPIC_KEY not in where and token not in where
        (row,) = h.wait_rows(1)
        assert row["outcome"] == "upstream_error" and row["status"] == 502 and row["attempts"] == 2
        # The hub goes on answering.
        assert claude.get("/", cast_to=str) == "hubcore\n"
        claude.close()
    assert tls_vendor.requests == []  # nothing was sent over an unverified connection
    assert all(ANTHROPIC_KEY not in r.getMessage() for r in caplog.records)


def test_upstream_tls_checks_the_hostname(tmp_path: Path, ca: trustme.CA) -> None:
    # A certificate the CA signed, but for another name: SNI and the hostname
    # check must make the handshake fail even though the chain is trusted.
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("vendor.invalid").configure_cert(server_ctx)
    seen_sni: list[str | None] = []
    server_ctx.sni_callback = lambda sock, name, ctx: seen_sni.append(name)  # type: ignore[assignment,misc]
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]

    def accept_one() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                try:
                    with server_ctx.wrap_socket(conn, server_side=True):
                        pass
                except (ssl.SSLError, OSError):
                    pass  # the hub refused our certificate: expected

    thread = threading.Thread(target=accept_one, daemon=True)
    thread.start()
    upstreams = [{"name": "anthropic", "kind": "anthropic", "base_url": f"https://localhost:{port}", "keys": ["sk-ant-hostname"], "ca_file": write_ca(ca, tmp_path / "ca.pem"), "max_attempts": 1}]
    with HubThread(make_config(tmp_path, upstreams)) as h:
        token = refresh(h)
        claude = anthropic.Anthropic(base_url=h.url, api_key=token, max_retries=0, timeout=10)
        with pytest.raises(anthropic.APIStatusError) as info:
            claude.messages.create(model=MODEL, max_tokens=8, messages=MESSAGES)
        assert info.value.status_code == 502
        assert "sk-ant-hostname" not in info.value.response.text
        claude.close()
    thread.join(10)
    assert seen_sni == ["localhost"]


def test_hub_listener_tls_with_the_sdks(tmp_path: Path, ca: trustme.CA, tls_vendor: FakeVendor) -> None:
    # TLS on both legs: SDK → hub (the hub's certificate) → vendor (its CA).
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "hub.crt", tmp_path / "hub.key"
    cert_file.write_bytes(b"".join(blob.bytes() for blob in server_cert.cert_chain_pems))
    server_cert.private_key_pem.write_to_path(str(key_file))
    upstreams = upstreams_for(tls_vendor, ca_file=write_ca(ca, tmp_path / "ca.pem"))
    config = make_config(tmp_path, upstreams, tls_cert=str(cert_file), tls_key=str(key_file), header_timeout=2.0)
    with HubThread(config) as h:
        assert h.url.startswith("https://127.0.0.1:")
        token = refresh(h)
        trusting = client_ssl_context(ca)
        claude = anthropic.Anthropic(
            base_url=h.url, api_key=token, max_retries=0, timeout=10,
            http_client=anthropic.DefaultHttpxClient(verify=trusting),
        )
        with claude.messages.stream(model=MODEL, max_tokens=32, messages=MESSAGES) as stream:
            final = stream.get_final_message()
        assert final.usage.output_tokens > 0
        gpt = openai.OpenAI(
            base_url=h.url + "/v1", api_key=token, max_retries=0, timeout=10,
            http_client=openai.DefaultHttpxClient(verify=trusting),
        )
        chunks = list(gpt.chat.completions.create(model="gpt-5-mini", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage is not None

        # A client that does not trust the hub's CA fails the handshake...
        stranger = anthropic.Anthropic(base_url=h.url, api_key=token, max_retries=0, timeout=5)
        with pytest.raises(anthropic.APIConnectionError):
            stranger.messages.create(model=MODEL, max_tokens=8, messages=MESSAGES)
        # ...and plain HTTP on the TLS port is never answered as HTTP.
        with socket.create_connection(("127.0.0.1", h.port), timeout=5) as plain:
            plain.sendall(b"GET / HTTP/1.1\r\nhost: hub\r\n\r\n")
            try:
                answer = plain.recv(65536)
            except ConnectionResetError:
                answer = b""
            assert not answer.startswith(b"HTTP/1.1 200")
        # The hub keeps serving TLS clients after both.
        assert claude.messages.create(model=MODEL, max_tokens=8, messages=MESSAGES).type == "message"
        rows = h.wait_rows(3)
        assert [r["outcome"] for r in rows] == ["ok", "ok", "ok"]
        for client in (claude, gpt, stranger):
            client.close()
    tls_vendor.check()
    assert len(tls_vendor.requests) == 3
