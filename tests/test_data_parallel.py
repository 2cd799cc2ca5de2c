"""Data-parallel training (torchrun, gloo on CPU): a 2-rank run is the 1-process run.

Every rank draws the same global batch and trains its part (whole microbatches, shares of those
left over), so the ranks' windows must be the 1-process run's windows, step by step, with the
same tasks. The losses agree to float reassociation only (each rank sums its own parts, then
the ranks are summed): in fp32 the per-step training losses of this tiny run agree to ~1e-6
(measured), and LOSS_TOLERANCE leaves a margin; over hundreds of steps at hlb-gpt's learning
rates any rounding difference grows (docs/method.md#data-parallel-training).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    SUBPROCESS_TIMEOUT,
    TOKENIZER,
    assert_steps_strictly_increase,
    base_config,
    read_json,
    read_metrics,
    subprocess_env,
    sweep_command,
    tiny_config,
    without_seconds,
)

import fwbw.training.trainer as trainer_module
from fwbw.files import atomic_write_json
from fwbw.schema import ConfigError
from fwbw.study import torchrun as torchrun_module
from fwbw.study.torchrun import RankKilled, Ranks, failure_message, killed_message
from fwbw.training.config import RecipeConfig
from fwbw.training.data_parallel import DataParallel
from fwbw.training.run_dir import LeaseLost
from fwbw.training.trainer import Trainer, check_shares

pytestmark = pytest.mark.usefixtures("cache_env", "one_thread")

WORKER = Path(__file__).parent / "workers" / "record_steps.py"
LOSS_TOLERANCE = 1e-5
# 7 windows of 32 tokens per microbatch: the ranks' shares are uneven (4 + 3 windows)
RECIPE = dict(tokens_per_microbatch=224, lr_scale=0.05, accum_max=2.0)


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]


def run_checked(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=SUBPROCESS_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def dp_config(corpus, **overrides):
    values = dict(depth=2, width=32, p_bw=0.5, train_tokens=12_000, eval_every_epochs=0.25, eval_tokens=1024,
                  checkpoint_every_steps=10, recipe=RecipeConfig(**RECIPE))
    return base_config(corpus, **{**values, **overrides})


def recorded_run(corpus, tmp_path: Path, nproc: int, config) -> list[dict]:
    out = tmp_path / f"nproc{nproc}"
    out.mkdir()
    atomic_write_json(out / "config.json", config.to_dict())
    run_checked(torchrun(nproc, str(WORKER), str(out / "config.json"), str(out)))
    return [read_json(out / f"rank{rank}.json") for rank in range(nproc)]


def steps_of(calls: list[dict]) -> dict[int, list[dict]]:
    by_step: dict[int, list[dict]] = {}
    for call in calls:
        by_step.setdefault(call["step"], []).append(call)
    return by_step


def rank_parts(calls: list[dict], world_size: int) -> list[list[dict]]:
    """What each rank trains of a step whose microbatches one process trained as `calls` (one
    each): rank r the whole microbatches r, r + W, ... below W * floor(M / W), then its
    contiguous share of the rows of each of the rest (DataParallel.microbatches and part)."""
    whole = len(calls) - len(calls) % world_size

    def share(call: dict, rank: int) -> dict:
        return {**call, "windows": torch.tensor(call["windows"]).tensor_split(world_size)[rank].tolist()}

    return [calls[rank:whole:world_size] + [share(call, rank) for call in calls[whole:]] for rank in range(world_size)]


@pytest.mark.slow
def assert_metrics_match_one_process(folder: Path, nproc: int) -> None:
    """The metrics.jsonl of the run in folder/nproc{nproc} matches that of folder/nproc1, point by point."""
    whole_metrics = without_seconds(read_metrics(folder / "nproc1" / "run"))
    split_metrics = without_seconds(read_metrics(folder / f"nproc{nproc}" / "run"))
    assert [m["step"] for m in whole_metrics] == [m["step"] for m in split_metrics]
    for a, b in zip(whole_metrics, split_metrics):
        for key in ("fw_loss", "bw_loss", "train_loss"):
            assert a[key] == pytest.approx(b[key], abs=LOSS_TOLERANCE)


def test_two_ranks_train_exactly_the_windows_and_tasks_of_one_process(corpus, tmp_path):
    config = dp_config(corpus)
    (single,) = recorded_run(corpus, tmp_path, 1, config)
    ranks = recorded_run(corpus, tmp_path, 2, config)
    assert single["world_size"] == 1 and [r["world_size"] for r in ranks] == [2, 2]
    one, first, second = (steps_of(record["calls"]) for record in (single, *ranks))
    assert len(one) >= 30 and sorted(one) == sorted(first) == sorted(second)
    assert any(len(calls) > 1 for calls in one.values()), "dynamic microbatching never accumulated"
    assert {tuple(c["directions"]) for c in single["calls"]} == {("fw",), ("fw", "bw")}
    for step, calls in one.items():  # a step of 2 microbatches: one each; of 1: its 7 windows split 4 + 3
        assert [first[step], second[step]] == rank_parts(calls, 2), f"step {step}: the ranks' parts are not the batch"
    # the losses each rank reports are the global batch's, equal on both ranks and to one process's
    assert ranks[0]["losses"] == ranks[1]["losses"]
    differences = [abs(a - b) for a, b in zip(single["losses"], ranks[0]["losses"])]
    assert len(differences) == len(one) and max(differences) < LOSS_TOLERANCE
    assert max(differences) > 0, "identical to the bit: was the 2-rank run really split?"
    assert_metrics_match_one_process(tmp_path, 2)
    assert_steps_strictly_increase(tmp_path / "nproc2" / "run")
    assert sorted(p.name for p in (tmp_path / "nproc2").iterdir()) == ["config.json", "rank0.json", "rank1.json", "run"]


def train_command(corpus, out: Path, *flags: str) -> list[str]:
    return ["-m", "fwbw", "train", "--data", corpus.spec, "--tokenizer", TOKENIZER, "--depth", "2", "--width", "32",
            "--seq-len", "32", "--tokens-per-microbatch", "224", "--p-bw", "0.5", "--eval-tokens", "1024",
            "--dtype", "fp32", "--out", str(out), "--no-progress", *flags]


@pytest.mark.slow
def test_torchrun_train_writes_one_run_directory_that_says_world_size_2(corpus, tmp_path):
    out = tmp_path / "run"
    done = run_checked(torchrun(2, *train_command(corpus, out, "--train-tokens", "6000", "--fixed-microbatch", "--cut")))
    assert len(done.stdout.strip().splitlines()) == 1, "only rank 0 prints the summary line"
    summary = read_json(out / "summary.json")
    assert (summary["world_size"], summary["microbatch_split"], summary["status"]) == (2, 1, "done")
    assert json.loads(done.stdout)["final_val_loss_fw"] == summary["final_val_loss_fw"]
    train_seconds = summary["seconds"] - summary["eval_seconds"]
    assert summary["mean_train_tokens_per_s"] == pytest.approx(summary["tokens"] / train_seconds, rel=1e-12)
    assert sorted(path.name for path in out.iterdir()) == [  # rank 0's claim released, its epoch recorded
        "checkpoints", "config.json", "cut.json", "lease_epoch", "metrics.jsonl", "model.safetensors", "model_config.json",
        "samples.json", "summary.json"]
    assert_steps_strictly_increase(out)
    assert [row["blocks_remaining"] for row in read_json(out / "cut.json")] == [1]


def wait_for_checkpoint(run_dir: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while not list((run_dir / "checkpoints").glob("step_*")):
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.slow
def test_two_rank_run_killed_midway_resumes_to_the_same_end(corpus, tmp_path):
    flags = ("--train-tokens", "40000", "--checkpoint-every", "10")
    run_checked(torchrun(2, *train_command(corpus, tmp_path / "whole", *flags)))
    killed = tmp_path / "killed"
    process = subprocess.Popen(torchrun(2, *train_command(corpus, killed, *flags)), env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_checkpoint(killed, process)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (killed / "summary.json").exists(), "killed after it finished: make the run longer"
    run_checked(torchrun(2, *train_command(corpus, killed, *flags)))
    assert without_seconds(read_metrics(killed)) == without_seconds(read_metrics(tmp_path / "whole"))
    assert read_json(killed / "summary.json")["world_size"] == 2


def rank_pid(run_dir: Path, local_rank: int) -> int | None:
    """The pid of the training process of this local rank working in run_dir, if running."""
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
            environment = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if str(run_dir).encode() in command and b"fwbw" in command and f"LOCAL_RANK={local_rank}".encode() in environment:
            return int(proc.name)
    return None


@pytest.mark.slow
def test_a_killed_rank_releases_the_sweep_run_and_a_rerun_resumes(corpus, tmp_path):
    out = tmp_path / "sweep"
    command = sweep_command(corpus, out, "--nproc-per-run", "2", "--no-progress")
    command[command.index("--widths") + 1: command.index("--p-bw")] = ["32"]
    command[command.index("--p-bw") + 1: command.index("--seeds")] = ["0.5"]
    command += ["--depths", "2", "--train-tokens", "40000", "--checkpoint-every", "10", "--tokens-per-microbatch", "224"]
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (run_dir,) = wait_for_run_dir(out, process)
    wait_for_checkpoint(run_dir, process)
    os.kill(rank_pid(run_dir, local_rank=1), signal.SIGKILL)
    _, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert process.returncode == 130, stderr  # stopped from outside: an interruption, not the run's error
    assert "rank 1 of 2 under torchrun died (exit code -9: SIGKILL) without an error" in stderr.splitlines()[-1]
    assert read_json(run_dir / "status.json")["status"] == "running"  # released without a status: resumable
    rerun = run_checked(command)
    assert "1 done" in rerun.stdout
    assert read_json(run_dir / "status.json")["status"] == "done"
    assert read_json(run_dir / "summary.json")["world_size"] == 2
    assert (run_dir / "cut.json").is_file()
    assert_steps_strictly_increase(run_dir)


@pytest.mark.slow
def test_a_terminated_sweep_leaves_no_training_processes_behind(corpus, tmp_path):
    """SIGTERM to `fwbw sweep --nproc-per-run 2` stops torchrun and both ranks before it ends (and
    SIGKILL would too: they die with their parent)."""
    out = tmp_path / "sweep"
    command = sweep_command(corpus, out, "--nproc-per-run", "2", "--no-progress")
    command[command.index("--widths") + 1: command.index("--p-bw")] = ["32"]
    command[command.index("--p-bw") + 1: command.index("--seeds")] = ["0.5"]
    command += ["--depths", "2", "--train-tokens", "400000", "--checkpoint-every", "10", "--tokens-per-microbatch", "224"]
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (run_dir,) = wait_for_run_dir(out, process)
    wait_for_checkpoint(run_dir, process)
    assert rank_pid(run_dir, local_rank=0) and rank_pid(run_dir, local_rank=1)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=SUBPROCESS_TIMEOUT)
    deadline = time.monotonic() + 30
    while rank_pid(run_dir, 0) or rank_pid(run_dir, 1):
        assert time.monotonic() < deadline, "a rank outlived the sweep"
        time.sleep(0.1)
    assert process.returncode == 130
    assert not (run_dir / "summary.json").exists()


def wait_for_run_dir(out: Path, process: subprocess.Popen) -> list[Path]:
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while not (out / "runs").is_dir() or not list((out / "runs").iterdir()):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    return list((out / "runs").iterdir())


# --- in one process --------------------------------------------------------------------------


def test_each_rank_takes_a_contiguous_share_and_the_shares_stack_to_the_batch():
    batch = torch.arange(7 * 3).reshape(7, 3)
    shares = [DataParallel(rank=r, world_size=3).share(batch) for r in range(3)]
    assert [len(s) for s in shares] == [3, 2, 2]
    assert torch.equal(torch.cat(shares), batch)
    assert torch.equal(DataParallel().share(batch), batch)


def test_more_ranks_than_windows_per_microbatch_is_refused_in_one_line(tiny_config_factory=None):
    from conftest import tiny_config


    config = tiny_config()  # 512 tokens per microbatch at seq_len 32: 16 windows
    check_shares(config, 16)
    with pytest.raises(ConfigError, match=r"^recipe.tokens_per_microbatch: 512 tokens make 16 windows of seq_len 32 "
                       r"per microbatch, fewer than the 17 ranks \(each needs one\)$"):
        check_shares(config, 17)


def test_a_failed_torchrun_is_reported_by_the_error_a_rank_printed_and_a_killed_one_is_an_interruption():
    errors = ["fwbw train: error: out: /x holds the run of another config", "fwbw train: error: later"]
    assert failure_message(3, 1, errors) == "out: /x holds the run of another config"
    assert failure_message(4, 1, []) == "4 training processes under torchrun failed (exit code 1) without an error"
    died = ["Root Cause (first observed failure):", "[0]:", "  rank      : 1 (local_rank: 1)",
            "  exitcode  : -9 (pid: 14819)  (SIGKILL)"]
    assert killed_message(2, 1, died) == "rank 1 of 2 under torchrun died (exit code -9: SIGKILL) without an error"
    assert killed_message(2, -15, ["?"]) == "torchrun was killed (SIGTERM)"
    assert killed_message(2, 1, ["torchrun's report"] * 80) is None
    assert issubclass(RankKilled, KeyboardInterrupt)  # sweep.run_one releases the run, no status


def test_one_machine_runs_torchrun_standalone_and_several_nodes_srun_a_torchrun_on_each_meeting_at_this_host(
        tmp_path, monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "node-a")
    alone = torchrun_module.torchrun_command(Ranks(4), tmp_path, progress=True)
    assert alone[:6] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--standalone"]
    assert alone[6:] == ["-m", "fwbw", "train", "--config", str(tmp_path / "config.json"), "--out", str(tmp_path), "--cut"]
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "32")
    spread = torchrun_module.torchrun_command(Ranks(8, nodes=2), tmp_path, progress=False, rendezvous_port=29511)
    torchrun = spread.index(sys.executable)
    assert spread[:torchrun] == ["srun", "--overlap", "--export=ALL", "--mem=0", "--kill-on-bad-exit=1", "--nodes=2",
                                 "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=32"]
    launcher = spread[torchrun:spread.index("fwbw") - 1]
    options = dict(zip(launcher[3::2], launcher[4::2]))
    assert launcher[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--standalone" not in spread
    assert options == {"--nproc_per_node": "8", "--nnodes": "2", "--rdzv_backend": "c10d", "--rdzv_conf": "is_host=0",
                       "--rdzv_endpoint": "node-a:29511", "--rdzv_id": options["--rdzv_id"]}
    again = torchrun_module.torchrun_command(Ranks(8, nodes=2), tmp_path, progress=False, rendezvous_port=29511)
    assert again[again.index("--rdzv_id") + 1] != options["--rdzv_id"]  # each launch its own rendezvous
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert not any(arg.startswith("--cpus-per-task") for arg in torchrun_module.launcher_command(Ranks(1, nodes=2), 1))
    assert Ranks(8, nodes=2).world_size == 16 and Ranks(3).world_size == 3


def test_the_rendezvous_store_of_a_run_on_several_nodes_is_served_here_while_the_run_trains():
    with torchrun_module.rendezvous_store(Ranks(2)) as port:
        assert port is None  # one machine: torchrun --standalone serves its own
    with torchrun_module.rendezvous_store(Ranks(1, nodes=2)) as port:
        client = torch.distributed.TCPStore(socket.gethostname(), port, is_master=False,
                                            timeout=datetime.timedelta(seconds=10))
        client.set("rank", "0")
        assert client.get("rank") == b"0"
    with pytest.raises(Exception), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # closed once the run ends


def torchrun_root_cause(rank: int, exit_code: int, time_text: str = "2026-12-07_02:21:01") -> list[str]:
    """torchrun's report of the first failure it observed, as it prints it."""
    return ["Root Cause (first observed failure):", "[0]:", f"  time      : {time_text}", "  host      : node-a",
            f"  rank      : {rank} (local_rank: 0)", f"  exitcode  : {exit_code} (pid: 14819)",
            "  error_file: <N/A>", "============================================================"]


