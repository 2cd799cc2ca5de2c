"""The study's metrics (docs/method.md#the-research-question) over the tidy results table of a
sweep, and `Analysis`, the value holding every table, which sweep_analysis.analyse computes once
(with effects' tables) for the report to print and the figures to draw.

ratio 1 = metric_fw(p_bw = 0) / metric_fw(p_bw = x), same model size and variant (the p_bw = 0 runs
          of the same CONTEXT (data, tokenizer, seq_len, budget, eval_tokens, dtype, recipe), size, task_tokens and
          num_heads, preferring those of the same bw_mode/bw_mask);
          above 1: training on the bw task helped the fw task.
ratio 2 = metric_fw / metric_bw, same setting; below 1: fw is easier than bw.
mean_then_ratio: mean over the seeds present in both runs' settings (ratio 1) or over runs (ratio 2),
                 then the ratio.
ratio_then_mean: the ratio per run pair (ratio 1: the p_bw = x and p_bw = 0 runs of one seed;
                 ratio 2: fw and bw of one run), then their geometric mean exp(mean log ratio), the
                 centre of the interval below.

The n next to a value counts what it rests on: seed pairs (ratio 1, both averagings and epoch
windows, where each run is first averaged over the window's points), runs (ratio 2); n_x and n_base
count the seeds of each arm before pairing (ratio 1). n = 0 means there is no value. ci_low, ci_high:
the 95% t interval of the mean log ratio over seed pairs (runs for ratio 2), exponentiated (NaN
below 2). Validation points are placed at their nominal epoch (nominal_epochs). Only runs with
status "done" and finite validation losses (not diverged) enter any statistic; a setting with more than
one run of a seed counts its first (by run_id) in each arm.

Ratio 1 is compared along an axis (AXES): "epoch" pairs points by nominal epoch (within half an
eval interval); "fw_tokens", "flops" and "seconds" compare both runs at the same fw tokens seen,
training FLOPs or wall-clock seconds (training_cost; adaptive_p_bw runs have no fw_tokens or
flops, so they are compared on "epoch" and "seconds" only), the baseline's fw curve interpolated linearly
between its own points and never extrapolated. Final rows on those axes compare the two runs of a
seed where the shorter one (on that axis) ended; window rows take the p_bw = x points whose nominal
epoch is in the window. The percent change of fw loss is 100 (exp(mean log(x / base)) - 1) over seed
pairs, its interval the exponentiated t interval of the mean log: below 0, bw helped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from fwbw.model.config import ModelConfig
from fwbw.model.hlb_gpt import count_params, training_flops_per_token
from fwbw.model.masks import DIRECTIONS
from fwbw.study.results import COLUMNS, CUT_PHASE, EVAL_PHASE, PROBE_COLUMNS
from fwbw.training.config import LATER_FIELDS
from fwbw.training.evaluation import EVAL_METRICS
from fwbw.training.probes import probe_keys
from fwbw.training.trainer import TrainingDiverged

# what every compared run shares
CONTEXT = ["data", "tokenizer", "seq_len", "epochs", "train_tokens", "eval_tokens", "dtype", "recipe_id", *LATER_FIELDS]
SIZE = ["depth", "width", "model_scale"]  # model_scale: hlb-gpt's sizing, missing (NaN) for depth x width runs
VARIANT = ["bw_mode", "bw_mask", "task_tokens", "num_heads", "adaptive_p_bw"]
BASELINE_VARIANT = ["task_tokens", "num_heads"]  # what a p_bw = 0 baseline shares with its arm; the rest acts on bw steps only
ARM = ["p_bw", *VARIANT]
SETTING = [*CONTEXT, *SIZE, *ARM]  # everything that changes a run but its seed
RATIO_METRICS = ("loss", "ppl")
CUT_RATIOS = (("ratio1", "ppl"), ("ratio2", "loss"))  # (ratio, metric) taken over the layer cut
CONFIDENCE = 0.95
EPOCH_EPSILON = 1e-9  # float slack when an eval's epoch is divided into eval intervals
AXES = {"epoch": "nominal_epoch", "fw_tokens": "fw_tokens", "flops": "flops", "seconds": "seconds"}  # axis -> points column
PCT_AXES = {"": "epoch", "flops_": "flops"}  # paired.csv's percent-change columns: prefix -> axis

Window = tuple[float, float | str]  # (first nominal epoch, last nominal epoch or "end"), both inclusive
DEFAULT_WINDOWS: tuple[Window, ...] = ((0.0, 1.0), (0.0, "end"), (5.0, "end"))

# the results' columns that change from one validation point of a run to the next; the others
# hold one value per run, which the runs table shows with the trained setting first
POINT_COLUMNS = ("step", "tokens", "epoch", "seconds", "direction", *EVAL_METRICS, "phase", "blocks_remaining")
RUN_INFO = [*SETTING, *(c for c in COLUMNS if c not in {"run_id", *SETTING, *POINT_COLUMNS})]
RATIO_COLUMNS = [
    "metric", "ratio", "averaging", *CONTEXT, *SIZE, *ARM, "phase", "axis", "epoch_start", "epoch_stop",
    "blocks_remaining", "value", "n", "n_base", "n_x", "ci_low", "ci_high",
]
FINAL_LOSS_COLUMNS = [
    *SETTING, "num_params", "n_seeds", "n_diverged",
    "fw_loss_mean", "fw_loss_ci_low", "fw_loss_ci_high",
    "bw_loss_mean", "bw_loss_ci_low", "bw_loss_ci_high",
]
PAIRED_COLUMNS = [
    *SETTING, "num_params", "n", "mean_diff", "ci_low", "ci_high", "exceeds_noise",
    *(f"{prefix}{c}" for prefix in PCT_AXES for c in ("pct_change", "pct_ci_low", "pct_ci_high")),
    "unpaired_seeds_x", "unpaired_seeds_base",
]
AUDIT_COLUMNS = [
    "run_id", *SETTING, "seed", "leaks_labels", *PROBE_COLUMNS, "loss_fw", "loss_bw",
    "bw_fw_loss_ratio",
]
SAMPLE_COLUMNS = [
    *SETTING, "num_params", "seed", "run_id", "run_id_base", "axis", "axis_value", "epoch", "epoch_base",
    "nominal_epoch", *(f"ratio1_{m}" for m in RATIO_METRICS),
]
SKIPPED_COLUMNS = [*SETTING, "reason"]
RATIO1_CURVE_COLUMNS = [*SETTING, "axis", "nominal_epoch", "axis_value", "n", "mean", "ci_low", "ci_high"]
MASK_SUMMARY_COLUMNS = ["bw_mask", "runs", "bw_fw_loss_ratio", "leaks_labels", "probed", "probe_leaks",
                        "probe_leak_runs"]


# ----------------------------------------------------------------------------- runs and points

def check_columns(df: pd.DataFrame) -> None:
    """Refuse a table without the results columns; a table written before the later config
    fields gets them here, at the values its runs had (LATER_FIELDS)."""
    for column, value in LATER_FIELDS.items():
        if column not in df.columns:
            df[column] = value
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"results table lacks columns: {', '.join(missing)}")


def runs_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run (every status): its settings, status, error, and its last tokens, epoch, seconds."""
    check_columns(df)
    groups = df.groupby("run_id", sort=True)
    runs = groups[RUN_INFO].first()
    runs[["tokens", "epoch", "seconds"]] = groups[["tokens", "epoch", "seconds"]].max()
    return runs.reset_index()


