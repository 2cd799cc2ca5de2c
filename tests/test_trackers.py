"""--tracker: every eval point of metrics.jsonl, read back from what TensorBoard, W&B (offline) and
MLflow (a SQLite store) wrote, once per step also when a run resumes; a missing extra is one line;
a tracker that fails, to open too (a lock refused), is dropped and the run goes on; MLflow's run
ends as the run did, and needs a tracking server under a multi-host launcher. Nothing leaves the
machine: W&B is offline (or a fake with the server's rules), MLflow's store is in the test's folder."""

import contextlib
import errno
import json
import os
import sqlite3
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import (
    SUBPROCESS_TIMEOUT,
    TOKENIZER,
    base_config,
    read_metrics,
    subprocess_env,
    tiny_config,
)

from fwbw.cli import main
from fwbw.schema import ConfigError
from fwbw.study.torchrun import Ranks, torchrun_command, train_in_processes
from fwbw.training import trackers
from fwbw.training.recipe import GROUPS
from fwbw.training.run_dir import LeaseLost
from fwbw.training.trackers import EvalPoints, Tracker, check_tracker, tracking_home
from fwbw.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("cache_env", "one_thread")

CRASH_STEP = 5  # between the checkpoints of steps 3 and 6 (of 7) of a train_flags run
RESUMED_STEP = 3


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "MLFLOW_TRACKING_URI", "WANDB_PROJECT", "SUBMITIT_EXECUTOR", "RAY_RAYLET_PID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))


@pytest.fixture(scope="module", autouse=True)
def wandb_service_stopped():
    """W&B's service process ends with the module's tests, not with the test session."""
    yield
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


def train(train_flags: list[str], run: Path, tracker: str) -> None:
    assert main(["train", *train_flags, "--out", str(run), "--tracker", tracker]) == 0


def train_until(error: BaseException, train_flags: list[str], run: Path, tracker: str, monkeypatch) -> int:
    """`fwbw train`, which raises `error` at CRASH_STEP; its exit code."""
    real_train_step = Trainer.train_step

    def crash(self, directions=None):
        if self.state.step == CRASH_STEP:
            raise error
        return real_train_step(self, directions)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", crash)
        return main(["train", *train_flags, "--out", str(run), "--tracker", tracker])


def train_with_ctrl_c_then_resume(train_flags: list[str], run: Path, tracker: str, monkeypatch) -> None:
    assert train_until(KeyboardInterrupt(), train_flags, run, tracker, monkeypatch) == 130
    train(train_flags, run, tracker)


def losses(records: list[dict]) -> dict[str, dict[int, float]]:
    return {key: {record["step"]: record[key] for record in records if key in record} for key in ("fw_loss", "bw_loss")}


# --- readers of what each tracker wrote -----------------------------------------------------


def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / trackers.TENSORBOARD_DIR))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wandb_records(path: Path):
    """The records of a .wandb file: LevelDB's log format (a 7-byte file header, then 32 KiB blocks
    of records, each with a 7-byte header: crc32, length, kind; kinds 1 (whole) and 2-4 (first,
    middle, last piece)) holding W&B's Record protobufs."""
    from wandb.proto.wandb_internal_pb2 import Record

    block, header = 32768, 7
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pieces = header, b""
    while position + header <= len(data):
        if block - position % block < header:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + header])
        pieces += data[position + header:position + header + length]
        position += header + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def wandb_offline_runs(run: Path) -> list[dict]:
    """Each offline W&B run in the run directory, oldest first: its id, name, group and history
    ({training step: {key: value}}, the training step being the metric its charts plot against)."""
    found = []
    for path in sorted((run / "wandb").glob("offline-run-*/run-*.wandb")):
        found.append({"history": {}})
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                found[-1].update(id=record.run.run_id, name=record.run.display_name, group=record.run.run_group,
                                 project=record.run.project)
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                found[-1]["history"][row[trackers.STEP_METRIC]] = row
    return found


