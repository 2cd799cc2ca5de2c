"""A grid of settings x seeds, each trained (resumably) and then cut layer by layer, in a sweep
directory (fwbw.study.sweep_dir). A run id is derived from its config, so rerunning a sweep finds
finished work and skips it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from fwbw.data.tokenizer import vocab_size_of
from fwbw.files import atomic_write_json
from fwbw.model.config import shape_for_model_scale
from fwbw.model.hlb_gpt import count_params, training_flops_per_token
from fwbw.schema import ConfigError, check_fields, require, show
from fwbw.study.estimate import (
    MachineTimer,
    ShapeTimer,
    SweepTimes,
    plural,
    short_duration,
)
from fwbw.study.results import write_results
from fwbw.study.samples import write_samples
from fwbw.study.sweep_dir import RUNS, SWEEP_FILE, check_owner, read_sweep
from fwbw.study.torchrun import Ranks, train_in_processes
from fwbw.training.config import TrainConfig
from fwbw.training.evaluation import write_cut
from fwbw.training.memory import (
    DeviceMemory,
    device_memory,
    estimate_memory,
    given_memory,
    short_bytes,
)
from fwbw.training.run_dir import (
    LEASE_S,
    LeaseLost,
    claim,
    config_id,
    hold,
    passed_on,
    read_status,
    release,
    valid_lease,
    write_status,
)
from fwbw.training.trainer import Trainer

T = TypeVar("T")
# hlb-gpt's model at model_scale 1 (width 384, 8 blocks, V 50,304): the size s = 1 of the study's rule
REFERENCE_PARAMS = 46_009_736
TOKENS_PER_MICROBATCH_RULES = ("study",)
MAX_GRID_RUNS = 10_000  # a larger grid is a typo (--seeds 1000000000): refused before its runs are listed
FILE_KEYS = {"p_bws": "p_bw", "first_seed": "seed"}  # SweepSpec fields that files and flags spell otherwise
GRID_AXIS_OF = {"depth": "depths", "width": "widths", "model_scale": "model_scales"}  # run field -> its grid axis


def study_tokens_per_microbatch(num_params: int) -> int:
    """The study's token capacity per microbatch for a model of num_params parameters, of size
    s = num_params / REFERENCE_PARAMS: 57,236 tokens at s = 1, fewer for larger models."""
    size = num_params / REFERENCE_PARAMS
    return math.floor(114688 / (1.52174 + 0.482 * size**0.87))


def with_study_tokens(config: TrainConfig) -> TrainConfig:
    """`config` with the study's tokens per microbatch for its own model."""
    recipe = dataclasses.replace(config.recipe, tokens_per_microbatch=study_tokens_per_microbatch(config.num_params()))
    return dataclasses.replace(config, recipe=recipe)


