"""The training loop: fw task every step, bw task with probability p_bw (added to the fw loss,
or instead of it), hlb-gpt's recipe, fixed-set validation, resumable checkpoints and the run
directory's files (config.json, metrics.jsonl, summary.json, model.safetensors)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fwbw.data.corpora import TokenData, load_token_data
from fwbw.data.windows import WindowSampler, validation_set
from fwbw.files import atomic_write_json, atomic_write_text
from fwbw.model.hlb_gpt import build_model
from fwbw.model.masks import leaks_labels
from fwbw.model.tasks import task_stats, window_length
from fwbw.training import checkpoint
from fwbw.training.config import TrainConfig
from fwbw.training.evaluation import eval_batch_size, evaluate, leak_probe
from fwbw.training.precision import autocast, resolve_device, resolve_dtype
from fwbw.training.recipe import (
    Microbatching,
    batch_size_for,
    build_optimizer,
    dynamic_weight_decay,
    seq_len_at,
    set_weight_decay,
)
from fwbw.training.run_dir import check_run_dir


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class Progress:
    """Plain-data training state that goes into every checkpoint."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    eval_seconds: float = 0.0
    evals_done: int = 0
    loss_sum: float = 0.0
    loss_steps: int = 0
    metrics: list[dict] = field(default_factory=list)


