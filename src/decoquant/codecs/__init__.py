"""Codec registry: one module per method, each with `encode` and `decode` (see base.py)."""

from __future__ import annotations

import importlib
from types import ModuleType

_MODULES = {"decoquant": "decoquant", "rtn": "rtn", "kivi": "kivi", "rotation": "rotation", "turboquant": "turboquant"}


def get_codec(method: str) -> ModuleType:
    if method not in _MODULES:
        raise ValueError(f"method={method!r} has no codec; allowed values: {sorted(_MODULES)}")
    return importlib.import_module(f"{__name__}.{_MODULES[method]}")
