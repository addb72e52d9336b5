"""Spool, the append-only file of usage events (one JSON object a line) that
holds what the database cannot take yet, and the encoding of those lines. It
knows files, not SQLite: the recorder reads it back and inserts the events.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from hubcore.accounting.usage import FIELDS, UsageEvent

# Appending: unwritable path, disk full (OSError); an event field orjson
# cannot encode even with default=str (TypeError).
SPOOL_ERRORS = (OSError, TypeError, ValueError)

# Bytes read from the spool per replay step: parsing one step holds the event
# loop for about a millisecond, and replay awaits the database between steps.
SPOOL_READ_CHUNK = 256 * 1024

_FIELD_SET = frozenset(FIELDS)


def encode_line(event: UsageEvent) -> bytes:
    """One spool line, newline included."""
    # orjson encodes slotted dataclasses as objects keyed by field name, which
    # keeps the spool readable by a later hubcore whose UsageEvent has grown.
    return orjson.dumps(event, default=str, option=orjson.OPT_APPEND_NEWLINE)


def decode_line(line: bytes) -> UsageEvent | None:
    """The event of one spool line, or None if the line is unreadable.

    Keys UsageEvent does not know are dropped, and fields a line lacks take
    their defaults: lines written by an older or newer hubcore still read.
    """
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    try:
        return UsageEvent(**{k: v for k, v in data.items() if k in _FIELD_SET})
    except TypeError:  # a required field is missing
        return None


@dataclass(slots=True)
class SpoolChunk:
    """What one replay step read; `Spool.consume(chunk)` once it is stored."""

    events: list[UsageEvent] = field(default_factory=list)
    bad: int = 0      # unreadable lines
    skipped: int = 0  # lines whose rows the database has already (Spool.skip)
    end: int = 0      # file offset just past the last line this chunk read
    torn: int = 0     # bytes of a last line its writer never finished


class Spool:
    """An append-only file of event lines, read back from where the last
    replay stopped and emptied once all of it was read.

    Call every method from one thread (the recorder's event loop): the
    offset, the line counts and the file size are checked and changed without
    locks, and `truncate_if_consumed()` relies on no append coming between its
    size check and its truncate.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self.offset = 0           # bytes replay has consumed
        self.lines = 0            # event lines in the file since it was last truncated
        self.consumed = 0         # of those, lines replay has read
        self.bad_lines = 0        # unreadable or torn lines replay skipped, ever
        self.torn = False         # the file ends mid-line (a failed partial write)
        self.dirty = False        # appended without fsync
        # request ids of lines whose rows are in the database already
        self._skip: set[str] = set()

    # -- file -------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def open(self, *, count_lines: bool = False) -> None:
        """Open (or create) the file for appending; a no-op if open.

        `count_lines` counts the lines already in it as pending, as for a
        spool left by a previous run. Raises OSError.
        """
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size:
                # A file that does not end in a newline was torn mid-write
                # (kill -9, disk full): the next append must start a new line.
                self.torn = os.pread(fd, 1, size - 1) != b"\n"
                if count_lines:
                    self.lines = _count_lines(fd, size)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def size(self) -> int:
        return os.fstat(self._fd_or_raise()).st_size

    def close(self) -> None:
        """Close the file; raises OSError (the file is closed all the same)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    # -- writing ----------------------------------------------------------------

    def append(self, events: Sequence[UsageEvent], *, sync: bool) -> None:
        """Append events, fsynced if `sync`, else marked dirty; opens the file
        if needed. Raises one of SPOOL_ERRORS, and then counts nothing."""
        data = b"".join([encode_line(e) for e in events])
        self.open()
        fd = self._fd_or_raise()
        if self.torn:
            data = b"\n" + data
        view = memoryview(data)
        done = 0
        try:
            while done < len(data):
                done += os.write(fd, view[done:])
        except OSError:
            if done and data[done - 1] != 0x0A:
                self.torn = True
            elif done:
                self.torn = False
            raise
        self.torn = False
        if sync:
            os.fsync(fd)
        else:
            self.dirty = True
        self.lines += len(events)

    def fsync(self) -> None:
        """Sync what `append(sync=False)` wrote. Raises OSError; either way
        the spool is no longer dirty, so a failing disk is not retried in a loop."""
        self.dirty = False
        if self._fd is not None:
            os.fsync(self._fd)

    # -- reading back -----------------------------------------------------------

    @property
    def pending(self) -> int:
        """Lines appended that replay has not read yet."""
        return max(0, self.lines - self.consumed)

    def skip(self, request_ids: Iterable[str]) -> None:
        """Have replay pass over the lines of these events: their rows are in
        the database already (a write that went in after its batch was spooled)."""
        self._skip.update(request_ids)

    def read(self) -> Iterator[SpoolChunk]:
        """The complete lines after the replay offset, a chunk at a time, up
        to the end the file has now: lines appended meanwhile wait for the
        next read. Nothing counts as read until `consume(chunk)`. A torn last
        line comes as a final chunk with `torn` set. Raises OSError."""
        if self._fd is None:
            if not self.path.exists():
                self.lines = self.consumed = 0
                return
            self.open(count_lines=True)
        fd = self._fd_or_raise()
        end = os.fstat(fd).st_size
        pos = self.offset
        carry = b""
        skip = self._skip
        while pos < end:
            data = os.pread(fd, min(SPOOL_READ_CHUNK, end - pos), pos)
            if not data:
                break
            pos += len(data)
            if carry:
                data = carry + data
            cut = data.rfind(b"\n") + 1
            carry = data[cut:]
            chunk = SpoolChunk(end=pos - len(carry))
            for line in data[:cut].split(b"\n"):
                if not line.strip():
                    continue
                event = decode_line(line)
                if event is None:
                    chunk.bad += 1
                elif skip and event.request_id in skip:
                    skip.discard(event.request_id)
                    chunk.skipped += 1
                else:
                    chunk.events.append(event)
            yield chunk
        if carry:
            yield SpoolChunk(end=end, torn=len(carry))

    def consume(self, chunk: SpoolChunk) -> None:
        """Mark a chunk from `read()` as stored: replay goes on after it."""
        self.offset = chunk.end
        # A torn line was never counted in `lines` (it has no newline).
        self.consumed += len(chunk.events) + chunk.bad + chunk.skipped
        self.bad_lines += chunk.bad + (1 if chunk.torn else 0)

    def truncate_if_consumed(self) -> bool:
        """Empty the file if replay has consumed all of it; False if anything
        is left or was appended since the read began. Raises OSError."""
        if self._fd is None or self.offset < os.fstat(self._fd).st_size:
            return False
        os.ftruncate(self._fd, 0)
        self.offset = 0
        self.lines = self.consumed = 0
        self.torn = False
        self._skip.clear()
        return True

    def _fd_or_raise(self) -> int:
        if self._fd is None:
            raise OSError(f"usage spool {self.path} is not open")
        return self._fd


def _count_lines(fd: int, size: int) -> int:
    count = 0
    pos = 0
    while pos < size:
        chunk = os.pread(fd, SPOOL_READ_CHUNK, pos)
        if not chunk:
            break
        count += chunk.count(b"\n")
        pos += len(chunk)
    return count
