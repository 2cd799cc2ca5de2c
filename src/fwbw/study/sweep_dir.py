"""Where a sweep keeps its files.

  sweep.json                 the spec and the list of runs (id -> config)
  runs/<run_id>/             one run directory (fwbw.training.run_dir)
  results.parquet/.csv       the tidy table (fwbw.study.results)
"""

from __future__ import annotations

import re
from pathlib import Path

from fwbw.files import read_json

RUNS = "runs"
SWEEP_FILE = "sweep.json"
RUN_ID = re.compile(r"[A-Za-z0-9._-]+")  # a plain folder name: no separators, so never outside runs/


def read_sweep(sweep_dir: Path) -> dict:
    """sweep.json, its run ids checked to be plain folder names inside runs/."""
    path = Path(sweep_dir) / SWEEP_FILE
    if not path.is_file():
        raise ValueError(f"{sweep_dir} is not a sweep directory (no {SWEEP_FILE})")
    sweep = read_json(path)
    runs = sweep.get("runs") if isinstance(sweep, dict) else None
    if not isinstance(runs, dict):
        raise ValueError(f"{path}: no 'runs' table (run id -> config)")
    for run_id in runs:
        if not RUN_ID.fullmatch(run_id) or run_id in (".", ".."):
            raise ValueError(f"{path}: run id {run_id!r} is not a plain folder name (letters, digits, . _ -)")
    return sweep
