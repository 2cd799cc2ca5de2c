"""The retrieval comparisons on hand-built tables: within-model contrasts with their exact intervals, the
two-level bootstrap over seeds and queries, choices made on dev alone, and the goal's Holm-adjusted p."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from fwbw.analysis.retrieval_stats import (
    AGAINST_BM25,
    BEST_EMBED,
    BOOTSTRAP_RESAMPLES,
    BW_TRAINING,
    COMPARISON_COLUMNS,
    FW_EMBED,
    analyse_retrieval,
    answer_rows,
    bootstrap_p_value,
    two_level_means,
)
from fwbw.retrieval.metrics import METRICS, _bootstrap_means, paired_difference
from fwbw.study.results import RETRIEVAL_COLUMNS

QIDS = ("q1", "q2")
RUN = dict(data="wiki-sample", tokenizer="bpe:8192", seq_len=128, epochs=1.0, train_tokens=None, eval_tokens=12288,
           dtype="auto", recipe_id="r1", depth=2, width=8, model_scale=math.nan, bw_mode="add", bw_mask="causal",
           task_tokens=False, num_heads=1, adaptive_p_bw=False, eval_every_epochs=0.125)
T_1 = 12.706204736174707  # t_{0.975, 1}: two seeds, or two queries
B = BOOTSTRAP_RESAMPLES


def result(values, task="description", split="test", p_bw=None, seed=None, system="late-interaction", embed=None,
           blocks=None, steps=0) -> tuple[dict, dict]:
    """One result's row and its per-query nDCG@10 ({qid: value}); BM25's when p_bw is None."""
    row = {"phase": "retrieval", "task": task, "split": split, "blocks": blocks, "finetune_steps": steps,
           "n_queries": len(values), **dict.fromkeys(METRICS, 0.0), "ndcg_at_10": float(np.mean(values))}
    if p_bw is None:
        row |= {"system": "bm25", "result": f"bm25/{task}-{split}"}
    else:
        run_id = f"p{p_bw:g}-s{seed}"
        row |= {**RUN, "run_id": run_id, "p_bw": p_bw, "seed": seed, "system": system, "embed": embed,
                "result": f"{run_id}/{task}-{split}-{system}-{embed}-b{blocks}-ft{steps}"}
    return row, dict(zip(QIDS, values))


def build(results: list[tuple[dict, dict]]) -> tuple[pd.DataFrame, dict]:
    table = pd.DataFrame([row for row, _ in results]).reindex(columns=RETRIEVAL_COLUMNS)
    return table, {row["result"]: values for row, values in results}


# (p_bw, embed) -> seed -> nDCG@10 of q1, q2, on the test split of "description"
WITHIN = {
    (0.5, "fw"): {1: (0.2, 0.4), 2: (0.3, 0.5)},
    (0.5, "bw"): {1: (0.3, 0.5), 2: (0.4, 0.6)},  # − fw: 0.1 in every cell
    (0.5, "fwbw"): {1: (0.2, 0.5), 2: (0.5, 0.8)},  # − fw: [[0.0, 0.1], [0.2, 0.3]]
    (0.5, "fwfw"): {1: (0.25, 0.55), 2: (0.55, 0.85)},  # fwbw − fwfw: −0.05 in every cell
    (0.5, "echo"): {1: (0.2, 0.4), 2: (0.3, 0.5)},  # − fw: 0
    (0.0, "fw"): {1: (0.1, 0.3), 2: (0.2, 0.4)},
    (0.0, "bw"): {1: (0.1, 0.3), 2: (0.2, 0.4)},  # the bw view of a model never trained bw; − fw: 0
    (0.0, "fwbw"): {1: (0.6, 0.6), 2: (0.6, 0.6)},  # − fw: [[0.5, 0.3], [0.4, 0.2]]
    (0.0, "fwfw"): {1: (0.5, 0.7), 2: (0.6, 0.6)},  # fwbw − fwfw: [[0.1, −0.1], [0.0, 0.0]]
    (0.0, "echo"): {1: (0.1, 0.3), 2: (0.3, 0.5)},  # − fw: [[0.0, 0.0], [0.1, 0.1]]
}


def within_table() -> tuple[pd.DataFrame, dict]:
    return build([result(values, p_bw=p_bw, seed=seed, embed=embed)
                  for (p_bw, embed), seeds in WITHIN.items() for seed, values in seeds.items()])


def test_within_model_contrasts_with_their_exact_intervals():
    """A 2 x 2 matrix d[seed, query]: the resample of one cell alone has probability 1/16, so the two-level
    2.5% and 97.5% points are d's smallest and largest cells."""
    comparisons = analyse_retrieval(*within_table()).comparisons
    within = ["bw − fw", "fwbw − fw", "fwbw − fwfw", "echo − fw"]
    assert list(zip(comparisons.comparison, comparisons.p_bw)) == [
        *((name, 0.0) for name in within), *((name, 0.5) for name in within), (FW_EMBED, 0.5), (BW_TRAINING, 0.5)]
    rows = comparisons.set_index(["comparison", "p_bw"])
    fwbw = rows.loc[("fwbw − fw", 0.5)]
    assert (fwbw.a, fwbw.a_embed, fwbw.b, fwbw.b_embed, fwbw.a_system) == (
        "p_bw = 0.5", "fwbw", "p_bw = 0.5", "fw", "late-interaction")
    assert (fwbw.n_seeds, fwbw.seeds, fwbw.n_queries, fwbw.per_seed) == (2, "1, 2", 2, "1: +0.050; 2: +0.250")
    assert (fwbw.a_mean, fwbw.b_mean, fwbw.mean_diff) == pytest.approx((0.5, 0.35, 0.15))
    assert (fwbw.ci_low, fwbw.ci_high) == pytest.approx((0.0, 0.3), abs=1e-12)
    assert (fwbw.seed_ci_low, fwbw.seed_ci_high) == pytest.approx((0.15 - T_1 * 0.1, 0.15 + T_1 * 0.1))  # s / √2 = 0.1
    assert (fwbw.query_ci_low, fwbw.query_ci_high) == pytest.approx((0.15 - T_1 * 0.05, 0.15 + T_1 * 0.05))  # q: 0.1, 0.2
    assert (fwbw.query_boot_low, fwbw.query_boot_high) == pytest.approx((0.1, 0.2))
    assert fwbw.p_value == pytest.approx(2 / 16, abs=0.015)  # P(d's 0 cell alone) = 1/16, on one side of 0
    for name, p_bw, interval in [("bw − fw", 0.5, (0.1, 0.1)), ("fwbw − fwfw", 0.5, (-0.05, -0.05)),
                                 ("echo − fw", 0.5, (0.0, 0.0)), ("echo − fw", 0.0, (0.0, 0.1)), (FW_EMBED, 0.5, (0.1, 0.1)),
                                 ("fwbw − fwfw", 0.0, (-0.1, 0.1)), ("fwbw − fw", 0.0, (0.2, 0.5))]:
        assert (rows.loc[(name, p_bw)].ci_low, rows.loc[(name, p_bw)].ci_high) == pytest.approx(interval, abs=1e-12)
    assert rows.loc[("bw − fw", 0.5)].p_value == rows.loc[("fwbw − fwfw", 0.5)].p_value == 2 / (B + 1)
    assert rows.loc[("echo − fw", 0.5)].p_value == 1.0
    assert not comparisons.goal.any() and comparisons.p_holm.isna().all()
    # (fwbw − fwfw at 0.5) − (fwbw − fwfw at 0): −0.05 − [[0.1, −0.1], [0.0, 0.0]] = [[−0.15, 0.05], [−0.05, −0.05]]
    added = rows.loc[(BW_TRAINING, 0.5)]
    assert (added.a, added.b, added.a_embed, added.b_embed, added.n_seeds, added.n_queries) == (
        "p_bw = 0.5", "p_bw = 0", "fwbw", "fwbw", 2, 2)
    assert (added.a_mean, added.b_mean, added.mean_diff) == pytest.approx((-0.05, 0.0, -0.05))
    assert (added.ci_low, added.ci_high) == pytest.approx((-0.15, 0.05), abs=1e-12)
    assert added.per_seed == "1: -0.050; 2: -0.050"
    # only the models trained both ways answer: the p_bw = 0 rows are references
    assert set(answer_rows(comparisons).p_bw) == {0.5}


