"""Named sweeps. A preset is a function registered with `@preset(name)` that returns what a sweep
file would hold (fwbw.study.configure layers a file and flags over it)."""

from __future__ import annotations

from typing import Callable

from fwbw.schema import ConfigError
from fwbw.training.config import RecipeConfig as RecipeDefaults

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
        "eval_bw": True,  # also in the fw-only runs: the untrained direction's loss is part of what the demo shows
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


# data-efficiency (docs/analysis-plan.md): one model, the nested training shares and arms it compares
EFFICIENCY_FRACTION = 0.25  # the share of the training articles where bw training is studied
EFFICIENCY_FRACTIONS = (0.125, 0.5, 1.0)  # the fw-only curve's other points (with EFFICIENCY_FRACTION)
EFFICIENCY_DOSES = (0.1, 0.5, 1.0)  # p_bw beside the grid's 0 and 0.25
EFFICIENCY_SEEDS = 8  # chosen from the pilot's SD (docs/analysis-plan.md)
EFFICIENCY_FIRST_SEED = 100
PILOT_FIRST_SEED = 900  # the pilot's seeds, never reused by the main sweep
WEIGHT_DECAY = 2e-5  # every arm's: the dynamic rule's value near the fw-only run's best (fw loss ~4.4)
# half the recipe's: its lr made the pilot's p_bw 0.25 runs unstable, and fw alone reached a lower
# validation loss at half of it (docs/analysis-plan.md#the-pilot)
EFFICIENCY_LR_SCALE = RecipeDefaults.lr_scale / 2


def efficiency_base() -> dict:
    """What every data-efficiency run shares: depth 2 / width 128 (0.73M parameters), bpe:2048 on
    wiki-sample-v2 (80/10/10 train/valid/test), one fixed 2048-token microbatch per step, a cap of
    32 epochs of its share, the EMA of the weights (decay 0.99) evaluated every half epoch and
    stopped after 4 evaluations without a lower validation fw loss; one fixed weight decay, half the
    recipe's learning rate; pinned numerics (bf16 autocast, one thread, not compiled)."""
    return {
        "depths": [2],
        "widths": [128],
        "data": "wiki-sample-v2",
        "tokenizer": "bpe:2048",
        "seq_len": 128,
        "bw_mode": "add",
        "train_fraction": EFFICIENCY_FRACTION,
        "epochs": 32.0,
        "eval_every_epochs": 0.5,
        "eval_tokens": 16_384,
        "train_eval_tokens": 8_192,
        "eval_ema": 0.99,
        "patience": 4,
        "eval_bw": False,
        "wd_constant": WEIGHT_DECAY,
        "dtype": "bf16",
        "threads": 1,
        "compile": False,
        "recipe": {"tokens_per_microbatch": 2048, "dynamic_microbatch": False, "lr_scale": EFFICIENCY_LR_SCALE},
    }


def efficiency_arms() -> list[dict]:
    """The arms beyond the primary contrast, in the plan's priority order: the fw-only curve over
    unique data, Q2 (one pass over all the data: fw+bw, fw+replay, fw), the dose, the controls."""
    one_pass = {"train_fraction": 1.0, "epochs": 1.0, "eval_every_epochs": 0.125, "patience": None}
    lr_scale = EFFICIENCY_LR_SCALE
    return [
        *({"train_fraction": fraction, "p_bw": 0.0} for fraction in EFFICIENCY_FRACTIONS),
        {**one_pass, "p_bw": 1.0}, {**one_pass, "p_bw": 0.0, "replay": True}, {**one_pass, "p_bw": 0.0},
        *({"p_bw": dose} for dose in EFFICIENCY_DOSES),
        *({"p_bw": p_bw, "recipe": {"lr_scale": lr_scale * factor}} for factor in (0.5, 2.0) for p_bw in (0.0, 0.25)),
        {"p_bw": 0.0, "dropout": 0.1},
        {"p_bw": 0.0, "wd_scale": 10.0},
    ]


@preset("data-efficiency")
def data_efficiency() -> dict:
    """Does bw training lower the best fw loss on held-out text, and what is it worth in unique
    data (issue 18, docs/analysis-plan.md)? The grid is the primary contrast, p_bw 0.25 vs 0 on a
    quarter of the training articles; the extra runs are the other arms, every one for every seed."""
    seeds = range(EFFICIENCY_FIRST_SEED, EFFICIENCY_FIRST_SEED + EFFICIENCY_SEEDS)
    base = efficiency_base()
    runs = [{**arm, "seed": seed} for arm in efficiency_arms() for seed in seeds]
    return {**base, "p_bw": [0.0, 0.25], "seeds": EFFICIENCY_SEEDS, "seed": EFFICIENCY_FIRST_SEED, "extra_runs": runs}


@preset("data-efficiency-pilot")
def data_efficiency_pilot() -> dict:
    """The pilot of data-efficiency, used only to measure the SD of the primary contrast, as it ran:
    at the recipe's learning rate and with a larger evaluation set."""
    base = efficiency_base()
    pilot = {"eval_tokens": 24_576, "train_eval_tokens": 12_288, "recipe": {**base["recipe"], "lr_scale": RecipeDefaults.lr_scale}}
    return {**base, **pilot, "p_bw": [0.0, 0.25], "seeds": 3, "seed": PILOT_FIRST_SEED}


# retrieval (issue 19): LMs whose bw task is trained substantially, for the within-model comparison
RETRIEVAL_P_BWS = (0.0, 0.5, 1.0)
RETRIEVAL_SEEDS = 4
RETRIEVAL_FIRST_SEED = 200  # apart from data-efficiency's and its pilot's
RETRIEVAL_SEQ_LEN = 256


@preset("retrieval")
def retrieval() -> dict:
    """The LMs of the retrieval study (issue 19): data-efficiency's model and numerics at length 256
    on all of wiki-sample-v2's training articles, p_bw 0, 0.5 and 1 (add), 4 seeds each. A cap of 8
    epochs, the EMA's weights kept where validation fw loss is lowest and stopped after 4
    evaluations without a lower one. The retrieval tasks' queries come only from the validation
    (dev) and test articles, which no run trains on."""
    base = efficiency_base()
    return {**base, "seq_len": RETRIEVAL_SEQ_LEN, "train_fraction": 1.0, "epochs": 8.0,
            "p_bw": list(RETRIEVAL_P_BWS), "seeds": RETRIEVAL_SEEDS, "seed": RETRIEVAL_FIRST_SEED}


@preset("demo")
def demo() -> dict:
    """`fwbw demo`: cpu-small plus two runs at its largest size that train both tasks on every
    step (p_bw = 1): one with the causal mask (the arrow of time: is bw harder than fw?) and one
    with the study's leaking mask."""
    grid = cpu_small()
    largest = {"depth": max(grid["depths"]), "width": max(grid["widths"]), "p_bw": DEMO_LEGACY_P_BW}
    return {**grid, "extra_runs": [largest, {**largest, "bw_mask": "legacy-flip"}]}
