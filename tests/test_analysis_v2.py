"""Issue 9's defects of fwbw.analysis, each on a hand-built results table whose answer is known:
seeds missing from an arm, budgets and seq_lens that differ, overshooting eval epochs, diverged runs,
and the report sentences that must agree with the tables."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_analysis import OFFSETS, A, B, by_epoch, mean, one, run_rows

from fwbw.analysis.figures import _seed_band
from fwbw.analysis.report import findings
from fwbw.analysis.sections.inputs import Inputs
from fwbw.analysis.sections.skipped import skipped_table
from fwbw.analysis.sweep_analysis import analyse
from fwbw.study.results import build_results, recipe_id
from fwbw.study.sweep import SweepSpec, write_sweep_file
from fwbw.training.config import RecipeConfig, TrainConfig


def table(*runs):
    return pd.DataFrame([row for rows in runs for row in rows])


def final_ratio1(analysis, averaging="ratio_then_mean", **where):
    return one(by_epoch(analysis.ratios), ratio="ratio1", phase="final", metric="loss", averaging=averaging, **where)


def t_interval_of_logs(ratios):
    logs = np.log(ratios)
    half = stats.t.ppf(0.975, len(logs) - 1) * np.std(logs, ddof=1) / math.sqrt(len(logs))
    return math.exp(logs.mean() - half), math.exp(logs.mean() + half)


def test_results_carry_budget_eval_grid_and_recipe(tmp_path):
    base = TrainConfig(train_tokens=5000, eval_every_epochs=0.5, epochs=3.0)
    spec = SweepSpec(depths=(2,), widths=(16,), p_bws=(0.0,), seeds=1, base=base)
    write_sweep_file(tmp_path, spec, spec.configs())
    row = build_results(tmp_path).iloc[0]
    assert (row["epochs"], row["train_tokens"], row["eval_every_epochs"]) == (3.0, 5000, 0.5)
    assert row["recipe_id"] == recipe_id(spec.configs()[0].to_dict()["recipe"])
    assert len(row["recipe_id"]) == 8 and recipe_id({"lr": 1.0}) != recipe_id({"lr": 2.0})
    assert recipe_id(TrainConfig().to_dict()["recipe"]) == recipe_id(TrainConfig(recipe=RecipeConfig()).to_dict()["recipe"])


# defect 1 ---------------------------------------------------------------------------------------

def test_mean_then_ratio_pairs_the_seeds_of_both_arms():
    """Baseline seeds 0, 1, 2 (fw 4.0, 4.2, 4.4), p_bw = 0.05 seed 0 only (fw 4.1): 4.0 / 4.1, not
    the mean of all three baselines (4.2) / 4.1."""
    rows = [run_rows(f"a0-s{s}", A, 0.0, s, fw, 6.0) for s, fw in ((0, 4.0), (1, 4.2), (2, 4.4))]
    analysis = analyse(table(*rows, run_rows("a5-s0", A, 0.05, 0, 4.1, 4.5)))
    for averaging in ("mean_then_ratio", "ratio_then_mean"):
        row = final_ratio1(analysis, averaging)
        assert row.value == pytest.approx(4.0 / 4.1)
        assert (row.n, row.n_base, row.n_x) == (1, 3, 1)


# defect 2 ---------------------------------------------------------------------------------------

def test_points_farther_than_half_an_eval_interval_are_not_paired():
    """The baseline skipped its epoch-1 evaluation: the x run's epoch-1 point has no partner."""
    base = run_rows("a0-s0", A, 0.0, 0, 4.0, 6.0, epochs=(0.5, 2.0), steps=(10, 40))
    x = run_rows("a5-s0", A, 0.05, 0, 4.1, 4.5)
    samples = by_epoch(analyse(table(base, x)).ratio1_samples)
    assert list(samples.nominal_epoch) == [0.5, 2.0]
    assert list(samples.ratio1_loss) == pytest.approx([(4.0 + 0.75) / (4.1 + 0.75), (4.0 + 0.5) / 4.1])


