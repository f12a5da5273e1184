"""Codec registry: one module per method, each with its `CODEC` (see base.py), imported when first asked for."""

from __future__ import annotations

import importlib

from .base import Codec

_MODULES = {"decoquant": "decoquant", "rtn": "rtn", "kivi": "kivi", "rotation": "rotation", "turboquant": "turboquant"}


def get_codec(method: str) -> Codec:
    if method not in _MODULES:
        raise ValueError(f"method={method!r} has no codec; allowed values: {sorted(_MODULES)}")
    return importlib.import_module(f"{__name__}.{_MODULES[method]}").CODEC
