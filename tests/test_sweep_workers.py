"""Several workers on one sweep: shards, locks, claims under races, failed runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import (
    TOKENIZER,
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
)

from fwbw import cli
from fwbw.schema import ConfigError
from fwbw.study import sweep, sweep_dir
from fwbw.study.sweep import SweepSpec, run_id, run_sweep
from fwbw.training import run_dir as run_dir_module

pytestmark = pytest.mark.usefixtures("cache_env", "one_thread")


def test_finished_sweep_trains_every_run(finished):
    assert finished.outcome == {run_id(config): "done" for config in finished.spec.configs()}
    assert len(finished.outcome) == 9
    for run in run_dirs(finished.out).values():
        assert run_dir_module.read_status(run) == {"status": "done", "error": None}
        assert not (run / ".lock").exists()
        assert_steps_strictly_increase(run)


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
        metrics = read_metrics(run)
        assert len(evals) == sum(("fw_loss" in point) + ("bw_loss" in point) for point in metrics) >= len(metrics)


def run_workers_together(corpus: Corpus, out: Path, folder: Path, worker_flags: list[tuple[str, ...]]) -> list[str]:
    """Start one sweep worker per entry of worker_flags on the same --out, wait for all of them."""
    logs = [folder / f"worker{i}.log" for i in range(len(worker_flags))]
    workers = [
        start(sweep_command(corpus, out, "--train-tokens", "6144", *flags), log) for flags, log in zip(worker_flags, logs)
    ]
    return [finish(process, log) for process, log in zip(workers, logs)]


def outcome_counts(output: str, out: Path) -> dict[str, int]:
    """{'done': 2, 'done before': 1, 'skipped': 1} from a worker's last line 'sweep OUT: 2 done, 1 done before, 1 skipped'."""
    last = output.strip().splitlines()[-1]
    prefix = f"sweep {out}: "
    assert last.startswith(prefix), output
    return {status: int(count) for count, status in (part.split(maxsplit=1) for part in last.removeprefix(prefix).split(", "))}


@pytest.mark.slow
def test_two_shard_workers_finish_the_grid_once(tmp_path, corpus, capsys):
    out = tmp_path / "grid"
    outputs = run_workers_together(corpus, out, tmp_path, [("--shard", "0/2"), ("--shard", "1/2")])
    for output in outputs:  # each worker trained exactly its own two runs
        assert outcome_counts(output, out) == {"done": 2}, output
    for run in run_dirs(out).values():
        assert run_dir_module.read_status(run)["status"] == "done"
        assert_steps_strictly_increase(run)
    assert_complete(results_after_rebuild(out, capsys), out)


@pytest.mark.slow
def test_two_workers_on_the_same_runs_share_them_through_locks(tmp_path, corpus, capsys):
    out = tmp_path / "grid"
    outputs = run_workers_together(corpus, out, tmp_path, [(), ()])
    counts = [outcome_counts(output, out) for output in outputs]
    assert sum(c.get("done", 0) for c in counts) == 4, outputs  # every run trained by exactly one worker
    assert sum(c.get("skipped", 0) + c.get("done before", 0) for c in counts) == 4, outputs
    for run in run_dirs(out).values():
        assert run_dir_module.read_status(run)["status"] == "done"
        assert_steps_strictly_increase(run)
    assert_complete(results_after_rebuild(out, capsys), out)


def test_claim_is_exclusive_while_the_holder_lives(tmp_path):
    run = tmp_path / "run"
    assert run_dir_module.claim(run)
    holder = read_json(run / ".lock")
    here = run_dir_module.Worker()
    assert holder == {"pid": os.getpid(), "host": socket.gethostname(), "owner": holder["owner"], "lease_s": 600.0,
                      "epoch": 1, "boot_id": here.boot_id, "pid_ns": here.pid_ns, "started": holder["started"]}
    assert len(holder["owner"]) == 16
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
    holder = read_json(run / ".lock")
    assert (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname())


def test_lock_held_on_another_host_is_respected(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock = {"pid": dead_pid(), "host": socket.gethostname() + "-elsewhere"}
    (run / ".lock").write_text(json.dumps(lock))
    assert not run_dir_module.claim(run)
    assert read_json(run / ".lock") == lock


@pytest.mark.parametrize("hook", ["link", "unlink", "rename"])
def test_two_workers_claiming_at_once_never_both_win(tmp_path, monkeypatch, hook):
    """A second worker claims the same run at the worst moment: just before the first worker's
    lock appears (link), or while it takes over a dead worker's lock (unlink, and rename, which
    moves the dead lock aside to remove it). Exactly one wins. (tests/test_leases.py races more
    workers and hosts.)"""
    run = tmp_path / "run"
    run.mkdir()
    if hook != "link":
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
    assert sorted(p.name for p in run.iterdir()) == [".lock", "lease_epoch"], "no private or parked lock files left behind"


def test_run_one_skips_a_run_another_worker_holds(tmp_path, corpus, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    trained = []
    monkeypatch.setattr(sweep, "train_and_cut", lambda config, run_dir, progress, execution, stop: trained.append(run_dir))
    assert sweep.run_one(base_config(corpus), run, retry_failed=False, progress=False) == "skipped"
    assert trained == []
    assert run_dir_module.read_status(run)["status"] == "pending"


def test_a_run_finished_by_another_worker_after_the_status_check_is_not_run_again(tmp_path, corpus, monkeypatch):
    """The status read before claiming the lock is stale once the lock is ours: the worker that
    held it may have finished the run and released it in between. It must be read again."""
    run = tmp_path / "run"
    real_claim = run_dir_module.claim

    def claim_just_after_another_worker_finished(run_dir, *args):
        run_dir.mkdir(parents=True, exist_ok=True)  # the other worker finished and released its lock
        (run_dir / run_dir_module.SUMMARY).write_text("{}")
        run_dir_module.write_status(run_dir, "done")
        return real_claim(run_dir, *args)

    trained = []
    monkeypatch.setattr(sweep, "claim", claim_just_after_another_worker_finished)
    monkeypatch.setattr(sweep, "train_and_cut", lambda config, run_dir, progress, execution, stop: trained.append(run_dir))
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


def test_a_failed_run_is_recorded_and_retried_only_when_asked(tmp_path, corpus, monkeypatch, capsys):
    spec = SweepSpec(depths=(1,), widths=(16,), p_bws=(0.0, 0.5), seeds=1, base=base_config(corpus, train_tokens=2048))
    ids = [run_id(config) for config in spec.configs()]
    bad = ids[0]  # the first run fails: the sweep must go on to the second
    real_train_and_cut = sweep.train_and_cut

    def failing_for_one_run(config, run_dir, progress, execution, stop):
        if run_dir.name == bad:
            raise RuntimeError("boom: simulated out-of-memory")
        return real_train_and_cut(config, run_dir, progress, execution, stop)

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
    assert len(retried) == len(read_metrics(out / sweep_dir.RUNS / bad))  # p_bw 0: fw rows only
    assert_no_duplicate_rows(table)


def test_cli_sweep_exits_1_when_a_run_failed(tmp_path, corpus, monkeypatch, capsys):
    def failing(config, run_dir, progress, execution, stop):
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
