"""Review fixes of the analysis: diverged failed runs, adaptive_p_bw cost axes, seeds counted once,
one interval behind each verdict, samples that cannot be written, arrow-of-time leaks, flat axes."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from test_analysis import A, failed_row, one, run_rows
from test_analysis_v2 import skipped_rows
from test_effects import SMALL, run

from fwbw.analysis.effects import arrow_of_time
from fwbw.analysis.report import findings, sample_blocks
from fwbw.analysis.sections.equal_data import percent_verdict
from fwbw.analysis.stats import CONTEXT, _fw_at
from fwbw.analysis.sweep_analysis import analyse
from fwbw.study import sweep
from fwbw.study.results import CONFIG_COLUMNS
from fwbw.study.sweep_dir import RUNS
from fwbw.training.data_parallel import DataParallel
from fwbw.training.run_dir import SAMPLES


def table(*runs):
    return pd.DataFrame([row for rows in runs for row in rows])


def test_a_run_failed_by_divergence_counts_as_diverged():
    failed = dict(failed_row("a5-s1", A, 0.05, 1), error="TrainingDiverged: non-finite loss at step 7")
    oom = failed_row("a5-s2", A, 0.05, 2)  # failed for another reason: not diverged
    rows = [*run_rows("a0-s0", A, 0.0, 0, 4.0, 6.0), *run_rows("a5-s0", A, 0.05, 0, 4.1, 4.5), failed, oom]
    analysis = analyse(pd.DataFrame(rows))
    losses = one(analysis.final_losses, p_bw=0.05)
    assert (losses.n_seeds, losses.n_diverged) == (1, 1)
    assert ("1 run(s) diverged (non-finite loss in training or validation) at depth 2 / width 8, p_bw = 0.05, add, "
            "causal mask: a5-s1; left out of every statistic and counted in final_losses.n_diverged.") in findings(analysis)


def test_adaptive_p_bw_runs_have_no_fw_tokens_or_flops():
    rows = [*run_rows("a0-s0", A, 0.0, 0, 4.0, 6.0), *run_rows("a5-s0", A, 0.05, 0, 4.1, 4.5, adaptive_p_bw=True)]
    analysis = analyse(pd.DataFrame(rows))
    adaptive = analysis.points[analysis.points.run_id == "a5-s0"]
    assert adaptive.fw_tokens.isna().all() and adaptive.flops.isna().all()
    final = analysis.ratios[(analysis.ratios.phase == "final") & (analysis.ratios.ratio == "ratio1")]
    assert set(final.loc[final.axis.isin(["fw_tokens", "flops"]), "n"]) == {0}
    assert set(final.loc[final.axis.isin(["epoch", "seconds"]), "n"]) == {1}
    assert one(skipped_rows(analysis), part="equal compute").reason.startswith(
        "adaptive p_bw: its training FLOPs are unknown")


def test_eval_tokens_and_dtype_are_part_of_the_setting():
    assert {"eval_tokens", "dtype"} <= set(CONFIG_COLUMNS) & set(CONTEXT)
    rows = [*run_rows("a0-s0", A, 0.0, 0, 4.0, 6.0), *run_rows("a5-s0", A, 0.05, 0, 4.1, 4.5, eval_tokens=8192)]
    skipped = analyse(pd.DataFrame(rows)).skipped
    assert "eval_tokens 8192 here, 4096 at p_bw = 0" in one(skipped, p_bw=0.05).reason


def test_a_seed_with_two_runs_counts_once():
    """Seed 0 has two p_bw = 0.05 runs of one setting: the first by run_id counts, in final and window rows."""
    rows = [row for s in (0, 1) for row in run_rows(f"a0-s{s}", A, 0.0, s, 4.0, 6.0)]
    rows += [*run_rows("a5-s0", A, 0.05, 0, 4.1, 4.5), *run_rows("a5-s0-again", A, 0.05, 0, 3.0, 4.5),
             *run_rows("a5-s1", A, 0.05, 1, 4.2, 4.5)]
    analysis = analyse(pd.DataFrame(rows), windows=[(0.0, "end")])
    ratios = analysis.ratios[(analysis.ratios.metric == "loss") & (analysis.ratios.axis == "epoch")]
    for phase in ("final", "window"):
        rows = ratios[(ratios.phase == phase) & (ratios.ratio == "ratio1")]
        assert set(zip(rows.n, rows.n_x, rows.n_base)) == {(2, 2, 2)}
    final = one(ratios, phase="final", ratio="ratio1", averaging="ratio_then_mean")
    assert final.value == pytest.approx(math.sqrt(4.0 / 4.1 * 4.0 / 4.2))


def test_the_paired_verdict_reads_the_percent_interval_near_its_boundary():
    """Raw differences 0.1, 0.2, 0.4 (their t interval holds 0) but log ratios 0.095, 0.095, 0.049
    (their interval excludes 0): both the paired statement and the answer's verdict say bw hurt."""
    rows = []
    for s, (base, x) in enumerate(((1.0, 1.1), (2.0, 2.2), (8.0, 8.4))):
        rows += [*run_rows(f"a0-s{s}", A, 0.0, s, base, 6.0), *run_rows(f"a5-s{s}", A, 0.05, s, x, 6.0)]
    analysis = analyse(pd.DataFrame(rows))
    paired = analysis.paired.iloc[0]
    assert paired.ci_low < 0 < paired.ci_high  # the raw-difference interval alone would say "within noise"
    logs = np.log([1.1, 1.1, 8.4 / 8.0])
    half = 4.302652729911275 * logs.std(ddof=1) / math.sqrt(3)  # t_{0.975, 2}
    assert paired.pct_ci_low == pytest.approx(100 * (math.exp(logs.mean() - half) - 1))
    assert paired.pct_ci_low > 0 and bool(paired.exceeds_noise)
    statement = next(s for s in findings(analysis) if s.startswith("At depth 2 / width 8"))
    assert "larger than seed noise" in statement
    assert percent_verdict(paired.pct_ci_low, paired.pct_ci_high) == "bw training raised fw loss"


