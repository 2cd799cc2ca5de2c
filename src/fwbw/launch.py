"""The `fwbw` executable: sets glibc's allocator thresholds, then runs the CLI.

glibc's malloc serves every allocation above 32 MB with a fresh mmap, which the kernel
page-faults and zero-fills on first touch; a training step allocates and frees many activations
that size, so on CPU a third or more of a step went to page faults (`fwbw bench`: width 384 /
depth 8 fw+bw step 7.3 s -> 4.5 s). The thresholds can only be set before the process starts, so
the launcher re-executes itself once with them in GLIBC_TUNABLES (ignored by other C libraries).
"""

from __future__ import annotations

import os
import sys

HUGE = str(1 << 32)
TUNABLES = f"glibc.malloc.mmap_threshold={HUGE}:glibc.malloc.trim_threshold={HUGE}"


def main() -> int:
    if sys.platform == "linux" and "GLIBC_TUNABLES" not in os.environ:
        os.environ["GLIBC_TUNABLES"] = TUNABLES
        os.execv(sys.executable, [sys.executable, "-m", "fwbw.launch", *sys.argv[1:]])
    from fwbw.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
