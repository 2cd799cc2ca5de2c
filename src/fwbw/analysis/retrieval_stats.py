"""The retrieval question in numbers: does training a causal LM both ways (fw and bw) make it a better
late-interaction retriever? Answered within one model, and never by choosing on the test split.

From the sweep's retrieval table (fwbw.study.results.RETRIEVAL_COLUMNS, one row per result) and each
result's per-query nDCG@10 ({result folder: {qid: value}}):

systems (SYSTEM_COLUMNS): per task, split, system, blocks, fine-tuning steps (CONFIG), run setting
  (stats.SETTING) and embed, the mean of every metric over the results (one per seed), nDCG@10's 95% t
  interval over seeds and the mean timings; BM25 once per task and split.

comparisons (COMPARISON_COLUMNS): one row per comparison a − b of nDCG@10 that the results allow; one
  they do not allow is absent. A model is a run setting with one run per seed (the first by run_id, as
  stats.arms counts them). a and b are paired by seed (the seeds both have; BM25 has no seed and stands
  for every one) and by query.
  Within one model, per task, split, system, blocks and fine-tuning steps (the same on both sides), every
  setting (a p_bw = 0 model's bw view reads the text reversed with a direction it never trained: its rows
  are the reference for what bw training adds, and never answer the question):
    bw − fw, fwbw − fw    its bw embedding, and both directions concatenated, against its fw
    fwbw − fwfw           the matched control: fwfw concatenates this run's fw with the fw of a
                          second seed's run of the setting, as many dimensions and as much training as
                          fwbw, so that an ensemble of two views is not taken for seeing both sides
    echo − fw             the fw-only baseline that reads the text twice (Springer et al. 2024)
  Between models, each p_bw > 0 setting against its p_bw = 0 baseline of the same size (stats.arms):
    p_bw > 0 − p_bw = 0, fw embed     both with fw embeddings, per task, split, system, blocks, fine-tuning
    fwbw − fwfw, p_bw > 0 − p_bw = 0  the control's difference in the p_bw > 0 model minus the same in the
                          baseline, per query and seed ((fwbw − fwfw) − (fwbw − fwfw)), likewise: what bw training
                          adds beyond what reading the text reversed gives a model never trained so; a_mean and
                          b_mean are the two models' fwbw − fwfw
    p_bw > 0 − p_bw = 0, best embed   each at its own best embed and blocks, per task, split, system, fine-tuning
  Against BM25 of the same task and split, per model:
    best dense − BM25     its best pure dense system (DENSE: late interaction, zero-shot or fine-tuned, and
                          single vector), system, embed, blocks and fine-tuning steps chosen together
    rerank-bm25 − BM25    BM25's top K re-ordered by the dense score, at its best embed, blocks, fine-tuning
    fusion-bm25 − BM25    the dev-tuned convex fusion of BM25 and the dense score, likewise
  "Best" is chosen on the dev split alone: the highest mean nDCG@10 over the model's seeds on dev (the first
  in sort order on a tie) among the model's own embeds (CANDIDATE_EMBEDS; fwfw, made of two runs, is a
  control and never chosen), then compared on every split (on dev itself optimistically: chosen on those
  queries). A model without dev results has no best, and the comparisons that need one are absent.

  Columns:
    comparison                 its name above
    task, split                where a and b are compared
    SETTING                    the model's (between models: the p_bw > 0 one's; b is its p_bw = 0 baseline)
    a, b                       the model ("p_bw = 0.05") or "BM25"
    a_system, a_embed, a_blocks, a_finetune_steps, and b_ likewise: what each side is (BM25's embed and
                               blocks are NA)
    n_seeds, seeds             the seeds paired
    n_queries                  the queries paired
    a_mean, b_mean, mean_diff  nDCG@10 of each side over seeds and queries, and a − b
    ci_low, ci_high            the headline 95% interval of a − b: the two-level bootstrap (two_level_means)
    p_value                    its two-sided p-value of a − b = 0 (bootstrap_p_value)
    goal                       the pre-specified goal: best dense − BM25 on the test split of a GOAL_TASKS
                               task (title is a sanity task: never a goal)
    p_holm                     on goal rows, p_value Holm-adjusted over every goal row (each model on
                               each of its two tasks); NaN elsewhere
    seed_ci_low, seed_ci_high  secondary: the 95% t interval over seeds of each seed's a − b (its mean over
                               queries; stats.mean_ci), NaN below 2 seeds
    per_seed                   each seed's a − b
    query_ci_low, query_ci_high, query_boot_low, query_boot_high
                               secondary: over queries of each query's a − b averaged over the seeds, the
                               paired t and bootstrap 95% intervals (metrics.paired_difference), NaN below
                               2 queries
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fwbw.analysis.effects import holm
from fwbw.analysis.stats import SETTING, Arm, arms, mean_ci, select
from fwbw.retrieval.ensemble import CONTROL_EMBED
from fwbw.retrieval.experiment import BM25, FUSION, LATE_INTERACTION, RERANK, SINGLE_VECTOR
from fwbw.retrieval.metrics import BOOTSTRAP_CHUNK, METRICS, paired_difference
from fwbw.retrieval.run_files import PER_QUERY_FILE, read_per_query
from fwbw.study.sweep_dir import RETRIEVAL_CSV, RETRIEVAL_PARQUET

MEASURE = "ndcg_at_10"  # the headline metric, compared
# what a within-model comparison holds fixed (variant: experiment.variant, chunks, negatives, ...)
CONFIG = ["task", "split", "system", "blocks", "finetune_steps", "variant"]
DEV, TEST = "dev", "test"  # choices are made on dev; test is what is reported
GOAL_TASKS = ("description", "ict")  # the tasks of the pre-specified goal, best dense − BM25 on test
DENSE = (LATE_INTERACTION, f"{SINGLE_VECTOR}-mean", f"{SINGLE_VECTOR}-last")  # the pure dense systems
CANDIDATE_EMBEDS = ("fw", "bw", "fwbw", "echo")  # one model's embeddings, what "best" chooses among
# every setting's; those of p_bw = 0 (its bw view never trained) are the reference for what bw training adds
WITHIN = {"bw − fw": ("bw", "fw"), "fwbw − fw": ("fwbw", "fw"), "fwbw − fwfw": ("fwbw", CONTROL_EMBED)}
ECHO = {"echo − fw": ("echo", "fw")}  # every setting
CONTROL = "fwbw − fwfw"  # the matched comparison the answer rests on
BW_TRAINING = "fwbw − fwfw, p_bw > 0 − p_bw = 0"  # what bw training adds to the control's difference
ANSWER_ORDER = (CONTROL, "fwbw − fw", "bw − fw")  # the comparisons that answer the question, the deciding one first
SANITY_TASKS = ("title",)  # checks that retrieval works at all, no answer to the question
FW_EMBED, BEST_EMBED = "p_bw > 0 − p_bw = 0, fw embed", "p_bw > 0 − p_bw = 0, best embed"
GOAL = "best dense − BM25"  # the comparison of the pre-specified goal
AGAINST_BM25 = {GOAL: DENSE, "rerank-bm25 − BM25": (RERANK,), "fusion-bm25 − BM25": (FUSION,)}
# a fusion's candidates and scores are its rerank's, and its weight is tuned on the dev rerank: its
# embed, blocks and variant are chosen on the dev rerank's results
CHOSEN_ON = {(FUSION,): (RERANK,)}
CHOSEN = ["system", "embed", "blocks", "finetune_steps", "variant"]  # what a side is
RESULT = ["run_id", "seed", *CONFIG, "embed", MEASURE, "result"]  # what a comparison reads of a result
BOOTSTRAP_RESAMPLES = 10_000  # of the two-level bootstrap
BOOTSTRAP_SEED = 0
DECIMALS = 12  # a resampled mean is rounded to these: one that is 0 but for float rounding is 0
CONFIDENCE = 0.95
TIMINGS = ["encode_corpus_seconds", "seconds_per_query"]
SYSTEM_COLUMNS = [*CONFIG, *SETTING, "embed", "n_results", *METRICS, "ndcg_ci_low", "ndcg_ci_high", *TIMINGS]
COMPARISON_COLUMNS = [
    "comparison", "task", "split", *SETTING, "a", *(f"a_{c}" for c in CHOSEN), "b", *(f"b_{c}" for c in CHOSEN),
    "n_seeds", "seeds", "n_queries", "a_mean", "b_mean", "mean_diff", "ci_low", "ci_high", "p_value", "goal",
    "p_holm", "seed_ci_low", "seed_ci_high", "per_seed", "query_ci_low", "query_ci_high", "query_boot_low",
    "query_boot_high",
]

PerQuery = Mapping[str, Mapping[str, float]]  # result folder -> {qid: nDCG@10}
Side = tuple[str, pd.DataFrame]  # a model's name and its results, one per seed, indexed by seed


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


# ----------------------------------------------------------------------------- the comparisons

def comparison_table(table: pd.DataFrame, per_query: PerQuery) -> pd.DataFrame:
    """Every comparison of the module docstring that the results allow: within models, between models, against BM25."""
    models = table[table.run_id.notna()].astype(
        {"p_bw": float, "depth": int, "width": int, "seed": int, "blocks": "Int64", "finetune_steps": int})  # as a CSV may not
    # two folders of one setting (a chunk length given, and the same one by default) count once
    models = models.sort_values("result").drop_duplicates(["run_id", *CONFIG, "embed", "pooling"])
    runs = models.sort_values("run_id").drop_duplicates([*SETTING, "seed"])[["run_id", *SETTING, "seed"]]  # one per seed
    models, bm25 = models[RESULT], table.loc[table.system.eq(BM25), RESULT]
    settings = [(dict(zip(SETTING, key)), models[models.run_id.isin(group.run_id)])
                for key, group in runs.groupby(SETTING, dropna=False, sort=True)]
    rows = [row for setting, results in settings for row in _within_model(setting, results, per_query)]
    rows += [row for arm in arms(runs) for row in _between_models(arm, models, per_query)]
    rows += [row for setting, results in settings for row in _against_bm25(setting, results, bm25, per_query)]
    return _with_goal(pd.DataFrame(rows, columns=COMPARISON_COLUMNS))


def answer_rows(comparisons: pd.DataFrame, names: tuple[str, ...] = ANSWER_ORDER) -> pd.DataFrame:
    """The rows that answer the question: zero-shot late interaction's comparisons of `names` (within
    each model trained both ways, p_bw > 0, by default; BW_TRAINING: what bw training adds), at every
    block, on the test split, the sanity tasks left out."""
    chosen = (comparisons.comparison.isin(names) & comparisons.split.eq(TEST) & comparisons.p_bw.gt(0)
              & comparisons.a_system.eq(LATE_INTERACTION) & ~comparisons.task.isin(SANITY_TASKS)
              & comparisons.a_finetune_steps.eq(0)
              & (comparisons.a_blocks.isna() | comparisons.a_blocks.eq(comparisons.depth)).fillna(False))
    return comparisons[chosen]


def _within_model(setting: dict, results: pd.DataFrame, per_query: PerQuery) -> list[dict]:
    """One model's embeds against its fw (and fwbw against fwfw), per CONFIG."""
    name, rows = _model_name(setting), []
    for _, config in results.groupby(CONFIG, dropna=False, sort=True):
        embeds = {embed: by_embed.set_index("seed") for embed, by_embed in config.groupby("embed")}
        rows += [_compare(contrast, (name, embeds[a]), (name, embeds[b]), per_query)
                 for contrast, (a, b) in {**WITHIN, **ECHO}.items() if {a, b} <= embeds.keys()]
    return [{**setting, **row} for row in rows if row is not None]


