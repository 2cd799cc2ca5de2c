"""What a trained model writes: greedy fw and bw continuations of held-out prompts, saved as the
run's samples.json, so a reader sees what its losses mean.

Prompts are PROMPT_TOKENS-token pieces of the validation split (never trained on) at fixed,
evenly spaced positions, each with room for new_tokens held-out tokens on both sides; the text
that really surrounds a prompt is saved next to the model's continuations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fwbw.data.corpora import load_corpus_tokenizer, load_token_data
from fwbw.data.tokenizer import Tokenizer
from fwbw.files import atomic_write_json
from fwbw.model.generate import context_tokens, continue_tokens
from fwbw.model.hlb_gpt import HlbGpt
from fwbw.model.masks import leaks_labels
from fwbw.training import checkpoint
from fwbw.training.run_dir import SAMPLES, check_fence, check_writable, finished_run_config

PROMPT_TOKENS = 16  # at most: a prompt also fits the model's context


def write_samples(run_dir: Path, prompts: int = 3, new_tokens: int = 24, device: str = "cpu") -> dict:
    """Write (and return) the finished run's samples.json: for each prompt its text, the greedy fw
    continuation (text after it) and bw continuation (text before it; None where the bw mask
    reads its own labels), with their token ids, and the held-out text around the prompt."""
    run_dir = Path(run_dir)
    config = finished_run_config(run_dir)
    if prompts < 1 or new_tokens < 0:
        raise ValueError(f"samples: need prompts >= 1 and new_tokens >= 0, got {prompts} and {new_tokens}")
    check_writable(run_dir, f"cannot write {run_dir / SAMPLES}: ")
    valid = load_token_data(config.data, config.tokenizer, progress=False).valid
    tokenizer = load_corpus_tokenizer(config.data, config.tokenizer, progress=False)
    model = checkpoint.load_model(run_dir, device)
    length = min(PROMPT_TOKENS, context_tokens(model.config))
    starts = prompt_starts(len(valid), prompts, length, new_tokens)
    samples = {
        "prompt_tokens": length,
        "new_tokens": new_tokens,
        "decoding": "greedy",
        "bw_mask": model.config.bw_mask,
        "task_tokens": model.config.task_tokens,
        "samples": [_sample(model, tokenizer, valid, start, length, new_tokens) for start in starts],
    }
    check_fence(run_dir)  # written by the run's lease holder while it holds it (a sweep's worker)
    atomic_write_json(run_dir / SAMPLES, samples)
    return samples


def prompt_starts(split_tokens: int, prompts: int, length: int, margin: int) -> list[int]:
    """Start positions of `prompts` prompts of `length` tokens, at the middles of equal parts of
    the positions that leave `margin` tokens on both sides."""
    choices = split_tokens - length - 2 * margin + 1
    if choices < prompts:
        raise ValueError(
            f"samples: the validation split has {split_tokens} tokens, too few for {prompts} prompts "
            f"of {length} tokens with {margin} on each side"
        )
    return [margin + (2 * i + 1) * choices // (2 * prompts) for i in range(prompts)]


def _sample(model: HlbGpt, tokenizer: Tokenizer, valid: np.ndarray, start: int, length: int, margin: int) -> dict:
    """The continuations of the prompt valid[start : start + length], `margin` tokens each way."""
    end = start + length
    before, prompt, after = (valid[a:b].tolist() for a, b in ((start - margin, start), (start, end), (end, end + margin)))
    fw = continue_tokens(model, prompt, "fw", margin)
    bw = None if leaks_labels(model.config.bw_mask) else continue_tokens(model, prompt, "bw", margin)
    return {
        "prompt": tokenizer.decode(prompt),
        "prompt_ids": prompt,
        "fw": tokenizer.decode(fw),
        "fw_ids": fw,
        "bw": None if bw is None else tokenizer.decode(bw),
        "bw_ids": bw,
        "held_out_before": tokenizer.decode(before),
        "held_out_after": tokenizer.decode(after),
        "position": start,
    }
