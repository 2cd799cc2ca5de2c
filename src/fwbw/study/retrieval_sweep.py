"""Retrieval over a sweep: BM25 and every finished run's embeddings on one task, each result in the
sweep's retrieval/ folder, resumable like the sweep (a finished result is skipped, so a rerun does
only what is missing), then the sweep's tables rebuilt (fwbw.study.results).

  retrieval/bm25/<task>-<split>/                                                BM25, once per task and split
  retrieval/<run_id>/<task>-<split>-<embed>[-b<blocks>][-mk][-c<C>][-qf<Q>][-<pooling>]-ft<N>[-s<S>][-bm25neg][-rr<K>|-fu<K>][-bf16]/
                                                                                a run's system
  retrieval/<run_id>/finetuned/<task>-<embed>[-b<blocks>][-mk]-ft<N>[-s<S>][-bm25neg]/  its fine-tuning, shared
                                                                                by the poolings, splits and chunk lengths
  retrieval/cache/                                                     the fp16 token cache every result shares

<task> is the task's name; a BEIR folder's is beir-<folder name>; <split> dev or test; -c<C> a
chunk length given (none: the embed's default, fwbw.retrieval.encoder.check_chunk_tokens); -qf<Q> Q
fillers read with each query (fwbw.retrieval.encoder's query fillers); -mk markers (queries and
documents read after their role's marker, in fine-tuning too); -s<S> a
fine-tuning seed other than 0; -bm25neg fine-tuning with BM25 hard negatives; -rr<K> a rerank of
BM25's K best documents, -fu<K> their fusion, its weight tuned on the run's -rr<K> result on the dev
queries (which must have finished first); -bf16 similarities in bf16. The embed fwfw (the control
of fwbw: fwbw.retrieval.ensemble) pairs each run with the next seed of its setting among the
finished runs (the first seed with the last). A run or embed the
task does not take (experiment.check_system: a wiki-sample task and a run trained on another corpus,
a chunk length echo cannot read twice in the run's context) is left out, with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from fwbw.retrieval.encoder import prune_cache
from fwbw.retrieval.ensemble import CONTROL_EMBED
from fwbw.retrieval.experiment import (
    BM25,
    FINETUNED,
    System,
    canonical_task,
    check_system,
    run_retrieval,
)
from fwbw.retrieval.fusion import TUNING_SPLIT
from fwbw.retrieval.tasks import BEIR_PREFIX, load_task
from fwbw.study.results import write_results
from fwbw.study.sweep_dir import RETRIEVAL, RUNS, read_sweep
from fwbw.training.run_dir import read_status

DEFAULT_EMBEDS = ("fw", "fwbw")  # the fw-only view and the fw+bw one
CACHE = "cache"
DEFAULT_CACHE_GB = 4.0


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
    chunk_tokens: int | None = None  # None: each embed's default
    rerank: int | None = None  # rerank BM25's this many best documents
    fusion: bool = False  # fuse them with BM25 instead, the weight tuned on the dev rerank
    maxsim_dtype: str = "fp32"
    cache_gb: float = DEFAULT_CACHE_GB  # the token cache is trimmed to this size after each result
    seeds: tuple[int, ...] | None = None  # only the runs of these seeds (None: every finished run)
    p_bws: tuple[float, ...] | None = None  # only the runs of these p_bw (None: every finished run)
    query_fillers: int = 0  # fillers read with each query chunk (fwbw.retrieval.encoder)
    markers: bool = False  # each query and document read after its role's marker, fine-tuning too


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
    """A run's result folder (pooled=False: its fine-tuning's, the same for every pooling, split and
    chunk length)."""
    blocks = ("" if plan.blocks is None else f"-b{plan.blocks}") + ("-mk" if plan.markers else "")
    chunks = f"-c{plan.chunk_tokens}" if pooled and plan.chunk_tokens is not None else ""
    chunks += f"-qf{plan.query_fillers}" if pooled and plan.query_fillers else ""
    split, pooling = (f"-{plan.split}", f"-{plan.pooling}" if plan.pooling else "") if pooled else ("", "")
    seed = f"-s{plan.finetune_seed}" if plan.finetune_seed else ""
    negatives = f"-{plan.hard_negatives}neg" if plan.hard_negatives else ""
    hybrid = "" if plan.rerank is None or not pooled else f"-{'fu' if plan.fusion else 'rr'}{plan.rerank}"
    dtype = f"-{plan.maxsim_dtype}" if pooled and plan.maxsim_dtype != "fp32" else ""
    return (f"{task_label(plan.task)}{split}-{embed}{blocks}{chunks}{pooling}-ft{plan.finetune_steps}{seed}{negatives}"
            f"{hybrid}{dtype}")


def runs_by_setting(sweep_dir: Path) -> list[list[str]]:
    """The sweep's run ids grouped by setting (the config but its seed), each group in seed order."""
    by_setting: dict[str, list[tuple[int, str]]] = {}
    for run_id, config in read_sweep(sweep_dir)["runs"].items():
        setting = {key: value for key, value in config.items() if key != "seed"}
        by_setting.setdefault(json.dumps(setting, sort_keys=True), []).append((config["seed"], run_id))
    return [[run_id for _, run_id in sorted(runs)] for runs in by_setting.values()]