def skipped_rows(analysis):
    """The report's skipped table (part, setting, reason) of the analysis."""
    return skipped_table(Inputs(analysis, pd.DataFrame(), {}, []))


def test_finals_of_different_budgets_are_not_paired():
    base = run_rows("a0-s0", A, 0.0, 0, 4.0, 6.0, epochs=(0.5, 1.0), steps=(10, 20), budget=1.0)
    x = run_rows("a5-s0", A, 0.05, 0, 4.1, 4.5)  # trained for 2 epochs
    analysis = analyse(table(base, x))
    assert analysis.ratio1_samples.empty and analysis.final_pairs.empty
    row = final_ratio1(analysis)
    assert math.isnan(row.value) and (row.n, row.n_base, row.n_x) == (0, 0, 1)
    assert one(analysis.skipped, p_bw=0.05).reason == (
        "the p_bw = 0 runs of this size differ in epochs 2 here, 1 at p_bw = 0: not compared")
    assert one(skipped_rows(analysis), part="equal data").reason == (
        "the p_bw = 0 runs of this size differ in epochs 2 here, 1 at p_bw = 0: not compared")
    assert not [s for s in findings(analysis) if s.startswith(("Not compared", "Ratio 1 of final fw loss"))]


# defect 3 ---------------------------------------------------------------------------------------

def test_a_run_differing_in_seq_len_or_recipe_is_its_own_setting():
    rows = [run_rows("a0-s0", A, 0.0, 0, 4.0, 6.0), run_rows("a5-s0", A, 0.05, 0, 4.1, 4.5),
            run_rows("a5-long-s0", A, 0.05, 0, 3.0, 3.5, seq_len=128),
            run_rows("a5-lr-s0", A, 0.05, 0, 3.5, 3.6, recipe_id="r1")]
    analysis = analyse(table(*rows))
    losses = analysis.final_losses[analysis.final_losses.p_bw > 0]
    assert sorted(zip(losses.seq_len, losses.recipe_id, losses.n_seeds, losses.fw_loss_mean)) == [
        (64, "r0", 1, 4.1), (64, "r1", 1, 3.5), (128, "r0", 1, 3.0)]
    assert final_ratio1(analysis, seq_len=64, recipe_id="r0").value == pytest.approx(4.0 / 4.1)
    assert sorted(analysis.skipped.reason) == [
        "the p_bw = 0 runs of this size differ in recipe_id r1 here, r0 at p_bw = 0: not compared",
        "the p_bw = 0 runs of this size differ in seq_len 128 here, 64 at p_bw = 0: not compared",
    ]


# defect 4 ---------------------------------------------------------------------------------------

def test_sentences_agree_with_the_tables_when_seeds_do_not_overlap():
    analysis = analyse(table(run_rows("a0-s0", A, 0.0, 0, 4.0, 6.0), run_rows("a5-s1", A, 0.05, 1, 4.1, 4.5)),
                       windows=[(0.0, 1.0)])
    for averaging in ("mean_then_ratio", "ratio_then_mean"):
        row = final_ratio1(analysis, averaging)
        assert math.isnan(row.value) and (row.n, row.n_base, row.n_x) == (0, 1, 1)
    assert not [s for s in findings(analysis) if s.startswith(("Ratio 1", "At depth"))]  # no value: skipped, not said
    skipped = skipped_rows(analysis)
    assert one(skipped, part="equal data").reason == "no seed has both a p_bw = 0 and a p_bw = x run"
    assert one(skipped, part="equal data, epochs [0, 1]").reason == (
        "none of the 2 validation points has a p_bw = 0 point of the same seed within half an eval interval")


# defect 5 ---------------------------------------------------------------------------------------

