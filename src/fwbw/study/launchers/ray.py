"""The Ray launcher: pull-workers as Ray tasks (fwbw.study.sweep.work, one per pending run, as many
running at once as the resources allow), each given --gpus-per-run GPUs and --cpus-per-run CPUs,
on the cluster at --ray-address, or else on a local Ray started for the sweep (--workers N: N x
--cpus-per-run CPUs; default: this machine's) and shut down after. Each goes through the runs until
none it can claim is left. A task that dies is not retried (its run's claim would look live, and
the retry report the run 'skipped'): it is reported, and its run, like any run still unfinished
once every task has ended, is marked 'left' (fwbw sweep then exits 3: rerun it). It returns when
every task has ended, then rebuilds the results table. A cluster's nodes must share the sweep
directory (same path) and have fwbw installed."""

from __future__ import annotations

import logging
import socket
import sys
from types import ModuleType

from fwbw.extras import import_extra
from fwbw.schema import ConfigError, require
from fwbw.study.launchers.base import Assignment, Launch, lost_message, merge_outcomes, outcome_counts, with_runs_left
from fwbw.study.results import write_results
from fwbw.study.sweep import sweep_runs
from fwbw.training.config import TrainConfig

RAY_OBJECT_STORE_BYTES = 100 * 2**20  # a local Ray's object store: the tasks pass only configs and statuses
LOCAL_RAY = "local"  # ray.init's address for a new local instance (not one already running here)
AUTO = "auto"  # --ray-address: the cluster already running on this machine, which Ray finds itself
RAY_CLIENT_PREFIX = "ray://"
RAY_CONNECT_TIMEOUT_S = 5.0


def check(options: Launch) -> None:
    """Ray is installed and a cluster at --ray-address answers, before the sweep writes anything."""
    import_extra("ray", "ray", "--launcher ray")
    if options.ray_address and options.ray_address != AUTO:
        check_reachable(options.ray_address)


def check_reachable(address: str) -> None:
    """ConfigError (one line) unless HOST:PORT (or ray://HOST:PORT) accepts a connection within
    RAY_CONNECT_TIMEOUT_S; ray.init would instead log for a long while before it gave up."""
    host, _, port = address.removeprefix(RAY_CLIENT_PREFIX).rpartition(":")
    require(bool(host) and port.isdigit(), "--ray-address", f"expected HOST:PORT, ray://HOST:PORT or {AUTO}, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise ConfigError(f"--ray-address: no Ray cluster answers at {address} ({reason}); start one "
                          "(ray start --head) or give its address") from None


def launch(assignment: Assignment, options: Launch) -> dict[str, str]:
    """Train the shard's pending runs with Ray tasks, then rebuild the results table; run id ->
    status ('skipped': done, or failed without --retry-failed, before; 'left': still unfinished,
    held elsewhere or by a task that died)."""
    outcome = dict.fromkeys(sweep_runs(assignment.out, assignment.shard), "skipped")
    pending, lost = assignment.pending(), []
    if pending:
        ray = import_extra("ray", "ray", "--launcher ray")
        start_ray(ray, options, assignment.execution.nproc_per_run)
        try:
            outcomes, lost = run_tasks(ray, assignment, pending, options)
        finally:
            ray.shutdown()
        outcome.update(merge_outcomes(outcomes))
    write_results(assignment.out)
    if lost:
        print(f"fwbw sweep: {lost_message(lost, 'Ray task', 'its run was released or is left')}", file=sys.stderr)
    return with_runs_left(outcome, assignment.pending())


def start_ray(ray: ModuleType, options: Launch, nproc_per_run: int = 1) -> None:
    if options.ray_address:
        ray.init(address=options.ray_address, logging_level=logging.WARNING)
        return
    cpus = options.workers * options.run_cpus(nproc_per_run) if options.workers else None
    ray.init(address=LOCAL_RAY, num_cpus=cpus, object_store_memory=RAY_OBJECT_STORE_BYTES, include_dashboard=False,
             logging_level=logging.WARNING)


def run_tasks(
    ray: ModuleType, assignment: Assignment, pending: dict[str, TrainConfig], options: Launch
) -> tuple[list[dict[str, str]], list[str]]:
    """One pull-worker task per pending run, all submitted at once (Ray runs as many as the
    resources allow; a late one finds little or nothing left), none retried; the outcomes they
    return, and the tasks that died (a lost worker, a killed process, an import error)."""
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    nproc = assignment.execution.nproc_per_run
    task = ray.remote(num_cpus=options.run_cpus(nproc), num_gpus=options.run_gpus(pending.values(), has_gpus, nproc),
                      max_retries=0)
    task = task(Assignment.work)
    waiting = {task.remote(assignment): index for index in range(len(pending))}
    outcomes, lost = [], []
    while waiting:
        [ready], _ = ray.wait(list(waiting))
        index = waiting.pop(ready)
        try:
            outcomes.append(ray.get(ready))
            ended = outcome_counts(outcomes[-1])
        except ray.exceptions.RayError as error:
            ended = "died"
            lost.append(f"task {index}: {str(error).strip().splitlines()[-1]}")
        if assignment.progress:
            print(f"[{len(pending) - len(waiting)}/{len(pending)}] Ray task {index}: {ended}", file=sys.stderr)
    return outcomes, lost
