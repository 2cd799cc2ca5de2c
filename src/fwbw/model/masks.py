"""Attention masks and distance biases for the forward and backward tasks.

Every builder returns a boolean `allowed[i, j]` (query i may attend to key j) and a signed
distance `dist[i, j]` that is <= 0 wherever attention is allowed; a block turns them into the
additive bias `where(allowed, softplus(m) * dist, -inf)` (hlb-gpt's learned linear bias).

- fw: causal, i attends to j <= i, dist = j - i.
- bw (causal): i attends to j >= i, dist = i - j = -|i - j|, the mirror image of fw.
- legacy-flip: the study's bw mask, `tril(ones(T, T)).flip(0)` with the fw distance matrix
  flipped along its rows. Row i admits keys 0..T-1-i, which contains the bw target of row i
  for 1 <= i <= T/2. Row 0 sees every key and every row sees key 0, so from the second block
  on every position can read every token, its target included. It leaks labels and exists
  only to demonstrate that.
"""

from __future__ import annotations

import torch

DIRECTIONS = ("fw", "bw")
BW_MASKS = ("causal", "legacy-flip")


def _signed_offsets(seq_len: int, device: torch.device | None) -> torch.Tensor:
    """offsets[i, j] = j - i."""
    positions = torch.arange(seq_len, device=device)
    return positions[None, :] - positions[:, None]


def mask_and_distance(
    seq_len: int, direction: str, bw_mask: str = "causal", device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(allowed, dist) for one direction; see the module docstring."""
    offsets = _signed_offsets(seq_len, device)
    if direction == "fw":
        return offsets <= 0, offsets.float()
    if direction != "bw":
        raise ValueError(f"direction: expected one of {DIRECTIONS}, got {direction!r}")
    if bw_mask == "causal":
        return offsets >= 0, (-offsets).float()
    if bw_mask == "legacy-flip":
        return (offsets <= 0).flip(0), offsets.flip(0).float()
    raise ValueError(f"bw_mask: expected one of {BW_MASKS}, got {bw_mask!r}")


def leaks_labels(bw_mask: str) -> bool:
    """Whether training the bw task with this mask lets a position see its own target."""
    return bw_mask == "legacy-flip"
