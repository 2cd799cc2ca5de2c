"""BM25-anchored systems: the dense rerank of BM25's candidates, their min-max normalised convex
fusion (hand-computed scores and orders, the two ends of the weight, constant scores, ties), the
fusion weight tuned on dev queries only, and candidates files written and read back exactly."""

from __future__ import annotations

import math
import random

import pytest

from fwbw.retrieval.fusion import (
    FUSION_GRID,
    CandidateScores,
    fuse,
    read_candidates,
    rerank,
    tune_weight,
    write_candidates,
)
from fwbw.retrieval.metrics import ranking

# q1: bm25 2, 4, 6 -> 0, 0.5, 1; dense 10, 30, 20 -> 0, 1, 0.5 (every value exact in binary)
# q2: dense constant -> 0 for both
CANDIDATES = {
    "q1": {"d1": (2.0, 10.0), "d2": (4.0, 30.0), "d3": (6.0, 20.0)},
    "q2": {"e1": (1.0, 5.0), "e2": (3.0, 5.0)},
}


def test_grid_is_the_tenths_from_0_to_1_as_their_decimals():
    assert FUSION_GRID == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert FUSION_GRID[3] == 0.3 and FUSION_GRID[7] == 0.7  # not 0.30000000000000004 from adding 0.1s


def test_rerank_scores_each_candidate_by_its_dense_score():
    run = rerank(CANDIDATES)
    assert run == {"q1": {"d1": 10.0, "d2": 30.0, "d3": 20.0}, "q2": {"e1": 5.0, "e2": 5.0}}
    assert ranking(run["q1"]) == ["d2", "d3", "d1"]
    assert ranking(run["q2"]) == ["e2", "e1"]  # a tie: the greater docid first


def test_fuse_normalises_each_query_then_combines_hand_computed():
    # w 0.25: d1 0; d2 0.25 * 1 + 0.75 * 0.5 = 0.625; d3 0.25 * 0.5 + 0.75 * 1 = 0.875
    low = fuse(CANDIDATES, 0.25)
    assert low["q1"] == {"d1": 0.0, "d2": 0.625, "d3": 0.875}
    assert ranking(low["q1"]) == ["d3", "d2", "d1"]
    # w 0.75: d2 0.75 * 1 + 0.25 * 0.5 = 0.875; d3 0.75 * 0.5 + 0.25 * 1 = 0.625: the order flips
    high = fuse(CANDIDATES, 0.75)
    assert high["q1"] == {"d1": 0.0, "d2": 0.875, "d3": 0.625}
    assert ranking(high["q1"]) == ["d2", "d3", "d1"]
    # q2's dense is constant (0 for both); bm25 1, 3 -> 0, 1, weighted by 1 - w
    assert low["q2"] == {"e1": 0.0, "e2": 0.75}
    assert high["q2"] == {"e1": 0.0, "e2": 0.25}


def test_normalisation_is_per_query_not_over_the_table():
    # the same relative scores at a hundred times the scale give the same fused scores
    scaled = {"q1": CANDIDATES["q1"], "big": {d: (100 * b, 100 * s) for d, (b, s) in CANDIDATES["q1"].items()}}
    run = fuse(scaled, 0.25)
    assert run["big"] == run["q1"] == {"d1": 0.0, "d2": 0.625, "d3": 0.875}


def test_constant_scores_normalise_to_zero_and_rank_by_docid():
    candidates = {"q": {"d10": (7.0, 2.0), "d9": (7.0, 2.0), "d1": (7.0, 2.0)}, "one": {"x": (3.0, -1.0)}, "none": {}}
    for weight in (0.0, 0.5, 1.0):
        run = fuse(candidates, weight)
        assert run == {"q": {"d10": 0.0, "d9": 0.0, "d1": 0.0}, "one": {"x": 0.0}, "none": {}}
        assert ranking(run["q"]) == ["d9", "d10", "d1"]  # string order: "d9" > "d10" > "d1"


def test_fused_ties_break_by_docid_descending():
    # bm25 norm a 1, b 0; dense norm a 0, b 1: at w 0.5 both fuse to 0.5
    run = fuse({"q": {"a": (2.0, 1.0), "b": (1.0, 3.0)}}, 0.5)
    assert run["q"] == {"a": 0.5, "b": 0.5}
    assert ranking(run["q"]) == ["b", "a"]


