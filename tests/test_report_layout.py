"""The report's layout: the answer first (exact sentences from the analysis' tables), one section
per question, samples shown escaped where runs have them and absent where they have none."""

import json
import re

import pytest
from test_analysis import build_results

from fwbw.analysis import report
from fwbw.analysis.report import NO_BW_SAMPLE, headline, write_report
from fwbw.analysis.sweep_analysis import analyse

SECTIONS = ["The answer", "Equal data: fw loss at the same epochs",
            "Many epochs: best loss, overfitting and the train–val gap", "Equal compute: fw loss at the same training FLOPs",
            "Scaling with model size and the power of the seeds", "The bw mask and the leak probes", "Layer cut",
            "Arrow of time: fw against bw"]
TAIL = ["Setup", "Runs"]
HOSTILE = "<b>a & b</b> | *x*"


def test_headline_answers_each_question_with_its_interval_and_verdict():
    """test_analysis's table (see test_report's effect sentences for the same numbers): size A's interval
    straddles 0 (2 seeds could detect ±39.84%), size B's lies above 0 (fw loss rose: hurts), the
    either-mode arm has one seed, and one causal run's probe found a leak."""
    assert headline(analyse(build_results())) == [
        "Equal data (same epochs), change of final fw loss with bw training: p_bw = 0.05 (add, causal mask), depth 2 "
        "/ width 8: +0.03% (95% CI -26.63% … +36.38%), no resolvable effect at n = 2 seeds, the seeds could detect "
        "±39.84%; p_bw = 0.05 (either, causal mask), depth 2 / width 8: +7.50%, no interval at n = 1 seed; p_bw = 0.05 "
        "(add, causal mask), depth 4 / width 16: +6.17% (95% CI +1.12% … +11.48%), bw training hurts (n = 3 seeds).",
        "Equal compute (same training FLOPs), change of fw loss with bw training: p_bw = 0.05 (add, causal mask), "
        "depth 2 / width 8: +1.19% (95% CI -25.78% … +37.96%), no resolvable effect at n = 2 seeds; p_bw = 0.05 "
        "(either, causal mask), depth 2 / width 8: +7.50%, no interval at n = 1 seed; p_bw = 0.05 (add, causal mask), "
        "depth 4 / width 16: +7.86% (95% CI +3.26% … +12.66%), bw training hurts (n = 3 seeds).",
        "Scaling with model size, slope of ln ratio 1 (fw loss) on ln parameter count: p_bw = 0.05 (add, causal "
        "mask): -0.0309 (95% CI -0.0693 … +0.0076, 5 seed pairs over 2 sizes): no resolvable trend with size; "
        "p_bw = 0.05 (either, causal mask): seed pairs at fewer than 2 sizes: no trend.",
        "Is the bw task leak-free? The causal mask is suspect (bw/fw final loss ratio 1.04 over 6 runs, leak probes "
        "found a leak in 1 of 5 runs): its answers above may measure a leak.",
        "2 of 14 runs did not finish (running: 1, failed: 1); they are listed below and left out of every statistic.",
    ]


def test_verdict_follows_the_interval():
    assert report._verdict(-3.0, -1.0, 3) == "bw training helps (n = 3 seeds)"
    assert report._verdict(1.0, 3.0, 3) == "bw training hurts (n = 3 seeds)"
    assert report._verdict(-1.0, 3.0, 2, 13.866) == "no resolvable effect at n = 2 seeds, the seeds could detect ±13.87%"
    assert report._verdict(float("nan"), float("nan"), 1) == "no interval at n = 1 seed"


def test_headline_leaves_a_leaking_mask_out():
    table = build_results()
    table = table[table.run_id != "b5-s1"].assign(bw_mask="legacy-flip", leaks_labels=True)  # no probe leak left
    said = headline(analyse(table))
    assert said[:3] == [
        "Equal data (same epochs), change of final fw loss with bw training: no leak-free setting has a paired comparison.",
        "Equal compute (same training FLOPs), change of fw loss with bw training: no leak-free setting has a paired "
        "comparison.",
        "Scaling with model size, slope of ln ratio 1 (fw loss) on ln parameter count: no leak-free setting.",
    ]
    assert said[3].startswith("Is the bw task leak-free? The legacy-flip mask leaks by design (")
    assert said[3].endswith("); its runs are left out of the answers above.")


def test_headline_figures_lead_and_every_figure_appears_once(tmp_path):
    paths = {kind: [tmp_path / f"{stem}.png" for stem in stems] for kind, stems in {
        "loss_curves": ["loss_fw", "loss_bw"], "compute_curves": ["loss_fw_flops"], "layer_cut": ["layer_cut"],
        "new_kind": ["extra"]}.items()}
    placed = {where: [p.stem for p, _ in blocks[0][1]] for where, blocks in report._figure_blocks(paths).items()}
    assert placed == {"answer": ["loss_fw", "loss_fw_flops"], "equal_data": ["loss_bw"], "layer_cut": ["layer_cut"],
                      "more": ["extra"]}


def write_samples_file(run_dir, bw):
    run_dir.mkdir(parents=True)
    sample = dict(prompt=HOSTILE, fw="after <i>", bw=bw, held_out_before="true before", held_out_after="true after")
    (run_dir / "samples.json").write_text(json.dumps({"samples": [sample] * 5}))


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "make_figures", lambda analysis, out_dir: {})  # the layout is what is checked
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    build_results().to_parquet(sweep_dir / "results.parquet")
    return sweep_dir


def headings(page):
    return re.findall(r"<h2>(.*?)</h2>", page)


def test_sections_in_order_and_no_samples_without_files(sweep, tmp_path):
    page = write_report(sweep, tmp_path / "out").read_text()
    assert headings(page) == SECTIONS + TAIL
    assert "samples-" not in page
    assert "## Samples" not in (tmp_path / "out" / "report.md").read_text()


def test_samples_of_the_first_seed_per_setting_escaped(sweep, tmp_path):
    write_samples_file(sweep / "runs" / "a0-s0", "before &")
    write_samples_file(sweep / "runs" / "a0-s1", "second seed")  # not the first seed of its setting
    write_samples_file(sweep / "runs" / "a5-s0", None)  # bw None, as a leaking mask's samples have
    page = write_report(sweep, tmp_path / "out").read_text()
    assert headings(page) == [*SECTIONS, "Samples", *TAIL]
    assert re.findall(r'id="(samples-[^"]+)"', page) == ["samples-a0-s0", "samples-a5-s0"]
    assert "<h3>depth 2 / width 8, p_bw = 0, add, causal mask, seed 0 (a0-s0)</h3>" in page
    shown = page[page.index('id="samples-a0-s0"'):]
    assert shown.count("&lt;b&gt;a &amp; b&lt;/b&gt; | *x*") == 3 + 3  # 3 prompts shown per run, two runs
    assert "<b>a" not in page and "after <i>" not in page and "second seed" not in page
    assert "before &amp;" in page and NO_BW_SAMPLE in page
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| true before | before & | \\<b\\>a & b\\</b\\> \\| \\*x\\* | after \\<i\\> | true after |" in markdown
    assert "### depth 2 / width 8, p\\_bw = 0, add, causal mask, seed 0 (a0-s0)" in markdown

