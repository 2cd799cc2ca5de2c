"""Best and final fw loss, the epoch of the best, the train-val gap and their paired changes
(fwbw.analysis.overfitting), on a hand-built results table with known answers."""

import math

import numpy as np
import pandas as pd
import pytest

from fwbw.analysis.effects import detectable_noncentrality
from fwbw.analysis.figures import overfitting_curves
from fwbw.analysis.report import findings_by_question
from fwbw.analysis.sections.answer import answer_table
from fwbw.analysis.sections.inputs import Inputs
from fwbw.analysis.sections.many_epochs import change_verdict
from fwbw.analysis.stats import mean_ci, select
from fwbw.analysis.sweep_analysis import analyse
from fwbw.study.results import EVAL_PHASE, TRAIN_SPLIT_PHASE

EPOCHS = (0.5, 1.0, 1.5, 2.0)
STEPS = (10, 20, 30, 40)
INFO = dict(data="wiki", tokenizer="gpt2", depth=2, width=8, num_params=986, seq_len=64, bw_mode="add",
            bw_mask="causal", task_tokens=False, status="done", leaks_labels=False, epochs=2.0, model_scale=math.nan,
            num_heads=1, adaptive_p_bw=False, train_tokens=None, eval_tokens=4096, dtype="auto",
            eval_every_epochs=0.5, recipe_id="r0", error=None, probe_leak_fw=False, probe_train_leak_fw=False,
            probe_leak_bw=False, probe_train_leak_bw=False)
# fw loss per eval point: (validation, training split) per (p_bw, seed)
CURVES = {
    (0.0, 0): ([5.0, 4.5, 4.6, 4.8], [4.9, 4.3, 4.0, 3.8]),
    (0.0, 1): ([5.1, 4.6, 4.7, 4.9], [5.0, 4.4, 4.1, 3.9]),
    (0.0, 2): ([5.2, 4.7, 4.75, 4.85], [5.1, 4.5, 4.2, 4.0]),
    (0.25, 0): ([5.2, 4.8, 4.5, 4.55], [5.1, 4.7, 4.3, 4.2]),
    (0.25, 1): ([5.3, 4.9, 4.55, 4.6], [5.2, 4.8, 4.4, 4.3]),
    (0.25, 2): ([5.4, 5.0, 4.7, 4.65], [5.3, 4.9, 4.5, 4.4]),  # still improving at the end
}


def run_rows(p_bw, seed, valid, train, train_split=True, **settings):
    info = dict(INFO, run_id=f"p{p_bw:g}-s{seed}" + "".join(f"-{v}" for v in settings.values()), p_bw=p_bw, seed=seed,
                **settings)
    rows = []
    phases = [(EVAL_PHASE, valid), *([(TRAIN_SPLIT_PHASE, train)] if train_split else [])]
    for phase, losses in phases:
        for step, epoch, loss in zip(STEPS, EPOCHS, losses):
            for direction, value in (("fw", loss), ("bw", loss + 0.1)):
                rows.append(dict(info, step=step, tokens=step * 100, epoch=epoch, seconds=step / 10, direction=direction,
                                 loss=value, acc=0.3, ppl=math.exp(value), phase=phase, blocks_remaining=2))
    return rows


def table(curves=CURVES, train_split=True, extra=()):
    rows = [row for (p, s), (v, t) in curves.items() for row in run_rows(p, s, v, t, train_split)]
    return pd.DataFrame([*rows, *extra])


@pytest.fixture(scope="module")
def analysis():
    return analyse(table())


def effect(analysis, measure, **setting):
    return select(analysis.overfitting, {"measure": measure, "p_bw": 0.25, **setting}).iloc[0]


def test_each_run_has_its_best_its_epoch_its_rise_and_its_gap(analysis):
    fit = analysis.run_fit.set_index("run_id")
    assert fit.loc["p0-s0", ["best_fw_loss", "best_epoch", "final_fw_loss", "rise_after_best", "final_gap"]].tolist() == \
        pytest.approx([4.5, 1.0, 4.8, 0.3, 1.0])
    assert fit.loc["p0-s0", "gap_at_best"] == pytest.approx(4.5 - 4.3)
    assert fit.loc["p0.25-s2", ["best_epoch", "best_at_end"]].tolist() == [2.0, True]
    assert not fit.loc["p0.25-s0", "best_at_end"]


