"""The server fixtures of tests/servers.py do what the tests rely on."""
from __future__ import annotations

import socket

import pytest

from tests.servers import RedisServer, SilentServer


def test_redis_server_answers_and_restarts_on_its_port(redis_server: RedisServer) -> None:
    assert redis_server.command("SET", "k", "v") == b"+OK\r\n"
    assert redis_server.command("CONFIG", "GET", "appendonly").endswith(b"no\r\n")
    port = redis_server.port
    redis_server.kill()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
    redis_server.start()
    assert redis_server.port == port
    # Nothing persisted: a restart is an empty Redis.
    assert redis_server.command("GET", "k") == b"$-1\r\n"


def test_a_paused_redis_accepts_and_does_not_answer(redis_server: RedisServer) -> None:
    redis_server.pause()
    try:
        with socket.create_connection(("127.0.0.1", redis_server.port), timeout=1.0) as s:
            s.sendall(b"PING\r\n")
            s.settimeout(0.2)
            with pytest.raises(TimeoutError):
                s.recv(16)
    finally:
        redis_server.resume()
    assert redis_server.command("PING") == b"+PONG\r\n"


def test_silent_server_accepts_and_never_answers(silent_server: SilentServer) -> None:
    with socket.create_connection(("127.0.0.1", silent_server.port), timeout=1.0) as s:
        s.sendall(b"PING\r\n")
        s.settimeout(0.2)
        with pytest.raises(TimeoutError):
            s.recv(16)
