"""Figures of the fw/bw report, drawn from the tables of an `Analysis` (they compute nothing the
report does not print). Each figure is saved as PNG and SVG (atomically); every function returns
the PNG paths, each SVG lying beside its PNG. Figures are plain matplotlib `Figure`s drawn by the
Agg canvas: pyplot and its global state are never touched."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fwbw.analysis.stats import (
    ARM,
    AXES,
    BASELINE_VARIANT,
    CONTEXT,
    CUT_RATIOS,
    VARIANT,
    Analysis,
    Arm,
    EpochWindow,
    select,
)
from fwbw.files import atomic_write
from fwbw.model.masks import DIRECTIONS
from fwbw.study.results import CUT_PHASE

DPI = 110
ROW_KEY = [*CONTEXT, *ARM]  # what a row of the ratio figures holds fixed
CURVE_KEY = [*CONTEXT, *VARIANT]  # what a row of the loss curves holds fixed
PANEL = (4.4, 3.3)  # inches per panel
ALONG = {"nominal_epoch": "epoch (nominal)", "fw_tokens": "fw tokens seen", "flops": "training FLOPs"}  # points column -> label
CURVE_METRICS = {"loss": "val loss", "acc": "val accuracy"}  # the panels of each model size in the loss curves
RATIO1_CURVE_AXES = ("epoch", "fw_tokens")  # the rows of the ratio 1 curves
# nats shown below the lowest mean curve of an overfitting panel, and in all (the training split falls further)
FIT_MARGIN, FIT_SPAN, FIT_TRAIN_SPAN = 0.05, 0.6, 1.2


# ----------------------------------------------------------------------------- labels

def params_label(n: float) -> str:
    return f"{n / 1e6:.3g}M" if n >= 1e5 else f"{n / 1e3:.3g}k"


def size_label(depth: int, width: int) -> str:
    return f"depth {depth} / width {width}"


def variant_label(variant: dict) -> str:
    label = f"{variant['bw_mode']}, {variant['bw_mask']} mask"
    label += ", task tokens" if variant["task_tokens"] else ""
    label += f", {variant['num_heads']} heads" if variant["num_heads"] > 1 else ""
    return label + (", adaptive p_bw" if variant["adaptive_p_bw"] else "")


def arm_label(arm: dict) -> str:
    return f"p_bw = {arm['p_bw']:g}, {variant_label(arm)}"


def ratio_label(ratio: str, metric: str) -> str:
    return f"{ratio.replace('ratio', 'ratio ')} ({metric})"


def window_label(window: EpochWindow) -> str:
    to_end = window.asked[1] == "end"
    return f"[{window.start:g}, end = {window.stop:g}]" if to_end else f"[{window.start:g}, {window.stop:g}]"


# ----------------------------------------------------------------------------- plumbing

def _figure(ncols: int, nrows: int = 1, panel: tuple[float, float] = PANEL) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig: Figure, out_dir: Path, name: str) -> Path:
    for fmt in ("png", "svg"):
        atomic_write(out_dir / f"{name}.{fmt}", lambda tmp: fig.savefig(tmp, format=fmt, dpi=DPI))
    return out_dir / f"{name}.png"


def _palette(n: int) -> list:
    return list(matplotlib.colormaps["viridis"](np.linspace(0.0, 0.85, max(n, 1))))


def _colors(keys: list) -> dict:
    """One colour per key, in order, so a size (or width, or depth) keeps its colour in every panel."""
    return dict(zip(keys, _palette(len(keys))))


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _key(setting: dict, columns: list[str]) -> tuple:
    """The setting's values of `columns` as a dict key, a missing value (NaN) as None."""
    return tuple(None if pd.isna(setting[k]) else setting[k] for k in columns)


def arm_groups(arm_list: list[Arm]) -> list[tuple[dict, list[Arm]]]:
    """One figure row per CONTEXT and ARM (p_bw and variant): those values, and the settings that
    share them, one per model size."""
    groups: dict[tuple, list[Arm]] = defaultdict(list)
    for arm in arm_list:
        groups[_key(arm.setting, ROW_KEY)].append(arm)
    return [(dict(zip(ROW_KEY, key)), group) for key, group in groups.items()]


