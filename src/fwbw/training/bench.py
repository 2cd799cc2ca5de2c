"""`fwbw bench`: how fast this device trains the model.

Measures, in one process: the peak square-matmul throughput in fp32 and bf16, then for each
model shape the full training step (forward, task loss, backward, AdamW step, zero_grad) for
fw-only and fw+bw (p_bw = 1) batches, with the model FLOPs utilisation of the fw-only step.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fwbw.model.config import ModelConfig
from fwbw.model.hlb_gpt import build_model, count_params, training_flops_per_token
from fwbw.model.tasks import task_stats, window_length
from fwbw.training.config import RecipeConfig
from fwbw.training.precision import DTYPES, autocast, resolve_device, resolve_dtype
from fwbw.training.recipe import build_optimizer, dynamic_weight_decay, set_weight_decay

MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}
MATMUL_WARMUP = 2
MATMUL_REPEATS = 5


@dataclass(frozen=True)
class BenchConfig:
    """A model shape to time; each step trains on tokens_per_step data tokens
    (cuda_tokens_per_step on CUDA, where larger batches are needed to fill the device)."""

    name: str
    width: int
    depth: int
    vocab: int
    seq_len: int
    tokens_per_step: int
    cuda_tokens_per_step: int | None = None

    def batch(self, device: torch.device) -> int:
        tokens = self.tokens_per_step
        if device.type == "cuda" and self.cuda_tokens_per_step is not None:
            tokens = self.cuda_tokens_per_step
        return max(1, tokens // self.seq_len)

    def model_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab, depth=self.depth, width=self.width, max_seq_len=self.seq_len)


STANDARD_CONFIGS = [
    BenchConfig("small", width=128, depth=4, vocab=8192, seq_len=128, tokens_per_step=8192, cuda_tokens_per_step=32768),
    BenchConfig(
        "hlb-default", width=384, depth=8, vocab=50304, seq_len=256, tokens_per_step=4096, cuda_tokens_per_step=8192
    ),
]


def select_configs(names: list[str] | None) -> list[BenchConfig]:
    """The standard configs with these names, in the order given (all of them for None or [])."""
    if not names:
        return list(STANDARD_CONFIGS)
    by_name = {config.name: config for config in STANDARD_CONFIGS}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise ValueError(f"unknown bench config(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    return [by_name[name] for name in names]


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Seconds per call of fn, warm-up calls excluded."""
    times = []
    for _ in range(warmup + repeats):
        start = _clock(device)
        fn()
        times.append(_clock(device) - start)
    return times[warmup:]


