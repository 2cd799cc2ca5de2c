"""The fw and bw prediction tasks: which inputs predict which targets, and their losses.

A window w holds the tokens of one example.
- Without task tokens, len(w) = T + 1:
  fw: inputs w[:-1], targets w[1:]   (position t predicts w[t+1] from w[:t+1])
  bw: inputs w[1:],  targets w[:-1]  (position t predicts w[t] from w[t+1:])
- With task tokens (UL2-style), len(w) = T: the fw token goes before the text, the bw token after:
  fw: inputs [FW] + w[:-1], targets w
  bw: inputs w[1:] + [BW],  targets w
Since the model has no absolute positions, bw-causal over x equals fw-causal over x reversed, so
for the causal bw mask both tasks run as one fw pass over [fw inputs; reversed bw inputs] with
the bw targets reversed to match.
"""

from __future__ import annotations

import torch

from fwbw.model.config import ModelConfig
from fwbw.model.losses import linear_cross_entropy


def window_length(seq_len: int, task_tokens: bool) -> int:
    return seq_len if task_tokens else seq_len + 1


def task_batch(windows: torch.Tensor, direction: str, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both [B, T], for one direction."""
    if not config.task_tokens:
        if direction == "fw":
            return windows[:, :-1], windows[:, 1:]
        return windows[:, 1:], windows[:, :-1]
    marker = torch.full_like(windows[:, :1], config.fw_token_id if direction == "fw" else config.bw_token_id)
    if direction == "fw":
        return torch.cat([marker, windows[:, :-1]], dim=1), windows
    return torch.cat([windows[:, 1:], marker], dim=1), windows


def task_hidden(
    model, windows: torch.Tensor, directions: tuple[str, ...], counted_windows: torch.Tensor | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{direction: (final hidden states [B, T, width], targets [B, T])} for the given tasks on
    the same windows, row b belonging to window b; causal bw comes in reversed position order.
    counted_windows: the batch `windows` is a share of, whose token frequencies scale the
    embedding's gradient (HlbGpt.embed; default `windows`).

    fw and causal bw share one batched forward pass; legacy-flip bw needs its own mask."""
    config = model.config
    counted_windows = windows if counted_windows is None else counted_windows
    batched = [d for d in directions if d == "fw" or config.bw_mask == "causal"]
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if batched:
        pairs = [task_batch(windows, d, config) for d in batched]
        inputs = torch.cat([x if d == "fw" else x.flip(1) for d, (x, _) in zip(batched, pairs)])
        counted = torch.cat([task_batch(counted_windows, d, config)[0] for d in batched])
        targets = [y if d == "fw" else y.flip(1) for d, (_, y) in zip(batched, pairs)]
        hidden = model.hidden(inputs, "fw", embedding_groups=len(batched), counted=counted).chunk(len(batched))
        results.update(zip(batched, zip(hidden, targets)))
    if "bw" in directions and "bw" not in results:
        inputs, targets = task_batch(windows, "bw", config)
        results["bw"] = model.hidden(inputs, "bw", counted=task_batch(counted_windows, "bw", config)[0]), targets
    return results


def task_stats(
    model, windows: torch.Tensor, directions: tuple[str, ...], accuracy: bool = True,
    counted_windows: torch.Tensor | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """{direction: (mean loss, correct count or None)} for the given tasks on the same windows
    (counted_windows: see task_hidden)."""
    weight = model.output.weight
    return {
        direction: linear_cross_entropy(hidden, weight, targets, accuracy)
        for direction, (hidden, targets) in task_hidden(model, windows, directions, counted_windows).items()
    }
