"""Equal compute: fw loss at the same training FLOPs. Ratio 1 and the percent change of fw loss where each
seed pair's run with less compute ended, the loss curves over FLOPs and the ratios over FLOPs and seconds;
the settings without a comparison go to the skipped table."""

from __future__ import annotations

import pandas as pd

from fwbw.analysis.figures import size_label
from fwbw.analysis.sections.equal_data import pair_reason, percent_verdict, with_baseline
from fwbw.analysis.sections.figure_blocks import shown
from fwbw.analysis.sections.inputs import Inputs, with_variant
from fwbw.analysis.sections.tables import answer_row, skip
from fwbw.analysis.sections.text import interval, num, percent, setting_label
from fwbw.analysis.stats import SETTING, Analysis, select
from fwbw.study.results import CUT_PHASE

TITLE = "Equal compute: fw loss at the same training FLOPs"
QUESTION = "equal compute"


def _flops_ratio(ratios: pd.DataFrame, row: dict) -> pd.Series:
    """ratios.csv's ratio 1 (fw loss) at equal training FLOPs of the setting of paired.csv's `row`."""
    return select(ratios, {**{k: row[k] for k in SETTING}, "ratio": "ratio1", "metric": "loss", "phase": "final",
                           "axis": "flops", "averaging": "ratio_then_mean"}).iloc[0]


def _compared(analysis: Analysis) -> list[tuple[dict, pd.Series]]:
    """Each paired.csv row with its ratio 1 at equal FLOPs."""
    return [(row, _flops_ratio(analysis.ratios, row)) for row in analysis.paired.to_dict("records")]


def _statement(row: dict, ratio: pd.Series, variant: bool) -> str:
    """Ratio 1 of final fw loss and its percent change at equal training FLOPs: each seed pair compared
    where the run with less compute ended."""
    where = f"At equal training FLOPs, {size_label(row['depth'], row['width'])}, {setting_label(row, variant)}"
    return (f"{where} (each seed pair where the run with less compute ended): ratio 1 of fw loss "
            f"{num(ratio['value'])} (n = {ratio['n']} seed pairs{interval(ratio)}); fw loss changed by "
            f"{percent(row, 'flops_')}.")


def _reason(row: dict, ratio: pd.Series) -> str | None:
    if row["adaptive_p_bw"]:
        return "adaptive p_bw: its training FLOPs are unknown (compared at equal epochs and seconds only)"
    if ratio["n"] == 0:
        return "no seed pair whose training FLOPs overlap"
    return pair_reason(ratio["n"], row["flops_pct_ci_low"])


def statements(analysis: Analysis) -> list[str]:
    variant = with_variant(analysis.paired)
    return [_statement(row, ratio, variant) for row, ratio in _compared(analysis) if ratio["n"] > 0]


def skipped(analysis: Analysis) -> list[dict]:
    """The settings with p_bw = 0 runs to compare with but no comparison at equal FLOPs, or no interval."""
    return [skip(QUESTION, reason, row) for row in with_baseline(analysis)
            if (reason := _reason(row, _flops_ratio(analysis.ratios, row)))]


def answer_rows(analysis: Analysis, leaking: set[str]) -> list[dict]:
    """The percent change of fw loss at equal FLOPs of every leak-free setting with an interval."""
    return [answer_row(QUESTION, f"{size_label(row['depth'], row['width'])}, {setting_label(row, True)}: fw loss "
                                 "at equal FLOPs", "%", row["flops_pct_change"],
                       (row["flops_pct_ci_low"], row["flops_pct_ci_high"]), ratio["n"], "seed pair",
                       percent_verdict(row["flops_pct_ci_low"], row["flops_pct_ci_high"]))
            for row, ratio in _compared(analysis) if row["bw_mask"] not in leaking and not _reason(row, ratio)]


def section(inputs: Inputs) -> tuple[str, list[tuple]]:
    ratios = inputs.analysis.ratios
    return (TITLE, [
        ("ul", statements(inputs.analysis)), *shown(inputs, "equal_compute"),
        ("p", "Final and epoch-window ratios over training FLOPs and wall-clock seconds."),
        ("table", "ratios_compute", ratios[(ratios.phase != CUT_PHASE) & ratios.axis.isin(["flops", "seconds"])]),
    ])
