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
from matplotlib.ticker import MaxNLocator

from fwbw.analysis.stats import (
    ARM,
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
ALONG = {"nominal_epoch": "epoch (nominal)", "flops": "training FLOPs"}  # x axes of the loss curves: points column -> label


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


def _loss_panel(ax: Axes, size: pd.DataFrame, direction: str, colors: dict, along: str) -> None:
    for p_bw, runs in size.groupby("p_bw"):
        band = _seed_band(runs, f"loss_{direction}", along)
        label = f"p_bw = {p_bw:g} ({runs.run_id.nunique()} runs)"
        ax.plot(band.index, band["mean"], color=colors[p_bw], label=label)
        ax.fill_between(band.index, band["min"], band["max"], color=colors[p_bw], alpha=0.2, lw=0)
    ax.set(xlabel=ALONG[along], ylabel=f"{direction} val loss")
    ax.legend(fontsize="small")


def _loss_grid(points: pd.DataFrame, groups: dict[tuple, set[str]], direction: str, out_dir: Path,
               along: str = "nominal_epoch") -> Path:
    """One row per (variant, depth), one column per width; loss over `along` (ALONG)."""
    widths = sorted(points.width.unique())
    rows = [(key, depth) for key, ids in groups.items()
            for depth in sorted(points[points.run_id.isin(ids)].depth.unique())]
    p_values = sorted(points.p_bw.unique())
    colors = {p: "0.35" if p == 0 else color for p, color in zip(p_values, _palette(len(p_values)))}
    fig, axes = _figure(len(widths), len(rows))
    for i, (key, depth) in enumerate(rows):
        variant = variant_label(dict(zip(CURVE_KEY, key)))
        for j, width in enumerate(widths):
            size = select(points[points.run_id.isin(groups[key])], {"depth": depth, "width": width})
            if size.empty:
                _empty(axes[i, j], f"no runs at {size_label(depth, width)}\n{variant}")
                continue
            _loss_panel(axes[i, j], size, direction, colors, along)
            params = params_label(size.num_params.iloc[0])
            axes[i, j].set_title(f"{size_label(depth, width)} ({params})\n{variant}", fontsize="medium")
    fig.suptitle(f"{direction} validation loss over {ALONG[along]}: mean over seeds, band min–max")
    return _save(fig, out_dir, f"loss_{direction}" + ("" if along == "nominal_epoch" else f"_{along}"))


def loss_curves(analysis: Analysis, out_dir: Path) -> list[Path]:
    """fw and bw validation loss over epochs, p_bw = 0 against p_bw = x, one panel per model size
    and variant (bw_mode, bw_mask, task_tokens); one figure per direction."""
    groups = _curve_groups(analysis)
    return [_loss_grid(analysis.points, groups, d, Path(out_dir)) for d in DIRECTIONS] if groups else []


def compute_curves(analysis: Analysis, out_dir: Path) -> list[Path]:
    """fw validation loss over training FLOPs (the points' flops), p_bw = 0 against p_bw = x, one
    panel per model size and variant: the equal-compute comparison."""
    groups = _curve_groups(analysis)
    return [_loss_grid(analysis.points, groups, "fw", Path(out_dir), along="flops")] if groups else []


# ----------------------------------------------------------------------------- ratio 1 violins

def _violins(ax: Axes, samples: pd.DataFrame, sizes: list[tuple[int, int, int]]) -> None:
    jitter = np.random.default_rng(0)
    labels = []
    for pos, (depth, width, params) in enumerate(sizes):
        values = select(samples, {"depth": depth, "width": width}).ratio1_loss.to_numpy(dtype=float)
        labels.append(f"{params_label(params)}\n{depth}×{width}\nn = {len(values)}")
        if len(np.unique(values)) > 1:  # a kernel density needs spread
            ax.violinplot(values, positions=[pos], widths=0.8, showextrema=False)
        ax.scatter(pos + jitter.uniform(-0.12, 0.12, len(values)), values, s=7, color="k", alpha=0.4, lw=0)
        if len(values):
            ax.hlines(values.mean(), pos - 0.3, pos + 0.3, color="C3", lw=2)
    ax.axhline(1.0, color="0.5", ls="--", lw=1)
    ax.set_xticks(range(len(sizes)), labels, fontsize="small")
    ax.set_xlim(-0.6, len(sizes) - 0.4)
    ax.set_ylabel("ratio 1 (fw loss)")


def ratio1_violins(analysis: Analysis, out_dir: Path) -> list[Path]:
    """Ratio 1 (loss) at every validation point, by parameter count: one row per (p_bw, variant),
    one column per epoch window; an empty window is an annotated empty panel."""
    rows, final = arm_groups(analysis.arms), analysis.final
    if not rows:
        return []
    most_sizes = max(len(_sizes(group, final)) for _, group in rows)
    panel = (max(PANEL[0], 1.1 * most_sizes + 1.2), PANEL[1] + 0.5)
    fig, axes = _figure(len(analysis.windows), len(rows), panel=panel)
    for axes_row, (arm, group) in zip(axes, rows):
        for ax, window in zip(axes_row, analysis.windows):
            inside = select(window.samples, {**arm, "axis": "epoch"})
            title = f"{arm_label(arm)}\nepochs {window_label(window)}, n = {len(inside)}"
            ax.set_title(title, fontsize="medium")
            if inside.empty:
                _empty(ax, "empty window:\nno validation points in these epochs")
                continue
            _violins(ax, inside, _sizes(group, final))
    fig.suptitle("ratio 1 = fw loss at p_bw = 0 / at p_bw = x at every validation point "
                 "(red bar: mean; above 1: bw helped fw)")
    return [_save(fig, Path(out_dir), "ratio1_violins")]


# ----------------------------------------------------------------------------- layer cut

RATIO_MEANING = {"ratio1": "p_bw = 0 / p_bw = x", "ratio2": "fw / bw"}


def _cut_panel(ax: Axes, rows: pd.DataFrame, sizes: list[tuple[int, int, int]], colors: dict, ylabel: str) -> None:
    for depth, width, params in sizes:
        color = colors[depth, width]
        line = select(rows, {"depth": depth, "width": width})
        for averaging, style in (("mean_then_ratio", "-"), ("ratio_then_mean", ":")):
            points = line[line.averaging == averaging].sort_values("blocks_remaining")
            label = f"{size_label(depth, width)} ({params_label(params)})" if style == "-" else None
            ax.plot(points.blocks_remaining.astype(float), points.value, style, marker="o", ms=3,
                    color=color, label=label)
    ax.axhline(1.0, color="0.5", ls="--", lw=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="blocks remaining", ylabel=ylabel)
    ax.legend(fontsize="small", title="solid: mean_then_ratio\ndotted: ratio_then_mean", title_fontsize="small")


def layer_cut_curves(analysis: Analysis, out_dir: Path) -> list[Path]:
    """Ratio 1 (ppl) and ratio 2 (loss) over blocks remaining, one line per model size, one row per
    (p_bw, variant)."""
    rows, final = arm_groups(analysis.arms), analysis.final
    if not rows:
        return []
    cut = analysis.ratios[analysis.ratios.phase == CUT_PHASE]
    colors = _colors([(depth, width) for depth, width, _ in _sizes(analysis.arms, final)])
    fig, axes = _figure(len(CUT_RATIOS), len(rows))
    for axes_row, (arm, group) in zip(axes, rows):
        for ax, (ratio, metric) in zip(axes_row, CUT_RATIOS):
            ax.set_title(f"{arm_label(arm)}\n{ratio_label(ratio, metric)}: {RATIO_MEANING[ratio]}", fontsize="medium")
            lines = select(cut, {**arm, "ratio": ratio, "metric": metric}).dropna(subset=["value"])
            if lines.empty:
                _empty(ax, "no values: no p_bw = 0 run to compare with")
                continue
            _cut_panel(ax, lines, _sizes(group, final), colors, ratio.replace("ratio", "ratio "))
    fig.suptitle("layer cut: transformer blocks removed from the back")
    return [_save(fig, Path(out_dir), "layer_cut")]


# ----------------------------------------------------------------------------- ratio 1 scatter

def _scatter_panel(ax: Axes, pairs: pd.DataFrame, by: str, colors: dict) -> None:
    for value in sorted(pairs[by].unique()):
        color, runs = colors[value], pairs[pairs[by] == value]
        ax.scatter(runs.num_params, runs.ratio1_loss, s=16, color=color, alpha=0.45, lw=0)
        means = runs.groupby("num_params").ratio1_loss.mean()
        ax.scatter(means.index, means, s=60, marker="D", color=color, edgecolor="k", label=f"{by} {value}")
    ax.axhline(1.0, color="0.5", ls="--", lw=1)
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


def make_figures(analysis: Analysis, out_dir: Path) -> dict[str, list[Path]]:
    """Every figure of the report, by kind; an empty list where there is nothing to draw."""
    return {
        "loss_curves": loss_curves(analysis, out_dir),
        "compute_curves": compute_curves(analysis, out_dir),
        "ratio1_violins": ratio1_violins(analysis, out_dir),
        "layer_cut": layer_cut_curves(analysis, out_dir),
        "ratio1_scatter": ratio1_scatter(analysis, out_dir),
    }
