"""The training loop: fw task every step, bw task with probability p_bw (fixed, or adapted after
every bw pass; added to the fw loss, or instead of it), hlb-gpt's recipe, fixed-set validation,
resumable checkpoints and the run directory's files (config.json, metrics.jsonl, summary.json,
model.safetensors)."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fwbw.data.corpora import TokenData, default_cache_dir, load_token_data
from fwbw.data.windows import WindowSampler, validation_windows
from fwbw.files import atomic_write_json, atomic_write_text
from fwbw.model.masks import DIRECTIONS, leaks_labels
from fwbw.model.tasks import task_stats, window_length
from fwbw.provenance import provenance
from fwbw.schema import ConfigError
from fwbw.training import checkpoint
from fwbw.training.allocator import tune_allocator
from fwbw.training.config import TrainConfig
from fwbw.training.data_parallel import from_environment, is_main_process, one_process_at_a_time
from fwbw.training.evaluation import EVAL_METRICS, eval_batch_size, evaluate
from fwbw.training.precision import resolve_device
from fwbw.training.probes import leak_summary
from fwbw.training.recipe import (
    Microbatching,
    batch_size_for,
    build_optimizer,
    dynamic_weight_decay,
    seq_len_at,
    set_weight_decay,
)
from fwbw.training.run_dir import (
    BEST_WEIGHTS,
    METRICS,
    SUMMARY,
    LeaseLost,
    check_fence,
    check_owner,
    check_run_dir,
    clear_outputs,
    config_id,
    start_run,
)
from fwbw.training.run_setup import RunSetup
from fwbw.training.trackers import EvalPoints, check_tracker
from fwbw.training.weight_average import WeightAverage, swapped_weights

P_BW_FLOOR = 0.01  # adaptive p_bw never drops below this (the study's clamp)
COMPILE_MIN_CPU_STEPS = 1000  # see compile_by_default
# what every checkpoint holds; one without them all was written by another version
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "sampler", "task_rng", "microbatching", "train_state")
REPLAY = "replay"  # the step-loss key of the replayed fw task
TOKENIZE_LOCK = ".tokenize.lock"  # in the token cache: see load_data_alone


class TrainingDiverged(RuntimeError):
    pass


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, with the step it came at: the command line prints it in one line."""


@dataclass
class TrainState:
    """Plain-data training state that goes into every checkpoint."""

    p_bw: float  # the bw task's probability now (moves only with adaptive_p_bw)
    last_fw_loss: float | None = None  # the mean fw loss of the latest step that trained fw
    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    eval_seconds: float = 0.0
    evals_done: int = 0
    loss_sum: float = 0.0
    loss_steps: int = 0
    metrics: list[dict] = field(default_factory=list)
    microbatch_split: int = 1  # each microbatch is trained in this many pieces (doubled on out of memory)
    memory_splits: list[dict] = field(default_factory=list)  # {step, split} at every doubling
    weight_decay: float = 0.0  # of the decay group, set after every step
    best_fw_loss: float | None = None  # the lowest validation fw loss so far (of the averaged weights with eval_ema)
    best_step: int | None = None
    evals_since_best: int = 0
    stopped_early: bool = False  # patience ran out before the budget

    @property
    def training_seconds(self) -> float:
        """Of the run so far, evaluation left out."""
        return self.seconds - self.eval_seconds


def adapted_p_bw(fw_loss: float, bw_loss: float) -> float:
    """clamp(ppl_bw / ppl_fw, 0.01, 1), with ppl = exp(loss)."""
    return max(P_BW_FLOOR, math.exp(min(0.0, bw_loss - fw_loss)))


def check_budget(config: TrainConfig, train_tokens: int, budget: int) -> None:
    """Fail before anything is written when the train split is shorter than one window or the
    token budget is smaller than one optimizer step."""
    window = window_length(config.seq_len, config.task_tokens)
    if train_tokens < window:
        raise ConfigError(f"seq_len: {config.seq_len} needs at least {window} training tokens, {config.data} has {train_tokens}")
    first_seq_len = seq_len_at(0, config.seq_len, config.recipe)
    step_tokens = batch_size_for(first_seq_len, config.recipe) * first_seq_len
    if budget < step_tokens:
        given = f"train_tokens: {budget} is" if config.train_tokens else f"epochs: {config.epochs:g} of {config.data} is {budget} tokens,"
        raise ConfigError(f"{given} fewer than one optimizer step ({step_tokens} tokens)")


