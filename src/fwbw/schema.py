"""Config errors: a bad value raises `ConfigError` with one line that names the field."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is invalid; the message names the field."""


def require(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field_name}: {message}")
