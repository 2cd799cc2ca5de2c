"""Experiment trackers (`--tracker`): rank 0 also sends every eval point of a run to TensorBoard,
Weights & Biases or MLflow; metrics.jsonl stays the source of truth. One tracker run per fwbw run,
named by its run id (the run directory's name) and grouped by the folder the run belongs to (its
sweep, see tracking_home). What goes where:

  tensorboard  event files in RUN/tensorboard/
  wandb        online when W&B credentials are configured (WANDB_API_KEY, `wandb login`), else
               offline in RUN/wandb/ (`wandb sync RUN/wandb/offline-run-*` uploads it later);
               WANDB_MODE overrides both, WANDB_PROJECT the project (fwbw); charts plot against
               the training step, the metric `step`
  mlflow       MLFLOW_TRACKING_URI, else (local launcher and fwbw train only) the SQLite store
               HOME/mlflow.db (artifacts in HOME/mlflow-artifacts/), in the experiment named after
               HOME; the MLflow run ends FINISHED, FAILED (an error) or KILLED (an interruption)

A run that resumes from a checkpoint continues its tracker run: TensorBoard hides the points the
interrupted attempt logged after that checkpoint (they are logged again), W&B continues the run
of the same id, MLflow the newest run tagged with the run directory's key, skipping the steps it
already holds. A run started from scratch is a new MLflow run and a new W&B run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
import time
import uuid
from pathlib import Path

from fwbw.extras import import_extra
from fwbw.files import atomic_write_text
from fwbw.schema import ConfigError
from fwbw.training.run_dir import RUNS, SWEEP_FILE, LeaseLost

TENSORBOARD_DIR = "tensorboard"
MLFLOW_STORE = "mlflow.db"
MLFLOW_ARTIFACTS = "mlflow-artifacts"
MLFLOW_LOCK = ".mlflow.lock"  # held while a worker sets up its MLflow run
WANDB_PROJECT = "fwbw"
WANDB_DIR = "wandb"  # W&B's own folder in the run directory (dir=RUN)
WANDB_ID_FILE = "fwbw_run_id"  # the current attempt's W&B run id, in WANDB_DIR
ATTEMPT_HEX = 6  # hex digits telling attempts at a run apart in its W&B id
RUN_KEY_TAG = "fwbw_run_key"  # MLflow: the tag that finds a resumed run's MLflow run
LR_PREFIX = "lr/"  # lr/<param group> (fwbw.training.recipe.GROUPS)
TOKENS_PER_S = "train_tokens_per_s"  # training tokens per second since the previous eval point
STEP_METRIC = "step"  # W&B: the training step, as a metric (the x axis of the run's charts)
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"  # how a run ended (MLflow's run statuses)


def tracking_home(run_dir: Path) -> Path:
    """The folder a run belongs to: its sweep for a sweep's run (SWEEP/runs/RUN next to
    SWEEP/sweep.json), else the folder that holds the run directory."""
    run_dir = Path(run_dir).resolve()
    sweep = run_dir.parent.parent
    return sweep if run_dir.parent.name == RUNS and (sweep / SWEEP_FILE).is_file() else run_dir.parent


def run_key(run_dir: Path) -> str:
    """Stable across reruns and unique to the run directory: the W&B run id, the MLflow tag."""
    return hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


class Tracker:
    """Where eval points go besides metrics.jsonl; this one ('none') drops them."""

    extra: str | None = None  # the pyproject extra that installs the backend's library
    library: str = ""  # the module it imports

    def __init__(self, run_dir: Path, resumed_step: int):
        pass

    @classmethod
    def import_library(cls):
        """The backend's library, or RuntimeError naming the extra that installs it."""
        return import_extra(cls.library, cls.extra, f"--tracker {cls.extra}")

    @classmethod
    def check(cls) -> None:
        """Fail before any work where the backend cannot run here: its library is not installed."""
        if cls.extra is not None:
            cls.import_library()

    def log(self, record: dict[str, float], step: int) -> None:
        pass

    def close(self, status: str) -> None:
        """`status`: how the run ended (FINISHED, FAILED or KILLED)."""


