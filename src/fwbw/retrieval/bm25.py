"""BM25 with bm25s: Lucene's variant with Anserini's setting, k1 = 0.9, b = 0.4 (BEIR's baseline,
Elasticsearch, used k1 = 1.2, b = 0.75).

Lucene's BM25 scores a document d for a query's terms t as
  sum over t of  ln(1 + (N - df_t + 0.5) / (df_t + 0.5)) · tf_td / (tf_td + k1 · (1 - b + b · |d| / avgdl))
with N documents, df_t of them holding t, tf_td the count of t in d, |d| the length of d in terms
and avgdl the mean length. Queries and documents are tokenised alike: lower-cased words of two or
more word characters, English stopwords removed (bm25s's list), Snowball English stems (PyStemmer).
A run keeps a query's top-k documents that share a term with it (score > 0), ties cut as ranked
(docid descending).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fwbw.retrieval.metrics import Run

K1 = 0.9
B = 0.4
TOP_K = 100
EXTRA_HINT = "pip install 'fwbw[retrieval]'"


def bm25_run(corpus: Mapping[str, str], queries: Mapping[str, str], top_k: int = TOP_K) -> Run:
    """{qid: {docid: score}}: each query's top_k documents by BM25 (those with a positive score)."""
    bm25s, stemmer = _import_bm25s()
    docids = list(corpus)
    retriever = bm25s.BM25(method="lucene", k1=K1, b=B)
    retriever.index(_tokenize(bm25s, stemmer, list(corpus.values())), show_progress=False)
    tie_rank = np.argsort(np.argsort(np.array(docids, dtype=object)))  # the docid's place in string order
    run = {}
    for qid, tokens in zip(queries, _tokenize(bm25s, stemmer, list(queries.values()))):
        known = [token for token in tokens if token in retriever.vocab_dict]
        scores = retriever.get_scores(known) if known else np.zeros(len(docids))
        hits = np.flatnonzero(scores > 0)
        best = hits[np.lexsort((tie_rank[hits], scores[hits]))[::-1][:top_k]]
        run[qid] = {docids[i]: float(scores[i]) for i in best}
    return run


def _tokenize(bm25s, stemmer, texts: list[str]) -> list[list[str]]:
    return bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False)


def _import_bm25s():
    try:
        import bm25s
        import Stemmer
    except ImportError as error:
        missing = f"{error.name} is missing"
        raise RuntimeError(f"BM25 needs the extra 'retrieval' ({missing}): {EXTRA_HINT}") from None
    return bm25s, Stemmer.Stemmer("english")
