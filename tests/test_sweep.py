"""The sweep runner (issue #3): kill and resume, the layer cut, shards and locks, failed runs,
corrupt checkpoints, the tidy results table, sweep specs (flags, TOML, YAML, presets, dry run,
bad values) and reruns that do no work.

Everything runs on a tiny text:DIR corpus with a 300-token BPE, trained once per module, and
on models of depth 1-3 and width 16-32, so the file fits a 2-core CPU in well under 90 s."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from fwbw import cli
from fwbw.data.corpora import load_token_data
from fwbw.data.tokenizer import vocab_size_of
from fwbw.data.windows import validation_windows
from fwbw.model.hlb_gpt import count_params
from fwbw.model.tasks import window_length
from fwbw.schema import ConfigError
from fwbw.study import sweep, sweep_dir
from fwbw.study.results import COLUMNS
from fwbw.study.sweep import SweepSpec, run_id, run_sweep
from fwbw.training import checkpoint
from fwbw.training import run_dir as run_dir_module
from fwbw.training.config import RecipeConfig, TrainConfig
from fwbw.training.evaluation import eval_batch_size, evaluate
from fwbw.training.precision import autocast, resolve_dtype
from fwbw.training.trainer import Trainer, train

TOKENIZER = "bpe:300"
# hlb-gpt's learning rate formula is tuned for ~46M parameters and far too hot for ~12k; a cap
# on gradient accumulation keeps the step count (and so the runtime) predictable.
RECIPE = dict(tokens_per_microbatch=256, lr_scale=0.05, accum_max=2.0)
RECIPE_TOML = "[recipe]\nlr_scale = 0.05\naccum_max = 2.0\n"
KEY = ["run_id", "phase", "step", "direction", "blocks_remaining"]
SUBPROCESS_TIMEOUT = 180


# --- corpus, cache and configs -----------------------------------------------------------------

SUBJECTS = ["the miller", "a tired soldier", "the old queen", "my brother", "the river pilot", "a quiet monk",
            "the young painter", "our neighbour", "the baker's daughter", "a travelling merchant", "the harbour master",
            "a small fox", "the village priest", "her grandmother", "the stone mason"]
VERBS = ["carried", "remembered", "sold", "painted", "followed", "repaired", "visited", "described", "guarded",
         "discovered", "borrowed", "burned", "measured", "ignored", "praised"]
OBJECTS = ["a wooden boat", "the northern bridge", "an iron key", "the empty market", "a letter from the king",
           "the tallest tower", "a basket of apples", "the frozen lake", "an old map", "the silver bell",
           "a broken cart", "the long road to the coast", "a jar of honey", "the winter garden"]
ENDINGS = ["before the storm", "in the early morning", "after the long war", "near the western gate",
           "with great care", "for three days", "at the end of summer", "under a pale moon", "without a word"]
LINKS = ["and then", "but later", "because", "while", "so that"]


def sentence(rng: random.Random) -> str:
    words = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
    if rng.random() < 0.5:
        words += f" {rng.choice(ENDINGS)}"
    if rng.random() < 0.3:
        words += f", {rng.choice(LINKS)} {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
    if rng.random() < 0.1:
        words += f" in {rng.randint(1100, 1900)}"
    return words[0].upper() + words[1:] + "."


def english_like_text(rng: random.Random, chars: int) -> str:
    paragraphs, size = [], 0
    while size < chars:
        paragraph = " ".join(sentence(rng) for _ in range(rng.randint(2, 6))) + "\n"
        if rng.random() < 0.15:
            paragraph = f"= {rng.choice(OBJECTS).title()} =\n" + paragraph
        paragraphs.append(paragraph)
        size += len(paragraph)
    return "".join(paragraphs)


@dataclass(frozen=True)
class Corpus:
    folder: Path
    cache: Path
    recipe_toml: Path

    @property
    def spec(self) -> str:
        return f"text:{self.folder}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    """A ~45 KB text:DIR corpus, its BPE and token cache built once for the whole module."""
    root = tmp_path_factory.mktemp("sweep-corpus")
    folder = root / "text"
    folder.mkdir()
    rng = random.Random(1234)
    (folder / "train.txt").write_text(english_like_text(rng, 40_000))
    (folder / "valid.txt").write_text(english_like_text(rng, 5_000))
    recipe_toml = root / "recipe.toml"
    recipe_toml.write_text(RECIPE_TOML)
    found = Corpus(folder, root / "cache", recipe_toml)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FWBW_CACHE", str(found.cache))
        data = load_token_data(found.spec, TOKENIZER, progress=False)
    assert len(data.train) > 15_000 and len(data.valid) > 1_500
    return found


@pytest.fixture(scope="module", autouse=True)
def cache_env(corpus):
    """Every test of this module (and its subprocesses) uses the module's cache, never ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FWBW_CACHE", str(corpus.cache))
        yield


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine OpenMP's
    waiting threads slow them down several times; the subprocesses also use one thread each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def base_config(corpus: Corpus, **overrides) -> TrainConfig:
    values = dict(
        data=corpus.spec, tokenizer=TOKENIZER, depth=1, width=16, train_tokens=4096, eval_tokens=1024,
        checkpoint_every_steps=3, device="cpu", recipe=RecipeConfig(**RECIPE),
    )
    return tiny_config(**{**values, **overrides})


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def without_seconds(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in records]