def _sizes(group: list[Arm], final: pd.DataFrame) -> list[tuple[int, int, int]]:
    """(depth, width, num_params) of the arms' sizes, by parameter count."""
    params = final.groupby(["depth", "width"]).num_params.first()
    sizes = {(a.setting["depth"], a.setting["width"]) for a in group}
    return sorted(((d, w, int(params[d, w])) for d, w in sizes), key=lambda s: (s[2], s[0]))


def _reference_line(ax: Axes, label: str | None = None) -> None:
    """Ratio 1 of p_bw = 0 against itself: 1."""
    ax.axhline(1.0, color="0.5", ls="--", lw=1, label=label)


# ----------------------------------------------------------------------------- loss curves

def _seed_band(runs: pd.DataFrame, column: str, along: str = "nominal_epoch") -> pd.DataFrame:
    """Mean, min and max over runs of `column` on the runs' values of `along`, where every run has a
    value. Each run is interpolated linearly between its own validation points, since seeds need
    not evaluate on the same grid."""
    grid = np.unique(runs[along].astype(float))
    curves = {
        run_id: np.interp(grid, run[along].astype(float), run[column].astype(float), left=np.nan, right=np.nan)
        for run_id, run in runs.dropna(subset=[column, along]).sort_values(along).groupby("run_id")
    }
    if not curves:
        return pd.DataFrame(columns=["mean", "min", "max"], dtype=float)
    table = pd.DataFrame(curves, index=grid).dropna()
    return pd.DataFrame({"mean": table.mean(axis=1), "min": table.min(axis=1), "max": table.max(axis=1)})


def _curve_groups(analysis: Analysis) -> dict[tuple, set[str]]:
    """Runs per CONTEXT and variant: its p_bw > 0 runs and their baselines (a sweep without p_bw > 0:
    all runs)."""
    groups: dict[tuple, set[str]] = defaultdict(set)
    for arm in analysis.arms:
        groups[_key(arm.setting, CURVE_KEY)] |= {*arm.runs, *arm.baseline}
    if not groups:
        for run in analysis.final.to_dict("records"):
            groups[_key(run, CURVE_KEY)].add(run["run_id"])
    return dict(groups)


def _curve_panel(ax: Axes, size: pd.DataFrame, column: str, colors: dict, along: str) -> None:
    """`column` (<metric>_<direction>) over `along`, one line per p_bw."""
    for p_bw, runs in size.groupby("p_bw"):
        band = _seed_band(runs, column, along)
        label = f"p_bw = {p_bw:g} ({runs.run_id.nunique()} runs)"
        ax.plot(band.index, band["mean"], color=colors[p_bw], label=label)
        ax.fill_between(band.index, band["min"], band["max"], color=colors[p_bw], alpha=0.2, lw=0)
    metric, direction = column.split("_")
    ax.set(xlabel=ALONG[along], ylabel=f"{direction} {CURVE_METRICS[metric]}")
    ax.legend(fontsize="small")


def _loss_grid(points: pd.DataFrame, groups: dict[tuple, set[str]], direction: str, out_dir: Path,
               along: str = "nominal_epoch") -> Path:
    """One row per (variant, depth), per width a loss and an accuracy column (CURVE_METRICS); over
    `along` (ALONG)."""
    widths = sorted(points.width.unique())
    rows = [(key, depth) for key, ids in groups.items()
            for depth in sorted(points[points.run_id.isin(ids)].depth.unique())]
    p_values = sorted(points.p_bw.unique())
    colors = {p: "0.35" if p == 0 else color for p, color in zip(p_values, _palette(len(p_values)))}
    fig, axes = _figure(len(CURVE_METRICS) * len(widths), len(rows))
    for i, (key, depth) in enumerate(rows):
        variant = variant_label(dict(zip(CURVE_KEY, key)))
        for j, (width, metric) in enumerate((w, m) for w in widths for m in CURVE_METRICS):
            size = select(points[points.run_id.isin(groups[key])], {"depth": depth, "width": width})
            if size.empty:
                _empty(axes[i, j], f"no runs at {size_label(depth, width)}\n{variant}")
                continue
            _curve_panel(axes[i, j], size, f"{metric}_{direction}", colors, along)
            params = params_label(size.num_params.iloc[0])
            axes[i, j].set_title(f"{size_label(depth, width)} ({params})\n{variant}", fontsize="medium")
    fig.suptitle(f"{direction} validation loss and accuracy over {ALONG[along]}: mean over seeds, band min–max")
    return _save(fig, out_dir, f"loss_{direction}" + ("" if along == "nominal_epoch" else f"_{along}"))


