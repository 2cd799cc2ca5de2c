"""The training loop: task construction, the batched fw+bw path, outputs, determinism, resume,
adaptive p_bw, and the run setup that training and `fwbw cut` share."""

import json
import math

import pytest
import torch
from conftest import tiny_config

from fwbw import ModelConfig, build_model
from fwbw.cli import main
from fwbw.model.tasks import task_batch, task_stats
from fwbw.schema import ConfigError
from fwbw.training import checkpoint, run_setup
from fwbw.training import trainer as trainer_module
from fwbw.training.config import TrainConfig
from fwbw.training.evaluation import cut_run, eval_batch_size, evaluate
from fwbw.training.run_setup import RunSetup
from fwbw.training.trainer import Trainer, TrainState, adapted_p_bw, train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_task_batches_shift_the_right_way():
    config = ModelConfig(vocab_size=10, depth=1, width=8, max_seq_len=8)
    windows = torch.arange(5).unsqueeze(0)
    fw_in, fw_out = task_batch(windows, "fw", config)
    bw_in, bw_out = task_batch(windows, "bw", config)
    assert fw_in.tolist() == [[0, 1, 2, 3]] and fw_out.tolist() == [[1, 2, 3, 4]]
    assert bw_in.tolist() == [[1, 2, 3, 4]] and bw_out.tolist() == [[0, 1, 2, 3]]


def test_task_tokens_mark_the_start_for_fw_and_the_end_for_bw():
    config = ModelConfig(vocab_size=10, depth=1, width=8, max_seq_len=8, task_tokens=True)
    windows = torch.arange(4).unsqueeze(0)
    fw_in, fw_out = task_batch(windows, "fw", config)
    bw_in, bw_out = task_batch(windows, "bw", config)
    assert fw_in.tolist() == [[10, 0, 1, 2]] and fw_out.tolist() == [[0, 1, 2, 3]]
    assert bw_in.tolist() == [[1, 2, 3, 11]] and bw_out.tolist() == [[0, 1, 2, 3]]


def separate_losses(model, windows):
    losses = {}
    for direction in ("fw", "bw"):
        inputs, targets = task_batch(windows, direction, model.config)
        logits = model(inputs, direction)
        losses[direction] = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return losses


def gradients(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("task_tokens", [False, True])
def test_batched_fw_bw_matches_two_separate_passes(task_tokens):
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=40, depth=2, width=16, max_seq_len=24, task_tokens=task_tokens))
    windows = torch.randint(0, 40, (3, 24 if task_tokens else 25))
    batched = task_stats(model, windows, ("fw", "bw"))
    separate = separate_losses(model, windows)
    for direction in ("fw", "bw"):
        torch.testing.assert_close(batched[direction][0], separate[direction], rtol=1e-5, atol=1e-6)
    batched_grads = gradients(model, batched["fw"][0] + batched["bw"][0])
    separate_grads = gradients(model, separate["fw"] + separate["bw"])
    for a, b in zip(batched_grads, separate_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_legacy_flip_bw_uses_its_own_mask():
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=40, depth=1, width=16, max_seq_len=16, bw_mask="legacy-flip"))
    windows = torch.randint(0, 40, (2, 17))
    stats = task_stats(model, windows, ("fw", "bw"))
    torch.testing.assert_close(stats["bw"][0], separate_losses(model, windows)["bw"])


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_outputs(tmp_path, tiny_data):
    summary = train(tiny_config(), tmp_path / "run", data=tiny_data, progress=False)
    run = tmp_path / "run"
    assert TrainConfig.load(run / "config.json") == tiny_config()
    metrics = read_metrics(run)
    assert len(metrics) >= 5
    assert [m["step"] for m in metrics] == sorted({m["step"] for m in metrics})
    for key in ("step", "tokens", "epoch", "fw_loss", "bw_loss", "fw_acc", "bw_acc", "fw_ppl", "bw_ppl", "train_loss", "seconds", "p_bw"):
        assert key in metrics[-1]
    assert metrics[-1]["tokens"] >= 12_000
    assert {m["p_bw"] for m in metrics} == {0.5}  # fixed without adaptive_p_bw
    saved = json.loads((run / "summary.json").read_text())
    assert saved == summary
    assert saved["final_val_loss_fw"] == metrics[-1]["fw_loss"]
    assert saved["leaks_labels"] is False and saved["probe_leak_bw"] is False
    assert saved["num_params"] > 0
    assert (run / "model.safetensors").stat().st_size > 0
    assert metrics[-1]["fw_loss"] < metrics[0]["fw_loss"] - 0.3, "the model should learn the repeated stream"
    assert not list(run.rglob("*.tmp"))


