"""The report of a sweep: setup, plain findings with their numbers, tables, figures, mask audit, the
runs that did not finish, and the data-efficiency experiment's analysis where the sweep has its arms.
Writes report.html (self-contained: figures as base64 data URIs, inline CSS), report.md (figures linked
from figures/), the figures, and the tables as CSV."""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fwbw.analysis.effects import ALPHA, POWER, TREND_GROUP
from fwbw.analysis.efficiency_report import (
    TABLE_FILES,
    Efficiency,
    efficiency_analysis,
    read_runs,
    write_efficiency,
)
from fwbw.analysis.figures import (
    arm_groups,
    arm_label,
    make_figures,
    ratio_label,
    size_label,
    variant_label,
    window_label,
)
from fwbw.analysis.overfitting import MEASURES
from fwbw.analysis.retrieval_stats import (
    ANSWER_ORDER,
    CONTROL,
    RetrievalAnalysis,
    answer_rows,
    sweep_retrieval,
)
from fwbw.analysis.stats import (
    ARM,
    CONTEXT,
    CUT_RATIOS,
    DEFAULT_WINDOWS,
    SETTING,
    SIZE,
    VARIANT,
    Analysis,
    Arm,
    EpochWindow,
    Window,
    geometric_mean,
    log_ratio_ci,
    seed_means,
    select,
)
from fwbw.analysis.sweep_analysis import analyse
from fwbw.files import atomic_write, atomic_write_text
from fwbw.study.estimate import plural
from fwbw.study.results import CUT_PHASE
from fwbw.study.sweep_dir import (
    RESULTS_CSV,
    RESULTS_PARQUET,
    RUNS,
    SWEEP_FILE,
    read_sweep,
)
from fwbw.training.run_dir import SAMPLES

LEAK_RATIO = 0.8  # bw/fw final loss below this: bw far easier than fw (leak-free bw is within a few % of fw)

CAPTIONS = {
    "loss_curves": "Validation loss and accuracy over nominal epochs, p_bw = 0 against p_bw = x; line: mean over "
                   "seeds, band: min–max.",
    "compute_curves": "fw validation loss over training FLOPs (bw steps cost FLOPs too), p_bw = 0 against "
                      "p_bw = x; line: mean over seeds, band: min–max. At equal compute, lower is better.",
    "ratio1_curves": "Ratio 1 (fw loss at p_bw = 0 / at p_bw = x) over nominal epochs and over fw tokens seen, per "
                     "model size; line: mean over seeds, band: its 95% t interval. Above 1: the bw task helped.",
    "ratio1_violins": "Ratio 1 (fw loss at p_bw = 0 / at p_bw = x) at every validation point, by parameter count, "
                      "by depth and by width, per epoch window; red bar: mean, white dot: median. Above 1: the bw "
                      "task helped the fw task.",
    "layer_cut": "Ratio 1 (ppl) and ratio 2 (loss) over the fraction of depth remaining as transformer blocks are "
                 "removed from the back; band: 95% interval over seeds; dashed: the p_bw = 0 runs' ratio 2.",
    "ratio1_scatter": "Ratio 1 of final fw loss against parameter count, coloured by width and by depth.",
    "overfitting": "fw loss over epochs on validation and on the fixed training-split windows, and validation fw "
                   "loss over training FLOPs; line: mean over seeds, band: its 95% t interval, dot: the lowest mean "
                   "validation loss; each panel shows a fixed span of loss above its lowest mean (the first epochs are cut "
                   "off). Bands are over runs, not paired by seed: the overfitting table's intervals are. Where "
                   "validation rises while the training split falls, the model memorises.",
}
RUN_COLUMNS = ["run_id", *CONTEXT, *SIZE, "num_params", *ARM, "seed", "status", "tokens", "epoch", "seconds", "error"]
CSV_TABLES = ("ratios", "ratio1_samples", "ratio1_curves", "final_losses", "paired", "skipped", "mask_audit", "runs",
              "scaling", "size_tests", "power", "arrow_of_time", "run_fit", "overfitting", "fit_curves")  # Analysis fields
RETRIEVAL_TABLES = ("retrieval_comparisons", "retrieval_systems")  # written when the sweep has retrieval results
COLLAPSE_ROWS = 12  # a longer table is shown collapsed (complete in its CSV)
TABLE_CSV = {"ratios_compute": "ratios", "ratios_cut": "ratios"}  # HTML table id -> its CSV, where they differ

CSS = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
h1, h2, h3 { line-height: 1.2; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 13px; margin: .5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; } th { background: #f2f2f2; }
.scroll { overflow-x: auto; } figure { margin: 0; } img { width: 100%; height: auto; }
.figures { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(100%, 520px), 1fr)); gap: 1.5em 2em;
           margin: 1em 0 1.5em; }
