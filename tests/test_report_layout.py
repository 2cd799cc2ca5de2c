"""The report's layout: the answer first, as one table (a row per question and setting, its numbers those of
the analysis' tables, its verdict in words), one section per question in a fixed order, what was not analysed
in the skipped table instead of the text, samples shown escaped where runs have them; in headless Chromium at
1280 x 1100 px the answer table and its figure in the first screen."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pandas as pd
import pytest
from test_analysis import build_results

from fwbw.analysis import report
from fwbw.analysis.report import NO_BW_SAMPLE, write_report
from fwbw.analysis.sections.answer import DISPLAY_COLUMNS, answer_table, display
from fwbw.analysis.sections.equal_data import percent_verdict
from fwbw.analysis.sections.figure_blocks import place
from fwbw.analysis.sections.inputs import Inputs
from fwbw.analysis.sections.render import md
from fwbw.analysis.sections.skipped import skipped_table
from fwbw.analysis.sections.tables import ANSWER_COLUMNS, SKIPPED_COLUMNS, SKIPPED_TITLE
from fwbw.analysis.sweep_analysis import analyse

SECTIONS = ["The answer", "Equal data: fw loss at the same epochs",
            "Many epochs: best loss, overfitting and the train–val gap", "Equal compute: fw loss at the same training FLOPs",
            "Scaling with model size and the power of the seeds", "The bw mask and the leak probes", "Layer cut",
            "Arrow of time: fw against bw"]
TAIL = [SKIPPED_TITLE, "Setup", "Runs"]
STUDY = ["many epochs", "equal data", "equal compute", "model size", "bw leak"]  # the study's questions, in order
HOSTILE = "<b>a & b</b> | *x*"
NOTHING = ("empty window", "no validation points", "no paired comparison", "no leak-free setting", "nothing to compare",
           "None.", "None: every", "no comparison.", "No value at", "no slope (", "No bw run to audit",
           "No leak-probe result", "No setting trains both tasks equally")  # what the text used to say of nothing
SCREEN = (1280, 1100)
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)),
                None)


def inputs_of(table: pd.DataFrame) -> Inputs:
    return Inputs(analyse(table), pd.DataFrame(), {}, [])


def test_the_answer_is_one_row_per_question_and_setting():
    """test_analysis's table (test_report's sentences state the same numbers): size A's interval straddles 0
    (2 seeds could detect ±39.84%), size B's lies above 0 (fw loss rose), the either-mode arm's one seed has no
    interval (skipped), and one causal run's probe found a leak."""
    shown = display(answer_table(inputs_of(build_results())))
    assert list(shown.columns) == DISPLAY_COLUMNS == ["question", "comparison", "effect", "95% interval", "n", "verdict"]
    assert shown.values.tolist() == [
        ["equal data", "depth 2 / width 8, p_bw = 0.05 (add, causal mask): final fw loss", "+0.03%",
         "-26.63% … +36.38%", "2 seeds", "no resolvable effect (could detect ±39.8%)"],
        ["equal data", "depth 4 / width 16, p_bw = 0.05 (add, causal mask): final fw loss", "+6.17%",
         "+1.12% … +11.48%", "3 seeds", "bw training raised fw loss"],
        ["equal compute", "depth 2 / width 8, p_bw = 0.05 (add, causal mask): fw loss at equal FLOPs", "+1.19%",
         "-25.78% … +37.96%", "2 seed pairs", "no resolvable effect"],
        ["equal compute", "depth 4 / width 16, p_bw = 0.05 (add, causal mask): fw loss at equal FLOPs", "+7.86%",
         "+3.26% … +12.66%", "3 seed pairs", "bw training raised fw loss"],
        ["model size", "p_bw = 0.05 (add, causal mask): slope of ln ratio 1 (fw loss) on ln parameter count, 2 sizes",
         "-0.0309", "-0.0693 … +0.0076", "5 seed pairs", "no resolvable trend with size"],
        ["bw leak", "causal mask: bw/fw final loss ratio", "1.04", "", "6 runs",
         "suspect: leak probes found a leak in 1 of 5 runs"],
    ]


def test_what_has_no_answer_is_skipped_with_its_reason():
    skipped = skipped_table(inputs_of(build_results()))
    assert list(skipped.columns) == SKIPPED_COLUMNS
    said = [tuple(row) for row in skipped[["part", "bw_mode", "reason"]].fillna("").values]
    assert said[:3] == [
        ("many epochs", "", "no p_bw = 0 run overfits (its fw val loss never rose after its best beyond seed noise)"),
        ("equal data", "either", "one seed pair: no 95% interval"),
        ("equal data, epochs [5, end = 2]", "add", "empty window: no validation point"),
    ]
    assert ("arrow of time", "", "no setting trains both tasks equally (add at p_bw = 1, either at p_bw = 0.5)") in said


@pytest.mark.parametrize("low, high, detectable, verdict", [
    (-3.0, -1.0, float("nan"), "bw training lowered fw loss"), (1.0, 3.0, float("nan"), "bw training raised fw loss"),
    (-1.0, 3.0, 13.866, "no resolvable effect (could detect ±13.9%)"), (-1.0, 3.0, float("nan"), "no resolvable effect")])
def test_verdict_follows_the_interval(low, high, detectable, verdict):
    assert percent_verdict(low, high, detectable) == verdict


def test_a_leaking_mask_is_left_out_of_the_answer():
    table = build_results()
    table = table[table.run_id != "b5-s1"].assign(bw_mask="legacy-flip", leaks_labels=True)  # no probe leak left
    inputs = inputs_of(table)
    answer = answer_table(inputs)
    assert answer.question.tolist() == ["bw leak"]
    assert answer.verdict.tolist() == ["leaks by design: its runs are left out of the answers"]
    skipped = set(zip(*skipped_table(inputs)[["part", "reason"]].values.T))
    assert {(question, "every compared setting's bw mask leaks its labels") for question in STUDY[1:4]} <= skipped


def test_the_answers_figures_lead_and_every_figure_appears_once(tmp_path):
    paths = {kind: [tmp_path / f"{stem}.png" for stem in stems] for kind, stems in {
        "loss_curves": ["loss_fw", "loss_bw"], "compute_curves": ["loss_fw_flops"], "layer_cut": ["layer_cut"],
        "new_kind": ["extra"]}.items()}
    placed = {where: [p.stem for p, _ in figures] for where, figures in place(paths).items()}
    assert placed == {"answer": ["loss_fw", "loss_fw_flops"], "equal_data": ["loss_bw"], "layer_cut": ["layer_cut"],
                      "more": ["extra"]}


def write_samples_file(run_dir, bw):
    run_dir.mkdir(parents=True)
    sample = dict(prompt=HOSTILE, fw="after <i>", bw=bw, held_out_before="true before", held_out_after="true after")
    (run_dir / "samples.json").write_text(json.dumps({"samples": [sample] * 5}))


def sweep_of(folder, table):
    folder.mkdir()
    table.to_parquet(folder / "results.parquet")
    return folder


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "make_figures", lambda analysis, out_dir: {})  # the layout is what is checked
    return sweep_of(tmp_path / "sweep", build_results())


def headings(page):
    return re.findall(r"<h2>(.*?)</h2>", page)


def test_sections_in_order_and_no_samples_without_files(sweep, tmp_path):
    page = write_report(sweep, tmp_path / "out").read_text()
    assert headings(page) == SECTIONS + TAIL
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert re.findall(r"^## (.*)$", markdown, re.M) == [md(title) for title in SECTIONS + TAIL]
    assert "samples-" not in page
    assert "## Samples" not in markdown