def test_same_seed_same_metrics_different_seed_different(tmp_path, tiny_data):
    runs = [
        read_metrics_after(train(tiny_config(seed=seed), tmp_path / name, data=tiny_data, progress=False), tmp_path / name)
        for name, seed in (("a", 100), ("b", 100), ("c", 101))
    ]
    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]
    assert strip(runs[0]) == strip(runs[1])
    assert strip(runs[0]) != strip(runs[2])


def read_metrics_after(_summary, run_dir):
    return read_metrics(run_dir)


@pytest.mark.parametrize("overrides", [{}, dict(adaptive_p_bw=True, bw_mode="either")], ids=["fixed", "adaptive"])
def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, tiny_data, overrides):
    config = tiny_config(**overrides)
    train(config, tmp_path / "whole", data=tiny_data, progress=False)

    class Crash(Exception):
        pass

    class CrashingTrainer(Trainer):
        def train_step(self, directions=None):
            if self.state.step == 11:  # between checkpoints (every 4 steps), after an eval point
                raise Crash
            return super().train_step(directions)

    with pytest.raises(Crash):
        CrashingTrainer(config, tmp_path / "resumed", data=tiny_data, progress=False).run()
    assert not (tmp_path / "resumed" / "summary.json").exists()
    train(config, tmp_path / "resumed", data=tiny_data, progress=False)

    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]
    assert strip(read_metrics(tmp_path / "resumed")) == strip(read_metrics(tmp_path / "whole"))
    p_bws = {m["p_bw"] for m in read_metrics(tmp_path / "whole")}
    assert len(p_bws) > 1 if config.adaptive_p_bw else p_bws == {config.p_bw}


def test_bw_mode_either_and_p_bw_zero(tmp_path, tiny_data):
    trainer = Trainer(tiny_config(p_bw=0.0), tmp_path / "fw", data=tiny_data, progress=False)
    assert {trainer._directions() for _ in range(200)} == {("fw",)}
    trainer = Trainer(tiny_config(p_bw=0.3, bw_mode="either"), tmp_path / "either", data=tiny_data, progress=False)
    picks = [trainer._directions() for _ in range(2000)]
    assert set(picks) == {("fw",), ("bw",)}
    assert picks.count(("bw",)) / len(picks) == pytest.approx(0.3, abs=0.04)
    trainer = Trainer(tiny_config(p_bw=1.0), tmp_path / "add", data=tiny_data, progress=False)
    assert {trainer._directions() for _ in range(50)} == {("fw", "bw")}


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(width=100), "width"),
        (dict(p_bw=1.5), "p_bw"),
        (dict(p_bw=-0.1), "p_bw"),
        (dict(depth=0), "depth"),
        (dict(data="no-such-corpus"), "data"),
        (dict(tokenizer="bpe:12"), "tokenizer"),
        (dict(bw_mode="both"), "bw_mode"),
        (dict(bw_mask="flip"), "bw_mask"),
        (dict(epochs=0), "epochs"),
    ],
)
def test_bad_config_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        tiny_config(**overrides)


def test_unknown_field_in_saved_config_is_rejected():
    with pytest.raises(ConfigError, match="^nonsense: "):
        TrainConfig.from_dict({"nonsense": 1})


def test_adapted_p_bw_is_the_perplexity_ratio_clamped_to_a_hundredth_and_one():
    assert adapted_p_bw(fw_loss=2.0, bw_loss=1.5) == math.exp(-0.5) == 0.6065306597126334
    assert adapted_p_bw(fw_loss=3.0, bw_loss=3.0) == 1.0
    assert adapted_p_bw(fw_loss=1.0, bw_loss=4.0) == 1.0  # ratio e^3, clamped at 1
    assert adapted_p_bw(fw_loss=9.0, bw_loss=1.0) == 0.01  # ratio e^-8 = 0.000335, clamped at 0.01
    assert adapted_p_bw(fw_loss=1.0, bw_loss=900.0) == 1.0  # no overflow


def test_adaptive_p_bw_moves_after_bw_passes_only(tmp_path, tiny_data):
    trainer = Trainer(tiny_config(p_bw=0.5, adaptive_p_bw=True, bw_mode="either"), tmp_path / "run", data=tiny_data, progress=False)
    track = trainer._track_task_losses
    track({"bw": 2.0})  # no fw loss yet: nothing to compare with
    assert (trainer.state.p_bw, trainer.state.last_fw_loss) == (0.5, None)
    track({"fw": 3.0})
    assert (trainer.state.p_bw, trainer.state.last_fw_loss) == (0.5, 3.0)
    track({"bw": 2.5})  # either: the most recent fw loss
    assert trainer.state.p_bw == math.exp(-0.5)
    track({"bw": 3.5})
    assert trainer.state.p_bw == 1.0
    track({"fw": 7.0, "bw": 2.0})  # add: this step's fw loss; ratio e^-5 = 0.0067
    assert (trainer.state.p_bw, trainer.state.last_fw_loss) == (0.01, 7.0)


