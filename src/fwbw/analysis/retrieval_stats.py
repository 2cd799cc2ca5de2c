"""The retrieval question in numbers: does fw+bw training make a causal LM a better retriever?

From the sweep's retrieval table (fwbw.study.results.RETRIEVAL_COLUMNS, one row per result) and each
result's per-query nDCG@10 ({result folder: {qid: value}}):

  systems       per task, split, system, blocks, fine-tuning steps (CONFIG), run setting (stats.SETTING) and
                embed: the mean of every metric over the results (one per seed), nDCG@10's 95% t
                interval over seeds and the mean timings; BM25 once per task
  comparisons   per CONFIG and p_bw > 0 setting, against its p_bw = 0 baseline of the same size
                (stats.arms), seed by seed (the seeds with both results), on nDCG@10:
                  fw embed          the fw+bw-trained model against the fw-only one, both embedding fw
                  best embed        each with its best embed: the highest mean nDCG@10 over its seeds
                                    on the dev split, whichever split is compared (no dev results: no
                                    best embed, and no comparison that needs it)
                  fw+bw vs BM25     the fw+bw-trained model with its best embed against BM25
                  fw-only vs BM25   the fw-only model with its best embed against BM25
                The difference a − b, with two 95% intervals. Over seeds: the t interval of the seeds'
                differences of the results' means (stats.mean_ci). Over queries: each query's value
                averaged over the seeds first, then the paired t and bootstrap intervals
                (fwbw.retrieval.metrics.paired_difference). Both have the same mean; the first holds the
                noise of training, the second that of sampling the queries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fwbw.analysis.stats import SETTING, arms, mean_ci, select
from fwbw.retrieval.experiment import BM25
from fwbw.retrieval.metrics import METRICS, paired_difference
from fwbw.retrieval.run_files import PER_QUERY_FILE, read_per_query
from fwbw.study.sweep_dir import RETRIEVAL_CSV, RETRIEVAL_PARQUET

MEASURE = "ndcg_at_10"  # the headline metric, compared
CONFIG = ["task", "split", "system", "blocks", "finetune_steps"]  # what a comparison holds fixed besides the models
DEV = "dev"  # the split embeds are chosen on
FW_EMBED, BEST_EMBED, X_VS_BM25, BASE_VS_BM25 = "fw embed", "best embed", "fw+bw vs BM25", "fw-only vs BM25"
TIMINGS = ["encode_corpus_seconds", "seconds_per_query"]
SYSTEM_COLUMNS = [*CONFIG, *SETTING, "embed", "n_results", *METRICS, "ndcg_ci_low", "ndcg_ci_high", *TIMINGS]
COMPARISON_COLUMNS = [
    *CONFIG, *SETTING, "comparison", "a", "a_embed", "b", "b_embed", "n_seeds", "seeds", "a_mean", "b_mean",
    "mean_diff", "seed_ci_low", "seed_ci_high", "per_seed", "n_queries", "query_ci_low", "query_ci_high",
    "query_boot_low", "query_boot_high",
]

PerQuery = Mapping[str, Mapping[str, float]]  # result folder -> {qid: nDCG@10}


@dataclass
class RetrievalAnalysis:
    systems: pd.DataFrame  # SYSTEM_COLUMNS
    comparisons: pd.DataFrame  # COMPARISON_COLUMNS


def analyse_retrieval(table: pd.DataFrame, per_query: PerQuery) -> RetrievalAnalysis:
    return RetrievalAnalysis(system_table(table), comparison_table(table, per_query))


def sweep_retrieval(sweep_dir: Path) -> RetrievalAnalysis | None:
    """The analysis of the sweep's retrieval table (retrieval.parquet, else retrieval.csv) with each
    result's per_query.csv; None when the sweep has no retrieval result."""
    sweep_dir = Path(sweep_dir)
    parquet, csv = sweep_dir / RETRIEVAL_PARQUET, sweep_dir / RETRIEVAL_CSV
    if not (parquet.exists() or csv.exists()):
        return None
    table = pd.read_parquet(parquet) if parquet.exists() else pd.read_csv(csv)
    if table.empty:
        return None
    per_query = {result: {qid: values[MEASURE] for qid, values in read_per_query(sweep_dir / result / PER_QUERY_FILE).items()}
                 for result in table.result}
    return analyse_retrieval(table, per_query)


def system_table(table: pd.DataFrame) -> pd.DataFrame:
    keys = [*CONFIG, *SETTING, "embed"]
    rows = []
    for key, results in table.groupby(keys, dropna=False, sort=True):
        _, low, high = mean_ci(results[MEASURE])
        rows.append({**dict(zip(keys, key)), "n_results": len(results), **results[[*METRICS, *TIMINGS]].mean(),
                     "ndcg_ci_low": low, "ndcg_ci_high": high})
    return pd.DataFrame(rows, columns=SYSTEM_COLUMNS)