def oversized_sets(config: TrainConfig, data: TokenData) -> list[str]:
    """A note for each fixed evaluation set asked larger than its split, which is then evaluated whole
    (not for the default eval_tokens, meant as "up to this many")."""
    asked = [("eval_tokens", config.eval_tokens, "validation", len(data.valid)),
             ("train_eval_tokens", config.train_eval_tokens, "training", len(data.train))]
    return [f"note: {name} {tokens:,} is more than the {split_tokens:,} tokens of the {split} split: evaluating all of them"
            for name, tokens, split, split_tokens in asked
            if tokens > split_tokens and tokens != getattr(TrainConfig, name)]


def compile_by_default(device: torch.device, expected_steps: float) -> bool:
    """Whether torch.compile pays off (docs/method.md#compilation): on CUDA always; on CPU, where
    it makes steps 5-15% faster after ~20 s of compiling, for runs of COMPILE_MIN_CPU_STEPS or more."""
    return device.type == "cuda" or expected_steps >= COMPILE_MIN_CPU_STEPS


def expected_steps(config: TrainConfig, budget: int) -> float:
    """Optimizer steps to the token budget at the recipe's initial accumulation."""
    return budget / (config.recipe.tokens_per_microbatch * config.recipe.accum_initial)


def compile_blocks(model) -> None:
    """torch.compile each block in place (its parameters and state-dict names stay as they are)."""
    for block in model.blocks:
        block.compile()


def check_shares(config: TrainConfig, world_size: int) -> None:
    """Every rank needs a window of each microbatch split among the ranks (DataParallel.part), also
    at the full sequence length."""
    windows = batch_size_for(config.seq_len, config.recipe)
    if windows < world_size:
        raise ConfigError(
            f"recipe.tokens_per_microbatch: {config.recipe.tokens_per_microbatch} tokens make {windows} windows of "
            f"seq_len {config.seq_len} per microbatch, fewer than the {world_size} ranks (each needs one)"
        )


def load_data_alone(config: TrainConfig, progress: bool) -> TokenData:
    """The run's tokens, loaded before this process joins the others of its run (so that a long
    download or tokenization cannot run into their COLLECTIVE_TIMEOUT) and by one process at a
    time: the first tokenizes into the cache, the others read it. Progress from rank 0 only."""
    with one_process_at_a_time(default_cache_dir() / TOKENIZE_LOCK):
        return load_token_data(config.data, config.tokenizer, progress=progress and is_main_process(),
                               train_fraction=config.train_fraction, subset_seed=config.subset_seed)


