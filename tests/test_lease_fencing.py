"""Fenced leases (fwbw.training.run_dir): epochs, writes refused once the lease is lost, a taker
paused past its gate's lease, heartbeats that fail, liveness on one host (boot id, pid namespace,
pid start time), NFS's retransmitted link, release while a taker holds the gate, and one
`fwbw train` per --out. Hosts, clocks and pauses are simulated."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import base_config, read_json, tiny_config
from test_leases import wait_for

from fwbw import cli
from fwbw.study import samples, sweep
from fwbw.training import checkpoint, evaluation, run_dir
from fwbw.training.run_dir import (
    EPOCH,
    LOCK,
    SUMMARY,
    LeaseLost,
    Worker,
    read_claim,
    read_status,
    recorded_epoch,
    take_lease,
)
from fwbw.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("cache_env", "one_thread")

T0 = 1_000_000.0  # a simulated time
LEASE = 60.0
needs_proc = pytest.mark.skipif(Worker().boot_id is None or Worker().pid_ns is None, reason="no /proc to read")


def at(host: str, t: float, pid: int | None = None) -> Worker:
    return Worker(host=host, pid=os.getpid() if pid is None else pid, clock=lambda: t)


def holder(run: Path) -> str:
    """The identity of the run's claim."""
    return read_claim(run / LOCK).identity


def files(run: Path) -> list[str]:
    return sorted(path.name for path in run.iterdir())


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file under the run directory but its claim and epoch record, with its bytes."""
    return {str(path.relative_to(run)): path.read_bytes() for path in sorted(run.rglob("*"))
            if path.is_file() and path.name not in (LOCK, EPOCH)}


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def left_claim(run: Path, worker: Worker, **changed) -> None:
    """The claim `worker` took and left behind, its record's fields `changed`."""
    os.close(take_lease(run, LEASE, worker).fd)
    if changed:
        change_claim(run, **changed)


def change_claim(run: Path, **changed) -> None:
    """The run's claim with its record's fields `changed`, its heartbeat kept."""
    heartbeat = read_claim(run / LOCK).heartbeat
    (run / LOCK).write_text(json.dumps({**read_json(run / LOCK), **changed}))
    os.utime(run / LOCK, (heartbeat, heartbeat))


def lost_line(run: Path, epoch: int, host: str) -> str:
    return (rf"^{re.escape(str(run))}: lease of epoch {epoch} lost \({host} \(pid {os.getpid()}\) holds the run now\): "
            r"this worker writes nothing more to it$")


# --- epochs and fenced writes -----------------------------------------------------------------


def test_each_claim_gets_the_next_epoch_in_its_claim_and_in_the_run(tmp_path):
    run = tmp_path / "run"
    first = take_lease(run, LEASE, at("a", T0))
    assert (first.epoch, read_claim(run / LOCK).epoch, recorded_epoch(run)) == (1, 1, 1)
    first.release()
    second = take_lease(run, LEASE, at("a", T0))  # after a release
    os.close(second.fd)
    third = take_lease(run, LEASE, at("b", T0 + LEASE + 1))  # a takeover
    os.close(third.fd)
    assert (second.epoch, third.epoch, recorded_epoch(run)) == (2, 3, 3)
    (run / LOCK).unlink()
    left_claim(run, at("c", T0), epoch=7)  # its holder died before it recorded epoch 7
    assert recorded_epoch(run) == 4
    assert take_lease(run, LEASE, at("d", T0 + LEASE + 1)).epoch == 8
    assert (read_json(run / LOCK)["epoch"], recorded_epoch(run)) == (8, 8)


def test_a_holder_whose_claim_was_taken_over_writes_nothing_more(tmp_path):
    """Status, checkpoints, model, weights, config and the clearing of outputs: each checks that the
    holder's claim is still on disk and its epoch the newest, else refuses in one line."""
    run = tmp_path / "run"
    assert run_dir.claim(run, LEASE, at("a", T0))
    run_dir.write_status(run, "running")
    saved = checkpoint.save(run, 1, {"x": torch.zeros(2)}, "config-id")
    assert read_json(saved / checkpoint.STATE)["lease_epoch"] == 1
    newer = take_lease(run, LEASE, at("b", T0 + LEASE + 1))  # "a" paused past its lease
    before = snapshot(run)
    writes = [lambda: run_dir.write_status(run, "done"), lambda: run_dir.write_status(run, "failed", "boom"),
              lambda: checkpoint.save(run, 2, {"x": torch.ones(2)}, "config-id"),
              lambda: checkpoint.save_model(run, None), lambda: checkpoint.save_weights(run / "best.safetensors", {}),
              lambda: run_dir.start_run(run, tiny_config()), lambda: run_dir.clear_outputs(run)]
    for write in writes:
        with pytest.raises(LeaseLost, match=lost_line(run, 1, "b")):
            write()
    assert snapshot(run) == before
    run_dir.release(run)
    assert holder(run) == newer.identity
    assert newer.fence.check() == 2


