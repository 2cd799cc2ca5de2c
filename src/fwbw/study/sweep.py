"""A grid of settings x seeds, each trained (resumably) and then cut layer by layer.

Layout of a sweep directory:
  sweep.json                 the spec and the list of runs (id -> config)
  runs/<run_id>/             one training run (see fwbw.training) plus
      cut.json               the layer-cut evaluation
      status.json            pending | running | done | failed, with the error
      .lock                  held by the worker running it (atomic O_EXCL create)
  results.parquet/.csv       the tidy table (fwbw.results)
A run id is derived from its config, so rerunning a sweep finds finished work and skips it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from fwbw.files import atomic_write_json
from fwbw.schema import ConfigError, require
from fwbw.study.sweep_dir import RUNS, SWEEP_FILE
from fwbw.training.config import RecipeConfig, TrainConfig
from fwbw.training.run_dir import claim, read_status, release, write_status


@dataclass(frozen=True)
class SweepSpec:
    """The grid: every depth x width x p_bw x seed, sharing the `base` training settings."""

    depths: tuple[int, ...] = (4,)
    widths: tuple[int, ...] = (128,)
    p_bws: tuple[float, ...] = (0.0, 0.05)
    seeds: int = 3
    first_seed: int = 100
    base: TrainConfig = field(default_factory=TrainConfig)
    extra_runs: tuple[TrainConfig, ...] = ()

    def __post_init__(self) -> None:
        for name in ("depths", "widths", "p_bws"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
            require(len(getattr(self, name)) > 0, name, "needs at least one value")
        require(self.seeds >= 1, "seeds", f"must be >= 1, got {self.seeds}")

    def configs(self) -> list[TrainConfig]:
        """Every run of the grid (validated now, so a bad value fails before any training)."""
        grid = [
            dataclasses.replace(self.base, depth=depth, width=width, p_bw=p_bw, seed=self.first_seed + offset)
            for depth in self.depths
            for width in self.widths
            for p_bw in self.p_bws
            for offset in range(self.seeds)
        ]
        return grid + list(self.extra_runs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    # The study's grid (SPEC §1): WikiText-103, GPT-2 tokens, task tokens, 10 epochs.
    "paper": dict(
        depths=(4, 8, 16, 32),
        widths=(192, 384, 768, 1536),
        p_bws=(0.0, 0.05),
        seeds=3,
        base=dict(data="wikitext-103", tokenizer="gpt2", seq_len=1024, task_tokens=True, epochs=10.0,
                  eval_every_epochs=0.25, eval_tokens=262_144, recipe=dict(tokens_per_microbatch=65_536)),
    ),
    # Two model sizes x p_bw {0, 0.05} x 2 seeds on the embedded data: ~8 minutes on 2 CPU cores.
    # Scaled down: one fixed microbatch of 2048 tokens per step, so an epoch is ~580 steps.
    "cpu-small": dict(
        depths=(2, 4),
        widths=(128,),
        p_bws=(0.0, 0.05),
        seeds=2,
        base=dict(data="wiki-sample", tokenizer="bpe:8192", seq_len=128, epochs=1.0,
                  eval_every_epochs=0.125, eval_tokens=12_288,
                  recipe=dict(tokens_per_microbatch=2048, dynamic_microbatch=False)),
    ),
}


GRID_KEYS = {"depths": "depths", "widths": "widths", "p_bw": "p_bws", "seeds": "seeds", "seed": "first_seed"}


def spec_from_mapping(values: dict) -> SweepSpec:
    """A spec from plain data: grid keys (depths, widths, p_bw, seeds, seed), an optional
    `preset` to start from, and any TrainConfig field (recipe as a table) for the base config."""
    values = dict(values)
    start = preset(values.pop("preset")) if "preset" in values else SweepSpec()
    grid = {GRID_KEYS[k]: values.pop(k) for k in list(values) if k in GRID_KEYS}
    if "recipe" in values:
        values["recipe"] = dataclasses.replace(start.base.recipe, **values["recipe"])
    try:
        base = dataclasses.replace(start.base, **values)
    except TypeError as error:
        raise ConfigError(f"sweep file: {error}") from None
    return dataclasses.replace(start, base=base, **grid)


def load_spec_file(path: Path) -> SweepSpec:
    path = Path(path)
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        values = tomllib.loads(path.read_text())
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(path.read_text()) or {}
    else:
        raise ConfigError(f"config: {path} must be a .toml, .yaml or .yml file")
    return spec_from_mapping(values)


def preset(name: str) -> SweepSpec:
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown {name!r} (expected one of {', '.join(PRESETS)})")
    values = dict(PRESETS[name])
    base = dict(values.pop("base"))
    base["recipe"] = RecipeConfig(**base.get("recipe", {}))
    return SweepSpec(**values, base=TrainConfig(**base))


# The leak shows in the losses only after a few hundred bw steps (here from ~0.75 epochs on).
DEMO_LEGACY_P_BW = 1.0


def demo_spec() -> SweepSpec:
    """`fwbw demo`: the cpu-small grid plus one run of the study's leaking mask at its largest size."""
    spec = preset("cpu-small")
    legacy = dataclasses.replace(
        spec.base, depth=max(spec.depths), width=max(spec.widths), p_bw=DEMO_LEGACY_P_BW,
        bw_mask="legacy-flip", seed=spec.first_seed,
    )
    return dataclasses.replace(spec, extra_runs=(legacy,))


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
        lines.append(f"{run_id(config):<48} params {count_params(model) / 1e6:8.2f}M  tokens {tokens / 1e6:9.2f}M  {flops:.2e} FLOP")
    hours_h100 = total / (0.4 * 989e12) / 3600
    lines.append(f"{len(lines)} runs, {total:.2e} training FLOP: ~{hours_h100:.1f} h on one H100 at 40% MFU (bf16)")
    return "\n".join(lines)


def run_id(config: TrainConfig) -> str:
    """Readable and stable: the main settings, then a hash of the whole config."""
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    mask = "" if config.bw_mask == "causal" else f"-{config.bw_mask}"
    return f"d{config.depth}-w{config.width}-p{config.p_bw:g}{mask}-s{config.seed}-{digest}"


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
        "depths": list(spec.depths),
        "widths": list(spec.widths),
        "p_bw": list(spec.p_bws),
        "seeds": [spec.first_seed + i for i in range(spec.seeds)],
        "bw_mode": base.bw_mode,
        "bw_mask": base.bw_mask,
        "task_tokens": base.task_tokens,
        "extra_runs": [run_id(config) for config in spec.extra_runs],
        "eval": f"every {base.eval_every_epochs:g} epochs on {base.eval_tokens} fixed validation tokens",
        "tokens_per_microbatch": base.recipe.tokens_per_microbatch,
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
        message = f"{type(error).__name__}: {error}"
        write_status(run_dir, "failed", message)
        print(f"run {run_dir.name} failed: {message}", file=sys.stderr)
        if os.environ.get("FWBW_DEBUG"):
            traceback.print_exc()
        return "failed"
    finally:
        release(run_dir)


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
