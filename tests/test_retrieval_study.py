"""The retrieval study's order and choices (fwbw.study.retrieval_study): dev before test, and choices read
from the explored seeds' dev results alone."""

from __future__ import annotations

import pandas as pd
import pytest

from fwbw.study import retrieval_study as study
from fwbw.study.configure import build_sweep_spec
from fwbw.study.retrieval_sweep import Plan
from fwbw.study.sweep import prepare_sweep


def rows(split: str, seed: int, values: dict) -> list[dict]:
    """Fine-tuned (variant 'negatives' or '') and zero-shot (blocks 1 or 2 of depth 2) rows."""
    made = []
    for (kind, option), value in values.items():
        row = {"task": "description", "split": split, "seed": seed, "system": "late-interaction", "embed": "fw",
               "depth": 2, "blocks": 2, "finetune_steps": 0, "variant": "chunks 128", "ndcg_at_10": value,
               "chunk_tokens": study.CHUNK_TOKENS, "maxsim_dtype": "fp32", "pooling": None, "query_fillers": 0}
        if kind == "finetuned":
            row |= {"finetune_steps": study.FINETUNE_STEPS,
                    "variant": "chunks 128, bm25 negatives" if option else "chunks 128"}
        else:
            row |= {"blocks": 1 if option else 2}
        made.append(row)
    return made


def table(dev: dict, test: dict, other_seed: dict) -> pd.DataFrame:
    return pd.DataFrame([*rows("dev", 200, dev), *rows("test", 200, test), *rows("dev", 201, other_seed)])


def test_choices_follow_the_explored_seeds_dev_results_and_nothing_else():
    better_options = {("finetuned", True): 0.6, ("finetuned", False): 0.5, ("zero", True): 0.4, ("zero", False): 0.3}
    worse_options = {key: 1.0 - value for key, value in better_options.items()}
    chosen = study.choose(table(better_options, worse_options, worse_options), explored=(200,))
    assert chosen == study.Choices("bm25", 1)
    # test rows and the other seeds' dev rows reversed the other way: the same choices
    assert study.choose(table(better_options, better_options, better_options), explored=(200,)) == chosen
    # the explored seed's dev rows reversed: the defaults
    assert study.choose(table(worse_options, better_options, better_options), explored=(200,)) == study.Choices(None, None)
    other_chunks = table(worse_options, better_options, better_options).assign(chunk_tokens=64)
    assert study.choose(pd.concat([table(better_options, {}, {}), other_chunks]), explored=(200,)) == chosen
    ties = dict.fromkeys(better_options, 0.5)
    assert study.choose(table(ties, better_options, better_options), explored=(200,)) == study.Choices(None, None)
    assert study.choose(table({}, better_options, better_options), explored=(200,)) == study.Choices(None, None)


def test_dev_rows_with_query_fillers_enter_no_choice():
    better_options = {("finetuned", True): 0.6, ("finetuned", False): 0.5, ("zero", True): 0.4, ("zero", False): 0.3}
    worse_options = {key: 1.0 - value for key, value in better_options.items()}
    filled = table(worse_options, {}, {}).assign(query_fillers=study.EXPLORED_FILLERS)
    chosen = study.choose(pd.concat([table(better_options, {}, {}), filled]), explored=(200,))
    assert chosen == study.choose(table(better_options, {}, {}), explored=(200,)) == study.Choices("bm25", 1)


