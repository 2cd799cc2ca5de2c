"""fwbw.analysis.effects on hand-built `final` tables (one row per run's last validation point),
each answer computed by hand."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import integrate, stats

from fwbw.analysis.effects import (
    ARROW_COLUMNS,
    POWER_COLUMNS,
    SIZE_TEST_COLUMNS,
    TREND_COLUMNS,
    arrow_of_time,
    detectable_noncentrality,
    holm,
    power_table,
    scaling_trend,
    size_tests,
)
from fwbw.analysis.stats import SETTING, arms, pairs_table
from fwbw.training.config import LATER_FIELDS

SMALL, MID, LARGE = (2, 8), (4, 16), (8, 32)
PARAMS = {SMALL: 1000, MID: 8000, LARGE: 64000}  # each size 8 times the last: ln num_params = ln 1000 + u ln 8
DEFAULTS = dict(data="wiki", tokenizer="gpt2", seq_len=64, epochs=1.0, train_tokens=None, eval_tokens=4096, dtype="auto", recipe_id="r0",
                model_scale=math.nan, bw_mode="add", bw_mask="causal", task_tokens=False, num_heads=1,
                adaptive_p_bw=False, **LATER_FIELDS)
BASE_FW = 4.0  # every baseline's final fw loss unless given


def run(size, p_bw, seed, fw, bw=5.0, **changes):
    depth, width = size
    values = {**DEFAULTS, **changes}
    return dict(values, run_id=f"{depth}x{width}-p{p_bw}-{values['bw_mode']}-L{values['seq_len']}-s{seed}",
                depth=depth, width=width, p_bw=p_bw, seed=seed, num_params=PARAMS[size], blocks_remaining=depth,
                loss_fw=fw, loss_bw=bw, ppl_fw=math.exp(fw), ppl_bw=math.exp(bw))


def paired_runs(size, p_bw, x_fw, base_fw=None, **changes):
    """A p_bw = x run and a p_bw = 0 run per seed 0, 1, ...: fw losses x_fw and base_fw (BASE_FW)."""
    base_fw = base_fw or [BASE_FW] * len(x_fw)
    return [r for seed, (x, b) in enumerate(zip(x_fw, base_fw))
            for r in (run(size, p_bw, seed, x, **changes), run(size, 0.0, seed, b, **changes))]


def table(*runs):
    return pd.DataFrame([r for group in runs for r in group])


def with_arms(final):
    """`final`, its arms and its seed pairs, as sweep_analysis.analyse passes them."""
    arm_list = arms(final)
    return final, arm_list, pairs_table(final, arm_list)


def with_log_ratios(size, ratios, **changes):
    """Runs whose ln ratio 1 = ln(loss_fw(0) / loss_fw(x)) is `ratios`, seed by seed."""
    return paired_runs(size, 0.05, [BASE_FW / math.exp(y) for y in ratios], **changes)


# ----------------------------------------------------------------------------- Holm

def test_holm_steps_down_by_hand():
    # sorted: 0.005 (x4), 0.01 (x3), 0.03 (x2), 0.04 (x1) -> 0.02, 0.03, 0.06, 0.04 -> running max
    assert holm([0.01, 0.04, 0.03, math.nan, 0.005]) == pytest.approx([0.03, 0.06, 0.06, math.nan, 0.02], nan_ok=True)
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # 2 x 0.6 capped at 1, and monotone
    assert holm([0.2]) == pytest.approx([0.2])
    assert len(holm([])) == 0


# ----------------------------------------------------------------------------- scaling trend

def test_scaling_trend_pools_seed_pairs_over_sizes():
    final = table(
        with_log_ratios(SMALL, [0.01, 0.03]), with_log_ratios(MID, [0.02, 0.04]), with_log_ratios(LARGE, [0.05, 0.03]),
        [run(MID, 0.05, 7, 3.0)],  # no baseline of seed 7: not a pair
        with_log_ratios(SMALL, [0.01], seq_len=128), with_log_ratios(MID, [0.04], seq_len=128),
        with_log_ratios(SMALL, [0.01, 0.02], seq_len=256),
    )
    trend = scaling_trend(final, pairs_table(final, arms(final)))
    assert list(trend.columns) == TREND_COLUMNS
    assert trend.seq_len.tolist() == [64, 128, 256]
    main, two, one_size = (trend.iloc[i] for i in range(3))
    # in u = (ln num_params - ln 1000) / ln 8 in {0, 1, 2}: mean u 1, mean y 0.03, Sxx 4, Sxy 0.04,
    # slope 0.01, fitted 0.02 + 0.01 u, residuals +-0.01: SSR 6e-4, s^2 = 6e-4 / 4, se = sqrt(s^2 / Sxx)
    ln8, se_u = math.log(8), math.sqrt(6e-4 / 4 / 4)
    half = stats.t.ppf(0.975, 4) * se_u / ln8
    assert (main.n_pairs, main.n_sizes, main.reason) == (6, 3, "")
    assert main.slope == pytest.approx(0.01 / ln8)
    assert main.slope_se == pytest.approx(se_u / ln8)
    assert (main.slope_ci_low, main.slope_ci_high) == pytest.approx((0.01 / ln8 - half, 0.01 / ln8 + half))
    assert main.intercept == pytest.approx(0.02 - 0.01 * math.log(1000) / ln8)
    assert main.p_value == pytest.approx(2 * stats.t.sf(0.01 / se_u, 4))
    # two pairs: the line through them, no interval
    assert (two.n_pairs, two.n_sizes, two.reason) == (2, 2, "2 seed pairs: no interval")
    assert two.slope == pytest.approx(0.03 / ln8)
    assert math.isnan(two.slope_se) and math.isnan(two.slope_ci_low) and math.isnan(two.p_value)
    assert (one_size.n_pairs, one_size.n_sizes) == (2, 1)
    assert one_size.reason == "seed pairs at fewer than 2 sizes: no trend"
    assert math.isnan(one_size.slope)


def test_size_tests_holm_adjust_over_the_sizes_of_a_trend():
    final = table(
        paired_runs(SMALL, 0.05, [BASE_FW + d for d in (-0.1, -0.2, -0.3)]),  # mean -0.2, sd 0.1: t = -2 sqrt 3
        paired_runs(MID, 0.05, [BASE_FW + d for d in (-0.1, 0.0, -0.2)]),  # mean -0.1, sd 0.1: t = -sqrt 3
        paired_runs(LARGE, 0.05, [BASE_FW + d for d in (0.1, 0.2, 0.0)]),  # mean 0.1, sd 0.1: t = sqrt 3
        [run(SMALL, 0.5, 0, BASE_FW + 0.1)],  # one pair (seed 0), its own trend: no test
    )
    tests = size_tests(*with_arms(final))
    assert list(tests.columns) == SIZE_TEST_COLUMNS
    # with 2 degrees of freedom the t test's two-sided p is 1 - |t| / sqrt(2 + t^2)
    p_small, p_mid = 1 - math.sqrt(12 / 14), 1 - math.sqrt(3 / 5)
    arms = tests.set_index(["depth", "p_bw"])
    assert arms.n.tolist() == [3, 1, 3, 3]
    assert arms.loc[(2, 0.05), ["mean_diff", "t", "p_value"]].tolist() == pytest.approx([-0.2, -2 * math.sqrt(3), p_small])
    assert arms.loc[(4, 0.05), ["t", "p_value"]].tolist() == pytest.approx([-math.sqrt(3), p_mid])
    assert arms.loc[(8, 0.05), ["t", "p_value"]].tolist() == pytest.approx([math.sqrt(3), p_mid])
    # Holm over 3 sizes: 3 p_small; then 2 p_mid; then max(2 p_mid, 1 p_mid)
    assert arms.loc[[(2, 0.05), (4, 0.05), (8, 0.05)], "p_holm"].tolist() == pytest.approx(
        [3 * p_small, 2 * p_mid, 2 * p_mid])
    assert arms.loc[(2, 0.5), ["t", "p_value", "p_holm"]].isna().all()


# ----------------------------------------------------------------------------- power

def power_by_integration(noncentrality, df, alpha=0.05):
    """P(|Z + λ| / sqrt(V / df) > c), V ~ chi^2_df, by integrating over V: independent of scipy's nct."""
    c = stats.t.ppf(1 - alpha / 2, df)

    def rejecting(v):
        scale = c * math.sqrt(v / df)
        return (stats.norm.sf(scale - noncentrality) + stats.norm.cdf(-scale - noncentrality)) * stats.chi2.pdf(v, df)

    return integrate.quad(rejecting, 0, np.inf, epsabs=1e-12, epsrel=1e-10)[0]


