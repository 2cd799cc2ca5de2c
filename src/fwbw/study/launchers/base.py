"""What every launcher shares: the options it is given (Launch), what each of its workers does
with a prepared sweep (Assignment: fwbw.study.sweep.work, or run_one for a single run), and how
several workers' outcomes become the sweep's."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from fwbw.schema import ConfigError, require
from fwbw.study.estimate import plural
from fwbw.study.sweep import Execution, pending_runs, run_one, work
from fwbw.study.sweep_dir import RUNS
from fwbw.training.config import TrainConfig
from fwbw.training.run_dir import read_status

LAUNCHER_NAMES = ("local", "slurm", "ray")
LEFT = "left"  # a run still unfinished once a launch's workers ended (fwbw sweep exits 3: rerun it)
# each launch option, and the launchers it means something to
OPTION_LAUNCHERS = {
    "workers": ("local", "ray"),
    "gpus": ("local",),
    "gpus_per_run": ("slurm", "ray"),
    "cpus_per_run": ("slurm", "ray"),
    "slurm_partition": ("slurm",),
    "slurm_time": ("slurm",),
    "slurm_max_parallel": ("slurm",),
    "wait": ("slurm",),
    "ray_address": ("ray",),
}


@dataclass(frozen=True)
class Launch:
    """Where a sweep's runs are trained and with what resources, which changes neither their
    results nor their ids. An option given to a launcher it means nothing to is refused, naming
    its flag. slurm_options are a sweep file's extra #SBATCH options (fwbw.study.configure)."""

    launcher: str = "local"
    workers: int | None = None
    gpus: tuple[str, ...] = ()
    gpus_per_run: int | None = None
    cpus_per_run: int | None = None
    slurm_partition: str | None = None
    slurm_time: int | None = None
    slurm_max_parallel: int | None = None
    wait: bool = False
    ray_address: str | None = None
    slurm_options: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(self.launcher in LAUNCHER_NAMES, "launcher", f"must be one of {LAUNCHER_NAMES}, got {self.launcher!r}")
        defaults = {item.name: item.default for item in fields(self)}
        for name, launchers in OPTION_LAUNCHERS.items():
            if getattr(self, name) != defaults[name] and self.launcher not in launchers:
                raise ConfigError(f"{flag(name)}: only with --launcher {' or '.join(launchers)}")
        for name in ("workers", "cpus_per_run", "slurm_time", "slurm_max_parallel"):
            value = getattr(self, name)
            require(value is None or value >= 1, flag(name), f"must be >= 1, got {value}")
        require(self.gpus_per_run is None or self.gpus_per_run >= 0, flag("gpus_per_run"),
                f"must be >= 0, got {self.gpus_per_run}")
        require(not (self.workers and self.gpus), flag("workers"), "give --workers or --gpus (one worker per GPU), not both")
        require(not (self.workers and self.ray_address), flag("workers"),
                "sizes a local Ray; the cluster at --ray-address has its own resources")

    def run_gpus(
        self, configs: Iterable[TrainConfig], gpus_available: bool = True, nproc_per_run: int = 1,
        auto_uses_gpus: bool = True,
    ) -> int:
        """GPUs per run: --gpus-per-run, else one per process of a run (--nproc-per-run) when
        there are GPUs and a run may use them: its device is cuda, or auto where `auto_uses_gpus`
        (False where the launcher cannot see whether the cluster has GPUs: SLURM, whose jobs ask for
        GPUs only when --gpus-per-run or --device cuda says so). Fewer GPUs than processes are
        refused: each rank of a run needs its own."""
        if self.gpus_per_run is None:
            uses = any(config.device == "cuda" or (config.device == "auto" and auto_uses_gpus) for config in configs)
            return nproc_per_run * int(gpus_available and uses)
        require(self.gpus_per_run in (0, nproc_per_run) or self.gpus_per_run > nproc_per_run, flag("gpus_per_run"),
                f"{self.gpus_per_run} GPUs cannot hold the {nproc_per_run} processes of a run (--nproc-per-run)")
        return self.gpus_per_run

    def run_cpus(self, nproc_per_run: int = 1) -> int:
        """CPUs per run: --cpus-per-run, else one per process of a run."""
        return self.cpus_per_run or nproc_per_run


