"""Hostile-input probe of the config readers (issue 21): regenerate the bad config files, sweep files
and command lines, run each in this process, and count what the readers did with them.

    .venv/bin/python scripts/probe_inputs.py [--out docs/results/hardening/probe.csv]
        [--fields depth,p_bw,recipe.lr_scale] [--formats json,toml,yaml] [--limit-s 10] [--no-cli]

Cases. Every field of TrainConfig (the recipe's inside its table) and of a sweep file (SweepSpec's
fields as files spell them, extra_runs, preset, slurm, and one run field per annotation, also
inside an extra run) is found from the dataclasses; each gets, in JSON, TOML and YAML, a good value
and bad ones: {} and [], a wrong table, a list for a scalar (a scalar for a list), a string, a
bool, null (JSON, YAML), negative, zero, NaN and +-inf, huge (1e30, 1e308, 2**64), 900-deep
lists and tables, a list's items each bad, and the formats' traps: YAML 1.1's 010 (octal 8),
5:33:20 (sexagesimal 20000), on / yes / no (booleans), a merge key (<<), a self-referring alias, an
alias bomb and a !!python tag; TOML's dates and hex integers; JSON's leading zeros and 1e400. Then
a few whole files (empty, a list, duplicate keys, not UTF-8, ...) and command lines (fwbw train
--out an existing file, fwbw sweep --out a run directory, flags out of range, ...).

Each case runs in-process (build_train_config(path) / build_sweep_spec(file=path), then a dry run:
parameter counts, run ids, and the config rebuilt from its saved JSON; a command line through
fwbw.cli.main) in a temporary folder, under a time limit, and is classified:

    refused            a ValueError (ConfigError) of one line that names the file or the field
    refused-unnamed    one line, naming neither
    refused-multiline  a ValueError of several lines
    refused-wrote      a command refused after it wrote files (errors must write nothing)
    traceback          any other exception (for a command: one escaping fwbw.cli.main)
    hang               still running at the time limit, twice (SIGALRM on wall time, so a case that
                       hangs once is run again; a loop in C is not interrupted)
    accepted-changed   built, but the value it holds is not the one written (types normalised as
                       the config does: an integer in a float field is a float, a list a tuple),
                       e.g. {} replaced by the default, YAML 010 read as 8; or the dry run found the
                       config changed by its own saved JSON
    accepted-bad       built, holding the value written, where the value must be refused
    accepted           built, holding the value written

What must be refused (expect "refuse"), per kind of bad value:
  - a value of another type than the field's: a string, bool, number, list or table where another
    is wanted ({} is a table's empty value, [] extra_runs' only), null where the field is no
    `X | None`, YAML 1.1's 010, 5:33:20 and on/yes/no (text under YAML 1.2 and to JSON and TOML), a
    TOML date, a float for an integer, an integer for a bool, a 900-deep list or table;
  - NaN and +-inf everywhere, and integers beyond 64 bits (2**64);
  - negative values where the field's good value is >= 0 (sizes, counts, rates, seeds, decays);
  - zero in POSITIVE fields (sizes, counts, periods and factors that must be > 0);
  - huge floats (1e30, 1e308, 2**64) in UNIT fields (probabilities, fractions, betas, decays);
  - a YAML alias that refers to itself or expands beyond the loader's limit, a !!python tag, a file
    that is empty, not a table, not UTF-8, or holds a key twice.
Good values (the field's default, or 1 / 0.5 / true / a valid choice for an `X | None` field, also
written through a YAML merge key, as TOML hex, or as a float without a dot) expect "accept"; a
refusal of one is a defect too. Other values (zero in a field not in POSITIVE, a huge float outside
UNIT, null for an `X | None` field, a second valid value) expect "either": refused is fine,
accepted must hold what was written. A defect is any traceback, hang, accepted-bad,
accepted-changed, refused-multiline, refused-unnamed or refused-wrote, and a good value refused.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import re
import signal
import tempfile
import time
import traceback
import typing
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

from fwbw.files import atomic_write_text
from fwbw.schema import EMPTY
from fwbw.study.configure import SLURM_TABLE, build_sweep_spec, build_train_config, slurm_options
from fwbw.study.sweep import FILE_KEYS, GRID_AXIS_OF, SweepSpec, run_id
from fwbw.training.config import TrainConfig
from fwbw.training.run_dir import config_id

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "hardening" / "probe.csv"
FORMATS = ("json", "toml", "yaml")
LIMIT_S = 10.0
DEEP = 900  # nesting of the deep lists and tables: below the readers' recursion limit, above any config's
POSITIVE = {  # fields (last name) whose values must be > 0
    "depth", "width", "seq_len", "num_heads", "epochs", "train_tokens", "eval_every_epochs", "eval_tokens",
    "checkpoint_every_steps", "train_fraction", "model_scale", "patience", "threads", "eval_ema",
    "lr_numerator", "lr_scale", "lr_mult_position_bias", "lr_mult_non_decay", "lr_mult_output", "adam_eps",
    "warmup_start", "position_bias_decay", "weight_decay_base", "seq_len_initial", "seq_len_growth_steps",
    "tokens_per_microbatch", "grad_norm_every", "accum_floor", "accum_initial", "accum_max",
    "depths", "widths", "model_scales", "seeds",
}
UNIT = {"p_bw", "train_fraction", "dropout", "eval_ema", "betas", "output_betas", "warmup_start", "position_bias_decay"}
GOOD_CHOICES = {"preset": "cpu-small", "tokens_per_microbatch_rule": "study"}  # good values of `str | None` fields
EXTRA_RUN = {"seed": 999}  # what makes the probed extra run differ from every grid run
OUTCOMES = ("refused", "refused-unnamed", "refused-multiline", "refused-wrote", "traceback", "hang",
            "accepted-changed", "accepted-bad", "accepted")
DEFECTS = set(OUTCOMES) - {"refused", "accepted"}
NOT_COMPARED = object()  # a case whose built value is not compared with what was written


# --- values and how each format spells them ------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """A value spelled as literal text, per format (None: the format cannot say it)."""

    json: str | None = None
    toml: str | None = None
    yaml: str | None = None


@dataclass(frozen=True)
class Merged:
    """A table's value given through a YAML merge key: `<<: {key: value}`."""

    value: Any


