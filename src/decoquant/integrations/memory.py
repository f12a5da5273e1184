"""`DecoQuantCache.memory_report`: bytes held by part, summed over a cache's layers."""

from __future__ import annotations

from ..cache import CompressedKVStore


def memory_report(layers: list) -> dict[str, int]:
    """Summed over `layers` (a `CompressedKVStore` per compressed layer, transformers' own layer objects for the
    others, which hold their keys and values exactly)."""
    out = {"compressed_blocks": 0, "exact_tokens": 0, "total": 0, "dynamic_cache": 0, "fp16_equivalent": 0,
           "exact_elements": 0, "compressed_elements": 0, "sink_elements": 0, "fallback_blocks": 0,
           "exact_blocks": 0, "decoded_copy": 0}
    for layer in layers:
        if isinstance(layer, CompressedKVStore):
            mem = layer.memory()
            for key in out:
                out[key] += mem[key]
        elif layer.is_initialized and getattr(layer, "keys", None) is not None and layer.keys.numel():
            exact = layer.keys.numel() * layer.keys.element_size() * 2
            out["exact_elements"] += layer.keys.numel() * 2
            out["exact_tokens"] += exact
            out["total"] += exact
            out["dynamic_cache"] += exact
            out["fp16_equivalent"] += layer.keys.numel() * 2 * 2
    return out