def flag(option: str) -> str:
    return "--" + option.replace("_", "-")


@dataclass(frozen=True)
class Assignment:
    """What each worker of a launched sweep does with its prepared directory `out` (sweep.json):
    go through the shard's runs, training those no other worker holds or finished."""

    out: Path
    shard: tuple[int, int] = (0, 1)
    retry_failed: bool = False
    progress: bool = True
    execution: Execution = Execution()

    def work(self) -> dict[str, str]:
        """Every run of the shard in turn (fwbw.study.sweep.work), then the results table."""
        return work(self.out, self.shard, self.retry_failed, self.progress, self.execution)

    def run(self, identifier: str, config: TrainConfig) -> str:
        """One run, unless another worker holds or finished it (fwbw.study.sweep.run_one)."""
        return run_one(config, Path(self.out) / RUNS / identifier, self.retry_failed, self.progress, self.execution)

    def pending(self) -> dict[str, TrainConfig]:
        return pending_runs(self.out, self.shard, self.retry_failed)


def merge_outcomes(outcomes: Iterable[Mapping[str, str]]) -> dict[str, str]:
    """Several workers' outcomes as the sweep's: each run's status from the worker that trained
    it, 'skipped' if none did."""
    merged: dict[str, str] = {}
    for outcome in outcomes:
        for identifier, status in outcome.items():
            if merged.get(identifier, "skipped") == "skipped":
                merged[identifier] = status
    return merged


def with_runs_left(outcome: Mapping[str, str], pending: Iterable[str]) -> dict[str, str]:
    """`outcome` with LEFT for each run that still wants training (`pending`) and that no worker of
    the launch ended: skipped (held elsewhere, by a worker that died, or never reached) or lost (to
    another worker)."""
    pending = set(pending)
    return {identifier: LEFT if identifier in pending and status in ("skipped", "lost") else status
            for identifier, status in outcome.items()}


def outcome_counts(outcome: Mapping[str, str]) -> str:
    """'2 done, 1 failed, 1 skipped': how many runs ended with each status."""
    statuses = list(outcome.values())
    return ", ".join(f"{statuses.count(status)} {status}" for status in sorted(set(statuses))) or "no runs"


def as_recorded(out: Path, outcome: Mapping[str, str]) -> dict[str, str]:
    """`outcome` as the sweep's summary line tells it: a run this launch skipped is 'done before' or
    'failed before' where its directory says so (a finished sweep run again says '12 done before',
    not '12 skipped'); one held by another worker stays 'skipped'."""
    recorded = {}
    for identifier, status in outcome.items():
        if status == "skipped":
            on_disk = read_status(Path(out) / RUNS / identifier)["status"]
            status = f"{on_disk} before" if on_disk in ("done", "failed") else status
        recorded[identifier] = status
    return recorded


def check_none_lost(lost: list[str], what: str, where: str) -> None:
    """After the others finished: RuntimeError naming the workers (`what`: 'worker', 'Ray task',
    'SLURM job') that died before reporting; their runs are finished by rerunning the sweep."""
    if lost:
        raise RuntimeError(lost_message(lost, what, where))


def lost_message(lost: list[str], what: str, where: str) -> str:
    """'2 SLURM jobs ended without finishing (7_0, 7_1; WHERE): rerun the sweep to finish their runs'."""
    shown = ", ".join(lost[:3]) + (", ..." if len(lost) > 3 else "")
    return f"{plural(len(lost), what)} ended without finishing ({shown}; {where}): rerun the sweep to finish their runs"



