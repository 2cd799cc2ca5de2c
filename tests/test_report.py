"""write_report on a hand-built sweep directory: every figure embedded, every table present,
failed runs listed, the legacy-flip leak called out."""

import base64
import inspect
import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats as sps
from test_analysis import build_results

from fwbw.analysis import figures, stats
from fwbw.analysis.effects import (
    ARROW_COLUMNS,
    POWER_COLUMNS,
    SIZE_TEST_COLUMNS,
    TREND_COLUMNS,
    detectable_noncentrality,
)
from fwbw.analysis.figures import make_figures
from fwbw.analysis.report import findings, write_report
from fwbw.analysis.sections.inputs import Inputs
from fwbw.analysis.sections.skipped import skipped_table
from fwbw.analysis.sweep_analysis import analyse
from fwbw.training.config import LATER_FIELDS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RATIO_COLUMNS = ["metric", "ratio", "averaging", "data", "tokenizer", "seq_len", "epochs", "train_tokens", "eval_tokens", "dtype", "recipe_id",
                 *LATER_FIELDS, "depth", "width", "model_scale", "p_bw", "bw_mode", "bw_mask",
                 "task_tokens", "num_heads", "adaptive_p_bw", "phase", "axis", "epoch_start", "epoch_stop", "blocks_remaining",
                 "value", "n", "n_base", "n_x", "ci_low", "ci_high"]
SWITCHES = dict(model_scale=None, num_heads=1, adaptive_p_bw=False, probe_leak_fw=False, probe_train_leak_fw=False,
                epochs=1.0, train_tokens=None, eval_tokens=4096, dtype="auto", eval_every_epochs=0.25, recipe_id="r0")
TABLE_IDS = ["setup", "final_losses", "paired", "scaling", "size_tests", "power", "ratios", "mask_summary", "mask_audit",
             "unfinished", "runs"]
EFFECT_CSVS = {"scaling": TREND_COLUMNS, "size_tests": SIZE_TEST_COLUMNS, "power": POWER_COLUMNS,
               "arrow_of_time": ARROW_COLUMNS}
FIGURES = ["layer_cut.png", "loss_bw.png", "loss_fw.png", "loss_fw_flops.png", "ratio1_curves.png", "ratio1_scatter.png",
           "ratio1_violins.png", "ratio1_violins_depth.png", "ratio1_violins_width.png"]
SIZES = {(2, 16): 20_000, (3, 32): 60_000}


def run_rows(run_id, depth, width, p_bw, seed, fw, bw, bw_mask="causal", probe=None):
    info = dict(run_id=run_id, data="wiki", tokenizer="gpt2", depth=depth, width=width,
                num_params=SIZES[depth, width], seq_len=32, p_bw=p_bw, bw_mode="add", bw_mask=bw_mask,
                task_tokens=False, seed=seed, status="done", leaks_labels=bw_mask == "legacy-flip",
                probe_leak_bw=probe, probe_train_leak_bw=probe, error=None, **SWITCHES)
    points = [(step, step / 40, "train-eval", depth, 1.0 - step / 40) for step in (10, 20, 40)]
    points += [(40, 1.0, "cut", k, 0.2 * (depth - k)) for k in range(depth - 1, 0, -1)]
    return [
        dict(info, step=step, tokens=step * 512, epoch=epoch, seconds=step * 0.5, direction=direction,
             loss=loss + extra, acc=0.2, ppl=math.exp(loss + extra), phase=phase, blocks_remaining=k)
        for step, epoch, phase, k, extra in points
        for direction, loss in (("fw", fw), ("bw", bw))
    ]


def not_done_row(run_id, status, error):
    return dict(run_id=run_id, data="wiki", tokenizer="gpt2", depth=3, width=32, num_params=60_000, seq_len=32,
                p_bw=0.05, bw_mode="add", bw_mask="causal", task_tokens=False, seed=2, step=None, tokens=None,
                epoch=None, seconds=None, direction=None, loss=None, acc=None, ppl=None, phase=None,
                blocks_remaining=None, status=status, leaks_labels=False, probe_leak_bw=None, probe_train_leak_bw=None, error=error,
                **SWITCHES)