def run_dirs(out: Path) -> dict[str, Path]:
    return {path.name: path for path in sorted((Path(out) / sweep_dir.RUNS).iterdir()) if path.is_dir()}


def assert_steps_strictly_increase(run_dir: Path) -> None:
    steps = [record["step"] for record in read_metrics(run_dir)]
    assert steps, f"{run_dir.name} has no metrics"
    assert all(a < b for a, b in zip(steps, steps[1:])), f"{run_dir.name}: steps {steps}"


def assert_no_duplicate_rows(table: pd.DataFrame) -> None:
    duplicated = table[table.duplicated(KEY, keep=False)]
    assert duplicated.empty, f"duplicate rows:\n{duplicated[KEY]}"


def assert_sweeps_equal(resumed: Path, whole: Path) -> None:
    """Same runs, same metrics, cut and results, ignoring wall-clock seconds."""
    resumed_runs, whole_runs = run_dirs(resumed), run_dirs(whole)
    assert sorted(resumed_runs) == sorted(whole_runs)
    for name, run in resumed_runs.items():
        assert without_seconds(read_metrics(run)) == without_seconds(read_metrics(whole_runs[name])), name
        assert read_json(run / "cut.json") == read_json(whole_runs[name] / "cut.json"), name
        drop = lambda summary: {k: v for k, v in summary.items() if k not in ("seconds", "eval_seconds")}
        assert drop(read_json(run / "summary.json")) == drop(read_json(whole_runs[name] / "summary.json")), name
    tables = [
        pd.read_parquet(Path(out) / "results.parquet").drop(columns="seconds").sort_values(KEY).reset_index(drop=True)
        for out in (resumed, whole)
    ]
    pd.testing.assert_frame_equal(tables[0], tables[1])


# --- subprocess helpers ------------------------------------------------------------------------


def subprocess_env() -> dict[str, str]:
    # one thread per worker: two workers share a 2-core machine; every compared sweep uses the same
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def sweep_command(corpus: Corpus, out: Path, *flags: str) -> list[str]:
    return [
        sys.executable, "-m", "fwbw.cli", "sweep",
        "--config", str(corpus.recipe_toml),
        "--data", corpus.spec, "--tokenizer", TOKENIZER,
        "--depths", "1", "--widths", "16", "32", "--p-bw", "0", "0.5", "--seeds", "1",
        "--seq-len", "32", "--eval-every", "0.1", "--eval-tokens", "1024",
        "--tokens-per-microbatch", "256", "--checkpoint-every", "3", "--device", "cpu", "--dtype", "fp32",
        "--out", str(out), "--no-progress", *flags,
    ]


def start(command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen(command, cwd=log.parent, env=subprocess_env(), stdout=handle, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, log: Path) -> str:
    try:
        process.wait(timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"{' '.join(process.args[:5])} did not finish in {SUBPROCESS_TIMEOUT} s:\n{log.read_text()}")
    output = log.read_text()
    assert process.returncode == 0, output
    return output


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


# --- 1. kill and resume ------------------------------------------------------------------------


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
    assert "skipped" in rerun_output and "done" in rerun_output, rerun_output

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


# --- the shared finished sweep (cut, results table, reruns) ------------------------------------


@dataclass(frozen=True)
class FinishedSweep:
    out: Path
    spec: SweepSpec
    outcome: dict[str, str]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus) -> FinishedSweep:
    """Nine tiny runs trained in-process: depth 1 and 3 x p_bw 0 and 0.5 x 2 seeds, and one
    extra depth-2 run with task tokens and bw_mode 'either'."""
    extra = base_config(corpus, depth=2, width=32, task_tokens=True, bw_mode="either", p_bw=0.5, seed=7)
    spec = SweepSpec(depths=(1, 3), widths=(16,), p_bws=(0.0, 0.5), seeds=2, base=base_config(corpus),
                     extra_runs=(extra,))
    out = tmp_path_factory.mktemp("finished") / "grid"
    outcome = run_sweep(spec, out, progress=False)
    return FinishedSweep(out, spec, outcome)


