"""What the report's sections are built from: the sweep's files read (results table, sweep.json's setup),
and the analyses, figures and samples gathered once per report (`Inputs`)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pandas as pd

from fwbw.analysis.efficiency_report import Efficiency
from fwbw.analysis.retrieval_stats import RetrievalAnalysis
from fwbw.analysis.stats import VARIANT, Analysis
from fwbw.study.sweep_dir import RESULTS_CSV, RESULTS_PARQUET, SWEEP_FILE, read_sweep

Figures = list[tuple[Path, str]]  # (png path, caption)


class Inputs(NamedTuple):
    """Everything a section shows, computed once per report."""

    analysis: Analysis
    setup: pd.DataFrame  # sweep.json as key/value rows with the run counts (runs.setup_table)
    figures: dict[str, Figures]  # the study's figures by the section that shows them (figure_blocks.place)
    samples: list[tuple]  # the sample blocks (samples.sample_blocks)
    retrieval: RetrievalAnalysis | None = None  # where the sweep has retrieval results
    efficiency: Efficiency | None = None  # where the sweep has data-efficiency arms
    efficiency_figures: tuple[Path, ...] = ()  # their figures (efficiency_report.FIGURES that were drawn)


def read_results(sweep_dir: Path) -> pd.DataFrame:
    """The sweep's tidy results table: results.parquet, else results.csv."""
    parquet = Path(sweep_dir) / RESULTS_PARQUET
    return pd.read_parquet(parquet) if parquet.exists() else pd.read_csv(Path(sweep_dir) / RESULTS_CSV)


def sweep_setup(sweep_dir: Path) -> dict:
    """The setup described by sweep.json (its "setup" entry), or {} when there is none."""
    exists = (Path(sweep_dir) / SWEEP_FILE).exists()
    return read_sweep(sweep_dir).get("setup", {}) if exists else {}


def finished(analysis: Analysis) -> bool:
    """Whether some run has finished (status done): the statistics exist."""
    return bool((analysis.runs.status == "done").any())


def with_variant(table: pd.DataFrame) -> bool:
    """Whether the table's settings differ in VARIANT, so a sentence must name it."""
    return table[VARIANT].drop_duplicates().shape[0] > 1


def leaking_masks(mask_summary: pd.DataFrame) -> set[str]:
    """The bw masks whose config flags them as reading their own labels."""
    return set(mask_summary.loc[mask_summary.leaks_labels.astype(bool), "bw_mask"])