def test_what_bw_training_adds_pairs_each_seed_and_query_with_its_own_in_the_fw_only_model():
    """fwbw − fwfw of p_bw 0.5 [[0.1, 0.3], [0.2, 0.0]] minus that of p_bw 0 [[0.0, 0.1], [0.3, 0.1]], cell by cell:
    [[0.1, 0.2], [-0.1, -0.1]]; pairing another seed or query with it would change every number checked."""
    cells = {(0.5, "fwbw"): {1: (0.5, 0.6), 2: (0.6, 0.5)}, (0.5, "fwfw"): {1: (0.4, 0.3), 2: (0.4, 0.5)},
             (0.0, "fwbw"): {1: (0.5, 0.5), 2: (0.6, 0.4)}, (0.0, "fwfw"): {1: (0.5, 0.4), 2: (0.3, 0.3)}}
    comparisons = analyse_retrieval(*build([result(values, p_bw=p_bw, seed=seed, embed=embed)
                                            for (p_bw, embed), seeds in cells.items()
                                            for seed, values in seeds.items()])).comparisons
    added = comparisons.set_index("comparison").loc[BW_TRAINING]
    assert added.per_seed == "1: +0.150; 2: -0.100"
    assert (added.a_mean, added.b_mean, added.mean_diff) == pytest.approx((0.15, 0.125, 0.025))
    assert (added.ci_low, added.ci_high) == pytest.approx((-0.1, 0.2), abs=1e-12)
    assert (added.query_boot_low, added.query_boot_high) == pytest.approx((0.0, 0.05))  # over queries: 0.0 and 0.05


