"""The study's metrics (SPEC section 1) as pure functions over the tidy results table of a sweep.

ratio 1 = metric_fw(p_bw = 0) / metric_fw(p_bw = x), same model size and bw_mode/bw_mask/task_tokens;
          above 1: training on the bw task helped the fw task.
ratio 2 = metric_fw / metric_bw, same setting; below 1: fw is easier than bw.
mean_then_ratio: mean over seeds per setting, then the ratio.
ratio_then_mean: the ratio per run pair (ratio 1: the p_bw = x and p_bw = 0 runs of one seed;
                 ratio 2: fw and bw of one run), then the mean.

The n next to a value counts what it rests on: p_bw = x runs (ratio 1, mean_then_ratio; 0 when the
size has no p_bw = 0 run), run pairs (ratio 1, ratio_then_mean), runs (ratio 2), validation points
(epoch windows). n = 0 means there is no value. Only runs with status "done" enter any statistic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

SIZE = ["depth", "width"]
VARIANT = ["bw_mode", "bw_mask", "task_tokens"]
ARM = ["p_bw", *VARIANT]
SETTING = [*SIZE, *ARM]
METRICS = ("loss", "ppl")
DIRECTIONS = ("fw", "bw")

Window = tuple[float, float | str]  # (first epoch, last epoch or "end"), both inclusive
DEFAULT_WINDOWS: tuple[Window, ...] = ((0.0, 1.0), (0.0, "end"), (5.0, "end"))

RESULT_COLUMNS = [
    "run_id", "data", "tokenizer", *SETTING, "num_params", "seq_len", "seed", "step", "tokens",
    "epoch", "seconds", "direction", "loss", "acc", "ppl", "phase", "blocks_remaining", "status",
    "leaks_labels", "probe_leak_bw", "error",
]
RUN_INFO = [
    "data", "tokenizer", *SETTING, "num_params", "seq_len", "seed", "status", "leaks_labels",
    "probe_leak_bw", "error",
]
RATIO_COLUMNS = [
    "metric", "ratio", "averaging", *SIZE, *ARM, "phase", "epoch_start", "epoch_stop",
    "blocks_remaining", "value", "n",
]
FINAL_LOSS_COLUMNS = [
    *SETTING, "num_params", "n_seeds",
    "fw_loss_mean", "fw_loss_ci_low", "fw_loss_ci_high",
    "bw_loss_mean", "bw_loss_ci_low", "bw_loss_ci_high",
]
PAIRED_COLUMNS = [
    *SETTING, "num_params", "n", "mean_diff", "ci_low", "ci_high", "exceeds_noise",
    "unpaired_seeds_x", "unpaired_seeds_base",
]
AUDIT_COLUMNS = [
    "run_id", *SETTING, "seed", "leaks_labels", "probe_leak_bw", "loss_fw", "loss_bw",
    "bw_fw_loss_ratio",
]
SAMPLE_COLUMNS = [
    *SETTING, "num_params", "seed", "run_id", "run_id_base", "epoch", "epoch_base",
    "ratio1_loss", "ratio1_ppl",
]


# ----------------------------------------------------------------------------- runs and points

def check_columns(df: pd.DataFrame) -> None:
    missing = [c for c in RESULT_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"results table lacks columns: {', '.join(missing)}")


def runs_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run (every status): its settings, status, error, and its last tokens, epoch, seconds."""
    check_columns(df)
    groups = df.groupby("run_id", sort=True)
    runs = groups[RUN_INFO].first()
    runs[["tokens", "epoch", "seconds"]] = groups[["tokens", "epoch", "seconds"]].max()
    return runs.reset_index()


def unfinished_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Runs that failed or have not finished: excluded from the statistics, listed in the report."""
    runs = runs_table(df)
    return runs[runs.status != "done"].reset_index(drop=True)


def eval_points(df: pd.DataFrame, phase: str = "train-eval") -> pd.DataFrame:
    """Done runs' evaluations in `phase`, one row per point with loss_fw, loss_bw, ppl_fw, ppl_bw."""
    rows = df[(df.status == "done") & (df.phase == phase) & df.direction.notna()]
    key = ["run_id", "step", "epoch", "blocks_remaining"]
    fw, bw = (
        rows.loc[rows.direction == d, [*key, *METRICS]].rename(columns={m: f"{m}_{d}" for m in METRICS})
        for d in DIRECTIONS
    )
    wide = fw.merge(bw, on=key, how="outer")
    info = runs_table(df)[["run_id", *SETTING, "num_params", "seed"]]
    wide = wide.merge(info, on="run_id")
    return wide.sort_values(["run_id", "step", "blocks_remaining"], ascending=[True, True, False], ignore_index=True)


