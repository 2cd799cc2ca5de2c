"""The data-efficiency experiment (issue 18), analysed as pre-registered in docs/analysis-plan.md: does
training the bw task on a share of the training articles get as much out of it as fw alone on more?

`runs` holds one row per training run (RUN_COLUMNS); `curves` (optional) one row per evaluation point of
a run (CURVE_COLUMNS); runs_with_flops and curves_from_results build them from a sweep's runs.csv and results
table. A setting is the values of SETTING_COLUMNS; the runs of one setting differ only by seed, and every
comparison pairs the runs of the same seed (same initialisation, same data order).
Only runs with status "done" are used, the first (by run_id) of a seed and setting. The measure is
test_fw_loss, the test-split fw loss at the checkpoint validation selected; a run whose validation
optimum was its last evaluation (censored) is counted and kept.

An arm is a setting named for the tables: the fw-only baseline (BASELINE, p_bw 0) with some values
changed. At a train_fraction every arm takes the budget cap (epochs) of that fraction's fw-only
baseline with the most seeds, the largest among ties (main_cap). A table of paired contrasts has
CONTRAST_COLUMNS: the family, the contrast "x - base", both arms' settings (base's suffixed _base),
the paired t test (t_test), its Holm-adjusted p-value within the family (effects.holm) and the
censored runs among the pairs. A part whose arms have no seed pair raises MissingArms; analyse
records it in its `skipped` table and goes on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats as sps

from fwbw.analysis.effects import detectable_noncentrality, holm
from fwbw.analysis.stats import CONFIDENCE, mean_ci, select, training_cost
from fwbw.study.presets import EFFICIENCY_LR_SCALE, WEIGHT_DECAY
from fwbw.study.results import EVAL_PHASE, TRAIN_SPLIT_PHASE

MEASURE = "test_fw_loss"
SETTING_COLUMNS = ["p_bw", "bw_mode", "replay", "train_fraction", "epochs", "dropout", "wd_scale", "wd_constant",
                   "lr_scale"]
# the fw-only baseline's values of everything but p_bw, train_fraction and epochs: the preset's
BASELINE = {"bw_mode": "add", "replay": False, "dropout": 0.0, "wd_scale": 1.0, "wd_constant": WEIGHT_DECAY,
            "lr_scale": EFFICIENCY_LR_SCALE}
REGULARISERS = ["dropout", "wd_scale", "wd_constant"]
RUN_COLUMNS = ["run_id", "seed", "status", *SETTING_COLUMNS, "unique_tokens", MEASURE, "best_val_fw_loss",
               "censored", "train_flops"]
CURVE_COLUMNS = ["run_id", "seed", *SETTING_COLUMNS, "epoch", "split", "fw_loss"]

TEST_COLUMNS = ["n", "mean_diff", "sd_diff", "ci_low", "ci_high", "t", "p_value", "mde"]
CONTRAST_COLUMNS = [
    "family", "contrast", *SETTING_COLUMNS, *(f"{c}_base" for c in SETTING_COLUMNS), "unit", "mean_x", "mean_base",
    *TEST_COLUMNS, "p_holm", "n_censored", "n_censored_x", "n_censored_base", "flops_ratio",
]
MATCHED_COLUMNS = [*CONTRAST_COLUMNS[:2], "train_split_fw_loss", *CONTRAST_COLUMNS[2:]]
MULTIPLIER_COLUMNS = [
    "p_bw", "train_fraction", "epochs", "unique_tokens", "n_seeds", "n_fractions", "bw_mean", "multiplier",
    "censored", "bound_low", "bound_high", "ci_low", "ci_high", "censored_low_share", "censored_high_share",
    "isotonic", "n_boot",
]
CURVE_TABLE_COLUMNS = ["arm", "p_bw", "train_fraction", "epochs", "unique_tokens", "n", "mean", "ci_low", "ci_high",
                       "fitted"]
DOSE_CURVE_COLUMNS = ["p_bw", "train_fraction", "epochs", "n", "mean", "ci_low", "ci_high"]
LR_COLUMNS = ["arm", "p_bw", "train_fraction", "epochs", "lr_scale", "n", "best_val_fw_loss_mean", "chosen"]
SKIPPED_COLUMNS = ["part", "reason"]

Q2_ARMS = {"fw+bw": {"p_bw": 1.0, "replay": False}, "fw+replay": {"p_bw": 0.0, "replay": True},
           "fw": {"p_bw": 0.0, "replay": False}}
Q2_CONTRASTS = (("fw+bw", "fw+replay"), ("fw+bw", "fw"), ("fw+replay", "fw"))
ONE_PASS = 1.0  # Q2's primary family: one pass over the whole stream
MATCHED_GRID = 5
DOSE_MODEL_MIN_DOSES = 3
SPLITS = {EVAL_PHASE: "valid", TRAIN_SPLIT_PHASE: "train"}  # the results' phase of each curve split


class MissingArms(ValueError):
    """A part of the analysis whose arms have no seed pair in the runs at hand."""


class Arm(NamedTuple):
    name: str  # as the tables write it
    setting: dict  # a value for each of SETTING_COLUMNS


# ----------------------------------------------------------------------------- runs and arms

def runs_with_flops(runs: pd.DataFrame) -> pd.DataFrame:
    """The sweep's runs table (runs.csv, fwbw.study.results.build_runs) with train_flops: the FLOPs of each run's
    tokens as fwbw.analysis.stats.training_cost counts them (bw_mode add: (1 + p_bw) x the fw-only FLOPs), plus
    the fw-only FLOPs once more for replay, whose every step also trains fw on as many earlier tokens."""
    fw_only = training_cost(runs.assign(p_bw=0.0))["flops"]
    return runs.assign(train_flops=training_cost(runs)["flops"] + fw_only.where(runs.replay.astype(bool), 0.0))


def curves_from_results(results: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """The evaluation curves (CURVE_COLUMNS) from the sweep's results table: each run's fw loss at every
    evaluation on validation (split "valid") and on the training split ("train"), with its seed and setting
    from `runs` (which holds lr_scale)."""
    fw = results[(results.direction == "fw") & results.phase.isin(SPLITS)]
    points = fw.assign(split=fw.phase.map(SPLITS), fw_loss=fw.loss)[["run_id", "epoch", "split", "fw_loss"]]
    return points.merge(runs[["run_id", "seed", *SETTING_COLUMNS]], on="run_id").reindex(columns=CURVE_COLUMNS)


def done_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The finished runs (status "done"), the first by run_id of each seed and setting."""
    missing = [c for c in RUN_COLUMNS if c not in runs.columns]
    if missing:
        raise ValueError(f"runs table lacks columns: {', '.join(missing)}")
    done = runs[runs.status == "done"].sort_values("run_id")
    return done.drop_duplicates([*SETTING_COLUMNS, "seed"]).reset_index(drop=True)


