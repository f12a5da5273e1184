"""Codec registry: one module per method, each with its `CODEC` (see base.py), imported when first asked for."""

from __future__ import annotations

import importlib

from ..config import METHODS
from .base import Codec

CODEC_METHODS = tuple(m for m in METHODS if m != "none")  # each has a module of its name here


def get_codec(method: str) -> Codec:
    if method not in CODEC_METHODS:
        raise ValueError(f"method={method!r} has no codec; allowed values: {sorted(CODEC_METHODS)}")
    return importlib.import_module(f"{__name__}.{method}").CODEC