def loss_curves(analysis: Analysis, out_dir: Path) -> list[Path]:
    """fw and bw validation loss and accuracy over nominal epochs, p_bw = 0 against p_bw = x, two
    panels per model size and variant (bw_mode, bw_mask, task_tokens); one figure per direction."""
    groups = _curve_groups(analysis)
    return [_loss_grid(analysis.points, groups, d, Path(out_dir)) for d in DIRECTIONS] if groups else []


def compute_curves(analysis: Analysis, out_dir: Path) -> list[Path]:
    """fw validation loss and accuracy over training FLOPs (the points' flops), p_bw = 0 against
    p_bw = x, per model size and variant: the equal-compute comparison."""
    groups = _curve_groups(analysis)
    return [_loss_grid(analysis.points, groups, "fw", Path(out_dir), along="flops")] if groups else []


# ----------------------------------------------------------------------------- overfitting

def _fit_band(ax: Axes, curve: pd.DataFrame, along: str, color, label: str) -> None:
    curve = curve.sort_values(along)
    ax.plot(curve[along], curve["mean"], color=color, label=label)
    ax.fill_between(curve[along], curve.ci_low, curve.ci_high, color=color, alpha=0.15, lw=0)


def _zoom(ax: Axes, means: pd.Series, span: float) -> None:
    """Show `span` nats from just below the lowest mean: the differences late in training, not the
    steep fall of the first epochs or a few seeds' wide bands."""
    if means.notna().any():
        low = means.min() - FIT_MARGIN
        ax.set_ylim(low, low + span)


def _fit_panels(axes: np.ndarray, size: pd.DataFrame, colors: dict) -> None:
    """fw validation loss over epochs (a dot at each p_bw's lowest mean), fw loss on the training
    split over epochs, and fw validation loss over training FLOPs."""
    for p_bw, curves in size.groupby("p_bw"):
        valid, train = curves[curves.split == "valid"], curves[curves.split == "train"]
        label = f"p_bw = {p_bw:g} ({int(valid.n.max())} seeds)"
        _fit_band(axes[0], valid, "nominal_epoch", colors[p_bw], label)
        best = valid.loc[valid["mean"].idxmin()]
        axes[0].plot(best.nominal_epoch, best["mean"], "o", color=colors[p_bw], ms=5)
        if len(train):
            _fit_band(axes[1], train, "nominal_epoch", colors[p_bw], label)
        _fit_band(axes[2], valid, "flops", colors[p_bw], label)
    valid, train = size[size.split == "valid"], size[size.split == "train"]
    axes[0].set(xlabel=ALONG["nominal_epoch"], ylabel="fw validation loss")
    axes[1].set(xlabel=ALONG["nominal_epoch"], ylabel="fw loss on the training split")
    axes[2].set(xlabel=ALONG["flops"], ylabel="fw validation loss")
    if train.empty:
        _empty(axes[1], "training split not evaluated\n(train_eval_tokens 0)")
    for ax, means, span in ((axes[0], valid["mean"], FIT_SPAN), (axes[1], train["mean"], FIT_TRAIN_SPAN),
                            (axes[2], valid["mean"], FIT_SPAN)):
        _zoom(ax, means, span)
        if ax.lines:
            ax.legend(fontsize="small")


