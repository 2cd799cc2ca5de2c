"""`fwbw sweep --launcher slurm` on a real SLURM: a private two-node cluster on this machine
(tests/slurm_cluster.py), CPU only and without accounting, as a new user's small cluster may be.
Without slurm-wlm and munge, or when not root, these tests skip in one line (under CI=true they
fail)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import slurm_cluster as local_slurm
from conftest import (
    SUBPROCESS_TIMEOUT,
    Corpus,
    assert_no_duplicate_rows,
    assert_steps_strictly_increase,
    base_config,
    run_dirs,
    single_thread,
    start,
    sweep_command,
    wait_for,
)

from fwbw.study import sweep_dir
from fwbw.training import run_dir as run_dir_module
from fwbw.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("cache_env")

EXIT_RUNS_LEFT = 3  # fwbw sweep --wait: some runs left unfinished


def tiny_sweep(corpus: Corpus, out: Path, *flags: str, train_tokens: int = 2048) -> list[str]:
    """`fwbw sweep` of two tiny runs (depth 1, width 16, p_bw 0 and 0.5) under --launcher slurm,
    on the default device (auto, which is the CPU here) and with the default GPUs per run."""
    command = sweep_command(corpus, out, "--train-tokens", str(train_tokens), "--launcher", "slurm", *flags)
    widths = command.index("--widths")
    del command[widths + 2]  # only width 16
    device = command.index("--device")
    del command[device:device + 2]
    return command


def run(command: list[str], log: Path, timeout: float = SUBPROCESS_TIMEOUT) -> tuple[int, str]:
    process = start(command, log)
    output = wait_for(process, log, timeout)
    return process.returncode, output


def assert_every_run_done_once(out: Path, runs: int) -> None:
    found = run_dirs(out)
    assert len(found) == runs
    for run_dir in found.values():
        assert run_dir_module.read_status(run_dir)["status"] == "done", run_dir.name
        assert_steps_strictly_increase(run_dir)  # trained once (a resumed run continues its series)
        assert not list(run_dir.glob(run_dir_module.LOCK + "*")), "claim left"
    table = pd.read_parquet(out / sweep_dir.RESULTS_PARQUET)
    assert_no_duplicate_rows(table)
    evals = table[table["phase"] == "train-eval"]
    assert set(table["run_id"]) == set(evals["run_id"]) == set(found)  # every run's validation points


@pytest.mark.slow
def test_a_sweep_with_the_defaults_runs_on_a_cpu_only_cluster_and_wait_returns_without_accounting(
        tmp_path, corpus, slurm_cluster):
    """No --gpus-per-run and the default device: the jobs ask for no GPU, so a CPU-only cluster
    takes them; --wait returns once they ended, though sacct cannot say so (accounting off)."""
    sacct = subprocess.run(["sacct"], capture_output=True, text=True, env=slurm_cluster.env)
    assert sacct.returncode != 0 and "accounting storage is disabled" in sacct.stderr  # as on many small clusters
    out = tmp_path / "grid"
    started = time.monotonic()
    code, output = run(tiny_sweep(corpus, out, "--wait"), tmp_path / "sweep.log")
    assert code == 0, output
    assert output.strip().splitlines()[-1] == f"sweep {out}: 2 done", output
    script = next((out / sweep_dir.SLURM).glob("*_submission.sh")).read_text()
    assert "--gpus" not in script and "gres" not in script
    assert_every_run_done_once(out, 2)
    print(f"sweep of 2 runs on SLURM: {time.monotonic() - started:.0f} s")


@pytest.fixture(scope="module")
def one_process_sweep(tmp_path_factory, corpus, cache_env) -> dict[str, Path]:
    """The tiny sweep trained by one process on this machine: run id -> its directory."""
    folder = tmp_path_factory.mktemp("one-process")
    local = tiny_sweep(corpus, folder / "grid")
    del local[local.index("--launcher"):local.index("--launcher") + 2]
    code, output = run(local, folder / "sweep.log")
    assert code == 0, output
    return run_dirs(folder / "grid")


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [
    pytest.param(("--nproc-per-run", "2", "--cpus-per-run", "2"), id="torchrun-standalone-2-ranks"),
    pytest.param(("--nodes-per-run", "1", "--nproc-per-run", "2", "--cpus-per-run", "2"), id="srun-1-node-x-2-ranks"),
    pytest.param(("--nodes-per-run", "2"), id="srun-2-nodes-x-1-rank"),
])
def test_a_run_on_several_ranks_inside_a_slurm_job_equals_the_one_process_run(
        tmp_path, corpus, slurm_cluster, one_process_sweep, ranks):
    """Each job trains its run on 2 CPU ranks: torchrun alone on the job's node (--nproc-per-run 2),
    or srun starting torchrun on each of the job's nodes, meeting at a c10d rendezvous (--nodes-per-run:
    1 node x 2 ranks, and 2 nodes x 1 rank, the job then holding both nodes of the cluster); the
    losses are those of the same sweep trained by one process (fp32: equal to rounding)."""
    out = tmp_path / "grid"
    before = {node: slurm_cluster.launched_steps(node) for node in local_slurm.NODES}
    code, output = run(tiny_sweep(corpus, out, "--wait", *ranks), tmp_path / "sweep.log")
    assert code == 0, output
    ranked, alone = run_dirs(out), one_process_sweep
    assert sorted(ranked) == sorted(alone) and len(ranked) == 2
    script = next((out / sweep_dir.SLURM).glob("*_submission.sh")).read_text()
    if "--nodes-per-run" in ranks:
        nodes = int(ranks[ranks.index("--nodes-per-run") + 1])
        assert f"#SBATCH --nodes={nodes}\n" in script and "--nodes=1 --ntasks=1" in script  # one pull-worker task
        # each run's processes: a job step of its own (after the pull-worker's, step 0) on `nodes` nodes
        started = {node: {step for step in slurm_cluster.launched_steps(node) - before[node] if not step.endswith(".0")}
                   for node in local_slurm.NODES}
        assert sum(len(steps) for steps in started.values()) == 2 * nodes  # 2 runs
        if nodes == 2:
            assert started[local_slurm.NODES[0]] == started[local_slurm.NODES[1]]  # every step on both nodes
    for run_id, run_dir in ranked.items():
        assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2
        points = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        expected = [json.loads(line) for line in (alone[run_id] / "metrics.jsonl").read_text().splitlines()]
        assert [p["step"] for p in points] == [p["step"] for p in expected]
        for point, reference in zip(points, expected):
            for key in ("fw_loss", "train_loss"):
                assert point[key] == pytest.approx(reference[key], abs=1e-5), (run_id, point["step"], key)


def submitted_jobs(log: Path) -> list[str]:
    """The job ids the sweep printed: 'submitted 2 pull-worker jobs for 2 pending runs: 5_0 5_1 (logs in ...)'."""
    lines = [line for line in log.read_text().splitlines() if line.startswith("submitted ")]
    return lines[0].split(": ", 1)[1].split(" (logs in ")[0].split() if lines else []


def finish_waiting(sweep: subprocess.Popen, log: Path, cluster, timeout: float = 90) -> tuple[int, str]:
    try:
        code = sweep.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        sweep.kill()
        sweep.wait()
        pytest.fail(f"--wait did not return after the jobs ended ({cluster.jobs()}):\n{log.read_text()}")
    return code, log.read_text()


@pytest.mark.slow
def test_wait_returns_when_a_job_ends_without_a_result_and_exits_3_for_the_runs_left(tmp_path, corpus, slurm_cluster):
    """A job cancelled before it ran leaves no result, and sacct cannot say it ended (accounting
    off): --wait sees it gone from squeue's running jobs, names it, and exits 3, every run left."""
    held = tmp_path / "held.toml"
    held.write_text(corpus.recipe_toml.read_text() + "[slurm]\nhold = true\n")  # submitted held: never runs
    out, log = tmp_path / "grid", tmp_path / "sweep.log"
    sweep = start(tiny_sweep(corpus, out, "--wait", "--slurm-max-parallel", "1", "--config", str(held)), log)
    deadline = time.monotonic() + 60
    while not submitted_jobs(log) and sweep.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    [job] = submitted_jobs(log) or pytest.fail(f"nothing submitted:\n{log.read_text()}")
    assert slurm_cluster.jobs().get(job) == "PENDING"
    slurm_cluster.command("scancel", job)
    code, output = finish_waiting(sweep, log, slurm_cluster, timeout=60)
    assert code == EXIT_RUNS_LEFT, output
    assert f"fwbw sweep: 1 SLURM job ended without finishing ({job}; their logs are in {out / sweep_dir.SLURM})" in output
    assert output.strip().splitlines()[-1] == f"sweep {out}: 2 left", output


