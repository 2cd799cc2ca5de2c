"""Publish the data-efficiency experiment's results (issue 18) where the README can cite them: the tables
of fwbw.analysis.data_efficiency as CSVs, the figures, the sweep's runs.csv and summary.md (one sentence per
result, the figures, the parts skipped), written as `fwbw report` writes its data-efficiency section.

    .venv/bin/python scripts/publish_efficiency.py SWEEP [OUT]   (OUT: docs/results/data-efficiency/)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fwbw.analysis.efficiency_report import TABLE_FILES, efficiency_analysis, read_runs, write_efficiency
from fwbw.analysis.publish import publisher_main, write_summary
from fwbw.analysis.report import EFFICIENCY_TITLE, efficiency_lead, read_results
from fwbw.files import atomic_write
from fwbw.study.sweep_dir import RUNS_CSV

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "data-efficiency"


def publish(sweep_dir: Path, out_dir: Path = DEFAULT_OUT) -> Path:
    """Write the tables, figures, runs.csv and summary.md of the sweep's data-efficiency arms into out_dir;
    return summary.md's path. A sweep without such arms raises ValueError."""
    sweep_dir, out_dir = Path(sweep_dir), Path(out_dir)
    efficiency = efficiency_analysis(read_runs(sweep_dir), read_results(sweep_dir))
    if efficiency is None:
        raise ValueError(f"{sweep_dir}: no data-efficiency runs in its {RUNS_CSV}")
    figures = write_efficiency(efficiency, out_dir, out_dir)
    atomic_write(out_dir / RUNS_CSV, lambda tmp: shutil.copyfile(sweep_dir / RUNS_CSV, tmp))
    files = ", ".join(f"{stem}.csv" for stem in TABLE_FILES.values())
    blocks = [*efficiency_lead(efficiency, figures),
              ("p", f"Tables: {files}; every run: {RUNS_CSV}. Analysed as pre-registered in docs/analysis-plan.md.")]
    return write_summary(f"{EFFICIENCY_TITLE}: {sweep_dir.name}", blocks, out_dir)


if __name__ == "__main__":
    publisher_main(publish, "the data-efficiency experiment's tables, figures and runs.csv", DEFAULT_OUT)