@dataclass(frozen=True)
class SweepSpec:
    """The grid: every model size x p_bw x seed, sharing the `base` training settings. The sizes
    are depths x widths, or hlb-gpt's model_scales (depths and widths None). With
    tokens_per_microbatch_rule "study", each grid run's recipe.tokens_per_microbatch is the study's
    for its model (fwbw.study.configure gives extra runs the rule too). Extra runs are trained
    alongside the grid."""

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
            require(self.depths is None and self.widths is None, "model_scales", "give model_scales or depths and widths, not both",
                    related=("depths", "widths"))
        for axis in ("depths", "widths", "model_scales", "p_bws"):
            _check_axis(FILE_KEYS.get(axis, axis), getattr(self, axis))
        require(self.seeds >= 1, "seeds", f"must be >= 1, got {self.seeds}")
        rule = self.tokens_per_microbatch_rule
        require(rule in (None, *TOKENS_PER_MICROBATCH_RULES), "tokens_per_microbatch_rule",
                f"must be one of {TOKENS_PER_MICROBATCH_RULES}, got {rule!r}")
        runs = len(self.sizes()) * len(self.p_bws) * self.seeds
        require(runs <= MAX_GRID_RUNS, "seeds", f"{self.seeds:,} per setting make {runs:,} runs, more than {MAX_GRID_RUNS:,}")
        ids = [run_id(config) for config in self.configs()]
        require(len(set(ids)) == len(ids), "extra_runs", "repeats a run of the grid or another extra run")

    def configs(self) -> list[TrainConfig]:
        """Every run: the grid, then the extra runs."""
        grid = [
            self._grid_run(size, p_bw, self.first_seed + offset)
            for size in self.sizes()
            for p_bw in self.p_bws
            for offset in range(self.seeds)
        ]
        return grid + list(self.extra_runs)

    def _grid_run(self, size: dict, p_bw: float, seed: int) -> TrainConfig:
        config = dataclasses.replace(self.base, **size, p_bw=p_bw, seed=seed)
        return with_study_tokens(config) if self.tokens_per_microbatch_rule else config

    def sizes(self) -> list[dict]:
        """Each grid size as a run's depth, width and model_scale."""
        if self.model_scales is None:
            return [dict(depth=depth, width=width, model_scale=None) for depth in self.depths for width in self.widths]
        return [dict(zip(("depth", "width"), shape_for_model_scale(s)), model_scale=s) for s in self.model_scales]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_axis(key: str, values: tuple | None) -> None:
    if values is None:
        return
    require(len(values) > 0, key, "needs at least one value")
    for value in values:
        require(values.count(value) == 1, key, f"repeats {show(value)}")


# Approximate training-split sizes, for --dry-run before any data is downloaded or tokenized.
KNOWN_TRAIN_TOKENS = {"wikitext-103": 118_000_000, "wikitext-2": 2_400_000, "wiki-sample": 1_190_000,
                      "wiki-sample-v2": 1_000_000}


def estimated_split_tokens(config: TrainConfig) -> float:
    """The training split's size in tokens, before any data is downloaded or tokenized."""
    if config.data.startswith("text:"):
        whole = (Path(config.data.removeprefix("text:")) / "train.txt").stat().st_size / 4  # ~4 bytes per BPE token
    else:
        whole = KNOWN_TRAIN_TOKENS[config.data]
    return whole * config.train_fraction


def estimated_train_tokens(config: TrainConfig) -> int:
    return config.train_tokens or int(config.epochs * estimated_split_tokens(config))


def short_count(n: float) -> str:
    """A count to three significant digits with a k, M or G suffix (3.00k, 46.0M, 1.18G); below
    1,000 the count itself."""
    for suffix, unit in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= unit:
            value = n / unit
            return f"{value:.{max(0, 2 - int(math.log10(value)))}f}{suffix}"
    return f"{n:.0f}"


def describe_runs(
    spec: SweepSpec, time_shape: ShapeTimer | None = None, device_memory_gib: float | None = None,
    nproc_per_run: int = 1,
) -> str:
    """The run list with parameter counts, estimated peak memory (of each of nproc_per_run
    processes), a compute estimate and the expected wall time on this machine in one process, each
    run shape timed by `time_shape` (default: a MachineTimer) (--dry-run). A warning line follows
    the runs whose peak exceeds their device's memory, or `device_memory_gib` if given."""
    given_limit = None if device_memory_gib is None else given_memory(device_memory_gib)
    configs = spec.configs()
    times = SweepTimes(configs, time_shape or MachineTimer())
    lines, peaks, total = [], [], 0.0
    for config in configs:
        vocab_size = vocab_size_of(config.tokenizer)
        model = config.model_config(vocab_size)
        tokens = estimated_train_tokens(config)
        tasks = 1 + config.p_bw if config.bw_mode == "add" else 1
        flops = training_flops_per_token(model, config.seq_len) * tokens * tasks
        total += flops
        peaks.append(estimate_memory(config, vocab_size).total)
        lines.append(
            f"{run_id(config):<48} params {short_count(count_params(model)):>6}  tokens {short_count(tokens):>6}  "
            f"tokens/microbatch {config.recipe.tokens_per_microbatch:6d}  mem {short_bytes(peaks[-1]):>9}  "
            f"{flops:.2e} FLOP"
            + times.run_text(config, tokens, estimated_split_tokens(config))
        )
    lines += memory_warnings(configs, peaks, given_limit)
    if nproc_per_run > 1:
        lines.append(f"mem: of each of the {nproc_per_run} processes of a run (--nproc-per-run, times --nodes-per-run): a whole microbatch, "
                     "as each trains whole ones while a step has one for every process")
    seconds_h100 = total / (0.4 * 989e12)
    lines.append(f"{len(configs)} runs, {total:.2e} training FLOP: ~{short_duration(seconds_h100)} on one H100 at 40% MFU (bf16)")
    lines.append(times.total_line())
    return "\n".join(lines)


