"""What the transformers adapter reads from a model and from transformers itself: the cache argument's name,
the attention a config selects, head_dim, which layers transformers caches how, and the default config's
group size for a head_dim."""

from __future__ import annotations

import warnings

from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from ..config import DecoQuantConfig
from ..options import DEFAULT_PRESET, DEFAULT_SINK_TOKENS


def _cache_argument() -> str:
    """The name the forwards and `generate` take a cache under: `cache` since transformers 5.24 (the old
    `past_key_values` warns there), `past_key_values` before."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return "cache" if (major, minor) >= (5, 24) else "past_key_values"


CACHE_ARG = _cache_argument()


def cache_kwargs(cache) -> dict:
    """{CACHE_ARG: cache}, for `model(**inputs, **cache_kwargs(cache))` on every supported transformers."""
    return {CACHE_ARG: cache}


def attention_implementation(model_config) -> str | None:
    """The attention a model config selects (transformers keeps it in `_attn_implementation`)."""
    return getattr(model_config, "_attn_implementation", None)


def text_config(model_config):
    cfg = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError("DecoQuantCache supports decoder-only causal LMs; got an encoder-decoder model config")
    if not getattr(cfg, "num_hidden_layers", None) or not getattr(cfg, "num_attention_heads", None):
        raise ValueError("model_config must define num_hidden_layers and num_attention_heads "
                         f"(got a {type(cfg).__name__})")
    return cfg


def head_dim_of(cfg) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def reference_layers(model_config) -> list:
    """The layers transformers' own DynamicCache builds for this model: it knows every way a config marks
    sliding-window or chunked layers (`layer_types`, a bare `sliding_window` as on Mistral and Phi-3, Qwen2's
    `use_sliding_window` / `max_window_layers`, `attention_chunk_size`) and layers that hold no cache."""
    layers = DynamicCache(config=model_config).layers
    for i, layer in enumerate(layers):
        if not (type(layer) is DynamicLayer or isinstance(layer, DynamicSlidingWindowLayer)
                or type(layer).__name__ == "DummyLayer"):
            raise ValueError(f"layer {i} of this model needs a {type(layer).__name__} cache, which DecoQuantCache "
                             "does not support; it compresses full-attention layers and keeps sliding-window "
                             "layers as transformers does")
    return layers


def fit_head_dim(config: DecoQuantConfig, head_dim: int) -> DecoQuantConfig:
    """The default config for a head_dim its group size does not divide: the same recipe (preset=None) with
    the largest group size <= 16 that divides head_dim, announced with a warning."""
    try:
        config.check_head_dim(head_dim)
        return config
    except ValueError:
        pass
    g = max((d for d in range(2, 17) if head_dim % d == 0), default=None)
    if g is None:
        raise ValueError(f"head_dim={head_dim} has no even group size <= 16; pass a DecoQuantConfig with "
                         "method='kivi' or 'rtn'")
    fitted = config.replace(preset=None, group_size=g)
    warnings.warn(f"head_dim={head_dim} is not a multiple of {config.group_size}: the default "
                  f"{config.label()} runs with group_size={g} ({fitted.label()}); the fused GPU kernels need 16 "
                  "or 32", stacklevel=3)
    return fitted


def resolve_config(config: DecoQuantConfig | None, options: dict, head_dim: int) -> DecoQuantConfig:
    """The config a cache runs: `config` with `options` (config fields) applied; config None picks the default,
    the frontier's preset `DecoQuantConfig(preset="channel64-token", sink_tokens=4)` (docs/results/frontier.md),
    or with `method=` another codec, that codec's own defaults with 4 sink tokens; a default whose group size
    does not divide head_dim is fitted to it (`fit_head_dim`)."""
    if config is not None:
        return config.replace(**options) if options else config
    if options.get("method", "decoquant") != "decoquant":  # another codec: its own defaults
        config = DecoQuantConfig(sink_tokens=DEFAULT_SINK_TOKENS, **options)
    else:
        config = DecoQuantConfig(preset=DEFAULT_PRESET, sink_tokens=DEFAULT_SINK_TOKENS)
        config = config.replace(**options) if options else config
    return fit_head_dim(config, head_dim)
