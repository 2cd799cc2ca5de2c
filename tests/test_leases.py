"""Leases on runs (fwbw.training.run_dir): stale claims taken over by exactly one worker from any
host, live ones never, heartbeats, old-format claims, races. Hosts and clocks are simulated: each
Worker names its host and reads its own clock."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import base_config, read_json

from fwbw import cli
from fwbw.schema import ConfigError
from fwbw.study import sweep
from fwbw.training import run_dir
from fwbw.training.run_dir import LOCK, Worker, read_claim, take_lease

pytestmark = pytest.mark.usefixtures("cache_env", "one_thread")

T0 = 1_000_000.0  # a simulated time
LEASE = 60.0
RACERS = 8


def at(host: str, t: float, pid: int | None = None) -> Worker:
    return Worker(host=host, pid=os.getpid() if pid is None else pid, clock=lambda: t)


class Clock:
    """A simulated clock that the test moves."""

    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def left_claim(run: Path, host: str, t: float, lease_s: float = LEASE, pid: int | None = None) -> str:
    """A claim its holder left behind (a dead worker, or one that stopped renewing); its identity."""
    lease = take_lease(run, lease_s, at(host, t, pid))
    os.close(lease.fd)
    return lease.identity


def holder(run: Path) -> tuple[str, str, float]:
    """(identity, host, heartbeat) of the run's claim."""
    found = read_claim(run / LOCK)
    return found.identity, found.host, found.heartbeat


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def files(run: Path) -> list[str]:
    """The run's files but its epoch record (kept for good once a claim was taken)."""
    return sorted(path.name for path in run.iterdir() if path.name != run_dir.EPOCH)


def race(run: Path, workers: list[Worker]) -> list[run_dir.Lease | None]:
    """Every worker takes the run's lease at the same moment, each in its own thread."""
    start = threading.Barrier(len(workers))
    results: list = [None] * len(workers)

    def take(index: int) -> None:
        start.wait()
        results[index] = take_lease(run, LEASE, workers[index])

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(workers))]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often: interleavings inside take_lease
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    return results


# --- takeover under races --------------------------------------------------------------------


def test_a_stale_claim_of_another_host_is_taken_by_exactly_one_of_racing_threads(tmp_path):
    for round_ in range(10):
        run = tmp_path / f"run{round_}"
        left_claim(run, "gone", T0)
        results = race(run, [at(f"host{i}", T0 + LEASE + 1) for i in range(RACERS)])
        winners = [lease for lease in results if lease is not None]
        assert len(winners) == 1, f"round {round_}: {len(winners)} workers hold the run"
        assert holder(run) == (winners[0].identity, winners[0].worker.host, T0 + LEASE + 1)
        assert files(run) == [LOCK], "no private files or gates left behind"


def take_in_process(run: Path, host: str, t: float, start, results) -> None:
    start.wait()
    lease = take_lease(run, LEASE, at(host, t))
    results.put((host, lease is not None))


def test_a_stale_claim_is_taken_by_exactly_one_of_racing_processes(tmp_path):
    context = multiprocessing.get_context("fork")  # torch is loaded already: no second import
    for round_ in range(3):
        run = tmp_path / f"run{round_}"
        left_claim(run, "gone", T0)
        start, results = context.Barrier(4), context.Queue()
        processes = [context.Process(target=take_in_process, args=(run, f"host{i}", T0 + LEASE + 1, start, results))
                     for i in range(4)]
        for process in processes:
            process.start()
        outcomes = dict(results.get(timeout=30) for _ in processes)
        for process in processes:
            process.join(timeout=30)
        winners = [host for host, won in outcomes.items() if won]
        assert len(winners) == 1, f"round {round_}: {outcomes}"
        assert holder(run)[1] == winners[0]
        assert files(run) == [LOCK]


@pytest.mark.parametrize("case", ["fresh heartbeat, another host", "live pid on this host, old heartbeat"])
def test_a_live_claim_is_never_taken(tmp_path, case):
    run = tmp_path / "run"
    if case.startswith("fresh"):
        left_claim(run, "busy", T0)
        racers = [at(f"host{i}", T0 + LEASE - 1) for i in range(RACERS)]
    else:  # this process holds it; its heartbeat is a hundred leases old
        left_claim(run, "here", T0)
        racers = [at("here", T0 + 100 * LEASE) for _ in range(RACERS)]
    before = holder(run), (run / LOCK).stat().st_ino
    assert race(run, racers) == [None] * RACERS
    assert (holder(run), (run / LOCK).stat().st_ino) == before
    assert files(run) == [LOCK]


