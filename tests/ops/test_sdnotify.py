"""sd_notify against a real datagram socket standing in for systemd's."""
from __future__ import annotations

import asyncio
import os
import re
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hubcore.ops import sdnotify


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    name = f"hubcore-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    yield sock
    sock.close()


def test_messages_reach_the_socket(notify_socket: socket.socket) -> None:
    assert sdnotify.ready() is True
    assert notify_socket.recv(4096) == b"READY=1"
    assert sdnotify.ready("serving on 127.0.0.1:8787")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving on 127.0.0.1:8787"
    assert sdnotify.status("draining\n3 streams left")
    assert notify_socket.recv(4096) == b"STATUS=draining 3 streams left"
    assert sdnotify.watchdog_ping()
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    assert sdnotify.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"
    assert sdnotify.reloading()
    assert re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=\d+", notify_socket.recv(4096))


def test_abstract_socket_name(abstract_socket: socket.socket) -> None:
    assert sdnotify.notify("READY=1") is True
    assert abstract_socket.recv(4096) == b"READY=1"


def test_without_systemd_nothing_is_sent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.watchdog_ping() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")       # not a transport we speak
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert sdnotify.ready() is False                          # reported, not raised


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert sdnotify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", "not-a-pid")
    assert sdnotify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "soon"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert sdnotify.watchdog_interval() is None


async def test_watchdog_task_pings_until_stopped(notify_socket: socket.socket,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")              # 0.1 s: pings every 0.05 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    dog = sdnotify.Watchdog()
    assert dog.enabled and dog.interval == 0.1
    notify_socket.setblocking(False)
    loop = asyncio.get_running_loop()
    dog.start()
    dog.start()                                               # a second start is a no-op
    async with asyncio.timeout(5):
        pings = [await loop.sock_recv(notify_socket, 64) for _ in range(3)]
    assert pings == [b"WATCHDOG=1"] * 3
    task = dog._task
    await dog.stop()
    assert task is not None and task.done()
    # drain what was sent before stop(); then nothing more arrives
    while True:
        try:
            notify_socket.recv(64)
        except BlockingIOError:
            break
    await asyncio.sleep(0.15)
    with pytest.raises(BlockingIOError):
        notify_socket.recv(64)


async def test_watchdog_without_watchdog_env_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    dog = sdnotify.Watchdog()
    assert not dog.enabled
    dog.start()
    assert dog._task is None
    await dog.stop()
