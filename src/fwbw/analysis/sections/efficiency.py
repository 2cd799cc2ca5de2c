"""Data efficiency (held-out test split), the experiment of docs/analysis-plan.md: a sentence per result
analysed (primary contrast, effective-data multiplier, Q2, dose, matched training loss), its figures, the
parts skipped with their reasons, then every table; and the primary contrast and multiplier as the answer's
rows (the primary contrast's figure leads the answer)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fwbw.analysis.efficiency_report import FIGURES, TABLE_FILES, Efficiency
from fwbw.analysis.sections.inputs import Figures, Inputs
from fwbw.analysis.sections.tables import answer_row, skip
from fwbw.analysis.sections.text import num, p_text, signed, times
from fwbw.study.estimate import plural

EFFICIENCY_TITLE = "Data efficiency (held-out test split)"
QUESTION = "data efficiency"
ANSWER_FIGURE = FIGURES[0]  # the primary contrast's paired differences: the answer's figure
EFFICIENCY_CAPTIONS = {  # figure stem -> caption
    "efficiency_paired": "The primary contrast: held-out test fw loss of the fw+bw arm minus fw alone, each dot "
                         "one seed's difference; red: their mean with its 95% t interval; dashed: 0. Below 0: bw "
                         "training lowered it.",
    "efficiency_data_curve": "Held-out test fw loss against unique training tokens (log scale): fw alone at each "
                             "share of the training articles (mean over the seeds common to every arm, bars: 95% t "
                             "interval), the fw+bw arm at its share and the other p_bw doses there (each over its "
                             "own seeds); m: the effective-data multiplier, where the fw-only curve reaches the "
                             "fw+bw arm's loss.",
}
EFFICIENCY_TABLES = {  # analyse's table -> what its rows are, shown above it
    "primary": "efficiency_primary: the pre-registered test, test_fw_loss of the first arm's setting minus the "
               "second's (suffixed _base), paired t test over seeds; mde: the smallest mean difference a paired t "
               "test at the 0.05 level detects with 80% power from the observed SD; n_censored: runs whose "
               "validation optimum was their last evaluation; flops_ratio: the first arm's training FLOPs over the "
               "second's.",
    "multiplier": "efficiency_multiplier: how many times its unique tokens fw alone needs to reach the fw+bw arm's "
                  "mean test_fw_loss, read off the fw-only curve, never extrapolated (censored low or high: "
                  "m < bound_low or m > bound_high); ci_low, ci_high: the 95% percentile interval of the seed "
                  "bootstrap (n_boot draws; a censored draw counts as 0 or inf, their shares beside); isotonic: the "
                  "curve was fit non-increasing.",
    "curve": "efficiency_curve: the points behind the multiplier, the mean test_fw_loss over the seeds common to "
             "every arm with its 95% t interval; fitted: the fw-only curve's non-increasing fit.",
    "q2": "efficiency_q2: on the whole stream, fw+bw (p_bw 1), fw+replay and fw alone, paired by seed: family q2 "
          "at one pass, q2-epochs at the other caps; p_holm: Holm-adjusted within the family.",
    "dose": "efficiency_dose: the per-seed least-squares slope of test_fw_loss on p_bw, tested over seeds "
            "(dose-slope), and each dose against p_bw 0 (dose, Holm over the doses).",
    "dose_curve": "efficiency_dose_curve: the mean test_fw_loss of each dose over its seeds, with its 95% t interval.",
    "lr_selection": "efficiency_lr: the mean validation fw loss of the selected checkpoints at each lr_scale; "
                    "chosen: the lowest (test loss plays no part).",
    "controls": "efficiency_controls: the primary contrast at each arm's validation-chosen lr_scale, each fw-only "
                "regulariser against fw alone and the fw+bw arm against it; Holm over the family.",
    "matched": "efficiency_matched: validation fw loss of fw+bw minus fw alone at equal training-split fw loss "
               "(train_split_fw_loss), Holm over the grid. Below 0: bw regularises; near 0: it only moves fw "
               "along the same curve.",
}


def _efficiency_estimate(row: dict, unit: str = "nats", p_column: str = "p_value", extra: str = "") -> str:
    """A paired row's mean difference with its 95% t interval, p-value (p_column) and seeds (CONTRAST_COLUMNS)."""
    if row["n"] == 0:
        return "no seed pair (n = 0)"
    value = f"{signed(row['mean_diff'])} {unit}"
    if pd.isna(row["ci_low"]):
        return f"{value} ({plural(row['n'], 'seed')}: no interval)"
    p_value = p_text(row[p_column], "Holm p" if p_column == "p_holm" else "p")
    return (f"{value} (95% CI {signed(row['ci_low'])} … {signed(row['ci_high'])}, {p_value}, "
            f"n = {plural(row['n'], 'seed')}{extra})")