def random_candidates(seed: int) -> dict[str, dict[str, tuple[float, float]]]:
    """Scores on a coarse grid among random floats, so that both columns hold ties."""
    rng = random.Random(seed)
    def score():
        return rng.choice([rng.uniform(-5, 30), float(rng.randint(0, 3))])
    return {f"q{i}": {f"d{j}": (score(), score()) for j in rng.sample(range(300), rng.randint(1, 100))}
            for i in range(20)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weight_0_ranks_as_bm25_and_weight_1_as_the_rerank(seed):
    candidates = random_candidates(seed)
    bm25_only, dense_only, reranked = fuse(candidates, 0.0), fuse(candidates, 1.0), rerank(candidates)
    for qid, scores in candidates.items():
        assert ranking(bm25_only[qid]) == ranking({docid: bm25 for docid, (bm25, _) in scores.items()})
        assert ranking(dense_only[qid]) == ranking(reranked[qid])


@pytest.mark.parametrize("weight", [-0.1, 1.1, math.nan])
def test_fuse_refuses_a_weight_outside_0_to_1(weight):
    with pytest.raises(ValueError, match="fusion weight: expected a number from 0 to 1"):
        fuse(CANDIDATES, weight)


# Query a: x (relevant) bm25 norm 0.6, dense 1; y bm25 1, dense 0; z bm25 0, dense 0.5.
#   x = 0.6 + 0.4w, y = 1 - w, z = 0.5w: x is first iff w > 2/7 (about 0.29), else second.
# Query b: u (relevant) bm25 1, dense 0; v bm25 0.4, dense 1; z bm25 0, dense 0.5.
#   u = 1 - w, v = 0.4 + 0.6w, z = 0.5w: u is first iff w < 3/8, second iff w < 2/3, else third.
QUERY_A = {"x": (16.0, 3.0), "y": (20.0, 1.0), "z": (10.0, 2.0)}
QUERY_B = {"u": (12.0, 0.25), "v": (9.0, 0.75), "z": (7.0, 0.5)}
SECOND, THIRD = 1 / math.log2(3), 1 / math.log2(4)  # nDCG@10 of one relevant document at rank 2, 3


def test_tune_weight_picks_the_interior_weight_that_suits_both_queries():
    weight, table = tune_weight({"a": QUERY_A, "b": QUERY_B}, {"a": {"x": 1}, "b": {"u": 1}}, split="dev")
    assert weight == 0.3  # only 0.3 has x and u both first
    expected = {w: (1.0 if w >= 0.3 else SECOND) + (1.0 if w < 0.375 else SECOND if w < 2 / 3 else THIRD)
                for w in FUSION_GRID}
    assert list(table) == list(FUSION_GRID)
    assert table == pytest.approx({w: value / 2 for w, value in expected.items()}, abs=1e-12)
    assert table[0.3] == 1.0


def test_tune_weight_breaks_a_tie_by_the_smaller_weight():
    # query a alone: every weight from 0.3 to 1 ranks x first (nDCG 1); the smallest is chosen,
    # whatever order the grid lists them in
    weight, table = tune_weight({"a": QUERY_A}, {"a": {"x": 1}}, split="dev", grid=(1.0, 0.5, 0.3, 0.2))
    assert weight == 0.3
    assert table == pytest.approx({1.0: 1.0, 0.5: 1.0, 0.3: 1.0, 0.2: SECOND}, abs=1e-12)
    # query b alone: 0 to 0.3 tie at 1; the smallest is 0, BM25 itself
    assert tune_weight({"b": QUERY_B}, {"b": {"u": 1}}, split="dev")[0] == 0.0


@pytest.mark.parametrize("split", ["test", "train", "DEV"])
def test_tune_weight_refuses_any_split_but_dev(split):
    with pytest.raises(ValueError, match="chosen on dev queries only") as error:
        tune_weight({"a": QUERY_A}, {"a": {"x": 1}}, split=split)
    assert "\n" not in str(error.value)


def test_tune_weight_needs_the_split_named():
    with pytest.raises(TypeError):
        tune_weight({"a": QUERY_A}, {"a": {"x": 1}}, "dev")


def test_candidates_file_round_trips_exactly(tmp_path):
    candidates = {
        "q-1": {"doc,with,commas": (0.1 + 0.2, 1 / 3), "d2": (1e-300, -2.5e17), "d3": (7.0, -0.0)},
        "q2": {"d2": (12.345678901234567, 0.0)},
        "empty": {},
    }
    path = tmp_path / "sub" / "candidates.csv"
    write_candidates(path, candidates)
    assert path.read_text().splitlines()[0] == "qid,docid,bm25,dense"
    assert [p.name for p in path.parent.iterdir()] == ["candidates.csv"]  # no temporary file left
    back = read_candidates(path)
    written = {qid: scores for qid, scores in candidates.items() if scores}  # a query without candidates has no row
    assert back == written
    assert list(back["q-1"]) == ["doc,with,commas", "d2", "d3"]
    assert back["q-1"]["doc,with,commas"] == CandidateScores(0.30000000000000004, 0.3333333333333333)
    assert back["q-1"]["doc,with,commas"].bm25 == 0.1 + 0.2
    assert math.copysign(1, back["q-1"]["d3"].dense) == -1
    assert fuse(back, 0.4) == fuse(written, 0.4)


def test_writing_a_non_finite_score_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"query 'q' document 'd': score nan is not a finite number"):
        write_candidates(tmp_path / "c.csv", {"q": {"d": (1.0, math.nan)}})
    assert not (tmp_path / "c.csv").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("qid,docid,bm25\nq,d,1.0\n", "line 1: expected the header qid,docid,bm25,dense"),
        ("", "line 1: expected the header qid,docid,bm25,dense"),
        ("qid,docid,bm25,dense\nq,d1,1.0,2.0\nq,d2,1.0\n", "line 3: expected 4 fields, got 3"),
        ("qid,docid,bm25,dense\nq,d1,1.0,high\n", "line 2: score 'high' is not a number"),
        ("qid,docid,bm25,dense\nq,d1,,2.0\n", "line 2: score '' is not a number"),
        ("qid,docid,bm25,dense\nq,d1,inf,2.0\n", "line 2: score 'inf' is not a finite number"),
        ("qid,docid,bm25,dense\nq,d1,1.0,2.0\nr,d1,1.0,2.0\nq,d1,3.0,4.0\n", "line 4: query 'q' document 'd1' is given twice"),
    ],
)
def test_a_malformed_candidates_file_names_the_file_and_the_line(tmp_path, text, message):
    path = tmp_path / "candidates.csv"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        read_candidates(path)
    assert str(error.value) == f"{path} {message}"


def test_a_missing_candidates_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="candidates.csv: missing"):
        read_candidates(tmp_path / "candidates.csv")