def peak_matmul_gflops(device: torch.device, dtype: str) -> float:
    """Best GFLOP/s (2 n^3 / t) of n x n matmuls in this dtype."""
    size = MATMUL_SIZE.get(device.type, MATMUL_SIZE["cpu"])
    a, b = (torch.randn(size, size, device=device, dtype=DTYPES[dtype]) for _ in range(2))
    best = min(_timed(lambda: torch.mm(a, b), device, MATMUL_REPEATS, MATMUL_WARMUP))
    return 2 * size**3 / best / 1e9


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    windows: torch.Tensor,
    directions: tuple[str, ...],
    device: torch.device,
    dtype: str,
) -> None:
    """One training step as the trainer takes it (one microbatch, no accuracy)."""
    with autocast(device, dtype):
        stats = task_stats(model, windows, directions, accuracy=False)
        loss = sum(stats[direction][0] for direction in directions)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_config(
    config: BenchConfig, device: torch.device, dtype: str, peak_gflops: float, steps: int, warmup: int, progress: bool
) -> dict:
    """Median fw-only and fw+bw training-step times of one model shape, as one result row."""
    model_config = config.model_config()
    recipe = RecipeConfig()
    torch.manual_seed(0)
    model = build_model(model_config).to(device)
    optimizer, _ = build_optimizer(model, recipe)
    num_params = count_params(model_config)
    # the trainer's dynamic weight decay at the initial loss ln(vocab), so AdamW does its decay too
    set_weight_decay(optimizer, dynamic_weight_decay(math.log(config.vocab), num_params, recipe))
    batch = config.batch(device)
    windows = torch.randint(0, config.vocab, (batch, window_length(config.seq_len, False)), device=device)
    if progress:
        print(f"bench: {config.name} fw and fw+bw ({dtype}, batch {batch}, {warmup}+{steps} steps)", file=sys.stderr)
    modes = {"fw": ("fw",), "fwbw": ("fw", "bw")}
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(warmup + steps):  # interleaved, so drifts in machine speed hit both alike
        for mode, directions in modes.items():
            start = _clock(device)
            train_step(model, optimizer, windows, directions, device, dtype)
            times[mode].append(_clock(device) - start)
    timed = {mode: values[warmup:] for mode, values in times.items()}
    step_s = {mode: statistics.median(values) for mode, values in timed.items()}
    pair_ratio = statistics.median(b / f for f, b in zip(timed["fw"], timed["fwbw"]))
    tokens = batch * config.seq_len
    flops_per_token = training_flops_per_token(model_config, config.seq_len)
    return {
        "name": config.name,
        "width": config.width,
        "depth": config.depth,
        "vocab": config.vocab,
        "seq_len": config.seq_len,
        "batch": batch,
        "params": num_params,
        "dtype": dtype,
        "fw_tokens_per_s": tokens / step_s["fw"],
        "fwbw_tokens_per_s": tokens / step_s["fwbw"],
        "fwbw_over_fw_step_time": pair_ratio,
        "mfu_fw": flops_per_token * tokens / step_s["fw"] / (peak_gflops * 1e9),
        "mfu_fwbw": 2 * flops_per_token * tokens / step_s["fwbw"] / (peak_gflops * 1e9),
        "fw_step_ms": 1e3 * step_s["fw"],
        "fwbw_step_ms": 1e3 * step_s["fwbw"],
        "flops_per_token": flops_per_token,
    }


def run_bench(
    configs: list[BenchConfig] | None = None,
    device: str = "auto",
    dtype: str = "auto",
    steps: int = 6,
    warmup: int = 2,
    progress: bool = True,
) -> dict:
    """Peak matmul GFLOP/s and per-config training throughput on one device (JSON-serialisable).

    mfu_fw counts the model FLOPs of the fw-only step (`training_flops_per_token`) against the
    peak matmul throughput of the dtype in use; mfu_fwbw counts both directions' tokens."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"bench needs steps >= 1 and warmup >= 0, got steps {steps}, warmup {warmup}")
    torch_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, torch_device)
    if progress:
        print(f"bench: peak matmul on {torch_device}", file=sys.stderr)
    peaks = {name: peak_matmul_gflops(torch_device, name) for name in DTYPES}
    rows = []
    for config in STANDARD_CONFIGS if configs is None else configs:
        rows.append(bench_config(config, torch_device, resolved_dtype, peaks[resolved_dtype], steps, warmup, progress))
        if torch_device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "device": str(torch_device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "peak_gflops": peaks,
        "configs": rows,
    }


COLUMNS = (
    ("config", "name", "{}"),
    ("width", "width", "{}"),
    ("depth", "depth", "{}"),
    ("vocab", "vocab", "{}"),
    ("seq", "seq_len", "{}"),
    ("batch", "batch", "{}"),
    ("dtype", "dtype", "{}"),
    ("fw tok/s", "fw_tokens_per_s", "{:.0f}"),
    ("fw+bw tok/s", "fwbw_tokens_per_s", "{:.0f}"),
    ("fw ms", "fw_step_ms", "{:.1f}"),
    ("fw+bw ms", "fwbw_step_ms", "{:.1f}"),
    ("fwbw/fw", "fwbw_over_fw_step_time", "{:.2f}"),
    ("MFU fw", "mfu_fw", "{:.1%}"),
)


def format_table(result: dict) -> str:
    """A fixed-width table: device and matmul peaks, then one row per config."""
    peaks = result["peak_gflops"]
    header = [
        f"device {result['device']}  torch {result['torch']}  threads {result['threads']}",
        f"peak matmul GFLOP/s: fp32 {peaks['fp32']:.0f}  bf16 {peaks['bf16']:.0f}",
    ]
    cells = [[title for title, _, _ in COLUMNS]]
    cells += [[fmt.format(row[key]) for _, key, fmt in COLUMNS] for row in result["configs"]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in cells
    ]
    return "\n".join(header + lines)
