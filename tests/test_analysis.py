"""Hand-built results table with known answers for every metric of fwbw.analysis."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fwbw.analysis.sections import layer_cut
from fwbw.analysis.stats import RATIO1_CURVE_COLUMNS, RATIO_COLUMNS, mean_ci, select
from fwbw.analysis.sweep_analysis import analyse

A, B = (2, 8), (4, 16)  # model sizes (depth, width)
PARAMS = {A: 986, B: 6804}  # count_params at a vocabulary of 10
EPOCHS = (0.5, 1.0, 2.0)
OFFSETS = (0.75, 0.5, 0.0)  # loss above the final loss at the 1st, 2nd and 3rd validation point
CUT_SLOPE = {0.0: 0.3, 0.05: 0.4}  # loss added per removed block
SWITCHES = dict(model_scale=math.nan, num_heads=1, adaptive_p_bw=False,  # the study's switches, at their defaults
                train_tokens=None, eval_tokens=4096, dtype="auto", eval_every_epochs=0.5, recipe_id="r0")  # budget in tokens, eval grid, recipe


def run_rows(run_id, size, p_bw, seed, fw, bw, *, bw_mode="add", bw_mask="causal", status="done",
             epochs=EPOCHS, budget=EPOCHS[-1], seq_len=64, steps=(10, 20, 40), probe=None, fw_probe=None, **switches):
    depth, width = size
    info = dict(run_id=run_id, data="wiki", tokenizer="gpt2", depth=depth, width=width,
                num_params=PARAMS[size], seq_len=seq_len, p_bw=p_bw, bw_mode=bw_mode, bw_mask=bw_mask,
                task_tokens=False, seed=seed, status=status, leaks_labels=bw_mask == "legacy-flip", epochs=budget,
                probe_leak_fw=fw_probe, probe_train_leak_fw=fw_probe, probe_leak_bw=probe, probe_train_leak_bw=probe,
                error=None, **{**SWITCHES, **switches})
    rows = []
    for step, epoch, offset in zip(steps, epochs, OFFSETS):
        for direction, final in (("fw", fw), ("bw", bw)):
            rows.append(dict(info, step=step, tokens=step * 100, epoch=epoch, seconds=step / 10,
                             direction=direction, loss=final + offset, acc=0.3, ppl=math.exp(final + offset),
                             phase="train-eval", blocks_remaining=depth))
    if status == "done":
        for k in range(depth - 1, 0, -1):
            for direction, final in (("fw", fw), ("bw", bw)):
                loss = final + CUT_SLOPE[p_bw] * (depth - k)
                rows.append(dict(info, step=steps[-1], tokens=steps[-1] * 100, epoch=epochs[-1],
                                 seconds=steps[-1] / 10 + 1, direction=direction, loss=loss, acc=0.3,
                                 ppl=math.exp(loss), phase="cut", blocks_remaining=k))
    return rows


def failed_row(run_id, size, p_bw, seed):
    depth, width = size
    return dict(run_id=run_id, data="wiki", tokenizer="gpt2", depth=depth, width=width,
                num_params=PARAMS[size], seq_len=64, p_bw=p_bw, bw_mode="add", bw_mask="causal",
                task_tokens=False, seed=seed, step=None, tokens=None, epoch=None, seconds=None,
                direction=None, loss=None, acc=None, ppl=None, phase=None, blocks_remaining=None,
                status="failed", leaks_labels=False, probe_leak_fw=None, probe_train_leak_fw=None, probe_leak_bw=None,
                probe_train_leak_bw=None, error="CUDA out of memory", epochs=EPOCHS[-1], **SWITCHES)


# final fw / bw losses per run: {(size, p_bw, seed): (fw, bw)}
A0 = {0: (4.0, 6.0), 1: (4.2, 6.3), 2: (4.4, 6.6)}
A5 = {0: (4.1, 4.5), 1: (4.1, 4.4)}  # seed 2 is still running
B0 = {0: (3.0, 5.0), 1: (3.3, 5.0), 2: (3.6, 5.0)}
B5 = {0: (3.25, 3.5), 1: (3.5, 3.6), 2: (3.75, 3.4)}
EITHER = (4.3, 4.6)  # size A, p_bw 0.05, bw_mode "either", seed 0 only: baseline shared with "add"


def build_results():
    rows = []
    for s, (fw, bw) in A0.items():
        rows += run_rows(f"a0-s{s}", A, 0.0, s, fw, bw)
    for s, (fw, bw) in A5.items():
        rows += run_rows(f"a5-s{s}", A, 0.05, s, fw, bw, probe=False)
    rows += run_rows("a5-s2", A, 0.05, 2, 100.0, 100.0, status="running", epochs=(0.5,), steps=(10,))
    rows += run_rows("a5e-s0", A, 0.05, 0, *EITHER, bw_mode="either")
    for s, (fw, bw) in B0.items():
        rows += run_rows(f"b0-s{s}", B, 0.0, s, fw, bw)
    for s, (fw, bw) in B5.items():  # seed 2 evaluates at other steps and epochs than its baseline
        shifted = dict(epochs=(0.51, 1.02, 2.03), steps=(11, 21, 41)) if s == 2 else {}
        rows += run_rows(f"b5-s{s}", B, 0.05, s, fw, bw, probe=s == 1, **shifted)
    rows.append(failed_row("b5-s3", B, 0.05, 3))
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def analysis():
    return analyse(build_results())


def by_epoch(table):
    """The rows of the "epoch" comparison axis (and those without an axis: ratio 2)."""
    return table[table.axis.isna() | (table.axis == "epoch")]


@pytest.fixture(scope="module")
def ratios(analysis):
    return by_epoch(analysis.ratios)


def pick(table, **where):
    return select(table, where)  # NaN selects the rows missing the value


def one(table, **where):
    rows = pick(table, **where)
    assert len(rows) == 1, rows
    return rows.iloc[0]


def mean(values):
    return sum(values) / len(values)


def gmean(values):
    """The geometric mean, ratio_then_mean's value (the centre of its log interval)."""
    return math.exp(mean([math.log(v) for v in values]))


