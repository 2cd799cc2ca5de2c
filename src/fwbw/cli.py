"""The `fwbw` command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from fwbw.model.masks import BW_MASKS
from fwbw.retrieval.beir import write_beir
from fwbw.retrieval.benchmark import SPLITS as QUERY_SPLITS
from fwbw.retrieval.encoder import EMBEDS, POOLINGS
from fwbw.retrieval.ensemble import CONTROL_EMBED
from fwbw.retrieval.experiment import MAXSIM_DTYPES, System, check_query_fillers, run_retrieval
from fwbw.retrieval.metrics import METRICS as RETRIEVAL_METRICS
from fwbw.retrieval.tasks import load_task, task_splits
from fwbw.study.children import terminate_on_sigterm
from fwbw.study.configure import build_sweep_spec, build_train_config, slurm_options
from fwbw.study.estimate import plural
from fwbw.study.launchers import LAUNCHERS, launch_sweep
from fwbw.study.launchers.base import (
    LEFT,
    OPTION_LAUNCHERS,
    Assignment,
    Launch,
    as_recorded,
    outcome_counts,
)
from fwbw.study.launchers.local import parse_gpus
from fwbw.study.launchers.slurm import SLURM_MINUTES
from fwbw.study.presets import PRESETS
from fwbw.study.results import (
    build_results,
    build_retrieval_results,
    summary_table,
    write_results,
)
from fwbw.study.retrieval_study import run_study
from fwbw.study.retrieval_sweep import DEFAULT_CACHE_GB, DEFAULT_EMBEDS, Plan, retrieve_sweep
from fwbw.study.samples import write_samples
from fwbw.study.status import status_lines
from fwbw.study.sweep import (
    TOKENS_PER_MICROBATCH_RULES,
    Execution,
    SweepSpec,
    cut_and_sample,
    describe_runs,
    parse_shard,
    run_sweep,
)
from fwbw.study.sweep_dir import SWEEP_FILE, read_sweep
from fwbw.training.config import BW_MODES, DEVICES, WD_LOSSES, TrainConfig
from fwbw.training.data_parallel import is_main_process
from fwbw.training.data_parallel import leave as leave_process_group
from fwbw.training.evaluation import cut_run
from fwbw.training.precision import DTYPE_CHOICES
from fwbw.training.run_dir import LEASE_S, check_run_dir, check_writable, training_lease, valid_lease
from fwbw.training.trackers import TRACKERS
from fwbw.training.trainer import Trainer

DEFAULTS = TrainConfig()
EXIT_INTERRUPTED = 130  # the shell's code for a command ended by SIGINT
EXIT_RUNS_LEFT = 3  # fwbw sweep (--launcher ray, or slurm --wait): runs left unfinished once the workers ended
DEMO_RETRIEVAL_TASK = "description"  # `fwbw demo --retrieval`
RETRIEVAL_SHOWN = ["task", "run_id", "system", "embed", "finetune_steps", *RETRIEVAL_METRICS]  # `fwbw retrieval SWEEP`


class Parser(argparse.ArgumentParser):
    """Usage errors in one line, as every other error (`--help` shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


class ConfigFlags:
    """Flags that override config values, each stored under its key in a config file (dotted
    inside a table: recipe.tokens_per_microbatch). Only the flags the user gives reach the config
    (argparse.SUPPRESS), so presets and files keep their other values."""

    def __init__(self, parser: argparse.ArgumentParser, title: str):
        self.group = parser.add_argument_group(title)
        self.keys: list[str] = []
        parser.set_defaults(config_keys=self.keys)

    def add(self, *names: str, **kwargs) -> None:
        self.keys.append(self.group.add_argument(*names, default=argparse.SUPPRESS, **kwargs).dest)


class NegatedBooleanAction(argparse.BooleanOptionalAction):
    """--flag / --no-flag for a field that means the opposite: --flag stores False."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string.startswith("--no-"))


def add_train_flags(flags: ConfigFlags) -> None:
    """Flags of every command that trains, named after TrainConfig fields."""
    add = flags.add
    add("--data", help=f"wiki-sample | wiki-sample-v2 (with a test split) | wikitext-2 | wikitext-103 | text:DIR ({DEFAULTS.data})")
    add("--tokenizer", help=f"gpt2 | bpe:N ({DEFAULTS.tokenizer})")
    add("--seq-len", type=int, help=f"maximum sequence length ({DEFAULTS.seq_len})")
    add("--num-heads", type=int, help=f"attention heads splitting query, key and value ({DEFAULTS.num_heads}: hlb-gpt)")
    add("--bw-mask", choices=BW_MASKS, help="legacy-flip reproduces the study's leaking mask (causal)")
    add("--bw-mode", choices=BW_MODES,
        help="add: fw + bw loss; either: one task per step (add). bw-only training: --bw-mode either --p-bw 1")
    add("--adaptive-p-bw", action=argparse.BooleanOptionalAction,
        help="the study's: after every bw pass, p_bw = clamp(ppl_bw / ppl_fw, 0.01, 1)")
    add("--task-tokens", action=argparse.BooleanOptionalAction, help="UL2-style fw/bw task tokens")
    add("--epochs", type=float, help=f"({DEFAULTS.epochs:g})")
    add("--train-tokens", type=int, help="cap on training tokens (overrides --epochs)")
    add("--eval-every", dest="eval_every_epochs", type=float, help=f"validation interval in epochs ({DEFAULTS.eval_every_epochs:g})")
    add("--eval-tokens", type=int, help=f"size of the fixed validation set ({DEFAULTS.eval_tokens})")
    add("--train-eval-tokens", type=int,
        help=f"size of a fixed training-split set also evaluated, for the train-val gap (0: off) ({DEFAULTS.train_eval_tokens})")
    add("--checkpoint-every", dest="checkpoint_every_steps", type=int, help=f"steps ({DEFAULTS.checkpoint_every_steps})")
    add("--tokens-per-microbatch", dest="recipe.tokens_per_microbatch", type=int, metavar="N",
        help=f"tokens per microbatch, at least --seq-len ({DEFAULTS.recipe.tokens_per_microbatch})")
    add("--fixed-microbatch", dest="recipe.dynamic_microbatch", action=NegatedBooleanAction,
        help="one microbatch per step (no gradient-norm-driven accumulation)")
    add("--device", choices=DEVICES, help="(auto)")
    add("--dtype", choices=DTYPE_CHOICES, help="(auto: bf16 autocast)")
    add("--threads", type=int, metavar="N", help="torch's CPU threads (torch's default)")
    add("--lr-scale", dest="recipe.lr_scale", type=float, help=f"multiplies every learning rate ({DEFAULTS.recipe.lr_scale:g})")
    add("--train-fraction", type=float, metavar="F",
        help="train on a nested share F of the training documents (1): the same --subset-seed gives nested shares")
    add("--subset-seed", type=int, help=f"which documents --train-fraction keeps ({DEFAULTS.subset_seed})")
    add("--replay", action=argparse.BooleanOptionalAction,
        help="every step also trains fw on windows trained on before, added like bw (the same compute as p_bw 1)")
    add("--dropout", type=float, help=f"residual dropout ({DEFAULTS.dropout:g})")
    add("--wd-loss", choices=WD_LOSSES, help="the loss the dynamic weight decay reads: the step's mean task loss, or fw (tasks)")
    add("--wd-constant", type=float, metavar="WD", help="a fixed weight decay instead of the dynamic one")
    add("--wd-scale", type=float, help=f"multiplies the weight decay ({DEFAULTS.wd_scale:g})")
    add("--eval-ema", type=float, metavar="DECAY", help="evaluate (and select) an EMA of the weights with this decay")
    add("--patience", type=int, metavar="N", help="stop after N evaluations without a lower validation fw loss (off)")
    add("--eval-bw", action=argparse.BooleanOptionalAction, help="evaluate the bw task (default: when the run trains it)")


def overrides(args: argparse.Namespace) -> dict:
    """The config values of the flags the user gave, as nested tables."""
    values: dict = {}
    for key in args.config_keys:
        if hasattr(args, key):
            *tables, name = key.split(".")
            table = values
            for table_name in tables:
                table = table.setdefault(table_name, {})
            table[name] = getattr(args, key)
    return values


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    return build_train_config(args.config, overrides(args))


def cmd_train(args: argparse.Namespace) -> int:
    config = train_config_from_args(args)
    trainer = Trainer(config, args.out, progress=not args.no_progress, restart=args.restart, compile=args.compile,
                      tracker=args.tracker)
    with training_lease(args.out, trainer.parallel.is_main) as lost:  # the run's claim: one `fwbw train` per --out
        trainer.stop = lost
        summary = trainer.run()
        if args.cut:
            cut_and_sample(trainer)
    leave_process_group()
    if trainer.parallel.is_main:
        print(json.dumps({k: summary[k] for k in ("final_val_loss_fw", "final_val_loss_bw", "num_params", "leaks_labels")}))
    return 0


def sweep_spec_from_args(args: argparse.Namespace) -> SweepSpec:
    return build_sweep_spec(args.preset, args.config, overrides(args))


def cmd_sweep(args: argparse.Namespace) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("a sweep is not started by torchrun: give it --nproc-per-run N to train each run on N processes")
    terminate_on_sigterm()  # a killed sweep stops its workers and torchrun processes first
    spec = sweep_spec_from_args(args)
    shard = parse_shard(args.shard)
    execution = Execution(nproc_per_run=args.nproc_per_run, nodes_per_run=args.nodes_per_run, compile=args.compile,
                          tracker=args.tracker, lease_s=args.lease_minutes * 60)
    if args.dry_run:
        print(describe_runs(spec, device_memory_gib=args.device_memory, nproc_per_run=execution.ranks.world_size))
        return 0
    if args.out is None:
        raise ValueError("--out: give the sweep's folder, e.g. --out runs/grid")
    check_run_dir(args.out)
    assignment = Assignment(args.out, shard, args.retry_failed, not args.no_progress, execution)
    outcome = launch_sweep(spec, launch_from_args(args), assignment)
    if outcome is None:  # jobs submitted, not waited for
        return 0
    left = list(outcome.values()).count(LEFT)  # ray, slurm --wait: runs unfinished once the workers ended
    if left:
        print(f"fwbw sweep: {plural(left, 'run')} left unfinished: rerun the sweep to finish them "
              f"(exit status {EXIT_RUNS_LEFT})", file=sys.stderr, flush=True)
    print(f"sweep {args.out}: {outcome_counts(as_recorded(args.out, outcome))}")
    return EXIT_RUNS_LEFT if left else 1 if "failed" in outcome.values() else 0


def launch_from_args(args: argparse.Namespace) -> Launch:
    """The launcher and its options: the flags given, and the sweep file's [slurm] table."""
    given = {name: getattr(args, name) for name in ("launcher", *OPTION_LAUNCHERS)}
    given["gpus"] = () if args.gpus is None else parse_gpus(args.gpus)
    return Launch(**given, slurm_options=slurm_options(args.config))


def cmd_cut(args: argparse.Namespace) -> int:
    for row in cut_run(args.run, progress=not args.no_progress):
        fw, bw = row["metrics"]["fw"], row["metrics"]["bw"]
        print(f"blocks {row['blocks_remaining']:>3}: fw loss {fw['loss']:.4f}  bw loss {bw['loss']:.4f}")
    return 0


def cmd_samples(args: argparse.Namespace) -> int:
    given = {key: getattr(args, key) for key in ("prompts", "new_tokens") if key in args}
    for i, sample in enumerate(write_samples(args.run, **given)["samples"], start=1):
        print(f"sample {i} (validation token {sample['position']}):")
        for key in ("bw", "prompt", "fw"):  # in reading order: bw continues the prompt leftwards
            text = "none: the bw mask reads its own labels" if sample[key] is None else json.dumps(sample[key])
            print(f"  {key:<6}  {text}")
    return 0


def check_results_writable(sweep: Path) -> None:
    """Before any work: `sweep` is a sweep directory and its results table can be written."""
    read_sweep(sweep)
    check_writable(sweep, "cannot write the results table: ")


def cmd_results(args: argparse.Namespace) -> int:
    check_results_writable(args.sweep)
    table = summary_table(write_results(args.sweep))
    print(table.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    print("\n".join(status_lines(args.sweep)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    out = args.out or args.sweep / "report"
    check_run_dir(out)
    check_results_writable(args.sweep)
    from fwbw.analysis.report import write_report

    write_results(args.sweep)
    print(write_report(args.sweep, out))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    check_run_dir(args.out)  # before importing matplotlib
    from fwbw.analysis.report import write_report

    run_sweep(build_sweep_spec("demo"), args.out, progress=not args.no_progress)
    if args.retrieval:
        retrieve_sweep(args.out, Plan(DEMO_RETRIEVAL_TASK), progress=not args.no_progress)
    report = write_report(args.out, args.out / "report")
    table = summary_table(build_results(args.out))
    print(table.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    print(f"report: {report}")
    return 0


def cmd_retrieval_data(args: argparse.Namespace) -> int:
    check_run_dir(args.out)
    splits = {split: load_task(args.task, split) for split in task_splits(args.task)}
    write_beir(splits, args.out)
    counts = "; ".join(f"{split} {len(b.queries)} queries, {sum(map(len, b.qrels.values()))} judgements"
                       for split, b in splits.items())
    print(f"{args.out}: {len(next(iter(splits.values())).corpus)} documents; {counts}")
    return 0


def cmd_retrieval(args: argparse.Namespace) -> int:
    """BM25 (--bm25), one finished run (RUN_DIR) or every finished run of a sweep (SWEEP_DIR)."""
    if args.bm25:
        return _retrieval_bm25(args)
    if args.target is None:
        raise ValueError("give a RUN_DIR or a SWEEP_DIR to evaluate, or --bm25")
    if (args.target / SWEEP_FILE).is_file():
        return _retrieval_sweep(args)
    return _retrieval_run(args)


def _retrieval_bm25(args: argparse.Namespace) -> int:
    given = [flag for flag, value in _embedding_flags(args).items() if value]
    if args.target is not None or given:
        what = "RUN_DIR or SWEEP_DIR" if args.target is not None else given[0]
        raise ValueError(f"--bm25 takes no {what}: BM25 uses no run (a sweep's evaluation includes BM25)")
    return _retrieval_one(args, System())


def _retrieval_run(args: argparse.Namespace) -> int:
    if args.embed and len(args.embed) > 1:
        raise ValueError(f"--embed: a run is evaluated with one embed, got {' '.join(args.embed)} (a sweep takes several)")
    embed = args.embed[0] if args.embed else "fwbw"
    if args.fusion:
        raise ValueError("--fusion: a sweep's fusion; for one run give --fuse-from DEV_RERANK_RESULT")
    return _retrieval_one(args, System(args.target, embed, args.blocks, args.pooling, args.finetune_steps,
                                       args.finetune_seed, args.hard_negatives, args.chunk_tokens, args.partner,
                                       args.rerank, args.fuse_from, args.dtype, args.query_fillers,
                                       args.markers))


def _embedding_flags(args: argparse.Namespace) -> dict[str, object]:
    return {"--embed": args.embed, "--blocks": args.blocks, "--pooling": args.pooling,
            "--finetune-steps": args.finetune_steps, "--finetune-seed": args.finetune_seed,
            "--hard-negatives": args.hard_negatives, "--chunk-tokens": args.chunk_tokens, "--partner": args.partner,
            "--query-fillers": args.query_fillers, "--markers": args.markers,
            "--rerank": args.rerank, "--fuse-from": args.fuse_from, "--fusion": args.fusion}


def _retrieval_one(args: argparse.Namespace, system: System) -> int:
    if args.out is None:
        raise ValueError("--out: give the folder for the result")
    check_run_dir(args.out)
    cache = args.out / "cache" if args.cache_dir is None else args.cache_dir
    outcome = run_retrieval(args.out, args.task, args.split, system, cache_dir=cache, device=args.device,
                            progress=not args.no_progress)
    metrics = outcome.metrics
    shown = "  ".join(f"{name} {metrics[name]:.4f}" for name in RETRIEVAL_METRICS)
    done = "finished before, skipped" if outcome.skipped else f"{metrics['seconds']:.1f} s"
    print(f"{args.out}: {shown} ({metrics['n_queries']} queries, {metrics['n_docs']} documents; {done})")
    return 0


def _retrieval_sweep(args: argparse.Namespace) -> int:
    for flag, value in (("--out", args.out), ("--cache-dir", args.cache_dir)):
        if value is not None:
            raise ValueError(f"{flag}: a sweep's results go under {args.target}/retrieval, so give no {flag}")
    for flag, value in (("--partner", args.partner), ("--fuse-from", args.fuse_from)):
        if value is not None:
            raise ValueError(f"{flag}: a sweep chooses it for each run (the next seed; the dev rerank), so give no {flag}")
    if args.fusion and args.rerank is None:
        raise ValueError("--fusion: fuses each run's rerank with BM25; give --rerank K too")
    check_cache_gb(args.cache_gb)
    for embed in args.embed or DEFAULT_EMBEDS:
        check_query_fillers(args.query_fillers, args.finetune_steps, args.pooling, embed)
    check_results_writable(args.target)
    plan = Plan(args.task, args.split, tuple(args.embed or DEFAULT_EMBEDS), args.blocks, args.pooling,
                args.finetune_steps, args.finetune_seed, args.hard_negatives, args.chunk_tokens, args.rerank, args.fusion,
                args.dtype, args.cache_gb, query_fillers=args.query_fillers, markers=args.markers)
    outcome, left_out = retrieve_sweep(args.target, plan, device=args.device, progress=not args.no_progress)
    for line in left_out:
        print(f"left out: {line}")
    table = build_retrieval_results(args.target)
    print(table[RETRIEVAL_SHOWN].to_string(index=False, na_rep="", float_format=lambda x: f"{x:.4f}"))
    counts = ", ".join(f"{list(outcome.values()).count(status)} {status}" for status in ("done", "skipped"))
    print(f"retrieval {args.target}: {counts} (finished before)")
    return 0


def check_cache_gb(cache_gb: float) -> None:
    if not 0 < cache_gb < math.inf:
        raise ValueError(f"--cache-gb: expected a size in GB above 0, got {cache_gb}")


def cmd_retrieval_study(args: argparse.Namespace) -> int:
    """docs/retrieval-plan.md's evaluations over a finished sweep of the retrieval preset."""
    check_cache_gb(args.cache_gb)
    check_results_writable(args.sweep)
    run_study(args.sweep, args.dtype, args.device, progress=not args.no_progress, cache_gb=args.cache_gb)
    print(f"retrieval study {args.sweep}: done; `fwbw report {args.sweep}` shows it")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from fwbw.training.bench import format_table, run_bench, select_shapes

    result = run_bench(select_shapes(args.shape), device=args.device, dtype=args.dtype, steps=args.steps,
                       warmup=args.warmup, progress=not args.json, compile=args.compile)
    if is_main_process():
        print(json.dumps(result, indent=2) if args.json else format_table(result))
    leave_process_group()
    return 0


def lease_minutes(text: str) -> float:
    """--lease-minutes: a finite number of minutes > 0 (argparse names the flag in its error)."""
    try:
        minutes = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of minutes, got {text!r}") from None
    if not valid_lease(minutes):
        raise argparse.ArgumentTypeError(f"must be a finite number of minutes > 0, got {text}")
    return minutes


def add_compile_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="torch.compile the model's blocks (default: on CUDA, and on CPU for runs of 1000+ steps, where "
                        "it pays for its ~20 s of compiling; bench: on)")


def add_tracker_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracker", choices=TRACKERS, default="none",
                        help="also send every eval point to TensorBoard (RUN/tensorboard), Weights & Biases (offline "
                        "in RUN/wandb unless logged in) or MLflow (MLFLOW_TRACKING_URI, else SWEEP/mlflow.db); "
                        "metrics.jsonl stays the record (none)")


def add_launcher_flags(parser: argparse.ArgumentParser) -> None:
    """`fwbw sweep`'s launchers (fwbw.study.launchers) and their options."""
    group = parser.add_argument_group("launchers (README: Running on a cluster)")
    add = group.add_argument
    add("--launcher", choices=list(LAUNCHERS), default="local",
        help="local: this machine (default); slurm: a job array of pull-workers (submitit); ray: pull-worker Ray "
        "tasks (exit status 3 if runs are left)")
    add("--workers", type=int, metavar="N",
        help="local: N worker processes pulling runs (1: this process); ray: a local Ray of N x --cpus-per-run CPUs")
    add("--gpus", metavar="0,1,...",
        help="local: one worker per GPU, pinned with CUDA_VISIBLE_DEVICES (indices of the GPUs this process sees: "
        "inside CUDA_VISIBLE_DEVICES=4,5,6,7, 0 is GPU 4)")
    add("--gpus-per-run", type=int, metavar="N",
        help="slurm, ray: GPUs per run, per node with --nodes-per-run (default, per process of a run: slurm 1 only "
        "with --device cuda; ray 1 unless the runs' device is cpu, 0 on a cluster without GPUs)")
    add("--cpus-per-run", type=int, metavar="N",
        help="slurm, ray: CPU cores per run, per node with --nodes-per-run (default: one per process of a run)")
    add("--slurm-partition", metavar="NAME")
    add("--slurm-time", type=int, metavar="MINUTES",
        help=f"each job's time limit ({SLURM_MINUTES}); 90 s before it the job releases its run and is requeued, "
        "resuming it from its checkpoints")
    add("--slurm-max-parallel", type=int, metavar="N",
        help="pull-worker jobs in the array, all allowed to run at once (default: one per pending run); the "
        "sweep file's [slurm] table adds #SBATCH options")
    add("--wait", action="store_true",
        help="slurm: block until the jobs end (watched with squeue: no accounting needed), then rebuild the results "
        "table; exit status 3 if runs are left unfinished (rerun the sweep), 1 if some failed")
    add("--ray-address", metavar="ADDRESS", help="ray: an existing cluster (auto, or ray://HOST:10001), else a local Ray")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fwbw", description="fw/bw causal-mask training of hlb-gpt, and what it does")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one model")
    flags = ConfigFlags(train, "training (defaults: TrainConfig, or the --config file)")
    add_train_flags(flags)
    flags.add("--depth", type=int, help=f"blocks ({DEFAULTS.depth})")
    flags.add("--width", type=int, help=f"model width ({DEFAULTS.width})")
    flags.add("--model-scale", type=float, help="hlb-gpt's sizing instead of --depth/--width: 1 gives depth 8, width 384")
    flags.add("--p-bw", type=float, help=f"probability of the bw task per step ({DEFAULTS.p_bw:g})")
    flags.add("--seed", type=int, help=f"({DEFAULTS.seed})")
    train.add_argument("--config", type=Path, help="a TrainConfig file: a run's config.json, or TOML / YAML (flags given override it)")
    train.add_argument("--out", type=Path, required=True, help="run directory (resumed if it holds this config's run)")
    train.add_argument("--restart", action="store_true", help="start over: remove the run --out holds first")
    train.add_argument("--cut", action="store_true", help="then the layer cut (cut.json) and samples (samples.json), as a sweep does")
    add_compile_flag(train)
    add_tracker_flag(train)
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(handler=cmd_train)

    sweep = commands.add_parser("sweep", help="train a grid of settings x seeds, then cut each run layer by layer")
    flags = ConfigFlags(sweep, "grid and training (defaults: SweepSpec and TrainConfig; presets < --config < flags)")
    add_train_flags(flags)
    flags.add("--depths", type=int, nargs="+")
    flags.add("--widths", type=int, nargs="+")
    flags.add("--model-scales", type=float, nargs="+", help="hlb-gpt's sizing instead of --depths x --widths")
    flags.add("--p-bw", type=float, nargs="+")
    flags.add("--seeds", type=int, help="runs per setting")
    flags.add("--seed", type=int, help=f"first seed ({SweepSpec.first_seed})")
    flags.add("--tokens-per-microbatch-rule", choices=TOKENS_PER_MICROBATCH_RULES,
              help="study: each model size's tokens per microbatch as the study sized them (the paper preset's)")
    sweep.add_argument("--preset", help=" | ".join(PRESETS))
    sweep.add_argument("--config", type=Path,
                       help="a sweep file (TOML, YAML or JSON): depths, widths, model_scales, p_bw, seeds, seed, "
                       "tokens_per_microbatch_rule, extra_runs and TrainConfig fields (flags given override it)")
    sweep.add_argument("--out", type=Path, help="the sweep's folder (needed unless --dry-run)")
    sweep.add_argument("--shard", default="0/1", help="i/n: run every n-th run starting at i")
    sweep.add_argument("--retry-failed", action="store_true")
    sweep.add_argument("--nproc-per-run", type=int, default=1, metavar="N",
                       help="train each run with N data-parallel processes (torchrun on this machine: one per GPU; "
                       "with --nodes-per-run, N on each node)")
    sweep.add_argument("--nodes-per-run", type=int, metavar="N",
                       help="slurm: train each run on N nodes of one job (srun starts torchrun on each; they meet at "
                       "a c10d rendezvous on the job's first node)")
    sweep.add_argument("--lease-minutes", type=lease_minutes, default=LEASE_S / 60, metavar="M",
                       help="a worker's claim on a run that has had no heartbeat for M minutes is taken over by "
                       f"another worker, on any host ({LEASE_S / 60:g})")
    add_compile_flag(sweep)
    add_tracker_flag(sweep)
    add_launcher_flags(sweep)
    sweep.add_argument("--dry-run", action="store_true", help="print the runs and the compute estimate")
    sweep.add_argument("--device-memory", type=float, metavar="GIB", help="--dry-run: warn against this device memory, not this machine's")
    sweep.add_argument("--no-progress", action="store_true")
    sweep.set_defaults(handler=cmd_sweep)

    cut = commands.add_parser("cut", help="layer-cut evaluation of a finished run")
    cut.add_argument("run", type=Path)
    cut.add_argument("--no-progress", action="store_true")
    cut.set_defaults(handler=cmd_cut)

    samples = commands.add_parser("samples", help="(re)write and print a finished run's greedy fw and bw continuations")
    samples.add_argument("run", type=Path)
    samples.add_argument("--prompts", type=int, default=argparse.SUPPRESS, help="held-out prompts (default: as in a sweep)")
    samples.add_argument("--new-tokens", type=int, default=argparse.SUPPRESS, help="tokens generated each way (default: as in a sweep)")
    samples.set_defaults(handler=cmd_samples)

    results = commands.add_parser("results", help="rebuild and summarise a sweep's results table")
    results.add_argument("sweep", type=Path)
    results.set_defaults(handler=cmd_results)

    status = commands.add_parser("status", help="where each run of a sweep stands: status, host, tokens / budget, "
                                 "last heartbeat, ETA, and the totals")
    status.add_argument("sweep", type=Path)
    status.set_defaults(handler=cmd_status)

    report = commands.add_parser("report", help="write a sweep's report: HTML, Markdown, figures and CSVs")
    report.add_argument("sweep", type=Path)
    report.add_argument("--out", type=Path, help="folder for the report (default: SWEEP/report)")
    report.set_defaults(handler=cmd_report)

    demo = commands.add_parser("demo", help="the cpu-small grid plus two p_bw = 1 runs (causal and legacy-flip) on the embedded data, then the report")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--retrieval", action="store_true",
                      help=f"then evaluate BM25 and each finished run (fw and fwbw embeds, zero-shot) on the "
                      f"{DEMO_RETRIEVAL_TASK} task's dev queries for the report's retrieval section (a run trained "
                      "on another corpus than wiki-sample-v2 is left out)")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(handler=cmd_demo)

    retrieval_data = commands.add_parser("retrieval-data", help="export a retrieval task in BEIR's format")
    retrieval_data.add_argument("--task", required=True, help="description | ict | title | beir:DIR")
    retrieval_data.add_argument("--out", type=Path, required=True,
                                help="folder for corpus.jsonl, queries.jsonl and qrels/dev.tsv and test.tsv "
                                "(those the task has)")
    retrieval_data.set_defaults(handler=cmd_retrieval_data)

    retrieval = commands.add_parser(
        "retrieval", help="evaluate BM25, a finished run's embeddings, or every finished run of a sweep on a retrieval task")
    retrieval.add_argument("target", type=Path, nargs="?",
                           help="a finished run, or a sweep: BM25 and every finished run, under SWEEP/retrieval "
                           "(resumable), then its retrieval table")
    retrieval.add_argument("--task", required=True, help="description | ict | title | beir:DIR (a BEIR folder)")
    retrieval.add_argument("--split", choices=QUERY_SPLITS, default="dev",
                           help="the queries: dev, what choices are made on (default), or test, what is reported "
                           "(a BEIR folder's qrels/dev.tsv or qrels/test.tsv)")
    retrieval.add_argument("--bm25", action="store_true", help="evaluate BM25 (no run)")
    retrieval.add_argument("--embed", nargs="+", choices=[*EMBEDS, CONTROL_EMBED],
                           help="token embeddings: fw, bw, both (fwbw), echo (a fw pass over the text read twice, its "
                           "second copy's states: a fw-only baseline), around (the fw state before each token and the bw "
                           "state after it, the two that predict it) or fwfw (fwbw's control: the fw views of the run "
                           f"and of --partner) (a run: one, fwbw; a sweep: {' '.join(DEFAULT_EMBEDS)})")
    retrieval.add_argument("--partner", type=Path,
                           help="--embed fwfw's second run, of the run's setting (a sweep pairs each run with the next seed)")
    retrieval.add_argument("--chunk-tokens", type=int,
                           help="embed a text longer than N tokens in chunks of N, each starting N/2 after the one before, "
                           "every chunk's token vectors entering MaxSim (default: the run's context; half of it for "
                           "--embed echo, which reads each chunk twice)")
    retrieval.add_argument("--query-fillers", type=int, default=0, metavar="N",
                           help="query augmentation (zero-shot): read each query with N filler tokens, after it for fw and "
                           "before it for bw, and embed their states too (default 0)")
    retrieval.add_argument("--markers", action="store_true",
                           help="read each query after the marker 'query: ' and each document after 'passage: ' (E5's "
                           "prefixes; ColBERT's [Q] and [D]), in fine-tuning too")
    retrieval.add_argument("--rerank", type=int, metavar="K",
                           help="rerank BM25's K best documents of each query by the run's score instead of searching all")
    retrieval.add_argument("--fuse-from", type=Path, metavar="DEV_RESULT",
                           help="with --rerank: order the candidates by a fusion of both scores, its weight tuned on "
                           "this finished --rerank result of the same system on the dev queries")
    retrieval.add_argument("--fusion", action="store_true",
                           help="a sweep: with --rerank, each run's fusion, tuned on its dev rerank (run that first)")
    retrieval.add_argument("--dtype", choices=list(MAXSIM_DTYPES), default="fp32",
                           help="MaxSim's similarities in fp32 (default) or bf16 (about 3x faster where the CPU or GPU "
                           "has bf16 matmuls; near-ties may swap)")
    retrieval.add_argument("--cache-gb", type=float, default=DEFAULT_CACHE_GB,
                           help=f"a sweep: trim its token cache to this size after each result (default {DEFAULT_CACHE_GB:g})")
    retrieval.add_argument("--blocks", type=int, help="embed the states after the first N blocks (default: all)")
    retrieval.add_argument("--pooling", choices=POOLINGS, help="a single-vector baseline instead of late interaction")
    retrieval.add_argument("--finetune-steps", type=int, default=0,
                           help="contrastive fine-tuning steps on the task's training pairs first (0: zero-shot)")
    retrieval.add_argument("--finetune-seed", type=int, default=0,
                           help="the fine-tuning's seed (its batches' order; default 0)")
    retrieval.add_argument("--hard-negatives", choices=["bm25"],
                           help="fine-tune with one hard negative per pair: the training document BM25 ranks "
                           "highest for its query that is no positive (default: in-batch negatives only)")
    retrieval.add_argument("--out", type=Path, help="the result's folder (a run or --bm25)")
    retrieval.add_argument("--cache-dir", type=Path,
                           help="fp16 token cache, shareable by results of the same run (default: OUT/cache)")
    retrieval.add_argument("--device", choices=DEVICES, default="auto")
    retrieval.add_argument("--no-progress", action="store_true")
    retrieval.set_defaults(handler=cmd_retrieval)

    study = commands.add_parser(
        "retrieval-study", help="the retrieval study over a sweep of the retrieval preset: dev before test "
        "(docs/retrieval-plan.md; resumable)")
    study.add_argument("sweep", type=Path, help="a sweep of --preset retrieval (its finished runs are evaluated)")
    study.add_argument("--dtype", choices=list(MAXSIM_DTYPES), default="fp32", help="MaxSim's similarities (as retrieval)")
    study.add_argument("--cache-gb", type=float, default=DEFAULT_CACHE_GB,
                       help=f"trim the sweep's token cache to this size after each result (default {DEFAULT_CACHE_GB:g}; "
                       "a cache that holds every run's corpus saves encoding it again for the reranks)")
    study.add_argument("--device", choices=DEVICES, default="auto")
    study.add_argument("--no-progress", action="store_true")
    study.set_defaults(handler=cmd_retrieval_study)

    bench = commands.add_parser("bench", help="peak matmul throughput, training tokens/s and MFU on this device")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.add_argument("--shape", nargs="+", help="standard model shapes to time, by name (default: all)")
    bench.add_argument("--steps", type=int, default=6, help="timed steps per measurement (median)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    bench.add_argument("--device", choices=DEVICES, default="auto")
    bench.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto")
    add_compile_flag(bench)
    bench.set_defaults(handler=cmd_bench)
    return parser


def error_line(error: Exception) -> str:
    """The error in one line; a raw OS error names its file first ('x.json: no such file')."""
    if isinstance(error, OSError) and error.filename is not None:
        reason = "no such file" if isinstance(error, FileNotFoundError) else error.strerror
        return f"{error.filename}: {reason}"
    return str(error)


def main(argv: list[str] | None = None) -> int:
    """Errors end in one line and exit 2; Ctrl-C in one line and exit 130 (128 + SIGINT)."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, RuntimeError, OSError) as error:
        if os.environ.get("FWBW_DEBUG"):
            raise
        print(f"fwbw {args.command}: error: {error_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(f"fwbw {args.command}: {str(interrupt) or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
