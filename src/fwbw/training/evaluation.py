"""Validation of both tasks on a fixed window set, the layer-cut sweep, and the leak probe."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from fwbw.files import atomic_write_json
from fwbw.model.tasks import task_stats

DIRECTIONS = ("fw", "bw")
EVAL_BATCH_TOKENS = 16384


def eval_batch_size(windows: torch.Tensor) -> int:
    return max(1, EVAL_BATCH_TOKENS // windows.shape[1])


@torch.no_grad()
def evaluate(
    model,
    windows: torch.Tensor,
    batch_size: int,
    precision: contextlib.AbstractContextManager | None = None,
) -> dict[str, dict[str, float]]:
    """{direction: {loss, acc, ppl}} over every target of every window (token-weighted)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum = dict.fromkeys(DIRECTIONS, 0.0)
    correct = dict.fromkeys(DIRECTIONS, 0)
    for batch in windows.split(batch_size):
        with precision or contextlib.nullcontext():
            stats = task_stats(model, batch.to(device), DIRECTIONS)
        for direction, (loss, hits) in stats.items():
            loss_sum[direction] += loss.item() * len(batch)
            correct[direction] += int(hits.item())
    model.train(was_training)
    targets_per_window = windows.shape[1] - (0 if model.config.task_tokens else 1)
    total = len(windows) * targets_per_window
    metrics = {}
    for direction in DIRECTIONS:
        loss = loss_sum[direction] / len(windows)
        metrics[direction] = {"loss": loss, "acc": correct[direction] / total, "ppl": math.exp(min(loss, 80.0))}
    return metrics


def layer_cut(
    model,
    windows: torch.Tensor,
    batch_size: int,
    precision: contextlib.AbstractContextManager | None = None,
) -> list[dict]:
    """Evaluate with blocks removed one at a time from the back: depth-1 blocks down to 1."""
    return [
        {"blocks_remaining": n, "metrics": evaluate(model.truncated(n), windows, batch_size, precision)}
        for n in range(model.config.depth - 1, 0, -1)
    ]


def write_cut(run_dir: Path, model, windows: torch.Tensor, precision=None) -> list[dict]:
    """Run the layer cut on a trained model and save it as the run's cut.json."""
    rows = layer_cut(model, windows, eval_batch_size(windows), precision)
    atomic_write_json(Path(run_dir) / "cut.json", rows)
    return rows


def cut_run(run_dir: Path, progress: bool = True) -> list[dict]:
    """`fwbw cut`: the layer cut of a finished run, on the validation windows it was trained with."""
    from fwbw.data.corpora import load_token_data
    from fwbw.data.windows import validation_set
    from fwbw.training.checkpoint import load_model
    from fwbw.training.config import TrainConfig
    from fwbw.training.precision import autocast, resolve_device, resolve_dtype

    config = TrainConfig.load(Path(run_dir) / "config.json")
    device = resolve_device(config.device)
    model = load_model(run_dir, device)
    windows = validation_set(config, load_token_data(config.data, config.tokenizer, progress=progress).valid)
    return write_cut(run_dir, model, windows, autocast(device, resolve_dtype(config.dtype, device)))


@torch.no_grad()
def leak_probe(model, direction: str, seq_len: int = 16, trials: int = 3, seed: int = 0) -> bool:
    """Whether any logit of `direction` changes when a token it must not see is perturbed.

    fw position t may see tokens[:t+1]; bw position t may see tokens[t:]. For each trial and
    each position j, token j is replaced and every logit that must not depend on it is compared."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    seq_len = min(seq_len, model.config.max_seq_len)
    generator = torch.Generator().manual_seed(seed)
    leaked = False
    for _ in range(trials):
        tokens = torch.randint(0, vocab, (1, seq_len), generator=generator)
        perturbed = tokens.repeat(seq_len, 1)
        positions = torch.arange(seq_len)
        perturbed[positions, positions] = (tokens[0] + 1 + torch.randint(0, vocab - 1, (seq_len,), generator=generator)) % vocab
        base = model(tokens.to(device), direction).float()
        changed = (model(perturbed.to(device), direction).float() - base).abs().amax(dim=-1)
        rows, cols = torch.meshgrid(positions, positions, indexing="ij")
        forbidden = (cols > rows) if direction == "fw" else (cols < rows)
        # changed[j, t]: logits at t after perturbing token j; forbidden when t may not see j.
        leaked |= bool((changed.cpu()[forbidden.T] > 1e-4).any())
    model.train(was_training)
    return leaked
