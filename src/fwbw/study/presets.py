"""Named sweeps. A preset is a function registered with `@preset(name)` that returns what a sweep
file would hold (fwbw.study.configure layers a file and flags over it)."""

from __future__ import annotations

from typing import Callable

from fwbw.schema import ConfigError

PRESETS: dict[str, Callable[[], dict]] = {}

# The leak shows in the losses only after a few hundred bw steps (here from ~0.75 epochs on).
DEMO_LEGACY_P_BW = 1.0


def preset(name: str) -> Callable[[Callable[[], dict]], Callable[[], dict]]:
    """Register the decorated function as the preset `name`."""

    def register(function: Callable[[], dict]) -> Callable[[], dict]:
        PRESETS[name] = function
        return function

    return register


def preset_values(name: str) -> dict:
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown {name!r} (expected one of {', '.join(PRESETS)})")
    return PRESETS[name]()


@preset("paper")
def paper() -> dict:
    """The study's grid (docs/method.md#the-research-question): WikiText-103, GPT-2 tokens, task
    tokens, 10 epochs, and the study's tokens per microbatch for each model size."""
    return {
        "depths": [4, 8, 16, 32],
        "widths": [192, 384, 768, 1536],
        "p_bw": [0.0, 0.05],
        "seeds": 3,
        "tokens_per_microbatch_rule": "study",
        "data": "wikitext-103",
        "tokenizer": "gpt2",
        "seq_len": 1024,
        "task_tokens": True,
        "epochs": 10.0,
        "eval_every_epochs": 0.25,
        "eval_tokens": 262_144,
    }


@preset("cpu-small")
def cpu_small() -> dict:
    """Two model sizes x p_bw {0, 0.05} x 2 seeds on the embedded data: ~8 minutes on 2 CPU cores.
    Scaled down: one fixed microbatch of 2048 tokens per step, so an epoch is ~580 steps."""
    return {
        "depths": [2, 4],
        "widths": [128],
        "p_bw": [0.0, 0.05],
        "seeds": 2,
        "data": "wiki-sample",
        "tokenizer": "bpe:8192",
        "seq_len": 128,
        "epochs": 1.0,
        "eval_every_epochs": 0.125,
        "eval_tokens": 12_288,
        "recipe": {"tokens_per_microbatch": 2048, "dynamic_microbatch": False},
    }


@preset("data-constrained")
def data_constrained() -> dict:
    """Many epochs over the small embedded corpus, where a fw-only model overfits: can bw training
    (p_bw 0.05, 0.25, losses added) act as data augmentation? 16 epochs at depth 2 / width 128,
    one fixed 2048-token microbatch per step, 4 seeds; evaluated every half epoch on the whole
    validation split and on a fixed 32k-token set of training windows (the train-val gap)."""
    return {
        "depths": [2],
        "widths": [128],
        "p_bw": [0.0, 0.05, 0.25],
        "seeds": 4,
        "data": "wiki-sample",
        "tokenizer": "bpe:8192",
        "seq_len": 128,
        "bw_mode": "add",
        "epochs": 16.0,
        "eval_every_epochs": 0.5,
        "eval_tokens": 65_536,
        "train_eval_tokens": 32_768,
        "recipe": {"tokens_per_microbatch": 2048, "dynamic_microbatch": False},
    }


@preset("demo")
def demo() -> dict:
    """`fwbw demo`: cpu-small plus two runs at its largest size that train both tasks on every
    step (p_bw = 1): one with the causal mask (the arrow of time: is bw harder than fw?) and one
    with the study's leaking mask."""
    grid = cpu_small()
    largest = {"depth": max(grid["depths"]), "width": max(grid["widths"]), "p_bw": DEMO_LEGACY_P_BW}
    return {**grid, "extra_runs": [largest, {**largest, "bw_mask": "legacy-flip"}]}
