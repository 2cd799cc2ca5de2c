"""The one place that builds a run's config and a sweep's spec.

Values come in layers, each a plain nested mapping: the dataclasses' own defaults, then a preset
(sweeps only), then a file, then the flags the user gave. Later layers win, table by table and key
by key; the merged mapping is then typed and validated once (TrainConfig.from_dict, here for a
sweep). An error is one line that names the field, and the file when its value, or the value of
another field its check read, came from a file.

Sizing by model_scale(s) and by depth(s)/width(s) are alternatives: a layer that gives one
replaces what earlier layers gave of the other (so do the study's tokens-per-microbatch rule and
recipe.tokens_per_microbatch in sweeps). One layer may not give both: train's flags are refused
here, a sweep layer by SweepSpec; a run's config.json records model_scale with the depth and
width it gives, and TrainConfig checks that they agree.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from fwbw.files import read_json, read_text
from fwbw.schema import EMPTY, ConfigError, from_mapping, require, show, typed
from fwbw.study.presets import preset_values
from fwbw.study.sweep import FILE_KEYS, GRID_AXIS_OF, SweepSpec, with_study_tokens
from fwbw.training.config import SIZE_ALTERNATIVE, TrainConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

KeyPath = tuple  # a key's path through nested tables: ("recipe", "tokens_per_microbatch")
Alternative = tuple[tuple[str, ...], tuple[str, ...]]  # two groups of dotted keys that exclude each other

TRAIN_ALTERNATIVES: tuple[Alternative, ...] = (SIZE_ALTERNATIVE,)
SWEEP_ALTERNATIVES: tuple[Alternative, ...] = (
    (("model_scales",), ("depths", "widths")),
    (("tokens_per_microbatch_rule",), ("recipe.tokens_per_microbatch",)),
)
# a run's fields that are tables of fields (recipe): an empty one gives no value
TABLES = {(name,) for name, kind in typing.get_type_hints(TrainConfig).items() if dataclasses.is_dataclass(kind)}
SLURM_TABLE = "slurm"  # a sweep file's extra #SBATCH options: how its runs are launched, not what they are


def build_train_config(file: Path | None = None, overrides: Mapping = EMPTY) -> TrainConfig:
    """A run's config: defaults < `file` (a run's config.json, or TOML / YAML) < `overrides`."""
    _refuse_both(overrides, TRAIN_ALTERNATIVES)
    layers = [(str(file), read_config_file(file)) if file else (None, {}), (None, overrides)]
    values, origins = merge(layers, TRAIN_ALTERNATIVES)
    with _errors_named(origins):
        return TrainConfig.from_dict(values)


def build_sweep_spec(preset: str | None = None, file: Path | None = None, overrides: Mapping = EMPTY) -> SweepSpec:
    """A sweep's spec: defaults < `preset` < `file` (TOML, YAML or JSON) < `overrides`. A file may
    name its own preset (`preset = "paper"`), which --preset replaces, and hold a [slurm] table
    (slurm_options), which is no part of the spec."""
    source = str(file) if file else None
    from_file = read_config_file(file) if file else {}
    from_file.pop(SLURM_TABLE, None)
    layers = [(None, _preset_layer(preset, from_file, source)), (source, from_file), (None, overrides)]
    values, origins = merge(layers, SWEEP_ALTERNATIVES)
    with _errors_named(origins, GRID_AXIS_OF):
        return _sweep_spec(values)


SBATCH_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")  # an #SBATCH option's name, without its dashes


def slurm_options(file: Path | None) -> dict:
    """The sweep file's [slurm] table: extra #SBATCH options for `fwbw sweep --launcher slurm`
    (`account = "proj"` gives `#SBATCH --account=proj`, `exclusive = true` `#SBATCH --exclusive`);
    {} without a file or table."""
    table = read_config_file(file).get(SLURM_TABLE, {}) if file else {}
    valid = isinstance(table, dict) and all(_sbatch_option(key, value) for key, value in table.items())
    require(valid, f"{file}: {SLURM_TABLE}", "must be a table of #SBATCH options (a name of letters, digits, - and _ = "
            f"text on one line, a whole number or true), got {show(table)}")
    return table


def _sbatch_option(name, value) -> bool:
    """Whether `name = value` makes one #SBATCH line: a plain option name, and text without a line
    break, a whole number or true."""
    if not (isinstance(name, str) and SBATCH_NAME.fullmatch(name)):
        return False
    if isinstance(value, bool):
        return value is True
    if isinstance(value, str):
        return "\n" not in value and "\r" not in value
    return isinstance(value, int)


SPEC_KEYS = {FILE_KEYS.get(item.name, item.name) for item in dataclasses.fields(SweepSpec)} - {"base"}


def _sweep_spec(values: Mapping) -> SweepSpec:
    """A spec from a sweep's merged values: the spec's own keys (SPEC_KEYS) and any other
    TrainConfig field for every run (recipe as a table). The base config is the grid's first run.
    An extra run is a table of fields laid over it as a layer (a model_scale replaces the base's
    depth and width, a depth or width its model_scale); under the study's tokens-per-microbatch
    rule it gets the study's for its model unless it sets recipe.tokens_per_microbatch."""
    spec = {key: value for key, value in values.items() if key in SPEC_KEYS}
    base = {key: value for key, value in values.items() if key not in SPEC_KEYS}
    for key in base:
        if key in GRID_AXIS_OF:
            raise ConfigError(f"{key}: is set by the grid; give {GRID_AXIS_OF[key]}")
    recipe = base.get("recipe")
    both = "tokens_per_microbatch_rule" in spec and isinstance(recipe, Mapping) and "tokens_per_microbatch" in recipe
    require(not both, "tokens_per_microbatch_rule", "give it or recipe.tokens_per_microbatch, not both",
            related=("recipe.tokens_per_microbatch",))
    if "model_scales" in spec:
        spec = {"depths": None, "widths": None, **spec}
    extras = spec.pop("extra_runs", [])
    require(isinstance(extras, list) and all(isinstance(extra, Mapping) for extra in extras), "extra_runs",
            f"must be a list of tables of fields, got {show(extras)}")
    grid = from_mapping(SweepSpec, spec, FILE_KEYS)  # on the default base: the grid's own values, typed and checked
    first_run = {**base, **grid.sizes()[0], "p_bw": grid.p_bws[0], "seed": grid.first_seed}
    base_config = TrainConfig.from_dict(first_run)
    rule = grid.tokens_per_microbatch_rule
    runs = tuple(_extra_run(first_run, extra, index, rule) for index, extra in enumerate(extras))
    return dataclasses.replace(grid, base=base_config, extra_runs=runs)