@pytest.mark.parametrize("df", [1, 3, 9])
def test_the_detectable_noncentrality_has_power_0_8(df):
    assert power_by_integration(detectable_noncentrality(df), df) == pytest.approx(0.8, abs=1e-8)


def test_many_seeds_approach_the_normal_formula():
    assert detectable_noncentrality(100_000) == pytest.approx(stats.norm.ppf(0.975) + stats.norm.ppf(0.8), rel=1e-4)


def test_power_table_reads_the_smallest_detectable_effect_from_the_paired_sd():
    base = [4.0, 4.2, 4.4, 4.6]
    final = table(
        paired_runs(SMALL, 0.05, [4.1, 4.5, 4.6, 5.0], base),  # differences 0.1, 0.3, 0.2, 0.4
        paired_runs(MID, 0.05, [3.9, 4.3], [4.0, 4.2]),  # two pairs: differences -0.1, 0.1
        paired_runs(LARGE, 0.05, [3.9]),  # one pair
        [run(SMALL, 0.5, 0, 3.9)],  # pairs with the p_bw = 0 run of seed 0 only
        [run(LARGE, 0.05, 3, 3.9, seq_len=128)],  # no p_bw = 0 run of seq_len 128
    )
    power = power_table(*with_arms(final))
    assert list(power.columns) == POWER_COLUMNS
    power = power.set_index(["depth", "p_bw", "seq_len"])
    small = power.loc[(2, 0.05, 64)]
    sd = math.sqrt(0.05 / 3)  # deviations from the mean 0.25: -0.15, 0.05, -0.05, 0.15
    mde = detectable_noncentrality(3) * sd / 2
    assert (small.n, small.reason) == (4, "")
    assert [small.sd_diff, small.mde_loss, small.mde_percent] == pytest.approx([sd, mde, 100 * mde / 4.3])
    assert small.correlation == pytest.approx(0.28 / math.sqrt(0.2 * 0.41))  # Sxy / sqrt(Sxx Syy)
    mid = power.loc[(4, 0.05, 64)]
    assert (mid.n, mid.reason) == (2, "2 seed pairs: no correlation")
    assert mid.mde_loss == pytest.approx(detectable_noncentrality(1) * math.sqrt(0.02) / math.sqrt(2))
    assert math.isnan(mid.correlation)
    assert power.loc[(2, 0.5, 64), "reason"] == "1 seed pair: no paired SD"
    assert power.loc[(8, 0.05, 128), "reason"] == "0 seed pairs: no paired SD"
    assert power.loc[[(8, 0.05, 64), (8, 0.05, 128)], ["sd_diff", "mde_loss", "correlation"]].isna().all().all()


