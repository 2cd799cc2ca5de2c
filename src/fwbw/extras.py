"""Optional dependencies, installed by the package's extras and imported only when used."""

from __future__ import annotations

import importlib
from types import ModuleType


def import_extra(module: str, extra: str, feature: str) -> ModuleType:
    """The optional dependency `module`, or a one-line RuntimeError saying that `feature` (the
    option that needs it) needs the extra `extra`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RuntimeError(f"{feature} needs the '{extra}' extra: pip install 'fwbw[{extra}]'") from None