def test_finished_sweep_trains_every_run(finished):
    assert finished.outcome == {run_id(config): "done" for config in finished.spec.configs()}
    assert len(finished.outcome) == 9
    for run in run_dirs(finished.out).values():
        assert run_dir_module.read_status(run) == {"status": "done", "error": None}
        assert not (run / ".lock").exists()
        assert_steps_strictly_increase(run)


# --- 2. layer cut ------------------------------------------------------------------------------


def validation_set(config: TrainConfig) -> torch.Tensor:
    data = load_token_data(config.data, config.tokenizer, progress=False)
    return validation_windows(data.valid, window_length(config.seq_len, config.task_tokens), config.eval_tokens)


def assert_metrics_close(actual: dict, expected: dict) -> None:
    for direction in ("fw", "bw"):
        for name in ("loss", "acc", "ppl"):
            assert actual[direction][name] == pytest.approx(expected[direction][name], rel=1e-5, abs=1e-7), (
                direction, name)


def test_cut_json_equals_evaluating_the_truncated_model(finished):
    checked = 0
    for run in run_dirs(finished.out).values():
        config = TrainConfig.load(run / "config.json")
        cut = read_json(run / "cut.json")
        assert [row["blocks_remaining"] for row in cut] == list(range(config.depth - 1, 0, -1))
        if config.depth == 1:
            continue
        model = checkpoint.load_model(run)
        windows = validation_set(config)
        precision = autocast(torch.device("cpu"), resolve_dtype(config.dtype, torch.device("cpu")))
        # the saved model is the trained one: its full depth reproduces the last validation point
        full = evaluate(model, windows, eval_batch_size(windows), precision)
        last = read_metrics(run)[-1]
        assert_metrics_close(full, {d: {m: last[f"{d}_{m}"] for m in ("loss", "acc", "ppl")} for d in ("fw", "bw")})
        for row in cut:
            n = row["blocks_remaining"]
            direct = evaluate(model.truncated(n), windows, eval_batch_size(windows), precision)
            assert_metrics_close(row["metrics"], direct)
            assert row["metrics"]["fw"]["loss"] != pytest.approx(full["fw"]["loss"], rel=1e-4), "no block was removed"
            checked += 1
    assert checked == 4 * 2 + 1  # four depth-3 runs with two cuts each, the depth-2 run with one


def test_fwbw_cut_rewrites_cut_json_with_the_same_values(finished, tmp_path, capsys):
    for name, run in run_dirs(finished.out).items():
        config = TrainConfig.load(run / "config.json")
        if config.depth == 1:
            continue
        copy = tmp_path / name
        copy.mkdir()
        for file in ("config.json", "model_config.json", "model.safetensors"):
            (copy / file).write_bytes((run / file).read_bytes())
        (copy / "cut.json").write_text("[]\n")
        capsys.readouterr()
        assert cli.main(["cut", str(copy), "--no-progress"]) == 0
        printed = capsys.readouterr().out.strip().splitlines()
        original, rewritten = read_json(run / "cut.json"), read_json(copy / "cut.json")
        assert len(printed) == len(original) == config.depth - 1
        assert [r["blocks_remaining"] for r in rewritten] == [r["blocks_remaining"] for r in original]
        for new, old in zip(rewritten, original):
            assert_metrics_close(new["metrics"], old["metrics"])


# --- 3. shards and locks -----------------------------------------------------------------------


def results_after_rebuild(out: Path, capsys) -> pd.DataFrame:
    capsys.readouterr()
    assert cli.main(["results", str(out)]) == 0
    return pd.read_parquet(out / "results.parquet")


