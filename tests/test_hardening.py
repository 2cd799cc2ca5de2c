"""Bad input and bad luck end in one line naming the cause, before anything is written: a train
split shorter than one window, a budget below one step, a full disk (in `fwbw train` and in a
sweep), markdown in config strings, run ids that leave the sweep, corrupt JSON files."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import (
    TOKENIZER,
    english_like_text,
    read_json,
    read_metrics,
    without_seconds,
)
from safetensors import SafetensorError

from fwbw import files
from fwbw.analysis import report
from fwbw.analysis.report import render_markdown, write_report
from fwbw.cli import main
from fwbw.data.corpora import TokenData, load_token_data
from fwbw.study import results, sweep, sweep_dir
from fwbw.training import checkpoint, evaluation, run_dir
from fwbw.training.config import TrainConfig
from fwbw.training.trainer import oversized_sets

pytestmark = pytest.mark.usefixtures("cache_env", "one_thread")

DISK_FULL = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fwbw {command}: error: "), err
    return err.removeprefix(f"fwbw {command}: error: ").rstrip("\n")


def leftovers(folder: Path) -> list[str]:
    """Half-written things: temporary files and partial checkpoints."""
    return [str(path) for path in folder.rglob("*") if path.name.endswith(".tmp") or path.name.startswith(".partial")]


# --- checked before anything is written -----------------------------------------------------


def test_a_train_split_shorter_than_one_window_names_seq_len(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FWBW_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "short"
    corpus.mkdir()
    (corpus / "train.txt").write_text("The miller carried a wooden boat before the storm.\n")
    (corpus / "valid.txt").write_text(english_like_text(random.Random(0), 4000))
    train_tokens = len(load_token_data(f"text:{corpus}", TOKENIZER, progress=False).train)
    out = tmp_path / "run"
    assert main(["train", "--data", f"text:{corpus}", "--tokenizer", TOKENIZER, "--seq-len", "256",
                 "--eval-tokens", "512", "--tokens-per-microbatch", "4096", "--out", str(out), "--no-progress"]) == 2
    assert one_error_line(capsys, "train") == (
        f"seq_len: 256 needs at least 257 training tokens, text:{corpus} has {train_tokens}"
    )
    assert train_tokens < 257 and not out.exists()


@pytest.mark.parametrize(
    "budget, message",
    [
        (["--epochs", "1e-9"], "epochs: 1e-09 of {spec} is 0 tokens, fewer than one optimizer step (256 tokens)"),
        (["--train-tokens", "255"], "train_tokens: 255 is fewer than one optimizer step (256 tokens)"),
    ],
)
def test_a_budget_below_one_optimizer_step_is_refused(budget, message, corpus, tmp_path, train_flags, capsys):
    flags = [flag for flag in train_flags if flag not in ("--train-tokens", "3000")]
    out = tmp_path / "run"
    assert main(["train", *flags, *budget, "--out", str(out)]) == 2
    assert one_error_line(capsys, "train") == message.format(spec=corpus.spec)
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--preset", "", "--out", "grid"], "preset: unknown '' (expected one of "),
        (["--gpus", "", "--out", "grid"], "gpus: expected distinct device indices such as 0,1 (or GPU UUIDs), got ''"),
        ([], "--out: give the sweep's folder, e.g. --out runs/grid"),  # never a default folder
    ],
)
def test_an_empty_or_missing_sweep_flag_is_refused(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("fwbw.cli.launch_sweep", never)
    assert main(["sweep", "--depths", "1", "--widths", "16", "--seeds", "1", *flags]) == 2
    assert one_error_line(capsys, "sweep").startswith(message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", [run_dir.CONFIG, run_dir.METRICS, run_dir.CHECKPOINTS])
def test_a_sweep_into_a_run_directory_is_refused(name, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    if name == run_dir.CHECKPOINTS:
        (run / name).mkdir()
    else:
        (run / name).write_text("{}\n")
    monkeypatch.setattr("fwbw.study.launchers.local.launch", never)
    assert main(["sweep", "--depths", "1", "--widths", "16", "--seeds", "1", "--out", str(run)]) == 2
    assert one_error_line(capsys, "sweep") == f"out: {run} holds a run ({name}), not a sweep: give another --out"
    assert [path.name for path in run.iterdir()] == [name]


# --- numbers beyond what a run can use ------------------------------------------------------

HUGE = "1" + "0" * 30


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--width", HUGE], f"width: must fit in 64 bits (below 2**63 in size), got {HUGE}"),
        (["--depth", HUGE], f"depth: must fit in 64 bits (below 2**63 in size), got {HUGE}"),
        (["--seed", str(2**64)], f"seed: must fit in 64 bits (below 2**63 in size), got {2**64}"),
        (["--seed", "-1"], "seed: must be >= 0, got -1"),
        (["--depth", "1001"], "depth: must be <= 1000, got 1001"),  # building it would take minutes
        (["--width", str(2**40)], f"width: {2**40} at depth 1 makes 7.56e+24 parameters, more than 1e+12"),
        (["--model-scale", "1e308"], "model_scale: 1e+308 means depth 8185 and width 392896, 7.9e+15 parameters: "),
        (["--tokens-per-microbatch", HUGE], f"recipe.tokens_per_microbatch: must fit in 64 bits (below 2**63 in size), got {HUGE}"),
    ],
)
def test_a_number_beyond_what_a_run_can_use_is_refused_naming_its_field(flags, message, tmp_path, train_flags, capsys):
    out = tmp_path / "run"
    shape = [] if "--model-scale" not in flags else ["--depth", "--width"]
    kept = [flag for i, flag in enumerate(train_flags) if flag not in shape and train_flags[i - 1] not in shape]
    assert main(["train", *kept, *flags, "--out", str(out)]) == 2
    assert one_error_line(capsys, "train").startswith(message)
    assert not out.exists()


@pytest.mark.parametrize(
    "field, value, problem",
    [
        ("target_exponent", "1e308", "makes a gradient-norm target of inf"),
        ("target_exponent", "-1e308", "makes a gradient-norm target of 0.0"),
        ("target_log_power", "1e30", "makes the gradient-norm target's exponent inf"),
        ("lr_log_power", "1e308", "makes a learning rate of inf"),
        ("lr_log_power", "1.0", "makes a learning rate of 9.59e+06"),
        ("lr_mult_output", "1e30", "makes a learning rate of 6.55e+29"),
        ("lr_mult_output", "-5.0", "must be > 0, got -5.0"),
        ("lr_scale", "1e30", "makes a learning rate of 2.5e+29"),
    ],
)
def test_a_recipe_that_breaks_the_learning_rate_or_the_norm_target_is_refused(field, value, problem, tmp_path, train_flags,
                                                                              capsys):
    config = tmp_path / "recipe.toml"
    config.write_text(f"[recipe]\n{field} = {value}\n")
    out = tmp_path / "run"
    assert main(["train", *train_flags, "--config", str(config), "--out", str(out)]) == 2
    assert one_error_line(capsys, "train").startswith(f"{config}: recipe.{field}: {problem}")
    assert not out.exists()


def test_evaluation_sets_larger_than_their_split_are_noted(tmp_path, train_flags, capsys):
    flags = [*train_flags, "--eval-tokens", str(10**12), "--train-eval-tokens", str(10**8)]
    assert main(["train", *flags, "--out", str(tmp_path / "run")]) == 0
    notes = capsys.readouterr().err.splitlines()
    assert [re.sub(r"the [\d,]+ tokens", "the N tokens", note) for note in notes] == [
        "note: eval_tokens 1,000,000,000,000 is more than the N tokens of the validation split: evaluating all of them",
        "note: train_eval_tokens 100,000,000 is more than the N tokens of the training split: evaluating all of them",
    ]


def test_the_default_evaluation_set_is_up_to_its_size_without_a_note():
    data = TokenData(np.zeros(10_000, dtype="uint16"), np.zeros(100, dtype="uint16"), 300, "c", "t")
    assert oversized_sets(TrainConfig(seq_len=32), data) == []
    assert oversized_sets(TrainConfig(seq_len=32, eval_tokens=1000), data) == [
        "note: eval_tokens 1,000 is more than the 100 tokens of the validation split: evaluating all of them"]


def test_a_grid_of_a_billion_runs_is_refused_before_listing_them(capsys):
    assert main(["sweep", "--seeds", "1000000000", "--dry-run"]) == 2
    assert one_error_line(capsys, "sweep") == "seeds: 1,000,000,000 per setting make 2,000,000,000 runs, more than 10,000"


# --- a full disk ----------------------------------------------------------------------------


def fail_on_call(number: int, real):
    """save_file that raises safetensors' own error (not an OSError) on its `number`-th call."""
    calls = []

    def save_file(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == number:
            raise SafetensorError(DISK_FULL)
        return real(tensors, path, *args, **kwargs)

    return save_file


def test_a_full_disk_while_checkpointing_is_one_line_and_resumes_exactly(tmp_path, train_flags, monkeypatch, capsys):
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save_file", fail_on_call(2, checkpoint.save_file))
        assert main(["train", *train_flags, "--out", str(run)]) == 2
    partial = run / run_dir.CHECKPOINTS / ".partial_step_00000006" / checkpoint.TENSORS
    assert one_error_line(capsys, "train") == f"cannot write {partial}: {DISK_FULL}"
    assert leftovers(run) == [] and not (run / run_dir.SUMMARY).exists()
    assert [path.name for path in (run / run_dir.CHECKPOINTS).iterdir()] == ["step_00000003"]

    assert main(["train", *train_flags, "--out", str(run)]) == 0
    assert main(["train", *train_flags, "--out", str(tmp_path / "whole")]) == 0
    assert without_seconds(read_metrics(run)) == without_seconds(read_metrics(tmp_path / "whole"))


def test_a_full_disk_while_saving_the_model_names_the_model_file(tmp_path, train_flags, monkeypatch, capsys):
    run = tmp_path / "run"
    real = checkpoint.save_file

    def full_for_the_model(tensors, path, *args, **kwargs):
        if Path(path).name.startswith(f".{run_dir.MODEL_WEIGHTS}."):
            raise SafetensorError(DISK_FULL)
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_for_the_model)
    assert main(["train", *train_flags, "--out", str(run)]) == 2
    assert one_error_line(capsys, "train") == f"cannot write {run / run_dir.MODEL_WEIGHTS}: {DISK_FULL}"
    assert leftovers(run) == [] and not (run / run_dir.MODEL_WEIGHTS).exists()


