"""The `fwbw` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fwbw.config import BW_MODES, DEVICES, DTYPES, RecipeConfig, TrainConfig
from fwbw.masks import BW_MASKS

TRAIN_DEFAULTS = TrainConfig()


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every command that trains; each maps onto a TrainConfig field."""
    d = TRAIN_DEFAULTS
    group = parser.add_argument_group("training")
    group.add_argument("--data", default=d.data, help="wiki-sample | wikitext-2 | wikitext-103 | text:DIR (default %(default)s)")
    group.add_argument("--tokenizer", default=d.tokenizer, help="gpt2 | bpe:N (default %(default)s)")
    group.add_argument("--seq-len", type=int, default=d.seq_len, help="maximum sequence length (default %(default)s)")
    group.add_argument("--bw-mask", choices=BW_MASKS, default=d.bw_mask, help="legacy-flip reproduces the study's leaking mask")
    group.add_argument("--bw-mode", choices=BW_MODES, default=d.bw_mode, help="add: fw + bw loss; either: one task per step")
    group.add_argument("--task-tokens", action="store_true", help="UL2-style fw/bw task tokens")
    group.add_argument("--epochs", type=float, default=d.epochs)
    group.add_argument("--train-tokens", type=int, default=None, help="cap on training tokens (overrides --epochs)")
    group.add_argument("--eval-every", type=float, default=d.eval_every_epochs, help="validation interval in epochs")
    group.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="size of the fixed validation set")
    group.add_argument("--tokens-per-microbatch", type=int, default=d.recipe.tokens_per_microbatch)
    group.add_argument("--device", choices=DEVICES, default=d.device)
    group.add_argument("--dtype", choices=DTYPES, default=d.dtype)


def train_config_from_args(args: argparse.Namespace, **overrides) -> TrainConfig:
    values = dict(
        data=args.data,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        bw_mask=args.bw_mask,
        bw_mode=args.bw_mode,
        task_tokens=args.task_tokens,
        epochs=args.epochs,
        train_tokens=args.train_tokens,
        eval_every_epochs=args.eval_every,
        eval_tokens=args.eval_tokens,
        device=args.device,
        dtype=args.dtype,
        recipe=RecipeConfig(tokens_per_microbatch=args.tokens_per_microbatch),
    )
    values.update(overrides)
    return TrainConfig(**values)


def cmd_train(args: argparse.Namespace) -> int:
    from fwbw.training import check_run_dir, train

    if args.config:
        config = TrainConfig.load(args.config)
    else:
        config = train_config_from_args(args, depth=args.depth, width=args.width, p_bw=args.p_bw, seed=args.seed)
    check_run_dir(args.out)
    summary = train(config, args.out, progress=not args.no_progress)
    print(json.dumps({k: summary[k] for k in ("final_val_loss_fw", "final_val_loss_bw", "num_params", "leaks_labels")}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fwbw", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one model")
    add_train_flags(train)
    train.add_argument("--depth", type=int, default=TRAIN_DEFAULTS.depth)
    train.add_argument("--width", type=int, default=TRAIN_DEFAULTS.width)
    train.add_argument("--p-bw", type=float, default=TRAIN_DEFAULTS.p_bw)
    train.add_argument("--seed", type=int, default=TRAIN_DEFAULTS.seed)
    train.add_argument("--config", type=Path, help="a run's config.json: rerun it exactly (other training flags ignored)")
    train.add_argument("--out", type=Path, required=True, help="run directory")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(handler=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, RuntimeError, OSError) as error:
        if os.environ.get("FWBW_DEBUG"):
            raise
        print(f"fwbw {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
