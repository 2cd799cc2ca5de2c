"""The tidy results table of a finished sweep and `fwbw results`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import assert_no_duplicate_rows, read_json, read_metrics

from fwbw import cli
from fwbw.model.hlb_gpt import count_params
from fwbw.study import sweep_dir
from fwbw.study.results import COLUMNS, build_results
from fwbw.study.sweep import SweepSpec, run_id, write_sweep_file
from fwbw.training.config import TrainConfig
from fwbw.training.probes import PROBE_KEYS

pytestmark = pytest.mark.usefixtures("cache_env", "one_thread")


REQUIRED_COLUMNS = ["run_id", "depth", "width", "model_scale", "num_heads", "num_params", "p_bw", "adaptive_p_bw",
                    "bw_mode", "bw_mask", "task_tokens", "seed", "step", "tokens", "epoch", "direction", "loss", "acc",
                    "ppl", "phase", "blocks_remaining", "status", "leaks_labels", *PROBE_KEYS]
SETTINGS = ("depth", "width", "num_heads", "p_bw", "adaptive_p_bw", "bw_mode", "bw_mask", "task_tokens", "seed")


def test_results_table_is_tidy_and_complete(finished):
    table = pd.read_parquet(finished.out / sweep_dir.RESULTS_PARQUET)
    assert list(table.columns) == COLUMNS
    assert set(REQUIRED_COLUMNS) <= set(table.columns)
    assert PROBE_KEYS == ("probe_leak_fw", "probe_train_leak_fw", "probe_leak_bw", "probe_train_leak_bw")
    for column in table.columns:  # scalars only: no lists, dicts or arrays in any cell
        assert not any(isinstance(value, (list, tuple, dict, set, np.ndarray)) for value in table[column]), column
    assert set(table["phase"]) == {"train-eval", "cut"}
    assert set(table["direction"]) == {"fw", "bw"}
    assert set(table["status"]) == {"done"}
    assert_no_duplicate_rows(table)

    configs = {run_id(config): config for config in finished.spec.configs()}
    assert set(table["run_id"]) == set(configs)
    for name, config in configs.items():
        run = finished.out / sweep_dir.RUNS / name
        rows = table[table["run_id"] == name]
        for column in SETTINGS:
            assert set(rows[column]) == {getattr(config, column)}, column
        assert config.model_scale is None and rows["model_scale"].isna().all()
        model_config = config.model_config(300)
        summary = read_json(run / "summary.json")
        assert set(rows["num_params"]) == {count_params(model_config)} == {summary["num_params"]}
        for probe in PROBE_KEYS:  # the probes of both tasks, as the run saved them
            assert set(rows[probe]) == {summary[probe]} and summary[probe] is False, probe

        evals = rows[rows["phase"] == "train-eval"]
        metrics = read_metrics(run)
        evaluated = ("fw", "bw") if config.p_bw > 0 else ("fw",)  # bw is evaluated only where it is trained
        assert len(evals) == len(evaluated) * len(metrics)
        assert set(evals["direction"]) == set(evaluated)
        assert set(evals["blocks_remaining"]) == {config.depth}
        for point in metrics:
            at_step = evals[evals["step"] == point["step"]]
            for direction in evaluated:
                row = at_step[at_step["direction"] == direction].iloc[0]
                assert (row["tokens"], row["epoch"]) == (point["tokens"], point["epoch"])
                for metric in ("loss", "acc", "ppl"):
                    assert row[metric] == point[f"{direction}_{metric}"]

        cuts = rows[rows["phase"] == "cut"]
        assert sorted(cuts["blocks_remaining"]) == sorted(2 * list(range(1, config.depth)))
        assert set(cuts["step"]) <= {metrics[-1]["step"]}
        for entry in read_json(run / "cut.json"):
            for direction in ("fw", "bw"):
                row = cuts[(cuts["blocks_remaining"] == entry["blocks_remaining"]) & (cuts["direction"] == direction)]
                assert row["loss"].tolist() == [entry["metrics"][direction]["loss"]]

    csv = pd.read_csv(finished.out / sweep_dir.RESULTS_CSV)
    assert len(csv) == len(table)
    assert list(csv.columns) == list(table.columns)
    assert sorted(csv["run_id"]) == sorted(table["run_id"])


def test_fwbw_results_prints_one_line_per_run(finished, capsys):
    capsys.readouterr()
    assert cli.main(["results", str(finished.out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header, rows = lines[0], lines[1:]
    assert len(rows) == len(finished.spec.configs()) == 9
    for word in ("depth", "width", "p_bw", "seed", "status", "final_loss_fw", "final_loss_bw"):
        assert word in header
    assert all(row.split()[-3] == "done" for row in rows), rows


def test_results_carry_the_study_switches(tmp_path):
    base = TrainConfig(num_heads=2, adaptive_p_bw=True, p_bw=0.5)
    spec = SweepSpec(depths=None, widths=None, model_scales=(0.5,), p_bws=(0.5,), seeds=1, base=base)
    write_sweep_file(tmp_path, spec, spec.configs())
    row = build_results(tmp_path).iloc[0]
    assert row["run_id"].startswith("d5-w256-ms0.5-h2-p0.5-adapt-s100-")
    assert (row["depth"], row["width"], row["model_scale"], row["num_heads"], row["adaptive_p_bw"]) == (5, 256, 0.5, 2, True)
    assert row["status"] == "pending" and all(pd.isna(row[probe]) for probe in PROBE_KEYS)
