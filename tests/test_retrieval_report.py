"""The report's retrieval section on a hand-built retrieval table: the fw+bw-trained model against the
fw-only one of the same seeds (fw embeddings, best embeds) and both against BM25, each sentence with
its exact intervals over seeds and over queries; absent where the sweep has no retrieval result."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
from test_analysis import build_results
from test_report_layout import SECTIONS, TAIL

from fwbw.analysis import report
from fwbw.analysis.report import retrieval_statements, write_report
from fwbw.analysis.retrieval_stats import analyse_retrieval, sweep_retrieval
from fwbw.retrieval.metrics import METRICS
from fwbw.study.results import RETRIEVAL_COLUMNS

QIDS = ("q1", "q2", "q3")
# (p_bw, seed, embed) -> nDCG@10 of q1, q2, q3; BM25's under None
PER_QUERY = {
    (0.0, 100, "fw"): (0.5, 0.2, 0.2), (0.0, 101, "fw"): (0.6, 0.3, 0.3),
    (0.0, 100, "fwbw"): (0.1, 0.1, 0.1), (0.0, 101, "fwbw"): (0.2, 0.2, 0.2),
    (0.05, 100, "fw"): (0.6, 0.4, 0.2), (0.05, 101, "fw"): (0.7, 0.6, 0.5),
    (0.05, 100, "fwbw"): (0.9, 0.5, 0.4), (0.05, 101, "fwbw"): (0.8, 0.7, 0.6),
    None: (0.4, 0.3, 0.2),
}
RUN = dict(data="wiki-sample", tokenizer="bpe:8192", seq_len=128, epochs=1.0, train_tokens=None, eval_tokens=12288,
           dtype="auto", recipe_id="r1", depth=2, width=8, model_scale=math.nan, bw_mode="add", bw_mask="causal",
           task_tokens=False, num_heads=1, adaptive_p_bw=False, eval_every_epochs=0.125)
SECTION = "Retrieval: fw+bw-trained against fw-only-trained token embeddings"
WHERE = "tiny dev, zero-shot, late interaction, depth 2 / width 8"


def result_row(key) -> dict:
    values = PER_QUERY[key]
    common = {"phase": "retrieval", "task": "tiny", "split": "dev", "finetune_steps": 0, "n_queries": 3, "n_docs": 9,
              **dict.fromkeys(METRICS, 0.0), "ndcg_at_10": float(np.mean(values)), "seconds": 1.0}
    if key is None:
        return {**common, "system": "bm25", "result": "retrieval/bm25/tiny"}
    p_bw, seed, embed = key
    run_id = f"p{p_bw:g}-s{seed}"
    return {**common, **RUN, "run_id": run_id, "p_bw": p_bw, "seed": seed, "system": "late-interaction",
            "embed": embed, "result": f"retrieval/{run_id}/tiny-{embed}-ft0", "encode_corpus_seconds": 2.0,
            "seconds_per_query": 0.01}


def hand_built() -> tuple[pd.DataFrame, dict]:
    table = pd.DataFrame([result_row(key) for key in PER_QUERY]).reindex(columns=RETRIEVAL_COLUMNS)
    per_query = {row["result"]: dict(zip(QIDS, PER_QUERY[key])) for key, row in zip(PER_QUERY, table.to_dict("records"))}
    return table, per_query


def test_each_comparison_is_one_sentence_with_both_intervals_and_its_verdict():
    """Seed differences (a − b): fw embed 0.1 and 0.2, best embed (fwbw against fw) 0.3 and 0.3; against
    BM25 (0.3) 0.3 and 0.4 (fw+bw, fwbw), 0.0 and 0.1 (fw-only, fw). Over seeds the t interval with 1
    degree of freedom (12.706 · s / √2); over queries, of the seeds' mean per query, with 2 (4.303 · s / √3)."""
    assert retrieval_statements(analyse_retrieval(*hand_built())) == [
        f"{WHERE}, p_bw = 0.05 against p_bw = 0, both with fw embeddings: nDCG@10 0.500 vs 0.350, difference +0.150 "
        "(over seeds: 95% CI -0.485 … +0.785, n = 2 seeds: within seed noise; over queries: 95% CI -0.065 … +0.365, "
        "n = 3 queries: within query noise).",
        f"{WHERE}, p_bw = 0.05 (fwbw embed) against p_bw = 0 (fw embed), each with its best embed: nDCG@10 0.650 vs "
        "0.350, difference +0.300 (over seeds: 95% CI +0.300 … +0.300, n = 2 seeds: p_bw = 0.05 better beyond seed "
        "noise; over queries: 95% CI +0.176 … +0.424, n = 3 queries: p_bw = 0.05 better beyond query noise).",
        f"{WHERE}, p_bw = 0.05 (fwbw embed, its best) against BM25: nDCG@10 0.650 vs 0.300, difference +0.350 (over "
        "seeds: 95% CI -0.285 … +0.985, n = 2 seeds: within seed noise; over queries: 95% CI +0.135 … +0.565, n = 3 "
        "queries: p_bw = 0.05 better beyond query noise).",
        f"{WHERE}, p_bw = 0 (fw embed, its best) against BM25: nDCG@10 0.350 vs 0.300, difference +0.050 (over seeds: "
        "95% CI -0.585 … +0.685, n = 2 seeds: within seed noise; over queries: 95% CI -0.198 … +0.298, n = 3 queries: "
        "within query noise).",
    ]


