"""Building configs: defaults < preset < file < flags, strict types with one-line errors that name
the file and the field, hlb-gpt's model_scale sizing and the study's tokens per microbatch."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing

import pytest
import yaml

from fwbw import cli
from fwbw.model.config import ModelConfig, shape_for_model_scale
from fwbw.model.hlb_gpt import count_params
from fwbw.schema import ConfigError
from fwbw.study import presets
from fwbw.study.configure import build_sweep_spec, build_train_config, read_config_file
from fwbw.study.sweep import (
    FILE_KEYS,
    REFERENCE_PARAMS,
    SweepSpec,
    run_id,
    study_tokens_per_microbatch,
    with_study_tokens,
)
from fwbw.training.config import RecipeConfig, TrainConfig
from fwbw.training.run_dir import config_id

FORMATS = ("json", "toml", "yaml")


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {toml_value(item)}" for key, item in value.items()) + " }"
    return repr(value)  # int, float (inf and nan spell the same in TOML)


def write_config(folder, fmt: str, values: dict, stem: str = "config"):
    path = folder / f"{stem}.{fmt}"
    if fmt == "toml":
        path.write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in values.items()))
    else:
        path.write_text(json.dumps(values) if fmt == "json" else yaml.safe_dump(values))
    return path


@pytest.fixture
def no_training(monkeypatch):
    """A config that should have been refused must not start a run."""

    class Refused:
        def __init__(self, *args, **kwargs):
            pytest.fail("a bad config reached the trainer")

    monkeypatch.setattr("fwbw.cli.Trainer", Refused)  # `fwbw train`
    monkeypatch.setattr("fwbw.study.sweep.Trainer", Refused)  # `fwbw sweep`


def fails_with_one_line(argv: list[str], capsys, *parts: str) -> str:
    """Run the CLI; it must exit 2 with one stderr line holding every part, and no traceback."""
    capsys.readouterr()
    code = cli.main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def train_config(*flags: str) -> TrainConfig:
    return cli.train_config_from_args(cli.build_parser().parse_args(["train", "--out", "unused", *flags]))


def sweep_spec(*flags: str) -> SweepSpec:
    return cli.sweep_spec_from_args(cli.build_parser().parse_args(["sweep", *flags]))


# --- every field, every format: a wrong type is one line naming the file and the field ----------

WRONG = {bool: "false", int: "2", float: True, str: 3}  # a value of another type for each scalar


def wrong_value(kind):
    inner = [arg for arg in typing.get_args(kind) if arg is not type(None)]
    if type(None) in typing.get_args(kind):
        return wrong_value(inner[0])
    if dataclasses.is_dataclass(kind):
        return 5
    if typing.get_origin(kind) is tuple:
        return "0.9"
    return WRONG[kind]


def typed_fields(cls) -> list[tuple[str, object]]:
    hints = typing.get_type_hints(cls)
    return [(item.name, wrong_value(hints[item.name])) for item in dataclasses.fields(cls)]


TRAIN_CASES = [(name, {name: value}) for name, value in typed_fields(TrainConfig)] + [
    (f"recipe.{name}", {"recipe": {name: value}}) for name, value in typed_fields(RecipeConfig)
] + [
    ("train_tokens", {"train_tokens": 20000.7}),
    ("checkpoint_every_steps", {"checkpoint_every_steps": 2.5}),
    ("depth", {"depth": True}),
    ("depth", {"depth": 2.0}),
    ("task_tokens", {"task_tokens": 1}),
    ("recipe.foo", {"recipe": {"foo": 1}}),
    ("foo", {"foo": 1}),
]




def empty_tables(cls) -> list[tuple[str, dict]]:
    """{} for every field of `cls` that is no table (a run's recipe is one): never read as 'no value'."""
    hints = typing.get_type_hints(cls)
    return [(FILE_KEYS.get(item.name, item.name), {FILE_KEYS.get(item.name, item.name): {}})
            for item in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[item.name])]


EMPTY_TABLE_CASES = empty_tables(TrainConfig) + [
    (f"recipe.{name}", {"recipe": values}) for name, values in empty_tables(RecipeConfig)
]
TRAIN_CASES += EMPTY_TABLE_CASES


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("field, values", TRAIN_CASES, ids=[f"{field}-{values}" for field, values in TRAIN_CASES])
def test_train_file_with_a_wrong_type_fails_naming_file_and_field(tmp_path, capsys, fmt, field, values):
    path = write_config(tmp_path, fmt, values, stem="run")
    out = tmp_path / "out"
    line = fails_with_one_line(["train", "--config", str(path), "--out", str(out), "--no-progress"], capsys)
    assert line.startswith(f"fwbw train: error: {path}: {field}: "), line
    assert not out.exists()