def eval_points(df: pd.DataFrame, runs: pd.DataFrame, phase: str = EVAL_PHASE) -> pd.DataFrame:
    """Done runs' evaluations in `phase`, one row per point with <metric>_fw, <metric>_bw (EVAL_METRICS),
    its nominal_epoch, fw_tokens and flops (training_cost); `runs` is runs_table(df)."""
    rows = df[(df.status == "done") & (df.phase == phase) & df.direction.notna()]
    key = ["run_id", "step", "tokens", "epoch", "seconds", "blocks_remaining"]
    fw, bw = (
        rows.loc[rows.direction == d, [*key, *EVAL_METRICS]].rename(columns={m: f"{m}_{d}" for m in EVAL_METRICS})
        for d in DIRECTIONS
    )
    wide = fw.merge(bw, on=key, how="outer")
    wide = wide.merge(runs[["run_id", *SETTING, "eval_every_epochs", "num_params", "seed"]], on="run_id")
    wide = wide.sort_values(["run_id", "step", "blocks_remaining"], ascending=[True, True, False], ignore_index=True)
    return wide.assign(nominal_epoch=nominal_epochs(wide), **training_cost(wide))


def flops_per_token(depth: int, width: int, seq_len: int, num_params: float) -> float:
    """training_flops_per_token of a run's model shape at its seq_len. The vocabulary (with any task
    tokens) is recovered from num_params, which count_params makes linear in it (2 x width per
    token); NaN when num_params fits no vocabulary of the default shape."""
    if pd.isna(num_params):
        return math.nan
    shape = {"depth": int(depth), "width": int(width), "max_seq_len": int(seq_len)}
    extra, rest = divmod(int(num_params) - count_params(ModelConfig(vocab_size=2, **shape)), 2 * int(width))
    if rest or extra < 0:
        return math.nan
    return training_flops_per_token(ModelConfig(vocab_size=2 + extra, **shape), int(seq_len))


