"""Where the hub's CPU goes under the latency-tax load, at c=1 and c=16 (90 KB
body, 20-event stream): the hub and the fake vendor started as `python -m
bench` starts them, then either

- `--mode spy` (default): py-spy samples the running hub (`pip install
  py-spy`; needs ptrace rights); wall-clock samples, so on a busy machine the
  calls that wake another process (socket writes) look heavier than they are;
- `--mode calls`: the hub runs under cProfile with a thread-CPU clock and the
  summary counts Python calls per request, the number to drive down (the hub
  spends roughly its per-call cost times that count), free of timing noise;
- `--mode perf`: the saturation phase's set-up (hubcore and bench/floor.py in
  front of nginx serving the recorded stream, wrk as the client; `apt-get
  install nginx wrk linux-perf`), each proxy measured once plain (req/s, CPU
  per request) and once under `perf record` with call graphs; the busiest
  thread's CPU is split by library, system call and interpreter function
  (bench/perfsplit.py). Neither of the other modes sees a compiled request
  path: this one shows what is left of the interpreter in it, and which
  compiled code asks for it.

Run `python -m bench.profile [--mode calls|perf]`.
"""
from __future__ import annotations

import argparse
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import payloads, perfsplit, services
from bench.latency_tax import CLIENT_CREDENTIAL, FLOOR, HEADLINE, RESULTS, Bench, full_plan
from bench.vendor import raise_fd_limit

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")
# `python -c` program: hubcore's CLI under cProfile timed by this thread's CPU
# clock (so time spent preempted is not charged); stats dumped at SIGTERM.
CPROFILE_LAUNCHER = """\
import cProfile, sys, time
from hubcore import cli
out = sys.argv[1]
profiler = cProfile.Profile(time.thread_time)
profiler.enable()
try:
    cli.main(sys.argv[2:])
finally:
    profiler.disable()
    profiler.dump_stats(out)
"""


def _frame(frame: str) -> tuple[str, str, str]:
    m = FRAME.match(frame)
    if m is None:
        return frame, "", ""
    return m["func"], m["file"], m["line"] or ""


def _short(path: str) -> str:
    for marker in ("/hubcore/", "/site-packages/", "/lib/python3"):
        i = path.rfind(marker)
        if i >= 0:
            return path[i + 1:]
    return path


def _is_hub(path: str) -> bool:
    return path.startswith("hubcore/") or ("/hubcore/" in path and "site-packages" not in path)


def summarise_spy(raw: Path, top: int = 25) -> str:
    """Self and inclusive shares by function, and the hottest hubcore lines,
    from py-spy's collapsed-stack output."""
    self_fn: Counter[str] = Counter()
    incl_fn: Counter[str] = Counter()
    hub_lines: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame(f) for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        func, file, _ = frames[-1]
        self_fn[f"{func} ({_short(file)})"] += count
        for name in {f"{fn} ({_short(fl)})" for fn, fl, _ in frames}:
            incl_fn[name] += count
        # The innermost hubcore frame: where hub code spends (or calls into) the time.
        for fn, fl, ln in reversed(frames):
            if _is_hub(fl):
                hub_lines[f"{_short(fl)}:{ln} {fn}"] += count
                break
    if not total:
        return "(no samples)\n"
    out = [f"{total} samples\n", "self (innermost frame):"]
    out += [f"  {n / total * 100:5.1f}%  {name}" for name, n in self_fn.most_common(top)]
    out += ["", "inclusive:"]
    out += [f"  {n / total * 100:5.1f}%  {name}" for name, n in incl_fn.most_common(top)]
    out += ["", "innermost hubcore line on the stack:"]
    out += [f"  {n / total * 100:5.1f}%  {name}" for name, n in hub_lines.most_common(top)]
    return "\n".join(out) + "\n"


