"""How the report writes numbers and settings in its sentences, shared by every section."""

from __future__ import annotations

import math

import pandas as pd

from fwbw.analysis.figures import variant_label


def num(value: float, digits: int = 3) -> str:
    return "NaN" if value is None or pd.isna(value) else f"{value:.{digits}f}"


def signed(value: float, digits: int = 3) -> str:
    return "NaN" if pd.isna(value) else f"{round(value, digits) + 0.0:+.{digits}f}"  # + 0.0: no "-0.000"


def setting_label(row: dict, with_variant: bool) -> str:
    label = f"p_bw = {row['p_bw']:g}"
    return label + (f" ({variant_label(row)})" if with_variant else "")


def percent(row: dict, prefix: str = "") -> str:
    """The percent change of fw loss in `row` (paired.csv's columns with `prefix`), with its interval."""
    value, low, high = (row[f"{prefix}{c}"] for c in ("pct_change", "pct_ci_low", "pct_ci_high"))
    shown = "NaN" if pd.isna(value) else f"{value:+.2f}%"
    return shown if pd.isna(low) else f"{shown} (95% CI {low:+.2f}% … {high:+.2f}%)"


def interval(row) -> str:
    """", 95% CI low … high" of a row's ci_low and ci_high, or nothing where they are undefined."""
    return "" if pd.isna(row["ci_low"]) else f", 95% CI {num(row['ci_low'])} … {num(row['ci_high'])}"


def p_text(value: float, name: str = "p") -> str:
    return f"{name} < 0.001" if value < 0.001 else f"{name} = {num(value)}"


def times(value: float) -> str:
    return "∞" if value == math.inf else f"{value:.2f}"


def capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]
