"""`analyse`: every table of a sweep's analysis, computed once from its tidy results table, as the
`Analysis` value that the report prints and the figures draw: stats' metrics and effects' tables
(which build on stats, hence this module above both)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from fwbw.analysis.effects import arrow_of_time, power_table, scaling_trend, size_tests
from fwbw.analysis.overfitting import (
    fit_curves,
    overfitting_effects,
    run_fit,
    train_split_points,
)
from fwbw.analysis.stats import (
    AXES,
    DEFAULT_WINDOWS,
    SAMPLE_COLUMNS,
    Analysis,
    Window,
    arms,
    axis_samples,
    concat_tables,
    diverged_runs,
    epoch_windows,
    eval_points,
    final_losses,
    final_pairs_table,
    last_points,
    mask_audit,
    mask_summary,
    paired_comparison,
    ratio1_curves,
    ratios_table,
    runs_table,
    samples_table,
    select,
    skipped_table,
)
from fwbw.study.results import CUT_PHASE


def analyse(df: pd.DataFrame, windows: Sequence[Window] = DEFAULT_WINDOWS) -> Analysis:
    """The analysis of a sweep's tidy results table (study.results.COLUMNS)."""
    runs = runs_table(df)
    all_points = eval_points(df, runs)
    diverged = diverged_runs(all_points, runs)
    points = train_split_points(df, all_points[~all_points.run_id.isin(diverged)].reset_index(drop=True))
    failed = runs[runs.run_id.isin(diverged) & (runs.status != "done")]
    diverged_last = concat_tables([last_points(all_points[all_points.run_id.isin(diverged)]), failed], all_points.columns)
    final = last_points(points)
    arm_list = arms(final)
    samples = concat_tables([samples_table(points, arm_list), *(axis_samples(points, arm_list, a) for a in AXES if a != "epoch")],
                      SAMPLE_COLUMNS)
    final_pairs = final_pairs_table(points, final, arm_list)
    windows = epoch_windows(windows, samples, points.nominal_epoch.max())
    # the layer cut's full model (blocks_remaining == depth) is the final validation point
    cut_points = eval_points(df, runs, CUT_PHASE)
    cut = concat_tables([final, cut_points[~cut_points.run_id.isin(diverged)]], final.columns)
    audit = mask_audit(final, runs)
    epoch_pairs = select(final_pairs, {"axis": "epoch"})  # = stats.pairs_table(final, arm_list)
    fit = run_fit(points)
    return Analysis(
        windows=windows, runs=runs,
        unfinished=runs[runs.status != "done"].reset_index(drop=True),
        points=points, final=final, arms=arm_list,
        diverged=diverged_last,
        skipped=skipped_table(final, arm_list),
        ratios=ratios_table(final, final_pairs, cut, windows, arm_list), ratio1_samples=samples,
        ratio1_curves=ratio1_curves(samples),
        final_pairs=final_pairs,
        final_losses=final_losses(final, diverged_last),
        paired=paired_comparison(final, final_pairs, arm_list), mask_audit=audit, mask_summary=mask_summary(audit),
        scaling=scaling_trend(final, epoch_pairs), size_tests=size_tests(final, arm_list, epoch_pairs),
        power=power_table(final, arm_list, epoch_pairs), arrow_of_time=arrow_of_time(final),
        run_fit=fit, overfitting=overfitting_effects(fit, points, arm_list), fit_curves=fit_curves(points),
    )