class Unspellable(Exception):
    """The format has no spelling for the value (null in TOML, a merge key outside YAML)."""


def spell(value: Any, fmt: str) -> str:
    """`value` as `fmt` writes it inline."""
    if isinstance(value, Raw):
        if getattr(value, fmt) is None:
            raise Unspellable
        return getattr(value, fmt)
    if value is None:
        if fmt == "toml":
            raise Unspellable
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, str)):
        return str(value) if isinstance(value, int) else json.dumps(value)
    if isinstance(value, float):
        return _spell_float(value, fmt)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(spell(item, fmt) for item in value) + "]"
    if isinstance(value, dict):
        pairs = [_spell_pair(key, item, fmt) for key, item in value.items()]
        return ("{ " + ", ".join(pairs) + " }" if pairs else "{}") if fmt == "toml" else "{" + ", ".join(pairs) + "}"
    raise Unspellable


def _spell_float(value: float, fmt: str) -> str:
    if math.isnan(value):
        return {"json": "NaN", "toml": "nan", "yaml": ".nan"}[fmt]
    if math.isinf(value):
        sign = "-" if value < 0 else ""
        return sign + {"json": "Infinity", "toml": "inf", "yaml": ".inf"}[fmt]
    return repr(value)


def _spell_pair(key: str, value: Any, fmt: str) -> str:
    if isinstance(value, Merged):
        if fmt != "yaml":
            raise Unspellable
        return f"<<: {spell({key: value.value}, fmt)}"
    plain = fmt != "json" and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", key)
    return (key if plain else json.dumps(key)) + (" = " if fmt == "toml" else ": ") + spell(value, fmt)


def render(document: dict, fmt: str) -> str:
    """A file of `fmt` holding the table `document` (nested tables inline)."""
    if fmt == "json":
        return spell(document, fmt) + "\n"
    return "".join(_spell_pair(key, value, fmt) + "\n" for key, value in document.items())


def without_dot(number: float) -> str:
    """A float's exact decimal digits with an exponent and no dot: 2.62 -> 262e-2 (YAML 1.1 reads it as text)."""
    sign, digits, exponent = Decimal(repr(number)).as_tuple()
    return ("-" if sign else "") + "".join(map(str, digits)) + f"e{exponent}"


def yaml_bomb(levels: int = 6) -> str:
    """Nested lists of ten aliases each: 10**levels values once expanded."""
    text = "&a0 [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]"
    for level in range(1, levels):
        text = f"&a{level} [{text}" + f", *a{level - 1}" * 9 + "]"
    return text


DEEP_LIST = Raw(*(["[" * DEEP + "]" * DEEP] * 3))
DEEP_TABLE = Raw(json='{"a": ' * DEEP + "1" + "}" * DEEP, toml="{ a = " * DEEP + "1" + " }" * DEEP,
                 yaml="{a: " * DEEP + "1" + "}" * DEEP)


# --- the values each field gets ---------------------------------------------------------------


@dataclass(frozen=True)
class Value:
    kind: str
    value: Any
    expect: str  # refuse | accept | either
    written: Any = NOT_COMPARED  # the value the file's text means
    formats: tuple[str, ...] = FORMATS


def refuse(kind: str, value: Any, formats: tuple[str, ...] = FORMATS) -> Value:
    return Value(kind, value, "refuse", formats=formats)


def values_for(key: str, kind: Any, good: Any) -> list[Value]:
    """The values a field of annotation `kind` and good value `good` is probed with."""
    inner, optional = _optional(kind)
    if dataclasses.is_dataclass(inner):
        return table_values(inner, optional)
    if typing.get_origin(inner) is tuple:
        return tuple_values(key, inner, optional, good)
    return scalar_values(key, inner, optional, good)


