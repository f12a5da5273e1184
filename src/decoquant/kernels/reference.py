"""Pure-torch ground truth for the kernels: dequantize and attend in fp32; the Gram and quantize-pack steps of
block compression."""

from __future__ import annotations

import torch

from ..mpo import two_sites_from_eigh
from ..packing import pack_codes, unpack_codes
from ..quant import quantize_kv
from .layout import PackedKV


def dequantize_packed(p: PackedKV) -> torch.Tensor:
    """PackedKV -> float32 [B, KVH, T, D]."""
    b, h, t, _ = p.codes.shape
    d = p.codes.shape[-1] * 8 // p.bits
    codes = unpack_codes(p.codes, p.bits, d).float() - p.qmax  # [B, H, T, D]
    if p.channel_group:  # [B, H, T / cg, D] -> one row per token
        expand = lambda x: x.float().repeat_interleave(p.channel_group, dim=2)  # noqa: E731
    else:  # [B, S_H, T] -> [B, H, T, 1]
        expand = lambda x: x.float().unsqueeze(-1).expand(b, h, t, 1)  # noqa: E731
    t_l = codes * expand(p.scales)
    if p.zeros is not None:
        t_l = t_l + expand(p.zeros)
    g = p.group_size
    nb = t // p.block_size
    t_l = t_l.reshape(b, h, nb, p.block_size * d // g, g)
    ts = p.ts.float().expand(b, h, nb, g, g)
    return (t_l @ ts).reshape(b, h, t, d)


def gather_pages(p: PackedKV, block_table: torch.Tensor) -> PackedKV:
    """Paged blocks (`layout`: one block per page) -> the per-sequence PackedKV [B, ..., NB * block_size, ...] of
    block_table int [B, NB] (block n of row b is page block_table[b, n]; entries past a row's tokens may name any
    page, and attention masks them)."""
    if p.tokens != p.block_size:
        raise ValueError(f"paged blocks hold one block per page, got {p.tokens} tokens of {p.block_size}-token blocks")
    idx = block_table.long().clamp(0, p.codes.shape[0] - 1)
    b, nb = idx.shape

    def tokens_last(t: torch.Tensor, token_dim: int) -> torch.Tensor:  # [B, NB, *page] -> blocks along token_dim
        t = t[idx].movedim(1, token_dim)  # [B, ..., NB, rows, ...]
        return t.flatten(token_dim, token_dim + 1)

    scales = tokens_last(p.scales, 2)
    zeros = None if p.zeros is None else tokens_last(p.zeros, 2)
    ts = p.ts[idx][:, :, :, 0].movedim(1, 2)  # [B, TS_H, NB, G, G]
    return PackedKV(tokens_last(p.codes, 2), scales, ts, p.bits, p.block_size, p.group_size, zeros,
                    p.channel_group)


def attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, sm_scale: float,
                        valid: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, D]; keys/values [B, KVH, T, D]; valid bool [B, T] -> fp32 [B, Hq, D]."""
    b, hq, d = q.shape
    kvh = keys.shape[1]
    k = keys.float().repeat_interleave(hq // kvh, dim=1)
    v = values.float().repeat_interleave(hq // kvh, dim=1)
    scores = torch.einsum("bhd,bhtd->bht", q.float(), k) * sm_scale
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        v = v.masked_fill(~valid[:, None, :, None], 0.0)  # what is not attended may hold anything, NaN included
    return torch.einsum("bht,bhtd->bhd", scores.softmax(-1), v)


def decode_attention_reference(q: torch.Tensor, k: PackedKV, v: PackedKV, sm_scale: float,
                               kv_start: torch.Tensor | None = None, kv_len: torch.Tensor | None = None,
                               window_k: torch.Tensor | None = None, window_v: torch.Tensor | None = None,
                               window_valid: torch.Tensor | None = None,
                               skip: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step over [compressed blocks | fp16 window].

    q [B, Hq, D]; k, v: PackedKV of T compressed tokens; kv_start/kv_len int [B]: compressed tokens
    t with kv_start <= t < kv_len are attended (left padding, per-sequence lengths); skip int [B, NB'] (NB' >=
    the blocks): block n of row b is not attended where skip[b, n] is set (its rows are stored exact);
    window_k/v [B, KVH, W, D] exact recent tokens, window_valid bool [B, W] which of them are
    attended (default: all). Returns fp32 [B, Hq, D].
    """
    keys, values = dequantize_packed(k), dequantize_packed(v)
    b, t = q.shape[0], keys.shape[2]
    pos = torch.arange(t, device=q.device)[None, :]
    valid = torch.ones(b, t, dtype=torch.bool, device=q.device)
    if kv_start is not None:
        valid &= pos >= kv_start[:, None]
    if kv_len is not None:
        valid &= pos < kv_len[:, None]
    if skip is not None:
        valid &= ~skip[:, : t // k.block_size].bool().repeat_interleave(k.block_size, 1)
    if window_k is not None:
        keys = torch.cat([keys, window_k.float()], dim=2)
        values = torch.cat([values, window_v.float()], dim=2)
        w_ok = (torch.ones(b, window_k.shape[2], dtype=torch.bool, device=q.device)
                if window_valid is None else window_valid.to(q.device))
        valid = torch.cat([valid, w_ok], dim=1)
    return attention_reference(q, keys, values, sm_scale, valid)


def merge_window_reference(q: torch.Tensor, o: torch.Tensor, m: torch.Tensor, l: torch.Tensor, sm_scale: float,
                           window_k: torch.Tensor | None = None, window_v: torch.Tensor | None = None,
                           window_valid: torch.Tensor | None = None) -> torch.Tensor:
    """What triton/merge.py computes: split partials (o [B, Hq, S, D] unnormalised, m, l [B, Hq, S]) merged
    with exact attention of q [B, Hq, D] over window_k/v [B, KVH, W, D] (window_valid bool [B, W]) -> fp32
    [B, Hq, D]."""
    b, hq, d = q.shape
    o, m, l = o.float(), m.float(), l.float()
    if window_k is not None and window_k.shape[2]:
        kvh = window_k.shape[1]
        k = window_k.float().repeat_interleave(hq // kvh, dim=1)
        v = window_v.float().repeat_interleave(hq // kvh, dim=1)
        scores = torch.einsum("bhd,bhtd->bht", q.float(), k) * sm_scale
        if window_valid is not None:
            scores = scores.masked_fill(~window_valid[:, None, :].to(q.device), float("-inf"))
        mw = scores.amax(-1, keepdim=True)
        p = torch.exp(scores - mw.clamp_min(torch.finfo(torch.float32).min))
        o = torch.cat([o, torch.einsum("bht,bhtd->bhd", p, v)[:, :, None]], 2)
        m, l = torch.cat([m, mw], 2), torch.cat([l, p.sum(-1, keepdim=True)], 2)
    w = torch.exp(m - m.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min))
    return torch.einsum("bhs,bhsd->bhd", w, o) / (w * l).sum(-1)[..., None]


def identity_where(fallback: torch.Tensor, w: torch.Tensor, t_s: torch.Tensor):
    """W and T_S [..., G, G] with the identity where fallback [...]: T_L = M, plain RTN of that matrix."""
    eye = torch.eye(w.shape[-1], device=w.device)
    pick = fallback[..., None, None]
    return torch.where(pick, eye.to(w.dtype), w), torch.where(pick, eye.to(t_s.dtype), t_s)


def _flag(flags: torch.Tensor | None, bad: torch.Tensor) -> None:
    """flags[b] = 1 where any of batch row b's entries of bad [B, ...] is set (as the kernels' atomic max)."""
    if flags is not None:
        flags.copy_(torch.maximum(flags, bad.reshape(flags.shape[0], -1).any(1).to(flags.dtype)))


def gram_reference(x: torch.Tensor, group: int, per_head: bool, flags: torch.Tensor | None = None) -> torch.Tensor:
    """What triton/compress.py's Gram kernels compute, in float64: M^T M of the chunk matrix of x [B, H, T, D]
    (rows (head, token, chunk), one matrix per batch row, or per batch row and head) -> [B, (H,) G, G], an
    identity where x has a non-finite entry (flags[b] set)."""
    b, h, t, d = x.shape
    m = x.double().reshape(b, h, t * d // group, group)
    if not per_head:
        m = m.reshape(b, -1, group)
    gram = m.transpose(-1, -2) @ m
    bad = ~torch.isfinite(gram).flatten(-2).all(-1)
    _flag(flags, bad)
    return torch.where(bad[..., None, None], torch.eye(group, dtype=gram.dtype, device=gram.device), gram)


def factor_reference(evals: torch.Tensor, evecs: torch.Tensor, flags: torch.Tensor | None = None):
    """What triton/compress.py's factor kernel computes: (W float32, T_S float16) of mpo.two_sites_from_eigh;
    W = T_S = I and flags[b] = 1 (the fallback rows) for a rank-deficient matrix or an fp16 T_S overflow."""
    w, t_s, deficient = two_sites_from_eigh(evals, evecs)
    t_s = t_s.to(torch.float16)
    fallback = deficient | ~torch.isfinite(t_s).flatten(-2).all(-1)
    w, t_s = identity_where(fallback, w.float(), t_s)
    _flag(flags, fallback)
    return w, t_s


def quantize_pack_reference(x: torch.Tensor, w: torch.Tensor, bits: int, granularity: str, symmetric: bool,
                            channel_group: int = 0, flags: torch.Tensor | None = None, clip: bool = False):
    """What triton/compress.py's quantize kernel computes: T_L = M W (fp32) for x [B, H, T, D] and w [B, G, G]
    or [B, H, G, G], quantized by quant.quantize_kv (clip: with its range search) and packed -> (codes, scale,
    zero or None); flags[b] set where a scale or zero is not finite."""
    b, h, t, d = x.shape
    g = w.shape[-1]
    wf = w.float() if w.dim() == 4 else w.float()[:, None]
    t_l = (x.float().reshape(b, h, t * d // g, g) @ wf).reshape(b, h, t, d)
    q = quantize_kv(t_l, bits, granularity, symmetric, channel_group or 32, clip)
    for p in (q.scale, q.zero):
        if p is not None:
            _flag(flags, ~torch.isfinite(p))
    return pack_codes(q.codes, bits), q.scale, q.zero