figcaption { color: #555; font-size: 13px; } li { margin: .35em 0; }
table.text td, table.text th { text-align: left; vertical-align: top; min-width: 12em; }
"""


# ----------------------------------------------------------------------------- inputs

def read_results(sweep_dir: Path) -> pd.DataFrame:
    """The sweep's tidy results table: results.parquet, else results.csv."""
    parquet = Path(sweep_dir) / RESULTS_PARQUET
    return pd.read_parquet(parquet) if parquet.exists() else pd.read_csv(Path(sweep_dir) / RESULTS_CSV)


def sweep_setup(sweep_dir: Path) -> dict:
    """The setup described by sweep.json (its "setup" entry), or {} when there is none."""
    exists = (Path(sweep_dir) / SWEEP_FILE).exists()
    return read_sweep(sweep_dir).get("setup", {}) if exists else {}


# ----------------------------------------------------------------------------- text

def _num(value: float, digits: int = 3) -> str:
    return "NaN" if value is None or pd.isna(value) else f"{value:.{digits}f}"


def _signed(value: float, digits: int = 3) -> str:
    return "NaN" if pd.isna(value) else f"{round(value, digits) + 0.0:+.{digits}f}"  # + 0.0: no "-0.000"


def _setting_label(row: dict, with_variant: bool) -> str:
    label = f"p_bw = {row['p_bw']:g}"
    return label + (f" ({variant_label(row)})" if with_variant else "")


def _percent(row: dict, prefix: str = "") -> str:
    """The percent change of fw loss in `row` (paired.csv's columns with `prefix`), with its interval."""
    value, low, high = (row[f"{prefix}{c}"] for c in ("pct_change", "pct_ci_low", "pct_ci_high"))
    shown = "NaN" if pd.isna(value) else f"{value:+.2f}%"
    return shown if pd.isna(low) else f"{shown} (95% CI {low:+.2f}% … {high:+.2f}%)"


def _detectable(power: dict) -> str:
    """The smallest change of final fw loss the setting's seed pairs detect (power.csv's row)."""
    return (f"; these {power['n']} seeds could only detect a change of ±{_num(power['mde_loss'])} "
            f"({power['mde_percent']:.2f}%) with a paired t test at the {ALPHA:g} level and {POWER:.0%} power")


def _correlation(power: dict) -> str:
    if pd.isna(power["correlation"]):
        return ""
    return (f" Same-seed runs' final fw losses correlate across the two arms with r = {power['correlation']:.2f} "
            f"(n = {power['n']} seed pairs): pairing removes that shared seed noise.")


def _paired_statement(row: dict, with_variant: bool, power: dict) -> str:
    """The paired comparison of one setting (paired.csv's row) with what its seeds can detect (power.csv's)."""
    where = f"At {size_label(row['depth'], row['width'])}, {_setting_label(row, with_variant)}"
    if row["n"] == 0:
        return f"{where}: no seed has both a p_bw = 0 and a p_bw = {row['p_bw']:g} run: no paired comparison."
    change = f"{where} changed final fw loss by {_signed(row['mean_diff'])}"
    percent = f"; as a percent change of fw loss: {_percent(row)}."
    if pd.isna(row["exceeds_noise"]):
        return (f"{change} (n = 1 seed): with one seed the 95% interval is undefined, so seed noise is "
                f"unknown{percent}")
    # exceeds_noise comes from the percent change's interval, as the headline's verdict does
    verdict = "larger than seed noise" if row["exceeds_noise"] else f"within seed noise{_detectable(power)}"
    return (f"{change} (95% CI {_signed(row['ci_low'])} … {_signed(row['ci_high'])}, "
            f"n = {row['n']} seeds): {verdict}{percent}{_correlation(power)}")


def _trend_statement(row: dict, with_variant: bool) -> str:
    """The scaling trend of one TREND_GROUP (scaling.csv's row): its slope and interval, or why none."""
    head = f"Scaling of ratio 1 (fw loss) with model size, {_setting_label(row, with_variant)}"
    counts = f"n = {row['n_pairs']} seed pairs over {row['n_sizes']} model size(s)"
    if pd.isna(row["slope"]):
        return f"{head}: no slope ({row['reason']}; {counts})."
    slope = f"slope of ln ratio 1 on ln parameter count {_signed(row['slope'], 4)}"
    interval = (f"no interval: {row['reason']}" if pd.isna(row["slope_ci_low"]) else
                f"95% CI {_signed(row['slope_ci_low'], 4)} … {_signed(row['slope_ci_high'], 4)}, "
                f"p = {_num(row['p_value'])}")
    return f"{head}: {slope} ({interval}; {counts}). Above 0: the bw task helps fw more at larger sizes."


def _holm_statements(tests: pd.DataFrame, with_variant: bool) -> list[str]:
    """Per TREND_GROUP with a paired t test at 2 sizes or more: each size's p and Holm-adjusted p."""
    out = []
    tested = tests.dropna(subset=["p_value"])
    for group in tested[TREND_GROUP].drop_duplicates().to_dict("records"):
        rows = select(tested, group)
        if len(rows) < 2:
            continue
        sizes = "; ".join(f"{size_label(r['depth'], r['width'])} p = {_num(r['p_value'])} (Holm {_num(r['p_holm'])})"
                          for r in rows.to_dict("records"))
        out.append(f"Paired t tests of final fw loss at p_bw = x against p_bw = 0, {_setting_label(group, with_variant)}, "
                   f"Holm-adjusted over {len(rows)} model sizes: {sizes}.")
    return out


def _arrow_statement(row: dict, leaking_masks: set[str]) -> str:
    """The fw − bw final loss gap of one setting that trains both tasks equally (arrow_of_time.csv's row)."""
    where = f"fw − bw final loss gap at {size_label(row['depth'], row['width'])}, {arm_label(row)}"
    if pd.isna(row["gap_ci_low"]):
        interval = f"n = {row['n']} seed: no interval"
    else:
        interval = f"95% CI {_signed(row['gap_ci_low'])} … {_signed(row['gap_ci_high'])}, n = {row['n']} seeds"
    text = f"{where}: {_signed(row['gap_mean'])} ({interval}). Below 0: fw is the easier direction."
    if row["bw_mask"] in leaking_masks:
        return text + " This mask leaks the bw labels (mask audit): the gap measures the leak, not the arrow of time."
    return text


def _equal_flops_statement(ratios: pd.DataFrame, row: dict, with_variant: bool) -> str:
    """Ratio 1 of final fw loss and its percent change at equal training FLOPs: each seed pair compared
    where the run with less compute ended."""
    where = f"At equal training FLOPs, {size_label(row['depth'], row['width'])}, {_setting_label(row, with_variant)}"
    ratio = _flops_ratio(ratios, row)
    if ratio["n"] == 0:
        return f"{where}: no seed pair whose training FLOPs overlap (n = 0): no comparison."
    return (f"{where} (each seed pair where the run with less compute ended): ratio 1 of fw loss "
            f"{_num(ratio['value'])} (n = {ratio['n']} seed pairs{_interval(ratio)}); fw loss changed by "
            f"{_percent(row, 'flops_')}.")


def _flops_ratio(ratios: pd.DataFrame, row: dict) -> pd.Series:
    """ratios.csv's ratio 1 (fw loss) at equal training FLOPs of the setting of paired.csv's `row`."""
    return select(ratios, {**{k: row[k] for k in SETTING}, "ratio": "ratio1", "metric": "loss", "phase": "final",
                           "axis": "flops", "averaging": "ratio_then_mean"}).iloc[0]


def _interval(row) -> str:
    return "" if pd.isna(row["ci_low"]) else f", 95% CI {_num(row['ci_low'])} … {_num(row['ci_high'])}"


def _missing_ratio(row) -> str:
    """Why a ratio 1 row has no value, from its counts."""
    where = size_label(row["depth"], row["width"])
    if row["n_base"] == 0:
        return f"{where}: no p_bw = 0 run of the same setting (see the skipped table)"
    return (f"{where}: no seed has both runs ({row['n_x']} seed(s) at p_bw = {row['p_bw']:g}, "
            f"{row['n_base']} at p_bw = 0)")


def _ratio1_statement(final: pd.DataFrame, arm: dict) -> str:
    """Range over model sizes of ratio 1 of final fw loss, both averagings, over paired seeds."""
    head = f"Ratio 1 of final fw loss, {arm_label(arm)}"
    missing = [_missing_ratio(r) for r in final[final.averaging == "ratio_then_mean"].to_dict("records")
               if pd.isna(r["value"])]
    values = final.dropna(subset=["value"])
    if values.empty:
        return f"{head}: no value at {'; '.join(missing)}."
    parts = []
    for averaging in ("ratio_then_mean", "mean_then_ratio"):
        rows = values[values.averaging == averaging]
        low, high = rows.loc[rows.value.idxmin()], rows.loc[rows.value.idxmax()]
        parts.append(f"{averaging} {_num(low.value)} (n = {low.n} seed pairs{_interval(low)})" if len(rows) == 1 else
                     f"{averaging} from {_num(low.value)} ({size_label(low.depth, low.width)}) to "
                     f"{_num(high.value)} ({size_label(high.depth, high.width)})")
    sizes = values[SIZE].drop_duplicates().shape[0]
    text = (f"{head}, over {sizes} model size(s) with a value: {parts[0]}; {parts[1]}. "
            "Above 1 means the bw task helped the fw task.")
    return text + (f" No value at {'; '.join(missing)}." if missing else "")


def _window_statement(window: EpochWindow, arm: Arm, points: pd.DataFrame) -> str:
    """Ratio 1 (fw loss) of one size in one epoch window: each seed's mean over the window's points,
    then the geometric mean over seeds, as in ratios.csv."""
    where = (f"Ratio 1 (fw loss) in epochs {window_label(window)}, "
             f"{size_label(arm.setting['depth'], arm.setting['width'])}, {arm_label(arm.setting)}")
    seeds = seed_means(select(window.samples, {**arm.setting, "axis": "epoch"})).ratio1_loss
    if seeds.empty:
        own = points[points.run_id.isin(arm.runs)]
        inside = own[(own.nominal_epoch >= window.start) & (own.nominal_epoch <= window.stop)]
        if inside.empty:
            return f"{where}: empty window, no validation points (n = 0)."
        return (f"{where}: no value: the p_bw = {arm.setting['p_bw']:g} runs have {len(inside)} validation points "
                "here, none with a p_bw = 0 point of the same seed within half an eval interval (n = 0).")
    low, high = log_ratio_ci(seeds)
    interval = {"ci_low": low, "ci_high": high}
    return (f"{where}: geometric mean {_num(geometric_mean(seeds))} over n = {len(seeds)} seeds, each averaged over its points "
            f"first{_interval(interval)}; {int((seeds > 1).sum())} of {len(seeds)} seeds above 1.")


def _diverged_statements(diverged: pd.DataFrame) -> list[str]:
    return [
        f"{len(runs)} run(s) diverged (non-finite loss in training or validation) at "
        f"{size_label(setting['depth'], setting['width'])}, {arm_label(setting)}: {' '.join(sorted(runs.run_id))}; "
        "left out of every statistic and counted in final_losses.n_diverged."
        for setting, runs in ((r, select(diverged, r)) for r in diverged[SETTING].drop_duplicates().to_dict("records"))
    ]


def _cut_statement(cut: pd.DataFrame, setting: dict, with_variant: bool) -> str | None:
    """The CUT_RATIOS, mean_then_ratio, with all blocks and with one block left."""
    rows = select(cut, {**setting, "averaging": "mean_then_ratio"})
    ends = {}
    for ratio, metric in CUT_RATIOS:
        line = select(rows, {"ratio": ratio, "metric": metric}).set_index("blocks_remaining").value
        if {setting["depth"], 1} <= set(line.index) and setting["depth"] > 1:
            ends[ratio_label(ratio, metric)] = (line[setting["depth"]], line[1])
    if not ends:
        return None
    text = ", ".join(f"{label} {_num(full)} → {_num(one)}" for label, (full, one) in ends.items())
    where = f"{size_label(setting['depth'], setting['width'])}, {_setting_label(setting, with_variant)}"
    return f"Layer cut at {where}, from all {setting['depth']} blocks to 1 block left (mean_then_ratio): {text}."


def _mask_statements(summary: pd.DataFrame) -> list[str]:
    out = []
    for row in summary.to_dict("records"):
        ratio = (f"bw/fw final loss ratio {_num(row['bw_fw_loss_ratio'], 2)} for {row['bw_mask']} runs "
                 f"(n = {row['runs']}, p_bw > 0)")
        if row["bw_fw_loss_ratio"] < LEAK_RATIO and row["leaks_labels"]:
            out.append(f"{ratio}: bw is far easier than fw; the bw task leaks its labels "
                       "(the config flags this mask).")
        elif row["bw_fw_loss_ratio"] < LEAK_RATIO:
            out.append(f"{ratio}: bw is far easier than fw although the mask should not leak; suspect a leak.")
        elif row["leaks_labels"]:
            out.append(f"{ratio}: bw about as hard as fw or harder, although the config flags this mask as "
                       "leaking labels: the losses do not show the leak.")
        else:
            out.append(f"{ratio}: bw about as hard as fw or harder, no sign of a label leak in the losses.")
        if row["probed"] == 0:
            out.append(f"No leak-probe result for {row['bw_mask']} runs.")
        elif row["probe_leaks"]:
            out.append(f"The leak probes (model and training path) found bw outputs depending on tokens they must not see in "
                       f"{row['probe_leaks']} of {row['probed']} probed {row['bw_mask']} runs: "
                       f"{row['probe_leak_runs']}.")
        else:
            out.append(f"The leak probes (model and training path) found no leak in {row['probed']} probed "
                       f"{row['bw_mask']} runs.")
    return out


def _status_statement(runs: pd.DataFrame) -> str:
    counts = runs.status.value_counts()
    others = ", ".join(f"{status}: {n}" for status, n in counts.items() if status != "done")
    done = int(counts.get("done", 0))
    if not others:
        return f"All {len(runs)} runs finished."
    return (f"{len(runs) - done} of {len(runs)} runs did not finish ({others}); they are listed below and "
            "left out of every statistic.")


def _leaking_masks(mask_summary: pd.DataFrame) -> set[str]:
    """The bw masks whose config flags them as reading their own labels."""
    return set(mask_summary.loc[mask_summary.leaks_labels.astype(bool), "bw_mask"])


def findings_by_question(analysis: Analysis) -> dict[str, list[str]]:
    """Plain statements of what the data shows, each with its numbers, by the question they answer
    (QUESTIONS' keys, in the report's order)."""
    runs, ratios, paired = analysis.runs, analysis.ratios, analysis.paired
    if not (runs.status == "done").any():
        return {"runs": [f"No run has finished (status done): there are no statistics or figures yet. "
                         f"{_status_statement(runs)}"]}
    with_variant = paired[VARIANT].drop_duplicates().shape[0] > 1
    power = analysis.power.to_dict("records")  # one row per paired row: both follow analysis.arms
    equal_data = [_paired_statement(row, with_variant, p) for row, p in zip(paired.to_dict("records"), power, strict=True)]
    equal_data += [f"Not compared: {size_label(r['depth'], r['width'])}, {arm_label(r)}: {r['reason']}."
                   for r in analysis.skipped.to_dict("records")]
    one_seed = analysis.final_losses.n_seeds.eq(1).sum()
    if one_seed:
        equal_data.append(f"{one_seed} setting(s) have a single seed: their 95% interval is undefined (NaN), "
                          "so seed-to-seed noise is unknown there.")
    if paired.adaptive_p_bw.astype(bool).any():
        equal_data.append("adaptive_p_bw settings are compared at equal epochs and seconds only: their p_bw moves "
                          "and the results hold no count of bw steps, so their fw tokens and FLOPs are unknown (NaN).")
    for key, group in arm_groups(analysis.arms):
        final = select(ratios, {**key, "ratio": "ratio1", "metric": "loss", "phase": "final", "axis": "epoch"})
        equal_data.append(_ratio1_statement(final, key))
        equal_data += [_window_statement(w, arm, analysis.points) for w in analysis.windows for arm in group]
    cut = ratios[ratios.phase == CUT_PHASE]
    cut_statements = (_cut_statement(cut, row, with_variant) for row in paired[[*SIZE, *ARM]].to_dict("records"))
    return {
        "runs": [_status_statement(runs), *_diverged_statements(analysis.diverged)],
        "equal_data": equal_data,
        "equal_compute": [_equal_flops_statement(ratios, row, with_variant) for row in paired.to_dict("records")],
        "scaling": [*(_trend_statement(row, with_variant) for row in analysis.scaling.to_dict("records")),
                    *_holm_statements(analysis.size_tests, with_variant)],
        "mask": _mask_statements(analysis.mask_summary),
        "layer_cut": [s for s in cut_statements if s],
        "arrow": [_arrow_statement(row, _leaking_masks(analysis.mask_summary))
                  for row in analysis.arrow_of_time.to_dict("records")],
        "overfitting": _overfitting_statements(analysis),
    }


UNAVAILABLE = {  # measure -> why a paired change has no pair with both values
    "best_epoch": "every pair has a run still improving at its last point",
    "final_gap": "the training split was not evaluated (train_eval_tokens 0)",
    "best_fw_loss_equal_flops": "a run's training FLOPs are unknown (adaptive p_bw)",
    "final_fw_loss_equal_flops": "a run's training FLOPs are unknown (adaptive p_bw) or it stopped short of the other's",
}


def _digits(row: dict) -> int:
    return 2 if row["unit"] == "epochs" else 3


def _change_verdict(row: dict) -> str:
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
    return f"no resolvable change, the seeds could detect ±{_num(row['mde'], _digits(row))}"


def _measure_clause(row: dict) -> str:
    name = MEASURES[row["measure"]].name
    if row["n"] == 0:
        return f"{name}: not available ({UNAVAILABLE.get(row['measure'], 'no pair has both values')})"
    digits = _digits(row)
    over = "" if row["n"] == row["n_pairs"] else f" over the {plural(row['n'], 'seed pair')} where both are known"
    return (f"{name} {_num(row['x_mean'], digits)} vs {_num(row['base_mean'], digits)} at p_bw = 0{over} "
            f"({_signed(row['mean_diff'], digits)} {row['unit']}, 95% CI {_signed(row['ci_low'], digits)} … "
            f"{_signed(row['ci_high'], digits)}: {_change_verdict(row)})")


def _censored_clause(row: dict) -> str:
    return (f"still improving at the last evaluation (best epoch censored at the budget): {row['x_best_at_end']} of "
            f"{row['n_pairs']} p_bw = {row['p_bw']:g} runs, {row['base_best_at_end']} of {row['n_pairs']} p_bw = 0 runs")


def _overfitting_statement(rows: pd.DataFrame, with_variant: bool) -> str:
    """One arm's paired changes (overfitting.csv's rows of one setting), equal data then equal compute."""
    first = rows.iloc[0]
    head = f"{size_label(first['depth'], first['width'])}, {_setting_label(first, with_variant)} (n = {plural(first['n_pairs'], 'seed pair')})"
    by_budget = {b: "; ".join(map(_measure_clause, rows[rows.budget == b].to_dict("records"))) for b in rows.budget.unique()}
    text = " ".join(f"At {b}, {clauses}." for b, clauses in by_budget.items())
    censored = _censored_clause(first)
    return f"{head}: {text} {censored[0].upper()}{censored[1:]}."


def _overfitting_statements(analysis: Analysis) -> list[str]:
    effects = analysis.overfitting
    if effects.empty:
        return ["No p_bw > 0 setting has a paired p_bw = 0 run: nothing to compare."]
    with_variant = effects[VARIANT].drop_duplicates().shape[0] > 1
    statements = [_overfitting_statement(rows, with_variant)
                  for _, rows in effects.groupby(SETTING, dropna=False, sort=True)]
    return statements


def findings(analysis: Analysis) -> list[str]:
    """Every statement of findings_by_question, in the report's order."""
    return [s for statements in findings_by_question(analysis).values() for s in statements]


RETRIEVAL_TITLE = "Retrieval: does training both ways make a causal LM a better late-interaction retriever?"
RETRIEVAL_ANSWERS = {  # how the deciding comparison a − b's intervals lie (_retrieval_direction) -> the answer they allow
    "better": "Yes: training a causal LM both ways made it a better late-interaction retriever ({a} beat {b} in every "
              "comparison)",
    "sometimes": "Not consistently: training a causal LM both ways made it a better late-interaction retriever in "
                 "some comparisons only",
    "mixed": "Mixed: {a} beat {b} in some comparisons and lost to it in others",
    "worse": "No: {a} lost to {b} where the intervals exclude 0",
    "none": "No evidence that training a causal LM both ways makes it a better late-interaction retriever",
}
RETRIEVAL_UNCONTROLLED = ("Not established: without the matched fwfw control, a gain of two views over one is not "
                          "told apart from seeing both sides")


def _retrieval_direction(rows: pd.DataFrame) -> str:
    """Where the two-level 95% intervals of a − b lie: above 0 in all rows, in some, on both sides, below only, or neither."""
    above, below = int((rows.ci_low > 0).sum()), int((rows.ci_high < 0).sum())
    if above == len(rows):
        return "better"
    if above:
        return "mixed" if below else "sometimes"
    return "worse" if below else "none"


def _retrieval_tally(rows: pd.DataFrame) -> str:
    """One comparison's rows: its difference and interval, or (several rows) where their intervals lie."""
    name = rows.comparison.iloc[0] + (" (the matched control)" if rows.comparison.iloc[0] == CONTROL else "")
    if len(rows) == 1:
        row = rows.iloc[0]
        return f"{name} {_signed(row.mean_diff)} (95% CI {_signed(row.ci_low)} … {_signed(row.ci_high)})"
    above, below = int((rows.ci_low > 0).sum()), int((rows.ci_high < 0).sum())
    return f"{name} above 0 in {above} and below 0 in {below} of {len(rows)} comparisons (mean {_signed(rows.mean_diff.mean())})"


def _retrieval_answer(deciding: pd.DataFrame) -> str:
    """The answer the deciding comparison's rows allow: a gain only where it is the fwbw − fwfw control."""
    name, direction = deciding.comparison.iloc[0], _retrieval_direction(deciding)
    if name != CONTROL and direction in ("better", "sometimes", "mixed"):
        return RETRIEVAL_UNCONTROLLED
    a, b = name.split(" − ")
    return RETRIEVAL_ANSWERS[direction].format(a=a, b=b)


def retrieval_statements(retrieval: RetrievalAnalysis) -> list[str]:
    """The one sentence that answers the question, from retrieval_stats.answer_rows (none without them): the
    deciding comparison is the fwbw − fwfw control where the sweep has it (without it a gain is not established)."""
    rows = answer_rows(retrieval.comparisons)
    by_name = [rows[rows.comparison.eq(name)] for name in ANSWER_ORDER if rows.comparison.eq(name).any()]
    if not by_name:
        return []
    tallies = "; ".join(map(_retrieval_tally, by_name))
    return [f"{_retrieval_answer(by_name[0])}: on the test queries, {tallies} (nDCG@10 of late interaction, a − b within "
            "each model, with two-level bootstrap 95% intervals over seeds and queries)."]


def _retrieval_section(retrieval: RetrievalAnalysis) -> tuple[str, list[tuple]]:
    return (RETRIEVAL_TITLE, [
        *(("p", sentence) for sentence in retrieval_statements(retrieval)),
        ("p", "retrieval_comparisons: nDCG@10 of a − b, paired by seed and query (fwbw.analysis.retrieval_stats). "
              "Within each model, per task, split, system, blocks and fine-tuning: bw − fw, fwbw − fw and fwbw − "
              "fwfw (the matched control: this run's fw beside a second seed's fw) where p_bw > 0, echo − fw (the "
              "text read twice) at every p_bw. Between models: p_bw > 0 − p_bw = 0 with fw embeddings, and each at "
              "its best embed and blocks. Against BM25: each model's best dense system, rerank-bm25 and fusion-bm25. "
              "Best: the highest mean nDCG@10 over the seeds on the dev split, then compared on every split. ci_low, "
              "ci_high: the two-level bootstrap 95% interval (seeds and queries resampled independently); p_value: its "
              "two-sided p; goal rows (best dense − BM25 on test, description and ict): p_holm, Holm-adjusted over "
              "the model's two tasks. seed_ci: the t interval over seeds; query_ci, query_boot: the paired t and "
              "bootstrap intervals over queries of the values averaged over seeds."),
        ("table", "retrieval_comparisons", retrieval.comparisons),
        ("p", "retrieval_systems: every system's metrics, the mean over its results (one per seed), with nDCG@10's "
              "95% t interval over seeds, the seconds to encode the corpus (small where the token cache held it) "
              "and per query."),
        ("table", "retrieval_systems", retrieval.systems),
    ])


# ----------------------------------------------------------------------------- the answer first

def _verdict(low: float, high: float, n: int, detectable: float = np.nan) -> str:
    """What a percent change of fw loss with its 95% interval says (above 0: fw loss rose)."""
    if n == 0:
        return "no seed has both runs"
    if pd.isna(low):
        return f"no interval at n = {n} seed"
    if low > 0:
        return f"bw training hurts (n = {n} seeds)"
    if high < 0:
        return f"bw training helps (n = {n} seeds)"
    resolvable = f"no resolvable effect at n = {n} seeds"
    return resolvable if pd.isna(detectable) else f"{resolvable}, the seeds could detect ±{detectable:.2f}%"


def _leak_free(frame: pd.DataFrame, leaking: set[str]) -> list[dict]:
    return frame[~frame.bw_mask.isin(leaking)].to_dict("records")


def _equal_data_answer(analysis: Analysis, leaking: set[str]) -> str:
    rows = zip(analysis.paired.to_dict("records"), analysis.power.to_dict("records"), strict=True)
    clauses = [f"{_setting_label(row, True)}, {size_label(row['depth'], row['width'])}: {_percent(row)}, "
               f"{_verdict(row['pct_ci_low'], row['pct_ci_high'], row['n'], p['mde_percent'])}"
               for row, p in rows if row["bw_mask"] not in leaking]
    head = "Equal data (same epochs), change of final fw loss with bw training"
    return f"{head}: {'; '.join(clauses)}." if clauses else f"{head}: no leak-free setting has a paired comparison."


def _equal_compute_answer(analysis: Analysis, leaking: set[str]) -> str:
    clauses = []
    for row in _leak_free(analysis.paired, leaking):
        n = _flops_ratio(analysis.ratios, row)["n"]
        clauses.append(f"{_setting_label(row, True)}, {size_label(row['depth'], row['width'])}: "
                       f"{_percent(row, 'flops_')}, {_verdict(row['flops_pct_ci_low'], row['flops_pct_ci_high'], n)}")
    head = "Equal compute (same training FLOPs), change of fw loss with bw training"
    return f"{head}: {'; '.join(clauses)}." if clauses else f"{head}: no leak-free setting has a paired comparison."


def _scaling_verdict(row: dict) -> str:
    if pd.isna(row["slope"]):
        return row["reason"]
    if pd.isna(row["slope_ci_low"]):
        return f"{_signed(row['slope'], 4)}, no interval: {row['reason']}"
    interval = (f"{_signed(row['slope'], 4)} (95% CI {_signed(row['slope_ci_low'], 4)} … "
                f"{_signed(row['slope_ci_high'], 4)}, {row['n_pairs']} seed pairs over {row['n_sizes']} sizes)")
    if row["slope_ci_low"] > 0:
        return f"{interval}: bw training helps fw more (or hurts less) at larger sizes"
    if row["slope_ci_high"] < 0:
        return f"{interval}: bw training helps fw less (or hurts more) at larger sizes"
    return f"{interval}: no resolvable trend with size"


def _scaling_answer(analysis: Analysis, leaking: set[str]) -> str:
    clauses = [f"{_setting_label(row, True)}: {_scaling_verdict(row)}" for row in _leak_free(analysis.scaling, leaking)]
    head = "Scaling with model size, slope of ln ratio 1 (fw loss) on ln parameter count"
    return f"{head}: {'; '.join(clauses)}." if clauses else f"{head}: no leak-free setting."


ANSWER_MEASURES = {"best_fw_loss": "best fw val loss at equal data", "best_fw_loss_equal_flops": "at equal compute",
                   "rise_after_best": "its rise after the best", "final_gap": "the final train–val gap"}


def _answer_clause(row: dict, label: str) -> str:
    if row["n"] == 0:
        return f"{label} not available"
    digits = _digits(row)
    return (f"{label} {_signed(row['mean_diff'], digits)} ({_signed(row['ci_low'], digits)} … "
            f"{_signed(row['ci_high'], digits)}, {_change_verdict(row)})")


def overfit_arms(effects: pd.DataFrame) -> pd.DataFrame:
    """The rows of the settings whose p_bw = 0 runs overfit: their fw val loss rose after its best,
    the 95% interval of the mean rise above 0."""
    rise = effects[(effects.measure == "rise_after_best") & (effects.base_ci_low > 0)]
    return effects.merge(rise[SETTING], on=SETTING)


def _overfitting_answer(arms: pd.DataFrame) -> str:
    """The many-epoch answer for the leak-free settings whose baselines overfit (overfit_arms)."""
    clauses = []
    for _, rows in arms.groupby(SETTING, dropna=False, sort=True):
        by_measure = {row["measure"]: row for row in rows.to_dict("records")}
        first = rows.iloc[0]
        clauses.append(f"{_setting_label(first, True)}, {size_label(first['depth'], first['width'])}, "
                       f"n = {plural(first['n_pairs'], 'seed pair')}: "
                       + ", ".join(_answer_clause(by_measure[m], label) for m, label in ANSWER_MEASURES.items())
                       + f"; {_censored_clause(first)}")
    return f"Many epochs, where the p_bw = 0 runs overfit, change with bw training (95% CI over seeds): {'; '.join(clauses)}."


def _mask_clause(row: dict) -> str:
    probes = (f"leak probes found a leak in {row['probe_leaks']} of {row['probed']} runs" if row["probed"]
              else "no leak-probe result")
    evidence = f"bw/fw final loss ratio {_num(row['bw_fw_loss_ratio'], 2)} over {row['runs']} runs, {probes}"
    if row["leaks_labels"]:
        return f"the {row['bw_mask']} mask leaks by design ({evidence}); its runs are left out of the answers above"
    if row["probe_leaks"] or row["bw_fw_loss_ratio"] < LEAK_RATIO:
        return f"the {row['bw_mask']} mask is suspect ({evidence}): its answers above may measure a leak"
    verdict = "leak-free" if row["probed"] else "no leak in the losses, not probed"
    return f"the {row['bw_mask']} mask is {verdict} ({evidence})"


def headline(analysis: Analysis) -> list[str]:
    """Three to five sentences that answer the study's questions (equal data, equal compute,
    scaling, leak) from the analysis' tables, and the runs' status."""
    statements = findings_by_question(analysis)
    if "equal_data" not in statements:
        return statements["runs"]
    leaking = _leaking_masks(analysis.mask_summary)
    mask = "; ".join(map(_mask_clause, analysis.mask_summary.to_dict("records")))
    overfit = overfit_arms(analysis.overfitting[~analysis.overfitting.bw_mask.isin(leaking)])
    many_epochs = [_overfitting_answer(overfit)] if len(overfit) else []
    return [
        *many_epochs,
        _equal_data_answer(analysis, leaking),
        _equal_compute_answer(analysis, leaking),
        _scaling_answer(analysis, leaking),
        f"Is the bw task leak-free? {mask[0].upper()}{mask[1:]}." if mask else "No bw run to audit for a leak.",
        _status_statement(analysis.runs),
    ]


# ----------------------------------------------------------------------------- data efficiency

EFFICIENCY_TITLE = "Data efficiency (held-out test split)"
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


def _p(value: float, name: str = "p") -> str:
    return f"{name} < 0.001" if value < 0.001 else f"{name} = {_num(value)}"


def _efficiency_estimate(row: dict, unit: str = "nats", p_column: str = "p_value", extra: str = "") -> str:
    """A paired row's mean difference with its 95% t interval, p-value (p_column) and seeds (CONTRAST_COLUMNS)."""
    if row["n"] == 0:
        return "no seed pair (n = 0)"
    value = f"{_signed(row['mean_diff'])} {unit}"
    if pd.isna(row["ci_low"]):
        return f"{value} ({plural(row['n'], 'seed')}: no interval)"
    p_value = _p(row[p_column], "Holm p" if p_column == "p_holm" else "p")
    return (f"{value} (95% CI {_signed(row['ci_low'])} … {_signed(row['ci_high'])}, {p_value}, "
            f"n = {plural(row['n'], 'seed')}{extra})")


def _primary_verdict(row: dict) -> str:
    """What the primary contrast's interval says (docs/analysis-plan.md#primary-endpoint)."""
    if row["ci_high"] < 0:
        return "bw training lowered held-out fw loss"
    if row["ci_low"] > 0:
        return "bw training raised held-out fw loss"
    if -row["mde"] < row["ci_low"] and row["ci_high"] < row["mde"]:
        return f"no effect of ±{_num(row['mde'])} nats or more"
    return "inconclusive"


def primary_statement(primary: pd.DataFrame) -> str:
    """The primary contrast (efficiency_primary's row) with its interval, p, n and MDE, and the plan's verdict."""
    row = primary.iloc[0].to_dict()
    head = (f"Data efficiency, primary contrast: held-out test fw loss at p_bw {row['p_bw']:g} minus at p_bw "
            f"{row['p_bw_base']:g}, train_fraction {row['train_fraction']:g}, paired by seed")
    if pd.isna(row["ci_low"]):
        return f"{head}: {_efficiency_estimate(row)}."
    extra = f", MDE {_num(row['mde'])} nats, {plural(row['n_censored'], 'censored run')}"
    return f"{head}: {_efficiency_estimate(row, extra=extra)}: {_primary_verdict(row)}."


def _times(value: float) -> str:
    return "∞" if value == math.inf else f"{value:.2f}"


def multiplier_statement(multiplier: pd.DataFrame) -> str:
    """The effective-data multiplier (efficiency_multiplier's row): its value or censored bound, and its interval."""
    row = multiplier.iloc[0].to_dict()
    target = f"the p_bw {row['p_bw']:g} arm's mean test fw loss {_num(row['bw_mean'])}"
    if row["censored"] == "low":
        value = f"{target} is above the fw-only curve at its smallest share, so m < {_times(row['bound_low'])}"
    elif row["censored"] == "high":
        value = f"{target} is below the fw-only curve at its largest share, so m > {_times(row['bound_high'])}"
    else:
        value = f"fw alone needs m = {_times(row['multiplier'])} times the unique tokens to reach {target}"
    if pd.isna(row["ci_low"]):
        interval = "no interval"
    else:
        shares = row["censored_low_share"], row["censored_high_share"]
        past = (f"; {shares[0]:.0%} of draws past the curve's low end, {shares[1]:.0%} past its high end"
                if any(shares) else "")
        interval = f"95% bootstrap CI {_times(row['ci_low'])} … {_times(row['ci_high'])}{past}"
    fit = ", the curve fit non-increasing" if row["isotonic"] else ""
    return (f"Effective-data multiplier at train_fraction {row['train_fraction']:g}: {value} ({interval}; "
            f"n = {plural(row['n_seeds'], 'seed')}, {row['n_fractions']} fw-only shares{fit}).")


def _flops(row: dict) -> str:
    return f", FLOPs ratio {_num(row['flops_ratio'], 2)}"


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
    clauses = [f"at {_num(row['train_split_fw_loss'])} {_efficiency_estimate(row, p_column='p_holm')}"
               for row in matched.to_dict("records")]
    return (f"Regulariser test, validation fw loss of fw+bw minus fw at the same training-split fw loss "
            f"(Holm over {matched.p_value.notna().sum()}; below 0 would mean bw regularises): {'; '.join(clauses)}.")


EFFICIENCY_STATEMENTS = (("primary", primary_statement), ("multiplier", multiplier_statement), ("q2", q2_statement),
                         ("dose", dose_slope_statement), ("matched", matched_statement))  # led by a sentence, in order


def efficiency_statements(tables: dict[str, pd.DataFrame]) -> list[str]:
    """One sentence per result analysed (EFFICIENCY_STATEMENTS); a skipped part has none: the skipped table
    says why."""
    return [say(tables[name]) for name, say in EFFICIENCY_STATEMENTS if len(tables[name])]


def efficiency_answer(efficiency: Efficiency) -> list[str]:
    """The primary contrast's sentence, for the report's answer; none where the part was skipped."""
    primary = efficiency.tables["primary"]
    return [primary_statement(primary)] if len(primary) else []


def efficiency_lead(efficiency: Efficiency, figures: list[Path]) -> list[tuple]:
    """The section's first blocks: a sentence per result, the figures, and the parts skipped with their reasons."""
    skipped = efficiency.tables["skipped"]
    drawn = [("figures", [(path, EFFICIENCY_CAPTIONS[path.stem]) for path in figures])] if figures else []
    return [
        ("ul", efficiency_statements(efficiency.tables)), *drawn,
        ("p", f"Parts not analysed, and why ({TABLE_FILES['skipped']}):"),
        ("table", TABLE_FILES["skipped"], skipped) if len(skipped) else ("p", "None: every part was analysed."),
    ]


def efficiency_section(efficiency: Efficiency, figures: list[Path]) -> tuple[str, list[tuple]]:
    """The data-efficiency experiment's section (docs/analysis-plan.md): efficiency_lead, then every table."""
    tables = [block for name, text in EFFICIENCY_TABLES.items()
              for block in (("p", text), ("table", TABLE_FILES[name], efficiency.tables[name]))]
    return (EFFICIENCY_TITLE, [*efficiency_lead(efficiency, figures),
                               ("p", "Analysed as pre-registered in docs/analysis-plan.md."), *tables])


# ----------------------------------------------------------------------------- rendering

def _cell(value) -> str:
    if isinstance(value, str):
        return value
    if value is None or pd.isna(value):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return f"{int(value)}" if float(value).is_integer() else f"{value:.4g}"
    return str(value)


def _display(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({c: frame[c].map(_cell) for c in frame.columns}, columns=frame.columns)


def _setup_value(value) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return json.dumps(value) if isinstance(value, dict) else str(value)


def setup_table(sweep: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """sweep.json as key/value rows, plus run counts and total compute from the table."""
    rows = [(key, _setup_value(value)) for key, value in sweep.items()]
    seconds = runs.seconds.sum()
    rows += [
        ("runs", f"{len(runs)} ({(runs.status == 'done').sum()} done)"),
        ("total tokens trained (sum of each run's last tokens)", f"{runs.tokens.sum():,.0f}"),
        ("total wall time (sum of each run's last seconds)", f"{seconds:,.0f} s = {seconds / 3600:.2f} h"),
    ]
    return pd.DataFrame(rows, columns=["setting", "value"])


HEADLINE_FIGURES = ("overfitting", "loss_fw", "loss_fw_flops")  # the first screen's figures (file stems)
FIGURE_SECTIONS = {"loss_curves": "equal_data", "ratio1_curves": "equal_data", "compute_curves": "equal_compute",
                   "ratio1_violins": "scaling", "ratio1_scatter": "scaling", "layer_cut": "layer_cut"}
SAMPLE_PROMPTS = 3  # prompts shown per run
NO_BW_SAMPLE = "(none: this mask reads its own labels)"


def _figure_blocks(figures: dict[str, list[Path]]) -> dict[str, list[tuple]]:
    """The figures as one ("figures", [(png, caption)]) block per section key ("answer" first, any
    kind without a section under "more"); each figure appears once."""
    placed: dict[str, list[tuple[Path, str]]] = {}
    for kind, paths in figures.items():
        for path in paths:
            where = "answer" if path.stem in HEADLINE_FIGURES else FIGURE_SECTIONS.get(kind, "more")
            placed.setdefault(where, []).append((path, CAPTIONS.get(kind, "")))
    return {where: [("figures", shown)] for where, shown in placed.items()}


def _samples_frame(samples: dict) -> pd.DataFrame:
    rows = [(s["held_out_before"], NO_BW_SAMPLE if s["bw"] is None else s["bw"], s["prompt"], s["fw"],
             s["held_out_after"]) for s in samples["samples"][:SAMPLE_PROMPTS]]
    return pd.DataFrame(rows, columns=["held-out text before", "bw model: text before", "prompt",
                                       "fw model: text after", "held-out text after"])


def sample_blocks(runs: pd.DataFrame, sweep_dir: Path) -> list[tuple]:
    """For the first seed of each setting that has a samples.json: its prompts with the model's bw
    continuation before and fw continuation after, beside the held-out text."""
    done = runs[runs.status == "done"].sort_values(["num_params", "p_bw", "seed"])
    sampled = done[[(Path(sweep_dir) / RUNS / r / SAMPLES).is_file() for r in done.run_id]]
    blocks = []
    for run in sampled.drop_duplicates(subset=SETTING).to_dict("records"):
        path = Path(sweep_dir) / RUNS / run["run_id"] / SAMPLES
        samples = json.loads(path.read_text(encoding="utf-8"))
        blocks += [("h3", f"{size_label(run['depth'], run['width'])}, {arm_label(run)}, seed {run['seed']} "
                          f"({run['run_id']})"),
                   ("table", f"samples-{run['run_id']}", _samples_frame(samples), "text")]
    return blocks


def _sections(analysis: Analysis, setup: pd.DataFrame, figures: dict[str, list[Path]],
              samples: list[tuple], retrieval: RetrievalAnalysis | None = None,
              efficiency: tuple[Efficiency, list[Path]] | None = None) -> list[tuple[str, list[tuple]]]:
    """The report as (title, blocks): the answer first, then data efficiency (where the sweep has its arms:
    the analysis and its figures), one section per question (retrieval where the sweep has its results),
    then setup and runs. A block is ("p", text), ("ul", items), ("h3", text), ("table", id, frame[, css class]) or
    ("figures", [(png path, caption)])."""
    said = findings_by_question(analysis)
    efficiency_first = [] if efficiency is None else [efficiency_section(*efficiency)]
    primary = [] if efficiency is None else efficiency_answer(efficiency[0])
    drawn = _figure_blocks(figures)
    ratios = analysis.ratios
    equal_data = ratios[(ratios.phase != CUT_PHASE) & ratios.axis.isin(["epoch", "fw_tokens"])]
    equal_compute = ratios[(ratios.phase != CUT_PHASE) & ratios.axis.isin(["flops", "seconds"])]
    unfinished = analysis.unfinished[RUN_COLUMNS]
    sections = [
        ("The answer", [("ul", [*primary, *headline(analysis)]), *drawn.get("answer", [])]),
        *efficiency_first,
        ("Equal data: fw loss at the same epochs", [
            ("ul", said.get("equal_data", [])), *drawn.get("equal_data", []),
            ("p", "Mean over seeds of each run's last validation loss, with its 95% t interval "
                  "(undefined, empty, with one seed)."),
            ("table", "final_losses", analysis.final_losses),
            ("p", "Final fw loss at p_bw = x minus at p_bw = 0, paired by seed (only seeds present in both). "
                  "exceeds_noise: the 95% t interval of the percent change (the per-seed log ratio) excludes 0."),
            ("table", "paired", analysis.paired),
            ("p", "Settings not compared: p_bw > 0 settings without a p_bw = 0 run sharing their data, tokenizer, "
                  "seq_len, training budget, recipe, size, task tokens and heads."),
            ("table", "skipped", analysis.skipped) if len(analysis.skipped) else ("p", "None."),
            ("p", "Final and epoch-window ratios over epochs and fw tokens."),
            ("table", "ratios", equal_data),
        ]),
        ("Many epochs: best loss, overfitting and the train–val gap", [
            ("ul", said.get("overfitting", [])),
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
        ]),
        ("Equal compute: fw loss at the same training FLOPs", [
            ("ul", said.get("equal_compute", [])), *drawn.get("equal_compute", []),
            ("p", "Final and epoch-window ratios over training FLOPs and wall-clock seconds."),
            ("table", "ratios_compute", equal_compute),
        ]),
        ("Scaling with model size and the power of the seeds", [
            ("ul", said.get("scaling", [])), *drawn.get("scaling", []),
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
        ]),
        ("The bw mask and the leak probes", [
            ("ul", said.get("mask", [])),
            ("p", f"A leak-free bw task is about as hard as fw; a bw/fw loss ratio below {LEAK_RATIO} means bw "
                  "is far easier, as a leaking mask makes it."),
            ("table", "mask_summary", analysis.mask_summary),
            ("table", "mask_audit", analysis.mask_audit),
        ]),
        ("Layer cut", [
            ("ul", said.get("layer_cut", [])), *drawn.get("layer_cut", []),
            ("table", "ratios_cut", ratios[ratios.phase == CUT_PHASE]),
        ]),
        ("Arrow of time: fw against bw", [
            ("ul", said.get("arrow", [])),
            ("p", "arrow_of_time: where a setting trains both tasks equally (add at p_bw = 1, either at p_bw = "
                  "0.5), the mean over seeds of the final fw − bw loss gap with its 95% t interval."),
            ("table", "arrow_of_time", analysis.arrow_of_time) if len(analysis.arrow_of_time)
            else ("p", "No setting trains both tasks equally."),
        ]),
    ]
    if retrieval is not None:
        sections.append(_retrieval_section(retrieval))
    if "more" in drawn:
        sections.append(("More figures", drawn["more"]))
    if samples:
        sections.append(("Samples", [
            ("p", "Greedy continuations of held-out prompts (validation text, never trained on) by the first seed "
                  "of each setting: the bw model writes the text before the prompt, the fw model the text after; "
                  "the held-out text is what really surrounds the prompt."),
            *samples,
        ]))
    return sections + [
        ("Setup", [
            ("p", "ratio 1 = fw metric at p_bw = 0 / at p_bw = x, same model size (above 1: the bw task helped "
                  "fw); ratio 2 = fw metric / bw metric at the same setting. mean_then_ratio: mean over the seeds "
                  "present in both arms, then the ratio; ratio_then_mean: ratio per run pair, then the geometric mean; "
                  "ci_low, ci_high: 95% t interval of the per-seed log ratio, exponentiated. Epoch windows average "
                  "each run over the window first. Only finished, non-diverged runs count. The method: "
                  "docs/method.md."),
            ("table", "setup", setup),
        ]),
        ("Runs", [
            ("ul", said["runs"]),
            ("p", "Runs that failed or have not finished:"),
            ("table", "unfinished", unfinished) if len(unfinished) else ("p", "None: every run finished."),
            ("table", "runs", analysis.runs[RUN_COLUMNS]),
        ]),
    ]


def _long(table_block: tuple) -> bool:
    return len(table_block[2]) > COLLAPSE_ROWS


def _collapsed(table_block: tuple) -> str:
    """The summary line of a collapsed table."""
    name = table_block[1]
    csv = TABLE_CSV.get(name, name)
    return f"{name}: {len(table_block[2])} rows (click to show; complete in {csv}.csv where written)"


def _html_block(block: tuple) -> str:
    kind = block[0]
    if kind == "p":
        return f"<p>{html.escape(block[1])}</p>"
    if kind == "ul":
        return "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in block[1]) + "</ul>"
    if kind == "h3":
        return f"<h3>{html.escape(block[1])}</h3>"
    if kind == "table":
        body = _display(block[2]).to_html(index=False, table_id=block[1], na_rep="", border=0, classes=block[3:])
        shown = f'<div class="scroll">{body}</div>'
        return f"<details><summary>{html.escape(_collapsed(block))}</summary>{shown}</details>" if _long(block) else shown
    images = "".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{html.escape(p.stem)}: {html.escape(caption)}</figcaption></figure>"
        for p, caption in block[1]
    )
    return f'<div class="figures">{images}</div>'


def render_html(title: str, sections: list[tuple[str, list[tuple]]]) -> str:
    body = "".join(f"<h2>{html.escape(name)}</h2>" + "".join(map(_html_block, blocks)) for name, blocks in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n")


MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|])")


def _md(text) -> str:
    """Plain text in report.md: markdown's special characters backslash-escaped, on one line."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", str(text)).replace("\r", " ").replace("\n", " ")


def _md_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "_(no rows)_"
    shown = _display(frame)
    lines = ["| " + " | ".join(map(_md, shown.columns)) + " |", "|" + "---|" * len(shown.columns)]
    lines += ["| " + " | ".join(map(_md, row)) + " |" for row in shown.itertuples(index=False)]
    return "\n".join(lines)


def _md_block(block: tuple, out_dir: Path) -> str:
    kind = block[0]
    if kind == "p":
        return _md(block[1])
    if kind == "ul":
        return "\n".join(f"- {_md(s)}" for s in block[1])
    if kind == "h3":
        return f"### {_md(block[1])}"
    if kind == "table":
        shown = _md_table(block[2])
        return f"<details><summary>{_md(_collapsed(block))}</summary>\n\n{shown}\n\n</details>" if _long(block) else shown
    return "\n\n".join(
        f"![{_md(p.stem)}]({p.relative_to(out_dir).as_posix()})\n\n_{_md(p.stem)}: {_md(caption)}_"
        for p, caption in block[1]
    )


def render_markdown(title: str, sections: list[tuple[str, list[tuple]]], out_dir: Path) -> str:
    parts = [f"# {_md(title)}"]
    for name, blocks in sections:
        parts += [f"## {_md(name)}", *(_md_block(b, out_dir) for b in blocks)]
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- entry point

def write_report(sweep_dir: Path, out_dir: Path, windows: Sequence[Window] = DEFAULT_WINDOWS) -> Path:
    """Write report.html, report.md, figures/ and the CSV tables for the sweep in `sweep_dir` (with the
    data-efficiency tables and figures where its runs.csv has such arms); return the path of report.html.
    Every file is written atomically."""
    sweep_dir, out_dir = Path(sweep_dir), Path(out_dir)
    results = read_results(sweep_dir)
    analysis = analyse(results, windows)
    for name in CSV_TABLES:
        atomic_write(out_dir / f"{name}.csv", lambda tmp: getattr(analysis, name).to_csv(tmp, index=False))
    retrieval = sweep_retrieval(sweep_dir)
    for name in RETRIEVAL_TABLES if retrieval is not None else ():
        table = getattr(retrieval, name.removeprefix("retrieval_"))
        atomic_write(out_dir / f"{name}.csv", lambda tmp, table=table: table.to_csv(tmp, index=False))
    figures = make_figures(analysis, out_dir / "figures")
    efficiency = efficiency_analysis(read_runs(sweep_dir), results)
    drawn = None if efficiency is None else (efficiency, write_efficiency(efficiency, out_dir, out_dir / "figures"))
    setup = setup_table(sweep_setup(sweep_dir), analysis.runs)
    sections = _sections(analysis, setup, figures, sample_blocks(analysis.runs, sweep_dir), retrieval, drawn)
    title = f"fwbw sweep report: {sweep_dir.name}"
    atomic_write_text(out_dir / "report.md", render_markdown(title, sections, out_dir))
    atomic_write_text(out_dir / "report.html", render_html(title, sections))
    return out_dir / "report.html"
