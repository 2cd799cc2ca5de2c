"""Crash recovery: a sweep killed with SIGKILL resumes to the results of an uninterrupted one,
corrupt checkpoints fall back to older ones, checkpoints load without pickle, and rerunning a
finished sweep trains nothing."""

from __future__ import annotations

import hashlib
import json
import pickle
import signal
import socket
import struct
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import (
    KEY,
    Corpus,
    assert_no_duplicate_rows,
    assert_steps_strictly_increase,
    base_config,
    finish,
    read_json,
    read_metrics,
    run_dirs,
    start,
    sweep_command,
    without_seconds,
)
from safetensors.torch import load_file

from fwbw.study import sweep, sweep_dir
from fwbw.study.sweep import run_id, run_sweep
from fwbw.training import checkpoint
from fwbw.training import run_dir as run_dir_module
from fwbw.training.config import TrainConfig
from fwbw.training.trainer import CHECKPOINT_KEYS, Trainer, train

pytestmark = pytest.mark.usefixtures("cache_env", "one_thread")


def assert_sweeps_equal(resumed: Path, whole: Path) -> None:
    """Same runs, same metrics, cut and results, ignoring wall-clock seconds."""
    resumed_runs, whole_runs = run_dirs(resumed), run_dirs(whole)
    assert sorted(resumed_runs) == sorted(whole_runs)
    for name, run in resumed_runs.items():
        assert without_seconds(read_metrics(run)) == without_seconds(read_metrics(whole_runs[name])), name
        assert read_json(run / "cut.json") == read_json(whole_runs[name] / "cut.json"), name
        timings = ("seconds", "eval_seconds", "mean_train_tokens_per_s")
        drop = lambda summary: {k: v for k, v in summary.items() if k not in timings}
        assert drop(read_json(run / "summary.json")) == drop(read_json(whole_runs[name] / "summary.json")), name
    tables = [
        pd.read_parquet(Path(out) / "results.parquet").drop(columns="seconds").sort_values(KEY).reset_index(drop=True)
        for out in (resumed, whole)
    ]
    pd.testing.assert_frame_equal(tables[0], tables[1])


def run_states(out: Path) -> dict[str, tuple[str, bool]]:
    """run id -> (status, has a checkpoint)."""
    root = Path(out) / sweep_dir.RUNS
    if not root.is_dir():
        return {}
    return {
        run.name: (run_dir_module.read_status(run)["status"], any((run / checkpoint.CHECKPOINTS).glob("step_*")))
        for run in root.iterdir()
    }


def kill_mid_sweep(command: list[str], out: Path, log: Path, timeout: float = 120.0) -> bool:
    """Start the sweep and SIGKILL it once one run is done and another is running with a
    checkpoint. False when the sweep finished before that moment could be caught."""
    process = start(command, log)
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"the sweep never reached a killable state in {timeout} s:\n{log.read_text()}")
            states = run_states(out).values()
            if any(status == "done" for status, _ in states) and any(
                status == "running" and has_checkpoint for status, has_checkpoint in states
            ):
                process.send_signal(signal.SIGKILL)
                process.wait()
                break
            time.sleep(0.005)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if process.returncode != -signal.SIGKILL:
        return False  # it finished on its own first
    statuses = [status for status, _ in run_states(out).values()]
    return "running" in statuses and "done" in statuses


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_same_results_as_an_uninterrupted_one(tmp_path, corpus):
    for attempt, train_tokens in enumerate((12_288, 36_864, 110_592, 331_776)):
        folder = tmp_path / f"attempt{attempt}"
        folder.mkdir()
        flags = ("--train-tokens", str(train_tokens))
        resumed, whole = folder / "resumed", folder / "whole"
        if kill_mid_sweep(sweep_command(corpus, resumed, *flags), resumed, folder / "killed.log"):
            break
    else:
        pytest.fail("every sweep finished before it could be killed, even the longest")

    killed = run_states(resumed)
    assert 0 < sum(status == "done" for status, _ in killed.values()) < 4
    interrupted = [name for name, (status, _) in killed.items() if status == "running"]
    assert interrupted, killed
    for name in interrupted:  # the killed worker's lock is left behind, naming a dead process
        lock = read_json(resumed / sweep_dir.RUNS / name / ".lock")
        assert lock["host"] == socket.gethostname() and lock["pid"] > 0
    assert not (resumed / "results.parquet").exists()

    uninterrupted = start(sweep_command(corpus, whole, *flags), folder / "whole.log")
    rerun = start(sweep_command(corpus, resumed, *flags), folder / "rerun.log")
    rerun_output = finish(rerun, folder / "rerun.log")
    finish(uninterrupted, folder / "whole.log")
    assert "done before" in rerun_output, rerun_output

    runs = run_dirs(resumed)
    assert len(runs) == 4
    for run in runs.values():
        assert run_dir_module.read_status(run) == {"status": "done", "error": None}
        assert not (run / ".lock").exists()
        assert_steps_strictly_increase(run)
    table = pd.read_parquet(resumed / "results.parquet")
    assert_no_duplicate_rows(table)
    assert set(table["status"]) == {"done"}
    assert_sweeps_equal(resumed, whole)


class Crash(Exception):
    pass


CRASH_STEP = 11  # checkpoints every 3 steps: step_9 and step_6 are kept when it crashes


def crash_at(step: int):
    class CrashingTrainer(Trainer):
        def train_step(self):
            if self.state.step == step:
                raise Crash
            return super().train_step()

    return CrashingTrainer


