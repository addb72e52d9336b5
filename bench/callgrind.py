"""Instructions counted by valgrind's callgrind: run a command under it and
read the total it wrote for each thread. A count repeats from run to run
where time on a shared machine does not (`python -m bench.hotpath
--instructions` is built on it).
"""
from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

OUT_NAME = "callgrind.out"


class CallgrindError(RuntimeError):
    """An output file callgrind should have written is missing or unreadable."""


def find_valgrind() -> str | None:
    return shutil.which("valgrind")


def run(valgrind: str, command: Sequence[str], outdir: Path, *, env: Mapping[str, str] | None = None,
        timeout: float | None = None) -> tuple[dict[int, int], subprocess.CompletedProcess[str]]:
    """Run `command` under callgrind, one output file per thread in `outdir`
    (empty); return instructions by thread number (none if it failed), and
    the finished process (its output and valgrind's, captured). Past
    `timeout` seconds the process is killed (subprocess.TimeoutExpired)."""
    proc = subprocess.run(
        [valgrind, "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={outdir / OUT_NAME}",
         *command],
        env=env, capture_output=True, text=True, check=False, timeout=timeout,
    )
    if proc.returncode != 0:
        return {}, proc
    return thread_totals(outdir), proc


def thread_totals(outdir: Path) -> dict[int, int]:
    """Instructions by callgrind's thread number (1: the main thread), from
    the `OUT_NAME-NN` files that --separate-threads=yes writes."""
    totals: dict[int, int] = {}
    for path in sorted(outdir.glob(OUT_NAME + "-*")):
        thread, instructions = read_totals(path.read_text(errors="replace"))
        totals[thread] = totals.get(thread, 0) + instructions
    if not totals:
        raise CallgrindError(f"callgrind wrote no per-thread output in {outdir}")
    return totals


def read_totals(text: str) -> tuple[int, int]:
    """(thread number, instructions) of one callgrind output file.

    The header names the thread (`thread: N`, 1 without
    --separate-threads) and the events counted (`events: Ir ...`); the
    file's total is the header's `summary:` line or, in files that have
    none, the `totals:` line at the end; either lists one figure per event.
    """
    thread = 1
    events: list[str] = []
    summary: list[str] | None = None
    totals: list[str] | None = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        if key == "thread":
            thread = int(value)
        elif key == "events":
            events = value.split()
        elif key == "summary":
            summary = value.split()
        elif key == "totals":
            totals = value.split()
    figures = summary if summary is not None else totals
    if figures is None or "Ir" not in events:
        raise CallgrindError("no instruction total (events: Ir, summary: or totals:) in a callgrind output file")
    return thread, int(figures[events.index("Ir")])