def summarise_calls(prof: Path, requests: int, top: int = 40) -> str:
    """Python calls per request, per function and in its whole subtree (the
    call graph's edge counts pushed down; cycles cut), with thread-CPU shares.
    The shares are inflated for call-heavy code by the profiler's own cost."""
    stats: dict[Any, Any] = pstats.Stats(str(prof)).stats  # type: ignore[attr-defined]
    callees: dict[Any, dict[Any, int]] = {}
    for func, (_, _, _, _, callers) in stats.items():
        for caller, edge in callers.items():
            callees.setdefault(caller, {})[func] = edge[1]
    memo: dict[Any, float] = {}

    def subtree(func: Any, stack: frozenset[Any] = frozenset()) -> float:
        if func in memo:
            return memo[func]
        if func in stack:
            return 1.0
        calls = stats[func][1] or 1
        total = 1.0 + sum(n / calls * subtree(g, stack | {func}) for g, n in callees.get(func, {}).items())
        memo[func] = total
        return total

    cpu = sum(v[2] for v in stats.values()) or 1.0
    all_calls = sum(v[1] for v in stats.values())
    rows = []
    for func, (_, calls, tottime, cumtime, _) in stats.items():
        per = calls / requests
        if per >= 0.5 and ("hubcore" in func[0] or "logging" in func[0]):
            rows.append((per * subtree(func), per, tottime / cpu, cumtime / cpu, func))
    rows.sort(key=lambda r: -r[0])
    out = [f"{all_calls / requests:.0f} calls per request (all functions, C included)\n",
           "calls in subtree/req | calls/req | self CPU | incl CPU | function"]
    for sub, per, self_share, incl_share, (file, line, name) in rows[:top]:
        out.append(f"{sub:20.1f} | {per:9.1f} | {self_share * 100:7.1f}% | {incl_share * 100:7.1f}% | {_short(file)}:{line} {name}")
    return "\n".join(out) + "\n"


def _job(hub: services.Hub, level: int, args: argparse.Namespace, duration: float) -> dict[str, Any]:
    return dict(host="127.0.0.1", port=hub.port, auth_name="x-api-key", auth_value=hub.token,
                body=args.body, events=args.events, pace_ms=0.0, concurrency=level, duration=duration)


def _spy(args: argparse.Namespace, work: Path, vendor: services.Service, gen: services.LoadGen, out: Path) -> int:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 2
    hub = services.start_hub(work, "hub", f"http://127.0.0.1:{vendor.port}", 1024, args.hubcore_path)
    try:
        for level in args.levels:
            services.run_jobs([gen], [_job(hub, level, args, 1.0)])  # warm the pools
            raw = out / f"hub-c{level}.txt"
            cmd = [py_spy, "record", "--pid", str(hub.pid), "--rate", str(args.rate), "--format", "raw",
                   "--duration", str(round(args.seconds)), "-o", str(raw)]
            # Native unwinding must stop the process for each sample; without
            # it, sampling does not pause the hub.
            cmd.append("--native" if args.native else "--nonblocking")
            spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.5)
            cpu0 = services.cpu_seconds(hub.pid)
            result = services.run_jobs([gen], [_job(hub, level, args, args.seconds - 1.0)])[0]
            cpu = services.cpu_seconds(hub.pid) - cpu0
            _, err = spy.communicate(timeout=args.seconds + 60)
            if spy.returncode != 0:
                print(f"py-spy failed: {err.decode().strip()}", file=sys.stderr)
                return 1
            n = result["requests"]
            header = (f"## hub at c={level}: {n} requests in {result['wall']:.1f} s ({n / result['wall']:.0f} req/s), "
                      f"hub CPU {cpu:.2f} s ({cpu / max(n, 1) * 1e6:.0f} µs per request, under py-spy)\n")
            text = header + summarise_spy(raw)
            (out / f"hub-c{level}.summary.txt").write_text(text)
            print(text)
    finally:
        hub.stop()
    print(f"(collapsed stacks in {out}; open them in speedscope or flamegraph.pl)")
    return 0


def _calls(args: argparse.Namespace, work: Path, vendor: services.Service, gen: services.LoadGen, out: Path) -> int:
    for level in args.levels:
        prof = out / f"hub-c{level}.pstats"
        launcher = [sys.executable, "-c", CPROFILE_LAUNCHER, str(prof)]
        hub = services.start_hub(work, f"hub-c{level}", f"http://127.0.0.1:{vendor.port}", 1024,
                                 args.hubcore_path, launcher)
        try:
            result = services.run_jobs([gen], [_job(hub, level, args, args.seconds)])[0]
        finally:
            hub.stop()  # SIGTERM: the hub drains, the launcher dumps the stats
        n = result["requests"] + result["warmups"]
        text = f"## hub at c={level}: {n} requests under cProfile (thread CPU clock)\n" + summarise_calls(prof, n)
        (out / f"hub-c{level}.calls.txt").write_text(text)
        print(text)
    print(f"(cProfile stats in {out}: python -m pstats FILE)")
    return 0


