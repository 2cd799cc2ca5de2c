"""The rows of the report's own tables: the answer (one row per question and setting, answer.csv) and what
was not analysed (one row per part and setting with its reason, skipped.csv)."""

from __future__ import annotations

import pandas as pd

from fwbw.analysis.stats import SETTING

SKIPPED_TITLE = "Not analysed, and why"
# effect: the change with bw training (or the ratio / slope / multiplier a question reads) in `unit`, with its
# 95% interval; n counts n_unit (seeds, seed pairs, runs)
ANSWER_COLUMNS = ["question", "comparison", "unit", "effect", "ci_low", "ci_high", "n", "n_unit", "verdict"]
SKIPPED_COLUMNS = ["part", *SETTING, "reason"]


def answer_row(question: str, comparison: str, unit: str, effect: float, ci: tuple[float, float], n: int,
               n_unit: str, verdict: str) -> dict:
    return {"question": question, "comparison": comparison, "unit": unit, "effect": effect, "ci_low": ci[0],
            "ci_high": ci[1], "n": n, "n_unit": n_unit, "verdict": verdict}


def skip(part: str, reason: str, setting: dict | None = None) -> dict:
    """A skipped table's row: `part` of the report not analysed for `setting` (its SETTING values; none for a
    whole part), and why."""
    return {"part": part, **{c: (setting or {}).get(c) for c in SETTING}, "reason": reason}


def answer_frame(rows: list[dict]) -> pd.DataFrame:
    """answer.csv's rows as a table, n as whole numbers (missing in a row that measured nothing)."""
    return pd.DataFrame(rows, columns=ANSWER_COLUMNS).astype({"n": "Int64"})