def test_a_holder_whose_claim_was_taken_over_writes_neither_the_cut_nor_the_samples(tmp_path, corpus):
    """What a sweep's worker writes after training (sweep.cut_and_sample) is fenced too."""
    run = tmp_path / "run"
    assert run_dir.claim(run, LEASE, at("a", T0))
    trainer = Trainer(base_config(corpus, depth=2), run, progress=False)
    trainer.run()
    take_lease(run, LEASE, at("b", T0 + LEASE + 1))  # "a" paused past its lease
    before = snapshot(run)
    for write in (lambda: evaluation.write_cut(run, trainer.model, trainer.valid), lambda: samples.write_samples(run)):
        with pytest.raises(LeaseLost, match=lost_line(run, 1, "b")):
            write()
    assert snapshot(run) == before and not (run / run_dir.CUT).exists() and not (run / run_dir.SAMPLES).exists()
    run_dir.release(run)


def test_a_newer_epoch_recorded_in_the_run_refuses_the_older_holders_writes(tmp_path):
    run = tmp_path / "run"
    assert run_dir.claim(run, LEASE, at("a", T0))
    (run / EPOCH).write_text("5\n")
    with pytest.raises(LeaseLost, match=rf"^{re.escape(str(run))}: lease of epoch 1 lost"):
        run_dir.write_status(run, "done")
    assert not (run / run_dir.STATUS).exists()
    run_dir.release(run)


def test_a_trainer_whose_lease_was_taken_over_stops_at_its_next_write(tmp_path, tiny_data):
    """No heartbeat noticed (its holder paused): the fence alone stops it, before any later write."""
    run = tmp_path / "run"
    assert run_dir.claim(run, LEASE, at("a", T0))
    taken: list = []

    class PausedPastItsLease(Trainer):
        def train_step(self, directions=None):
            if self.state.step == 5 and not taken:  # after the checkpoint of step 4
                taken.append((take_lease(run, LEASE, at("b", T0 + LEASE + 1)), snapshot(run)))
            return super().train_step(directions)

    with pytest.raises(LeaseLost, match=lost_line(run, 1, "b")):
        PausedPastItsLease(tiny_config(), run, data=tiny_data, progress=False).run()
    newer, before = taken[0]
    assert snapshot(run) == before
    assert not (run / SUMMARY).exists()
    states = [read_json(path / checkpoint.STATE) for path in sorted((run / run_dir.CHECKPOINTS).glob("step_*"))]
    assert [(state["step"], state["lease_epoch"]) for state in states] == [(4, 1)]
    run_dir.release(run)
    assert holder(run) == newer.identity


@pytest.mark.parametrize("outcome", ["done", "failed"])
def test_a_sweep_worker_that_lost_the_run_records_no_status(tmp_path, corpus, monkeypatch, outcome):
    run = tmp_path / "run"

    def train_and_cut(config, run_dir_, progress, execution, stop):
        (run / LOCK).unlink()  # another host takes the run over; the heartbeat has not noticed yet
        take_lease(run, LEASE, at("b", T0))
        if outcome == "failed":
            raise RuntimeError("diverged")

    monkeypatch.setattr(sweep, "train_and_cut", train_and_cut)
    assert sweep.run_one(base_config(corpus), run, retry_failed=False, progress=False) == "lost"
    assert read_status(run)["status"] == "running"  # as the new holder found it


# --- a taker paused past its gate's lease -----------------------------------------------------


