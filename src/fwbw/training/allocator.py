"""glibc's malloc settings for training, applied in-process.

By default glibc serves every allocation above a threshold (128 KiB, adapting up to 32 MiB)
with a fresh mmap, which the kernel page-faults and zero-fills on first touch, and gives freed
memory at the top of the heap back to the kernel. A training step allocates and frees many
activations far above that size, so on CPU a third or more of each step went to page faults.
With mmap off and trimming off, freed activations stay in the heap and the next step reuses them
(`fwbw bench` on 2 CPU cores: width 384 / depth 8 fw+bw 1,000 -> 1,680 tokens/s, width 128 /
depth 4 fw+bw 10,600 -> 19,000). The price: the process keeps its peak heap until it exits.
mmap is turned off (M_MMAP_MAX = 0) rather than its threshold raised because mallopt takes the
threshold as a C int and some glibc versions refuse one above 32 MiB (HEAP_MAX_SIZE / 2); both
measure the same where the threshold is accepted. Other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import functools
import os

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

SETTINGS = (
    (M_MMAP_MAX, 0),  # never mmap: every allocation comes from the heap and is reused
    (M_TRIM_THRESHOLD, -1),  # never give the top of the heap back (-1: trimming off)
)


def is_glibc() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (AttributeError, ValueError, OSError):  # no confstr (Windows) or not glibc
        return False


@functools.cache
def tune_allocator() -> bool:
    """Apply SETTINGS once per process; whether they are in force (False off glibc)."""
    if not is_glibc():
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return all([mallopt(parameter, value) == 1 for parameter, value in SETTINGS])
