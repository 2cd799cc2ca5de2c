"""BM25 (bm25s, Lucene's variant, k1 = 0.9, b = 0.4): rankings and scores on a hand-made corpus."""

from __future__ import annotations

import math
import sys

import pytest

from fwbw.retrieval.bm25 import K1, B, bm25_run

CORPUS = {  # the terms left after stopwords and stemming, and the length in terms
    "d1": "The cat sat on the mat.",  # cat sat mat: 3
    "d2": "Dogs chase cats and cats chase dogs.",  # dog chase cat cat chase dog: 6
    "d3": "A fish swims in the river.",  # fish swim river: 3
    "d4": "Cats, cats, cats!",  # cat cat cat: 3
}


def lucene_bm25(tf: int, df: int, length: int, n_docs: int, mean_length: float) -> float:
    idf = math.log(1 + (n_docs - df + 0.5) / (df + 0.5))
    return idf * tf / (tf + K1 * (1 - B + B * length / mean_length))


def test_the_scores_are_lucenes_bm25_with_beirs_parameters():
    run = bm25_run(CORPUS, {"q": "CATS"})
    mean_length = (3 + 6 + 3 + 3) / 4
    expected = {
        "d4": lucene_bm25(3, 3, 3, 4, mean_length),
        "d2": lucene_bm25(2, 3, 6, 4, mean_length),
        "d1": lucene_bm25(1, 3, 3, 4, mean_length),
    }
    assert list(run["q"]) == ["d4", "d2", "d1"]  # best first; d3 shares no term and is left out
    assert run["q"] == pytest.approx(expected, rel=1e-6)  # bm25s scores in float32


def test_queries_are_stemmed_and_stopped_like_documents():
    run = bm25_run(CORPUS, {"fish": "the swimming fishes", "stop": "the and of a", "unknown": "zebra", "both": "dog mat"})
    assert list(run["fish"]) == ["d3"]
    assert run["stop"] == {} and run["unknown"] == {}
    assert set(run["both"]) == {"d1", "d2"}


def test_top_k_keeps_the_best_and_cuts_ties_by_docid_descending():
    corpus = {"a": "cat", "b": "cat", "c": "cat cat dog", "d": "dog"}
    assert list(bm25_run(corpus, {"q": "cat"}, top_k=2)["q"]) == ["c", "b"]
    assert len(bm25_run(CORPUS, {"q": "cats"}, top_k=2)["q"]) == 2


def test_without_the_extra_the_error_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "bm25s", None)
    with pytest.raises(RuntimeError, match=r"BM25 needs the extra 'retrieval' \(bm25s is missing\): pip install 'fwbw\[retrieval\]'"):
        bm25_run(CORPUS, {"q": "cat"})