class TensorBoardTracker(Tracker):
    extra, library = "tensorboard", "torch.utils.tensorboard"

    def __init__(self, run_dir: Path, resumed_step: int):
        # purge_step: TensorBoard hides what an earlier attempt logged after the resumed checkpoint
        writer = self.import_library().SummaryWriter
        self.writer = writer(Path(run_dir) / TENSORBOARD_DIR, purge_step=resumed_step + 1)

    def log(self, record: dict[str, float], step: int) -> None:
        for key, value in record.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    extra, library = "wandb", "wandb"

    def __init__(self, run_dir: Path, resumed_step: int):
        wandb = self.import_library()
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), id=wandb_run_id(run_dir, resumed_step),
            resume="allow",
            name=Path(run_dir).name, group=tracking_home(run_dir).name, dir=run_dir, mode=wandb_mode(wandb),
        )
        # W&B's own step must increase: a point logged below the run's latest is dropped, and a
        # resumed attempt logs again the points after its checkpoint, which the interrupted one
        # may have logged. So W&B counts its steps itself (one per point, continued on resume) and
        # the charts plot against the training step, a metric of each point (W&B's custom x axis).
        self.run.define_metric(STEP_METRIC)
        self.run.define_metric("*", step_metric=STEP_METRIC)

    def log(self, record: dict[str, float], step: int) -> None:
        self.run.log({**record, STEP_METRIC: step})

    def close(self, status: str) -> None:
        self.run.finish()


def wandb_run_id(run_dir: Path, resumed_step: int) -> str:
    """The W&B run id of this attempt at the run: a resumed attempt continues the id of the attempt
    whose checkpoint it resumed (kept in RUN/wandb/WANDB_ID_FILE); one that starts from scratch gets
    a new id, so that its points do not mix with those of the attempt it replaces."""
    path = Path(run_dir) / WANDB_DIR / WANDB_ID_FILE
    if resumed_step > 0 and path.is_file():
        return path.read_text().strip()
    identity = f"{run_key(run_dir)}-{uuid.uuid4().hex[:ATTEMPT_HEX]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, identity)
    return identity


def wandb_mode(wandb) -> str | None:
    """None (W&B follows WANDB_MODE) when the user set it, else online if W&B credentials are
    configured (checked without a prompt or the network), else offline."""
    if os.environ.get("WANDB_MODE"):
        return None
    return "online" if wandb.login(prompt=False, verify=False) else "offline"


