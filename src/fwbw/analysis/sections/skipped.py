"""Not analysed, and why: every part of the report (a question, an epoch window, a measure) left without a
value for a setting, or as a whole, with its reason, in one table (skipped.csv) instead of the text."""

from __future__ import annotations

import pandas as pd

from fwbw.analysis.figures import arm_label, size_label
from fwbw.analysis.sections import answer, arrow
from fwbw.analysis.sections.inputs import Inputs, finished
from fwbw.analysis.sections.render import cell
from fwbw.analysis.sections.tables import SKIPPED_COLUMNS, SKIPPED_TITLE
from fwbw.analysis.stats import CONTEXT

INTRO = ("Parts of the report not analysed, each with its reason: for one setting, or as a whole where the "
         "setting is blank. part: the answer's question (or an epoch window, measure or section of it). Settings "
         "not compared include those without a p_bw = 0 run sharing their data, tokenizer, seq_len, training "
         "budget, recipe, size, task tokens and heads.")


def skipped_table(inputs: Inputs) -> pd.DataFrame:
    """skipped.csv (tables.SKIPPED_COLUMNS): the questions' skipped rows in the answer's order, then the
    sections'."""
    rows = [row for _, _, skipped in answer.questions(inputs) for row in skipped]
    sections = arrow.skipped(inputs.analysis) if finished(inputs.analysis) else []
    return pd.DataFrame(rows + sections, columns=SKIPPED_COLUMNS)


def _setting(row: dict, varying: list[str]) -> str:
    """A skipped row's setting in words: its size, arm (or bw mask alone) and the context columns that vary."""
    size = [size_label(int(row["depth"]), int(row["width"]))] if pd.notna(row["depth"]) else []
    arm = [arm_label(row)] if pd.notna(row["p_bw"]) else [f"{row['bw_mask']} mask"] if pd.notna(row["bw_mask"]) else []
    context = [f"{c} {cell(row[c])}" for c in varying if pd.notna(row[c])]
    return ", ".join([*size, *arm, *context])


def display(table: pd.DataFrame) -> pd.DataFrame:
    """skipped.csv as the report shows it: part, the setting in words, reason."""
    varying = [c for c in CONTEXT if table[c].nunique() > 1]
    rows = [(row["part"], _setting(row, varying), row["reason"]) for row in table.to_dict("records")]
    return pd.DataFrame(rows, columns=["part", "setting", "reason"])


def section(table: pd.DataFrame) -> tuple[str, list[tuple]] | None:
    """The skipped table (skipped_table); none where every part was analysed."""
    return None if table.empty else (SKIPPED_TITLE, [("p", INTRO), ("table", "skipped", display(table), "text")])
