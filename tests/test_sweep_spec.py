"""Sweep specs: flags, TOML, YAML and JSON files, presets, the dry run and bad values."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
from conftest import TOKENIZER, Corpus

import fwbw
from fwbw import cli
from fwbw.data.tokenizer import vocab_size_of
from fwbw.model.hlb_gpt import count_params
from fwbw.study import sweep, sweep_dir
from fwbw.study.configure import build_sweep_spec
from fwbw.study.estimate import ShapeTiming
from fwbw.study.presets import PRESETS
from fwbw.study.sweep import SweepSpec, prepare_sweep, run_id, short_count, sweep_runs, write_sweep_file
from fwbw.training.run_dir import SUMMARY, write_status

pytestmark = pytest.mark.usefixtures("cache_env", "one_thread")


@pytest.fixture(autouse=True)
def untimed_dry_run(monkeypatch):
    """--dry-run times each run shape on this machine (tests/test_dry_run_estimate.py); here a
    fixed timing stands in, so that a dry run trains nothing; and no device memory, so that no
    out-of-memory warning depends on this machine's RAM (tests/test_memory_estimate.py)."""
    timing = ShapeTiming(fw_step_s=0.1, fwbw_step_s=0.2, eval_s=1.0, measured=True)
    monkeypatch.setattr(sweep, "MachineTimer", lambda: lambda config: timing)
    monkeypatch.setattr(sweep, "device_memory", lambda device: None)


def grid_flags(corpus: Corpus) -> list[str]:
    return ["--data", corpus.spec, "--tokenizer", TOKENIZER, "--depths", "1", "2", "--widths", "16", "32",
            "--p-bw", "0", "0.5", "--seeds", "2", "--seed", "7", "--seq-len", "32", "--train-tokens", "4096",
            "--eval-tokens", "1024", "--tokens-per-microbatch", "256", "--task-tokens", "--bw-mode", "either"]


GRID_TOML = """\
depths = [1, 2]
widths = [16, 32]
p_bw = [0.0, 0.5]
seeds = 2
seed = 7
data = "{data}"
tokenizer = "bpe:300"
seq_len = 32
train_tokens = 4096
eval_tokens = 1024
task_tokens = true
bw_mode = "either"

[recipe]
tokens_per_microbatch = 256
"""


GRID_YAML = """\
depths: [1, 2]
widths: [16, 32]
p_bw: [0.0, 0.5]
seeds: 2
seed: 7
data: "{data}"
tokenizer: bpe:300
seq_len: 32
train_tokens: 4096
eval_tokens: 1024
task_tokens: true
bw_mode: either
recipe:
  tokens_per_microbatch: 256
"""


GRID_JSON = json.dumps({
    "depths": [1, 2], "widths": [16, 32], "p_bw": [0.0, 0.5], "seeds": 2, "seed": 7, "data": "{data}",
    "tokenizer": "bpe:300", "seq_len": 32, "train_tokens": 4096, "eval_tokens": 1024, "task_tokens": True,
    "bw_mode": "either", "recipe": {"tokens_per_microbatch": 256},
})


def spec_of(argv: list[str]) -> SweepSpec:
    return cli.sweep_spec_from_args(cli.build_parser().parse_args(["sweep", *argv]))


def run_ids(spec: SweepSpec) -> list[str]:
    return [run_id(config) for config in spec.configs()]


@pytest.mark.parametrize("name, text", [("grid.toml", GRID_TOML), ("grid.yaml", GRID_YAML), ("grid.yml", GRID_YAML),
                                        ("grid.json", GRID_JSON)], ids=["toml", "yaml", "yml", "json"])
def test_sweep_file_gives_the_same_runs_as_flags(tmp_path, corpus, name, text):
    path = tmp_path / name
    path.write_text(text.replace("{data}", corpus.spec))
    from_flags = spec_of(grid_flags(corpus))
    from_file = spec_of(["--config", str(path)])
    assert run_ids(from_file) == run_ids(from_flags)
    assert from_file.configs() == from_flags.configs()
    assert len(run_ids(from_flags)) == len(set(run_ids(from_flags))) == 16
    assert {config.seed for config in from_flags.configs()} == {7, 8}
    assert build_sweep_spec(file=path).configs() == from_flags.configs()
    overridden = spec_of(["--config", str(path), "--p-bw", "0.25", "--widths", "16"])  # flags win over the file
    assert [(c.p_bw, c.width) for c in overridden.configs()] == [(0.25, 16)] * 4


