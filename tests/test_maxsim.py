"""Brute-force MaxSim search (fwbw.retrieval.maxsim) against a plain double loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fwbw.retrieval import maxsim
from fwbw.retrieval.encoder import TokenEmbeddings
from fwbw.retrieval.maxsim import maxsim_matrix, maxsim_search, repeat_last_token
from fwbw.retrieval.metrics import ranking


def random_embeddings(generator: torch.Generator, prefix: str, count: int, max_length: int, dim: int) -> TokenEmbeddings:
    lengths = torch.randint(1, max_length + 1, (count,), generator=generator)
    vectors = F.normalize(torch.randn(int(lengths.sum()), dim, generator=generator), dim=1).half()
    return TokenEmbeddings(tuple(f"{prefix}{i}" for i in range(count)), vectors, lengths)


def texts_of(embeddings: TokenEmbeddings) -> list[list[list[float]]]:
    vectors, ends = embeddings.vectors.float().tolist(), embeddings.offsets.tolist()
    return [vectors[start:end] for start, end in zip(ends, ends[1:])]


def naive_scores(queries: TokenEmbeddings, documents: TokenEmbeddings) -> dict[str, dict[str, float]]:
    """For each query and document: the sum over query tokens of the best dot product, in plain Python."""
    return {
        qid: {
            docid: sum(max(sum(a * b for a, b in zip(q, d)) for d in document) for q in query)
            for docid, document in zip(documents.ids, texts_of(documents))
        }
        for qid, query in zip(queries.ids, texts_of(queries))
    }


@pytest.fixture
def embeddings() -> tuple[TokenEmbeddings, TokenEmbeddings]:
    generator = torch.Generator().manual_seed(0)
    return random_embeddings(generator, "q", 7, 5, 8), random_embeddings(generator, "d", 40, 12, 8)


@pytest.mark.parametrize("block_elements", [maxsim.SEARCH_BLOCK_ELEMENTS, 200])
def test_search_scores_equal_the_double_loop(embeddings, monkeypatch, block_elements):
    """With every document returned, and with blocks so small that each holds a few documents."""
    monkeypatch.setattr(maxsim, "SEARCH_BLOCK_ELEMENTS", block_elements)
    monkeypatch.setattr(maxsim, "QUERY_BLOCK_TOKENS", 8 if block_elements == 200 else maxsim.QUERY_BLOCK_TOKENS)
    queries, documents = embeddings
    expected = naive_scores(queries, documents)
    found = maxsim_search(queries, documents, k=len(documents.ids))
    assert list(found) == list(queries.ids)
    for qid in queries.ids:
        assert set(found[qid]) == set(documents.ids)
        for docid, score in expected[qid].items():
            assert found[qid][docid] == pytest.approx(score, abs=1e-5)


@pytest.mark.parametrize("block_elements", [maxsim.SEARCH_BLOCK_ELEMENTS, 200])
def test_search_keeps_the_k_best_documents(embeddings, monkeypatch, block_elements):
    monkeypatch.setattr(maxsim, "SEARCH_BLOCK_ELEMENTS", block_elements)
    queries, documents = embeddings
    expected = naive_scores(queries, documents)
    found = maxsim_search(queries, documents, k=5)
    for qid in queries.ids:
        best = sorted(expected[qid].values(), reverse=True)
        assert sorted(found[qid].values(), reverse=True) == pytest.approx(best[:5], abs=1e-5)
        assert all(expected[qid][docid] == pytest.approx(score, abs=1e-5) for docid, score in found[qid].items())


def test_a_document_s_padding_never_beats_its_tokens():
    """A query token opposite to every token of a short document in a block of longer ones scores
    -1 there, not the 0 that zero padding would give."""
    up = F.normalize(torch.ones(1, 4), dim=1)
    documents = TokenEmbeddings(("short", "long"), torch.cat([-up, -up, -up, -up]).half(), torch.tensor([1, 3]))
    queries = TokenEmbeddings(("q",), up.half(), torch.tensor([1]))
    assert maxsim_search(queries, documents, k=2) == {"q": {"short": pytest.approx(-1.0, abs=1e-3), "long": pytest.approx(-1.0, abs=1e-3)}}
    zero_padded = documents.padded(torch.tensor([0, 1]))
    assert maxsim_matrix(queries.padded(torch.tensor([0])), zero_padded).tolist()[0][0] == 0.0  # what the check catches


def test_padding_with_the_last_token_or_zeros():
    vectors = torch.arange(1.0, 7.0)[:, None].half()  # one-dimensional tokens 1..6
    embeddings = TokenEmbeddings(("a", "b"), vectors, torch.tensor([2, 4]))
    zeros = embeddings.padded(torch.tensor([1, 0]))
    assert zeros[..., 0].tolist() == [[3, 4, 5, 6], [1, 2, 0, 0]]
    assert embeddings.padded(torch.tensor([1, 0]), repeat_last=True)[..., 0].tolist() == [[3, 4, 5, 6], [1, 2, 2, 2]]
    assert repeat_last_token(zeros, torch.tensor([4, 2]))[..., 0].tolist() == [[3, 4, 5, 6], [1, 2, 2, 2]]


def test_single_vectors_score_their_cosine(embeddings):
    generator = torch.Generator().manual_seed(1)
    queries, documents = (random_embeddings(generator, prefix, n, 1, 8) for prefix, n in (("q", 3), ("d", 6)))
    cosines = queries.vectors.float() @ documents.vectors.float().T
    found = maxsim_search(queries, documents, k=6)
    for i, qid in enumerate(queries.ids):
        assert [found[qid][docid] for docid in documents.ids] == pytest.approx(cosines[i].tolist(), abs=1e-6)


def test_bf16_similarities_stay_within_their_rounding(embeddings):
    queries, documents = embeddings
    exact = maxsim_search(queries, documents, k=len(documents.ids))
    rounded = maxsim_search(queries, documents, k=len(documents.ids), dtype=torch.bfloat16)
    for qid, scores in exact.items():
        # each of at most 5 cosines rounded to bf16's 8 significant bits (relative error 2^-9)
        assert [rounded[qid][docid] for docid in scores] == pytest.approx(list(scores.values()), abs=5 * 2**-8)


@pytest.mark.parametrize("block_elements", [maxsim.SEARCH_BLOCK_ELEMENTS, 4])
def test_tied_scores_are_cut_as_the_metrics_rank_them(monkeypatch, block_elements):
    """Twelve equal documents: the k kept are those that ranking (docid descending) puts first, with
    every document in one block and with blocks of four."""
    monkeypatch.setattr(maxsim, "SEARCH_BLOCK_ELEMENTS", block_elements)
    vector = F.normalize(torch.ones(1, 4), dim=1).half()
    ids = tuple(f"d{i}" for i in range(12))  # in string order d0 d1 d10 d11 d2 ... d9
    documents = TokenEmbeddings(ids, vector.expand(len(ids), -1).contiguous(), torch.ones(len(ids), dtype=torch.long))
    queries = TokenEmbeddings(("q",), vector, torch.tensor([1]))
    everything = maxsim_search(queries, documents, k=len(ids))["q"]
    assert list(maxsim_search(queries, documents, k=3)["q"]) == ranking(everything)[:3] == ["d9", "d8", "d7"]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 0.0)])
def test_candidate_scores_equal_the_search_s_own(embeddings, dtype, tolerance):
    """A rerank's scores: each query against its candidates alone (some the longest documents, in any
    order, one query with none) are the scores the full search gives them, in bf16 too (the same
    rounded similarities, summed in fp32)."""
    queries, documents = embeddings
    longest = sorted(documents.ids, key=lambda docid: -int(documents.lengths[documents.ids.index(docid)]))
    candidates = {"q0": longest[:5], "q1": ["d9", "d3", "d31"], "q2": [], "q3": list(reversed(documents.ids))}
    full = maxsim_search(queries, documents, len(documents.ids), dtype=dtype)
    scores = maxsim.maxsim_candidates(queries, documents, candidates, dtype=dtype)
    assert {qid: list(found) for qid, found in scores.items()} == candidates
    for qid, found in scores.items():
        for docid, score in found.items():
            assert score == pytest.approx(full[qid][docid], rel=tolerance, abs=1e-5 if tolerance else 1e-6)
    assert scores["q1"]["d3"] == pytest.approx(naive_scores(queries, documents)["q1"]["d3"], rel=1e-2 if tolerance == 0 else 1e-5)