def test_a_comparison_that_cannot_be_made_is_absent():
    table, per_query = within_table()
    without_control = analyse_retrieval(table[table.embed.ne("fwfw")], per_query).comparisons
    assert "fwbw − fwfw" not in set(without_control.comparison)
    one_seed = analyse_retrieval(table[table.seed.eq(1) & table.p_bw.eq(0.5)], per_query).comparisons
    assert one_seed.comparison.tolist() == ["bw − fw", "fwbw − fw", "fwbw − fwfw", "echo − fw"]  # no baseline: no between
    assert one_seed.seed_ci_low.isna().all() and one_seed.n_seeds.eq(1).all()
    fwbw = one_seed.set_index("comparison").loc["fwbw − fw"]
    assert (fwbw.ci_low, fwbw.ci_high) == pytest.approx((0.0, 0.1), abs=1e-12)  # the query bootstrap of seed 1


def test_only_bm25_gives_an_empty_table_of_the_columns():
    comparisons = analyse_retrieval(*build([result((0.3, 0.3)), result((0.3, 0.3), split="dev")])).comparisons
    assert comparisons.empty and comparisons.columns.tolist() == COMPARISON_COLUMNS


def test_two_folders_of_one_setting_count_once():
    """`--embed echo` (its default chunk length) and the study's `--chunk-tokens` of the same length
    write two folders of one setting: the first by folder name counts, the comparisons unchanged."""
    table, per_query = within_table()
    twin = table[table.result.eq("p0.5-s1/description-test-late-interaction-bw-bNone-ft0")].assign(result="twin")
    alone = analyse_retrieval(table, per_query).comparisons
    doubled = analyse_retrieval(pd.concat([table, twin], ignore_index=True), {**per_query, "twin": {"q1": 0.0, "q2": 0.0}})
    pd.testing.assert_frame_equal(doubled.comparisons, alone)


def test_results_of_different_queries_are_refused_in_one_line():
    table, per_query = within_table()
    per_query["p0.5-s2/description-test-late-interaction-fw-bNone-ft0"] = {"q1": 0.3, "q9": 0.5}
    with pytest.raises(ValueError, match=r"^retrieval results p0\.5-s1/description-test-late-interaction-bw-bNone-ft0, "
                                         r"p0\.5-s2/description-test-late-interaction-bw-bNone-ft0, p0\.5-s1/description-"
                                         r"test-late-interaction-fw-bNone-ft0, p0\.5-s2/description-test-late-interaction-"
                                         r"fw-bNone-ft0 hold different queries: rerun them on one task$"):
        analyse_retrieval(table, per_query)


