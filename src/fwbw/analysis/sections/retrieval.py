"""Retrieval: does training both ways make a causal LM a better late-interaction retriever? The one sentence
that answers it from the within-model comparisons on test (the fwbw − fwfw control deciding), the comparisons
and systems tables, the deciding comparison's rows for the answer, and the rows of the forest plot that
scripts/publish_retrieval.py draws."""

from __future__ import annotations

import pandas as pd

from fwbw.analysis import retrieval_stats
from fwbw.analysis.figures import size_label
from fwbw.analysis.retrieval_stats import ANSWER_ORDER, BW_TRAINING, CONTROL, MEASURE, RetrievalAnalysis
from fwbw.analysis.sections.inputs import Inputs
from fwbw.analysis.sections.tables import answer_row, skip
from fwbw.analysis.sections.text import signed

QUESTION = "retrieval"
RETRIEVAL_TITLE = "Retrieval: does training both ways make a causal LM a better late-interaction retriever?"
RETRIEVAL_ANSWERS = {  # how the deciding comparison a − b's intervals lie (_retrieval_direction) -> the answer they allow
    "better": "Yes: training a causal LM both ways made it a better late-interaction retriever ({a} beat {b} in every "
              "comparison)",
    "sometimes": "Not consistently: training a causal LM both ways made it a better late-interaction retriever in "
                 "some comparisons only",
    "mixed": "Mixed: {a} beat {b} in some comparisons and lost to it in others",
    "worse": "No: {a} lost to {b} where the intervals exclude 0",
    "none": "No evidence that training a causal LM both ways makes it a better late-interaction retriever",
}
FOREST = "retrieval_forest"  # the forest plot's file stem
FOREST_CAPTION = ("The comparisons the answer rests on: nDCG@10 of a − b on the test queries within each model, zero-shot "
                  "late interaction after the last block, one row per comparison, model and task; dot: the mean over "
                  "seeds and queries, bar: its two-level bootstrap 95% interval; dashed: 0; red: the primary comparison, "
                  f"{CONTROL} (the matched control). Right of 0: a retrieved better than b. Last, where the fw-only "
                  f"model has the control too, {BW_TRAINING}: the control's difference minus the fw-only model's.")
# the deciding comparison's direction -> the answer where bw training is not shown to be why (_credited)
NOT_BW_TRAINING = {
    "better": "fwbw beat its matched control fwfw in every comparison, but bw training is not shown to be why: {why}",
    "sometimes": "Not consistently: fwbw beat its matched control fwfw in some comparisons only, and bw training is not "
                 "shown to be why: {why}",
}
RETRIEVAL_UNCONTROLLED = ("Not established: without the matched fwfw control, a gain of two views over one is not "
                          "told apart from seeing both sides")


def _retrieval_direction(rows: pd.DataFrame) -> str:
    """Where the two-level 95% intervals of a − b lie: above 0 in all rows, in some, on both sides, below only, or neither."""
    above, below = int((rows.ci_low > 0).sum()), int((rows.ci_high < 0).sum())
    if above == len(rows):
        return "better"
    if above:
        return "mixed" if below else "sometimes"
    return "worse" if below else "none"


def _retrieval_tally(rows: pd.DataFrame) -> str:
    """One comparison's rows: its difference and interval, or (several rows) where their intervals lie."""
    name = rows.comparison.iloc[0] + (" (the matched control)" if rows.comparison.iloc[0] == CONTROL else "")
    if len(rows) == 1:
        row = rows.iloc[0]
        return f"{name} {signed(row.mean_diff)} (95% CI {signed(row.ci_low)} … {signed(row.ci_high)})"
    above, below = int((rows.ci_low > 0).sum()), int((rows.ci_high < 0).sum())
    return f"{name} above 0 in {above} and below 0 in {below} of {len(rows)} comparisons (mean {signed(rows.mean_diff.mean())})"