def arm(name: str, **values) -> Arm:
    """The arm `name`: the fw-only baseline (BASELINE) with `values` (p_bw, train_fraction, epochs and any other)."""
    return Arm(name, {c: {**BASELINE, **values}[c] for c in SETTING_COLUMNS})


def main_cap(frame: pd.DataFrame, fraction: float) -> float:
    """The budget cap (epochs) of the fw-only baseline at `fraction` with the most seeds, the largest among ties."""
    seeds = select(frame, {**BASELINE, "p_bw": 0.0, "train_fraction": fraction}).groupby("epochs").seed.nunique()
    if seeds.empty:
        raise MissingArms(f"no fw-only baseline run at train_fraction {fraction:g}")
    return float(seeds[seeds == seeds.max()].index.max())


def _changed(setting: dict) -> list[str]:
    """The columns of BASELINE whose value `setting` changes (a missing value equals a missing one)."""
    return [c for c, v in BASELINE.items() if not (v == setting[c] or (pd.isna(v) and pd.isna(setting[c])))]


def _shown(setting: dict, columns: list[str]) -> str:
    return ", ".join(f"{c} {setting[c]:g}" if isinstance(setting[c], float) else f"{c} {setting[c]}"
                     for c in columns)


def arm_label(a: Arm) -> str:
    """The arm's name and the values that place it: p_bw, train_fraction, epochs and any other than BASELINE's."""
    return f"{a.name} ({_shown(a.setting, ['p_bw', 'train_fraction', 'epochs', *_changed(a.setting)])})"