def memory_warnings(configs: list[TrainConfig], peaks: list[int], given_limit: DeviceMemory | None) -> list[str]:
    """A warning for each device memory (given, or that of the runs' device here) that some runs'
    estimated peak exceeds, naming the largest."""
    limits = {device: given_limit or device_memory(device) for device in {config.device for config in configs}}
    over: dict[DeviceMemory, list[tuple[int, str]]] = {}
    for config, peak in zip(configs, peaks):
        limit = limits[config.device]
        if limit is not None and peak > limit.bytes:
            over.setdefault(limit, []).append((peak, run_id(config)))
    return [
        f"warning: {plural(len(runs), 'run')} may run out of memory: estimated peak above {limit.label} "
        f"(largest {short_bytes(max(runs)[0])}: {max(runs)[1]})"
        for limit, runs in over.items()
    ]


def run_id(config: TrainConfig) -> str:
    """Readable and stable: the main settings (those at their defaults left out), then a hash of
    the whole config."""
    scale = "" if config.model_scale is None else f"-ms{config.model_scale:g}"
    heads = "" if config.num_heads == TrainConfig.num_heads else f"-h{config.num_heads}"
    adaptive = "-adapt" if config.adaptive_p_bw else ""
    mask = "" if config.bw_mask == TrainConfig.bw_mask else f"-{config.bw_mask}"
    data = "" if config.train_fraction == TrainConfig.train_fraction else f"-f{config.train_fraction:g}"
    replay = "-replay" if config.replay else ""
    settings = f"d{config.depth}-w{config.width}{scale}{heads}{data}-p{config.p_bw:g}{replay}{adaptive}{mask}"
    return f"{settings}-s{config.seed}-{config_id(config)[:8]}"


def select_shard(items: list[T], shard: tuple[int, int]) -> list[T]:
    """Every n-th item starting at the i-th, for shard (i, n)."""
    index, count = shard
    return [item for position, item in enumerate(items) if position % count == index]


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
        "eval": f"every {base.eval_every_epochs:g} epochs on {base.eval_tokens} fixed validation tokens"
                + (f" and {base.train_eval_tokens} fixed training-split tokens" if base.train_eval_tokens else ""),
        "tokens_per_microbatch": spec.tokens_per_microbatch_rule or base.recipe.tokens_per_microbatch,
        "device / dtype": f"{base.device} / {base.dtype}",
    }


def write_sweep_file(out: Path, spec: SweepSpec, configs: list[TrainConfig]) -> None:
    runs = {run_id(config): config.to_dict() for config in configs}
    # the file's tables are written with sorted keys: `order` keeps the grid's order, the order of work
    atomic_write_json(out / SWEEP_FILE, {"setup": setup_summary(spec), "spec": spec.to_dict(), "runs": runs,
                                         "order": list(runs)})


@dataclass(frozen=True)
class Execution:
    """How a sweep's runs are executed, which changes neither their results nor their ids: the
    data-parallel processes per run (nproc_per_run on each of nodes_per_run nodes of a SLURM job;
    None: on this machine), torch.compile (None: the device's default) and the tracker that also
    receives every eval point (fwbw.training.trackers)."""

    nproc_per_run: int = 1
    nodes_per_run: int | None = None
    compile: bool | None = None
    tracker: str = "none"
    lease_s: float = LEASE_S  # a worker's claim on a run goes stale this long after its last heartbeat

    def __post_init__(self) -> None:
        require(self.nproc_per_run >= 1, "--nproc-per-run", f"must be >= 1, got {self.nproc_per_run}")
        require(self.nodes_per_run is None or self.nodes_per_run >= 1, "--nodes-per-run",
                f"must be >= 1, got {self.nodes_per_run}")
        require(valid_lease(self.lease_s), "lease_s", f"must be a finite number of seconds > 0, got {self.lease_s:g}")

    @property
    def ranks(self) -> Ranks:
        """The processes that train one run."""
        return Ranks(self.nproc_per_run, self.nodes_per_run)