def fw(runs):
    return [v[0] for v in runs.values()]


def test_ratios_table_columns(ratios):
    assert list(ratios.columns) == RATIO_COLUMNS
    final = pick(ratios, phase="final")
    assert final.blocks_remaining.isna().all() and final.epoch_start.isna().all()
    assert pick(ratios, phase="cut").epoch_start.isna().all()


@pytest.mark.parametrize("metric, f", [("loss", lambda v: v), ("ppl", math.exp)])
def test_ratio1_final(ratios, metric, f):
    r = pick(ratios, ratio="ratio1", phase="final", metric=metric)
    add_a = pick(r, depth=2, bw_mode="add")
    # defect 1: both averagings over the seeds in both arms (0, 1), not all three baseline seeds
    pooled = one(add_a, averaging="mean_then_ratio")
    assert pooled.value == pytest.approx(mean([f(A0[s][0]) for s in (0, 1)]) / mean([f(v) for v in fw(A5)]))
    assert (pooled.n, pooled.n_base, pooled.n_x) == (2, 3, 2)
    logs = [math.log(f(A0[s][0]) / f(A5[s][0])) for s in (0, 1)]
    half = stats.t.ppf(0.975, 1) * np.std(logs, ddof=1) / math.sqrt(2)
    assert (pooled.ci_low, pooled.ci_high) == pytest.approx((math.exp(mean(logs) - half), math.exp(mean(logs) + half)))
    assert one(add_a, averaging="ratio_then_mean").value == pytest.approx(
        gmean([f(A0[s][0]) / f(A5[s][0]) for s in (0, 1)]))  # seed 2 has no p_bw = 0.05 run
    assert one(add_a, averaging="ratio_then_mean").n == 2
    add_b = pick(r, depth=4)
    assert one(add_b, averaging="ratio_then_mean").value == pytest.approx(
        gmean([f(B0[s][0]) / f(B5[s][0]) for s in (0, 1, 2)]))
    assert one(add_b, averaging="ratio_then_mean").n == 3
    either = pick(r, depth=2, bw_mode="either")  # compared with the shared p_bw = 0 runs of size A
    assert one(either, averaging="mean_then_ratio").value == pytest.approx(f(A0[0][0]) / f(EITHER[0]))
    assert one(either, averaging="ratio_then_mean").value == pytest.approx(f(A0[0][0]) / f(EITHER[0]))
    assert one(either, averaging="ratio_then_mean").n == 1
    assert math.isnan(one(either, averaging="ratio_then_mean").ci_low)  # one seed pair: no interval
    assert (r.p_bw > 0).all()


