"""How long a sweep's runs take on this machine, for `fwbw sweep --dry-run`.

Each distinct run shape (model, sequence length, microbatch, evaluation sets, device, dtype) is
timed once with the trainer's own step on random tokens (fwbw.training.bench): fw-only and fw+bw
steps, and one evaluation of its validation and training-subset windows. A shape whose fw+bw step
could take over MAX_TIMED_STEP_S (its FLOPs at LOW_MFU of the device's measured matmul peak) is
not timed: its times are its FLOPs at that peak, a lower bound. A run's seconds are its steps
times its mean step time plus its evaluations times one evaluation's; what follows training (the
layer cut, the samples) is not counted.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fwbw.data.tokenizer import vocab_size_of
from fwbw.model.hlb_gpt import training_flops_per_token
from fwbw.model.tasks import window_length
from fwbw.training.bench import (
    peak_matmul_gflops,
    random_data_trainer,
    time_train_steps,
    timed,
)
from fwbw.training.config import TrainConfig
from fwbw.training.evaluation import eval_batch_size, evaluate
from fwbw.training.precision import resolve_device, resolve_dtype
from fwbw.training.recipe import batch_size_for
from fwbw.training.trainer import Trainer

WARMUP_STEPS = 2  # untimed steps of each kind before the timed ones
TIMED_STEPS = 5
MAX_TIMED_STEP_S = 20.0  # a shape whose fw+bw step may take longer is not timed
# a pessimistic model FLOPs utilisation, to guess a step's time before timing it: small models on
# CPU reach ~5-10% of the bf16 matmul peak (`fwbw bench`)
LOW_MFU = 0.05
CPU_PEAK_MATMUL_SIZE = 1024  # on CPU as fast as bench's 2048 to within ~10%, in an eighth of the time


@dataclass(frozen=True)
class ShapeTiming:
    """Seconds of one fw-only step, one fw+bw step and one evaluation (validation and
    training-subset windows) of a run shape; measured, or FLOPs at the matmul peak."""

    fw_step_s: float
    fwbw_step_s: float
    eval_s: float
    measured: bool


ShapeTimer = Callable[[TrainConfig], ShapeTiming]


def shape_key(config: TrainConfig) -> tuple:
    """What a run's step and evaluation times depend on: runs with the same key differ only in
    their task mix, seed and budget."""
    model = config.model_config(vocab_size_of(config.tokenizer))
    recipe = config.recipe
    return (model, config.seq_len, recipe.tokens_per_microbatch, recipe.accum_initial,
            config.eval_tokens, config.train_eval_tokens, config.device, config.dtype)


def microbatches_per_step(config: TrainConfig) -> float:
    """The trainer draws floor(a) or floor(a) + 1 microbatches a step, a on average, from an
    estimate a that starts at accum_initial; with dynamic microbatching a then follows the
    gradient norm, which cannot be known in advance: it is assumed to stay at accum_initial."""
    return config.recipe.accum_initial


def tokens_per_step(config: TrainConfig) -> float:
    """Data tokens of one optimizer step at the full sequence length."""
    return microbatches_per_step(config) * batch_size_for(config.seq_len, config.recipe) * config.seq_len


def step_count(config: TrainConfig, budget: int) -> int:
    """Optimizer steps until the trainer's token count reaches the budget."""
    return math.ceil(budget / tokens_per_step(config))


def eval_count(config: TrainConfig, budget: int, split_tokens: float) -> int:
    """How often the trainer evaluates: at the first step that reaches each multiple of
    eval_every_epochs (once however many it passes), and after the last step unless it just did."""
    steps, step_tokens = step_count(config, budget), tokens_per_step(config)
    interval = config.eval_every_epochs * split_tokens
    passed = math.floor(steps * step_tokens / interval)
    last_step_evaluates = passed > math.floor((steps - 1) * step_tokens / interval)
    return min(steps, passed) + (0 if last_step_evaluates else 1)


def p_bw_at_bound(config: TrainConfig) -> bool:
    """Whether the run's share of fw+bw steps is unknown in advance: adaptive p_bw (moving within
    [0.01, 1] from a start above 0) under bw_mode add."""
    return config.bw_mode == "add" and config.adaptive_p_bw and config.p_bw > 0