def _between_models(arm: Arm, models: pd.DataFrame, per_query: PerQuery) -> list[dict]:
    """The arm's p_bw > 0 model against its p_bw = 0 baseline: both with fw embeddings, fwbw − fwfw in one
    against the same in the other (BW_TRAINING), and each at its best."""
    x, base = (models[models.run_id.isin(names)] for names in (arm.runs, arm.baseline))
    x_name, base_name = _model_name(arm.setting), "p_bw = 0"
    rows = []
    a, b = WITHIN[CONTROL]
    for key, config in x.groupby(CONFIG, dropna=False, sort=True):
        same = select(base, dict(zip(CONFIG, key)))
        rows.append(_compare(FW_EMBED, (x_name, _by_seed(config, "fw")), (base_name, _by_seed(same, "fw")), per_query))
        rows.append(_compare_differences(BW_TRAINING, (x_name, _by_seed(config, a), _by_seed(config, b)),
                                         (base_name, _by_seed(same, a), _by_seed(same, b)), per_query))
    fixed = ["task", "system", "finetune_steps"]
    for key, x_at in x.groupby(fixed, dropna=False, sort=True):
        base_at = select(base, dict(zip(fixed, key)))
        choices = _choose(x_at, ["embed", "blocks", "variant"]), _choose(base_at, ["embed", "blocks", "variant"])
        if None not in choices:
            rows += [_compare(BEST_EMBED, (x_name, _chosen(x_at, choices[0], split)),
                              (base_name, _chosen(base_at, choices[1], split)), per_query)
                     for split in sorted(set(x_at.split))]
    return [{**arm.setting, **row} for row in rows if row is not None]


