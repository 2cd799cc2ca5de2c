"""Publish the retrieval study's results (issue 19) where the README can cite them: the comparisons and systems
tables of fwbw.analysis.retrieval_stats as CSVs, the forest plot of the comparisons the answer rests on, and
summary.md (the answer's one sentence, the figure, the tables), written as `fwbw report` writes its retrieval
section.

    .venv/bin/python scripts/publish_retrieval.py SWEEP [OUT]   (OUT: docs/results/retrieval/)
"""

from __future__ import annotations

from pathlib import Path

from fwbw.analysis.figures import comparison_forest
from fwbw.analysis.publish import publisher_main, write_summary
from fwbw.analysis.report import RETRIEVAL_TABLES, RETRIEVAL_TITLE, retrieval_statements, retrieval_tables, write_csv_tables
from fwbw.analysis.retrieval_stats import sweep_retrieval
from fwbw.analysis.sections.figure_blocks import figure_block
from fwbw.analysis.sections.retrieval import FOREST, FOREST_CAPTION, forest_rows
from fwbw.study.sweep_dir import RETRIEVAL_CSV, RETRIEVAL_PARQUET

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "retrieval"


def publish(sweep_dir: Path, out_dir: Path = DEFAULT_OUT) -> Path:
    """Write the tables, the forest plot and summary.md of the sweep's retrieval results into out_dir; return
    summary.md's path. A sweep without retrieval results raises ValueError."""
    sweep_dir, out_dir = Path(sweep_dir), Path(out_dir)
    retrieval = sweep_retrieval(sweep_dir)
    if retrieval is None:
        raise ValueError(f"{sweep_dir}: no retrieval results in its {RETRIEVAL_PARQUET} or {RETRIEVAL_CSV}")
    write_csv_tables(retrieval_tables(retrieval), out_dir)
    rows = forest_rows(retrieval)
    figures = [(comparison_forest(rows, out_dir, FOREST), FOREST_CAPTION)] if len(rows) else []
    files = ", ".join(f"{name}.csv" for name in RETRIEVAL_TABLES)
    blocks = [*(("p", sentence) for sentence in retrieval_statements(retrieval)), *figure_block(figures),
              ("p", f"Tables: {files}. Analysed as pre-registered in docs/retrieval-plan.md.")]
    return write_summary(f"{RETRIEVAL_TITLE}: {sweep_dir.name}", blocks, out_dir)


if __name__ == "__main__":
    publisher_main(publish, "the retrieval study's tables and forest plot", DEFAULT_OUT)
