"""The command line: bad input fails at once with one line naming the problem, and leaves nothing;
Ctrl-C ends a run in one line, and rerunning the command resumes it exactly."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import finish, read_metrics, start, without_seconds

from fwbw.cli import main
from fwbw.training.run_dir import CHECKPOINTS
from fwbw.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "flags, field",
    [
        (["--width", "100"], "width"),
        (["--p-bw", "1.5"], "p_bw"),
        (["--depth", "0"], "depth"),
        (["--data", "no-such-data"], "data"),
        (["--tokenizer", "bpe:7"], "tokenizer"),
    ],
)
def test_bad_train_input_fails_before_any_work(flags, field, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--no-progress", *flags]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0
    assert error.startswith(f"fwbw train: error: {field}: ")
    assert not out.exists()


def test_unwritable_out_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["train", "--out", str(blocker / "run"), "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("fwbw train: error: out: ")


@pytest.mark.usefixtures("cache_env")
def test_train_then_rerun_from_config(corpus, tmp_path, capsys):
    flags = ["--data", corpus.spec, "--tokenizer", "bpe:300", "--depth", "1", "--width", "16",
             "--seq-len", "16", "--p-bw", "0.5", "--train-tokens", "3000", "--eval-tokens", "512",
             "--tokens-per-microbatch", "256", "--dtype", "fp32", "--no-progress"]
    assert main(["train", *flags, "--out", str(tmp_path / "a")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["leaks_labels"] is False and printed["final_val_loss_bw"] > 0
    assert main(["train", "--config", str(tmp_path / "a" / "config.json"), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    first, second = ((tmp_path / run / "metrics.jsonl").read_text().splitlines() for run in ("a", "b"))
    strip = lambda lines: [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]
    assert strip(first) == strip(second)


def test_missing_files_are_one_line_naming_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "missing.json", "--out", "run", "--no-progress"]) == 2
    assert capsys.readouterr().err == "fwbw train: error: missing.json: no such file\n"
    assert main(["cut", "nowhere", "--no-progress"]) == 2
    assert capsys.readouterr().err == "fwbw cut: error: nowhere is not a run directory (no config.json)\n"
    assert list(tmp_path.iterdir()) == []


INTERRUPTED = "interrupted at step {step}; rerun the same command to resume"


@pytest.mark.usefixtures("cache_env")
def test_ctrl_c_mid_run_is_one_line_exit_130_and_the_rerun_resumes_exactly(train_flags, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_train_step = Trainer.train_step

    def ctrl_c_at_step_5(self, directions=None):
        if self.state.step == 5:  # between the checkpoints of steps 3 and 6 (of 7)
            raise KeyboardInterrupt
        return real_train_step(self, directions)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", ctrl_c_at_step_5)
        assert main(["train", *train_flags, "--out", str(run)]) == 130
    assert capsys.readouterr().err == f"fwbw train: {INTERRUPTED.format(step=5)}\n"
    assert sorted(path.name for path in (run / CHECKPOINTS).iterdir()) == ["step_00000003"]
    assert main(["train", *train_flags, "--out", str(run)]) == 0
    assert main(["train", *train_flags, "--out", str(tmp_path / "whole")]) == 0
    assert read_metrics(run)[-1]["step"] == 7
    assert without_seconds(read_metrics(run)) == without_seconds(read_metrics(tmp_path / "whole"))


def interrupt_once_checkpointed(command: list[str], run: Path, log: Path, timeout: float = 120.0) -> bool:
    """Start `fwbw train` and send it SIGINT once it has written a checkpoint; False when it
    finished anyway (before the signal reached it: on a loaded machine a short run may end between
    its checkpoint and the signal; a run that ignored the signal ends so at every length, and the
    caller fails)."""
    process = start(command, log)
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None and not any((run / CHECKPOINTS).glob("step_*")):
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint in {timeout} s:\n{log.read_text()}")
            time.sleep(0.005)
        if process.poll() is not None:
            return False
        process.send_signal(signal.SIGINT)
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if process.returncode == 0:
        return False
    assert process.returncode == 130, log.read_text()
    return True


@pytest.mark.slow
@pytest.mark.usefixtures("cache_env")
def test_sigint_to_fwbw_train_is_one_line_exit_130_and_the_rerun_resumes_exactly(train_flags, tmp_path):
    flags = [flag for flag in train_flags if flag not in ("--train-tokens", "3000")]
    for train_tokens in (30_000, 120_000, 480_000):
        folder = tmp_path / str(train_tokens)
        folder.mkdir()
        run, whole = folder / "run", folder / "whole"
        command = [sys.executable, "-m", "fwbw", "train", *flags, "--train-tokens", str(train_tokens)]
        if interrupt_once_checkpointed([*command, "--out", str(run)], run, folder / "interrupted.log"):
            break
    else:
        pytest.fail("every run finished before it could be interrupted, even the longest")
    message = f"fwbw train: {INTERRUPTED.format(step='[1-9][0-9]*')}\n"
    assert re.fullmatch(message, (folder / "interrupted.log").read_text())
    rerun = start([*command, "--out", str(run)], folder / "rerun.log")
    uninterrupted = start([*command, "--out", str(whole)], folder / "whole.log")
    finish(rerun, folder / "rerun.log")
    finish(uninterrupted, folder / "whole.log")
    assert without_seconds(read_metrics(run)) == without_seconds(read_metrics(whole))


class FakeLibc:
    def __init__(self, result: int):
        self.result = result
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return self.result


@pytest.fixture
def fresh_allocator():
    from fwbw.training import allocator

    allocator.tune_allocator.cache_clear()
    yield allocator
    allocator.tune_allocator.cache_clear()


def fake_glibc(monkeypatch, allocator, result: int) -> FakeLibc:
    libc = FakeLibc(result)
    monkeypatch.setattr(allocator.os, "confstr", lambda name: "glibc 2.36")
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: libc)
    return libc


def test_allocator_turns_off_mmap_and_trimming_once(fresh_allocator, monkeypatch):
    libc = fake_glibc(monkeypatch, fresh_allocator, result=1)
    assert fresh_allocator.tune_allocator() is True
    assert fresh_allocator.tune_allocator() is True
    assert libc.calls == [(-4, 0), (-1, -1)]  # M_MMAP_MAX = 0, then M_TRIM_THRESHOLD = -1; once


def test_allocator_reports_a_refused_setting(fresh_allocator, monkeypatch):
    libc = fake_glibc(monkeypatch, fresh_allocator, result=0)
    assert fresh_allocator.tune_allocator() is False
    assert libc.calls == [(-4, 0), (-1, -1)]  # both are still tried


def test_allocator_leaves_other_c_libraries_alone(fresh_allocator, monkeypatch):
    def not_glibc(name):
        raise ValueError("unrecognized configuration name")

    monkeypatch.setattr(fresh_allocator.os, "confstr", not_glibc)
    monkeypatch.setattr(fresh_allocator.ctypes, "CDLL", lambda name: pytest.fail("mallopt called off glibc"))
    assert fresh_allocator.tune_allocator() is False


def test_allocator_applies_on_this_machine_when_it_runs_glibc(fresh_allocator):
    assert fresh_allocator.tune_allocator() is fresh_allocator.is_glibc()


def test_python_dash_m_fwbw_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "fwbw", "bench", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: fwbw bench")
    assert "--shape" in done.stdout and "--config" not in done.stdout


def test_bench_rejects_an_unknown_shape_and_the_old_flag(capsys):
    assert main(["bench", "--shape", "small", "huge"]) == 2
    assert capsys.readouterr().err == "fwbw bench: error: unknown bench shape(s) huge; known: small, hlb-default\n"
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--config", "small"])
    assert exit_info.value.code == 2
