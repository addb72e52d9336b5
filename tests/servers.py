"""Real servers for tests, started from the installed binaries on free ports
of 127.0.0.1 in temporary directories and stopped at the end: redis-server
(Debian package redis-server), and a listener that accepts connections and
never answers (a server that hangs).

Outside CI a missing binary skips the test with the reason; under CI=true it
fails it: CI must run them.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

# Seconds a server gets to answer its first PING.
START_TIMEOUT = 10.0


def binary(name: str, package: str, *candidates: str) -> str:
    """The path of an installed program; skip (fail under CI=true) when missing."""
    found = shutil.which(name) or next((path for path in candidates if os.access(path, os.X_OK)), None)
    if found is None:
        reason = f"no {name} on this machine: apt-get install {package}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the tests that need {name}: {reason}")
        pytest.skip(reason)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server of the test's own: no persistence (`--save ""
    --appendonly no`), its files in `directory`. kill() and start() again
    keep the port, as an operator's restart does; pause() and resume()
    (SIGSTOP / SIGCONT) make a Redis that takes connections and answers
    nothing."""

    def __init__(self, directory: Path, password: str | None = None) -> None:
        self.executable = binary("redis-server", "redis-server", "/usr/bin/redis-server", "/usr/sbin/redis-server")
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.password = password
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        """Without the password: it goes in [shared] password."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            self.executable, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.directory),
            "--logfile", str(self.directory / "redis.log"), "--daemonize", "no",
        ]
        if self.password is not None:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with status {self.process.returncode}: {log}")
            if self._answers():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer on port {self.port} within {START_TIMEOUT:g} s")
            time.sleep(0.01)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                command = b"PING\r\n"
                if self.password is not None:
                    command = b"AUTH %s\r\n" % self.password.encode() + command
                s.sendall(command)
                seen = b""
                while b"PONG" not in seen:
                    chunk = s.recv(256)
                    if not chunk:
                        return False
                    seen += chunk
                return True
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """Send one command over a fresh connection; the raw RESP answer (for
        checks from outside the code under test)."""
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as s:
            if self.password is not None:
                pw = self.password.encode()
                s.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw))
                s.recv(64)
            s.sendall(b"".join(parts))
            return s.recv(65536)

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing flushed, connections reset."""
        if self.process is not None:
            if self._paused:
                self.resume()
            self.process.kill()
            self.process.wait()
            self.process = None

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
        self._paused = False

    def stop(self) -> None:
        if self.process is None:
            return
        if self._paused:
            self.resume()
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


class SilentServer:
    """A TCP listener that accepts every connection, reads what it is sent
    and never answers: a server that hangs."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self.accepted = 0
        self._connections: list[socket.socket] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="silent-server", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _serve(self) -> None:
        self._listener.settimeout(0.05)
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                pass
            except OSError:
                return
            else:
                conn.setblocking(False)
                self._connections.append(conn)
                self.accepted += 1
            for conn in self._connections:
                try:
                    conn.recv(65536)  # read and drop: the client's writes never block
                except (BlockingIOError, OSError):
                    pass

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        for conn in self._connections:
            conn.close()
        self._listener.close()
