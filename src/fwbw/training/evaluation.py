"""Validation of both tasks on a fixed window set and the layer-cut sweep."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from fwbw.files import atomic_write_json
from fwbw.model.masks import DIRECTIONS
from fwbw.model.tasks import task_stats
from fwbw.training import checkpoint
from fwbw.training.config import TrainConfig
from fwbw.training.data_parallel import SINGLE_PROCESS, DataParallel
from fwbw.training.run_dir import CONFIG, CUT, check_fence, check_writable, finished_run_config
from fwbw.training.run_setup import RunSetup

EVAL_METRICS = ("loss", "acc", "ppl")  # what `evaluate` reports per direction
EVAL_BATCH_TOKENS = 16384


def eval_batch_size(windows: torch.Tensor) -> int:
    return max(1, EVAL_BATCH_TOKENS // windows.shape[1])


@torch.no_grad()
def evaluate(
    model,
    windows: torch.Tensor,
    batch_size: int,
    precision: contextlib.AbstractContextManager | None = None,
    parallel: DataParallel = SINGLE_PROCESS,
    directions: tuple[str, ...] = DIRECTIONS,
) -> dict[str, dict[str, float]]:
    """{direction: {loss, acc, ppl}} over every target of every window (token-weighted); with
    several ranks, each evaluates its share of the windows and the sums are reduced."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(2, len(directions), dtype=torch.float64)  # loss x windows, correct targets
    for batch in parallel.share(windows).split(batch_size):
        with precision or contextlib.nullcontext():
            stats = task_stats(model, batch.to(device), directions)
        for column, direction in enumerate(directions):
            loss, hits = stats[direction]
            sums[:, column] += torch.tensor([loss.item() * len(batch), hits.item()], dtype=torch.float64)
    model.train(was_training)
    loss_sums, correct = parallel.all_reduce_sum(sums)
    targets_per_window = windows.shape[1] - (0 if model.config.task_tokens else 1)
    total = len(windows) * targets_per_window
    metrics = {}
    for column, direction in enumerate(directions):
        loss = loss_sums[column].item() / len(windows)
        metrics[direction] = {"loss": loss, "acc": int(correct[column].item()) / total, "ppl": math.exp(min(loss, 80.0))}
    return metrics


def layer_cut(
    model,
    windows: torch.Tensor,
    batch_size: int,
    precision: contextlib.AbstractContextManager | None = None,
    parallel: DataParallel = SINGLE_PROCESS,
) -> list[dict]:
    """Evaluate with blocks removed one at a time from the back: depth-1 blocks down to 1."""
    return [
        {"blocks_remaining": n, "metrics": evaluate(model.truncated(n), windows, batch_size, precision, parallel)}
        for n in range(model.config.depth - 1, 0, -1)
    ]


def write_cut(
    run_dir: Path, model, windows: torch.Tensor, precision=None, parallel: DataParallel = SINGLE_PROCESS
) -> list[dict]:
    """Run the layer cut on a trained model and save it as the run's cut.json (rank 0 writes, while
    it holds the run's lease: check_fence)."""
    rows = layer_cut(model, windows, eval_batch_size(windows), precision, parallel)
    if parallel.is_main:
        check_fence(run_dir)
        atomic_write_json(Path(run_dir) / CUT, rows)
    return rows


def cut_run(run_dir: Path, progress: bool = True) -> list[dict]:
    """`fwbw cut`: the layer cut of a finished run: its trained weights in its run setup, on the
    validation windows it was trained with. Everything is checked before the model is built."""
    run_dir = Path(run_dir)
    config = TrainConfig.load(run_dir / CONFIG) if (run_dir / CONFIG).is_file() else None
    if config is not None and config.depth < 2:  # said first: no training would make it cuttable
        raise ValueError(f"{run_dir}: nothing to cut, the model has {config.depth} block and the cut keeps at least one")
    config = finished_run_config(run_dir)
    check_writable(run_dir, f"cannot write {run_dir / CUT}: ")
    setup = RunSetup(config, progress=progress)
    checkpoint.load_weights(run_dir, setup.model)
    return write_cut(run_dir, setup.model, setup.valid, setup.precision())
