"""The config's promise, checked on generated values rather than sampled ones: any JSON value for
any field of a run's config, read from a file, gives a TrainConfig that holds exactly that value
(normalised: an integer in a float field becomes a float, a list a tuple), or a ConfigError whose
one line names the file and a field; never another exception, and never a default in its place."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tempfile
import typing
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from fwbw.model.masks import BW_MASKS
from fwbw.schema import ConfigError
from fwbw.study.configure import build_train_config
from fwbw.training.config import BW_MODES, DEVICES, WD_LOSSES, RecipeConfig, TrainConfig
from fwbw.training.precision import DTYPE_CHOICES

RUN_HINTS = typing.get_type_hints(TrainConfig)
RECIPE_HINTS = typing.get_type_hints(RecipeConfig)
# every field's path in a file: a run's own fields, and the recipe's inside its table
FIELDS = [(item.name,) for item in dataclasses.fields(TrainConfig) if item.name != "recipe"] + [
    ("recipe", item.name) for item in dataclasses.fields(RecipeConfig)
]
FIELD_NAMES = "|".join(re.escape(".".join(path)) for path in FIELDS)
DEFAULTS = {**TrainConfig().to_dict(), **TrainConfig().to_dict()["recipe"]}  # by field name
BEYOND = [2**63, -(2**63) - 1, 2**64, 10**30, 1e30, 1e308, -1e308, math.inf, -math.inf, math.nan]
WORDS = [*BW_MASKS, *BW_MODES, *DEVICES, *DTYPE_CHOICES, *WD_LOSSES, "wiki-sample", "text:", "bpe:300", "gpt2", ""]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 70_000), st.integers(), st.floats(0, 1), st.floats(),
    st.sampled_from(BEYOND), st.sampled_from(WORDS), st.text(max_size=8),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.just({}), st.dictionaries(st.text(max_size=4), SCALARS,
                                                                                        min_size=1, max_size=2))


def kind_of(path: tuple[str, ...]):
    return RUN_HINTS[path[0]] if len(path) == 1 else RECIPE_HINTS[path[1]]


def usual_values(path: tuple[str, ...]) -> list:
    """The field's default (a list for a tuple), and for a text field the words fields take."""
    default = DEFAULTS[path[-1]]
    return [list(default) if isinstance(default, tuple) else default, *(WORDS if kind_of(path) is str else [])]


def normalised(value, kind):
    """`value` as a config holds it, for a value of the annotation `kind` (`X | None` included)."""
    if type(None) in typing.get_args(kind):
        inner = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        return None if value is None else normalised(value, inner)
    if typing.get_origin(kind) is tuple:
        return tuple(normalised(item, typing.get_args(kind)[0]) for item in value)
    return float(value) if kind is float else value


def held(config: TrainConfig, path: tuple[str, ...]):
    return getattr(config, path[0]) if len(path) == 1 else getattr(config.recipe, path[1])


@settings(max_examples=800, deadline=None)
@given(path=st.sampled_from(FIELDS), data=st.data())
def test_any_value_of_any_field_is_held_or_refused_naming_a_field(path, data):
    usual = data.draw(st.booleans(), label="a usual value")  # half of them: else few values are valid
    value = data.draw(st.sampled_from(usual_values(path)) if usual else VALUES, label="value")
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / "run.json"
        file.write_text(json.dumps({path[0]: value} if len(path) == 1 else {path[0]: {path[1]: value}}))
        try:
            config = build_train_config(file)
        except ConfigError as error:
            assert re.match(rf"{re.escape(str(file))}: ({FIELD_NAMES})(\[\d+\])?: ", str(error)), str(error)
            assert "\n" not in str(error)
            return
    expected = normalised(value, kind_of(path))
    assert held(config, path) == expected and type(held(config, path)) is type(expected), (path, value)
