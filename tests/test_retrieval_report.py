"""The report's retrieval section on a hand-built retrieval table: one sentence that answers the question
from the within-model comparisons on test (the fwbw − fwfw control deciding), never stronger than their
two-level intervals, then the comparisons table; absent where the sweep has no retrieval result."""

from __future__ import annotations

import html
import math
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_analysis import build_results
from test_report_layout import SECTIONS, TAIL

from fwbw.analysis import figures, report
from fwbw.analysis.report import RETRIEVAL_TITLE, retrieval_statements, write_report
from fwbw.analysis.retrieval_stats import COMPARISON_COLUMNS, analyse_retrieval, sweep_retrieval
from fwbw.analysis.sections.render import md
from fwbw.analysis.sections.retrieval import FOREST, forest_rows
from fwbw.retrieval.metrics import METRICS
from fwbw.study.results import RETRIEVAL_COLUMNS

QIDS = ("q1", "q2")
# (p_bw, seed, embed) -> nDCG@10 of q1, q2; BM25's under None. Within p_bw = 0.05, d[seed, query] of
# bw − fw [[-0.1, 0], [0, 0.1]], fwbw − fw [[0.2, 0.1], [0.2, 0.2]], fwbw − fwfw [[0.1, 0], [0, 0.1]]: with 2
# seeds and 2 queries the two-level interval runs from d's smallest cell to its largest.
PER_QUERY = {
    (0.0, 100, "fw"): (0.5, 0.2), (0.0, 101, "fw"): (0.6, 0.3),
    (0.05, 100, "fw"): (0.6, 0.4), (0.05, 101, "fw"): (0.7, 0.5),
    (0.05, 100, "bw"): (0.5, 0.4), (0.05, 101, "bw"): (0.7, 0.6),
    (0.05, 100, "fwbw"): (0.8, 0.5), (0.05, 101, "fwbw"): (0.9, 0.7),
    (0.05, 100, "fwfw"): (0.7, 0.5), (0.05, 101, "fwfw"): (0.9, 0.6),
    None: (0.4, 0.3),
}
RUN = dict(data="wiki-sample", tokenizer="bpe:8192", seq_len=128, epochs=1.0, train_tokens=None, eval_tokens=12288,
           dtype="auto", recipe_id="r1", depth=2, width=8, model_scale=math.nan, bw_mode="add", bw_mask="causal",
           task_tokens=False, num_heads=1, adaptive_p_bw=False, eval_every_epochs=0.125)
MEANING = ("(nDCG@10 of late interaction, a − b within each model, with two-level bootstrap 95% intervals over seeds "
           "and queries).")
NO_EVIDENCE = "No evidence that training a causal LM both ways makes it a better late-interaction retriever"
FWBW, BW = "fwbw − fw +0.175 (95% CI +0.100 … +0.200)", "bw − fw +0.000 (95% CI -0.100 … +0.100)"
NOT_SHOWN = "bw training is not shown to be why: "
NO_REFERENCE = ("for {} of the {} comparisons it won there is no fw-only model's fwbw − fwfw over the same seeds, to tell bw "
                "training from what reading the text reversed gives a model never trained so")
YES = "Yes: training a causal LM both ways made it a better late-interaction retriever (fwbw beat fwfw in every comparison)"


def result_row(key, task: str, split: str, values: tuple) -> dict:
    common = {"phase": "retrieval", "task": task, "split": split, "finetune_steps": 0, "n_queries": 2, "n_docs": 9,
              **dict.fromkeys(METRICS, 0.0), "ndcg_at_10": float(np.mean(values)), "seconds": 1.0}
    if key is None:
        return {**common, "system": "bm25", "result": f"retrieval/bm25/{task}-{split}"}
    p_bw, seed, embed = key
    run_id = f"p{p_bw:g}-s{seed}"
    return {**common, **RUN, "run_id": run_id, "p_bw": p_bw, "seed": seed, "system": "late-interaction",
            "embed": embed, "result": f"retrieval/{run_id}/{task}-{split}-{embed}-ft0", "encode_corpus_seconds": 2.0,
            "seconds_per_query": 0.01}


def hand_built(fwfw_shift: dict | None = None, split: str = "test") -> tuple[pd.DataFrame, dict]:
    """PER_QUERY on task "tiny" and the given split; fwfw_shift: {task: s} adds tasks whose fwfw is fwbw + s
    (no fwfw where s is None)."""
    cells = [("tiny", key, values) for key, values in PER_QUERY.items()]
    for task, shift in (fwfw_shift or {}).items():
        cells += [(task, key, values) for key, values in PER_QUERY.items() if key is None or key[2] != "fwfw"]
        cells += [(task, (0.05, seed, "fwfw"), tuple(v + shift for v in PER_QUERY[(0.05, seed, "fwbw")]))
                  for seed in (100, 101) if shift is not None]
    rows = [result_row(key, task, split, values) for task, key, values in cells]
    table = pd.DataFrame(rows).reindex(columns=RETRIEVAL_COLUMNS)
    return table, {row["result"]: dict(zip(QIDS, values)) for row, (_, _, values) in zip(rows, cells)}