def runs_under_way(out: Path, runs: int, process: subprocess.Popen, log: Path, timeout: float = 120) -> dict[str, str]:
    """Once `runs` runs each have a checkpoint past their first validation point: each one's first
    point as written (its wall-clock seconds included), which a run resumed from its checkpoints
    keeps and one trained again from scratch would not."""
    deadline = time.monotonic() + timeout
    while True:
        found = {}
        for run_dir in (out / sweep_dir.RUNS).glob("*"):
            metrics, checkpoints = run_dir / "metrics.jsonl", sorted((run_dir / "checkpoints").glob("step_*"))
            first = metrics.read_text().split("\n", 1)[0] if metrics.is_file() else ""
            if first.endswith("}") and checkpoints and int(checkpoints[-1].name[5:]) > json.loads(first)["step"]:
                found[run_dir.name] = first
        if len(found) >= runs:
            return found
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"not {runs} runs under way (sweep exit {process.poll()}):\n{log.read_text()}")
        time.sleep(0.2)


def first_metrics_lines(out: Path) -> dict[str, str]:
    return {name: (run_dir / "metrics.jsonl").read_text().splitlines()[0] for name, run_dir in run_dirs(out).items()}


def job_logs(out: Path) -> str:
    return "".join(path.read_text() for path in sorted((out / sweep_dir.SLURM).glob("*_log.err")))


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [pytest.param((), id="in-the-job"), pytest.param(("--nodes-per-run", "2"), id="srun-2-nodes")])
def test_scancel_leaves_a_run_resumable_and_preemption_requeues_the_job_which_finishes_every_run_once(
        tmp_path, corpus, slurm_cluster, ranks):
    """Two jobs, each mid-run: one cancelled (scancel: SIGTERM), the other sent the preemption
    signal (scancel --signal=USR2, as SLURM does 90 s before the time limit). Neither run is marked
    failed: the cancelled job releases its run; the preempted one releases its run and is requeued
    (its function is checkpointable), starts again and resumes both runs from their checkpoints.
    --wait returns once it ended, though sacct cannot say so. Likewise when each run's processes
    are a job step of their own on both nodes (--nodes-per-run 2), which the signals reach too."""
    out, log = tmp_path / "grid", tmp_path / "sweep.log"
    command = tiny_sweep(corpus, out, "--wait", "--slurm-time", "5", "--eval-every", "2", "--checkpoint-every", "20",
                         "--no-compile", *ranks, train_tokens=200_000)
    sweep = start(command, log)
    before = runs_under_way(out, 2, sweep, log)  # both runs trained a while
    job_ids = submitted_jobs(log)
    assert len(job_ids) == 2, log.read_text()
    slurm_cluster.command("scancel", job_ids[0])
    slurm_cluster.command("scancel", "--signal=USR2", job_ids[1])
    code, output = finish_waiting(sweep, log, slurm_cluster, timeout=180)
    assert code == 0, output
    assert output.strip().splitlines()[-1] == f"sweep {out}: 2 done", output
    assert f"fwbw sweep: 1 SLURM job ended without finishing ({job_ids[0]}; " in output  # the cancelled one
    logs = job_logs(out)
    assert "fwbw job: interrupted by SIGTERM" in logs and "fwbw job: interrupted by SIGUSR2: the job is requeued" in logs
    assert logs.count("interrupted (") == 2, logs  # each job's run released, neither marked failed
    assert_every_run_done_once(out, 2)
    assert first_metrics_lines(out) == before  # resumed from their checkpoints


