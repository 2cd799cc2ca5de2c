"""`fwbw status SWEEP`: where each run of a sweep stands, read from the sweep directory alone.

A run is done by its status.json; else running while a live claim holds it (a failed run being
retried too), stale once that claim's lease expired (fwbw.training.run_dir); without a claim,
failed by its status.json, else pending. Its tokens are its
metrics.jsonl's last record; its budget is train_tokens, or epochs x the training split, whose
size is that record's tokens / epoch (unknown before the first record: "?").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fwbw.files import read_jsonl
from fwbw.study.estimate import plural, short_duration
from fwbw.study.sweep import short_count
from fwbw.study.sweep_dir import RUNS, read_sweep
from fwbw.training.config import TrainConfig
from fwbw.training.run_dir import LOCK, METRICS, Worker, read_claim, read_status

RUN_STATES = ("done", "running", "stale", "failed", "pending")  # in the order of the totals
HEADER = ("run", "status", "host", "tokens", "heartbeat", "ETA")
NONE = "-"


@dataclass(frozen=True)
class RunState:
    run_id: str
    status: str
    host: str | None  # of the claim
    tokens: int
    budget: int | None  # None: not known yet
    heartbeat_age: float | None  # seconds since the claim's last heartbeat
    eta_s: float | None  # of a running run, at its rate so far

    def cells(self) -> tuple[str, ...]:
        budget = "?" if self.budget is None else short_count(self.budget)
        return (
            self.run_id,
            self.status,
            NONE if self.host is None else self.host,
            f"{short_count(self.tokens)}/{budget}",
            NONE if self.heartbeat_age is None else f"{short_duration(max(self.heartbeat_age, 0.0))} ago",
            NONE if self.eta_s is None else short_duration(self.eta_s),
        )


def sweep_status(sweep_dir: Path, judge: Worker | None = None) -> list[RunState]:
    """Every run of the sweep, in sweep.json's order (by run id), claims judged by `judge` (this
    host and clock by default). ValueError (one line) for a directory that holds no sweep."""
    judge = judge or Worker()
    runs = read_sweep(sweep_dir)["runs"]
    return [run_state(run_id, config, Path(sweep_dir) / RUNS / run_id, judge) for run_id, config in runs.items()]


def run_state(run_id: str, config: dict, run_dir: Path, judge: Worker) -> RunState:
    recorded = read_status(run_dir)["status"]
    claim = read_claim(run_dir / LOCK)
    if recorded == "done" or claim is None:
        status = recorded if recorded in ("done", "failed") else "pending"
    else:
        status = "stale" if claim.is_stale(judge) else "running"
    last = _last_record(run_dir)
    tokens = last["tokens"] if last else 0
    budget = _budget(config, last)
    held = status in ("running", "stale")
    return RunState(
        run_id,
        status,
        (claim.host or "?") if held else None,
        tokens,
        budget,
        claim.age(judge) if held else None,
        _eta(tokens, budget, last) if status == "running" else None,
    )


def _last_record(run_dir: Path) -> dict | None:
    try:
        records = read_jsonl(run_dir / METRICS)
    except FileNotFoundError:
        return None
    return records[-1] if records else None


def _budget(config: dict, last: dict | None) -> int | None:
    """The run's training tokens, as the trainer counts them."""
    if config.get("train_tokens"):
        return int(config["train_tokens"])
    if not last or not last.get("epoch"):
        return None
    split_tokens = round(last["tokens"] / last["epoch"])
    return int(config.get("epochs", TrainConfig.epochs) * split_tokens)


def _eta(tokens: int, budget: int | None, last: dict | None) -> float | None:
    if budget is None or not last or not last.get("seconds") or not tokens:
        return None
    return max(budget - tokens, 0) / (tokens / last["seconds"])


def status_lines(sweep_dir: Path, judge: Worker | None = None) -> list[str]:
    """A header, one line per run, then the totals."""
    states = sweep_status(sweep_dir, judge)
    rows = [HEADER] + [state.cells() for state in states]
    widths = [max(len(row[column]) for row in rows) for column in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    counts = [sum(state.status == status for state in states) for status in RUN_STATES]
    lines.append(f"{plural(len(states), 'run')}: " + ", ".join(f"{n} {status}" for n, status in zip(counts, RUN_STATES)))
    return lines