def _require_pairs(table: pd.DataFrame, done: pd.DataFrame, arms: list[Arm]) -> pd.DataFrame:
    """`table` when some row rests on a seed pair; else MissingArms naming the arms without runs."""
    if table.n.sum() > 0:
        return table
    absent = [arm_label(a) for a in arms if select(done, a.setting).empty]
    raise MissingArms("; ".join(f"no done run of {a}" for a in absent) or "the arms share no seed")


# ----------------------------------------------------------------------------- paired tests

def t_test(diff: np.ndarray) -> dict:
    """The paired t test of the per-seed differences `diff` (docs/analysis-plan.md#tests): mean, SD, 95% t
    interval, t, two-sided p and the smallest mean difference detectable with 80% power at the 0.05 level
    from the observed SD (mde); NaN where fewer than 2 seeds leave a value undefined."""
    n = len(diff)
    if n < 2:
        return {"n": n, "mean_diff": float(diff.mean()) if n else math.nan} | dict.fromkeys(TEST_COLUMNS[2:], math.nan)
    mean, low, high = mean_ci(diff, CONFIDENCE)
    sd = float(diff.std(ddof=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.float64(mean) / (sd / math.sqrt(n))
    return {"n": n, "mean_diff": mean, "sd_diff": sd, "ci_low": low, "ci_high": high, "t": float(t),
            "p_value": float(2 * sps.t.sf(abs(t), n - 1)),
            "mde": detectable_noncentrality(n - 1) * sd / math.sqrt(n)}


def _contrast_row(family: str, x: Arm, base: Arm, diff: np.ndarray, **extra) -> dict:
    return {"family": family, "contrast": f"{x.name} - {base.name}", **x.setting,
            **{f"{c}_base": v for c, v in base.setting.items()}, "unit": "nats", **t_test(diff), **extra}


def seed_pairs(done: pd.DataFrame, x: dict, base: dict) -> pd.DataFrame:
    """The runs of setting x beside those of setting base of the same seed, one row per seed with a run of both
    (columns suffixed _x and _base)."""
    return select(done, x).merge(select(done, base), on="seed", suffixes=("_x", "_base"))


def paired_contrast(done: pd.DataFrame, family: str, x: Arm, base: Arm) -> dict:
    """test_fw_loss of arm x minus arm base over the seeds with a run of both; flops_ratio: the mean
    per-seed ratio of their training FLOPs."""
    pairs = seed_pairs(done, x.setting, base.setting)
    diff = (pairs[f"{MEASURE}_x"] - pairs[f"{MEASURE}_base"]).to_numpy(dtype=float)
    censored = {f"n_censored_{side}": int(pairs[f"censored_{side}"].sum()) for side in ("x", "base")}
    return _contrast_row(family, x, base, diff, mean_x=pairs[f"{MEASURE}_x"].mean(),
                         mean_base=pairs[f"{MEASURE}_base"].mean(), n_censored=sum(censored.values()), **censored,
                         flops_ratio=(pairs.train_flops_x / pairs.train_flops_base).mean())


def contrast_table(rows: list[dict], columns: list[str] = CONTRAST_COLUMNS) -> pd.DataFrame:
    """`rows` with p_holm: each p-value Holm-adjusted over its family's defined p-values."""
    table = pd.DataFrame(rows).reindex(columns=columns)
    table["p_holm"] = table.groupby("family").p_value.transform(holm) if len(table) else []
    return table


def primary_contrast(runs: pd.DataFrame, p_bw: float = 0.25, fraction: float = 0.25) -> pd.DataFrame:
    """The one pre-registered test: test_fw_loss at `p_bw` minus at p_bw 0, at `fraction`, all else at the
    fw-only baseline; one row of CONTRAST_COLUMNS, family "primary"."""
    done = done_runs(runs)
    cap = main_cap(done, fraction)
    arms = [arm("fw+bw", p_bw=p_bw, train_fraction=fraction, epochs=cap),
            arm("fw", p_bw=0.0, train_fraction=fraction, epochs=cap)]
    return _require_pairs(contrast_table([paired_contrast(done, "primary", *arms)]), done, arms)


# ----------------------------------------------------------------------------- effective data multiplier

def decreasing_fit(y: np.ndarray) -> np.ndarray:
    """The least-squares non-increasing fit of `y` by pool-adjacent-violators
    (docs/analysis-plan.md#the-effective-data-multiplier); `y` itself when it does not increase anywhere."""
    blocks: list[list[float]] = []  # [sum, count] of each pooled block
    for value in y:
        blocks.append([float(value), 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return np.concatenate([np.full(count, total / count) for total, count in blocks])


def read_multiplier(log_tokens: np.ndarray, curve_means: np.ndarray, target: float, tokens: float) -> float:
    """U*/tokens, U* where the fw-only curve (its means at ascending ln unique tokens, fit non-increasing,
    piecewise-linear in ln loss against ln tokens) first reaches the loss `target`; never extrapolated:
    0 when the target is above the curve's first point (m < U_min/U), inf when below its last (m > U_max/U)."""
    fit, level = decreasing_fit(np.log(curve_means)), math.log(target)
    if level > fit[0]:
        return 0.0
    if level < fit[-1]:
        return math.inf
    i = int(np.argmax(fit <= level))
    log_u = log_tokens[0] if i == 0 else np.interp(level, fit[[i, i - 1]], log_tokens[[i, i - 1]])
    return math.exp(log_u) / tokens


def _multiplier_arms(done: pd.DataFrame, p_bw: float, fraction: float) -> tuple[list[Arm], Arm]:
    """The fw-only baseline at each train_fraction it was run at (ascending), and the fw+bw arm at `fraction`."""
    fractions = sorted(select(done, {**BASELINE, "p_bw": 0.0}).train_fraction.unique())
    curve = [arm("fw", p_bw=0.0, train_fraction=f, epochs=main_cap(done, f)) for f in fractions]
    return curve, arm("fw+bw", p_bw=p_bw, train_fraction=fraction, epochs=main_cap(done, fraction))


def _seed_matrix(done: pd.DataFrame, arms: list[Arm]) -> pd.DataFrame:
    """test_fw_loss per seed (rows) and arm (columns, in order) over the seeds with a run of every arm."""
    columns = [select(done, a.setting).set_index("seed")[MEASURE].rename(i) for i, a in enumerate(arms)]
    return pd.concat(columns, axis=1, join="inner").sort_index()


def _unique_tokens(done: pd.DataFrame, a: Arm) -> float:
    return float(select(done, a.setting).unique_tokens.iloc[0])


def _multiplier_inputs(runs: pd.DataFrame, p_bw: float,
                       fraction: float) -> tuple[pd.DataFrame, list[Arm], Arm, pd.DataFrame]:
    """The done runs, the curve's arms, the fw+bw arm and their _seed_matrix; MissingArms without 2 curve
    fractions or a seed common to every arm."""
    done = done_runs(runs)
    curve, bw = _multiplier_arms(done, p_bw, fraction)
    matrix = _seed_matrix(done, [*curve, bw])
    if len(curve) < 2 or matrix.empty:
        absent = [arm_label(a) for a in [*curve, bw] if select(done, a.setting).empty]
        raise MissingArms("; ".join([f"no done run of {a}" for a in absent]
                                    or [f"fw-only baseline at {len(curve)} train_fraction(s), seeds in common: "
                                        f"{len(matrix)}"]))
    return done, curve, bw, matrix


def _bootstrap(matrix: np.ndarray, read: Callable[[np.ndarray], float], n_boot: int, seed: int) -> np.ndarray:
    """`read` (of the arms' means) over n_boot resamples of the seeds (rows), each draw the same seeds for
    every arm (docs/analysis-plan.md#the-bootstrap)."""
    draws = np.random.default_rng(seed).integers(0, len(matrix), size=(n_boot, len(matrix)))
    return np.array([read(means) for means in matrix[draws].mean(axis=1)])


def effective_data_multiplier(runs: pd.DataFrame, p_bw: float = 0.25, fraction: float = 0.25, n_boot: int = 2000,
                              seed: int = 0) -> pd.DataFrame:
    """How many times the unique tokens at `fraction` fw alone needs to match the fw+bw arm's mean
    test_fw_loss (one row, MULTIPLIER_COLUMNS): multiplier NaN with censored "low" (m < bound_low) or
    "high" (m > bound_high) outside the curve; the 95% percentile interval of the seed bootstrap, whose
    censored draws count as 0 (low) and inf (high), with their shares."""
    done, curve, bw, matrix = _multiplier_inputs(runs, p_bw, fraction)
    curve_tokens = np.array([_unique_tokens(done, a) for a in curve])
    log_tokens, tokens = np.log(curve_tokens), _unique_tokens(done, bw)

    def read(means: np.ndarray) -> float:
        return read_multiplier(log_tokens, means[:-1], means[-1], tokens)

    means = matrix.mean().to_numpy()
    m = read(means)
    draws = _bootstrap(matrix.to_numpy(), read, n_boot, seed)
    low, high = np.quantile(draws, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2], method="inverted_cdf")
    enough = len(matrix) >= 2
    return pd.DataFrame([{
        **{c: bw.setting[c] for c in ("p_bw", "train_fraction", "epochs")}, "unique_tokens": tokens,
        "n_seeds": len(matrix), "n_fractions": len(curve), "bw_mean": means[-1],
        "multiplier": m if 0 < m < math.inf else math.nan,
        "censored": "low" if m == 0 else "high" if m == math.inf else "",
        "bound_low": curve_tokens[0] / tokens, "bound_high": curve_tokens[-1] / tokens,
        "ci_low": low if enough else math.nan, "ci_high": high if enough else math.nan,
        "censored_low_share": float(np.mean(draws == 0)), "censored_high_share": float(np.mean(draws == math.inf)),
        "isotonic": bool(np.any(decreasing_fit(np.log(means[:-1])) != np.log(means[:-1]))), "n_boot": n_boot,
    }], columns=MULTIPLIER_COLUMNS)


def data_curve(runs: pd.DataFrame, p_bw: float = 0.25, fraction: float = 0.25) -> pd.DataFrame:
    """The points behind the multiplier, for its figure (CURVE_TABLE_COLUMNS): the fw-only mean test_fw_loss
    at each train_fraction with its 95% t interval and its non-increasing fit (fitted), and the fw+bw arm's
    at `fraction`, over the seeds with a run of every arm."""
    done, curve, bw, matrix = _multiplier_inputs(runs, p_bw, fraction)
    fitted = [*np.exp(decreasing_fit(np.log(matrix.mean().to_numpy()[:-1]))), math.nan]
    rows = []
    for i, a in enumerate([*curve, bw]):
        mean, low, high = mean_ci(matrix[i])
        rows.append({"arm": a.name, **{c: a.setting[c] for c in ("p_bw", "train_fraction", "epochs")},
                     "unique_tokens": _unique_tokens(done, a), "n": len(matrix), "mean": mean, "ci_low": low,
                     "ci_high": high, "fitted": fitted[i]})
    return pd.DataFrame(rows, columns=CURVE_TABLE_COLUMNS)


# ----------------------------------------------------------------------------- Q2: bw against replay

def q2_head_to_head(runs: pd.DataFrame) -> pd.DataFrame:
    """fw+bw (p_bw 1), fw+replay and fw alone on the whole stream (train_fraction 1), paired on
    test_fw_loss (Q2_CONTRASTS): family "q2" at one pass (epochs 1), "q2-epochs" at every other cap present."""
    done = done_runs(runs)
    stream = select(done, {c: BASELINE[c] for c in ("bw_mode", *REGULARISERS, "lr_scale")} | {"train_fraction": 1.0})
    caps = sorted({ONE_PASS, *stream[stream.p_bw.isin([0.0, 1.0])].epochs})
    rows, all_arms = [], []
    for cap in caps:
        arms = {name: arm(name, train_fraction=1.0, epochs=cap, **values) for name, values in Q2_ARMS.items()}
        family = "q2" if cap == ONE_PASS else "q2-epochs"
        rows += [paired_contrast(done, family, arms[x], arms[base]) for x, base in Q2_CONTRASTS]
        all_arms += arms.values()
    return _require_pairs(contrast_table(rows), done, all_arms)


# ----------------------------------------------------------------------------- dose response

def _dose_arms(done: pd.DataFrame, fraction: float) -> list[Arm]:
    """The fw-only baseline and an fw+bw arm at each p_bw > 0 run at `fraction` (baseline otherwise)."""
    cap = main_cap(done, fraction)
    doses = sorted(select(done, {**BASELINE, "train_fraction": fraction, "epochs": cap}).p_bw.unique())
    return [arm("fw" if d == 0 else f"fw+bw p_bw {d:g}", p_bw=d, train_fraction=fraction, epochs=cap)
            for d in [0.0, *(d for d in doses if d > 0)]]


def _slope_row(done: pd.DataFrame, arms: list[Arm]) -> dict:
    """The dose model: per seed with a run at every dose, the least-squares slope of test_fw_loss on p_bw,
    sum_i (p_i - p_mean) y_i / sum_i (p_i - p_mean)^2; its t test over seeds (family "dose-slope")."""
    doses = np.array([a.setting["p_bw"] for a in arms])
    matrix = _seed_matrix(done, arms)
    centred = doses - doses.mean()
    slopes = matrix.to_numpy() @ centred / (centred @ centred)
    in_matrix = done[done.seed.isin(matrix.index)]
    censored = [int(select(in_matrix, a.setting).censored.sum()) for a in arms]
    x = Arm(f"slope over p_bw {', '.join(f'{d:g}' for d in doses)}", {**arms[0].setting, "p_bw": math.nan})
    row = _contrast_row("dose-slope", x, arms[0], slopes, n_censored=sum(censored), n_censored_x=sum(censored[1:]),
                        n_censored_base=censored[0])
    return row | {"contrast": x.name, "unit": "nats per unit p_bw"}


def dose_response(runs: pd.DataFrame, fraction: float = 0.25) -> pd.DataFrame:
    """At `fraction`, baseline otherwise: the dose model's slope (one test, family "dose-slope") and each
    p_bw > 0 against p_bw 0 (family "dose"), CONTRAST_COLUMNS."""
    done = done_runs(runs)
    arms = _dose_arms(done, fraction)
    if len(arms) < DOSE_MODEL_MIN_DOSES:  # with two, the slope is the primary contrast rescaled
        doses = ", ".join(f"{a.setting['p_bw']:g}" for a in arms) or "none"
        raise MissingArms(f"the dose model needs runs at {DOSE_MODEL_MIN_DOSES} or more p_bw values at train_fraction "
                          f"{fraction:g} (baseline settings); done: {doses}")
    rows = [_slope_row(done, arms), *(paired_contrast(done, "dose", a, arms[0]) for a in arms[1:])]
    return _require_pairs(contrast_table(rows), done, arms)


def dose_curve(runs: pd.DataFrame, fraction: float = 0.25) -> pd.DataFrame:
    """Mean test_fw_loss and its 95% t interval over the seeds of each dose at `fraction` (DOSE_CURVE_COLUMNS)."""
    done = done_runs(runs)
    rows = []
    for a in _dose_arms(done, fraction):
        losses = select(done, a.setting)[MEASURE]
        mean, low, high = mean_ci(losses)
        rows.append({**{c: a.setting[c] for c in ("p_bw", "train_fraction", "epochs")}, "n": len(losses),
                     "mean": mean, "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows, columns=DOSE_CURVE_COLUMNS)


# ----------------------------------------------------------------------------- controls

def lr_selection(runs: pd.DataFrame, p_bw: float = 0.25, fraction: float = 0.25) -> pd.DataFrame:
    """For fw (p_bw 0) and fw+bw (`p_bw`) at `fraction`, baseline otherwise: the mean VALIDATION fw loss of
    the selected checkpoint (best_val_fw_loss) at each lr_scale, and the one validation chooses (its
    lowest mean; LR_COLUMNS). Test loss plays no part in the choice."""
    done = done_runs(runs)
    cap = main_cap(done, fraction)
    frames = []
    for name, dose in (("fw", 0.0), ("fw+bw", p_bw)):
        values = {c: v for c, v in arm(name, p_bw=dose, train_fraction=fraction, epochs=cap).setting.items()
                  if c != "lr_scale"}
        per_lr = select(done, values).groupby("lr_scale").best_val_fw_loss.agg(["size", "mean"]).reset_index()
        per_lr = per_lr.rename(columns={"size": "n", "mean": "best_val_fw_loss_mean"})
        frames.append(per_lr.assign(arm=name, **{c: values[c] for c in ("p_bw", "train_fraction", "epochs")},
                                    chosen=per_lr.best_val_fw_loss_mean == per_lr.best_val_fw_loss_mean.min()))
    return pd.concat(frames, ignore_index=True).reindex(columns=LR_COLUMNS)


def _chosen_lr(choice: pd.DataFrame, name: str) -> float:
    """The lr_scale validation chose for arm `name` (the smallest among ties); BASELINE's without runs."""
    chosen = choice[(choice.arm == name) & choice.chosen].lr_scale
    return float(chosen.min()) if len(chosen) else BASELINE["lr_scale"]


def _regulariser_arms(done: pd.DataFrame, fraction: float, cap: float) -> list[Arm]:
    """Each fw-only setting at `fraction` and `cap` with dropout, wd_scale or wd_constant other than BASELINE's,
    named by them."""
    others = {c: v for c, v in BASELINE.items() if c not in REGULARISERS}
    fw = select(done, {**others, "p_bw": 0.0, "train_fraction": fraction, "epochs": cap})
    settings = [arm("fw", p_bw=0.0, train_fraction=fraction, epochs=cap, **values)
                for values in fw[REGULARISERS].drop_duplicates().sort_values(REGULARISERS).to_dict("records")]
    return [a._replace(name=f"fw ({_shown(a.setting, _changed(a.setting))})") for a in settings if _changed(a.setting)]


def controls(runs: pd.DataFrame, p_bw: float = 0.25, fraction: float = 0.25) -> pd.DataFrame:
    """Family "controls" (CONTRAST_COLUMNS): the primary contrast at each arm's validation-chosen lr_scale
    (lr_selection), and each fw-only regulariser setting against the fw-only baseline and the fw+bw arm
    (baseline regularisation) against it."""
    done = done_runs(runs)
    cap = main_cap(done, fraction)
    choice = lr_selection(runs, p_bw, fraction)
    tuned = [arm(f"{name} (validation-chosen lr_scale)", p_bw=dose, train_fraction=fraction, epochs=cap,
                 lr_scale=_chosen_lr(choice, name)) for name, dose in (("fw+bw", p_bw), ("fw", 0.0))]
    fw = arm("fw", p_bw=0.0, train_fraction=fraction, epochs=cap)
    bw = arm("fw+bw", p_bw=p_bw, train_fraction=fraction, epochs=cap)
    rows = [paired_contrast(done, "controls", *tuned)]
    for reg in _regulariser_arms(done, fraction, cap):
        rows += [paired_contrast(done, "controls", reg, fw), paired_contrast(done, "controls", bw, reg)]
    return _require_pairs(contrast_table(rows), done, [*tuned, fw, bw])


# ----------------------------------------------------------------------------- matched training loss

def _trajectory(points: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """A run's (training-split, validation) fw loss at its evaluations where the training-split loss is
    below every earlier one, in ascending training-split loss: validation loss as a function of it."""
    wide = points.pivot_table(index="epoch", columns="split", values="fw_loss").dropna().sort_index()
    train, valid = wide["train"].to_numpy(dtype=float), wide["valid"].to_numpy(dtype=float)
    record = train < np.minimum.accumulate(np.r_[math.inf, train[:-1]])
    return train[record][::-1], valid[record][::-1]


def _trajectories(curves: pd.DataFrame, a: Arm) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The trajectory of the arm's first run (by run_id) of each seed."""
    points = select(curves, a.setting)
    first = points.sort_values("run_id").groupby("seed").run_id.first()
    return {seed: _trajectory(points[points.run_id == run_id]) for seed, run_id in first.items()}


def matched_train_loss(curves: pd.DataFrame, p_bw: float = 0.25, fraction: float = 0.25) -> pd.DataFrame:
    """Validation fw loss of fw+bw minus fw at equal training-split fw loss (MATCHED_COLUMNS, family "matched"):
    each run's validation loss interpolated linearly in its training-split loss, never extrapolated, at the
    midpoints of MATCHED_GRID equal parts of the training-split range every seed pair covers with both runs
    (docs/analysis-plan.md#secondary-families)."""
    cap = main_cap(curves, fraction)
    fw = arm("fw", p_bw=0.0, train_fraction=fraction, epochs=cap)
    bw = arm("fw+bw", p_bw=p_bw, train_fraction=fraction, epochs=cap)
    x, base = _trajectories(curves, bw), _trajectories(curves, fw)
    seeds = sorted(set(x) & set(base))
    low = max((max(x[s][0].min(initial=math.inf), base[s][0].min(initial=math.inf)) for s in seeds), default=math.nan)
    high = min((min(x[s][0].max(initial=-math.inf), base[s][0].max(initial=-math.inf)) for s in seeds),
               default=math.nan)
    if not low < high:
        raise MissingArms(f"{len(seeds)} seed pair(s) of {arm_label(bw)} and {arm_label(fw)}: "
                          "no training-split fw loss range common to every pair")
    grid = low + (np.arange(MATCHED_GRID) + 0.5) * (high - low) / MATCHED_GRID
    diff = np.array([np.interp(grid, *x[s]) - np.interp(grid, *base[s]) for s in seeds])
    rows = [_contrast_row("matched", bw, fw, diff[:, i], train_split_fw_loss=g) for i, g in enumerate(grid)]
    return contrast_table(rows, MATCHED_COLUMNS)


# ----------------------------------------------------------------------------- everything

def analyse(runs: pd.DataFrame, curves: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """Every table at the pre-registered settings (p_bw 0.25, train_fraction 0.25), by name; a part whose arms
    are missing is an empty table and a row of `skipped` (part, reason)."""
    done_ids = set(done_runs(runs).run_id)
    parts: dict[str, tuple[list[str], Callable[[], pd.DataFrame]]] = {
        "primary": (CONTRAST_COLUMNS, lambda: primary_contrast(runs)),
        "multiplier": (MULTIPLIER_COLUMNS, lambda: effective_data_multiplier(runs)),
        "curve": (CURVE_TABLE_COLUMNS, lambda: data_curve(runs)),
        "q2": (CONTRAST_COLUMNS, lambda: q2_head_to_head(runs)),
        "dose": (CONTRAST_COLUMNS, lambda: dose_response(runs)),
        "dose_curve": (DOSE_CURVE_COLUMNS, lambda: dose_curve(runs)),
        "lr_selection": (LR_COLUMNS, lambda: lr_selection(runs)),
        "controls": (CONTRAST_COLUMNS, lambda: controls(runs)),
        "matched": (MATCHED_COLUMNS, lambda: _matched(curves, done_ids)),
    }
    tables, skipped = {}, []
    for name, (columns, part) in parts.items():
        try:
            tables[name] = part()
        except MissingArms as missing:
            tables[name] = pd.DataFrame(columns=columns)
            skipped.append({"part": name, "reason": str(missing)})
    return tables | {"skipped": pd.DataFrame(skipped, columns=SKIPPED_COLUMNS)}


def _matched(curves: pd.DataFrame | None, done_ids: set[str]) -> pd.DataFrame:
    if curves is None:
        raise MissingArms("no evaluation curves given")
    return matched_train_loss(curves[curves.run_id.isin(done_ids)])