def overfitting_curves(analysis: Analysis, out_dir: Path) -> list[Path]:
    """Per variant and model size: fw loss on validation and on the training split over epochs, and
    validation fw loss over training FLOPs, mean over seeds with its 95% t interval. Drawn for sweeps
    that evaluated the training split (train_eval_tokens)."""
    curves = analysis.fit_curves
    if not (curves.split == "train").any():
        return []
    rows = curves[[*CURVE_KEY, "depth", "width"]].drop_duplicates().to_dict("records")
    p_values = sorted(curves.p_bw.unique())
    colors = {p: "0.35" if p == 0 else color for p, color in zip(p_values, _palette(len(p_values)))}
    fig, axes = _figure(3, len(rows))
    for row, panel in zip(rows, axes):
        size = select(curves, row)
        _fit_panels(panel, size, colors)
        title = f"{size_label(row['depth'], row['width'])} ({params_label(size.num_params.iloc[0])}), {variant_label(row)}"
        panel[0].set_title(title, fontsize="medium")
    fig.suptitle("fw loss over many epochs: mean over seeds, band: 95% t interval")
    return [_save(fig, Path(out_dir), "overfitting")]


# ----------------------------------------------------------------------------- ratio 1 curves

def _ratio1_curve_panel(ax: Axes, curves: pd.DataFrame, arms: list[dict], colors: dict, axis: str) -> None:
    """Per arm, ratio 1 (loss) at each nominal eval point (analysis.ratio1_curves): mean over seeds at
    the seeds' mean `axis` value, band: its 95% t interval over seeds."""
    for arm in arms:
        own = select(curves, arm).sort_values("nominal_epoch")
        if own.empty:
            continue
        color = colors[_key(arm, ROW_KEY)]
        ax.plot(own.axis_value, own["mean"], marker="o", ms=3, color=color,
                label=f"{arm_label(arm)} ({own.n.max()} seeds)")
        ax.fill_between(own.axis_value, own.ci_low.astype(float), own.ci_high.astype(float), color=color, alpha=0.2, lw=0)
    _reference_line(ax, "p_bw = 0")
    ax.set(xlabel=ALONG[AXES[axis]], ylabel="ratio 1 (fw loss)")
    ax.legend(fontsize="small")


def ratio1_curves(analysis: Analysis, out_dir: Path) -> list[Path]:
    """Ratio 1 (fw loss) over training (nominal epochs, fw tokens seen: RATIO1_CURVE_AXES, the rows),
    one column per model size, one line per (p_bw, variant), drawn from analysis.ratio1_curves."""
    rows, final = arm_groups(analysis.arms), analysis.final
    if not rows:
        return []
    arms = [arm for arm, _ in rows]
    colors = _colors([_key(arm, ROW_KEY) for arm in arms])
    sizes = _sizes(analysis.arms, final)
    fig, axes = _figure(len(sizes), len(RATIO1_CURVE_AXES))
    for axes_row, axis in zip(axes, RATIO1_CURVE_AXES):
        for ax, (depth, width, params) in zip(axes_row, sizes):
            ax.set_title(f"{size_label(depth, width)} ({params_label(params)})", fontsize="medium")
            curves = select(analysis.ratio1_curves, {"axis": axis, "depth": depth, "width": width})
            _ratio1_curve_panel(ax, curves, arms, colors, axis)
    fig.suptitle("ratio 1 = fw loss at p_bw = 0 / at p_bw = x over training (above 1: bw helped fw)\n"
                 "line: mean over seeds, band: its 95% t interval")
    return [_save(fig, Path(out_dir), "ratio1_curves")]


# ----------------------------------------------------------------------------- ratio 1 violins

ViolinGroups = list[tuple[str, dict]]  # (tick label, the columns and values its samples share)


def by_size(group: list[Arm], final: pd.DataFrame) -> ViolinGroups:
    return [(f"{params_label(params)}\n{depth}×{width}", {"depth": depth, "width": width})
            for depth, width, params in _sizes(group, final)]


def by_depth(group: list[Arm], final: pd.DataFrame) -> ViolinGroups:
    return [(f"depth {d}", {"depth": d}) for d in sorted({a.setting["depth"] for a in group})]


def by_width(group: list[Arm], final: pd.DataFrame) -> ViolinGroups:
    return [(f"width {w}", {"width": w}) for w in sorted({a.setting["width"] for a in group})]