class Trainer(RunSetup):
    """Trains a run setup's model in its run directory, as one rank of the processes torchrun
    started (fwbw.training.data_parallel) or as a plain process. Only rank 0 writes."""

    def __init__(
        self, config: TrainConfig, run_dir: Path, data: TokenData | None = None, progress: bool = True,
        restart: bool = False, compile: bool | None = None, tracker: str = "none", stop: threading.Event | None = None,
    ):
        """`restart`: start over, removing the files of the run `run_dir` holds (see run_dir.start_run).
        `compile`: torch.compile the model's blocks (None: compile_by_default on the run's device).
        `tracker`: where rank 0 also sends every eval point (fwbw.training.trackers.TRACKERS).
        `stop`: once set (the sweep worker lost its lease on the run), the next step raises LeaseLost."""
        check_run_dir(run_dir)
        check_tracker(tracker)
        check_owner(run_dir, config, restart)
        tune_allocator()
        data = data or load_data_alone(config, progress)
        parallel = from_environment(resolve_device(config.device).type)
        check_shares(config, parallel.world_size)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        super().__init__(config, data, progress and parallel.is_main, parallel)
        if parallel.is_main:
            for note in oversized_sets(config, self.data):
                print(note, file=sys.stderr, flush=True)
        self.run_dir = Path(run_dir)
        self.restart = restart
        self.stop = stop
        self.tracker_name = tracker if parallel.is_main else "none"
        self.show_progress = progress and parallel.is_main
        self.num_params = self.model.num_params()
        self.optimizer, self.scheduler = build_optimizer(self.model, config.recipe)
        self.microbatching = Microbatching(self.num_params, config.recipe)
        self.sampler = WindowSampler(self.data.train, config.seed, remember=config.replay)
        self.task_rng = torch.Generator().manual_seed(config.seed + 1)
        self.replay_rng = torch.Generator().manual_seed(config.seed + 2)  # its own: the other draws stay those of fw alone
        self.budget = config.train_tokens or int(config.epochs * len(self.data.train))
        check_budget(config, len(self.data.train), self.budget)
        self.compiled = self._compile_decision(compile)
        if self.compiled:
            compile_blocks(self.model)
        self.average = WeightAverage(self.model, config.eval_ema) if config.eval_ema is not None else None
        # validation selects weights (kept in memory and checkpoints) with an EMA or early stopping;
        # without either, the last step's weights are the run's
        self.selects = config.eval_ema is not None or config.patience is not None
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.eval_directions = DIRECTIONS if config.evaluates_bw() else ("fw",)
        self.state = TrainState(p_bw=config.p_bw, weight_decay=self._weight_decay(None))
        set_weight_decay(self.optimizer, self.state.weight_decay)

    def _compile_decision(self, given: bool | None) -> bool:
        """`given` (the command line's), else the config's, else compile_by_default."""
        for decision in (given, self.config.compile):
            if decision is not None:
                return decision
        return compile_by_default(self.device, expected_steps(self.config, self.budget))

    # --- run directory -------------------------------------------------------------------

    def _write_metrics(self) -> None:
        if not self.parallel.is_main:
            return
        lines = "".join(json.dumps(m, sort_keys=True) + "\n" for m in self.state.metrics)
        check_fence(self.run_dir)  # LeaseLost once another worker holds the run
        atomic_write_text(self.run_dir / METRICS, lines)

    def _save_checkpoint(self) -> None:
        if not self.parallel.is_main:
            return
        checkpoint.save(
            self.run_dir,
            self.state.step,
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "sampler": self.sampler.state_dict(),
                "task_rng": self.task_rng.get_state(),
                "microbatching": self.microbatching.state_dict(),
                "train_state": self.state.__dict__,
                **self._selection_state(),
            },
            config_id(self.config),
        )

    def _selection_state(self) -> dict:
        """What the averaged weights, replay and early stopping add to a checkpoint."""
        state = {} if self.average is None else {"average": self.average.state_dict()}
        if self.config.replay:
            state["replay_rng"] = self.replay_rng.get_state()
        if self.config.dropout > 0:  # dropout draws from torch's global generator
            state["torch_rng"] = torch.get_rng_state()
        if self.best_weights is not None:
            state["best_weights"] = self.best_weights
        return state

    def _checkpoint_keys(self) -> tuple[str, ...]:
        optional = (("average", self.average is not None), ("replay_rng", self.config.replay),
                    ("torch_rng", self.config.dropout > 0))
        return CHECKPOINT_KEYS + tuple(key for key, present in optional if present)

    def _resume(self) -> None:
        """Continue from the newest checkpoint that loads; without one, start from scratch with
        the outputs of any earlier attempt removed, so the folder never mixes two runs."""
        warn = tqdm.write if self.parallel.is_main else lambda line: None
        saved = checkpoint.load_latest(self.run_dir, config_id(self.config), self._checkpoint_keys(), warn=warn,
                                       device=self.device)
        step = -1 if saved is None else int(saved["train_state"]["step"])
        if not self.parallel.same_everywhere(step):
            raise RuntimeError(f"{self.run_dir}: the ranks found different checkpoints (this one step {step}): "
                               "a run directory must be on a filesystem that every node shares")
        if saved is None:
            if self.parallel.is_main:
                clear_outputs(self.run_dir)
            return
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.sampler.load_state_dict(saved["sampler"])
        self.task_rng.set_state(saved["task_rng"])
        self.microbatching.load_state_dict(saved["microbatching"])
        if self.average is not None:
            self.average.load_state_dict(saved["average"])
        if self.config.replay:
            self.replay_rng.set_state(saved["replay_rng"])
        if self.config.dropout > 0:
            torch.set_rng_state(saved["torch_rng"])
        self.best_weights = saved.get("best_weights")
        self.state = TrainState(**saved["train_state"])
        if self.state.best_fw_loss is None and self.state.metrics:  # a checkpoint from before early stopping
            best = min(self.state.metrics, key=lambda record: record["fw_loss"])
            self.state.best_fw_loss, self.state.best_step = best["fw_loss"], best["step"]
        self._write_metrics()

    # --- training ------------------------------------------------------------------------

    def _directions(self) -> tuple[str, ...]:
        use_bw = torch.rand((), generator=self.task_rng).item() < self.state.p_bw
        if self.config.bw_mode == "either":
            return ("bw",) if use_bw else ("fw",)
        return DIRECTIONS if use_bw else ("fw",)

    def _grad_norm(self) -> float:
        norms = [p.grad.norm() for p in self.model.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(norms)).item()

    def _track_task_losses(self, losses: dict[str, float]) -> None:
        """Remember the step's fw loss and, with adaptive_p_bw, move p_bw after a bw pass."""
        if "fw" in losses:
            self.state.last_fw_loss = losses["fw"]
        if self.config.adaptive_p_bw and "bw" in losses and self.state.last_fw_loss is not None:
            self.state.p_bw = adapted_p_bw(self.state.last_fw_loss, losses["bw"])

    def train_step(self, directions: tuple[str, ...] | None = None) -> float:
        """One optimizer step over a dynamic number of microbatches on `directions` (default:
        drawn with p_bw, see TrainConfig); returns the mean task loss of the global batch."""
        recipe = self.config.recipe
        seq_len = seq_len_at(self.state.step, self.config.seq_len, recipe)
        batch_size = batch_size_for(seq_len, recipe)
        microbatches = self.microbatching.draw(self.task_rng)
        directions = directions or self._directions()
        length = window_length(seq_len, self.config.task_tokens)
        replay_earlier = self.config.replay and self.sampler.has_seen(length)
        replayed = self._replay(microbatches, batch_size, length) if replay_earlier else []
        batches = [self.sampler.sample(batch_size, length) for _ in range(microbatches)]
        if self.config.replay and not replay_earlier:  # the first step at this length: nothing earlier to replay
            replayed = self._replay(microbatches, batch_size, length)
        loss_sums = self._accumulate_in_memory(batches, directions, replayed)
        self.parallel.sum_gradients(self.model.parameters())
        tasks = directions + ((REPLAY,) if replayed else ())
        step_losses = {task: loss_sum / microbatches for task, loss_sum in zip(tasks, loss_sums)}
        mean_loss = sum(step_losses.values()) / len(tasks)
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(f"training loss became {mean_loss} at step {self.state.step}")
        if self.state.step % recipe.grad_norm_every == 0:
            self.microbatching.update(self.state.step, self._grad_norm())
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.weight_decay = self._weight_decay(step_losses)
        set_weight_decay(self.optimizer, self.state.weight_decay)
        self.state.step += 1
        self.state.tokens += microbatches * batch_size * seq_len
        self._track_task_losses(step_losses)
        if self.average is not None:
            self.average.update(self.model)
        return mean_loss

    def _replay(self, microbatches: int, batch_size: int, length: int) -> list[torch.Tensor]:
        """A replayed microbatch for each of the step's: windows of this length trained on before."""
        return [self.sampler.replay(batch_size, length, self.replay_rng) for _ in range(microbatches)]

    def _weight_decay(self, step_losses: dict[str, float] | None) -> float:
        """The decay group's weight decay for the next step: wd_constant, or hlb-gpt's dynamic one
        from the step's wd_loss (0 before the first step; an "either" step without fw keeps the
        last), times wd_scale."""
        config = self.config
        if config.wd_constant is not None:
            return config.wd_constant * config.wd_scale
        if step_losses is None:
            return 0.0
        if config.wd_loss == "fw":
            loss = step_losses.get("fw")
            if loss is None:
                return self.state.weight_decay
        else:
            loss = sum(step_losses.values()) / len(step_losses)
        return config.wd_scale * dynamic_weight_decay(loss, self.num_params, config.recipe)

    def _accumulate(self, batches: list[torch.Tensor], directions: tuple[str, ...],
                    replayed: list[torch.Tensor]) -> torch.Tensor:
        """Forward and backward of this rank's part of the step's microbatches (whole ones and
        shares: DataParallel.microbatches), each with its replayed windows, trained on fw; the
        per-task loss sums of its parts, on the device: directions, then the replay's."""
        loss_sums = torch.zeros(len(directions) + (1 if replayed else 0), dtype=torch.float64, device=self.device)
        count = len(batches)
        for index in self.parallel.microbatches(count):
            losses = self._accumulate_microbatch(batches[index], index, count, directions)
            if replayed:
                losses = torch.cat([losses, self._accumulate_microbatch(replayed[index], index, count, ("fw",))])
            loss_sums += losses
        return loss_sums

    def _accumulate_microbatch(self, windows: torch.Tensor, index: int, count: int,
                               directions: tuple[str, ...]) -> torch.Tensor:
        """Forward and backward of this rank's part of microbatch `index` of the step's `count`
        (DataParallel.part), in microbatch_split pieces. A piece p of the microbatch's windows m
        backpropagates its task losses L_p (means over its windows) weighted by |p| / |m| / count:
        the pieces of m, on whichever ranks, add up to L_m / count, so the gradients summed over
        ranks are those of the step's mean loss over its microbatches, as in one process. Returns
        the per-direction sums of |p| / |m| * L_p, on the device."""
        loss_sums = torch.zeros(len(directions), dtype=torch.float64, device=self.device)
        on_device = windows.to(self.device)  # once: the part and its pieces are views of it
        part = self.parallel.part(index, count, on_device)
        for piece in part.split(math.ceil(len(part) / self.state.microbatch_split)):
            with self.precision():
                stats = task_stats(self.model, piece, directions, accuracy=False, counted_windows=on_device)
                losses = torch.stack([stats[d][0] for d in directions])
            weight = len(piece) / len(windows)
            (losses.sum() * weight / count).backward()
            loss_sums += losses.detach() * weight
        return loss_sums

    def _accumulate_in_memory(self, batches: list[torch.Tensor], directions: tuple[str, ...],
                              replayed: list[torch.Tensor]) -> list[float]:
        """_accumulate, retried with each microbatch in twice as many pieces (the same tokens per
        step) whenever some rank runs out of memory; every rank retries together. The per-task loss
        sums over all ranks: one all-reduce carries them and whether some rank ran out of memory,
        and reading it is the step's one wait for the device."""
        tasks = len(directions) + (1 if replayed else 0)
        while True:
            sums = torch.zeros(tasks + 1, dtype=torch.float64, device=self.device)  # the loss sums, then out of memory
            try:
                sums[:tasks] = self._accumulate(batches, directions, replayed)
            except torch.OutOfMemoryError:
                sums[tasks] = 1  # handled below, once the traceback no longer holds the tensors
            *loss_sums, out_of_memory = self.parallel.all_reduce_sum(sums).tolist()
            if not out_of_memory:
                return loss_sums
            self._split_microbatches(largest_part=self.parallel.largest_part(len(batches), len(batches[0])))

    def _split_microbatches(self, largest_part: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        seq_len = seq_len_at(self.state.step, self.config.seq_len, self.config.recipe)
        if self.state.microbatch_split >= largest_part:
            raise torch.OutOfMemoryError(
                f"out of memory at step {self.state.step} on {self.device} with one window of seq_len {seq_len} "
                "per piece: a smaller model, seq_len or a larger device is needed")
        self.state.microbatch_split *= 2
        self.state.memory_splits.append({"step": self.state.step, "split": self.state.microbatch_split})
        if self.show_progress:
            tqdm.write(f"out of memory at step {self.state.step}: each microbatch now trained in "
                       f"{self.state.microbatch_split} pieces (the same tokens per step)")

    def _eval_interval_tokens(self) -> float:
        return self.config.eval_every_epochs * len(self.data.train)

    def _eval_due(self) -> bool:
        return self.state.tokens >= (self.state.evals_done + 1) * self._eval_interval_tokens()

    def _evaluate_on(self, windows: torch.Tensor, directions: tuple[str, ...]) -> dict[str, dict[str, float]]:
        return evaluate(self.model, windows, eval_batch_size(windows), self.precision(), self.parallel, directions)

    def _evaluate_model(self) -> dict[str, dict[str, float]]:
        """The model's weights now on validation and, if asked, the training-split windows."""
        metrics = self._evaluate_on(self.valid, self.eval_directions)
        if self.train_eval is not None:
            on_train = self._evaluate_on(self.train_eval, self.eval_directions)
            metrics.update({f"train_{direction}": values for direction, values in on_train.items()})
        return metrics

    def _evaluated_weights(self) -> contextlib.AbstractContextManager:
        """The weights every evaluation reads: the average with eval_ema, else the trained ones."""
        return contextlib.nullcontext() if self.average is None else self.average.swapped_in(self.model)

    def _evaluate(self) -> dict:
        training_seconds = self.state.training_seconds
        started = time.perf_counter()
        # the trained weights' validation fw loss beside the average's: the noise the average removes
        raw = {} if self.average is None else {"raw_fw_loss": self._evaluate_on(self.valid, ("fw",))["fw"]["loss"]}
        with self._evaluated_weights():
            metrics = self._evaluate_model()
            self._select(metrics["fw"]["loss"])
        self.state.eval_seconds += time.perf_counter() - started
        record = {
            "step": self.state.step,
            "tokens": self.state.tokens,
            "epoch": self.state.tokens / len(self.data.train),
            "seconds": self.state.seconds,
            "train_loss": self.state.loss_sum / max(1, self.state.loss_steps),
            "p_bw": self.state.p_bw,
            "weight_decay": self.state.weight_decay,
            **raw,
        }
        for direction, values in metrics.items():
            record.update({f"{direction}_{name}": value for name, value in values.items()})
        self.state.metrics.append(record)
        self.state.evals_done = int(self.state.tokens // self._eval_interval_tokens())
        self.state.loss_sum, self.state.loss_steps = 0.0, 0
        self._write_metrics()
        self.eval_points.log(record, self.optimizer, training_seconds)
        return record

    def _select(self, fw_loss: float) -> None:
        """Early stopping's bookkeeping on the validation fw loss of the weights just evaluated
        (they are in the model): keep them when they are the best so far."""
        if self.state.best_fw_loss is None or fw_loss < self.state.best_fw_loss:
            self.state.best_fw_loss, self.state.best_step, self.state.evals_since_best = fw_loss, self.state.step, 0
            if self.selects:
                self.best_weights = {name: value.detach().cpu().clone() for name, value in self.model.state_dict().items()}
        else:
            self.state.evals_since_best += 1
        patience = self.config.patience
        out_of_patience = patience is not None and self.state.evals_since_best >= patience
        self.state.stopped_early = out_of_patience and self.state.tokens < self.budget  # not when the budget ended it

    def _status_line(self, loss: float) -> str:
        line = f"step {self.state.step} ep {self.state.tokens / len(self.data.train):.2f} loss {loss:.3f}"
        if self.state.metrics:
            last = self.state.metrics[-1]
            line += f" val fw {last['fw_loss']:.3f}" + (f" bw {last['bw_loss']:.3f}" if "bw_loss" in last else "")
        return line

    def _training_left(self) -> bool:
        return self.state.tokens < self.budget and not self.state.stopped_early

    def run(self) -> dict:
        """Train to the token budget (resuming from the newest intact checkpoint) and return
        the run summary, also written to summary.json. Ctrl-C raises Interrupted."""
        if self.parallel.is_main:
            start_run(self.run_dir, self.config, self.restart)
        self.parallel.barrier()
        self._resume()
        self.parallel.broadcast_parameters(self.model)
        self.eval_points = EvalPoints(self.tracker_name, self.run_dir, self.state.step, self.state.tokens,
                                      self.state.training_seconds)
        with self.eval_points:  # closes the tracker saying how the run ended: finished, failed or killed
            try:
                if self._training_left():
                    self.eval_points.open()
                self._train_to_budget()
                if not self.state.metrics or self.state.metrics[-1]["step"] != self.state.step:
                    self._evaluate()
                return self._finish()
            except KeyboardInterrupt as interruption:  # Ctrl-C, or a signal raised as one (its reason kept)
                reason = str(interruption) or "interrupted"
                raise Interrupted(f"{reason} at step {self.state.step}; rerun the same command to resume") from None

    def _train_to_budget(self) -> None:
        bar = tqdm(
            total=self.budget, initial=min(self.state.tokens, self.budget), unit="tok", unit_scale=True,
            disable=not self.show_progress, desc=self.run_dir.name, dynamic_ncols=True,
        )
        started = time.perf_counter() - self.state.seconds
        last_checkpoint = self.state.step
        try:
            while self._training_left():
                if self.stop is not None and self.stop.is_set():
                    raise LeaseLost(f"{self.run_dir}: another worker holds the run now; stopped at step {self.state.step}")
                before = self.state.tokens
                loss = self.train_step()
                self.state.loss_sum += loss
                self.state.loss_steps += 1
                self.state.seconds = time.perf_counter() - started
                bar.update(min(self.state.tokens, self.budget) - min(before, self.budget))
                if self._eval_due() or self.state.tokens >= self.budget:
                    self._evaluate()
                finished = not self._training_left()
                bar.set_postfix_str(self._status_line(loss), refresh=False)
                if finished or self.state.step - last_checkpoint >= self.config.checkpoint_every_steps:
                    self._save_checkpoint()
                    last_checkpoint = self.state.step
        finally:
            bar.close()

    def _finish(self) -> dict:
        final = self.state.metrics[-1]
        summary = {
            "status": "done",
            "num_params": self.num_params,
            "bw_mask": self.config.bw_mask,
            "leaks_labels": leaks_labels(self.config.bw_mask),
            **leak_summary(self.model),
            "steps": self.state.step,
            "tokens": self.state.tokens,
            "unique_tokens": len(self.data.train),
            "seconds": self.state.seconds,
            "eval_seconds": self.state.eval_seconds,
            # of the whole run, all ranks together
            "mean_train_tokens_per_s": self.state.tokens / max(self.state.training_seconds, 1e-9),
            **provenance(self.device),
            "dtype": self.dtype,
            "world_size": self.parallel.world_size,
            "compiled": self.compiled,
            "microbatch_split": self.state.microbatch_split,
            **{
                f"final_val_{metric}_{direction}": final.get(f"{direction}_{metric}")
                for direction in DIRECTIONS
                for metric in EVAL_METRICS
            },
            **self._selection_summary(),
            **self._score_test(),
        }
        if self.parallel.is_main:
            checkpoint.save_model(self.run_dir, self.model)
            if self.selects:
                checkpoint.save_weights(self.run_dir / BEST_WEIGHTS, self.best_weights)
            check_fence(self.run_dir)
            atomic_write_json(self.run_dir / SUMMARY, summary)
        return summary

    def _selection_summary(self) -> dict:
        """Which evaluation validation selected (early stopping), and whether the run went past it."""
        best = next(record for record in self.state.metrics if record["step"] == self.state.best_step)
        return {
            "selected_by": self._selected_by(),
            "best_step": self.state.best_step,
            "best_epoch": best["epoch"],
            "best_val_fw_loss": self.state.best_fw_loss,
            "best_train_split_fw_loss": best.get("train_fw_loss"),
            "stopped_early": self.state.stopped_early,
            # the optimum was not passed within the budget: the best is at the last evaluation
            "censored": self.state.best_step == self.state.metrics[-1]["step"],
        }

    def _selected_by(self) -> str:
        if not self.selects:
            return "last step"
        return "valid fw loss" + (f" of the weights' EMA (decay {self.config.eval_ema:g})" if self.average else "")

    def _score_test(self) -> dict:
        """The whole test split, scored once training has ended: at the weights validation selected
        (`test_*`; the last step's when the run selects none) and at the last step's (`test_*_final`,
        averaged with eval_ema). Nothing before this reads the test split, so it can reach no
        choice. {} for a corpus without one."""
        if self.data.test is None:
            return {}
        windows = validation_windows(self.data.test, self.valid.shape[1], len(self.data.test))
        with self._evaluated_weights():
            final = self._evaluate_on(windows, self.eval_directions)
        selected = final
        if self.selects:
            with swapped_weights(self.model, self.best_weights):
                selected = self._evaluate_on(windows, self.eval_directions)
        scores = {"test_tokens": windows.numel()}
        for suffix, metrics in (("", selected), ("_final", final)):
            scores.update({f"test_{direction}_{name}{suffix}": value
                           for direction, values in metrics.items() for name, value in values.items()})
        return scores


def train(config: TrainConfig, run_dir: Path, data: TokenData | None = None, progress: bool = True) -> dict:
    return Trainer(config, run_dir, data=data, progress=progress).run()
