"""The training loop: task construction, the batched fw+bw path, outputs, determinism, resume."""

import json

import pytest
import torch
from conftest import tiny_config

from fwbw import ModelConfig, build_model
from fwbw.model.tasks import task_batch, task_stats
from fwbw.schema import ConfigError
from fwbw.training.config import TrainConfig
from fwbw.training.trainer import Trainer, train


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
    for key in ("step", "tokens", "epoch", "fw_loss", "bw_loss", "fw_acc", "bw_acc", "fw_ppl", "bw_ppl", "train_loss", "seconds"):
        assert key in metrics[-1]
    assert metrics[-1]["tokens"] >= 12_000
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


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, tiny_data):
    config = tiny_config()
    train(config, tmp_path / "whole", data=tiny_data, progress=False)

    class Crash(Exception):
        pass

    class CrashingTrainer(Trainer):
        def train_step(self):
            if self.state.step == 11:  # between checkpoints (every 4 steps), after an eval point
                raise Crash
            return super().train_step()

    with pytest.raises(Crash):
        CrashingTrainer(config, tmp_path / "resumed", data=tiny_data, progress=False).run()
    assert not (tmp_path / "resumed" / "summary.json").exists()
    train(config, tmp_path / "resumed", data=tiny_data, progress=False)

    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]
    assert strip(read_metrics(tmp_path / "resumed")) == strip(read_metrics(tmp_path / "whole"))


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