# ----------------------------------------------------------------------------- the two-level bootstrap

def interval(means: np.ndarray) -> tuple[float, float]:
    return tuple(np.quantile(means, [0.025, 0.975]))


def test_with_every_seed_alike_it_is_the_query_bootstrap():
    queries = np.random.default_rng(5).normal(size=40)
    d = np.tile(queries, (3, 1))  # three seeds, no seed variance
    paired = paired_difference(dict(enumerate(queries)), dict.fromkeys(range(40), 0.0))
    assert interval(two_level_means(d)) == pytest.approx((paired.bootstrap_low, paired.bootstrap_high), abs=1e-12)


def test_with_one_query_it_is_the_seed_bootstrap():
    seeds = np.array([0.1, 0.4, -0.2, 0.3, 0.25])
    expected = _bootstrap_means(seeds, B, np.random.SeedSequence(0, spawn_key=(1,)))  # the seeds' own stream
    np.testing.assert_allclose(two_level_means(seeds[:, None]), expected, rtol=0, atol=1e-12)
    assert interval(two_level_means(seeds[:, None])) == pytest.approx(interval(expected), abs=1e-12)


def test_it_is_reproducible_given_its_seed():
    d = np.random.default_rng(1).normal(size=(3, 7))
    np.testing.assert_array_equal(two_level_means(d), two_level_means(d))
    assert not np.array_equal(two_level_means(d), two_level_means(d, seed=1))
    assert len(two_level_means(d, resamples=2_500)) == 2_500


def test_a_hand_checkable_case_resamples_seeds_and_queries_independently():
    """d[s, q] = 2 s + q over 2 seeds and 2 queries: a resample's mean is 2 · (mean drawn seed) + (mean drawn
    query), each mean 0, 1/2 or 1 with probability 1/4, 1/2, 1/4, independently: its 7 values 0, 0.5, ..., 3
    have probabilities 1, 2, 3, 4, 3, 2, 1 sixteenths, and the interval is (0, 3)."""
    means = two_level_means(np.array([[0.0, 1.0], [2.0, 3.0]]))
    values, counts = np.unique(means, return_counts=True)
    assert values.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    np.testing.assert_allclose(counts / B, np.array([1, 2, 3, 4, 3, 2, 1]) / 16, atol=0.01)
    assert interval(means) == (0.0, 3.0)
    assert bootstrap_p_value(means) == 2 * (1 + counts[0]) / (B + 1)


def test_the_bootstrap_p_value():
    assert bootstrap_p_value(np.array([-1.0, 1.0, 2.0, 3.0])) == 2 * 2 / 5
    assert bootstrap_p_value(np.array([1.0, 2.0, 3.0])) == 2 / 4
    assert bootstrap_p_value(np.zeros(9)) == 1.0


# ----------------------------------------------------------------------------- choices on dev alone

SYSTEMS = ("late-interaction", "single-vector-mean", "rerank-bm25", "fusion-bm25")
EMBEDS = ("echo", "fw", "bw", "fwbw", "fwfw")
CONFIGS = list(itertools.product(SYSTEMS, EMBEDS, (1, 2), (0, 100)))  # (system, embed, blocks, finetune_steps)
CHOSEN = ["comparison", "split", "p_bw", "a_system", "a_embed", "a_blocks", "a_finetune_steps", "b_embed", "b_blocks"]


