"""The SLURM launcher, through submitit: a job array of pull-workers, each training the sweep's runs
that no other worker holds or finished (fwbw.study.sweep.work), one job per pending run or
--slurm-max-parallel of them. Each job gets --gpus-per-run GPUs, --cpus-per-run CPUs and
--slurm-time minutes on --slurm-partition, and the sweep file's [slurm] table as extra #SBATCH
options; job files and logs go to SWEEP/slurm/. It returns once the array is submitted, printing
the job ids (--wait: once the jobs have ended, watched with squeue, so SLURM accounting need not be
on, with the results table rebuilt and each run left unfinished marked 'left'). In a job, SLURM's
SIGTERM (scancel, the time limit) and submitit's preemption signal (USR2, sent 90 s before the
time limit and on preemption) interrupt the run it trains: the run is released, resumable by the
next worker, never marked failed. On USR2 the job is also requeued (its function is checkpointable,
PullWorker): the same job starts again and resumes the run from its checkpoints, at most
SLURM_REQUEUES times after a time limit. The nodes must share the sweep directory (same path) and
this Python environment."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fwbw.extras import import_extra
from fwbw.study.estimate import plural
from fwbw.study.launchers.base import (
    LEFT,
    Assignment,
    Launch,
    lost_message,
    merge_outcomes,
    outcome_counts,
    with_runs_left,
)
from fwbw.study.results import write_results
from fwbw.study.sweep import sweep_runs
from fwbw.study.sweep_dir import RUNS, SLURM
from fwbw.study.torchrun import Ranks
from fwbw.training.config import TrainConfig
from fwbw.training.run_dir import read_status

SBATCH = "sbatch"
SQUEUE = "squeue"
SLURM_MINUTES = 24 * 60  # each job's time limit without --slurm-time
# requeues of a job after its time limit (each instance resumes its runs from their checkpoints)
SLURM_REQUEUES = 20
POLL_S = 3.0  # --wait: seconds between looks at the jobs
# squeue's states of a job that has ended (any other state: it may still run, or run again)
ENDED_STATES = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                          "PREEMPTED", "TIMEOUT"})


def check(options: Launch) -> None:
    """Before anything is written: this machine can submit SLURM jobs, and submitit is installed."""
    if shutil.which(SBATCH) is None:
        raise RuntimeError(f"--launcher slurm: no {SBATCH} on PATH, so this machine cannot submit SLURM jobs "
                           "(--launcher local or ray train here)")
    import_extra("submitit", "slurm", "--launcher slurm")


def launch(assignment: Assignment, options: Launch, cluster: str = "slurm") -> dict[str, str] | None:
    """Submit the pull-workers (none when no run is pending: then the results table is rebuilt
    here); None once submitted, or with --wait run id -> status (wait_for; 'left': unfinished once
    the jobs ended). `cluster` "local" runs the same jobs on this machine without SLURM (submitit's
    local executor)."""
    pending = assignment.pending()
    if not pending:
        return assignment.work()
    count = min(len(pending), options.slurm_max_parallel or len(pending))
    executor = slurm_executor(Path(assignment.out), options, list(pending.values()), count, cluster,
                              assignment.execution.ranks)
    jobs = submit(executor, assignment, count)
    print(f"submitted {plural(count, 'pull-worker job')} for {plural(len(pending), 'pending run')}: "
          f"{' '.join(job.job_id for job in jobs)} (logs in {executor.folder})", flush=True)
    if not options.wait:
        return None
    if cluster == "slurm":
        return wait_for(jobs, assignment, lambda: jobs_running(jobs, assignment))
    return wait_for(jobs, assignment, lambda: not all(job.done() for job in jobs))  # submitit's local executor


def slurm_executor(
    out: Path, options: Launch, pending: list[TrainConfig], count: int, cluster: str = "slurm", ranks: Ranks = Ranks(1)
):
    """A submitit executor for `count` pull-workers with the resources `options` asks for (the
    GPUs of a job's node: --gpus-per-run, else one per process of a run on it if the runs' device
    is cuda; none otherwise, so that a CPU-only cluster takes the jobs). A job of a run on several
    nodes (ranks.nodes) holds them all, its pull-worker one task on the first (it starts the
    run's processes on every node: fwbw.study.torchrun)."""
    submitit = import_extra("submitit", "slurm", "--launcher slurm")
    executor = submitit.AutoExecutor(folder=out / SLURM, cluster=cluster, slurm_max_num_timeout=SLURM_REQUEUES)
    # a job on several nodes, of which submitit knows only the task it starts (asked to start one task per node, it
    # would wait for every task's result)
    nodes = {} if ranks.nodes is None else {"nodes": ranks.nodes}
    cpus = options.run_cpus(ranks.per_node)
    # the step's CPUs given again: srun 22.05 does not take them from the job's
    srun_args = [f"--cpus-per-task={cpus}", *([] if ranks.nodes is None else ["--nodes=1", "--ntasks=1"])]
    executor.update_parameters(
        name=f"fwbw-{out.name}",
        timeout_min=options.slurm_time or SLURM_MINUTES,
        # 0 GPUs: no GPU option at all
        gpus_per_node=options.run_gpus(pending, nproc_per_run=ranks.per_node, auto_uses_gpus=False) or None,
        cpus_per_task=cpus,
        slurm_srun_args=srun_args,
        slurm_partition=options.slurm_partition,
        slurm_array_parallelism=count,
        slurm_additional_parameters={**options.slurm_options, **nodes} or None,
    )
    return executor


def submit(executor, assignment: Assignment, count: int) -> list:
    """`count` jobs, each a pull-worker on `assignment` (PullWorker)."""
    submitit = import_extra("submitit", "slurm", "--launcher slurm")
    try:
        return executor.map_array(PullWorker(), [assignment] * count)
    except submitit.core.utils.FailedSubmissionError as error:
        raise RuntimeError(f"{SBATCH} refused the jobs: {str(error).strip().splitlines()[-1]}") from None


class JobInterrupted(KeyboardInterrupt):
    """SLURM stopped the job (scancel, its time limit, a preemption): the run it trained is released
    unfinished, to be resumed by the next worker that claims it; not a failure of the run."""


class PullWorker:
    """What each job runs: Assignment.work, with SLURM's signals as interruptions (interruptible).
    An interrupted job ends in one line, exit code 1. Checkpointable in submitit's sense (it has
    `checkpoint`): on the preemption signal submitit requeues the job with the same pull-worker,
    which resumes the run it was training from its checkpoints (released meanwhile, so another
    worker may resume it first)."""

    def __call__(self, assignment: Assignment) -> dict[str, str]:
        interruptible()
        try:
            return assignment.work()
        except KeyboardInterrupt as interruption:
            print(f"fwbw job: {str(interruption) or 'interrupted'}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    def checkpoint(self, assignment: Assignment):
        """The job to requeue: this pull-worker on the same assignment (the runs' own checkpoints
        hold their state)."""
        submitit = import_extra("submitit", "slurm", "--launcher slurm")
        return submitit.helpers.DelayedSubmission(self, assignment)


def pull_worker(assignment: Assignment) -> dict[str, str]:
    """A pull-worker job's function (PullWorker), kept for jobs pickled before it was a class."""
    return PullWorker()(assignment)


def preemption_signal() -> signal.Signals:
    """The signal SLURM sends before the time limit and on preemption (submitit's sbatch --signal)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


def interruptible() -> None:
    """Turn SIGTERM (scancel; the time limit) and the preemption signal into JobInterrupted, raised
    where the job is, so that the run it trains is released without a status. Submitit's own
    handler still runs first on the preemption signal: it checkpoints and requeues the job
    (PullWorker) and exits, or gives up (timed out too many times) with UncompletedJobError; either
    is an interruption that names what happened. One interruption per job: later signals (the
    SIGTERM of the requeue) are ignored while it unwinds."""
    preempt = preemption_signal()
    submitit_handler = signal.getsignal(preempt)

    def interrupt(signum, frame):
        for ignored in (signal.SIGTERM, preempt):
            signal.signal(ignored, signal.SIG_IGN)
        name = signal.Signals(signum).name
        if signum == preempt and callable(submitit_handler):
            try:
                submitit_handler(signum, frame)
            except SystemExit:  # requeued: the job starts again and resumes the run
                raise JobInterrupted(f"interrupted by {name}: the job is requeued") from None
            except Exception as error:  # UncompletedJobError (not requeued), or the requeue failed
                raise JobInterrupted(f"interrupted by {name}: {error}") from None
        raise JobInterrupted(f"interrupted by {name}")

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(preempt, interrupt)


def squeue_states(job_ids: list[str]) -> dict[str, str] | None:
    """Job id -> state of the jobs of `job_ids`' arrays that squeue lists (one line per array task;
    a job SLURM has forgotten is not listed); None when squeue cannot answer."""
    arrays = sorted({job_id.split("_")[0] for job_id in job_ids})
    try:
        done = subprocess.run([SQUEUE, "--noheader", "--array", "--format=%i %T", f"--jobs={','.join(arrays)}"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return {} if "Invalid job id" in done.stderr else None  # every job forgotten: ended long ago
    return dict(line.split()[:2] for line in done.stdout.splitlines() if len(line.split()) >= 2)


def job_running(job_id: str, states: dict[str, str]) -> bool:
    """squeue lists the job (or its array's pending tasks, as 12_[3-5]) in a state other than ended."""
    array = job_id.split("_")[0]
    return any(state not in ENDED_STATES for listed, state in states.items()
               if listed == job_id or listed.startswith(f"{array}_["))


def jobs_running(jobs: list, assignment: Assignment, states: Callable = squeue_states) -> bool:
    """Whether any job may still train: not all have left their result, and squeue lists one that
    has not ended (pending, running, requeued, ...). Where squeue cannot answer, the sweep directory
    does: runs still want training."""
    if all(job.paths.result_pickle.exists() for job in jobs):
        return False
    found = states([job.job_id for job in jobs])
    if found is None:
        return bool(assignment.pending())
    return any(job_running(job.job_id, found) for job in jobs)


def job_outcome(job) -> dict[str, str] | None:
    """What an ended job returned (run id -> status); None if it left nothing (cancelled, killed,
    interrupted) or failed."""
    submitit = import_extra("submitit", "slurm", "--launcher slurm")
    if not job.paths.result_pickle.exists():
        return None
    try:
        return job.result()
    except submitit.core.utils.UncompletedJobError:
        return None


def wait_for(jobs: list, assignment: Assignment, running: Callable[[], bool], poll_s: float = POLL_S) -> dict[str, str]:
    """Block while `running()`, then rebuild the results table, print each job's counts and the jobs
    that ended without finishing, and return each run's status: the worker's that trained it,
    'left' for runs that still want training, else as the sweep directory records it ('skipped':
    done before, or by a job that said so)."""
    while running():
        time.sleep(poll_s)
    out = Path(assignment.out)
    outcomes, lost = [], []
    for job in jobs:
        outcome = job_outcome(job)
        if outcome is None:
            lost.append(job.job_id)
        else:
            outcomes.append((job.job_id, outcome))
    write_results(out)
    for job_id, outcome in outcomes:
        print(f"job {job_id}: {outcome_counts(outcome)}")
    if lost:
        print(f"fwbw sweep: {lost_message(lost, 'SLURM job', f'their logs are in {out / SLURM}')}", file=sys.stderr)
    merged = merge_outcomes(outcome for _, outcome in outcomes)
    runs = sweep_runs(out, assignment.shard)
    statuses = with_runs_left({identifier: merged.get(identifier, "skipped") for identifier in runs},
                              assignment.pending())
    return {identifier: status if status == LEFT or identifier in merged else read_status(out / RUNS / identifier)["status"]
            for identifier, status in statuses.items()}