def training_cost(points: pd.DataFrame) -> dict[str, pd.Series]:
    """fw tokens seen and training FLOPs up to each point. A step of `tokens` trains fw on all of
    them and, with probability p_bw, bw too ("add": FLOPs (1 + p_bw) x the fw-only FLOPs), or bw
    instead of fw ("either": (1 - p_bw) fw tokens, the FLOPs of one task). The results hold no
    count of a run's bw steps, so p_bw is the configured one (its expectation), and the FLOPs per
    token are taken at the run's final seq_len (flops_per_token). An adaptive_p_bw run's p_bw moves
    during training, so its cost is unknown: NaN on both, and it is not compared on those axes."""
    shape = ["depth", "width", "seq_len", "num_params"]
    shapes = points[shape].drop_duplicates()
    shapes["per_token"] = [flops_per_token(*s) for s in shapes.itertuples(index=False)]
    fw_only = points[shape].merge(shapes, on=shape, how="left").per_token.to_numpy(dtype=float)
    tokens, p_bw, either = points.tokens.astype(float), points.p_bw.astype(float), points.bw_mode == "either"
    known = ~points.adaptive_p_bw.astype(bool)
    return {"fw_tokens": (tokens * (1 - p_bw.where(either, 0.0))).where(known),
            "flops": (tokens * fw_only * (1 + p_bw.where(~either, 0.0))).where(known)}


def nominal_epochs(points: pd.DataFrame) -> pd.Series:
    """The epoch each evaluation stands for: eval k (the first point at or past k eval intervals, so
    its raw epoch overshoots) stands for k * eval_every_epochs; a run's last point for its budget
    (train_tokens converted to epochs at the run's tokens per epoch, else epochs)."""
    interval = points.eval_every_epochs.astype(float)
    epoch = points.epoch.astype(float)
    scheduled = np.floor(epoch / interval + EPOCH_EPSILON) * interval
    tokens_per_epoch = points.tokens.astype(float) / epoch
    budget = (points.train_tokens.astype(float) / tokens_per_epoch).fillna(points.epochs.astype(float))
    last = points.step == points.groupby("run_id").step.transform("max")
    return scheduled.where(~last, budget)


def diverged_runs(points: pd.DataFrame, runs: pd.DataFrame) -> set[str]:
    """Done runs with a non-finite validation loss at any point in a direction they evaluate (a run
    with eval_bw false, or a fw-only run by default, has no bw loss: TrainConfig.evaluates_bw), and
    failed runs whose training diverged (error "TrainingDiverged: ...", as the sweep records it);
    `runs` is runs_table."""
    measured = {"fw": pd.Series(True, index=points.index),
                "bw": points.run_id.map(_evaluates_bw(runs)).fillna(True).astype(bool)}
    bad = pd.concat([~np.isfinite(points[f"loss_{d}"].astype(float)) & measured[d] for d in DIRECTIONS], axis=1)
    failed = (runs.status == "failed") & runs.error.fillna("").astype(str).str.startswith(TrainingDiverged.__name__)
    return set(points.run_id[bad.any(axis=1)]) | set(runs.run_id[failed])


def _evaluates_bw(runs: pd.DataFrame) -> pd.Series:
    """run_id -> whether the run evaluates the bw task: eval_bw where set, else whether it trains it."""
    eval_bw = runs.get("eval_bw", pd.Series(pd.NA, index=runs.index))
    trains_bw = runs.p_bw.astype(float) > 0
    return pd.Series(eval_bw.astype("boolean").fillna(trains_bw).astype(bool).to_numpy(), index=runs.run_id)


def last_points(points: pd.DataFrame) -> pd.DataFrame:
    """Each run's last point (max step), one row per run."""
    return points[points.step == points.groupby("run_id").step.transform("max")].reset_index(drop=True)


def concat_tables(frames: Iterable[pd.DataFrame], columns: Sequence[str]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(columns))


def select(frame: pd.DataFrame, values: dict) -> pd.DataFrame:
    """Rows of `frame` whose columns equal `values` (column -> value); a missing value (NaN,
    None) selects the rows missing it."""
    mask = np.ones(len(frame), dtype=bool)
    for column, value in values.items():
        matches = frame[column].isna() if pd.isna(value) else frame[column] == value
        mask &= matches.to_numpy(dtype=bool)
    return frame[mask]


# ----------------------------------------------------------------------------- arms and baselines

@dataclass
class Arm:
    """A setting with p_bw > 0, its done runs, and the p_bw = 0 runs it is compared against."""

    setting: dict
    runs: list[str]  # one run per seed
    baseline: list[str]  # one run per seed


def _same_size(final: pd.DataFrame, setting: dict, shared: Sequence[str]) -> pd.DataFrame:
    """The p_bw = 0 runs of the setting's size and BASELINE_VARIANT that also share `shared`."""
    return select(final, {**{k: setting[k] for k in [*shared, *SIZE, *BASELINE_VARIANT]}, "p_bw": 0.0})


def _baseline(final: pd.DataFrame, setting: dict) -> pd.DataFrame:
    """p_bw = 0 runs of the setting's CONTEXT, size and BASELINE_VARIANT, one per seed; those with the
    same bw_mode/bw_mask where the sweep has them, else the size's shared p_bw = 0 runs (at p_bw = 0
    the bw settings do not change training)."""
    zero = _same_size(final, setting, CONTEXT)
    exact = select(zero, {k: setting[k] for k in ("bw_mode", "bw_mask")})
    chosen = exact if len(exact) else zero
    return _first_per_seed(chosen)