def test_a_taker_paused_past_its_gates_lease_neither_removes_the_newer_claim_nor_holds_the_run(tmp_path, monkeypatch):
    """"b" holds the gate of a stale claim and has judged it stale; it pauses just as it removes the
    claim, past its gate's lease. Meanwhile "c" ends b's gate, ends the stale claim and takes the
    run. When b goes on, it must not remove c's claim, nor take the run itself."""
    run = tmp_path / "run"
    left_claim(run, at("gone", T0))
    newer: list = []

    def pausing(call):
        def paused(source, *args, **kwargs):
            if Path(source) == run / LOCK and not newer:
                newer.append(None)  # c's own calls pass straight through
                newer[0] = take_lease(run, LEASE, at("c", T0 + 3 * LEASE))
            return call(source, *args, **kwargs)
        return paused

    for name in ("rename", "unlink"):  # however b removes the claim
        monkeypatch.setattr(os, name, pausing(getattr(os, name)))
    paused_taker = run_dir.claim(run, LEASE, at("b", T0 + LEASE + 1))
    monkeypatch.undo()
    assert newer and newer[0] is not None, "b no longer removes the stale claim: move this test's hook"
    assert not paused_taker
    assert holder(run) == newer[0].identity
    assert newer[0].renew(), "c's claim was moved: its heartbeat no longer reaches it"
    assert newer[0].fence.check() == 2
    assert files(run) == [LOCK, EPOCH]


# --- the heartbeat ------------------------------------------------------------------------------


