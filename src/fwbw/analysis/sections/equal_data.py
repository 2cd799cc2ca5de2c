"""Equal data: fw loss at the same epochs. Each setting's paired change of final fw loss with what its seeds
can detect, ratio 1 of final fw loss over model sizes and per epoch window, the loss curves, and the final
losses, paired and ratio tables; the settings and windows without a value go to the skipped table."""

from __future__ import annotations

import pandas as pd

from fwbw.analysis.effects import ALPHA, POWER
from fwbw.analysis.figures import arm_groups, arm_label, size_label, window_label
from fwbw.analysis.sections.figure_blocks import shown
from fwbw.analysis.sections.inputs import Inputs, with_variant
from fwbw.analysis.sections.tables import answer_row, skip
from fwbw.analysis.sections.text import interval, num, percent, setting_label, signed
from fwbw.analysis.stats import SIZE, Analysis, Arm, EpochWindow, geometric_mean, log_ratio_ci, seed_means, select
from fwbw.study.results import CUT_PHASE

TITLE = "Equal data: fw loss at the same epochs"
QUESTION = "equal data"


def pair_reason(n: int, ci_low: float) -> str | None:
    """Why a paired comparison of n seed pairs answers nothing (no pair, or no interval), or None."""
    if n == 0:
        return "no seed has both a p_bw = 0 and a p_bw = x run"
    return "one seed pair: no 95% interval" if pd.isna(ci_low) else None


def with_baseline(analysis: Analysis) -> list[dict]:
    """paired.csv's rows of the settings that have p_bw = 0 runs to compare with (the others are skipped as a
    whole: analysis.skipped)."""
    return [row for row, arm in zip(analysis.paired.to_dict("records"), analysis.arms, strict=True) if arm.baseline]


def percent_verdict(low: float, high: float, detectable: float = float("nan")) -> str:
    """What the 95% interval of a percent change of fw loss says (above 0: fw loss rose), with the smallest
    change the seeds could detect where it straddles 0 and that is known."""
    if low > 0:
        return "bw training raised fw loss"
    if high < 0:
        return "bw training lowered fw loss"
    return "no resolvable effect" + ("" if pd.isna(detectable) else f" (could detect ±{detectable:.1f}%)")


def _detectable(power: dict) -> str:
    """The smallest change of final fw loss the setting's seed pairs detect (power.csv's row)."""
    return (f"; these {power['n']} seeds could only detect a change of ±{num(power['mde_loss'])} "
            f"({power['mde_percent']:.2f}%) with a paired t test at the {ALPHA:g} level and {POWER:.0%} power")


def _correlation(power: dict) -> str:
    if pd.isna(power["correlation"]):
        return ""
    return (f" Same-seed runs' final fw losses correlate across the two arms with r = {power['correlation']:.2f} "
            f"(n = {power['n']} seed pairs): pairing removes that shared seed noise.")


def _paired_statement(row: dict, variant: bool, power: dict) -> str:
    """The paired comparison of one setting with a seed pair (paired.csv's row) with what its seeds can detect
    (power.csv's)."""
    change = (f"At {size_label(row['depth'], row['width'])}, {setting_label(row, variant)} changed final fw loss "
              f"by {signed(row['mean_diff'])}")
    as_percent = f"; as a percent change of fw loss: {percent(row)}."
    if pd.isna(row["exceeds_noise"]):
        return f"{change} (n = 1 seed){as_percent}"
    # exceeds_noise comes from the percent change's interval, as the answer's verdict does
    verdict = "larger than seed noise" if row["exceeds_noise"] else f"within seed noise{_detectable(power)}"
    return (f"{change} (95% CI {signed(row['ci_low'])} … {signed(row['ci_high'])}, "
            f"n = {row['n']} seeds): {verdict}{as_percent}{_correlation(power)}")


def _ratio1_statement(final: pd.DataFrame, arm: dict) -> str | None:
    """Range over model sizes of ratio 1 of final fw loss, both averagings, over paired seeds; None without a value."""
    values = final.dropna(subset=["value"])
    if values.empty:
        return None
    parts = []
    for averaging in ("ratio_then_mean", "mean_then_ratio"):
        rows = values[values.averaging == averaging]
        low, high = rows.loc[rows.value.idxmin()], rows.loc[rows.value.idxmax()]
        parts.append(f"{averaging} {num(low.value)} (n = {low.n} seed pairs{interval(low)})" if len(rows) == 1 else
                     f"{averaging} from {num(low.value)} ({size_label(low.depth, low.width)}) to "
                     f"{num(high.value)} ({size_label(high.depth, high.width)})")
    sizes = values[SIZE].drop_duplicates().shape[0]
    return (f"Ratio 1 of final fw loss, {arm_label(arm)}, over {sizes} model size(s) with a value: {parts[0]}; "
            f"{parts[1]}. Above 1 means the bw task helped the fw task.")


def _window_seeds(window: EpochWindow, arm: Arm) -> pd.Series:
    """Ratio 1 (fw loss) of each seed in the window, averaged over its points (ratios.csv's samples)."""
    return seed_means(select(window.samples, {**arm.setting, "axis": "epoch"})).ratio1_loss