def test_ratio2_final(ratios):
    r = pick(ratios, ratio="ratio2", phase="final", metric="loss")
    a0 = pick(r, depth=2, p_bw=0.0)
    assert one(a0, averaging="mean_then_ratio").value == pytest.approx(4.2 / 6.3)
    assert one(a0, averaging="ratio_then_mean").value == pytest.approx(gmean([4.0 / 6.0, 4.2 / 6.3, 4.4 / 6.6]))
    a5 = pick(r, depth=2, p_bw=0.05, bw_mode="add")  # the running seed 2 (loss 100) must not count
    assert one(a5, averaging="mean_then_ratio").value == pytest.approx(4.1 / 4.45)
    assert one(a5, averaging="ratio_then_mean").value == pytest.approx(gmean([4.1 / 4.5, 4.1 / 4.4]))
    assert set(a5.n) == {2}
    logs = np.log([4.1 / 4.5, 4.1 / 4.4])  # the interval of the per-run log ratio, exponentiated
    half = stats.t.ppf(0.975, 1) * np.std(logs, ddof=1) / math.sqrt(2)
    assert list(a5.ci_low) == pytest.approx([math.exp(logs.mean() - half)] * 2)
    assert list(a5.ci_high) == pytest.approx([math.exp(logs.mean() + half)] * 2)
    assert pick(a5, averaging="ratio_then_mean").n_base.isna().all()  # ratio 2 has no baseline arm
    ppl = one(ratios, ratio="ratio2", phase="final", metric="ppl", depth=4, p_bw=0.05, averaging="mean_then_ratio")
    assert ppl.value == pytest.approx(mean([math.exp(v[0]) for v in B5.values()])
                                      / mean([math.exp(v[1]) for v in B5.values()]))


def window_value(base, x, positions):
    """Ratio 1 (loss) in a window: each paired seed's mean over the given validation-point indices,
    then the geometric mean over seeds."""
    return gmean([mean([(base[s][0] + OFFSETS[i]) / (x[s][0] + OFFSETS[i]) for i in positions]) for s in x])


def test_ratio1_windows(ratios):
    w = pick(ratios, phase="window", metric="loss", bw_mode="add")
    assert set(w.averaging) == {"ratio_then_mean"}
    first_a = one(w, depth=2, epoch_start=0.0, epoch_stop=1.0)
    assert first_a.value == pytest.approx(window_value(A0, A5, (0, 1)))
    assert (first_a.n, first_a.n_x, first_a.n_base) == (2, 2, 3)  # seeds, each averaged over its points first
    # seed 2 of size B is at epochs 0.51 / 1.02 / 2.03, paired with the baseline's by nominal epoch
    first_b = one(w, depth=4, epoch_start=0.0, epoch_stop=1.0)
    assert first_b.value == pytest.approx(window_value(B0, B5, (0, 1)))
    assert first_b.n == 3
    all_b = one(w, depth=4, epoch_start=0.0, epoch_stop=2.0)  # "end" = last epoch of the sweep
    assert all_b.value == pytest.approx(window_value(B0, B5, (0, 1, 2)))
    assert all_b.n == 3
    ppl = one(ratios, phase="window", metric="ppl", depth=2, bw_mode="add", epoch_start=0.0, epoch_stop=2.0)
    assert ppl.value == pytest.approx(gmean([math.exp(A0[s][0] - A5[s][0]) for s in A5]))


def test_empty_window_is_reported(ratios):
    empty = pick(ratios, phase="window", epoch_start=5.0)
    assert len(empty) == 3 * 2  # three p_bw > 0 settings x (loss, ppl)
    assert (empty.n == 0).all() and empty.value.isna().all()
    assert (empty.epoch_stop == 2.0).all()


def test_custom_windows():
    table = by_epoch(analyse(build_results(), windows=[(1.5, "end")]).ratios)
    w = one(table, phase="window", metric="loss", depth=4)
    assert w.n == 3 and w.value == pytest.approx(window_value(B0, B5, (2,)))


