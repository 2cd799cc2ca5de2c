"""Effects across settings, over `final` (each done, non-diverged run's last validation point), its
arms (stats.arms) and its seed `pairs` (stats.pairs_table(final, arms): a p_bw = x run and the
p_bw = 0 run of the same seed and setting, docs/method.md#the-research-question), as
`sweep_analysis.analyse` builds them: how ratio 1 scales with model size, the smallest effect the
seeds at hand can detect, and the arrow of time.

Scaling trend. Per seed pair, y = ln ratio 1 = ln(loss_fw(p_bw = 0) / loss_fw(p_bw = x)); over
the pairs of every size of one setting but its size (TREND_GROUP), the least-squares line
y = intercept + slope · ln(num_params), the seed pair being the unit. slope_se is the usual OLS
standard error sqrt(Σ r_i² / (n − 2) / Σ (x_i − x̄)²) and the interval slope ± t_{0.975, n−2} ·
slope_se (e.g. Wasserman, All of Statistics, 2004, §13.1-13.2). Each size's own paired t test of
loss_fw(x) − loss_fw(0) gets a Holm-adjusted p-value over the sizes of the same trend (Holm,
"A simple sequentially rejective multiple test procedure", Scand. J. Statist. 6, 1979): with the
m p-values sorted, p_(1) <= ... <= p_(m), adjusted p_(i) = max_{j <= i} min(1, (m − j + 1) p_(j)).

Power. The smallest mean difference δ of the fw loss that a two-sided paired t test at level
ALPHA detects with probability POWER from n seed pairs whose differences have SD s (taken as the
true SD): with df = n − 1 and c = t_{1 − α/2, df}, the exact power at noncentrality λ = δ √n / s is
1 − F(c; df, λ) + F(−c; df, λ), F the noncentral t CDF (scipy.stats.nct); λ is solved for power
POWER and δ = λ s / √n (Cohen, Statistical Power Analysis for the Behavioral Sciences, 2nd ed.,
1988, ch. 2; R's power.t.test(type = "paired", strict = TRUE) computes the same). The correlation
of the two arms' fw losses over the same seeds shows what pairing gains: the variance of a
difference is s_x² + s_0² − 2 ρ s_x s_0.

Arrow of time. Where a run trains both tasks equally (EQUAL_TASKS: bw_mode "add" with p_bw = 1,
"either" with p_bw = 0.5; not adaptive_p_bw, whose p_bw moves), the per-seed fw − bw final loss
gap, its mean and 95% t interval (stats.mean_ci); below 0: fw is the easier direction.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
from scipy import optimize
from scipy import stats as sps

from fwbw.analysis.stats import (
    CONFIDENCE,
    SETTING,
    SIZE,
    Arm,
    mean_ci,
    select,
)
from fwbw.model.masks import leaks_labels
from fwbw.study.estimate import plural

ALPHA = 0.05  # the paired t test's two-sided level
POWER = 0.8  # the power at which the smallest detectable effect is read
EQUAL_TASKS = {"add": 1.0, "either": 0.5}  # bw_mode -> the p_bw at which fw and bw are trained equally
TREND_GROUP = [c for c in SETTING if c not in SIZE]  # a scaling trend runs over the sizes of one such group

TREND_COLUMNS = [*TREND_GROUP, "n_pairs", "n_sizes", "slope", "slope_se", "slope_ci_low", "slope_ci_high",
                 "intercept", "p_value", "reason"]
SIZE_TEST_COLUMNS = [*SETTING, "num_params", "n", "mean_diff", "t", "p_value", "p_holm"]
POWER_COLUMNS = [*SETTING, "num_params", "n", "sd_diff", "mde_loss", "mde_percent", "correlation", "reason"]
ARROW_COLUMNS = [*SETTING, "leaks_labels", "num_params", "n", "gap_mean", "gap_ci_low", "gap_ci_high"]


def _arm_pairs(final: pd.DataFrame, arm_list: list[Arm], pairs: pd.DataFrame) -> Iterator[tuple[dict, pd.DataFrame]]:
    """Each p_bw > 0 setting (with its num_params) and its seed pairs: loss_fw of the p_bw = x run,
    loss_fw_base of the same seed's p_bw = 0 run, ratio1_loss = loss_fw_base / loss_fw."""
    for arm in arm_list:
        num_params = final.loc[final.run_id.isin(arm.runs), "num_params"].iloc[0]
        yield {**arm.setting, "num_params": num_params}, select(pairs, arm.setting)


# ----------------------------------------------------------------------------- scaling trend

def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the input's order; NaNs stay NaN and do not count in m."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(len(p), math.nan)
    defined = np.flatnonzero(~np.isnan(p))
    order = defined[np.argsort(p[defined], kind="stable")]
    m = len(order)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return adjusted


def _trend_row(pairs: pd.DataFrame) -> dict:
    """The least-squares line of ln ratio 1 on ln num_params over `pairs`, or NaN with a reason."""
    x, y = np.log(pairs.num_params.astype(float)), np.log(pairs.ratio1_loss.astype(float))
    row = {"n_pairs": len(pairs), "n_sizes": x.nunique(), "reason": ""}
    if row["n_sizes"] < 2:
        return row | {"reason": "seed pairs at fewer than 2 sizes: no trend"}
    fit = sps.linregress(x, y)
    row |= {"slope": fit.slope, "intercept": fit.intercept}
    if len(pairs) < 3:  # the line goes through both points: no residual to estimate its error from
        return row | {"reason": "2 seed pairs: no interval"}
    half = sps.t.ppf((1 + CONFIDENCE) / 2, len(pairs) - 2) * fit.stderr
    return row | {"slope_se": fit.stderr, "slope_ci_low": fit.slope - half, "slope_ci_high": fit.slope + half,
                  "p_value": fit.pvalue}