def test_paired_changes_at_equal_data(analysis):
    best = effect(analysis, "best_fw_loss")
    assert (best.n, best.n_pairs, best.mean_diff) == (3, 3, pytest.approx(-0.1 / 3))
    assert (best.ci_low, best.ci_high) == pytest.approx(mean_ci([0.0, -0.05, -0.05])[1:])
    assert (best.base_ci_low, best.base_ci_high) == pytest.approx(mean_ci([4.5, 4.6, 4.7])[1:])
    assert best.mde == pytest.approx(detectable_noncentrality(2) * np.std([0.0, -0.05, -0.05], ddof=1) / math.sqrt(3))
    assert effect(analysis, "final_fw_loss").mean_diff == pytest.approx(np.mean([-0.25, -0.3, -0.2]))
    rise = effect(analysis, "rise_after_best")
    assert (rise.base_mean, rise.x_mean) == (pytest.approx(0.25), pytest.approx(np.mean([0.05, 0.05, 0.0])))
    gap = effect(analysis, "final_gap")
    assert gap.mean_diff == pytest.approx(np.mean([0.35 - 1.0, 0.3 - 1.0, 0.25 - 0.85]))


def test_a_censored_best_epoch_is_left_out_of_its_change(analysis):
    """Seed 2's p_bw = 0.25 run is still improving at its end: only seeds 0 and 1 say when the best
    came, both 0.5 epochs later, so there is no spread and no interval."""
    epoch = effect(analysis, "best_epoch")
    assert (epoch.n, epoch.n_pairs, epoch.x_mean, epoch.base_mean, epoch.mean_diff) == (2, 3, 1.5, 1.0, 0.5)
    assert math.isnan(epoch.ci_low) and math.isnan(epoch.mde)
    assert (epoch.x_best_at_end, epoch.base_best_at_end) == (1, 0)


def test_equal_compute_stops_the_costlier_run_at_the_baselines_flops(analysis):
    """p_bw = 0.25 spends 1.25x the FLOPs per token: at the baseline's final FLOPs (4000 tokens' worth)
    it has reached 3200 tokens, between its 3rd (3000 x 1.25 = 3750) and 4th point (5000)."""
    best = effect(analysis, "best_fw_loss_equal_flops")
    assert best.mean_diff == pytest.approx(np.mean([4.5 - 4.5, 4.55 - 4.6, 4.7 - 4.7]))
    final = effect(analysis, "final_fw_loss_equal_flops")
    interpolated = [4.5 + 0.05 * 0.2, 4.55 + 0.05 * 0.2, 4.7 - 0.05 * 0.2]
    assert final.mean_diff == pytest.approx(np.mean(np.subtract(interpolated, [4.8, 4.9, 4.85])))


def test_pairs_are_made_by_seed_and_unknown_costs_are_said():
    """A p_bw = 0.25 seed without a baseline pairs with nothing; an adaptive arm has no FLOP count."""
    lone = run_rows(0.25, 7, [5.0, 4.0, 3.0, 2.0], [5.0, 4.0, 3.0, 2.0])
    adaptive = [row for (p, s), (v, t) in CURVES.items() if p > 0 for row in run_rows(p, s, v, t, adaptive_p_bw=True)]
    analysis = analyse(table(extra=[*lone, *adaptive]))
    assert effect(analysis, "best_fw_loss", adaptive_p_bw=False).mean_diff == pytest.approx(-0.1 / 3)
    assert effect(analysis, "best_fw_loss", adaptive_p_bw=False).n_pairs == 3
    unknown = effect(analysis, "best_fw_loss_equal_flops", adaptive_p_bw=True)
    assert unknown.n == 0 and math.isnan(unknown.mean_diff)
    statements = " ".join(findings_by_question(analysis)["overfitting"])
    assert "best fw val loss: not available (a run's training FLOPs are unknown (adaptive p_bw))" in statements


def test_fit_curves_average_seeds_per_split_and_epoch(analysis):
    curves = analysis.fit_curves
    valid = select(curves, {"p_bw": 0.0, "split": "valid", "nominal_epoch": 1.0}).iloc[0]
    assert (valid.n, valid["mean"]) == (3, pytest.approx(4.6))
    assert (valid.ci_low, valid.ci_high) == pytest.approx(mean_ci([4.5, 4.6, 4.7])[1:])
    train = select(curves, {"p_bw": 0.25, "split": "train", "nominal_epoch": 2.0}).iloc[0]
    assert train["mean"] == pytest.approx(4.3)