class Trainer:
    def __init__(self, config: TrainConfig, run_dir: Path, data: TokenData | None = None, progress: bool = True):
        check_run_dir(run_dir)
        self.config = config
        self.run_dir = Path(run_dir)
        self.show_progress = progress
        self.data = data or load_token_data(config.data, config.tokenizer, progress=progress)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model_config = config.model_config(self.data.vocab_size)
        torch.manual_seed(config.seed)
        self.model = build_model(self.model_config).to(self.device)
        self.num_params = self.model.num_params()
        self.optimizer, self.scheduler = build_optimizer(self.model, config.recipe)
        self.microbatching = Microbatching(self.num_params, config.recipe)
        self.sampler = WindowSampler(self.data.train, config.seed)
        self.task_rng = torch.Generator().manual_seed(config.seed + 1)
        self.valid = validation_set(config, self.data.valid)
        self.budget = config.train_tokens or int(config.epochs * len(self.data.train))
        self.state = Progress()

    def precision(self):
        return autocast(self.device, self.dtype)

    # --- run directory -------------------------------------------------------------------

    def _write_static_files(self) -> None:
        atomic_write_json(self.run_dir / "config.json", self.config.to_dict())

    def _write_metrics(self) -> None:
        lines = "".join(json.dumps(m, sort_keys=True) + "\n" for m in self.state.metrics)
        atomic_write_text(self.run_dir / "metrics.jsonl", lines)

    def _save_checkpoint(self) -> None:
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
                "progress": self.state.__dict__,
            },
        )

    def _resume(self) -> None:
        saved = checkpoint.load_latest(self.run_dir, warn=tqdm.write)
        if saved is None:
            return
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.sampler.load_state_dict(saved["sampler"])
        self.task_rng.set_state(saved["task_rng"])
        self.microbatching.load_state_dict(saved["microbatching"])
        self.state = Progress(**saved["progress"])
        self._write_metrics()

    # --- training ------------------------------------------------------------------------

    def _directions(self) -> tuple[str, ...]:
        use_bw = torch.rand((), generator=self.task_rng).item() < self.config.p_bw
        if self.config.bw_mode == "either":
            return ("bw",) if use_bw else ("fw",)
        return ("fw", "bw") if use_bw else ("fw",)

    def _grad_norm(self) -> float:
        norms = [p.grad.norm() for p in self.model.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(norms)).item()

    def train_step(self) -> float:
        """One optimizer step over a dynamic number of microbatches; returns the mean task loss."""
        recipe = self.config.recipe
        seq_len = seq_len_at(self.state.step, self.config.seq_len, recipe)
        batch_size = batch_size_for(seq_len, recipe)
        microbatches = self.microbatching.draw(self.task_rng)
        directions = self._directions()
        loss_total = 0.0
        for _ in range(microbatches):
            windows = self.sampler.sample(batch_size, window_length(seq_len, self.config.task_tokens))
            with self.precision():
                stats = task_stats(self.model, windows.to(self.device), directions, accuracy=False)
                loss = sum(stats[d][0] for d in directions)
            (loss / microbatches).backward()
            loss_total += loss.item() / len(directions)
        mean_loss = loss_total / microbatches
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(f"training loss became {mean_loss} at step {self.state.step}")
        if self.state.step % recipe.grad_norm_every == 0:
            self.microbatching.update(self.state.step, self._grad_norm())
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        set_weight_decay(self.optimizer, dynamic_weight_decay(mean_loss, self.num_params, recipe))
        self.state.step += 1
        self.state.tokens += microbatches * batch_size * seq_len
        return mean_loss

    def _eval_interval_tokens(self) -> float:
        return self.config.eval_every_epochs * len(self.data.train)

    def _eval_due(self) -> bool:
        return self.state.tokens >= (self.state.evals_done + 1) * self._eval_interval_tokens()

    def _evaluate(self) -> dict:
        started = time.perf_counter()
        metrics = evaluate(self.model, self.valid, eval_batch_size(self.valid), self.precision())
        self.state.eval_seconds += time.perf_counter() - started
        record = {
            "step": self.state.step,
            "tokens": self.state.tokens,
            "epoch": self.state.tokens / len(self.data.train),
            "seconds": self.state.seconds,
            "train_loss": self.state.loss_sum / max(1, self.state.loss_steps),
        }
        for direction, values in metrics.items():
            record.update({f"{direction}_{name}": value for name, value in values.items()})
        self.state.metrics.append(record)
        self.state.evals_done = int(self.state.tokens // self._eval_interval_tokens())
        self.state.loss_sum, self.state.loss_steps = 0.0, 0
        self._write_metrics()
        return record

    def _status_line(self, loss: float) -> str:
        line = f"step {self.state.step} ep {self.state.tokens / len(self.data.train):.2f} loss {loss:.3f}"
        if self.state.metrics:
            last = self.state.metrics[-1]
            line += f" val fw {last['fw_loss']:.3f} bw {last['bw_loss']:.3f}"
        return line

    def run(self) -> dict:
        """Train to the token budget (resuming from the newest intact checkpoint) and return
        the run summary, also written to summary.json."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_static_files()
        self._resume()
        bar = tqdm(
            total=self.budget, initial=min(self.state.tokens, self.budget), unit="tok", unit_scale=True,
            disable=not self.show_progress, desc=self.run_dir.name, dynamic_ncols=True,
        )
        started = time.perf_counter() - self.state.seconds
        last_checkpoint = self.state.step
        while self.state.tokens < self.budget:
            before = self.state.tokens
            loss = self.train_step()
            self.state.loss_sum += loss
            self.state.loss_steps += 1
            self.state.seconds = time.perf_counter() - started
            bar.update(min(self.state.tokens, self.budget) - min(before, self.budget))
            finished = self.state.tokens >= self.budget
            if self._eval_due() or finished:
                self._evaluate()
            bar.set_postfix_str(self._status_line(loss), refresh=False)
            if finished or self.state.step - last_checkpoint >= self.config.checkpoint_every_steps:
                self._save_checkpoint()
                last_checkpoint = self.state.step
        bar.close()
        if not self.state.metrics or self.state.metrics[-1]["step"] != self.state.step:
            self._evaluate()
        return self._finish()

    def _finish(self) -> dict:
        checkpoint.save_model(self.run_dir, self.model)
        final = self.state.metrics[-1]
        summary = {
            "status": "done",
            "num_params": self.num_params,
            "bw_mask": self.config.bw_mask,
            "leaks_labels": leaks_labels(self.config.bw_mask),
            "probe_leak_fw": leak_probe(self.model, "fw"),
            "probe_leak_bw": leak_probe(self.model, "bw"),
            "steps": self.state.step,
            "tokens": self.state.tokens,
            "seconds": self.state.seconds,
            "eval_seconds": self.state.eval_seconds,
            "device": str(self.device),
            "dtype": self.dtype,
            **{
                f"final_val_{metric}_{direction}": final[f"{direction}_{metric}"]
                for direction in ("fw", "bw")
                for metric in ("loss", "acc", "ppl")
            },
        }
        atomic_write_json(self.run_dir / "summary.json", summary)
        return summary


def train(config: TrainConfig, run_dir: Path, data: TokenData | None = None, progress: bool = True) -> dict:
    return Trainer(config, run_dir, data=data, progress=progress).run()