def common_values(good: Any, optional: bool) -> list[Value]:
    """Values every field is probed with."""
    return [
        Value("null", None, "either" if optional else "refuse", None, ("json", "yaml")),
        refuse("deep-list", DEEP_LIST),
        refuse("deep-table", DEEP_TABLE),
        refuse("yaml-python-tag", Raw(yaml='!!python/object/apply:os.system ["true"]'), ("yaml",)),
        refuse("yaml-alias-recursive", Raw(yaml="&a [*a]"), ("yaml",)),
        refuse("yaml-alias-bomb", Raw(yaml=yaml_bomb()), ("yaml",)),
        refuse("toml-date", Raw(toml="1979-05-27"), ("toml",)),
        refuse("toml-datetime", Raw(toml="1979-05-27T07:32:00Z"), ("toml",)),
        refuse("toml-time", Raw(toml="07:32:00"), ("toml",)),
        Value("yaml-merge", Merged(good), "accept", good, ("yaml",)),
    ]


def scalar_values(key: str, kind: type, optional: bool, good: Any) -> list[Value]:
    traps = "either" if kind is str else "refuse"  # YAML 1.1's numbers and booleans are text under 1.2
    values = [
        Value("good", good, "accept", good),
        refuse("empty-table", {}),
        refuse("empty-list", []),
        refuse("wrong-table", {"value": good}),
        refuse("list-for-scalar", [good]),
        *common_values(good, optional),
        *(Value(f"yaml-{text}", Raw(yaml=text), traps, text, ("yaml",)) for text in ("010", "5:33:20", "on", "yes", "no")),
    ]
    if kind is str:
        return values + _text_values()
    if kind is bool:
        return values + _bool_values(good)
    return values + _number_values(key, kind, good)


def _text_values() -> list[Value]:
    return [refuse("string", "no-such-value"), refuse("empty-string", ""), refuse("number-for-string", 1),
            refuse("bool", True), refuse("nan", math.nan), refuse("nul-char", "\u0000")]


def _bool_values(good: bool) -> list[Value]:
    return [Value("alt", not good, "either", not good), refuse("int-for-bool", 1), refuse("string", "true"),
            refuse("nan", math.nan)]


def _number_values(key: str, kind: type, good: float) -> list[Value]:
    name = _name(key)
    number = float if kind is float else int
    alt = (good * 2 if good else 1) if kind is int else (good / 2 if good else 0.5)
    huge = "refuse" if kind is int or name in UNIT else "either"
    values = [
        Value("alt", alt, "either", alt),
        refuse("string", str(good)),
        refuse("bool", True),
        Value("negative", number(-1), "refuse" if good >= 0 else "either", number(-1)),
        Value("zero", number(0), "refuse" if name in POSITIVE else "either", number(0)),
        refuse("nan", math.nan), refuse("inf", math.inf), refuse("-inf", -math.inf),
        *(Value(f"huge-{label}", big, huge, big) for label, big in (("1e30", 1e30), ("1e308", 1e308), ("2**64", 2**64))),
        refuse("json-leading-zero", Raw(json="010"), ("json",)),
        refuse("json-1e400", Raw(json="1e400"), ("json",)),
    ]
    if kind is float:
        return values + [Value("exp-no-dot", Raw(*[without_dot(good)] * 3), "accept", float(without_dot(good)))]
    return values + [refuse("float-for-int", float(good)),
                     Value("toml-hex", Raw(toml=hex(good)), "accept", good, ("toml",))]


def tuple_values(key: str, kind: Any, optional: bool, good: list) -> list[Value]:
    items = typing.get_args(kind)
    fixed = items[-1] is not Ellipsis
    values = [
        Value("good", good, "accept", good),
        refuse("empty-table", {}),
        refuse("empty-list", []),
        refuse("wrong-table", {"value": good}),
        refuse("scalar-for-list", good[0]),
        refuse("string", "no-such-value"),
        refuse("bool", True),
        refuse("nan", math.nan),
        *common_values(good, optional),
    ]
    if fixed:
        values += [refuse("short-list", good[:1]), refuse("long-list", [*good, good[-1]])]
    else:
        values += [Value("alt", [good[0], good[0] * 2 or 1], "either", [good[0], good[0] * 2 or 1]),
                   Value("repeated-item", [good[0], good[0]], "either", [good[0], good[0]])]
    for item in values_for(key, items[0], good[0]):
        if item.kind not in ("good", "yaml-merge"):
            listed = [item.value, *good[1:]] if fixed else [item.value]
            written = NOT_COMPARED if item.written is NOT_COMPARED else [item.written, *good[1:]] if fixed else [item.written]
            values.append(Value(f"item:{item.kind}", listed, item.expect, written, item.formats))
    return values