def test_windows_average_each_run_first_and_speak_per_size():
    """Size A: seeds 0, 1; size B: seed 0, its ratio far below 1. Window [0, 1]: each seed's two points
    averaged, then the seeds; one statement per size."""
    rows = [run_rows(f"a0-s{s}", A, 0.0, s, fw, 6.0) for s, fw in ((0, 4.0), (1, 4.3))]
    rows += [run_rows(f"a5-s{s}", A, 0.05, s, 4.1, 4.5) for s in (0, 1)]
    rows += [run_rows("b0-s0", B, 0.0, 0, 2.0, 3.0), run_rows("b5-s0", B, 0.05, 0, 3.0, 3.5)]
    analysis = analyse(table(*rows), windows=[(0.0, 1.0)])
    per_seed = np.array([mean([(fw + OFFSETS[i]) / (4.1 + OFFSETS[i]) for i in (0, 1)]) for fw in (4.0, 4.3)])
    row = one(by_epoch(analysis.ratios), phase="window", metric="loss", depth=2)
    geometric = math.exp(np.log(per_seed).mean())  # ratio_then_mean: the centre of the log interval
    assert row.value == pytest.approx(geometric) and (row.n, row.n_base, row.n_x) == (2, 2, 2)
    low, high = t_interval_of_logs(per_seed)
    assert (row.ci_low, row.ci_high) == pytest.approx((low, high))
    statements = findings(analysis)
    assert (f"Ratio 1 (fw loss) in epochs [0, 1], depth 2 / width 8, p_bw = 0.05, add, causal mask: geometric mean "
            f"{geometric:.3f} over n = 2 seeds, each averaged over its points first, 95% CI {low:.3f} … "
            f"{high:.3f}; 1 of 2 seeds above 1.") in statements
    b_seed = mean([(2.0 + OFFSETS[i]) / (3.0 + OFFSETS[i]) for i in (0, 1)])
    assert (f"Ratio 1 (fw loss) in epochs [0, 1], depth 4 / width 16, p_bw = 0.05, add, causal mask: geometric mean "
            f"{b_seed:.3f} over n = 1 seeds, each averaged over its points first; 0 of 1 seeds above 1.") in statements
    assert sum(s.startswith("Ratio 1 (fw loss) in epochs") for s in statements) == 2


def test_a_window_weighs_seeds_not_points():
    """Seed 1's p_bw = 0.05 run skipped its epoch-1 eval: in [0, 1] it has one point, seed 0 two; each
    seed counts once."""
    rows = [run_rows(f"a0-s{s}", A, 0.0, s, 4.0, 6.0) for s in (0, 1)]
    rows += [run_rows("a5-s0", A, 0.05, 0, 4.1, 4.5), run_rows("a5-s1", A, 0.05, 1, 3.9, 4.5, epochs=(0.5, 2.0),
                                                              steps=(10, 40))]
    seed0 = mean([(4.0 + o) / (4.1 + o) for o in OFFSETS[:2]])
    seed1 = (4.0 + OFFSETS[0]) / (3.9 + OFFSETS[0])
    row = one(by_epoch(analyse(table(*rows), windows=[(0.0, 1.0)]).ratios), phase="window", metric="loss")
    assert row.value == pytest.approx(math.sqrt(seed0 * seed1)) and row.n == 2


# defect 6 ---------------------------------------------------------------------------------------

OVERSHOT = dict(epochs=(0.5119, 1.0119, 1.5119), budget=1.5)


def test_an_overshooting_eval_counts_at_its_nominal_epoch():
    base = run_rows("a0-s0", A, 0.0, 0, 4.0, 6.0, epochs=(0.5, 1.0, 1.5), budget=1.5)
    x = run_rows("a5-s0", A, 0.05, 0, 4.1, 4.5, **OVERSHOT)
    analysis = analyse(table(base, x), windows=[(0.0, 1.0), (0.0, "end")])
    assert list(analysis.points.nominal_epoch[analysis.points.run_id == "a5-s0"]) == [0.5, 1.0, 1.5]
    first = one(by_epoch(analysis.ratios), phase="window", metric="loss", epoch_stop=1.0)
    assert first.value == pytest.approx(mean([(4.0 + o) / (4.1 + o) for o in OFFSETS[:2]])) and first.n == 1
    assert one(by_epoch(analysis.ratios), phase="window", metric="loss", epoch_stop=1.5).n == 1