def test_samples_pair_nearest_epoch(analysis):
    s = by_epoch(analysis.ratio1_samples)
    shifted = s[s.run_id == "b5-s2"].sort_values("epoch")
    assert list(shifted.epoch_base) == [0.5, 1.0, 2.0]
    assert set(shifted.run_id_base) == {"b0-s2"}
    assert len(s) == 2 * 3 + 3 * 3 + 3  # a5 (2 seeds), b5 (3 seeds), either (1 seed)


def test_ratio1_curves_mean_seeds_per_nominal_epoch(analysis):
    """Size A's add arm over epochs: seeds 0 and 1 paired at each nominal epoch, mean and t interval."""
    curve = pick(analysis.ratio1_curves, axis="epoch", depth=2, bw_mode="add", p_bw=0.05).sort_values("nominal_epoch")
    assert list(curve.nominal_epoch) == list(EPOCHS) and list(curve.axis_value) == list(EPOCHS)
    assert list(curve.n) == [2, 2, 2]
    for offset, row in zip(OFFSETS, curve.itertuples()):
        ratios = [(A0[s][0] + offset) / (A5[s][0] + offset) for s in (0, 1)]
        half = stats.t.ppf(0.975, 1) * np.std(ratios, ddof=1) / math.sqrt(2)
        assert (row.mean, row.ci_low, row.ci_high) == pytest.approx((mean(ratios), mean(ratios) - half, mean(ratios) + half))
    either = pick(analysis.ratio1_curves, axis="epoch", bw_mode="either")
    assert list(either.n) == [1, 1, 1] and either.ci_low.isna().all()
    assert set(analysis.ratio1_curves.axis) == set(analysis.ratio1_samples.axis)


def test_layer_cut(ratios):
    r1 = pick(ratios, phase="cut", ratio="ratio1", metric="ppl", depth=4)
    assert sorted(r1.blocks_remaining.unique()) == [1, 2, 3, 4]
    for k in (4, 1):
        c0, c5 = CUT_SLOPE[0.0] * (4 - k), CUT_SLOPE[0.05] * (4 - k)
        assert one(r1, blocks_remaining=k, averaging="mean_then_ratio").value == pytest.approx(
            mean([math.exp(v + c0) for v in fw(B0)]) / mean([math.exp(v + c5) for v in fw(B5)]))
        assert one(r1, blocks_remaining=k, averaging="ratio_then_mean").value == pytest.approx(
            gmean([math.exp(B0[s][0] + c0) / math.exp(B5[s][0] + c5) for s in B5]))
    r2 = pick(ratios, phase="cut", ratio="ratio2", metric="loss", depth=2, p_bw=0.0)
    assert one(r2, blocks_remaining=2, averaging="mean_then_ratio").value == pytest.approx(4.2 / 6.3)
    assert one(r2, blocks_remaining=1, averaging="mean_then_ratio").value == pytest.approx(4.5 / 6.6)
    assert one(r2, blocks_remaining=1, averaging="ratio_then_mean").value == pytest.approx(
        gmean([(fw_ + 0.3) / (bw_ + 0.3) for fw_, bw_ in A0.values()]))
    assert not len(pick(ratios, phase="cut", ratio="ratio1", metric="loss"))


def test_layer_cut_statements_tell_apart_settings_of_one_size_and_arm():
    """Two contexts (here two evaluation budgets) of the same sizes and arms: a statement for each, naming the
    context, where one per size and arm would mix their rows."""
    first = build_results()
    second = first.assign(run_id=first.run_id + "-more", eval_tokens=first.eval_tokens * 2,
                          loss=first.loss + np.where(first.phase.eq("cut"), 0.5, 0.0))
    said = layer_cut.statements(analyse(pd.concat([first, second], ignore_index=True)))
    alone = layer_cut.statements(analyse(first))
    assert len(said) == 2 * len(alone) > 0
    for budget in {int(v) for v in first.eval_tokens} | {2 * int(v) for v in first.eval_tokens}:
        assert sum(f"eval_tokens {budget}," in line for line in said) == len(alone)
    assert len(set(said)) == len(said)


