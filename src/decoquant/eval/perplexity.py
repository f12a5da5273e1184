"""Perplexity through the real compressed cache.

The text is cut into windows of `window` tokens. Each window starts with a fresh cache and is fed
in chunks of `chunk` tokens, so every token attends to the earlier chunks through the cache exactly
as in generation: tokens older than the residual window are read back from compressed blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import DecoQuantConfig
from ..integrations.transformers import cache_kwargs


@dataclass
class PerplexityResult:
    label: str
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token
    tokens: int  # predicted tokens
    windows: int
    bytes_per_token: float  # cache bytes at the end of a window / tokens, exact tokens counted as fp16
    fp16_bytes_per_token: float  # the same cache entirely in fp16
    block_bits: float  # stored bits per element of the compressed blocks alone (nan if none)
    history_bits: float  # the same over everything older than the window: blocks and fp16 sinks


def make_cache(model, config: DecoQuantConfig | None):
    """A DecoQuantCache, or transformers' DynamicCache when config is None (the fp16 baseline)."""
    if config is None:
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
    from ..integrations.transformers import DecoQuantCache

    return DecoQuantCache(config, model.config)


def _cache_bytes(cache) -> tuple[int, int, int, int, int]:
    """(bytes with exact tokens as fp16, fp16 bytes, compressed block bytes, compressed block elements,
    sink elements).
    Exact tokens count 2 bytes per element whatever dtype the (CPU, fp32) model ran in, so the
    numbers are those of the same cache in an fp16 model."""
    if hasattr(cache, "memory_report"):
        mem = cache.memory_report()
        total = mem["compressed_blocks"] + 2 * mem["exact_elements"]
        return total, mem["fp16_equivalent"], mem["compressed_blocks"], mem["compressed_elements"], mem["sink_elements"]
    fp16 = sum(layer.keys.numel() * 2 * 2 for layer in cache.layers if layer.is_initialized)
    return fp16, fp16, 0, 0, 0


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, config: DecoQuantConfig | None, window: int = 1024,
               chunk: int = 128, max_windows: int | None = None, progress=None) -> PerplexityResult:
    """input_ids: [1, N] token ids. config None = the uncompressed DynamicCache baseline."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, tokens], got shape {tuple(input_ids.shape)}")
    if window < 2 or chunk < 1:
        raise ValueError(f"window must be >= 2 and chunk >= 1, got window={window}, chunk={chunk}")
    n_windows = input_ids.shape[1] // window
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"the text has {input_ids.shape[1]} tokens, fewer than one window of {window}")
    device = next(model.parameters()).device
    nll_sum, count, bpt, fp16_bpt, block_bytes, block_elems, sink_elems = 0.0, 0, 0.0, 0.0, 0, 0, 0
    windows = range(n_windows) if progress is None else progress(range(n_windows))
    for w in windows:
        ids = input_ids[:, w * window:(w + 1) * window].to(device)
        cache = make_cache(model, config)
        for start in range(0, window, chunk):
            piece = ids[:, start:start + chunk]
            logits = model(input_ids=piece, **cache_kwargs(cache), use_cache=True).logits.float()
            targets = ids[:, start + 1:start + 1 + piece.shape[1]]
            logits = logits[:, : targets.shape[1]]
            nll_sum += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
            count += targets.numel()
        total, fp16, blocks, elems, sinks = _cache_bytes(cache)
        bpt += total / window
        fp16_bpt += fp16 / window
        block_bytes += blocks
        block_elems += elems
        sink_elems += sinks if elems else 0
    label = "fp16" if config is None else config.label()
    nll = nll_sum / count
    return PerplexityResult(label, math.exp(nll), nll, count, n_windows, bpt / n_windows, fp16_bpt / n_windows,
                            8.0 * block_bytes / block_elems if block_elems else float("nan"),
                            (8.0 * block_bytes + 16.0 * sink_elems) / (block_elems + sink_elems) if block_elems else float("nan"))
