"""A run directory's life: its layout, which outs are refused, and that it belongs to one config
(the same config resumes, another is refused untouched, --restart starts over, and a checkpoint
of another config is never loaded)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import read_json, read_metrics, tiny_config, without_seconds

from fwbw.cli import main
from fwbw.files import read_jsonl
from fwbw.schema import ConfigError
from fwbw.study.configure import build_sweep_spec
from fwbw.study.sweep import run_id
from fwbw.training import checkpoint, run_dir
from fwbw.training.config import LATER_FIELDS
from fwbw.training.trainer import CHECKPOINT_KEYS, Trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")

def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under folder: its mtime and sha256 (byte-identical means equal snapshots)."""
    return {
        str(path.relative_to(folder)): (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def checkpoint_owners(run: Path) -> set[str]:
    return {read_json(path / checkpoint.STATE)["config"] for path in (run / run_dir.CHECKPOINTS).glob("step_*")}


# --- layout and outs ------------------------------------------------------------------------


def test_a_finished_run_holds_exactly_the_declared_files(tmp_path, tiny_data):
    config = tiny_config(train_tokens=4096)
    run = tmp_path / "run"
    train(config, run, data=tiny_data, progress=False)
    declared = {run_dir.CONFIG, run_dir.METRICS, run_dir.SUMMARY, run_dir.MODEL_CONFIG, run_dir.MODEL_WEIGHTS}
    assert {path.name for path in run.iterdir()} == declared | {run_dir.CHECKPOINTS}
    assert read_json(run / run_dir.CONFIG) == json.loads(json.dumps(config.to_dict()))
    assert len(read_jsonl(run / run_dir.METRICS)) == len(read_metrics(run)) > 0
    steps = sorted(path.name for path in (run / run_dir.CHECKPOINTS).iterdir())
    assert len(steps) == checkpoint.KEEP and all(name.startswith("step_") for name in steps)
    assert checkpoint_owners(run) == {run_dir.config_id(config)}


def test_config_id_is_the_hash_of_the_config_dict_without_later_fields_at_their_old_values():
    config = tiny_config()
    earlier = {key: value for key, value in config.to_dict().items() if key not in LATER_FIELDS}
    expected = hashlib.sha256(json.dumps(earlier, sort_keys=True).encode()).hexdigest()
    assert run_dir.config_id(config) == expected
    assert run_dir.config_id(tiny_config(seed=7)) != expected
    assert run_dir.config_id(tiny_config(train_fraction=0.5)) != expected


def test_a_published_run_keeps_its_id():
    """d2-w128-p0.25-s101-bc7c6cc9 of the data-constrained sweep (docs/results/data-constrained)."""
    spec = build_sweep_spec("data-constrained")
    assert "d2-w128-p0.25-s101-bc7c6cc9" in {run_id(config) for config in spec.configs()}


def test_a_config_json_without_the_later_fields_belongs_to_the_same_run(tmp_path):
    config = tiny_config()
    run = tmp_path / "run"
    run.mkdir()
    earlier = {key: value for key, value in config.to_dict().items() if key not in LATER_FIELDS}
    (run / run_dir.CONFIG).write_text(json.dumps(earlier))
    run_dir.check_owner(run, config)
    with pytest.raises(ConfigError, match="train_fraction"):
        run_dir.check_owner(run, tiny_config(train_fraction=0.5))


@pytest.fixture
def shared_folders(tmp_path, monkeypatch) -> dict[str, Path]:
    """A working directory two levels below tmp_path and a home directory of its own."""
    folders = {"cwd": tmp_path / "work" / "here", "home": tmp_path / "home"}
    for folder in folders.values():
        folder.mkdir(parents=True)
    monkeypatch.chdir(folders["cwd"])
    monkeypatch.setenv("HOME", str(folders["home"]))
    return folders


REFUSED_OUTS = [
    ("", "'' or '.' is the current directory"),
    (".", "'' or '.' is the current directory"),
    ("{cwd}", "{cwd} is the current directory"),
    ("../here", "../here is the current directory"),
    ("..", ".. is a folder above the current directory"),
    ("{cwd}/../..", "{cwd}/../.. is a folder above the current directory"),
    ("{home}", "{home} is the home directory"),
    ("/", "/ is the filesystem root"),
]
COMMANDS = {"train": ["train", "--no-progress"], "sweep": ["sweep", "--no-progress"], "demo": ["demo", "--no-progress"],
            "report": ["report", "grid"]}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("out, refused", REFUSED_OUTS)
def test_outs_that_hold_other_files_are_refused_with_one_line(command, out, refused, shared_folders, tmp_path, capsys):
    out, refused = out.format(**shared_folders), refused.format(**shared_folders)
    assert main([*COMMANDS[command], "--out", out]) == 2
    assert capsys.readouterr().err == (
        f"fwbw {command}: error: out: {refused}: name a folder of its own, e.g. runs/my-run\n"
    )
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == ["home", "work", "work/here"]


@pytest.mark.parametrize("command", ["train", "report"])
def test_an_out_that_is_a_file_is_refused_and_left_alone(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    assert main([*COMMANDS[command], "--out", str(blocker)]) == 2
    assert capsys.readouterr().err == f"fwbw {command}: error: out: {blocker} is a file, not a directory\n"
    assert blocker.read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_check_run_dir_accepts_new_and_existing_directories(tmp_path):
    run_dir.check_run_dir(tmp_path)
    run_dir.check_run_dir(tmp_path / "a" / "b")
    with pytest.raises(ConfigError, match="^out: "):
        run_dir.check_run_dir(Path(""))
    assert list(tmp_path.iterdir()) == []


# --- one config per run directory -----------------------------------------------------------


@pytest.fixture
def finished_run(tmp_path, train_flags, cache_env, capsys) -> Path:
    run = tmp_path / "run"
    assert main(["train", *train_flags, "--out", str(run)]) == 0
    capsys.readouterr()
    return run


def test_the_same_config_resumes_without_training_again(finished_run, train_flags, monkeypatch, capsys):
    metrics = read_metrics(finished_run)

    def no_training(self):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(Trainer, "train_step", no_training)
    assert main(["train", *train_flags, "--out", str(finished_run)]) == 0
    assert json.loads(capsys.readouterr().out)["final_val_loss_fw"] == metrics[-1]["fw_loss"]
    assert read_metrics(finished_run) == metrics


@pytest.mark.parametrize(
    "flags, named",
    [(["--p-bw", "0.25", "--seed", "7"], ["p_bw: 0.5 -> 0.25", "seed: 100 -> 7"]), (["--depth", "2"], ["depth: 1 -> 2"])],
)
def test_another_config_is_refused_with_one_line_and_nothing_changes(finished_run, train_flags, flags, named, capsys):
    before = snapshot(finished_run)
    assert main(["train", *train_flags, *flags, "--out", str(finished_run)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"fwbw train: error: out: {finished_run} holds the run of another config (")
    assert error.count("\n") == 1 and "--restart" in error
    for difference in named:
        assert difference in error
    assert snapshot(finished_run) == before


def test_restart_starts_over_and_matches_a_fresh_run(finished_run, train_flags, tmp_path, capsys):
    other = ["--p-bw", "0.25", "--seed", "7"]
    (finished_run / run_dir.CUT).write_text("[]")  # a stale layer cut of the old run
    (finished_run / "notes.txt").write_text("not a run file")
    assert main(["train", *train_flags, *other, "--restart", "--out", str(finished_run)]) == 0
    fresh = tmp_path / "fresh"
    assert main(["train", *train_flags, *other, "--out", str(fresh)]) == 0
    assert without_seconds(read_metrics(finished_run)) == without_seconds(read_metrics(fresh))
    assert read_json(finished_run / run_dir.CONFIG) == read_json(fresh / run_dir.CONFIG)
    assert read_json(finished_run / run_dir.CONFIG)["seed"] == 7
    assert checkpoint_owners(finished_run) == checkpoint_owners(fresh) and len(checkpoint_owners(fresh)) == 1
    assert not (finished_run / run_dir.CUT).exists()
    assert (finished_run / "notes.txt").read_text() == "not a run file"


def test_a_rerun_elsewhere_from_config_json_is_the_same_run(finished_run, tmp_path, capsys):
    again = tmp_path / "again"
    assert main(["train", "--config", str(finished_run / run_dir.CONFIG), "--out", str(again), "--no-progress"]) == 0
    assert without_seconds(read_metrics(again)) == without_seconds(read_metrics(finished_run))


def test_a_checkpoint_of_another_config_is_never_loaded(tmp_path, tiny_data):
    """The state the old bug left: config.json rewritten to config B over checkpoints of A."""
    a, b = tiny_config(train_tokens=4096), tiny_config(train_tokens=4096, p_bw=0.25, seed=7)
    run = tmp_path / "run"
    train(a, run, data=tiny_data, progress=False)
    (run / run_dir.CONFIG).write_text(json.dumps(b.to_dict()))

    warnings: list[str] = []
    assert checkpoint.load_latest(run, run_dir.config_id(b), warn=warnings.append) is None
    assert len(warnings) == checkpoint.KEEP and all("written for another config" in w for w in warnings)
    assert checkpoint.load_latest(run, run_dir.config_id(a), warn=warnings.append) is not None

    train(b, run, data=tiny_data, progress=False)
    train(b, tmp_path / "fresh", data=tiny_data, progress=False)
    assert without_seconds(read_metrics(run)) == without_seconds(read_metrics(tmp_path / "fresh"))
    assert checkpoint_owners(run) == {run_dir.config_id(b)}  # A's checkpoints are gone


def test_a_checkpoint_without_a_config_id_is_skipped(tmp_path, tiny_data):
    config = tiny_config(train_tokens=4096)
    run = tmp_path / "run"
    train(config, run, data=tiny_data, progress=False)
    for path in (run / run_dir.CHECKPOINTS).glob("step_*"):  # as written before checkpoints had one
        state = read_json(path / checkpoint.STATE)
        del state["config"]
        (path / checkpoint.STATE).write_text(json.dumps(state))
    warnings: list[str] = []
    assert checkpoint.load_latest(run, run_dir.config_id(config), warn=warnings.append) is None
    assert len(warnings) == checkpoint.KEEP


def test_restart_clears_only_the_run_files(tmp_path):
    run = tmp_path / "run"
    (run / run_dir.CHECKPOINTS / "step_00000003").mkdir(parents=True)
    for name in (*run_dir.RUN_FILES, run_dir.LOCK, "keep.txt"):
        (run / name).write_text("x")
    run_dir.clear_run(run)
    assert sorted(path.name for path in run.iterdir()) == sorted([run_dir.LOCK, "keep.txt"])


def test_a_folder_of_other_files_is_refused_even_with_restart(tmp_path, train_flags, cache_env, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in ("notes.txt", "summary.json", "a", "b", "c"):
        (folder / name).write_text("mine")
    before = snapshot(folder)
    for restart in ([], ["--restart"]):
        assert main(["train", *train_flags, *restart, "--out", str(folder)]) == 2
        assert capsys.readouterr().err == (
            f"fwbw train: error: out: {folder} holds other files (a, b, c, ...) and no run (config.json): "
            "give a new or empty folder\n"
        )
    assert snapshot(folder) == before


def test_a_sweep_run_folder_with_only_its_lock_and_status_is_no_other_files(tmp_path, tiny_data):
    run = tmp_path / "run"
    assert run_dir.claim(run)
    run_dir.write_status(run, "running")
    Trainer(tiny_config(), run, data=tiny_data, progress=False)  # accepted
    run_dir.check_owner(tmp_path / "new", tiny_config())


def test_a_config_json_that_is_no_object_is_not_a_run_config(tmp_path, train_flags, cache_env, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / run_dir.CONFIG).write_text("[1, 2]")
    assert main(["train", *train_flags, "--out", str(run)]) == 2
    assert capsys.readouterr().err == (
        f"fwbw train: error: out: {run / run_dir.CONFIG} is not a run config (a JSON object); "
        "--restart starts it over, or give another --out\n"
    )
    assert [path.name for path in run.iterdir()] == [run_dir.CONFIG]


def test_starting_from_scratch_clears_the_outputs_of_the_earlier_attempt(tmp_path, tiny_data):
    """Same config, but no checkpoint loads: until the new run writes them, no metrics, summary,
    model or cut of the old one may be left beside it. The lock, status and other files stay."""
    config = tiny_config(train_tokens=4096)
    run = tmp_path / "run"
    train(config, run, data=tiny_data, progress=False)
    (run / run_dir.CUT).write_text("[]")
    (run / "notes.txt").write_text("mine")
    run_dir.write_status(run, "running")
    assert run_dir.claim(run)
    for path in (run / run_dir.CHECKPOINTS).glob("step_*"):
        (path / checkpoint.TENSORS).write_bytes(b"corrupt")

    class Crash(Exception):
        pass

    class CrashAtOnce(Trainer):
        def train_step(self, directions=None):
            raise Crash

    with pytest.raises(Crash):
        CrashAtOnce(config, run, data=tiny_data, progress=False).run()
    assert sorted(path.name for path in run.iterdir()) == sorted([run_dir.CONFIG, run_dir.STATUS, run_dir.LOCK, run_dir.EPOCH,
                                                                  "notes.txt"])


def test_a_checkpoint_of_another_version_is_skipped(tmp_path, tiny_data):
    """A checkpoint without the trainer's keys (the train state was saved as 'progress')."""
    config = tiny_config(train_tokens=4096)
    run = tmp_path / "run"
    train(config, run, data=tiny_data, progress=False)
    for path in (run / run_dir.CHECKPOINTS).glob("step_*"):
        state = read_json(path / checkpoint.STATE)
        state["payload"]["progress"] = state["payload"].pop("train_state")
        (path / checkpoint.STATE).write_text(json.dumps(state))
    warnings: list[str] = []
    assert checkpoint.load_latest(run, run_dir.config_id(config), CHECKPOINT_KEYS, warn=warnings.append) is None
    assert len(warnings) == checkpoint.KEEP
    assert all(w.endswith("it has no train_state (written by another version)") for w in warnings)
    assert checkpoint.load_latest(run, run_dir.config_id(config), warn=warnings.append) is not None
