"""The plugin's one config: read from vLLM's `additional_config={"decoquant": {...}}` (the server's
`--additional-config`) or else the `DECOQUANT_VLLM` environment variable (JSON), both holding `DecoQuantConfig`
fields (e.g. `{"bits": 2}`, `{"method": "none"}`, `{"preset": "paper"}`); neither: the library's default
(`model_config.resolve_config`). A paged cache keeps exactly its filling page in full precision, so residual_length
is always block_size."""

from __future__ import annotations

import json
import os
from functools import lru_cache

import torch

from ...config import DecoQuantConfig
from .pages import PageFormat

ENV = "DECOQUANT_VLLM"
SECTION = "decoquant"


_recorded: dict | None = None  # the options of the engine whose layers were built last in this process


def plugin_options() -> dict:
    """The options of the engine being built: read while vLLM's config is current (the layers' construction), and
    remembered for the calls vLLM makes outside it (the page size, the forwards)."""
    global _recorded
    from vllm.config import get_current_vllm_config_or_none

    current = get_current_vllm_config_or_none()
    if current is None and _recorded is not None:
        return _recorded
    extra = (current.additional_config if current is not None else None) or {}
    if SECTION in extra:
        found, source = extra[SECTION], f"additional_config[{SECTION!r}]"
    elif os.environ.get(ENV):
        try:
            found, source = json.loads(os.environ[ENV]), ENV
        except json.JSONDecodeError as e:
            raise ValueError(f"{ENV} must hold a JSON object of DecoQuantConfig fields: {e}") from None
    else:
        found, source = {}, ""
    if not isinstance(found, dict):
        raise ValueError(f"{source} must be a dict of DecoQuantConfig fields, got {type(found).__name__}")
    if current is not None:
        _recorded = dict(found)
    return dict(found)


def config_from(options: dict, head_dim: int) -> DecoQuantConfig:
    """The DecoQuantConfig of the plugin's options for layers of `head_dim`."""
    from ..model_config import resolve_config

    options = dict(options)
    if "residual_length" in options and options["residual_length"] != options.get("block_size", 128):
        raise ValueError("residual_length: a paged cache keeps exactly the filling page in full precision; "
                         "leave residual_length out (it is block_size)")
    config = resolve_config(None, options, head_dim)
    return config.replace(residual_length=config.block_size)


@lru_cache(maxsize=None)
def _config(frozen: str, head_dim: int) -> DecoQuantConfig:
    return config_from(json.loads(frozen), head_dim)


def plugin_config(options: dict, head_dim: int = 128) -> DecoQuantConfig:
    """The config of `options` for layers of `head_dim` (the block size does not depend on it)."""
    return _config(json.dumps(options, sort_keys=True), head_dim)


@lru_cache(maxsize=None)
def _format(frozen: str, kv_heads: int, head_dim: int, dtype: torch.dtype) -> PageFormat:
    return PageFormat(_config(frozen, head_dim), kv_heads, head_dim, dtype)


def page_format(options: dict, kv_heads: int, head_dim: int, dtype: torch.dtype, block_size: int) -> PageFormat:
    """The page format of a layer; `block_size` is the engine's page size in tokens, which must be the config's."""
    fmt = _format(json.dumps(options, sort_keys=True), kv_heads, head_dim, dtype)
    if block_size != fmt.block_size:
        raise ValueError(f"vLLM's block_size={block_size} must equal the DecoQuant block_size={fmt.block_size} "
                         f"(one page is one compressed block): pass block_size={fmt.block_size} to vLLM")
    return fmt