def partners(sweep_dir: Path) -> dict[str, Path]:
    """Each run's partner for the fwfw control: the run of the same setting with the next seed (the
    first seed's for the last), among all of the sweep's runs, finished or not (so a run's partner
    never changes); none for a run alone in its setting."""
    paired = {}
    for ordered in runs_by_setting(sweep_dir):
        if len(ordered) > 1:
            paired |= {run_id: Path(sweep_dir) / RUNS / ordered[(i + 1) % len(ordered)] for i, run_id in enumerate(ordered)}
    return paired


def plan_jobs(sweep_dir: Path, plan: Plan) -> tuple[list[Job], list[str]]:
    """BM25, then each finished run's embeds; and a line for each run or embed left out, and why."""
    sweep_dir = Path(sweep_dir)
    root = sweep_dir / RETRIEVAL
    jobs = [Job(f"{BM25} {plan.task} {plan.split}", root / BM25 / f"{task_label(plan.task)}-{plan.split}", System())]
    left_out, finished = [], []
    for run_id in read_sweep(sweep_dir)["runs"]:
        status = read_status(sweep_dir / RUNS / run_id)["status"]
        if status == "done":
            finished.append(run_id)
        else:
            left_out.append(f"{run_id}: not finished (status {status})")
    paired = partners(sweep_dir)
    configs = read_sweep(sweep_dir)["runs"]
    for run_id in (r for r in finished if _planned(plan, configs[r])):
        run_dir = sweep_dir / RUNS / run_id
        for embed in plan.embeds:
            system = System(run_dir, embed, plan.blocks, plan.pooling, plan.finetune_steps, plan.finetune_seed,
                            plan.hard_negatives, plan.chunk_tokens, paired.get(run_id) if embed == CONTROL_EMBED else None,
                            plan.rerank, _tuned_on(root / run_id, plan, embed), plan.maxsim_dtype, plan.query_fillers,
                            plan.markers)
            reason = (_unpaired(run_id, paired) if embed == CONTROL_EMBED else None) or _not_applicable(system, plan.task)
            if reason:
                left_out.append(f"{run_id}: no {embed} embed: {reason}")
                continue
            finetune_dir = root / run_id / FINETUNED / result_name(plan, embed, pooled=False)
            jobs.append(Job(f"{run_id} {system.name} {embed}", root / run_id / result_name(plan, embed), system,
                            finetune_dir))
    return jobs, left_out


def _planned(plan: Plan, config: dict) -> bool:
    """Whether the plan evaluates the run of this config (its seeds and p_bws, where given)."""
    return ((plan.seeds is None or config["seed"] in plan.seeds)
            and (plan.p_bws is None or config["p_bw"] in plan.p_bws))


def _unpaired(run_id: str, paired: dict[str, Path]) -> str | None:
    """Why the run has no fwfw control yet: no other run of its setting, or its partner unfinished."""
    if run_id not in paired:
        return "no other run of its setting to pair with"
    status = read_status(paired[run_id])["status"]
    return None if status == "done" else f"its partner {paired[run_id].name} is not finished (status {status})"


def _tuned_on(run_root: Path, plan: Plan, embed: str) -> Path | None:
    """A fusion's dev rerank result (None without a fusion)."""
    if not plan.fusion:
        return None
    return run_root / result_name(dataclasses.replace(plan, split=TUNING_SPLIT, fusion=False), embed)


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
        prune_cache(sweep_dir / RETRIEVAL / CACHE, int(plan.cache_gb * 2**30))
    write_results(sweep_dir)
    return outcome, left_out
