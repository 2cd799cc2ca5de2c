"""Each hlb-gpt recipe mechanism (docs/method.md#the-recipe) against its formula."""

import math

import pytest
import torch

from fwbw import ModelConfig, build_model
from fwbw.training.config import RecipeConfig
from fwbw.training.recipe import (
    Microbatching,
    base_lr,
    batch_size_for,
    build_optimizer,
    dynamic_weight_decay,
    grad_norm_target,
    group_of,
    seq_len_at,
    set_weight_decay,
)

RECIPE = RecipeConfig()


def tiny_model():
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=64, depth=2, width=16, max_seq_len=32))


def test_base_lr_formula():
    assert base_lr(46_000_000, RECIPE) == pytest.approx(9e7 / math.log(46e6) ** 8.8)
    assert 5e-4 < base_lr(46_000_000, RECIPE) < 2e-3


def test_parameter_groups_match_hlb_gpt_names():
    assert group_of("blocks.0.position_bias_mult") == "position_bias"
    assert group_of("output.weight") == "output"
    assert group_of("embedding.weight") == "non_decay"
    assert group_of("blocks.3.norm.weight") == "non_decay"
    assert group_of("norm.weight") == "non_decay"
    assert group_of("blocks.0.expand") == "decay"
    assert group_of("blocks.0.project") == "decay"


def test_optimizer_groups_lrs_and_betas():
    model = tiny_model()
    optimizer, _ = build_optimizer(model, RECIPE)
    groups = {g["name"]: g for g in optimizer.param_groups}
    lr = 2.62 * base_lr(model.num_params(), RECIPE)
    assert groups["decay"]["initial_lr"] == pytest.approx(lr)
    assert groups["position_bias"]["initial_lr"] == pytest.approx(100 * lr)
    assert groups["non_decay"]["initial_lr"] == pytest.approx(32 * lr)
    assert groups["output"]["initial_lr"] == pytest.approx(2 * lr)
    assert tuple(groups["output"]["betas"]) == (0.6, 0.95)
    assert tuple(groups["decay"]["betas"]) == (0.9, 0.95)
    assert optimizer.defaults["eps"] == 1e-9
    counted = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert counted == model.num_params()
    assert len(groups["position_bias"]["params"]) == 2


def lrs_after(steps: int) -> dict[str, float]:
    model = tiny_model()
    optimizer, scheduler = build_optimizer(model, RECIPE)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return {g["name"]: g["lr"] / g["initial_lr"] for g in optimizer.param_groups}


@pytest.mark.parametrize("step", [0, 50, 100, 250])
def test_schedules(step):
    factors = lrs_after(step)
    warm = 0.02 + 0.98 * step / 100 if step < 100 else (step + 1 - 100) ** -0.08
    assert factors["decay"] == pytest.approx(warm)
    assert factors["non_decay"] == pytest.approx(warm)
    assert factors["position_bias"] == pytest.approx(0.995**step)
    assert factors["output"] == pytest.approx((step + 1) ** -0.2)


def test_dynamic_weight_decay_of_a_diverged_loss_is_its_limit_0():
    assert dynamic_weight_decay(1e6, 10_000, RECIPE) == 0.0  # B ** loss overflows a float


def test_dynamic_weight_decay_formula_and_group():
    n = 2_500_000
    b = 0.007 * (0.01 * math.log(n)) ** -4
    assert dynamic_weight_decay(4.0, n, RECIPE) == pytest.approx(16 / b**4.0)
    assert dynamic_weight_decay(3.0, n, RECIPE) > dynamic_weight_decay(4.0, n, RECIPE)
    optimizer, _ = build_optimizer(tiny_model(), RECIPE)
    set_weight_decay(optimizer, 0.123)
    decays = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decays == {"decay": 0.123, "position_bias": 0.0, "non_decay": 0.0, "output": 0.0}


def test_sequence_length_growth_keeps_tokens_per_microbatch():
    lengths = [seq_len_at(step, 256, RECIPE) for step in (0, 79, 80, 160, 240, 320, 10_000)]
    assert lengths == [32, 32, 64, 128, 256, 256, 256]
    assert [batch_size_for(n, RECIPE) for n in (32, 64, 256)] == [256, 128, 32]
    assert batch_size_for(16384, RECIPE) == 1


def test_microbatching_follows_grad_norm():
    n = 1_000_000
    target = grad_norm_target(10, n, RECIPE)
    assert target == pytest.approx((math.log(n) * n * 10.01) ** (-0.677 * math.log(n) ** -0.2))
    noisy = Microbatching(n, RECIPE)
    noisy.update(10, 3 * target * math.sqrt(n))  # per-param norm 3x target: accumulate 2x more
    assert noisy.estimate == pytest.approx(1 + 0.5 * (3 - 1))
    quiet = Microbatching(n, RECIPE)
    for _ in range(20):
        quiet.update(10, 0.0)
    assert quiet.estimate == pytest.approx(0.1)
    capped = Microbatching(n, RECIPE)
    for _ in range(20):
        capped.update(10, 1e6)
    assert capped.estimate == 16.0
    fixed = Microbatching(n, RecipeConfig(dynamic_microbatch=False))
    fixed.update(10, 100.0)
    assert fixed.estimate == 1.0


def test_microbatch_draw_is_integer_part_plus_bernoulli():
    micro = Microbatching(1000, RECIPE)
    micro.estimate = 2.3
    generator = torch.Generator().manual_seed(0)
    draws = [micro.draw(generator) for _ in range(4000)]
    assert set(draws) == {2, 3}
    assert sum(draws) / len(draws) == pytest.approx(2.3, abs=0.03)
    micro.estimate = 0.1
    assert {micro.draw(generator) for _ in range(100)} == {1}
