"""The sweep's tidy results table: one row per run x eval point x direction, rebuilt from the
run directories (the single source of truth) and written atomically as Parquet and CSV.

Retrieval results have a table of their own beside it, one row per result (phase "retrieval"): a
retrieval result has other measures (nDCG@10, MRR@10, recall) and settings (task, system, embed,
pooling, fine-tuning) than an evaluation point, and BM25's belongs to no run. Its rows carry the
run's id and config columns, as the results table's do, so the two join on run_id."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from fwbw.files import atomic_write, read_json, read_jsonl_numbered
from fwbw.model.config import ModelConfig
from fwbw.model.hlb_gpt import count_params
from fwbw.model.masks import DIRECTIONS, leaks_labels
from fwbw.retrieval.experiment import BM25, read_experiment
from fwbw.retrieval.metrics import METRICS as RETRIEVAL_METRICS
from fwbw.retrieval.run_files import METRICS_FILE
from fwbw.schema import is_integer, is_number
from fwbw.study.sweep_dir import (
    RESULTS_CSV,
    RESULTS_PARQUET,
    RETRIEVAL,
    RETRIEVAL_CSV,
    RETRIEVAL_PARQUET,
    RUNS,
    RUNS_CSV,
    read_sweep,
)
from fwbw.training.config import LATER_FIELDS
from fwbw.training.evaluation import EVAL_METRICS
from fwbw.training.probes import PROBE_KEYS
from fwbw.training.run_dir import CUT, METRICS, MODEL_CONFIG, SUMMARY, read_status

EVAL_PHASE, CUT_PHASE = "train-eval", "cut"  # the `phase` of validation and of layer-cut rows
TRAIN_SPLIT_PHASE = "train-split"  # rows of the fixed training-split windows, evaluated with validation (train_eval_tokens)
PROBE_COLUMNS = PROBE_KEYS  # a trained run's leak probes of each task, through the model and the training path
# a run's config fields, one column each
CONFIG_COLUMNS = ["data", "tokenizer", "depth", "width", "model_scale", "num_heads", "seq_len", "p_bw", "adaptive_p_bw",
                  "bw_mode", "bw_mask", "task_tokens", "epochs", "train_tokens", "eval_tokens", "dtype", "eval_every_epochs",
                  "seed", *LATER_FIELDS]
# what determines a run's numbers beyond its config (fwbw.provenance), from its summary.json
PROVENANCE_COLUMNS = ["fwbw_version", "git_commit", "git_dirty", "torch_version", "device_name", "resolved_threads", "compiled"]
# the runs table's measures of each finished run (summary.json): early stopping's choice and the test split's scores
RUN_MEASURES = ["unique_tokens", "steps", "tokens", "best_step", "best_epoch", "best_val_fw_loss", "best_train_split_fw_loss",
                "stopped_early", "censored", "final_val_loss_fw", "test_fw_loss", "test_fw_loss_final", "test_tokens",
                "eval_seconds", "seconds"]
RECIPE_ID_LENGTH = 8  # hex digits of the recipe's sha256 kept in `recipe_id`
COLUMNS = [
    "run_id", *CONFIG_COLUMNS, "recipe_id", "num_params", "step", "tokens", "epoch", "seconds", "direction", "loss", "acc", "ppl",
    "phase", "blocks_remaining", "status", "leaks_labels", *PROBE_COLUMNS, "error",
]
RETRIEVAL_PHASE = "retrieval"
# one row per retrieval result: the run's id and config (missing for BM25), the result's settings,
# measures and timings (fwbw.retrieval.experiment), and its folder relative to the sweep's
RETRIEVAL_COLUMNS = [
    "run_id", *CONFIG_COLUMNS, "recipe_id", "phase", "task", "split", "system", "embed", "blocks", "chunk_tokens",
    "query_fillers", "markers", "pooling", "finetune_steps", "rerank", "fusion_weight", "maxsim_dtype", "variant", "n_queries", "n_docs", *RETRIEVAL_METRICS, "seconds", "encode_corpus_seconds", "corpus_encoded",
    "seconds_per_query", "result",
]


def _read_if_written(path: Path, read: Callable[[Path], object], default):
    """A run file, or `default` while the run has not written it; a corrupt one raises, naming it."""
    try:
        return read(path)
    except FileNotFoundError:
        return default


def _read_summary(path: Path) -> dict:
    summary = _read_if_written(path, read_json, {})
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: not a run summary (a JSON object)")
    return summary


def _read_points(path: Path) -> list[dict]:
    """metrics.jsonl's evaluation points; a line that is none raises ValueError naming the file and the line."""
    numbered = _read_if_written(path, read_jsonl_numbered, [])
    for line, point in numbered:
        if not _is_point(point):
            raise ValueError(f"{path}: line {line} is not an evaluation point (integer step and tokens; epoch, seconds "
                             f"and each direction's {', '.join(EVAL_METRICS)} as numbers)")
    return [point for _, point in numbered]


