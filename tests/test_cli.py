"""The command line: bad input fails at once with one line naming the problem, and leaves nothing."""

import json

import pytest

from fwbw.cli import main


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


def test_launcher_reexecutes_once_with_allocator_tunables(monkeypatch):
    from fwbw import launch

    calls = []
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(launch.sys, "platform", "linux")
    monkeypatch.setattr(launch.sys, "argv", ["fwbw", "results", "x"])
    monkeypatch.setattr(launch.os, "execv", lambda path, args: calls.append(args))
    monkeypatch.setattr("fwbw.cli.main", lambda: 0)
    launch.main()
    assert calls == [[launch.sys.executable, "-m", "fwbw.launch", "results", "x"]]
    assert "glibc.malloc.mmap_threshold=" in launch.os.environ["GLIBC_TUNABLES"]
    calls.clear()
    assert launch.main() == 0  # already set: runs the CLI, no second exec
    assert calls == []