def test_query_fillers_and_the_around_embed_are_measured_on_the_explored_seeds_dev_queries_only(tmp_path, monkeypatch):
    ran: list[Plan] = []
    monkeypatch.setattr(study, "read_status", lambda run_dir: {"status": "done"})
    prepare_sweep(build_sweep_spec(overrides={"depths": [1], "widths": [16], "p_bw": [0.0, 0.5], "seeds": 1}), tmp_path)
    monkeypatch.setattr(study, "explored_seeds", lambda sweep: (200,))
    monkeypatch.setattr(study, "retrieve_sweep", lambda sweep, plan, device, progress: (ran.append(plan) or {}, []))
    monkeypatch.setattr(study, "build_retrieval_results", lambda sweep: pd.DataFrame(rows("dev", 200, {("zero", False): 0.3})))
    study.run_study(tmp_path, report=lambda line: None)
    filled = [plan for plan in ran if plan.query_fillers]
    around = [plan for plan in ran if study.ALIGNMENT_EMBED in plan.embeds]
    for explored in (filled, around):
        assert [plan.task for plan in explored] == list(study.GOAL_TASKS)
        assert all(plan.split == "dev" and plan.seeds == (200,) and not plan.finetune_steps for plan in explored)
    assert {plan.query_fillers for plan in filled} == {study.EXPLORED_FILLERS}
    assert all(plan.embeds == study.CANDIDATE_EMBEDS for plan in filled)
    assert all(plan.embeds == (study.ALIGNMENT_EMBED,) and not plan.query_fillers for plan in around)


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
                       rf"\({first[0]}, {first[1]}\): the choices on dev are made on them, so finish them first$"):
        study.run_study(tmp_path, report=lambda line: None)
    monkeypatch.setattr(study, "read_status", lambda run_dir: {"status": "done" if run_dir.name in first else "running"})
    ran: list[Plan] = []
    monkeypatch.setattr(study, "retrieve_sweep", lambda sweep, plan, device, progress: (ran.append(plan) or {}, []))
    monkeypatch.setattr(study, "build_retrieval_results", lambda sweep: pd.DataFrame(rows("dev", 7, {("zero", False): 0.3})))
    lines: list[str] = []
    study.run_study(tmp_path, report=lines.append)
    assert ran and lines[-1].startswith("2 runs were not finished when the study started (")
    assert lines[-1].endswith("): run the study again once the sweep is done, to evaluate them too")


def test_every_dev_evaluation_runs_before_any_test_one(tmp_path, monkeypatch):
    ran: list[Plan] = []
    monkeypatch.setattr(study, "read_status", lambda run_dir: {"status": "done"})
    spec = build_sweep_spec(overrides={"depths": [1], "widths": [16], "p_bw": [0.0, 0.5], "seeds": 1})
    prepare_sweep(spec, tmp_path)
    monkeypatch.setattr(study, "explored_seeds", lambda sweep: (200,))
    monkeypatch.setattr(study, "retrieve_sweep", lambda sweep, plan, device, progress: (ran.append(plan) or {}, []))
    monkeypatch.setattr(study, "build_retrieval_results", lambda sweep: pd.DataFrame(rows("dev", 200, {("zero", False): 0.3})))
    choices = study.run_study(tmp_path, report=lambda line: None)
    assert choices == study.Choices(None, None)
    exploration = [plan for task in study.GOAL_TASKS for plan in study.exploration_plans(task, (200,), "fp32")]
    assert ran[-len(exploration) :] == exploration  # last: nothing depends on it
    ran = ran[: -len(exploration)]
    last_dev = max(index for index, plan in enumerate(ran) if plan.split == "dev")
    early_tests = [plan for plan in ran[:last_dev] if plan.split == "test"]
    # before the last dev evaluation, only what no choice enters: zero-shot at every block, on both goal tasks
    assert [plan.task for plan in early_tests] == list(study.GOAL_TASKS)
    assert all(plan == study.zero_shot_plan(plan.task, "test", "fp32") for plan in early_tests)
    assert ran.index(early_tests[0]) > max(index for index, plan in enumerate(ran)
                                           if plan == study.zero_shot_plan(plan.task, "dev", "fp32", (200,)))
    chosen = [plan for plan in ran[last_dev:] if plan.split == "test"]
    assert {plan.task for plan in ran if plan.split == "dev"} == set(study.GOAL_TASKS)
    assert any(plan.finetune_steps for plan in chosen) and any(plan.fusion for plan in chosen)  # after the choices
    assert all(plan.chunk_tokens == study.CHUNK_TOKENS for plan in ran)
    explored = [plan for plan in ran if plan.seeds is not None]
    assert explored and all(plan.seeds == (200,) for plan in explored)
    assert all(plan.split == "dev" for plan in explored if plan.task in study.GOAL_TASKS)
    assert ran[-1] == study.sanity_plan((200,), "fp32")  # the sanity task on the explored seeds only
    assert len(ran) == len(set(ran))


@pytest.mark.parametrize("choices, extra_blocks", [(study.Choices(None, None), False), (study.Choices("bm25", 1), True)])
def test_the_test_plans_use_the_choices(choices, extra_blocks):
    plans = study.test_plans("ict", choices, "bf16")
    finetuned = [plan for plan in plans if plan.finetune_steps]
    assert [plan.hard_negatives for plan in finetuned] == [choices.hard_negatives]
    assert any(plan.blocks == 1 for plan in plans) == extra_blocks
    assert {plan.maxsim_dtype for plan in plans} == {"bf16"}
    assert {plan.split for plan in plans} == {"test"}