# a sweep file's keys: the spec's own (as files spell them), then every run field the spec does not
# spell itself (depth, width and model_scale are refused there: the grid sets them)
SPEC_CASES = {FILE_KEYS.get(name, name): value for name, value in typed_fields(SweepSpec) if name != "base"}
SWEEP_CASES = [(key, {key: value}) for key, value in SPEC_CASES.items()] + [
    (name, {name: value}) for name, value in typed_fields(TrainConfig) if name not in SPEC_CASES
] + [
    (f"recipe.{name}", {"recipe": {name: value}}) for name, value in typed_fields(RecipeConfig)
] + [
    ("depths[0]", {"depths": [1.5]}),
    ("model_scales[0]", {"model_scales": ["1"]}),
    ("p_bw[0]", {"p_bw": [True]}),
    ("extra_runs[0].depth", {"extra_runs": [{"depth": "2"}]}),
    ("train_tokens", {"train_tokens": 20000.7}),
    ("recipe.foo", {"recipe": {"foo": 1}}),
    ("foo", {"foo": 1}),
] + empty_tables(SweepSpec) + [(field, values) for field, values in EMPTY_TABLE_CASES if field not in SPEC_CASES]


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("field, values", SWEEP_CASES, ids=[f"{field}-{values}" for field, values in SWEEP_CASES])
def test_sweep_file_with_a_wrong_type_fails_naming_file_and_field(tmp_path, capsys, fmt, field, values, dry_run):
    path = write_config(tmp_path, fmt, {"seeds": 1, "p_bw": [0.0], **values}, stem="grid")
    out = tmp_path / "out"
    argv = ["sweep", "--config", str(path), "--out", str(out), *(["--dry-run"] if dry_run else [])]
    line = fails_with_one_line(argv, capsys)
    assert line.startswith(f"fwbw sweep: error: {path}: {field}: "), line
    assert not out.exists()


@pytest.mark.parametrize(
    "name, text, problem",
    [
        ("run.json", '{"depth": 2', "not valid JSON"),
        ("run.toml", "depth = ", "not valid TOML"),
        ("run.yaml", "depth: [1, 2", "not valid YAML"),
        ("run.yml", "recipe: {warmup_steps: 3", "not valid YAML"),
        ("run.yaml", "- 1\n- 2\n", "must hold a table of fields, got [1, 2]"),
        ("run.json", "[1]", "must hold a table of fields, got [1]"),
        ("run.ini", "depth = 2", "must be a .json, .toml, .yaml or .yml file"),
    ],
)
@pytest.mark.parametrize("command", ["train", "sweep"])
def test_unreadable_files_fail_with_one_line_naming_the_file(tmp_path, capsys, name, text, problem, command):
    path = tmp_path / name
    path.write_text(text)
    out = tmp_path / "out"
    line = fails_with_one_line([command, "--config", str(path), "--out", str(out)], capsys, problem)
    assert line.startswith(f"fwbw {command}: error: {path}: "), line
    assert not out.exists()


def test_null_only_where_the_field_is_optional(tmp_path):
    assert build_train_config(write_config(tmp_path, "json", {"train_tokens": None})).train_tokens is None
    path = write_config(tmp_path, "yaml", {"depth": None})
    with pytest.raises(ConfigError, match=rf"^{path}: depth: must be an integer, got null$"):
        build_train_config(path)


def test_python_construction_is_checked_and_normalised():
    with pytest.raises(ConfigError, match=r'^task_tokens: must be true or false, got "false"$'):
        TrainConfig(task_tokens="false")
    with pytest.raises(ConfigError, match=r"^depth: must be an integer, got 2.0$"):
        TrainConfig(depth=2.0)
    with pytest.raises(ConfigError, match=r"^recipe.warmup_steps: must be an integer, got true$"):
        TrainConfig(recipe={"warmup_steps": True})
    config = TrainConfig(epochs=2, recipe={"betas": [0.8, 0.9]})
    assert (config.epochs, type(config.epochs)) == (2.0, float)
    assert config.recipe == RecipeConfig(betas=(0.8, 0.9))
    with pytest.raises(ConfigError, match=r"^p_bw\[1\]: must be a number, got null$"):
        SweepSpec(p_bws=(0.0, None))


