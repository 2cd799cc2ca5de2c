"""Selection of a run's weights by validation: the test split reaches no choice (it is read only
after training, in Trainer._score_test), early stopping with `patience`, the EMA of the weights
(`eval_ema`, fwbw.training.weight_average) and the resume of a run that uses both."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import english_like_text, read_metrics, tiny_config, without_seconds
from safetensors.torch import load_file
from torch import nn

from fwbw.data.corpora import TokenData, load_token_data
from fwbw.data.windows import validation_windows
from fwbw.training.config import RecipeConfig
from fwbw.training.evaluation import eval_batch_size, evaluate
from fwbw.training.trainer import Trainer, train
from fwbw.training.weight_average import WeightAverage, ema_decay

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = "bpe:300"


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, str]:
    """Two text:DIR corpora with byte-identical train.txt and valid.txt and different test.txt,
    in a cache of this module's own ($FWBW_CACHE for the whole module)."""
    root = tmp_path_factory.mktemp("selection")
    train_text = english_like_text(random.Random(99), 20_000)
    valid_text = english_like_text(random.Random(98), 4_000)
    specs = {}
    for name, seed in (("a", 1), ("b", 2)):
        folder = root / name
        folder.mkdir()
        (folder / "train.txt").write_text(train_text)
        (folder / "valid.txt").write_text(valid_text)
        (folder / "test.txt").write_text(english_like_text(random.Random(seed), 3_000))
        specs[name] = f"text:{folder}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FWBW_CACHE", str(root / "cache"))
        yield specs


def run_config(data: str, **overrides):
    """About 18 steps of a 1-block model, evaluated at steps 3, 5, 8, ... (a second or less)."""
    recipe = RecipeConfig(tokens_per_microbatch=256, lr_scale=overrides.pop("lr_scale", 0.05), accum_max=2.0)
    values = dict(data=data, tokenizer=TOKENIZER, depth=1, width=16, train_tokens=6000, eval_tokens=1024,
                  eval_every_epochs=0.05, checkpoint_every_steps=3, device="cpu", recipe=recipe)
    return tiny_config(**{**values, **overrides})


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def summary_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def timeless(record: dict) -> dict:
    return {k: v for k, v in record.items() if "seconds" not in k and not k.endswith("_per_s")}


SELECTION_KEYS = ("best_step", "best_epoch", "best_val_fw_loss", "stopped_early", "censored", "steps", "selected_by")


# --- the test split reaches no choice ----------------------------------------------------------


def test_runs_that_differ_only_in_the_test_split_train_and_select_alike(tmp_path, corpora):
    a, b = load_token_data(corpora["a"], TOKENIZER, progress=False), load_token_data(corpora["b"], TOKENIZER, progress=False)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.valid, b.valid)  # one tokenizer, trained on train
    assert not np.array_equal(a.test[: min(len(a.test), len(b.test))], b.test[: min(len(a.test), len(b.test))])
    runs = {}
    for name in ("a", "b"):
        # lr_scale 3 makes validation rise, so that patience stops the run: a real choice is made
        train(run_config(corpora[name], lr_scale=3.0, eval_ema=0.9, patience=2), tmp_path / name, progress=False)
        runs[name] = tmp_path / name
    assert without_seconds(read_metrics(runs["a"])) == without_seconds(read_metrics(runs["b"]))
    summaries = {name: summary_of(run) for name, run in runs.items()}
    assert summaries["a"]["stopped_early"] is True  # the choice is not trivially the last step
    for key in SELECTION_KEYS:
        assert summaries["a"][key] == summaries["b"][key], key
    for file in ("best.safetensors", "model.safetensors"):
        assert_same_tensors(tensors(runs["a"] / file), tensors(runs["b"] / file))
    assert summaries["a"]["test_fw_loss"] != summaries["b"]["test_fw_loss"]


