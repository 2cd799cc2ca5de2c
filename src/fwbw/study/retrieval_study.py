"""The retrieval study (issue 19, docs/retrieval-plan.md): every evaluation the plan asks for over a
sweep of the `retrieval` preset, in an order that makes each choice on dev queries before the test
queries of any system that depends on it are read, resumably (each result is skipped once
finished: fwbw.study.retrieval_sweep).

  1. dev, the first seed of each setting (explored_seeds; "tune once on dev, one seed per arm"):
     BM25 and zero-shot late interaction with every embed of ZERO_SHOT_EMBEDS, what each model's embed is
     chosen on
  2. test, every seed: BM25 and zero-shot late interaction with every embed of ZERO_SHOT_EMBEDS, at every
     block: the primary endpoint (fwbw - fwfw) and the contrasts between embeds, which no choice
     enters, measured first so that they are had even if the study stops before its end
  3. dev: on every seed a rerank of BM25's RERANK_DEPTH best documents with each of
     CANDIDATE_EMBEDS (cheap: each run's fusion weight is tuned on its own); on the explored seeds,
     what ColBERT practice might add, measured before it is used: fine-tuning of FINETUNED_EMBEDS
     with in-batch negatives only and with BM25 hard negatives, and the embeddings after the first
     block instead of the last
  4. choices (choose), from step 3's dev results alone: the hard negatives and the blocks whose mean
     dev nDCG@10 over those results is the higher (in-batch negatives and every block on a tie)
  5. test, every seed: the reranks and their fusions, fine-tuning with the chosen negatives,
     and zero-shot at the chosen blocks too where a block less was chosen
  6. dev, the explored seeds, last since nothing depends on it (exploration_plans): zero-shot with
     EXPLORED_FILLERS query fillers for each of CANDIDATE_EMBEDS, and the ALIGNMENT_EMBED (around:
     the two states that predict each token); never chosen, never carried to test
Steps 1-3, 5 and 6 each go over both GOAL_TASKS. The sanity task (SANITY_TASK) gets the fw and fwbw
zero-shot embeds on test, on the explored seeds only, after step 5. Every run's texts are read in chunks of
CHUNK_TOKENS, half the preset's context, so that echo, which reads a chunk twice, sees what every
other system sees.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fwbw.retrieval.ensemble import CONTROL_EMBED
from fwbw.retrieval.experiment import LATE_INTERACTION
from fwbw.study.results import build_retrieval_results
from fwbw.study.retrieval_sweep import Plan, retrieve_sweep, runs_by_setting
from fwbw.study.sweep_dir import RUNS, read_sweep
from fwbw.training.run_dir import read_status

GOAL_TASKS = ("description", "ict")
SANITY_TASK = "title"
CHUNK_TOKENS = 128  # half the retrieval preset's 256-token context
CANDIDATE_EMBEDS = ("fw", "bw", "fwbw", "echo")
ZERO_SHOT_EMBEDS = (*CANDIDATE_EMBEDS, CONTROL_EMBED)
FINETUNED_EMBEDS = ("fw", "fwbw", "echo")
FINETUNE_STEPS = 300
RERANK_DEPTH = 100
EXPLORED_BLOCKS = 1  # the block sweep's other point: the states after the first block
EXPLORED_FILLERS = 8  # query augmentation, measured on dev only
ALIGNMENT_EMBED = "around"  # measured on dev only
MEASURE = "ndcg_at_10"


@dataclass(frozen=True)
class Choices:
    hard_negatives: str | None  # None: in-batch negatives only
    blocks: int | None  # None: every block


def explored_runs(sweep_dir: Path) -> list[str]:
    """The run of each setting of the sweep with the first seed."""
    return [runs[0] for runs in runs_by_setting(sweep_dir)]


def explored_seeds(sweep_dir: Path) -> tuple[int, ...]:
    """The first seed of each setting of the sweep."""
    configs = read_sweep(sweep_dir)["runs"]
    return tuple(sorted({configs[run_id]["seed"] for run_id in explored_runs(sweep_dir)}))


def zero_shot_plan(task: str, split: str, maxsim_dtype: str, seeds: tuple[int, ...] | None = None) -> Plan:
    """Steps 1 (dev, the explored seeds) and 2 (test, every seed) of the module docstring."""
    return Plan(task, split, ZERO_SHOT_EMBEDS, chunk_tokens=CHUNK_TOKENS, maxsim_dtype=maxsim_dtype, seeds=seeds)


def dev_plans(task: str, explored: tuple[int, ...], maxsim_dtype: str) -> list[Plan]:
    """Step 3 (module docstring)."""
    base = zero_shot_plan(task, "dev", maxsim_dtype, explored)
    finetuned = dataclasses.replace(base, embeds=FINETUNED_EMBEDS, finetune_steps=FINETUNE_STEPS)
    return [
        dataclasses.replace(base, embeds=CANDIDATE_EMBEDS, rerank=RERANK_DEPTH, seeds=None),
        finetuned,
        dataclasses.replace(finetuned, hard_negatives="bm25"),
        dataclasses.replace(base, embeds=CANDIDATE_EMBEDS, blocks=EXPLORED_BLOCKS),
    ]


def exploration_plans(task: str, explored: tuple[int, ...], maxsim_dtype: str) -> list[Plan]:
    """Step 6 (module docstring)."""
    base = zero_shot_plan(task, "dev", maxsim_dtype, explored)
    return [dataclasses.replace(base, embeds=CANDIDATE_EMBEDS, query_fillers=EXPLORED_FILLERS),
            dataclasses.replace(base, embeds=(ALIGNMENT_EMBED,))]


def test_plans(task: str, choices: Choices, maxsim_dtype: str) -> list[Plan]:
    """Step 5 (module docstring)."""
    base = zero_shot_plan(task, "test", maxsim_dtype)
    rerank = dataclasses.replace(base, embeds=CANDIDATE_EMBEDS, rerank=RERANK_DEPTH)
    plans = [rerank, dataclasses.replace(rerank, fusion=True),
             dataclasses.replace(base, embeds=FINETUNED_EMBEDS, finetune_steps=FINETUNE_STEPS,
                                 hard_negatives=choices.hard_negatives)]
    if choices.blocks is not None:
        plans.append(dataclasses.replace(base, embeds=CANDIDATE_EMBEDS, blocks=choices.blocks))
    return plans


def sanity_plan(explored: tuple[int, ...], maxsim_dtype: str) -> Plan:
    return Plan(SANITY_TASK, "test", ("fw", "fwbw"), chunk_tokens=CHUNK_TOKENS, maxsim_dtype=maxsim_dtype, seeds=explored)


def choose(table: pd.DataFrame, explored: Iterable[int], maxsim_dtype: str = "fp32") -> Choices:
    """Step 3 (module docstring): read from the explored seeds' dev rows of the study's own settings
    (its chunk length and similarity dtype, late interaction, no query fillers) only."""
    dev = table[table.split.eq("dev") & table.seed.isin(list(explored)) & table.task.isin(GOAL_TASKS)
                & table.chunk_tokens.eq(CHUNK_TOKENS) & table.maxsim_dtype.eq(maxsim_dtype) & table.pooling.isna()
                & table.query_fillers.fillna(0).eq(0)]
    finetuned = dev[dev.finetune_steps.eq(FINETUNE_STEPS) & dev.system.eq(LATE_INTERACTION)]
    negatives = _better(finetuned, lambda rows: rows.variant.str.contains("bm25 negatives"), "bm25", None)
    zero_shot = dev[dev.finetune_steps.eq(0) & dev.system.eq(LATE_INTERACTION) & dev.embed.isin(CANDIDATE_EMBEDS)]
    blocks = _better(zero_shot, lambda rows: rows.blocks.eq(EXPLORED_BLOCKS) & rows.blocks.lt(rows.depth),
                     EXPLORED_BLOCKS, None)
    return Choices(negatives, blocks)


def _better(rows: pd.DataFrame, is_option: Callable[[pd.DataFrame], pd.Series], option, default):
    """`option` where the rows it marks have a higher mean nDCG@10 than the others, else `default`
    (also when either has no row)."""
    marked = is_option(rows).fillna(False).astype(bool)
    with_option, without = rows[marked][MEASURE], rows[~marked][MEASURE]
    if with_option.empty or without.empty:
        return default
    return option if with_option.mean() > without.mean() else default


def run_study(sweep_dir: Path, maxsim_dtype: str = "fp32", device: str = "auto", progress: bool = True,
              report: Callable[[str], None] = print) -> Choices:
    """Every step of the module docstring over the sweep's finished runs; returns the choices made
    on dev. ValueError (one line) while the run of an explored seed is unfinished: the choices are
    made once, on every setting. Runs unfinished when it starts are left out (said at the end): the
    study run again once they are done evaluates them and skips every result already had."""
    unfinished = [run_id for run_id in read_sweep(sweep_dir)["runs"] if read_status(Path(sweep_dir) / RUNS / run_id)["status"] != "done"]
    waiting = [run_id for run_id in explored_runs(sweep_dir) if run_id in unfinished]
    if waiting:
        raise ValueError(f"{sweep_dir}: {len(waiting)} runs of the first seed of a setting are not finished "
                         f"({', '.join(waiting)}): the choices on dev are made on them, so finish them first")
    explored = explored_seeds(sweep_dir)
    before_choices = [
        *(zero_shot_plan(task, "dev", maxsim_dtype, explored) for task in GOAL_TASKS),
        *(zero_shot_plan(task, "test", maxsim_dtype) for task in GOAL_TASKS),
        *(plan for task in GOAL_TASKS for plan in dev_plans(task, explored, maxsim_dtype)),
    ]
    for plan in before_choices:
        _run(sweep_dir, plan, device, progress, report)
    choices = choose(build_retrieval_results(sweep_dir), explored, maxsim_dtype)
    report(f"chosen on dev: hard negatives {choices.hard_negatives or 'none'}, blocks {choices.blocks or 'all'}")
    for plan in [*(plan for task in GOAL_TASKS for plan in test_plans(task, choices, maxsim_dtype)),
                 sanity_plan(explored, maxsim_dtype),
                 *(plan for task in GOAL_TASKS for plan in exploration_plans(task, explored, maxsim_dtype))]:
        _run(sweep_dir, plan, device, progress, report)
    if unfinished:
        report(f"{len(unfinished)} runs were not finished when the study started ({unfinished[0]}, ...): run the "
               "study again once the sweep is done, to evaluate them too")
    return choices


def _run(sweep_dir: Path, plan: Plan, device: str, progress: bool, report: Callable[[str], None]) -> None:
    outcome, left_out = retrieve_sweep(sweep_dir, plan, device=device, progress=progress)
    done = list(outcome.values())
    report(f"{plan.task} {plan.split}: {done.count('done')} done, {done.count('skipped')} finished before, "
           f"{len(left_out)} left out")
