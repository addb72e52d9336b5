"""Profile hubcore under the latency-tax load with py-spy: the hub and the fake
vendor started as `python -m bench` starts them, the load generator at c=1
and c=16 (90 KB body, 20-event stream), one py-spy recording per level, and
a summary of where the hub's CPU goes. Run `python -m bench.profile`
(needs `pip install py-spy` and ptrace rights on the hub process).
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench import payloads, services
from bench.latency_tax import RESULTS
from bench.vendor import raise_fd_limit

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


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


def summarise(raw: Path, top: int = 25) -> str:
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
        func, file, lineno = frames[-1]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS / "profile"), help="output directory (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=10.0, help="recording time per concurrency level")
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated levels (default: %(default)s)")
    parser.add_argument("--body", default="large", choices=sorted(payloads.BODIES))
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--native", action="store_true", help="include native frames (uvloop, httptools, the meter)")
    parser.add_argument("--hubcore-path", help="run the hub from this source tree instead of this checkout")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 2
    raise_fd_limit()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hubcore-profile-"))
    vendor = services.start_vendor(work)
    hub = services.start_hub(work, "hub", f"http://127.0.0.1:{vendor.port}", 1024, args.hubcore_path)
    gen = services.LoadGen()
    try:
        for level in (int(c) for c in args.concurrency.split(",")):
            job = dict(host="127.0.0.1", port=hub.port, auth_name="x-api-key", auth_value=hub.token,
                       body=args.body, events=args.events, pace_ms=0.0, concurrency=level, duration=1.0)
            services.run_jobs([gen], [job])  # warm the pools
            raw = out / f"hub-c{level}.txt"
            cmd = [py_spy, "record", "--pid", str(hub.pid), "--rate", str(args.rate), "--format", "raw",
                   "--duration", str(round(args.seconds)), "-o", str(raw)]
            # Native unwinding must stop the process for each sample; without
            # it, sampling does not pause the hub.
            cmd.append("--native" if args.native else "--nonblocking")
            spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.5)
            cpu0 = services.cpu_seconds(hub.pid)
            result = services.run_jobs([gen], [job | {"duration": args.seconds - 1.0}])[0]
            cpu = services.cpu_seconds(hub.pid) - cpu0
            _, err = spy.communicate(timeout=args.seconds + 60)
            if spy.returncode != 0:
                print(f"py-spy failed: {err.decode().strip()}", file=sys.stderr)
                return 1
            n = result["requests"]
            header = (f"## hub at c={level}: {n} requests in {result['wall']:.1f} s ({n / result['wall']:.0f} req/s), "
                      f"hub CPU {cpu:.2f} s ({cpu / max(n, 1) * 1e6:.0f} µs per request, sampled under py-spy)\n")
            text = header + summarise(raw)
            (out / f"hub-c{level}.summary.txt").write_text(text)
            print(text)
    finally:
        gen.close()
        hub.stop()
        vendor.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"(collapsed stacks in {out}; open them in speedscope or flamegraph.pl)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