@pytest.mark.slow
def test_a_time_limit_shorter_than_the_runs_requeues_the_jobs_which_finish_every_run_once(
        tmp_path, corpus, slurm_cluster):
    """--slurm-time 3 and runs of about two minutes each: 90 s before the limit SLURM sends USR2,
    each job releases its run and is requeued (it used to end with 'timed-out and not
    checkpointable', its run failed), and the jobs started again resume the runs from their
    checkpoints. The runs' length is set from this machine's speed, measured first."""
    speed = tokens_per_second(corpus, tmp_path / "speed")
    out, log = tmp_path / "grid", tmp_path / "sweep.log"
    command = tiny_sweep(corpus, out, "--wait", "--slurm-time", "3", "--eval-every", "10", "--checkpoint-every", "50",
                         "--no-compile", train_tokens=int(speed * TIME_LIMITED_RUN_S))
    started = time.monotonic()
    sweep = start(command, log)
    before = runs_under_way(out, 2, sweep, log)
    code, output = finish_waiting(sweep, log, slurm_cluster, timeout=330)
    assert code == 0, output
    assert output.strip().splitlines()[-1] == f"sweep {out}: 2 done", output
    logs = job_logs(out)
    assert "this job is timed-out" in logs and "fwbw job: interrupted by SIGUSR2: the job is requeued" in logs, logs
    assert "not checkpointable" not in logs
    assert_every_run_done_once(out, 2)
    assert first_metrics_lines(out) == before  # resumed from their checkpoints
    print(f"2 runs of {speed * TIME_LIMITED_RUN_S:.0f} tokens under a 3-minute limit: {time.monotonic() - started:.0f} s")