def test_adaptive_p_bw_uses_the_steps_mean_task_losses(tmp_path, tiny_data):
    trainer = Trainer(tiny_config(p_bw=0.5, adaptive_p_bw=True), tmp_path / "run", data=tiny_data, progress=False)
    seen = []
    track = trainer._track_task_losses
    trainer._track_task_losses = lambda losses: (seen.append(losses), track(losses))
    mean = trainer.train_step(("fw", "bw"))
    ((losses),) = seen
    assert set(losses) == {"fw", "bw"} and mean == pytest.approx((losses["fw"] + losses["bw"]) / 2, rel=1e-12)
    assert trainer.state.p_bw == adapted_p_bw(losses["fw"], losses["bw"])
    assert trainer.state.p_bw == pytest.approx(min(1.0, math.exp(losses["bw"]) / math.exp(losses["fw"])), rel=1e-12)


def test_fixed_p_bw_never_moves(tmp_path, tiny_data):
    trainer = Trainer(tiny_config(p_bw=0.5), tmp_path / "run", data=tiny_data, progress=False)
    trainer._track_task_losses({"fw": 9.0, "bw": 1.0})
    assert (trainer.state.p_bw, trainer.state.last_fw_loss) == (0.5, 9.0)


def test_p_bw_one_with_bw_mode_either_trains_bw_only(tmp_path, tiny_data):
    trainer = Trainer(tiny_config(p_bw=1.0, bw_mode="either"), tmp_path / "run", data=tiny_data, progress=False)
    assert {trainer._directions() for _ in range(200)} == {("bw",)}
    trained = []
    track = trainer._track_task_losses
    trainer._track_task_losses = lambda losses: (trained.append(tuple(losses)), track(losses))
    for _ in range(5):
        trainer.train_step()
    assert trained == [("bw",)] * 5 and trainer.state.last_fw_loss is None


def test_train_state_starts_at_the_configured_p_bw(tmp_path, tiny_data):
    trainer = Trainer(tiny_config(p_bw=0.25), tmp_path / "run", data=tiny_data, progress=False)
    assert trainer.state == TrainState(p_bw=0.25)


def test_training_applies_the_allocator_setting(tmp_path, tiny_data, monkeypatch):
    calls = []
    monkeypatch.setattr(trainer_module, "tune_allocator", lambda: calls.append("tuned") or True)
    Trainer(tiny_config(), tmp_path / "run", data=tiny_data, progress=False)
    assert calls == ["tuned"]


def test_trainer_starts_from_the_run_setup_that_cut_uses(tmp_path, tiny_data):
    config = tiny_config()
    setup = RunSetup(config, tiny_data, progress=False)
    trainer = Trainer(config, tmp_path / "run", data=tiny_data, progress=False)
    assert isinstance(trainer, RunSetup)
    assert (trainer.device, trainer.dtype) == (setup.device, setup.dtype) == (torch.device("cpu"), "fp32")
    assert torch.equal(trainer.valid, setup.valid)
    for a, b in zip(trainer.model.state_dict().values(), setup.model.state_dict().values()):
        assert torch.equal(a, b)


def test_cut_loads_the_trained_weights_into_the_run_setup(tmp_path, tiny_data, monkeypatch):
    run = tmp_path / "run"
    train(tiny_config(depth=2), run, data=tiny_data, progress=False)
    monkeypatch.setattr(run_setup, "load_token_data", lambda *args, **kwargs: tiny_data)
    rows = cut_run(run, progress=False)
    trained = checkpoint.load_model(run)
    valid = RunSetup(tiny_config(depth=2), tiny_data).valid
    assert rows == [{"blocks_remaining": 1, "metrics": evaluate(trained.truncated(1), valid, eval_batch_size(valid))}]
    assert json.loads((run / "cut.json").read_text()) == rows


def test_fwbw_cut_of_a_depth_one_run_fails_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(tiny_config(depth=1).to_dict()))
    assert main(["cut", str(run), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error == f"fwbw cut: error: {run}: nothing to cut, the model has 1 block and the cut keeps at least one\n"
    assert [path.name for path in run.iterdir()] == ["config.json"]


def test_fwbw_cut_of_an_unfinished_run_fails_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    assert main(["cut", str(run), "--no-progress"]) == 2
    assert capsys.readouterr().err == f"fwbw cut: error: {run}: no trained model (model.safetensors): has the run finished?\n"
    assert [path.name for path in run.iterdir()] == ["config.json"]
