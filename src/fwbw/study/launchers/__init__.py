"""Where a sweep's runs are trained (`fwbw sweep --launcher`). A launch prepares the sweep
directory once (sweep.json), then hands its runs to workers that all go through the same
run-claim protocol (fwbw.study.sweep.run_one) and write the same results table, so launchers can
be mixed, restarted or killed at any moment: rerunning any of them finishes what is left.

  local   this process, or --workers N / --gpus 0,1,... worker processes on this machine
  slurm   a submitit job array of pull-workers on a SLURM cluster
  ray     pull-worker Ray tasks (as many running as the resources allow), on a Ray cluster or a local Ray
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fwbw.schema import ConfigError
from fwbw.study.launchers import local, ray, slurm
from fwbw.study.launchers.base import LAUNCHER_NAMES, Assignment, Launch
from fwbw.study.sweep import SweepSpec, prepare_sweep
from fwbw.training.trainer import check_shares

LAUNCHERS = dict(zip(LAUNCHER_NAMES, (local, slurm, ray)))  # each module has check(options), launch(assignment, options)


def launch_sweep(spec: SweepSpec, options: Launch, assignment: Assignment) -> dict[str, str] | None:
    """Check that the launcher can work here and that every run can be shared among its processes,
    before anything is written; prepare the sweep in
    assignment.out; launch it, naming the sweep by its absolute path (workers of a cluster start in
    other directories). Run id -> status, or None for jobs submitted and not waited for."""
    launcher = LAUNCHERS[options.launcher]
    if assignment.execution.nodes_per_run is not None and options.launcher != "slurm":
        raise ConfigError("--nodes-per-run: only with --launcher slurm (srun starts a run's processes on each node of its job)")
    launcher.check(options)
    for config in spec.configs():
        check_shares(config, assignment.execution.ranks.world_size)
    prepare_sweep(spec, assignment.out)
    return launcher.launch(dataclasses.replace(assignment, out=Path(assignment.out).absolute()), options)
