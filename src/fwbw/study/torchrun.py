"""One run of a sweep trained by several processes: `torchrun --standalone` on this machine runs
`fwbw train --cut` in the run's directory (fwbw.training.data_parallel); on several nodes of a
SLURM job (--nodes-per-run), `srun` starts one torchrun on each, and they meet at a c10d rendezvous
on this host (the job's first node, where its pull-worker runs). A rank's error becomes the run's;
a rank killed by a signal is an interruption (the run is released, resumable)."""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch.distributed

from fwbw.study.children import die_with_parent
from fwbw.training.config import TrainConfig
from fwbw.training.run_dir import CONFIG, CUT, SUMMARY, LeaseLost, start_run

STOP_POLL_S = 1.0  # how often a lost lease is looked for while the processes run
KEPT_LINES = 80  # of the processes' stderr per node, for torchrun's report of the rank that died
ERROR_MARK = ": error: "  # in the one-line error a failed rank prints (fwbw.cli)
SRUN = "srun"
SRUN_PREFIX = "srun: "  # srun's own lines, such as its report of how each task ended
# srun's report of a task that ended other than by success: "srun: error: node2: task 1: Killed"
SRUN_TASK_SIGNAL = re.compile(r"^srun: error: (\S+): tasks? ([\d,-]+): (.+)$")


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
    ranks: Ranks, run_dir: Path, progress: bool, compile: bool | None = None, tracker: str = "none",
    rendezvous_port: int | None = None,
) -> list[str]:
    """The command that trains, cuts and samples the run whose config.json is in run_dir (on several
    nodes: meeting at the store this host serves at `rendezvous_port`)."""
    train = ["-m", "fwbw", "train", "--config", str(run_dir / CONFIG), "--out", str(run_dir), "--cut"]
    compile_flag = [] if compile is None else ["--compile" if compile else "--no-compile"]
    tracker_flag = [] if tracker == "none" else ["--tracker", tracker]
    launcher = launcher_command(ranks, rendezvous_port)
    return launcher + train + compile_flag + tracker_flag + ([] if progress else ["--no-progress"])


def launcher_command(ranks: Ranks, rendezvous_port: int | None = None) -> list[str]:
    """torchrun alone (one machine), or srun starting a torchrun on each node of the job (SLURM
    22.05 or later). The job step shares the job's resources with the pull-worker's step
    (--overlap), takes the CPUs the job has per task on each node (srun 22.05 does not read them
    from the job's environment) and all of its memory there (--mem=0), passes this process's
    environment on (--export=ALL: the lease its ranks write under, the token cache), and ends every
    task once one ends in error (--kill-on-bad-exit). Every torchrun is a client of the
    rendezvous store this process serves (rendezvous_store): none has to guess that it is the host."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks.per_node)]
    if ranks.nodes is None:
        return [*torchrun, "--standalone"]
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    step = [SRUN, "--overlap", "--export=ALL", "--mem=0", "--kill-on-bad-exit=1", f"--nodes={ranks.nodes}",
            f"--ntasks={ranks.nodes}", "--ntasks-per-node=1", *([f"--cpus-per-task={cpus}"] if cpus else [])]
    rendezvous = ["--nnodes", str(ranks.nodes), "--rdzv_backend", "c10d", "--rdzv_conf", "is_host=0",
                  "--rdzv_endpoint", f"{socket.gethostname()}:{rendezvous_port}", "--rdzv_id", uuid.uuid4().hex]
    return [*step, *torchrun, *rendezvous]


@contextlib.contextmanager
def rendezvous_store(ranks: Ranks):
    """For a run on several nodes, the TCP store of its rendezvous, served by this process (on this
    host, the job's first node) at a port it holds from the start, for as long as the run trains;
    yields that port (None on one machine: torchrun --standalone serves its own)."""
    if ranks.nodes is None:
        yield None
        return
    store = torch.distributed.TCPStore(socket.gethostname(), 0, is_master=True, wait_for_workers=False)
    try:
        yield store.port
    finally:
        del store


class RankKilled(KeyboardInterrupt):
    """A rank, or torchrun itself, ended by a signal (the OOM killer, a kill from outside): the run
    was stopped, not failed by an error of its own, so it is released without a status, resumable,
    like any interruption (fwbw.study.sweep.run_one)."""


def killed_message(world_size: int, returncode: int, stderr_tail: list[str]) -> str | None:
    """How the processes were killed, or None (they failed). Where torchrun reported failures (its
    "Root Cause" sections in `stderr_tail`, one per node's torchrun), the earliest decides (the
    others are its consequences; within the same second an error before a signal, as srun kills the
    other nodes' tasks after one ended in error): a signal that ended a rank. Else a task that srun
    reports ended by a signal (a node's torchrun killed whole), or torchrun (srun) itself ended by
    one (`returncode` below 0)."""
    failures = root_causes("\n".join(stderr_tail))
    if failures:
        first = min(failures, key=lambda failure: (failure[0], failure[2] < 0))
        _, rank, exit_code = first
        if exit_code < 0 and -exit_code in signal.valid_signals():
            name = signal.Signals(-exit_code).name
            return f"rank {rank} of {world_size} under torchrun died (exit code {exit_code}: {name}) without an error"
        return None
    for line in stderr_tail:
        task = SRUN_TASK_SIGNAL.match(line)
        if task and not task[3].startswith("Exited with exit code"):
            return f"srun's task {task[2]} on {task[1]} was ended by a signal ({task[3]}) without an error"
    if returncode < 0 and -returncode in signal.valid_signals():
        return f"torchrun was killed ({signal.Signals(-returncode).name})"
    return None


def root_causes(report: str) -> list[tuple[str, int, int]]:
    """(time, rank, exit code) of each failure torchrun reported as a root cause (time "" if not given)."""
    failures = []
    for section in report.split("Root Cause")[1:]:
        fields = {name: re.search(rf"^\s*{name}\s*:\s*(\S+)", section, re.MULTILINE)
                  for name in ("time", "rank", "exitcode")}
        rank, exit_code, time_field = fields["rank"], fields["exitcode"], fields["time"]
        if rank and exit_code and re.fullmatch(r"-?\d+", rank[1]) and re.fullmatch(r"-?\d+", exit_code[1]):
            failures.append((time_field[1] if time_field else "", int(rank[1]), int(exit_code[1])))
    return failures


def is_rank_error(line: str) -> bool:
    """A rank's one-line error (fwbw.cli), not srun's report of a task."""
    return ERROR_MARK in line and not line.startswith(SRUN_PREFIX)


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
    tail: collections.deque[str] = collections.deque(maxlen=KEPT_LINES * (ranks.nodes or 1))
    errors: list[str] = []
    with rendezvous_store(ranks) as port, subprocess.Popen(
            torchrun_command(ranks, run_dir, progress, compile, tracker, port), stderr=subprocess.PIPE,
            preexec_fn=die_with_parent) as processes:
        if stop is not None:
            threading.Thread(target=_stop_when_set, args=(stop, processes), daemon=True).start()
        try:
            for line in processes.stderr:  # bytes split at newlines only: a bar's carriage returns pass through
                sys.stderr.buffer.write(line)
                sys.stderr.buffer.flush()
                text = line.decode(errors="replace").rstrip("\n")
                tail.append(text)
                errors += [text] if is_rank_error(text) else []
        except BaseException:  # Ctrl-C or SIGTERM to the sweep: torchrun (srun: to each node's) passes it on
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
