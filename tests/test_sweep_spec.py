"""Sweep specs: flags, TOML, YAML and JSON files, presets, the dry run and bad values."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import TOKENIZER, Corpus

from fwbw import cli
from fwbw.data.tokenizer import vocab_size_of
from fwbw.model.hlb_gpt import count_params
from fwbw.study.configure import build_sweep_spec
from fwbw.study.presets import PRESETS
from fwbw.study.sweep import SweepSpec, run_id

pytestmark = pytest.mark.usefixtures("cache_env", "one_thread")


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
    assert len(lines) == len(configs) + 1
    for line, config in zip(lines, configs):
        words = line.split()
        assert words[0] == run_id(config)
        params = words[words.index("params") + 1]
        model_config = config.model_config(vocab_size_of(config.tokenizer))
        assert params == f"{count_params(model_config) / 1e6:.2f}M"
    assert lines[-1].startswith(f"{len(configs)} runs")
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