class GuardedSplit:
    """A token array that raises on every read while closed."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens
        self.open = False
        self.reads = 0

    def _check(self) -> None:
        if not self.open:
            raise AssertionError("the test split was read outside Trainer._score_test")
        self.reads += 1

    def __len__(self) -> int:
        self._check()
        return len(self.tokens)

    def __getitem__(self, index):
        self._check()
        return self.tokens[index]

    def __array__(self, dtype=None, copy=None):
        self._check()
        return np.asarray(self.tokens, dtype=dtype)


def test_the_test_split_is_read_only_after_training_in_score_test(tmp_path, corpora, monkeypatch):
    loaded = load_token_data(corpora["a"], TOKENIZER, progress=False)
    guard = GuardedSplit(loaded.test)
    data = TokenData(loaded.train, loaded.valid, loaded.vocab_size, loaded.corpus, loaded.tokenizer, test=guard)
    config = run_config(corpora["a"], lr_scale=3.0, eval_ema=0.9, patience=2)
    entries = []
    real_score_test = Trainer._score_test

    def score_test(self):
        entries.append({"step": self.state.step, "training_left": self._training_left(),
                        "evaluations": len(self.state.metrics), "last_eval_step": self.state.metrics[-1]["step"]})
        guard.open = True
        try:
            return real_score_test(self)
        finally:
            guard.open = False

    monkeypatch.setattr(Trainer, "_score_test", score_test)
    trainer = Trainer(config, tmp_path / "guarded", data=data, progress=False)
    summary = trainer.run()
    assert guard.reads > 0, "the guard never saw the test split: the test proves nothing"
    assert len(entries) == 1
    assert entries[0] == {"step": summary["steps"], "training_left": False,
                          "evaluations": len(read_metrics(tmp_path / "guarded")), "last_eval_step": summary["steps"]}

    # the scores are those of the selected (best.safetensors) and of the final averaged weights
    windows = validation_windows(loaded.test, config.seq_len + 1, len(loaded.test))
    assert summary["test_tokens"] == windows.numel()
    trainer.model.load_state_dict(tensors(tmp_path / "guarded" / "best.safetensors"))
    selected = evaluate(trainer.model, windows, eval_batch_size(windows), directions=("fw",))
    assert summary["test_fw_loss"] == selected["fw"]["loss"]
    assert summary["test_fw_acc"] == selected["fw"]["acc"]
    trainer.model.load_state_dict(tensors(tmp_path / "guarded" / "model.safetensors"))
    with trainer.average.swapped_in(trainer.model):
        final = evaluate(trainer.model, windows, eval_batch_size(windows), directions=("fw",))
    assert summary["test_fw_loss_final"] == final["fw"]["loss"]
    assert summary["stopped_early"] and summary["test_fw_loss"] != summary["test_fw_loss_final"]

    # an unguarded run of the same config scores the same
    unguarded = train(config, tmp_path / "plain", progress=False)
    assert timeless(unguarded) == timeless(summary)


def test_a_corpus_without_test_split_has_no_test_scores(tmp_path, corpora):
    loaded = load_token_data(corpora["a"], TOKENIZER, progress=False)
    data = TokenData(loaded.train, loaded.valid, loaded.vocab_size, loaded.corpus, loaded.tokenizer)
    summary = Trainer(run_config(corpora["a"], train_tokens=1024), tmp_path / "run", data=data, progress=False).run()
    assert not [key for key in summary if key.startswith("test_")]


# --- early stopping ----------------------------------------------------------------------------


class ScriptedValidation:
    """Replaces Trainer._evaluate_model: the fw loss of the i-th evaluation is losses[i]; records
    the step, the weights evaluated (the model's, the average swapped in with eval_ema) and the
    average itself at every evaluation."""

    def __init__(self, losses):
        self.losses = losses
        self.steps: list[int] = []
        self.evaluated: list[dict[str, torch.Tensor]] = []
        self.averages: list[dict[str, torch.Tensor] | None] = []

    def __call__(self, trainer: Trainer) -> dict:
        loss = self.losses(len(self.steps)) if callable(self.losses) else self.losses[len(self.steps)]
        self.steps.append(trainer.state.step)
        self.evaluated.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        average = trainer.average
        self.averages.append(None if average is None else {k: v.clone() for k, v in average.average.items()})
        return {"fw": {"loss": loss, "acc": 0.0, "ppl": math.exp(loss)}}


def scripted_run(tmp_path, corpora, monkeypatch, losses, **overrides):
    script = ScriptedValidation(losses)
    monkeypatch.setattr(Trainer, "_evaluate_model", lambda self: script(self))
    trainer = Trainer(run_config(corpora["a"], **overrides), tmp_path / "run", progress=False)
    summary = trainer.run()
    return trainer, summary, script


FALLING = lambda i: 10.0 - 0.1 * i  # noqa: E731


@pytest.fixture(scope="module")
def eval_steps(tmp_path_factory, corpora) -> list[int]:
    """The steps at which a run of run_config() evaluates (the scripted losses change no training)."""
    run = tmp_path_factory.mktemp("eval-steps") / "run"
    train(run_config(corpora["a"]), run, progress=False)
    return [record["step"] for record in read_metrics(run)]


@pytest.mark.parametrize(
    "losses, patience, stop_at, best_at",
    [
        ([5.0, 4.0, 4.5], 1, 2, 1),
        ([5.0, 4.0, 4.0], 1, 2, 1),  # equal is not lower
        ([5.0, 4.0, 4.5, 4.2], 2, 3, 1),
        ([5.0, 4.0, 4.5, 3.9, 4.0, 4.1], 2, 5, 3),  # a new best resets the count
    ],
)
def test_patience_stops_at_the_expected_evaluation(tmp_path, corpora, monkeypatch, eval_steps, losses, patience,
                                                     stop_at, best_at):
    trainer, summary, script = scripted_run(tmp_path, corpora, monkeypatch, losses, patience=patience)
    metrics = read_metrics(tmp_path / "run")
    assert script.steps == eval_steps[: stop_at + 1]
    assert [m["step"] for m in metrics] == eval_steps[: stop_at + 1]
    assert [m["fw_loss"] for m in metrics] == losses[: stop_at + 1]
    assert summary["steps"] == eval_steps[stop_at] < eval_steps[-1]
    assert summary["stopped_early"] is True and summary["censored"] is False
    assert summary["best_step"] == eval_steps[best_at]
    assert summary["best_val_fw_loss"] == losses[best_at]
    assert summary["best_epoch"] == metrics[best_at]["epoch"]
    assert summary["selected_by"] == "valid fw loss"
    assert_same_tensors(tensors(tmp_path / "run" / "best.safetensors"), script.evaluated[best_at])
    assert_same_tensors(tensors(tmp_path / "run" / "model.safetensors"), script.evaluated[stop_at])


def test_a_falling_validation_loss_runs_to_the_budget_censored(tmp_path, corpora, monkeypatch, eval_steps):
    trainer, summary, script = scripted_run(tmp_path, corpora, monkeypatch, FALLING, patience=1)
    assert script.steps == eval_steps
    assert summary["stopped_early"] is False and summary["censored"] is True
    assert summary["best_step"] == summary["steps"] == eval_steps[-1]
    assert summary["best_val_fw_loss"] == FALLING(len(eval_steps) - 1)
    assert_same_tensors(tensors(tmp_path / "run" / "best.safetensors"), script.evaluated[-1])


def test_early_stopping_keeps_the_average_of_the_best_evaluation(tmp_path, corpora, monkeypatch, eval_steps):
    trainer, summary, script = scripted_run(tmp_path, corpora, monkeypatch, [5.0, 4.0, 4.5], patience=1, eval_ema=0.9)
    assert summary["best_step"] == eval_steps[1] and summary["steps"] == eval_steps[2]
    assert summary["selected_by"] == "valid fw loss of the weights' EMA (decay 0.9)"
    best = tensors(tmp_path / "run" / "best.safetensors")
    assert_same_tensors(best, script.evaluated[1])  # the average was in the model when it was evaluated
    average = script.averages[1]
    assert average.keys() <= best.keys()
    for name, value in average.items():
        assert torch.equal(best[name], value), name
    # model.safetensors holds the trained weights of the last step, not the average
    final = tensors(tmp_path / "run" / "model.safetensors")
    assert_same_tensors(final, {k: v.detach() for k, v in trainer.model.state_dict().items()})
    assert any(not torch.equal(final[name], script.averages[2][name]) for name in average)


def test_patience_running_out_at_the_budgets_evaluation_is_not_an_early_stop(tmp_path, corpora, monkeypatch, eval_steps):
    last = len(eval_steps) - 1
    losses = lambda i: 4.0 if i == last - 1 else 5.0 - 0.01 * i  # noqa: E731  (the best one evaluation before the end)
    trainer, summary, script = scripted_run(tmp_path, corpora, monkeypatch, losses, patience=1)
    assert script.steps == eval_steps
    assert summary["stopped_early"] is False and summary["censored"] is False
    assert summary["best_step"] == eval_steps[last - 1] and summary["steps"] == eval_steps[-1]


def test_a_run_without_selection_writes_no_best_weights(tmp_path, corpora, monkeypatch, eval_steps):
    trainer, summary, script = scripted_run(tmp_path, corpora, monkeypatch, [5.0, 4.0, 4.5] + [9.0] * 20)
    assert summary["selected_by"] == "last step" and summary["stopped_early"] is False
    assert summary["steps"] == eval_steps[-1] and summary["best_step"] == eval_steps[1]
    assert summary["censored"] is False
    assert not (tmp_path / "run" / "best.safetensors").exists()


# --- the EMA of the weights --------------------------------------------------------------------


def one_weight(value: float) -> nn.Linear:
    module = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(value)
    return module


def set_weight(module: nn.Module, value: float) -> None:
    with torch.no_grad():
        module.weight.fill_(value)


def test_ema_decay_warms_up_then_stays_at_the_decay():
    assert ema_decay(0.3, 1) == 2 / 11
    assert ema_decay(0.3, 2) == 3 / 12
    assert ema_decay(0.3, 3) == 0.3  # 4/13 > 0.3
    assert ema_decay(0.999, 90) == 91 / 100
    assert ema_decay(0.9, 10_000) == 0.9


@pytest.mark.parametrize("decay", [0.3, 0.95])
def test_the_average_follows_the_formula(decay):
    module = one_weight(2.0)
    average = WeightAverage(module, decay)
    assert average.updates == 0 and average.average["weight"].item() == 2.0
    expected = 2.0
    for t, value in enumerate([1.0, -3.0, 0.5, 4.0, 4.0, -1.25, 8.0], start=1):
        set_weight(module, value)
        average.update(module)
        d = min(decay, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * value
        assert average.updates == t
        assert average.average["weight"].item() == pytest.approx(expected, rel=1e-6, abs=1e-7)
        assert module.weight.item() == value  # updating the average leaves the weights alone
    assert average.average["weight"].dtype == torch.float32


def test_swapped_in_puts_the_average_in_and_the_weights_back():
    module = one_weight(1.0)
    average = WeightAverage(module, 0.5)
    set_weight(module, 5.0)
    average.update(module)  # d_1 = 2/11: 1 * 2/11 + 5 * 9/11
    expected = 2 / 11 + 5 * 9 / 11
    with average.swapped_in(module):
        assert module.weight.item() == pytest.approx(expected, rel=1e-6)
        set_weight(module, -7.0)  # whatever happens inside, the trained weights come back
    assert module.weight.item() == 5.0
    with pytest.raises(ValueError, match="inside"):
        with average.swapped_in(module):
            assert module.weight.item() == pytest.approx(expected, rel=1e-6)
            raise ValueError("inside")
    assert module.weight.item() == 5.0
    assert average.average["weight"].item() == pytest.approx(expected, rel=1e-6)
    assert module.weight.requires_grad


def test_average_state_round_trip():
    module = one_weight(1.0)
    first = WeightAverage(module, 0.8)
    for value in (2.0, 3.0, -1.0):
        set_weight(module, value)
        first.update(module)
    state = {"updates": first.state_dict()["updates"],
             "average": {k: v.clone() for k, v in first.state_dict()["average"].items()}}
    second = WeightAverage(one_weight(0.0), 0.8)
    second.load_state_dict(state)
    assert second.updates == 3 and torch.equal(second.average["weight"], first.average["weight"])
    for value in (4.0, 0.25):  # both go on alike: the update count came along
        set_weight(module, value)
        first.update(module)
        second.update(module)
        assert torch.equal(second.average["weight"], first.average["weight"])


def test_eval_ema_records_the_raw_loss_beside_the_averaged_one(tmp_path, corpora):
    config = run_config(corpora["a"], eval_ema=0.9)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    summary = trainer.run()
    metrics = read_metrics(tmp_path / "run")
    assert all("raw_fw_loss" in record for record in metrics)
    assert all(record["raw_fw_loss"] != record["fw_loss"] for record in metrics)
    # the trained weights (model.safetensors) give raw_fw_loss, their average fw_loss
    assert_same_tensors(tensors(tmp_path / "run" / "model.safetensors"),
                        {k: v.detach() for k, v in trainer.model.state_dict().items()})
    raw = evaluate(trainer.model, trainer.valid, eval_batch_size(trainer.valid), directions=("fw",))
    assert metrics[-1]["raw_fw_loss"] == raw["fw"]["loss"]
    with trainer.average.swapped_in(trainer.model):
        averaged = evaluate(trainer.model, trainer.valid, eval_batch_size(trainer.valid), directions=("fw",))
    assert metrics[-1]["fw_loss"] == averaged["fw"]["loss"] == summary["final_val_loss_fw"]
    assert trainer.average.updates == summary["steps"]
    # without eval_ema no raw_fw_loss
    train(run_config(corpora["a"], train_tokens=1024), tmp_path / "plain", progress=False)
    assert not any("raw_fw_loss" in record for record in read_metrics(tmp_path / "plain"))


# --- resume ------------------------------------------------------------------------------------


@pytest.mark.parametrize("crash_step", [8, 9])  # resumed from the checkpoint of step 6 / step 9
def test_resume_with_ema_and_patience_matches_an_uninterrupted_run(tmp_path, corpora, monkeypatch, crash_step):
    config = run_config(corpora["a"], lr_scale=3.0, eval_ema=0.9, patience=2)
    whole = train(config, tmp_path / "whole", progress=False)
    assert whole["stopped_early"] is True and whole["best_step"] < crash_step < whole["steps"]

    real_train_step = Trainer.train_step

    def ctrl_c(self, directions=None):
        if self.state.step == crash_step:
            raise KeyboardInterrupt
        return real_train_step(self, directions)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", ctrl_c)
        with pytest.raises(KeyboardInterrupt, match=f"interrupted at step {crash_step}"):
            train(config, tmp_path / "resumed", progress=False)
    assert not (tmp_path / "resumed" / "summary.json").exists()
    resumed = train(config, tmp_path / "resumed", progress=False)

    assert without_seconds(read_metrics(tmp_path / "resumed")) == without_seconds(read_metrics(tmp_path / "whole"))
    for key in (*SELECTION_KEYS, "test_fw_loss", "test_fw_loss_final", "final_val_loss_fw"):
        assert resumed[key] == whole[key], key
    for file in ("best.safetensors", "model.safetensors"):
        assert_same_tensors(tensors(tmp_path / "resumed" / file), tensors(tmp_path / "whole" / file))
