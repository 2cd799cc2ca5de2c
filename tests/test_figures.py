"""The data each figure draws, read back from its matplotlib Axes, against numbers computed by hand
from tests/test_analysis.py's results table."""

import math

import numpy as np
import pytest
from scipy import stats
from test_analysis import A0, A5, B0, B5, CUT_SLOPE, EITHER, OFFSETS, build_results

from fwbw.analysis import figures
from fwbw.analysis.sweep_analysis import analyse

T2 = stats.t.ppf(0.975, 1)  # two seeds
T3 = stats.t.ppf(0.975, 2)  # three seeds
EPOCHS = [0.5, 1.0, 2.0]  # nominal


def accuracy(loss):
    return 1.0 - loss / 10.0


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """Every figure, by file name, as drawn (the Figure handed to _save)."""
    results = build_results()
    results["acc"] = accuracy(results.loss)  # an accuracy that differs per point
    saved = {}

    def keep(fig, out_dir, name):
        saved[name] = fig
        return out_dir / f"{name}.png"

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(figures, "_save", keep)
        figures.make_figures(analyse(results), tmp_path_factory.mktemp("figures"))
    return saved


def curves(ax):
    """(label, x, y, {x: (band low, band high)}) of each line with point markers; each such line is
    drawn with its band, in the same order."""
    lines = [line for line in ax.get_lines() if line.get_marker() == "o"]
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()), band_limits(band))
            for line, band in zip(lines, ax.collections)}


def band_limits(collection):
    """The band's lowest and highest y at each x of its outline."""
    limits = {}
    for path in collection.get_paths():
        for x, y in path.vertices:
            low, high = limits.get(round(x, 9), (math.inf, -math.inf))
            limits[round(x, 9)] = (min(low, y), max(high, y))
    return limits


def t_band(values, t):
    values = np.asarray(values, dtype=float)
    half = t * values.std(ddof=1) / math.sqrt(len(values))
    return values.mean(), values.mean() - half, values.mean() + half


def log_band(ratios, t):
    mean, low, high = t_band(np.log(ratios), t)
    return math.exp(low), math.exp(high)


def ratio1(base, x, offset, seeds):
    return [(base[s][0] + offset) / (x[s][0] + offset) for s in seeds]


def test_ratio1_curves_over_epochs_and_fw_tokens(drawn):
    epoch_a, epoch_b, tokens_a, tokens_b = drawn["ratio1_curves"].axes
    x, y, band = curves(epoch_a)["p_bw = 0.05, add, causal mask (2 seeds)"]
    assert x == EPOCHS
    for epoch, offset, mean in zip(x, OFFSETS, y):
        expected, low, high = t_band(ratio1(A0, A5, offset, (0, 1)), T2)
        assert mean == pytest.approx(expected)
        assert band[epoch] == pytest.approx((low, high))
    either = curves(epoch_a)["p_bw = 0.05, either, causal mask (1 seeds)"]
    assert either[1] == pytest.approx([ratio1(A0, {0: EITHER}, offset, (0,))[0] for offset in OFFSETS])
    assert not either[2]  # one seed: no interval
    assert set(curves(epoch_b)) == {"p_bw = 0.05, add, causal mask (3 seeds)"}  # no either arm at size B
    # fw tokens: seed 2 of size B evaluated 100 tokens later, and its last point lies past its baseline's
    x, y, band = curves(tokens_b)["p_bw = 0.05, add, causal mask (3 seeds)"]
    assert x == pytest.approx([3100 / 3, 6100 / 3, 4000])
    first = [(B0[s][0] + 0.75) / (B5[s][0] + 0.75) for s in (0, 1)]
    seed2 = np.interp(1100, [1000, 2000], [B0[2][0] + 0.75, B0[2][0] + 0.5]) / (B5[2][0] + 0.75)
    expected, low, high = t_band([*first, seed2], T3)
    assert y[0] == pytest.approx(expected) and band[round(x[0], 9)] == pytest.approx((low, high))
    assert y[2] == pytest.approx(np.mean(ratio1(B0, B5, 0.0, (0, 1))))
    assert curves(tokens_a)["p_bw = 0.05, either, causal mask (1 seeds)"][0] == [1900.0, 3800.0]


def violin_values(base, x, seeds, offsets):
    return [v for offset in offsets for v in ratio1(base, x, offset, seeds)]


