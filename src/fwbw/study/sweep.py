"""A grid of settings x seeds, each trained (resumably) and then cut layer by layer, in a sweep
directory (fwbw.study.sweep_dir). A run id is derived from its config, so rerunning a sweep finds
finished work and skips it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fwbw.files import atomic_write_json
from fwbw.model.config import shape_for_model_scale
from fwbw.schema import ConfigError, check_fields, from_mapping, require, show
from fwbw.study.sweep_dir import RUNS, SWEEP_FILE
from fwbw.training.config import RecipeConfig, TrainConfig
from fwbw.training.run_dir import claim, config_id, read_status, release, write_status

# hlb-gpt's model at model_scale 1 (width 384, 8 blocks, V 50,304): the size s = 1 of the study's rule
REFERENCE_PARAMS = 46_009_736
TOKENS_PER_MICROBATCH_RULES = ("study",)
FILE_KEYS = {"p_bws": "p_bw", "first_seed": "seed"}  # SweepSpec fields that files and flags spell otherwise
GRID_AXIS_OF = {"depth": "depths", "width": "widths", "model_scale": "model_scales"}  # run field -> its grid axis


def study_tokens_per_microbatch(size: float) -> int:
    """The study's token capacity per microbatch for a model of size s (its model_scale, or
    num_params / REFERENCE_PARAMS): 57,236 tokens at s = 1, fewer for larger models."""
    return math.floor(114688 / (1.52174 + 0.482 * size**0.87))


@dataclass(frozen=True)
class SweepSpec:
    """The grid: every model size x p_bw x seed, sharing the `base` training settings. The sizes
    are depths x widths, or hlb-gpt's model_scales (depths and widths None). With
    tokens_per_microbatch_rule "study", each run's recipe.tokens_per_microbatch is the study's
    for its size. Extra runs are trained alongside the grid."""

    depths: tuple[int, ...] | None = (4,)
    widths: tuple[int, ...] | None = (128,)
    model_scales: tuple[float, ...] | None = None
    p_bws: tuple[float, ...] = (0.0, 0.05)
    seeds: int = 3
    first_seed: int = 100
    tokens_per_microbatch_rule: str | None = None
    base: TrainConfig = field(default_factory=TrainConfig)
    extra_runs: tuple[TrainConfig, ...] = ()

    def __post_init__(self) -> None:
        check_fields(self, FILE_KEYS)
        if self.model_scales is None:
            for axis in ("depths", "widths"):
                require(getattr(self, axis) is not None, axis, "needs values unless model_scales sizes the models")
        else:
            require(self.depths is None and self.widths is None, "model_scales", "give model_scales or depths and widths, not both")
        for axis in ("depths", "widths", "model_scales", "p_bws"):
            _check_axis(FILE_KEYS.get(axis, axis), getattr(self, axis))
        require(self.seeds >= 1, "seeds", f"must be >= 1, got {self.seeds}")
        rule = self.tokens_per_microbatch_rule
        require(rule in (None, *TOKENS_PER_MICROBATCH_RULES), "tokens_per_microbatch_rule",
                f"must be one of {TOKENS_PER_MICROBATCH_RULES}, got {rule!r}")
        ids = [run_id(config) for config in self.configs()]
        require(len(set(ids)) == len(ids), "extra_runs", "repeats a run of the grid or another extra run")

    def configs(self) -> list[TrainConfig]:
        """Every run: the grid, then the extra runs."""
        grid = []
        for size in self._sizes():
            recipe = self._recipe_for(size)
            grid += [
                dataclasses.replace(self.base, **size, recipe=recipe, p_bw=p_bw, seed=self.first_seed + offset)
                for p_bw in self.p_bws
                for offset in range(self.seeds)
            ]
        return grid + list(self.extra_runs)

    def _sizes(self) -> list[dict]:
        if self.model_scales is None:
            return [dict(depth=depth, width=width, model_scale=None) for depth in self.depths for width in self.widths]
        return [dict(zip(("depth", "width"), shape_for_model_scale(s)), model_scale=s) for s in self.model_scales]

    def _recipe_for(self, size: dict) -> RecipeConfig:
        if self.tokens_per_microbatch_rule is None:
            return self.base.recipe
        from fwbw.data.tokenizer import vocab_size_of
        from fwbw.model.hlb_gpt import count_params

        scale = size["model_scale"]
        if scale is None:
            model = self.base.model_config(vocab_size_of(self.base.tokenizer))
            scale = count_params(dataclasses.replace(model, depth=size["depth"], width=size["width"])) / REFERENCE_PARAMS
        return dataclasses.replace(self.base.recipe, tokens_per_microbatch=study_tokens_per_microbatch(scale))

    @classmethod
    def from_mapping(cls, values: Mapping) -> SweepSpec:
        """A spec from a sweep file's values: the spec's own keys (depths, widths, model_scales,
        p_bw, seeds, seed, tokens_per_microbatch_rule, extra_runs) and any other TrainConfig field
        for every run (recipe as a table). An extra run is a table of fields that differ from the
        base, which is the grid's first seed."""
        own = {FILE_KEYS.get(item.name, item.name) for item in dataclasses.fields(cls)} - {"base"}
        spec = {key: value for key, value in values.items() if key in own}
        base = {key: value for key, value in values.items() if key not in own}
        for key in base:
            if key in GRID_AXIS_OF:
                raise ConfigError(f"{key}: is set by the grid; give {GRID_AXIS_OF[key]}")
        recipe = base.get("recipe")
        both = "tokens_per_microbatch_rule" in spec and isinstance(recipe, Mapping) and "tokens_per_microbatch" in recipe
        require(not both, "tokens_per_microbatch_rule", "give it or recipe.tokens_per_microbatch, not both")
        if "seed" in spec:
            base["seed"] = spec["seed"]
        if "model_scales" in spec:
            spec = {"depths": None, "widths": None, **spec}
        extras = spec.pop("extra_runs", [])
        require(isinstance(extras, list) and all(isinstance(extra, Mapping) for extra in extras), "extra_runs",
                f"must be a list of tables of fields, got {show(extras)}")
        spec["base"] = TrainConfig.from_dict(base)
        spec["extra_runs"] = tuple(_extra_run(base, extra, index) for index, extra in enumerate(extras))
        return from_mapping(cls, spec, FILE_KEYS)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_axis(key: str, values: tuple | None) -> None:
    if values is None:
        return
    require(len(values) > 0, key, "needs at least one value")
    for value in values:
        require(values.count(value) == 1, key, f"repeats {show(value)}")


