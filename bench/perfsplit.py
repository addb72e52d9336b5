"""The reading of `perf script` output for `python -m bench.profile --mode
perf`: where a proxy process's CPU goes once its request path is compiled,
which py-spy and cProfile no longer see.

Each sample is a thread and a call stack of native frames. The busiest
thread (the event loop's) is split by the library its innermost frame is in
(the kernel, the interpreter, hubcore's compiled modules, httptools, uvloop,
orjson, SQLite, libc); its kernel time by the system call it is in; and its
interpreter time by function and by the nearest frame above that is not the
interpreter, which is the compiled code that asked for it (an attribute
lookup, an allocation, a call through a Python method)."""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

# `perf script -F tid,ip,sym,dso` with call graphs: a line with the thread
# id (padded on the left), then one line per frame, innermost first
# ("\t<address> <symbol> (<dso>)"), then a blank line. A frame inlined
# into the next one has "(inlined)" where the dso goes.
FRAME = re.compile(r"^\s+[0-9a-f]+ (?P<sym>.*) \((?P<dso>[^()]*)\)$")

# Library groups, in the order the tables show them.
KERNEL = "kernel"
INTERPRETER = "interpreter (libpython)"
HUBCORE = "hubcore, compiled"
GROUPS = (
    (KERNEL, ("[kernel.kallsyms]", "[kernel]")),
    (INTERPRETER, ("libpython",)),
    (HUBCORE, ("/hubcore/",)),
    ("httptools", ("httptools",)),
    ("uvloop", ("uvloop",)),
    ("orjson", ("orjson",)),
    ("SQLite", ("libsqlite3",)),
    ("libc", ("libc.so", "libc-")),
)
# The kernel frame every system call passes through; the frame just inside
# it (the next one toward the leaf) names the call.
SYSCALL_ENTRY = "do_syscall_64"


@dataclass
class Sample:
    tid: int
    frames: list[tuple[str, str]] = field(default_factory=list)  # (symbol, dso), innermost first


def samples(lines: Iterable[str]) -> Iterator[Sample]:
    """The samples of `perf script -F tid,ip,sym,dso` output; inlined frames
    are dropped (their caller's frame follows with the dso)."""
    current: Sample | None = None
    for line in lines:
        if not line.strip():
            if current is not None:
                yield current
            current = None
            continue
        if not line.startswith("\t"):
            # A sample's first line: its thread id, right-aligned in a few
            # columns (" 2482 "); frames are the lines that begin with a tab.
            head = line.split()
            if head and head[0].isdigit():
                current = Sample(int(head[0]))
            continue
        m = FRAME.match(line.rstrip("\n"))
        if m is None or current is None or m["dso"] == "inlined":
            continue
        current.frames.append((m["sym"], m["dso"]))
    if current is not None:
        yield current


def group(dso: str) -> str:
    for name, marks in GROUPS:
        if any(mark in dso for mark in marks):
            return name
    return dso.rsplit("/", 1)[-1] or "(unknown)"


_CYTHON = re.compile(r"^__pyx_(?:f|pw|pf|tp_dealloc|tp_new|tp_traverse|tp_clear)_(?P<rest>.*)$")


def readable(symbol: str) -> str:
    """A Cython function's C name as module.Class.function: its path comes
    length-prefixed (`__pyx_f_7hubcore_4http_5_conn_8ConnCore__received`),
    the function last, with an index in front for a Python-visible one."""
    m = _CYTHON.match(symbol)
    if m is None:
        return symbol
    rest, parts = m["rest"], []
    while True:
        n = re.match(r"\d+", rest)
        if n is None:
            break
        size, start = int(n.group()), n.end()
        token = rest[start:start + size]
        after = rest[start + size:start + size + 1]
        if len(token) < size or after not in ("_", ""):
            break
        parts.append(token)
        rest = rest[start + size + 1:]
        if not rest:
            break
    if rest:
        parts.append(re.sub(r"^\d+", "", rest))
    if parts and parts[0] == "hubcore":
        parts = parts[1:]
    return ".".join(p for p in parts if p) or symbol


@dataclass
class Split:
    """One process's samples, its busiest thread split four ways."""
    total: int
    threads: list[tuple[int, int]]          # (tid, samples), busiest first
    loop: int                               # the busiest thread's samples
    groups: Counter[str]
    syscalls: Counter[str]
    interpreter: Counter[str]
    interpreter_callers: Counter[str]


def split(stream: Iterable[Sample]) -> Split:
    by_thread: dict[int, list[Sample]] = {}
    for sample in stream:
        if sample.frames:
            by_thread.setdefault(sample.tid, []).append(sample)
    threads = sorted(((tid, len(s)) for tid, s in by_thread.items()), key=lambda t: -t[1])
    result = Split(sum(n for _, n in threads), threads, 0, Counter(), Counter(), Counter(), Counter())
    if not threads:
        return result
    loop = by_thread[threads[0][0]]
    result.loop = len(loop)
    for sample in loop:
        symbol, dso = sample.frames[0]
        kind = group(dso)
        result.groups[kind] += 1
        if kind == KERNEL:
            names = [s for s, d in sample.frames if group(d) == KERNEL]
            if SYSCALL_ENTRY in names:
                i = names.index(SYSCALL_ENTRY)
                result.syscalls[names[i - 1] if i else "(entry)"] += 1
            else:
                result.syscalls["(no system call: " + names[-1] + ")"] += 1
        elif kind == INTERPRETER:
            result.interpreter[symbol] += 1
            caller = next((s for s, d in sample.frames[1:] if group(d) != INTERPRETER), "(none)")
            result.interpreter_callers[readable(caller)] += 1
    return result


def render(title: str, s: Split, cpu_us: float | None, top: int = 12) -> str:
    """Markdown: the threads, then the busiest thread's split, in µs a
    request where the process's CPU per request is known."""
    if not s.total:
        return f"## {title}\n\n(no samples)\n"
    out = [f"## {title}", ""]
    out.append("threads: " + ", ".join(f"{tid} {n / s.total:.1%}" for tid, n in s.threads[:4])
               + " (the busiest is the event loop's)")
    loop_us = cpu_us * s.loop / s.total if cpu_us is not None else None

    def rows(counter: Counter[str], what: str, limit: int) -> None:
        out.append("")
        out.append(f"| {what} | share of the event loop's CPU |" + (" µs a request |" if loop_us is not None else ""))
        out.append("|---|--:|" + ("--:|" if loop_us is not None else ""))
        for name, n in counter.most_common(limit):
            share = n / s.loop
            cells = f"| {name[:90]} | {share:.1%} |"
            if loop_us is not None:
                cells += f" {share * loop_us:.1f} |"
            out.append(cells)

    rows(s.groups, "innermost frame in", len(s.groups))
    rows(s.syscalls, "kernel, by system call", 6)
    rows(s.interpreter, "interpreter, by function", top)
    rows(s.interpreter_callers, "interpreter, by the compiled caller nearest above", top)
    return "\n".join(out) + "\n"