def scaling_trend(final: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """Per TREND_GROUP with p_bw > 0: the regression of each seed pair's ln ratio 1 (loss) on ln
    num_params over the group's sizes (TREND_COLUMNS; see the module docstring)."""
    groups = final.loc[final.p_bw > 0, TREND_GROUP].drop_duplicates().sort_values(TREND_GROUP)
    rows = [{**group, **_trend_row(select(pairs, group))} for group in groups.to_dict("records")]
    return pd.DataFrame(rows, columns=TREND_COLUMNS)


def size_tests(final: pd.DataFrame, arm_list: list[Arm], pairs: pd.DataFrame) -> pd.DataFrame:
    """Per p_bw > 0 setting: the paired t test of loss_fw(x) − loss_fw(0) over its seed pairs (NaN
    below 2 pairs), and p_holm, its p-value Holm-adjusted over the sizes of its TREND_GROUP."""
    rows = []
    for setting, arm_pairs in _arm_pairs(final, arm_list, pairs):
        diff = (arm_pairs.loss_fw.astype(float) - arm_pairs.loss_fw_base.astype(float)).to_numpy()
        t, p = sps.ttest_1samp(diff, 0.0) if len(diff) >= 2 else (math.nan, math.nan)
        rows.append({**setting, "n": len(diff), "mean_diff": diff.mean() if len(diff) else math.nan,
                     "t": float(t), "p_value": float(p)})
    tests = pd.DataFrame(rows, columns=SIZE_TEST_COLUMNS)
    if tests.empty:
        return tests
    tests["p_holm"] = tests.groupby(TREND_GROUP, dropna=False).p_value.transform(holm)
    return tests


# ----------------------------------------------------------------------------- power

def _power(noncentrality: float, df: int, alpha: float) -> float:
    """Power of the two-sided t test at level alpha with df degrees of freedom and noncentrality λ."""
    c = sps.t.ppf(1 - alpha / 2, df)
    # P(T < -c) at λ is P(T > c) at -λ: scipy's nct.cdf can return NaN far in the lower tail
    return float(sps.nct.sf(c, df, noncentrality) + sps.nct.sf(c, df, -noncentrality))


def detectable_noncentrality(df: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The noncentrality λ > 0 at which the two-sided t test with df degrees of freedom has `power`."""
    high = 1.0
    while _power(high, df, alpha) < power:
        high *= 2
    return optimize.brentq(lambda nc: _power(nc, df, alpha) - power, 0.0, high, xtol=1e-12)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's r; NaN below 3 points (two always correlate ±1) or when an arm does not vary."""
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def _power_row(pairs: pd.DataFrame) -> dict:
    x, base = pairs.loss_fw.to_numpy(dtype=float), pairs.loss_fw_base.to_numpy(dtype=float)
    n = len(pairs)
    if n < 2:
        return {"n": n, "reason": f"{plural(n, 'seed pair')}: no paired SD"}
    sd = float(np.std(x - base, ddof=1))
    mde = detectable_noncentrality(n - 1) * sd / math.sqrt(n)
    return {"n": n, "sd_diff": sd, "mde_loss": mde, "mde_percent": 100 * mde / base.mean(),
            "correlation": _correlation(x, base), "reason": "" if n >= 3 else "2 seed pairs: no correlation"}


def power_table(final: pd.DataFrame, arm_list: list[Arm], pairs: pd.DataFrame) -> pd.DataFrame:
    """Per p_bw > 0 setting: the SD of the paired fw loss differences, the smallest mean difference
    (mde_loss, and as a percent of the p_bw = 0 arm's mean fw loss) a two-sided paired t test at
    ALPHA detects with POWER, and the correlation of the two arms' fw losses over the same seeds
    (POWER_COLUMNS; reason says why a value is NaN, empty when none is)."""
    rows = [{**setting, **_power_row(arm_pairs)} for setting, arm_pairs in _arm_pairs(final, arm_list, pairs)]
    return pd.DataFrame(rows, columns=POWER_COLUMNS)


# ----------------------------------------------------------------------------- arrow of time

def trains_tasks_equally(final: pd.DataFrame) -> pd.Series:
    """Runs whose bw task is trained as often as the fw task (EQUAL_TASKS) at a fixed p_bw."""
    equal_p = final.bw_mode.map(EQUAL_TASKS).astype(float)
    return (final.p_bw.astype(float) == equal_p) & ~final.adaptive_p_bw.astype(bool)


def arrow_of_time(final: pd.DataFrame) -> pd.DataFrame:
    """Per setting that trains both tasks equally: mean and 95% t interval over seeds of the final
    fw − bw loss gap (ARROW_COLUMNS); leaks_labels: the setting's bw_mask leaks labels, so its gap
    measures the leak, not the arrow of time."""
    equal = final[trains_tasks_equally(final)]
    rows = []
    for setting, runs in equal.groupby(SETTING, sort=True, dropna=False):
        gap = runs.loss_fw.astype(float) - runs.loss_bw.astype(float)
        mean, low, high = mean_ci(gap, CONFIDENCE)
        row = dict(zip(SETTING, setting))
        rows.append({**row, "leaks_labels": leaks_labels(row["bw_mask"]), "num_params": runs.num_params.iloc[0],
                     "n": len(runs), "gap_mean": mean, "gap_ci_low": low, "gap_ci_high": high})
    return pd.DataFrame(rows, columns=ARROW_COLUMNS)
