"""The layer cut: cut.json equals evaluating the truncated model, and `fwbw cut` rewrites it."""

from __future__ import annotations

import pytest
import torch
from conftest import read_json, read_metrics, run_dirs

from fwbw import cli
from fwbw.data.corpora import load_token_data
from fwbw.data.windows import validation_windows
from fwbw.model.tasks import window_length
from fwbw.training import checkpoint
from fwbw.training.config import TrainConfig
from fwbw.training.evaluation import eval_batch_size, evaluate
from fwbw.training.precision import autocast, resolve_dtype

pytestmark = pytest.mark.usefixtures("cache_env", "one_thread")


def validation_set(config: TrainConfig) -> torch.Tensor:
    data = load_token_data(config.data, config.tokenizer, progress=False)
    return validation_windows(data.valid, window_length(config.seq_len, config.task_tokens), config.eval_tokens)


def assert_metrics_close(actual: dict, expected: dict) -> None:
    for direction in expected:
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
        precision = autocast(torch.device("cpu"), resolve_dtype(config.dtype))
        # the saved model is the trained one: its full depth reproduces the last validation point
        full = evaluate(model, windows, eval_batch_size(windows), precision)
        last = read_metrics(run)[-1]
        evaluated = [d for d in ("fw", "bw") if f"{d}_loss" in last]  # bw only where the run trains it
        assert_metrics_close({d: full[d] for d in evaluated},
                             {d: {m: last[f"{d}_{m}"] for m in ("loss", "acc", "ppl")} for d in evaluated})
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
