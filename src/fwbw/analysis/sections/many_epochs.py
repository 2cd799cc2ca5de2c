"""Many epochs: best loss, overfitting and the train–val gap. Per setting the paired changes with bw training
of the best and final fw loss, the epoch of the best, the rise after it and the train–val gap, at equal data
and at equal compute, with the overfitting and run_fit tables."""

from __future__ import annotations

import pandas as pd

from fwbw.analysis.figures import size_label
from fwbw.analysis.overfitting import MEASURES
from fwbw.analysis.sections.inputs import Inputs, with_variant
from fwbw.analysis.sections.tables import answer_row, skip
from fwbw.analysis.sections.text import capitalised, num, setting_label, signed
from fwbw.analysis.stats import SETTING, Analysis
from fwbw.study.estimate import plural

TITLE = "Many epochs: best loss, overfitting and the train–val gap"
QUESTION = "many epochs"
UNAVAILABLE = {  # measure -> why a paired change has no pair with both values
    "best_epoch": "every pair has a run still improving at its last point",
    "final_gap": "the training split was not evaluated (train_eval_tokens 0)",
    "best_fw_loss_equal_flops": "a run's training FLOPs are unknown (adaptive p_bw)",
    "final_fw_loss_equal_flops": "a run's training FLOPs are unknown (adaptive p_bw) or it stopped short of the other's",
}
ANSWER_MEASURES = {"best_fw_loss": "best fw val loss", "best_fw_loss_equal_flops": "best fw val loss at equal compute",
                   "rise_after_best": "rise after the best", "final_gap": "final train–val gap"}  # the answer's, in order


def _digits(row: dict) -> int:
    return 2 if row["unit"] == "epochs" else 3


def change_verdict(row: dict) -> str:
    """What the interval of a paired change (overfitting.csv's row) says, in MEASURES' words, with
    the smallest change the seeds could detect when it straddles 0."""
    if row["n"] < 2:
        return f"no interval at n = {row['n']}"
    if pd.isna(row["ci_low"]):
        return "no interval: every pair differs by the same amount"
    measure = MEASURES[row["measure"]]
    if row["ci_low"] > 0:
        return measure.above
    if row["ci_high"] < 0:
        return measure.below
    return f"no resolvable change, the seeds could detect ±{num(row['mde'], _digits(row))}"


def _no_interval(row: dict) -> str | None:
    """Why a paired change (overfitting.csv's row) has no 95% interval, or None."""
    if row["n"] == 0:
        return f"not available: {UNAVAILABLE.get(row['measure'], 'no pair has both values')}"
    return None if row["n"] >= 2 and pd.notna(row["ci_low"]) else change_verdict(row)


def _measure_clause(row: dict) -> str:
    name = MEASURES[row["measure"]].name
    if row["n"] == 0:
        return f"{name}: not available ({UNAVAILABLE.get(row['measure'], 'no pair has both values')})"
    digits = _digits(row)
    over = "" if row["n"] == row["n_pairs"] else f" over the {plural(row['n'], 'seed pair')} where both are known"
    return (f"{name} {num(row['x_mean'], digits)} vs {num(row['base_mean'], digits)} at p_bw = 0{over} "
            f"({signed(row['mean_diff'], digits)} {row['unit']}, 95% CI {signed(row['ci_low'], digits)} … "
            f"{signed(row['ci_high'], digits)}: {change_verdict(row)})")


def _censored_clause(row: dict) -> str:
    return (f"still improving at the last evaluation (best epoch censored at the budget): {row['x_best_at_end']} of "
            f"{row['n_pairs']} p_bw = {row['p_bw']:g} runs, {row['base_best_at_end']} of {row['n_pairs']} p_bw = 0 runs")


def _statement(rows: pd.DataFrame, variant: bool) -> str:
    """One arm's paired changes (overfitting.csv's rows of one setting), equal data then equal compute."""
    first = rows.iloc[0]
    head = (f"{size_label(first['depth'], first['width'])}, {setting_label(first, variant)} "
            f"(n = {plural(first['n_pairs'], 'seed pair')})")
    by_budget = {b: "; ".join(map(_measure_clause, rows[rows.budget == b].to_dict("records"))) for b in rows.budget.unique()}
    text = " ".join(f"At {b}, {clauses}." for b, clauses in by_budget.items())
    return f"{head}: {text} {capitalised(_censored_clause(first))}."


def statements(analysis: Analysis) -> list[str]:
    effects, variant = analysis.overfitting, with_variant(analysis.overfitting)
    return [_statement(rows, variant) for _, rows in effects.groupby(SETTING, dropna=False, sort=True)]


def overfit_arms(effects: pd.DataFrame) -> pd.DataFrame:
    """The rows of the settings whose p_bw = 0 runs overfit: their fw val loss rose after its best,
    the 95% interval of the mean rise above 0."""
    rise = effects[(effects.measure == "rise_after_best") & (effects.base_ci_low > 0)]
    return effects.merge(rise[SETTING], on=SETTING)


def _answer_measures(effects: pd.DataFrame) -> list[dict]:
    """The answer's measures (ANSWER_MEASURES, in its order) of the settings whose baselines overfit."""
    rows = overfit_arms(effects).to_dict("records")
    return sorted((row for row in rows if row["measure"] in ANSWER_MEASURES),
                  key=lambda row: list(ANSWER_MEASURES).index(row["measure"]))


def skipped(analysis: Analysis) -> list[dict]:
    """The answer's measures without an interval."""
    return [skip(f"{QUESTION}: {ANSWER_MEASURES[row['measure']]}", reason, row)
            for row in _answer_measures(analysis.overfitting) if (reason := _no_interval(row))]


def answer_rows(analysis: Analysis, leaking: set[str]) -> list[dict]:
    """Where the baselines of a leak-free setting overfit: each answer measure's paired change with its interval."""
    effects = analysis.overfitting[~analysis.overfitting.bw_mask.isin(leaking)]
    return [answer_row(QUESTION, f"{size_label(row['depth'], row['width'])}, {setting_label(row, True)}: "
                                 f"{ANSWER_MEASURES[row['measure']]}", row["unit"], row["mean_diff"],
                       (row["ci_low"], row["ci_high"]), row["n"], "seed pair", change_verdict(row))
            for row in _answer_measures(effects) if not _no_interval(row)]


def section(inputs: Inputs) -> tuple[str, list[tuple]]:
    analysis = inputs.analysis
    return (TITLE, [
        ("ul", statements(analysis)),
        ("p", "overfitting: per setting and measure, the mean over seed pairs of p_bw = x minus p_bw = 0 with its "
              "95% t interval and mde, the smallest mean change a paired t test at the 0.05 level detects with 80% "
              "power; base_ci_low / base_ci_high: the p_bw = 0 mean's own interval. best_fw_loss: the lowest "
              "validation fw loss over the run (a minimum over noisy points, biased low, more so on a long flat "
              "curve); rise_after_best: final minus best; best_epoch: the nominal epoch of the best, only over "
              "pairs where neither run is still improving at its end (x_best_at_end, base_best_at_end count those: "
              "their best epoch is censored at the budget); final_gap: final validation fw loss minus fw loss on "
              "the fixed training-split windows; *_equal_flops: the p_bw = x run within the p_bw = 0 run's "
              "training FLOPs (its best over the points that spent no more; its loss interpolated at that budget)."),
        ("table", "overfitting", analysis.overfitting),
        ("p", "run_fit: each run's best and final fw loss, best epoch and train–val gap."),
        ("table", "run_fit", analysis.run_fit),
    ])