def comparison_table(table: pd.DataFrame, per_query: PerQuery) -> pd.DataFrame:
    """Every comparison of the module docstring, per CONFIG and p_bw > 0 setting (those with seeds in common)."""
    models = table[table.run_id.notna()]
    models = models.astype({"p_bw": float, "depth": int, "width": int, "seed": int, "blocks": "Int64",
                            "finetune_steps": int})  # as the results table has them, where a CSV made them floats
    runs = models.drop_duplicates("run_id")[["run_id", *SETTING, "seed"]]
    rows = []
    for arm in arms(runs):
        chosen = models[models.run_id.isin([*arm.runs, *arm.baseline])]
        for key, results in chosen.groupby(CONFIG, dropna=False, sort=True):
            config = dict(zip(CONFIG, key))
            bm25 = select(table, {"system": BM25, "task": config["task"], "split": config["split"]})
            dev = select(chosen, {**config, "split": DEV})
            x, base, x_dev, base_dev = (frame[frame.run_id.isin(names)] for frame in (results, dev)
                                        for names in (arm.runs, arm.baseline))
            best = _best_embed(x_dev), _best_embed(base_dev)
            rows += [{**config, **arm.setting, **row}
                     for row in _arm_rows(x, base, best, bm25, per_query, arm.setting["p_bw"])]
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def _arm_rows(x: pd.DataFrame, base: pd.DataFrame, best: tuple[str | None, str | None], bm25: pd.DataFrame,
              per_query: PerQuery, p_bw: float) -> list[dict]:
    """The comparisons of an arm's results x with its baseline's, best: each one's embed chosen on dev."""
    x_name, base_name = f"p_bw = {p_bw:g}", "p_bw = 0"
    x_best, base_best = best
    pairs = [
        (FW_EMBED, (x_name, _by_seed(x, "fw")), (base_name, _by_seed(base, "fw"))),
        (BEST_EMBED, (x_name, _by_seed(x, x_best)), (base_name, _by_seed(base, base_best))),
        (X_VS_BM25, (x_name, _by_seed(x, x_best)), ("BM25", bm25)),
        (BASE_VS_BM25, (base_name, _by_seed(base, base_best)), ("BM25", bm25)),
    ]
    rows = [_compare(name, a, b, per_query) for name, a, b in pairs]
    return [row for row in rows if row is not None]


def _best_embed(results: pd.DataFrame) -> str | None:
    """The embed with the highest mean nDCG@10 over its results (the first in name order on a tie)."""
    means = results.groupby("embed")[MEASURE].mean()
    return None if means.empty else str(means.idxmax())


def _by_seed(results: pd.DataFrame, embed: str | None) -> pd.DataFrame:
    return results[results.embed == embed].set_index("seed")


def _compare(name: str, a: tuple[str, pd.DataFrame], b: tuple[str, pd.DataFrame], per_query: PerQuery) -> dict | None:
    """a − b on the seeds of a that b has (BM25, b without seeds, counts for every seed); None without any."""
    (a_name, a_rows), (b_name, b_rows) = a, b
    if b_name == "BM25":
        b_rows = pd.DataFrame([b_rows.iloc[0]] * len(a_rows), index=a_rows.index) if len(b_rows) else b_rows
    seeds = sorted(set(a_rows.index) & set(b_rows.index))
    if not seeds:
        return None
    a_rows, b_rows = a_rows.loc[seeds], b_rows.loc[seeds]
    differences = a_rows[MEASURE].to_numpy(dtype=float) - b_rows[MEASURE].to_numpy(dtype=float)
    mean, low, high = mean_ci(differences)
    a_query, b_query = (_mean_over_seeds(rows.result, per_query) for rows in (a_rows, b_rows))
    queries = paired_difference(a_query, b_query) if len(a_query) >= 2 else None
    nan = np.nan
    return {
        "comparison": name, "a": a_name, "a_embed": a_rows.embed.iloc[0], "b": b_name,
        "b_embed": b_rows.embed.iloc[0], "n_seeds": len(seeds), "seeds": ", ".join(str(s) for s in seeds),
        "a_mean": a_rows[MEASURE].mean(), "b_mean": b_rows[MEASURE].mean(), "mean_diff": mean,
        "seed_ci_low": low, "seed_ci_high": high,
        "per_seed": "; ".join(f"{s}: {d:+.3f}" for s, d in zip(seeds, differences)),
        "n_queries": len(a_query),
        "query_ci_low": queries.t_low if queries else nan, "query_ci_high": queries.t_high if queries else nan,
        "query_boot_low": queries.bootstrap_low if queries else nan,
        "query_boot_high": queries.bootstrap_high if queries else nan,
    }


def _mean_over_seeds(results: pd.Series, per_query: PerQuery) -> dict[str, float]:
    """Each query's value averaged over the results (one per seed)."""
    values = [per_query[result] for result in results]
    if any(set(seed) != set(values[0]) for seed in values):
        raise ValueError(f"retrieval results {', '.join(results)} hold different queries: rerun them on one task")
    return {qid: float(np.mean([seed[qid] for seed in values])) for qid in values[0]}