def table_values(kind: type, optional: bool) -> list[Value]:
    first = dataclasses.fields(kind)[0].name
    return [
        Value("empty-table", {}, "accept", {}),
        refuse("empty-list", []),
        refuse("string", "no-such-value"),
        refuse("bool", True),
        refuse("number", 4),
        refuse("nan", math.nan),
        refuse("unknown-key", {"no_such_field": 1}),
        refuse("wrong-nested-table", {first: {"value": 1}}),
        refuse("list-of-tables", [{}]),
        *[value for value in common_values({}, optional) if value.kind != "yaml-merge"],
        refuse("yaml-alias-recursive-table", Raw(yaml="&a {x: *a}"), ("yaml",)),
    ]


def extra_runs_values() -> list[Value]:
    """extra_runs: a list of tables of run fields, each laid over the grid's first run."""
    good = [dict(EXTRA_RUN)]
    return [
        Value("good", good, "accept", good),
        Value("empty-list", [], "accept", []),
        refuse("empty-table", {}),
        refuse("scalar-for-list", 4),
        refuse("string", "no-such-value"),
        refuse("bool", True),
        refuse("nan", math.nan),
        refuse("table-for-list", dict(EXTRA_RUN)),
        *(refuse(f"item:{label}", [item]) for label, item in (("number", 4), ("string", "x"), ("list", []), ("nan", math.nan))),
        refuse("item:null", [None], ("json", "yaml")),
        refuse("item:empty-table", [{}]),  # the grid's first run again
        refuse("repeated-run", [dict(EXTRA_RUN), dict(EXTRA_RUN)]),
        refuse("item:grid-key", [{**EXTRA_RUN, "depths": [4]}]),
        refuse("item:both-sizes", [{**EXTRA_RUN, "model_scale": 1.0, "depth": 4}]),
        *[value for value in common_values(good, False) if value.kind != "yaml-merge"],
    ]


def slurm_values() -> list[Value]:
    """The sweep file's [slurm] table: #SBATCH option name -> text or number."""
    def good(table: dict) -> Value:
        return Value("good", table, "accept", table)

    return [
        good({"account": "proj"}), dataclasses.replace(good({}), kind="empty-table"),
        dataclasses.replace(good({"exclusive": True}), kind="flag"),
        refuse("empty-list", []), refuse("string", "proj"), refuse("number", 4),
        refuse("item:table", {"account": {}}), refuse("item:list", {"account": ["a"]}),
        refuse("item:null", {"account": None}, ("json", "yaml")), refuse("item:float", {"account": 1.5}),
        refuse("item:nan", {"account": math.nan}),
        refuse("item:false", {"exclusive": False}),  # submitit writes #SBATCH --exclusive=False
        refuse("item:newline", {"account": "proj\n#SBATCH --wrap=true"}),  # a second #SBATCH line in the job script
        refuse("item:empty-name", {"": "proj"}), refuse("item:space-in-name", {"acc ount": "proj"}),
        *[value for value in common_values({}, False) if value.kind != "yaml-merge"],
    ]


def _optional(kind: Any) -> tuple[Any, bool]:
    """(X, True) for `X | None`, else (kind, False)."""
    args = typing.get_args(kind)
    if type(None) in args and typing.get_origin(kind) is not tuple:
        return next(arg for arg in args if arg is not type(None)), True
    return kind, False


def _name(key: str) -> str:
    return re.split(r"[.\]]", key)[-1]


# --- the fields -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    target: str  # train | sweep
    key: str  # as a file spells it: recipe.lr_scale, extra_runs[0].depth
    values: tuple[Value, ...]


def good_value(name: str, kind: Any, default: Any) -> Any:
    """A value the field must accept: its default (as plain data), else one of its kind."""
    if dataclasses.is_dataclass(default):
        return {}
    if default is not None:
        return list(default) if isinstance(default, tuple) else default
    inner, _ = _optional(kind)
    return GOOD_CHOICES.get(name) or {int: 1, float: 0.5, bool: True}.get(inner) or [0.5]


def dataclass_fields(cls: type, prefix: str = "", skip: tuple[str, ...] = (), names=EMPTY) -> list[tuple[str, Any, Any]]:
    """(key, annotation, good value) of each field of `cls`, its nested tables' fields too."""
    hints, defaults = typing.get_type_hints(cls), cls()
    found = []
    for item in dataclasses.fields(cls):
        if item.name in skip:
            continue
        key, kind, default = prefix + names.get(item.name, item.name), hints[item.name], getattr(defaults, item.name)
        found.append((key, kind, good_value(item.name, kind, default)))
        if dataclasses.is_dataclass(kind):
            found += dataclass_fields(kind, f"{key}.")
    return found


def one_per_annotation(fields: list[tuple[str, Any, Any]], skip: set[str]) -> list[tuple[str, Any, Any]]:
    """The first field of each annotation: a sample of a run's fields where they recur."""
    seen, sample = set(), []
    for key, kind, good in fields:
        if key not in skip and str(kind) not in seen:
            seen.add(str(kind))
            sample.append((key, kind, good))
    return sample


