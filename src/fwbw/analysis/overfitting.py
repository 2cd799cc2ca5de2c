"""Many epochs over little data (docs/method.md#overfitting): each run's best and final fw
validation loss, the epoch of its best (where it starts to overfit), and its train-val gap, and
their paired changes with bw training at equal data and at equal compute.

A run's points are its validation evaluations (stats.eval_points); its training-split points are
the same evaluations on the fixed training windows (train_eval_tokens; phase "train-split"). The
gap at a point is val fw loss - training-split fw loss. A run whose best fw loss is at its last
point has not yet overfit: its best epoch is censored at the budget (best_at_end).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from fwbw.analysis.stats import SETTING, Arm, concat_tables, mean_ci
from fwbw.study.results import TRAIN_SPLIT_PHASE

RUN_FIT_COLUMNS = [
    "run_id", *SETTING, "num_params", "seed", "best_fw_loss", "best_epoch", "last_epoch", "best_at_end",
    "final_fw_loss", "final_train_fw_loss", "final_gap", "gap_at_best", "final_flops",
]
# measure -> (budget, unit, what a change above / below 0 means)
LOSS_WORDS = ("higher with bw training", "lower with bw training")
MEASURES = {
    "best_fw_loss": ("equal data", "nats", *LOSS_WORDS),
    "final_fw_loss": ("equal data", "nats", *LOSS_WORDS),
    "best_epoch": ("equal data", "epochs", "later with bw training", "earlier with bw training"),
    "final_gap": ("equal data", "nats", "wider with bw training", "narrower with bw training"),
    "best_fw_loss_equal_flops": ("equal compute", "nats", *LOSS_WORDS),
    "final_fw_loss_equal_flops": ("equal compute", "nats", *LOSS_WORDS),
}
EFFECT_COLUMNS = [
    *SETTING, "num_params", "measure", "budget", "unit", "n", "base_mean", "x_mean", "mean_diff", "ci_low", "ci_high",
    "x_best_at_end", "base_best_at_end",
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
        **{c: last[c] for c in ["run_id", *SETTING, "num_params", "seed"]},
        "best_fw_loss": float(best.loss_fw), "best_epoch": float(best.nominal_epoch),
        "last_epoch": float(last.nominal_epoch), "best_at_end": bool(best.step == last.step),
        "final_fw_loss": float(last.loss_fw), "final_train_fw_loss": float(last.train_fw_loss),
        "final_gap": float(last.loss_fw - last.train_fw_loss), "gap_at_best": float(best.loss_fw - best.train_fw_loss),
        "final_flops": float(last.flops),
    }


def _equal_flops(x_run: pd.DataFrame, base_fit: dict) -> dict[str, float]:
    """The p_bw = x run within the baseline's training FLOPs: its best fw loss over its points that
    spent no more, and its fw loss interpolated at the baseline's final FLOPs (NaN when it did not
    reach them, or its cost is unknown)."""
    flops, loss = x_run.flops.to_numpy(dtype=float), x_run.loss_fw.to_numpy(dtype=float)
    budget = base_fit["final_flops"]
    if not (np.isfinite(flops).all() and math.isfinite(budget)):
        return {"best_fw_loss_equal_flops": math.nan, "final_fw_loss_equal_flops": math.nan}
    within = flops <= budget * (1 + 1e-9)
    final = float(np.interp(budget, flops, loss, left=math.nan, right=math.nan))
    return {"best_fw_loss_equal_flops": float(loss[within].min()) if within.any() else math.nan,
            "final_fw_loss_equal_flops": final}


def _seed_pairs(arm: Arm, fit: pd.DataFrame, points: pd.DataFrame) -> pd.DataFrame:
    """Per seed with both runs: each measure of the p_bw = x run (x_<measure>) and of the baseline."""
    base = fit[fit.run_id.isin(arm.baseline)].set_index("seed")
    rows = []
    for x in fit[fit.run_id.isin(arm.runs)].to_dict("records"):
        if x["seed"] not in base.index:
            continue
        b = base.loc[x["seed"]].to_dict()
        x_run = points[points.run_id == x["run_id"]].sort_values("step")
        x = {**x, **_equal_flops(x_run, b)}
        b = {**b, "best_fw_loss_equal_flops": b["best_fw_loss"], "final_fw_loss_equal_flops": b["final_fw_loss"]}
        rows.append({**{f"x_{m}": x[m] for m in [*MEASURES, "best_at_end"]},
                     **{f"base_{m}": b[m] for m in [*MEASURES, "best_at_end"]}})
    return pd.DataFrame(rows)


def overfitting_effects(fit: pd.DataFrame, points: pd.DataFrame, arm_list: list[Arm]) -> pd.DataFrame:
    """Per arm and measure (MEASURES): the mean over seed pairs of x - baseline with its 95% t
    interval; x_best_at_end / base_best_at_end count the paired runs whose best is their last point."""
    rows = []
    for arm in arm_list:
        pairs = _seed_pairs(arm, fit, points)
        if pairs.empty:
            continue
        num_params = fit.loc[fit.run_id.isin(arm.runs), "num_params"].iloc[0]
        for measure, (budget, unit, *_) in MEASURES.items():
            mean, low, high = mean_ci(pairs[f"x_{measure}"] - pairs[f"base_{measure}"])
            rows.append({**arm.setting, "num_params": num_params, "measure": measure, "budget": budget, "unit": unit,
                         "n": int((pairs[f"x_{measure}"] - pairs[f"base_{measure}"]).notna().sum()),
                         "base_mean": pairs[f"base_{measure}"].mean(), "x_mean": pairs[f"x_{measure}"].mean(),
                         "mean_diff": mean, "ci_low": low, "ci_high": high,
                         "x_best_at_end": int(pairs.x_best_at_end.sum()),
                         "base_best_at_end": int(pairs.base_best_at_end.sum())})
    return pd.DataFrame(rows, columns=EFFECT_COLUMNS)


def fit_curves(points: pd.DataFrame) -> pd.DataFrame:
    """fw loss on validation and on the training split per setting and nominal epoch: mean over the
    runs evaluated there, with its 95% t interval, and the setting's mean FLOPs at that epoch."""
    frames = []
    for split, column in (("valid", "loss_fw"), ("train", "train_fw_loss")):
        measured = points.dropna(subset=[column])
        for key, group in measured.groupby([*SETTING, "nominal_epoch"], dropna=False, sort=True):
            mean, low, high = mean_ci(group[column])
            frames.append(pd.DataFrame([{**dict(zip([*SETTING, "nominal_epoch"], key)), "split": split,
                                         "num_params": group.num_params.iloc[0], "flops": group.flops.mean(),
                                         "n": len(group), "mean": mean, "ci_low": low, "ci_high": high}]))
    return concat_tables(frames, FIT_CURVE_COLUMNS).reindex(columns=FIT_CURVE_COLUMNS)
