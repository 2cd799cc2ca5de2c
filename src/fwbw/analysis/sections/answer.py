"""The answer: one table, one row per question and setting (data efficiency, many epochs, equal data, equal
compute, model size, bw leak, retrieval; where the sweep has them), each with its effect, 95% interval, n
and verdict in plain words; a few short sentences below it and the answer's figures. Settings without an
answer go to the skipped table, and so does a question none of whose settings has one."""

from __future__ import annotations

import math

import pandas as pd

from fwbw.analysis.retrieval_stats import MEASURE
from fwbw.analysis.sections import efficiency, equal_compute, equal_data, many_epochs, mask, retrieval, scaling
from fwbw.analysis.sections.figure_blocks import figure_block
from fwbw.analysis.sections.inputs import Inputs, finished, leaking_masks
from fwbw.analysis.sections.runs import no_statistics, status_statement
from fwbw.analysis.sections.tables import SKIPPED_TITLE, answer_frame, skip
from fwbw.analysis.sections.text import num, signed
from fwbw.analysis.stats import Analysis
from fwbw.study.estimate import plural

TITLE = "The answer"
DISPLAY_COLUMNS = ["question", "comparison", "effect", "95% interval", "n", "verdict"]
UNITS = {"%": (2, True, "%"), "nats": (3, True, ""), "epochs": (2, True, ""), "slope": (4, True, ""),
         "ratio": (2, False, ""), "×": (2, False, "×"), MEASURE: (3, True, "")}  # answer.csv's unit -> digits, sign, suffix
NAMED_UNITS = ("nats", "epochs")  # written after the effect
GUIDE = ("Effect: what bw training changed, p_bw > 0 against p_bw = 0 paired by seed, with its 95% interval; settings "
         "whose bw mask leaks are left out. The numbers: answer.csv.")


STUDY = (many_epochs, equal_data, equal_compute, scaling, mask)  # the fw/bw study's questions, in the answer's order
Answered = tuple[str, list[dict], list[dict]]  # a question's label, its answer rows, its skipped rows


def _absent(analysis: Analysis) -> str:
    """Why a study question of a sweep with finished runs has neither an answer row nor a setting skipped: no
    setting to compare, or else (many epochs, whose rows are those of the overfitting baselines) no overfitting."""
    if analysis.final.empty:
        return "every finished run was left out as diverged (a non-finite validation loss)"
    if not analysis.arms:
        return "no p_bw > 0 setting among the finished runs"
    if not equal_data.with_baseline(analysis):
        return "no p_bw > 0 setting has p_bw = 0 runs to compare with"
    return "no p_bw = 0 run overfits (its fw val loss never rose after its best beyond seed noise)"


def _study(analysis: Analysis, module) -> Answered:
    """A study question (a STUDY module: its QUESTION, answer_rows and skipped) with the leak-free settings'
    rows; without one, no row: its settings' skipped rows say why, or one skipped row says why the whole
    question is (every measured setting leaks, or _absent)."""
    label = module.QUESTION
    if not finished(analysis):
        return label, [], [skip(label, "no run has finished")]
    rows, skipped = module.answer_rows(analysis, leaking_masks(analysis.mask_summary)), module.skipped(analysis)
    if rows:
        return label, rows, skipped
    if module.answer_rows(analysis, set()):
        return label, [], [*skipped, skip(label, "every compared setting's bw mask leaks its labels")]
    return label, [], skipped or [skip(label, _absent(analysis))]


def _extra(inputs: Inputs, module) -> Answered:
    """A question of the sweep's other experiments (efficiency, retrieval), where the sweep has it."""
    return module.QUESTION, module.answer_rows(inputs), module.skipped(inputs)


def questions(inputs: Inputs) -> list[Answered]:
    """Every question, in the answer's order: data efficiency, the study's, retrieval."""
    return [_extra(inputs, efficiency), *(_study(inputs.analysis, m) for m in STUDY), _extra(inputs, retrieval)]


def answer_table(inputs: Inputs) -> pd.DataFrame:
    """answer.csv: the rows of every question (tables.ANSWER_COLUMNS), in the answer's order."""
    return answer_frame([row for _, rows, _ in questions(inputs) for row in rows])


def _value(value: float, unit: str) -> str:
    """A number of answer.csv in its unit (UNITS), ∞ where infinite (a censored bootstrap draw)."""
    if math.isinf(value):
        return "∞"
    digits, sign, suffix = UNITS[unit]
    return (signed(value, digits) if sign else num(value, digits)) + suffix


def _effect(row: dict) -> str:
    if pd.isna(row["effect"]):
        return ""
    return _value(row["effect"], row["unit"]) + (f" {row['unit']}" if row["unit"] in NAMED_UNITS else "")


def _interval(row: dict) -> str:
    return "" if pd.isna(row["ci_low"]) else f"{_value(row['ci_low'], row['unit'])} … {_value(row['ci_high'], row['unit'])}"


def display(table: pd.DataFrame) -> pd.DataFrame:
    """answer.csv as the report shows it (DISPLAY_COLUMNS): each number in its unit, the interval as one cell."""
    rows = [(row["question"], row["comparison"], _effect(row), _interval(row),
             "" if pd.isna(row["n"]) else plural(int(row["n"]), row["n_unit"]), row["verdict"])
            for row in table.to_dict("records")]
    return pd.DataFrame(rows, columns=DISPLAY_COLUMNS)


def sentences(inputs: Inputs, skipped_rows: int) -> list[str]:
    """The short sentences below the table: how to read it, the retrieval answer, the runs' status and where
    the skipped parts are listed."""
    if not finished(inputs.analysis) and inputs.efficiency is None:
        return [no_statistics(inputs.analysis.runs)]
    listed = [f"Not analysed: {plural(skipped_rows, 'row')}, each with its reason, under “{SKIPPED_TITLE}” "
              "(skipped.csv)."] if skipped_rows else []
    return [GUIDE, *retrieval.answer_sentences(inputs), status_statement(inputs.analysis.runs), *listed]


def section(inputs: Inputs, table: pd.DataFrame, skipped_rows: int) -> tuple[str, list[tuple]]:
    """The answer table (answer_table) first where it has rows, then the sentences and the answer's figures."""
    shown = [("table", "answer", display(table), "answer")] if len(table) else []
    figures = [*efficiency.answer_figures(inputs), *inputs.figures.get("answer", [])]
    return (TITLE, [*shown, ("ul", sentences(inputs, skipped_rows)), *figure_block(figures, "answer")])
