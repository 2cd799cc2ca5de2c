"""Where a sweep keeps its files.

  sweep.json                 the spec and the list of runs (id -> config)
  runs/<run_id>/             one run directory (fwbw.training.run_dir)
  results.parquet/.csv       the tidy table (fwbw.study.results)
  retrieval/                 retrieval results (fwbw.study.retrieval_sweep): bm25/<task>/,
                             <run_id>/<task>-<embed>...-ft<N>/, <run_id>/finetuned/, cache/
  retrieval.parquet/.csv     their table, one row per result (fwbw.study.results)
  slurm/                     job files and logs of `--launcher slurm` (fwbw.study.launchers.slurm)
"""

from __future__ import annotations

import re
from pathlib import Path

from fwbw.files import read_json
from fwbw.schema import ConfigError, differences
from fwbw.training.run_dir import CHECKPOINTS, RUN_FILES, SHOWN_DIFFERENCES, SWEEP_FILE
from fwbw.training.run_dir import RUNS as RUNS

RESULTS_PARQUET = "results.parquet"
RESULTS_CSV = "results.csv"
RUNS_CSV = "runs.csv"  # one row per run: its config, selection, test scores and provenance
RETRIEVAL = "retrieval"
RETRIEVAL_PARQUET = "retrieval.parquet"
RETRIEVAL_CSV = "retrieval.csv"
SLURM = "slurm"
RUN_ID = re.compile(r"[A-Za-z0-9._-]+")  # a plain folder name: no separators, so never outside runs/


def read_sweep(sweep_dir: Path) -> dict:
    """sweep.json, its run ids checked to be plain folder names inside runs/."""
    path = Path(sweep_dir) / SWEEP_FILE
    if not Path(sweep_dir).exists():
        raise ValueError(f"{sweep_dir}: no such directory")
    if not path.is_file():
        raise ValueError(f"{sweep_dir} is not a sweep directory (no {SWEEP_FILE})")
    sweep = read_json(path)
    runs = sweep.get("runs") if isinstance(sweep, dict) else None
    if not isinstance(runs, dict):
        raise ValueError(f"{path}: no 'runs' table (run id -> config)")
    for run_id in runs:
        if not RUN_ID.fullmatch(run_id) or run_id in (".", ".."):
            raise ValueError(f"{path}: run id {run_id!r} is not a plain folder name (letters, digits, . _ -)")
    order = sweep.get("order", list(runs))
    if not isinstance(order, list) or sorted(map(str, order)) != sorted(runs):
        raise ValueError(f"{path}: 'order' must list each run id once")
    return sweep


def check_owner(sweep_dir: Path, spec: dict) -> None:
    """Refuse a sweep directory whose sweep.json holds another spec (`spec` as plain data), naming
    the first fields that differ, and a run's directory; a directory without sweep.json belongs to
    no sweep yet. A sweep.json that cannot be read is reported, so that it is never overwritten."""
    _check_holds_no_run(Path(sweep_dir))
    path = Path(sweep_dir) / SWEEP_FILE
    if not path.exists():
        return
    saved = read_json(path)
    if not isinstance(saved, dict) or not isinstance(saved.get("spec"), dict):
        raise ValueError(f"{path}: no 'spec' table: not a sweep's file")
    shown = differences(saved["spec"], spec, SHOWN_DIFFERENCES)
    if shown:
        raise ConfigError(f"out: {sweep_dir} holds the sweep of another spec ({shown}); give another --out")


def _check_holds_no_run(sweep_dir: Path) -> None:
    found = [name for name in (*RUN_FILES, CHECKPOINTS) if (sweep_dir / name).exists()]
    if found:
        raise ConfigError(f"out: {sweep_dir} holds a run ({found[0]}), not a sweep: give another --out")
