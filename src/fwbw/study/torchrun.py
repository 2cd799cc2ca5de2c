"""One run of a sweep trained by several processes: `torchrun --standalone` on this machine runs
`fwbw train --cut` in the run's directory (fwbw.training.data_parallel), and its failure becomes
the run's error."""

from __future__ import annotations

import collections
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from fwbw.training.config import TrainConfig
from fwbw.training.run_dir import CONFIG, LeaseLost, start_run

KEPT_LINES = 40  # of the processes' stderr, to find the error in


def torchrun_command(
    nproc: int, run_dir: Path, progress: bool, compile: bool | None = None, tracker: str = "none"
) -> list[str]:
    """The command that trains, cuts and samples the run whose config.json is in run_dir."""
    train = ["-m", "fwbw", "train", "--config", str(run_dir / CONFIG), "--out", str(run_dir), "--cut"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    compile_flag = [] if compile is None else ["--compile" if compile else "--no-compile"]
    tracker_flag = [] if tracker == "none" else ["--tracker", tracker]
    return launcher + train + compile_flag + tracker_flag + ([] if progress else ["--no-progress"])


def failure_message(nproc: int, returncode: int, stderr_tail: list[str]) -> str:
    """The processes' own one-line error if one printed it, else the first rank that died as
    torchrun reports it (its "Root Cause" section), else torchrun's exit code."""
    errors = [line.split(": error: ", 1)[1] for line in stderr_tail if ": error: " in line]
    if errors:
        return errors[-1]
    report = "\n".join(stderr_tail)
    root = report[report.find("Root Cause"):] if "Root Cause" in report else ""
    rank, exit_code = (re.search(rf"{field}\s*:\s*(-?\d+)", root) for field in ("rank", "exitcode"))
    if rank and exit_code:
        code = int(exit_code[1])
        how = f"exit code {code}" + (f": {signal.Signals(-code).name}" if -code in signal.valid_signals() else "")
        return f"rank {rank[1]} of {nproc} under torchrun died ({how}) without an error"
    return f"{nproc} training processes under torchrun failed (exit code {returncode}) without an error"


def train_in_processes(
    config: TrainConfig, run_dir: Path, nproc: int, progress: bool, compile: bool | None = None, tracker: str = "none",
    stop: threading.Event | None = None,
) -> None:
    """Train (then cut and sample) the run with `nproc` data-parallel processes, their stderr
    passed through as it comes (progress bars included); RuntimeError with the error when they
    fail; once `stop` is set, the processes are stopped and LeaseLost raised."""
    start_run(run_dir, config)
    command = torchrun_command(nproc, run_dir, progress, compile, tracker)
    tail: collections.deque[str] = collections.deque(maxlen=KEPT_LINES)
    with subprocess.Popen(command, stderr=subprocess.PIPE) as processes:
        for line in processes.stderr:  # bytes split at newlines only: a bar's carriage returns pass through
            sys.stderr.buffer.write(line)
            sys.stderr.buffer.flush()
            tail.append(line.decode(errors="replace").rstrip("\n"))
            if stop is not None and stop.is_set():
                processes.terminate()
    if stop is not None and stop.is_set():
        raise LeaseLost(f"{run_dir}: another worker holds the run now")
    if processes.returncode != 0:
        raise RuntimeError(failure_message(nproc, processes.returncode, list(tail)))