def _retrieval_answer(deciding: pd.DataFrame, bw_training: pd.DataFrame) -> str:
    """The answer the deciding comparison's rows allow: a gain only where it is the fwbw − fwfw control, and
    credited to training both ways only where bw training is shown to be why (_credited; docs/retrieval-plan.md)."""
    name, direction = deciding.comparison.iloc[0], _retrieval_direction(deciding)
    if name != CONTROL and direction in ("better", "sometimes", "mixed"):
        return RETRIEVAL_UNCONTROLLED
    why = _credited(deciding, bw_training) if direction in NOT_BW_TRAINING else None
    if why:
        return NOT_BW_TRAINING[direction].format(why=why)
    a, b = name.split(" − ")
    return RETRIEVAL_ANSWERS[direction].format(a=a, b=b)


def _credited(deciding: pd.DataFrame, bw_training: pd.DataFrame) -> str | None:
    """None where every deciding row above 0 has its BW_TRAINING row (the same model, task and blocks, over the same
    seeds) above 0 too: bw training is shown to be why; else why not, in words."""
    keys = ["p_bw", "depth", "width", "task", "a_blocks", "seeds"]
    won = deciding[deciding.ci_low > 0]
    matched = won.merge(bw_training[[*keys, "ci_low", "ci_high"]], on=keys, how="left", suffixes=("", "_bw"))
    missing = int(matched.ci_low_bw.isna().sum())
    if missing:
        return (f"for {missing} of the {len(won)} comparisons it won there is no fw-only model's {CONTROL} over the "
                "same seeds, to tell bw training from what reading the text reversed gives a model never trained so")
    below, held = int((matched.ci_high_bw < 0).sum()), int((matched.ci_low_bw <= 0).sum())
    if held:
        return (f"beyond the fw-only model's own {CONTROL}, its bw view never trained, the difference of the "
                f"{len(won)} comparisons it won lies above 0 in {len(won) - held}, below 0 in {below} and holds 0 in "
                f"{held - below}")
    return None


def _by_comparison(retrieval: RetrievalAnalysis) -> list[pd.DataFrame]:
    """retrieval_stats.answer_rows by comparison, in ANSWER_ORDER (the deciding comparison first)."""
    rows = retrieval_stats.answer_rows(retrieval.comparisons)
    return [rows[rows.comparison.eq(name)] for name in ANSWER_ORDER if rows.comparison.eq(name).any()]


def retrieval_statements(retrieval: RetrievalAnalysis) -> list[str]:
    """The one sentence that answers the question, from retrieval_stats.answer_rows (none without them): the
    deciding comparison is the fwbw − fwfw control where the sweep has it (without it a gain is not established)."""
    by_name = _by_comparison(retrieval)
    if not by_name:
        return []
    tallies = "; ".join(map(_retrieval_tally, by_name))
    bw_training = _bw_training_rows(retrieval)
    return [f"{_retrieval_answer(by_name[0], bw_training)}: on the test queries, {tallies} (nDCG@10 of late interaction, a − b within "
            "each model, with two-level bootstrap 95% intervals over seeds and queries).", *_bw_training(bw_training)]


def _bw_training_rows(retrieval: RetrievalAnalysis) -> pd.DataFrame:
    """BW_TRAINING's rows on test (retrieval_stats.answer_rows): what bw training adds to the control's difference."""
    return retrieval_stats.answer_rows(retrieval.comparisons, (BW_TRAINING,))


def _bw_training(rows: pd.DataFrame) -> list[str]:
    """The secondary statement of what bw training adds, from BW_TRAINING's `rows`: the control's difference in the
    model trained both ways minus the same in the fw-only model, whose bw view reads the text reversed untrained
    (none without rows)."""
    if rows.empty:
        return []
    return [f"Secondary, whether bw training is what makes the difference: {_retrieval_tally(rows)} (fwbw − fwfw "
            "in the model trained both ways minus the same in the fw-only model of its seed, whose bw view reads the "
            "text reversed without having been trained to; above 0: bw training added to what reading the text "
            "reversed gives any causal LM, roughly what it did for the bw view less what it cost the fw view. fwfw of "
            "a seed borrows the next seed's fw view, in both models, so neighbouring seeds share runs and the seed "
            "level of the interval is approximate: see seed_ci and per_seed in retrieval_comparisons)."]