def test_mean_ci_matches_scipy():
    values = [3.0, 3.3, 3.7, 3.1]
    mean_, lo, hi = mean_ci(values)
    expected = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert mean_ == pytest.approx(np.mean(values))
    assert (lo, hi) == pytest.approx(expected)
    one_seed = mean_ci([3.0])
    assert one_seed[0] == 3.0 and math.isnan(one_seed[1]) and math.isnan(one_seed[2])


def test_final_losses(analysis):
    table = analysis.final_losses
    b0 = one(table, depth=4, p_bw=0.0)
    half = stats.t.ppf(0.975, 2) * 0.3 / math.sqrt(3)  # fw losses 3.0, 3.3, 3.6: sd 0.3
    assert b0.n_seeds == 3 and b0.fw_loss_mean == pytest.approx(3.3)
    assert (b0.fw_loss_ci_low, b0.fw_loss_ci_high) == pytest.approx((3.3 - half, 3.3 + half))
    assert b0.bw_loss_ci_low == pytest.approx(5.0) and b0.bw_loss_ci_high == pytest.approx(5.0)
    either = one(table, bw_mode="either")
    assert either.n_seeds == 1 and either.fw_loss_mean == pytest.approx(4.3)
    assert math.isnan(either.fw_loss_ci_low) and math.isnan(either.fw_loss_ci_high)
    assert one(table, depth=2, p_bw=0.05, bw_mode="add").n_seeds == 2  # running seed left out


def test_paired_comparison(analysis):
    table = analysis.paired
    b = one(table, depth=4)
    half = stats.t.ppf(0.975, 2) * 0.05 / math.sqrt(3)  # differences 0.25, 0.2, 0.15
    assert b.n == 3 and b.mean_diff == pytest.approx(0.2)
    assert (b.ci_low, b.ci_high) == pytest.approx((0.2 - half, 0.2 + half))
    assert bool(b.exceeds_noise)
    a = one(table, depth=2, bw_mode="add")  # differences 0.1, -0.1: seed 2 only at p_bw = 0
    half = stats.t.ppf(0.975, 1) * math.sqrt(0.02) / math.sqrt(2)
    assert a.n == 2 and a.mean_diff == pytest.approx(0.0, abs=1e-12)
    assert (a.ci_low, a.ci_high) == pytest.approx((-half, half))
    assert not bool(a.exceeds_noise)
    assert a.unpaired_seeds_base == "2" and a.unpaired_seeds_x == ""
    either = one(table, bw_mode="either")
    assert either.n == 1 and math.isnan(either.ci_low) and pd.isna(either.exceeds_noise)


def test_failed_and_running_runs_listed_not_counted(analysis):
    runs = analysis.runs
    assert len(runs) == 3 + 3 + 1 + 3 + 3 + 1
    listed = analysis.unfinished
    assert set(listed.run_id) == {"b5-s3", "a5-s2"}
    assert one(listed, run_id="b5-s3").error == "CUDA out of memory"
    assert one(listed, run_id="b5-s3").status == "failed"
    final = analysis.final
    assert not {"b5-s3", "a5-s2"} & set(final.run_id)
    assert len(final) == 12


def test_final_point_is_last_validation_point(analysis):
    final = analysis.final
    assert one(final, run_id="b5-s2").epoch == 2.03
    assert one(final, run_id="b5-s2").nominal_epoch == 2.0
    assert one(final, run_id="b5-s2").loss_fw == 3.75


def test_mask_audit(analysis):
    audit = analysis.mask_audit
    row = one(audit, run_id="b5-s1")
    assert row.bw_fw_loss_ratio == pytest.approx(3.6 / 3.5)
    assert bool(row.probe_leak_bw) and not bool(row.leaks_labels)
    summary = analysis.mask_summary
    causal = one(summary, bw_mask="causal")
    assert causal.runs == 6 and causal.probed == 5 and causal.probe_leaks == 1
    assert causal.probe_leak_runs == "b5-s1"
    expected = mean([bw / fw_ for fw_, bw in [*A5.values(), EITHER, *B5.values()]])
    assert causal.bw_fw_loss_ratio == pytest.approx(expected)