def mlflow_runs(store: Path, experiment_name: str) -> tuple:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name(experiment_name)
    return client, client.search_runs([experiment.experiment_id])


# --- the trackers ------------------------------------------------------------------------------


def test_tensorboard_holds_every_value_of_metrics_jsonl_at_its_steps(train_flags, tmp_path):
    run = tmp_path / "run"
    train(train_flags, run, "tensorboard")
    records = read_metrics(run)
    scalars = tensorboard_scalars(run)
    tracked = set(records[0]) - {"step"}
    assert set(scalars) == tracked | {f"lr/{group}" for group in GROUPS} | {trackers.TOKENS_PER_S}
    for key in tracked:
        assert scalars[key] == [(record["step"], pytest.approx(record[key], rel=1e-6)) for record in records], key
    assert [step for step, _ in scalars[trackers.TOKENS_PER_S]] == [record["step"] for record in records]
    assert all(tokens_per_s > 0 for _, tokens_per_s in scalars[trackers.TOKENS_PER_S])


def test_a_resumed_run_shows_each_eval_point_once_in_tensorboard(train_flags, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train_with_ctrl_c_then_resume(train_flags, run, "tensorboard", monkeypatch)
    records = read_metrics(run)
    scalars = tensorboard_scalars(run)
    assert len(list((run / trackers.TENSORBOARD_DIR).iterdir())) == 2  # one event file per attempt
    for key, by_step in losses(records).items():
        assert scalars[key] == [(step, pytest.approx(value, rel=1e-6)) for step, value in by_step.items()]


def test_an_offline_wandb_run_holds_the_losses_named_by_run_id_and_grouped_by_folder(train_flags, tmp_path):
    run = tmp_path / "grid" / "run"
    train(train_flags, run, "wandb")
    [offline] = wandb_offline_runs(run)
    assert (offline["name"], offline["group"], offline["project"]) == ("run", "grid", trackers.WANDB_PROJECT)
    assert offline["id"] == (run / "wandb" / trackers.WANDB_ID_FILE).read_text()
    assert offline["id"].startswith(trackers.run_key(run) + "-")
    for key, by_step in losses(read_metrics(run)).items():
        assert {step: row[key] for step, row in offline["history"].items()} == by_step


def test_a_resumed_run_continues_its_wandb_run_with_the_points_after_the_checkpoint(train_flags, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train_with_ctrl_c_then_resume(train_flags, run, "wandb", monkeypatch)
    interrupted, resumed = wandb_offline_runs(run)
    assert interrupted["id"] == resumed["id"] and interrupted["id"].startswith(trackers.run_key(run))
    steps = [record["step"] for record in read_metrics(run)]
    assert list(interrupted["history"]) == [step for step in steps if step < CRASH_STEP]
    assert list(resumed["history"]) == [step for step in steps if step > RESUMED_STEP]
    latest = {**interrupted["history"], **resumed["history"]}
    for key, by_step in losses(read_metrics(run)).items():
        assert {step: row[key] for step, row in latest.items()} == by_step


def test_mlflow_keeps_the_losses_in_a_sqlite_store_next_to_the_run(train_flags, tmp_path):
    run = tmp_path / "grid" / "run"
    train(train_flags, run, "mlflow")
    client, [tracked] = mlflow_runs(tmp_path / "grid" / trackers.MLFLOW_STORE, "grid")
    assert tracked.info.run_name == "run" and tracked.info.status == "FINISHED"
    for key, by_step in losses(read_metrics(run)).items():
        history = client.get_metric_history(tracked.info.run_id, key)
        assert {point.step: point.value for point in history} == by_step
    experiment = client.get_experiment(tracked.info.experiment_id)
    assert experiment.artifact_location == (tmp_path / "grid" / trackers.MLFLOW_ARTIFACTS).as_uri()


def test_a_resumed_run_continues_its_mlflow_run_without_logging_a_step_twice(train_flags, tmp_path, monkeypatch):
    run = tmp_path / "grid" / "run"
    train_with_ctrl_c_then_resume(train_flags, run, "mlflow", monkeypatch)
    client, [tracked] = mlflow_runs(tmp_path / "grid" / trackers.MLFLOW_STORE, "grid")
    for key, by_step in losses(read_metrics(run)).items():
        history = client.get_metric_history(tracked.info.run_id, key)
        assert [(point.step, point.value) for point in history] == list(by_step.items())


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb", "mlflow"])
def test_a_missing_extra_is_one_line_naming_it_before_any_work(tracker, train_flags, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, trackers.BACKENDS[tracker].library, None)  # import fails as if not installed
    run = tmp_path / "run"
    assert main(["train", *train_flags, "--out", str(run), "--tracker", tracker]) == 2
    assert capsys.readouterr().err == (
        f"fwbw train: error: --tracker {tracker} needs the '{tracker}' extra: pip install 'fwbw[{tracker}]'\n")
    assert not run.exists()


def test_an_unknown_tracker_is_refused(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="^tracker: must be one of none, tensorboard, wandb, mlflow, got 'tensorbord'$"):
        Trainer(tiny_config(), tmp_path / "run", data=tiny_data, progress=False, tracker="tensorbord")


# --- what goes to a tracker, and where ---------------------------------------------------------


class Recording(Tracker):
    opened: list = []

    def __init__(self, run_dir: Path, resumed_step: int):
        self.points, self.closed = [], None
        Recording.opened.append((self, run_dir, resumed_step))

    def log(self, record: dict, step: int) -> None:
        self.points.append((step, record))

    def close(self, status: str) -> None:
        self.closed = status


class Optimizer:
    param_groups = [{"name": "decay", "lr": 0.25}, {"name": "output", "lr": 0.5}]


class LoginCheck:
    """wandb's login, answering whether credentials are configured."""

    def __init__(self, logged_in: bool):
        self.logged_in, self.calls = logged_in, []

    def login(self, **options) -> bool:
        self.calls.append(options)
        return self.logged_in


def test_wandb_goes_online_only_when_logged_in_and_follows_wandb_mode(monkeypatch):
    assert trackers.wandb_mode(LoginCheck(True)) is None  # WANDB_MODE (offline here): W&B follows it
    monkeypatch.delenv("WANDB_MODE")
    logged_in, logged_out = LoginCheck(True), LoginCheck(False)
    assert (trackers.wandb_mode(logged_in), trackers.wandb_mode(logged_out)) == ("online", "offline")
    assert logged_in.calls == logged_out.calls == [{"prompt": False, "verify": False}]  # no prompt, no network


def test_eval_points_carry_the_record_learning_rates_and_training_tokens_per_second(monkeypatch, tmp_path):
    monkeypatch.setitem(trackers.BACKENDS, "none", Recording)
    monkeypatch.setattr(Recording, "opened", [])
    points = EvalPoints("none", tmp_path, resumed_step=4, tokens=1000, training_seconds=2.0)
    assert Recording.opened == []  # opened at the first point: a finished run's rerun opens nothing
    points.log({"step": 6, "tokens": 3000, "fw_loss": 1.5}, Optimizer(), training_seconds=6.0)
    points.log({"step": 8, "tokens": 3000, "fw_loss": 1.25}, Optimizer(), training_seconds=6.0)  # no training between
    points.close(trackers.FINISHED)
    [(tracker, run_dir, resumed_step)] = Recording.opened
    assert (run_dir, resumed_step, tracker.closed) == (tmp_path, 4, trackers.FINISHED)
    assert tracker.points == [
        (6, {"tokens": 3000, "fw_loss": 1.5, "lr/decay": 0.25, "lr/output": 0.5, "train_tokens_per_s": 500.0}),
        (8, {"tokens": 3000, "fw_loss": 1.25, "lr/decay": 0.25, "lr/output": 0.5}),
    ]


class FailingAtSecondPoint(Recording):
    def log(self, record: dict, step: int) -> None:
        if self.points:
            raise ConnectionError("tracking server gone")
        super().log(record, step)


def test_each_attempt_from_scratch_gets_its_own_wandb_run_and_a_resumed_one_continues_it(tmp_path):
    """A restart under the old id would mix its points with those of the attempt it replaces."""
    run = tmp_path / "run"
    first = trackers.wandb_run_id(run, resumed_step=0)
    assert trackers.wandb_run_id(run, resumed_step=40) == first
    restarted = trackers.wandb_run_id(run, resumed_step=0)
    assert restarted != first and restarted.startswith(trackers.run_key(run) + "-")
    assert trackers.wandb_run_id(run, resumed_step=8) == restarted


def test_a_tracker_that_fails_after_it_started_is_said_once_and_dropped(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(trackers.BACKENDS, "none", FailingAtSecondPoint)
    monkeypatch.setattr(Recording, "opened", [])
    points = EvalPoints("none", tmp_path, resumed_step=0, tokens=0, training_seconds=0.0)
    for step in (2, 4, 6):
        points.log({"step": step, "tokens": 100 * step, "fw_loss": 1.0}, Optimizer(), training_seconds=float(step))
    points.close(trackers.FINISHED)
    [(tracker, _, _)] = Recording.opened
    assert [step for step, _ in tracker.points] == [2] and tracker.closed is None  # nothing sent after the failure
    assert capsys.readouterr().err == (f"{tmp_path}: --tracker none failed, the run goes on without it (metrics.jsonl "
                                       "has every point): ConnectionError: tracking server gone\n")


def test_a_run_belongs_to_its_sweep_else_to_the_folder_that_holds_it(tmp_path):
    sweep = tmp_path / "grid"
    (sweep / "runs" / "d1").mkdir(parents=True)
    (sweep / "sweep.json").write_text("{}")
    assert tracking_home(sweep / "runs" / "d1") == sweep
    assert tracking_home(tmp_path / "runs" / "mine") == tmp_path / "runs"  # no sweep.json: not a sweep
    assert tracking_home(tmp_path / "lone") == tmp_path
    assert trackers.run_key(sweep / "runs" / "d1") != trackers.run_key(tmp_path / "runs" / "d1")


def test_torchrun_passes_the_tracker_to_every_rank(tmp_path):
    assert torchrun_command(Ranks(2), tmp_path, progress=False, tracker="wandb")[-3:] == ["--tracker", "wandb", "--no-progress"]
    assert "--tracker" not in torchrun_command(Ranks(2), tmp_path, progress=False)


def sweep(corpus, out: Path, tracker: str) -> dict[str, Path]:
    """Two tiny runs (p_bw 0 and 0.5) in the sweep `out`, trained in this process; its run directories."""
    assert main(["sweep", "--config", str(corpus.recipe_toml), "--data", corpus.spec, "--tokenizer", TOKENIZER,
                 "--depths", "1", "--widths", "16", "--p-bw", "0", "0.5", "--seeds", "1", "--seq-len", "16",
                 "--train-tokens", "2000", "--eval-every", "0.05", "--eval-tokens", "512",
                 "--tokens-per-microbatch", "256", "--device", "cpu", "--dtype", "fp32", "--out", str(out),
                 "--no-progress", "--tracker", tracker]) == 0
    return {run.name: run for run in (out / "runs").iterdir()}


def test_a_sweep_has_one_mlflow_run_per_run_named_by_its_id_in_the_sweeps_experiment(corpus, tmp_path):
    runs = sweep(corpus, tmp_path / "grid", "mlflow")
    client, tracked = mlflow_runs(tmp_path / "grid" / trackers.MLFLOW_STORE, "grid")
    assert sorted(run.info.run_name for run in tracked) == sorted(runs) and len(runs) == 2
    for run in tracked:
        history = client.get_metric_history(run.info.run_id, "fw_loss")
        assert {point.step: point.value for point in history} == losses(read_metrics(runs[run.info.run_name]))["fw_loss"]


def test_a_sweep_has_one_wandb_run_per_run_named_by_its_id_and_grouped_by_the_sweep(corpus, tmp_path):
    runs = sweep(corpus, tmp_path / "grid", "wandb")
    assert len(runs) == 2
    for name, run in runs.items():
        [offline] = wandb_offline_runs(run)
        assert (offline["name"], offline["group"]) == (name, "grid")
        assert offline["id"].startswith(trackers.run_key(run) + "-")
        assert {step: row["bw_loss"] for step, row in offline["history"].items() if "bw_loss" in row} == \
            losses(read_metrics(run))["bw_loss"]


@pytest.mark.slow
def test_of_two_ranks_under_torchrun_only_rank_0_writes_to_the_tracker(corpus, tmp_path, monkeypatch):
    for name, value in subprocess_env().items():
        monkeypatch.setenv(name, value)
    run = tmp_path / "run"
    train_in_processes(base_config(corpus), run, Ranks(2), progress=False, tracker="tensorboard")
    [event_file] = (run / trackers.TENSORBOARD_DIR).iterdir()
    scalars = tensorboard_scalars(run)
    for key, by_step in losses(read_metrics(run)).items():
        assert scalars[key] == [(step, pytest.approx(value, rel=1e-6)) for step, value in by_step.items()]


OPEN_MLFLOW_RUN = """
import sys
from pathlib import Path
from fwbw.training.trackers import open_tracker
tracker = open_tracker("mlflow", Path(sys.argv[1]))
tracker.log({"tokens": 1}, 1)
tracker.close("FINISHED")
"""


@pytest.mark.slow
def test_two_workers_starting_at_once_share_a_new_mlflow_store(tmp_path):
    sweep = tmp_path / "grid"
    runs = [sweep / "runs" / name for name in ("a", "b")]
    for run in runs:
        run.mkdir(parents=True)
    (sweep / "sweep.json").write_text("{}")
    env = {key: value for key, value in subprocess_env().items() if key != "MLFLOW_TRACKING_URI"}
    workers = [subprocess.Popen([sys.executable, "-c", OPEN_MLFLOW_RUN, str(run)], env=env, stderr=subprocess.PIPE,
                                text=True) for run in runs]
    errors = [worker.communicate(timeout=SUBPROCESS_TIMEOUT)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], errors
    _, tracked = mlflow_runs(sweep / trackers.MLFLOW_STORE, "grid")
    assert sorted(run.info.run_name for run in tracked) == ["a", "b"]


# --- W&B's steps on resume ---------------------------------------------------------------------


class WandbServer:
    """The wandb module as WandbTracker uses it, keeping each run as W&B's server does: a run
    resumed by id continues its history and its step, a point logged at a step below the run's
    next one is dropped ("Steps must be monotonically increasing, so this data will be ignored"),
    and a chart plots a metric against its step_metric (define_metric), else against W&B's step."""

    def __init__(self):
        self.runs: dict[str, WandbRun] = {}

    def login(self, **options) -> bool:
        return True

    def init(self, id: str, resume: str, **options):
        assert resume == "allow"
        return self.runs.setdefault(id, WandbRun())


class WandbRun:
    def __init__(self):
        self.rows, self.next_step, self.step_metrics = [], 0, {}

    def define_metric(self, name: str, step_metric: str | None = None) -> None:
        self.step_metrics[name] = step_metric

    def log(self, data: dict, step: int | None = None) -> None:
        step = self.next_step if step is None else step
        if step >= self.next_step:
            self.rows.append({"_step": step, **data})
            self.next_step = step + 1

    def finish(self) -> None:
        pass

    def chart(self, metric: str) -> dict:
        """x -> y of the metric's chart, the latest point at each x."""
        x = self.step_metrics.get(metric) or self.step_metrics.get("*") or "_step"
        return {row[x]: row[metric] for row in self.rows if metric in row}


def test_a_resumed_wandb_run_keeps_the_points_it_logs_again_after_its_checkpoint(monkeypatch, tmp_path):
    server = WandbServer()
    monkeypatch.setitem(sys.modules, "wandb", server)
    run = tmp_path / "run"
    interrupted = trackers.WandbTracker(run, resumed_step=0)
    for step in (2, 4):  # then interrupted at step 5, its last checkpoint at step 3
        interrupted.log({"fw_loss": 1.0 + step}, step)
    interrupted.close(trackers.KILLED)
    resumed = trackers.WandbTracker(run, resumed_step=3)
    for step in (4, 6):
        resumed.log({"fw_loss": 2.0 + step}, step)
    resumed.close(trackers.FINISHED)
    [tracked] = server.runs.values()
    assert tracked.chart("fw_loss") == {2: 3.0, 4: 6.0, 6: 8.0}


# --- a tracker's failures, and how its run ends ----------------------------------------------------


class FailingToOpen(Recording):
    def __init__(self, run_dir: Path, resumed_step: int):
        raise ConnectionError("tracking server out of reach")


def failure_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "--tracker" in line]


def test_a_tracker_that_cannot_open_is_said_once_and_the_run_goes_on(monkeypatch, tiny_data, tmp_path, capsys):
    monkeypatch.setitem(trackers.BACKENDS, "none", FailingToOpen)
    run = tmp_path / "run"
    summary = Trainer(tiny_config(), run, data=tiny_data, progress=False).run()
    assert summary["status"] == "done" and read_metrics(run)[-1]["step"] == summary["steps"]
    assert failure_lines(capsys.readouterr().err) == [f"{run}: --tracker none failed, the run goes on without it "
                                                      "(metrics.jsonl has every point): ConnectionError: tracking "
                                                      "server out of reach"]


def test_mlflow_refused_its_lock_is_dropped_and_the_run_goes_on(train_flags, tmp_path, monkeypatch, capsys):
    """A shared filesystem without locks (NFS without lockd) refuses flock with ENOLCK."""
    real_flock = trackers.fcntl.flock

    def flock(file, operation):
        if Path(getattr(file, "name", "")).name == trackers.MLFLOW_LOCK:
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        return real_flock(file, operation)

    monkeypatch.setattr(trackers.fcntl, "flock", flock)
    run = tmp_path / "grid" / "run"
    train(train_flags, run, "mlflow")
    assert [record["step"] for record in read_metrics(run)][-1] == json.loads((run / "summary.json").read_text())["steps"]
    [line] = failure_lines(capsys.readouterr().err)
    assert line.endswith(f"--tracker mlflow failed, the run goes on without it (metrics.jsonl has every point): "
                         f"OSError: [Errno {errno.ENOLCK}] {os.strerror(errno.ENOLCK)}")


def test_mlflow_finding_its_store_locked_is_dropped_and_the_run_goes_on(train_flags, tmp_path, capsys):
    """Another process holds the SQLite store longer than SQLite waits: 'database is locked'."""
    run = tmp_path / "grid" / "run"
    run.parent.mkdir()
    holder = sqlite3.connect(run.parent / trackers.MLFLOW_STORE, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        train(train_flags, run, "mlflow")
    finally:
        holder.close()
    assert read_metrics(run)
    [line] = failure_lines(capsys.readouterr().err)
    assert line.endswith("OperationalError: (sqlite3.OperationalError) database is locked")


@pytest.mark.parametrize(("error", "exit_code", "status"), [
    (KeyboardInterrupt(), 130, "KILLED"),  # Ctrl-C, or a signal raised as one
    (RuntimeError("the GPU fell off the bus"), 2, "FAILED"),
])
def test_an_mlflow_run_ends_killed_when_interrupted_and_failed_on_an_error(
    error, exit_code, status, train_flags, tmp_path, monkeypatch
):
    assert train_until(error, train_flags, tmp_path / "grid" / "run", "mlflow", monkeypatch) == exit_code
    _, [tracked] = mlflow_runs(tmp_path / "grid" / trackers.MLFLOW_STORE, "grid")
    assert tracked.info.status == status


def test_an_mlflow_run_that_lost_its_lease_ends_killed(corpus, tmp_path):
    lost = threading.Event()
    lost.set()
    trainer = Trainer(base_config(corpus), tmp_path / "grid" / "run", progress=False, tracker="mlflow", stop=lost)
    with pytest.raises(LeaseLost):
        trainer.run()
    _, [tracked] = mlflow_runs(tmp_path / "grid" / trackers.MLFLOW_STORE, "grid")
    assert tracked.info.status == "KILLED"


@pytest.mark.parametrize(("error", "status"), [
    (None, "FINISHED"), (RuntimeError("diverged"), "FAILED"), (KeyboardInterrupt(), "KILLED"),
    (SystemExit(1), "KILLED"), (LeaseLost("another worker holds the run"), "KILLED"),
])
def test_eval_points_close_the_tracker_saying_how_the_run_ended(error, status, monkeypatch, tmp_path):
    monkeypatch.setitem(trackers.BACKENDS, "none", Recording)
    monkeypatch.setattr(Recording, "opened", [])
    with pytest.raises(type(error)) if error else contextlib.nullcontext():
        with EvalPoints("none", tmp_path, resumed_step=0, tokens=0, training_seconds=0.0) as points:
            points.open()
            if error:
                raise error
    [(tracker, _, _)] = Recording.opened
    assert tracker.closed == status


# --- where MLflow may keep its store --------------------------------------------------------------


@pytest.mark.parametrize(("variable", "value", "launcher"), [
    ("SUBMITIT_EXECUTOR", "slurm", "slurm"),  # what submitit's sbatch script exports
    ("RAY_RAYLET_PID", "4242", "ray"),  # what Ray gives its workers
    ("SUBMITIT_EXECUTOR", "local", None),  # submitit's local executor: this machine
])
def test_mlflow_under_a_multi_host_launcher_needs_a_tracking_server(
    variable, value, launcher, monkeypatch, tiny_data, tmp_path
):
    monkeypatch.setenv(variable, value)
    assert trackers.cluster_launcher() == launcher
    if launcher:
        with pytest.raises(ConfigError, match=f"^--tracker mlflow under --launcher {launcher} needs MLFLOW_TRACKING_URI, "):
            Trainer(tiny_config(), tmp_path / "run", data=tiny_data, progress=False, tracker="mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'server.db'}")
    check_tracker("mlflow")


RAY_TASK = """
import logging, subprocess, sys
import ray
ray.init(address="local", num_cpus=1, object_store_memory=100 * 2**20, include_dashboard=False, logging_level=logging.WARNING)
LAUNCHER = "from fwbw.training.trackers import cluster_launcher; print(cluster_launcher())"
launcher = ray.remote(lambda: subprocess.run([sys.executable, "-c", LAUNCHER], capture_output=True, text=True).stdout)
print(ray.get(launcher.remote()).strip())
"""


@pytest.mark.slow
def test_a_process_under_a_ray_task_knows_the_ray_launcher(tmp_path):
    """The child of a Ray task (as torchrun's ranks are under --nproc-per-run) sees Ray's variable."""
    env = {key: value for key, value in subprocess_env().items() if key != "RAY_RAYLET_PID"}
    done = subprocess.run([sys.executable, "-c", RAY_TASK], env=env, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT, cwd=tmp_path)
    assert done.stdout.splitlines()[-1:] == ["ray"], done.stderr