def _last(points: pd.DataFrame) -> pd.DataFrame:
    return points[points.step == points.groupby("run_id").step.transform("max")].reset_index(drop=True)


def final_points(df: pd.DataFrame) -> pd.DataFrame:
    """Each done run's last validation point (max step), one row per run."""
    return _last(eval_points(df))


def _concat(frames: Iterable[pd.DataFrame], columns: Sequence[str]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(columns))


def _cut(df: pd.DataFrame, final: pd.DataFrame) -> pd.DataFrame:
    """Layer-cut points, the full model (blocks_remaining == depth) being the final validation point."""
    return _concat([final, eval_points(df, "cut")], final.columns)


def select(frame: pd.DataFrame, values: dict) -> pd.DataFrame:
    """Rows of `frame` whose columns equal `values` (column -> value)."""
    mask = np.ones(len(frame), dtype=bool)
    for column, value in values.items():
        mask &= (frame[column] == value).to_numpy(dtype=bool)
    return frame[mask]


# ----------------------------------------------------------------------------- arms and baselines

@dataclass
class Arm:
    """A setting with p_bw > 0, its done runs, and the p_bw = 0 runs it is compared against."""

    setting: dict
    runs: list[str]
    baseline: list[str]  # one run per seed


def _baseline(final: pd.DataFrame, setting: dict) -> pd.DataFrame:
    """p_bw = 0 runs of the setting's size and task_tokens, one per seed; those with the same
    bw_mode/bw_mask where the sweep has them, else the size's shared p_bw = 0 runs (at p_bw = 0
    the bw settings do not change training)."""
    zero = select(final, {**{k: setting[k] for k in SIZE}, "p_bw": 0.0, "task_tokens": setting["task_tokens"]})
    exact = select(zero, {k: setting[k] for k in ("bw_mode", "bw_mask")})
    chosen = exact if len(exact) else zero
    return chosen.sort_values("run_id").drop_duplicates("seed")


def arms(final: pd.DataFrame) -> list[Arm]:
    """Every setting with p_bw > 0 among `final` (= final_points(df)), with its baseline runs."""
    settings = final.loc[final.p_bw > 0, SETTING].drop_duplicates().sort_values(SETTING)
    return [
        Arm(s, select(final, s).run_id.tolist(), _baseline(final, s).run_id.tolist())
        for s in settings.to_dict("records")
    ]


# ----------------------------------------------------------------------------- ratios

def _pairs(points: pd.DataFrame, arm_list: list[Arm]) -> pd.DataFrame:
    """Each p_bw = x point next to the baseline point of the same seed and blocks_remaining."""
    base_cols = ["run_id", "seed", "blocks_remaining", "loss_fw", "ppl_fw"]
    frames = [
        points[points.run_id.isin(arm.runs)].merge(
            points.loc[points.run_id.isin(arm.baseline), base_cols],
            on=["seed", "blocks_remaining"], suffixes=("", "_base"),
        )
        for arm in arm_list
    ]
    pairs = _concat(frames, [*points.columns, "run_id_base", "loss_fw_base", "ppl_fw_base"])
    for m in METRICS:
        pairs[f"ratio1_{m}"] = pairs[f"{m}_fw_base"].astype(float) / pairs[f"{m}_fw"].astype(float)
    return pairs


def final_pairs(df: pd.DataFrame) -> pd.DataFrame:
    """Ratio 1 (loss and ppl) of final points per seed pair: the samples behind ratio_then_mean."""
    final = final_points(df)
    return _pairs(final, arms(final))


def _ratio1(points: pd.DataFrame, arm_list: list[Arm], metric: str) -> pd.DataFrame:
    """Ratio 1 of `metric` per arm and blocks_remaining, both averagings."""
    col, pairs, rows = f"{metric}_fw", _pairs(points, arm_list), []
    for arm in arm_list:
        x = points[points.run_id.isin(arm.runs)].groupby("blocks_remaining")[col].agg(["mean", "count"])
        base = points[points.run_id.isin(arm.baseline)].groupby("blocks_remaining")[col].mean()
        paired = select(pairs, arm.setting).groupby("blocks_remaining")[f"ratio1_{metric}"].agg(["mean", "count"])
        for k, (mean_x, n_x) in x.iterrows():
            has_base = k in base.index
            rows.append({**arm.setting, "blocks_remaining": k, "averaging": "mean_then_ratio",
                         "value": base[k] / mean_x if has_base else math.nan, "n": int(n_x) if has_base else 0})
            rows.append({**arm.setting, "blocks_remaining": k, "averaging": "ratio_then_mean",
                         "value": paired["mean"].get(k, math.nan), "n": int(paired["count"].get(k, 0))})
    return pd.DataFrame(rows)


