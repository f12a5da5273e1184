"""The fused decode path inside transformers: an attention function registered as "decoquant".

`enable_fused_attention(model)` registers it (and transformers' SDPA mask builder under the same
name) and switches the model to it. Steps whose keys/values come from the cache as a `FusedKV`
(single-token decode steps of a fused DecoQuantCache) run `decode_attention` over the packed blocks
and the exact window; every other call (prefill, uncompressed layers) goes to transformers' SDPA.
"""

from __future__ import annotations

import torch

from ..blocks import FusedKV
from ..kernels.attention import decode_attention

NAME = "decoquant"


def _validity(attention_mask: torch.Tensor | None, kv: FusedKV, batch: int):
    """(kv_start [B] for the blocks, window validity [B, W] or None) from a 4-D SDPA mask."""
    if attention_mask is None:
        return None, None
    mask = attention_mask[:, 0, -1, :]  # [B, kv_len]: the (single) query row
    if mask.dtype != torch.bool:
        mask = mask == 0  # additive float mask: 0 = attend
    s, t_c = kv.sink_tokens, kv.compressed_tokens  # token order: [sinks | blocks | window]
    blocks = mask[:, s:s + t_c]
    # left padding: valid compressed tokens are a suffix of the blocks
    kv_start = (t_c - blocks.sum(1)).to(torch.int32)
    return kv_start, torch.cat([mask[:, :s], mask[:, s + t_c:]], 1)  # the exact tokens: sinks, then the window


def decoquant_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                scaling: float | None = None, **kwargs):
    if not isinstance(key, FusedKV):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if query.shape[2] != 1:
        raise ValueError(f"fused decode attention takes one query token, got {query.shape[2]}")
    b, hq, _, d = query.shape
    scale = scaling if scaling is not None else d ** -0.5
    if key.static:  # fixed buffers, device-side bounds; sequences of one length (the mask is the causal one)
        kv_start, kv_len, window_valid = key.kv_start, key.kv_len, key.window_valid
    else:
        (kv_start, window_valid), kv_len = _validity(attention_mask, key, b), None
    out = decode_attention(query[:, :, 0], key.keys, key.values, scale, kv_start=kv_start, kv_len=kv_len,
                           window_k=key.window_keys, window_v=key.window_values, window_valid=window_valid,
                           exact=key.exact, backend=key.backend)
    return out.to(query.dtype)[:, None], None  # [B, 1, Hq, D], no weights


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, decoquant_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def enable_fused_attention(model) -> None:
    """Route `model`'s attention through decoquant's fused decode path (SDPA for everything else)."""
    register()
    model.set_attn_implementation(NAME)
