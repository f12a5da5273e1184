"""Decode attention over [compressed blocks | exact window] and block dequantization: backend choice
and partial merging."""

from __future__ import annotations

from functools import lru_cache

import torch

from .layout import PackedKV
from .reference import decode_attention_reference, dequantize_packed

BACKENDS = ("auto", "triton", "torch")


def _finite_max(x: torch.Tensor) -> torch.Tensor:
    """max over the last dim, keepdim; an all-masked row (max -inf) gets the lowest finite value so that
    exp(x - max) stays 0 there instead of NaN."""
    return x.amax(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).min)


def window_partials(q: torch.Tensor, window_k: torch.Tensor, window_v: torch.Tensor, sm_scale: float,
                    valid: torch.Tensor | None = None):
    """Exact attention partials over the fp16 window: (o [B, Hq, 1, D], m [B, Hq, 1], l [B, Hq, 1]).
    valid: bool [B, W] (None = every window token is attended)."""
    b, hq, d = q.shape
    group = hq // window_k.shape[1]
    qg = q.float().reshape(b, window_k.shape[1], group, d)
    scores = torch.einsum("bhgd,bhtd->bhgt", qg, window_k.float()) * sm_scale
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    m = _finite_max(scores)  # an all-masked window row keeps p = 0 and weighs nothing in the merge
    p = torch.exp(scores - m)
    o = torch.einsum("bhgt,bhtd->bhgd", p, window_v.float())
    return o.reshape(b, hq, 1, d), m.reshape(b, hq, 1), p.sum(-1).reshape(b, hq, 1)


def merge_partials(o: torch.Tensor, m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Combine split partials (o [B, Hq, S, D] unnormalised, m, l [B, Hq, S]) -> [B, Hq, D]. Few ops: at
    one decode step per layer their launches, not their work, are the cost."""
    w = torch.exp(m - _finite_max(m))
    return torch.einsum("bhs,bhsd->bhd", w, o) / torch.einsum("bhs,bhs->bh", w, l).unsqueeze(-1)


@lru_cache(maxsize=64)
def _whole_cache(batch: int, tokens: int, device: torch.device):
    """(kv_start, kv_len) that attend every compressed token; cached (read-only) since a decode step
    calls this once per layer."""
    return (torch.zeros(batch, dtype=torch.int32, device=device),
            torch.full((batch,), tokens, dtype=torch.int32, device=device))


def decode_attention(q: torch.Tensor, k: PackedKV, v: PackedKV, sm_scale: float,
                     kv_start: torch.Tensor | None = None, kv_len: torch.Tensor | None = None,
                     window_k: torch.Tensor | None = None, window_v: torch.Tensor | None = None,
                     window_valid: torch.Tensor | None = None, backend: str = "auto",
                     **kernel_options) -> torch.Tensor:
    """softmax(q K^T * sm_scale) V over compressed blocks then the exact window, fp32 [B, Hq, D].

    q [B, Hq, D]; k/v: PackedKV; kv_start/kv_len int [B] bound the attended compressed tokens
    (default: all); window_k/v [B, KVH, W, D], window_valid bool [B, W] (default: all). backend: "triton" (the fused kernel), "torch"
    (the dequantizing reference) or "auto" (triton on CUDA, torch elsewhere).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; allowed values: {BACKENDS}")
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    if backend == "torch":
        return decode_attention_reference(q, k, v, sm_scale, kv_start, kv_len, window_k, window_v, window_valid)
    from .triton.decode_attention import decode_blocks_partials

    b = q.shape[0]
    if kv_start is None or kv_len is None:
        start, length = _whole_cache(b, k.tokens, q.device)
        kv_start = start if kv_start is None else kv_start
        kv_len = length if kv_len is None else kv_len
    o, m, l_ = decode_blocks_partials(q, k, v, sm_scale, kv_start.to(torch.int32), kv_len.to(torch.int32),
                                      **kernel_options)
    if window_k is not None and window_k.shape[2]:
        wo, wm, wl = window_partials(q, window_k, window_v, sm_scale, window_valid)
        o, m, l_ = torch.cat([o, wo], 2), torch.cat([m, wm], 2), torch.cat([l_, wl], 2)
    return merge_partials(o, m, l_)


def dequantize(p: PackedKV, dtype: torch.dtype = torch.float16, backend: str = "auto") -> torch.Tensor:
    """Dense [B, KVH, T, D] K or V from packed blocks (prefill and multi-token steps). backend:
    "triton", "torch" (the reference) or "auto" (triton on CUDA, torch elsewhere)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; allowed values: {BACKENDS}")
    if backend == "auto":  # the Triton kernel reads symmetric per-token scales (the paper preset)
        backend = "triton" if p.codes.is_cuda and p.symmetric and not p.channel_group else "torch"
    if backend == "torch":
        return dequantize_packed(p).to(dtype)
    if not p.symmetric or p.channel_group:
        raise ValueError("the Triton dequantize kernel reads symmetric per-token scales; use backend='torch' or "
                         "'auto' for asymmetric or per-channel blocks")
    from .triton.dequantize import dequantize_packed_triton

    return dequantize_packed_triton(p, dtype)
