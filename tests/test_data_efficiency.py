"""The data-efficiency analysis (fwbw.analysis.data_efficiency) on hand-built runs with known answers."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from fwbw.analysis import data_efficiency as de
from fwbw.analysis.effects import detectable_noncentrality

TOKENS = 1_000_000  # unique tokens of the whole training split
FRACTIONS = (0.125, 0.25, 0.5, 1.0)
CAP = 8.0


def run(seed, loss, p_bw=0.0, train_fraction=0.25, epochs=CAP, best_val=None, status="done", run_id=None,
        censored=False, **values):
    """One runs-table row: the fw-only baseline with `values` changed."""
    setting = {**de.BASELINE, "p_bw": p_bw, "train_fraction": train_fraction, "epochs": epochs, **values}
    name = run_id or "-".join(f"{v}" for v in (*setting.values(), seed))
    return {"run_id": name, "seed": seed, "status": status, **setting,
            "unique_tokens": int(train_fraction * TOKENS), "test_fw_loss": loss,
            "best_val_fw_loss": loss if best_val is None else best_val, "test_fw_loss_final": loss,
            "train_split_fw_loss": loss - 1, "censored": censored,
            "train_flops": (1 + p_bw + setting["replay"]) * epochs,
            "best_epoch": epochs / 2}


def table(rows):
    return pd.DataFrame(rows)


def expected_test(diff):
    """What a paired t test of `diff` must give, from scipy."""
    diff = np.asarray(diff, dtype=float)
    n, mean, sd = len(diff), diff.mean(), diff.std(ddof=1)
    half = sps.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    test = sps.ttest_1samp(diff, 0.0)
    return {"n": n, "mean_diff": mean, "sd_diff": sd, "ci_low": mean - half, "ci_high": mean + half,
            "t": test.statistic, "p_value": test.pvalue, "mde": detectable_noncentrality(n - 1) * sd / math.sqrt(n)}


def holm_by_hand(p):
    """Holm (1979): sorted p_(1..m), adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))."""
    order = np.argsort(p)
    adjusted, running = np.empty(len(p)), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def assert_test(row, diff):
    for column, value in expected_test(diff).items():
        assert row[column] == pytest.approx(value, rel=1e-9), column


# ----------------------------------------------------------------------------- primary

BASE_LOSS = (4.0, 4.2, 4.1)
PRIMARY_DIFF = (-0.1, -0.3, -0.2)


def primary_rows():
    rows = [run(s, loss) for s, loss in enumerate(BASE_LOSS)]
    rows += [run(s, loss + d, p_bw=0.25, censored=s == 0) for s, (loss, d) in enumerate(zip(BASE_LOSS, PRIMARY_DIFF))]
    return rows


def test_primary_contrast_is_the_paired_t_test_over_seeds():
    extra = [run(0, 99.0, p_bw=0.25, status="failed", run_id="failed"),  # not done: left out
             run(1, 99.0, p_bw=0.25, run_id="zzz-rerun"),  # a second run of seed 1: the first by run_id counts
             run(0, 1.0, epochs=2.0), run(0, 1.0, p_bw=0.25, epochs=2.0)]  # a cap with fewer seeds
    table_ = de.primary_contrast(table([*primary_rows(), *extra]))
    row = table_.iloc[0]
    assert len(table_) == 1 and row.family == "primary" and row.epochs == CAP
    assert_test(row, PRIMARY_DIFF)
    assert row.mean_diff == pytest.approx(-0.2) and row.t == pytest.approx(-0.2 / (0.1 / math.sqrt(3)))
    assert (row.n_censored, row.n_censored_x, row.n_censored_base) == (1, 1, 0)
    assert row.flops_ratio == pytest.approx(1.25)
    assert (row.p_bw, row.p_bw_base, row.train_fraction_base) == (0.25, 0.0, 0.25)


# ----------------------------------------------------------------------------- multiplier

A, B = 10.0, 0.1
SEED_SCALE = (0.5, 1.0, 2.0, 4.0)  # huge between-seed spread, the same in every arm of a seed


def power_law(tokens):
    return A * tokens ** -B


def multiplier_runs(bw_tokens, scales=SEED_SCALE):
    """The fw-only curve loss = A U^-B at every fraction, and an fw+bw arm at 0.25 whose loss equals
    the curve's at `bw_tokens`, each seed's losses scaled by its own factor."""
    rows = [run(s, c * power_law(f * TOKENS), train_fraction=f) for s, c in enumerate(scales) for f in FRACTIONS]
    return rows + [run(s, c * power_law(bw_tokens), p_bw=0.25) for s, c in enumerate(scales)]


@pytest.mark.parametrize("multiplier", [2.0, 3.0, 1.5])
def test_multiplier_is_exact_on_a_power_law(multiplier):
    row = de.effective_data_multiplier(table(multiplier_runs(multiplier * 0.25 * TOKENS)), n_boot=300).iloc[0]
    assert row.multiplier == pytest.approx(multiplier, rel=1e-12)
    assert (row.n_seeds, row.n_fractions, row.censored, row.isotonic) == (4, 4, "", False)
    assert (row.bound_low, row.bound_high) == (0.5, 4.0)
    # the seeds' factors move every arm together: a joint resample never moves the multiplier,
    # independent resamples of the arms would
    assert row.ci_low == pytest.approx(multiplier, rel=1e-9) and row.ci_high == pytest.approx(multiplier, rel=1e-9)
    assert row.censored_low_share == row.censored_high_share == 0.0


def test_multiplier_is_censored_outside_the_curve_never_extrapolated():
    beyond = de.effective_data_multiplier(table(multiplier_runs(8 * TOKENS)), n_boot=100).iloc[0]
    assert math.isnan(beyond.multiplier) and beyond.censored == "high" and beyond.bound_high == 4.0
    assert beyond.censored_high_share == 1.0 and beyond.ci_high == math.inf
    below = de.effective_data_multiplier(table(multiplier_runs(0.05 * TOKENS)), n_boot=100).iloc[0]
    assert math.isnan(below.multiplier) and below.censored == "low" and below.bound_low == 0.5
    assert below.censored_low_share == 1.0 and below.ci_low == 0.0


def test_multiplier_interval_spreads_when_the_seeds_disagree():
    rows = multiplier_runs(2 * 0.25 * TOKENS, scales=(1.0, 1.0, 1.0, 1.0))
    for i, noise in enumerate((0.03, -0.02, 0.01, -0.04)):  # the bw arm's own per-seed noise
        rows[-4 + i]["test_fw_loss"] += noise
    row = de.effective_data_multiplier(table(rows), n_boot=500).iloc[0]
    assert row.ci_low < row.multiplier < row.ci_high


def test_decreasing_fit_pools_adjacent_violators():
    assert de.decreasing_fit(np.array([3.0, 1.0, 2.0, 0.0])) == pytest.approx([3.0, 1.5, 1.5, 0.0])
    assert de.decreasing_fit(np.array([3.0, 2.0, 1.0])) == pytest.approx([3.0, 2.0, 1.0])


def test_a_non_monotone_curve_is_read_off_its_decreasing_fit():
    rows = [run(0, loss, train_fraction=f) for f, loss in zip(FRACTIONS, (5.0, 4.0, 4.2, 3.5))]
    rows.append(run(0, math.sqrt(4.0 * 4.2), p_bw=0.25))  # the pooled level, in ln loss
    row = de.effective_data_multiplier(table(rows), n_boot=10).iloc[0]
    assert row.isotonic and row.multiplier == pytest.approx(1.0)  # the first tokens at which the fit reaches it
    curve = de.data_curve(table(rows))
    assert list(curve.arm) == ["fw"] * 4 + ["fw+bw"]
    assert curve.fitted.iloc[1] == pytest.approx(math.sqrt(4.0 * 4.2)) == curve.fitted.iloc[2]


# ----------------------------------------------------------------------------- Q2

Q2_LOSS = {"fw+bw": (3.0, 3.3, 3.1), "fw+replay": (3.2, 3.4, 3.5), "fw": (3.6, 3.65, 3.8)}


def q2_rows(epochs=1.0, shift=0.0):
    return [run(s, loss + shift, train_fraction=1.0, epochs=epochs, **de.Q2_ARMS[name])
            for name, losses in Q2_LOSS.items() for s, loss in enumerate(losses)]


def test_q2_contrasts_and_holm_within_each_family():
    q2 = de.q2_head_to_head(table([*q2_rows(), *q2_rows(epochs=2.0, shift=0.1), *q2_rows(epochs=4.0)]))
    assert list(q2.family) == ["q2"] * 3 + ["q2-epochs"] * 6
    one_pass = q2[q2.family == "q2"]
    assert list(one_pass.contrast) == ["fw+bw - fw+replay", "fw+bw - fw", "fw+replay - fw"]
    for row, (x, base) in zip(one_pass.itertuples(), de.Q2_CONTRASTS):
        assert_test(row._asdict(), np.subtract(Q2_LOSS[x], Q2_LOSS[base]))
    assert one_pass.p_holm.to_numpy() == pytest.approx(holm_by_hand(one_pass.p_value.to_numpy()))
    epochs = q2[q2.family == "q2-epochs"]
    assert epochs.p_holm.to_numpy() == pytest.approx(holm_by_hand(epochs.p_value.to_numpy()))
    assert q2.flops_ratio.iloc[0] == pytest.approx(1.0)  # fw+bw and fw+replay: equal FLOPs


# ----------------------------------------------------------------------------- dose response

DOSES = (0.0, 0.05, 0.25, 1.0)
SLOPES = (0.4, 0.5, 0.6)


def dose_rows():
    return [run(s, 4.0 + 0.1 * s + slope * d, p_bw=d) for s, slope in enumerate(SLOPES) for d in DOSES]


def test_dose_slope_is_exact_on_linear_data_and_contrasts_are_holm_adjusted():
    dose = de.dose_response(table(dose_rows()))
    slope = dose.iloc[0]
    assert slope.family == "dose-slope" and slope.unit == "nats per unit p_bw" and math.isnan(slope.p_bw)
    assert_test(slope, SLOPES)
    assert slope.p_holm == slope.p_value
    contrasts = dose[dose.family == "dose"]
    assert list(contrasts.p_bw) == [0.05, 0.25, 1.0]
    for row in contrasts.itertuples():
        assert_test(row._asdict(), np.multiply(SLOPES, row.p_bw))
    assert contrasts.p_holm.to_numpy() == pytest.approx(holm_by_hand(contrasts.p_value.to_numpy()))
    curve = de.dose_curve(table(dose_rows()))
    assert curve["mean"].to_numpy() == pytest.approx([4.1 + 0.5 * d for d in DOSES])
    assert list(curve.n) == [3] * 4


def test_the_dose_model_needs_three_doses_not_the_primary_contrast_again():
    two_doses = [row for row in dose_rows() if row["p_bw"] in (0.0, 0.25)]
    with pytest.raises(de.MissingArms, match="needs runs at 3 or more p_bw values .* done: 0, 0.25$"):
        de.dose_response(table(two_doses))
    assert "dose" in set(de.analyse(table(two_doses))["skipped"].part)


# ----------------------------------------------------------------------------- controls

def test_lr_is_chosen_on_validation_even_when_test_disagrees():
    # fw: validation prefers 2x the baseline's lr_scale, test prefers 0.5x; fw+bw: validation prefers 1x
    lr = de.BASELINE["lr_scale"]
    fw = {0.5 * lr: (3.0, 4.5), lr: (4.0, 4.2), 2 * lr: (5.0, 4.0)}  # lr_scale -> (test, validation) loss
    bw = {lr: (3.9, 3.9), 2 * lr: (3.5, 4.4)}
    rows = [run(s, test + 0.01 * s * s, p_bw=p, lr_scale=scale, best_val=val)
            for p, arms in ((0.0, fw), (0.25, bw)) for scale, (test, val) in arms.items() for s in range(3)]
    choice = de.lr_selection(table(rows))
    chosen = choice[choice.chosen].set_index("arm").lr_scale
    assert chosen.to_dict() == {"fw": 2 * lr, "fw+bw": lr}
    tuned = de.controls(table(rows)).iloc[0]
    assert (tuned.lr_scale, tuned.lr_scale_base) == (lr, 2 * lr)
    assert tuned.mean_diff == pytest.approx(3.9 - 5.0)


def test_regulariser_baselines_pair_against_fw_and_fw_bw():
    rows = [*primary_rows(), *(run(s, loss - 0.05 * (s + 1), dropout=0.1) for s, loss in enumerate(BASE_LOSS)),
            *(run(s, loss + 0.02 * s, wd_scale=2.0) for s, loss in enumerate(BASE_LOSS))]
    table_ = de.controls(table(rows))
    assert list(table_.contrast) == [
        "fw+bw (validation-chosen lr_scale) - fw (validation-chosen lr_scale)",
        "fw (wd_scale 2) - fw", "fw+bw - fw (wd_scale 2)", "fw (dropout 0.1) - fw", "fw+bw - fw (dropout 0.1)"]
    assert_test(table_.iloc[0], PRIMARY_DIFF)
    assert_test(table_.iloc[3], [-0.05, -0.10, -0.15])
    assert_test(table_.iloc[4], np.subtract(PRIMARY_DIFF, [-0.05, -0.10, -0.15]))
    assert (table_.family == "controls").all()
    assert table_.p_holm.to_numpy() == pytest.approx(holm_by_hand(table_.p_value.to_numpy()))


# ----------------------------------------------------------------------------- matched training loss

def curve_rows(seed, p_bw, train, valid):
    setting = {**de.BASELINE, "p_bw": p_bw, "train_fraction": 0.25, "epochs": CAP}
    return [{"run_id": f"{p_bw}-{seed}", "seed": seed, **setting, "epoch": epoch + 1, "split": split, "fw_loss": loss}
            for split, losses in (("train", train), ("valid", valid)) for epoch, loss in enumerate(losses)]


def matched_curves(shifts):
    """fw and fw+bw on the line valid = 0.5 + 0.9 train, fw+bw slower and shifted by its seed's shift; fw's
    training loss rises once (the point off the line is dropped: not a new low)."""
    fw_train, bw_train = np.array([5.0, 4.0, 4.2, 3.0, 2.5, 2.0]), np.array([5.5, 4.5, 3.5, 3.0, 2.8])
    fw_valid = 0.5 + 0.9 * fw_train
    fw_valid[2] = 9.9
    rows = []
    for seed, shift in enumerate(shifts):
        rows += curve_rows(seed, 0.0, fw_train, fw_valid)
        rows += curve_rows(seed, 0.25, bw_train, 0.5 + 0.9 * bw_train + shift)
    return pd.DataFrame(rows)


def test_matched_train_loss_is_zero_on_one_curve_and_the_shift_off_it():
    same = de.matched_train_loss(matched_curves((0.0, 0.0, 0.0)))
    assert len(same) == de.MATCHED_GRID and (same.family == "matched").all()
    assert same.train_split_fw_loss.to_numpy() == pytest.approx(2.8 + (np.arange(5) + 0.5) * (5.0 - 2.8) / 5)
    assert same.mean_diff.to_numpy() == pytest.approx(0.0, abs=1e-12)
    shifts = (-0.05, -0.1, -0.15)
    shifted = de.matched_train_loss(matched_curves(shifts))
    for row in shifted.itertuples():
        assert_test(row._asdict(), shifts)
    assert shifted.p_holm.to_numpy() == pytest.approx(holm_by_hand(shifted.p_value.to_numpy()))


# ----------------------------------------------------------------------------- analyse

def test_analyse_skips_parts_without_arms_and_says_why():
    tables = de.analyse(table(primary_rows()))
    assert len(tables["primary"]) == 1
    skipped = tables["skipped"].set_index("part").reason
    assert "no done run of fw+bw (p_bw 1, train_fraction 1, epochs 1)" in skipped["q2"]
    assert skipped["matched"] == "no evaluation curves given"
    assert {"multiplier", "curve", "q2", "matched"} <= set(skipped.index)
    assert tables["q2"].empty and list(tables["q2"].columns) == de.CONTRAST_COLUMNS


def test_analyse_runs_every_part_of_a_full_sweep():
    rows = [*multiplier_runs(2 * 0.25 * TOKENS, scales=(1.0, 1.1, 0.9)), *q2_rows(),
            *(run(s, 2.7 + 0.1 * s, p_bw=1.0) for s in range(3))]
    curves = matched_curves((-0.05, -0.1, -0.15))
    tables = de.analyse(table(rows), curves.assign(run_id=curves.run_id.map(lambda r: "done-" + r)))
    assert set(tables["skipped"].part) == {"matched"}  # its curves belong to no done run
    assert tables["multiplier"].multiplier.iloc[0] == pytest.approx(2.0)
    assert list(tables["dose"].family) == ["dose-slope", "dose", "dose"]
