"""hubcore keeps freed request buffers for reuse (runtime.tune_malloc): measured
in fresh processes as the page faults of allocating and freeing 2 MB of
64 KB blocks, as requests do, fifty times over."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from hubcore.runtime import tune_malloc

CHURN = """
import resource, sys
from hubcore.runtime import tune_malloc
applied = tune_malloc({}) if sys.argv[1] == "tuned" else False

def churn():
    blocks = [bytearray(64 * 1024) for _ in range(32)]
    del blocks

churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    churn()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is for glibc")


def faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True, timeout=60)
    applied, count = out.stdout.split()
    return applied, int(count)


@glibc_only
def test_freed_blocks_are_reused_without_page_faults() -> None:
    applied, tuned = faults("tuned")
    assert applied == "True"
    default_applied, default = faults("default")
    assert default_applied == "False"
    # 50 x 2 MB handed back and faulted in again is about 25,000 faults.
    assert default > 5_000
    assert tuned < 500


def test_the_operators_malloc_settings_win() -> None:
    assert tune_malloc({"MALLOC_TRIM_THRESHOLD_": "131072"}) is False
    assert tune_malloc({"MALLOC_MMAP_THRESHOLD_": "65536"}) is False
