"""Many epochs over little data (docs/method.md#overfitting): each run's best and final fw
validation loss, how far it rose after its best, the epoch of its best (where it starts to overfit)
and its train-val gap, and their paired changes with bw training at equal data and at equal compute.

A run's points are its validation evaluations (stats.eval_points); its training-split points are
the same evaluations on the fixed training windows (train_eval_tokens; phase "train-split"). The
gap at a point is val fw loss - training-split fw loss. A run whose best fw loss is at its last
point has not yet overfit: its best epoch is censored at the budget (best_at_end), so the change
of the best epoch is taken only over seed pairs where neither run is censored.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pandas as pd

from fwbw.analysis.effects import detectable_noncentrality
from fwbw.analysis.stats import EPOCH_EPSILON, SETTING, Arm, concat_tables, mean_ci
from fwbw.study.results import TRAIN_SPLIT_PHASE

RUN_KEY = ["run_id", *SETTING, "num_params", "seed"]
RUN_FIT_COLUMNS = [
    *RUN_KEY, "best_fw_loss", "best_epoch", "last_epoch", "best_at_end", "final_fw_loss", "rise_after_best",
    "final_train_fw_loss", "final_gap", "gap_at_best", "final_flops",
]


class Measure(NamedTuple):
    name: str  # as the report writes it
    budget: str  # "equal data" or "equal compute"
    unit: str
    above: str  # what a change above 0 means
    below: str


LOSS_WORDS = ("higher with bw training", "lower with bw training")
MEASURES = {
    "best_fw_loss": Measure("best fw val loss", "equal data", "nats", *LOSS_WORDS),
    "final_fw_loss": Measure("final fw val loss", "equal data", "nats", *LOSS_WORDS),
    "rise_after_best": Measure("rise of fw val loss after its best", "equal data", "nats",
                               "overfits more with bw training", "overfits less with bw training"),
    "best_epoch": Measure("epoch of the best", "equal data", "epochs", "later with bw training", "earlier with bw training"),
    "final_gap": Measure("final train–val gap", "equal data", "nats", "wider with bw training", "narrower with bw training"),
    "best_fw_loss_equal_flops": Measure("best fw val loss", "equal compute", "nats", *LOSS_WORDS),
    "final_fw_loss_equal_flops": Measure("final fw val loss", "equal compute", "nats", *LOSS_WORDS),
}
EFFECT_COLUMNS = [
    *SETTING, "num_params", "measure", "budget", "unit", "n", "base_mean", "base_ci_low", "base_ci_high", "x_mean",
    "mean_diff", "ci_low", "ci_high", "mde", "n_pairs", "x_best_at_end", "base_best_at_end",
]
FIT_CURVE_COLUMNS = [*SETTING, "num_params", "split", "nominal_epoch", "flops", "n", "mean", "ci_low", "ci_high"]


def train_split_points(df: pd.DataFrame, points: pd.DataFrame) -> pd.DataFrame:
    """The training-split fw loss of `points`' runs at their steps (column train_fw_loss; NaN where a
    run did not evaluate its training windows)."""
    rows = df[(df.phase == TRAIN_SPLIT_PHASE) & (df.direction == "fw")][["run_id", "step", "loss"]]
    rows = rows.rename(columns={"loss": "train_fw_loss"}).astype({"step": points.step.dtype})
    return points.merge(rows, on=["run_id", "step"], how="left")


def run_fit(points: pd.DataFrame) -> pd.DataFrame:
    """One row per run of `points` (train_split_points): best and final fw loss, best epoch, gap."""
    rows = [_run_fit_row(run.sort_values("step")) for _, run in points.groupby("run_id")]
    return pd.DataFrame(rows, columns=RUN_FIT_COLUMNS)


def _run_fit_row(run: pd.DataFrame) -> dict:
    best, last = run.loc[run.loss_fw.astype(float).idxmin()], run.iloc[-1]
    return {
        **{c: last[c] for c in RUN_KEY},
        "best_fw_loss": float(best.loss_fw), "best_epoch": float(best.nominal_epoch),
        "last_epoch": float(last.nominal_epoch), "best_at_end": bool(best.step == last.step),
        "final_fw_loss": float(last.loss_fw), "rise_after_best": float(last.loss_fw - best.loss_fw),
        "final_train_fw_loss": float(last.train_fw_loss),
        "final_gap": float(last.loss_fw - last.train_fw_loss), "gap_at_best": float(best.loss_fw - best.train_fw_loss),
        "final_flops": float(last.flops),
    }


def _equal_flops(x_run: pd.DataFrame, budget: float) -> dict[str, float]:
    """The p_bw = x run within the baseline's training FLOPs `budget`: its best fw loss over its
    points that spent no more, and its fw loss interpolated at the budget (NaN when it did not
    reach it, or a cost is unknown)."""
    flops, loss = x_run.flops.to_numpy(dtype=float), x_run.loss_fw.to_numpy(dtype=float)
    if not (np.isfinite(flops).all() and math.isfinite(budget)):
        return {"best_fw_loss_equal_flops": math.nan, "final_fw_loss_equal_flops": math.nan}
    within = flops <= budget * (1 + EPOCH_EPSILON)
    return {"best_fw_loss_equal_flops": float(loss[within].min()) if within.any() else math.nan,
            "final_fw_loss_equal_flops": float(np.interp(budget, flops, loss, left=math.nan, right=math.nan))}


def _seed_pairs(arm: Arm, fit: pd.DataFrame, points: pd.DataFrame) -> pd.DataFrame:
    """Per seed with both runs: each measure of the p_bw = x run (x_<measure>) and of the baseline
    (base_<measure>); a censored best epoch (best_at_end) is NaN."""
    base = fit[fit.run_id.isin(arm.baseline)].set_index("seed")
    rows = []
    for x in fit[fit.run_id.isin(arm.runs)].to_dict("records"):
        if x["seed"] not in base.index:
            continue
        b = base.loc[x["seed"]].to_dict()
        x = {**x, **_equal_flops(points[points.run_id == x["run_id"]].sort_values("step"), b["final_flops"])}
        b = {**b, "best_fw_loss_equal_flops": b["best_fw_loss"], "final_fw_loss_equal_flops": b["final_fw_loss"]}
        rows.append({f"{arm_name}_{key}": value
                     for arm_name, run in (("x", x), ("base", b))
                     for key, value in {**{m: run[m] for m in MEASURES}, "best_at_end": run["best_at_end"],
                                        "best_epoch": math.nan if run["best_at_end"] else run["best_epoch"]}.items()})
    return pd.DataFrame(rows)


def _effect(x: pd.Series, base: pd.Series) -> dict:
    """The paired change x - base over the pairs where both are known: means, the 95% t interval
    (none when every pair differs by the same amount, as best epochs on a coarse grid can), the
    baseline's own interval, and the smallest mean change a paired t test at effects.ALPHA detects
    with effects.POWER (mde)."""
    known = (x - base).notna()
    x, base = x[known].astype(float), base[known].astype(float)
    diff = x - base
    mean, low, high = mean_ci(diff)
    spread = diff.std() if len(diff) >= 2 else 0.0
    if spread == 0:
        low = high = math.nan
    mde = detectable_noncentrality(len(diff) - 1) * spread / math.sqrt(len(diff)) if spread else math.nan
    _, base_low, base_high = mean_ci(base)
    return {"n": len(diff), "base_mean": base.mean(), "base_ci_low": base_low, "base_ci_high": base_high,
            "x_mean": x.mean(), "mean_diff": mean, "ci_low": low, "ci_high": high, "mde": mde}


def overfitting_effects(fit: pd.DataFrame, points: pd.DataFrame, arm_list: list[Arm]) -> pd.DataFrame:
    """Per arm and measure (MEASURES): _effect over its seed pairs (n of the n_pairs seed pairs
    where both values are known); x_best_at_end / base_best_at_end count the paired runs still
    improving at their last point."""
    rows = []
    for arm in arm_list:
        pairs = _seed_pairs(arm, fit, points)
        if pairs.empty:
            continue
        common = {**arm.setting, "num_params": fit.loc[fit.run_id.isin(arm.runs), "num_params"].iloc[0],
                  "n_pairs": len(pairs), "x_best_at_end": int(pairs.x_best_at_end.sum()),
                  "base_best_at_end": int(pairs.base_best_at_end.sum())}
        rows += [{**common, "measure": measure, "budget": spec.budget, "unit": spec.unit,
                  **_effect(pairs[f"x_{measure}"], pairs[f"base_{measure}"])}
                 for measure, spec in MEASURES.items()]
    return pd.DataFrame(rows, columns=EFFECT_COLUMNS)


def fit_curves(points: pd.DataFrame) -> pd.DataFrame:
    """fw loss on validation and on the training split per setting and nominal epoch: mean over the
    runs evaluated there, with its 95% t interval, and the setting's mean FLOPs at that epoch."""
    frames = []
    for split, column in (("valid", "loss_fw"), ("train", "train_fw_loss")):
        groups = points.dropna(subset=[column]).groupby([*SETTING, "nominal_epoch"], dropna=False, sort=True)
        if groups.ngroups == 0:
            continue
        summary = groups.agg(num_params=("num_params", "first"), flops=("flops", "mean"), n=(column, "size"))
        interval = groups[column].apply(lambda losses: pd.Series(mean_ci(losses), index=["mean", "ci_low", "ci_high"]))
        frames.append(summary.join(interval.unstack()).reset_index().assign(split=split))
    return concat_tables(frames, FIT_CURVE_COLUMNS).reindex(columns=FIT_CURVE_COLUMNS)
