"""Launchers (`fwbw sweep --launcher local|slurm|ray`): every one trains each run of a tiny grid
exactly once, through the same run claims, into the same results table as the in-process loop;
the SLURM path runs through submitit's local executor, and fails at once without SLURM."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from conftest import (
    KEY,
    TOKENIZER,
    Corpus,
    assert_no_duplicate_rows,
    assert_steps_strictly_increase,
    base_config,
    finish,
    run_dirs,
    start,
    sweep_command,
)

from fwbw import cli
from fwbw.schema import ConfigError
from fwbw.study import configure, sweep_dir
from fwbw.study import sweep as sweep_module
from fwbw.study.launchers import local, slurm
from fwbw.study.launchers import ray as ray_launcher
from fwbw.study.launchers import worker as worker_module
from fwbw.study.launchers.base import Assignment, Launch, as_recorded, merge_outcomes, outcome_counts
from fwbw.study.sweep import Execution, SweepSpec, prepare_sweep, run_id, work
from fwbw.study.torchrun import Ranks
from fwbw.training import run_dir as run_dir_module
from fwbw.training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("cache_env", "one_thread")

GRID_RUNS = 4  # sweep_command's grid: depth 1 x widths 16, 32 x p_bw 0, 0.5 x one seed
TRAIN_TOKENS = ("--train-tokens", "4096")


def grid_argv(corpus: Corpus, out: Path, *flags: str) -> list[str]:
    """`fwbw sweep` arguments (without the interpreter) of the tiny grid."""
    return sweep_command(corpus, out, *TRAIN_TOKENS, *flags)[3:]


def grid_spec(corpus: Corpus) -> SweepSpec:
    return cli.sweep_spec_from_args(cli.build_parser().parse_args(grid_argv(corpus, Path("unused"))))


def comparable(table: pd.DataFrame) -> pd.DataFrame:
    """The results table without its timings, in a fixed row order."""
    return table.drop(columns=["seconds"]).sort_values(KEY, na_position="first").reset_index(drop=True)


@pytest.fixture(scope="module")
def in_process_table(tmp_path_factory, corpus, cache_env, one_thread) -> pd.DataFrame:
    """The tiny grid's results table from the in-process loop (`--launcher local`, one worker)."""
    out = tmp_path_factory.mktemp("in-process") / "grid"
    assert cli.main(grid_argv(corpus, out)) == 0
    return comparable(pd.read_parquet(out / sweep_dir.RESULTS_PARQUET))


def assert_each_run_trained_once(out: Path, in_process_table: pd.DataFrame) -> None:
    runs = run_dirs(out)
    assert len(runs) == GRID_RUNS
    for run in runs.values():
        assert run_dir_module.read_status(run) == {"status": "done", "error": None}
        assert_steps_strictly_increase(run)  # a second training would append a second series
        assert not [path.name for path in run.iterdir() if path.name.startswith(run_dir_module.LOCK)], "claim left"
    table = pd.read_parquet(out / sweep_dir.RESULTS_PARQUET)
    assert_no_duplicate_rows(table)
    pd.testing.assert_frame_equal(comparable(table), in_process_table)


def last_line(output: str) -> str:
    return output.strip().splitlines()[-1]


