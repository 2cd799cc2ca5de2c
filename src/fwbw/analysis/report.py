"""The report of a sweep (`fwbw report`): it leads with the answer (one table, a row per question and setting),
then data efficiency, the study's questions, retrieval, more figures, samples, what was not analysed, setup
and runs, each section built by its module in fwbw.analysis.sections (sections.order orders them,
sections.render writes them). Writes report.html (self-contained: figures as base64 data URIs, inline CSS),
report.md (figures linked from figures/), the figures, and the tables as CSV (answer.csv and skipped.csv
among them)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from fwbw.analysis.efficiency_report import efficiency_analysis, read_runs, write_efficiency
from fwbw.analysis.figures import make_figures
from fwbw.analysis.retrieval_stats import RetrievalAnalysis, sweep_retrieval
from fwbw.analysis.sections.efficiency import EFFICIENCY_TITLE, efficiency_lead, efficiency_statements
from fwbw.analysis.sections.figure_blocks import place
from fwbw.analysis.sections.findings import findings, findings_by_question
from fwbw.analysis.sections.inputs import Inputs, read_results, sweep_setup
from fwbw.analysis.sections.order import report_tables, sections
from fwbw.analysis.sections.render import render_html, render_markdown
from fwbw.analysis.sections.retrieval import RETRIEVAL_TITLE, retrieval_statements
from fwbw.analysis.sections.runs import setup_table
from fwbw.analysis.sections.samples import NO_BW_SAMPLE, sample_blocks
from fwbw.analysis.stats import DEFAULT_WINDOWS, Analysis, Window
from fwbw.analysis.sweep_analysis import analyse
from fwbw.files import atomic_write, atomic_write_text

__all__ = ["EFFICIENCY_TITLE", "NO_BW_SAMPLE", "RETRIEVAL_TITLE", "efficiency_lead", "efficiency_statements", "findings",
           "findings_by_question", "read_results", "render_markdown", "retrieval_statements", "sample_blocks",
           "write_report"]

CSV_TABLES = ("ratios", "ratio1_samples", "ratio1_curves", "final_losses", "paired", "mask_audit", "runs", "scaling",
              "size_tests", "power", "arrow_of_time", "run_fit", "overfitting", "fit_curves")  # Analysis fields
RETRIEVAL_TABLES = ("retrieval_comparisons", "retrieval_systems")  # written when the sweep has retrieval results


def _csv_tables(analysis: Analysis, retrieval: RetrievalAnalysis | None) -> dict[str, pd.DataFrame]:
    """The analyses' tables by CSV name: CSV_TABLES, and RETRIEVAL_TABLES where the sweep has them."""
    tables = {name: getattr(analysis, name) for name in CSV_TABLES}
    return tables | ({} if retrieval is None else retrieval_tables(retrieval))


def retrieval_tables(retrieval: RetrievalAnalysis) -> dict[str, pd.DataFrame]:
    """The retrieval analysis's tables by CSV name (RETRIEVAL_TABLES)."""
    return {name: getattr(retrieval, name.removeprefix("retrieval_")) for name in RETRIEVAL_TABLES}


def write_csv_tables(tables: dict[str, pd.DataFrame], out_dir: Path) -> None:
    """Each table as out_dir/<name>.csv, atomically."""
    for name, table in tables.items():
        atomic_write(out_dir / f"{name}.csv", lambda tmp, table=table: table.to_csv(tmp, index=False))


def _inputs(sweep_dir: Path, out_dir: Path, windows: Sequence[Window]) -> Inputs:
    """Read and analyse the sweep and draw its figures (into out_dir/figures, the data-efficiency tables into
    out_dir)."""
    results = read_results(sweep_dir)
    analysis = analyse(results, windows)
    efficiency = efficiency_analysis(read_runs(sweep_dir), results)
    drawn = () if efficiency is None else tuple(write_efficiency(efficiency, out_dir, out_dir / "figures"))
    return Inputs(analysis, setup_table(sweep_setup(sweep_dir), analysis.runs),
                  place(make_figures(analysis, out_dir / "figures")), sample_blocks(analysis.runs, sweep_dir),
                  sweep_retrieval(sweep_dir), efficiency, drawn)


def write_report(sweep_dir: Path, out_dir: Path, windows: Sequence[Window] = DEFAULT_WINDOWS) -> Path:
    """Write report.html, report.md, figures/ and the CSV tables for the sweep in `sweep_dir` (with the
    data-efficiency tables and figures where its runs.csv has such arms); return the path of report.html.
    Every file is written atomically."""
    sweep_dir, out_dir = Path(sweep_dir), Path(out_dir)
    inputs = _inputs(sweep_dir, out_dir, windows)
    tables = report_tables(inputs)
    write_csv_tables(_csv_tables(inputs.analysis, inputs.retrieval) | tables, out_dir)
    shown = sections(inputs, tables)
    title = f"fwbw sweep report: {sweep_dir.name}"
    atomic_write_text(out_dir / "report.md", render_markdown(title, shown, out_dir))
    atomic_write_text(out_dir / "report.html", render_html(title, shown))
    return out_dir / "report.html"
