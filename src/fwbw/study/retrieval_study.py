"""The retrieval study (issue 19, docs/retrieval-plan.md as amended to fit one session of a 2-core
machine): every evaluation the plan asks for over a sweep of the `retrieval` preset, in an order
that puts what answers the question first and every dev result a test system depends on before
that system's test queries are read, resumably (each result is skipped once finished:
fwbw.study.retrieval_sweep).

  1. dev, the first seed of each setting (explored_seeds; "tune once on dev, one seed per arm"):
     BM25 and zero-shot late interaction with each model's embeds (MODEL_EMBEDS, and ECHO for the
     fw-only models: ECHO_P_BWS), what the analysis chooses each model's best embed among
  2. test, every seed, the same and the control CONTROL_EMBED: the primary endpoint (fwbw - fwfw)
     and the contrasts between embeds, which no choice enters
  3. dev, the explored seeds: a rerank of BM25's RERANK_DEPTH best documents with each model's
     embeds, on which each run's fusion weight is tuned (fwbw.retrieval.fusion)
  4. test, the explored seeds: those reranks and their fusions
  5. the sanity task (SANITY_TASK): the fw and fwbw zero-shot embeds on test, on the explored seeds
  6. the explored seeds: fine-tuning of FINETUNED_EMBEDS (FINETUNE_STEPS steps, in-batch
     negatives), on dev (what the best dense system is chosen among), then on test, the goal
     tasks one after the other (the costliest step, last)
Steps 1-4 and 6 each go over both GOAL_TASKS, one task after the other. Every run's texts are read in
chunks of CHUNK_TOKENS, half the preset's context, so that echo, which reads a chunk twice, sees
what every other system sees.
The study chooses nothing itself: each fusion's weight is tuned on its own run's dev rerank, and
the analysis (fwbw.analysis.retrieval_stats) reads dev rows alone to choose.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from fwbw.retrieval.ensemble import CONTROL_EMBED
from fwbw.study.retrieval_sweep import DEFAULT_CACHE_GB, Plan, retrieve_sweep, runs_by_setting
from fwbw.study.sweep_dir import RUNS, read_sweep
from fwbw.training.run_dir import read_status

GOAL_TASKS = ("description", "ict")
SANITY_TASK = "title"
CHUNK_TOKENS = 128  # half the retrieval preset's 256-token context
MODEL_EMBEDS = ("fw", "bw", "fwbw")  # a model's own views, each model's candidates
ECHO = "echo"  # the fw-only model's way to let a token see the whole text
ECHO_P_BWS = (0.0,)  # the models echo is a candidate of: the fw-only ones
FINETUNED_EMBEDS = ("fw", "fwbw")
FINETUNE_STEPS = 300
RERANK_DEPTH = 100


def explored_runs(sweep_dir: Path) -> list[str]:
    """The run of each setting of the sweep with the first seed."""
    return [runs[0] for runs in runs_by_setting(sweep_dir)]


def explored_seeds(sweep_dir: Path) -> tuple[int, ...]:
    """The first seed of each setting of the sweep."""
    configs = read_sweep(sweep_dir)["runs"]
    return tuple(sorted({configs[run_id]["seed"] for run_id in explored_runs(sweep_dir)}))


def candidate_plans(plan: Plan) -> list[Plan]:
    """The plan with each model's candidate embeds: its MODEL_EMBEDS for every run, ECHO for the
    fw-only ones."""
    return [dataclasses.replace(plan, embeds=MODEL_EMBEDS), dataclasses.replace(plan, embeds=(ECHO,), p_bws=ECHO_P_BWS)]


def zero_shot_plans(task: str, split: str, maxsim_dtype: str, explored: tuple[int, ...]) -> list[Plan]:
    """Steps 1 (dev, the explored seeds) and 2 (test, every seed, with the control) of the module docstring."""
    base = Plan(task, split, chunk_tokens=CHUNK_TOKENS, maxsim_dtype=maxsim_dtype, seeds=explored if split == "dev" else None)
    control = [dataclasses.replace(base, embeds=(CONTROL_EMBED,))] if split == "test" else []
    return [*candidate_plans(base), *control]


def rerank_plans(task: str, explored: tuple[int, ...], maxsim_dtype: str) -> list[Plan]:
    """Steps 3 and 4 (module docstring): the dev reranks, then the test reranks and fusions."""
    dev = Plan(task, "dev", chunk_tokens=CHUNK_TOKENS, maxsim_dtype=maxsim_dtype, seeds=explored, rerank=RERANK_DEPTH)
    test = dataclasses.replace(dev, split="test")
    return [*candidate_plans(dev), *candidate_plans(test), *candidate_plans(dataclasses.replace(test, fusion=True))]


def finetune_plans(task: str, explored: tuple[int, ...], maxsim_dtype: str) -> list[Plan]:
    """Step 6 (module docstring): one fine-tuning per run and embed, evaluated on dev, then on test."""
    dev = Plan(task, "dev", FINETUNED_EMBEDS, chunk_tokens=CHUNK_TOKENS, maxsim_dtype=maxsim_dtype, seeds=explored,
               finetune_steps=FINETUNE_STEPS)
    return [dev, dataclasses.replace(dev, split="test")]


def sanity_plan(explored: tuple[int, ...], maxsim_dtype: str) -> Plan:
    return Plan(SANITY_TASK, "test", ("fw", "fwbw"), chunk_tokens=CHUNK_TOKENS, maxsim_dtype=maxsim_dtype, seeds=explored)


def study_plans(explored: tuple[int, ...], maxsim_dtype: str) -> list[Plan]:
    """Every step of the module docstring, in order."""
    return [*(plan for task in GOAL_TASKS for plan in zero_shot_plans(task, "dev", maxsim_dtype, explored)),
            *(plan for task in GOAL_TASKS for plan in zero_shot_plans(task, "test", maxsim_dtype, explored)),
            *(plan for task in GOAL_TASKS for plan in rerank_plans(task, explored, maxsim_dtype)),
            sanity_plan(explored, maxsim_dtype),
            *(plan for task in GOAL_TASKS for plan in finetune_plans(task, explored, maxsim_dtype))]


def run_study(sweep_dir: Path, maxsim_dtype: str = "fp32", device: str = "auto", progress: bool = True,
              report: Callable[[str], None] = print, cache_gb: float = DEFAULT_CACHE_GB) -> None:
    """Every step of the module docstring over the sweep's finished runs, the token cache trimmed to
    cache_gb after each result. ValueError (one line) while the run of an explored seed is
    unfinished: the dev results the analysis chooses on are theirs. Runs unfinished when it starts
    are left out (said at the end): the study run again once they are done evaluates them and
    skips every result already had."""
    unfinished = [run_id for run_id in read_sweep(sweep_dir)["runs"] if read_status(Path(sweep_dir) / RUNS / run_id)["status"] != "done"]
    waiting = [run_id for run_id in explored_runs(sweep_dir) if run_id in unfinished]
    if waiting:
        raise ValueError(f"{sweep_dir}: {len(waiting)} runs of the first seed of a setting are not finished "
                         f"({', '.join(waiting)}): every choice is made on their dev results, so finish them first")
    for plan in study_plans(explored_seeds(sweep_dir), maxsim_dtype):
        _run(sweep_dir, dataclasses.replace(plan, cache_gb=cache_gb), device, progress, report)
    if unfinished:
        report(f"{len(unfinished)} runs were not finished when the study started ({unfinished[0]}, ...): run the "
               "study again once the sweep is done, to evaluate them too")


def _run(sweep_dir: Path, plan: Plan, device: str, progress: bool, report: Callable[[str], None]) -> None:
    outcome, left_out = retrieve_sweep(sweep_dir, plan, device=device, progress=progress)
    done = list(outcome.values())
    report(f"{plan.task} {plan.split}: {done.count('done')} done, {done.count('skipped')} finished before, "
           f"{len(left_out)} left out")