def _against_bm25(setting: dict, results: pd.DataFrame, bm25: pd.DataFrame, per_query: PerQuery) -> list[dict]:
    """The model's best of each AGAINST_BM25 kind of system, chosen on dev, against BM25 on each split."""
    name, rows = _model_name(setting), []
    for task, on_task in results.groupby("task", sort=True):
        for comparison, systems in AGAINST_BM25.items():
            choice = _choose(on_task[on_task.system.isin(CHOSEN_ON.get(systems, systems))], CHOSEN)
            choice = choice and {**choice, "system": systems[0]} if systems in CHOSEN_ON else choice
            for split in sorted(set(on_task.split)) if choice else ():
                model = _chosen(on_task, choice, split)
                rows.append(_compare(comparison, (name, model),
                                     ("BM25", _every_seed(select(bm25, {"task": task, "split": split}), model.index)), per_query))
    return [{**setting, **row} for row in rows if row is not None]


def _with_goal(table: pd.DataFrame) -> pd.DataFrame:
    """The table with goal and p_holm (module docstring); the Holm family is every goal row (each
    model on each goal task)."""
    goal = table.comparison.eq(GOAL) & table.task.isin(GOAL_TASKS) & table.split.eq(TEST)
    table = table.assign(goal=goal, p_holm=np.nan)
    if goal.any():
        table.loc[goal, "p_holm"] = holm(table.loc[goal, "p_value"])
    return table.astype({f"{side}_{c}": "Int64" for side in "ab" for c in ("blocks", "finetune_steps")})