def test_a_full_disk_while_writing_metrics_is_one_line(tmp_path, train_flags, monkeypatch, capsys):
    run = tmp_path / "run"
    real = Path.write_text

    def full_for_metrics(path, *args, **kwargs):
        if path.name.startswith(f".{run_dir.METRICS}."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_for_metrics)
    assert main(["train", *train_flags, "--out", str(run)]) == 2
    assert one_error_line(capsys, "train") == f"cannot write {run / run_dir.METRICS}: No space left on device"
    assert leftovers(run) == [] and not (run / run_dir.METRICS).exists()


@pytest.mark.slow
def test_a_full_disk_in_a_sweep_fails_that_run_and_the_sweep_goes_on(corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "grid"
    real = checkpoint.save_file

    def full_for_p0(tensors, path, *args, **kwargs):
        if "-p0-" in str(path):
            raise SafetensorError(DISK_FULL)
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_for_p0)
    argv = ["sweep", "--config", str(corpus.recipe_toml), "--data", corpus.spec, "--tokenizer", TOKENIZER,
            "--depths", "1", "--widths", "16", "--p-bw", "0", "0.5", "--seeds", "1", "--seq-len", "16",
            "--train-tokens", "2048", "--eval-tokens", "512", "--tokens-per-microbatch", "256",
            "--checkpoint-every", "3", "--device", "cpu", "--dtype", "fp32", "--out", str(out), "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    runs = {path.name: path for path in (out / sweep_dir.RUNS).iterdir()}
    failed = next(name for name in runs if "-p0-" in name)
    partial = runs[failed] / run_dir.CHECKPOINTS / ".partial_step_00000003" / checkpoint.TENSORS
    message = f"WriteFailed: cannot write {partial}: {DISK_FULL}"
    assert f"run {failed} failed: {message}" in err
    assert run_dir.read_status(runs[failed]) == {"status": "failed", "error": message}
    assert [run_dir.read_status(path)["status"] for name, path in runs.items() if name != failed] == ["done"]
    assert leftovers(out) == []
    table = pd.read_parquet(out / "results.parquet")
    assert set(table.loc[table.run_id == failed, "status"]) == {"failed"}


# --- report.md ------------------------------------------------------------------------------

UNESCAPED = re.compile(r"(?<!\\)[|*_`<>\[\]]")


def test_markdown_cells_and_statements_are_escaped(tmp_path):
    table = pd.DataFrame({"setting": ["data", "note"], "value": ["text:/data/my|corpus*v2", "a\nb [x] <y> `z`"]})
    sections = [("Setup", [("p", "p_bw *is* <b>"), ("ul", ["one | two", "_under_"]), ("table", "setup", table)])]
    markdown = render_markdown("sweep *x*", sections, tmp_path)
    lines = markdown.splitlines()
    assert lines[0] == "# sweep \\*x\\*"
    assert "p\\_bw \\*is\\* \\<b\\>" in lines
    assert "- one \\| two" in lines and "- \\_under\\_" in lines
    assert "| data | text:/data/my\\|corpus\\*v2 |" in lines
    assert "| note | a b \\[x\\] \\<y\\> \\`z\\` |" in lines
    for line in lines:  # outside the table's own pipes, no special character is left bare
        assert not UNESCAPED.search(line.strip("|").replace(" | ", " ").replace("|---", "")), line


def test_a_data_spec_with_markdown_characters_keeps_the_report_table_intact(finished, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "make_figures", lambda analysis, out_dir: {})  # the tables are what is checked
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    spec = "text:/data/my|corpus*v2"
    shutil.copy(finished.out / "results.parquet", sweep / "results.parquet")
    saved = read_json(finished.out / sweep_dir.SWEEP_FILE)
    saved["setup"]["data"] = spec
    (sweep / sweep_dir.SWEEP_FILE).write_text(json.dumps(saved))
    write_report(sweep, tmp_path / "report")
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| data | text:/data/my\\|corpus\\*v2 |" in markdown.splitlines()
    assert spec in (tmp_path / "report" / "report.html").read_text()


# --- run ids that leave the sweep -----------------------------------------------------------


@pytest.mark.parametrize("bad_id", ["../escape", "..", "/etc", "a/b", "run id", "runs\\x"])
def test_run_ids_outside_the_sweep_are_refused(bad_id, finished, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    saved = read_json(finished.out / sweep_dir.SWEEP_FILE)
    saved["runs"] = {bad_id: next(iter(saved["runs"].values()))}
    (sweep / sweep_dir.SWEEP_FILE).write_text(json.dumps(saved))
    assert main(["results", str(sweep)]) == 2
    assert one_error_line(capsys, "results") == (
        f"{sweep / sweep_dir.SWEEP_FILE}: run id {bad_id!r} is not a plain folder name (letters, digits, . _ -)"
    )
    assert [path.name for path in sweep.iterdir()] == [sweep_dir.SWEEP_FILE]


# --- JSON errors name the file --------------------------------------------------------------


def test_read_json_names_the_file_and_the_position(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{\n  "a": 1,\n  "b": \n}')
    with pytest.raises(ValueError, match=re.escape(f"{path}: not valid JSON (Expecting value at line 4 column 1)")):
        files.read_json(path)
    path.write_text('{"a": 1}\n\n{"b": \n')
    with pytest.raises(ValueError, match=re.escape(f"{path}: not valid JSON (Expecting value at line 3 column 7)")):
        files.read_jsonl(path)


@pytest.fixture
def copied_sweep(finished, tmp_path) -> Path:
    out = tmp_path / "grid"
    shutil.copytree(finished.out, out)
    return out


def first_run(sweep: Path) -> Path:
    return sorted((sweep / sweep_dir.RUNS).iterdir())[0]


def test_a_corrupt_config_json_names_the_file(copied_sweep, capsys):
    run = first_run(copied_sweep)
    (run / run_dir.CONFIG).write_text('{"depth": 1,')
    expected = f"{run / run_dir.CONFIG}: not valid JSON (Expecting property name enclosed in double quotes at line 1 column 13)"
    assert main(["train", "--config", str(run / run_dir.CONFIG), "--out", str(run), "--no-progress"]) == 2
    assert one_error_line(capsys, "train") == expected
    assert main(["train", "--out", str(run), "--no-progress"]) == 2  # the run directory's own config.json
    assert one_error_line(capsys, "train") == expected


def test_a_corrupt_model_config_names_the_file(copied_sweep):
    run = first_run(copied_sweep)
    (run / run_dir.MODEL_CONFIG).write_text("{")
    expected = f"{run / run_dir.MODEL_CONFIG}: not valid JSON (Expecting property name enclosed in double quotes at line 1 column 2)"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        checkpoint.load_model(run)


def test_a_corrupt_sweep_json_names_the_file(copied_sweep, capsys):
    (copied_sweep / sweep_dir.SWEEP_FILE).write_text('{"runs": }')
    assert main(["results", str(copied_sweep)]) == 2
    assert one_error_line(capsys, "results") == (
        f"{copied_sweep / sweep_dir.SWEEP_FILE}: not valid JSON (Expecting value at line 1 column 10)"
    )


@pytest.mark.parametrize("name, line", [(run_dir.METRICS, 2), (run_dir.SUMMARY, 1), (run_dir.CUT, 1)])
def test_a_corrupt_run_file_fails_the_results_naming_it(name, line, copied_sweep, capsys):
    run = first_run(copied_sweep)
    if name == run_dir.METRICS:
        lines = (run / name).read_text().splitlines()
        (run / name).write_text("\n".join([lines[0], lines[1][:-5], *lines[2:]]) + "\n")
    else:
        (run / name).write_text("{not json")
    assert main(["results", str(copied_sweep)]) == 2
    error = one_error_line(capsys, "results")
    assert error.startswith(f"{run / name}: not valid JSON (") and f"at line {line} " in error


@pytest.mark.parametrize(
    "text, problem",
    [('{"status": "do', "not valid JSON ("), ("[1, 2]", "not a run status"), ('{"status": "finished"}', "not a run status")],
)
def test_a_corrupt_status_fails_the_results_naming_it_and_is_pending_to_a_worker(text, problem, copied_sweep, capsys):
    run = first_run(copied_sweep)
    (run / run_dir.STATUS).write_text(text)
    status = run_dir.read_status(run)  # a worker trains the run again, from its checkpoints
    assert status["status"] == "pending" and status["error"].startswith(f"{run / run_dir.STATUS}: {problem}")
    assert main(["results", str(copied_sweep)]) == 2
    assert one_error_line(capsys, "results") == status["error"]
    assert run_dir.read_status(copied_sweep / "no-such-run") == {"status": "pending", "error": None}


@pytest.mark.parametrize(
    "name, text, problem",
    [
        (run_dir.METRICS, '{"step": "x"}', "line {line} is not an evaluation point (integer step and tokens; epoch, "
         "seconds and each direction's loss, acc, ppl as numbers)"),
        (run_dir.CUT, '[{"blocks_remaining": "x"}]', "not a layer cut (a list of blocks_remaining, an integer, and the "
         "metrics of fw and bw: loss, acc, ppl as numbers)"),
        (run_dir.SUMMARY, "[1]", "not a run summary (a JSON object)"),
    ],
)
def test_a_run_file_of_the_wrong_shape_fails_results_report_and_sweep_naming_it(name, text, problem, copied_sweep,
                                                                                 tmp_path, capsys):
    run = first_run(copied_sweep)
    if name == run_dir.METRICS:  # a last line: the layer cut's rows read it too
        lines = (run / name).read_text().splitlines()
        (run / name).write_text("\n".join([*lines, text]) + "\n")
        problem = problem.format(line=len(lines) + 1)
    else:
        (run / name).write_text(text)
    expected = f"{run / name}: {problem}"
    for argv in (["results", str(copied_sweep)], ["report", str(copied_sweep), "--out", str(tmp_path / "report")]):
        assert main(argv) == 2
        assert one_error_line(capsys, argv[0]) == expected
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):  # a sweep's worker, all its runs done
        sweep.work(copied_sweep, progress=False)


def test_a_done_status_without_a_summary_is_not_trusted(copied_sweep, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "make_figures", lambda analysis, out_dir: {})  # the tables are what is checked
    run = first_run(copied_sweep)
    (run / run_dir.SUMMARY).unlink()
    error = f"{run / run_dir.STATUS}: says done, but the run has no {run_dir.SUMMARY}"
    assert run_dir.read_status(run) == run_dir.read_status(run, corrupt_is_pending=False) == {"status": "pending",
                                                                                               "error": error}
    assert run.name in sweep.pending_runs(copied_sweep)  # trained again, from its checkpoints
    assert main(["report", str(copied_sweep), "--out", str(tmp_path / "report")]) == 0
    table = pd.read_parquet(copied_sweep / sweep_dir.RESULTS_PARQUET)
    assert set(table.loc[table.run_id == run.name, "status"]) == {"pending"}


def test_a_done_run_whose_model_was_cut_short_is_trained_again(copied_sweep):
    """The final model is not hashed like the checkpoints: its safetensors header says how long it is."""
    run = first_run(copied_sweep)
    model = run / run_dir.MODEL_WEIGHTS
    whole = model.read_bytes()
    model.write_bytes(whole[:-100])
    error = f"{run / run_dir.STATUS}: says done, but its {run_dir.MODEL_WEIGHTS} is cut short"
    assert run_dir.read_status(run) == {"status": "pending", "error": error}
    assert run.name in sweep.pending_runs(copied_sweep)
    sweep.work(copied_sweep, progress=False)  # resumed from its last checkpoint: the model written again
    assert run_dir.read_status(run) == {"status": "done", "error": None}
    assert model.read_bytes() == whole


# --- read-only folders ----------------------------------------------------------------------


@pytest.fixture
def read_only(monkeypatch) -> set[Path]:
    """Folders added to this set are read-only as os.access sees them (the tests run as root,
    whom permissions do not stop, and cannot mount a read-only filesystem)."""
    denied: set[Path] = set()
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and Path(path).resolve() in denied:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    return denied


def never(*args, **kwargs):
    raise AssertionError("the work started although its output cannot be written")


def test_results_and_report_of_a_read_only_sweep_fail_before_any_work(copied_sweep, read_only, tmp_path, monkeypatch, capsys):
    read_only.add(copied_sweep.resolve())
    monkeypatch.setattr(results, "build_results", never)
    assert main(["results", str(copied_sweep)]) == 2
    assert one_error_line(capsys, "results") == f"cannot write the results table: {copied_sweep} is not writable"
    assert main(["report", str(copied_sweep), "--out", str(tmp_path / "report")]) == 2
    assert one_error_line(capsys, "report") == f"cannot write the results table: {copied_sweep} is not writable"
    assert main(["report", str(copied_sweep)]) == 2
    assert one_error_line(capsys, "report") == (
        f"out: {copied_sweep / 'report'} is not writable ({copied_sweep.resolve()} is not a writable directory)"
    )
    assert leftovers(tmp_path) == [] and not (tmp_path / "report").exists()


def test_cut_of_a_read_only_run_fails_before_any_work(copied_sweep, read_only, monkeypatch, capsys):
    run = next(path for path in sorted((copied_sweep / sweep_dir.RUNS).iterdir()) if path.name.startswith("d3-"))
    read_only.add(run.resolve())
    monkeypatch.setattr(evaluation, "RunSetup", never)
    assert main(["cut", str(run), "--no-progress"]) == 2
    assert one_error_line(capsys, "cut") == f"cannot write {run / run_dir.CUT}: {run} is not writable"


# --- shared file helpers --------------------------------------------------------------------


def test_atomic_write_returns_the_value_and_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "a.bin"
    assert files.atomic_write(path, lambda tmp: tmp.write_bytes(b"abc")) == 3
    assert files.sha256_of(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"

    def full(tmp):
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=re.escape(f"cannot write {path}: No space left on device")) as raised:
        files.atomic_write(path, full)
    assert raised.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"abc" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_atomic_write_names_the_file_when_its_temporary_file_cannot_be_made(tmp_path, monkeypatch):
    path = tmp_path / "results.parquet"

    def read_only_filesystem(dir, prefix, suffix):
        raise OSError(errno.EROFS, "Read-only file system", str(Path(dir) / f"{prefix}x1y2{suffix}"))

    monkeypatch.setattr(files.tempfile, "mkstemp", read_only_filesystem)
    with pytest.raises(OSError) as raised:
        files.atomic_write_text(path, "x")
    assert str(raised.value) == f"cannot write {path}: Read-only file system" and raised.value.errno == errno.EROFS


def test_each_file_helper_is_declared_once():
    """Temporary files, renames into place and file digests live in fwbw.files only."""
    source = Path(files.__file__).parent
    patterns = re.compile(r"os\.replace\(|tempfile\.mkstemp|def \w*sha256\w*\(|def \w*tmp\w*\(|def _?write_json\(")
    offenders = [
        f"{path.relative_to(source)}: {match.group(0)}"
        for path in sorted(source.rglob("*.py"))
        if path.name != "files.py" or path.parent != source
        for match in patterns.finditer(path.read_text())
    ]
    assert offenders == []
