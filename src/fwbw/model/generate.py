"""Continuing a text with a trained HlbGpt, forwards or backwards.

Each step feeds the model exactly what `fwbw.model.tasks.task_batch` feeds it in training:
- fw: [FW] + text (the marker only with task tokens); the last position predicts the next token,
  which is appended on the right.
- bw: text + [BW]; with the causal bw mask position 0 predicts the token before text[0], which is
  prepended on the left.
The context is the last (fw) or first (bw) max_seq_len tokens, the marker included. Only text ids
are ever emitted, never a task token.
"""

from __future__ import annotations

import torch

from fwbw.model.config import ModelConfig
from fwbw.model.hlb_gpt import HlbGpt
from fwbw.model.masks import DIRECTIONS, leaks_labels


@torch.no_grad()
def continue_tokens(
    model: HlbGpt,
    prompt_ids: list[int],
    direction: str,
    new_tokens: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[int]:
    """The `new_tokens` tokens that continue `prompt_ids` in `direction`, in reading order: the
    text after the prompt (fw) or before it (bw). Greedy at temperature 0; otherwise sampled from
    softmax(logits / temperature) with `generator` (on the model's device)."""
    _check_request(model, prompt_ids, direction, new_tokens, temperature)
    was_training = model.training
    model.eval()
    try:
        text = list(prompt_ids)
        for _ in range(new_tokens):
            token = _choose(_next_logits(model, text, direction), temperature, generator)
            text = text + [token] if direction == "fw" else [token] + text
    finally:
        model.train(was_training)
    return text[len(prompt_ids):] if direction == "fw" else text[:new_tokens]


def _check_request(model: HlbGpt, prompt_ids: list[int], direction: str, new_tokens: int, temperature: float) -> None:
    config = model.config
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: expected one of {DIRECTIONS}, got {direction!r}")
    if direction == "bw" and leaks_labels(config.bw_mask):
        raise ValueError(
            f"bw mask {config.bw_mask!r} reads its own labels: its bw predictions are no continuation"
        )
    if not prompt_ids:
        raise ValueError("prompt_ids: need at least one token")
    if not all(0 <= token < config.vocab_size for token in prompt_ids):
        raise ValueError(f"prompt_ids: every id must be in [0, {config.vocab_size})")
    if new_tokens < 0:
        raise ValueError(f"new_tokens: must be >= 0, got {new_tokens}")
    if not temperature >= 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature}")


def context_tokens(config: ModelConfig) -> int:
    """How many text tokens the model sees at once: max_seq_len, less the task token if any."""
    return config.max_seq_len - (1 if config.task_tokens else 0)


def _next_logits(model: HlbGpt, text: list[int], direction: str) -> torch.Tensor:
    """Logits [vocab_size] over the text ids for the token after (fw) or before (bw) `text`."""
    config = model.config
    room = context_tokens(config)
    if direction == "fw":
        marker = [config.fw_token_id] if config.task_tokens else []
        inputs, position = marker + text[-room:], -1
    else:
        marker = [config.bw_token_id] if config.task_tokens else []
        inputs, position = text[:room] + marker, 0
    device = next(model.parameters()).device
    hidden = model.hidden(torch.tensor([inputs], device=device), direction)[0, position]
    return model.output(hidden)[: config.vocab_size].float()


def _choose(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    if temperature == 0:
        return int(logits.argmax())
    probabilities = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probabilities, 1, generator=generator))
