"""The retrieval study's order (fwbw.study.retrieval_study): the primary endpoint's systems first, every
dev result a test system depends on before it, fine-tuning on the explored seeds."""

from __future__ import annotations

import dataclasses

import pytest

from fwbw.study import retrieval_study as study
from fwbw.study.configure import build_sweep_spec
from fwbw.study.retrieval_sweep import DEFAULT_CACHE_GB, Plan
from fwbw.study.sweep import prepare_sweep


def test_the_explored_seeds_are_each_setting_s_first(tmp_path):
    spec = build_sweep_spec(overrides={"depths": [1], "widths": [16], "p_bw": [0.0, 0.5], "seeds": 3, "seed": 7})
    prepare_sweep(spec, tmp_path)
    assert study.explored_seeds(tmp_path) == (7,)


def test_the_study_waits_for_the_explored_seeds_runs_and_leaves_out_the_others_saying_so(tmp_path, monkeypatch):
    spec = build_sweep_spec(overrides={"depths": [1], "widths": [16], "p_bw": [0.0, 0.5], "seeds": 2, "seed": 7})
    prepare_sweep(spec, tmp_path)
    first = study.explored_runs(tmp_path)
    assert len(first) == 2 and all("-s7-" in run_id for run_id in first)
    with pytest.raises(ValueError, match=rf"^{tmp_path}: 2 runs of the first seed of a setting are not finished "
                       rf"\({first[0]}, {first[1]}\): every choice is made on their dev results, so finish them first$"):
        study.run_study(tmp_path, report=lambda line: None)
    monkeypatch.setattr(study, "read_status", lambda run_dir: {"status": "done" if run_dir.name in first else "running"})
    ran: list[Plan] = []
    monkeypatch.setattr(study, "retrieve_sweep", lambda sweep, plan, device, progress: (ran.append(plan) or {}, []))
    lines: list[str] = []
    study.run_study(tmp_path, report=lines.append)
    assert ran and lines[-1].startswith("2 runs were not finished when the study started (")
    assert lines[-1].endswith("): run the study again once the sweep is done, to evaluate them too")


def run_with_every_run_done(tmp_path, monkeypatch, seeds: int = 1) -> list[Plan]:
    """The plans run_study runs over a sweep of two settings whose runs are all finished (with the
    default cache size: each plan's trimmed to the size run_study is given, here 12 GB)."""
    ran: list[Plan] = []
    monkeypatch.setattr(study, "read_status", lambda run_dir: {"status": "done"})
    spec = build_sweep_spec(overrides={"depths": [1], "widths": [16], "p_bw": [0.0, 0.5], "seeds": seeds})
    prepare_sweep(spec, tmp_path)
    monkeypatch.setattr(study, "retrieve_sweep", lambda sweep, plan, device, progress: (ran.append(plan) or {}, []))
    study.run_study(tmp_path, maxsim_dtype="bf16", report=lambda line: None, cache_gb=12.0)
    assert {plan.cache_gb for plan in ran} == {12.0}
    return [dataclasses.replace(plan, cache_gb=DEFAULT_CACHE_GB) for plan in ran]


def test_the_zero_shot_systems_run_first_on_dev_then_on_test_every_seed(tmp_path, monkeypatch):
    ran = run_with_every_run_done(tmp_path, monkeypatch, seeds=2)
    explored = study.explored_seeds(tmp_path)
    assert explored == (100,)  # the default first seed
    zero_shot = [plan for split in ("dev", "test") for task in study.GOAL_TASKS
                 for plan in study.zero_shot_plans(task, split, "bf16", explored)]
    assert ran[: len(zero_shot)] == zero_shot  # the primary endpoint before anything else
    dev, test = ([plan for plan in zero_shot if plan.split == split] for split in ("dev", "test"))
    assert all(plan.seeds == explored for plan in dev) and all(plan.seeds is None for plan in test)
    for plans in (dev, test):  # per task: every model's own views, echo for the fw-only ones
        assert [(plan.embeds, plan.p_bws) for plan in plans if plan.embeds != ("fwfw",)] == [
            (study.MODEL_EMBEDS, None), (("echo",), (0.0,))] * len(study.GOAL_TASKS)
    assert [plan.task for plan in test if plan.embeds == ("fwfw",)] == list(study.GOAL_TASKS)  # the control on test
    assert not any("fwfw" in plan.embeds for plan in ran if plan.split == "dev")  # never a candidate
    assert {plan.maxsim_dtype for plan in ran} == {"bf16"} and {plan.chunk_tokens for plan in ran} == {study.CHUNK_TOKENS}
    assert all(plan.p_bws in (None, study.ECHO_P_BWS) and (plan.p_bws is None) == ("echo" not in plan.embeds) for plan in ran)
    assert len(ran) == len(set(ran))


def test_each_test_system_runs_after_its_dev_counterpart_and_fusions_after_their_runs_dev_rerank(tmp_path, monkeypatch):
    ran = run_with_every_run_done(tmp_path, monkeypatch, seeds=2)
    for index, plan in enumerate(ran):
        if plan.split == "test" and plan.task in study.GOAL_TASKS and plan.embeds != ("fwfw",):  # the control: test only
            dev = dataclasses.replace(plan, split="dev", fusion=False)
            earlier = [dataclasses.replace(other, seeds=plan.seeds) for other in ran[:index]]
            assert dev in earlier, plan
    fusions = [plan for plan in ran if plan.fusion]
    assert [(plan.task, plan.embeds) for plan in fusions] == [
        (task, embeds) for task in study.GOAL_TASKS for embeds in (study.MODEL_EMBEDS, ("echo",))]
    for fusion in fusions:  # the rerank each run's fusion weight is tuned on: the run's own, on dev
        assert ran.index(dataclasses.replace(fusion, split="dev", fusion=False)) < ran.index(fusion)
        assert fusion.seeds == (100,) and fusion.rerank == study.RERANK_DEPTH


def test_fine_tuning_runs_last_on_the_explored_seeds_only_with_in_batch_negatives(tmp_path, monkeypatch):
    ran = run_with_every_run_done(tmp_path, monkeypatch, seeds=2)
    finetuned = [plan for plan in ran if plan.finetune_steps]
    assert [(plan.task, plan.split) for plan in finetuned] == [(task, split) for task in study.GOAL_TASKS for split in ("dev", "test")]
    assert all(plan.seeds == (100,) and plan.embeds == study.FINETUNED_EMBEDS and plan.hard_negatives is None
               and plan.finetune_steps == study.FINETUNE_STEPS for plan in finetuned)
    assert ran[-len(finetuned):] == finetuned  # the costliest step last
    assert ran[-len(finetuned) - 1] == study.sanity_plan((100,), "bf16")
    assert {plan.task for plan in ran} == {*study.GOAL_TASKS, study.SANITY_TASK}
    assert {plan.seeds for plan in ran if plan.rerank} == {(100,)}  # reranks and fusions: the explored seeds