@contextlib.contextmanager
def exclusive(lock: Path):
    """Held by one process at a time (of this host, and of hosts whose shared filesystem has locks)."""
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def cluster_launcher() -> str | None:
    """The multi-host launcher that started this process (or an ancestor: torchrun's ranks), as its
    environment says: submitit's SLURM job (the slurm launcher), a Ray worker (the ray launcher);
    None for the local launcher and fwbw train."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        return "slurm"
    return "ray" if os.environ.get("RAY_RAYLET_PID") else None


class MlflowTracker(Tracker):
    extra, library = "mlflow", "mlflow"

    @classmethod
    def check(cls) -> None:
        """Also: the workers of a multi-host launcher need a tracking server, since the SQLite store
        in the sweep directory is a file on a shared filesystem, whose locks do not hold."""
        super().check()
        launcher = cluster_launcher()
        if launcher and not os.environ.get("MLFLOW_TRACKING_URI"):
            raise ConfigError(f"--tracker mlflow under --launcher {launcher} needs MLFLOW_TRACKING_URI, a tracking server "
                              "every host reaches (the SQLite store in the sweep directory is for --launcher local)")

    def __init__(self, run_dir: Path, resumed_step: int):
        mlflow = self.import_library()
        self.metric = mlflow.entities.Metric
        home = tracking_home(run_dir)
        given_uri = os.environ.get("MLFLOW_TRACKING_URI")
        # one worker of a sweep at a time: creating the SQLite store or the experiment at once fails
        with exclusive(home / MLFLOW_LOCK):
            self.client = mlflow.tracking.MlflowClient(given_uri or f"sqlite:///{home / MLFLOW_STORE}")
            experiment = self._experiment(home.name, None if given_uri else (home / MLFLOW_ARTIFACTS).as_uri())
            self.run_id = self._run(experiment, Path(run_dir), resumed_step)
        logged = self.client.get_metric_history(self.run_id, "tokens")  # a value of every eval point's record
        self.logged_to = max((point.step for point in logged), default=-1)

    def _experiment(self, name: str, artifacts: str | None) -> str:
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found else self.client.create_experiment(name, artifact_location=artifacts)

    def _run(self, experiment: str, run_dir: Path, resumed_step: int) -> str:
        """The newest MLflow run of the run directory if the run resumed from a checkpoint, else a new one."""
        key = run_key(run_dir)
        earlier = self.client.search_runs(
            [experiment], f"tags.{RUN_KEY_TAG} = '{key}'", order_by=["attributes.start_time DESC"], max_results=1,
        ) if resumed_step else []
        if not earlier:
            return self.client.create_run(experiment, run_name=run_dir.name, tags={RUN_KEY_TAG: key}).info.run_id
        self.client.update_run(earlier[0].info.run_id, status="RUNNING")
        return earlier[0].info.run_id

    def log(self, record: dict[str, float], step: int) -> None:
        if step <= self.logged_to:  # logged before the run was interrupted
            return
        now = int(time.time() * 1000)
        metrics = [self.metric(key, float(value), now, step) for key, value in record.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


BACKENDS: dict[str, type[Tracker]] = {
    "none": Tracker, "tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker,
}
TRACKERS = tuple(BACKENDS)


def check_tracker(name: str) -> None:
    """Fail before any work on an unknown tracker or one that cannot run here (Tracker.check)."""
    if name not in BACKENDS:
        raise ConfigError(f"tracker: must be one of {', '.join(TRACKERS)}, got {name!r}")
    BACKENDS[name].check()


def open_tracker(name: str, run_dir: Path, resumed_step: int = 0) -> Tracker:
    """The tracker `name` for the run in `run_dir`, which resumed from a checkpoint at
    `resumed_step` (0: started from scratch)."""
    check_tracker(name)
    return BACKENDS[name](run_dir, resumed_step)


class EvalPoints:
    """Sends each eval point of a run to its tracker, opened before training or at the first point
    (a finished run's rerun opens none): the record's values but its step, the learning rate of
    every optimizer param group, and the training tokens/s since the previous point (or since the
    run resumed). A tracker that fails, to open (a server out of reach, a lock refused) or later
    (a server gone away), is said once and dropped: metrics.jsonl is the record, and a run is not
    lost for its tracker. As a context manager around the run, it closes the tracker with how the
    run ended (end_status)."""

    def __init__(self, tracker: str, run_dir: Path, resumed_step: int, tokens: int, training_seconds: float):
        self.name, self.run_dir, self.resumed_step = tracker, run_dir, resumed_step
        self.tracker: Tracker | None = None
        self.failed = False
        self.previous = (tokens, training_seconds)

    def __enter__(self) -> EvalPoints:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(end_status(error))

    def open(self) -> None:
        """Open the tracker now, unless it is open or failed."""
        if self.tracker is None and not self.failed:
            self._call(self._open)

    def _open(self) -> None:
        self.tracker = open_tracker(self.name, self.run_dir, self.resumed_step)

    def log(self, record: dict, optimizer, training_seconds: float) -> None:
        """`training_seconds`: of the whole run until this point, evaluation left out."""
        tokens, seconds = self.previous
        values = {key: value for key, value in record.items() if key != "step"}
        values.update({LR_PREFIX + group["name"]: group["lr"] for group in optimizer.param_groups})
        if training_seconds > seconds:
            values[TOKENS_PER_S] = (record["tokens"] - tokens) / (training_seconds - seconds)
        self.previous = (record["tokens"], training_seconds)
        self.open()
        if self.tracker is not None:
            self._call(self.tracker.log, values, record["step"])

    def close(self, status: str) -> None:
        """Close the tracker, if open, saying how the run ended (FINISHED, FAILED or KILLED)."""
        if self.tracker is not None:
            self._call(self.tracker.close, status)

    def _call(self, method, *args) -> None:
        try:
            method(*args)
        except Exception as error:  # any backend's own errors, file locks (flock, SQLite's) included
            self.tracker, self.failed = None, True
            first_line = str(error).strip().partition("\n")[0]  # SQLAlchemy's errors go on with the SQL
            print(f"{self.run_dir}: --tracker {self.name} failed, the run goes on without it (metrics.jsonl has "
                  f"every point): {type(error).__name__}: {first_line}", file=sys.stderr, flush=True)


def end_status(error: BaseException | None) -> str:
    """How a run that raised `error` (None: none) ended: FINISHED, FAILED on an error of its own,
    KILLED when stopped from outside (Ctrl-C, a signal, an exit, a lost lease)."""
    if error is None:
        return FINISHED
    return KILLED if isinstance(error, LeaseLost) or not isinstance(error, Exception) else FAILED
