"""Arrow of time: fw against bw. Where a setting trains both tasks equally, the fw − bw final loss gap over
seeds (below 0: fw is the easier direction), a leaking mask called out."""

from __future__ import annotations

import pandas as pd

from fwbw.analysis.figures import arm_label, size_label
from fwbw.analysis.sections.inputs import Inputs, leaking_masks
from fwbw.analysis.sections.tables import skip
from fwbw.analysis.sections.text import signed
from fwbw.analysis.stats import Analysis

TITLE = "Arrow of time: fw against bw"
PART = "arrow of time"


def _arrow_statement(row: dict, leaking: set[str]) -> str:
    """The fw − bw final loss gap of one setting that trains both tasks equally (arrow_of_time.csv's row)."""
    where = f"fw − bw final loss gap at {size_label(row['depth'], row['width'])}, {arm_label(row)}"
    if pd.isna(row["gap_ci_low"]):
        interval = f"n = {row['n']} seed: no interval"
    else:
        interval = f"95% CI {signed(row['gap_ci_low'])} … {signed(row['gap_ci_high'])}, n = {row['n']} seeds"
    text = f"{where}: {signed(row['gap_mean'])} ({interval}). Below 0: fw is the easier direction."
    if row["bw_mask"] in leaking:
        return text + " This mask leaks the bw labels (mask audit): the gap measures the leak, not the arrow of time."
    return text


def statements(analysis: Analysis) -> list[str]:
    leaking = leaking_masks(analysis.mask_summary)
    return [_arrow_statement(row, leaking) for row in analysis.arrow_of_time.to_dict("records")]


def skipped(analysis: Analysis) -> list[dict]:
    if len(analysis.arrow_of_time):
        return []
    return [skip(PART, "no setting trains both tasks equally (add at p_bw = 1, either at p_bw = 0.5)")]


def section(inputs: Inputs) -> tuple[str, list[tuple]]:
    analysis = inputs.analysis
    return (TITLE, [
        ("ul", statements(analysis)),
        ("p", "arrow_of_time: where a setting trains both tasks equally (add at p_bw = 1, either at p_bw = "
              "0.5), the mean over seeds of the final fw − bw loss gap with its 95% t interval."),
        *([("table", "arrow_of_time", analysis.arrow_of_time)] if len(analysis.arrow_of_time) else []),
    ])
