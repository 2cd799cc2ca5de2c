"""`fwbw bench`: how fast this device trains the model.

Measures, in one process: the peak square-matmul throughput in fp32 and bf16, then for each
model shape the trainer's own step (`Trainer.train_step`: forward, task loss, backward, AdamW
step, schedules) with its tasks forced to fw only and to fw+bw, with the model FLOPs utilisation
of the fw-only step. The trainer runs on random tokens with one fixed microbatch at the shape's
sequence length from the first step; its run directory is never written.
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fwbw.data.corpora import TOKEN_DTYPE, TokenData
from fwbw.model.hlb_gpt import training_flops_per_token
from fwbw.model.masks import DIRECTIONS
from fwbw.model.tasks import window_length
from fwbw.training.allocator import tune_allocator
from fwbw.training.config import RecipeConfig, TrainConfig
from fwbw.training.data_parallel import from_environment
from fwbw.training.precision import TORCH_DTYPES, resolve_device, resolve_dtype
from fwbw.training.trainer import Trainer, compile_by_default

MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}
MATMUL_WARMUP = 2
MATMUL_REPEATS = 5
MODES = {"fw": ("fw",), "fwbw": DIRECTIONS}  # the tasks of each timed step
# the bf16 dense (not sparse) tensor-core peak on each GPU's datasheet, in TFLOP/s, matched in this
# order as a part of torch.cuda.get_device_name (the PCIe and NVL cards run at lower clocks)
DATASHEET_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("A100", 312.0),
)


@dataclass(frozen=True)
class BenchShape:
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


STANDARD_SHAPES = [
    BenchShape("small", width=128, depth=4, vocab=8192, seq_len=128, tokens_per_step=8192, cuda_tokens_per_step=32768),
    BenchShape(
        "hlb-default", width=384, depth=8, vocab=50304, seq_len=256, tokens_per_step=4096, cuda_tokens_per_step=8192
    ),
]


def select_shapes(names: list[str] | None) -> list[BenchShape]:
    """The standard shapes with these names, in the order given (all of them for None or [])."""
    if not names:
        return list(STANDARD_SHAPES)
    by_name = {shape.name: shape for shape in STANDARD_SHAPES}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise ValueError(f"unknown bench shape(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    return [by_name[name] for name in names]


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Seconds per call of fn, warm-up calls excluded."""
    times = []
    for _ in range(warmup + repeats):
        start = _clock(device)
        fn()
        times.append(_clock(device) - start)
    return times[warmup:]


def peak_matmul_gflops(device: torch.device, dtype: str, size: int | None = None) -> float:
    """Best GFLOP/s (2 n^3 / t) of n x n matmuls in this dtype (n: MATMUL_SIZE for the device
    unless given)."""
    size = size or MATMUL_SIZE.get(device.type, MATMUL_SIZE["cpu"])
    a, b = (torch.randn(size, size, device=device, dtype=TORCH_DTYPES[dtype]) for _ in range(2))
    best = min(timed(lambda: torch.mm(a, b), device, MATMUL_REPEATS, MATMUL_WARMUP))
    return 2 * size**3 / best / 1e9


def datasheet_peak_gflops(device_name: str | None) -> float | None:
    """The datasheet bf16 dense peak of a known GPU (DATASHEET_BF16_TFLOPS) in GFLOP/s; None for
    any other device, the CPU (no name) included."""
    for model, tflops in DATASHEET_BF16_TFLOPS:
        if device_name is not None and model in device_name:
            return tflops * 1e3
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak_gflops: float, world_size: int = 1) -> float:
    """Model FLOPs utilisation of a run training tokens_per_s tokens over all its ranks, each
    rank a device of peak_gflops."""
    return flops_per_token * tokens_per_s / (peak_gflops * 1e9 * world_size)