def train_fields() -> list[Field]:
    return [Field("train", key, tuple(values_for(key, kind, good))) for key, kind, good in dataclass_fields(TrainConfig)]


def sweep_fields() -> list[Field]:
    """The sweep file's own keys, then a sample of run fields at its top level and in an extra run."""
    own = dataclass_fields(SweepSpec, skip=("base", "extra_runs"), names=FILE_KEYS)
    run = dataclass_fields(TrainConfig)
    top = one_per_annotation(run, {*GRID_AXIS_OF, *FILE_KEYS.values()})
    top += [item for item in run if item[0] == "recipe.tokens_per_microbatch"]
    extra = [(f"extra_runs[0].{key}", kind, good) for key, kind, good in one_per_annotation(run, {"seed"})]
    fields = [Field("sweep", key, tuple(values_for(key, kind, good))) for key, kind, good in own + top + extra]
    fields.append(Field("sweep", "extra_runs", tuple(extra_runs_values())))
    fields.append(Field("sweep", "preset", tuple(values_for("preset", str | None, GOOD_CHOICES["preset"]))))
    fields.append(Field("sweep", SLURM_TABLE, tuple(slurm_values())))
    return fields


# --- cases --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    target: str  # train | sweep | cli
    fmt: str  # json | toml | yaml | cli
    key: str  # the field, "(file)" for a whole file, the flag for a command line
    kind: str
    shown: str  # the value as written
    expect: str
    content: str | bytes = ""  # the file's text, or the command line
    written: Any = NOT_COMPARED
    suffix: str = ""  # the file's suffix, if not the format's
    setup: tuple[tuple[str, str], ...] = ()  # a command line's files (a name ending in / is a folder)


def document(key: str, leaf: Any) -> dict:
    """The file's table holding `leaf` at `key`."""
    if key.startswith("extra_runs[0]."):
        return {"extra_runs": [{**EXTRA_RUN, **document(key.removeprefix("extra_runs[0]."), leaf)}]}
    head, _, rest = key.partition(".")
    return {head: document(rest, leaf) if rest else leaf}


def field_cases(fields: list[Field], formats: tuple[str, ...]) -> list[Case]:
    cases = []
    for item in fields:
        for value in item.values:
            for fmt in formats:
                if fmt not in value.formats:
                    continue
                try:
                    content = render(document(item.key, value.value), fmt)
                    merged = isinstance(value.value, Merged)
                    shown = _spell_pair(_name(item.key), value.value, fmt) if merged else spell(value.value, fmt)
                except Unspellable:
                    continue
                cases.append(Case(item.target, fmt, item.key, value.kind, shown, value.expect, content, value.written))
    return cases


def file_cases(formats: tuple[str, ...]) -> list[Case]:
    """Whole files that are no table of fields, or break a format's rules."""
    good = {"train": {"depth": 4}, "sweep": {"seeds": 1}}
    cases = []
    for target, table in good.items():
        key, value = next(iter(table.items()))
        texts = {
            "empty": ("", "", ""), "comment-only": (None, "# nothing\n", "# nothing\n"),
            "top-level-list": ("[1]", None, "[1]\n"), "top-level-scalar": ("4", None, "4\n"),
            "null-document": ("null", None, "null\n"), "syntax-error": ("{", "a = \n", "a: [\n"),
            "unknown-field": tuple(render({"no_such_field": 1}, fmt) for fmt in FORMATS),
            "duplicate-key": (f'{{"{key}": {value}, "{key}": {value}}}', f"{key} = {value}\n{key} = {value}\n",
                              f"{key}: {value}\n{key}: {value}\n"),
            "table-twice": (None, "[recipe]\n[recipe]\n", None), "non-string-key": (None, None, "1: 2\n"),
            "multi-document": (None, None, f"{key}: {value}\n---\n{key}: {value}\n"),
            "deep-1e5": ("[" * 10**5, "a = " + "[" * 10**5, "[" * 10**5),
        }
        for kind, spelled in texts.items():
            cases += [Case(target, fmt, "(file)", kind, text[:60], "refuse", text)
                      for fmt, text in zip(FORMATS, spelled) if text is not None and fmt in formats]
        for fmt in formats:
            text = render(table, fmt)
            cases += [Case(target, fmt, "(file)", "not-utf8", "\\xff\\xfe", "refuse", b"\xff\xfe" + text.encode()),
                      Case(target, fmt, "(file)", "bom", "\\ufeff...", "either", "\ufeff" + text),
                      Case(target, fmt, "(file)", "wrong-suffix", ".txt", "refuse", text, suffix=".txt"),
                      Case(target, fmt, "(file)", "upper-suffix", f".{fmt.upper()}", "either", text, suffix=f".{fmt.upper()}")]
    return cases