def test_presets_hold_the_study_grid():
    assert {"paper", "cpu-small", "demo"} <= set(PRESETS)
    paper = build_sweep_spec("paper")
    assert paper.depths == (4, 8, 16, 32)
    assert paper.widths == (192, 384, 768, 1536)
    assert paper.p_bws == (0.0, 0.05)
    assert (paper.seeds, paper.first_seed) == (3, 100)
    base = paper.base
    assert (base.data, base.tokenizer, base.task_tokens, base.epochs) == ("wikitext-103", "gpt2", True, 10.0)
    assert base.eval_every_epochs == 0.25
    configs = paper.configs()
    assert len(configs) == 4 * 4 * 2 * 3
    assert {(c.depth, c.width, c.p_bw, c.seed) for c in configs} == {
        (d, w, p, s) for d in (4, 8, 16, 32) for w in (192, 384, 768, 1536) for p in (0.0, 0.05) for s in (100, 101, 102)
    }
    small = build_sweep_spec("cpu-small")
    assert len(small.configs()) >= 2 and all(c.data != "wikitext-103" for c in small.configs())
    assert spec_of(["--preset", "paper"]) == paper
    assert run_ids(spec_of(["--preset", "paper", "--seeds", "1"])) == run_ids(dataclasses.replace(paper, seeds=1))


def test_the_retrieval_preset_trains_both_ways_substantially_on_training_articles_only():
    spec = build_sweep_spec("retrieval")
    configs = spec.configs()
    assert [(c.p_bw, c.seed) for c in configs] == [(p, s) for p in (0.0, 0.5, 1.0) for s in (200, 201, 202, 203)]
    assert {(c.data, c.seq_len, c.bw_mode, c.train_fraction, c.epochs, c.depth, c.width) for c in configs} == {
        ("wiki-sample-v2", 256, "add", 1.0, 8.0, 2, 128)}
    assert {(c.eval_ema, c.patience, c.dtype, c.threads) for c in configs} == {(0.99, 4, "bf16", 1)}


@pytest.mark.parametrize("argv", [["--preset", "paper"], ["--preset", "cpu-small"], "corpus"])
def test_dry_run_prints_every_run_with_its_parameter_count(tmp_path, corpus, capsys, argv):
    if argv == "corpus":
        argv = grid_flags(corpus)
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli.main(["sweep", *argv, "--dry-run", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    spec = spec_of(argv)
    configs = spec.configs()
    assert len(lines) == len(configs) + 2
    for line, config in zip(lines, configs):
        words = line.split()
        assert words[0] == run_id(config)
        params = words[words.index("params") + 1]
        model_config = config.model_config(vocab_size_of(config.tokenizer))
        assert params == short_count(count_params(model_config))
    assert lines[-2].startswith(f"{len(configs)} runs")
    assert lines[-1].startswith("expected on this machine (")
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--p-bw", "2"], "p_bw"),
        (["--p-bw", "0", "-0.5"], "p_bw"),
        (["--preset", "nope"], "preset"),
        (["--widths", "20"], "width"),
        (["--depths", "0"], "depth"),
        (["--seeds", "0"], "seeds"),
        (["--shard", "3/2"], "shard"),
        (["--tokenizer", "bpe:5"], "tokenizer"),
        (["--data", "no-such-corpus"], "data"),
    ],
)
@pytest.mark.parametrize("dry_run", [False, True])
def test_bad_values_fail_with_exit_2_naming_the_field(tmp_path, capsys, argv, field, dry_run):
    out = tmp_path / "out"
    capsys.readouterr()
    code = cli.main(["sweep", *argv, "--out", str(out), *(["--dry-run"] if dry_run else [])])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert f"{field}: " in lines[0], lines[0]
    assert captured.out == ""
    assert not out.exists()