def _perf(args: argparse.Namespace, work: Path, out: Path) -> int:
    perf = shutil.which("perf")
    missing = [name for name, found in (("perf", perf), ("wrk", services.find_wrk()), ("nginx", services.find_nginx()))
               if found is None]
    if missing:
        print(f"{', '.join(missing)} not found: apt-get install -y linux-perf wrk nginx", file=sys.stderr)
        return 2
    assert perf is not None
    bench = Bench(full_plan(), work, 1, True, True, args.hubcore_path)
    try:
        bench.start()
        assert bench.wrk_bin is not None and bench.hub_static is not None and bench.floor is not None
        targets = {
            "hubcore": (bench.hub_static.port, bench.hub_static.token, bench.hub_static.pid),
            FLOOR: (bench.floor.port, CLIENT_CREDENTIAL, bench.floor.pid),
        }
        body = work / f"body-{args.body}.json"
        body.write_bytes(payloads.BODIES[args.body]())
        for level in args.levels:
            report = []
            for path, (port, credential, pid) in targets.items():
                slug = path.replace(" ", "-")
                script = work / f"wrk-{slug}.lua"
                services.wrk_script(script, body, (b"x-api-key", credential.encode()), HEADLINE.events)
                services.run_wrk(bench.wrk_bin, port, script, level, 1.0)  # warm the pools
                # Plain first: perf's unwinding costs the sampled process CPU.
                user0, sys0 = services.family_cpu_split(pid)
                plain = services.run_wrk(bench.wrk_bin, port, script, level, args.seconds)
                user1, sys1 = services.family_cpu_split(pid)
                requests = plain.get("requests") or 0
                cpu_us = ((user1 - user0) + (sys1 - sys0)) / requests * 1e6 if requests else None
                data = out / f"perf-{slug}-c{level}.data"
                record = subprocess.Popen(
                    [perf, "record", "-q", "-F", str(args.rate), "--call-graph", "dwarf,16384", "-o", str(data),
                     "-p", ",".join(map(str, services.family(pid))), "--", "sleep", str(max(1, round(args.seconds)))],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                # wrk starts just after the recording and outlasts it; the
                # moment before wrk connects adds no samples (an idle loop uses no CPU).
                time.sleep(0.2)
                services.run_wrk(bench.wrk_bin, port, script, level, args.seconds + 2)
                _, err = record.communicate(timeout=args.seconds + 60)
                if record.returncode != 0:
                    print(f"perf record failed: {err.decode().strip()}", file=sys.stderr)
                    return 1
                script_out = subprocess.run([perf, "script", "-F", "tid,ip,sym,dso", "-i", str(data)],
                                            capture_output=True, text=True, timeout=600)
                if script_out.returncode != 0:
                    print(f"perf script failed: {script_out.stderr.strip()}", file=sys.stderr)
                    return 1
                result = perfsplit.split(perfsplit.samples(script_out.stdout.splitlines()))
                cpu_text = f"{cpu_us:.1f} µs of CPU a request (user + system)" if cpu_us is not None else "CPU unknown"
                title = (f"{path} at c={level} ({args.body} body): {plain['rps']:.0f} req/s, {cpu_text}; "
                         f"{result.total} samples at {args.rate} Hz")
                report.append(perfsplit.render(title, result, cpu_us))
            text = "\n".join(report)
            (out / f"perf-c{level}.md").write_text(text)
            print(text)
    finally:
        bench.close()
    print(f"(perf data in {out}: perf report -i FILE)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("spy", "calls", "perf"), default="spy")
    parser.add_argument("--out", default=str(RESULTS / "profile"), help="output directory (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=10.0, help="load time per concurrency level")
    parser.add_argument("--rate", type=int, default=500, help="py-spy's or perf's samples per second")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated levels (default: %(default)s)")
    parser.add_argument("--body", default="large", choices=sorted(payloads.BODIES))
    parser.add_argument("--events", type=int, default=20,
                        help="events a stream (spy, calls; perf serves the recorded 20-event stream)")
    parser.add_argument("--native", action="store_true", help="spy: include native frames (uvloop, httptools, the meter)")
    parser.add_argument("--hubcore-path", help="run the hub from this source tree instead of this checkout")
    args = parser.parse_args(argv)
    args.levels = [int(c) for c in args.concurrency.split(",")]
    raise_fd_limit()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hubcore-profile-"))
    if args.mode == "perf":
        try:
            return _perf(args, work, out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    vendor = services.start_vendor(work)
    gen = services.LoadGen()
    try:
        return (_calls if args.mode == "calls" else _spy)(args, work, vendor, gen, out)
    finally:
        gen.close()
        vendor.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
