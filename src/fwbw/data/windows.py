"""Token windows for training (seeded random draws, resumable) and validation (fixed)."""

from __future__ import annotations

import numpy as np
import torch

from fwbw.model.tasks import window_length


class WindowSampler:
    """Draws random windows from a token stream, as hlb-gpt does, from its own seeded generator
    so that a resumed run draws exactly the windows an uninterrupted one would. With `remember`,
    it keeps the start of every window drawn, by window length, for `replay`."""

    def __init__(self, tokens: np.ndarray, seed: int, remember: bool = False):
        self.tokens = tokens
        self.generator = torch.Generator().manual_seed(seed)
        self.remember = remember
        self.seen: dict[int, list[torch.Tensor]] = {}  # window length -> starts of the draws, while remembering

    def sample(self, batch_size: int, length: int) -> torch.Tensor:
        self._check_length(length)
        starts = torch.randint(0, len(self.tokens) - length + 1, (batch_size,), generator=self.generator)
        if self.remember:
            self.seen.setdefault(length, []).append(starts)
        return self._windows(starts, length)

    def has_seen(self, length: int) -> bool:
        return bool(self.seen.get(length))

    def replay(self, batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """`batch_size` windows drawn uniformly from the windows of this length drawn so far: data
        trained on before, exactly as it was trained on."""
        if not self.has_seen(length):
            raise RuntimeError(f"nothing to replay: no window of length {length} has been drawn yet")
        pool = self._pool(length)
        return self._windows(pool[torch.randint(0, len(pool), (batch_size,), generator=generator)], length)

    def _pool(self, length: int) -> torch.Tensor:
        draws = self.seen[length]
        if len(draws) > 1:
            draws[:] = [torch.cat(draws)]
        return draws[0]

    def _check_length(self, length: int) -> None:
        if length > len(self.tokens):
            raise ValueError(f"window length {length} exceeds the {len(self.tokens)} training tokens")

    def _windows(self, starts: torch.Tensor, length: int) -> torch.Tensor:
        rows = [np.asarray(self.tokens[s : s + length], dtype=np.int64) for s in starts.tolist()]
        return torch.from_numpy(np.stack(rows))

    def state_dict(self) -> dict:
        state = {"generator": self.generator.get_state()}
        if self.remember:
            state["seen"] = {str(length): self._pool(length) for length in self.seen}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        if self.remember:
            self.seen = {int(length): [starts.to(torch.int64)] for length, starts in state["seen"].items()}


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
    """The fixed training-split windows that a run (a TrainConfig) also evaluates, to measure how
    far its training loss has fallen below its validation loss; None when config.train_eval_tokens
    is 0. They are evenly_spaced_windows over the whole split (a subset's, if the run trains on
    one): training draws random windows from all of it, so these tokens are trained on as often as
    any others, and they sample the whole split rather than its first documents."""
    if config.train_eval_tokens == 0:
        return None
    return evenly_spaced_windows(tokens, window_length(config.seq_len, config.task_tokens), config.train_eval_tokens)


def evenly_spaced_windows(tokens: np.ndarray, length: int, max_tokens: int) -> torch.Tensor:
    """count = min(len(tokens), max_tokens) // length windows, window i starting at
    round(i * (len(tokens) - length) / max(1, count - 1)) (halves to even, as Python rounds): the
    first at the start of the stream, the last (if count > 1) ending at its end, evenly spaced to
    within a token. They never overlap, because count * length <= len(tokens)."""
    count = min(len(tokens), max_tokens) // length
    if count == 0:
        raise ValueError(f"training split has {len(tokens)} tokens, fewer than one window of {length}")
    starts = np.rint(np.arange(count) * (len(tokens) - length) / max(1, count - 1)).astype(np.int64)
    rows = [np.asarray(tokens[start : start + length], dtype=np.int64) for start in starts]
    return torch.from_numpy(np.stack(rows))
