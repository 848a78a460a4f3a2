"""``tune_allocator``: freed transfer-sized buffers are reused instead of faulted in again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

# Allocates four 512 KiB buffers at once and frees them, 100 times, and prints how many
# page faults that cost after a warm-up. With glibc's defaults the 2 MiB freed at the
# heap's top is trimmed each time and faulted in again (about 48,000 faults here).
BURSTS = """
import resource, sys
from dhtshare.allocator import tune_allocator
tuned = tune_allocator() if sys.argv[1] == "tune" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def burst():
    held = [bytearray(512 * 1024) for _ in range(4)]
    del held
for _ in range(3):
    burst()
before = faults()
for _ in range(100):
    burst()
print(tuned, faults() - before)
"""


def faults_after_bursts(mode: str) -> tuple[str, int]:
    cmd = [sys.executable, "-c", BURSTS, mode]  # a child: this process keeps its defaults
    # glibc's defaults, whatever this shell sets (MALLOC_*_ and GLIBC_TUNABLES change them)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")
    }
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    tuned, faults = out.split()
    return tuned, int(faults)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="mallopt is glibc's",
)
def test_tuned_glibc_reuses_freed_buffers() -> None:
    default_tuned, default_faults = faults_after_bursts("default")
    tuned, tuned_faults = faults_after_bursts("tune")
    assert (default_tuned, tuned) == ("False", "True")
    assert default_faults > 10_000  # the behaviour being fixed is real on this machine
    assert tuned_faults < default_faults // 100