def _is_point(point) -> bool:
    if not isinstance(point, dict) or not all(is_integer(point.get(key)) for key in ("step", "tokens")):
        return False
    measured = [f"{prefix}{d}_{m}" for prefix in ("", "train_") for d in DIRECTIONS if f"{prefix}{d}_loss" in point
                for m in EVAL_METRICS]
    return all(is_number(point.get(key)) for key in ("epoch", "seconds", *measured))


def _read_cut(path: Path) -> list[dict]:
    cut = _read_if_written(path, read_json, [])
    if not isinstance(cut, list) or not all(_is_cut_row(row) for row in cut):
        raise ValueError(f"{path}: not a layer cut (a list of blocks_remaining, an integer, and the metrics of "
                         f"{' and '.join(DIRECTIONS)}: {', '.join(EVAL_METRICS)} as numbers)")
    return cut


def _is_cut_row(row) -> bool:
    if not isinstance(row, dict) or not is_integer(row.get("blocks_remaining")):
        return False
    metrics = row.get("metrics")
    return isinstance(metrics, dict) and all(
        isinstance(metrics.get(d), dict) and all(is_number(metrics[d].get(m)) for m in EVAL_METRICS) for d in DIRECTIONS)


def run_rows(identifier: str, config: dict, run_dir: Path) -> list[dict]:
    status = read_status(run_dir, corrupt_is_pending=False)
    summary = _read_summary(run_dir / SUMMARY)
    model_config = _read_if_written(run_dir / MODEL_CONFIG, read_json, {})
    settings = {
        **_run_settings(identifier, config),
        "num_params": summary.get("num_params", _count_params(model_config)),
        "status": status["status"],
        "leaks_labels": leaks_labels(config["bw_mask"]),
        **{probe: summary.get(probe) for probe in PROBE_COLUMNS},
        "error": status.get("error"),
    }
    metrics = _read_points(run_dir / METRICS)
    rows = [
        {**settings, **_point(point), "direction": d, **{m: point[f"{d}_{m}"] for m in EVAL_METRICS},
         "phase": EVAL_PHASE, "blocks_remaining": config["depth"]}
        for point in metrics
        for d in DIRECTIONS if f"{d}_loss" in point
    ]
    rows += [
        {**settings, **_point(point), "direction": d, **{m: point[f"train_{d}_{m}"] for m in EVAL_METRICS},
         "phase": TRAIN_SPLIT_PHASE, "blocks_remaining": config["depth"]}
        for point in metrics
        for d in DIRECTIONS if f"train_{d}_loss" in point
    ]
    cut = _read_cut(run_dir / CUT) if metrics else []
    rows += [
        {**settings, **_point(metrics[-1]), "direction": d, **{m: entry["metrics"][d][m] for m in EVAL_METRICS},
         "phase": CUT_PHASE, "blocks_remaining": entry["blocks_remaining"]}
        for entry in cut
        for d in DIRECTIONS
    ]
    return rows or [settings]


def recipe_id(recipe: dict) -> str:
    """A short hash of a run's recipe values: runs with equal recipes share it."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:RECIPE_ID_LENGTH]


def _point(record: dict) -> dict:
    return {key: record[key] for key in ("step", "tokens", "epoch", "seconds")}


def _count_params(model_config: dict) -> int | None:
    """Parameter count from a saved model config, for runs that have not finished."""
    if not model_config:
        return None
    return count_params(ModelConfig(**model_config))


def build_results(sweep_dir: Path) -> pd.DataFrame:
    rows = [
        row
        for identifier, config in read_sweep(sweep_dir)["runs"].items()
        for row in run_rows(identifier, config, Path(sweep_dir) / RUNS / identifier)
    ]
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    for column in ("step", "tokens", "blocks_remaining", "num_params", "train_tokens"):
        table[column] = table[column].astype("Int64")
    table = table.astype({"p_bw": float, "model_scale": float, "epochs": float, "eval_every_epochs": float, "task_tokens": bool, "adaptive_p_bw": bool})
    for probe in PROBE_COLUMNS:
        table[probe] = table[probe].astype("boolean")
    return table


def _run_settings(identifier: str, config: dict) -> dict:
    """A run's id and config columns (a config.json from before a later field holds its LATER_FIELDS value)."""
    return {"run_id": identifier, **{column: config.get(column, LATER_FIELDS.get(column)) for column in CONFIG_COLUMNS},
            "recipe_id": recipe_id(config["recipe"])}


