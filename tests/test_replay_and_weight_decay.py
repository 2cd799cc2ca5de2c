"""Replay (WindowSampler.replay and config.replay), the weight decay's variants (wd_constant,
wd_loss, wd_scale), the later fields' config checks and eval_bw."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import read_metrics, tiny_config, without_seconds

from fwbw.data.windows import WindowSampler
from fwbw.schema import ConfigError
from fwbw.training import trainer as trainer_module
from fwbw.training.config import RecipeConfig, TrainConfig
from fwbw.training.recipe import dynamic_weight_decay
from fwbw.training.trainer import Trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")


def small_config(**overrides) -> TrainConfig:
    """tiny_config at a fixed two microbatches of 512 tokens per step (no grad-norm steering, so
    that runs whose gradients differ still draw the same number of windows)."""
    recipe = dict(tokens_per_microbatch=512, seq_len_growth_steps=4, lr_scale=0.02, dynamic_microbatch=False,
                  accum_initial=2.0)
    recipe = RecipeConfig(**{**recipe, **overrides.pop("recipe", {})})
    return tiny_config(**{"recipe": recipe, "train_tokens": 6144, **overrides})


def decay_group(trainer: Trainer) -> dict:
    (group,) = [g for g in trainer.optimizer.param_groups if g["name"] == "decay"]
    return group


# --- WindowSampler.replay ----------------------------------------------------------------------


def rows(starts, length: int) -> list[list[int]]:
    return [list(range(s, s + length)) for s in starts]


def test_replay_draws_only_windows_drawn_before():
    tokens = np.arange(100, dtype=np.uint16)
    sampler = WindowSampler(tokens, seed=5, remember=True)
    first = sampler.sample(4, 10)
    second = sampler.sample(3, 10)
    generator = torch.Generator().manual_seed(5)
    drawn = torch.cat([torch.randint(0, 91, (4,), generator=generator), torch.randint(0, 91, (3,), generator=generator)])
    assert first.tolist() == rows(drawn[:4].tolist(), 10) and second.tolist() == rows(drawn[4:].tolist(), 10)
    state_before = sampler.generator.get_state()

    replayed = sampler.replay(6, 10, torch.Generator().manual_seed(9))
    picks = torch.randint(0, 7, (6,), generator=torch.Generator().manual_seed(9))
    assert replayed.tolist() == rows(drawn[picks].tolist(), 10)
    assert set(replayed[:, 0].tolist()) <= set(drawn.tolist())
    assert torch.equal(sampler.generator.get_state(), state_before)  # replay leaves the main draws alone
    assert torch.equal(torch.cat(sampler.seen[10]), drawn)  # nor does it count as drawn

    # windows of another length were never trained on: nothing of that length to replay
    with pytest.raises(RuntimeError, match="no window of length 20 has been drawn yet"):
        sampler.replay(5, 20, torch.Generator())
    sampler.sample(2, 20)
    assert set(sampler.replay(9, 20, torch.Generator().manual_seed(3))[:, 0].tolist()) <= set(torch.cat(sampler.seen[20]).tolist())


def test_replay_refuses_before_any_draw_and_without_remember():
    tokens = np.arange(50, dtype=np.uint16)
    with pytest.raises(RuntimeError, match="nothing to replay"):
        WindowSampler(tokens, seed=0, remember=True).replay(2, 8, torch.Generator())
    forgetful = WindowSampler(tokens, seed=0)
    forgetful.sample(2, 8)
    assert forgetful.seen == {}
    with pytest.raises(RuntimeError, match="nothing to replay"):
        forgetful.replay(2, 8, torch.Generator())


def test_sampler_state_keeps_the_remembered_starts():
    tokens = np.arange(100, dtype=np.uint16)
    sampler = WindowSampler(tokens, seed=1, remember=True)
    for _ in range(3):
        sampler.sample(2, 10)
    copy = WindowSampler(tokens, seed=7, remember=True)
    copy.load_state_dict(sampler.state_dict())
    assert torch.equal(torch.cat(copy.seen[10]), torch.cat(sampler.seen[10]))
    assert torch.equal(copy.replay(5, 10, torch.Generator().manual_seed(2)),
                       sampler.replay(5, 10, torch.Generator().manual_seed(2)))
    assert torch.equal(copy.sample(3, 10), sampler.sample(3, 10))


# --- replay in training ------------------------------------------------------------------------


class Spy:
    """Records the trainer's sampler draws, task draws and task_stats calls."""

    def __init__(self, monkeypatch):
        self.samples: list[torch.Tensor] = []
        self.replays: list[torch.Tensor] = []
        self.directions: list[tuple[str, ...]] = []
        self.calls: list[dict] = []
        real_sample, real_replay = WindowSampler.sample, WindowSampler.replay
        real_directions, real_stats = Trainer._directions, trainer_module.task_stats

        def sample(sampler, batch_size, length):
            windows = real_sample(sampler, batch_size, length)
            self.samples.append(windows)
            return windows

        def replay(sampler, batch_size, length, generator):
            windows = real_replay(sampler, batch_size, length, generator)
            self.replays.append(windows)
            return windows

        def directions(trainer):
            picked = real_directions(trainer)
            self.directions.append(picked)
            return picked

        def task_stats(model, windows, directions, **kwargs):
            stats = real_stats(model, windows, directions, **kwargs)
            self.calls.append({"windows": windows.clone(), "directions": tuple(directions),
                               "losses": [float(stats[d][0].detach()) for d in directions]})
            return stats

        monkeypatch.setattr(WindowSampler, "sample", sample)
        monkeypatch.setattr(WindowSampler, "replay", replay)
        monkeypatch.setattr(Trainer, "_directions", directions)
        monkeypatch.setattr(trainer_module, "task_stats", task_stats)