def results():
    rows = []
    for depth, width in SIZES:
        for seed in (0, 1):
            rows += run_rows(f"d{depth}-p0-s{seed}", depth, width, 0.0, seed, 5.0 - depth / 10 + seed / 20, 6.5)
            rows += run_rows(f"d{depth}-p5-s{seed}", depth, width, 0.05, seed, 5.02 - depth / 10 + seed / 30,
                             5.1 - depth / 10, probe=False)
    rows += run_rows("d3-flip-s0", 3, 32, 0.05, 0, 4.75, 1.2, bw_mask="legacy-flip", probe=True)
    rows.append(not_done_row("d3-p5-s2-failed", "failed", "RuntimeError: CUDA out of memory"))
    return pd.DataFrame(rows)


SWEEP = {"data": "wikitext-103", "tokenizer": "gpt2", "seq_len": 32, "epochs": 1, "depths": [2, 3],
         "widths": [16, 32], "p_bw": [0.0, 0.05], "seeds": [0, 1, 2], "device": "cpu"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("sweep")
    results().to_parquet(sweep_dir / "results.parquet")
    (sweep_dir / "sweep.json").write_text(json.dumps({"setup": SWEEP, "runs": {}}))
    out = tmp_path_factory.mktemp("report")
    path = write_report(sweep_dir, out)
    return out, path.read_text(encoding="utf-8")


def table_html(page, table_id):
    match = re.search(rf'<table[^>]*id="{table_id}".*?</table>', page, re.S)
    assert match, f"table {table_id} missing"
    return match.group(0)


def test_every_figure_is_a_real_embedded_png(report):
    out, page = report
    pngs = sorted((out / "figures").glob("*.png"))
    assert [p.name for p in pngs] == FIGURES
    assert page.count("data:image/png;base64,") == len(pngs)
    for png in pngs:
        data = png.read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        with Image.open(png) as image:
            assert image.width > 0 and image.height > 0
        assert base64.b64encode(data).decode() in page
        assert png.with_suffix(".svg").read_text().lstrip().startswith("<?xml")
    markdown = (out / "report.md").read_text()
    assert sum(f"](figures/{p.name})" in markdown for p in pngs) == len(pngs)


def test_html_is_self_contained_with_every_table(report):
    _, page = report
    for table_id in TABLE_IDS:
        table_html(page, table_id)
    assert "<style>" in page
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<link" not in page and "<script" not in page


def test_csv_outputs(report):
    out, _ = report
    ratios = pd.read_csv(out / "ratios.csv")
    assert list(ratios.columns) == RATIO_COLUMNS
    assert set(ratios.phase) == {"final", "window", "cut"}
    for name in ("final_losses", "paired", "mask_audit", "runs", "ratio1_samples", "ratio1_curves"):
        assert len(pd.read_csv(out / f"{name}.csv")), name
    assert list(pd.read_csv(out / "ratio1_curves.csv").columns) == stats.RATIO1_CURVE_COLUMNS
    for name, columns in EFFECT_CSVS.items():
        assert list(pd.read_csv(out / f"{name}.csv").columns) == columns, name
    assert len(pd.read_csv(out / "scaling.csv")) == 2  # causal and legacy-flip masks: one line over both sizes each
    assert not [p for p in out.rglob(".*")], "temporary files left behind"


def test_failed_runs_are_listed(report):
    out, page = report
    unfinished = table_html(page, "unfinished")
    assert "d3-p5-s2-failed" in unfinished and "CUDA out of memory" in unfinished
    assert "d3-p5-s2-failed" in table_html(page, "runs")
    runs = pd.read_csv(out / "runs.csv")
    assert runs.set_index("run_id").status["d3-p5-s2-failed"] == "failed"
    assert "d3-p5-s2-failed" in (out / "report.md").read_text()
    assert "d3-p5-s2-failed" not in pd.read_csv(out / "mask_audit.csv").run_id.values


def test_findings_and_mask_audit(report):
    out, page = report
    assert "the bw task leaks its labels" in page
    assert re.search(r"bw/fw final loss ratio 0\.25 for legacy-flip runs", page)
    assert "within seed noise" in page or "larger than seed noise" in page
    assert "1 of 10 runs did not finish" in page
    audit = pd.read_csv(out / "mask_audit.csv").set_index("run_id")
    assert bool(audit.leaks_labels["d3-flip-s0"]) and bool(audit.probe_leak_bw["d3-flip-s0"])
    assert audit.bw_fw_loss_ratio["d3-flip-s0"] == pytest.approx(1.2 / 4.75)
    setup = table_html(page, "setup")
    assert "wikitext-103" in setup and f"{9 * 40 * 512:,}" in setup  # 9 done runs x 40 steps x 512 tokens


def test_report_without_finished_runs(tmp_path):
    """results.csv only, no sweep.json, no done run: the report still renders and says so."""
    sweep_dir, out = tmp_path / "sweep", tmp_path / "out"
    sweep_dir.mkdir()
    pd.DataFrame([not_done_row("r-failed", "failed", "boom"), not_done_row("r-pending", "pending", None)]).to_csv(
        sweep_dir / "results.csv", index=False)
    page = write_report(sweep_dir, out).read_text()
    assert "No run has finished" in page
    assert "r-failed" in table_html(page, "unfinished") and "r-pending" in table_html(page, "unfinished")
    assert list(pd.read_csv(out / "ratios.csv").columns) == RATIO_COLUMNS
    assert (out / "report.md").exists()


def test_figures_draw_the_analysis_without_recomputing_it(monkeypatch, tmp_path):
    """make_figures draws the tables of the Analysis the report prints: with every function of
    fwbw.analysis.stats failing (but `select`, which only picks rows), it draws every figure."""
    analysis = analyse(results())

    def recomputed(*args, **kwargs):
        raise AssertionError("a figure recomputed the analysis")

    for module in (stats, figures):
        for name, value in list(vars(module).items()):
            if inspect.isfunction(value) and value.__module__ == stats.__name__ and name != "select":
                monkeypatch.setattr(module, name, recomputed)
    drawn = make_figures(analysis, tmp_path)
    assert sorted(p.name for paths in drawn.values() for p in paths) == FIGURES
    assert all(p.read_bytes().startswith(PNG_SIGNATURE) for p in tmp_path.glob("*.png"))


def test_long_tables_are_collapsed_short_ones_shown(report):
    out, page = report
    assert re.search(r'<details><summary>ratios: \d+ rows \(click to show; complete in ratios.csv where written\)'
                     r'</summary><div class="scroll"><table[^>]*id="ratios"', page)
    assert re.search(r'<div class="scroll"><table[^>]*id="paired"', page)
    assert not re.search(r'<summary>paired:', page)
    assert "<details><summary>ratios: " in (out / "report.md").read_text()


def effect_findings(table):
    return [s for s in findings(analyse(table)) if s.startswith(("At depth", "Scaling", "Paired t", "fw − bw"))]


def test_findings_state_the_effects_with_their_numbers():
    """test_analysis's table: size A pairs seeds 0, 1 (fw 4.1, 4.1 against 4.0, 4.2: differences +0.1, -0.1);
    size B seeds 0-2 (3.25, 3.5, 3.75 against 3.0, 3.3, 3.6: differences 0.25, 0.2, 0.15)."""
    said = effect_findings(build_results())
    # A: paired SD sqrt(0.02), n = 2: the detectable change is lambda(df 1) sqrt(0.02) / sqrt(2), of mean 4.1
    mde_a = detectable_noncentrality(1) * 0.1
    assert f"{mde_a:.3f} {100 * mde_a / 4.1:.2f}" == "1.633 39.84"
    assert said[0] == (
        "At depth 2 / width 8, p_bw = 0.05 (add, causal mask) changed final fw loss by +0.000 (95% CI -1.271 … +1.271, "
        "n = 2 seeds): within seed noise; these 2 seeds could only detect a change of ±1.633 (39.84%) with a paired "
        "t test at the 0.05 level and 80% power; as a percent change of fw loss: +0.03% (95% CI -26.63% … +36.38%).")
    # B: both arms rise by 0.3 per seed, so the same-seed correlation is exactly 1
    assert said[2].endswith("larger than seed noise; as a percent change of fw loss: +6.17% (95% CI +1.12% … +11.48%). "
                            "Same-seed runs' final fw losses correlate across the two arms with r = 1.00 "
                            "(n = 3 seed pairs): pairing removes that shared seed noise.")
    x = np.log([986, 986, 6804, 6804, 6804])
    y = np.log([4.0 / 4.1, 4.2 / 4.1, 3.0 / 3.25, 3.3 / 3.5, 3.6 / 3.75])
    slope, intercept = np.polyfit(x, y, 1)
    se = math.sqrt(np.sum((y - intercept - slope * x) ** 2) / 3 / np.sum((x - x.mean()) ** 2))
    half = sps.t.ppf(0.975, 3) * se
    assert [f"{v:+.4f}" for v in (slope, slope - half, slope + half)] == ["-0.0309", "-0.0693", "+0.0076"]
    assert f"{2 * sps.t.sf(abs(slope) / se, 3):.3f}" == "0.084"
    assert said[3:5] == [
        "Scaling of ratio 1 (fw loss) with model size, p_bw = 0.05 (add, causal mask): slope of ln ratio 1 on ln "
        "parameter count -0.0309 (95% CI -0.0693 … +0.0076, p = 0.084; n = 5 seed pairs over 2 model size(s)). "
        "Above 0: the bw task helps fw more at larger sizes.",
        # B: t = 0.2 / (0.05 / sqrt 3) = 4 sqrt 3 on 2 df, p = 1 - t / sqrt(2 + t^2) = 0.0202, Holm x 2 of 2
        "Paired t tests of final fw loss at p_bw = x against p_bw = 0, p_bw = 0.05 (add, causal mask), Holm-adjusted "
        "over 2 model sizes: depth 2 / width 8 p = 1.000 (Holm 1.000); depth 4 / width 16 p = 0.020 (Holm 0.040).",
    ]
    assert f"{1 - math.sqrt(48 / 50):.3f} {2 * (1 - math.sqrt(48 / 50)):.3f}" == "0.020 0.040"


def test_findings_state_the_arrow_of_time():
    """Two add-mode p_bw = 1 runs at depth 2 (fw - bw gaps -0.1, -0.2) beside this module's table: the
    gap's interval is -0.15 ± t_{0.975, 1} 0.1 / sqrt 2 / sqrt 2; their arm pairs at one size only."""
    rows = run_rows("d2-p100-s0", 2, 16, 1.0, 0, 4.9, 5.0) + run_rows("d2-p100-s1", 2, 16, 1.0, 1, 4.95, 5.15)
    said = effect_findings(pd.concat([results(), pd.DataFrame(rows)], ignore_index=True))
    half = sps.t.ppf(0.975, 1) * 0.05
    assert f"{-0.15 - half:+.3f} {-0.15 + half:+.3f}" == "-0.785 +0.485"
    assert said[-1] == ("fw − bw final loss gap at depth 2 / width 16, p_bw = 1, add, causal mask: -0.150 "
                        "(95% CI -0.785 … +0.485, n = 2 seeds). Below 0: fw is the easier direction.")
    flip = run_rows("d2-flip-p100-s0", 2, 16, 1.0, 0, 4.9, 1.0, bw_mask="legacy-flip")
    leaking = effect_findings(pd.concat([results(), pd.DataFrame(rows + flip)], ignore_index=True))
    assert leaking[-1] == ("fw − bw final loss gap at depth 2 / width 16, p_bw = 1, add, legacy-flip mask: +3.900 "
                           "(n = 1 seed: no interval). Below 0: fw is the easier direction. This mask leaks the bw "
                           "labels (mask audit): the gap measures the leak, not the arrow of time.")
    # the p_bw = 1 arm pairs at depth 2 only: no line through one size, skipped with its reason
    assert not [s for s in said if s.startswith("Scaling of ratio 1 (fw loss) with model size, p_bw = 1 ")]
    skipped = skipped_table(Inputs(analyse(pd.concat([results(), pd.DataFrame(rows)], ignore_index=True)),
                                   pd.DataFrame(), {}, []))
    assert skipped[(skipped.part == "model size") & (skipped.p_bw == 1)].reason.tolist() == [
        "seed pairs at fewer than 2 sizes: no trend"]
