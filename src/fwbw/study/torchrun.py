"""One run of a sweep trained by several processes: `torchrun --standalone` on this machine runs
`fwbw train --cut` in the run's directory (fwbw.training.data_parallel); on several nodes of a
SLURM job (--nodes-per-run), `srun` starts one torchrun on each, and they meet at a c10d rendezvous
on this host (the job's first node, where its pull-worker runs). A rank's error becomes the run's;
a rank killed by a signal is an interruption (the run is released, resumable)."""

from __future__ import annotations

import collections
import re
import signal
import socket
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from fwbw.study.children import die_with_parent
from fwbw.training.config import TrainConfig
from fwbw.training.run_dir import CONFIG, CUT, SUMMARY, LeaseLost, start_run

STOP_POLL_S = 1.0  # how often a lost lease is looked for while the processes run
KEPT_LINES = 80  # of the processes' stderr, for torchrun's report of the rank that died
ERROR_MARK = ": error: "  # in the one-line error a failed rank prints (fwbw.cli)
SRUN = "srun"


@dataclass(frozen=True)
class Ranks:
    """The processes that train one run: `per_node` of them on this machine (nodes None), or on
    each of `nodes` nodes of the SLURM job this process runs in."""

    per_node: int
    nodes: int | None = None

    @property
    def world_size(self) -> int:
        return self.per_node * (self.nodes or 1)


def torchrun_command(
    ranks: Ranks, run_dir: Path, progress: bool, compile: bool | None = None, tracker: str = "none"
) -> list[str]:
    """The command that trains, cuts and samples the run whose config.json is in run_dir."""
    train = ["-m", "fwbw", "train", "--config", str(run_dir / CONFIG), "--out", str(run_dir), "--cut"]
    compile_flag = [] if compile is None else ["--compile" if compile else "--no-compile"]
    tracker_flag = [] if tracker == "none" else ["--tracker", tracker]
    return launcher_command(ranks) + train + compile_flag + tracker_flag + ([] if progress else ["--no-progress"])


def launcher_command(ranks: Ranks) -> list[str]:
    """torchrun alone (one machine), or srun starting a torchrun on each node of the job. The job
    step shares the job's resources with the pull-worker's step (--overlap: its CPUs and GPUs are
    the runs'); one task ending in error ends the others (--kill-on-bad-exit). The rendezvous's
    TCP store is served by the torchrun on this host (c10d picks the host whose name is the
    endpoint's), at a port free here now."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks.per_node)]
    if ranks.nodes is None:
        return [*torchrun, "--standalone"]
    step = [SRUN, "--overlap", "--kill-on-bad-exit=1", f"--nodes={ranks.nodes}", f"--ntasks={ranks.nodes}",
            "--ntasks-per-node=1"]
    rendezvous = ["--nnodes", str(ranks.nodes), "--rdzv_backend", "c10d",
                  "--rdzv_endpoint", f"{socket.gethostname()}:{free_port()}", "--rdzv_id", uuid.uuid4().hex]
    return [*step, *torchrun, *rendezvous]


def free_port() -> int:
    """A TCP port that no process listens on, on any of this host's addresses, now."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


class RankKilled(KeyboardInterrupt):
    """A rank, or torchrun itself, ended by a signal (the OOM killer, a kill from outside): the run
    was stopped, not failed by an error of its own, so it is released without a status, resumable,
    like any interruption (fwbw.study.sweep.run_one)."""


def killed_message(world_size: int, returncode: int, stderr_tail: list[str]) -> str | None:
    """How the processes were killed, or None: the first rank that died by a signal, as torchrun
    reports it (its "Root Cause" section in `stderr_tail`; the others' errors are its
    consequences), or torchrun itself ended by one (`returncode` below 0)."""
    report = "\n".join(stderr_tail)
    root = report[report.find("Root Cause"):] if "Root Cause" in report else ""
    rank, exit_code = (re.search(rf"{field}\s*:\s*(-?\d+)", root) for field in ("rank", "exitcode"))
    if rank and exit_code and int(exit_code[1]) < 0 and -int(exit_code[1]) in signal.valid_signals():
        name = signal.Signals(-int(exit_code[1])).name
        return f"rank {rank[1]} of {world_size} under torchrun died (exit code {exit_code[1]}: {name}) without an error"
    if returncode < 0 and -returncode in signal.valid_signals():
        return f"torchrun was killed ({signal.Signals(-returncode).name})"
    return None


def failure_message(world_size: int, returncode: int, errors: list[str]) -> str:
    """Why the processes failed: the first one-line error a rank printed (`errors`: its lines),
    else torchrun's exit code."""
    if errors:
        return errors[0].split(ERROR_MARK, 1)[1]
    return f"{world_size} training processes under torchrun failed (exit code {returncode}) without an error"


def train_in_processes(
    config: TrainConfig, run_dir: Path, ranks: Ranks, progress: bool, compile: bool | None = None, tracker: str = "none",
    stop: threading.Event | None = None,
) -> None:
    """Train (then cut and sample) the run with the data-parallel processes of `ranks`, their stderr
    passed through as it comes (progress bars included); RuntimeError with the error when they
    fail, RankKilled when a signal ended one; once `stop` is set (watched whether or not the
    processes print), they are stopped and LeaseLost raised."""
    start_run(run_dir, config)
    command = torchrun_command(ranks, run_dir, progress, compile, tracker)
    tail: collections.deque[str] = collections.deque(maxlen=KEPT_LINES)
    errors: list[str] = []
    with subprocess.Popen(command, stderr=subprocess.PIPE, preexec_fn=die_with_parent) as processes:
        if stop is not None:
            threading.Thread(target=_stop_when_set, args=(stop, processes), daemon=True).start()
        try:
            for line in processes.stderr:  # bytes split at newlines only: a bar's carriage returns pass through
                sys.stderr.buffer.write(line)
                sys.stderr.buffer.flush()
                text = line.decode(errors="replace").rstrip("\n")
                tail.append(text)
                errors += [text] if ERROR_MARK in text else []
        except BaseException:  # Ctrl-C or SIGTERM to the sweep: torchrun passes it on to the ranks
            processes.terminate()
            processes.wait()
            raise
    if stop is not None and stop.is_set():
        raise LeaseLost(f"{run_dir}: another worker holds the run now")
    if processes.returncode != 0 and not finished(run_dir):
        killed = killed_message(ranks.world_size, processes.returncode, list(tail))
        if killed:
            raise RankKilled(f"{killed}; rerun the sweep to resume the run")
        raise RuntimeError(failure_message(ranks.world_size, processes.returncode, errors))


def _stop_when_set(stop: threading.Event, processes: subprocess.Popen) -> None:
    """Terminate the processes once `stop` is set (a lost lease), even if they print nothing."""
    while processes.poll() is None:
        if stop.wait(STOP_POLL_S):
            processes.terminate()
            return


def finished(run_dir: Path) -> bool:
    """Whether the run was trained and cut: a process that fails as it exits does not fail a run
    whose results are written (a gloo thread aborting the exit is prevented at its source:
    fwbw.training.data_parallel.leave)."""
    return (run_dir / SUMMARY).is_file() and (run_dir / CUT).is_file()
