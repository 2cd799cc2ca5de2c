"""Retrieval over a sweep: BM25 and every finished run's embeddings on one task, each result in the
sweep's retrieval/ folder, resumable like the sweep (a finished result is skipped, so a rerun does
only what is missing), then the sweep's tables rebuilt (fwbw.study.results).

  retrieval/bm25/<task>-<split>/                                                BM25, once per task and split
  retrieval/<run_id>/<task>-<split>-<embed>[-b<blocks>][-<pooling>]-ft<N>[-s<S>][-bm25neg]/  a run's system
  retrieval/<run_id>/finetuned/<task>-<embed>[-b<blocks>]-ft<N>[-s<S>][-bm25neg]/  its fine-tuning, shared
                                                                                by the poolings and splits
  retrieval/cache/                                                     the fp16 token cache every result shares

<task> is the task's name; a BEIR folder's is beir-<folder name>; <split> dev or test; -s<S> a
fine-tuning seed other than 0; -bm25neg fine-tuning with BM25 hard negatives. A run the task does not take (experiment.check_system: a wiki-sample
task and a run trained on another corpus) is left out, with the reason.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from fwbw.retrieval.experiment import (
    BM25,
    FINETUNED,
    System,
    canonical_task,
    check_system,
    run_retrieval,
)
from fwbw.retrieval.tasks import BEIR_PREFIX, load_task
from fwbw.study.results import write_results
from fwbw.study.sweep_dir import RETRIEVAL, RUNS, read_sweep
from fwbw.training.run_dir import read_status

DEFAULT_EMBEDS = ("fw", "fwbw")  # the fw-only view and the fw+bw one
CACHE = "cache"


@dataclass(frozen=True)
class Plan:
    """What every finished run is evaluated with, besides BM25."""

    task: str
    split: str = "dev"
    embeds: tuple[str, ...] = DEFAULT_EMBEDS
    blocks: int | None = None
    pooling: str | None = None
    finetune_steps: int = 0
    finetune_seed: int = 0
    hard_negatives: str | None = None


@dataclass(frozen=True)
class Job:
    label: str  # what the progress line and the summary name
    out_dir: Path
    system: System
    finetune_dir: Path | None = None


def task_label(task: str) -> str:
    """The task as a folder name: a wiki-sample task's name, beir-<folder name> for a BEIR folder."""
    if not task.startswith(BEIR_PREFIX):
        return task
    return "beir-" + re.sub(r"[^A-Za-z0-9._-]", "_", Path(task.removeprefix(BEIR_PREFIX)).name)


def result_name(plan: Plan, embed: str, pooled: bool = True) -> str:
    """A run's result folder (pooled=False: its fine-tuning's, the same for every pooling and split)."""
    blocks = "" if plan.blocks is None else f"-b{plan.blocks}"
    split, pooling = (f"-{plan.split}", f"-{plan.pooling}" if plan.pooling else "") if pooled else ("", "")
    seed = f"-s{plan.finetune_seed}" if plan.finetune_seed else ""
    negatives = f"-{plan.hard_negatives}neg" if plan.hard_negatives else ""
    return f"{task_label(plan.task)}{split}-{embed}{blocks}{pooling}-ft{plan.finetune_steps}{seed}{negatives}"


def plan_jobs(sweep_dir: Path, plan: Plan) -> tuple[list[Job], list[str]]:
    """BM25, then each finished run's embeds; and a line for each run or embed left out, and why."""
    sweep_dir = Path(sweep_dir)
    root = sweep_dir / RETRIEVAL
    jobs = [Job(f"{BM25} {plan.task} {plan.split}", root / BM25 / f"{task_label(plan.task)}-{plan.split}", System())]
    left_out = []
    for run_id, values in read_sweep(sweep_dir)["runs"].items():
        run_dir = sweep_dir / RUNS / run_id
        status = read_status(run_dir)["status"]
        if status != "done":
            left_out.append(f"{run_id}: not finished (status {status})")
            continue
        for embed in plan.embeds:
            system = System(run_dir, embed, plan.blocks, plan.pooling, plan.finetune_steps, plan.finetune_seed,
                            plan.hard_negatives)
            reason = _not_applicable(system, plan.task)
            if reason:
                left_out.append(f"{run_id}: no {embed} embed: {reason}")
                continue
            finetune_dir = root / run_id / FINETUNED / result_name(plan, embed, pooled=False)
            jobs.append(Job(f"{run_id} {system.name} {embed}", root / run_id / result_name(plan, embed), system,
                            finetune_dir))
    return jobs, left_out


def _not_applicable(system: System, task: str) -> str | None:
    try:
        check_system(system, task)
    except ValueError as error:
        return str(error)
    return None


def retrieve_sweep(sweep_dir: Path, plan: Plan, device: str = "auto", progress: bool = True) -> tuple[dict[str, str], list[str]]:
    """Evaluate BM25 and every finished run's embeds on plan.task's plan.split, then rebuild the sweep's tables.
    Returns {job label: "done" | "skipped" (finished before)} and the lines of what was left out."""
    sweep_dir = Path(sweep_dir)
    plan = dataclasses.replace(plan, task=canonical_task(plan.task))
    jobs, left_out = plan_jobs(sweep_dir, plan)
    benchmark = load_task(plan.task, plan.split)
    outcome = {}
    for position, job in enumerate(jobs, start=1):
        if progress:
            print(f"[{position}/{len(jobs)}] {job.label}", file=sys.stderr, flush=True)
        result = run_retrieval(job.out_dir, plan.task, plan.split, job.system, job.finetune_dir,
                               sweep_dir / RETRIEVAL / CACHE, device, progress, benchmark)
        outcome[job.label] = "skipped" if result.skipped else "done"
    write_results(sweep_dir)
    return outcome, left_out