def answer(table: pd.DataFrame, per_query: dict) -> str:
    [sentence] = retrieval_statements(analyse_retrieval(table, per_query))
    return sentence


def test_the_answer_is_one_sentence_no_stronger_than_the_controls_interval():
    """fwbw beats fw beyond the interval, but its interval against the fwfw control reaches 0: no evidence."""
    assert answer(*hand_built()) == (
        f"{NO_EVIDENCE}: on the test queries, fwbw − fwfw (the matched control) +0.050 (95% CI +0.000 … +0.100); "
        f"{FWBW}; {BW} {MEANING}")


def test_with_the_fw_only_models_control_a_second_sentence_says_what_bw_training_adds():
    """The fw-only model's bw view reads the text reversed untrained: its fwbw − fwfw ([[0.1, 0], [0, 0.1]] here,
    as the p_bw 0.05 model's) is what any causal LM gets; bw training added nothing beyond it."""
    table, per_query = hand_built()
    extra = {(0.0, 100, "fwbw"): (0.6, 0.3), (0.0, 101, "fwbw"): (0.7, 0.4),
             (0.0, 100, "fwfw"): (0.5, 0.3), (0.0, 101, "fwfw"): (0.7, 0.3)}
    rows = [result_row(key, "tiny", "test", values) for key, values in extra.items()]
    table = pd.concat([table, pd.DataFrame(rows).reindex(columns=RETRIEVAL_COLUMNS)], ignore_index=True)
    per_query |= {row["result"]: dict(zip(QIDS, values)) for row, values in zip(rows, extra.values())}
    first, second = retrieval_statements(analyse_retrieval(table, per_query))
    assert first == answer(*hand_built())  # the answer itself reads the models trained both ways alone
    assert second.startswith("Secondary, whether bw training is what makes the difference: fwbw − fwfw, p_bw > 0 − "
                             "p_bw = 0 +0.000 (95% CI +0.000 … +0.000) (fwbw − fwfw in the model trained both ways minus "
                             "the same in the fw-only model of its seed, ")
    assert "neighbouring seeds share runs and the seed level of the interval is approximate" in second
    assert len(retrieval_statements(analyse_retrieval(*hand_built()))) == 1  # without the fw-only model's control
    last = forest_rows(analyse_retrieval(table, per_query)).iloc[-1]  # drawn last, not as the primary
    assert (last.label, last.primary) == ("fwbw − fwfw, p_bw > 0 − p_bw = 0: p_bw = 0.05, depth 2 / width 8, tiny", False)


BEYOND = ("fwbw beat its matched control fwfw in every comparison, but " + NOT_SHOWN + "beyond the fw-only model's own "
          "fwbw − fwfw, its bw view never trained, the difference of the 1 comparisons it won lies above 0 in 0, below 0 "
          "in {} and holds 0 in {}")


@pytest.mark.parametrize("fw_only_control, verdict", [
    ((0.1, 0.2, 0.1, 0.2), BEYOND.format(0, 1)),  # the same as the model trained both ways: the difference is 0
    ((0.3, 0.4, 0.3, 0.4), BEYOND.format(1, 0)),  # larger: the untrained reversed view gained more
    ((-0.1, 0.0, 0.0, -0.1), YES),  # below: bw training added beyond it
    (None, "fwbw beat its matched control fwfw in every comparison, but " + NOT_SHOWN + NO_REFERENCE.format(1, 1)),
])
def test_a_win_over_the_control_is_credited_to_bw_training_only_beyond_the_fw_only_models_own(fw_only_control, verdict):
    """fwbw − fwfw of p_bw 0.05 is [[0.2, 0.1], [0.1, 0.2]]: above 0. The fw-only model's fwbw − fwfw (its cells, seed
    by seed), where given: the same (the difference of differences holds 0) or below it (above 0)."""
    table, per_query = hand_built()
    lowered = table.embed.eq("fwfw") & table.p_bw.eq(0.05)
    table.loc[lowered, "ndcg_at_10"] -= 0.1
    for result in table.loc[lowered, "result"]:
        per_query[result] = {qid: value - 0.1 for qid, value in per_query[result].items()}
    if fw_only_control is not None:
        fwbw = {100: (0.6, 0.4), 101: (0.7, 0.5)}
        cells = {**{(0.0, seed, "fwbw"): values for seed, values in fwbw.items()},
                 **{(0.0, seed, "fwfw"): tuple(v - d for v, d in zip(values, fw_only_control[2 * i:2 * i + 2]))
                    for i, (seed, values) in enumerate(fwbw.items())}}
        rows = [result_row(key, "tiny", "test", values) for key, values in cells.items()]
        table = pd.concat([table, pd.DataFrame(rows).reindex(columns=RETRIEVAL_COLUMNS)], ignore_index=True)
        per_query |= {row["result"]: dict(zip(QIDS, values)) for row, values in zip(rows, cells.values())}
    assert retrieval_statements(analyse_retrieval(table, per_query))[0].startswith(verdict + ": on the test queries, ")


