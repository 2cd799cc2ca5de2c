"""The `fwbw` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from fwbw.model.masks import BW_MASKS
from fwbw.training.config import BW_MODES, DEVICES, DTYPES, TrainConfig

DEFAULTS = TrainConfig()


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every command that trains, named after TrainConfig fields. Only flags the
    user gives reach the config (argparse.SUPPRESS), so presets and files keep their values."""
    group = parser.add_argument_group("training (defaults: TrainConfig, or the preset/config)")
    add = lambda *names, **kw: group.add_argument(*names, default=argparse.SUPPRESS, **kw)
    add("--data", help=f"wiki-sample | wikitext-2 | wikitext-103 | text:DIR ({DEFAULTS.data})")
    add("--tokenizer", help=f"gpt2 | bpe:N ({DEFAULTS.tokenizer})")
    add("--seq-len", type=int, help=f"maximum sequence length ({DEFAULTS.seq_len})")
    add("--bw-mask", choices=BW_MASKS, help="legacy-flip reproduces the study's leaking mask (causal)")
    add("--bw-mode", choices=BW_MODES, help="add: fw + bw loss; either: one task per step (add)")
    add("--task-tokens", action="store_true", help="UL2-style fw/bw task tokens")
    add("--epochs", type=float, help=f"({DEFAULTS.epochs:g})")
    add("--train-tokens", type=int, help="cap on training tokens (overrides --epochs)")
    add("--eval-every", dest="eval_every_epochs", type=float, help=f"validation interval in epochs ({DEFAULTS.eval_every_epochs:g})")
    add("--eval-tokens", type=int, help=f"size of the fixed validation set ({DEFAULTS.eval_tokens})")
    add("--checkpoint-every", dest="checkpoint_every_steps", type=int, help=f"steps ({DEFAULTS.checkpoint_every_steps})")
    add("--tokens-per-microbatch", type=int, help=f"({DEFAULTS.recipe.tokens_per_microbatch})")
    add("--fixed-microbatch", action="store_true", help="one microbatch per step (no gradient-norm-driven accumulation)")
    add("--device", choices=DEVICES, help="(auto)")
    add("--dtype", choices=DTYPES, help="(auto: bf16 autocast)")