def test_yaml_reads_exponents_without_a_dot_as_numbers(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("recipe:\n  adam_eps: 1e-9\n  lr_numerator: 9e7\n")
    recipe = build_train_config(path).recipe
    assert (recipe.adam_eps, recipe.lr_numerator) == (1e-9, 9e7)


@pytest.mark.parametrize(
    "text, message",
    [
        ("depth: 010", 'depth: must be an integer, got "010"'),  # not YAML 1.1's octal 8
        ("train_tokens: 5:33:20", 'train_tokens: must be an integer, got "5:33:20"'),  # not base 60's 20000
        ("task_tokens: on", 'task_tokens: must be true or false, got "on"'),
        ("task_tokens: yes", 'task_tokens: must be true or false, got "yes"'),
        ("task_tokens: no", 'task_tokens: must be true or false, got "no"'),
        ("1: 2", "1: a field name must be a string (at line 1 column 1)"),
        ("recipe:\n  true: 2", "true: a field name must be a string (at line 2 column 3)"),
    ],
)
def test_yaml_is_read_as_yaml_1_2_core(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(f'{path}: {message}')}$"):
        build_train_config(path)


@pytest.mark.parametrize("suffix, line", [(".json", '{"depth": %s}'), (".toml", "depth = %s"), (".yaml", "depth: %s")])
def test_a_config_nested_too_deeply_is_one_line_naming_the_file(tmp_path, suffix, line):
    """100,000 nested lists make every reader hit Python's recursion limit: one line, not its message alone."""
    path = tmp_path / f"run{suffix}"
    path.write_text(line % ("[" * 100_000 + "]" * 100_000) + "\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: nested too deeply to read"):
        build_train_config(path)


@pytest.mark.parametrize("field", ["decay_power", "output_decay_power", "weight_decay", "accum_gain"])
def test_a_negative_power_or_decay_of_the_recipe_is_refused(tmp_path, field):
    """Found by scripts/probe_inputs.py: a negative one inverted its rule (a learning rate growing after warm-up)."""
    path = tmp_path / "run.toml"
    path.write_text(f"[recipe]\n{field} = -1\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: recipe.{field}: must be >= 0, got -1"):
        build_train_config(path)


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """Nine aliases of nine aliases, eight deep: 43 million strings once expanded (`show` would
    spell them all)."""
    lines = ["data:", '  - &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"  - &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]" for level in range(1, 9)]
    path = tmp_path / "run.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: aliases: expand the document beyond 100000 values$"):
        build_train_config(path)


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize("epochs", ["inf", "1e400", "nan"])
def test_epochs_must_be_finite(tmp_path, capsys, epochs):
    out = tmp_path / "out"
    fails_with_one_line(["train", "--epochs", epochs, "--out", str(out)], capsys, "epochs: must be a finite number, got")
    path = tmp_path / "run.json"
    path.write_text(f'{{"epochs": {epochs if epochs == "1e400" else "NaN"}}}')
    fails_with_one_line(["train", "--config", str(path), "--out", str(out)], capsys, f"{path}: epochs: must be a finite number")
    assert not out.exists()


@pytest.mark.usefixtures("no_training")
def test_tokens_per_microbatch_below_seq_len_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    line = fails_with_one_line(["train", "--seq-len", "64", "--tokens-per-microbatch", "32", "--out", str(out)], capsys)
    assert line == "fwbw train: error: recipe.tokens_per_microbatch: must hold one window of seq_len 64, got 32"
    assert train_config("--seq-len", "64", "--tokens-per-microbatch", "64").recipe.tokens_per_microbatch == 64
    assert not out.exists()


# --- layering ------------------------------------------------------------------------------------


def test_sweep_layers_preset_then_file_then_flags(tmp_path):
    path = write_config(tmp_path, "toml", {"seeds": 1, "seq_len": 64, "recipe": {"tokens_per_microbatch": 1024}})
    spec = sweep_spec("--preset", "cpu-small", "--config", str(path), "--seq-len", "32", "--widths", "64")
    preset = build_sweep_spec("cpu-small")
    assert (spec.depths, spec.widths, spec.seeds, spec.p_bws) == (preset.depths, (64,), 1, preset.p_bws)
    assert (spec.base.seq_len, spec.base.data, spec.base.eval_tokens) == (32, "wiki-sample", preset.base.eval_tokens)
    # the file's recipe table merges key by key into the preset's
    assert (spec.base.recipe.tokens_per_microbatch, spec.base.recipe.dynamic_microbatch) == (1024, False)
    assert sweep_spec("--config", str(path)).base.recipe.dynamic_microbatch is True  # no preset: defaults


def test_a_file_may_name_its_preset_and_the_flag_replaces_it(tmp_path):
    path = write_config(tmp_path, "yaml", {"preset": "cpu-small", "seeds": 1})
    assert build_sweep_spec(file=path) == dataclasses.replace(build_sweep_spec("cpu-small"), seeds=1)
    assert build_sweep_spec("paper", path).base.data == "wikitext-103"
    with pytest.raises(ConfigError, match=r"^preset: unknown 'nope'"):  # the flag's, not the file's
        build_sweep_spec("nope", path)
    path = write_config(tmp_path, "yaml", {"preset": "nope"})
    with pytest.raises(ConfigError, match=rf"^{path}: preset: unknown 'nope'"):
        build_sweep_spec(file=path)
    path = write_config(tmp_path, "toml", {"preset": ""})  # no preset: a misspelt one
    with pytest.raises(ConfigError, match=rf"^{path}: preset: unknown ''"):
        build_sweep_spec(file=path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_empty_recipe_table_keeps_the_recipe_of_the_layers_below(tmp_path, fmt):
    path = write_config(tmp_path, fmt, {"preset": "cpu-small", "recipe": {}})
    assert build_sweep_spec(file=path) == build_sweep_spec("cpu-small")


def test_train_layers_file_then_flags(tmp_path):
    path = write_config(tmp_path, "yaml", {"depth": 3, "width": 64, "seq_len": 64, "recipe": {"warmup_steps": 7}})
    config = train_config("--config", str(path), "--width", "32", "--tokens-per-microbatch", "512", "--fixed-microbatch")
    assert (config.depth, config.width, config.seq_len) == (3, 32, 64)
    assert (config.recipe.warmup_steps, config.recipe.tokens_per_microbatch, config.recipe.dynamic_microbatch) == (7, 512, False)
    assert config.data == TrainConfig().data


def test_a_runs_config_json_rebuilds_the_same_config(tmp_path):
    config = TrainConfig(model_scale=1.0, depth=8, width=384, p_bw=0.05, recipe=RecipeConfig(warmup_steps=3))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert build_train_config(path) == config
    assert TrainConfig.load(path) == config


def test_flag_values_win_over_the_file_and_are_not_blamed_on_it(tmp_path):
    path = write_config(tmp_path, "toml", {"p_bw": [0.0, 0.5]})
    with pytest.raises(ConfigError, match=r"^p_bw: must be in \[0, 1\], got 2.0$"):
        sweep_spec("--config", str(path), "--p-bw", "2")
    path = write_config(tmp_path, "toml", {"p_bw": [0.0, 2.0]})
    with pytest.raises(ConfigError, match=rf"^{path}: p_bw: must be in \[0, 1\], got 2.0$"):
        sweep_spec("--config", str(path))
    with pytest.raises(ConfigError, match=rf"^{path}: depth: must be >= 1, got 0$"):
        sweep_spec("--config", str(write_config(tmp_path, "toml", {"depths": [0]})))


# --- presets -------------------------------------------------------------------------------------


def test_presets_are_registered_functions(monkeypatch):
    assert list(presets.PRESETS) == ["paper", "cpu-small", "data-constrained", "data-efficiency", "data-efficiency-pilot", "retrieval", "demo"]
    monkeypatch.setattr(presets, "PRESETS", dict(presets.PRESETS))

    @presets.preset("two-seeds")
    def two_seeds() -> dict:
        return {**presets.cpu_small(), "seeds": 1, "depths": [2]}

    assert presets.PRESETS["two-seeds"] is two_seeds
    spec = sweep_spec("--preset", "two-seeds")
    assert [(c.depth, c.width, c.p_bw, c.seed) for c in spec.configs()] == [(2, 128, 0.0, 100), (2, 128, 0.05, 100)]
    with pytest.raises(ConfigError, match=r"^preset: unknown 'nope' \(expected one of paper, cpu-small, data-constrained, data-efficiency, data-efficiency-pilot, retrieval, demo, two-seeds\)$"):
        build_sweep_spec("nope")


def test_demo_preset_adds_a_causal_and_a_leaking_run_on_both_tasks_at_the_largest_size():
    demo, small = build_sweep_spec("demo"), build_sweep_spec("cpu-small")
    assert demo.configs()[:-2] == small.configs()
    both_tasks = dataclasses.replace(small.base, depth=4, width=128, p_bw=1.0, seed=100)
    assert demo.configs()[-2:] == [both_tasks, dataclasses.replace(both_tasks, bw_mask="legacy-flip")]


def test_extra_runs_may_not_repeat_a_grid_run(tmp_path):
    path = write_config(tmp_path, "toml", {"depths": [2], "seeds": 1, "p_bw": [0.0], "extra_runs": [{"depth": 2}]})
    with pytest.raises(ConfigError, match=rf"^{path}: extra_runs: repeats a run of the grid or another extra run$"):
        build_sweep_spec(file=path)


# --- duplicates ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--depths", "2", "2"], "depths: repeats 2"),
        (["--widths", "64", "32", "64"], "widths: repeats 64"),
        (["--p-bw", "0", "0.0"], "p_bw: repeats 0.0"),
        (["--model-scales", "1", "1.0"], "model_scales: repeats 1.0"),
    ],
)
def test_duplicate_grid_values_are_refused_before_the_dry_run(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert fails_with_one_line(["sweep", *flags, "--dry-run", "--out", str(out)], capsys) == f"fwbw sweep: error: {message}"
    path = write_config(tmp_path, "toml", {"depths": [4, 8, 4]})
    fails_with_one_line(["sweep", "--config", str(path), "--dry-run"], capsys, f"{path}: depths: repeats 4")
    assert not out.exists()


# --- model_scale ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scale, shape", [(1, (8, 384)), (3, (16, 768)), (7, (24, 1152)), (0.5, (5, 256)), (2, (13, 640))])
def test_shape_for_model_scale_is_hlb_gpts_sizing(scale, shape):
    assert shape_for_model_scale(scale) == shape
    depth, width = shape
    assert depth == round(8 * math.log2(1 + scale)) and width % 64 == 0
    assert abs(width - 384 * math.log2(1 + scale)) <= 32


def test_model_scale_sizes_a_run_and_is_recorded(tmp_path):
    config = train_config("--model-scale", "1")
    assert (config.depth, config.width, config.model_scale) == (8, 384, 1.0)
    assert config.to_dict()["model_scale"] == 1.0
    # a later layer's depth/width replaces an earlier model_scale, and the reverse
    path = write_config(tmp_path, "json", config.to_dict())
    assert train_config("--config", str(path), "--depth", "2") == dataclasses.replace(config, depth=2, model_scale=None)
    assert train_config("--config", str(path), "--model-scale", "3") == dataclasses.replace(
        config, depth=16, width=768, model_scale=3.0
    )
    with pytest.raises(ConfigError, match=r"^model_scale: 1 means depth 8 and width 384, got depth 4 and width 128$"):
        TrainConfig(model_scale=1.0)
    with pytest.raises(ConfigError, match=r"^model_scale: must be > 0, got -1.0$"):
        train_config("--model-scale", "-1")
    with pytest.raises(ConfigError, match=r"^model_scale: 0.01 is too small \(depth 0, width 0\)$"):
        train_config("--model-scale", "0.01")


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize("size_flags", [["--depth", "8"], ["--width", "384"], ["--depth", "8", "--width", "384"]])
def test_model_scale_with_depth_or_width_is_refused(tmp_path, capsys, size_flags):
    out = tmp_path / "out"
    line = fails_with_one_line(["train", "--model-scale", "1", *size_flags, "--out", str(out)], capsys)
    assert line == "fwbw train: error: model_scale: give model_scale or depth and width, not both"
    assert not out.exists()


def test_model_scales_grid_axis(tmp_path, capsys):
    spec = sweep_spec("--model-scales", "1", "3", "--seeds", "1", "--p-bw", "0")
    assert [(c.model_scale, c.depth, c.width) for c in spec.configs()] == [(1.0, 8, 384), (3.0, 16, 768)]
    assert (spec.depths, spec.widths) == (None, None)
    path = write_config(tmp_path, "yaml", {"model_scales": [1, 3], "seeds": 1, "p_bw": [0.0]})
    assert build_sweep_spec(file=path) == spec
    # flags replace a file's sizing; one layer may not give both
    assert sweep_spec("--config", str(path), "--depths", "2").configs()[0].depth == 2
    fails_with_one_line(["sweep", "--model-scales", "1", "--depths", "2", "--dry-run"], capsys,
                        "model_scales: give model_scales or depths and widths, not both")
    both = write_config(tmp_path, "toml", {"model_scales": [1], "depths": [2]})
    fails_with_one_line(["sweep", "--config", str(both), "--dry-run"], capsys, f"{both}: model_scales: give")


# --- the study's tokens per microbatch -----------------------------------------------------------

STUDY_TOKENS = {(4, 192): 65_250, (8, 384): 57_236, (16, 768): 41_533, (32, 1536): 18_511}


def test_study_rule_sizes_each_paper_run(capsys):
    assert REFERENCE_PARAMS == count_params(ModelConfig(vocab_size=50304, depth=8, width=384, max_seq_len=1024))
    assert study_tokens_per_microbatch(REFERENCE_PARAMS) == 57_236
    paper = build_sweep_spec("paper")
    tokens = {(c.depth, c.width): c.recipe.tokens_per_microbatch for c in paper.configs()}
    assert {size: tokens[size] for size in STUDY_TOKENS} == STUDY_TOKENS
    assert all(c.to_dict()["recipe"]["tokens_per_microbatch"] == tokens[c.depth, c.width] for c in paper.configs())
    assert cli.main(["sweep", "--preset", "paper", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for config in paper.configs():
        line = next(line for line in lines if line.startswith(run_id(config)))
        assert f"tokens/microbatch {tokens[config.depth, config.width]:6d}" in line


def test_a_fixed_tokens_per_microbatch_replaces_the_presets_rule(tmp_path):
    spec = sweep_spec("--preset", "paper", "--tokens-per-microbatch", "4096")
    assert spec.tokens_per_microbatch_rule is None
    assert {c.recipe.tokens_per_microbatch for c in spec.configs()} == {4096}
    path = write_config(tmp_path, "toml", {"tokens_per_microbatch_rule": "study", "recipe": {"tokens_per_microbatch": 4096}})
    with pytest.raises(ConfigError, match=rf"^{path}: tokens_per_microbatch_rule: give it or recipe.tokens_per_microbatch"):
        build_sweep_spec(file=path)
    small = sweep_spec("--preset", "cpu-small", "--tokens-per-microbatch-rule", "study", "--depths", "8", "--widths", "384")
    model = small.configs()[0].model_config(8192)
    assert small.configs()[0].recipe.tokens_per_microbatch == study_tokens_per_microbatch(count_params(model))


# --- the study's switches ------------------------------------------------------------------------


def test_study_switches_reach_runs_from_flags_and_files(tmp_path):
    config = train_config("--num-heads", "2", "--adaptive-p-bw", "--bw-mode", "either", "--p-bw", "0.5")
    assert (config.num_heads, config.adaptive_p_bw, config.bw_mode, config.p_bw) == (2, True, "either", 0.5)
    path = write_config(tmp_path, "toml", {"num_heads": 4, "adaptive_p_bw": True, "seeds": 1, "p_bw": [0.05]})
    assert {(c.num_heads, c.adaptive_p_bw) for c in build_sweep_spec(file=path).configs()} == {(4, True)}
    assert {c.num_heads for c in sweep_spec("--config", str(path), "--num-heads", "2").configs()} == {2}


def test_read_config_file_returns_the_table(tmp_path):
    values = {"depth": 2, "recipe": {"betas": [0.8, 0.9]}}
    assert all(read_config_file(write_config(tmp_path, fmt, values)) == values for fmt in FORMATS)


def test_a_bad_flag_is_one_line_too(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "--train-tokens", "20000.7", "--out", "unused"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == "fwbw train: error: argument --train-tokens: invalid int value: '20000.7'\n"


# --- num_heads -----------------------------------------------------------------------------------

HEADS_3_AT_128 = "num_heads: must be >= 1 and divide the query/key width 16 and the width 128, got 3"


@pytest.mark.parametrize("heads", [0, 3])
def test_num_heads_is_checked_as_the_model_checks_it(heads):
    message = f"num_heads: must be >= 1 and divide the query/key width 16 and the width 128, got {heads}"
    with pytest.raises(ConfigError, match=rf"^{re.escape(message)}$"):
        TrainConfig(num_heads=heads)
    with pytest.raises(ConfigError, match=rf"^{re.escape(message)}$"):
        ModelConfig(vocab_size=64, depth=1, width=128, max_seq_len=8, num_heads=heads)
    assert TrainConfig(width=192, num_heads=3).model_config(64).num_heads == 3


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize("fmt", FORMATS)
def test_num_heads_from_a_file_names_the_file(tmp_path, capsys, fmt):
    out = tmp_path / "out"
    path = write_config(tmp_path, fmt, {"num_heads": 3})
    assert fails_with_one_line(["train", "--config", str(path), "--out", str(out)], capsys) == (
        f"fwbw train: error: {path}: {HEADS_3_AT_128}")
    grid = write_config(tmp_path, fmt, {"num_heads": 3, "widths": [192, 128]}, stem="grid")
    for dry_run in ([], ["--dry-run"]):
        line = fails_with_one_line(["sweep", "--config", str(grid), "--out", str(out), *dry_run], capsys)
        assert line == f"fwbw sweep: error: {grid}: {HEADS_3_AT_128}"
    # a flag's num_heads that the file's widths do not allow: the file gave a value the check read
    widths = write_config(tmp_path, fmt, {"widths": [128]}, stem="widths")
    line = fails_with_one_line(["sweep", "--config", str(widths), "--num-heads", "3", "--dry-run"], capsys)
    assert line == f"fwbw sweep: error: {widths}: {HEADS_3_AT_128}"
    assert not out.exists()


def test_num_heads_is_checked_against_each_runs_own_width(capsys):
    spec = sweep_spec("--preset", "paper", "--num-heads", "3")
    assert {c.num_heads for c in spec.configs()} == {3} and len(spec.configs()) == 96
    assert cli.main(["sweep", "--preset", "paper", "--num-heads", "3", "--dry-run", "--device-memory", "1000"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 98  # 96 runs and 2 totals (no run above 1000 GiB)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_table_where_a_list_belongs_names_the_file(tmp_path, capsys, fmt):
    path = write_config(tmp_path, fmt, {"widths": {"a": 1}})
    line = fails_with_one_line(["sweep", "--config", str(path), "--dry-run"], capsys)
    assert line == f'fwbw sweep: error: {path}: widths: must be a list of integers, got {{"a": 1}}'


@pytest.mark.usefixtures("no_training")
def test_a_cross_field_check_names_the_file_of_the_value_it_read(tmp_path, capsys):
    path = write_config(tmp_path, "toml", {"seq_len": 16384})
    line = fails_with_one_line(["train", "--config", str(path), "--out", str(tmp_path / "out")], capsys)
    assert line == f"fwbw train: error: {path}: recipe.tokens_per_microbatch: must hold one window of seq_len 16384, got 8192"


# --- the study's tokens per microbatch for each run's own model ----------------------------------


def test_study_rule_uses_the_parameter_count_of_a_model_scale_run():
    config = sweep_spec("--preset", "paper", "--model-scales", "7", "--seeds", "1", "--p-bw", "0").configs()[0]
    assert (config.depth, config.width, config.model_scale) == (24, 1152, 7.0)
    num_params = count_params(config.model_config(50257))
    assert config.recipe.tokens_per_microbatch == study_tokens_per_microbatch(num_params) == 28_030
    assert study_tokens_per_microbatch(7 * REFERENCE_PARAMS) == 27_691  # s = model_scale would give this


def test_extra_runs_get_the_study_rule_unless_they_set_their_own(tmp_path):
    extras = [{"depth": 8, "width": 384, "p_bw": 1.0}, {"model_scale": 0.5, "p_bw": 1.0},
              {"depth": 16, "p_bw": 1.0, "recipe": {"tokens_per_microbatch": 4096}}]
    path = write_config(tmp_path, "yaml", {"preset": "paper", "seeds": 1, "extra_runs": extras})
    spec = build_sweep_spec(file=path)
    ruled, scaled, own = spec.extra_runs
    assert ruled.recipe.tokens_per_microbatch == with_study_tokens(ruled).recipe.tokens_per_microbatch == 57_236
    assert (scaled.depth, scaled.width, scaled.model_scale) == (5, 256, 0.5)
    assert scaled.recipe.tokens_per_microbatch == study_tokens_per_microbatch(count_params(scaled.model_config(50257)))
    assert (own.depth, own.width, own.recipe.tokens_per_microbatch) == (16, 192, 4096)  # the grid's first width
    assert spec.base == dataclasses.replace(spec.configs()[0], recipe=spec.base.recipe)  # the grid's first run


# --- numbers, empty files, duplicate keys --------------------------------------------------------


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_an_integer_beyond_float_range_is_one_line(tmp_path, capsys, fmt):
    path = tmp_path / f"run.{fmt}"
    path.write_text(f'{{"epochs": 1{"0" * 400}}}' if fmt == "json" else f"epochs: 1{'0' * 400}\n")
    line = fails_with_one_line(["train", "--config", str(path), "--out", str(tmp_path / "out")], capsys)
    assert line.startswith(f"fwbw train: error: {path}: epochs: must be a finite number, got 1000"), line


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize("name, text", [("run.yaml", ""), ("run.yml", "# nothing yet\n"), ("run.toml", ""),
                                        ("run.toml", "# nothing yet\n")])
@pytest.mark.parametrize("command", ["train", "sweep"])
def test_an_empty_file_is_refused(tmp_path, capsys, name, text, command):
    assert_file_refused(tmp_path, capsys, command, name, text, "empty file")


def assert_file_refused(tmp_path, capsys, command: str, name: str, text: str, problem: str) -> None:
    """`fwbw COMMAND --config NAME` holding `text` fails with one line naming the file, and writes nothing."""
    path = tmp_path / name
    path.write_text(text)
    out = tmp_path / "out"
    assert fails_with_one_line([command, "--config", str(path), "--out", str(out)], capsys) == (
        f"fwbw {command}: error: {path}: {problem}")
    assert not out.exists()


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize(
    "name, text, problem",
    [
        ("run.json", '{"epochs": 1, "depth": 2, "epochs": 3}', "not valid JSON (duplicate key 'epochs')"),
        ("run.json", '{"recipe": {"lr_scale": 1, "lr_scale": 2}}', "not valid JSON (duplicate key 'lr_scale')"),
        ("run.yaml", "epochs: 1\ndepth: 2\nepochs: 3\n", "not valid YAML (duplicate key 'epochs' at line 3 column 1)"),
        ("run.yml", "recipe:\n  lr_scale: 1\n  lr_scale: 2\n",
         "not valid YAML (duplicate key 'lr_scale' at line 3 column 3)"),
    ],
)
@pytest.mark.parametrize("command", ["train", "sweep"])
def test_a_key_given_twice_is_refused(tmp_path, capsys, name, text, problem, command):
    assert_file_refused(tmp_path, capsys, command, name, text, problem)


def test_yaml_merge_keys_are_no_duplicates(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("shared: &shared {lr_scale: 1.0, warmup_steps: 3}\n")
    assert read_config_file(path) == {"shared": {"lr_scale": 1.0, "warmup_steps": 3}}
    path.write_text("recipe:\n  <<: {lr_scale: 1.0, warmup_steps: 3}\n  lr_scale: 2.0\n")
    assert build_train_config(path).recipe == RecipeConfig(lr_scale=2.0, warmup_steps=3)


# --- adaptive p_bw needs both tasks --------------------------------------------------------------


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--adaptive-p-bw", "--bw-mode", "either", "--p-bw", "1"],
         "adaptive_p_bw: needs p_bw < 1 under bw_mode either: with p_bw 1 no step trains fw, so p_bw never moves"),
    ],
)
def test_adaptive_p_bw_that_could_never_move_is_refused(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert fails_with_one_line(["train", *flags, "--out", str(out)], capsys) == f"fwbw train: error: {message}"
    assert not out.exists()
    assert train_config("--adaptive-p-bw", "--p-bw", "1").p_bw == 1.0  # under "add" fw trains every step
    path = write_config(tmp_path, "toml", {"adaptive_p_bw": True, "p_bw": [0.0, 0.05]})
    grid = build_sweep_spec(file=path).configs()  # an adaptive grid keeps its fw-only baseline
    assert sorted({(c.p_bw, c.adaptive_p_bw) for c in grid}) == [(0.0, True), (0.05, True)]


# --- booleans can be turned off on the command line ----------------------------------------------


def test_boolean_flags_turn_a_presets_or_files_true_off(tmp_path):
    assert build_sweep_spec("paper").base.task_tokens is True
    assert sweep_spec("--preset", "paper", "--no-task-tokens").base.task_tokens is False
    assert build_sweep_spec("cpu-small").base.recipe.dynamic_microbatch is False  # fixed
    assert sweep_spec("--preset", "cpu-small", "--no-fixed-microbatch").base.recipe.dynamic_microbatch is True
    assert sweep_spec("--preset", "cpu-small", "--fixed-microbatch").base.recipe.dynamic_microbatch is False
    path = write_config(tmp_path, "yaml", {"adaptive_p_bw": True, "task_tokens": True, "p_bw": 0.5})
    assert (train_config("--config", str(path)).adaptive_p_bw, train_config("--config", str(path)).task_tokens) == (True, True)
    config = train_config("--config", str(path), "--no-adaptive-p-bw", "--no-task-tokens")
    assert (config.adaptive_p_bw, config.task_tokens) == (False, False)


# --- run ids -------------------------------------------------------------------------------------


def test_run_ids_tag_the_study_switches_and_keep_default_ids():
    config = TrainConfig()
    assert run_id(config) == f"d4-w128-p0-s100-{config_id(config)[:8]}"
    legacy = TrainConfig(p_bw=0.05, bw_mask="legacy-flip", seed=7)
    assert run_id(legacy) == f"d4-w128-p0.05-legacy-flip-s7-{config_id(legacy)[:8]}"
    switched = TrainConfig(model_scale=0.5, depth=5, width=256, num_heads=4, p_bw=0.05, adaptive_p_bw=True)
    assert run_id(switched) == f"d5-w256-ms0.5-h4-p0.05-adapt-s100-{config_id(switched)[:8]}"
    ids = {run_id(c) for c in sweep_spec("--depths", "4", "--widths", "128", "--p-bw", "0.05", "--seeds", "1").configs()}
    assert {i.rsplit("-", 1)[0] for i in ids} == {"d4-w128-p0.05-s100"}