# --- what makes a claim stale ------------------------------------------------------------------


def test_renewing_keeps_the_claim_live_past_its_lease(tmp_path):
    run = tmp_path / "run"
    clock = Clock(T0)
    lease = take_lease(run, LEASE, Worker(host="a", clock=clock))
    for t in (T0 + 45, T0 + 90):
        clock.t = t
        assert lease.renew()
    assert take_lease(run, LEASE, at("b", T0 + 130)) is None  # 130 s after the claim, 40 s after its heartbeat
    assert holder(run) == (lease.identity, "a", T0 + 90)
    taker = take_lease(run, LEASE, at("b", T0 + 151))  # no heartbeat for longer than the lease
    assert holder(run) == (taker.identity, "b", T0 + 151)


def test_a_claim_is_judged_by_its_own_lease(tmp_path):
    long_run, short_run = tmp_path / "long", tmp_path / "short"
    left_claim(long_run, "a", T0, lease_s=1000)
    left_claim(short_run, "a", T0, lease_s=60)
    assert take_lease(long_run, 60, at("b", T0 + 100)) is None
    assert take_lease(short_run, 1000, at("b", T0 + 100)) is not None
    assert read_json(short_run / LOCK)["lease_s"] == 1000


def test_a_dead_pid_on_this_host_is_stale_at_once(tmp_path):
    run = tmp_path / "run"
    left_claim(run, "here", T0, pid=dead_pid())
    assert take_lease(run, LEASE, at("elsewhere", T0)) is None  # its heartbeat is fresh: another host waits
    assert take_lease(run, LEASE, at("here", T0)) is not None
    assert holder(run)[1:] == ("here", T0)


def write_old_claim(run: Path, content: str, t: float) -> None:
    run.mkdir()
    (run / LOCK).write_text(content)
    os.utime(run / LOCK, (t, t))


@pytest.mark.parametrize("host", ["here", "elsewhere"])
def test_a_claim_of_the_old_format_is_judged_by_its_pid_here_and_its_files_time_elsewhere(tmp_path, host):
    """pid and host only: on its host, its pid decides; elsewhere it is stale LEASE_S (the default
    lease) after its file was written."""
    lease_s = run_dir.LEASE_S
    live, dead = tmp_path / "live", tmp_path / "dead"
    write_old_claim(live, json.dumps({"pid": os.getppid(), "host": "here"}), T0)
    write_old_claim(dead, json.dumps({"pid": dead_pid(), "host": "here"}), T0)
    if host == "here":
        assert take_lease(live, LEASE, at("here", T0 + 10 * lease_s)) is None
        assert take_lease(dead, LEASE, at("here", T0)) is not None
    else:
        assert take_lease(live, LEASE, at("elsewhere", T0 + lease_s - 1)) is None
        assert take_lease(dead, LEASE, at("elsewhere", T0 + lease_s - 1)) is None
        assert take_lease(live, LEASE, at("elsewhere", T0 + lease_s + 1)) is not None
    assert files(live) == [LOCK]


def test_an_unreadable_claim_is_stale_at_once(tmp_path):
    run = tmp_path / "run"
    write_old_claim(run, "{not json", T0)
    assert read_claim(run / LOCK).host is None
    assert take_lease(run, LEASE, at("elsewhere", T0)) is not None
    assert holder(run)[1] == "elsewhere"


@pytest.mark.parametrize("lease", ["Infinity", "NaN", "1e400", "0", "-60"])
def test_a_claim_whose_lease_is_not_a_finite_positive_number_is_stale_at_once(tmp_path, lease):
    """A lease that never ends (one an older fwbw let through) would hold the run for ever: such a
    claim is unreadable, taken at once from any host, even with a live pid on its own."""
    run = tmp_path / "run"
    write_old_claim(run, f'{{"host": "here", "pid": {os.getpid()}, "owner": "ab12", "lease_s": {lease}}}', T0)
    assert read_claim(run / LOCK).host is None
    assert take_lease(run, LEASE, at("elsewhere", T0)) is not None
    assert holder(run)[1] == "elsewhere"


