"""`fwbw sweep --dry-run`'s expected wall time on this machine: the data-constrained grid, the
estimate's arithmetic against the trainer's own step and evaluation counts, and a real timing."""

import dataclasses
import math
import os

import pytest
import torch
from conftest import base_config, tiny_config

from fwbw.study import estimate
from fwbw.study.configure import build_sweep_spec
from fwbw.study.estimate import (
    MachineTimer,
    ShapeTiming,
    eval_count,
    run_seconds,
    step_count,
)
from fwbw.study.sweep import (
    describe_runs,
    estimated_split_tokens,
    estimated_train_tokens,
    run_id,
)
from fwbw.training.config import RecipeConfig
from fwbw.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("cache_env", "one_thread")

FAKE = ShapeTiming(fw_step_s=0.1, fwbw_step_s=0.2, eval_s=1.0, measured=True)
# 16 epochs of wiki-sample's ~1,190,000 training tokens, 2048 tokens a step: 9296.875 -> 9297 steps,
# an evaluation at each of the 32 half epochs, the last at the last step
DC_STEPS, DC_EVALS = 9297, 32
DC_SECONDS = {0.0: 9297 * 0.1 + 32, 0.05: 9297 * (0.95 * 0.1 + 0.05 * 0.2) + 32, 0.25: 9297 * (0.75 * 0.1 + 0.25 * 0.2) + 32}
TOTAL_LINE = ("expected on this machine (cpu, 1 thread, load average 1.5; 1 shape timed over 2+5 steps each of fw "
              "and fw+bw): 3.5 h in one process; `--shard i/n` splits the runs over n processes (faster with cores "
              "or devices to spare)")


class FakeTimer:
    def __init__(self, timing: ShapeTiming):
        self.timing = timing
        self.calls = 0

    def __call__(self, config) -> ShapeTiming:
        self.calls += 1
        return self.timing


@pytest.fixture
def steady_load(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 1.0, 1.0))


def data_constrained(**overrides):
    return build_sweep_spec("data-constrained", None, overrides)


def test_the_data_constrained_grid():
    spec = data_constrained()
    configs = spec.configs()
    assert len(configs) == 12
    assert sorted((c.p_bw, c.seed) for c in configs) == [(p, s) for p in (0.0, 0.05, 0.25) for s in range(100, 104)]
    for config in configs:
        assert (config.depth, config.width, config.seq_len, config.epochs) == (2, 128, 128, 16.0)
        assert (config.data, config.tokenizer, config.bw_mode, config.adaptive_p_bw) == ("wiki-sample", "bpe:8192", "add", False)
        assert (config.eval_every_epochs, config.eval_tokens, config.train_eval_tokens) == (0.5, 65_536, 32_768)
        assert (config.recipe.tokens_per_microbatch, config.recipe.dynamic_microbatch) == (2048, False)


def test_data_constrained_estimate_with_a_fake_timer(steady_load):
    spec = data_constrained(device="cpu")
    timer = FakeTimer(FAKE)
    lines = describe_runs(spec, timer).splitlines()
    assert timer.calls == 1  # one shape, timed once for its 12 runs
    expected_ends = {0.0: "16.0 min", 0.05: "16.8 min", 0.25: "19.9 min"}
    for line, config in zip(lines, spec.configs()):
        budget, split = estimated_train_tokens(config), estimated_split_tokens(config)
        assert (budget, split) == (19_040_000, 1_190_000)
        assert (step_count(config, budget), eval_count(config, budget, split)) == (DC_STEPS, DC_EVALS)
        assert run_seconds(config, FAKE, budget, split) == pytest.approx(DC_SECONDS[config.p_bw], rel=1e-12)
        assert line.startswith(run_id(config)) and line.endswith(f"FLOP  {expected_ends[config.p_bw]}")
    assert 4 * sum(DC_SECONDS.values()) == pytest.approx(12_656.04)  # 3.5 h
    assert lines[-2].startswith("12 runs, ")
    assert lines[-1] == TOTAL_LINE
    assert len(lines) == 14


def test_bounds_are_marked(steady_load):
    spec = data_constrained(device="cpu", p_bw=[0.0, 0.25], seeds=1, adaptive_p_bw=True)
    lines = describe_runs(spec, FakeTimer(FAKE)).splitlines()
    assert lines[0].endswith("FLOP  16.0 min")  # p_bw 0 never adapts
    assert lines[1].endswith("FLOP  <=31.5 min")  # 9297 fw+bw steps, 0.2 s each, and 32 evaluations: 1891.4 s
    assert "; <= for adaptive p_bw: taken at its bound 1): <=47.6 min in one process" in lines[-1]
    at_peak = dataclasses.replace(FAKE, measured=False)
    lines = describe_runs(data_constrained(device="cpu", seeds=1), FakeTimer(at_peak)).splitlines()
    assert all(">=" in line for line in lines[:3])
    assert "; >= for 1 shape not timed (too slow or out of memory): FLOPs at the measured matmul peak): >=52.7 min" in lines[-1]
    assert "timed over" not in lines[-1]


@pytest.mark.parametrize("eval_every, evals", [(0.02, 7), (0.005, 20), (0.032, 4)])
def test_step_and_eval_counts_match_the_trainer(tmp_path, tiny_data, eval_every, evals):
    """20 steps of 256 tokens over a 40,000-token split: an evaluation every 800 tokens (6 passed,
    and one after the last step), every step (an interval under a step), or every 5 steps."""
    recipe = RecipeConfig(tokens_per_microbatch=256, dynamic_microbatch=False, lr_scale=0.02)
    config = tiny_config(depth=1, width=16, seq_len=16, p_bw=0.0, train_tokens=5000, eval_every_epochs=eval_every,
                         eval_tokens=512, device="cpu", recipe=recipe)
    summary = Trainer(config, tmp_path / "run", data=tiny_data, progress=False).run()
    split = len(tiny_data.train)
    assert (step_count(config, 5000), eval_count(config, 5000, split)) == (summary["steps"], evals) == (20, evals)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == evals


def test_a_tiny_shape_is_timed_for_real(corpus):
    config = base_config(corpus, train_eval_tokens=512)
    timing = MachineTimer()(config)
    assert timing.measured
    for seconds in (timing.fw_step_s, timing.fwbw_step_s, timing.eval_s):
        assert 0 < seconds < 5 and math.isfinite(seconds)


def test_a_shape_too_slow_to_time_falls_back_to_its_flops(corpus, monkeypatch):
    def refuse(*args):
        raise AssertionError("a shape too slow to time was timed")

    monkeypatch.setattr(estimate, "measure_shape", refuse)
    config = base_config(corpus)
    timing = MachineTimer(max_step_s=0.0)(config)
    assert not timing.measured
    assert timing.fwbw_step_s == 2 * timing.fw_step_s > 0
    assert timing.eval_s > 0


def test_no_estimate_without_the_runs_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    timer = FakeTimer(FAKE)
    lines = describe_runs(data_constrained(device="cuda", seeds=1), timer).splitlines()
    assert timer.calls == 0
    assert all(line.endswith(" FLOP") for line in lines[:3])
    assert lines[-1] == "expected on this machine: not estimated (device: 'cuda' was requested but no CUDA device is available)"


def test_a_budget_that_early_stopping_may_cut_is_an_upper_bound(steady_load):
    spec = data_constrained(device="cpu", p_bw=[0.0], seeds=1, patience=4)
    lines = describe_runs(spec, FakeTimer(FAKE)).splitlines()
    assert "; <= for runs with early stopping: taken at their budget cap): <=16.0 min in one process" in lines[-1]