def spied_steps(tmp_path, data, monkeypatch, steps: int, directions=None, **overrides):
    with monkeypatch.context() as patch:
        spy = Spy(patch)
        trainer = Trainer(small_config(**overrides), tmp_path, data=data, progress=False)
        losses = [trainer.train_step(directions) for _ in range(steps)]
    return trainer, spy, losses


def test_replay_leaves_the_main_windows_and_task_draws_as_they_were(tmp_path, tiny_data, monkeypatch):
    plain, plain_spy, _ = spied_steps(tmp_path / "plain", tiny_data, monkeypatch, 8, p_bw=0.5)
    replay, replay_spy, _ = spied_steps(tmp_path / "replay", tiny_data, monkeypatch, 8, p_bw=0.5, replay=True)
    assert len(plain_spy.samples) == len(replay_spy.samples) == 16  # 8 steps of 2 microbatches
    for a, b in zip(plain_spy.samples, replay_spy.samples):
        assert torch.equal(a, b)
    assert plain_spy.directions == replay_spy.directions and set(plain_spy.directions) == {("fw",), ("fw", "bw")}
    assert torch.equal(plain.task_rng.get_state(), replay.task_rng.get_state())
    assert torch.equal(plain.sampler.generator.get_state(), replay.sampler.generator.get_state())
    assert plain_spy.replays == [] and len(replay_spy.replays) == 16
    # every replayed window is one of the same length drawn at an earlier step (at the first step of a
    # length, when there is none, one of that step's own)
    for index, windows in enumerate(replay_spy.replays):
        step = index // 2
        earlier = [batch for batch in replay_spy.samples[: step * 2] if batch.shape[1] == windows.shape[1]]
        pool = earlier or replay_spy.samples[step * 2: step * 2 + 2]
        assert {tuple(row) for row in windows.tolist()} <= {tuple(row) for batch in pool for row in batch.tolist()}
        assert earlier or step == 0 or replay_spy.samples[step * 2 - 1].shape[1] != windows.shape[1]
    # the runs differ only by the replay's training
    assert any(not torch.equal(a, b) for a, b in zip(plain.model.parameters(), replay.model.parameters()))


def test_replay_adds_a_fw_term_to_the_step_loss(tmp_path, tiny_data, monkeypatch):
    trainer, spy, losses = spied_steps(tmp_path, tiny_data, monkeypatch, 3, p_bw=0.0, replay=True,
                                   recipe=dict(accum_initial=1.0))
    assert [call["directions"] for call in spy.calls] == [("fw",)] * 6  # main, then replayed, every step
    for step, loss in enumerate(losses):
        main, replayed = spy.calls[2 * step], spy.calls[2 * step + 1]
        assert torch.equal(main["windows"], spy.samples[step])
        assert torch.equal(replayed["windows"], spy.replays[step])
        assert loss == pytest.approx((main["losses"][0] + replayed["losses"][0]) / 2, rel=1e-12)
    assert trainer.state.last_fw_loss == pytest.approx(spy.calls[-2]["losses"][0], rel=1e-12)  # the main fw loss