@pytest.mark.parametrize("shift, verdict, control", [
    (-0.05, "Not consistently: fwbw beat its matched control fwfw in some comparisons only, and " + NOT_SHOWN
            + NO_REFERENCE.format(1, 1), "above 0 in 1 and below 0 in 0 of 2 comparisons (mean +0.050)"),
    (+0.05, "No: fwbw lost to fwfw where the intervals exclude 0", "above 0 in 0 and below 0 in 1 of 2 comparisons (mean "
            "+0.000)"),
])
def test_several_tasks_count_where_the_intervals_lie(shift, verdict, control):
    """Task tiny (control interval 0 … 0.1: neither side) and tiny2, whose fwfw is fwbw + shift in every cell
    (an interval of one point, -shift)."""
    assert answer(*hand_built({"tiny2": shift})) == (
        f"{verdict}: on the test queries, fwbw − fwfw (the matched control) {control}; fwbw − fw above 0 in 2 and "
        "below 0 in 0 of 2 comparisons (mean +0.175); bw − fw above 0 in 0 and below 0 in 0 of 2 comparisons (mean "
        f"+0.000) {MEANING}")


def test_the_verdict_follows_the_control_alone():
    table, per_query = hand_built({"tiny2": -0.05})
    better = table[table.task.eq("tiny2")]
    assert answer(better, per_query) == (  # a win over the control, with nothing to tell bw training's part
        f"fwbw beat its matched control fwfw in every comparison, but {NOT_SHOWN}{NO_REFERENCE.format(1, 1)}: on the "
        "test queries, "
        f"fwbw − fwfw (the matched control) +0.050 (95% CI +0.050 … +0.050); {FWBW}; {BW} {MEANING}")
    table, per_query = hand_built({"tiny2": +0.05})
    assert answer(table[table.task.eq("tiny2")], per_query).startswith(
        "No: fwbw lost to fwfw where the intervals exclude 0: on the test queries, fwbw − fwfw (the matched control) "
        "-0.050 (95% CI -0.050 … -0.050); ")
    assert answer(*hand_built({"tiny2": -0.05, "tiny3": +0.05})).startswith(
        "Mixed: fwbw beat fwfw in some comparisons and lost to it in others: on the test queries, fwbw − fwfw (the "
        "matched control) above 0 in 1 and below 0 in 1 of 3 comparisons (mean +0.017); fwbw − fw above 0 in 3 ")


def test_without_the_control_a_gain_is_not_established():
    table, per_query = hand_built()
    assert answer(table[table.embed.ne("fwfw")], per_query) == (
        "Not established: without the matched fwfw control, a gain of two views over one is not told apart from "
        f"seeing both sides: on the test queries, {FWBW}; {BW} {MEANING}")
    only_bw = table[~table.embed.isin(["fwfw", "fwbw"])]
    assert answer(only_bw, per_query) == f"{NO_EVIDENCE}: on the test queries, {BW} {MEANING}"


def test_only_test_rows_of_real_tasks_answer():
    """Dev results (whatever they say) and the sanity task title do not enter the sentence; with no test
    result there is no sentence at all."""
    test, per_query = hand_built()
    dev, dev_queries = hand_built({"title": -0.5}, split="dev")
    title, title_queries = hand_built({"title": -0.5})
    both = pd.concat([test, dev, title[title.task.eq("title")]], ignore_index=True)
    assert answer(both, {**per_query, **dev_queries, **title_queries}) == answer(test, per_query)
    assert retrieval_statements(analyse_retrieval(dev, dev_queries)) == []


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


def test_the_report_leads_with_the_answer_then_the_comparisons(sweep, tmp_path):
    page = write_report(sweep, tmp_path / "out").read_text()
    assert re.findall(r"<h2>(.*?)</h2>", page) == SECTIONS + [html.escape(RETRIEVAL_TITLE)] + TAIL
    [sentence] = retrieval_statements(sweep_retrieval(sweep))
    assert sentence == answer(*hand_built())
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert f"## {md(RETRIEVAL_TITLE)}\n\n{md(sentence)}\n\nretrieval\\_comparisons: " in markdown
    comparisons = pd.read_csv(tmp_path / "out" / "retrieval_comparisons.csv")
    assert comparisons.columns.tolist() == COMPARISON_COLUMNS
    assert comparisons.comparison.tolist() == ["bw − fw", "fwbw − fw", "fwbw − fwfw", "p_bw > 0 − p_bw = 0, fw embed"]
    assert len(pd.read_csv(tmp_path / "out" / "retrieval_systems.csv")) == 6


