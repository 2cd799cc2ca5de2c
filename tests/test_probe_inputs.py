"""scripts/probe_inputs.py (issue 21): its classifier fires on broken builders (a KeyError is a
traceback, a sleep a hang, a changed value accepted-changed), its files say what they mean in
each format, and on a few fields the readers give no traceback and no hang."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
import time
from pathlib import Path

import pytest

from fwbw.schema import ConfigError
from fwbw.study.configure import read_config_file

PATH = Path(__file__).resolve().parents[1] / "scripts" / "probe_inputs.py"
SPEC = importlib.util.spec_from_file_location("probe_inputs", PATH)
probe = importlib.util.module_from_spec(SPEC)
sys.modules["probe_inputs"] = probe  # dataclasses look their module up
SPEC.loader.exec_module(probe)

SUBSET = "depth,p_bw,recipe.lr_scale"


def classify(call, expect="accept", written=4, limit_s=2.0):
    return probe.classify(call, expect, written, limit_s, ("run.json", "depth"))[0]


def raise_(error):
    def call():
        raise error

    return call


def test_the_classifier_knows_each_outcome():
    assert classify(lambda: 4) == "accepted"
    assert classify(lambda: 4, written=4.0) == "accepted-changed"  # 4.0 written, an integer held
    assert classify(lambda: 8) == "accepted-changed"
    assert classify(lambda: math.nan, expect="refuse", written=math.nan) == "accepted-bad"
    assert classify(raise_(ConfigError("run.json: depth: must be >= 1, got 0"))) == "refused"
    assert classify(raise_(ValueError("must be >= 1"))) == "refused-unnamed"
    assert classify(raise_(ConfigError("depth: must be\n>= 1"))) == "refused-multiline"
    assert classify(raise_(KeyError("depth"))) == "traceback"
    assert classify(raise_(RecursionError())) == "traceback"
    assert classify(lambda: time.sleep(5), limit_s=0.2) == "hang"


def test_values_are_compared_as_configs_normalise_them():
    assert probe.same(4.0, 4) and probe.same((0.9, 0.95), [0.9, 0.95]) and probe.same(math.nan, math.nan)
    assert not probe.same(4, 4.0) and not probe.same(True, 1) and not probe.same("010", 8)
    assert probe.same(probe.TrainConfig(), {"depth": 4}) and not probe.same(probe.TrainConfig(), {"depth": 5})


@pytest.mark.parametrize("fmt", probe.FORMATS)
@pytest.mark.parametrize("value", [4, 0.5, -1.0, True, "bpe:300", [0.9, 0.95], {}, [{"seed": 999}], 2**64, 1e308])
def test_each_format_spells_a_value_as_written(tmp_path, fmt, value):
    path = tmp_path / f"run.{fmt}"
    path.write_text(probe.render(probe.document("recipe.betas", value), fmt))
    assert read_config_file(path) == {"recipe": {"betas": value}}


@pytest.mark.parametrize("text, meant", [("5e-1", 0.5), ("262e-2", 2.62)])
def test_yaml_traps_mean_what_yaml_1_2_says(tmp_path, text, meant):
    path = tmp_path / "run.yaml"
    table = {"recipe": {"lr_scale": probe.Merged(probe.Raw(yaml=text))}, "depth": probe.Raw(yaml="010")}
    path.write_text(probe.render(table, "yaml"))
    assert read_config_file(path) == {"recipe": {"lr_scale": meant}, "depth": "010"}
    assert probe.without_dot(2.62) == "262e-2" and probe.without_dot(9e7) == "900000000e-1"


def depth_case(kind: str, fmt: str = "json") -> probe.Case:
    cases = probe.all_cases((fmt,), {"depth"}, cli=False)
    return next(case for case in cases if case.target == "train" and case.kind == kind)


@pytest.mark.parametrize("builder, outcome", [
    (lambda path, key: {}["depth"], "traceback"),
    (lambda path, key: time.sleep(5), "hang"),
    (lambda path, key: 8, "accepted-changed"),
])
def test_a_broken_builder_is_caught(tmp_path, monkeypatch, builder, outcome):
    monkeypatch.setitem(probe.BUILDERS, "train", builder)
    assert probe.run_file_case(depth_case("good"), tmp_path, limit_s=0.3)[0] == outcome


def test_a_case_that_hangs_once_is_tried_again(tmp_path, monkeypatch):
    calls = []

    def stalls_once(path, key):
        calls.append(key)
        if len(calls) == 1:
            time.sleep(5)
        return 4

    monkeypatch.setitem(probe.BUILDERS, "train", stalls_once)
    outcome, message = probe.run_case(depth_case("good"), tmp_path, limit_s=0.3)
    assert (outcome, len(calls)) == ("accepted", 2) and "second try" in message
    monkeypatch.setitem(probe.BUILDERS, "train", lambda path, key: time.sleep(5))
    outcome, message = probe.run_case(depth_case("good"), tmp_path, limit_s=0.3)
    assert outcome == "hang" and message.startswith("still running after 0.3 s (at test_probe_inputs.py:")
    assert message.endswith("(tried twice)")


def test_known_cases_get_known_outcomes(tmp_path):
    assert probe.run_file_case(depth_case("good"), tmp_path, 10)[0] == "accepted"
    outcome, message = probe.run_file_case(depth_case("empty-table", "toml"), tmp_path, 10)
    assert outcome == "refused" and message.startswith("<tmp>/train.toml: depth: must be an integer")
    assert probe.run_file_case(depth_case("yaml-010", "yaml"), tmp_path, 10)[0] == "refused"


def test_a_command_line_refused_in_one_line_writing_nothing(tmp_path):
    case = next(case for case in probe.cli_cases() if case.kind == "train-out-file")
    for _ in range(2):  # a second try runs in a folder of its own
        outcome, message = probe.run_cli_case(case, tmp_path, 10)
        assert (outcome, message) == ("refused", "fwbw train: error: out: taken is a file, not a directory")


def test_the_probe_on_a_few_fields_finds_no_traceback_and_no_hang(tmp_path, capsys):
    out = tmp_path / "probe.csv"
    rows = probe.main(["--fields", SUBSET, "--out", str(out), "--no-cli"])
    outcomes = [row.outcome for row in rows]
    assert len(rows) > 300 and outcomes.count("traceback") == 0 and outcomes.count("hang") == 0
    table = list(csv.DictReader(out.open()))
    assert len(table) == len(rows) and {row["field"] for row in table} == set(SUBSET.split(","))
    goods = [row for row in table if row["kind"] == "good"]
    assert goods and all(row["outcome"] == "accepted" for row in goods)
    assert "| traceback | 0 | 0 | 0 | 0 |" in capsys.readouterr().out