def _first_per_seed(runs: pd.DataFrame) -> pd.DataFrame:
    """The first run (by run_id) of each seed: a seed counts once however many runs it has."""
    return runs.sort_values("run_id").drop_duplicates("seed")


def arms(final: pd.DataFrame) -> list[Arm]:
    """Every setting with p_bw > 0 among `final` (each done run's last validation point), with its
    baseline runs."""
    settings = final.loc[final.p_bw > 0, SETTING].drop_duplicates().sort_values(SETTING)
    return [
        Arm(s, _first_per_seed(select(final, s)).run_id.tolist(), _baseline(final, s).run_id.tolist())
        for s in settings.to_dict("records")
    ]


def _shown(value) -> str:
    return "none" if pd.isna(value) else f"{value:g}" if isinstance(value, float) else str(value)


def _no_baseline_reason(final: pd.DataFrame, setting: dict) -> str:
    """Why a setting has no p_bw = 0 run to compare with: none of its size, or those of its size differ
    in what the comparison must hold fixed (data, tokenizer, seq_len, budget, eval_tokens, dtype, recipe)."""
    zero = _same_size(final, setting, [])
    if zero.empty:
        return "no p_bw = 0 run of this size, task tokens and heads"
    differing = [
        f"{c} {_shown(setting[c])} here, {', '.join(sorted(map(_shown, zero[c].unique())))} at p_bw = 0"
        for c in CONTEXT if select(zero, {c: setting[c]}).empty
    ]
    return ("the p_bw = 0 runs of this size differ in " + "; ".join(differing or ["their combination of " + ", ".join(CONTEXT)])
            + ": not compared")


def skipped_table(final: pd.DataFrame, arm_list: list[Arm]) -> pd.DataFrame:
    """The p_bw > 0 settings left without ratio 1, each with its reason."""
    rows = [{**arm.setting, "reason": _no_baseline_reason(final, arm.setting)} for arm in arm_list if not arm.baseline]
    return pd.DataFrame(rows, columns=SKIPPED_COLUMNS)


# ----------------------------------------------------------------------------- ratios

def _ratio1_of_pairs(frames: list[pd.DataFrame], columns: Sequence[str]) -> pd.DataFrame:
    """p_bw = x points matched with baseline points (suffix _base) as one table, with ratio1_<metric> =
    fw metric of the baseline point / of the p_bw = x point; `columns` names the columns of the points."""
    pairs = concat_tables(frames, [*columns, "run_id_base", *(f"{m}_fw_base" for m in RATIO_METRICS)])
    for m in RATIO_METRICS:
        pairs[f"ratio1_{m}"] = pairs[f"{m}_fw_base"].astype(float) / pairs[f"{m}_fw"].astype(float)
    return pairs


def pairs_table(points: pd.DataFrame, arm_list: list[Arm]) -> pd.DataFrame:
    """Each p_bw = x point next to the baseline point of the same seed and blocks_remaining, with
    ratio 1 (loss and ppl); of the final points, the samples behind ratio_then_mean."""
    base_cols = ["run_id", "seed", "blocks_remaining", *(f"{m}_fw" for m in RATIO_METRICS)]
    frames = [
        points[points.run_id.isin(arm.runs)].merge(
            points.loc[points.run_id.isin(arm.baseline), base_cols],
            on=["seed", "blocks_remaining"], suffixes=("", "_base"),
        )
        for arm in arm_list
    ]
    return _ratio1_of_pairs(frames, points.columns)


def geometric_mean(ratios: Iterable[float]) -> float:
    """exp(mean log ratio): the centre of log_ratio_ci's interval (NaN without ratios)."""
    logs = np.log(np.asarray(list(ratios), dtype=float))
    return math.exp(logs.mean()) if len(logs) else math.nan