VIOLIN_FIGURES = {"ratio1_violins": ("parameter count", by_size), "ratio1_violins_depth": ("depth", by_depth),
                  "ratio1_violins_width": ("width", by_width)}  # figure name -> (what a violin holds fixed, its groups)


def _violins(ax: Axes, samples: pd.DataFrame, groups: ViolinGroups) -> None:
    """A violin, its points, its mean (red bar) and median (white dot) per group."""
    jitter = np.random.default_rng(0)
    for pos, (label, where) in enumerate(groups):
        values = select(samples, where).ratio1_loss.to_numpy(dtype=float)
        if len(np.unique(values)) > 1:  # a kernel density needs spread
            ax.violinplot(values, positions=[pos], widths=0.8, showextrema=False)
        ax.scatter(pos + jitter.uniform(-0.12, 0.12, len(values)), values, s=7, color="k", alpha=0.4, lw=0)
        if len(values):
            ax.hlines(values.mean(), pos - 0.3, pos + 0.3, color="C3", lw=2)
            ax.plot(pos, np.median(values), "o", color="white", mec="k", zorder=3, gid="median")
    _reference_line(ax)
    counts = [len(select(samples, where)) for _, where in groups]
    ax.set_xticks(range(len(groups)), [f"{label}\nn = {n}" for (label, _), n in zip(groups, counts)], fontsize="small")
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel("ratio 1 (fw loss)")


def _violin_grid(analysis: Analysis, out_dir: Path, name: str) -> list[Path]:
    """Ratio 1 (loss) at every validation point, one violin per VIOLIN_FIGURES[name] group: one row
    per (p_bw, variant), one column per epoch window; an empty window is an annotated empty panel."""
    rows, final = arm_groups(analysis.arms), analysis.final
    if not rows:
        return []
    held, groups_of = VIOLIN_FIGURES[name]
    most = max(len(groups_of(group, final)) for _, group in rows)
    fig, axes = _figure(len(analysis.windows), len(rows), panel=(max(PANEL[0], 1.1 * most + 1.2), PANEL[1] + 0.5))
    for axes_row, (arm, group) in zip(axes, rows):
        for ax, window in zip(axes_row, analysis.windows):
            inside = select(window.samples, {**arm, "axis": "epoch"})
            ax.set_title(f"{arm_label(arm)}\nepochs {window_label(window)}, n = {len(inside)}", fontsize="medium")
            if inside.empty:
                _empty(ax, "empty window:\nno validation points in these epochs")
                continue
            _violins(ax, inside, groups_of(group, final))
    fig.suptitle(f"ratio 1 = fw loss at p_bw = 0 / at p_bw = x at every validation point, by {held} "
                 "(red bar: mean, white dot: median; above 1: bw helped fw)")
    return [_save(fig, Path(out_dir), name)]


def ratio1_violins(analysis: Analysis, out_dir: Path) -> list[Path]:
    """The violins by model size, by depth and by width (VIOLIN_FIGURES), one figure each."""
    return [path for name in VIOLIN_FIGURES for path in _violin_grid(analysis, out_dir, name)]


# ----------------------------------------------------------------------------- layer cut

RATIO_MEANING = {"ratio1": "p_bw = 0 / p_bw = x", "ratio2": "fw / bw"}


def _cut_line(ax: Axes, rows: pd.DataFrame, color, style: str, label: str | None) -> None:
    """ratio_then_mean over the fraction of depth remaining, band: its 95% interval over seeds."""
    line = rows[rows.averaging == "ratio_then_mean"].sort_values("blocks_remaining")
    fraction = line.blocks_remaining.astype(float) / line.depth.astype(float)
    ax.plot(fraction, line.value, style, marker="o", ms=3, color=color, label=label)
    ax.fill_between(fraction, line.ci_low.astype(float), line.ci_high.astype(float), color=color, alpha=0.15, lw=0)


