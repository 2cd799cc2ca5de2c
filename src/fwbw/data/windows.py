"""Token windows for training (seeded random draws, resumable) and validation (fixed)."""

from __future__ import annotations

import numpy as np
import torch

from fwbw.model.tasks import window_length


class WindowSampler:
    """Draws random windows from a token stream, as hlb-gpt does, from its own seeded generator
    so that a resumed run draws exactly the windows an uninterrupted one would."""

    def __init__(self, tokens: np.ndarray, seed: int):
        self.tokens = tokens
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, batch_size: int, length: int) -> torch.Tensor:
        if length > len(self.tokens):
            raise ValueError(f"window length {length} exceeds the {len(self.tokens)} training tokens")
        starts = torch.randint(0, len(self.tokens) - length + 1, (batch_size,), generator=self.generator)
        rows = [np.asarray(self.tokens[s : s + length], dtype=np.int64) for s in starts.tolist()]
        return torch.from_numpy(np.stack(rows))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def validation_windows(tokens: np.ndarray, length: int, max_tokens: int) -> torch.Tensor:
    """Consecutive non-overlapping windows from the start of the split, up to max_tokens: the
    same set at every evaluation of every run."""
    count = min(len(tokens), max_tokens) // length
    if count == 0:
        raise ValueError(f"validation split has {len(tokens)} tokens, fewer than one window of {length}")
    window_tokens = np.asarray(tokens[: count * length], dtype=np.int64)
    return torch.from_numpy(window_tokens.reshape(count, length))


def validation_set(config, tokens: np.ndarray) -> torch.Tensor:
    """The fixed validation windows of a run (a TrainConfig): its length, its token budget."""
    return validation_windows(tokens, window_length(config.seq_len, config.task_tokens), config.eval_tokens)


def train_eval_set(config, tokens: np.ndarray) -> torch.Tensor | None:
    """The fixed windows from the start of the training split that a run (a TrainConfig) also
    evaluates, to measure how far its training loss has fallen below its validation loss; None
    when config.train_eval_tokens is 0. Training draws random windows from the whole split, so
    these tokens are trained on as often as any others."""
    if config.train_eval_tokens == 0:
        return None
    return validation_windows(tokens, window_length(config.seq_len, config.task_tokens), config.train_eval_tokens)
