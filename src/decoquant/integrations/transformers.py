"""`DecoQuantCache`: the transformers adapter around `CompressedKVStore`.

A subclass of transformers' `DynamicCache` holding one layer object per decoder layer. Full-attention
layers store compressed blocks; sliding-window layers (e.g. 5 of every 6 layers of Gemma-3) are
bounded by their window, so they are left to transformers' own exact `DynamicSlidingWindowLayer`
and reported as uncompressed in `memory_report()`.
"""

from __future__ import annotations

import warnings

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..cache import CompressedKVStore
from ..config import DecoQuantConfig
from .model_config import (CACHE_ARG, attention_implementation, cache_kwargs, fit_head_dim, resolve_config,  # noqa: F401
                           head_dim_of, reference_layers, text_config)
from .padding import track_padding

CACHE_OPTIONS = ("fused", "overlap", "keep_decoded", "backend")  # DecoQuantCache's own (not config) options


class DecoQuantLayer(DynamicLayer):
    """One full-attention layer whose history lives in a `CompressedKVStore`."""

    is_croppable = True

    def __init__(self, config: DecoQuantConfig, fused: bool = False, overlap: bool = False,
                 keep_decoded: bool = False, backend: str = "auto"):
        super().__init__()
        self.config = config
        self.overlap = overlap  # the cache settles the pending compression (see DecoQuantCache.update)
        self._store_options = dict(fused=fused, backend=backend, keep_decoded=keep_decoded)
        self.store = CompressedKVStore(config, **self._store_options)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = torch.tensor([], dtype=self.dtype, device=self.device)
        self.values = torch.tensor([], dtype=self.dtype, device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.store.append(key_states, value_states, overlap=self.overlap)

    def get_seq_length(self) -> int:
        return self.store.length

    @property
    def fused(self) -> bool:
        return self.store.fused

    def reset(self) -> None:
        self.store = CompressedKVStore(self.config, **self._store_options)
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

    prefetch = offload


class DecoQuantCache(DynamicCache):
    """A compressed KV cache for `model.generate(..., cache=cache)` or a plain forward.

    config: the codec and streaming settings (`DecoQuantConfig`: method, bits, block_size,
        residual_length, sink_tokens, ...).
    model_config: the model's transformers config (layer count, kv heads, head_dim, layer types).
    fused: answer decode steps with packed blocks for the fused attention kernel
        (`decoquant.enable_fused_attention(model)`; True needs the model switched to it). "auto": when the
        model uses that attention and the config can be fused.
    overlap: on CUDA, compress the blocks a prefill fills in each layer on a worker thread and a side
        stream while the following layers run (a layer's fp16 K/V stays until its compression is
        done); False compresses each layer in its own update. The cache holds the same blocks either way.
    keep_decoded: keep the blocks' decoded form between forwards, so each block is decoded once (evaluating
        long texts on the CPU, e.g. `decoquant perplexity`); it costs the history in full precision on top
        of the blocks (`memory_report()["decoded_copy"]`, not counted in the cache's total).
    backend: of every kernel the blocks meet ("auto": Triton on CUDA where it reads the format; "torch": the
        pure-torch reference on any device, e.g. to check the kernels inside a model; "triton").

    Left-padded batches: `set_padding(attention_mask)` before the prefill (`from_model` installs a hook that
    does it from every forward's `attention_mask`) keeps each row's padding and its first `sink_tokens` real
    tokens exact, so no pad position enters a block's scales, zero points or T_S.
    """

    def __init__(self, config: DecoQuantConfig, model_config, fused: bool | str = "auto", overlap: bool = True,
                 keep_decoded: bool = False, backend: str = "auto"):
        if not isinstance(config, DecoQuantConfig):
            raise ValueError(f"config must be a decoquant.DecoQuantConfig, got {type(config).__name__}")
        text = text_config(model_config)
        config.check_head_dim(head_dim_of(text))
        from ..format import Backend, KVFormat

        Backend.parse(backend)
        wanted = attention_implementation(model_config) == "decoquant"
        if fused == "auto":
            problem = KVFormat.of(config).fused_problem()
            fused = wanted and problem is None
            if wanted and not fused:
                warnings.warn(f"{config.label()} cannot be read by the fused attention kernel ({problem}); decode "
                              "steps decompress the history and use SDPA instead", stacklevel=2)
        elif fused not in (True, False):
            raise ValueError(f"fused={fused!r} is not supported; allowed values: True, False, 'auto'")
        elif fused and not wanted:
            raise ValueError(f"fused=True needs the model's attention switched to decoquant's fused kernel "
                             f"(decoquant.enable_fused_attention(model) before building the cache); this model "
                             f"uses {attention_implementation(model_config)!r}. Use fused='auto' or False")
        if overlap not in (True, False):
            raise ValueError(f"overlap={overlap!r} is not supported; allowed values: True, False")
        self.fused = bool(fused)
        self.config = config
        self.head_dim = head_dim_of(text)
        reference = reference_layers(model_config)
        layers = [DecoQuantLayer(config, self.fused, overlap, keep_decoded, backend) if type(layer) is DynamicLayer
                  else layer for layer in reference]
        # Cache.__init__ (not DynamicCache's, which builds its own exact layers from the config)
        super(DynamicCache, self).__init__(layers=layers)
        if not self.compressed_layers and config.method != "none":
            warnings.warn("every layer of this model is a sliding-window (or cache-less) layer, which transformers "
                          "already bounds by its window: DecoQuantCache compresses nothing here", stacklevel=2)
        self._last = max(self.compressed_layers, default=-1)
        self._unsettled: list[int] = []  # layers whose compression was launched in this forward
        self.padding = 0  # leading pad positions of the most padded row (see set_padding)

    @property
    def kv_heads(self) -> int | None:
        """kv heads of the keys the cache holds (None before the first update): read from the tensors, as
        configs name them in many ways (multi-query Falcon keeps one kv head under num_kv_heads)."""
        for layer in self.layers:
            keys = getattr(layer, "keys", None)
            if isinstance(layer, DecoQuantLayer) and layer.store.length:
                return layer.store.kv_heads
            if keys is not None and keys.dim() == 4:
                return keys.shape[1]
        return None

    def set_padding(self, attention_mask: torch.Tensor | None) -> None:
        """Record a left-padded batch's padding from its 2-D attention_mask [batch, tokens] (1 = real token)
        before its prefill: every row's first `sink_tokens` real tokens (and the pads before them) stay
        exact. Has no effect once the cache holds compressed blocks (the exact prefix is fixed by then)."""
        if attention_mask is None or attention_mask.dim() != 2:
            return
        mask = attention_mask.bool()
        lead = (mask.cumsum(1) == 0).sum(1)  # leading pads per row
        if bool((~mask).sum(1).ne(lead).any()):
            warnings.warn("attention_mask masks positions after a row's first real token (right padding?); "
                          "DecoQuantCache keeps left padding out of its blocks, other masked positions are "
                          "compressed with the rest", stacklevel=2)
        pad = int(lead.max()) if mask.numel() else 0
        self.padding = pad
        for i in self.compressed_layers:
            self.layers[i].store.exact_prefix = self.config.sink_tokens + pad

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """transformers' per-layer update (`cache_kwargs` positionally before 5.25, `kwargs=` since). With
        overlap, a prefill's compression in a layer is launched at once and runs beside the following layers;
        the last layer waits for all of them, so a forward returns with its cache complete."""
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"layer_idx={layer_idx} but this cache was built for a model with {len(self.layers)} "
                             "layers: build it from the config of the model it serves")
        if key_states.shape[-1] != self.head_dim and isinstance(self.layers[layer_idx], DecoQuantLayer):
            raise ValueError(f"keys of head_dim={key_states.shape[-1]} but this cache was built for a model with "
                             f"head_dim={self.head_dim}: build it from the config of the model it serves")
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        if isinstance(layer, DecoQuantLayer) and layer.store.pending:
            layer.store.launch()
            self._unsettled.append(layer_idx)
        if layer_idx == self._last:
            for i in self._unsettled:
                self.layers[i].store.settle()
            self._unsettled = []
        return out

    @classmethod
    def from_model(cls, model, config: DecoQuantConfig | None = None, **options) -> "DecoQuantCache":
        """Build a cache for `model`; `options` are config fields (e.g. bits=2) or the cache's own options
        (CACHE_OPTIONS: `fused`, `overlap`, `keep_decoded`, `backend`); a name that is neither raises a
        ValueError naming it.

        config None picks the default: the frontier's preset, `DecoQuantConfig(preset="channel64-token",
        sink_tokens=4)` (best quality per stored bit, docs/results/frontier.md; the fused kernel reads it);
        with `method=` another codec (`"kivi"`, `"none"`, ...) that codec's own defaults, with 4 sink tokens.
        Where its group size (16) does not divide the model's head_dim (e.g. 72), the same recipe with the
        largest group size that does is used, with a warning.

        Installs a forward pre-hook on `model` (once) that hands each forward's attention_mask to the
        DecoQuantCache it is given, so left-padded batches keep their pads and first real tokens exact.

        Under tensor parallelism (`tp_plan="auto"`) each rank holds some of the kv heads and compresses
        them with no communication; the config must then be head-local (`config.head_local`, e.g.
        ts_sharing="head", scale_granularity="token_head") so every rank computes what one GPU would."""
        cache_options = {k: options.pop(k) for k in CACHE_OPTIONS if k in options}
        config = resolve_config(config, options, head_dim_of(text_config(model.config)))
        tp_size = getattr(model, "tp_size", None) or 1
        if tp_size > 1 and not config.head_local:
            raise ValueError(f"the model is tensor-parallel over {tp_size} ranks, but {config.label()} shares "
                             "scales or T_S across kv heads, which the ranks would compute from different heads; use a "
                             "head-local config, e.g. DecoQuantConfig(method='decoquant', ts_sharing='head', "
                             "scale_granularity='token_head')")
        track_padding(model)
        return cls(config, model.config, **cache_options)

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
        """Bytes held by part: compressed blocks, exact tokens (sinks, padding, windows, sliding layers), the
        total; `dynamic_cache`: what transformers' DynamicCache holds for the same tokens in the model's dtype
        (sliding layers bounded the same way); `fp16_equivalent`: the same tokens at 2 bytes per element; and
        element counts. `fallback_blocks`: blocks the codec stored with its simpler fallback (see
        `CompressedKV.fallback_mask`); `exact_blocks`: blocks with rows kept exact (NaN/Inf); `decoded_copy`: the
        decoded history a `keep_decoded` cache holds besides (not in `total`)."""
        from .memory import memory_report

        return memory_report([layer.store if isinstance(layer, DecoQuantLayer) else layer for layer in self.layers])

    def nbytes(self) -> int:
        """Bytes actually held (blocks + exact windows + metadata)."""
        return self.memory_report()["total"]

    def __repr__(self) -> str:
        n_c, n = len(self.compressed_layers), len(self.layers)
        return (f"DecoQuantCache({self.config.label()}, compressed layers {n_c}/{n}, fused={self.fused}, "
                f"seq_len={self.get_seq_length()})")