def cut_and_sample(trainer: Trainer) -> None:
    """The layer cut of a trained run (each rank cuts its share of the validation windows) and, from
    rank 0, its samples (samples.json); a failure to write the samples is printed, not raised."""
    write_cut(trainer.run_dir, trainer.model, trainer.valid, trainer.precision(), trainer.parallel)
    if not trainer.parallel.is_main:
        return
    try:
        write_samples(trainer.run_dir, device=str(trainer.device))
    except (ValueError, RuntimeError, OSError) as error:  # samples are extra: the trained run stays done
        print(f"{trainer.run_dir.name}: no samples.json: {error}", flush=True)


def train_and_cut(
    config: TrainConfig, run_dir: Path, progress: bool, execution: Execution = Execution(),
    stop: threading.Event | None = None,
) -> None:
    """Train the run (in this process, or in the processes of execution.ranks under torchrun, which
    write under this process's lease), then cut it layer by layer and write its samples; LeaseLost
    once `stop` is set."""
    if execution.ranks != Ranks(1):
        with passed_on(run_dir):
            train_in_processes(config, run_dir, execution.ranks, progress, execution.compile, execution.tracker, stop)
        return
    trainer = Trainer(config, run_dir, progress=progress, compile=execution.compile, tracker=execution.tracker,
                      stop=stop)
    trainer.run()
    cut_and_sample(trainer)


def _wants_training(run_dir: Path, retry_failed: bool) -> bool:
    status = read_status(run_dir)["status"]
    return not (status == "done" or (status == "failed" and not retry_failed))


def run_one(
    config: TrainConfig, run_dir: Path, retry_failed: bool, progress: bool, execution: Execution = Execution()
) -> str:
    """Train, cut and sample one run unless it is done, failed (without retry) or held by another
    worker; returns the status it ends with, or 'skipped'. Only an error of the run itself marks it
    failed: an interruption (Ctrl-C, a signal raised as KeyboardInterrupt or SystemExit, submitit's
    time-limit or preemption handling) releases it without a status, resumable, and is raised on."""
    if not _wants_training(run_dir, retry_failed) or not claim(run_dir, execution.lease_s):
        return "skipped"
    try:
        if not _wants_training(run_dir, retry_failed):  # finished by another worker meanwhile
            return "skipped"
        write_status(run_dir, "running")
        with hold(run_dir) as lost:
            train_and_cut(config, run_dir, progress, execution, lost)
        write_status(run_dir, "done")
        return "done"
    except LeaseLost:  # the run is another worker's now: its status is that worker's to write
        return "lost"
    except Exception as error:  # a failed run is recorded and the sweep goes on
        if is_interruption(error):
            _report_interruption(run_dir, error)
            raise
        return _record_failure(run_dir, error)
    except BaseException as interruption:  # KeyboardInterrupt, SystemExit: the worker stops here
        _report_interruption(run_dir, interruption)
        raise
    finally:
        release(run_dir)


def is_interruption(error: BaseException) -> bool:
    """Whether `error` stopped the run from outside rather than came from it: anything but an
    Exception (KeyboardInterrupt, SystemExit), and submitit's UncompletedJobError, which its
    signal handler raises where the job is when SLURM's time limit nears."""
    if not isinstance(error, Exception):
        return True
    return any(kind.__name__ == "UncompletedJobError" and kind.__module__.startswith("submitit")
               for kind in type(error).__mro__)