@pytest.mark.parametrize("model_path, training_path", [(True, False), (False, True), (True, True)])
def test_mask_summary_counts_a_run_that_either_probe_caught(model_path, training_path):
    table = build_results()
    caught = table.run_id == "a5-s0"
    table.loc[caught, "probe_leak_bw"] = model_path
    table.loc[caught, "probe_train_leak_bw"] = training_path
    causal = one(analyse(table).mask_summary, bw_mask="causal")
    assert causal.probe_leaks == 2 and causal.probe_leak_runs.split() == ["a5-s0", "b5-s1"]

def test_no_done_runs():
    analysis = analyse(pd.DataFrame([failed_row("x", A, 0.05, 0)]))
    assert analysis.ratios.empty and list(analysis.ratios.columns) == RATIO_COLUMNS
    assert analysis.final_losses.empty and analysis.paired.empty and analysis.mask_audit.empty
    assert analysis.ratio1_curves.empty and list(analysis.ratio1_curves.columns) == RATIO1_CURVE_COLUMNS
    assert len(analysis.unfinished) == 1


# --- runs that differ only in a study switch are settings of their own ---------------------------

HEADS = dict(num_heads=2)
ADAPTIVE = dict(adaptive_p_bw=True)
SCALED = dict(model_scale=0.5)


def with_switches():
    """The table, plus size-A runs that differ from a p_bw = 0 / 0.05 run of seed 0 in one switch:
    two heads (with their own baseline), adaptive p_bw (sharing A's), hlb-gpt's model_scale (own baseline)."""
    rows = run_rows("a0h-s0", A, 0.0, 0, 3.0, 5.0, **HEADS) + run_rows("a5h-s0", A, 0.05, 0, 2.5, 4.0, **HEADS)
    rows += run_rows("a5ad-s0", A, 0.05, 0, 3.9, 4.2, probe=False, fw_probe=True, **ADAPTIVE)
    rows += run_rows("a0ms-s0", A, 0.0, 0, 4.8, 6.0, **SCALED) + run_rows("a5ms-s0", A, 0.05, 0, 4.0, 5.0, **SCALED)
    return pd.concat([build_results(), pd.DataFrame(rows)], ignore_index=True)


@pytest.fixture(scope="module")
def switched():
    return analyse(with_switches())


def final_ratio1(analysis, averaging="mean_then_ratio", **setting):
    return one(by_epoch(analysis.ratios), ratio="ratio1", phase="final", metric="loss", averaging=averaging, depth=2,
               **setting)


def test_a_study_switch_makes_a_setting_of_its_own(switched):
    assert len(switched.arms) == 3 + 3
    losses = switched.final_losses
    default = one(losses, depth=2, p_bw=0.05, bw_mode="add", num_heads=1, adaptive_p_bw=False, model_scale=math.nan)
    assert default.n_seeds == 2 and default.fw_loss_mean == pytest.approx(mean(fw(A5)))  # not pooled with the others
    assert one(losses, num_heads=2, p_bw=0.05).fw_loss_mean == 2.5
    assert one(losses, adaptive_p_bw=True).fw_loss_mean == 3.9
    assert one(losses, model_scale=0.5, p_bw=0.05).fw_loss_mean == 4.0
    # the baselines: two heads and model_scale their own p_bw = 0 runs, adaptive p_bw the size's shared ones
    assert final_ratio1(switched, num_heads=2).value == pytest.approx(3.0 / 2.5)
    assert final_ratio1(switched, model_scale=0.5).value == pytest.approx(4.8 / 4.0)
    assert final_ratio1(switched, adaptive_p_bw=True).value == pytest.approx(A0[0][0] / 3.9)  # seed 0 only
    assert final_ratio1(switched, bw_mode="add", num_heads=1, adaptive_p_bw=False, model_scale=math.nan).value == (
        pytest.approx(mean([A0[s][0] for s in A5]) / mean(fw(A5))))
    assert one(switched.paired, num_heads=2).n == 1


def test_the_mask_summary_counts_bw_probes_only(switched):
    causal = one(switched.mask_summary, bw_mask="causal")  # a5ad-s0's fw probes fired, its bw probes did not
    assert causal.probe_leaks == 1 and causal.probe_leak_runs == "b5-s1"
    assert bool(one(switched.mask_audit, run_id="a5ad-s0").probe_leak_fw)
