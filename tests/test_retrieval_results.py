"""A retrieval result's directory: metrics.json, run.trec, qrels.trec and per_query.csv, written
whole and read back; trec_eval reading the files finds the same metrics."""

from __future__ import annotations

import pytest
import pytrec_eval
from test_retrieval_metrics import TREC_MEASURES, random_benchmark

from fwbw.retrieval import run_files
from fwbw.retrieval.metrics import METRICS, evaluate, mean_metrics
from fwbw.retrieval.run_files import (
    TREC_DEPTH,
    read_result,
    read_trec_qrels,
    read_trec_run,
    write_result,
)

INFO = dict(task="description", system="bm25", embed=None, finetune_steps=0, n_docs=200, seconds=1.25)


def test_a_written_result_reads_back_with_the_same_metrics(tmp_path):
    run, qrels = random_benchmark(0)
    metrics = write_result(tmp_path / "r", run=run, qrels=qrels, **INFO)
    per_query = evaluate(run, qrels)
    assert metrics == {**INFO, "n_queries": 50, **mean_metrics(per_query)}
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["metrics.json", "per_query.csv", "qrels.trec", "run.trec"]
    back = read_result(tmp_path / "r")
    assert back.metrics == metrics
    assert back.per_query == per_query  # values written exactly
    assert back.qrels == qrels
    assert set(back.run) == set(run)
    assert all(len(scores) == min(TREC_DEPTH, len(run[qid])) for qid, scores in back.run.items())
    assert evaluate(back.run, back.qrels) == per_query  # the first 100 hold every metric's documents


def test_the_trec_files_are_trec_evals_and_give_its_metrics(tmp_path):
    run, qrels = random_benchmark(1)
    write_result(tmp_path / "r", run=run, qrels=qrels, **INFO)
    first = (tmp_path / "r/run.trec").read_text().splitlines()[0].split()
    assert first[1] == "Q0" and first[3] == "1" and first[5] == "bm25"
    assert (tmp_path / "r/qrels.trec").read_text().splitlines()[0].split()[1] == "0"
    reference = pytrec_eval.RelevanceEvaluator(read_trec_qrels(tmp_path / "r/qrels.trec"), TREC_MEASURES)
    per_query = read_result(tmp_path / "r").per_query
    for qid, values in reference.evaluate(read_trec_run(tmp_path / "r/run.trec")).items():
        assert per_query[qid]["ndcg_at_10"] == pytest.approx(values["ndcg_cut_10"], abs=1e-9)
        assert per_query[qid]["recall_at_100"] == pytest.approx(values["recall_100"], abs=1e-9)


def test_rewriting_removes_metrics_first_so_an_interrupted_write_reads_as_unfinished(tmp_path, monkeypatch):
    run, qrels = random_benchmark(0)
    write_result(tmp_path / "r", run=run, qrels=qrels, **INFO)
    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(run_files, "atomic_write_json", fail)
    with pytest.raises(OSError):
        write_result(tmp_path / "r", run=run, qrels=qrels, **INFO)
    with pytest.raises(ValueError, match="not a finished retrieval result .no metrics.json"):
        read_result(tmp_path / "r")


def test_malformed_result_files_are_refused_in_one_line(tmp_path):
    run, qrels = random_benchmark(0)
    write_result(tmp_path / "r", run=run, qrels=qrels, **INFO)
    run_path = tmp_path / "r/run.trec"
    run_path.write_text(run_path.read_text() + "q1 Q0 d1 1 high bm25\n")
    with pytest.raises(ValueError, match=r"run.trec line \d+: 'high' is not a number"):
        read_result(tmp_path / "r")
    run_path.write_text("q1 Q0 d1 1\n")
    with pytest.raises(ValueError, match="run.trec line 1: expected 6 space-separated fields, got 4"):
        read_trec_run(run_path)
    (tmp_path / "r/per_query.csv").write_text("qid,ndcg\n")
    with pytest.raises(ValueError, match="per_query.csv line 1: expected the header qid," + ",".join(METRICS)):
        read_result(tmp_path / "r")


def test_ids_that_a_trec_file_cannot_hold_are_refused(tmp_path):
    with pytest.raises(ValueError, match="system: 'my system' is not an id"):
        write_result(tmp_path / "r", run={}, qrels={"q": {"d": 1}}, **{**INFO, "system": "my system"})
    with pytest.raises(ValueError, match="run docid: 'd 1' is not an id"):
        write_result(tmp_path / "r", run={"q": {"d 1": 1.0}}, qrels={"q": {"d": 1}}, **INFO)
    assert not (tmp_path / "r/metrics.json").exists()