GOOD_RUN = '{"depth": 2, "width": 64, "epochs": 0.01}'
GOOD_GRID = '{"depths": [2], "widths": [64], "p_bw": [0.0], "seeds": 1, "epochs": 0.01}'
CLI = [  # (field, kind, command line, files): every one must be refused before anything is written
    ("--out", "train-out-file", "train --config run.json --out taken", {"run.json": GOOD_RUN, "taken": "x"}),
    ("--out", "train-out-sweep-dir", "train --config run.json --out grid", {"run.json": GOOD_RUN, "grid/sweep.json": "{}"}),
    ("--out", "train-out-cwd", "train --config run.json --out .", {"run.json": GOOD_RUN}),
    ("--out", "train-out-other-run", "train --config run.json --out run", {"run.json": GOOD_RUN, "run/config.json": "{}"}),
    ("--config", "train-config-missing", "train --config missing.toml --out run", {}),
    ("--config", "train-config-folder", "train --config conf.json --out run", {"conf.json/": ""}),
    ("--config", "train-config-txt", "train --config run.txt --out run", {"run.txt": GOOD_RUN}),
    ("--model-scale", "train-both-sizes", "train --model-scale 1 --depth 4 --out run", {}),
    ("--lr-scale", "train-flag-nan", "train --lr-scale nan --out run", {}),
    ("--epochs", "train-flag-inf", "train --epochs inf --out run", {}),
    ("--seq-len", "train-flag-2**64", f"train --seq-len {2**64} --out run", {}),
    ("--depth", "train-flag-zero", "train --depth 0 --out run", {}),
    ("--tokenizer", "train-flag-bad-choice", "train --tokenizer bpe:1 --out run", {}),
    ("--out", "sweep-out-run-dir", "sweep --config grid.json --out run", {"grid.json": GOOD_GRID, "run/config.json": "{}"}),
    ("--out", "sweep-out-file", "sweep --config grid.json --out taken", {"grid.json": GOOD_GRID, "taken": "x"}),
    ("--out", "sweep-out-cwd", "sweep --config grid.json --out .", {"grid.json": GOOD_GRID}),
    ("--out", "sweep-out-other-spec", "sweep --config grid.json --out grid",
     {"grid.json": GOOD_GRID, "grid/sweep.json": '{"spec": {"seeds": 7}}'}),
    ("--out", "sweep-no-out", "sweep --config grid.json", {"grid.json": GOOD_GRID}),
    ("--shard", "sweep-shard-1/0", "sweep --config grid.json --dry-run --shard 1/0", {"grid.json": GOOD_GRID}),
    ("--seeds", "sweep-seeds-1e9", "sweep --dry-run --seeds 1000000000", {}),
    ("--p-bw", "sweep-p-bw-repeated", "sweep --dry-run --p-bw 0 0", {}),
    ("--lease-minutes", "sweep-lease-nan", "sweep --dry-run --lease-minutes nan", {}),
    ("--preset", "sweep-preset-unknown", "sweep --dry-run --preset no-such-preset", {}),
    ("--model-scales", "sweep-both-sizes", "sweep --dry-run --model-scales 1 --depths 4", {}),
    ("--nproc-per-run", "sweep-nproc-zero", "sweep --config grid.json --out grid --nproc-per-run 0", {"grid.json": GOOD_GRID}),
]


def cli_cases() -> list[Case]:
    return [Case("cli", "cli", flag, kind, line, "refuse", line, setup=tuple(files.items())) for flag, kind, line, files in CLI]


# --- running and classifying a case -------------------------------------------------------------


class ProbeTimeout(BaseException):
    """The case ran past its time limit (a BaseException, which `except Exception` lets through)."""