def test_the_tables_hold_the_per_seed_differences_and_every_systems_mean():
    retrieval = analyse_retrieval(*hand_built())
    best = retrieval.comparisons[retrieval.comparisons.comparison == "best embed"].iloc[0]
    assert (best.a, best.a_embed, best.b, best.b_embed, best.seeds) == ("p_bw = 0.05", "fwbw", "p_bw = 0", "fw", "100, 101")
    assert best.per_seed == "100: +0.300; 101: +0.300"
    assert best.query_boot_low == pytest.approx(0.25) and best.query_boot_high == pytest.approx(1.05 / 3)
    systems = retrieval.systems.set_index(["p_bw", "embed"], drop=False)
    assert systems.n_results.tolist() == [1, 2, 2, 2, 2]  # BM25 first
    fwbw = systems.loc[(0.05, "fwbw")]
    assert fwbw.ndcg_at_10 == pytest.approx(0.65)
    half = 12.706204736174707 * 0.05  # t_{0.975, 1} · s / √2 with s = 0.1 / √2
    assert (fwbw.ndcg_ci_low, fwbw.ndcg_ci_high) == pytest.approx((0.65 - half, 0.65 + half))
    assert systems.iloc[0].system == "bm25" and math.isnan(systems.iloc[0].ndcg_ci_low)


def test_one_seed_gives_no_interval_over_seeds_and_a_missing_model_no_comparison():
    table, per_query = hand_built()
    table = table[table.seed.ne(101) | table.seed.isna()]  # seed 101 gone from both arms
    said = retrieval_statements(analyse_retrieval(table, per_query))
    assert said[0].endswith("(over seeds: n = 1 seed: no interval; over queries: 95% CI -0.148 … +0.348, n = 3 "
                            "queries: within query noise).")
    no_baseline = retrieval_statements(analyse_retrieval(table[table.p_bw.ne(0.0)], per_query))
    assert [s.split(": nDCG")[0] for s in no_baseline] == [f"{WHERE}, p_bw = 0.05 (fwbw embed, its best) against BM25"]
    assert retrieval_statements(analyse_retrieval(table[table.p_bw.ne(0.05)], per_query)) == [
        "No p_bw > 0 run has a retrieval result: nothing to compare."]