def test_under_srun_the_earliest_failure_of_any_node_decides_and_srun_lines_are_not_rank_errors():
    # node b's rank was killed; node a's ranks then failed in a collective, a second later
    killed_first = [*torchrun_root_cause(0, 1, "2026-12-07_02:21:02"), *torchrun_root_cause(1, -9, "2026-12-07_02:21:01")]
    assert killed_message(2, 1, killed_first) == "rank 1 of 2 under torchrun died (exit code -9: SIGKILL) without an error"
    # a rank failed with an error; srun then ended the other node's tasks (the same second)
    failed_first = [*torchrun_root_cause(1, -15), *torchrun_root_cause(0, 1), "srun: error: node-b: task 1: Terminated"]
    assert killed_message(2, 1, failed_first) is None
    # a node's torchrun killed whole: no report of its own, only srun's
    whole = ["srun: error: node-b: task 1: Killed", "srun: error: node-a: task 0: Exited with exit code 1"]
    assert killed_message(2, 1, whole) == "srun's task 1 on node-b was ended by a signal (Killed) without an error"
    assert killed_message(2, 1, ["srun: error: node-a: task 0: Exited with exit code 1"]) is None
    assert not torchrun_module.is_rank_error("srun: error: node-b: task 1: Killed")
    assert torchrun_module.is_rank_error("fwbw train: error: out: /x holds the run of another config")