def assert_complete(table: pd.DataFrame, out: Path) -> None:
    runs = run_dirs(out)
    assert set(table["run_id"]) == set(read_json(out / sweep_dir.SWEEP_FILE)["runs"]) == set(runs)
    assert set(table["status"]) == {"done"}
    assert_no_duplicate_rows(table)
    for name, run in runs.items():
        evals = table[(table["run_id"] == name) & (table["phase"] == "train-eval")]
        assert len(evals) == 2 * len(read_metrics(run))


def run_workers_together(corpus: Corpus, out: Path, folder: Path, worker_flags: list[tuple[str, ...]]) -> list[str]:
    """Start one sweep worker per entry of worker_flags on the same --out, wait for all of them."""
    logs = [folder / f"worker{i}.log" for i in range(len(worker_flags))]
    workers = [
        start(sweep_command(corpus, out, "--train-tokens", "6144", *flags), log) for flags, log in zip(worker_flags, logs)
    ]
    return [finish(process, log) for process, log in zip(workers, logs)]


def outcome_counts(output: str, out: Path) -> dict[str, int]:
    """{'done': 2, 'skipped': 2} from a worker's last line 'sweep OUT: 2 done, 2 skipped'."""
    last = output.strip().splitlines()[-1]
    prefix = f"sweep {out}: "
    assert last.startswith(prefix), output
    return {status: int(count) for count, status in (part.split() for part in last.removeprefix(prefix).split(", "))}


def test_two_shard_workers_finish_the_grid_once(tmp_path, corpus, capsys):
    out = tmp_path / "grid"
    outputs = run_workers_together(corpus, out, tmp_path, [("--shard", "0/2"), ("--shard", "1/2")])
    for output in outputs:  # each worker trained exactly its own two runs
        assert outcome_counts(output, out) == {"done": 2}, output
    for run in run_dirs(out).values():
        assert run_dir_module.read_status(run)["status"] == "done"
        assert_steps_strictly_increase(run)
    assert_complete(results_after_rebuild(out, capsys), out)


def test_two_workers_on_the_same_runs_share_them_through_locks(tmp_path, corpus, capsys):
    out = tmp_path / "grid"
    outputs = run_workers_together(corpus, out, tmp_path, [(), ()])
    counts = [outcome_counts(output, out) for output in outputs]
    assert sum(c.get("done", 0) for c in counts) == 4, outputs  # every run trained by exactly one worker
    assert sum(c.get("skipped", 0) for c in counts) == 4, outputs
    for run in run_dirs(out).values():
        assert run_dir_module.read_status(run)["status"] == "done"
        assert_steps_strictly_increase(run)
    assert_complete(results_after_rebuild(out, capsys), out)


def test_claim_is_exclusive_while_the_holder_lives(tmp_path):
    run = tmp_path / "run"
    assert run_dir_module.claim(run)
    holder = read_json(run / ".lock")
    assert holder == {"pid": os.getpid(), "host": socket.gethostname()}
    assert not run_dir_module.claim(run)  # this process holds it and is alive
    assert read_json(run / ".lock") == holder
    run_dir_module.release(run)
    assert not (run / ".lock").exists()
    assert run_dir_module.claim(run)
    run_dir_module.release(run)
    run_dir_module.release(run)  # releasing twice is harmless


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    assert run_dir_module.claim(run)
    assert read_json(run / ".lock") == {"pid": os.getpid(), "host": socket.gethostname()}