def run_summary_row(identifier: str, config: dict, run_dir: Path) -> dict:
    """One run's row of the runs table: config, lr_scale, status, measures and provenance."""
    summary = _read_summary(run_dir / SUMMARY)
    provenance = {**summary, "resolved_threads": summary.get("threads")}
    return {**_run_settings(identifier, config), "lr_scale": config["recipe"]["lr_scale"],
            "status": read_status(run_dir, corrupt_is_pending=False)["status"], "num_params": summary.get("num_params"),
            **{column: summary.get(column) for column in RUN_MEASURES},
            **{column: provenance.get(column) for column in PROVENANCE_COLUMNS}}


def build_runs(sweep_dir: Path) -> pd.DataFrame:
    """The runs table: one row per run of the sweep (runs.csv)."""
    rows = [run_summary_row(identifier, config, Path(sweep_dir) / RUNS / identifier)
            for identifier, config in read_sweep(sweep_dir)["runs"].items()]
    return pd.DataFrame(rows).reindex(columns=["run_id", *CONFIG_COLUMNS, "recipe_id", "lr_scale", "status", "num_params",
                                               *RUN_MEASURES, *PROVENANCE_COLUMNS])


def retrieval_rows(sweep_dir: Path) -> list[dict]:
    """One row per finished retrieval result under the sweep's retrieval/ folder: BM25's, then each run's."""
    sweep_dir = Path(sweep_dir)
    owners = {BM25: {}} | {identifier: _run_settings(identifier, config)
                           for identifier, config in read_sweep(sweep_dir)["runs"].items()}
    return [
        {**settings, "phase": RETRIEVAL_PHASE, **read_experiment(path.parent),
         "result": path.parent.relative_to(sweep_dir).as_posix()}
        for folder, settings in owners.items()
        for path in sorted((sweep_dir / RETRIEVAL / folder).glob(f"*/{METRICS_FILE}"))
    ]


def build_retrieval_results(sweep_dir: Path) -> pd.DataFrame:
    table = pd.DataFrame(retrieval_rows(sweep_dir)).reindex(columns=RETRIEVAL_COLUMNS)
    integers = ["depth", "width", "num_heads", "seq_len", "train_tokens", "eval_tokens", "seed", "blocks", "chunk_tokens",
                "query_fillers", "finetune_steps", "rerank", "n_queries", "n_docs"]
    floats = ["p_bw", "model_scale", "epochs", "eval_every_epochs", "fusion_weight"]
    return table.astype({**dict.fromkeys(integers, "Int64"), **dict.fromkeys(floats, float),
                         **dict.fromkeys(["adaptive_p_bw", "task_tokens", "corpus_encoded", "markers"], "boolean")})


def write_results(sweep_dir: Path) -> pd.DataFrame:
    """Write the results table and, while the sweep has retrieval results, their table (removed when it
    has none); return the results table."""
    table = build_results(sweep_dir)
    sweep_dir = Path(sweep_dir)
    atomic_write(sweep_dir / RESULTS_PARQUET, lambda tmp: table.to_parquet(tmp, index=False))
    atomic_write(sweep_dir / RESULTS_CSV, lambda tmp: table.to_csv(tmp, index=False))
    runs = build_runs(sweep_dir)
    atomic_write(sweep_dir / RUNS_CSV, lambda tmp: runs.to_csv(tmp, index=False))
    retrieval = build_retrieval_results(sweep_dir)
    for name, write in ((RETRIEVAL_PARQUET, retrieval.to_parquet), (RETRIEVAL_CSV, retrieval.to_csv)):
        if retrieval.empty:
            (sweep_dir / name).unlink(missing_ok=True)
        else:
            atomic_write(sweep_dir / name, lambda tmp, write=write: write(tmp, index=False))
    return table


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """Setting x seed with final fw/bw validation loss and status, for `fwbw results`."""
    keys = ["depth", "width", "model_scale", "num_heads", "p_bw", "adaptive_p_bw", "bw_mode", "bw_mask", "task_tokens", "seed"]
    evals = table[table["phase"] == EVAL_PHASE]
    last = evals[evals["step"] == evals.groupby("run_id")["step"].transform("max")]
    final = last.pivot_table(index="run_id", columns="direction", values="loss").add_prefix("final_loss_")
    runs = table.drop_duplicates("run_id").set_index("run_id")[keys + ["num_params", "status"]]
    return runs.join(final).sort_values(keys).reset_index(drop=True)