# a run's training time at the speed measured alone (two jobs side by side train slower): more than the
# ~80 s a job trains before the preemption signal, 90 s before the limit; less than two jobs' worth
TIME_LIMITED_RUN_S = 100


def tokens_per_second(corpus: Corpus, folder: Path) -> float:
    """This machine's training speed now for tiny_sweep's runs, in this process (one thread)."""
    config = base_config(corpus, train_tokens=60_000, eval_every_epochs=10, checkpoint_every_steps=10**6)
    with single_thread():
        summary = Trainer(config, folder, progress=False, compile=False).run()
    return summary["mean_train_tokens_per_s"]


@pytest.mark.slow
def test_a_job_array_with_max_parallel_runs_at_most_that_many_jobs_at_once_and_every_run_once(
        tmp_path, corpus, slurm_cluster):
    """Four runs and --slurm-max-parallel 2 on a node with room for four one-CPU jobs: an array of
    two pull-worker jobs, never more than two running nor two runs trained at once, each run done
    once."""
    out, log = tmp_path / "grid", tmp_path / "sweep.log"
    sweep = start(tiny_sweep(corpus, out, "--wait", "--slurm-max-parallel", "2", "--seeds", "2"), log)
    most_jobs = most_claims = 0
    while sweep.poll() is None:
        running = [job for job, state in slurm_cluster.jobs().items() if state == "RUNNING"]
        claims = list((out / sweep_dir.RUNS).glob(f"*/{run_dir_module.LOCK}")) if (out / sweep_dir.RUNS).is_dir() else []
        most_jobs, most_claims = max(most_jobs, len(running)), max(most_claims, len(claims))
        time.sleep(0.2)
    code, output = finish_waiting(sweep, log, slurm_cluster)
    assert code == 0, output
    jobs = submitted_jobs(log)
    assert "submitted 2 pull-worker jobs for 4 pending runs" in output and len(jobs) == 2, output
    assert "#SBATCH --array=0-1%2" in next((out / sweep_dir.SLURM).glob("*_submission.sh")).read_text()
    assert most_jobs <= 2 and most_claims <= 2, (most_jobs, most_claims)
    done = [int(n) for n in re.findall(r"^job \S+: (\d+) done", output, flags=re.MULTILINE)]
    assert sum(done) == 4 and output.strip().splitlines()[-1] == f"sweep {out}: 4 done", output
    assert_every_run_done_once(out, 4)


def test_without_slurm_the_tests_skip_in_one_line_but_under_ci_they_fail(monkeypatch):
    monkeypatch.setattr(local_slurm.os, "geteuid", lambda: 1000)
    assert local_slurm.unavailable_reason() == "not root (slurmd must run jobs as their user)"
    monkeypatch.setattr(local_slurm.os, "geteuid", lambda: 0)
    monkeypatch.setattr(local_slurm.shutil, "which",
                        lambda name, path=None: None if name in ("munged", "sbatch") else name)
    assert local_slurm.unavailable_reason() == ("munged, sbatch not found (apt-get install slurm-wlm munge; "
                                                "scripts/test.sh does as root)")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="^no local SLURM: not root"):
        local_slurm.skip_or_fail("not root")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception,
                       match=r"^no local SLURM: not root \(CI=true: the real SLURM tests must run\)"):
        local_slurm.skip_or_fail("not root")


def test_the_generated_slurm_conf_is_private_and_describes_this_machine(tmp_path):
    conf = local_slurm.slurm_conf(tmp_path, 40001, [40002, 40003], "CPUs=2 RealMemory=2048")
    settings = dict(line.split("=", 1) for line in conf.splitlines()
                    if line and not line.startswith(("#", "NodeName", "Partition")))
    assert settings["SlurmctldPort"] == "40001" and "SlurmdPort" not in settings
    assert settings["AccountingStorageType"] == "accounting_storage/none"
    assert settings["SelectType"] == "select/cons_tres" and settings["ProctrackType"] == "proctrack/linuxproc"
    assert all(value.startswith(str(tmp_path))
               for key, value in settings.items() if key.endswith(("Dir", "Location", "File")))
    assert all(settings[key].endswith("%n") for key in ("SlurmdSpoolDir",)) and "%n" in settings["SlurmdPidFile"]
    host = socket.gethostname().split(".")[0]
    for node, port in zip(local_slurm.NODES, (40002, 40003)):
        assert f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=2 RealMemory=2048 State=UNKNOWN" in conf
    assert f"Nodes={','.join(local_slurm.NODES)} " in conf