def test_a_lost_lease_stops_the_processes_even_when_they_print_nothing(tmp_path, monkeypatch):
    """The lease was looked at only when a rank wrote to stderr: with --no-progress the old holder trained on."""
    quiet = [sys.executable, "-c", "import time; time.sleep(600)"]
    monkeypatch.setattr(torchrun_module, "torchrun_command", lambda *args, **kwargs: quiet)
    monkeypatch.setattr(torchrun_module, "start_run", lambda run_dir, config: None)
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    with pytest.raises(LeaseLost):
        torchrun_module.train_in_processes(None, tmp_path, Ranks(2), progress=False, stop=stop)
    assert time.monotonic() - started < 30


# --- out of memory ---------------------------------------------------------------------------


def out_of_memory_above(rows: int, monkeypatch) -> list[int]:
    """Make every forward pass over more than `rows` windows run out of memory, as a device too
    small would; returns the sizes of the passes that trained."""
    real = trainer_module.task_stats
    trained: list[int] = []

    def task_stats(model, windows, directions, accuracy=True, counted_windows=None):
        if torch.is_grad_enabled():
            if len(windows) > rows:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            trained.append(len(windows))
        return real(model, windows, directions, accuracy, counted_windows)

    monkeypatch.setattr(trainer_module, "task_stats", task_stats)
    return trained


