"""Where a sweep keeps its files.

  sweep.json                 the spec and the list of runs (id -> config)
  runs/<run_id>/             one run directory (fwbw.training.run_dir) plus cut.json
  results.parquet/.csv       the tidy table (fwbw.study.results)
"""

RUNS = "runs"
SWEEP_FILE = "sweep.json"