def choice_table(test_reversed: bool, bump: tuple | None = None) -> tuple[pd.DataFrame, dict]:
    """Two models (p_bw 0, 0.5) x seeds 1, 2 x every CONFIG on dev and test, and BM25. On dev the later
    configs score higher (0.1 + 0.001 i; `bump`, (p_bw, *config), scores 0.99); on test the same, or with
    test_reversed the earlier ones (0.9 − 0.001 i): test then prefers echo after 1 block, zero-shot."""
    results = [result((0.3, 0.3), split=split) for split in ("dev", "test")]
    for p_bw, seed, split, (i, config) in itertools.product((0.0, 0.5), (1, 2), ("dev", "test"), enumerate(CONFIGS)):
        score = 0.9 - 0.001 * i if split == "test" and test_reversed else 0.1 + 0.001 * i
        score = 0.99 if split == "dev" and (p_bw, *config) == bump else score
        system, embed, blocks, steps = config
        results.append(result((score, score + 0.01 * seed), split=split, p_bw=p_bw, seed=seed, system=system,
                              embed=embed, blocks=blocks, steps=steps))
    return build(results)


def choices(table: pd.DataFrame, per_query: dict) -> pd.DataFrame:
    comparisons = analyse_retrieval(table, per_query).comparisons
    return comparisons.loc[comparisons.comparison.isin([BEST_EMBED, *AGAINST_BM25]), CHOSEN].reset_index(drop=True)


def test_test_data_never_reaches_a_choice():
    """Reversing every test result (its nDCG@10 and per-query values) leaves every choice as dev made it;
    changing one dev result changes them. fwfw, the best on dev, is a control and never chosen."""
    table, per_query = choice_table(test_reversed=True)
    test = table[table.split.eq("test") & table.p_bw.eq(0.5) & table.system.eq("late-interaction")]
    assert tuple(test.loc[test.ndcg_at_10.idxmax(), ["embed", "blocks", "finetune_steps"]]) == ("echo", 1, 0)
    chosen = choices(table, per_query)
    pd.testing.assert_frame_equal(chosen, choices(*choice_table(test_reversed=False)))
    best = chosen[chosen.comparison.eq(BEST_EMBED)]
    assert len(best) == 4 * 2 * 2  # system x fine-tuning x split, p_bw 0.5 against 0
    assert best[["split", "a_embed", "a_blocks", "b_embed", "b_blocks"]].drop_duplicates().to_dict("records") == [
        {"split": split, "a_embed": "fwbw", "a_blocks": 2, "b_embed": "fwbw", "b_blocks": 2} for split in ("dev", "test")]
    against = chosen[chosen.comparison.ne(BEST_EMBED)]
    assert len(against) == 2 * 3 * 2  # model x kind x split
    assert against[["comparison", "a_system", "a_embed", "a_blocks", "a_finetune_steps"]].drop_duplicates().values.tolist() == [
        ["best dense − BM25", "single-vector-mean", "fwbw", 2, 100], ["rerank-bm25 − BM25", "rerank-bm25", "fwbw", 2, 100],
        ["fusion-bm25 − BM25", "fusion-bm25", "fwbw", 2, 100]]

    bumped = choices(*choice_table(test_reversed=True, bump=(0.5, "late-interaction", "bw", 1, 0)))
    changed = bumped.compare(chosen, result_names=("bumped", "reversed"))
    moved = bumped.loc[changed.index, ["comparison", "split", "p_bw", "a_system", "a_embed", "a_blocks", "a_finetune_steps"]]
    assert moved.to_dict("records") == [
        {"comparison": c, "split": s, "p_bw": 0.5, "a_system": "late-interaction", "a_embed": "bw", "a_blocks": 1,
         "a_finetune_steps": 0} for c in (BEST_EMBED, "best dense − BM25") for s in ("dev", "test")]


# ----------------------------------------------------------------------------- against BM25 and the goal

def bm25_table() -> tuple[pd.DataFrame, dict]:
    """One model (p_bw 0.5, seeds 1, 2) on description, ict and title, dev and test: late interaction (fw, fwbw),
    single vector (fw), rerank-bm25 and fusion-bm25 (fw); BM25 0.3 on every query. On dev fwbw late interaction
    is the best dense system. On test it beats BM25 by 0.1 on description, 0 on ict, 0.2 on title."""
    gains = {"description": 0.1, "ict": 0.0, "title": 0.2}
    results = [result((0.3, 0.3), task=task, split=split) for task in gains for split in ("dev", "test")]
    for task, split, seed in itertools.product(gains, ("dev", "test"), (1, 2)):
        best = 0.3 + gains[task] if split == "test" else 0.5
        for system, embed, value in [("late-interaction", "fwbw", best), ("late-interaction", "fw", 0.4),
                                     ("single-vector-mean", "fw", 0.35), ("rerank-bm25", "fw", 0.45), ("fusion-bm25", "fw", 0.5)]:
            results.append(result((value, value), task=task, split=split, p_bw=0.5, seed=seed, system=system, embed=embed))
    return build(results)


