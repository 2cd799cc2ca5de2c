"""BM25-anchored systems: BM25's top K documents of each query, reordered by a dense score (a rerank)
or by a convex combination of both scores after min-max normalisation (Bruch, Gai & Ingber 2023,
"An analysis of fusion functions for hybrid retrieval", ACM TOIS, doi:10.1145/3596512).

A candidates table holds, for each query, BM25's top K documents, each with its BM25 score and the
dense (MaxSim) score of the same document; the caller computes both. Over one query's candidates:

  norm(s)    (s - lowest) / (highest - lowest), lowest and highest that query's extremes of the
             score s; 0 for every candidate when they are equal (a constant score ranks nothing)
  rerank     a candidate's score is its dense score
  fuse(w)    a candidate's score is  w · norm(dense) + (1 - w) · norm(bm25),  0 <= w <= 1

Normalising keeps each score's order, so fuse(1) ranks as the rerank and fuse(0) as BM25. Runs rank
as metrics.ranking ranks (ties by docid, the greater string first). The weight w is chosen on dev
queries only (tune_weight): the weight of FUSION_GRID with the highest mean nDCG@10, the smaller one,
closer to BM25, on a tie.

A candidates file (write_candidates) is a CSV with the header qid,docid,bm25,dense and a row per
candidate, scores written exactly (repr).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from fwbw.files import atomic_write_text, read_text
from fwbw.retrieval.metrics import Qrels, Run, evaluate, mean_metrics

FUSION_GRID = tuple(tenths / 10 for tenths in range(11))  # 0.0, 0.1, ..., 1.0, each the float of its decimal
TUNING_SPLIT = "dev"
CANDIDATE_COLUMNS = ("qid", "docid", "bm25", "dense")
CANDIDATES_FILE = "candidates.csv"  # a rerank result's candidates (fwbw.retrieval.experiment)


class CandidateScores(NamedTuple):
    bm25: float
    dense: float


Candidates = Mapping[str, Mapping[str, CandidateScores]]  # {qid: {docid: (bm25, dense)}}; plain tuples do


def rerank(candidates: Candidates) -> Run:
    """{qid: {docid: dense score}}: each query's candidates ranked by their dense score."""
    return {qid: {docid: float(dense) for docid, (_, dense) in scores.items()} for qid, scores in candidates.items()}


def fuse(candidates: Candidates, weight: float) -> Run:
    """{qid: {docid: weight · norm(dense) + (1 - weight) · norm(bm25)}}, each score min-max normalised
    over the query's candidates (the module docstring)."""
    if not 0 <= weight <= 1:
        raise ValueError(f"fusion weight: expected a number from 0 to 1, got {weight!r}")
    run = {}
    for qid, scores in candidates.items():
        bm25 = _min_max({docid: pair[0] for docid, pair in scores.items()})
        dense = _min_max({docid: pair[1] for docid, pair in scores.items()})
        run[qid] = {docid: weight * dense[docid] + (1 - weight) * bm25[docid] for docid in scores}
    return run


def _min_max(scores: Mapping[str, float]) -> dict[str, float]:
    lowest, highest = min(scores.values(), default=0.0), max(scores.values(), default=0.0)
    span = highest - lowest
    return {docid: (score - lowest) / span if span > 0 else 0.0 for docid, score in scores.items()}


def tune_weight(
    candidates: Candidates, qrels: Qrels, *, split: str, grid: Sequence[float] = FUSION_GRID
) -> tuple[float, dict[float, float]]:
    """(the weight of the grid whose fusion has the highest mean nDCG@10 over the qrels' queries, the
    smaller weight on a tie; {weight: its mean nDCG@10} for every weight of the grid). Only dev
    queries may choose the weight: any other split raises ValueError."""
    if split != TUNING_SPLIT:
        raise ValueError(f"tune_weight: the fusion weight is chosen on {TUNING_SPLIT} queries only, not on {split!r}")
    if not grid:
        raise ValueError("tune_weight: the grid of weights is empty")
    table = {weight: mean_metrics(evaluate(fuse(candidates, weight), qrels))["ndcg_at_10"] for weight in grid}
    return min(table, key=lambda weight: (-table[weight], weight)), table


def write_candidates(path: Path, candidates: Candidates) -> None:
    """Write the table as a candidates file (the module docstring), atomically."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CANDIDATE_COLUMNS)
    for qid, scores in candidates.items():
        for docid, pair in scores.items():
            where = f"{path}: query {qid!r} document {docid!r}"
            writer.writerow([qid, docid, *(repr(_finite(score, where)) for score in pair)])
    atomic_write_text(Path(path), out.getvalue())


def read_candidates(path: Path) -> dict[str, dict[str, CandidateScores]]:
    """The table a candidates file holds; ValueError (one line, naming the file and the line) for a
    missing or malformed one: another header, a row without 4 fields, a score that is not a finite
    number, a (qid, docid) given twice."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: missing")
    rows = list(csv.reader(io.StringIO(read_text(path))))
    if not rows or tuple(rows[0]) != CANDIDATE_COLUMNS:
        raise ValueError(f"{path} line 1: expected the header {','.join(CANDIDATE_COLUMNS)}")
    candidates: dict[str, dict[str, CandidateScores]] = {}
    for number, row in enumerate(rows[1:], start=2):
        where = f"{path} line {number}"
        if len(row) != len(CANDIDATE_COLUMNS):
            raise ValueError(f"{where}: expected {len(CANDIDATE_COLUMNS)} fields, got {len(row)}")
        qid, docid, bm25, dense = row
        if docid in candidates.get(qid, {}):
            raise ValueError(f"{where}: query {qid!r} document {docid!r} is given twice")
        candidates.setdefault(qid, {})[docid] = CandidateScores(_finite(bm25, where), _finite(dense, where))
    return candidates


def _finite(value: str | float, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: score {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}: score {value!r} is not a finite number")
    return number