def log_ratio_ci(ratios: Iterable[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The t interval of the mean log ratio, exponentiated: ratios are summarised on the log scale."""
    _, low, high = mean_ci(np.log(np.asarray(list(ratios), dtype=float)), confidence)
    return math.exp(low), math.exp(high)


def _ratio1_pair_rows(setting: dict, x: pd.DataFrame, base: pd.DataFrame, pairs: pd.DataFrame,
                      metric: str) -> list[dict]:
    """Both averagings of ratio 1 over the seeds with both runs (`pairs`); n_x, n_base count each
    arm's seeds before pairing."""
    col = f"ratio1_{metric}"
    counts = {"n": len(pairs), "n_x": x.seed.nunique(), "n_base": base.seed.nunique()}
    ci_low, ci_high = log_ratio_ci(pairs[col])
    common = {**setting, **counts, "ci_low": ci_low, "ci_high": ci_high}
    pooled = pairs[f"{metric}_fw_base"].astype(float).mean() / pairs[f"{metric}_fw"].astype(float).mean()
    return [{**common, "averaging": "mean_then_ratio", "value": pooled if len(pairs) else math.nan},
            {**common, "averaging": "ratio_then_mean", "value": geometric_mean(pairs[col])}]


def _ratio1(points: pd.DataFrame, pairs: pd.DataFrame, arm_list: list[Arm], metric: str) -> pd.DataFrame:
    """Ratio 1 of `metric` per arm and blocks_remaining, both averagings, over the seed pairs `pairs`
    (of `points`: pairs_table, or end_pairs on an axis)."""
    rows = []
    for arm in arm_list:
        x, base, own = points[points.run_id.isin(arm.runs)], points[points.run_id.isin(arm.baseline)], select(pairs, arm.setting)
        for k in sorted(x.blocks_remaining.unique()):
            at = {"blocks_remaining": k}
            rows += _ratio1_pair_rows({**arm.setting, **at}, select(x, at), select(base, at), select(own, at), metric)
    return pd.DataFrame(rows)


def _ratio2(points: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Ratio 2 of `metric` per setting and blocks_remaining, both averagings, over runs with fw and bw."""
    fw, bw = f"{metric}_fw", f"{metric}_bw"
    both = points.dropna(subset=[fw, bw])
    if both.empty:
        return pd.DataFrame()
    both = both.assign(r=both[fw].astype(float) / both[bw].astype(float))
    agg = both.groupby([*SETTING, "blocks_remaining"], dropna=False).agg(
        fw=(fw, "mean"), bw=(bw, "mean"), r=("r", geometric_mean), n=("r", "size"),
        ci_low=("r", lambda r: log_ratio_ci(r)[0]), ci_high=("r", lambda r: log_ratio_ci(r)[1]),
    ).reset_index()
    keys = agg[[*SETTING, "blocks_remaining", "n", "ci_low", "ci_high"]]
    both_ways = pd.concat([
        keys.assign(averaging="mean_then_ratio", value=agg.fw / agg.bw),
        keys.assign(averaging="ratio_then_mean", value=agg.r),
    ])
    return both_ways.sort_values([*SETTING, "blocks_remaining", "averaging"], ignore_index=True)


def _pair_tolerance(x: pd.DataFrame, base: pd.DataFrame) -> float:
    """Half the shorter eval interval of the two arms: points farther apart are not paired."""
    return 0.5 * min(x.eval_every_epochs.min(), base.eval_every_epochs.min())


def samples_table(points: pd.DataFrame, arm_list: list[Arm]) -> pd.DataFrame:
    """Ratio 1 (loss and ppl) at every validation point of every p_bw = x run, against the baseline
    run of the same seed at the nearest nominal epoch within half an eval interval (steps and raw
    epochs of two runs need not align): the samples of the epoch windows."""
    base_cols = ["run_id", "seed", "epoch", "nominal_epoch", *(f"{m}_fw" for m in RATIO_METRICS)]
    frames = []
    for arm in arm_list:
        x = points[points.run_id.isin(arm.runs)].sort_values("nominal_epoch")
        base = points.loc[points.run_id.isin(arm.baseline), base_cols].sort_values("nominal_epoch")
        if x.empty or base.empty:
            continue
        matched = pd.merge_asof(x, base, on="nominal_epoch", by="seed", direction="nearest",
                                tolerance=_pair_tolerance(x, points[points.run_id.isin(arm.baseline)]),
                                suffixes=("", "_base"))
        frames.append(matched.dropna(subset=["run_id_base"]))
    samples = _ratio1_of_pairs(frames, [*points.columns, "epoch_base"])
    return samples.assign(axis="epoch", axis_value=samples.nominal_epoch)[SAMPLE_COLUMNS].reset_index(drop=True)


def _same_seed_runs(points: pd.DataFrame, arm: Arm) -> Iterable[tuple[pd.DataFrame, pd.DataFrame]]:
    """(p_bw = x run, baseline run) point tables of each seed with both, both sorted by step."""
    base = points[points.run_id.isin(arm.baseline)]
    for _, x in points[points.run_id.isin(arm.runs)].sort_values("step").groupby("run_id"):
        same_seed = base[base.seed == x.seed.iloc[0]].sort_values("step")
        if len(same_seed):
            yield x, same_seed


def _fw_at(run: pd.DataFrame, column: str, at) -> dict[str, np.ndarray]:
    """The run's fw metrics interpolated linearly at `at` on `column`, NaN outside the run's points
    and everywhere when `column` does not increase strictly along the run (e.g. fw_tokens of a run
    that never trains fw, or an unknown cost): no interpolation is defined there."""
    along = run[column].to_numpy(dtype=float)
    if not (np.isfinite(along).all() and (np.diff(along) > 0).all()):
        return {f"{m}_fw": np.full(np.shape(at), math.nan) for m in RATIO_METRICS}
    return {f"{m}_fw": np.interp(at, along, run[f"{m}_fw"].to_numpy(dtype=float), left=math.nan, right=math.nan)
            for m in RATIO_METRICS}


def axis_samples(points: pd.DataFrame, arm_list: list[Arm], axis: str) -> pd.DataFrame:
    """Ratio 1 at every point of every p_bw = x run against the same-seed baseline's fw curve at the
    same `axis` value (not "epoch"), interpolated between the baseline's points; points outside the
    baseline's range are dropped, never extrapolated."""
    column, frames = AXES[axis], []
    for arm in arm_list:
        for x, base in _same_seed_runs(points, arm):
            at = x[column].to_numpy(dtype=float)
            base_fw = {f"{k}_base": v for k, v in _fw_at(base, column, at).items()}
            frames.append(x.assign(run_id_base=base.run_id.iloc[0], axis=axis, axis_value=at, **base_fw)
                          .dropna(subset=list(base_fw)))
    return _ratio1_of_pairs(frames, [*points.columns, "axis", "axis_value"]).reindex(columns=SAMPLE_COLUMNS)


def end_pairs(points: pd.DataFrame, arm_list: list[Arm], axis: str) -> pd.DataFrame:
    """Per seed pair, both runs' fw metrics where the shorter run on `axis` (not "epoch") ended:
    that run's last point, the other run interpolated between its points; a pair whose ranges do not
    overlap is dropped. One row per pair with the p_bw = x run's last point's settings, ratio 1."""
    column, frames = AXES[axis], []
    for arm in arm_list:
        for x, base in _same_seed_runs(points, arm):
            end = min(x[column].max(), base[column].max())
            base_fw = {f"{k}_base": v for k, v in _fw_at(base, column, end).items()}
            frames.append(x.tail(1).assign(run_id_base=base.run_id.iloc[0], axis=axis, axis_value=end,
                                           **_fw_at(x, column, end), **base_fw)
                          .dropna(subset=[*base_fw, *(f"{m}_fw" for m in RATIO_METRICS)]))
    return _ratio1_of_pairs(frames, [*points.columns, "axis", "axis_value"])


def final_pairs_table(points: pd.DataFrame, final: pd.DataFrame, arm_list: list[Arm]) -> pd.DataFrame:
    """The seed pairs behind each axis's final ratio 1 (column axis): "epoch" pairs the final points
    (pairs_table), the other AXES end_pairs."""
    epoch = pairs_table(final, arm_list)
    epoch = epoch.assign(axis="epoch", axis_value=epoch.nominal_epoch)
    return concat_tables([epoch, *(end_pairs(points, arm_list, a) for a in AXES if a != "epoch")], epoch.columns)


@dataclass(frozen=True)
class EpochWindow:
    """An epoch window of the study and the ratio 1 samples inside it."""

    asked: Window
    start: float
    stop: float  # "end" resolved to the sweep's last nominal epoch (NaN when there is none: the window is empty)
    samples: pd.DataFrame  # the ratio 1 samples with start <= nominal_epoch <= stop


def epoch_windows(windows: Sequence[Window], samples: pd.DataFrame, end: float) -> list[EpochWindow]:
    """Each window with "end" resolved to `end`, the sweep's last nominal epoch, and its samples."""
    out = []
    for asked in windows:
        start, stop = float(asked[0]), float(end) if asked[1] == "end" else float(asked[1])
        inside = samples[(samples.nominal_epoch >= start) & (samples.nominal_epoch <= stop)]
        out.append(EpochWindow(asked, start, stop, inside))
    return out


def seed_means(samples: pd.DataFrame) -> pd.DataFrame:
    """Each run's mean ratio 1 over `samples` (one window's points), one row per p_bw = x run: the
    unit of replication is the seed, not the autocorrelated points of one run."""
    ratios = [f"ratio1_{m}" for m in RATIO_METRICS]
    grouped = samples.groupby(["run_id", "seed", *SETTING], dropna=False)
    return grouped[ratios].mean().join(grouped.size().rename("points")).reset_index()


def _window_rows(windows: list[EpochWindow], arm_list: list[Arm]) -> pd.DataFrame:
    """Geometric mean over paired seeds of each seed's mean ratio 1 in each epoch window, on each axis;
    an empty window gives value NaN, n = 0. n_x, n_base count each arm's seeds (one run each)."""
    rows = []
    for arm in arm_list:
        counts = {"n_x": len(arm.runs), "n_base": len(arm.baseline)}
        for window, axis in ((w, a) for w in windows for a in AXES):
            seeds = seed_means(select(window.samples, {**arm.setting, "axis": axis}))
            for m in RATIO_METRICS:
                ci_low, ci_high = log_ratio_ci(seeds[f"ratio1_{m}"])
                rows.append({**arm.setting, **counts, "metric": m, "averaging": "ratio_then_mean", "axis": axis,
                             "epoch_start": window.start, "epoch_stop": window.stop,
                             "value": geometric_mean(seeds[f"ratio1_{m}"]), "n": len(seeds), "ci_low": ci_low, "ci_high": ci_high})
    return pd.DataFrame(rows)


def ratios_table(final: pd.DataFrame, final_pairs: pd.DataFrame, cut: pd.DataFrame,
                 windows: list[EpochWindow], arm_list: list[Arm]) -> pd.DataFrame:
    """Every ratio of the study, in the columns of ratios.csv (RATIO_COLUMNS). Phases: "final" (each
    run's last validation point; ratio 1 on every axis, from `final_pairs`), "window" (ratio 1 over
    validation points in an epoch window, on every axis), CUT_PHASE (CUT_RATIOS over blocks
    remaining, from the layer-cut points `cut`, ratio 1 by epoch). Cells that do not apply are NA
    (ratio 2 has no axis: it compares one run's two tasks)."""
    def ratio1(points: pd.DataFrame, pairs: pd.DataFrame, axis: str, metric: str) -> pd.DataFrame:
        return _ratio1(points, select(pairs, {"axis": axis}), arm_list, metric).assign(axis=axis, ratio="ratio1")
    final_ratio1 = [ratio1(final, final_pairs, a, m).assign(metric=m) for a in AXES for m in RATIO_METRICS]
    parts = [*final_ratio1, *(_ratio2(final, m).assign(metric=m, ratio="ratio2") for m in RATIO_METRICS)]
    parts = [p.assign(phase="final") for p in parts]
    parts += [_window_rows(windows, arm_list).assign(ratio="ratio1", phase="window")]
    cut_pairs = pairs_table(cut, arm_list).assign(axis="epoch")
    parts += [(ratio1(cut, cut_pairs, "epoch", m) if r == "ratio1" else _ratio2(cut, m).assign(ratio=r))
              .assign(metric=m, phase=CUT_PHASE) for r, m in CUT_RATIOS]
    table = concat_tables(parts, RATIO_COLUMNS).reindex(columns=RATIO_COLUMNS)
    table["blocks_remaining"] = table.blocks_remaining.where(table.phase == CUT_PHASE)
    return table.astype({"blocks_remaining": "Int64", "epoch_start": float, "epoch_stop": float,
                         "value": float, "n": int, "n_base": "Int64", "n_x": "Int64",
                         "ci_low": float, "ci_high": float})


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


def ratio1_curves(samples: pd.DataFrame) -> pd.DataFrame:
    """Ratio 1 (loss) over training, per setting and axis: at each nominal epoch, the seeds' mean
    axis value, their number n and the mean over seeds with its 95% t interval (mean_ci)."""
    rows = []
    for key, point in samples.groupby([*SETTING, "axis", "nominal_epoch"], sort=True, dropna=False):
        mean, low, high = mean_ci(point.ratio1_loss, CONFIDENCE)
        rows.append({**dict(zip([*SETTING, "axis", "nominal_epoch"], key)), "axis_value": point.axis_value.mean(),
                     "n": point.seed.nunique(), "mean": mean, "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows, columns=RATIO1_CURVE_COLUMNS)


def final_losses(final: pd.DataFrame, diverged: pd.DataFrame) -> pd.DataFrame:
    """Per setting: mean and 95% t interval over seeds of the final fw and bw loss, and how many runs
    diverged (`diverged`: their last points), which no statistic includes."""
    runs = concat_tables([final.assign(diverged=False), diverged.assign(diverged=True)], [*final.columns, "diverged"])
    rows = []
    for setting, group in runs.groupby(SETTING, sort=True, dropna=False):
        ok = group[~group.diverged.astype(bool)]
        row = {**dict(zip(SETTING, setting)), "num_params": group.num_params.iloc[0], "n_seeds": len(ok),
               "n_diverged": int(group.diverged.astype(bool).sum())}
        for d in DIRECTIONS:
            row |= dict(zip([f"{d}_loss_mean", f"{d}_loss_ci_low", f"{d}_loss_ci_high"], mean_ci(ok[f"loss_{d}"])))
        rows.append(row)
    return pd.DataFrame(rows, columns=FINAL_LOSS_COLUMNS)


def _seed_list(seeds: Iterable[int]) -> str:
    return " ".join(str(s) for s in sorted(seeds))


def pct_change(pairs: pd.DataFrame) -> tuple[float, float, float]:
    """The percent change of fw loss from the baseline to the p_bw = x run over seed pairs, and its
    95% interval: 100 (exp(m) - 1) of the mean log(loss_fw / loss_fw_base) m and of its t interval."""
    logs = np.log(pairs.loss_fw.astype(float) / pairs.loss_fw_base.astype(float))
    return tuple(100 * (math.exp(v) - 1) for v in mean_ci(logs))


def _excludes_zero(low: float, high: float):
    return pd.NA if math.isnan(low) else bool(low > 0 or high < 0)


def paired_comparison(final: pd.DataFrame, final_pairs: pd.DataFrame, arm_list: list[Arm]) -> pd.DataFrame:
    """Per p_bw > 0 setting: final fw loss at p_bw = x minus at p_bw = 0, paired by seed (only seeds
    with both runs). exceeds_noise: the 95% interval of the percent change at equal epoch (pct_change,
    the one the headline reads) excludes 0 (NA when the interval is undefined, n < 2). The percent change of final fw loss (pct_change) on each
    PCT_AXES axis, from `final_pairs` (final_pairs_table)."""
    rows = []
    for arm in arm_list:
        pct = {f"{prefix}{c}": v for prefix, axis in PCT_AXES.items()
               for c, v in zip(("pct_change", "pct_ci_low", "pct_ci_high"),
                               pct_change(select(final_pairs, {**arm.setting, "axis": axis})))}
        x, base = final[final.run_id.isin(arm.runs)], final[final.run_id.isin(arm.baseline)]
        pairs = x.merge(base[["seed", "loss_fw"]], on="seed", suffixes=("", "_base"))
        mean, lo, hi = mean_ci(pairs.loss_fw - pairs.loss_fw_base)
        rows.append({
            **arm.setting, "num_params": x.num_params.iloc[0], "n": len(pairs),
            "mean_diff": mean, "ci_low": lo, "ci_high": hi,
            "exceeds_noise": _excludes_zero(pct["pct_ci_low"], pct["pct_ci_high"]), **pct,
            "unpaired_seeds_x": _seed_list(set(x.seed) - set(base.seed)),
            "unpaired_seeds_base": _seed_list(set(base.seed) - set(x.seed)),
        })
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS).astype({"exceeds_noise": "boolean"})


# ----------------------------------------------------------------------------- mask audit

def mask_audit(final: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Per done run: leaks_labels (config), the leak probes (each task, model and training path),
    final losses and bw/fw loss ratio. A leak-free bw task is about as hard as fw (ratio near 1)."""
    audit = final.merge(runs[["run_id", "leaks_labels", *PROBE_COLUMNS]], on="run_id")
    audit["bw_fw_loss_ratio"] = audit.loss_bw.astype(float) / audit.loss_fw.astype(float)
    return audit[AUDIT_COLUMNS]


def mask_summary(audit: pd.DataFrame) -> pd.DataFrame:
    """Per bw_mask, over runs trained on bw (p_bw > 0): mean bw/fw final loss ratio, whether the
    config says the mask leaks labels, and how many probed runs a bw probe (either path) caught
    leaking."""
    rows = []
    for mask, runs in audit[audit.p_bw > 0].groupby("bw_mask", sort=True):
        probes = runs[list(probe_keys("bw"))]
        probed = runs[probes.notna().any(axis=1)]
        leaking = runs[probes.fillna(False).astype(bool).any(axis=1)]
        rows.append({"bw_mask": mask, "runs": len(runs), "bw_fw_loss_ratio": runs.bw_fw_loss_ratio.mean(),
                     "leaks_labels": bool(runs.leaks_labels.astype(bool).any()), "probed": len(probed),
                     "probe_leaks": len(leaking), "probe_leak_runs": " ".join(leaking.run_id)})
    return pd.DataFrame(rows, columns=MASK_SUMMARY_COLUMNS)


# ----------------------------------------------------------------------------- the analysis

@dataclass(frozen=True)
class Analysis:
    """Every table of a sweep's analysis, computed once by sweep_analysis.analyse: the report prints
    them and the figures draw them. A table's name is its CSV's and its HTML table's."""

    windows: list[EpochWindow]
    runs: pd.DataFrame  # one row per run, every status (runs_table)
    unfinished: pd.DataFrame  # the runs that failed or have not finished, left out of every statistic
    points: pd.DataFrame  # done runs' validation points (eval_points)
    final: pd.DataFrame  # each done run's last validation point
    arms: list[Arm]
    diverged: pd.DataFrame  # each diverged run (diverged_runs): a done run's last point, a failed run's runs row; left out of every statistic
    skipped: pd.DataFrame  # SKIPPED_COLUMNS: p_bw > 0 settings without a comparable p_bw = 0 run
    ratios: pd.DataFrame  # RATIO_COLUMNS
    ratio1_samples: pd.DataFrame  # SAMPLE_COLUMNS, on every axis
    ratio1_curves: pd.DataFrame  # RATIO1_CURVE_COLUMNS: ratio1_samples' mean over seeds per nominal epoch
    final_pairs: pd.DataFrame  # ratio 1 of the final points per seed pair and axis (final_pairs_table)
    final_losses: pd.DataFrame  # FINAL_LOSS_COLUMNS
    paired: pd.DataFrame  # PAIRED_COLUMNS
    mask_audit: pd.DataFrame  # AUDIT_COLUMNS
    mask_summary: pd.DataFrame  # MASK_SUMMARY_COLUMNS
    scaling: pd.DataFrame  # effects.TREND_COLUMNS
    size_tests: pd.DataFrame  # effects.SIZE_TEST_COLUMNS
    power: pd.DataFrame  # effects.POWER_COLUMNS
    arrow_of_time: pd.DataFrame  # effects.ARROW_COLUMNS
    run_fit: pd.DataFrame  # overfitting.RUN_FIT_COLUMNS: each run's best and final fw loss, best epoch, train-val gap
    overfitting: pd.DataFrame  # overfitting.EFFECT_COLUMNS: their paired changes with bw training
    fit_curves: pd.DataFrame  # overfitting.FIT_CURVE_COLUMNS: fw loss on validation and training split over epochs