def _extra_run(base: Mapping, extra: Mapping, index: int) -> TrainConfig:
    try:
        return TrainConfig.from_dict(_overlay(base, extra))
    except ConfigError as error:
        raise ConfigError(f"extra_runs[{index}].{error}") from None


def _overlay(below: Mapping, above: Mapping) -> dict:
    """`below` with `above`'s values, tables merged key by key."""
    nested = lambda key: isinstance(below.get(key), Mapping) and isinstance(above[key], Mapping)
    return {**below, **{key: _overlay(below[key], value) if nested(key) else value for key, value in above.items()}}


# Approximate training-split sizes, for --dry-run before any data is downloaded or tokenized.
KNOWN_TRAIN_TOKENS = {"wikitext-103": 118_000_000, "wikitext-2": 2_400_000, "wiki-sample": 1_190_000}


def estimated_train_tokens(config: TrainConfig) -> int:
    if config.train_tokens:
        return config.train_tokens
    if config.data.startswith("text:"):
        size = (Path(config.data.removeprefix("text:")) / "train.txt").stat().st_size
        return int(config.epochs * size / 4)  # ~4 bytes per BPE token
    return int(config.epochs * KNOWN_TRAIN_TOKENS[config.data])


def describe(spec: SweepSpec) -> str:
    """The run list with parameter counts and a compute estimate (--dry-run)."""
    from fwbw.data.tokenizer import vocab_size_of
    from fwbw.model.hlb_gpt import count_params, training_flops_per_token

    lines, total = [], 0.0
    for config in spec.configs():
        model = config.model_config(vocab_size_of(config.tokenizer))
        tokens = estimated_train_tokens(config)
        tasks = 1 + config.p_bw if config.bw_mode == "add" else 1
        flops = training_flops_per_token(model, config.seq_len) * tokens * tasks
        total += flops
        lines.append(
            f"{run_id(config):<48} params {count_params(model) / 1e6:8.2f}M  tokens {tokens / 1e6:9.2f}M  "
            f"tokens/microbatch {config.recipe.tokens_per_microbatch:6d}  {flops:.2e} FLOP"
        )
    hours_h100 = total / (0.4 * 989e12) / 3600
    lines.append(f"{len(lines)} runs, {total:.2e} training FLOP: ~{hours_h100:.1f} h on one H100 at 40% MFU (bf16)")
    return "\n".join(lines)


def run_id(config: TrainConfig) -> str:
    """Readable and stable: the main settings, then a hash of the whole config."""
    mask = "" if config.bw_mask == "causal" else f"-{config.bw_mask}"
    return f"d{config.depth}-w{config.width}-p{config.p_bw:g}{mask}-s{config.seed}-{config_id(config)[:8]}"