# --- interleavings: a holder renewing, late takers, gates -----------------------------------


def on_gate(monkeypatch, action) -> list[int]:
    """Run `action` once, just before the first gate is linked into place; the calls made."""
    real_link = os.link
    calls: list[int] = []

    def link(source, target, *args, **kwargs):
        if str(target).endswith(run_dir.GATE) and not calls:
            calls.append(1)
            action()
        return real_link(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "link", link)
    return calls


def test_a_holder_that_lost_its_claim_never_revives_it_nor_releases_the_new_one(tmp_path):
    run = tmp_path / "run"
    clock = Clock(T0)
    old = take_lease(run, LEASE, Worker(host="a", clock=clock))
    new = take_lease(run, LEASE, at("b", T0 + LEASE + 1))
    clock.t = T0 + LEASE + 5  # the old holder wakes up and renews
    assert not old.renew()
    assert holder(run) == (new.identity, "b", T0 + LEASE + 1)
    old.release()
    assert holder(run) == (new.identity, "b", T0 + LEASE + 1)
    assert new.renew()
    new.release()
    assert files(run) == []


def test_a_heartbeat_between_the_takers_judgement_and_its_gate_keeps_the_claim(tmp_path, monkeypatch):
    """The taker reads the claim again once it holds the gate: the holder renewed meanwhile."""
    run = tmp_path / "run"
    clock = Clock(T0)
    lease = take_lease(run, LEASE, Worker(host="a", clock=clock))

    def renew_now():
        clock.t = T0 + LEASE + 1
        assert lease.renew()

    calls = on_gate(monkeypatch, renew_now)
    assert take_lease(run, LEASE, at("b", T0 + LEASE + 1)) is None
    assert calls, "take_lease no longer links a gate: move this test's hook"
    assert holder(run) == (lease.identity, "a", T0 + LEASE + 1)
    assert files(run) == [LOCK]


def test_a_late_taker_does_not_end_the_claim_that_replaced_the_stale_one(tmp_path, monkeypatch):
    """Two takers judged the same claim stale; the second completes the takeover before the first
    links the gate. The first then holds the gate of a claim that is gone and ends nothing."""
    run = tmp_path / "run"
    left_claim(run, "gone", T0)
    second: list = []
    calls = on_gate(monkeypatch, lambda: second.append(take_lease(run, LEASE, at("c", T0 + LEASE + 1))))
    first = take_lease(run, LEASE, at("b", T0 + LEASE + 1))
    assert calls and second[0] is not None
    assert first is None
    assert holder(run) == (second[0].identity, "c", T0 + LEASE + 1)
    assert files(run) == [LOCK]


def leave_gate(run: Path, stale: str, host: str, t: float) -> None:
    """The gate of the claim `stale`, taken by a worker on `host` at `t`."""
    gate = run / f"{LOCK}.{stale}{run_dir.GATE}"
    gate.write_text(json.dumps({"host": host, "pid": 7, "owner": "0c", "lease_s": LEASE}))
    os.utime(gate, (t, t))


def test_a_gate_held_by_a_live_taker_stops_other_takers(tmp_path):
    run = tmp_path / "run"
    leave_gate(run, left_claim(run, "gone", T0), "b", T0 + 61)
    assert take_lease(run, LEASE, at("c", T0 + 62)) is None
    assert holder(run)[1] == "gone"


def test_a_gate_left_by_a_taker_that_died_is_ended_after_its_lease(tmp_path):
    run = tmp_path / "run"
    leave_gate(run, left_claim(run, "gone", T0), "crashed", T0 + 61)
    assert take_lease(run, LEASE, at("c", T0 + 100)) is None  # the gate's own lease runs
    taker = take_lease(run, LEASE, at("c", T0 + 122))
    assert taker is not None
    assert holder(run) == (taker.identity, "c", T0 + 122)
    assert files(run) == [LOCK]


# --- this process's lease: claim, hold, release -----------------------------------------------


def wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_hold_renews_the_heartbeat_while_the_block_runs_and_stops_after(tmp_path):
    run = tmp_path / "run"
    clock = Clock(T0)
    assert run_dir.claim(run, 0.2, Worker(host="a", clock=clock))  # a heartbeat every 0.05 s
    with run_dir.hold(run):
        clock.t = T0 + 100
        assert wait_for(lambda: holder(run)[2] == T0 + 100)
        assert take_lease(run, 0.2, at("b", T0 + 100.1)) is None
    clock.t = T0 + 200
    time.sleep(0.2)
    assert holder(run)[2] == T0 + 100, "renewed after the block"
    run_dir.release(run)
    assert files(run) == []


def test_a_holder_says_once_that_it_lost_its_lease(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_dir.claim(run, 0.2, at("a", T0))
    with run_dir.hold(run) as lease_lost:
        assert not lease_lost.is_set()
        taker = take_lease(run, LEASE, at("b", T0 + 1))
        lost = f"{run}: lease lost: b (pid {os.getpid()}) holds the run now; this worker stops training it\n"
        assert wait_for(lambda: lost in capsys.readouterr().err)
        assert lease_lost.is_set()
        time.sleep(0.15)
    assert capsys.readouterr().err == ""
    run_dir.release(run)
    assert holder(run)[0] == taker.identity


def test_claim_and_release_keep_their_old_signatures(tmp_path):
    run = tmp_path / "run"
    assert run_dir.claim(run)
    found = read_claim(run / LOCK)
    assert (found.host, found.pid, found.lease_s) == (socket.gethostname(), os.getpid(), run_dir.LEASE_S)
    assert not run_dir.claim(run)
    run_dir.release(run)
    run_dir.release(run)
    assert files(run) == []


def test_run_one_holds_the_run_under_the_executions_lease(tmp_path, corpus, monkeypatch):
    run = tmp_path / "run"
    seen = []

    def train_and_cut(config, run_dir_, progress, execution, stop):
        seen.append((read_json(run_dir_ / LOCK)["lease_s"], threading.active_count()))

    monkeypatch.setattr(sweep, "train_and_cut", train_and_cut)
    threads = threading.active_count()
    execution = sweep.Execution(lease_s=120)
    assert sweep.run_one(base_config(corpus), run, retry_failed=False, progress=False, execution=execution) == "done"
    assert seen == [(120, threads + 1)]  # the heartbeat thread, during training only
    assert threading.active_count() == threads
    assert files(run) == ["status.json"]


@pytest.mark.parametrize("minutes", ["0", "-1", "inf", "nan"])
def test_a_lease_must_be_a_finite_positive_number_of_minutes(tmp_path, capsys, minutes):
    """`inf` used to be taken (its heartbeat thread died at once and its claim never went stale),
    and -1 was refused in seconds under another name."""
    with pytest.raises(SystemExit) as stop:  # a usage error, before anything is written
        cli.main(["sweep", "--lease-minutes", minutes, "--out", str(tmp_path / "grid"), "--no-progress"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == (f"fwbw sweep: error: argument --lease-minutes: must be a finite number of "
                                       f"minutes > 0, got {minutes}\n")
    assert not (tmp_path / "grid").exists()
    for seconds in (-1, 0, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match=r"^lease_s: must be a finite number of seconds > 0, got"):
            sweep.Execution(lease_s=seconds)
        with pytest.raises(ValueError, match=r"^a lease is a finite number of seconds > 0"):
            take_lease(tmp_path / "run", seconds)


def test_a_worker_that_lost_its_lease_stops_training_and_leaves_the_status_to_the_new_holder(tmp_path, corpus,
                                                                                                monkeypatch):
    """The heartbeat finds another owner: the trainer stops at its next step, and run_one writes
    no status over the new holder's."""
    run = tmp_path / "run"
    steps = []

    class TakenOver(sweep.Trainer):
        def train_step(self, directions=None):
            steps.append(self.state.step)
            if self.state.step == 2:  # another host takes the run over, and the heartbeat sees it
                (run / LOCK).unlink()
                take_lease(run, LEASE, at("b", T0))
                self.stop.set()
            return super().train_step(directions)

    monkeypatch.setattr(sweep, "Trainer", TakenOver)
    assert sweep.run_one(base_config(corpus), run, retry_failed=False, progress=False) == "lost"
    assert steps == [0, 1, 2]
    assert read_json(run / "status.json")["status"] == "running"  # as the new holder found it
    assert holder(run)[1] == "b"