def bw_share(config: TrainConfig) -> float:
    """The share of steps that train fw+bw: p_bw under bw_mode add (its upper bound 1 when
    p_bw_at_bound); none under "either", where every step trains one task."""
    if config.bw_mode == "either":
        return 0.0
    return 1.0 if p_bw_at_bound(config) else config.p_bw


def run_seconds(config: TrainConfig, timing: ShapeTiming, budget: int, split_tokens: float) -> float:
    """steps x ((1 - p) t_fw + p t_fwbw) + evaluations x t_eval, p = bw_share."""
    share = bw_share(config)
    step_s = (1 - share) * timing.fw_step_s + share * timing.fwbw_step_s
    return step_count(config, budget) * step_s + eval_count(config, budget, split_tokens) * timing.eval_s


def eval_targets(config: TrainConfig) -> int:
    """Target tokens of one evaluation, assuming the validation split holds eval_tokens."""
    window = window_length(config.seq_len, config.task_tokens)
    return (config.eval_tokens // window + config.train_eval_tokens // window) * config.seq_len


def flop_timing(config: TrainConfig, peak_gflops: float) -> ShapeTiming:
    """A shape's times if its model FLOPs ran at the matmul peak (a lower bound); an evaluation
    is the forward pass, a third of training_flops_per_token, in both directions."""
    per_token = training_flops_per_token(config.model_config(vocab_size_of(config.tokenizer)), config.seq_len)
    flops_per_s = peak_gflops * 1e9
    fw_step_s = per_token * tokens_per_step(config) / flops_per_s
    return ShapeTiming(fw_step_s, 2 * fw_step_s, 2 * per_token / 3 * eval_targets(config) / flops_per_s, measured=False)


def timing_config(config: TrainConfig) -> TrainConfig:
    """`config` at its full sequence length from the first step, with its microbatches per step
    fixed at the assumed number (microbatches_per_step) and a budget of one pass over whatever
    training split it is given."""
    recipe = dataclasses.replace(config.recipe, seq_len_initial=config.seq_len, dynamic_microbatch=False)
    return dataclasses.replace(config, recipe=recipe, train_tokens=None, epochs=1.0)


def evaluation_seconds(trainer: Trainer) -> float:
    """One evaluation as the trainer runs it, over its validation windows and its training-subset
    windows if any (windows of one length, so batches of one size): the first batch timed, then
    scaled to all the windows."""
    batch_size = eval_batch_size(trainer.valid)
    batch = trainer.valid[:batch_size]
    seconds = timed(lambda: evaluate(trainer.model, batch, batch_size, trainer.precision()), trainer.device, 1, 0)[0]
    windows = len(trainer.valid) + (0 if trainer.train_eval is None else len(trainer.train_eval))
    return seconds * windows / len(batch)


def measure_shape(config: TrainConfig, steps: int = TIMED_STEPS, warmup: int = WARMUP_STEPS) -> ShapeTiming:
    """Median fw-only and fw+bw step times and one evaluation's time of the run's shape, trained
    on random tokens of its vocabulary (its corpus is never loaded)."""
    window = window_length(config.seq_len, config.task_tokens)
    train_tokens = max(batch_size_for(config.seq_len, config.recipe) * window, config.train_eval_tokens)
    with tempfile.TemporaryDirectory() as folder:
        trainer = random_data_trainer(timing_config(config), vocab_size_of(config.tokenizer), train_tokens,
                                      config.eval_tokens, Path(folder) / "run")
        times = time_train_steps(trainer, steps, warmup)
        eval_s = evaluation_seconds(trainer)
    return ShapeTiming(statistics.median(times["fw"]), statistics.median(times["fwbw"]), eval_s, measured=True)


class MachineTimer:
    """A ShapeTimer for this machine: a run's shape measured (measure_shape), unless its fw+bw
    step could take over max_step_s (at LOW_MFU of the measured matmul peak) or the device runs
    out of memory: then its FLOPs at that peak."""

    def __init__(self, max_step_s: float = MAX_TIMED_STEP_S):
        self.max_step_s = max_step_s
        self._peaks: dict[tuple[torch.device, str], float] = {}

    def __call__(self, config: TrainConfig) -> ShapeTiming:
        at_peak = flop_timing(config, self._peak(resolve_device(config.device), resolve_dtype(config.dtype)))
        if at_peak.fwbw_step_s / LOW_MFU > self.max_step_s:
            return at_peak
        try:
            return measure_shape(config)
        except torch.cuda.OutOfMemoryError:
            pass
        torch.cuda.empty_cache()  # outside the except clause, whose traceback holds the tensors
        return at_peak

    def _peak(self, device: torch.device, dtype: str) -> float:
        if (device, dtype) not in self._peaks:
            size = CPU_PEAK_MATMUL_SIZE if device.type == "cpu" else None
            self._peaks[device, dtype] = peak_matmul_gflops(device, dtype, size)
        return self._peaks[device, dtype]


def machine_name(device: str) -> str:
    """The device a sweep's runs would train on here: the GPU's name, or the CPU's thread count
    and load (other processes slow the measured steps down)."""
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        return torch.cuda.get_device_name(resolved)
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"cpu, {plural(torch.get_num_threads(), 'thread')}{load}"


def short_duration(seconds: float) -> str:
    """Seconds below 90 s, minutes below 90 min, else hours (to 0.1 h below 100 h)."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    hours = seconds / 3600
    return f"{hours:.1f} h" if hours < 100 else f"{hours:.0f} h"


def bound_mark(lower: bool, upper: bool) -> str:
    """'>=' before a lower bound, '<=' before an upper bound, '~' before a sum of both."""
    return "~" if lower and upper else ">=" if lower else "<=" if upper else ""


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def device_problem(configs: list[TrainConfig]) -> str | None:
    """Why this machine cannot train on the runs' device (CUDA requested, none here), or None."""
    for device in sorted({config.device for config in configs}):
        try:
            resolve_device(device)
        except RuntimeError as error:
            return str(error)
    return None


class SweepTimes:
    """The expected wall time of a sweep's runs on this machine, each run shape (shape_key) timed
    once by time_shape; none where this machine lacks the runs' device."""

    def __init__(self, configs: list[TrainConfig], time_shape: ShapeTimer):
        self.configs = configs
        self.time_shape = time_shape
        self.problem = device_problem(configs)
        self.timings: dict[tuple, ShapeTiming] = {}
        self.total_s = 0.0

    def run_text(self, config: TrainConfig, budget: int, split_tokens: float) -> str:
        """'  ' and the run's expected time, marked if a bound, added to the total ('' without
        the device)."""
        if self.problem:
            return ""
        key = shape_key(config)
        if key not in self.timings:
            self.timings[key] = self.time_shape(config)
        timing = self.timings[key]
        seconds = run_seconds(config, timing, budget, split_tokens)
        self.total_s += seconds
        return f"  {bound_mark(not timing.measured, p_bw_at_bound(config))}{short_duration(seconds)}"

    def total_line(self) -> str:
        """The total of the runs so far, with how it was found and what it assumes."""
        if self.problem:
            return f"expected on this machine: not estimated ({self.problem})"
        unmeasured = sum(not timing.measured for timing in self.timings.values())
        how = [machine_name(self.configs[0].device)]
        if unmeasured < len(self.timings):
            timed_shapes = plural(len(self.timings) - unmeasured, "shape")
            how.append(f"{timed_shapes} timed over {WARMUP_STEPS}+{TIMED_STEPS} steps each of fw and fw+bw")
        if unmeasured:
            how.append(f">= for {plural(unmeasured, 'shape')} not timed (too slow or out of memory): FLOPs at the "
                       "measured matmul peak")
        dynamic = sorted({microbatches_per_step(config) for config in self.configs if config.recipe.dynamic_microbatch})
        if dynamic:
            how.append(f"dynamic microbatching assumed to stay at {'/'.join(f'{n:g}' for n in dynamic)} microbatch per step")
        adaptive = any(p_bw_at_bound(config) for config in self.configs)
        if adaptive:
            how.append("<= for adaptive p_bw: taken at its bound 1")
        stopping = any(config.patience is not None for config in self.configs)
        if stopping:
            how.append("<= for runs with early stopping: taken at their budget cap")
        total = f"{bound_mark(unmeasured > 0, adaptive or stopping)}{short_duration(self.total_s)}"
        return (f"expected on this machine ({'; '.join(how)}): {total} in one process; `--shard i/n` splits the runs "
                "over n processes (faster with cores or devices to spare)")