def test_bad_value_in_a_sweep_file_fails_with_exit_2(tmp_path, corpus, capsys):
    path = tmp_path / "grid.toml"
    path.write_text(GRID_TOML.replace("{data}", corpus.spec).replace("p_bw = [0.0, 0.5]", "p_bw = [0.0, 1.5]"))
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli.main(["sweep", "--config", str(path), "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"fwbw sweep: error: {path}: p_bw: must be in [0, 1], got 1.5"]
    assert not out.exists()


@pytest.mark.parametrize("count, text", [(0, "0"), (512, "512"), (3000, "3.00k"), (46_009_736, "46.0M"),
                                         (118_000_000, "118M"), (1_180_000_000, "1.18G")])
def test_counts_print_to_three_significant_digits(count, text):
    assert short_count(count) == text


def test_dry_run_shows_a_small_budget(capsys):
    assert cli.main(["sweep", "--preset", "cpu-small", "--train-tokens", "3000", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all("tokens  3.00k" in line for line in lines[:-2]), lines


# --- a sweep directory belongs to one spec -------------------------------------------------------

SMALL = ["--depths", "2", "--widths", "16", "--p-bw", "0", "--seeds", "2", "--seq-len", "16",
         "--tokens-per-microbatch", "256", "--eval-tokens", "512", "--no-progress"]


def finished_without_training(out: Path, argv: list[str]) -> SweepSpec:
    """The sweep of `argv` written into `out` with every run marked done (nothing to train)."""
    spec = spec_of(argv)
    write_sweep_file(out, spec, spec.configs())
    for config in spec.configs():
        run = out / sweep_dir.RUNS / run_id(config)
        run.mkdir(parents=True)
        (run / SUMMARY).write_text("{}")  # a done run has its summary
        write_status(run, "done")
    return spec


def test_a_sweep_directory_takes_only_its_own_spec(tmp_path, capsys):
    out = tmp_path / "grid"
    finished_without_training(out, SMALL)
    saved = (out / sweep_dir.SWEEP_FILE).read_bytes()
    for more in ([], ["--shard", "1/2"], ["--retry-failed"]):  # the same spec: workers and reruns proceed
        assert cli.main(["sweep", *SMALL, *more, "--out", str(out)]) == 0
        assert capsys.readouterr().out.startswith(f"sweep {out}: ")
    assert (out / sweep_dir.SWEEP_FILE).read_bytes() == saved
    assert cli.main(["sweep", *SMALL, "--seeds", "3", "--seq-len", "32", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"fwbw sweep: error: out: {out} holds the sweep of another spec (seeds: 2 -> 3; base.seq_len: 16 -> 32); "
        "give another --out\n")
    assert (out / sweep_dir.SWEEP_FILE).read_bytes() == saved
    assert sorted(path.name for path in out.iterdir()) == ["results.csv", "results.parquet", "runs", "runs.csv", "sweep.json"]


@pytest.mark.parametrize("text, problem", [('{"spec": ', "not valid JSON"), ("[1, 2]", "no 'spec' table")])
def test_a_corrupt_sweep_file_is_reported_not_overwritten(tmp_path, capsys, text, problem):
    out = tmp_path / "grid"
    out.mkdir()
    (out / sweep_dir.SWEEP_FILE).write_text(text)
    assert cli.main(["sweep", *SMALL, "--out", str(out)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fwbw sweep: error: {out / sweep_dir.SWEEP_FILE}: {problem}"), lines
    assert (out / sweep_dir.SWEEP_FILE).read_text() == text
    assert sorted(path.name for path in out.iterdir()) == ["sweep.json"]


# --- the layer graph -----------------------------------------------------------------------------

LAYERED = ["study/sweep.py", "study/results.py", "study/configure.py", "training/config.py"]


@pytest.mark.parametrize("module", LAYERED)
def test_imports_are_at_module_level(module):
    """A function-local import hides a dependency from the module's head: only cli.py may defer them."""
    tree = ast.parse((Path(fwbw.__file__).parent / module).read_text())
    functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    local = [f"{function.name}: line {node.lineno}" for function in functions for node in ast.walk(function)
             if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert local == []


def test_schema_and_sweep_describe_with_distinct_names():
    names: dict[str, list[str]] = {}
    for path in sorted(Path(fwbw.__file__).parent.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                names.setdefault(node.name, []).append(path.stem)
    assert "describe" not in names
    assert names["describe_kind"] == ["schema"] and names["describe_runs"] == ["sweep"]


def test_workers_take_the_runs_in_grid_order_not_by_run_id(tmp_path):
    """sweep.json's tables are written with sorted keys; its `order` keeps the grid's order, so a
    sweep's runs are trained in the order its spec lists them (the data-efficiency preset lists
    its primary contrast first)."""
    spec = build_sweep_spec(overrides={"depths": [2], "widths": [16], "p_bw": [0.5, 0.0], "seeds": 2})
    prepare_sweep(spec, tmp_path)
    expected = [run_id(config) for config in spec.configs()]
    assert expected != sorted(expected)
    assert list(sweep_runs(tmp_path)) == expected
    assert list(sweep_runs(tmp_path, (1, 2))) == expected[1::2]


def test_a_sweep_json_with_a_broken_order_is_refused(tmp_path):
    spec = build_sweep_spec(overrides={"depths": [2], "widths": [16], "p_bw": [0.5, 0.0], "seeds": 1})
    prepare_sweep(spec, tmp_path)
    sweep = json.loads((tmp_path / sweep_dir.SWEEP_FILE).read_text())
    (tmp_path / sweep_dir.SWEEP_FILE).write_text(json.dumps({**sweep, "order": sweep["order"][:1]}))
    with pytest.raises(ValueError, match="'order' must list each run id once"):
        sweep_runs(tmp_path)
