"""Processes a sweep starts (torchrun for a run, local workers), which must not outlive it: on
Linux the kernel sends them SIGTERM when the sweep's process dies, even by SIGKILL."""

from __future__ import annotations

import ctypes
import signal
import sys

PR_SET_PDEATHSIG = 1  # prctl option, from <linux/prctl.h>


def die_with_parent() -> None:
    """A subprocess.Popen preexec_fn: SIGTERM to the child when its parent dies (Linux; elsewhere
    nothing)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def terminate_on_sigterm() -> None:
    """Turn this process's SIGTERM into KeyboardInterrupt, so that it stops its children as on
    Ctrl-C before it ends."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"terminated (signal {signum})")

    signal.signal(signal.SIGTERM, interrupt)