def test_lock_held_on_another_host_is_respected(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock = {"pid": dead_pid(), "host": socket.gethostname() + "-elsewhere"}
    (run / ".lock").write_text(json.dumps(lock))
    assert not run_dir_module.claim(run)
    assert read_json(run / ".lock") == lock


@pytest.mark.parametrize("hook", ["link", "rename"])
def test_two_workers_claiming_at_once_never_both_win(tmp_path, monkeypatch, hook):
    """A second worker claims the same run at the worst moment: just before the first worker's
    lock appears (link), or while it takes over a dead worker's lock (rename). Exactly one wins."""
    run = tmp_path / "run"
    run.mkdir()
    if hook == "rename":
        (run / ".lock").write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    real = getattr(os, hook)
    second: list[bool] = []

    def interleave(*args, **kwargs):
        if not second:
            second.append(False)  # guard: the second worker's own calls pass straight through
            second[0] = run_dir_module.claim(run)
        return real(*args, **kwargs)

    monkeypatch.setattr(os, hook, interleave)
    first = run_dir_module.claim(run)
    monkeypatch.undo()
    assert second, f"claim() no longer calls os.{hook}: move this test's interleaving hook"
    assert [first, second[0]].count(True) == 1, f"first worker {first}, second worker {second[0]}: both hold the run"
    assert sorted(p.name for p in run.iterdir()) == [".lock"], "no private or parked lock files left behind"


def test_run_one_skips_a_run_another_worker_holds(tmp_path, corpus, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    trained = []
    monkeypatch.setattr(sweep, "train_and_cut", lambda config, run_dir, progress: trained.append(run_dir))
    assert sweep.run_one(base_config(corpus), run, retry_failed=False, progress=False) == "skipped"
    assert trained == []
    assert run_dir_module.read_status(run)["status"] == "pending"


def test_a_run_finished_by_another_worker_after_the_status_check_is_not_run_again(tmp_path, corpus, monkeypatch):
    """The status read before claiming the lock is stale once the lock is ours: the worker that
    held it may have finished the run and released it in between. It must be read again."""
    run = tmp_path / "run"
    real_claim = run_dir_module.claim

    def claim_just_after_another_worker_finished(run_dir):
        run_dir_module.write_status(run_dir, "done")  # the other worker finished and released its lock
        return real_claim(run_dir)

    trained = []
    monkeypatch.setattr(sweep, "claim", claim_just_after_another_worker_finished)
    monkeypatch.setattr(sweep, "train_and_cut", lambda config, run_dir, progress: trained.append(run_dir))
    outcome = sweep.run_one(base_config(corpus), run, retry_failed=False, progress=False)
    assert trained == [], "a finished run was trained again"
    assert outcome == "skipped"
    assert run_dir_module.read_status(run)["status"] == "done"


def test_select_shard_partitions_the_runs(corpus):
    configs = SweepSpec(depths=(1, 2), widths=(16, 32), p_bws=(0.0, 0.5), seeds=2, base=base_config(corpus)).configs()
    ids = [run_id(config) for config in configs]
    assert len(set(ids)) == len(ids) == 16
    for count in (1, 2, 3, 5, 16, 20):
        shards = [[run_id(c) for c in sweep.select_shard(configs, (index, count))] for index in range(count)]
        assert sorted(sum(shards, [])) == sorted(ids)  # every run in exactly one shard
        sizes = [len(shard) for shard in shards]
        assert max(sizes) - min(sizes) <= 1
        for shard in shards:  # in grid order
            assert shard == [i for i in ids if i in shard]


@pytest.mark.parametrize("text, expected", [("0/1", (0, 1)), ("0/2", (0, 2)), ("1/2", (1, 2)), ("4/5", (4, 5))])
def test_parse_shard_accepts_i_of_n(text, expected):
    assert sweep.parse_shard(text) == expected


@pytest.mark.parametrize("text", ["3/2", "2/2", "-1/2", "1/0", "x", "1", "1/2/3", "a/b", ""])
def test_parse_shard_rejects_bad_input(text):
    with pytest.raises(ConfigError, match=r"^shard: "):
        sweep.parse_shard(text)


# --- 4. failed runs ----------------------------------------------------------------------------


def test_a_failed_run_is_recorded_and_retried_only_when_asked(tmp_path, corpus, monkeypatch, capsys):
    spec = SweepSpec(depths=(1,), widths=(16,), p_bws=(0.0, 0.5), seeds=1, base=base_config(corpus, train_tokens=2048))
    ids = [run_id(config) for config in spec.configs()]
    bad = ids[0]  # the first run fails: the sweep must go on to the second
    real_train_and_cut = sweep.train_and_cut

    def failing_for_one_run(config, run_dir, progress):
        if run_dir.name == bad:
            raise RuntimeError("boom: simulated out-of-memory")
        return real_train_and_cut(config, run_dir, progress)

    out = tmp_path / "grid"
    with monkeypatch.context() as patch:
        patch.setattr(sweep, "train_and_cut", failing_for_one_run)
        assert run_sweep(spec, out, progress=False) == {bad: "failed", ids[1]: "done"}
    error = "RuntimeError: boom: simulated out-of-memory"
    assert f"run {bad} failed: {error}" in capsys.readouterr().err
    assert run_dir_module.read_status(out / sweep_dir.RUNS / bad) == {"status": "failed", "error": error}
    assert not (out / sweep_dir.RUNS / bad / ".lock").exists()

    table = pd.read_parquet(out / "results.parquet")
    failed = table[table["run_id"] == bad]
    assert len(failed) == 1
    row = failed.iloc[0]
    assert row["status"] == "failed" and "boom: simulated out-of-memory" in row["error"]
    assert row[["depth", "width", "p_bw", "seed"]].tolist() == [1, 16, 0.0, 100]
    for column in ("step", "tokens", "epoch", "direction", "loss", "acc", "ppl", "phase", "blocks_remaining"):
        assert pd.isna(row[column]), column
    assert set(table.loc[table["run_id"] == ids[1], "status"]) == {"done"}
    csv = pd.read_csv(out / "results.csv")
    assert len(csv) == len(table)
    assert csv.loc[csv["run_id"] == bad, "status"].tolist() == ["failed"]

    assert run_sweep(spec, out, progress=False) == {bad: "skipped", ids[1]: "skipped"}
    assert run_dir_module.read_status(out / sweep_dir.RUNS / bad)["status"] == "failed"

    assert run_sweep(spec, out, retry_failed=True, progress=False) == {bad: "done", ids[1]: "skipped"}
    assert run_dir_module.read_status(out / sweep_dir.RUNS / bad) == {"status": "done", "error": None}
    table = pd.read_parquet(out / "results.parquet")
    retried = table[table["run_id"] == bad]
    assert set(retried["status"]) == {"done"} and retried["error"].isna().all()
    assert len(retried) == 2 * len(read_metrics(out / sweep_dir.RUNS / bad))
    assert_no_duplicate_rows(table)


def test_cli_sweep_exits_1_when_a_run_failed(tmp_path, corpus, monkeypatch, capsys):
    def failing(config, run_dir, progress):
        raise ValueError("bad luck")

    monkeypatch.setattr(sweep, "train_and_cut", failing)
    out = tmp_path / "grid"
    code = cli.main(["sweep", "--data", corpus.spec, "--tokenizer", TOKENIZER, "--depths", "1", "--widths", "16",
                     "--p-bw", "0", "--seeds", "1", "--seq-len", "32", "--eval-tokens", "1024", "--out", str(out),
                     "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out.strip() == f"sweep {out}: 1 failed"
    assert "ValueError: bad luck" in captured.err


# --- 5. corrupt checkpoints --------------------------------------------------------------------


class Crash(Exception):
    pass


def crash_at(step: int):
    class CrashingTrainer(Trainer):
        def train_step(self):
            if self.state.step == step:
                raise Crash
            return super().train_step()

    return CrashingTrainer


CRASH_STEP = 11  # checkpoints every 3 steps: step_9 and step_6 are kept when it crashes


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
    loaded = checkpoint.load_latest(run, warn=warnings.append)
    assert len(warnings) == 1 and "step_00000009" in warnings[0], warnings
    assert loaded is not None and loaded["progress"]["step"] == 6

    resumed_from = []
    real_load_latest = checkpoint.load_latest

    def spy(run_dir, warn=print):
        payload = real_load_latest(run_dir, warn=lambda message: None)
        resumed_from.append(None if payload is None else payload["progress"]["step"])
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
    assert checkpoint.load_latest(run, warn=warnings.append) is None
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
    assert payload["progress"]["step"] == state["step"]
    assert all(isinstance(key, int) for key in payload["optimizer"]["state"])
    model = checkpoint.load_model(uninterrupted_run)  # the final weights load the same way
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, payload["model"][name])


# --- 6. results table --------------------------------------------------------------------------


REQUIRED_COLUMNS = ["run_id", "depth", "width", "num_params", "p_bw", "bw_mode", "bw_mask", "task_tokens", "seed",
                    "step", "tokens", "epoch", "direction", "loss", "acc", "ppl", "phase", "blocks_remaining", "status"]


def test_results_table_is_tidy_and_complete(finished):
    table = pd.read_parquet(finished.out / "results.parquet")
    assert list(table.columns) == COLUMNS
    assert set(REQUIRED_COLUMNS) <= set(table.columns)
    for column in table.columns:  # scalars only: no lists, dicts or arrays in any cell
        assert not any(isinstance(value, (list, tuple, dict, set, np.ndarray)) for value in table[column]), column
    assert set(table["phase"]) == {"train-eval", "cut"}
    assert set(table["direction"]) == {"fw", "bw"}
    assert set(table["status"]) == {"done"}
    assert_no_duplicate_rows(table)

    configs = {run_id(config): config for config in finished.spec.configs()}
    assert set(table["run_id"]) == set(configs)
    for name, config in configs.items():
        run = finished.out / sweep_dir.RUNS / name
        rows = table[table["run_id"] == name]
        for column in ("depth", "width", "p_bw", "bw_mode", "bw_mask", "task_tokens", "seed"):
            assert set(rows[column]) == {getattr(config, column)}, column
        model_config = config.model_config(300)
        assert set(rows["num_params"]) == {count_params(model_config)} == {read_json(run / "summary.json")["num_params"]}

        evals = rows[rows["phase"] == "train-eval"]
        metrics = read_metrics(run)
        assert len(evals) == 2 * len(metrics)
        assert set(evals["blocks_remaining"]) == {config.depth}
        for point in metrics:
            at_step = evals[evals["step"] == point["step"]]
            for direction in ("fw", "bw"):
                row = at_step[at_step["direction"] == direction].iloc[0]
                assert (row["tokens"], row["epoch"]) == (point["tokens"], point["epoch"])
                for metric in ("loss", "acc", "ppl"):
                    assert row[metric] == point[f"{direction}_{metric}"]

        cuts = rows[rows["phase"] == "cut"]
        assert sorted(cuts["blocks_remaining"]) == sorted(2 * list(range(1, config.depth)))
        assert set(cuts["step"]) <= {metrics[-1]["step"]}
        for entry in read_json(run / "cut.json"):
            for direction in ("fw", "bw"):
                row = cuts[(cuts["blocks_remaining"] == entry["blocks_remaining"]) & (cuts["direction"] == direction)]
                assert row["loss"].tolist() == [entry["metrics"][direction]["loss"]]

    csv = pd.read_csv(finished.out / "results.csv")
    assert len(csv) == len(table)
    assert list(csv.columns) == list(table.columns)
    assert sorted(csv["run_id"]) == sorted(table["run_id"])


def test_fwbw_results_prints_one_line_per_run(finished, capsys):
    capsys.readouterr()
    assert cli.main(["results", str(finished.out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header, rows = lines[0], lines[1:]
    assert len(rows) == len(finished.spec.configs()) == 9
    for word in ("depth", "width", "p_bw", "seed", "status", "final_loss_fw", "final_loss_bw"):
        assert word in header
    assert all(row.split()[-3] == "done" for row in rows), rows


# --- 7. sweep specs ----------------------------------------------------------------------------


def grid_flags(corpus: Corpus) -> list[str]:
    return ["--data", corpus.spec, "--tokenizer", TOKENIZER, "--depths", "1", "2", "--widths", "16", "32",
            "--p-bw", "0", "0.5", "--seeds", "2", "--seed", "7", "--seq-len", "32", "--train-tokens", "4096",
            "--eval-tokens", "1024", "--tokens-per-microbatch", "256", "--task-tokens", "--bw-mode", "either"]


GRID_TOML = """\
depths = [1, 2]
widths = [16, 32]
p_bw = [0.0, 0.5]
seeds = 2
seed = 7
data = "{data}"
tokenizer = "bpe:300"
seq_len = 32
train_tokens = 4096
eval_tokens = 1024
task_tokens = true
bw_mode = "either"

[recipe]
tokens_per_microbatch = 256
"""

GRID_YAML = """\
depths: [1, 2]
widths: [16, 32]
p_bw: [0.0, 0.5]
seeds: 2
seed: 7
data: "{data}"
tokenizer: bpe:300
seq_len: 32
train_tokens: 4096
eval_tokens: 1024
task_tokens: true
bw_mode: either
recipe:
  tokens_per_microbatch: 256
"""


def spec_of(argv: list[str]) -> SweepSpec:
    return cli.sweep_spec_from_args(cli.build_parser().parse_args(["sweep", *argv]))


def run_ids(spec: SweepSpec) -> list[str]:
    return [run_id(config) for config in spec.configs()]


@pytest.mark.parametrize("name, text", [("grid.toml", GRID_TOML), ("grid.yaml", GRID_YAML), ("grid.yml", GRID_YAML)],
                         ids=["toml", "yaml", "yml"])
def test_sweep_file_gives_the_same_runs_as_flags(tmp_path, corpus, name, text):
    path = tmp_path / name
    path.write_text(text.format(data=corpus.spec))
    from_flags = spec_of(grid_flags(corpus))
    from_file = spec_of(["--config", str(path)])
    assert run_ids(from_file) == run_ids(from_flags)
    assert from_file.configs() == from_flags.configs()
    assert len(run_ids(from_flags)) == len(set(run_ids(from_flags))) == 16
    assert {config.seed for config in from_flags.configs()} == {7, 8}
    assert sweep.load_spec_file(path).configs() == from_flags.configs()
    overridden = spec_of(["--config", str(path), "--p-bw", "0.25", "--widths", "16"])  # flags win over the file
    assert [(c.p_bw, c.width) for c in overridden.configs()] == [(0.25, 16)] * 4


def test_presets_hold_the_study_grid():
    assert {"paper", "cpu-small"} <= set(sweep.PRESETS)
    paper = sweep.preset("paper")
    assert paper.depths == (4, 8, 16, 32)
    assert paper.widths == (192, 384, 768, 1536)
    assert paper.p_bws == (0.0, 0.05)
    assert (paper.seeds, paper.first_seed) == (3, 100)
    base = paper.base
    assert (base.data, base.tokenizer, base.task_tokens, base.epochs) == ("wikitext-103", "gpt2", True, 10.0)
    assert base.eval_every_epochs == 0.25
    configs = paper.configs()
    assert len(configs) == 4 * 4 * 2 * 3
    assert {(c.depth, c.width, c.p_bw, c.seed) for c in configs} == {
        (d, w, p, s) for d in (4, 8, 16, 32) for w in (192, 384, 768, 1536) for p in (0.0, 0.05) for s in (100, 101, 102)
    }
    small = sweep.preset("cpu-small")
    assert len(small.configs()) >= 2 and all(c.data != "wikitext-103" for c in small.configs())
    assert spec_of(["--preset", "paper"]) == paper
    assert run_ids(spec_of(["--preset", "paper", "--seeds", "1"])) == run_ids(dataclasses.replace(paper, seeds=1))


@pytest.mark.parametrize("argv", [["--preset", "paper"], ["--preset", "cpu-small"], "corpus"])
def test_dry_run_prints_every_run_with_its_parameter_count(tmp_path, corpus, capsys, argv):
    if argv == "corpus":
        argv = grid_flags(corpus)
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli.main(["sweep", *argv, "--dry-run", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    spec = spec_of(argv)
    configs = spec.configs()
    assert len(lines) == len(configs) + 1
    for line, config in zip(lines, configs):
        words = line.split()
        assert words[0] == run_id(config)
        params = words[words.index("params") + 1]
        model_config = config.model_config(vocab_size_of(config.tokenizer))
        assert params == f"{count_params(model_config) / 1e6:.2f}M"
    assert lines[-1].startswith(f"{len(configs)} runs")
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--p-bw", "2"], "p_bw"),
        (["--p-bw", "0", "-0.5"], "p_bw"),
        (["--preset", "nope"], "preset"),
        (["--widths", "20"], "width"),
        (["--depths", "0"], "depth"),
        (["--seeds", "0"], "seeds"),
        (["--shard", "3/2"], "shard"),
        (["--tokenizer", "bpe:5"], "tokenizer"),
        (["--data", "no-such-corpus"], "data"),
    ],
)
@pytest.mark.parametrize("dry_run", [False, True])
def test_bad_values_fail_with_exit_2_naming_the_field(tmp_path, capsys, argv, field, dry_run):
    out = tmp_path / "out"
    capsys.readouterr()
    code = cli.main(["sweep", *argv, "--out", str(out), *(["--dry-run"] if dry_run else [])])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert f"{field}: " in lines[0], lines[0]
    assert captured.out == ""
    assert not out.exists()


def test_bad_value_in_a_sweep_file_fails_with_exit_2(tmp_path, corpus, capsys):
    path = tmp_path / "grid.toml"
    path.write_text(GRID_TOML.format(data=corpus.spec).replace("p_bw = [0.0, 0.5]", "p_bw = [0.0, 1.5]"))
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli.main(["sweep", "--config", str(path), "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "p_bw: " in lines[0]
    assert not out.exists()


# --- 8. rerunning a finished sweep -------------------------------------------------------------


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