def random_data_trainer(
    config: TrainConfig, vocab: int, train_tokens: int, valid_tokens: int, run_dir: Path, compile: bool | None = None
) -> Trainer:
    """A Trainer of `config` on uniformly random token ids below `vocab` (training and validation
    splits of these lengths) instead of its corpus, which is never loaded."""
    tokens = np.random.default_rng(0).integers(0, vocab, max(train_tokens, valid_tokens), dtype=TOKEN_DTYPE)
    data = TokenData(tokens[:train_tokens], tokens[:valid_tokens], vocab, corpus="random", tokenizer="none")
    return Trainer(config, run_dir, data=data, progress=False, compile=compile)


def bench_trainer(
    shape: BenchShape, batch: int, device: str, dtype: str, run_dir: Path, compile: bool | None = None
) -> Trainer:
    """A Trainer of this shape on random tokens: one microbatch of `batch` windows per step, at
    the full sequence length from step 0."""
    window = window_length(shape.seq_len, task_tokens=False)
    recipe = RecipeConfig(
        tokens_per_microbatch=batch * shape.seq_len, dynamic_microbatch=False, seq_len_initial=shape.seq_len
    )
    config = TrainConfig(
        depth=shape.depth, width=shape.width, seq_len=shape.seq_len, eval_tokens=window,
        device=device, dtype=dtype, recipe=recipe,
    )
    return random_data_trainer(config, shape.vocab, batch * window, window, run_dir, compile)