def test_each_model_against_bm25_and_the_goal_holm_adjusted_over_its_two_tasks():
    comparisons = analyse_retrieval(*bm25_table()).comparisons
    against = comparisons[comparisons.b.eq("BM25")].set_index(["comparison", "task", "split"])
    assert len(against) == 3 * 3 * 2
    dense = against.loc[("best dense − BM25", "description", "test")]
    assert (dense.a_system, dense.a_embed, dense.b_system, dense.n_seeds, dense.seeds) == (
        "late-interaction", "fwbw", "bm25", 2, "1, 2")
    assert pd.isna(dense.b_embed) and pd.isna(dense.b_blocks)
    assert [against.loc[("best dense − BM25", task, "test")].mean_diff for task in ("description", "ict", "title")] == \
        pytest.approx([0.1, 0.0, 0.2], abs=1e-12)
    for name, gain in [("rerank-bm25 − BM25", 0.15), ("fusion-bm25 − BM25", 0.2)]:
        row = against.loc[(name, "ict", "test")]
        assert (row.a_system, row.mean_diff, row.ci_low, row.ci_high) == pytest.approx((name.split(" ")[0], gain, gain, gain))
    goal = comparisons[comparisons.goal]
    assert list(zip(goal.task, goal.split, goal.comparison)) == [("description", "test", "best dense − BM25"),
                                                                 ("ict", "test", "best dense − BM25")]
    assert goal.p_value.tolist() == [2 / (B + 1), 1.0]  # every resample +0.1; every resample 0
    assert goal.p_holm.tolist() == [4 / (B + 1), 1.0]  # Holm over 2: 2 p, then max(2 p, 1 · 1)
    assert comparisons.p_holm.notna().sum() == 2  # title (a sanity task) and dev are no goal


def test_a_model_without_dev_results_has_no_best_and_bm25_stands_for_every_seed():
    table, per_query = bm25_table()
    comparisons = analyse_retrieval(table[table.split.eq("test")], per_query).comparisons
    assert not comparisons.b.eq("BM25").any()
    one_task = table[table.task.eq("ict") & (table.run_id.isna() | table.seed.eq(2))]
    rows = analyse_retrieval(one_task, per_query).comparisons
    assert rows[rows.b.eq("BM25")].seeds.eq("2").all()


def test_a_fusion_run_on_test_alone_is_compared_at_the_embed_its_dev_rerank_chose():
    """The study runs fusion on test only (its weight is tuned on the dev rerank): its embed is the
    one the dev rerank chose, whatever the fusions score on test."""
    results = [result((0.5, 0.5)), result((0.5, 0.5), split="dev")]
    for seed in (1, 2):
        for embed, dev_rerank, test_fusion in (("fw", 0.2, 0.7), ("fwbw", 0.6, 0.55)):
            common = {"p_bw": 0.5, "seed": seed, "embed": embed}
            results += [result((dev_rerank,) * 2, split="dev", system="rerank-bm25", **common),
                        result((0.4, 0.4), split="test", system="rerank-bm25", **common),
                        result((test_fusion,) * 2, split="test", system="fusion-bm25", **common)]
    comparisons = analyse_retrieval(*build(results)).comparisons
    fusion = comparisons[comparisons.comparison.eq("fusion-bm25 − BM25") & comparisons.split.eq("test")]
    assert fusion.a_embed.tolist() == ["fwbw"]
    assert fusion.a_mean.tolist() == [pytest.approx(0.55)] and fusion.mean_diff.tolist() == [pytest.approx(0.05)]