class ConfigChanged(Exception):
    """The dry run found the built config different from the one rebuilt from its saved JSON."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise ProbeTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def classify(call: Callable[[], Any], expect: str, written: Any, limit_s: float, names: tuple[str, ...]) -> tuple[str, str]:
    """(outcome, message) of calling `call`, which builds a config and returns the value it holds
    where the case wrote `written` (see the module's docstring)."""
    try:
        with time_limit(limit_s):
            held = call()
    except ProbeTimeout as timeout:
        return "hang", f"still running after {limit_s:g} s{_where(timeout)}"
    except ConfigChanged as changed:
        return "accepted-changed", str(changed)
    except ValueError as error:
        text = str(error)
        if "\n" in text.strip():
            return "refused-multiline", text
        return ("refused" if any(name in text for name in names) else "refused-unnamed"), text
    except Exception as error:  # noqa: BLE001 - every other exception is what the probe counts
        return "traceback", f"{type(error).__name__}: {error}{_where(error)}"
    if written is not NOT_COMPARED and held is not NOT_COMPARED and not same(held, written):
        return "accepted-changed", f"holds {_show(held)}, written {_show(written)}"
    return ("accepted-bad", f"holds {_show(held)}") if expect == "refuse" else ("accepted", "")


def same(held: Any, written: Any) -> bool:
    """Whether a config's value is the one written, normalised as configs normalise (an integer in
    a float field is a float, a list a tuple, a table the nested config)."""
    if dataclasses.is_dataclass(held) and isinstance(written, dict):
        return all(hasattr(held, key) and same(getattr(held, key), value) for key, value in written.items())
    if isinstance(held, tuple) and isinstance(written, (list, tuple)):
        return len(held) == len(written) and all(same(a, b) for a, b in zip(held, written))
    if isinstance(held, float) and isinstance(written, (int, float)) and not isinstance(written, bool):
        return held == written or (math.isnan(held) and math.isnan(written))
    return type(held) is type(written) and held == written


def _where(error: BaseException) -> str:
    """Where the exception was raised, outside this script: ' (at configure.py:123)'."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if Path(frame.filename).name != Path(__file__).name]
    return f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def attribute(value: Any, key: str) -> Any:
    """The value at a dotted key (`extra_runs[0].recipe.lr_scale`) of a config."""
    for part in re.findall(r"[^.\[\]]+", key):
        value = value[int(part)] if part.isdigit() else getattr(value, part)
    return value


def train_value(path: Path, key: str) -> Any:
    config = build_train_config(path)
    check_saved(config)
    return NOT_COMPARED if key == "(file)" else attribute(config, key)


def sweep_value(path: Path, key: str) -> Any:
    spec = build_sweep_spec(file=path)
    for config in spec.configs():
        check_saved(config)
    json.dumps(spec.to_dict())  # sweep.json's spec
    head = re.split(r"[.\[]", key)[0]
    if key == "(file)" or head == "preset":
        return NOT_COMPARED
    if head == SLURM_TABLE:
        return slurm_options(path)
    names = {FILE_KEYS.get(item.name, item.name): item.name for item in dataclasses.fields(SweepSpec)}
    return attribute(spec, names[head] + key[len(head):]) if head in names else attribute(spec.base, key)


def check_saved(config: TrainConfig) -> None:
    """The dry run: what a run computes from its config before training, and the config it saved
    (config.json) rebuilding the same config."""
    config.num_params()
    run_id(config)
    config_id(config)
    saved = json.dumps(config.to_dict(), sort_keys=True)
    rebuilt = json.dumps(TrainConfig.from_dict(json.loads(saved)).to_dict(), sort_keys=True)
    if rebuilt != saved:
        raise ConfigChanged(f"config.json rebuilds another config: {saved[:40]} -> {rebuilt[:40]}")


BUILDERS = {"train": train_value, "sweep": sweep_value}


def run_file_case(case: Case, folder: Path, limit_s: float) -> tuple[str, str]:
    path = folder / f"{case.target}{case.suffix or '.' + case.fmt}"
    if isinstance(case.content, bytes):
        path.write_bytes(case.content)
    else:
        path.write_text(case.content, encoding="utf-8")
    names = (str(path),) if case.key == "(file)" else (str(path), case.key, _name(case.key))
    outcome, message = classify(lambda: BUILDERS[case.target](path, case.key), case.expect, case.written, limit_s, names)
    path.unlink(missing_ok=True)
    return outcome, message.replace(str(folder), "<tmp>")


def run_cli_case(case: Case, folder: Path, limit_s: float) -> tuple[str, str]:
    """A command line through fwbw.cli.main in a folder of its own (the current directory meanwhile)."""
    from fwbw import cli

    home = Path(tempfile.mkdtemp(prefix=case.kind.replace("/", "_") + "-", dir=folder))
    for name, text in case.setup:
        (home / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            (home / name).mkdir()
        else:
            (home / name).write_text(text)
    before = _files(home)
    stderr = io.StringIO()
    with _inside(home), contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        outcome, message = classify(lambda: _exit_code(cli.main, case.content.split()), case.expect, NOT_COMPARED, limit_s, ())
    written = sorted(_files(home) - before)
    return _cli_outcome(outcome, message, stderr.getvalue().strip(), written)


def _cli_outcome(outcome: str, message: str, stderr: str, written: list[str]) -> tuple[str, str]:
    if outcome == "accepted":  # exit status 0
        return "accepted", stderr[-120:]
    if outcome != "refused-unnamed":  # an exception escaped, or a hang
        return outcome, message
    if "\n" in stderr:
        return "refused-multiline", stderr
    if not stderr:
        return "refused-unnamed", f"{message}, nothing on stderr"
    return ("refused-wrote", f"wrote {', '.join(written)[:60]}: {stderr}") if written else ("refused", stderr)


def _exit_code(main: Callable[[list[str]], int], argv: list[str]) -> Any:
    """main's exit status; a non-zero one (argparse's SystemExit too) as the ValueError a refusal is."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    if code:
        raise ValueError(f"exit status {code}")
    return NOT_COMPARED