def _extra_run(base: Mapping, extra: Mapping, index: int, rule: str | None) -> TrainConfig:
    values, _ = merge([(None, base), (None, extra)], TRAIN_ALTERNATIVES)
    recipe = extra.get("recipe")
    own_tokens = isinstance(recipe, Mapping) and "tokens_per_microbatch" in recipe
    try:
        config = TrainConfig.from_dict(values)
        return with_study_tokens(config) if rule and not own_tokens else config
    except ConfigError as error:
        raise error.inside(f"extra_runs[{index}].") from None


def _preset_layer(preset: str | None, from_file: dict, source: str | None) -> dict:
    """The values of `preset`, else of the file's own `preset` key (taken out of from_file)."""
    with _errors_named({("preset",): source}):
        file_preset = typed(from_file.pop("preset", None), str | None, "preset")
        if preset is None:
            return {} if file_preset is None else preset_values(file_preset)
    return preset_values(preset)


def merge(layers: Sequence[tuple[str | None, Mapping]], alternatives: Sequence[Alternative]) -> tuple[dict, dict]:
    """The layers' values merged in order, and for every key's path the file it came from (None
    for a preset or flags). A key replaces earlier values at its path, and the other group of any
    alternative it belongs to."""
    merged: dict[KeyPath, Any] = {}
    origins: dict[KeyPath, str | None] = {}
    for source, values in layers:
        flat = _flatten(values)
        replaced = [path for path in merged if any(_related(path, new) for new in flat)]
        replaced += [_path(key) for key in _displaced(flat, alternatives)]
        for path in replaced:
            merged.pop(path, None)
            origins.pop(path, None)
        merged.update(flat)
        origins.update(dict.fromkeys(flat, source))
    return _unflatten(merged), origins


def read_config_file(path: Path) -> dict:
    """The table of fields in a .json, .toml, .yaml or .yml file; anything else is one line
    naming the file."""
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    require(reader is not None, str(path), "must be a .json, .toml, .yaml or .yml file")
    try:
        values = reader(path)
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read (a config's values nest a few levels)") from None
    require(isinstance(values, dict), str(path), f"must hold a table of fields, got {show(values)}")
    return values


def _read_toml(path: Path) -> Any:
    try:
        values = tomllib.loads(read_text(path))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({' '.join(str(error).split())})") from None
    require(values != {}, str(path), "empty file")  # no key, only blanks or comments
    return values


MAX_YAML_VALUES = 100_000  # values in a YAML document with its aliases expanded (a config has hundreds)
YAML_TAG = "tag:yaml.org,2002:"
# YAML 1.2's core schema, as JSON and TOML read values: integers only in decimal (010 and 5:33:20
# stay text), true and false the only booleans (on, yes and no stay text), no dates
YAML_CORE_RESOLVERS = {
    "bool": (r"true|True|TRUE|false|False|FALSE", "tTfF"),
    "int": (r"[-+]?(?:0|[1-9][0-9]*)", "-+0123456789"),
    "float": (r"[-+]?(?:(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+)"
              r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)", "-+.0123456789"),
}


def _core_schema_resolvers() -> dict[str, list]:
    """SafeLoader's implicit resolvers (by a scalar's first character) with YAML_CORE_RESOLVERS in
    place of its booleans, numbers and dates."""
    kept = (YAML_TAG + "null", YAML_TAG + "merge")
    resolvers = {first: [found for found in listed if found[0] in kept]
                 for first, listed in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    for kind, (pattern, firsts) in YAML_CORE_RESOLVERS.items():
        for first in firsts:
            resolvers.setdefault(first, []).append((YAML_TAG + kind, re.compile(f"^(?:{pattern})$")))
    return resolvers


class _YamlLoader(yaml.SafeLoader):
    """yaml's SafeLoader on YAML 1.2's core schema (YAML_CORE_RESOLVERS) that refuses a key given
    twice in one table (not the last one wins), a key that is no string, and a document that its
    aliases expand beyond MAX_YAML_VALUES values (an alias bomb)."""

    yaml_implicit_resolvers = _core_schema_resolvers()

    def compose_document(self) -> yaml.Node:
        document = super().compose_document()
        require(_expanded_size(document, {}) <= MAX_YAML_VALUES, "aliases",
                f"expand the document beyond {MAX_YAML_VALUES} values")
        return document

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == YAML_TAG + "merge":  # `<<: *table` merges, it repeats nothing
                    continue
                key = self.construct_object(key_node, deep=deep)
                where = f"line {key_node.start_mark.line + 1} column {key_node.start_mark.column + 1}"
                require(isinstance(key, str), show(key), f"a field name must be a string (at {where})")
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, float]) -> float:
    """The values in `node` with every alias expanded, each node counted once (`sizes`, by id);
    inf for a node that holds itself."""
    if id(node) not in sizes:
        sizes[id(node)] = math.inf  # while its items are counted
        items = node.value if isinstance(node, yaml.SequenceNode) else []
        if isinstance(node, yaml.MappingNode):
            items = [item for pair in node.value for item in pair]
        sizes[id(node)] = 1 + sum(_expanded_size(item, sizes) for item in items)
    return sizes[id(node)]


