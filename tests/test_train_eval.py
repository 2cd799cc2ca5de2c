"""train_eval_tokens: the fixed training-split windows evaluated beside validation (the train-val gap)."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import read_metrics, synthetic_tokens, tiny_config

from fwbw.data.windows import train_eval_set
from fwbw.schema import ConfigError
from fwbw.study.results import EVAL_PHASE, TRAIN_SPLIT_PHASE, run_rows
from fwbw.training import checkpoint
from fwbw.training.evaluation import eval_batch_size, evaluate
from fwbw.training.run_setup import RunSetup
from fwbw.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = synthetic_tokens()
    config = tiny_config(train_tokens=4096, eval_every_epochs=0.04, train_eval_tokens=1056, device="cpu")
    run_dir = tmp_path_factory.mktemp("train-eval")
    train(config, run_dir, data=data, progress=False)
    return config, data, run_dir


def test_every_eval_point_reports_the_training_split(trained):
    config, data, run_dir = trained
    metrics = read_metrics(run_dir)
    assert len(metrics) >= 2
    for point in metrics:
        assert {f"train_{d}_{m}" for d in ("fw", "bw") for m in ("loss", "acc", "ppl")} <= point.keys()
    windows = train_eval_set(config, data.train)
    assert windows.shape == (32, 33)  # 1056 tokens in windows of seq_len + 1
    starts = [round(i * (len(data.train) - 33) / 31) for i in range(32)]  # evenly spaced over the split
    assert windows.tolist() == [data.train[s : s + 33].tolist() for s in starts]


def test_the_last_point_equals_evaluating_the_trained_model_on_those_windows(trained):
    config, data, run_dir = trained
    setup = RunSetup(config, data=data, progress=False)
    checkpoint.load_weights(run_dir, setup.model)
    expected = evaluate(setup.model, setup.train_eval, eval_batch_size(setup.train_eval), setup.precision())
    last = read_metrics(run_dir)[-1]
    for direction in ("fw", "bw"):
        assert last[f"train_{direction}_loss"] == pytest.approx(expected[direction]["loss"], rel=1e-5)
        assert last[f"{direction}_loss"] != pytest.approx(expected[direction]["loss"], rel=1e-5)  # not the validation set


def test_results_hold_a_training_split_row_per_point_and_direction(trained):
    config, _, run_dir = trained
    rows = run_rows("r", config.to_dict(), run_dir)
    points = len(read_metrics(run_dir))
    phases = [row["phase"] for row in rows]
    assert (phases.count(EVAL_PHASE), phases.count(TRAIN_SPLIT_PHASE)) == (2 * points, 2 * points)
    last = read_metrics(run_dir)[-1]
    fw = next(r for r in reversed(rows) if r["phase"] == TRAIN_SPLIT_PHASE and r["direction"] == "fw")
    assert fw["loss"] == last["train_fw_loss"]


def test_off_by_default_and_no_rows_without_it(tmp_path, tiny_data):
    config = tiny_config(train_tokens=1024, device="cpu")
    assert config.train_eval_tokens == 0 and train_eval_set(config, tiny_data.train) is None
    train(config, tmp_path, data=tiny_data, progress=False)
    assert not any(key.startswith("train_fw") for key in read_metrics(tmp_path)[-1])
    assert TRAIN_SPLIT_PHASE not in {row["phase"] for row in run_rows("r", config.to_dict(), tmp_path)}


def test_a_set_shorter_than_one_window_is_refused():
    with pytest.raises(ConfigError, match=r"train_eval_tokens: must be 0 \(off\) or >= seq_len \+ 1, got 10"):
        tiny_config(train_eval_tokens=10)


def test_evaluating_the_training_split_changes_nothing_else(tmp_path, tiny_data):
    config = tiny_config(train_tokens=2048, eval_every_epochs=0.04, device="cpu")
    train(config, tmp_path / "off", data=tiny_data, progress=False)
    train(dataclasses.replace(config, train_eval_tokens=1056), tmp_path / "on", data=tiny_data, progress=False)
    keys = ("step", "tokens", "fw_loss", "bw_loss", "train_loss")
    assert [[p[k] for k in keys] for p in read_metrics(tmp_path / "off")] == \
        [[p[k] for k in keys] for p in read_metrics(tmp_path / "on")]
