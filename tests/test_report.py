"""write_report on a hand-built sweep directory: every figure embedded, every table present,
failed runs listed, the legacy-flip leak called out."""

import base64
import inspect
import json
import math
import re

import pandas as pd
import pytest
from PIL import Image

from fwbw.analysis import figures, stats
from fwbw.analysis.figures import make_figures
from fwbw.analysis.report import write_report
from fwbw.analysis.stats import analyse

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RATIO_COLUMNS = ["metric", "ratio", "averaging", "data", "tokenizer", "seq_len", "epochs", "train_tokens", "recipe_id",
                 "depth", "width", "model_scale", "p_bw", "bw_mode", "bw_mask",
                 "task_tokens", "num_heads", "adaptive_p_bw", "phase", "axis", "epoch_start", "epoch_stop", "blocks_remaining",
                 "value", "n", "n_base", "n_x", "ci_low", "ci_high"]
SWITCHES = dict(model_scale=None, num_heads=1, adaptive_p_bw=False, probe_leak_fw=False, probe_train_leak_fw=False,
                epochs=1.0, train_tokens=None, eval_every_epochs=0.25, recipe_id="r0")
TABLE_IDS = ["setup", "final_losses", "paired", "ratios", "mask_summary", "mask_audit", "unfinished", "runs"]
FIGURES = ["layer_cut.png", "loss_bw.png", "loss_fw.png", "loss_fw_flops.png", "ratio1_scatter.png", "ratio1_violins.png"]
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
    for name in ("final_losses", "paired", "mask_audit", "runs", "ratio1_samples"):
        assert len(pd.read_csv(out / f"{name}.csv")), name
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
