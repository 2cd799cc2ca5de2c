"""Retrieval metrics, computed as trec_eval computes them, and paired comparisons of two systems.

A run is {qid: {docid: score}}, qrels are {qid: {docid: relevance}} with integer relevance (BEIR
allows negative grades: they gain 0, as in trec_eval). A query's ranking orders its documents by
score, highest first, and breaks ties by docid, the greater string first: trec_eval's rule, so that
the numbers equal trec_eval's (and MTEB's, which calls it through pytrec_eval). A document is
relevant when its relevance is >= 1.

  ndcg_at_10     sum over the first 10 ranks i (from 1) of rel_i / log2(i + 1), divided by the same
                 sum over the qrels' relevances sorted high to low (0 when no document is relevant)
  mrr_at_10      1 / the rank of the first relevant document, 0 if none is in the first 10
  recall_at_k    relevant documents in the first k / all relevant documents (0 when none is)

The mean of each is over the queries in the qrels; a query the run does not retrieve for scores 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]

NDCG_CUTOFF = 10
MRR_CUTOFF = 10
RECALL_CUTOFFS = (1, 10, 100)
METRICS = ("ndcg_at_10", "mrr_at_10", *(f"recall_at_{k}" for k in RECALL_CUTOFFS))  # MTEB's names
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_CHUNK = 1_000  # resamples drawn at once, to bound memory for many queries


def ranking(scores: Mapping[str, float]) -> list[str]:
    """Docids best first: score descending, ties broken by docid descending (trec_eval's order)."""
    return sorted(scores, key=lambda docid: (scores[docid], docid), reverse=True)


def query_metrics(scores: Mapping[str, float], relevance: Mapping[str, int]) -> dict[str, float]:
    """Every metric in METRICS for one query's scores against its relevance judgements."""
    ranked = ranking(scores)
    gains = [max(relevance.get(docid, 0), 0) for docid in ranked]
    n_relevant = sum(1 for rel in relevance.values() if rel >= 1)
    values = {"ndcg_at_10": _ndcg(gains, relevance.values(), NDCG_CUTOFF)}
    first = next((rank for rank, gain in enumerate(gains[:MRR_CUTOFF], start=1) if gain >= 1), None)
    values["mrr_at_10"] = 1 / first if first else 0.0
    for k in RECALL_CUTOFFS:
        found = sum(1 for gain in gains[:k] if gain >= 1)
        values[f"recall_at_{k}"] = found / n_relevant if n_relevant else 0.0
    return values


def _ndcg(gains: list[int], relevances, cutoff: int) -> float:
    ideal = _dcg(sorted((rel for rel in relevances if rel > 0), reverse=True)[:cutoff])
    return _dcg(gains[:cutoff]) / ideal if ideal > 0 else 0.0


def _dcg(gains) -> float:
    return sum(gain / math.log2(rank + 1) for rank, gain in enumerate(gains, start=1))


def evaluate(run: Mapping[str, Mapping[str, float]], qrels: Qrels) -> dict[str, dict[str, float]]:
    """{qid: {metric: value}} for every query in the qrels, in their order.

    Raises ValueError (one line) for a score that is not a finite number: it would have no rank.
    """
    per_query = {}
    for qid, relevance in qrels.items():
        scores = run.get(qid, {})
        bad = next((docid for docid, score in scores.items() if not math.isfinite(score)), None)
        if bad is not None:
            raise ValueError(f"run: query {qid!r} scores document {bad!r} {scores[bad]}, not a finite number")
        per_query[qid] = query_metrics(scores, relevance)
    return per_query


def mean_metrics(per_query: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The mean of each metric over the queries."""
    if not per_query:
        raise ValueError("no queries to evaluate (the qrels are empty)")
    return {name: math.fsum(query[name] for query in per_query.values()) / len(per_query) for name in METRICS}


@dataclass(frozen=True)
class PairedDifference:
    """System a minus system b over the same queries: the mean and two 95% intervals of it."""

    n: int
    mean: float
    t_low: float  # paired t interval
    t_high: float
    bootstrap_low: float  # paired bootstrap percentile interval
    bootstrap_high: float


def paired_difference(
    a: Mapping[str, float],
    b: Mapping[str, float],
    confidence: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> PairedDifference:
    """Compare two systems' per-query values of one metric ({qid: value}, the same qids).

    With d_q = a_q - b_q over n queries, mean d̄ and sample standard deviation s (n - 1 in the
    denominator): the paired t interval is d̄ ± t_{1-α/2, n-1} · s / √n (α = 1 - confidence), and
    the paired bootstrap interval is the α/2 and 1 - α/2 quantiles of the means of `resamples`
    samples of n of the d_q drawn with replacement (numpy's default_rng(seed), qids in sorted order),
    so the same inputs always give the same interval.
    """
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))
        raise ValueError(f"paired comparison: the systems differ in their queries (e.g. {only[0]!r})")
    if len(a) < 2:
        raise ValueError(f"paired comparison needs at least 2 queries, got {len(a)}")
    diffs = np.array([a[qid] - b[qid] for qid in sorted(a)], dtype=np.float64)
    n, mean = len(diffs), float(diffs.mean())
    alpha = 1 - confidence
    half = stats.t.ppf(1 - alpha / 2, n - 1) * diffs.std(ddof=1) / math.sqrt(n)
    low, high = np.quantile(_bootstrap_means(diffs, resamples, seed), [alpha / 2, 1 - alpha / 2])
    return PairedDifference(n, mean, mean - half, mean + half, float(low), float(high))


def _bootstrap_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    chunks = []
    for start in range(0, resamples, BOOTSTRAP_CHUNK):
        rows = min(BOOTSTRAP_CHUNK, resamples - start)
        chunks.append(values[rng.integers(0, len(values), size=(rows, len(values)))].mean(axis=1))
    return np.concatenate(chunks)
