"""Layer cut: ratio 1 (ppl) and ratio 2 (loss) as transformer blocks are removed from the back, from all
blocks to one, per setting, with its figure and the cut's ratios."""

from __future__ import annotations

import pandas as pd

from fwbw.analysis.figures import ratio_label, size_label
from fwbw.analysis.sections.figure_blocks import shown
from fwbw.analysis.sections.inputs import Inputs, with_variant
from fwbw.analysis.sections.render import cell
from fwbw.analysis.sections.text import num, setting_label
from fwbw.analysis.stats import CONTEXT, CUT_RATIOS, SETTING, Analysis, select
from fwbw.study.results import CUT_PHASE

TITLE = "Layer cut"


def _cut_statement(cut: pd.DataFrame, setting: dict, variant: bool, varying: list[str]) -> str | None:
    """The CUT_RATIOS, mean_then_ratio, with all blocks and with one block left, for one SETTING (named
    with the `varying` CONTEXT columns, those that tell the settings of one size and arm apart)."""
    rows = select(cut, {**setting, "averaging": "mean_then_ratio"})
    ends = {}
    for ratio, metric in CUT_RATIOS:
        line = select(rows, {"ratio": ratio, "metric": metric}).set_index("blocks_remaining").value
        if {setting["depth"], 1} <= set(line.index) and setting["depth"] > 1:
            ends[ratio_label(ratio, metric)] = (line[setting["depth"]], line[1])
    if not ends:
        return None
    text = ", ".join(f"{label} {num(full)} → {num(one)}" for label, (full, one) in ends.items())
    context = "".join(f", {column} {cell(setting[column])}" for column in varying if pd.notna(setting[column]))
    where = f"{size_label(setting['depth'], setting['width'])}, {setting_label(setting, variant)}{context}"
    return f"Layer cut at {where}, from all {setting['depth']} blocks to 1 block left (mean_then_ratio): {text}."


def statements(analysis: Analysis) -> list[str]:
    cut, paired = analysis.ratios[analysis.ratios.phase == CUT_PHASE], analysis.paired
    settings = paired[SETTING].drop_duplicates()
    varying = [column for column in CONTEXT if settings[column].nunique(dropna=False) > 1]
    said = (_cut_statement(cut, row, with_variant(paired), varying) for row in settings.to_dict("records"))
    return [s for s in said if s]


def section(inputs: Inputs) -> tuple[str, list[tuple]]:
    ratios = inputs.analysis.ratios
    return (TITLE, [
        ("ul", statements(inputs.analysis)), *shown(inputs, "layer_cut"),
        ("table", "ratios_cut", ratios[ratios.phase == CUT_PHASE]),
    ])
