"""Config errors and strict types. A bad value raises `ConfigError` with one line that names the
field. Dataclass configs call `check_fields` in `__post_init__`: every value is checked against
its field's annotation (bool, int, float, str, `X | None`, tuple[...], a nested dataclass), so a
config is typed the same way whether Python code or a file built it."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

EMPTY: Mapping = types.MappingProxyType({})
INT64 = 2**63  # an integer field's values lie in [-INT64, INT64): what torch and numpy take


def is_integer(value: Any) -> bool:
    """An int, not a bool (which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


SCALARS = {  # annotation -> (accepts, what it must be, plural)
    bool: (lambda v: isinstance(v, bool), "true or false", "true/false values"),
    int: (is_integer, "an integer", "integers"),
    float: (is_number, "a number", "numbers"),
    str: (lambda v: isinstance(v, str), "a string", "strings"),
}


class ConfigError(ValueError):
    """A config value is invalid; the message names the field. A check that reads several fields
    lists the others as `related` (named the same way), so that an error can be traced to the
    file that gave any of them."""

    def __init__(self, message: str, related: tuple[str, ...] = ()):
        super().__init__(message)
        self.related = tuple(related)

    def inside(self, prefix: str) -> ConfigError:
        """The same error about fields inside a table or list named by `prefix` ("recipe.")."""
        return ConfigError(f"{prefix}{self}", tuple(prefix + name for name in self.related))


def require(condition: bool, field_name: str, message: str, related: tuple[str, ...] = ()) -> None:
    if not condition:
        raise ConfigError(f"{field_name}: {message}", related)


def check_fields(instance: Any, names: Mapping[str, str] = EMPTY) -> None:
    """Type-check every field of a dataclass instance and store its normalised value (an int in a
    float field becomes a float, a list a tuple, a mapping the nested dataclass). Errors name
    the field as `names` spells it (its key in files), else by its own name."""
    hints = _hints(type(instance))
    for item in dataclasses.fields(instance):
        value = typed(getattr(instance, item.name), hints[item.name], names.get(item.name, item.name))
        object.__setattr__(instance, item.name, value)


def from_mapping(cls: type, values: Mapping, names: Mapping[str, str] = EMPTY) -> Any:
    """A `cls` built from plain data keyed by field name (or by `names[field]`); an unknown key is
    refused, every value checked by the class's own `__post_init__`."""
    fields = {names.get(item.name, item.name): item.name for item in dataclasses.fields(cls)}
    unknown = [str(key) for key in values if key not in fields]
    require(not unknown, unknown[0] if unknown else "", "unknown field")
    return cls(**{fields[key]: value for key, value in values.items()})


def typed(value: Any, kind: Any, name: str) -> Any:
    """`value` checked against the annotation `kind` and normalised; a mismatch raises one
    ConfigError naming `name`."""
    inner = _optional_of(kind)
    if inner is not None:
        return None if value is None else typed(value, inner, name)
    if dataclasses.is_dataclass(kind):
        return _dataclass(value, kind, name)
    if typing.get_origin(kind) is tuple:
        return _tuple(value, kind, name)
    accepts, _, _ = SCALARS[kind]
    require(accepts(value), name, f"must be {describe_kind(kind)}, got {show(value)}")
    if kind is int:
        require(-INT64 <= value < INT64, name, f"must fit in 64 bits (below 2**63 in size), got {show(value)}")
    return _finite(value, name) if kind is float else value


def _finite(value: float, name: str) -> float:
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float's range
        number = math.inf
    require(math.isfinite(number), name, f"must be a finite number, got {show(value)}")
    return number


def describe_kind(kind: Any) -> str:
    """What a value of the annotation `kind` must be, in words."""
    inner = _optional_of(kind)
    if inner is not None:
        return f"{describe_kind(inner)} or null"
    if dataclasses.is_dataclass(kind):
        return "a table of fields"
    if typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        plural = "tables of fields" if dataclasses.is_dataclass(items[0]) else SCALARS[items[0]][2]
        return f"a list of {plural}" if items[-1] is Ellipsis else f"a list of {len(items)} {plural}"
    return SCALARS[kind][1]


def differences(saved: Mapping, wanted: Mapping, shown: int) -> str:
    """The first `shown` fields whose values differ between two configs' plain data, as
    'field: saved -> wanted' (nested tables by dotted name, '(none)' for a missing field), joined
    by '; '; '' when they agree."""
    lines = _differences(saved, wanted)
    return "; ".join(lines[:shown]) + ("; ..." if len(lines) > shown else "")


def _differences(saved: Mapping, wanted: Mapping, prefix: str = "") -> list[str]:
    lines = []
    for key in dict.fromkeys([*wanted, *saved]):
        if isinstance(saved.get(key), Mapping) and isinstance(wanted.get(key), Mapping):
            lines += _differences(saved[key], wanted[key], f"{prefix}{key}.")
        elif _as_json(saved, key) != _as_json(wanted, key):
            lines.append(f"{prefix}{key}: {_as_json(saved, key)} -> {_as_json(wanted, key)}")
    return lines


def _as_json(values: Mapping, key: str) -> str:
    return json.dumps(values[key], sort_keys=True) if key in values else "(none)"


def show(value: Any) -> str:
    """A value as a file would spell it, on one short line."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _dataclass(value: Any, kind: type, name: str) -> Any:
    if isinstance(value, kind):
        return value
    require(isinstance(value, Mapping), name, f"must be {describe_kind(kind)}, got {show(value)}")
    try:
        return from_mapping(kind, value)
    except ConfigError as error:
        raise error.inside(f"{name}.") from None


def _tuple(value: Any, kind: Any, name: str) -> tuple:
    items = typing.get_args(kind)
    fixed = items[-1] is not Ellipsis
    fits = isinstance(value, (list, tuple)) and (not fixed or len(value) == len(items))
    require(fits, name, f"must be {describe_kind(kind)}, got {show(value)}")
    return tuple(typed(item, items[0 if not fixed else i], f"{name}[{i}]") for i, item in enumerate(value))


def _optional_of(kind: Any) -> Any:
    """X for the annotation `X | None`, else None."""
    if typing.get_origin(kind) not in (typing.Union, types.UnionType):
        return None
    others = [arg for arg in typing.get_args(kind) if arg is not type(None)]
    return others[0]


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)
