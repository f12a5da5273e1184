"""Pieces the GPU benchmarks share: random outlier-heavy KV, filling a model's cache with it, and timing
decode steps with CUDA events."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

FILL_CHUNK = 4096  # tokens per cache update while filling (bounds the transient fp16 copy)


def random_kv(batch: int, heads: int, tokens: int, head_dim: int, device, gen: torch.Generator):
    """fp16 keys and values [batch, heads, tokens, head_dim]; the keys with one outlier channel (as real keys)."""
    k = torch.randn(batch, heads, tokens, head_dim, device=device, dtype=torch.float16, generator=gen)
    k[..., 5] *= 20
    v = torch.randn(batch, heads, tokens, head_dim, device=device, dtype=torch.float16, generator=gen)
    return k, v


def fill(cache, model, batch: int, context: int, devices: Sequence[torch.device], heads: int | None = None) -> None:
    """Every layer's cache with `context` tokens of `random_kv` (layer l on devices[l], seeded by l), fed in
    chunks of FILL_CHUNK tokens: a compressed cache compresses them block by block, as a prefill would.
    heads: kv heads per layer (default the model's; fewer on a tensor-parallel rank)."""
    cfg = model.config
    heads = heads or cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for layer, device in enumerate(devices):
        gen = torch.Generator(device=device).manual_seed(layer)
        for start in range(0, context, FILL_CHUNK):
            k, v = random_kv(batch, heads, min(FILL_CHUNK, context - start), head_dim, device, gen)
            cache.update(k, v, layer)
            del k, v


def timed_steps(step: Callable[[], None], steps: int, warmup: int = 2, sync: Callable[[], None] | None = None) -> float:
    """Milliseconds per call of `step` over `steps` calls, after `warmup` untimed ones (kernel compilation, the
    allocator, a graph capture), by CUDA events; `sync` (e.g. a barrier across ranks) runs before timing."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for i in range(steps + warmup):
        if i == warmup:
            torch.cuda.synchronize()
            if sync is not None:
                sync()
            start.record()
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps
