"""The data-efficiency section of the report and scripts/publish_efficiency.py, on a hand-built sweep folder:
a runs.csv with the experiment's arms (no training) beside test_analysis's results table."""

import html
import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_analysis import build_results

from fwbw.analysis import data_efficiency as de
from fwbw.analysis import report
from fwbw.analysis.efficiency_report import FIGURES, TABLE_FILES, efficiency_analysis
from fwbw.analysis.report import EFFICIENCY_TITLE, efficiency_statements, write_report
from fwbw.analysis.sections.efficiency import _primary_verdict, matched_statement, multiplier_statement
from fwbw.analysis.sections.render import md
from fwbw.model.config import ModelConfig
from fwbw.model.hlb_gpt import count_params, training_flops_per_token

SHAPE = {"depth": 2, "width": 16, "seq_len": 32}
VOCAB = 64
UNIQUE = 1_000_000  # unique tokens of the whole training split
SEEDS = (100, 101, 102)
SEED_SHIFT = (0.0, 0.03, -0.02)  # each seed's offset, shared by its arms
NOISE = (0.05, -0.06, 0.02)  # an arm's own per-seed noise (scaled per arm in Q2)
PNG = b"\x89PNG\r\n\x1a\n"


def config() -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, depth=SHAPE["depth"], width=SHAPE["width"], max_seq_len=SHAPE["seq_len"])


def fw_curve(fraction: float) -> float:
    return 4.0 * fraction ** -0.1


def run(seed: int, loss: float, p_bw: float = 0.0, train_fraction: float = 0.25, epochs: float = 8.0, **values) -> dict:
    """A runs.csv row of a done run: the fw-only baseline with `values` changed."""
    setting = {**de.BASELINE, "p_bw": p_bw, "train_fraction": train_fraction, "epochs": epochs, **values}
    return {"run_id": f"r{p_bw:g}-{train_fraction:g}-{epochs:g}-{setting['replay']}-{seed}", "seed": seed,
            "status": "done", **setting, **SHAPE, "adaptive_p_bw": False, "num_params": count_params(config()),
            "tokens": 1000 * epochs, "unique_tokens": int(train_fraction * UNIQUE), "test_fw_loss": loss,
            "best_val_fw_loss": loss + 0.1, "censored": seed == SEEDS[0] and p_bw > 0}


def efficiency_runs(q2: bool = True) -> pd.DataFrame:
    """The primary arms (3 seeds), fw alone at 4 fractions, a second dose and, with q2, Q2's arms: fw+bw lies on
    the fw-only curve near 1.9 times its unique tokens."""
    rows = [run(s, fw_curve(f) + shift, train_fraction=f) for s, shift in zip(SEEDS, SEED_SHIFT)
            for f in (0.125, 0.25, 0.5, 1.0)]
    rows += [run(s, fw_curve(0.475) + shift + noise, p_bw=0.25) for s, shift, noise in zip(SEEDS, SEED_SHIFT, NOISE)]
    rows += [run(s, fw_curve(0.3) + shift, p_bw=0.5) for s, shift in zip(SEEDS, SEED_SHIFT)]
    if q2:
        for name, values in de.Q2_ARMS.items():
            offset, scale = {"fw+bw": (-0.05, 1.0), "fw+replay": (-0.02, -0.5), "fw": (0.0, 0.2)}[name]
            rows += [run(s, 3.9 + offset + shift + scale * noise, train_fraction=1.0, epochs=1.0, **values)
                     for s, shift, noise in zip(SEEDS, SEED_SHIFT, NOISE)]
    return pd.DataFrame(rows)


def write_sweep(folder: Path, runs: pd.DataFrame) -> Path:
    """A sweep folder: test_analysis's results table and `runs` as its runs.csv."""
    folder.mkdir()
    build_results().to_parquet(folder / "results.parquet")
    runs.to_csv(folder / "runs.csv", index=False)
    return folder


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "make_figures", lambda analysis, out_dir: {})  # the study's figures: not checked here
    return write_sweep(tmp_path / "sweep", efficiency_runs())


def headings(page: str) -> list[str]:
    return re.findall(r"<h2>(.*?)</h2>", page)


def tables_of(sweep: Path) -> dict[str, pd.DataFrame]:
    """analyse's tables, as the report computes them from the sweep's files."""
    return efficiency_analysis(pd.read_csv(sweep / "runs.csv"), build_results()).tables


def test_train_flops_count_bw_steps_and_replay():
    runs = de.runs_with_flops(pd.DataFrame([run(1, 4.0), run(1, 4.0, p_bw=0.25), run(1, 4.0, replay=True)]))
    fw_only = 8000 * training_flops_per_token(config(), SHAPE["seq_len"])
    assert runs.train_flops.to_numpy() == pytest.approx([fw_only, 1.25 * fw_only, 2 * fw_only])


def test_curves_come_from_the_fw_rows_of_both_splits():
    runs = pd.DataFrame([run(1, 4.0)])
    results = pd.DataFrame({"run_id": [runs.run_id[0]] * 4, "epoch": [0.5, 0.5, 0.5, 1.0],
                            "phase": ["train-eval", "train-split", "train-eval", "cut"],
                            "direction": ["fw", "fw", "bw", "fw"], "loss": [5.0, 4.5, 6.0, 9.0]})
    curves = de.curves_from_results(results, runs)
    assert list(curves.columns) == de.CURVE_COLUMNS
    assert list(zip(curves.split, curves.fw_loss)) == [("valid", 5.0), ("train", 4.5)]
    assert (curves.lr_scale == de.BASELINE["lr_scale"]).all() and (curves.seed == 1).all()


def test_section_comes_first_after_the_answer(sweep, tmp_path):
    page = write_report(sweep, tmp_path / "out").read_text()
    assert headings(page)[:3] == ["The answer", EFFICIENCY_TITLE, "Equal data: fw loss at the same epochs"]


def test_sentences_state_the_tables_numbers(sweep, tmp_path):
    tables = tables_of(sweep)
    primary, multiplier = tables["primary"].iloc[0], tables["multiplier"].iloc[0]
    slope = tables["dose"].iloc[0]
    said = efficiency_statements(tables)
    assert len(said) == 4
    assert (f"{primary.mean_diff:+.3f} nats (95% CI {primary.ci_low:+.3f} … {primary.ci_high:+.3f}, "
            f"p = {primary.p_value:.3f}, n = 3 seeds, MDE {primary.mde:.3f} nats, 1 censored run)") in said[0]
    assert 1.5 < multiplier.multiplier < 2.5
    assert (f"m = {multiplier.multiplier:.2f} times the unique tokens to reach the p_bw 0.25 arm's mean test fw "
            f"loss {multiplier.bw_mean:.3f} (95% bootstrap CI {multiplier.ci_low:.2f} … {multiplier.ci_high:.2f};"
            ) in said[1]
    for row in tables["q2"][tables["q2"].family == "q2"].itertuples():
        clause = f"{row.contrast} {row.mean_diff:+.3f} nats (95% CI {row.ci_low:+.3f} … {row.ci_high:+.3f}, Holm p"
        assert clause in said[2]
    assert f"slope over p_bw 0, 0.25, 0.5 of held-out test fw loss: {slope.mean_diff:+.3f} nats per unit p_bw" in said[3]
    page = write_report(sweep, tmp_path / "out").read_text()
    answer = page[page.index("<h2>The answer</h2>"):page.index(f"<h2>{EFFICIENCY_TITLE}</h2>")]
    assert (f"<td>{primary.mean_diff:+.3f} nats</td>\n      <td>{primary.ci_low:+.3f} … {primary.ci_high:+.3f}</td>\n"
            "      <td>3 seeds</td>\n      <td>bw training lowered held-out fw loss</td>") in answer
    rows = pd.read_csv(tmp_path / "out" / "answer.csv").query("question == 'data efficiency'")
    assert rows[["effect", "ci_low", "ci_high"]].values.ravel().tolist() == pytest.approx(
        [primary.mean_diff, primary.ci_low, primary.ci_high, multiplier.multiplier, multiplier.ci_low, multiplier.ci_high])
    assert rows.verdict.tolist() == ["bw training lowered held-out fw loss", "bw training acted like more unique data"]
    section = page[page.index(f"<h2>{EFFICIENCY_TITLE}</h2>"):]
    assert all(f"<li>{html.escape(s)}</li>" in section for s in said)


def test_csvs_are_the_analysis_tables_and_figures_are_pngs(sweep, tmp_path):
    out = tmp_path / "out"
    write_report(sweep, out)
    for name, table in tables_of(sweep).items():
        assert (out / f"{TABLE_FILES[name]}.csv").read_text() == table.to_csv(index=False), name
    for stem in FIGURES:
        assert (out / "figures" / f"{stem}.png").read_bytes().startswith(PNG)
    markdown = (out / "report.md").read_text()
    assert all(f"![{md(stem)}](figures/{stem}.png)" in markdown for stem in FIGURES)


def test_a_sweep_without_efficiency_arms_has_no_section(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "make_figures", lambda analysis, out_dir: {})
    plain = efficiency_runs().assign(train_fraction=1.0, replay=False, test_fw_loss=math.nan)
    page = write_report(write_sweep(tmp_path / "sweep", plain), tmp_path / "out").read_text()
    assert EFFICIENCY_TITLE not in headings(page) and "Data efficiency" not in page
    assert not list((tmp_path / "out").glob("efficiency_*"))


def test_skipped_parts_are_a_table_not_sentences(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "make_figures", lambda analysis, out_dir: {})
    sweep = write_sweep(tmp_path / "sweep", efficiency_runs(q2=False))
    page = write_report(sweep, tmp_path / "out").read_text()
    skipped = pd.read_csv(tmp_path / "out" / "efficiency_skipped.csv")
    assert {"q2", "matched"} <= set(skipped.part)  # no Q2 arm; the results table has no curve of these runs
    said = efficiency_statements(tables_of(sweep))
    assert len(said) == 3 and not any("Q2" in s or "no done run" in s for s in said)
    section = page[page.index(f"<h2>{EFFICIENCY_TITLE}</h2>"):page.index("<h2>Equal data")]
    assert 'id="efficiency_skipped"' in section
    assert all(section.count(html.escape(reason)) == 1 for reason in skipped.reason)  # once: in the table


def test_multiplier_outside_the_curve_states_its_bound():
    runs = efficiency_runs(q2=False)
    far = runs.assign(test_fw_loss=np.where(runs.p_bw == 0.25, 3.0, runs.test_fw_loss))
    said = multiplier_statement(de.effective_data_multiplier(de.runs_with_flops(far), n_boot=50))
    assert "below the fw-only curve at its largest share, so m > 4.00 (95% bootstrap CI ∞ … ∞; 0% of draws past " \
           "the curve's low end, 100% past its high end;" in said


@pytest.mark.parametrize("low, high, verdict", [
    (-0.3, -0.1, "bw training lowered held-out fw loss"), (0.1, 0.3, "bw training raised held-out fw loss"),
    (-0.02, 0.03, "no effect of ±0.050 nats or more"), (-0.02, 0.08, "inconclusive")])
def test_primary_verdict_follows_the_plan(low, high, verdict):
    assert _primary_verdict({"ci_low": low, "ci_high": high, "mde": 0.05}) == verdict


def load_publish():
    path = Path(__file__).resolve().parents[1] / "scripts" / "publish_efficiency.py"
    spec = importlib.util.spec_from_file_location("publish_efficiency", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_publish_writes_the_reports_files_and_a_summary(tmp_path):
    sweep = write_sweep(tmp_path / "sweep", efficiency_runs())
    out = tmp_path / "published"
    summary = load_publish().publish(sweep, out).read_text()
    for name, table in tables_of(sweep).items():
        assert (out / f"{TABLE_FILES[name]}.csv").read_text() == table.to_csv(index=False), name
    assert (out / "runs.csv").read_bytes() == (sweep / "runs.csv").read_bytes()
    assert all((out / f"{stem}.png").read_bytes().startswith(PNG) for stem in FIGURES)
    said = efficiency_statements(tables_of(sweep))
    assert all(md(s) in summary for s in said)
    assert all(f"![{md(stem)}]({stem}.png)" in summary for stem in FIGURES)


def test_publish_refuses_a_sweep_without_efficiency_arms(tmp_path):
    plain = efficiency_runs().assign(train_fraction=1.0, replay=False, test_fw_loss=math.nan)
    with pytest.raises(ValueError, match="no data-efficiency runs"):
        load_publish().publish(write_sweep(tmp_path / "sweep", plain), tmp_path / "published")


def test_the_regulariser_sentence_gives_each_grid_values_difference_with_its_holm_p():
    matched = pd.DataFrame([
        {"train_split_fw_loss": 3.8, "n": 6, "mean_diff": 0.047, "ci_low": 0.032, "ci_high": 0.062, "p_value": 0.0005,
         "p_holm": 0.0025},
        {"train_split_fw_loss": 4.3, "n": 6, "mean_diff": -0.001, "ci_low": -0.025, "ci_high": 0.022, "p_value": 0.887,
         "p_holm": 0.887},
    ])
    assert matched_statement(matched) == (
        "Regulariser test, validation fw loss of fw+bw minus fw at the same training-split fw loss (Holm over 2; "
        "below 0 would mean bw regularises): at 3.800 +0.047 nats (95% CI +0.032 … +0.062, Holm p = 0.003, "
        "n = 6 seeds); at 4.300 -0.001 nats (95% CI -0.025 … +0.022, Holm p = 0.887, n = 6 seeds).")
