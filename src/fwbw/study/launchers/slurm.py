"""The SLURM launcher, through submitit: a job array of pull-workers, each training the sweep's runs
that no other worker holds or finished (fwbw.study.sweep.work), one job per pending run or
--slurm-max-parallel of them. Each job gets --gpus-per-run GPUs, --cpus-per-run CPUs and
--slurm-time minutes on --slurm-partition, and the sweep file's [slurm] table as extra #SBATCH
options; job files and logs go to SWEEP/slurm/. It returns once the array is submitted, printing
the job ids (--wait: once the jobs have ended, with the results table rebuilt). The nodes must
share the sweep directory (same path) and this Python environment."""

from __future__ import annotations

import shutil
from pathlib import Path

from fwbw.extras import import_extra
from fwbw.study.estimate import plural
from fwbw.study.launchers.base import (
    Assignment,
    Launch,
    check_none_lost,
    merge_outcomes,
    outcome_counts,
)
from fwbw.study.results import write_results
from fwbw.study.sweep_dir import SLURM
from fwbw.training.config import TrainConfig

SBATCH = "sbatch"
SLURM_MINUTES = 24 * 60  # each job's time limit without --slurm-time


def check(options: Launch) -> None:
    """Before anything is written: this machine can submit SLURM jobs, and submitit is installed."""
    if shutil.which(SBATCH) is None:
        raise RuntimeError(f"--launcher slurm: no {SBATCH} on PATH, so this machine cannot submit SLURM jobs "
                           "(--launcher local or ray train here)")
    import_extra("submitit", "slurm", "--launcher slurm")


def launch(assignment: Assignment, options: Launch, cluster: str = "slurm") -> dict[str, str] | None:
    """Submit the pull-workers (none when no run is pending: then the results table is rebuilt
    here); None once submitted, or with --wait run id -> status. `cluster` "local" runs the same
    jobs on this machine without SLURM (submitit's local executor)."""
    pending = assignment.pending()
    if not pending:
        return assignment.work()
    count = min(len(pending), options.slurm_max_parallel or len(pending))
    executor = slurm_executor(Path(assignment.out), options, list(pending.values()), count, cluster,
                              assignment.execution.nproc_per_run)
    jobs = submit(executor, assignment, count)
    print(f"submitted {plural(count, 'pull-worker job')} for {plural(len(pending), 'pending run')}: "
          f"{' '.join(job.job_id for job in jobs)} (logs in {executor.folder})")
    return wait_for(jobs, Path(assignment.out)) if options.wait else None


def slurm_executor(
    out: Path, options: Launch, pending: list[TrainConfig], count: int, cluster: str = "slurm", nproc_per_run: int = 1
):
    """A submitit executor for `count` pull-workers with the resources `options` asks for (the
    GPUs of a job: one per process of a run)."""
    submitit = import_extra("submitit", "slurm", "--launcher slurm")
    executor = submitit.AutoExecutor(folder=out / SLURM, cluster=cluster)
    executor.update_parameters(
        name=f"fwbw-{out.name}",
        timeout_min=options.slurm_time or SLURM_MINUTES,
        gpus_per_node=options.run_gpus(pending, nproc_per_run=nproc_per_run),
        cpus_per_task=options.run_cpus(nproc_per_run),
        slurm_partition=options.slurm_partition,
        slurm_array_parallelism=count,
        slurm_additional_parameters=dict(options.slurm_options) or None,
    )
    return executor


def submit(executor, assignment: Assignment, count: int) -> list:
    """`count` jobs, each a pull-worker on `assignment` (Assignment.work)."""
    submitit = import_extra("submitit", "slurm", "--launcher slurm")
    try:
        return executor.map_array(Assignment.work, [assignment] * count)
    except submitit.core.utils.FailedSubmissionError as error:
        raise RuntimeError(f"{SBATCH} refused the jobs: {str(error).strip().splitlines()[-1]}") from None


def wait_for(jobs: list, out: Path) -> dict[str, str]:
    """Block until every job has ended, rebuild the results table, print each job's counts, and
    merge their outcomes; RuntimeError naming the jobs that died."""
    submitit = import_extra("submitit", "slurm", "--launcher slurm")
    outcomes, lost = [], []
    for job in jobs:
        try:
            outcomes.append((job.job_id, job.result()))
        except submitit.core.utils.UncompletedJobError:
            lost.append(job.job_id)
    write_results(out)
    for job_id, outcome in outcomes:
        print(f"job {job_id}: {outcome_counts(outcome)}")
    check_none_lost(lost, "SLURM job", f"their logs are in {out / SLURM}")
    return merge_outcomes(outcome for _, outcome in outcomes)