def _model_name(setting: dict) -> str:
    return f"p_bw = {setting['p_bw']:g}"


def _by_seed(results: pd.DataFrame, embed: str) -> pd.DataFrame:
    return results[results.embed == embed].set_index("seed")


def _choose(results: pd.DataFrame, keys: list[str]) -> dict | None:
    """The values of `keys` (two or more) whose dev results among CANDIDATE_EMBEDS have the highest mean
    nDCG@10 (the first in sort order on a tie); None without any. Only dev rows' values are read; where
    the results have test rows, only the values evaluated on test too are candidates (a setting tried
    on dev alone is never the one reported)."""
    dev = results[results.split.eq(DEV) & results.embed.isin(CANDIDATE_EMBEDS)]
    reported = results[results.split.ne(DEV)]
    if not reported.empty:
        evaluated = pd.MultiIndex.from_frame(reported[keys].drop_duplicates())
        dev = dev[pd.MultiIndex.from_frame(dev[keys]).isin(evaluated)]
    means = dev.groupby(keys, dropna=False, sort=True)[MEASURE].mean()
    return None if means.empty else dict(zip(keys, means.idxmax()))


def _chosen(results: pd.DataFrame, choice: dict, split: str) -> pd.DataFrame:
    return select(results, {**choice, "split": split}).set_index("seed")


def _every_seed(bm25: pd.DataFrame, seeds: pd.Index) -> pd.DataFrame:
    """BM25's result (it has no seed) standing for every seed; empty without one."""
    return pd.DataFrame([bm25.iloc[0]] * len(seeds), index=seeds) if len(bm25) else bm25


# ----------------------------------------------------------------------------- one comparison