def _read_yaml(path: Path) -> Any:
    try:
        values = yaml.load(read_text(path), Loader=_YamlLoader)
    except ConfigError as error:
        raise error.inside(f"{path}: ") from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML ({error.problem or error.context}{where})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    require(values is not None, str(path), "empty file")  # no document, only blanks or comments
    return values


READERS = {".json": read_json, ".toml": _read_toml, ".yaml": _read_yaml, ".yml": _read_yaml}


def _flatten(values: Mapping, prefix: KeyPath = ()) -> dict[KeyPath, Any]:
    """Each value by its key's path. An empty table stays a value (`depth = {}` is refused by the
    field's type, not replaced by its default), except where a table belongs (`[recipe]`)."""
    flat = {}
    for key, value in values.items():
        path = (*prefix, key)
        if isinstance(value, Mapping) and (value or path in TABLES):
            flat.update(_flatten(value, path))
        else:
            flat[path] = value
    return flat


def _unflatten(flat: Mapping[KeyPath, Any]) -> dict:
    nested: dict = {}
    for path, value in flat.items():
        table = nested
        for key in path[:-1]:
            table = table.setdefault(key, {})
        table[path[-1]] = value
    return nested


def _related(a: KeyPath, b: KeyPath) -> bool:
    """One path is the other or lies inside it (a table replaced by a value, or the reverse)."""
    return a[: len(b)] == b or b[: len(a)] == a


def _path(key: str) -> KeyPath:
    return tuple(key.split("."))


def _displaced(flat: Mapping[KeyPath, Any], alternatives: Sequence[Alternative]) -> list[str]:
    """The keys of every alternative's other group, for each group this layer gives a key of."""
    displaced = []
    for first, second in alternatives:
        for group, other in ((first, second), (second, first)):
            if any(_path(key) in flat for key in group):
                displaced += other
    return displaced


def _refuse_both(overrides: Mapping, alternatives: Sequence[Alternative]) -> None:
    flat = _flatten(overrides)
    for first, second in alternatives:
        both = any(_path(key) in flat for key in first) and any(_path(key) in flat for key in second)
        require(not both, first[0], f"give {' and '.join(first)} or {' and '.join(second)}, not both")


@contextmanager
def _errors_named(origins: Mapping[KeyPath, str | None], aliases: Mapping[str, str] = EMPTY) -> Iterator[None]:
    """Prefix a ConfigError with the file that gave its field's value, or else the value of a
    field its check read (error.related). `aliases` maps a run's field to the sweep key that sets
    it (depth -> depths)."""
    try:
        yield
    except ConfigError as error:
        fields = [str(error).split(": ", 1)[0], *error.related]
        source = next(filter(None, (_origin(name, origins, aliases) for name in fields)), None)
        if source is None:
            raise
        raise ConfigError(f"{source}: {error}") from None


def _origin(field: str, origins: Mapping[KeyPath, str | None], aliases: Mapping[str, str]) -> str | None:
    """The file that gave `field`'s value: its own, that of the table or list it lies in, or for
    a table given as one, that of a key inside it (None: defaults, a preset or flags)."""
    path = tuple(re.sub(r"\[\d+\]", "", field).split("."))  # extra_runs[0].depth -> extra_runs, depth
    for candidate in (path, (aliases.get(path[0], path[0]), *path[1:])):
        for end in range(len(candidate), 0, -1):
            if candidate[:end] in origins:
                return origins[candidate[:end]]
        inside = [source for key, source in origins.items() if key[: len(candidate)] == candidate and source]
        if inside:
            return inside[0]
    return None
