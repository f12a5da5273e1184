"""Capture the real KV cache (post-RoPE keys, as a transformers cache sees them) of a model."""

from __future__ import annotations

import torch
from ..integrations.transformers import cache_kwargs


@torch.no_grad()
def capture_kv(model, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run one forward pass; return per layer (keys, values), each [batch, kv_heads, tokens, head_dim]."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=input_ids.to(model.device), **cache_kwargs(cache), use_cache=True)
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