# --- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    (dict(launcher="local", slurm_partition="gpu"), "--slurm-partition: only with --launcher slurm"),
    (dict(launcher="local", wait=True), "--wait: only with --launcher slurm"),
    (dict(launcher="local", ray_address="auto"), "--ray-address: only with --launcher ray"),
    (dict(launcher="local", gpus_per_run=0), "--gpus-per-run: only with --launcher slurm or ray"),
    (dict(launcher="slurm", workers=2), "--workers: only with --launcher local or ray"),
    (dict(launcher="ray", gpus=("0",)), "--gpus: only with --launcher local"),
    (dict(launcher="local", workers=2, gpus=("0", "1")), "--workers: give --workers or --gpus"),
    (dict(launcher="ray", workers=2, ray_address="auto"), "--workers: sizes a local Ray"),
    (dict(launcher="local", workers=0), "--workers: must be >= 1, got 0"),
    (dict(launcher="slurm", slurm_time=0), "--slurm-time: must be >= 1, got 0"),
    (dict(launcher="ray", gpus_per_run=-1), "--gpus-per-run: must be >= 0, got -1"),
    (dict(launcher="mpi"), "launcher: must be one of"),
])
def test_launch_options_are_checked_naming_the_flag(options, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        Launch(**options)


def closed_port() -> int:
    """A localhost port nothing listens on (it was just free)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_ray_address_is_one_line_before_anything_is_written(tmp_path, corpus, capsys):
    out = tmp_path / "grid"
    address = f"127.0.0.1:{closed_port()}"
    argv = grid_argv(corpus, out, "--launcher", "ray", "--ray-address", address)
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == (f"fwbw sweep: error: --ray-address: no Ray cluster answers at {address} "
                                       "(Connection refused); start one (ray start --head) or give its address\n")
    assert not out.exists()
    assert cli.main(grid_argv(corpus, out, "--launcher", "ray", "--ray-address", "nohost")) == 2
    assert "expected HOST:PORT, ray://HOST:PORT or auto, got 'nohost'" in capsys.readouterr().err


def test_a_ray_address_that_answers_passes_the_check():
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        ray_launcher.check_reachable(f"127.0.0.1:{port}")
        ray_launcher.check_reachable(f"ray://127.0.0.1:{port}")


def test_launch_options_each_launcher_takes_are_accepted():
    Launch(launcher="local", workers=2)
    Launch(launcher="local", gpus=("0", "1"))
    Launch(launcher="ray", workers=2, gpus_per_run=0, cpus_per_run=2)
    Launch(launcher="slurm", gpus_per_run=1, cpus_per_run=4, slurm_partition="gpu", slurm_time=60,
           slurm_max_parallel=8, wait=True)


def test_gpus_per_run_default_to_one_where_runs_can_use_them(corpus):
    cpu, auto = base_config(corpus), base_config(corpus, device="auto")
    assert Launch("ray").run_gpus([cpu]) == 0
    assert Launch("ray").run_gpus([cpu, auto]) == 1
    assert Launch("ray").run_gpus([auto], gpus_available=False) == 0
    assert Launch("ray", gpus_per_run=2).run_gpus([cpu], gpus_available=False) == 2


def test_a_run_of_several_processes_gets_a_gpu_for_each():
    auto = TrainConfig()
    assert Launch("slurm").run_gpus([auto], nproc_per_run=4) == 4
    assert Launch("slurm").run_gpus([TrainConfig(device="cpu")], nproc_per_run=4) == 0
    assert Launch("slurm", gpus_per_run=8).run_gpus([auto], nproc_per_run=4) == 8
    with pytest.raises(ConfigError, match=r"^--gpus-per-run: 2 GPUs cannot hold the 4 processes of a run"):
        Launch("slurm", gpus_per_run=2).run_gpus([auto], nproc_per_run=4)
    assert local.gpu_groups(("0", "1", "2", "3"), 2) == ["0,1", "2,3"]
    assert local.gpu_groups(("0", "1"), 1) == ["0", "1"]
    with pytest.raises(ConfigError, match=r"^gpus: 3 GPUs do not split into groups of 2"):
        local.gpu_groups(("0", "1", "2"), 2)


@pytest.mark.parametrize("text, gpus", [("0", ("0",)), ("0,1,3", ("0", "1", "3")), ("GPU-a1,GPU-b2", ("GPU-a1", "GPU-b2"))])
def test_parse_gpus_accepts_device_ids(text, gpus):
    assert local.parse_gpus(text) == gpus


@pytest.mark.parametrize("text", ["", "0,", ",1", "0,0", "0, 1", "a,b", "-1"])
def test_parse_gpus_refuses_empty_repeated_or_unknown_ids(text):
    with pytest.raises(ConfigError, match=r"^gpus: expected distinct device indices"):
        local.parse_gpus(text)


def test_gpus_must_be_this_machines():
    local.check_gpus(("0", "1", "GPU-a1"), device_count=2)
    with pytest.raises(ConfigError, match=r"^gpus: this machine has 0 CUDA devices; no device 0, 1$"):
        local.check_gpus(("0", "1"), device_count=0)


def test_a_sweep_whose_runs_cannot_be_shared_among_its_processes_is_refused_before_anything_is_written(
        tmp_path, corpus, capsys):
    out = tmp_path / "grid"
    command = ["sweep", "--data", corpus.spec, "--tokenizer", TOKENIZER, "--depths", "1", "--widths", "16",
               "--p-bw", "0", "--seeds", "1", "--seq-len", "64", "--tokens-per-microbatch", "128",
               "--nproc-per-run", "3", "--out", str(out), "--no-progress"]
    assert cli.main(command) == 2
    assert capsys.readouterr().err == ("fwbw sweep: error: recipe.tokens_per_microbatch: 128 tokens make 2 windows of "
                                       "seq_len 64 per microbatch, fewer than the 3 ranks (each needs one)\n")
    assert not out.exists()


def test_a_sweep_under_torchrun_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["sweep", "--out", str(tmp_path / "grid"), "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("fwbw sweep: error: a sweep is not started by torchrun: give it --nproc")
    assert not (tmp_path / "grid").exists()


def test_outcomes_merge_to_the_status_of_the_worker_that_trained_each_run():
    first = {"a": "done", "b": "skipped", "c": "skipped", "d": "skipped"}
    second = {"a": "skipped", "b": "failed", "c": "skipped", "d": "done"}
    merged = merge_outcomes([first, second])
    assert merged == {"a": "done", "b": "failed", "c": "skipped", "d": "done"}
    assert outcome_counts(merged) == "2 done, 1 failed, 1 skipped"
    assert outcome_counts({}) == "no runs"


def test_worker_command_round_trips_the_assignment(tmp_path):
    from fwbw.study.launchers import worker

    assignment = Assignment(tmp_path / "grid", (1, 3), True, False, Execution(nproc_per_run=2, nodes_per_run=3,
                                                                               compile=False))
    command = worker.worker_command(assignment, tmp_path / "outcome.json")
    assert command[:3] == [sys.executable, "-m", "fwbw.study.launchers"]
    args = worker.build_parser().parse_args(command[3:])
    assert (args.out, args.shard, args.retry_failed, args.no_progress) == (tmp_path / "grid", "1/3", True, True)
    assert Execution(**args.execution) == assignment.execution
    assert args.outcome == tmp_path / "outcome.json"


def prepared_grid(corpus: Corpus, out: Path) -> SweepSpec:
    spec = grid_spec(corpus)
    prepare_sweep(spec, out)
    return spec


def test_a_worker_goes_through_the_runs_again_while_it_finds_one_it_can_claim(tmp_path, corpus, monkeypatch):
    """A run held by another worker when this one passed it, released later (that worker was
    interrupted), is trained on the next pass; each run once, and the worker stops after a pass
    that claimed nothing."""
    out = tmp_path / "grid"
    prepared_grid(corpus, out)
    first, *others = read_sweep_runs(out)
    held = run_dir_module.take_lease(out / sweep_dir.RUNS / first, 600, run_dir_module.Worker(host="other-node"))
    os.close(held.fd)
    trained = []

    def train_and_cut(config, run_dir, progress, execution, stop):
        trained.append(run_dir.name)
        if run_dir.name == others[-1]:  # meanwhile the other worker releases the run it held
            (out / sweep_dir.RUNS / first / run_dir_module.LOCK).unlink()

    monkeypatch.setattr(sweep_module, "train_and_cut", train_and_cut)
    monkeypatch.setattr(sweep_module, "write_results", lambda out: None)
    assert work(out, progress=False) == dict.fromkeys([first, *others], "done")
    assert trained == [*others, first]


def fake_workers(monkeypatch, script: str) -> None:
    """Worker processes that run `script` (Python; sys.argv[1] is the outcome file) instead of training."""
    monkeypatch.setattr(local, "worker_command", lambda assignment, outcome: [sys.executable, "-c", script, str(outcome)])


def test_a_worker_killed_by_a_signal_is_named_so_not_sent_to_an_error_above(tmp_path, corpus, monkeypatch):
    out = tmp_path / "grid"
    prepared_grid(corpus, out)
    fake_workers(monkeypatch, "import json, os, signal, sys, pathlib; path = pathlib.Path(sys.argv[1]); "
                 "json.dump({}, path.open('w')) if path.name == 'worker0.json' else os.kill(os.getpid(), signal.SIGKILL)")
    with pytest.raises(RuntimeError, match=r"^1 worker ended without finishing \(worker 1: killed by SIGKILL; any error"):
        local.launch(Assignment(out, progress=False), Launch("local", workers=2))


def test_ctrl_c_ends_several_workers_in_one_line(tmp_path, corpus, monkeypatch):
    """Each worker leaves how it stopped beside its outcome file instead of printing it; the launcher
    raises one KeyboardInterrupt naming them all (the CLI prints it as its one line)."""
    out = tmp_path / "grid"
    prepared_grid(corpus, out)
    fake_workers(monkeypatch, "import json, sys; json.dump('interrupted at step 7; rerun the same command to resume', "
                 "open(sys.argv[1] + '.interrupted', 'w')); sys.exit(1)")

    def interrupted_wait(processes):
        for process in processes:
            process.wait()
        raise KeyboardInterrupt

    monkeypatch.setattr(local, "wait_for_all", interrupted_wait)
    with pytest.raises(KeyboardInterrupt) as interrupt:
        local.launch(Assignment(out, progress=False), Launch("local", workers=2))
    assert str(interrupt.value) == ("worker 0 interrupted at step 7, worker 1 interrupted at step 7; "
                                    "rerun the same command to resume")


def test_a_launched_worker_leaves_its_interruption_for_the_launcher_and_prints_nothing(tmp_path, corpus, monkeypatch,
                                                                                     capsys):
    out = tmp_path / "grid"
    prepared_grid(corpus, out)

    def interrupted(self):
        raise KeyboardInterrupt("interrupted at step 3; rerun the same command to resume")

    monkeypatch.setattr(Assignment, "work", interrupted)
    outcome = tmp_path / "worker0.json"
    assert worker_module.main([str(out), "--outcome", str(outcome), "--no-progress"]) == 1
    assert capsys.readouterr().err == ""
    assert json.loads(worker_module.interruption_file(outcome).read_text()) == (
        "interrupted at step 3; rerun the same command to resume")
    assert worker_module.main([str(out), "--no-progress"]) == 1  # on its own it prints the line
    assert capsys.readouterr().err == "fwbw worker: interrupted at step 3; rerun the same command to resume\n"


def test_the_summary_says_done_before_for_runs_a_finished_sweep_skips(tmp_path, corpus):
    out = tmp_path / "grid"
    prepared_grid(corpus, out)
    runs = read_sweep_runs(out)
    for identifier, status in zip(runs, ("done", "failed")):
        run_dir_module.write_status(out / sweep_dir.RUNS / identifier, status)
    (out / sweep_dir.RUNS / runs[0] / run_dir_module.SUMMARY).write_text("{}")  # a done run has its summary
    outcome = {**dict.fromkeys(runs, "skipped"), runs[-1]: "done"}  # four runs
    assert as_recorded(out, outcome) == {runs[0]: "done before", runs[1]: "failed before",
                                         **dict.fromkeys(runs[2:-1], "skipped"), runs[-1]: "done"}
    assert outcome_counts(as_recorded(out, dict.fromkeys(runs[:1], "skipped"))) == "1 done before"


def test_gpus_start_one_worker_per_gpu_pinned_to_it(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # all of the machine's GPUs visible
    prepared_grid(corpus, tmp_path / "grid")
    fake_workers(monkeypatch, "import json, os, sys; "
                 "json.dump({'on-' + os.environ['CUDA_VISIBLE_DEVICES']: 'done'}, open(sys.argv[1], 'w'))")
    outcome = local.launch(Assignment(tmp_path / "grid", progress=False), Launch("local", gpus=("3", "5")))
    assert outcome == {"on-3": "done", "on-5": "done"}
    assert capsys.readouterr().out == "worker 0 (GPU 3): 1 done\nworker 1 (GPU 5): 1 done\n"


def test_a_worker_that_dies_is_reported_after_the_others_finished(tmp_path, corpus, monkeypatch, capsys):
    out = tmp_path / "grid"
    prepared_grid(corpus, out)
    fake_workers(monkeypatch, "import json, sys, pathlib; path = pathlib.Path(sys.argv[1]); "
                 "json.dump({}, path.open('w')) if path.name == 'worker0.json' else sys.exit(3)")
    with pytest.raises(RuntimeError) as error:
        local.launch(Assignment(out, progress=False), Launch("local", workers=2))
    assert str(error.value) == ("1 worker ended without finishing (worker 1: exit code 3; any error a worker printed is above): "
                                "rerun the sweep to finish their runs")
    assert capsys.readouterr().out == "worker 0: no runs\n"
    assert (out / sweep_dir.RESULTS_PARQUET).is_file()  # the table is rebuilt before the error


def test_workers_never_outnumber_the_pending_runs(tmp_path, corpus, monkeypatch, capsys):
    prepared_grid(corpus, tmp_path / "grid")
    fake_workers(monkeypatch, "import json, sys; json.dump({}, open(sys.argv[1], 'w'))")
    local.launch(Assignment(tmp_path / "grid", progress=False), Launch("local", workers=9))
    assert capsys.readouterr().out.count("worker ") == GRID_RUNS


def test_worker_env_shares_the_cores_unless_told(monkeypatch):
    for name in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert local.worker_env(None, 4)["OMP_NUM_THREADS"] == "4"
    assert local.worker_env(None, 32)["OMP_NUM_THREADS"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in local.worker_env(None, 4)
    assert local.worker_env("2", 4)["CUDA_VISIBLE_DEVICES"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert local.worker_env(None, 4)["OMP_NUM_THREADS"] == "3"


def test_gpu_indices_are_mapped_through_the_parents_cuda_visible_devices(monkeypatch):
    """Inside an allocation that set CUDA_VISIBLE_DEVICES=4,5,6,7, --gpus 0,1 are devices 4 and 5
    (CUDA numbers the visible devices from 0), not the machine's devices 0 and 1."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert [local.worker_env(gpu, 2)["CUDA_VISIBLE_DEVICES"] for gpu in ("0", "1")] == ["4", "5"]
    assert local.worker_env("2,3", 2)["CUDA_VISIBLE_DEVICES"] == "6,7"  # a run's group of GPUs
    assert local.worker_env("GPU-a1", 1)["CUDA_VISIBLE_DEVICES"] == "GPU-a1"
    with pytest.raises(ConfigError, match=r"^gpus: CUDA_VISIBLE_DEVICES=4,5,6,7 makes 4 devices visible; no device 4$"):
        local.worker_env("4", 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-x,GPU-y")
    assert local.worker_env("1", 1)["CUDA_VISIBLE_DEVICES"] == "GPU-y"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert local.worker_env("0,1", 2)["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_gpus_inside_an_allocation_pin_workers_to_its_devices(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    prepared_grid(corpus, tmp_path / "grid")
    fake_workers(monkeypatch, "import json, os, sys; "
                 "json.dump({'on-' + os.environ['CUDA_VISIBLE_DEVICES']: 'done'}, open(sys.argv[1], 'w'))")
    outcome = local.launch(Assignment(tmp_path / "grid", progress=False), Launch("local", gpus=("0", "1")))
    assert outcome == {"on-4": "done", "on-5": "done"}


class FakeJob:
    """A submitit job that has ended: with `outcome` its result, None: it left none (cancelled)."""

    def __init__(self, job_id: str, outcome: dict | None, folder: Path):
        self.job_id, self.outcome = job_id, outcome
        self.paths = SimpleNamespace(result_pickle=folder / f"{job_id}_result.pkl")
        if outcome is not None:
            self.paths.result_pickle.write_bytes(b"")

    def result(self) -> dict:
        return self.outcome


def test_slurm_wait_reports_the_jobs_that_ended_without_finishing_and_the_runs_they_left(tmp_path, corpus, capsys):
    out = tmp_path / "grid"
    prepared_grid(corpus, out)
    a, b, c, d = read_sweep_runs(out)
    for identifier in (a, b):
        mark_done(out / sweep_dir.RUNS / identifier)
    run_dir_module.write_status(out / sweep_dir.RUNS / c, "running")  # its job was cancelled
    jobs = [FakeJob("7_0", {a: "done", b: "skipped"}, tmp_path), FakeJob("7_1", None, tmp_path),
            FakeJob("7_2", {a: "skipped", b: "done"}, tmp_path)]
    statuses = slurm.wait_for(jobs, Assignment(out), running=lambda: False)
    assert statuses == {a: "done", b: "done", c: "left", d: "left"}
    printed = capsys.readouterr()
    assert printed.out == "job 7_0: 1 done, 1 skipped\njob 7_2: 1 done, 1 skipped\n"
    assert printed.err == (f"fwbw sweep: 1 SLURM job ended without finishing (7_1; their logs are in {out / 'slurm'}): "
                           "rerun the sweep to finish their runs\n")
    assert (out / sweep_dir.RESULTS_PARQUET).is_file()


def mark_done(run: Path) -> None:
    """A run as its worker leaves it when training ends: a summary, then the status done."""
    run.mkdir(parents=True, exist_ok=True)
    (run / run_dir_module.SUMMARY).write_text("{}")
    run_dir_module.write_status(run, "done")


def read_sweep_runs(out: Path) -> list[str]:
    return list(configure.read_config_file(out / sweep_dir.SWEEP_FILE)["order"])


def test_slurm_wait_watches_squeue_and_else_the_sweep_directory(tmp_path, corpus):
    """Without accounting submitit cannot tell a job without a result has ended: --wait asks squeue,
    and where squeue cannot answer either, waits while the sweep has runs to train."""
    out = tmp_path / "grid"
    prepared_grid(corpus, out)
    assignment = Assignment(out)
    jobs = [FakeJob("12_0", None, tmp_path), FakeJob("12_1", None, tmp_path)]
    assert slurm.jobs_running(jobs, assignment, lambda ids: {"12_0": "RUNNING", "12_1": "COMPLETED"})
    assert slurm.jobs_running(jobs, assignment, lambda ids: {"12_0": "CANCELLED", "12_1": "REQUEUED"})
    assert slurm.jobs_running(jobs, assignment, lambda ids: {"12_[1-3]": "PENDING"})  # tasks not started yet
    assert not slurm.jobs_running(jobs, assignment, lambda ids: {"12_0": "CANCELLED", "12_1": "COMPLETED"})
    assert not slurm.jobs_running(jobs, assignment, lambda ids: {})  # forgotten by SLURM: ended long ago
    assert slurm.jobs_running(jobs, assignment, lambda ids: None)  # no squeue, and runs to train
    for identifier in read_sweep_runs(out):
        mark_done(out / sweep_dir.RUNS / identifier)
    assert not slurm.jobs_running(jobs, assignment, lambda ids: None)
    finished = [FakeJob("13_0", {}, tmp_path)]
    assert not slurm.jobs_running(finished, assignment, lambda ids: {"13_0": "COMPLETING"})  # its result is there


def test_a_sweep_that_waited_exits_3_when_runs_are_left(tmp_path, corpus, monkeypatch, capsys):
    out = tmp_path / "grid"
    monkeypatch.setattr(cli, "launch_sweep", lambda *args: {"a": "done", "b": slurm.LEFT, "c": "failed"})
    assert cli.main(grid_argv(corpus, out)) == cli.EXIT_RUNS_LEFT == 3
    printed = capsys.readouterr()
    assert printed.err == "fwbw sweep: 1 run left unfinished: rerun the sweep to finish them (exit status 3)\n"
    assert printed.out == f"sweep {out}: 1 done, 1 failed, 1 left\n"
    monkeypatch.setattr(cli, "launch_sweep", lambda *args: {"a": "done", "c": "failed"})
    assert cli.main(grid_argv(corpus, out)) == 1


def uncompleted_job_error(message: str) -> Exception:
    import submitit

    return submitit.core.utils.UncompletedJobError(message)


@pytest.mark.parametrize("interruption", [
    KeyboardInterrupt("terminated (signal 15)"),
    SystemExit(-1),  # submitit's requeue of a preempted job
    "submitit",  # submitit's time-limit handler: UncompletedJobError
])
def test_an_interrupted_run_is_released_resumable_not_failed(tmp_path, corpus, monkeypatch, capsys, interruption):
    if interruption == "submitit":
        interruption = uncompleted_job_error("Job not requeued because: timed-out and not checkpointable.")
    run = tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise interruption

    monkeypatch.setattr(sweep_module, "train_and_cut", interrupted)
    with pytest.raises(type(interruption)):
        sweep_module.run_one(base_config(corpus), run, retry_failed=False, progress=False)
    assert run_dir_module.read_status(run)["status"] == "running"  # not failed: the next worker resumes it
    assert not list(run.glob(run_dir_module.LOCK + "*")), "claim left"
    assert "interrupted (" in capsys.readouterr().err


def test_only_an_error_of_the_run_itself_marks_it_failed(tmp_path, corpus, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("loss is nan")

    monkeypatch.setattr(sweep_module, "train_and_cut", broken)
    assert sweep_module.run_one(base_config(corpus), tmp_path / "run", retry_failed=False, progress=False) == "failed"
    assert run_dir_module.read_status(tmp_path / "run") == {"status": "failed", "error": "RuntimeError: loss is nan"}
    assert sweep_module.is_interruption(uncompleted_job_error("timed out"))
    assert not sweep_module.is_interruption(RuntimeError("timed out"))


@pytest.fixture
def saved_signal_handlers():
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR2)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2])
def test_in_a_slurm_job_sigterm_and_the_preemption_signal_interrupt_the_run(signum, saved_signal_handlers):
    """SIGTERM (scancel, the time limit) and USR2 raise JobInterrupted where the job is; on USR2
    submitit's handler runs first (here it gives up, as when timed out), and its error is the reason."""
    def submitit_gives_up(signum, frame):
        raise uncompleted_job_error("Job not requeued because: timed-out and not checkpointable.")

    signal.signal(signal.SIGUSR2, submitit_gives_up)
    slurm.interruptible()
    with pytest.raises(slurm.JobInterrupted) as interrupted:
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises in this thread, at once
    expected = "interrupted by SIGTERM" if signum == signal.SIGTERM else (
        "interrupted by SIGUSR2: Job not requeued because: timed-out and not checkpointable.")
    assert str(interrupted.value) == expected
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # one interruption: the run unwinds undisturbed


def test_submitits_requeue_of_a_preempted_job_still_happens(saved_signal_handlers):
    requeued = []

    def submitit_requeues(signum, frame):
        requeued.append(signum)
        sys.exit(-1)

    signal.signal(signal.SIGUSR2, submitit_requeues)
    slurm.interruptible()
    with pytest.raises(slurm.JobInterrupted, match="^interrupted by SIGUSR2: the job is requeued$"):
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(5)
    assert requeued == [signal.SIGUSR2]


@pytest.mark.usefixtures("srun_on_path")
def test_a_pull_worker_job_is_checkpointable_so_submitit_requeues_it_at_the_time_limit(tmp_path):
    """submitit requeues a timed-out job only if its function has `checkpoint`: the job to requeue
    is the same pull-worker on the same assignment (the runs' checkpoints hold their state)."""
    import submitit

    worker, assignment = slurm.PullWorker(), Assignment(tmp_path / "grid")
    requeued = worker.checkpoint(assignment)
    assert isinstance(requeued, submitit.helpers.DelayedSubmission)
    assert requeued.function is worker and requeued.args == (assignment,) and requeued.kwargs == {}
    executor = slurm.slurm_executor(tmp_path, Launch("slurm"), [TrainConfig(device="cpu")], 1)
    assert executor._executor.max_num_timeout == slurm.SLURM_REQUEUES


@pytest.mark.usefixtures("srun_on_path")
def test_slurm_jobs_ask_for_gpus_only_when_told_or_on_cuda(tmp_path, corpus):
    def gpus(options: Launch, device: str, nproc: int = 1):
        executor = slurm.slurm_executor(tmp_path, options, [base_config(corpus, device=device)], 1, ranks=Ranks(nproc))
        return executor._executor.parameters.get("gpus_per_node")

    assert gpus(Launch("slurm"), "auto") is None  # the default: a CPU-only cluster takes the job
    assert gpus(Launch("slurm"), "cpu") is None
    assert gpus(Launch("slurm"), "cuda") == 1
    assert gpus(Launch("slurm"), "cuda", nproc=2) == 2
    assert gpus(Launch("slurm", gpus_per_run=2), "auto") == 2
    assert gpus(Launch("slurm", gpus_per_run=0), "cuda") is None


@pytest.mark.usefixtures("srun_on_path")
def test_a_slurm_job_of_a_run_on_several_nodes_holds_them_all_and_starts_one_pull_worker(tmp_path, corpus):
    """--nodes-per-run 4 --nproc-per-run 2 on cuda: sbatch asks for 4 nodes with 2 GPUs and 2 CPUs on
    each, the job's srun starts the pull-worker alone (it starts the run's processes: torchrun), and
    submitit waits for that one task's result (told of 4 tasks, it would wait for 3 that never run)."""
    executor = slurm.slurm_executor(tmp_path, Launch("slurm", slurm_options={"account": "proj"}),
                                    [base_config(corpus, device="cuda")], 1, ranks=Ranks(2, nodes=4))
    script = executor._executor._make_submission_file_text("python -m submitit", "uid")
    assert "#SBATCH --nodes=4\n" in script
    assert "#SBATCH --gpus-per-node=2\n" in script and "#SBATCH --cpus-per-task=2\n" in script
    assert "#SBATCH --account=proj\n" in script
    assert " --cpus-per-task=2 --nodes=1 --ntasks=1 python -m submitit" in script  # srun 22.05 needs the CPUs again
    assert executor._executor._num_tasks() == 1
    one_machine = slurm.slurm_executor(tmp_path, Launch("slurm"), [base_config(corpus)], 1, ranks=Ranks(2))
    alone = one_machine._executor._make_submission_file_text("python -m submitit", "uid")
    assert "#SBATCH --nodes=1\n" in alone and "--ntasks=1" not in alone and " --cpus-per-task=2 python" in alone


@pytest.mark.parametrize("launcher", ["local", "ray"])
def test_nodes_per_run_is_refused_outside_slurm_before_anything_is_written(tmp_path, corpus, capsys, launcher):
    out = tmp_path / "grid"
    command = ["sweep", "--data", corpus.spec, "--tokenizer", TOKENIZER, "--depths", "1", "--widths", "16",
               "--p-bw", "0", "--seeds", "1", "--launcher", launcher, "--nodes-per-run", "2", "--out", str(out),
               "--no-progress"]
    assert cli.main(command) == 2 and not out.exists()
    assert capsys.readouterr().err == ("fwbw sweep: error: --nodes-per-run: only with --launcher slurm (srun starts a "
                                       "run's processes on each node of its job)\n")


# --- the sweep file's [slurm] table ------------------------------------------------------------


def test_the_sweep_files_slurm_table_gives_sbatch_options_and_leaves_the_spec_alone(tmp_path, corpus):
    plain = tmp_path / "plain.toml"
    plain.write_text("depths = [1]\nwidths = [16]\n")
    with_table = tmp_path / "cluster.toml"
    with_table.write_text(plain.read_text() + '[slurm]\naccount = "proj"\nexclusive = true\nmem = "32G"\n')
    assert configure.slurm_options(with_table) == {"account": "proj", "exclusive": True, "mem": "32G"}
    assert configure.slurm_options(plain) == {}
    assert configure.slurm_options(None) == {}
    assert configure.build_sweep_spec(file=with_table) == configure.build_sweep_spec(file=plain)


@pytest.mark.parametrize("table", ['slurm = ["account"]', "[slurm]\nmem = 1.5", "[slurm]\nx = { y = 1 }",
                                   '[slurm]\naccount = "proj\\n#SBATCH --wrap=true"', '[slurm]\n"" = "proj"',
                                   '[slurm]\n"acc ount" = "proj"', "[slurm]\nexclusive = false"])
def test_a_slurm_table_that_is_no_table_of_options_is_refused_naming_the_file(tmp_path, table):
    path = tmp_path / "cluster.toml"
    path.write_text(f"depths = [1]\n{table}\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: slurm: must be a table of #SBATCH options"):
        configure.slurm_options(path)


# --- slurm without SLURM, and a missing extra ----------------------------------------------------


@pytest.fixture
def srun_on_path(tmp_path, monkeypatch) -> None:
    """A stand-in srun on PATH where SLURM is not installed: submitit's executor looks for one when built."""
    if shutil.which("srun") is None:
        fake_command(tmp_path / "srun-bin", "srun", "exit 1")
        monkeypatch.setenv("PATH", f"{tmp_path / 'srun-bin'}{os.pathsep}{os.environ['PATH']}")


def fake_command(folder: Path, name: str, script: str) -> None:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_without_sbatch_fails_at_once_in_one_line_training_nothing(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no sbatch here
    out = tmp_path / "grid"
    assert cli.main(grid_argv(corpus, out, "--launcher", "slurm")) == 2
    error = capsys.readouterr().err.strip()
    assert error == ("fwbw sweep: error: --launcher slurm: no sbatch on PATH, so this machine cannot submit SLURM "
                     "jobs (--launcher local or ray train here)")
    assert not (out / sweep_dir.RUNS).exists() and not (out / sweep_dir.SWEEP_FILE).exists()


@pytest.mark.parametrize("launcher, module", [("ray", "ray"), ("slurm", "submitit")])
def test_a_missing_extra_is_one_line_naming_it_before_any_work(launcher, module, tmp_path, corpus, monkeypatch, capsys):
    fake_command(tmp_path / "bin", "sbatch", "exit 1")  # SLURM present: the missing library is the problem
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    out = tmp_path / "grid"
    assert cli.main(grid_argv(corpus, out, "--launcher", launcher)) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"fwbw sweep: error: --launcher {launcher} needs the '{launcher}' extra: pip install 'fwbw[{launcher}]'"
    assert not out.exists()


def test_slurm_submits_one_job_array_of_pull_workers_with_the_options(tmp_path, corpus, monkeypatch, capsys):
    """A fake sbatch (and srun) stand in for SLURM: the array is submitted with the flags' resources
    and the sweep file's #SBATCH options, and the command returns at once, training nothing."""
    bin_folder, script_copy = tmp_path / "bin", tmp_path / "submitted.sh"
    fake_command(bin_folder, "sbatch", f'cp "$1" {script_copy}\necho "Submitted batch job 4242"')
    fake_command(bin_folder, "srun", "exit 1")
    monkeypatch.setenv("PATH", f"{bin_folder}{os.pathsep}{os.environ['PATH']}")
    sweep_file = tmp_path / "cluster.toml"
    sweep_file.write_text(corpus.recipe_toml.read_text() + '[slurm]\naccount = "proj"\nexclusive = true\n')
    out = tmp_path / "grid"
    argv = grid_argv(corpus, out, "--launcher", "slurm", "--config", str(sweep_file), "--slurm-partition", "gpu",
                     "--slurm-time", "90", "--slurm-max-parallel", "3", "--cpus-per-run", "4", "--gpus-per-run", "2")
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == (f"submitted 3 pull-worker jobs for {GRID_RUNS} pending runs: 4242_0 4242_1 4242_2 "
                       f"(logs in {out / sweep_dir.SLURM})")
    directives = {line for line in script_copy.read_text().splitlines() if line.startswith("#SBATCH")}
    expected = {"--partition=gpu", "--time=90", "--cpus-per-task=4", "--gpus-per-node=2", "--array=0-2%3",
                "--account=proj", "--exclusive", "--job-name=fwbw-grid"}
    assert {f"#SBATCH {option}" for option in expected} <= directives
    assert not (out / sweep_dir.RUNS).exists()  # submitted, nothing trained here
    assert set(configure.read_config_file(out / sweep_dir.SWEEP_FILE)["runs"]) == {
        run_id(config) for config in grid_spec(corpus).configs()}


# --- whole grids under each launcher -------------------------------------------------------------


def worker_counts(output: str) -> list[dict[str, int]]:
    """{'done': 2, 'skipped': 2} for each line 'worker i: 2 done, 2 skipped'."""
    lines = re.findall(r"^worker \d+: (.*)$", output, flags=re.MULTILINE)
    return [{status: int(n) for n, status in (part.split() for part in line.split(", "))} for line in lines]


@pytest.mark.slow
def test_two_local_workers_train_each_run_once_into_the_in_process_table(tmp_path, corpus, in_process_table):
    out = tmp_path / "grid"
    command = sweep_command(corpus, out, *TRAIN_TOKENS, "--launcher", "local", "--workers", "2")
    output = finish(start(command, tmp_path / "local.log"), tmp_path / "local.log")
    counts = worker_counts(output)
    assert len(counts) == 2, output
    assert sum(count.get("done", 0) for count in counts) == GRID_RUNS, output  # no run trained by both
    assert last_line(output) == f"sweep {out}: {GRID_RUNS} done"
    assert_each_run_trained_once(out, in_process_table)


@pytest.mark.slow
def test_ray_trains_each_run_once_into_the_in_process_table(tmp_path, corpus, in_process_table):
    out = tmp_path / "grid"
    command = sweep_command(corpus, out, *TRAIN_TOKENS, "--launcher", "ray", "--workers", "2")
    output = finish(start(command, tmp_path / "ray.log"), tmp_path / "ray.log")
    assert last_line(output) == f"sweep {out}: {GRID_RUNS} done", output
    assert_each_run_trained_once(out, in_process_table)


def wait_for_a_claim(out: Path, process, log: Path, timeout: float = 600) -> tuple[Path, run_dir_module.Claim]:
    """The first run a worker claims (its directory and claim), once one does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        for lock in (out / sweep_dir.RUNS).glob(f"*/{run_dir_module.LOCK}"):
            found = run_dir_module.read_claim(lock)
            if found is not None and found.pid is not None:
                return lock.parent, found
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"no run claimed (sweep exit {process.poll()}):\n{log.read_text()}")


@pytest.mark.slow
def test_a_ray_task_that_dies_is_not_retried_into_a_skipped_run_and_the_sweep_exits_3(tmp_path, corpus):
    """A Ray worker killed while it trains a run whose claim stays live, as a dead worker's claim
    does on another node for its lease: Ray used to retry the task, whose retry found the run held
    and reported it 'skipped', and the sweep exited 0. Now the task is not retried, the dead task
    is named, the other runs are done, that one is left (neither failed nor done), exit status 3."""
    out, log = tmp_path / "grid", tmp_path / "ray.log"
    sweep = start(sweep_command(corpus, out, "--train-tokens", "49152", "--launcher", "ray", "--workers", "2"), log)
    run, claim = wait_for_a_claim(out, sweep, log)
    (run / run_dir_module.LOCK).unlink()  # its claim as another node would leave it: live for the lease
    os.close(run_dir_module.take_lease(run, run_dir_module.LEASE_S, run_dir_module.Worker("another-node", claim.pid)).fd)
    os.kill(claim.pid, signal.SIGKILL)
    try:
        sweep.wait(timeout=180)
    except subprocess.TimeoutExpired:
        sweep.kill()
        pytest.fail(f"the sweep did not end:\n{log.read_text()}")
    output = log.read_text()
    assert sweep.returncode == cli.EXIT_RUNS_LEFT, output
    assert last_line(output) == f"sweep {out}: {GRID_RUNS - 1} done, 1 left", output
    assert "fwbw sweep: 1 Ray task ended without finishing (task " in output
    assert "1 run left unfinished: rerun the sweep to finish them (exit status 3)" in output
    assert run_dir_module.read_status(run)["status"] == "running"
    assert [name for name, path in run_dirs(out).items()
            if run_dir_module.read_status(path)["status"] == "done"] == sorted(set(run_dirs(out)) - {run.name})


@pytest.mark.slow
def test_submitit_local_executor_runs_the_pull_workers(tmp_path, corpus, in_process_table, monkeypatch, capsys):
    """The SLURM launcher's own jobs, run by submitit's local executor: two pull-workers share four
    runs, and --wait merges their outcomes and rebuilds the table."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "grid"
    prepare_sweep(grid_spec(corpus), out)
    options = Launch("slurm", slurm_max_parallel=2, wait=True)
    outcome = slurm.launch(Assignment(out, progress=False), options, cluster="local")
    assert outcome == dict.fromkeys(run_dirs(out), "done")
    printed = capsys.readouterr().out
    done = [int(n) for n in re.findall(r"^job \S+: (\d+) done", printed, flags=re.MULTILINE)]
    assert len(done) == 2 and sum(done) == GRID_RUNS, printed
    assert list((out / sweep_dir.SLURM).glob("*_log.out")), "no job logs in SWEEP/slurm"
    assert_each_run_trained_once(out, in_process_table)


@pytest.mark.slow
def test_launchers_mix_and_a_rerun_finishes_what_is_left(tmp_path, corpus, in_process_table, monkeypatch, capsys):
    """One run trained in-process, the rest by submitit jobs submitted without waiting, then a
    rerun with two local workers finds nothing left to train."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out, spec = tmp_path / "grid", grid_spec(corpus)
    prepare_sweep(spec, out)
    first = work(out, shard=(0, GRID_RUNS), progress=False)
    assert list(first.values()) == ["done"]

    submitted, real_submit = [], slurm.submit

    def submit_and_keep_the_jobs(*args):
        submitted.extend(real_submit(*args))
        return submitted

    monkeypatch.setattr(slurm, "submit", submit_and_keep_the_jobs)
    assert slurm.launch(Assignment(out, progress=False), Launch("slurm"), cluster="local") is None  # not waiting
    assert capsys.readouterr().out.startswith(f"submitted {GRID_RUNS - 1} pull-worker jobs for {GRID_RUNS - 1} pending runs: ")
    expected = dict.fromkeys(map(run_id, spec.configs()), "done") | dict.fromkeys(first, "skipped")
    assert merge_outcomes(job.result() for job in submitted) == expected

    assert cli.main(grid_argv(corpus, out, "--launcher", "local", "--workers", "2")) == 0
    assert last_line(capsys.readouterr().out) == f"sweep {out}: {GRID_RUNS} done before"
    assert_each_run_trained_once(out, in_process_table)
