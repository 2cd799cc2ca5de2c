"""A retrieval result's directory, written and read.

  metrics.json    task, system, embed, finetune_steps, n_queries, n_docs, the mean of every metric
                  (fwbw.retrieval.metrics.METRICS) and seconds; written last, so a directory without
                  it is an unfinished result
  run.trec        "qid Q0 docid rank score system": each query's first TREC_DEPTH documents, ranked
                  as the metrics rank them, scores written exactly (trec_eval reproduces the metrics)
  qrels.trec      "qid 0 docid relevance" for every judgement
  per_query.csv   qid and every metric, one row per judged query
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fwbw.files import atomic_write_json, atomic_write_text, read_json, read_text
from fwbw.retrieval.benchmark import check_id
from fwbw.retrieval.metrics import METRICS, Qrels, Run, evaluate, mean_metrics, ranking

METRICS_FILE = "metrics.json"
RUN_FILE = "run.trec"
QRELS_FILE = "qrels.trec"
PER_QUERY_FILE = "per_query.csv"
TREC_DEPTH = 100
INFO_KEYS = ("task", "system", "embed", "finetune_steps", "n_queries", "n_docs")


@dataclass(frozen=True)
class RetrievalResult:
    metrics: dict[str, Any]  # metrics.json
    per_query: dict[str, dict[str, float]]  # {qid: {metric: value}}
    run: Run  # the first TREC_DEPTH documents of each query
    qrels: Qrels


def write_result(
    out_dir: Path,
    *,
    task: str,
    system: str,
    embed: str | None,
    finetune_steps: int,
    run: Mapping[str, Mapping[str, float]],
    qrels: Qrels,
    n_docs: int,
    seconds: float,
) -> dict[str, Any]:
    """Evaluate the run against the qrels, write the result directory, return metrics.json's values."""
    out_dir = Path(out_dir)
    check_id(system, "system")
    per_query = evaluate(run, qrels)
    metrics = {
        "task": task,
        "system": system,
        "embed": embed,
        "finetune_steps": finetune_steps,
        "n_queries": len(qrels),
        "n_docs": n_docs,
        **mean_metrics(per_query),
        "seconds": seconds,
    }
    (out_dir / METRICS_FILE).unlink(missing_ok=True)
    atomic_write_text(out_dir / RUN_FILE, _run_text(run, system))
    atomic_write_text(out_dir / QRELS_FILE, _qrels_text(qrels))
    atomic_write_text(out_dir / PER_QUERY_FILE, _per_query_text(per_query))
    atomic_write_json(out_dir / METRICS_FILE, metrics)
    return metrics


def _run_text(run: Mapping[str, Mapping[str, float]], system: str) -> str:
    lines = []
    for qid, scores in run.items():
        check_id(qid, "run qid")
        for rank, docid in enumerate(ranking(scores)[:TREC_DEPTH], start=1):
            check_id(docid, "run docid")
            lines.append(f"{qid} Q0 {docid} {rank} {float(scores[docid])!r} {system}\n")
    return "".join(lines)


def _qrels_text(qrels: Qrels) -> str:
    return "".join(
        f"{check_id(qid, 'qrels qid')} 0 {check_id(docid, 'qrels docid')} {rel}\n"
        for qid, judged in qrels.items()
        for docid, rel in judged.items()
    )


def _per_query_text(per_query: Mapping[str, Mapping[str, float]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["qid", *METRICS])
    writer.writerows([qid, *(repr(values[name]) for name in METRICS)] for qid, values in per_query.items())
    return out.getvalue()


def read_result(out_dir: Path) -> RetrievalResult:
    """The result directory that write_result wrote; ValueError (one line) for an unfinished or
    malformed one."""
    out_dir = Path(out_dir)
    metrics_path = out_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise ValueError(f"{out_dir}: not a finished retrieval result (no {METRICS_FILE})")
    metrics = read_json(metrics_path)
    missing = [key for key in (*INFO_KEYS, *METRICS, "seconds") if not isinstance(metrics, dict) or key not in metrics]
    if missing:
        raise ValueError(f"{metrics_path}: no {missing[0]!r}")
    per_query = read_per_query(out_dir / PER_QUERY_FILE)
    return RetrievalResult(metrics, per_query, read_trec_run(out_dir / RUN_FILE), read_trec_qrels(out_dir / QRELS_FILE))


def read_trec_run(path: Path) -> Run:
    """{qid: {docid: score}} from a TREC run file ("qid Q0 docid rank score system" lines)."""
    run: Run = {}
    for where, fields in _trec_lines(path, 6):
        score = _number(fields[4], where, float)
        if not math.isfinite(score):
            raise ValueError(f"{where}: score {fields[4]!r} is not a finite number")
        run.setdefault(fields[0], {})[fields[2]] = score
    return run


def read_trec_qrels(path: Path) -> Qrels:
    """{qid: {docid: relevance}} from a TREC qrels file ("qid 0 docid relevance" lines)."""
    qrels: Qrels = {}
    for where, fields in _trec_lines(path, 4):
        qrels.setdefault(fields[0], {})[fields[2]] = _number(fields[3], where, int)
    return qrels


def _trec_lines(path: Path, n_fields: int):
    if not path.is_file():
        raise ValueError(f"{path}: missing")
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != n_fields:
            raise ValueError(f"{path} line {number}: expected {n_fields} space-separated fields, got {len(fields)}")
        yield f"{path} line {number}", fields


def read_per_query(path: Path) -> dict[str, dict[str, float]]:
    """{qid: {metric: value}} from a per_query.csv file."""
    if not path.is_file():
        raise ValueError(f"{path}: missing")
    rows = list(csv.reader(io.StringIO(read_text(path))))
    if not rows or rows[0] != ["qid", *METRICS]:
        raise ValueError(f"{path} line 1: expected the header {','.join(['qid', *METRICS])}")
    per_query = {}
    for number, row in enumerate(rows[1:], start=2):
        where = f"{path} line {number}"
        if len(row) != len(METRICS) + 1:
            raise ValueError(f"{where}: expected {len(METRICS) + 1} fields, got {len(row)}")
        per_query[row[0]] = {name: _number(value, where, float) for name, value in zip(METRICS, row[1:])}
    return per_query


def _number(text: str, where: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{where}: {text!r} is not {'an integer' if kind is int else 'a number'}") from None
