"""Ratio 1 at equal fw tokens, training FLOPs and wall-clock (issue 9), and the percent change of fw
loss, on hand-built runs whose curves are known: the p_bw = x run's curve is the baseline's shifted by
a known compute factor."""

import math

import numpy as np
import pytest
from test_analysis import PARAMS, A, by_epoch, one, run_rows
from test_analysis_v2 import skipped_rows, t_interval_of_logs, table

from fwbw.analysis.report import findings
from fwbw.analysis.stats import flops_per_token
from fwbw.analysis.sweep_analysis import analyse
from fwbw.model.config import ModelConfig
from fwbw.model.hlb_gpt import training_flops_per_token

BASE_STEPS = (10, 20, 40)  # tokens = 100 x step: 1000, 2000, 4000; fw loss 4.75, 4.5, 4.0 at fw = 4.0
FLOPS_A = training_flops_per_token(ModelConfig(vocab_size=10, depth=2, width=8, max_seq_len=64), 64)


def shifted(factor):
    """Steps at which a run that spends `factor` x the baseline's FLOPs per token reaches the
    baseline's FLOPs at each of its points."""
    return tuple(s / factor for s in BASE_STEPS)


def final_row(analysis, axis, averaging="ratio_then_mean"):
    return one(analysis.ratios, ratio="ratio1", phase="final", metric="loss", averaging=averaging, axis=axis)


def samples(analysis, axis):
    return analysis.ratio1_samples[analysis.ratio1_samples.axis == axis].sort_values("axis_value")


def test_flops_per_token_recovers_the_vocabulary_from_num_params():
    assert flops_per_token(2, 8, 64, PARAMS[A]) == FLOPS_A == 8736.0
    assert math.isnan(flops_per_token(2, 8, 64, PARAMS[A] + 1)) and math.isnan(flops_per_token(2, 8, 64, math.nan))


def test_training_cost_of_add_and_either():
    runs = table(run_rows("a0-s0", A, 0.0, 0, 4.0, 6.0), run_rows("a5-s0", A, 0.05, 0, 4.0, 6.0),
                 run_rows("a5e-s0", A, 0.05, 0, 4.0, 6.0, bw_mode="either"))
    last = analyse(runs).final.set_index("run_id")
    assert last.loc["a0-s0", ["fw_tokens", "flops"]].tolist() == pytest.approx([4000, 4000 * FLOPS_A])
    assert last.loc["a5-s0", ["fw_tokens", "flops"]].tolist() == pytest.approx([4000, 1.05 * 4000 * FLOPS_A])
    assert last.loc["a5e-s0", ["fw_tokens", "flops"]].tolist() == pytest.approx([0.95 * 4000, 4000 * FLOPS_A])


def test_a_curve_shifted_by_the_compute_factor_has_ratio_one_at_equal_flops():
    """The x run (add, p_bw 0.05) reaches the baseline's losses at the baseline's FLOPs: ratio 1 = 1
    at equal flops; at equal fw tokens it is behind, and its first point lies before the baseline's
    first one: dropped, never extrapolated."""
    analysis = analyse(table(run_rows("a0-s0", A, 0.0, 0, 4.0, 6.0, steps=BASE_STEPS),
                             run_rows("a5-s0", A, 0.05, 0, 4.0, 4.5, steps=shifted(1.05))))
    flops = samples(analysis, "flops")
    assert flops.axis_value.tolist() == pytest.approx([1000 * FLOPS_A, 2000 * FLOPS_A, 4000 * FLOPS_A])
    assert flops.ratio1_loss.tolist() == pytest.approx([1.0, 1.0, 1.0])
    row = final_row(analysis, "flops")
    assert (row.value, row.n, row.n_base, row.n_x) == (pytest.approx(1.0), 1, 1, 1)
    tokens = [2000 / 1.05, 4000 / 1.05]  # 1000 / 1.05 is before the baseline's first point
    base = [4.75 - 0.25 * (tokens[0] - 1000) / 1000, 4.5 - 0.5 * (tokens[1] - 2000) / 2000]
    for axis, scale in (("fw_tokens", 1.0), ("seconds", 1e-3)):  # seconds = step / 10 = tokens / 1000
        assert samples(analysis, axis).axis_value.tolist() == pytest.approx([t * scale for t in tokens])
        assert samples(analysis, axis).ratio1_loss.tolist() == pytest.approx([base[0] / 4.5, base[1] / 4.0])
        assert final_row(analysis, axis).value == pytest.approx(base[1] / 4.0)  # where the x run ended
    assert final_row(analysis, "epoch").value == pytest.approx(1.0)
    assert len(by_epoch(analysis.ratios).query("phase == 'final' and ratio == 'ratio1'")) == 2 * 2