def _compare(name: str, a: Side, b: Side, per_query: PerQuery) -> dict | None:
    """a − b over the seeds both have and their queries (the module docstring's columns); None without a seed."""
    (a_name, a_rows), (b_name, b_rows) = a, b
    seeds = _common_seeds(a_rows, b_rows)
    if not seeds:
        return None
    a_rows, b_rows = a_rows.loc[seeds], b_rows.loc[seeds]
    qids, a_values, b_values = _per_query(a_rows, b_rows, per_query)
    return _difference_row(name, (a_name, a_rows.iloc[0], a_values), (b_name, b_rows.iloc[0], b_values), seeds, qids)


def _compare_differences(name: str, x: tuple[str, pd.DataFrame, pd.DataFrame],
                         base: tuple[str, pd.DataFrame, pd.DataFrame], per_query: PerQuery) -> dict | None:
    """(x's a − b) − (base's a − b): one within-model difference in one model against the same in another,
    over the seeds all four sides have and their queries; a and b of the row are x's and base's within-model
    differences (their means are a_mean and b_mean), described by their first sides. None without a seed."""
    (x_name, x_a, x_b), (base_name, base_a, base_b) = x, base
    seeds = _common_seeds(x_a, x_b, base_a, base_b)
    if not seeds:
        return None
    x_a, x_b, base_a, base_b = (rows.loc[seeds] for rows in (x_a, x_b, base_a, base_b))
    qids, xa_values, xb_values = _per_query(x_a, x_b, per_query)
    base_qids, base_a_values, base_b_values = _per_query(base_a, base_b, per_query)
    if base_qids != qids:
        raise ValueError(f"retrieval results {', '.join([*x_a.result, *base_a.result])} hold different queries: rerun "
                         "them on one task")
    return _difference_row(name, (x_name, x_a.iloc[0], xa_values - xb_values),
                           (base_name, base_a.iloc[0], base_a_values - base_b_values), seeds, qids)


def _common_seeds(*sides: pd.DataFrame) -> list[int]:
    """The seeds every side has (each side's results indexed by seed, one per seed)."""
    for rows in sides:
        if rows.index.has_duplicates:
            raise ValueError(f"retrieval results {', '.join(rows.result)} are the same system's on one seed: the table "
                             "cannot tell them apart")
    return sorted(set.intersection(*(set(rows.index) for rows in sides)))