def _primary_verdict(row: dict) -> str:
    """What the primary contrast's interval says (docs/analysis-plan.md#primary-endpoint)."""
    if row["ci_high"] < 0:
        return "bw training lowered held-out fw loss"
    if row["ci_low"] > 0:
        return "bw training raised held-out fw loss"
    if -row["mde"] < row["ci_low"] and row["ci_high"] < row["mde"]:
        return f"no effect of ±{num(row['mde'])} nats or more"
    return "inconclusive"


def primary_statement(primary: pd.DataFrame) -> str:
    """The primary contrast (efficiency_primary's row) with its interval, p, n and MDE, and the plan's verdict."""
    row = primary.iloc[0].to_dict()
    head = (f"Data efficiency, primary contrast: held-out test fw loss at p_bw {row['p_bw']:g} minus at p_bw "
            f"{row['p_bw_base']:g}, train_fraction {row['train_fraction']:g}, paired by seed")
    if pd.isna(row["ci_low"]):
        return f"{head}: {_efficiency_estimate(row)}."
    extra = f", MDE {num(row['mde'])} nats, {plural(row['n_censored'], 'censored run')}"
    return f"{head}: {_efficiency_estimate(row, extra=extra)}: {_primary_verdict(row)}."


def multiplier_statement(multiplier: pd.DataFrame) -> str:
    """The effective-data multiplier (efficiency_multiplier's row): its value or censored bound, and its interval."""
    row = multiplier.iloc[0].to_dict()
    target = f"the p_bw {row['p_bw']:g} arm's mean test fw loss {num(row['bw_mean'])}"
    if row["censored"] == "low":
        value = f"{target} is above the fw-only curve at its smallest share, so m < {times(row['bound_low'])}"
    elif row["censored"] == "high":
        value = f"{target} is below the fw-only curve at its largest share, so m > {times(row['bound_high'])}"
    else:
        value = f"fw alone needs m = {times(row['multiplier'])} times the unique tokens to reach {target}"
    if pd.isna(row["ci_low"]):
        interval = "no interval"
    else:
        shares = row["censored_low_share"], row["censored_high_share"]
        past = (f"; {shares[0]:.0%} of draws past the curve's low end, {shares[1]:.0%} past its high end"
                if any(shares) else "")
        interval = f"95% bootstrap CI {times(row['ci_low'])} … {times(row['ci_high'])}{past}"
    fit = ", the curve fit non-increasing" if row["isotonic"] else ""
    return (f"Effective-data multiplier at train_fraction {row['train_fraction']:g}: {value} ({interval}; "
            f"n = {plural(row['n_seeds'], 'seed')}, {row['n_fractions']} fw-only shares{fit}).")


def _flops(row: dict) -> str:
    return f", FLOPs ratio {num(row['flops_ratio'], 2)}"


def q2_statement(q2: pd.DataFrame) -> str:
    """Q2's three contrasts at one pass (efficiency_q2's family q2), each with its Holm-adjusted p."""
    one_pass = q2[q2.family == "q2"]
    clauses = [f"{row['contrast']} {_efficiency_estimate(row, p_column='p_holm', extra=_flops(row))}"
               for row in one_pass.to_dict("records")]
    return (f"Q2, one pass over the whole stream, held-out test fw loss paired by seed (Holm over "
            f"{one_pass.p_value.notna().sum()}): {'; '.join(clauses)}.")


def dose_slope_statement(dose: pd.DataFrame) -> str:
    """The dose model's slope (efficiency_dose's row of family dose-slope) with its interval."""
    row = dose[dose.family == "dose-slope"].iloc[0].to_dict()
    return (f"Dose response at train_fraction {row['train_fraction']:g}, the per-seed least-squares {row['contrast']} "
            f"of held-out test fw loss: {_efficiency_estimate(row, unit=row['unit'])}.")


def matched_statement(matched: pd.DataFrame) -> str:
    """Validation fw loss of fw+bw minus fw at equal training-split fw loss (efficiency_matched), each grid
    value with its Holm-adjusted p: below 0, bw regularises; near 0, it moves fw along the same curve."""
    clauses = [f"at {num(row['train_split_fw_loss'])} {_efficiency_estimate(row, p_column='p_holm')}"
               for row in matched.to_dict("records")]
    return (f"Regulariser test, validation fw loss of fw+bw minus fw at the same training-split fw loss "
            f"(Holm over {matched.p_value.notna().sum()}; below 0 would mean bw regularises): {'; '.join(clauses)}.")