def forest_rows(retrieval: RetrievalAnalysis) -> pd.DataFrame:
    """The rows of the forest plot (figures.comparison_forest), top to bottom: _by_comparison's, then BW_TRAINING's,
    each with its label (comparison: model, task) and whether it is the primary comparison (CONTROL); none without
    them."""
    by_name = _by_comparison(retrieval)
    rows = pd.concat([*by_name, _bw_training_rows(retrieval)]) if by_name else retrieval.comparisons.iloc[:0]
    labels = [f"{row.comparison}: {row.a}, {size_label(row.depth, row.width)}, {row.task}" for row in rows.itertuples()]
    return rows.assign(label=labels, primary=rows.comparison.eq(CONTROL))


def section(inputs: Inputs) -> tuple[str, list[tuple]] | None:
    """The one sentence that answers, then the comparisons and systems tables; none without retrieval results."""
    retrieval = inputs.retrieval
    if retrieval is None:
        return None
    return (RETRIEVAL_TITLE, [
        *(("p", sentence) for sentence in retrieval_statements(retrieval)),
        ("p", "retrieval_comparisons: nDCG@10 of a − b, paired by seed and query (fwbw.analysis.retrieval_stats). "
              "Within each model, per task, split, system, blocks and fine-tuning: bw − fw, fwbw − fw and fwbw − "
              "fwfw (the matched control: this run's fw beside a second seed's fw) and, where echo ran, echo − fw "
              "(the text read twice), at every p_bw (at p_bw = 0, whose bw view was never trained, as references "
              "that never answer). Between "
              f"models: p_bw > 0 − p_bw = 0 with fw embeddings, {BW_TRAINING} (the control's difference less the "
              "fw-only model's), and each at its best embed and blocks. Against BM25: each model's best dense system, rerank-bm25 and fusion-bm25. "
              "Best: the highest mean nDCG@10 over the seeds on the dev split, then compared on every split. ci_low, "
              "ci_high: the two-level bootstrap 95% interval (seeds and queries resampled independently); p_value: its "
              "two-sided p; goal rows (best dense − BM25 on test, description and ict): p_holm, Holm-adjusted over "
              "every goal row (each model on each of its two tasks). seed_ci: the t interval over seeds; query_ci, "
              "query_boot: the paired t and bootstrap intervals over queries of the values averaged over seeds."),
        ("table", "retrieval_comparisons", retrieval.comparisons),
        ("p", "retrieval_systems: every system's metrics, the mean over its results (one per seed), with nDCG@10's "
              "95% t interval over seeds, the seconds to encode the corpus (small where the token cache held it) "
              "and per query."),
        ("table", "retrieval_systems", retrieval.systems),
    ])


def _deciding(inputs: Inputs) -> pd.DataFrame | None:
    """The rows of the comparison the answer rests on (_by_comparison's first), or None."""
    by_name = [] if inputs.retrieval is None else _by_comparison(inputs.retrieval)
    return by_name[0] if by_name else None


def answer_sentences(inputs: Inputs) -> list[str]:
    """The answer the deciding comparison allows, as a sentence; none without it."""
    deciding = _deciding(inputs)
    return [] if deciding is None else [f"Retrieval: {_retrieval_answer(deciding, _bw_training_rows(inputs.retrieval))}."]


def _row_verdict(row: dict) -> str:
    a, b = row["comparison"].split(" − ")
    if row["ci_low"] > 0:
        return f"{a} retrieved better than {b}"
    if row["ci_high"] < 0:
        return f"{a} retrieved worse than {b}"
    return "no resolvable difference"


def answer_rows(inputs: Inputs) -> list[dict]:
    """Each row of the deciding comparison: nDCG@10 of a − b on one task's test queries, within one model."""
    deciding = _deciding(inputs)
    return [answer_row(QUESTION, f"{row['comparison']}, {size_label(row['depth'], row['width'])}, {row['a']}: "
                                 f"nDCG@10 on {row['task']}", MEASURE, row["mean_diff"], (row["ci_low"], row["ci_high"]),
                       row["n_seeds"], "seed", _row_verdict(row))
            for row in ([] if deciding is None else deciding.to_dict("records"))]


def skipped(inputs: Inputs) -> list[dict]:
    """The question, where the sweep has retrieval results but none of the comparisons that answer it."""
    if inputs.retrieval is None or _deciding(inputs) is not None:
        return []
    return [skip(QUESTION, "no late-interaction comparison within a model on the test split")]
