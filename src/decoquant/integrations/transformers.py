"""`DecoQuantCache`: the transformers adapter around `CompressedKVStore`.

A subclass of transformers' `DynamicCache` holding one layer object per decoder layer. Full-attention
layers store compressed blocks; sliding-window layers (e.g. 5 of every 6 layers of Gemma-3) are
bounded by their window, so they are left to transformers' own exact `DynamicSlidingWindowLayer`
and reported as uncompressed in `memory_report()`.
"""

from __future__ import annotations

import warnings

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from ..cache import CompressedKVStore
from ..config import DecoQuantConfig

SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


class DecoQuantLayer(DynamicLayer):
    """One full-attention layer whose history lives in a `CompressedKVStore`."""

    is_croppable = True

    def __init__(self, config: DecoQuantConfig, fused: bool = False, defer: bool = False):
        super().__init__()
        self.config = config
        self.fused = fused
        self.defer = defer  # the cache settles the deferred compression (see DecoQuantCache.update)
        self.store = CompressedKVStore(config, fused)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = torch.tensor([], dtype=self.dtype, device=self.device)
        self.values = torch.tensor([], dtype=self.dtype, device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.store.append(key_states, value_states, defer=self.defer)

    def get_seq_length(self) -> int:
        return self.store.length

    def reset(self) -> None:
        self.store = CompressedKVStore(self.config, self.fused)
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:  # transformers' legacy form: the absolute length to keep
            tokens_to_remove = tokens_to_remove - self.store.length
        if tokens_to_remove < 0:
            self.store.crop(-tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.store.length:
            self.store.select_batch(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.store.length:
            b = self._batch()
            self.store.select_batch(torch.arange(b).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.store.length:
            self.store.select_batch(torch.as_tensor(indices).reshape(-1))

    def _batch(self) -> int:
        ref = self.store._reference()
        return 0 if ref is None else ref.shape[0]

    def offload(self):  # the store manages its own tensors; offloading is not supported
        pass

    def prefetch(self):
        pass


def _model_geometry(model_config) -> tuple[list[str], int, int, int | None]:
    cfg = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError("DecoQuantCache supports decoder-only causal LMs; got an encoder-decoder model config")
    n_layers = getattr(cfg, "num_hidden_layers", None)
    n_heads = getattr(cfg, "num_attention_heads", None)
    if not n_layers or not n_heads:
        raise ValueError("model_config must define num_hidden_layers and num_attention_heads "
                         f"(got a {type(cfg).__name__})")
    kv_heads = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    if getattr(cfg, "num_kv_shared_layers", 0):
        raise ValueError("models that share KV across layers (num_kv_shared_layers > 0) are not supported")
    layer_types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * n_layers)
    bad = sorted(set(layer_types) - set(SUPPORTED_LAYER_TYPES))
    if bad:
        raise ValueError(f"unsupported attention layer types {bad}; DecoQuantCache supports {SUPPORTED_LAYER_TYPES}")
    window = getattr(cfg, "sliding_window", None)
    if "sliding_attention" in layer_types and not window:
        raise ValueError("the model has sliding_attention layers but no sliding_window in its config")
    return layer_types, int(kv_heads), int(head_dim), window


class DecoQuantCache(DynamicCache):
    """A compressed KV cache for `model.generate(..., past_key_values=cache)` or a plain forward.

    config: the codec and streaming settings (`DecoQuantConfig`: method, bits, block_size,
        residual_length, sink_tokens, ...).
    model_config: the model's transformers config (layer count, kv heads, head_dim, layer types).
    fused: answer decode steps with packed blocks for the fused attention kernel
        (`decoquant.enable_fused_attention(model)`). "auto": when the model uses that attention
        and the config can be fused.
    overlap: on CUDA, compress the blocks a prefill fills in each layer on a worker thread and a side
        stream while the following layers run (a layer's fp16 K/V stays until its compression is
        done); False compresses each layer in its own update. The cache holds the same blocks either way.
    """

    def __init__(self, config: DecoQuantConfig, model_config, fused: bool | str = "auto", overlap: bool = True):
        if not isinstance(config, DecoQuantConfig):
            raise ValueError(f"config must be a decoquant.DecoQuantConfig, got {type(config).__name__}")
        layer_types, kv_heads, head_dim, window = _model_geometry(model_config)
        config.check_head_dim(head_dim)
        from ..kernels.layout import fused_compatible

        wanted = getattr(model_config, "_attn_implementation", None) == "decoquant"
        if fused == "auto":
            fused = wanted and fused_compatible(config)
            if wanted and not fused:
                warnings.warn(f"{config.label()} cannot be read by the fused attention kernel; decode steps "
                              "decompress the history and use SDPA instead", stacklevel=2)
        elif fused not in (True, False):
            raise ValueError(f"fused={fused!r} is not supported; allowed values: True, False, 'auto'")
        if overlap not in (True, False):
            raise ValueError(f"overlap={overlap!r} is not supported; allowed values: True, False")
        self.fused = bool(fused)
        self.config = config
        self.kv_heads, self.head_dim = kv_heads, head_dim
        layers = [DecoQuantLayer(config, self.fused, overlap) if t == "full_attention"
                  else DynamicSlidingWindowLayer(sliding_window=window) for t in layer_types]
        # Cache.__init__ (not DynamicCache's, which builds its own exact layers from the config)
        super(DynamicCache, self).__init__(layers=layers)
        self._last = max((i for i, t in enumerate(layer_types) if t == "full_attention"), default=-1)
        self._unsettled: list[int] = []  # layers whose compression was launched in this forward

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """transformers' per-layer update. With overlap, a prefill's compression in a layer is launched at
        once and runs beside the following layers; the last layer waits for all of them, so a forward returns
        with its cache complete."""
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        if isinstance(layer, DecoQuantLayer) and layer.store.deferred:
            layer.store.launch()
            self._unsettled.append(layer_idx)
        if layer_idx == self._last:
            for i in self._unsettled:
                self.layers[i].store.settle()
            self._unsettled = []
        return out

    @classmethod
    def from_model(cls, model, config: DecoQuantConfig | None = None, **fields) -> "DecoQuantCache":
        """Build a cache for `model`; `fields` override the config (e.g. bits=2).

        config None picks the default: the frontier's preset, `DecoQuantConfig(preset="channel64-token",
        sink_tokens=4)` (best quality per stored bit, docs/results/frontier.md; the fused kernel reads it).

        Under tensor parallelism (`tp_plan="auto"`) each rank holds some of the kv heads and compresses
        them with no communication; the config must then be head-local (`config.head_local`, e.g.
        ts_sharing="head", scale_granularity="token_head") so every rank computes what one GPU would."""
        config = config or DecoQuantConfig(preset="channel64-token", sink_tokens=4)
        config = config.replace(**fields) if fields else config
        tp_size = getattr(model, "tp_size", None) or 1
        if tp_size > 1 and not config.head_local:
            raise ValueError(f"the model is tensor-parallel over {tp_size} ranks, but {config.label()} shares scales or "
                             "T_S across kv heads, which the ranks would compute from different heads; use a "
                             "head-local config, e.g. DecoQuantConfig(method='decoquant', ts_sharing='head', "
                             "scale_granularity='token_head')")
        return cls(config, model.config)

    # ---------------------------------------------------------------- static (CUDA-graph) decoding
    def make_static(self, steps: int) -> None:
        """Make every layer serve the next `steps` single-token decode steps from fixed addresses, so a
        decode step can be captured in a CUDA graph (see `decoquant.generate`): call after the prefill, then
        `advance()` after every step. Needs fused=True and full-attention layers only; sequences of one
        length (no padding)."""
        if not self.fused:
            raise ValueError("make_static needs a fused cache (fused=True; the model's attention through "
                             "decoquant.enable_fused_attention)")
        if len(self.compressed_layers) != len(self.layers):
            raise ValueError("make_static supports models whose layers are all full attention; this model has "
                             "sliding-window layers")
        for layer in self.layers:
            layer.store.make_static(steps)

    def advance(self) -> bool:
        """Host bookkeeping after one static decode step (outside the graph). False once any layer had to
        leave static mode (a block that could not be compressed safely stays exact): decode on eagerly."""
        ok = [layer.store.advance() for layer in self.layers]
        if not all(ok):
            self.leave_static()
        return all(ok)

    def leave_static(self) -> None:
        for layer in self.layers:
            layer.store.leave_static()

    @property
    def is_static(self) -> bool:
        return any(isinstance(layer, DecoQuantLayer) and layer.store.is_static for layer in self.layers)

    @property
    def compressed_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, DecoQuantLayer)]

    def memory_report(self) -> dict[str, int]:
        """Bytes held by part: compressed blocks, exact tokens (sinks, windows, uncompressed sliding
        layers), the total, the fp16 bytes of the same tokens, and element counts of both parts."""
        out = {"compressed_blocks": 0, "exact_tokens": 0, "total": 0, "fp16_equivalent": 0,
               "exact_elements": 0, "compressed_elements": 0, "sink_elements": 0}
        for layer in self.layers:
            if isinstance(layer, DecoQuantLayer):
                mem = layer.store.memory()
                for key in out:
                    out[key] += mem[key]
            elif layer.is_initialized and layer.keys is not None and layer.keys.numel():
                exact = layer.keys.numel() * layer.keys.element_size() * 2
                out["exact_elements"] += layer.keys.numel() * 2
                out["exact_tokens"] += exact
                out["total"] += exact
                out["fp16_equivalent"] += layer.keys.numel() * 2 * 2
        return out

    def nbytes(self) -> int:
        """Bytes actually held (blocks + exact windows + metadata)."""
        return self.memory_report()["total"]

    def __repr__(self) -> str:
        n_c, n = len(self.compressed_layers), len(self.layers)
        return (f"DecoQuantCache({self.config.label()}, compressed layers {n_c}/{n}, fused={self.fused}, "
                f"seq_len={self.get_seq_length()})")