EFFICIENCY_STATEMENTS = (("primary", primary_statement), ("multiplier", multiplier_statement), ("q2", q2_statement),
                         ("dose", dose_slope_statement), ("matched", matched_statement))  # led by a sentence, in order


def efficiency_statements(tables: dict[str, pd.DataFrame]) -> list[str]:
    """One sentence per result analysed (EFFICIENCY_STATEMENTS); a skipped part has none: the skipped table
    says why."""
    return [say(tables[name]) for name, say in EFFICIENCY_STATEMENTS if len(tables[name])]


def efficiency_lead(efficiency: Efficiency, figures: list[Path]) -> list[tuple]:
    """The section's first blocks: a sentence per result, the figures, and the parts skipped with their reasons."""
    skipped = efficiency.tables["skipped"]
    drawn = [("figures", [(path, EFFICIENCY_CAPTIONS[path.stem]) for path in figures])] if figures else []
    listed = [("p", f"Parts not analysed, and why ({TABLE_FILES['skipped']}):"),
              ("table", TABLE_FILES["skipped"], skipped)] if len(skipped) else []
    return [("ul", efficiency_statements(efficiency.tables)), *drawn, *listed]


def answer_figures(inputs: Inputs) -> Figures:
    """The primary contrast's figure, where it was drawn: it leads the answer."""
    return [(path, EFFICIENCY_CAPTIONS[path.stem]) for path in inputs.efficiency_figures if path.stem == ANSWER_FIGURE]


def section(inputs: Inputs) -> tuple[str, list[tuple]] | None:
    """efficiency_lead (without the answer's figure), then every table; none without data-efficiency arms."""
    if inputs.efficiency is None:
        return None
    tables = [block for name, text in EFFICIENCY_TABLES.items()
              for block in (("p", text), ("table", TABLE_FILES[name], inputs.efficiency.tables[name]))]
    figures = [path for path in inputs.efficiency_figures if path.stem != ANSWER_FIGURE]
    return (EFFICIENCY_TITLE, [*efficiency_lead(inputs.efficiency, figures),
                               ("p", "Analysed as pre-registered in docs/analysis-plan.md."), *tables])


def _multiplier_verdict(row: dict) -> str:
    if row["ci_low"] > 1:
        return "bw training acted like more unique data"
    if row["ci_high"] < 1:
        return "bw training acted like less unique data"
    return "no resolvable effect"


def _primary(row: dict) -> tuple[str, str | None, dict]:
    """The primary contrast (efficiency_primary's row): what it compares, why it has no answer (or None), its row."""
    where = (f"held-out test fw loss, p_bw {row['p_bw']:g} − p_bw {row['p_bw_base']:g} at train_fraction "
             f"{row['train_fraction']:g}")
    reason = f"{plural(row['n'], 'seed pair')}, no interval" if pd.isna(row["ci_low"]) else None
    return where, reason, answer_row(QUESTION, where, "nats", row["mean_diff"], (row["ci_low"], row["ci_high"]),
                                     row["n"], "seed", "" if reason else _primary_verdict(row))


def _multiplier(row: dict) -> tuple[str, str | None, dict]:
    """The effective-data multiplier (efficiency_multiplier's row), as _primary."""
    where = f"effective-data multiplier of p_bw {row['p_bw']:g} at train_fraction {row['train_fraction']:g}"
    bound = {"low": f"m < {times(row['bound_low'])}", "high": f"m > {times(row['bound_high'])}"}.get(row["censored"])
    reason = (f"{bound}, outside the fw-only curve" if bound else
              f"{plural(row['n_seeds'], 'seed')}, no interval" if pd.isna(row["ci_low"]) else None)
    return where, reason, answer_row(QUESTION, where, "×", row["multiplier"], (row["ci_low"], row["ci_high"]),
                                     row["n_seeds"], "seed", "" if reason else _multiplier_verdict(row))


def _outcomes(inputs: Inputs) -> list[tuple[str, str | None, dict]]:
    if inputs.efficiency is None:
        return []
    tables = inputs.efficiency.tables
    return [*map(_primary, tables["primary"].to_dict("records")), *map(_multiplier, tables["multiplier"].to_dict("records"))]


def answer_rows(inputs: Inputs) -> list[dict]:
    """The primary contrast and the effective-data multiplier, each with its interval."""
    return [row for _, reason, row in _outcomes(inputs) if not reason]


def skipped(inputs: Inputs) -> list[dict]:
    """The primary contrast or multiplier without an interval (the other parts: efficiency_skipped)."""
    return [skip(QUESTION, f"{where}: {reason}") for where, reason, _ in _outcomes(inputs) if reason]
