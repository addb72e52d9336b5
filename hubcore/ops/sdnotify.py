"""systemd's notify protocol (READY, STOPPING, STATUS, WATCHDOG) over $NOTIFY_SOCKET.

A few lines over an AF_UNIX datagram socket instead of a dependency; every
call is a no-op returning False when the hub does not run under systemd.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

log = logging.getLogger("hubcore.sdnotify")


def notify(message: str) -> bool:
    """Send one notify datagram; True if it was handed to the socket.

    Failures are logged, not raised: systemd documents these messages as
    advisory, and a hub must not die because its supervisor is busy.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":
        # "@name" is Linux's abstract namespace: a leading NUL on the wire.
        address = "\0" + address[1:]
    elif address[0] != "/":
        log.debug("NOTIFY_SOCKET=%r is not a path or abstract name; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Non-blocking: if PID 1's queue is full, a dropped message beats
            # stalling the event loop; the watchdog pings twice per interval.
            sock.setblocking(False)
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError as exc:
        log.warning("sd_notify %r to NOTIFY_SOCKET failed: %s", message.split("=", 1)[0], exc)
        return False
    return True


def ready(status: str | None = None) -> bool:
    """Startup finished: systemd marks the unit active (Type=notify)."""
    return notify("READY=1" if status is None else f"READY=1\nSTATUS={_one_line(status)}")


def reloading() -> bool:
    """A reload started; follow with ``ready()`` once it is done."""
    # MONOTONIC_USEC lets systemd (253+, Type=notify-reload) tell this reload
    # apart from an earlier one; older versions ignore it.
    return notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping() -> bool:
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """Free-form one-line status shown by ``systemctl status``."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog_ping() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds within which systemd expects a ping, or None when it expects none.

    ``WATCHDOG_PID``, when set, names the process the watchdog is meant for;
    a child that inherited the environment must not ping on its parent's behalf.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


def _one_line(text: str) -> str:
    # A newline would start a new NAME=value assignment in the datagram.
    return " ".join(text.splitlines())


class Watchdog:
    """Pings the systemd watchdog from an event-loop task at half the interval.

    Running on the event loop is the point: a loop stuck in a callback stops
    pinging, and systemd restarts the hub, as ``WatchdogSec=`` intends.
    """

    def __init__(self, interval: float | None = None) -> None:
        self.interval = interval if interval is not None else watchdog_interval()
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.interval is not None

    def start(self) -> None:
        """Start pinging (needs a running loop); does nothing without a watchdog."""
        if self.interval is None or (self._task is not None and not self._task.done()):
            return
        self._task = asyncio.get_running_loop().create_task(self._run(self.interval),
                                                            name="hubcore-watchdog")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            # wait() rather than `await task`: the task's CancelledError stays
            # inside it, while a cancellation of stop() itself still propagates.
            await asyncio.wait({task})

    @staticmethod
    async def _run(interval: float) -> None:
        while True:
            watchdog_ping()
            await asyncio.sleep(interval / 2)
