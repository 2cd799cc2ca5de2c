"""`fwbw status SWEEP`: one line per run (status, host, tokens / budget, heartbeat, ETA) and the
totals, on a hand-built sweep directory and on a real tiny sweep while it runs and after."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import read_metrics, sweep_command

from fwbw import cli
from fwbw.files import atomic_write_json
from fwbw.study import status as status_module
from fwbw.study.estimate import short_duration
from fwbw.study.sweep import short_count
from fwbw.study.sweep_dir import RUNS, SWEEP_FILE
from fwbw.training import trainer as trainer_module
from fwbw.training.run_dir import LOCK, SUMMARY, Worker, read_claim, take_lease, write_status

pytestmark = pytest.mark.usefixtures("cache_env", "one_thread")

T0 = 1_000_000.0


def at(host: str, t: float, pid: int | None = None) -> Worker:
    return Worker(host=host, pid=os.getpid() if pid is None else pid, clock=lambda: t)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def leave_claim(run: Path, worker: Worker, lease_s: float = 600.0) -> None:
    os.close(take_lease(run, lease_s, worker).fd)


def write_metrics(run: Path, *records: dict) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))


def hand_built_sweep(out: Path) -> None:
    """Six runs, one in each state: done, running (another host), stale (another host's lease
    expired; a dead pid on this host), failed, pending."""
    budgets = {"done": dict(train_tokens=4096), "running": dict(train_tokens=None, epochs=2.0),
               "stale-node9": dict(train_tokens=4096), "stale-here": dict(train_tokens=4096),
               "failed": dict(train_tokens=4096), "pending": dict(train_tokens=None, epochs=1.0)}
    atomic_write_json(out / SWEEP_FILE, {"runs": {f"r-{name}": budget for name, budget in budgets.items()}})
    runs = out / RUNS
    write_metrics(runs / "r-done", {"tokens": 2048, "epoch": 0.5, "seconds": 10.0},
                  {"tokens": 4096, "epoch": 1.0, "seconds": 20.0})
    (runs / "r-done" / SUMMARY).write_text("{}")  # a done run has its summary
    write_status(runs / "r-done", "done")
    write_metrics(runs / "r-running", {"tokens": 1024, "epoch": 0.25, "seconds": 8.0})
    write_status(runs / "r-running", "running")
    leave_claim(runs / "r-running", at("node7", T0 - 12, pid=4242))
    write_metrics(runs / "r-stale-node9", {"tokens": 2048, "epoch": 0.5, "seconds": 30.0})
    write_status(runs / "r-stale-node9", "running")
    leave_claim(runs / "r-stale-node9", at("node9", T0 - 700, pid=99))
    leave_claim(runs / "r-stale-here", at("here", T0 - 5, pid=dead_pid()))
    write_metrics(runs / "r-failed", {"tokens": 512, "epoch": 0.125, "seconds": 4.0})
    write_status(runs / "r-failed", "failed", "RuntimeError: boom")


def test_status_of_a_hand_built_sweep(tmp_path):
    hand_built_sweep(tmp_path)
    assert status_module.status_lines(tmp_path, at("here", T0)) == [
        "run            status   host   tokens       heartbeat     ETA",
        "r-done         done     -      4.10k/4.10k  -             -",
        "r-failed       failed   -      512/4.10k    -             -",
        "r-pending      pending  -      0/?          -             -",  # 1 epoch of a split not measured yet
        "r-running      running  node7  1.02k/8.19k  12 s ago      56 s",  # 7168 tokens left at 128 tokens/s
        "r-stale-here   stale    here   0/4.10k      5 s ago       -",  # its pid is dead
        "r-stale-node9  stale    node9  2.05k/4.10k  11.7 min ago  -",  # 700 s without a heartbeat, lease 600 s
        "6 runs: 1 done, 1 running, 2 stale, 1 failed, 1 pending",
    ]


def test_a_claim_decides_over_a_running_or_failed_status(tmp_path):
    atomic_write_json(tmp_path / SWEEP_FILE, {"runs": {name: {"train_tokens": 100} for name in "abc"}})
    leave_claim(tmp_path / RUNS / "a", at("here", T0 - 3000))  # this process: alive, whatever its heartbeat
    write_status(tmp_path / RUNS / "b", "running")  # its worker went away and released its claim
    write_status(tmp_path / RUNS / "c", "failed")
    leave_claim(tmp_path / RUNS / "c", at("node7", T0 - 1))  # retried now
    states = status_module.sweep_status(tmp_path, at("here", T0))
    assert [state.status for state in states] == ["running", "pending", "running"]


def test_status_refuses_a_directory_that_holds_no_sweep(tmp_path, capsys):
    assert cli.main(["status", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"fwbw status: error: {tmp_path} is not a sweep directory (no sweep.json)\n"
    assert cli.main(["status", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err == f"fwbw status: error: {tmp_path / 'missing'}: no such directory\n"


def capture_status_at_the_first_eval_of_the_second_run(out: Path, monkeypatch) -> list:
    """The status lines, the claim and the last metrics record just after the first eval point of
    the sweep's second run, while it trains; the status judged 3 s after the claim's heartbeat."""
    seen: list = []
    real_evaluate = trainer_module.Trainer._evaluate

    def evaluate(self):
        record = real_evaluate(self)
        if not seen and self.run_dir.name == list(json.loads((out / SWEEP_FILE).read_text())["runs"])[1]:
            claim = read_claim(self.run_dir / LOCK)
            judge = Worker(clock=lambda: claim.heartbeat + 3)
            seen.append((status_module.status_lines(out, judge), claim, read_metrics(self.run_dir)[-1]))
        return record

    monkeypatch.setattr(trainer_module.Trainer, "_evaluate", evaluate)
    return seen


def columns(lines: list[str]) -> list[list[str]]:
    """Each line's cells (columns are two or more spaces apart)."""
    return [[cell.strip() for cell in line.split("  ") if cell.strip()] for line in lines]


