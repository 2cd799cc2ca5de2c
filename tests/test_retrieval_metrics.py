"""Retrieval metrics equal trec_eval's (through pytrec_eval) on random runs with ties and graded
qrels, and paired comparisons give the paired t interval and a seeded bootstrap interval."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import pytrec_eval
from scipy import stats

from fwbw.retrieval import metrics
from fwbw.retrieval.metrics import (
    METRICS,
    evaluate,
    mean_metrics,
    paired_difference,
    ranking,
)

TREC_MEASURES = {"ndcg_cut.10", "recip_rank", "recall.1,10,100"}


def random_benchmark(seed: int = 0, n_queries: int = 50, n_docs: int = 200):
    """Graded qrels (0-3) and a run whose scores take few values (many ties). Docids of different
    lengths ("d7", "d42", "d150") make string order differ from numeric order. Some queries are
    not retrieved at all, one is judged only non-relevant, one run query is not judged."""
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(n_docs)]
    qrels = {f"q{i}": {doc: rng.choice([0, 1, 1, 2, 3]) for doc in rng.sample(docs, rng.randint(1, 30))} for i in range(n_queries)}
    qrels["q0"] = {doc: 0 for doc in rng.sample(docs, 5)}
    run = {}
    for qid, judged in qrels.items():
        retrieved = set(rng.sample(docs, rng.randint(1, 150))) | {doc for doc in judged if rng.random() < 0.7}
        # scores on a grid of 0.5 (many ties) that favour relevant documents
        run[qid] = {doc: rng.choice([-1.0, 0.0, 0.5, 1.0]) + 0.5 * judged.get(doc, 0) for doc in sorted(retrieved)}
    del run["q1"], run["q2"]
    run["unjudged"] = {"d1": 1.0}
    return run, qrels


def trec_eval_metrics(run, qrels) -> dict[str, dict[str, float]]:
    reference = pytrec_eval.RelevanceEvaluator(qrels, TREC_MEASURES).evaluate(run)
    return {
        qid: {
            "ndcg_at_10": values["ndcg_cut_10"],
            # trec_eval's recip_rank has no cutoff: the first relevant rank is <= 10 iff it is >= 1/10
            "mrr_at_10": values["recip_rank"] if values["recip_rank"] >= 0.1 else 0.0,
            "recall_at_1": values["recall_1"],
            "recall_at_10": values["recall_10"],
            "recall_at_100": values["recall_100"],
        }
        for qid, values in reference.items()
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_metric_equals_trec_eval_on_random_runs_with_ties(seed):
    run, qrels = random_benchmark(seed)
    assert sum(len(set(scores.values())) < len(scores) for scores in run.values()) > 40  # ties abound
    ours, reference = evaluate(run, qrels), trec_eval_metrics(run, qrels)
    assert list(ours) == list(qrels)  # every judged query, in order; the unjudged run query is left out
    zeros = dict.fromkeys(METRICS, 0.0)
    for qid in qrels:
        expected = reference.get(qid, zeros)  # pytrec_eval leaves out the queries the run lacks
        for name in METRICS:
            assert ours[qid][name] == pytest.approx(expected[name], abs=1e-9), (qid, name)
    assert ours["q1"] == zeros and ours["q0"] == zeros
    assert 0.1 < mean_metrics(ours)["ndcg_at_10"] < 0.9  # not trivially all 0 or 1
    assert mean_metrics(ours)["recall_at_100"] == pytest.approx(np.mean([reference.get(q, zeros)["recall_at_100"] for q in qrels]))


def test_the_comparison_catches_another_tie_rule(monkeypatch):
    run, qrels = random_benchmark(0)
    reference = trec_eval_metrics(run, qrels)
    ascending = lambda scores: sorted(scores, key=lambda docid: (-scores[docid], docid))  # noqa: E731
    monkeypatch.setattr(metrics, "ranking", ascending)
    ours = evaluate(run, qrels)
    differing = [qid for qid in reference if abs(ours[qid]["ndcg_at_10"] - reference[qid]["ndcg_at_10"]) > 1e-9]
    assert len(differing) > 10


def test_ties_are_ranked_by_docid_descending_as_trec_eval_does():
    scores = {"d1": 1.0, "d10": 1.0, "d2": 1.0, "d3": 2.0}
    assert ranking(scores) == ["d3", "d2", "d10", "d1"]
    # d1 (relevance 2) is ranked 4th behind the tied d2 and d10: rank 1 holds nothing relevant
    values = evaluate({"q": scores}, {"q": {"d1": 2, "d2": 1, "x": 0}})["q"]
    ideal = 2 + 1 / math.log2(3)
    assert values["ndcg_at_10"] == pytest.approx((1 / math.log2(3) + 2 / math.log2(5)) / ideal, abs=1e-15)
    assert values["mrr_at_10"] == 0.5
    assert (values["recall_at_1"], values["recall_at_10"]) == (0.0, 1.0)


def test_mrr_counts_only_the_first_ten_ranks():
    scores = {f"d{i:02d}": -i for i in range(12)}  # d00 first ... d11 last
    assert evaluate({"q": scores}, {"q": {"d09": 1}})["q"]["mrr_at_10"] == 0.1
    assert evaluate({"q": scores}, {"q": {"d10": 1}})["q"]["mrr_at_10"] == 0.0


def test_the_mean_is_over_the_judged_queries_and_a_missing_query_scores_zero():
    per_query = evaluate({"a": {"d": 1.0}}, {"a": {"d": 1}, "b": {"d": 1}})
    assert mean_metrics(per_query) == dict.fromkeys(METRICS, 0.5)
    with pytest.raises(ValueError, match="no queries"):
        mean_metrics({})


def test_a_score_that_is_not_finite_is_refused():
    with pytest.raises(ValueError, match="query .q. scores document .d2. nan, not a finite number"):
        evaluate({"q": {"d1": 1.0, "d2": float("nan")}}, {"q": {"d1": 1}})


# --- paired comparisons ----------------------------------------------------------------------


def per_query_pair(n: int = 400, shift: float = 0.05, seed: int = 0):
    rng = np.random.default_rng(seed)
    b = rng.random(n)
    a = b + shift + rng.normal(0, 0.2, n)
    return {f"q{i}": float(x) for i, x in enumerate(a)}, {f"q{i}": float(x) for i, x in enumerate(b)}


def test_the_t_interval_is_scipys_paired_t_interval():
    a, b = per_query_pair()
    result = paired_difference(a, b)
    qids = sorted(a)
    reference = stats.ttest_rel([a[q] for q in qids], [b[q] for q in qids]).confidence_interval(0.95)
    assert result.n == 400
    assert result.mean == pytest.approx(np.mean([a[q] - b[q] for q in qids]), abs=1e-12)
    assert (result.t_low, result.t_high) == pytest.approx((reference.low, reference.high), abs=1e-12)


def test_the_bootstrap_interval_is_seeded_and_agrees_with_t_for_many_queries():
    a, b = per_query_pair()
    result = paired_difference(a, b)
    assert paired_difference(dict(reversed(a.items())), b) == result  # qid order does not matter
    assert paired_difference(a, b, seed=1).bootstrap_low != result.bootstrap_low
    assert result.bootstrap_low < result.mean < result.bootstrap_high
    width = result.t_high - result.t_low
    assert result.bootstrap_low == pytest.approx(result.t_low, abs=0.05 * width)
    assert result.bootstrap_high == pytest.approx(result.t_high, abs=0.05 * width)
    assert result.t_low > 0  # the shift of 0.05 is detected


def test_equal_differences_give_a_point_interval_and_mismatched_queries_are_refused():
    result = paired_difference({"a": 0.5, "b": 0.75}, {"a": 0.25, "b": 0.5})
    assert (result.mean, result.t_low, result.t_high, result.bootstrap_low, result.bootstrap_high) == (0.25,) * 5
    with pytest.raises(ValueError, match="differ in their queries .e.g. 'b'"):
        paired_difference({"a": 1.0, "b": 1.0}, {"a": 1.0, "c": 1.0})
    with pytest.raises(ValueError, match="at least 2 queries"):
        paired_difference({"a": 1.0}, {"a": 0.0})