class Outline(HTMLParser):
    """The page's headings and tables in order: ("h1" | "h2", text) and ("table", id, header cells)."""

    def __init__(self):
        super().__init__()
        self.items, self.open = [], None

    def handle_starttag(self, tag, attrs):
        if tag in ("h1", "h2"):
            self.items.append([tag, ""])
            self.open = tag
        elif tag == "table":
            self.items.append(["table", dict(attrs).get("id"), []])
        elif tag == "th" and self.items and self.items[-1][0] == "table":
            self.open = "th"
            self.items[-1][2].append("")

    def handle_endtag(self, tag):
        if tag == self.open:
            self.open = None

    def handle_data(self, data):
        if self.open in ("h1", "h2"):
            self.items[-1][1] += data
        elif self.open == "th":
            self.items[-1][2][-1] += data


def test_the_answer_table_is_the_first_thing_after_the_title(sweep, tmp_path):
    """The CI guard of the first screen: after the title, the answer heading, then the answer table (its header
    cells DISPLAY_COLUMNS) before any other heading or table."""
    outline = Outline()
    outline.feed(write_report(sweep, tmp_path / "out").read_text())
    assert outline.items[:3] == [["h1", "fwbw sweep report: sweep"], ["h2", "The answer"],
                                 ["table", "answer", DISPLAY_COLUMNS]]
    answer = pd.read_csv(tmp_path / "out" / "answer.csv")
    assert list(answer.columns) == ANSWER_COLUMNS and len(answer) == 6
    paired = pd.read_csv(tmp_path / "out" / "paired.csv").query("bw_mode == 'add'")
    assert answer.effect[:2].tolist() == pytest.approx(paired["pct_change"].tolist())


def test_nothing_here_goes_to_the_skipped_table_not_the_text(sweep, tmp_path):
    write_report(sweep, tmp_path / "out")
    markdown = (tmp_path / "out" / "report.md").read_text()
    text = markdown[:markdown.index(f"## {md(SKIPPED_TITLE)}")]
    assert [phrase for phrase in NOTHING if phrase in text] == []
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert list(skipped.columns) == SKIPPED_COLUMNS
    assert (skipped.part == "equal data, epochs [5, end = 2]").sum() == 3
    assert "Not analysed: 8 rows, each with its reason, under “Not analysed, and why” (skipped.csv)." in markdown


def test_a_sweep_without_bw_evaluations_skips_every_study_question_it_cannot_answer(tmp_path, monkeypatch):
    """eval_bw false: no bw validation rows. Every study question is answered or skipped with its reason, none
    is printed as a sentence that says nothing."""
    monkeypatch.setattr(report, "make_figures", lambda analysis, out_dir: {})
    table = build_results()
    fw_only = sweep_of(tmp_path / "sweep", table[(table.direction != "bw") | (table.phase != "train-eval")])
    write_report(fw_only, tmp_path / "out")
    answer, skipped = (pd.read_csv(tmp_path / "out" / f"{name}.csv") for name in ("answer", "skipped"))
    assert "bw leak" not in set(answer.question) and "bw leak" in set(skipped.part)
    assert set(STUDY) <= set(answer.question) | set(skipped.part)
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert [phrase for phrase in NOTHING if phrase in markdown[:markdown.index("## Not analysed")]] == []


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


PROBE = """<script>
const table = document.getElementById("answer"), figure = document.querySelector(".figures.answer img");
document.body.dataset.screen = innerWidth + "x" + innerHeight;
document.body.dataset.answerBottom = table.getBoundingClientRect().bottom + scrollY;
document.body.dataset.figureTop = figure.getBoundingClientRect().top + scrollY;
</script>"""


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium here: the HTML structure test guards the answer's place")
def test_the_answer_table_and_its_figure_fit_the_first_screen_in_chromium(tmp_path):
    """Rendered with its figures by headless Chromium at 1280 x 1100: the answer table ends and the answer's
    first figure starts within the first screen (a copy of the page with a probe script reports where)."""
    page = write_report(sweep_of(tmp_path / "sweep", build_results()), tmp_path / "out").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={SCREEN[0]},{SCREEN[1]}",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
    body = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', re.search(r"<body[^>]*>", dom).group(0)))
    width, height = map(int, body["screen"].split("x"))
    assert width == SCREEN[0] and height <= SCREEN[1]
    assert float(body["answer-bottom"]) <= height and float(body["figure-top"]) < height