@contextlib.contextmanager
def _inside(folder: Path):
    """Run in `folder`, FWBW_DEBUG unset (it re-raises errors), and SIGTERM's handler kept (fwbw sweep sets its own)."""
    cwd, debug, sigterm = Path.cwd(), os.environ.pop("FWBW_DEBUG", None), signal.getsignal(signal.SIGTERM)
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(cwd)
        signal.signal(signal.SIGTERM, sigterm)
        if debug is not None:
            os.environ["FWBW_DEBUG"] = debug


def _files(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


# --- the probe ----------------------------------------------------------------------------------


@dataclass
class Row:
    case: Case
    outcome: str
    message: str
    defect: str = field(init=False)

    def __post_init__(self) -> None:
        good_refused = self.case.expect == "accept" and self.outcome.startswith("refused")
        self.defect = self.outcome if self.outcome in DEFECTS else "good value refused" if good_refused else ""


def all_cases(formats: tuple[str, ...], fields: set[str] | None, cli: bool) -> list[Case]:
    cases = field_cases(train_fields() + sweep_fields(), formats) + file_cases(formats)
    cases += cli_cases() if cli else []
    return [case for case in cases if fields is None or case.key in fields]


def probe(cases: list[Case], limit_s: float = LIMIT_S) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="probe-") as name:
        folder = Path(name)
        for case in cases:
            rows.append(Row(case, *run_case(case, folder, limit_s)))
    return rows


def run_case(case: Case, folder: Path, limit_s: float) -> tuple[str, str]:
    """The case's outcome; a hang is tried once more (a loaded machine can stall any case), and
    counted only if it hangs again."""
    run = run_cli_case if case.target == "cli" else run_file_case
    outcome, message = run(case, folder, limit_s)
    if outcome == "hang":
        outcome, message = run(case, folder, limit_s)
        message += " (tried twice)" if outcome == "hang" else " (on a second try, after a first one hung)"
    return outcome, message


def to_csv(rows: list[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["target", "format", "field", "kind", "value", "expect", "outcome", "defect", "message"])
    for row in rows:
        case = row.case
        message = " ".join(row.message.split())[:120]
        shown = case.shown.encode("unicode_escape").decode("ascii")[:60]  # on one line: a newline shown as \n
        writer.writerow([case.target, case.fmt, case.key, case.kind, shown, case.expect, row.outcome, row.defect, message])
    return buffer.getvalue()


def counts_table(rows: list[Row], column: Callable[[Row], str], title: str) -> str:
    """Outcomes (rows) by `column` (columns), with totals, as markdown."""
    columns = list(dict.fromkeys(column(row) for row in rows))
    counts = collections.Counter((row.outcome, column(row)) for row in rows)
    lines = [f"| outcome | {' | '.join(columns)} | total |", "|---" * (len(columns) + 2) + "|"]
    for outcome in OUTCOMES:
        cells = [counts[outcome, name] for name in columns]
        lines.append(f"| {outcome} | {' | '.join(map(str, cells))} | {sum(cells)} |")
    totals = [sum(counts[outcome, name] for outcome in OUTCOMES) for name in columns]
    lines.append(f"| **total** | {' | '.join(map(str, totals))} | {sum(totals)} |")
    return f"{title}\n\n" + "\n".join(lines)


def defect_lines(rows: list[Row]) -> list[str]:
    """Each defect once per (target, field, kind, outcome), with the formats it showed in."""
    grouped: dict[tuple, list[Row]] = {}
    for row in rows:
        if row.defect:
            grouped.setdefault((row.case.target, row.case.key, row.case.kind, row.defect), []).append(row)
    return [f"- {target} `{key}` {kind} ({', '.join(row.case.fmt for row in found)}): **{defect}**: "
            f"{' '.join(found[0].message.split())[:160]}" for (target, key, kind, defect), found in grouped.items()]


def report(rows: list[Row], seconds: float) -> str:
    by_format = counts_table(rows, lambda row: row.case.fmt, "Outcomes by format")
    by_target = counts_table(rows, lambda row: row.case.target, "Outcomes by target")
    defects = defect_lines(rows) or ["(none)"]
    return (f"{len(rows)} cases in {seconds:.0f} s\n\n{by_format}\n\n{by_target}\n\n"
            f"Defects ({sum(1 for row in rows if row.defect)} cases)\n\n" + "\n".join(defects) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the CSV of every case")
    parser.add_argument("--fields", help="only these fields, comma-separated (recipe.lr_scale, (file), --out)")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--limit-s", type=float, default=LIMIT_S, help="a case's time limit")
    parser.add_argument("--no-cli", action="store_true", help="leave out the command lines")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    fields = set(args.fields.split(",")) if args.fields else None
    formats = tuple(fmt for fmt in FORMATS if fmt in args.formats.split(","))
    start = time.monotonic()
    rows = probe(all_cases(formats, fields, not args.no_cli), args.limit_s)
    atomic_write_text(args.out, to_csv(rows))
    print(report(rows, time.monotonic() - start))
    return rows


if __name__ == "__main__":
    main()