def _cut_reference(ax: Axes, table: pd.DataFrame, arm: dict, ratio: str, metric: str, size: dict, color) -> None:
    """The p_bw = 0 reference: ratio 1 is 1; ratio 2 is the p_bw = 0 runs' own curve (dashed)."""
    if ratio == "ratio1":
        return
    shared = {k: arm[k] for k in [*CONTEXT, *BASELINE_VARIANT]}
    _cut_line(ax, select(table, {**shared, **size, "p_bw": 0.0, "ratio": ratio, "metric": metric}), color, "--", None)


def _cut_panel(ax: Axes, table: pd.DataFrame, arm: dict, ratio: str, metric: str,
               sizes: list[tuple[int, int, int]], colors: dict) -> None:
    for depth, width, params in sizes:
        size = {"depth": depth, "width": width}
        own = select(table, {**arm, **size, "ratio": ratio, "metric": metric})
        _cut_line(ax, own, colors[depth, width], "-", f"{size_label(depth, width)} ({params_label(params)})")
        _cut_reference(ax, table, arm, ratio, metric, size, colors[depth, width])
    _reference_line(ax)
    ax.set_xlim(0.0, 1.05)
    ax.set(xlabel="fraction of depth remaining", ylabel=ratio_label(ratio, metric))
    ax.legend(fontsize="small", title="dashed: p_bw = 0", title_fontsize="small")


def layer_cut_curves(analysis: Analysis, out_dir: Path) -> list[Path]:
    """Ratio 1 (ppl) and ratio 2 (loss) over the fraction of depth remaining, ratio_then_mean with
    its interval over seeds, one line per model size, one row per (p_bw, variant)."""
    rows, final = arm_groups(analysis.arms), analysis.final
    if not rows:
        return []
    table = analysis.ratios[analysis.ratios.phase == CUT_PHASE].dropna(subset=["value"])
    colors = _colors([(depth, width) for depth, width, _ in _sizes(analysis.arms, final)])
    fig, axes = _figure(len(CUT_RATIOS), len(rows))
    for axes_row, (arm, group) in zip(axes, rows):
        for ax, (ratio, metric) in zip(axes_row, CUT_RATIOS):
            ax.set_title(f"{arm_label(arm)}\n{ratio_label(ratio, metric)}: {RATIO_MEANING[ratio]}", fontsize="medium")
            if select(table, {**arm, "ratio": ratio}).empty:
                _empty(ax, "no values: no p_bw = 0 run to compare with")
                continue
            _cut_panel(ax, table, arm, ratio, metric, _sizes(group, final), colors)
    fig.suptitle("layer cut: transformer blocks removed from the back (band: 95% interval over seeds)")
    return [_save(fig, Path(out_dir), "layer_cut")]


# ----------------------------------------------------------------------------- ratio 1 scatter

def _scatter_panel(ax: Axes, pairs: pd.DataFrame, by: str, colors: dict) -> None:
    for value in sorted(pairs[by].unique()):
        color, runs = colors[value], pairs[pairs[by] == value]
        ax.scatter(runs.num_params, runs.ratio1_loss, s=16, color=color, alpha=0.45, lw=0)
        means = runs.groupby("num_params").ratio1_loss.mean()
        ax.scatter(means.index, means, s=60, marker="D", color=color, edgecolor="k", label=f"{by} {value}")
    _reference_line(ax)
    ax.set_xscale("log")
    ax.set(xlabel="parameters", ylabel="ratio 1 (final fw loss)")
    ax.legend(fontsize="small")


def ratio1_scatter(analysis: Analysis, out_dir: Path) -> list[Path]:
    """Ratio 1 of final fw loss against parameter count, coloured by width and by depth (two
    columns), one row per (p_bw, variant)."""
    rows = arm_groups(analysis.arms)
    if not rows:
        return []
    colors = {by: _colors(sorted(analysis.final[by].unique())) for by in ("width", "depth")}
    fig, axes = _figure(2, len(rows))
    for axes_row, (arm, _) in zip(axes, rows):
        own = select(analysis.final_pairs, {**arm, "axis": "epoch"})
        for ax, by in zip(axes_row, ("width", "depth")):
            ax.set_title(f"{arm_label(arm)}\ncoloured by {by}", fontsize="medium")
            if own.empty:
                _empty(ax, "no p_bw = 0 run of the same size and seed")
                continue
            _scatter_panel(ax, own, by, colors[by])
    fig.suptitle("ratio 1 of final fw loss (dots: seed pairs, diamonds: their mean; above 1: bw helped fw)")
    return [_save(fig, Path(out_dir), "ratio1_scatter")]