def apply_train_flags(args: argparse.Namespace, base: TrainConfig) -> TrainConfig:
    """`base` with every training flag the user gave."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {name: value for name, value in vars(args).items() if name in fields}
    recipe = {}
    if "tokens_per_microbatch" in vars(args):
        recipe["tokens_per_microbatch"] = args.tokens_per_microbatch
    if "fixed_microbatch" in vars(args):
        recipe["dynamic_microbatch"] = False
    if recipe:
        given["recipe"] = dataclasses.replace(base.recipe, **recipe)
    return dataclasses.replace(base, **given)


def cmd_train(args: argparse.Namespace) -> int:
    from fwbw.training.run_dir import check_run_dir
    from fwbw.training.trainer import train

    config = apply_train_flags(args, TrainConfig.load(args.config) if args.config else DEFAULTS)
    check_run_dir(args.out)
    summary = train(config, args.out, progress=not args.no_progress)
    print(json.dumps({k: summary[k] for k in ("final_val_loss_fw", "final_val_loss_bw", "num_params", "leaks_labels")}))
    return 0


def sweep_spec_from_args(args: argparse.Namespace):
    from fwbw.study.sweep import SweepSpec, load_spec_file, preset

    if args.preset and args.config:
        raise ValueError("sweep: give --preset or --config, not both")
    spec = preset(args.preset) if args.preset else load_spec_file(args.config) if args.config else SweepSpec()
    grid = {name: getattr(args, name) for name in ("depths", "widths", "p_bws", "seeds", "first_seed")}
    grid = {name: value for name, value in grid.items() if value is not None}
    return dataclasses.replace(spec, base=apply_train_flags(args, spec.base), **grid)


def cmd_sweep(args: argparse.Namespace) -> int:
    from fwbw.study.sweep import describe, parse_shard, run_sweep
    from fwbw.training.run_dir import check_run_dir

    spec = sweep_spec_from_args(args)
    shard = parse_shard(args.shard)
    if args.dry_run:
        print(describe(spec))
        return 0
    check_run_dir(args.out)
    outcome = run_sweep(spec, args.out, shard=shard, retry_failed=args.retry_failed, progress=not args.no_progress)
    counts = {status: list(outcome.values()).count(status) for status in sorted(set(outcome.values()))}
    print(f"sweep {args.out}: " + ", ".join(f"{n} {status}" for status, n in counts.items()))
    return 1 if counts.get("failed") else 0


def cmd_cut(args: argparse.Namespace) -> int:
    from fwbw.training.evaluation import cut_run

    for row in cut_run(args.run, progress=not args.no_progress):
        fw, bw = row["metrics"]["fw"], row["metrics"]["bw"]
        print(f"blocks {row['blocks_remaining']:>3}: fw loss {fw['loss']:.4f}  bw loss {bw['loss']:.4f}")
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from fwbw.study.results import summary_table, write_results

    table = summary_table(write_results(args.sweep))
    print(table.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fwbw.analysis.report import write_report
    from fwbw.study.results import write_results

    write_results(args.sweep)
    print(write_report(args.sweep, args.out or args.sweep / "report"))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fwbw.analysis.report import write_report
    from fwbw.study.results import build_results, summary_table
    from fwbw.study.sweep import demo_spec, run_sweep
    from fwbw.training.run_dir import check_run_dir

    check_run_dir(args.out)
    run_sweep(demo_spec(), args.out, progress=not args.no_progress)
    report = write_report(args.out, args.out / "report")
    table = summary_table(build_results(args.out))
    print(table.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    print(f"report: {report}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from fwbw.training.bench import format_table, run_bench, select_configs

    result = run_bench(select_configs(args.config), device=args.device, dtype=args.dtype, steps=args.steps,
                       warmup=args.warmup, progress=not args.json)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fwbw", description="fw/bw causal-mask training of hlb-gpt, and what it does")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one model")
    add_train_flags(train)
    for flag, kind in (("--depth", int), ("--width", int), ("--p-bw", float), ("--seed", int)):
        train.add_argument(flag, type=kind, default=argparse.SUPPRESS)
    train.add_argument("--config", type=Path, help="a run's config.json: rerun it (flags given override it)")
    train.add_argument("--out", type=Path, required=True, help="run directory")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(handler=cmd_train)

    sweep = commands.add_parser("sweep", help="train a grid of settings x seeds, then cut each run layer by layer")
    add_train_flags(sweep)
    sweep.add_argument("--preset", help="paper | cpu-small")
    sweep.add_argument("--config", type=Path, help="a TOML or YAML sweep file")
    sweep.add_argument("--depths", type=int, nargs="+")
    sweep.add_argument("--widths", type=int, nargs="+")
    sweep.add_argument("--p-bw", dest="p_bws", type=float, nargs="+")
    sweep.add_argument("--seeds", type=int, help="runs per setting")
    sweep.add_argument("--seed", dest="first_seed", type=int, help="first seed (100)")
    sweep.add_argument("--out", type=Path, default=Path("runs/grid"))
    sweep.add_argument("--shard", default="0/1", help="i/n: run every n-th run starting at i")
    sweep.add_argument("--retry-failed", action="store_true")
    sweep.add_argument("--dry-run", action="store_true", help="print the runs and the compute estimate")
    sweep.add_argument("--no-progress", action="store_true")
    sweep.set_defaults(handler=cmd_sweep)

    cut = commands.add_parser("cut", help="layer-cut evaluation of a finished run")
    cut.add_argument("run", type=Path)
    cut.add_argument("--no-progress", action="store_true")
    cut.set_defaults(handler=cmd_cut)

    results = commands.add_parser("results", help="rebuild and summarise a sweep's results table")
    results.add_argument("sweep", type=Path)
    results.set_defaults(handler=cmd_results)

    report = commands.add_parser("report", help="write a sweep's report: HTML, Markdown, figures and CSVs")
    report.add_argument("sweep", type=Path)
    report.add_argument("--out", type=Path, help="folder for the report (default: SWEEP/report)")
    report.set_defaults(handler=cmd_report)

    demo = commands.add_parser("demo", help="the cpu-small grid plus one legacy-flip run on the embedded data, then the report")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(handler=cmd_demo)

    bench = commands.add_parser("bench", help="peak matmul throughput, training tokens/s and MFU on this device")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.add_argument("--config", nargs="+", help="standard configs to time (default: all)")
    bench.add_argument("--steps", type=int, default=6, help="timed steps per measurement (median)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    bench.add_argument("--device", choices=DEVICES, default="auto")
    bench.add_argument("--dtype", choices=DTYPES, default="auto")
    bench.set_defaults(handler=cmd_bench)
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