def select_shard(configs: list[TrainConfig], shard: tuple[int, int]) -> list[TrainConfig]:
    index, count = shard
    return [config for position, config in enumerate(configs) if position % count == index]


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"shard: expected i/n such as 0/2, got {text!r}") from None
    require(count >= 1 and 0 <= index < count, "shard", f"need 0 <= i < n, got {text!r}")
    return index, count


# --- running ------------------------------------------------------------------------------


def setup_summary(spec: SweepSpec) -> dict:
    """The few facts a reader of the report needs about the sweep."""
    base = spec.base
    return {
        "data": base.data,
        "tokenizer": base.tokenizer,
        "seq_len": base.seq_len,
        "budget": f"{base.train_tokens} tokens" if base.train_tokens else f"{base.epochs:g} epochs",
        **({"depths": list(spec.depths), "widths": list(spec.widths)} if spec.model_scales is None
           else {"model_scales": list(spec.model_scales)}),
        "p_bw": list(spec.p_bws),
        "seeds": [spec.first_seed + i for i in range(spec.seeds)],
        "bw_mode": base.bw_mode,
        "bw_mask": base.bw_mask,
        "task_tokens": base.task_tokens,
        "num_heads": base.num_heads,
        "adaptive_p_bw": base.adaptive_p_bw,
        "extra_runs": [run_id(config) for config in spec.extra_runs],
        "eval": f"every {base.eval_every_epochs:g} epochs on {base.eval_tokens} fixed validation tokens",
        "tokens_per_microbatch": spec.tokens_per_microbatch_rule or base.recipe.tokens_per_microbatch,
        "device / dtype": f"{base.device} / {base.dtype}",
    }


def write_sweep_file(out: Path, spec: SweepSpec, configs: list[TrainConfig]) -> None:
    runs = {run_id(config): config.to_dict() for config in configs}
    atomic_write_json(out / SWEEP_FILE, {"setup": setup_summary(spec), "spec": spec.to_dict(), "runs": runs})


def train_and_cut(config: TrainConfig, run_dir: Path, progress: bool) -> None:
    from fwbw.training.evaluation import write_cut
    from fwbw.training.trainer import Trainer

    trainer = Trainer(config, run_dir, progress=progress)
    trainer.run()
    write_cut(run_dir, trainer.model, trainer.valid, trainer.precision())


def _wants_training(run_dir: Path, retry_failed: bool) -> bool:
    status = read_status(run_dir)["status"]
    return not (status == "done" or (status == "failed" and not retry_failed))


def run_one(config: TrainConfig, run_dir: Path, retry_failed: bool, progress: bool) -> str:
    """Train and cut one run unless it is done, failed (without retry) or held by another
    worker; returns the status it ends with, or 'skipped'."""
    if not _wants_training(run_dir, retry_failed) or not claim(run_dir):
        return "skipped"
    try:
        if not _wants_training(run_dir, retry_failed):  # finished by another worker meanwhile
            return "skipped"
        write_status(run_dir, "running")
        train_and_cut(config, run_dir, progress)
        write_status(run_dir, "done")
        return "done"
    except Exception as error:  # a failed run is recorded and the sweep goes on
        _record_failure(run_dir, error)
        return "failed"
    finally:
        release(run_dir)


def _record_failure(run_dir: Path, error: Exception) -> None:
    """Report the failed run and mark it failed; when even that cannot be written (a full disk),
    say so and let the sweep go on."""
    message = f"{type(error).__name__}: {error}"
    print(f"run {run_dir.name} failed: {message}", file=sys.stderr)
    if os.environ.get("FWBW_DEBUG"):
        traceback.print_exc()
    try:
        write_status(run_dir, "failed", message)
    except OSError as status_error:
        print(f"run {run_dir.name}: status not recorded: {status_error}", file=sys.stderr)


def run_sweep(
    spec: SweepSpec,
    out: Path,
    shard: tuple[int, int] = (0, 1),
    retry_failed: bool = False,
    progress: bool = True,
) -> dict[str, str]:
    """Run this worker's share of the grid, then rebuild the results table."""
    from fwbw.study.results import write_results

    configs = spec.configs()
    out = Path(out)
    write_sweep_file(out, spec, configs)
    outcome = {}
    mine = select_shard(configs, shard)
    for position, config in enumerate(mine, start=1):
        identifier = run_id(config)
        if progress:
            print(f"[{position}/{len(mine)}] {identifier}", file=sys.stderr)
        outcome[identifier] = run_one(config, out / RUNS / identifier, retry_failed, progress)
    write_results(out)
    return outcome