@pytest.mark.parametrize("name, window, ticks", [
    ("ratio1_violins_depth", 0, ["depth 2\nn = 4", "depth 4\nn = 6"]),
    ("ratio1_violins_width", 1, ["width 8\nn = 6", "width 16\nn = 9"]),
])
def test_violins_by_depth_and_width_mark_medians(drawn, name, window, ticks):
    ax = drawn[name].axes[window]  # first row: the add arm; columns: windows [0, 1], [0, end], [5, end]
    assert [t.get_text() for t in ax.get_xticklabels()] == ticks
    offsets = OFFSETS[:2] if window == 0 else OFFSETS
    expected = [np.median(violin_values(A0, A5, (0, 1), offsets)), np.median(violin_values(B0, B5, (0, 1, 2), offsets))]
    medians = [line for line in ax.get_lines() if line.get_gid() == "median"]
    assert [m.get_xdata()[0] for m in medians] == [0, 1]
    assert [m.get_ydata()[0] for m in medians] == pytest.approx(expected)
    assert drawn[name].axes[2].texts[0].get_text().startswith("empty window")


def test_layer_cut_over_fraction_of_depth(drawn):
    ratio1_ax, ratio2_ax = drawn["layer_cut"].axes[:2]  # the add arm
    lines = curves(ratio1_ax)
    x, y, band = lines["depth 2 / width 8 (0.986k)"]
    assert x == [0.5, 1.0]  # 1 of 2 blocks remaining, then the full model
    at_cut = [math.exp(A0[s][0] + CUT_SLOPE[0.0] - A5[s][0] - CUT_SLOPE[0.05]) for s in (0, 1)]
    at_end = [math.exp(A0[s][0] - A5[s][0]) for s in (0, 1)]
    assert y == pytest.approx([math.exp(np.log(at_cut).mean()), math.exp(np.log(at_end).mean())])  # geometric means
    assert band[0.5] == pytest.approx(log_band(at_cut, T2)) and band[1.0] == pytest.approx(log_band(at_end, T2))
    assert lines["depth 4 / width 16 (6.8k)"][0] == [0.25, 0.5, 0.75, 1.0]
    # ratio 2: the arm's curve and the p_bw = 0 reference (dashed, no label), the seeds' mean fw / bw loss
    own, reference = [line for line in ratio2_ax.get_lines() if line.get_marker() == "o"][:2]
    assert own.get_linestyle() == "-" and reference.get_linestyle() == "--"
    assert list(reference.get_xdata()) == [0.5, 1.0]
    base = [[(fw + CUT_SLOPE[0.0] * k) / (bw + CUT_SLOPE[0.0] * k) for fw, bw in A0.values()] for k in (1, 0)]
    assert list(reference.get_ydata()) == pytest.approx([math.exp(np.log(r).mean()) for r in base])


@pytest.mark.parametrize("name, along", [("loss_fw", EPOCHS), ("loss_bw", EPOCHS)])
def test_loss_curves_show_accuracy_next_to_loss(drawn, name, along):
    """Row (add, depth 2), width 8: a loss panel then an accuracy panel, from the first point on, at
    nominal epochs; the baseline's line is the mean over its three seeds."""
    direction = name.split("_")[1]
    loss_ax, acc_ax = drawn[name].axes[:2]
    assert loss_ax.get_ylabel() == f"{direction} val loss" and acc_ax.get_ylabel() == f"{direction} val accuracy"
    column = 0 if direction == "fw" else 1
    finals = np.mean([v[column] for v in A0.values()])
    loss = [finals + offset for offset in OFFSETS]
    for ax, expected in ((loss_ax, loss), (acc_ax, [accuracy(v) for v in loss])):
        line = next(line for line in ax.get_lines() if line.get_label() == "p_bw = 0 (3 runs)")
        assert list(line.get_xdata()) == along
        assert list(line.get_ydata()) == pytest.approx(expected)
    # size B's p_bw = x seed 2 evaluates at raw epochs 0.51, 1.02, 2.03: still on the nominal grid
    b_loss = drawn[name].axes[4 * 1 + 2]  # row (add, depth 4), width 16, loss
    line = next(line for line in b_loss.get_lines() if line.get_label() == "p_bw = 0.05 (3 runs)")
    assert list(line.get_xdata()) == along