def _report_interruption(run_dir: Path, interruption: BaseException) -> None:
    if isinstance(interruption, SystemExit):
        reason = f"exit {interruption.code}"
    else:
        reason = (str(interruption).strip().splitlines() or [type(interruption).__name__])[-1]
    print(f"run {run_dir.name} interrupted ({reason}): released unfinished; rerun the sweep to resume it",
          file=sys.stderr, flush=True)


def _record_failure(run_dir: Path, error: Exception) -> str:
    """Report the failed run and mark it failed: 'failed'; when even that cannot be written (a full
    disk) say so and let the sweep go on, or 'lost' when the run is another worker's now."""
    message = f"{type(error).__name__}: {error}"
    print(f"run {run_dir.name} failed: {message}", file=sys.stderr)
    if os.environ.get("FWBW_DEBUG"):
        traceback.print_exc()
    try:
        write_status(run_dir, "failed", message)
    except LeaseLost as lost:  # its status is the new holder's to write
        print(f"run {run_dir.name}: status not recorded: {lost}", file=sys.stderr)
        return "lost"
    except OSError as status_error:
        print(f"run {run_dir.name}: status not recorded: {status_error}", file=sys.stderr)
    return "failed"


def run_sweep(
    spec: SweepSpec,
    out: Path,
    shard: tuple[int, int] = (0, 1),
    retry_failed: bool = False,
    progress: bool = True,
    execution: Execution = Execution(),
) -> dict[str, str]:
    """Prepare the sweep directory, then run this worker's share of the grid (work)."""
    prepare_sweep(spec, out)
    return work(out, shard, retry_failed, progress, execution)


def prepare_sweep(spec: SweepSpec, out: Path) -> None:
    """Write sweep.json, the runs every worker pulls from; a directory that holds another spec's
    sweep is refused before anything is written."""
    out = Path(out)
    check_owner(out, spec.to_dict())
    write_sweep_file(out, spec, spec.configs())


def sweep_runs(out: Path, shard: tuple[int, int] = (0, 1)) -> dict[str, TrainConfig]:
    """The runs of a prepared sweep (sweep.json) in grid order (a sweep.json without one: by run id),
    this shard's share of them."""
    sweep = read_sweep(out)
    runs = sweep["runs"]
    mine = select_shard(sweep.get("order", list(runs)), shard)
    return {identifier: TrainConfig.from_dict(runs[identifier]) for identifier in mine}


def pending_runs(out: Path, shard: tuple[int, int] = (0, 1), retry_failed: bool = False) -> dict[str, TrainConfig]:
    """The runs of the shard that still want training: neither done nor (without retry) failed."""
    runs = sweep_runs(out, shard)
    return {identifier: config for identifier, config in runs.items()
            if _wants_training(Path(out) / RUNS / identifier, retry_failed)}


def work(
    out: Path,
    shard: tuple[int, int] = (0, 1),
    retry_failed: bool = False,
    progress: bool = True,
    execution: Execution = Execution(),
) -> dict[str, str]:
    """One pull-worker on a prepared sweep: go through the shard's runs, training each one no
    other worker holds or finished (run_one's claim), each executed as `execution` says, and go
    through them again while the last pass claimed a run (one another worker released or left
    stale meanwhile); each run at most once. Then rebuild the results table. Any number of
    workers, on any machines sharing `out`, may work at once. Run id -> the status this worker
    ended it with, 'skipped' for runs it did not train."""
    out = Path(out)
    runs = sweep_runs(out, shard)
    outcome = dict.fromkeys(runs, "skipped")
    first_pass = True
    while True:
        claimed = False
        for position, (identifier, config) in enumerate(runs.items(), start=1):
            run_dir = out / RUNS / identifier
            if outcome[identifier] != "skipped" or not (first_pass or _wants_training(run_dir, retry_failed)):
                continue
            if progress:
                print(f"[{position}/{len(runs)}] {identifier}", file=sys.stderr)
            outcome[identifier] = run_one(config, run_dir, retry_failed, progress, execution)
            claimed = claimed or outcome[identifier] != "skipped"
        if not claimed:
            break
        first_pass = False
    write_results(out)
    return outcome
