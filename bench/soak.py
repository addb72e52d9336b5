"""Soak: a hub under steady streaming traffic for minutes, its memory watched.

`python -m bench.soak --minutes N` starts the benchmark's fake vendor and a
hub in front of it (bench/services.py, as `python -m bench` does), keeps
`--clients` keep-alive connections making paced streaming requests back to
back (bench/loadgen.py), reads the hub's VmRSS from /proc/PID/status every
`--sample-seconds`, and prints RSS per sample and its growth after warm-up
(from the first sample to the last). It stops by itself after N minutes.
Exit status 1 if any request failed, any stream came back altered, or any
request through the hub left no usage row; growth is reported, never judged.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import services
from bench.latency_tax import workdir
from bench.vendor import raise_fd_limit

# --quick: enough samples to draw a line through, in well under a minute.
QUICK_SECONDS = 20.0
QUICK_SAMPLE_SECONDS = 5.0
# Beyond the planned duration: the load generator's last streams finish
# (each is events x pace, 1 s by default) and the hub flushes its rows.
GRACE_SECONDS = 120.0
# Seconds the hub gets after the load to write its last usage rows.
ROWS_TIMEOUT = 15.0


@dataclass
class Sample:
    elapsed: float      # seconds since the load started
    rss_kib: int        # VmRSS of the hub process
    usage_rows: int     # rows in its database so far


def vm_rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB, as /proc/PID/status reports it."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid} (a kernel thread, or it exited)")


def growth_percent(samples: list[Sample]) -> float | None:
    """RSS growth from the first sample (taken after a sample interval of
    load: warm-up) to the last, in percent; None with fewer than two."""
    loaded = [s for s in samples if s.elapsed > 0]
    if len(loaded) < 2:
        return None
    return (loaded[-1].rss_kib - loaded[0].rss_kib) * 100.0 / loaded[0].rss_kib


def render(samples: list[Sample], result: dict[str, Any], rows: int) -> str:
    lines = ["| elapsed | hub RSS MiB | usage rows |", "|--:|--:|--:|"]
    for s in samples:
        label = "0 s (idle)" if s.elapsed == 0 else f"{s.elapsed:.0f} s"
        lines.append(f"| {label} | {s.rss_kib / 1024:.1f} | {s.usage_rows:,} |")
    growth = growth_percent(samples)
    lines.append("")
    if growth is None:
        lines.append("growth after warm-up: not measured (fewer than two samples under load)")
    else:
        first = next(s for s in samples if s.elapsed > 0)
        lines.append(f"growth after warm-up ({first.elapsed:.0f} s to {samples[-1].elapsed:.0f} s): {growth:+.1f}%")
    expected = result["requests"] + result["warmups"]
    lines.append(f"requests: {expected:,} ({result['errors']} failed, {result['bad_streams']} bad streams); "
                 f"usage rows: {rows:,} of {expected:,}")
    return "\n".join(lines) + "\n"


def failures(result: dict[str, Any], rows: int) -> list[str]:
    out = []
    if result["errors"] or result["bad_streams"]:
        out.append(f"{result['errors']} failed requests, {result['bad_streams']} bad streams; first: {result['error_sample']}")
    expected = result["requests"] + result["warmups"]
    if rows < expected:
        out.append(f"{expected - rows} usage rows missing ({rows} for {expected} requests)")
    return out


def soak(work: Path, seconds: float, sample_seconds: float, clients: int, events: int, pace_ms: float,
         body: str) -> tuple[list[Sample], dict[str, Any], int]:
    """Run the load; the samples, the load generator's result and the final usage row count."""
    vendor = services.start_vendor(work)
    hub: services.Hub | None = None
    gen: services.LoadGen | None = None
    try:
        hub = services.start_hub(work, "hub", f"http://127.0.0.1:{vendor.port}", pool=clients)
        gen = services.LoadGen()
        samples = [Sample(0.0, vm_rss_kib(hub.pid), services.usage_rows(hub.database))]
        job = {
            "host": "127.0.0.1", "port": hub.port, "auth_name": "x-api-key", "auth_value": hub.token,
            "body": body, "events": events, "pace_ms": pace_ms, "concurrency": clients, "duration": seconds,
        }
        started = time.monotonic()
        deadline = started + seconds + GRACE_SECONDS
        due = [started + sample_seconds * k for k in range(1, int(seconds / sample_seconds + 1e-9) + 1)]
        running = hub

        def sample() -> None:
            now = time.monotonic()
            if due and now >= due[0]:
                due.pop(0)
                samples.append(Sample(now - started, vm_rss_kib(running.pid), services.usage_rows(running.database)))
            if now > deadline:
                raise TimeoutError(f"the load generator did not finish within {seconds + GRACE_SECONDS:g} s")
            if running.proc.poll() is not None:
                raise RuntimeError(f"the hub exited with status {running.proc.returncode} (see {work / 'hub' / 'hubcore.log'})")

        (result,) = services.run_jobs([gen], [job], sample=sample, every=0.2)
        # A sample due at the very end may fall after the last stream ended.
        for _ in due:
            samples.append(Sample(time.monotonic() - started, vm_rss_kib(hub.pid), services.usage_rows(hub.database)))
        expected = result["requests"] + result["warmups"]
        rows_deadline = time.monotonic() + ROWS_TIMEOUT
        rows = services.usage_rows(hub.database)
        while rows < expected and time.monotonic() < rows_deadline:
            time.sleep(0.1)
            rows = services.usage_rows(hub.database)
        return samples, result, rows
    finally:
        if gen is not None:
            gen.close()
        if hub is not None:
            hub.stop()
        vendor.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the load runs (default: %(default)g)")
    parser.add_argument("--sample-seconds", type=float, default=60.0,
                        help="seconds between RSS samples; the first is the warm-up (default: %(default)g)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_SECONDS:g} s with a sample every {QUICK_SAMPLE_SECONDS:g} s (CI: checks it runs)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent streaming connections (default: %(default)d)")
    parser.add_argument("--events", type=int, default=20, help="SSE events per stream (default: %(default)d)")
    parser.add_argument("--pace-ms", type=float, default=50.0,
                        help="the vendor's pause between events: a stream lasts events x pace (default: %(default)g)")
    parser.add_argument("--body", default="large", choices=["large", "small"],
                        help="Claude Code's ~91 KB request body or a small one (default: %(default)s)")
    parser.add_argument("--workdir", help="put configs, the database and logs here (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    args = parser.parse_args(argv)
    seconds, sample_seconds = (QUICK_SECONDS, QUICK_SAMPLE_SECONDS) if args.quick else (args.minutes * 60, args.sample_seconds)
    if not 0 < sample_seconds <= seconds or args.clients < 1:
        parser.error("need 0 < --sample-seconds <= the run's length, and --clients >= 1")
    raise_fd_limit()
    # SIGTERM unwinds like Ctrl-C, so the servers are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with workdir(args.workdir, args.keep) as wd:
        print(f"soak: {seconds:g} s, {args.clients} streaming clients ({args.events} events, {args.pace_ms:g} ms apart), "
              f"RSS every {sample_seconds:g} s, in {wd}", file=sys.stderr)
        samples, result, rows = soak(wd, seconds, sample_seconds, args.clients, args.events, args.pace_ms, args.body)
    sys.stdout.write(render(samples, result, rows))
    problems = failures(result, rows)
    for problem in problems:
        print(f"soak: FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
