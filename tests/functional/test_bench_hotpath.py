"""bench.hotpath --instructions without valgrind: the reading of callgrind's
output files, and the arithmetic that turns two runs into a figure per
request."""
from __future__ import annotations

import argparse
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from bench import callgrind, hotpath

# The head and tail of a file callgrind 3.19 writes with --separate-threads=yes.
THREAD_3 = """\
# callgrind format
version: 1
creator: callgrind-3.19.0
pid: 9872
cmd:  /usr/bin/python3 -m bench.hotpath --counted --batches 1 --requests 300
part: 1
thread: 3

desc: I1 cache:
desc: Timerange: Basic block 0 - 444038155
desc: Trigger: Program termination

positions: line
events: Ir
summary: 40431813


ob=(1) /usr/lib/x86_64-linux-gnu/libc.so.6
fl=(1) ./nptl/./nptl/pthread_create.c
fn=(1) start_thread
0 935
cfn=(3242) thread_run
calls=2 1368
0 859

totals: 40431813
"""

# Several events (--cache-sim=yes), no summary line: the total is the last line's.
CACHE_SIM = """\
# callgrind format
version: 1
positions: line
events: Dr Ir Dw
fn=(1) main
0 5 7 2

totals: 11 1234 9
"""


def test_a_file_gives_its_thread_and_the_instruction_total() -> None:
    assert callgrind.read_totals(THREAD_3) == (3, 40431813)
    # Without --separate-threads there is no thread line: the main thread's.
    assert callgrind.read_totals(CACHE_SIM) == (1, 1234)


def test_a_file_without_instruction_counts_is_an_error() -> None:
    with pytest.raises(callgrind.CallgrindError):
        callgrind.read_totals(CACHE_SIM.replace("events: Dr Ir Dw", "events: Dr Bc Dw"))
    with pytest.raises(callgrind.CallgrindError):
        callgrind.read_totals(CACHE_SIM.replace("totals:", "total-ish:"))


def test_a_directory_gives_the_total_of_each_thread(tmp_path: Path) -> None:
    (tmp_path / callgrind.OUT_NAME).write_text("")  # callgrind leaves the unsuffixed name empty
    (tmp_path / f"{callgrind.OUT_NAME}-01").write_text(THREAD_3.replace("thread: 3", "thread: 1"))
    (tmp_path / f"{callgrind.OUT_NAME}-03").write_text(THREAD_3)
    assert callgrind.thread_totals(tmp_path) == {1: 40431813, 3: 40431813}
    with pytest.raises(callgrind.CallgrindError):
        callgrind.thread_totals(tmp_path / "nothing")


def test_instructions_per_request_are_the_difference_of_the_two_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    small, large = hotpath.INSTRUCTION_RUNS
    per_request = {1: 600_000, 2: 0, 3: 130_000}  # loop, asyncio's worker (start-up only), usage writer
    start_up = {1: 2_400_000_000, 2: 377_000_000, 3: 1_000_000}
    commands: list[list[str]] = []

    def fake_run(valgrind: str, command: Sequence[str], outdir: Path, *, env: Mapping[str, str] | None = None,
                 timeout: float | None = None) -> tuple[dict[int, int], subprocess.CompletedProcess[str]]:
        commands.append(list(command))
        assert env is not None and env["PYTHONHASHSEED"] == "0"
        n = int(command[command.index("--requests") + 1])
        totals = {t: start_up[t] + (n + hotpath.WARMUP_REQUESTS) * per_request[t] for t in start_up}
        return totals, subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(callgrind, "run", fake_run)
    args = argparse.Namespace(body="small", no_access_log=True, redis=None)
    result = hotpath.count_instructions(args, "/usr/bin/valgrind")
    assert result["instructions_per_request"] == 730_000
    assert result["loop_thread"] == 600_000
    assert result["other_threads"] == 130_000
    assert [c[c.index("--requests") + 1] for c in commands] == [str(small), str(large)]
    for command in commands:
        assert command[1:3] == ["-m", "bench.hotpath"]
        assert {"--counted", "--no-access-log"} <= set(command)
        assert command[command.index("--body") + 1] == "small"
        assert command[command.index("--batches") + 1] == "1"


def test_a_failed_run_is_reported_with_its_output(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(valgrind: str, command: Sequence[str], outdir: Path, *, env: Mapping[str, str] | None = None,
                 timeout: float | None = None) -> tuple[dict[int, int], subprocess.CompletedProcess[str]]:
        return {}, subprocess.CompletedProcess(command, 1, "usage rows written: 289 of 300 requests\n", "")

    monkeypatch.setattr(callgrind, "run", fake_run)
    args = argparse.Namespace(body="large", no_access_log=False, redis=None)
    with pytest.raises(hotpath.ChildFailed, match="289 of 300"):
        hotpath.count_instructions(args, "/usr/bin/valgrind")


def test_a_run_that_does_not_end_is_reported_with_its_output(monkeypatch: pytest.MonkeyPatch) -> None:
    # A start that failed once left the usage writer's thread holding the
    # process open: a stuck run must end the count, not hang it.
    def fake_run(valgrind: str, command: Sequence[str], outdir: Path, *, env: Mapping[str, str] | None = None,
                 timeout: float | None = None) -> tuple[dict[int, int], subprocess.CompletedProcess[str]]:
        assert timeout == hotpath.COUNTED_RUN_TIMEOUT
        raise subprocess.TimeoutExpired(list(command), timeout, output=None, stderr=b"StartFailed: cannot listen\n")

    monkeypatch.setattr(callgrind, "run", fake_run)
    args = argparse.Namespace(body="large", no_access_log=False, redis=None)
    with pytest.raises(hotpath.ChildFailed, match="(?s)did not end in .*StartFailed: cannot listen"):
        hotpath.count_instructions(args, "/usr/bin/valgrind")


def test_without_valgrind_the_option_exits_2(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(callgrind, "find_valgrind", lambda: None)
    assert hotpath.main(["--instructions"]) == 2
    assert "valgrind" in capsys.readouterr().err