@pytest.mark.parametrize("blocks, shown", [(1, " after 1 of 2 blocks"), (2, "")])
def test_embeddings_of_fewer_blocks_are_named(blocks, shown):
    table, per_query = hand_built()
    table.loc[table.run_id.notna(), "blocks"] = blocks
    said = retrieval_statements(analyse_retrieval(table, per_query))
    assert said[0].startswith(f"tiny dev, zero-shot, late interaction{shown}, depth 2 / width 8, p_bw = 0.05 against ")


def with_test_split(fw_on_test: float) -> tuple[pd.DataFrame, dict]:
    """The hand-built dev results and a copy of them on test, where p_bw = 0.05's fw embed scores fw_on_test."""
    table, per_query = hand_built()
    test = table.assign(split="test", result=table.result + "-test")
    test.loc[test.p_bw.eq(0.05) & test.embed.eq("fw"), "ndcg_at_10"] = fw_on_test
    copies = {f"{result}-test": values for result, values in per_query.items()}
    return pd.concat([table, test], ignore_index=True), {**per_query, **copies}


def test_the_best_embed_is_chosen_on_dev_whichever_split_is_compared():
    retrieval = analyse_retrieval(*with_test_split(fw_on_test=0.95))  # fw best on test, fwbw on dev
    best = retrieval.comparisons[retrieval.comparisons.comparison.eq("best embed")].set_index("split")
    assert best.loc["test", "a_embed"] == best.loc["dev", "a_embed"] == "fwbw"
    table, per_query = with_test_split(fw_on_test=0.95)
    test_only = analyse_retrieval(table[table.split.eq("test")], per_query).comparisons
    assert test_only.comparison.tolist() == ["fw embed"]  # no dev results: no embed is chosen


def test_results_of_different_queries_are_refused_in_one_line():
    table, per_query = hand_built()
    per_query["retrieval/p0-s101/tiny-fw-ft0"] = {"q1": 0.6, "q9": 0.3, "q3": 0.3}
    with pytest.raises(ValueError, match=r"^retrieval results retrieval/p0-s100/tiny-fw-ft0, retrieval/p0-s101/tiny-fw-ft0 "
                                         r"hold different queries: rerun them on one task$"):
        analyse_retrieval(table, per_query)


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    """A sweep directory with test_analysis' results table and, beside it, the hand-built retrieval table
    with each result's per_query.csv."""
    monkeypatch.setattr(report, "make_figures", lambda analysis, out_dir: {})
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    build_results().to_parquet(sweep_dir / "results.parquet")
    table, per_query = hand_built()
    table.to_csv(sweep_dir / "retrieval.csv", index=False)
    for result, values in per_query.items():
        folder = sweep_dir / result
        folder.mkdir(parents=True)
        lines = ["qid," + ",".join(METRICS)] + [f"{qid},{value!r},0.0,0.0,0.0,0.0" for qid, value in values.items()]
        (folder / "per_query.csv").write_text("\n".join(lines) + "\n")
    return sweep_dir


def test_the_report_shows_the_section_and_writes_its_tables(sweep, tmp_path):
    page = write_report(sweep, tmp_path / "out").read_text()
    assert re.findall(r"<h2>(.*?)</h2>", page) == SECTIONS + [SECTION] + TAIL
    expected = retrieval_statements(sweep_retrieval(sweep))
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert f"## {SECTION}\n\n- {report._md(expected[0])}\n" in markdown
    comparisons = pd.read_csv(tmp_path / "out" / "retrieval_comparisons.csv")
    assert comparisons.comparison.tolist() == ["fw embed", "best embed", "fw+bw vs BM25", "fw-only vs BM25"]
    assert len(pd.read_csv(tmp_path / "out" / "retrieval_systems.csv")) == 5


def test_no_retrieval_results_no_section_and_no_tables(sweep, tmp_path):
    (sweep / "retrieval.csv").unlink()
    page = write_report(sweep, tmp_path / "out").read_text()
    assert SECTION not in page
    assert not list((tmp_path / "out").glob("retrieval_*.csv"))
