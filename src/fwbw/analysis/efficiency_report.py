"""The data-efficiency experiment's files (issue 18, docs/analysis-plan.md): its inputs read from a sweep
folder (runs.csv and the results table), every table of fwbw.analysis.data_efficiency.analyse written as CSV
(TABLE_FILES) and its two figures. `fwbw report`'s data-efficiency section (fwbw.analysis.report) and
scripts/publish_efficiency.py both write them with these functions."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pandas as pd

from fwbw.analysis import data_efficiency as de
from fwbw.analysis.figures import data_efficiency_figure, paired_differences_figure
from fwbw.files import atomic_write
from fwbw.study.sweep_dir import RUNS_CSV

TABLE_FILES = {  # analyse's table -> its CSV's name (without .csv)
    "primary": "efficiency_primary", "multiplier": "efficiency_multiplier", "curve": "efficiency_curve",
    "q2": "efficiency_q2", "dose": "efficiency_dose", "dose_curve": "efficiency_dose_curve",
    "lr_selection": "efficiency_lr", "controls": "efficiency_controls", "matched": "efficiency_matched",
    "skipped": "efficiency_skipped",
}
FIGURES = ("efficiency_paired", "efficiency_data_curve")  # the figures' file stems


class Efficiency(NamedTuple):
    """A sweep's data-efficiency analysis: its runs (runs.csv with train_flops) and analyse's tables."""

    runs: pd.DataFrame
    tables: dict[str, pd.DataFrame]


def read_runs(sweep_dir: Path) -> pd.DataFrame | None:
    """The sweep's runs.csv, or None where it has none."""
    path = Path(sweep_dir) / RUNS_CSV
    return pd.read_csv(path) if path.exists() else None


def has_efficiency_arms(runs: pd.DataFrame) -> bool:
    """Whether some run trains on a share of the training data, replays, or has a test-split score."""
    return bool((runs.train_fraction < 1).any() or runs.replay.astype(bool).any() or runs.test_fw_loss.notna().any())


def efficiency_analysis(runs: pd.DataFrame | None, results: pd.DataFrame) -> Efficiency | None:
    """analyse's tables of the runs (runs.csv) and the results table's curves; None without data-efficiency arms."""
    if runs is None or not has_efficiency_arms(runs):
        return None
    runs = de.runs_with_flops(runs)
    return Efficiency(runs, de.analyse(runs, de.curves_from_results(results, runs)))


def primary_differences(efficiency: Efficiency) -> pd.DataFrame:
    """The primary contrast's per-seed differences of test_fw_loss (seed, diff), by seed."""
    row = efficiency.tables["primary"].iloc[0]
    x, base = ({c: row[f"{c}{suffix}"] for c in de.SETTING_COLUMNS} for suffix in ("", "_base"))
    pairs = de.seed_pairs(de.done_runs(efficiency.runs), x, base)
    differences = pairs.assign(diff=pairs[f"{de.MEASURE}_x"] - pairs[f"{de.MEASURE}_base"])
    return differences[["seed", "diff"]].sort_values("seed")


def write_tables(efficiency: Efficiency, out_dir: Path) -> None:
    """Every table as out_dir/<TABLE_FILES name>.csv."""
    for name, stem in TABLE_FILES.items():
        table = efficiency.tables[name]
        atomic_write(Path(out_dir) / f"{stem}.csv", lambda tmp, table=table: table.to_csv(tmp, index=False))


def draw_figures(efficiency: Efficiency, out_dir: Path) -> list[Path]:
    """The figures (FIGURES) whose tables have rows: the primary contrast's paired differences per seed, and
    best test fw loss against unique training tokens."""
    tables, drawn = efficiency.tables, []
    if len(tables["primary"]):
        primary = tables["primary"].iloc[0].to_dict()
        drawn.append(paired_differences_figure(primary_differences(efficiency), primary, out_dir, FIGURES[0]))
    if len(tables["curve"]):
        multiplier = tables["multiplier"].iloc[0].to_dict()
        drawn.append(data_efficiency_figure(tables["curve"], tables["dose_curve"], multiplier, out_dir, FIGURES[1]))
    return drawn


def write_efficiency(efficiency: Efficiency, out_dir: Path, figure_dir: Path) -> list[Path]:
    """The tables as CSVs in out_dir and the figures in figure_dir; return the figures' PNG paths."""
    write_tables(efficiency, out_dir)
    return draw_figures(efficiency, figure_dir)