# ----------------------------------------------------------------------------- data efficiency

def _interval_bars(frame: pd.DataFrame, mean: str = "mean") -> np.ndarray | None:
    """matplotlib's yerr of `frame`'s mean with its interval (ci_low, ci_high); None where no row has one."""
    low, high = frame.ci_low.astype(float), frame.ci_high.astype(float)
    if low.isna().all():
        return None
    return np.vstack([frame[mean] - low, high - frame[mean]]).astype(float)


def paired_differences_figure(differences: pd.DataFrame, contrast: dict, out_dir: Path, name: str) -> Path:
    """A paired contrast (a row of data_efficiency's CONTRAST_COLUMNS): each seed's difference (differences:
    seed, diff) as a dot, their mean with its 95% t interval beside them, and 0."""
    fig, axes = _figure(1, panel=(max(PANEL[0], 0.45 * len(differences) + 2.0), PANEL[1]))
    ax = axes[0, 0]
    ax.plot(range(len(differences)), differences["diff"], "o", color="0.3", label=f"one seed (n = {len(differences)})")
    mean = pd.DataFrame([contrast]).rename(columns={"mean_diff": "mean"})
    ax.errorbar([len(differences)], mean["mean"], yerr=_interval_bars(mean), fmt="D", color="C3", capsize=4,
                label="mean, 95% t interval")
    ax.axhline(0.0, color="0.5", ls="--", lw=1)
    ax.set_xticks(range(len(differences) + 1), [*map(str, differences.seed), "mean"], fontsize="small")
    ax.set(xlabel="seed", ylabel=f"test fw loss difference ({contrast['unit']})")
    ax.set_title(f"{contrast['contrast']}: p_bw {contrast['p_bw']:g} minus p_bw {contrast['p_bw_base']:g}, "
                 f"train_fraction {contrast['train_fraction']:g}", fontsize="medium")
    ax.legend(fontsize="small")
    fig.suptitle("held-out test fw loss, paired by seed\n(below 0: bw training lowered it)", fontsize="medium")
    return _save(fig, Path(out_dir), name)


def _multiplier_text(multiplier: dict) -> str:
    interval = ("" if pd.isna(multiplier["ci_low"]) else
                f"\n95% CI {multiplier['ci_low']:.2f} … {multiplier['ci_high']:.2f}")
    return f"m = {multiplier['multiplier']:.2f}{interval}"


def _mark_multiplier(ax: Axes, bw: pd.Series, multiplier: dict) -> None:
    """From the fw+bw point to the unique tokens at which the fw-only curve reaches its loss, labelled m below
    the middle of that line (log scale)."""
    reached = multiplier["multiplier"] * bw.unique_tokens
    ax.plot([bw.unique_tokens, reached], [bw["mean"]] * 2, ":", color="C3")
    ax.annotate(_multiplier_text(multiplier), (np.sqrt(bw.unique_tokens * reached), bw["mean"]), xytext=(0, -6),
                textcoords="offset points", ha="center", va="top", fontsize="small", color="C3")