def resumable_config(corpus: Corpus) -> TrainConfig:
    return base_config(corpus, train_tokens=8192)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, corpus) -> Path:
    run = tmp_path_factory.mktemp("whole") / "run"
    train(resumable_config(corpus), run, progress=False)
    assert read_metrics(run)[-1]["step"] > CRASH_STEP + 3
    return run


def corrupt(path: Path, how: str) -> None:
    tensors = path / checkpoint.TENSORS
    if how == "truncated":
        data = tensors.read_bytes()
        tensors.write_bytes(data[: len(data) // 2])
    elif how == "overwritten":
        data = bytearray(tensors.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(255 - b for b in data[middle : middle + 64])
        tensors.write_bytes(bytes(data))
    elif how == "missing":
        tensors.unlink()
    elif how == "bad-state":
        (path / checkpoint.STATE).write_text('{"step": 9, "sha2')
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "overwritten", "missing", "bad-state"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, corpus, uninterrupted_run, monkeypatch, how):
    config = resumable_config(corpus)
    run = tmp_path / "run"
    with pytest.raises(Crash):
        crash_at(CRASH_STEP)(config, run, progress=False).run()
    saved = sorted((run / checkpoint.CHECKPOINTS).glob("step_*"))
    assert [path.name for path in saved] == ["step_00000006", "step_00000009"]
    corrupt(saved[-1], how)

    warnings: list[str] = []
    loaded = checkpoint.load_latest(run, run_dir_module.config_id(config), warn=warnings.append)
    assert len(warnings) == 1 and "step_00000009" in warnings[0], warnings
    assert loaded is not None and loaded["train_state"]["step"] == 6

    resumed_from = []
    real_load_latest = checkpoint.load_latest

    def spy(run_dir, config_id, keys=(), warn=print, device="cpu"):
        payload = real_load_latest(run_dir, config_id, keys, warn=lambda message: None, device=device)
        resumed_from.append(None if payload is None else payload["train_state"]["step"])
        return payload

    monkeypatch.setattr(checkpoint, "load_latest", spy)
    train(config, run, progress=False)
    assert resumed_from == [6]
    assert without_seconds(read_metrics(run)) == without_seconds(read_metrics(uninterrupted_run))
    assert_steps_strictly_increase(run)


def test_every_checkpoint_corrupt_starts_over_and_still_matches(tmp_path, corpus, uninterrupted_run):
    config = resumable_config(corpus)
    run = tmp_path / "run"
    with pytest.raises(Crash):
        crash_at(CRASH_STEP)(config, run, progress=False).run()
    for path in (run / checkpoint.CHECKPOINTS).glob("step_*"):
        corrupt(path, "truncated")
    warnings: list[str] = []
    assert checkpoint.load_latest(run, run_dir_module.config_id(config), warn=warnings.append) is None
    assert len(warnings) == 2
    train(config, run, progress=False)
    assert without_seconds(read_metrics(run)) == without_seconds(read_metrics(uninterrupted_run))


def test_checkpoints_load_without_pickle(uninterrupted_run, monkeypatch):
    newest = sorted((uninterrupted_run / checkpoint.CHECKPOINTS).glob("step_*"))[-1]
    assert sorted(path.name for path in newest.iterdir()) == [checkpoint.STATE, checkpoint.TENSORS]
    state = json.loads((newest / checkpoint.STATE).read_text())  # plain JSON
    assert state["step"] == int(newest.name.removeprefix("step_"))
    assert state["sha256"] == hashlib.sha256((newest / checkpoint.TENSORS).read_bytes()).hexdigest()
    raw = (newest / checkpoint.TENSORS).read_bytes()  # safetensors: u64 header size, JSON header
    (header_size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_size])
    assert all(set(entry) >= {"dtype", "shape", "data_offsets"} for key, entry in header.items() if key != "__metadata__")

    def no_pickle(*args, **kwargs):
        raise AssertionError("a checkpoint must load without pickle")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, no_pickle)
    payload = checkpoint.load(newest)
    tensors = load_file(str(newest / checkpoint.TENSORS))
    assert set(tensors) == set(header) - {"__metadata__"}
    for name, tensor in payload["model"].items():
        assert torch.equal(tensor, tensors[f"root.model.{name}"])
    assert payload["train_state"]["step"] == state["step"]
    assert set(payload) == set(CHECKPOINT_KEYS)
    assert all(isinstance(key, int) for key in payload["optimizer"]["state"])
    model = checkpoint.load_model(uninterrupted_run)  # the final weights load the same way
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, payload["model"][name])


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    return {
        str(path.relative_to(folder)): (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_rerunning_a_finished_sweep_does_no_training(finished, monkeypatch):
    before = snapshot(finished.out / sweep_dir.RUNS)
    table_before = pd.read_parquet(finished.out / "results.parquet")

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(Trainer, "__init__", no_training)
    monkeypatch.setattr(sweep, "claim", no_training)  # not even a lock is taken
    outcome = run_sweep(finished.spec, finished.out, progress=False)
    assert outcome == {run_id(config): "skipped" for config in finished.spec.configs()}
    assert snapshot(finished.out / sweep_dir.RUNS) == before
    models = [path for path in before if path.endswith("model.safetensors")]
    assert len(models) == 9
    pd.testing.assert_frame_equal(pd.read_parquet(finished.out / "results.parquet"), table_before)
