"""The prefill cost of a compressed cache (`python -m decoquant.bench.e2e_decode --prefill 4096,16384`): one
sequence's prefill with DynamicCache against DecoQuantCache, compression included, overlapped or not."""

from __future__ import annotations

import torch

from ..integrations.transformers import cache_kwargs
from .e2e_decode import decoquant_config


@torch.no_grad()
def prefill_cost(model, device, contexts, presets=("paper",), bits=4, runs=5):
    """Prefill time of one sequence with DynamicCache vs DecoQuantCache (compression included), with the
    compression overlapped with the following layers (the default) and without: the median of `runs` timed
    runs after a warm-up, per context and preset. Gated: both DecoQuantCaches must hold the same packed
    blocks."""
    import decoquant as dq
    from transformers import DynamicCache

    # the fused caches' packed buffers need the fused attention (a prefill runs SDPA through it, as DynamicCache's)
    dq.enable_fused_attention(model)

    def timed(make_cache, ids):
        times = []
        for _ in range(runs + 1):  # the first run warms up
            cache = make_cache()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            model(input_ids=ids, **cache_kwargs(cache), logits_to_keep=1)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times[1:])[runs // 2], cache

    def same_blocks(a, b) -> bool:
        return all(torch.equal(x, y) for la, lb in zip(a.layers, b.layers)
                   for ba, bb in zip(la.store.storage.buffers, lb.store.storage.buffers)
                   for x, y in zip(ba.tensors, bb.tensors))

    rows = []
    for ctx in contexts:
        ids = torch.randint(0, model.config.vocab_size, (1, ctx), device=device)
        fp16, _ = timed(lambda: DynamicCache(config=model.config), ids)
        for preset in presets:
            cfg = decoquant_config(f"decoquant:{preset}", bits)
            first = None
            for overlap in (True, False):
                ms, cache = timed(lambda: dq.DecoQuantCache(cfg, model.config, fused=True, overlap=overlap), ids)
                first = cache if first is None else first
                rows.append(dict(context=ctx, preset=preset, bits=bits, overlap=overlap, fp16_ms=fp16,
                                 decoquant_ms=ms, overhead=ms / fp16 - 1, same_blocks=same_blocks(first, cache)))
                print(f"| {ctx} | {preset} | {'yes' if overlap else 'no'} | {fp16:.1f} | {ms:.1f} | "
                      f"{100 * rows[-1]['overhead']:+.1f}% | {rows[-1]['same_blocks']} |", flush=True)
            del first, cache
    return rows