def _ratio2(points: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Ratio 2 of `metric` per setting and blocks_remaining, both averagings, over runs with fw and bw."""
    fw, bw = f"{metric}_fw", f"{metric}_bw"
    both = points.dropna(subset=[fw, bw])
    if both.empty:
        return pd.DataFrame()
    both = both.assign(r=both[fw].astype(float) / both[bw].astype(float))
    agg = both.groupby([*SETTING, "blocks_remaining"]).agg(
        fw=(fw, "mean"), bw=(bw, "mean"), r=("r", "mean"), n=("r", "size")
    ).reset_index()
    keys = agg[[*SETTING, "blocks_remaining", "n"]]
    both_ways = pd.concat([
        keys.assign(averaging="mean_then_ratio", value=agg.fw / agg.bw),
        keys.assign(averaging="ratio_then_mean", value=agg.r),
    ])
    return both_ways.sort_values([*SETTING, "blocks_remaining", "averaging"], ignore_index=True)


def _samples(points: pd.DataFrame, arm_list: list[Arm]) -> pd.DataFrame:
    """Ratio 1 at every validation point of every p_bw = x run, against the baseline run of the same
    seed at the nearest epoch (steps of two runs need not align; epochs do when both evaluate on the
    same epoch grid)."""
    base_cols = ["run_id", "seed", "epoch", "loss_fw", "ppl_fw"]
    frames = []
    for arm in arm_list:
        x = points[points.run_id.isin(arm.runs)].sort_values("epoch")
        base = points.loc[points.run_id.isin(arm.baseline), base_cols].sort_values("epoch")
        matched = pd.merge_asof(x, base.assign(epoch_base=base.epoch), on="epoch", by="seed",
                                direction="nearest", suffixes=("", "_base"))
        frames.append(matched.dropna(subset=["run_id_base"]))
    samples = _concat(frames, [*points.columns, "run_id_base", "epoch_base", "loss_fw_base", "ppl_fw_base"])
    for m in METRICS:
        samples[f"ratio1_{m}"] = samples[f"{m}_fw_base"].astype(float) / samples[f"{m}_fw"].astype(float)
    return samples[SAMPLE_COLUMNS].reset_index(drop=True)


def ratio1_samples(df: pd.DataFrame) -> pd.DataFrame:
    """Ratio 1 (loss and ppl) at every validation point: the samples of the epoch-window violins."""
    points = eval_points(df)
    return _samples(points, arms(_last(points)))


def resolve_windows(windows: Sequence[Window], end: float) -> list[tuple[float, float]]:
    """Replace "end" by the last epoch of the sweep (NaN when there is none: the window is empty)."""
    return [(float(lo), float(end) if hi == "end" else float(hi)) for lo, hi in windows]


def _window_rows(samples: pd.DataFrame, arm_list: list[Arm], spans: list[tuple[float, float]]) -> pd.DataFrame:
    """Mean ratio 1 over the samples of each epoch window; an empty window gives value NaN, n = 0."""
    rows = []
    for arm in arm_list:
        own = select(samples, arm.setting)
        for lo, hi in spans:
            inside = own[(own.epoch >= lo) & (own.epoch <= hi)]
            for m in METRICS:
                rows.append({**arm.setting, "metric": m, "averaging": "ratio_then_mean", "epoch_start": lo,
                             "epoch_stop": hi, "value": inside[f"ratio1_{m}"].mean(), "n": len(inside)})
    return pd.DataFrame(rows)


def ratios_table(df: pd.DataFrame, windows: Sequence[Window] = DEFAULT_WINDOWS) -> pd.DataFrame:
    """Every ratio of the study, in the columns of ratios.csv (RATIO_COLUMNS). Phases: "final" (each
    run's last validation point), "window" (ratio 1 over validation points in an epoch window),
    "cut" (ratio 1 of ppl and ratio 2 of loss over blocks remaining). Cells that do not apply are NA."""
    points = eval_points(df)
    final = _last(points)
    arm_list = arms(final)
    cut = _cut(df, final)
    spans = resolve_windows(windows, points.epoch.max())
    samples = _samples(points, arm_list)
    parts = [_ratio1(final, arm_list, m).assign(metric=m, ratio="ratio1", phase="final") for m in METRICS]
    parts += [_ratio2(final, m).assign(metric=m, ratio="ratio2", phase="final") for m in METRICS]
    parts += [_window_rows(samples, arm_list, spans).assign(ratio="ratio1", phase="window")]
    parts += [_ratio1(cut, arm_list, "ppl").assign(metric="ppl", ratio="ratio1", phase="cut")]
    parts += [_ratio2(cut, "loss").assign(metric="loss", ratio="ratio2", phase="cut")]
    table = _concat(parts, RATIO_COLUMNS).reindex(columns=RATIO_COLUMNS)
    table["blocks_remaining"] = table.blocks_remaining.where(table.phase == "cut")
    return table.astype({"blocks_remaining": "Int64", "epoch_start": float, "epoch_stop": float,
                         "value": float, "n": int})


# ----------------------------------------------------------------------------- seed noise

def mean_ci(values: Iterable[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and t interval: mean ± t_{(1+confidence)/2, n-1} · s / sqrt(n), s the sample standard
    deviation (ddof 1). NaNs are dropped; with fewer than 2 values the interval is undefined (NaN)."""
    v = np.asarray(list(values), dtype=float)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if len(v) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf((1 + confidence) / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return mean, mean - half, mean + half


def final_losses(df: pd.DataFrame) -> pd.DataFrame:
    """Per setting: mean and 95% t interval over seeds of the final fw and bw loss."""
    rows = []
    for setting, runs in final_points(df).groupby(SETTING, sort=True):
        row = {**dict(zip(SETTING, setting)), "num_params": runs.num_params.iloc[0], "n_seeds": len(runs)}
        for d in DIRECTIONS:
            row |= dict(zip([f"{d}_loss_mean", f"{d}_loss_ci_low", f"{d}_loss_ci_high"], mean_ci(runs[f"loss_{d}"])))
        rows.append(row)
    return pd.DataFrame(rows, columns=FINAL_LOSS_COLUMNS)


def _seed_list(seeds: Iterable[int]) -> str:
    return " ".join(str(s) for s in sorted(seeds))


def paired_comparison(df: pd.DataFrame) -> pd.DataFrame:
    """Per p_bw > 0 setting: final fw loss at p_bw = x minus at p_bw = 0, paired by seed (only seeds
    with both runs). exceeds_noise: the 95% t interval of the mean difference excludes 0 (NA when
    the interval is undefined, n < 2)."""
    final = final_points(df)
    rows = []
    for arm in arms(final):
        x, base = final[final.run_id.isin(arm.runs)], final[final.run_id.isin(arm.baseline)]
        pairs = x.merge(base[["seed", "loss_fw"]], on="seed", suffixes=("", "_base"))
        mean, lo, hi = mean_ci(pairs.loss_fw - pairs.loss_fw_base)
        rows.append({
            **arm.setting, "num_params": x.num_params.iloc[0], "n": len(pairs),
            "mean_diff": mean, "ci_low": lo, "ci_high": hi,
            "exceeds_noise": pd.NA if math.isnan(lo) else bool(lo > 0 or hi < 0),
            "unpaired_seeds_x": _seed_list(set(x.seed) - set(base.seed)),
            "unpaired_seeds_base": _seed_list(set(base.seed) - set(x.seed)),
        })
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS).astype({"exceeds_noise": "boolean"})


# ----------------------------------------------------------------------------- mask audit

def mask_audit(df: pd.DataFrame) -> pd.DataFrame:
    """Per done run: leaks_labels (config), probe_leak_bw (perturbation probe), final losses and
    bw/fw loss ratio. A leak-free bw task is about as hard as fw (ratio near 1)."""
    flags = runs_table(df)[["run_id", "leaks_labels", "probe_leak_bw"]]
    audit = final_points(df).merge(flags, on="run_id")
    audit["bw_fw_loss_ratio"] = audit.loss_bw.astype(float) / audit.loss_fw.astype(float)
    return audit[AUDIT_COLUMNS]


def mask_summary(audit: pd.DataFrame) -> pd.DataFrame:
    """Per bw_mask, over runs trained on bw (p_bw > 0): mean bw/fw final loss ratio, whether the
    config says the mask leaks labels, and how many probed runs the probe caught leaking."""
    rows = []
    for mask, runs in audit[audit.p_bw > 0].groupby("bw_mask", sort=True):
        probed = runs[runs.probe_leak_bw.notna()]
        leaking = probed[probed.probe_leak_bw.astype(bool)]
        rows.append({"bw_mask": mask, "runs": len(runs), "bw_fw_loss_ratio": runs.bw_fw_loss_ratio.mean(),
                     "leaks_labels": bool(runs.leaks_labels.astype(bool).any()), "probed": len(probed),
                     "probe_leaks": len(leaking), "probe_leak_runs": " ".join(leaking.run_id)})
    return pd.DataFrame(rows, columns=["bw_mask", "runs", "bw_fw_loss_ratio", "leaks_labels", "probed",
                                       "probe_leaks", "probe_leak_runs"])