@pytest.mark.slow
def test_status_of_a_real_sweep_while_it_runs_and_after(tmp_path, corpus, capsys, monkeypatch):
    out = tmp_path / "grid"
    command = sweep_command(corpus, out, "--widths", "16", "--train-tokens", "4096", "--eval-every", "0.02",
                            "--lease-minutes", "2")
    seen = capture_status_at_the_first_eval_of_the_second_run(out, monkeypatch)
    assert cli.main(command[command.index("sweep"):]) == 0
    first, second = (out / RUNS / run_id for run_id in json.loads((out / SWEEP_FILE).read_text())["runs"])
    (lines, claim, record), = seen
    assert (claim.host, claim.pid, claim.lease_s) == (socket.gethostname(), os.getpid(), 120.0)
    rate = record["tokens"] / record["seconds"]
    assert columns(lines) == [
        ["run", "status", "host", "tokens", "heartbeat", "ETA"],
        [first.name, "done", "-", f"{short_count(read_metrics(first)[-1]['tokens'])}/4.10k", "-", "-"],
        [second.name, "running", socket.gethostname(), f"{short_count(record['tokens'])}/4.10k", "3 s ago",
         short_duration((4096 - record["tokens"]) / rate)],
        ["2 runs: 1 done, 1 running, 0 stale, 0 failed, 0 pending"],
    ]
    assert record["tokens"] < 4096
    capsys.readouterr()
    assert cli.main(["status", str(out)]) == 0
    assert columns(capsys.readouterr().out.splitlines()) == [
        ["run", "status", "host", "tokens", "heartbeat", "ETA"],
        *([run.name, "done", "-", f"{short_count(read_metrics(run)[-1]['tokens'])}/4.10k", "-", "-"]
          for run in (first, second)),
        ["2 runs: 2 done, 0 running, 0 stale, 0 failed, 0 pending"],
    ]