def time_train_steps(trainer: Trainer, steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each of `steps` Trainer.train_step calls with the tasks forced to each of MODES
    (after `warmup` untimed ones), the modes interleaved so that drifts in machine speed hit all
    alike."""
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(warmup + steps):
        for mode, directions in MODES.items():
            times[mode] += timed(lambda: trainer.train_step(directions), trainer.device, repeats=1, warmup=0)
    return {mode: values[warmup:] for mode, values in times.items()}


def bench_shape(
    shape: BenchShape, device: torch.device, dtype: str, peak_gflops: float, steps: int, warmup: int, progress: bool,
    datasheet_gflops: float | None = None, compile: bool | None = None,
) -> dict:
    """Median fw-only and fw+bw training-step times of one model shape, as one result row. The
    batch is the global one, each rank of a data-parallel trainer training its share, so the MFU
    divides its tokens' FLOP/s by the peak of all the ranks' devices."""
    batch = shape.batch(device)
    if progress:
        print(f"bench: {shape.name} fw and fw+bw ({dtype}, batch {batch}, {warmup}+{steps} steps)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as folder:
        trainer = bench_trainer(shape, batch, str(device), dtype, Path(folder) / "run", compile)
        times = time_train_steps(trainer, steps, warmup)
    step_s = {mode: statistics.median(values) for mode, values in times.items()}
    pair_ratio = statistics.median(b / f for f, b in zip(times["fw"], times["fwbw"]))
    tokens = batch * shape.seq_len
    flops_per_token = training_flops_per_token(trainer.model.config, shape.seq_len)
    world_size = trainer.parallel.world_size
    fw_tokens_per_s, fwbw_tokens_per_s = tokens / step_s["fw"], tokens / step_s["fwbw"]
    mfu_datasheet = (
        None if datasheet_gflops is None else mfu(flops_per_token, fw_tokens_per_s, datasheet_gflops, world_size)
    )
    return {
        "name": shape.name,
        "width": shape.width,
        "depth": shape.depth,
        "vocab": shape.vocab,
        "seq_len": shape.seq_len,
        "batch": batch,
        "params": trainer.num_params,
        "dtype": dtype,
        "world_size": world_size,
        "compiled": trainer.compiled,
        "fw_tokens_per_s": fw_tokens_per_s,
        "fwbw_tokens_per_s": fwbw_tokens_per_s,
        "fwbw_over_fw_step_time": pair_ratio,
        "mfu_fw": mfu(flops_per_token, fw_tokens_per_s, peak_gflops, world_size),
        "mfu_fwbw": mfu(2 * flops_per_token, fwbw_tokens_per_s, peak_gflops, world_size),
        "mfu_fw_datasheet": mfu_datasheet,
        "fw_step_ms": 1e3 * step_s["fw"],
        "fwbw_step_ms": 1e3 * step_s["fwbw"],
        "flops_per_token": flops_per_token,
    }


def run_bench(
    shapes: list[BenchShape] | None = None,
    device: str = "auto",
    dtype: str = "auto",
    steps: int = 6,
    warmup: int = 2,
    progress: bool = True,
    compile: bool | None = None,
) -> dict:
    """Peak matmul GFLOP/s and per-shape training throughput on one device, or under torchrun on
    each rank's device with the batch shared (JSON-serialisable). `compile`: see Trainer.

    mfu_fw counts the model FLOPs of the fw-only step (`training_flops_per_token`) against the
    peak matmul throughput of the dtype in use; mfu_fwbw counts both directions' tokens;
    mfu_fw_datasheet is mfu_fw against the datasheet peak of a known GPU in bf16 (None
    elsewhere)."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"bench needs steps >= 1 and warmup >= 0, got steps {steps}, warmup {warmup}")
    allocator_tuned = tune_allocator()
    parallel = from_environment(resolve_device(device).type)
    torch_device = resolve_device(device, parallel.local_rank)
    compile = compile_by_default(torch_device, math.inf) if compile is None else compile  # as a long run would
    if compile and warmup < 1:
        raise ValueError("bench --warmup 0 with --compile would time the compilation: give --warmup 1 or more")
    resolved_dtype = resolve_dtype(dtype)
    if progress:
        print(f"bench: peak matmul on {torch_device}", file=sys.stderr)
    peaks = {name: peak_matmul_gflops(torch_device, name) for name in TORCH_DTYPES}
    device_name = torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else None
    datasheet = datasheet_peak_gflops(device_name) if resolved_dtype == "bf16" else None
    rows = []
    for shape in STANDARD_SHAPES if shapes is None else shapes:
        rows.append(bench_shape(shape, torch_device, resolved_dtype, peaks[resolved_dtype], steps, warmup, progress,
                                datasheet, compile))
        if torch_device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "device": str(torch_device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "world_size": parallel.world_size,
        "allocator_tuned": allocator_tuned,
        "device_name": device_name,
        "peak_gflops": peaks,
        "datasheet_peak_gflops": datasheet,
        "configs": rows,
    }


COLUMNS = (
    ("shape", "name", "{}"),
    ("width", "width", "{}"),
    ("depth", "depth", "{}"),
    ("vocab", "vocab", "{}"),
    ("seq", "seq_len", "{}"),
    ("batch", "batch", "{}"),
    ("dtype", "dtype", "{}"),
    ("compiled", "compiled", "{}"),
    ("fw tok/s", "fw_tokens_per_s", "{:.0f}"),
    ("fw+bw tok/s", "fwbw_tokens_per_s", "{:.0f}"),
    ("fw ms", "fw_step_ms", "{:.1f}"),
    ("fw+bw ms", "fwbw_step_ms", "{:.1f}"),
    ("fwbw/fw", "fwbw_over_fw_step_time", "{:.2f}"),
    ("MFU fw", "mfu_fw", "{:.1%}"),
    ("MFU fw datasheet", "mfu_fw_datasheet", "{:.1%}"),
)


def _cell(value, fmt: str) -> str:
    """A table cell: the value formatted, or '-' where there is none (no datasheet peak)."""
    return "-" if value is None else fmt.format(value)


def format_table(result: dict) -> str:
    """A fixed-width table: device and matmul peaks, then one row per shape."""
    peaks = result["peak_gflops"]
    allocator = "tuned" if result["allocator_tuned"] else "as is"
    datasheet = result["datasheet_peak_gflops"]
    name = f" ({result['device_name']})" if result["device_name"] else ""
    header = [
        f"device {result['device']}{name}  processes {result['world_size']}  torch {result['torch']}"
        f"  threads {result['threads']}  malloc {allocator}",
        f"peak matmul GFLOP/s: fp32 {peaks['fp32']:.0f}  bf16 {peaks['bf16']:.0f}"
        + ("" if datasheet is None else f"  datasheet bf16 {datasheet:.0f}"),
    ]
    cells = [[title for title, _, _ in COLUMNS]]
    cells += [[_cell(row[key], fmt) for _, key, fmt in COLUMNS] for row in result["configs"]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in cells
    ]
    return "\n".join(header + lines)
