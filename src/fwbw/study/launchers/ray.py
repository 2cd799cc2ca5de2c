"""The Ray launcher: each pending run one Ray task (fwbw.study.sweep.run_one) given --gpus-per-run
GPUs and --cpus-per-run CPUs, on the cluster at --ray-address, or else on a local Ray started for
the sweep (--workers N: N x --cpus-per-run CPUs; default: this machine's) and shut down after.
It returns when every task has ended, then rebuilds the results table. A cluster's nodes must
share the sweep directory (same path) and have fwbw installed."""

from __future__ import annotations

import logging
import sys
from types import ModuleType

from fwbw.extras import import_extra
from fwbw.study.launchers.base import Assignment, Launch, check_none_lost
from fwbw.study.results import write_results
from fwbw.study.sweep import sweep_runs
from fwbw.training.config import TrainConfig

RAY_OBJECT_STORE_BYTES = 100 * 2**20  # a local Ray's object store: the tasks pass only configs and statuses
LOCAL_RAY = "local"  # ray.init's address for a new local instance (not one already running here)


def check(options: Launch) -> None:
    import_extra("ray", "ray", "--launcher ray")


def launch(assignment: Assignment, options: Launch) -> dict[str, str]:
    """Train the shard's pending runs as Ray tasks, then rebuild the results table; run id ->
    status ('skipped': done, or failed without --retry-failed, before, or held elsewhere)."""
    outcome = dict.fromkeys(sweep_runs(assignment.out, assignment.shard), "skipped")
    pending, lost = assignment.pending(), []
    if pending:
        ray = import_extra("ray", "ray", "--launcher ray")
        start_ray(ray, options, assignment.execution.nproc_per_run)
        try:
            statuses, lost = run_tasks(ray, assignment, pending, options)
        finally:
            ray.shutdown()
        outcome.update(statuses)
    write_results(assignment.out)
    check_none_lost(lost, "Ray task", "its run's status may still read running")
    return outcome


def start_ray(ray: ModuleType, options: Launch, nproc_per_run: int = 1) -> None:
    if options.ray_address:
        ray.init(address=options.ray_address, logging_level=logging.WARNING)
        return
    cpus = options.workers * options.run_cpus(nproc_per_run) if options.workers else None
    ray.init(address=LOCAL_RAY, num_cpus=cpus, object_store_memory=RAY_OBJECT_STORE_BYTES, include_dashboard=False,
             logging_level=logging.WARNING)


def run_tasks(
    ray: ModuleType, assignment: Assignment, pending: dict[str, TrainConfig], options: Launch
) -> tuple[dict[str, str], list[str]]:
    """One task per pending run, all submitted at once (Ray runs as many as the resources allow);
    the statuses they return, and the runs whose task died (a lost worker, an import error)."""
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    nproc = assignment.execution.nproc_per_run
    task = ray.remote(num_cpus=options.run_cpus(nproc), num_gpus=options.run_gpus(pending.values(), has_gpus, nproc))
    task = task(Assignment.run)
    waiting = {task.remote(assignment, identifier, config): identifier for identifier, config in pending.items()}
    statuses, lost = {}, []
    while waiting:
        [ready], _ = ray.wait(list(waiting))
        identifier = waiting.pop(ready)
        try:
            statuses[identifier] = ray.get(ready)
        except ray.exceptions.RayError as error:
            lost.append(f"{identifier}: {str(error).strip().splitlines()[-1]}")
        if assignment.progress:
            ended = len(pending) - len(waiting)
            print(f"[{ended}/{len(pending)}] {identifier}: {statuses.get(identifier, 'task died')}", file=sys.stderr)
    return statuses, lost