@pytest.mark.parametrize(
    "overrides, calls",
    [
        (dict(p_bw=1.0), [("fw", "bw")]),
        (dict(p_bw=0.0, replay=True), [("fw",), ("fw",)]),
        (dict(p_bw=1.0, replay=True), [("fw", "bw"), ("fw",)]),
        (dict(p_bw=0.0), [("fw",)]),
    ],
)
def test_replay_costs_what_a_bw_pass_costs(tmp_path, tiny_data, monkeypatch, overrides, calls):
    _, spy, _ = spied_steps(tmp_path, tiny_data, monkeypatch, 2, recipe=dict(accum_initial=1.0), **overrides)
    assert [call["directions"] for call in spy.calls] == calls * 2
    sizes = {call["windows"].shape for call in spy.calls}
    assert len(sizes) == 1  # every pass on a full microbatch


@pytest.mark.parametrize("changes", [dict(replay=True), dict(dropout=0.3)], ids=["replay", "dropout"])
def test_a_run_with_its_own_random_draws_resumes_as_an_uninterrupted_one(tmp_path, tiny_data, changes):
    """Replay's generator and, for dropout, torch's global one are checkpointed."""
    config = small_config(p_bw=0.5, checkpoint_every_steps=2, **changes)
    train(config, tmp_path / "whole", data=tiny_data, progress=False)

    class Crash(Exception):
        pass

    class CrashingTrainer(Trainer):
        def train_step(self, directions=None):
            if self.state.step == 3:  # resumed from the checkpoint of step 2
                raise Crash
            return super().train_step(directions)

    with pytest.raises(Crash):
        CrashingTrainer(config, tmp_path / "resumed", data=tiny_data, progress=False).run()
    train(config, tmp_path / "resumed", data=tiny_data, progress=False)
    assert without_seconds(read_metrics(tmp_path / "resumed")) == without_seconds(read_metrics(tmp_path / "whole"))


# --- weight decay ------------------------------------------------------------------------------


def test_wd_constant_is_set_from_the_first_step_and_never_changes(tmp_path, tiny_data):
    trainer = Trainer(small_config(wd_constant=0.25, wd_scale=3.0), tmp_path / "run", data=tiny_data, progress=False)
    assert decay_group(trainer)["weight_decay"] == 0.75 == trainer.state.weight_decay
    assert {g["name"]: g["weight_decay"] for g in trainer.optimizer.param_groups if g["name"] != "decay"} == {
        g["name"]: 0.0 for g in trainer.optimizer.param_groups if g["name"] != "decay"}
    for directions in (("fw",), ("fw", "bw"), ("bw",)):
        trainer.train_step(directions)
        assert decay_group(trainer)["weight_decay"] == 0.75 == trainer.state.weight_decay
    summary = Trainer(small_config(wd_constant=0.25, wd_scale=3.0), tmp_path / "full", data=tiny_data, progress=False).run()
    assert {record["weight_decay"] for record in read_metrics(tmp_path / "full")} == {0.75}
    assert summary["steps"] > 0


def test_dynamic_weight_decay_reads_the_mean_task_loss_by_default(tmp_path, tiny_data):
    trainer = Trainer(small_config(p_bw=0.5), tmp_path / "run", data=tiny_data, progress=False)
    assert decay_group(trainer)["weight_decay"] == 0.0 == trainer.state.weight_decay  # before the first step
    recipe = trainer.config.recipe
    for directions in (("fw", "bw"), ("fw",), ("bw",)):
        loss = trainer.train_step(directions)
        expected = dynamic_weight_decay(loss, trainer.num_params, recipe)
        assert trainer.state.weight_decay == expected == decay_group(trainer)["weight_decay"]
        assert expected > 0


def test_wd_loss_fw_reads_only_the_fw_loss(tmp_path, tiny_data):
    trainer = Trainer(small_config(p_bw=0.5, wd_loss="fw", wd_scale=0.5), tmp_path / "run", data=tiny_data, progress=False)
    recipe = trainer.config.recipe
    mean = trainer.train_step(("fw", "bw"))
    fw = trainer.state.last_fw_loss
    assert fw != mean
    expected = 0.5 * dynamic_weight_decay(fw, trainer.num_params, recipe)
    assert trainer.state.weight_decay == expected == decay_group(trainer)["weight_decay"]
    assert expected != 0.5 * dynamic_weight_decay(mean, trainer.num_params, recipe)
    trainer.train_step(("bw",))  # a step without fw keeps the last weight decay
    assert trainer.state.weight_decay == expected == decay_group(trainer)["weight_decay"]
    trainer.train_step(("fw",))
    assert trainer.state.weight_decay == 0.5 * dynamic_weight_decay(trainer.state.last_fw_loss, trainer.num_params, recipe)