def test_out_of_memory_halves_the_microbatch_keeps_the_tokens_per_step_and_goes_on(tmp_path, tiny_data, monkeypatch):
    config = tiny_config(recipe=RecipeConfig(tokens_per_microbatch=512, seq_len_growth_steps=4, lr_scale=0.02,
                                             dynamic_microbatch=False))  # 16 windows of 32 tokens
    whole = Trainer(config, tmp_path / "whole", data=tiny_data, progress=False).run()
    trained = out_of_memory_above(5, monkeypatch)
    summary = Trainer(config, tmp_path / "split", data=tiny_data, progress=False).run()
    assert summary["microbatch_split"] == 4 and set(trained) == {4}  # 16 -> 2 x 8 -> 4 x 4 windows
    saved = trainer_module.checkpoint.load_latest(tmp_path / "split", trainer_module.config_id(config))
    assert saved["train_state"]["memory_splits"] == [{"step": 0, "split": 2}, {"step": 0, "split": 4}]
    assert (summary["steps"], summary["tokens"]) == (whole["steps"], whole["tokens"])
    for key in ("final_val_loss_fw", "final_val_loss_bw"):
        assert summary[key] == pytest.approx(whole[key], abs=1e-5)


def test_out_of_memory_with_one_window_per_piece_fails_in_one_line(tmp_path, tiny_data, monkeypatch):
    out_of_memory_above(0, monkeypatch)
    trainer = Trainer(tiny_config(), tmp_path / "run", data=tiny_data, progress=False)
    with pytest.raises(torch.OutOfMemoryError, match=r"^out of memory at step 0 on cpu with one window of seq_len 32 "
                       r"per piece: a smaller model, seq_len or a larger device is needed$"):
        trainer.run()
    assert trainer.state.microbatch_split == 16


@pytest.mark.slow
def test_bench_under_torchrun_prints_once_and_divides_by_the_world_size():
    done = run_checked(torchrun(2, "-m", "fwbw", "bench", "--shape", "small", "--steps", "1", "--warmup", "0",
                                "--dtype", "fp32", "--no-compile", "--json"))
    result = json.loads(done.stdout)  # one JSON document: rank 1 prints nothing
    (row,) = result["configs"]
    assert (row["world_size"], row["batch"]) == (2, 64)
    peak = result["peak_gflops"]["fp32"]
    assert row["mfu_fw"] == pytest.approx(row["flops_per_token"] * row["fw_tokens_per_s"] / (2 * peak * 1e9), rel=1e-12)