def test_no_retrieval_results_no_section_and_no_tables(sweep, tmp_path):
    (sweep / "retrieval.csv").unlink()
    page = write_report(sweep, tmp_path / "out").read_text()
    assert "Retrieval" not in page
    assert not list((tmp_path / "out").glob("retrieval_*.csv"))


def publish(sweep_dir, out_dir):
    return runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "publish_retrieval.py"))["publish"](
        sweep_dir, out_dir)


def test_publish_writes_the_tables_the_forest_plot_and_a_summary_led_by_the_answer(sweep, tmp_path):
    out = tmp_path / "published"
    summary = publish(sweep, out).read_text()
    assert sorted(path.name for path in out.iterdir()) == [
        "retrieval_comparisons.csv", "retrieval_forest.png", "retrieval_forest.svg", "retrieval_systems.csv", "summary.md"]
    retrieval = sweep_retrieval(sweep)
    assert (out / "retrieval_comparisons.csv").read_text() == retrieval.comparisons.to_csv(index=False)
    assert (out / "retrieval_systems.csv").read_text() == retrieval.systems.to_csv(index=False)
    assert (out / "retrieval_forest.png").read_bytes().startswith(b"\x89PNG")
    [sentence] = retrieval_statements(retrieval)
    assert summary.startswith(f"# {md(RETRIEVAL_TITLE)}: sweep\n\n## Results\n\n{md(sentence)}\n\n"
                              "![retrieval\\_forest](retrieval_forest.png)\n\n_retrieval\\_forest: ")
    assert summary.endswith("\n\nTables: retrieval\\_comparisons.csv, retrieval\\_systems.csv. Analysed as "
                            "pre-registered in docs/retrieval-plan.md.\n")


def test_the_forest_plot_has_a_row_per_test_comparison_and_marks_the_primary(tmp_path, monkeypatch):
    """Two tasks on test (tiny2's fwfw is fwbw − 0.05 in every cell); dev results and the sanity task title get no row."""
    test, per_query = hand_built({"tiny2": -0.05})
    dev, dev_queries = hand_built(split="dev")
    title, title_queries = hand_built({"title": -0.5})
    table = pd.concat([test, dev, title[title.task.eq("title")]], ignore_index=True)
    rows = forest_rows(analyse_retrieval(table, {**per_query, **dev_queries, **title_queries}))
    assert rows.label.tolist() == [f"{name}: p_bw = 0.05, depth 2 / width 8, {task}"
                                   for name in ("fwbw − fwfw", "fwbw − fw", "bw − fw") for task in ("tiny", "tiny2")]
    assert rows.primary.tolist() == [True, True, False, False, False, False]
    assert np.allclose(rows[["mean_diff", "ci_low", "ci_high"]].to_numpy(dtype=float), [
        [0.05, 0.0, 0.1], [0.05, 0.05, 0.05], [0.175, 0.1, 0.2], [0.175, 0.1, 0.2], [0.0, -0.1, 0.1], [0.0, -0.1, 0.1]])
    kept = {}
    monkeypatch.setattr(figures, "_save", lambda fig, out_dir, name: kept.setdefault(name, fig))
    figures.comparison_forest(rows, tmp_path, FOREST)
    [ax] = kept[FOREST].axes
    ticks = sorted(ax.get_yticklabels(), key=lambda tick: -tick.get_position()[1])  # top to bottom
    assert [tick.get_text() for tick in ticks] == rows.label.tolist()
    assert [tick.get_fontweight() == "bold" for tick in ticks] == rows.primary.tolist()


def test_publish_refuses_a_sweep_without_retrieval_results_and_writes_nothing(sweep, tmp_path):
    (sweep / "retrieval.csv").unlink()
    out = tmp_path / "published"
    with pytest.raises(ValueError, match=r"sweep: no retrieval results in its retrieval\.parquet or retrieval\.csv$") as raised:
        publish(sweep, out)
    assert "\n" not in str(raised.value)
    assert not out.exists()


def test_the_publish_command_says_in_one_line_why_it_cannot_publish(sweep, tmp_path):
    (sweep / "retrieval.csv").unlink()
    script = Path(__file__).resolve().parents[1] / "scripts" / "publish_retrieval.py"
    done = subprocess.run([sys.executable, str(script), str(sweep), str(tmp_path / "published")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (f"publish_retrieval.py: error: {sweep}: no retrieval results in its retrieval.parquet or "
                           "retrieval.csv\n")
