"""A webhook receiver for tests: a real HTTP/1.1 server on 127.0.0.1:<free
port> in threads of its own, recording the bodies POSTed to it.

Modes: "answer" replies `status` to every request (keep-alive, as Slack
does); "blackhole" accepts connections, reads each request whole and never
replies (a target that hangs). `refused_url()` names a port nothing listens
on (connections refused). Every URL carries a secret-looking path, so that
tests can check that it never appears in logs or output.
"""
from __future__ import annotations

import secrets
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson


class WebhookReceiver:
    def __init__(self, mode: str = "answer", status: int = 200) -> None:
        if mode not in ("answer", "blackhole"):
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        self.status = status
        self.secret = "T00000000/B00000000/" + secrets.token_hex(12)
        self.requests: list[dict[str, Any]] = []  # {"path", "headers", "body"}
        self.connections = 0
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with receiver._lock:
                    receiver.connections += 1

            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                with receiver._arrived:
                    receiver.requests.append({
                        "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body,
                    })
                    receiver._arrived.notify_all()
                if receiver.mode == "blackhole":
                    receiver._release.wait()
                    self.close_connection = True
                    return
                answer = b"ok"
                self.send_response(receiver.status)
                self.send_header("content-type", "text/plain")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/{self.secret}"

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def bodies(self) -> list[Any]:
        with self._lock:
            return [orjson.loads(r["body"]) for r in self.requests]

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Any]:
        """The bodies once at least `count` arrived (or whatever came by `timeout`)."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self.requests) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._arrived.wait(left)
        return self.bodies()

    def settle(self, quiet: float = 0.3, timeout: float = 5.0) -> list[Any]:
        """The bodies once nothing arrived for `quiet` seconds: for counting
        that no more came than expected."""
        deadline = time.monotonic() + timeout
        seen = -1
        while time.monotonic() < deadline:
            with self._lock:
                now = len(self.requests)
            if now == seen:
                break
            seen = now
            time.sleep(quiet)
        return self.bodies()


def refused_url() -> str:
    """A URL on a port of 127.0.0.1 that nothing listens on (it was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/hooks/T11111111/B11111111/{secrets.token_hex(12)}"