def data_efficiency_figure(curve: pd.DataFrame, dose_curve: pd.DataFrame, multiplier: dict, out_dir: Path,
                           name: str) -> Path:
    """Best test fw loss against unique training tokens (log x), from data_efficiency's tables: the fw-only
    curve (curve's arm "fw", with its 95% t intervals over seeds and its non-increasing fit where that differs),
    the fw+bw arm at its fraction and the other doses there (dose_curve), and the multiplier where it has a value."""
    fw, bw = curve[curve.arm == "fw"], curve[curve.arm != "fw"].iloc[0]
    fig, axes = _figure(1, panel=(PANEL[0] + 1.6, PANEL[1] + 0.6))
    ax = axes[0, 0]
    ax.errorbar(fw.unique_tokens, fw["mean"], yerr=_interval_bars(fw), marker="o", color="0.35", capsize=3,
                label=f"fw only (n = {fw.n.iloc[0]} seeds)")
    if not np.allclose(fw.fitted, fw["mean"]):
        ax.plot(fw.unique_tokens, fw.fitted, "--", color="0.35", lw=1, label="fw only, non-increasing fit")
    ax.errorbar([bw.unique_tokens], [bw["mean"]], yerr=_interval_bars(curve[curve.arm != "fw"]), fmt="D",
                color="C3", capsize=3, label=f"p_bw {bw.p_bw:g} (n = {bw.n} seeds)")
    others = dose_curve[~dose_curve.p_bw.isin([0.0, bw.p_bw])]
    for i, (dose, color) in enumerate(zip(others.to_dict("records"), _palette(len(others)))):
        at = pd.DataFrame([dose])
        ax.errorbar([bw.unique_tokens * 1.05 ** (i + 1)], at["mean"], yerr=_interval_bars(at), fmt="s", color=color,
                    capsize=2, ms=4, label=f"p_bw {dose['p_bw']:g} (n = {dose['n']} seeds)")
    if not pd.isna(multiplier["multiplier"]):
        _mark_multiplier(ax, bw, multiplier)
    ax.set_xscale("log")
    ax.set(xlabel="unique training tokens", ylabel="best test fw loss (validation-selected checkpoint)")
    ax.legend(fontsize="small")
    fig.suptitle("held-out test fw loss against unique training data\nmean over seeds, bars: 95% t interval",
                 fontsize="medium")
    return _save(fig, Path(out_dir), name)


# ----------------------------------------------------------------------------- retrieval

def comparison_forest(rows: pd.DataFrame, out_dir: Path, name: str) -> Path:
    """A forest plot of retrieval comparisons (rows, top to bottom: label, mean_diff, ci_low, ci_high, primary):
    a dot at each a − b of nDCG@10 with its 95% interval, 0 dashed, the primary comparison's rows in red."""
    fig, axes = _figure(1, panel=(PANEL[0] + 3.0, 0.3 * len(rows) + 1.6))
    ax = axes[0, 0]
    y = np.arange(len(rows))[::-1]
    for primary, style, color, label in ((False, "o", "0.3", "secondary comparison"), (True, "D", "C3", "primary comparison")):
        at = (rows.primary == primary).to_numpy()
        if at.any():  # the interval as a line, not error bars: a percentile interval need not hold the mean
            ax.hlines(y[at], rows.ci_low[at].astype(float), rows.ci_high[at].astype(float), color=color, lw=1.5)
            ax.plot(rows.mean_diff[at], y[at], style, color=color, label=label)
    ax.axvline(0.0, color="0.5", ls="--", lw=1)
    ax.set_yticks(y, rows.label, fontsize="small")
    for tick, primary in zip(ax.get_yticklabels(), rows.primary):
        if primary:
            tick.set(color="C3", fontweight="bold")
    ax.set(xlabel="nDCG@10 difference, a − b", ylim=(-0.7, len(rows) - 0.3))
    fig.legend(loc="outside lower center", ncols=2, fontsize="small")
    fig.suptitle("nDCG@10 of a − b on the test queries, within each model\ndot: mean over seeds and queries, bar: "
                 "two-level bootstrap 95% interval", fontsize="medium")
    return _save(fig, Path(out_dir), name)


def make_figures(analysis: Analysis, out_dir: Path) -> dict[str, list[Path]]:
    """Every figure of the report, by kind; an empty list where there is nothing to draw."""
    return {
        "overfitting": overfitting_curves(analysis, out_dir),
        "loss_curves": loss_curves(analysis, out_dir),
        "compute_curves": compute_curves(analysis, out_dir),
        "ratio1_curves": ratio1_curves(analysis, out_dir),
        "ratio1_violins": ratio1_violins(analysis, out_dir),
        "layer_cut": layer_cut_curves(analysis, out_dir),
        "ratio1_scatter": ratio1_scatter(analysis, out_dir),
    }
