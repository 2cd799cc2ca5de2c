"""Scaling with model size and the power of the seeds: the slope of ln ratio 1 (fw loss) on ln parameter
count per setting, the paired t tests per size with their Holm adjustment, and what the seeds can detect."""

from __future__ import annotations

import pandas as pd

from fwbw.analysis.effects import ALPHA, POWER, TREND_GROUP
from fwbw.analysis.figures import size_label
from fwbw.analysis.sections.figure_blocks import shown
from fwbw.analysis.sections.inputs import Inputs, with_variant
from fwbw.analysis.sections.tables import answer_row, skip
from fwbw.analysis.sections.text import num, setting_label, signed
from fwbw.analysis.stats import Analysis, select

TITLE = "Scaling with model size and the power of the seeds"
QUESTION = "model size"


def _trend_statement(row: dict, variant: bool) -> str:
    """The scaling trend of one TREND_GROUP with a slope (scaling.csv's row) and its interval, or why none."""
    head = f"Scaling of ratio 1 (fw loss) with model size, {setting_label(row, variant)}"
    counts = f"n = {row['n_pairs']} seed pairs over {row['n_sizes']} model size(s)"
    slope = f"slope of ln ratio 1 on ln parameter count {signed(row['slope'], 4)}"
    interval = (f"no interval: {row['reason']}" if pd.isna(row["slope_ci_low"]) else
                f"95% CI {signed(row['slope_ci_low'], 4)} … {signed(row['slope_ci_high'], 4)}, "
                f"p = {num(row['p_value'])}")
    return f"{head}: {slope} ({interval}; {counts}). Above 0: the bw task helps fw more at larger sizes."


def _holm_statements(tests: pd.DataFrame, variant: bool) -> list[str]:
    """Per TREND_GROUP with a paired t test at 2 sizes or more: each size's p and Holm-adjusted p."""
    out = []
    tested = tests.dropna(subset=["p_value"])
    for group in tested[TREND_GROUP].drop_duplicates().to_dict("records"):
        rows = select(tested, group)
        if len(rows) < 2:
            continue
        sizes = "; ".join(f"{size_label(r['depth'], r['width'])} p = {num(r['p_value'])} (Holm {num(r['p_holm'])})"
                          for r in rows.to_dict("records"))
        out.append(f"Paired t tests of final fw loss at p_bw = x against p_bw = 0, {setting_label(group, variant)}, "
                   f"Holm-adjusted over {len(rows)} model sizes: {sizes}.")
    return out


def _verdict(row: dict) -> str:
    if row["slope_ci_low"] > 0:
        return "bw training helps fw more (or hurts less) at larger sizes"
    if row["slope_ci_high"] < 0:
        return "bw training helps fw less (or hurts more) at larger sizes"
    return "no resolvable trend with size"


def statements(analysis: Analysis) -> list[str]:
    variant = with_variant(analysis.paired)
    trends = [_trend_statement(row, variant) for row in analysis.scaling.to_dict("records") if pd.notna(row["slope"])]
    return [*trends, *_holm_statements(analysis.size_tests, variant)]


def skipped(analysis: Analysis) -> list[dict]:
    """The settings without a slope or without its interval."""
    return [skip(QUESTION, row["reason"], row) for row in analysis.scaling.to_dict("records")
            if pd.isna(row["slope_ci_low"])]


def answer_rows(analysis: Analysis, leaking: set[str]) -> list[dict]:
    """The slope of every leak-free setting with an interval."""
    return [answer_row(QUESTION, f"{setting_label(row, True)}: slope of ln ratio 1 (fw loss) on ln parameter count, "
                                 f"{row['n_sizes']} sizes", "slope", row["slope"],
                       (row["slope_ci_low"], row["slope_ci_high"]), row["n_pairs"], "seed pair", _verdict(row))
            for row in analysis.scaling.to_dict("records")
            if row["bw_mask"] not in leaking and pd.notna(row["slope_ci_low"])]


def section(inputs: Inputs) -> tuple[str, list[tuple]]:
    analysis = inputs.analysis
    return (TITLE, [
        ("ul", statements(analysis)), *shown(inputs, "scaling"),
        ("p", "scaling: per setting but its size, the least-squares line of each seed pair's ln ratio 1 (fw "
              "loss) on ln parameter count, with the slope's 95% t interval (none below 3 seed pairs or 2 sizes)."),
        ("table", "scaling", analysis.scaling),
        ("p", "size_tests: per setting, the paired t test of final fw loss at p_bw = x minus at p_bw = 0; "
              "p_holm: its p-value Holm-adjusted over the sizes of one scaling line."),
        ("table", "size_tests", analysis.size_tests),
        ("p", f"power: the smallest mean change of final fw loss (mde_loss; mde_percent of the p_bw = 0 mean) "
              f"that a paired t test at the {ALPHA:g} level detects with {POWER:.0%} power from these seeds' "
              "paired SD; correlation: of the two arms' final fw losses over the same seeds (3 pairs or more)."),
        ("table", "power", analysis.power),
    ])