# defect 7 ---------------------------------------------------------------------------------------

def test_a_diverged_run_is_counted_not_hidden():
    rows = [run_rows(f"a0-s{s}", A, 0.0, s, fw, 6.0) for s, fw in ((0, 4.0), (1, 4.2))]
    rows += [run_rows("a5-s0", A, 0.05, 0, 4.1, 4.5), run_rows("a5-s1", A, 0.05, 1, math.nan, math.nan)]
    analysis = analyse(table(*rows))
    losses = one(analysis.final_losses, p_bw=0.05)
    assert (losses.n_seeds, losses.n_diverged, losses.fw_loss_mean) == (1, 1, 4.1)
    assert (one(analysis.final_losses, p_bw=0.0).n_diverged, one(analysis.paired, p_bw=0.05).n) == (0, 1)
    row = final_ratio1(analysis, "mean_then_ratio")
    assert row.value == pytest.approx(4.0 / 4.1) and (row.n, row.n_base, row.n_x) == (1, 2, 1)
    assert ("1 run(s) diverged (non-finite loss in training or validation) at depth 2 / width 8, p_bw = 0.05, add, causal mask: "
            "a5-s1; left out of every statistic and counted in final_losses.n_diverged.") in findings(analysis)


# defect 8 ---------------------------------------------------------------------------------------

def test_a_flagged_mask_is_never_called_leak_free():
    rows = [run_rows("a0-s0", A, 0.0, 0, 4.0, 6.0), run_rows("a5f-s0", A, 0.05, 0, 4.0, 4.4, bw_mask="legacy-flip")]
    assert ("bw/fw final loss ratio 1.10 for legacy-flip runs (n = 1, p_bw > 0): bw about as hard as fw or harder, "
            "although the config flags this mask as leaking labels: the losses do not show the leak."
            ) in findings(analyse(table(*rows)))


def test_loss_curves_keep_every_point_at_its_nominal_epoch():
    base = run_rows("a0-s0", A, 0.0, 0, 4.0, 6.0, epochs=(0.5, 1.0, 1.5), budget=1.5)
    x = run_rows("a0-s1", A, 0.0, 1, 4.2, 6.0, **OVERSHOT)
    band = _seed_band(analyse(table(base, x)).points, "loss_fw")
    assert list(band.index) == [0.5, 1.0, 1.5]
    assert list(band["mean"]) == pytest.approx([4.1 + o for o in OFFSETS])


def test_the_size_count_counts_sizes_with_a_value():
    rows = [run_rows("a0-s0", A, 0.0, 0, 4.0, 6.0), run_rows("a5-s0", A, 0.05, 0, 4.1, 4.5),
            run_rows("b5-s0", B, 0.05, 0, 3.0, 3.5)]
    analysis = analyse(table(*rows))
    statement = next(s for s in findings(analysis) if s.startswith("Ratio 1 of final fw loss"))
    assert statement == (
        f"Ratio 1 of final fw loss, p_bw = 0.05, add, causal mask, over 1 model size(s) with a value: ratio_then_mean "
        f"{4.0 / 4.1:.3f} (n = 1 seed pairs); mean_then_ratio {4.0 / 4.1:.3f} (n = 1 seed pairs). Above 1 means the "
        "bw task helped the fw task.")
    assert one(skipped_rows(analysis), part="equal data", depth=4).reason == (
        "no p_bw = 0 run of this size, task tokens and heads")