def test_a_longer_run_is_compared_where_the_shorter_one_ended():
    """Equal token budgets: the x run (add, p_bw 0.05) spent 1.05 x the baseline's FLOPs, so its last
    point is past the baseline's curve (dropped from the samples) and the final comparison is at the
    baseline's end, the x run interpolated between its points."""
    analysis = analyse(table(run_rows("a0-s0", A, 0.0, 0, 4.0, 6.0), run_rows("a5-s0", A, 0.05, 0, 4.0, 4.5)))
    flops = samples(analysis, "flops")
    assert flops.ratio1_loss.tolist() == pytest.approx([(4.75 - 0.25 * 0.05) / 4.75, (4.5 - 0.5 * 0.05) / 4.5])
    x_at_end = 4.5 - 0.5 * (4000 - 2100) / (4200 - 2100)
    row = final_row(analysis, "flops")
    assert (row.value, row.n) == (pytest.approx(4.0 / x_at_end), 1)
    paired = analysis.paired.iloc[0]
    assert paired.flops_pct_change == pytest.approx(100 * (x_at_end / 4.0 - 1))
    assert paired["pct_change"] == pytest.approx(0.0) and math.isnan(paired.pct_ci_low)


def test_runs_whose_ranges_do_not_overlap_are_not_compared():
    base = run_rows("a0-s0", A, 0.0, 0, 4.0, 6.0, steps=(100, 200, 400))  # 10 x the x run's tokens
    analysis = analyse(table(base, run_rows("a5-s0", A, 0.05, 0, 4.0, 4.5)))
    for axis in ("fw_tokens", "flops"):
        row = final_row(analysis, axis)
        assert math.isnan(row.value) and (row.n, row.n_base, row.n_x) == (0, 1, 1)
        assert samples(analysis, axis).empty
    assert one(skipped_rows(analysis), part="equal compute").reason == "no seed pair whose training FLOPs overlap"
    assert not [s for s in findings(analysis) if s.startswith("At equal training FLOPs")]


def test_intervals_and_percent_change_over_seed_pairs():
    """Seed 0's x run matches its baseline at equal FLOPs, seed 1's is 5% worse (fw 4.2 against 4.0)."""
    runs = [run_rows(f"a0-s{s}", A, 0.0, s, 4.0, 6.0, steps=BASE_STEPS) for s in (0, 1)]
    runs += [run_rows(f"a5-s{s}", A, 0.05, s, fw, 4.5, steps=shifted(1.05)) for s, fw in ((0, 4.0), (1, 4.2))]
    analysis = analyse(table(*runs))
    ratios = np.array([1.0, 4.0 / 4.2])
    geometric = math.sqrt(ratios.prod())  # ratio_then_mean: the centre of its log interval
    row = final_row(analysis, "flops")
    assert (row.value, row.n) == (pytest.approx(geometric), 2)
    assert (row.ci_low, row.ci_high) == pytest.approx(t_interval_of_logs(ratios))
    assert final_row(analysis, "flops", "mean_then_ratio").value == pytest.approx(8.0 / 8.2)
    low, high = t_interval_of_logs(1 / ratios)
    paired = analysis.paired.iloc[0]
    expected = (100 * (math.sqrt(1.05) - 1), 100 * (low - 1), 100 * (high - 1))
    assert (paired.flops_pct_change, paired.flops_pct_ci_low, paired.flops_pct_ci_high) == pytest.approx(expected)
    assert (paired["pct_change"], paired.pct_ci_low, paired.pct_ci_high) == pytest.approx(expected)
    statements = findings(analysis)
    assert (f"At equal training FLOPs, depth 2 / width 8, p_bw = 0.05 (each seed pair where the run with less "
            f"compute ended): ratio 1 of fw loss {geometric:.3f} (n = 2 seed pairs, 95% CI "
            f"{row.ci_low:.3f} … {row.ci_high:.3f}); fw loss changed by {expected[0]:+.2f}% (95% CI "
            f"{expected[1]:+.2f}% … {expected[2]:+.2f}%).") in statements
    assert any(s.startswith("At depth 2 / width 8, p_bw = 0.05 changed final fw loss by +0.100") and
               s.endswith(f"; as a percent change of fw loss: {expected[0]:+.2f}% (95% CI {expected[1]:+.2f}% … "
                          f"{expected[2]:+.2f}%).") for s in statements)


def test_window_rows_on_every_axis():
    analysis = analyse(table(run_rows("a0-s0", A, 0.0, 0, 4.0, 6.0, steps=BASE_STEPS),
                             run_rows("a5-s0", A, 0.05, 0, 4.0, 4.5, steps=shifted(1.05))), windows=[(0.0, "end")])
    windows = analysis.ratios.query("phase == 'window' and metric == 'loss'").set_index("axis")
    assert sorted(windows.index) == ["epoch", "flops", "fw_tokens", "seconds"]
    assert windows.loc["flops", ["value", "n"]].tolist() == pytest.approx([1.0, 1])
    base = [4.75 - 0.25 * (2000 / 1.05 - 1000) / 1000, 4.5 - 0.5 * (4000 / 1.05 - 2000) / 2000]
    assert windows.loc["fw_tokens", "value"] == pytest.approx((base[0] / 4.5 + base[1] / 4.0) / 2)