def _window_statement(window: EpochWindow, arm: Arm, seeds: pd.Series) -> str:
    """Ratio 1 (fw loss) of one size in one epoch window: each seed's mean over the window's points, then the
    geometric mean over seeds, as in ratios.csv."""
    where = (f"Ratio 1 (fw loss) in epochs {window_label(window)}, "
             f"{size_label(arm.setting['depth'], arm.setting['width'])}, {arm_label(arm.setting)}")
    low, high = log_ratio_ci(seeds)
    return (f"{where}: geometric mean {num(geometric_mean(seeds))} over n = {len(seeds)} seeds, each averaged over "
            f"its points first{interval({'ci_low': low, 'ci_high': high})}; {int((seeds > 1).sum())} of {len(seeds)} "
            "seeds above 1.")


def _window_skip(window: EpochWindow, arm: Arm, points: pd.DataFrame) -> dict:
    """Why a window has no ratio 1 for the arm: no validation point in it, or none with a baseline point."""
    own = points[points.run_id.isin(arm.runs)]
    inside = own[(own.nominal_epoch >= window.start) & (own.nominal_epoch <= window.stop)]
    reason = ("empty window: no validation point" if inside.empty else
              f"none of the {len(inside)} validation points has a p_bw = 0 point of the same seed within half an eval "
              "interval")
    return skip(f"{QUESTION}, epochs {window_label(window)}", reason, arm.setting)


def _windows(analysis: Analysis, group: list[Arm]) -> list[tuple[EpochWindow, Arm, pd.Series]]:
    """Each window's and arm's seeds (_window_seeds), for the arms of one group (figures.arm_groups)."""
    return [(window, arm, _window_seeds(window, arm)) for window in analysis.windows for arm in group]


def statements(analysis: Analysis) -> list[str]:
    """The paired change of every setting with a seed pair, then per arm ratio 1 over sizes and per window."""
    paired = analysis.paired
    variant = with_variant(paired)
    power = analysis.power.to_dict("records")  # one row per paired row: both follow analysis.arms
    said = [_paired_statement(row, variant, p) for row, p in zip(paired.to_dict("records"), power, strict=True)
            if row["n"] > 0]
    for key, group in arm_groups(analysis.arms):
        final = select(analysis.ratios, {**key, "ratio": "ratio1", "metric": "loss", "phase": "final", "axis": "epoch"})
        said += [s for s in [_ratio1_statement(final, key)] if s]
        said += [_window_statement(w, arm, seeds) for w, arm, seeds in _windows(analysis, group) if len(seeds)]
    return said


def skipped(analysis: Analysis) -> list[dict]:
    """The settings without a comparable p_bw = 0 run, then of the others those without a paired interval and
    their windows without a value."""
    no_baseline = [skip(QUESTION, row["reason"], row) for row in analysis.skipped.to_dict("records")]
    unpaired = [skip(QUESTION, reason, row) for row in with_baseline(analysis)
                if (reason := pair_reason(row["n"], row["pct_ci_low"]))]
    windows = [_window_skip(w, arm, analysis.points) for _, group in arm_groups(analysis.arms)
               for w, arm, seeds in _windows(analysis, group) if seeds.empty and arm.baseline]
    return no_baseline + unpaired + windows


def answer_rows(analysis: Analysis, leaking: set[str]) -> list[dict]:
    """The percent change of final fw loss of every leak-free setting with an interval."""
    rows = zip(analysis.paired.to_dict("records"), analysis.power.to_dict("records"), strict=True)
    return [answer_row(QUESTION, f"{size_label(row['depth'], row['width'])}, {setting_label(row, True)}: final fw loss",
                       "%", row["pct_change"], (row["pct_ci_low"], row["pct_ci_high"]), row["n"], "seed",
                       percent_verdict(row["pct_ci_low"], row["pct_ci_high"], power["mde_percent"]))
            for row, power in rows if row["bw_mask"] not in leaking and not pair_reason(row["n"], row["pct_ci_low"])]


def section(inputs: Inputs) -> tuple[str, list[tuple]]:
    analysis, ratios = inputs.analysis, inputs.analysis.ratios
    by_data = ratios[(ratios.phase != CUT_PHASE) & ratios.axis.isin(["epoch", "fw_tokens"])]
    return (TITLE, [
        ("ul", statements(analysis)), *shown(inputs, "equal_data"),
        ("p", "Mean over seeds of each run's last validation loss, with its 95% t interval "
              "(undefined, empty, with one seed)."),
        ("table", "final_losses", analysis.final_losses),
        ("p", "Final fw loss at p_bw = x minus at p_bw = 0, paired by seed (only seeds present in both). "
              "exceeds_noise: the 95% t interval of the percent change (the per-seed log ratio) excludes 0."),
        ("table", "paired", analysis.paired),
        ("p", "Final and epoch-window ratios over epochs and fw tokens."),
        ("table", "ratios", by_data),
    ])