# ----------------------------------------------------------------------------- arrow of time

def test_arrow_of_time_only_where_both_tasks_are_trained_equally():
    final = table(
        [run(SMALL, 1.0, s, 4.0, 4.0 - gap) for s, gap in enumerate((-0.1, -0.2, -0.3))],  # add, p_bw 1
        [run(SMALL, 0.5, 0, 4.0, 4.25, bw_mode="either")],
        [run(SMALL, 0.5, 0, 4.0, 9.0), run(SMALL, 1.0, 0, 4.0, 9.0, bw_mode="either"), run(SMALL, 0.0, 0, 4.0, 9.0)],
        [run(MID, 1.0, 0, 4.0, 9.0, adaptive_p_bw=True)],
    )
    arrow = arrow_of_time(final)
    assert list(arrow.columns) == ARROW_COLUMNS
    assert arrow[["bw_mode", "p_bw", "n"]].values.tolist() == [["either", 0.5, 1], ["add", 1.0, 3]]  # SETTING order
    either, add = arrow.iloc[0], arrow.iloc[1]
    # t_{0.975, 2} = 0.95 sqrt(2 / (1 - 0.95^2)) (the t CDF with 2 df inverted); sd 0.1
    half = 0.95 * math.sqrt(2 / (1 - 0.95**2)) * 0.1 / math.sqrt(3)
    assert [add.gap_mean, add.gap_ci_low, add.gap_ci_high] == pytest.approx([-0.2, -0.2 - half, -0.2 + half])
    assert either.gap_mean == pytest.approx(-0.25)
    assert math.isnan(either.gap_ci_low) and math.isnan(either.gap_ci_high)


def test_an_empty_table_gives_each_declared_column():
    empty = pd.DataFrame(columns=[*SETTING, "run_id", "seed", "num_params", "blocks_remaining",
                                  "loss_fw", "loss_bw", "ppl_fw", "ppl_bw"])
    final, arm_list, pairs = with_arms(empty)
    for result, columns in ((scaling_trend(final, pairs), TREND_COLUMNS),
                            (size_tests(final, arm_list, pairs), SIZE_TEST_COLUMNS),
                            (power_table(final, arm_list, pairs), POWER_COLUMNS),
                            (arrow_of_time(final), ARROW_COLUMNS)):
        assert result.empty and list(result.columns) == columns
