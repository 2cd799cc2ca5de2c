"""Attention masks and distance biases for the forward and backward tasks.

Every builder returns a boolean `allowed[i, j]` (query i may attend to key j) and a signed
distance `dist[i, j]`, <= 0 wherever attention is allowed; a block turns them into the additive
bias `where(allowed, softplus(m) * dist, -inf)` (hlb-gpt's learned linear bias).

- fw: causal, i attends to j <= i, dist = j - i.
- bw (causal): i attends to j >= i, dist = i - j = -|i - j|, the mirror image of fw.
- legacy-flip: the study's bw mask exactly as it ran (docs/method.md#the-bw-mask-defect). It
  builds its tables once at the maximum length M, `tril(ones(M, M)).flip(0)` and the fw distance
  table flipped along its rows, and slices `[:T, :T]` at the current length T. So
  allowed[i, j] = (i + j <= M - 1) and dist[i, j] = i + j - (M - 1): not a function of |i - j|,
  it grows towards later keys, so each row leans on its last admitted key. For T <= M/2 the
  slice admits every key (a fully bidirectional bw task); at T = M row i admits keys
  0..T-1-i, which contain its bw target for 1 <= i <= T/2. Either way the bw task leaks its
  labels (through two blocks, every row reads every token); it exists only to show that.
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
    seq_len: int,
    direction: str,
    bw_mask: str = "causal",
    max_seq_len: int | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(allowed, dist), both [seq_len, seq_len], for one direction; see the module docstring.

    max_seq_len: the model's maximum length M (default seq_len); only legacy-flip depends on it.
    """
    if direction == "fw":
        offsets = _signed_offsets(seq_len, device)
        return offsets <= 0, offsets.float()
    if direction != "bw":
        raise ValueError(f"direction: expected one of {DIRECTIONS}, got {direction!r}")
    if bw_mask == "causal":
        offsets = _signed_offsets(seq_len, device)
        return offsets >= 0, (-offsets).float()
    if bw_mask == "legacy-flip":
        max_seq_len = seq_len if max_seq_len is None else max_seq_len
        if not seq_len <= max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len {max_seq_len}")
        offsets = _signed_offsets(max_seq_len, device)
        window = (slice(seq_len), slice(seq_len))
        return (offsets <= 0).flip(0)[window], offsets.flip(0)[window].float()
    raise ValueError(f"bw_mask: expected one of {BW_MASKS}, got {bw_mask!r}")


def leaks_labels(bw_mask: str) -> bool:
    """Whether training the bw task with this mask lets a position see its own target."""
    return bw_mask == "legacy-flip"
