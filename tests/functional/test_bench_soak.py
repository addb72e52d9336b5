"""bench/soak.py: the quick soak run as a user runs it, and the rules for its
exit status."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from bench import soak
from tests.hubharness import REPO

ROW = re.compile(r"\| (\d+) s(?: \(idle\))? \| ([\d.]+) \| ([\d,]+) \|")


def test_quick_soak_prints_rss_per_sample_and_accounts_for_every_request() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "bench.soak", "--quick"], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=soak.QUICK_SECONDS + soak.GRACE_SECONDS + 60)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [m.groups() for m in ROW.finditer(done.stdout)]
    elapsed = [int(e) for e, _, _ in rows]
    # The idle sample, then one every 5 s of the 20 s run.
    assert len(elapsed) == 1 + int(soak.QUICK_SECONDS / soak.QUICK_SAMPLE_SECONDS), done.stdout
    assert elapsed[0] == 0 and elapsed[1:] == sorted(elapsed[1:]) and elapsed[-1] >= soak.QUICK_SECONDS
    assert all(float(rss) > 10 for _, rss, _ in rows)
    usage = [int(n.replace(",", "")) for _, _, n in rows]
    assert usage[-1] > usage[1] > 0, "the usage rows did not grow under load"
    assert re.search(r"growth after warm-up \(\d+ s to \d+ s\): [+-]\d+\.\d%", done.stdout), done.stdout
    m = re.search(r"requests: ([\d,]+) \(0 failed, 0 bad streams\); usage rows: ([\d,]+) of ([\d,]+)", done.stdout)
    assert m and m[1] == m[2] == m[3], done.stdout


RESULT = {"requests": 900, "warmups": 50, "errors": 0, "bad_streams": 0, "error_sample": ""}


def test_a_missing_usage_row_or_a_failed_request_fails_the_run() -> None:
    assert soak.failures(RESULT, 950) == []
    assert soak.failures(RESULT, 949) == ["1 usage rows missing (949 for 950 requests)"]
    (failed,) = soak.failures(RESULT | {"errors": 2, "error_sample": "status 502: upstream"}, 950)
    assert "2 failed requests" in failed and "status 502" in failed
    assert soak.failures(RESULT | {"bad_streams": 1}, 950) != []


def test_growth_is_measured_from_the_first_sample_under_load() -> None:
    samples = [soak.Sample(0, 30_000, 0), soak.Sample(60, 40_000, 100), soak.Sample(120, 41_000, 200),
               soak.Sample(180, 42_000, 300)]
    assert soak.growth_percent(samples) == 5.0  # 40 MB after warm-up to 42 MB; the idle 30 MB is not the base
    assert soak.growth_percent(samples[:2]) is None