def test_a_heartbeat_that_keeps_failing_loses_the_lease_instead_of_dying(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert run_dir.claim(run, 0.2, at("a", T0))  # a heartbeat every 0.05 s

    def renew(self):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(run_dir.Lease, "renew", renew)
    with run_dir.hold(run) as lost:
        assert wait_for(lost.is_set), "the lease is never lost: the run goes on without a heartbeat"
    err = capsys.readouterr().err
    assert err.count(f"{run}: heartbeat not written: [Errno 5] Input/output error\n") == run_dir.FAILED_CHECKS
    assert err.endswith(f"{run}: lease lost: {run_dir.FAILED_CHECKS} heartbeats in a row could not confirm its claim; "
                        "this worker stops training it\n")
    monkeypatch.undo()
    run_dir.release(run)
    assert files(run) == [EPOCH]


def test_a_heartbeat_that_fails_now_and_then_keeps_the_lease(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert run_dir.claim(run, 0.2, at("a", T0))
    real_renew, calls = run_dir.Lease.renew, []

    def renew(self):  # every FAILED_CHECKS-th heartbeat gets through
        calls.append(1)
        if len(calls) % run_dir.FAILED_CHECKS:
            raise OSError(errno.ETIMEDOUT, "Connection timed out")
        return real_renew(self)

    monkeypatch.setattr(run_dir.Lease, "renew", renew)
    with run_dir.hold(run) as lost:
        assert wait_for(lambda: len(calls) > 3 * run_dir.FAILED_CHECKS)
        assert not lost.is_set()
    assert "lease lost" not in capsys.readouterr().err
    run_dir.release(run)


# --- liveness on this host ----------------------------------------------------------------------


@needs_proc
@pytest.mark.parametrize("started", ["the same", "another"])
def test_a_live_pid_is_the_claims_process_only_with_its_start_time(tmp_path, started):
    """A claim naming a pid that runs, but started at another time: the claim's process died and
    its pid now names another one (here: this test's parent)."""
    run = tmp_path / "run"
    left_claim(run, at("here", T0, pid=os.getppid()))
    if started == "another":
        change_claim(run, started=read_claim(run / LOCK).started + 1)
    taker = take_lease(run, LEASE, at("here", T0))
    assert (taker is not None) == (started == "another")


@needs_proc
def test_a_claim_made_before_the_host_rebooted_is_stale_at_once(tmp_path):
    run = tmp_path / "run"
    left_claim(run, at("here", T0), boot_id="another-boot")  # this process's pid, alive
    assert take_lease(run, LEASE, at("here", T0)) is not None


@needs_proc
def test_a_claim_of_another_pid_namespace_is_judged_by_its_lease(tmp_path):
    """A container sharing this host name: its pids are not ours to see, a dead one here included."""
    run = tmp_path / "run"
    left_claim(run, at("here", T0, pid=dead_pid()), pid_ns="pid:[4026539999]")
    assert take_lease(run, LEASE, at("here", T0 + LEASE - 1)) is None
    assert take_lease(run, LEASE, at("here", T0 + LEASE + 1)) is not None


# --- NFS: a retransmitted link --------------------------------------------------------------


def test_a_link_that_fails_with_eexist_after_it_succeeded_is_taken(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_link = os.link

    def retransmitted(source, target, *args, **kwargs):
        real_link(source, target, *args, **kwargs)  # a link refused for real raises here
        raise FileExistsError(errno.EEXIST, "File exists", str(target))

    monkeypatch.setattr(os, "link", retransmitted)
    lease = take_lease(run, LEASE, at("a", T0))
    assert lease is not None
    assert holder(run) == lease.identity
    assert take_lease(run, LEASE, at("b", T0)) is None  # a live claim: its link really fails
    assert files(run) == [LOCK, EPOCH]


# --- release --------------------------------------------------------------------------------


def gate_of(run: Path) -> Path:
    """The gate of the run's claim, as a live taker on host "b" holds it while it judges the claim."""
    gate = run / f"{LOCK}.{holder(run)}{run_dir.GATE}"
    gate.write_text(json.dumps({"host": "b", "pid": 7, "owner": "0c", "lease_s": LEASE}))
    os.utime(gate, (T0, T0))
    return gate


def test_release_tries_again_while_a_taker_holds_its_claims_gate(tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert run_dir.claim(run, LEASE, at("a", T0))
    gate = gate_of(run)
    waits: list[float] = []
    monkeypatch.setattr(run_dir.time, "sleep", lambda seconds: (waits.append(seconds), gate.unlink()))  # the taker found it live
    run_dir.release(run)
    assert waits == [run_dir.RELEASE_WAIT_S]
    assert files(run) == [EPOCH]


def test_release_gives_up_after_its_attempts_while_the_gate_stays_held(tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert run_dir.claim(run, LEASE, at("a", T0))
    gate_of(run)
    waits: list[float] = []
    monkeypatch.setattr(run_dir.time, "sleep", waits.append)
    run_dir.release(run)
    assert len(waits) == run_dir.RELEASE_ATTEMPTS - 1
    assert LOCK in files(run)  # left to its taker, or to go stale


# --- fwbw train ---------------------------------------------------------------------------------


def refusal(out: Path, host: str) -> str:
    return (f"fwbw train: error: out: {out} is being trained by {host} (pid {os.getpid()}), whose claim is live: "
            "wait for it to end, or give another --out\n")


def test_two_fwbw_train_on_one_out_never_both_run(tmp_path, train_flags, monkeypatch, capsys):
    """While one trains, a second on the same --out is refused in one line; the first holds the
    run's claim while it trains and releases it at the end."""
    out = tmp_path / "run"
    second: list = []

    class FirstTrainer(cli.Trainer):
        def train_step(self, directions=None):
            if not second:
                second.append(None)
                second[0] = (read_claim(out / LOCK).pid, cli.main(["train", *train_flags, "--out", str(out)]))
            return super().train_step(directions)

    monkeypatch.setattr(cli, "Trainer", FirstTrainer)
    assert cli.main(["train", *train_flags, "--out", str(out)]) == 0
    assert second == [(os.getpid(), 2)]
    assert refusal(out, socket.gethostname()) in capsys.readouterr().err
    assert LOCK not in files(out) and recorded_epoch(out) == 1
    assert (out / SUMMARY).is_file()


def test_fwbw_train_refuses_a_run_another_hosts_worker_holds(tmp_path, train_flags, capsys):
    out = tmp_path / "run"
    os.close(take_lease(out, LEASE, Worker(host="other-node")).fd)
    assert cli.main(["train", *train_flags, "--out", str(out)]) == 2
    assert capsys.readouterr().err.endswith(refusal(out, "other-node"))
    assert files(out) == [LOCK, EPOCH]


def test_the_torchrun_processes_of_a_sweep_worker_write_under_its_lease(tmp_path, monkeypatch):
    """`fwbw train` started by a sweep worker that holds the run (LEASE_ENV) takes no claim of its
    own (the worker's is live) and writes under the worker's, until that is lost."""
    run = tmp_path / "run"
    assert run_dir.claim(run)
    with run_dir.passed_on(run):
        passed = os.environ[run_dir.LEASE_ENV]
    assert run_dir.LEASE_ENV not in os.environ
    worker = holder(run)
    monkeypatch.setattr(run_dir, "_HELD", {})  # the torchrun process: one of its own
    monkeypatch.setattr(run_dir, "_FENCES", {})
    monkeypatch.setenv(run_dir.LEASE_ENV, passed)
    with run_dir.training_lease(run) as lost:
        run_dir.write_status(run, "running")
        assert not lost.is_set()
    assert holder(run) == worker
    (run / LOCK).unlink()  # another host takes the run over
    take_lease(run, LEASE, at("b", T0))
    with pytest.raises(LeaseLost, match=lost_line(run, 1, "b")):
        with run_dir.training_lease(run):
            pass
    monkeypatch.undo()
    run_dir.release(run)
    assert holder(run) != worker