def test_report_states_the_changes_with_their_intervals(analysis):
    statement = findings_by_question(analysis)["overfitting"][0]
    assert statement.startswith("depth 2 / width 8, p_bw = 0.25 (n = 3 seed pairs): At equal data, best fw val loss "
                                "4.567 vs 4.600 at p_bw = 0 (-0.033 nats, 95% CI ")
    assert ("epoch of the best 1.50 vs 1.00 at p_bw = 0 over the 2 seed pairs where both are known (+0.50 epochs, "
            "95% CI NaN … NaN: no interval: every pair differs by the same amount)") in statement
    assert statement.endswith("Still improving at the last evaluation (best epoch censored at the budget): 1 of 3 "
                              "p_bw = 0.25 runs, 0 of 3 p_bw = 0 runs.")
    answer = answer_table(Inputs(analysis, pd.DataFrame(), {}, []))
    rows = answer[answer.question == "many epochs"].set_index("comparison")
    assert list(rows.index) == [f"depth 2 / width 8, p_bw = 0.25 (add, causal mask): {m}" for m in (
        "best fw val loss", "best fw val loss at equal compute", "rise after the best", "final train–val gap")]
    best = rows.loc["depth 2 / width 8, p_bw = 0.25 (add, causal mask): best fw val loss"]
    assert (round(best.effect, 3), best.n, best.n_unit, best.unit) == (-0.033, 3, "seed pair", "nats")
    assert round(rows.loc["depth 2 / width 8, p_bw = 0.25 (add, causal mask): rise after the best"].effect, 3) == -0.217


def test_the_answer_speaks_of_many_epochs_only_where_the_baselines_overfit():
    """Here only the p_bw = 0.25 runs rise after their best; the baselines keep improving."""
    monotone = {key: (sorted(valid, reverse=True) if key[0] == 0 else valid, train) for key, (valid, train) in CURVES.items()}
    analysis = analyse(table(monotone))
    assert (analysis.run_fit.rise_after_best > 0).any()
    assert "many epochs" not in set(answer_table(Inputs(analysis, pd.DataFrame(), {}, [])).question)


@pytest.mark.parametrize(("measure", "low", "high", "verdict"), [
    ("best_epoch", 0.2, 0.8, "later with bw training"), ("best_epoch", -0.8, -0.2, "earlier with bw training"),
    ("final_gap", 0.1, 0.3, "wider with bw training"), ("rise_after_best", -0.3, -0.1, "overfits less with bw training"),
    ("best_fw_loss", 0.1, 0.3, "higher with bw training"),
    ("best_fw_loss", -0.1, 0.3, "no resolvable change, the seeds could detect ±0.250"),
])
def test_verdict_words_follow_the_interval_and_the_measure(measure, low, high, verdict):
    row = {"measure": measure, "n": 4, "ci_low": low, "ci_high": high, "mde": 0.25, "unit": "nats"}
    assert change_verdict(row) == verdict


def test_without_the_training_split_the_gap_is_unknown_and_said():
    analysis = analyse(table(train_split=False))
    assert analysis.run_fit.final_gap.isna().all()
    assert math.isnan(effect(analysis, "final_gap").mean_diff)
    assert "final train–val gap: not available (the training split was not evaluated" in \
        findings_by_question(analysis)["overfitting"][0]


def test_overfitting_figure_is_drawn_only_with_a_training_split(analysis, tmp_path):
    assert [p.name for p in overfitting_curves(analysis, tmp_path)] == ["overfitting.png"]
    assert (tmp_path / "overfitting.svg").is_file()
    assert overfitting_curves(analyse(table(train_split=False)), tmp_path / "none") == []


def test_overfitting_figure_draws_a_variant_without_training_split(tmp_path):
    either = [row for (p, s), (v, t) in CURVES.items() if p > 0
              for row in run_rows(p, s, v, t, train_split=False, bw_mode="either")]
    analysis = analyse(table(extra=either))
    assert [p.name for p in overfitting_curves(analysis, tmp_path)] == ["overfitting.png"]