def test_a_sample_failure_does_not_fail_a_trained_run(monkeypatch, tmp_path, capsys):
    class FakeTrainer:
        model, valid, device, parallel = None, None, "cpu", DataParallel()

        def __init__(self, config, run_dir, **options):
            self.run_dir = run_dir

        def run(self):
            pass

        def precision(self):
            return None

    def no_samples(run_dir, device):
        raise RuntimeError("tokenizer cannot decode")

    monkeypatch.setattr(sweep, "Trainer", FakeTrainer)
    monkeypatch.setattr(sweep, "write_cut", lambda *args: None)
    monkeypatch.setattr(sweep, "write_samples", no_samples)
    sweep.train_and_cut(None, tmp_path, progress=False)
    assert capsys.readouterr().out == f"{tmp_path.name}: no samples.json: tokenizer cannot decode\n"


def test_sample_blocks_use_the_next_seed_with_samples(tmp_path):
    rows = [row for s in (0, 1) for row in run_rows(f"a0-s{s}", A, 0.0, s, 4.0, 6.0)]
    runs = analyse(pd.DataFrame(rows)).runs
    sample = {"held_out_before": "a", "bw": "b", "prompt": "c", "fw": "d", "held_out_after": "e"}
    run_dir = tmp_path / RUNS / "a0-s1"
    run_dir.mkdir(parents=True)
    (run_dir / SAMPLES).write_text(json.dumps({"samples": [sample]}), encoding="utf-8")
    blocks = sample_blocks(runs, tmp_path)
    assert [b[1] for b in blocks] == ["depth 2 / width 8, p_bw = 0, add, causal mask, seed 1 (a0-s1)", "samples-a0-s1"]


def test_arrow_of_time_says_which_gaps_measure_a_leak():
    final = table([run(SMALL, 1.0, 0, 4.0, 4.1)], [run(SMALL, 1.0, 0, 4.0, 1.0, bw_mask="legacy-flip")])
    arrow = arrow_of_time(final)
    assert arrow[["bw_mask", "leaks_labels"]].values.tolist() == [["causal", False], ["legacy-flip", True]]


def test_a_flat_axis_is_never_interpolated():
    """An "either" run at p_bw = 1 never trains fw: fw_tokens stays 0, so no fw curve along it."""
    run_points = pd.DataFrame({"fw_tokens": [0.0, 0.0, 0.0], "loss_fw": [5.0, 4.5, 4.0], "ppl_fw": [1.0, 2.0, 3.0]})
    values = _fw_at(run_points, "fw_tokens", np.array([0.0]))
    assert np.isnan(values["loss_fw"]).all() and np.isnan(values["ppl_fw"]).all()
    rising = run_points.assign(fw_tokens=[0.0, 10.0, 20.0])
    assert _fw_at(rising, "fw_tokens", np.array([5.0]))["loss_fw"] == pytest.approx([4.75])


def test_a_bw_loss_never_measured_is_no_divergence():
    """eval_bw false (or a fw-only run by default) leaves loss_bw NaN at every point: that is no
    divergence; a NaN where the run evaluates bw, or a non-finite fw loss, is."""
    from fwbw.analysis.stats import diverged_runs

    runs = pd.DataFrame({"run_id": ["off", "fw-only", "both", "blown", "fw-blown"], "p_bw": [0.25, 0.0, 0.25, 0.25, 0.0],
                         "eval_bw": [False, None, None, True, None], "status": ["done"] * 5, "error": [None] * 5})
    nan = float("nan")
    points = pd.DataFrame({"run_id": ["off", "fw-only", "both", "blown", "fw-blown"],
                           "loss_fw": [3.0, 3.0, 3.0, 3.0, float("inf")], "loss_bw": [nan, nan, 3.5, nan, nan]})
    assert diverged_runs(points, runs) == {"blown", "fw-blown"}