def test_wd_scale_multiplies_the_dynamic_decay(tmp_path, tiny_data):
    decays = {}
    for scale in (1.0, 2.5):
        trainer = Trainer(small_config(wd_scale=scale), tmp_path / str(scale), data=tiny_data, progress=False)
        loss = trainer.train_step(("fw",))
        decays[scale] = trainer.state.weight_decay
        assert decays[scale] == scale * dynamic_weight_decay(loss, trainer.num_params, trainer.config.recipe)
    assert decays[2.5] == pytest.approx(2.5 * decays[1.0], rel=1e-12)  # the first step's loss is the same


def test_metrics_record_the_weight_decay_of_each_evaluation(tmp_path, tiny_data, monkeypatch):
    seen = []
    real_evaluate = Trainer._evaluate

    def evaluate(self):
        seen.append(decay_group(self)["weight_decay"])
        return real_evaluate(self)

    monkeypatch.setattr(Trainer, "_evaluate", evaluate)
    train(small_config(), tmp_path / "run", data=tiny_data, progress=False)
    recorded = [record["weight_decay"] for record in read_metrics(tmp_path / "run")]
    assert recorded == seen and len(set(recorded)) == len(recorded) > 1 and all(value > 0 for value in recorded)


# --- config checks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(wd_loss="fw", wd_constant=0.1), "wd_loss"),
        (dict(wd_loss="mean"), "wd_loss"),
        (dict(wd_constant=-0.1), "wd_constant"),
        (dict(wd_constant=math.inf), "wd_constant"),
        (dict(wd_scale=-1.0), "wd_scale"),
        (dict(wd_scale=math.inf), "wd_scale"),
        (dict(wd_scale=math.nan), "wd_scale"),
        (dict(eval_ema=0.0), "eval_ema"),
        (dict(eval_ema=1.0), "eval_ema"),
        (dict(eval_ema=-0.5), "eval_ema"),
        (dict(patience=0), "patience"),
        (dict(train_fraction=0.0), "train_fraction"),
        (dict(train_fraction=1.5), "train_fraction"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(threads=0), "threads"),
        (dict(subset_seed=-1), "subset_seed"),
    ],
)
def test_later_fields_are_checked(overrides, field):
    with pytest.raises(ConfigError) as error:
        tiny_config(**overrides)
    message = str(error.value)
    assert message.startswith(f"{field}: ") and "\n" not in message, message
    if "wd_constant" in overrides and field == "wd_loss":
        assert "wd_constant" in message


def test_later_fields_at_their_edges_are_accepted():
    tiny_config(wd_loss="fw", wd_scale=0.0, eval_ema=0.999, patience=1, train_fraction=1.0, dropout=0.0)
    tiny_config(wd_constant=0.0, train_fraction=1e-3, dropout=0.5, eval_bw=False, compile=False, threads=1)


# --- eval_bw -----------------------------------------------------------------------------------


def bw_keys(records: list[dict]) -> set[str]:
    return {key for record in records for key in record if key.startswith("bw_")}


@pytest.mark.parametrize(
    "overrides, evaluates_bw",
    [
        (dict(p_bw=0.0), False),
        (dict(p_bw=0.0, eval_bw=True), True),
        (dict(p_bw=0.5), True),
        (dict(p_bw=0.5, eval_bw=False), False),
    ],
)
def test_eval_bw(tmp_path, tiny_data, overrides, evaluates_bw):
    config = small_config(train_tokens=3072, **overrides)
    assert config.evaluates_bw() is evaluates_bw
    summary = train(config, tmp_path / "run", data=tiny_data, progress=False)
    records = read_metrics(tmp_path / "run")
    assert bw_keys(records) == ({"bw_loss", "bw_acc", "bw_ppl"} if evaluates_bw else set())
    assert all(record.keys() >= {"fw_loss", "fw_acc", "fw_ppl"} for record in records)
    assert (summary["final_val_loss_bw"] is not None) is evaluates_bw
    if evaluates_bw:
        assert all(math.isfinite(record["bw_loss"]) for record in records)
