"""Keep glibc's malloc from handing big buffers back to the kernel after every block.

A transfer allocates and frees buffers of 256 KiB to 1 MiB many times a second
(socket reads, frames, plaintexts). With glibc's defaults such a buffer is either
``mmap``-ed and unmapped each time, or carved from the heap top that ``free`` trims
again; either way every new buffer starts as fresh pages the kernel must fault in
and zero. Raising the two thresholds keeps freed buffers for reuse; the process's heap
then stays at its working set's high-water mark (a few MiB for a transfer) instead of
shrinking between blocks. Elsewhere (macOS, musl) this is a no-op. What it saves is
measured in docs/performance-history.md (round 3, item 1).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_allocator"]

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 4 * 1024 * 1024
"""Allocations below this come from the heap: above the largest frame (1 MiB) and read."""
TRIM_THRESHOLD = 32 * 1024 * 1024
"""Free memory at the heap's top that ``free`` keeps instead of returning it."""


def _is_glibc() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))  # "glibc 2.36"; None or error elsewhere
    except (AttributeError, ValueError, OSError):
        return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def tune_allocator() -> bool:
    """Set both thresholds for this process; True if glibc accepted them."""
    if not _is_glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    results = [
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ]
    return results == [1, 1]