def _difference_row(name: str, a: tuple[str, pd.Series, np.ndarray], b: tuple[str, pd.Series, np.ndarray],
                    seeds: list[int], qids: list[str]) -> dict:
    """The row of a − b (COMPARISON_COLUMNS): each side's name, first result (what it is) and values
    (seeds × queries)."""
    (a_name, a_first, a_values), (b_name, b_first, b_values) = a, b
    d = a_values - b_values
    means = two_level_means(d)
    low, high = np.quantile(means, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    per_seed = d.mean(axis=1)
    _, seed_low, seed_high = mean_ci(per_seed, CONFIDENCE)
    return {
        "comparison": name, "task": a_first["task"], "split": a_first["split"],
        "a": a_name, **{f"a_{c}": a_first[c] for c in CHOSEN}, "b": b_name, **{f"b_{c}": b_first[c] for c in CHOSEN},
        "n_seeds": len(seeds), "seeds": ", ".join(map(str, seeds)), "n_queries": len(qids),
        "a_mean": a_values.mean(), "b_mean": b_values.mean(), "mean_diff": d.mean(), "ci_low": low, "ci_high": high,
        "p_value": bootstrap_p_value(means), "seed_ci_low": seed_low, "seed_ci_high": seed_high,
        "per_seed": "; ".join(f"{s}: {v:+.3f}" for s, v in zip(seeds, per_seed)),
        **_over_queries(qids, a_values.mean(axis=0), b_values.mean(axis=0)),
    }


def _per_query(a_rows: pd.DataFrame, b_rows: pd.DataFrame, per_query: PerQuery) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The qids (sorted) and a's and b's nDCG@10 as seeds × queries matrices."""
    results = list(dict.fromkeys([*a_rows.result, *b_rows.result]))
    qids = sorted(per_query[results[0]])
    if any(sorted(per_query[result]) != qids for result in results):
        raise ValueError(f"retrieval results {', '.join(results)} hold different queries: rerun them on one task")
    a_values, b_values = (np.array([[per_query[r][q] for q in qids] for r in rows.result], dtype=float)
                          for rows in (a_rows, b_rows))
    return qids, a_values, b_values


def _over_queries(qids: list[str], a: np.ndarray, b: np.ndarray) -> dict:
    if len(qids) < 2:
        return dict.fromkeys(["query_ci_low", "query_ci_high", "query_boot_low", "query_boot_high"], np.nan)
    paired = paired_difference(dict(zip(qids, a)), dict(zip(qids, b)), CONFIDENCE)
    return {"query_ci_low": paired.t_low, "query_ci_high": paired.t_high,
            "query_boot_low": paired.bootstrap_low, "query_boot_high": paired.bootstrap_high}


# ----------------------------------------------------------------------------- the two-level bootstrap

def two_level_means(d: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """The bootstrap distribution of the mean of d[seed, query], the differences a − b of one comparison.

    Every seed is scored on every query: seeds and queries are crossed factors, neither nested in the
    other. Each resample draws the seeds with replacement and, independently, the queries with
    replacement, and takes the mean of d over every drawn seed × drawn query cell; the headline interval is
    the 2.5% and 97.5% percentiles of `resamples` such means. Resampling both factors of a crossed design
    independently is Owen's pigeonhole bootstrap (A. B. Owen, "The pigeonhole bootstrap", Annals of Applied
    Statistics 1(2), 2007); Davison & Hinkley (Bootstrap Methods and their Application, 1997, §3.8) discuss
    resampling data with more than one level of variation. Either level alone misses the other's noise:
    queries alone take the trained models as fixed, seeds alone the query set. With every seed alike it is
    the query bootstrap of metrics.paired_difference (the queries are drawn as it draws them, from
    default_rng(seed), in chunks of BOOTSTRAP_CHUNK); with one query it is the bootstrap over seeds (drawn
    from default_rng(SeedSequence(seed, spawn_key=(1,))), an independent stream). Owen shows the variance
    it estimates slightly exceeds the true one (the residual enters from both factors), whereas with few
    seeds the seed level is narrow and coarse (two seeds give three distinct draws): hence the seed t
    interval kept beside it. Each mean is rounded to DECIMALS places, so that one that is 0 but for float
    rounding counts as 0, not on either side of it.
    """
    n_seeds, n_queries = d.shape
    query_rng, seed_rng = np.random.default_rng(seed), np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    means = []
    for start in range(0, resamples, BOOTSTRAP_CHUNK):
        rows = min(BOOTSTRAP_CHUNK, resamples - start)
        seed_counts = _counts(seed_rng.integers(0, n_seeds, size=(rows, n_seeds)), n_seeds)
        query_counts = _counts(query_rng.integers(0, n_queries, size=(rows, n_queries)), n_queries)
        means.append(((seed_counts @ d) * query_counts).sum(axis=1) / (n_seeds * n_queries))
    return np.round(np.concatenate(means), DECIMALS)


def _counts(draws: np.ndarray, n: int) -> np.ndarray:
    """How often each of 0..n-1 was drawn in each row of `draws`."""
    rows = len(draws)
    return np.bincount((draws + n * np.arange(rows)[:, None]).ravel(), minlength=rows * n).reshape(rows, n)


def bootstrap_p_value(means: np.ndarray) -> float:
    """The two-sided p-value of a − b = 0 from the bootstrap means: min(1, 2 (1 + k) / (B + 1)), k the
    number of the B means on the far side of 0 (the fewer of ≤ 0 and ≥ 0); about the smallest level at which
    the percentile interval excludes 0, and never 0.

    The goal's p-value (p_holm) is this one and not a t test over seeds: it tests the statistic the headline
    interval shows, with both sources of noise (the goal claims a gain on the task's queries, not only on
    these), while a t test over 2 or 3 seeds has 1 or 2 degrees of freedom and takes the query set as
    fixed. With few seeds it is liberal (two_level_means): read it with the seed interval.
    """
    far = min(int(np.sum(means <= 0)), int(np.sum(means >= 0)))
    return min(1.0, 2 * (1 + far) / (len(means) + 1))
