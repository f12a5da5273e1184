"""Block compression on the GPU, reading K/V in their own dtype (no float32 copy, no T_L in memory).

x [B, H, T, D] is cut into G-channel chunks: the DecoQuant matrix M has one row per (head, token, chunk)
(one matrix per batch row, or per batch row and head). Kernels, in the order the codec runs them (the
g x g eigenproblems in between run in torch.linalg.eigh):
- `_gram_kernel`: partial Gram products M^T M over tiles of BT tokens (fp32 accumulation; fp16 and bf16
  products are exact in fp32; fp16 on tensor cores); `_gram_reduce_kernel` sums them in float64 and puts an
  identity in place of a non-finite matrix;
- `_factor_kernel`: W = V S^{-1/2} (fp32) and T_S = S^{1/2} V^T (fp16) from the eigenpairs (mpo.two_sites_from_eigh);
- `_quantize_pack_kernel`: T_L = M W (W = V S^{-1/2}, fp32 [G, G]) tile by tile, its scales (and zeros),
  round-half-to-even codes against the fp16 scales (as quant.py), packed in packing.py's bit order.
  Scales per token over all heads (two passes over the heads: first the ranges, then the codes), per
  token and head, or per T_L channel over CG-token groups (one tile of CG tokens); for the latter, with CLIP,
  each group's range is searched among quant.CLIP_RATIOS for the smallest squared error, as quant.quantize does
  (the errors are sums in another order than torch's, so a near tie may pick the neighbouring ratio).
The Gram and quantize kernels set flags[b] = 1 (int32, atomic max) for a batch row they find unsafe (kept
exact): a non-finite entry of x, a non-finite scale or zero. The factor kernel replaces W and T_S of a
rank-deficient matrix or one whose T_S passes fp16 by the identity (plain RTN of that matrix) and sets its
own flags[b] = 1 (the fallback rows). No host sync anywhere.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from ...mpo import RANK_RTOL
from ...quant import CLIP_SHRINKS, SCALE_MIN

_SCALE_MIN = tl.constexpr(SCALE_MIN)
_RANK_RTOL = tl.constexpr(RANK_RTOL)
GRANULARITY_IDS = {"token": 0, "token_head": 1, "channel": 2}


@triton.jit
def _load_rows(x_ptr, rows, T, s_xt, s_xd, D: tl.constexpr):
    """[BT, D] tokens `rows` of one (batch, head) of x in its dtype, zeros past T."""
    cols = tl.arange(0, D)
    return tl.load(x_ptr + rows[:, None].to(tl.int64) * s_xt + cols[None, :] * s_xd, mask=(rows < T)[:, None],
                   other=0.0)


@triton.jit
def _gram_kernel(
    x_ptr, out_ptr, T, s_xb, s_xh, s_xt, s_xd,
    HP: tl.constexpr, HL: tl.constexpr, BT: tl.constexpr, D: tl.constexpr, G: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)  # batch row x head slice (HP slices of HL heads)
    tile = tl.program_id(1)
    b = (pid // HP).to(tl.int64)
    rows = tile * BT + tl.arange(0, BT)
    acc = tl.zeros([G, G], dtype=tl.float32)
    for i in range(HL):
        h = ((pid % HP) * HL + i).to(tl.int64)
        x = _load_rows(x_ptr + b * s_xb + h * s_xh, rows, T, s_xt, s_xd, D)
        if IEEE:  # fp32 or bf16 input (bf16 products are exact in fp32 too)
            x = x.to(tl.float32)
        m = tl.reshape(x, [BT * (D // G), G])  # rows (token, chunk)
        if IEEE:
            acc += tl.dot(tl.trans(m), m, input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(m), m)
    g = tl.arange(0, G)
    out = out_ptr + (pid.to(tl.int64) * tl.num_programs(1) + tile) * G * G
    tl.store(out + g[:, None] * G + g[None, :], acc)


@triton.jit
def _not_finite(x):
    return (x != x) | (tl.abs(x) == float("inf"))


@triton.jit
def _gram_reduce_kernel(partial_ptr, gram_ptr, flag_ptr, TILES, MPB: tl.constexpr, G: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)  # one matrix; MPB matrices per batch row
    g = tl.arange(0, G)
    tile = g[:, None] * G + g[None, :]
    acc = tl.zeros([G, G], dtype=tl.float64)
    for i in range(TILES):
        acc += tl.load(partial_ptr + (m * TILES + i) * G * G + tile).to(tl.float64)
    bad = tl.max(tl.max(_not_finite(acc).to(tl.int32), axis=1), axis=0)
    eye = (g[:, None] == g[None, :]).to(tl.float64)
    tl.store(gram_ptr + m * G * G + tile, tl.where(bad > 0, eye, acc))
    tl.atomic_max(flag_ptr + m // MPB, bad)


@triton.jit
def _factor_kernel(evals_ptr, evecs_ptr, w_ptr, ts_ptr, flag_ptr, MPB: tl.constexpr, G: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, G)  # row of V (a channel of the chunk)
    j = tl.arange(0, G)  # column of W / row of T_S, in descending singular value (eigh's order reversed)
    s = tl.sqrt(tl.maximum(tl.load(evals_ptr + m * G + (G - 1 - j)), 0.0))
    v = tl.load(evecs_ptr + m * G * G + i[:, None] * G + (G - 1 - j)[None, :])
    s_max = tl.max(s, axis=0)
    inv_root = tl.where(s > _RANK_RTOL * s_max, 1.0 / tl.sqrt(tl.maximum(s, 1e-300)), 0.0)
    w = v * inv_root[None, :]
    ts = (v * tl.sqrt(s)[None, :]).to(tl.float16)  # [i, j] = T_S[j, i]
    overflow = tl.max(tl.max(_not_finite(ts.to(tl.float32)).to(tl.int32), axis=1), axis=0)
    deficient = (tl.min(s, axis=0) <= _RANK_RTOL * s_max).to(tl.int32)
    fallback = tl.maximum(overflow, deficient)  # then W = T_S = I: T_L = M, plain RTN of the block
    eye = (i[:, None] == j[None, :]).to(tl.float32)
    w = tl.where(fallback != 0, eye, w)
    ts = tl.where(fallback != 0, eye.to(tl.float16), ts)
    tl.store(w_ptr + m * G * G + i[:, None] * G + j[None, :], w.to(tl.float32))
    tl.store(ts_ptr + m * G * G + j[None, :] * G + i[:, None], ts)
    tl.atomic_max(flag_ptr + m // MPB, fallback)


@triton.jit
def _t_l(x_ptr, rows, T, s_xt, s_xd, w, BT: tl.constexpr, D: tl.constexpr, G: tl.constexpr):
    """T_L of BT tokens of one head: fp32 [BT, D], chunk c of token t = x[t, cG:(c+1)G] @ W."""
    x = _load_rows(x_ptr, rows, T, s_xt, s_xd, D).to(tl.float32)
    m = tl.reshape(x, [BT * (D // G), G])
    return tl.reshape(tl.dot(m, w, input_precision="ieee"), [BT, D])


@triton.jit
def _round_half_even(y):
    """torch.round in exact float arithmetic (no libdevice, so the interpreter runs it too)."""
    f = tl.floor(y)
    d = y - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return f + ((d > 0.5) | ((d == 0.5) & odd)).to(tl.float32)


@triton.jit
def _params(lo, hi, SYM: tl.constexpr, BITS: tl.constexpr):
    """fp16 (scale, zero) from a range (lo unused and zero = 0 when symmetric), as quant.quantize."""
    if SYM:
        scale = tl.maximum(tl.math.div_rn(hi, (2 ** (BITS - 1) - 1) * 1.0), _SCALE_MIN).to(tl.float16)
        zero = tl.zeros_like(scale)
    else:
        zero = lo.to(tl.float16)
        scale = tl.maximum(tl.math.div_rn(hi - zero.to(tl.float32), (2 ** BITS - 1) * 1.0), _SCALE_MIN)
        scale = scale.to(tl.float16)
    return scale, zero


@triton.jit
def _codes(t, scale, zero, SYM: tl.constexpr, BITS: tl.constexpr):
    """Codes of t [BT, D] against fp16 scale/zero (broadcastable): int32 [BT, D]."""
    if SYM:
        qmax = 2 ** (BITS - 1) - 1
        y = _round_half_even(tl.math.div_rn(t, scale.to(tl.float32)))
        codes = (tl.minimum(tl.maximum(y, -qmax * 1.0), qmax * 1.0) + qmax).to(tl.int32)
    else:
        y = _round_half_even(tl.math.div_rn(t - zero.to(tl.float32), scale.to(tl.float32)))
        codes = tl.minimum(tl.maximum(y, 0.0), (2 ** BITS - 1) * 1.0).to(tl.int32)
    return codes


@triton.jit
def _pack(codes, BITS: tl.constexpr, BT: tl.constexpr, D: tl.constexpr):
    """int32 codes [BT, D] (BITS 1, 2, 4 or 8), packed: uint8 [BT, D * BITS / 8]."""
    if BITS == 8:
        return codes.to(tl.uint8)
    P: tl.constexpr = 8 // BITS  # codes per byte; code i of a byte sits in bits [i*BITS, (i+1)*BITS)
    runs = tl.reshape(codes, [BT, D // P, P])
    shifts = tl.arange(0, P) * BITS
    return tl.sum(runs << shifts[None, None, :], axis=2).to(tl.uint8)


@triton.jit
def _flag_params(flag_ptr, scale, zero, valid):
    bad = (_not_finite(scale.to(tl.float32)) | _not_finite(zero.to(tl.float32))) & valid
    tl.atomic_max(flag_ptr, tl.max(bad.to(tl.int32), axis=0))


@triton.jit
def _range(t, axis: tl.constexpr, SYM: tl.constexpr):
    if SYM:
        return tl.zeros_like(tl.max(t, axis=axis)), tl.max(tl.abs(t), axis=axis)
    return tl.min(t, axis=axis), tl.max(t, axis=axis)


@triton.jit
def _channel_sq_err(t, scale, zero, BITS: tl.constexpr):
    """Per channel: the squared error of t [BT, D] quantized asymmetrically against fp16 scale/zero [D]."""
    s, z = scale.to(tl.float32)[None, :], zero.to(tl.float32)[None, :]
    y = _round_half_even(tl.math.div_rn(t - z, s))
    codes = tl.minimum(tl.maximum(y, 0.0), (2 ** BITS - 1) * 1.0)
    e = codes * s + z - t
    return tl.sum(e * e, axis=0)


@triton.jit
def _quantize_pack_kernel(
    x_ptr, w_ptr, codes_ptr, scale_ptr, zero_ptr, flag_ptr, clip_ptr, T,
    s_xb, s_xh, s_xt, s_xd, s_wb, s_wh, s_cb, s_ch, s_ct, s_sb, s_sh, s_st, s_sd,
    H: tl.constexpr, HL: tl.constexpr, BT: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
    BITS: tl.constexpr, SYM: tl.constexpr, GRAN: tl.constexpr, W_PER_HEAD: tl.constexpr, NCLIP: tl.constexpr,
):
    HP: tl.constexpr = H // HL
    pid = tl.program_id(0)  # batch row x head slice
    tile = tl.program_id(1)
    b = (pid // HP).to(tl.int64)
    h0 = (pid % HP) * HL
    rows = tile * BT + tl.arange(0, BT)
    g = tl.arange(0, G)
    DB: tl.constexpr = D * BITS // 8 if BITS != 3 else 1  # bytes per token row (3 bits: stored in two parts)
    x_b = x_ptr + b * s_xb
    if GRAN == 0:  # per token over every head: first the range of T_L over all heads
        lo = tl.full([BT], float("inf"), tl.float32)
        hi = tl.full([BT], float("-inf"), tl.float32)
        for i in range(H):
            w = tl.load(w_ptr + b * s_wb + (i if W_PER_HEAD else 0) * s_wh + g[:, None] * G + g[None, :])
            lo_h, hi_h = _range(_t_l(x_b + i * s_xh, rows, T, s_xt, s_xd, w, BT, D, G), 1, SYM)
            lo, hi = tl.minimum(lo, lo_h), tl.maximum(hi, hi_h)
        scale, zero = _params(lo, hi, SYM, BITS)
        _flag_params(flag_ptr + b, scale, zero, rows < T)
        tl.store(scale_ptr + b * s_sb + rows * s_st, scale, mask=rows < T)
        if not SYM:
            tl.store(zero_ptr + b * s_sb + rows * s_st, zero, mask=rows < T)
        scale, zero = scale[:, None], zero[:, None]
    for i in range(HL):
        h = (h0 + i).to(tl.int64)
        wh = h if W_PER_HEAD else 0
        w = tl.load(w_ptr + b * s_wb + wh * s_wh + g[:, None] * G + g[None, :])
        t = _t_l(x_b + h * s_xh, rows, T, s_xt, s_xd, w, BT, D, G)
        if GRAN == 1:  # per token and head
            lo, hi = _range(t, 1, SYM)
            scale, zero = _params(lo, hi, SYM, BITS)
            _flag_params(flag_ptr + b, scale, zero, rows < T)
            off = b * s_sb + h * s_sh + rows * s_st
            tl.store(scale_ptr + off, scale, mask=rows < T)
            if not SYM:
                tl.store(zero_ptr + off, zero, mask=rows < T)
            scale, zero = scale[:, None], zero[:, None]
        elif GRAN == 2:  # per T_L channel over this tile of BT = CG tokens
            lo, hi = _range(t, 0, SYM)
            scale, zero = _params(lo, hi, SYM, BITS)
            if NCLIP > 1:  # the range search (asymmetric only): ratio 0 is the plain range above
                best = _channel_sq_err(t, scale, zero, BITS)
                span = hi - lo
                for c in range(1, NCLIP):
                    f = tl.load(clip_ptr + c)
                    s_c, z_c = _params(lo + f * span, hi - f * span, SYM, BITS)
                    err = _channel_sq_err(t, s_c, z_c, BITS)
                    take = err < best
                    best = tl.where(take, err, best)
                    scale, zero = tl.where(take, s_c, scale), tl.where(take, z_c, zero)
            _flag_params(flag_ptr + b, scale, zero, tl.full([D], 1, tl.int1))
            off = b * s_sb + h * s_sh + tile * s_st + tl.arange(0, D) * s_sd
            tl.store(scale_ptr + off, scale)
            if not SYM:
                tl.store(zero_ptr + off, zero)
            scale, zero = scale[None, :], zero[None, :]
        codes = _codes(t, scale, zero, SYM, BITS)
        out = codes_ptr + b * s_cb + h * s_ch + rows[:, None].to(tl.int64) * s_ct
        if BITS == 3:  # the low 2 bits as 2-bit codes, then the high bits (packing.py)
            tl.store(out + tl.arange(0, D // 4)[None, :], _pack(codes & 3, 2, BT, D), mask=(rows < T)[:, None])
            tl.store(out + D // 4 + tl.arange(0, D // 8)[None, :], _pack(codes >> 2, 1, BT, D),
                     mask=(rows < T)[:, None])
        else:
            tl.store(out + tl.arange(0, DB)[None, :], _pack(codes, BITS, BT, D), mask=(rows < T)[:, None])


def _tile(tokens: int, d: int, g: int, cap: int = 32) -> int:
    """Tokens per tile: a power of two <= cap, with at least 16 chunk rows for the products."""
    bt = max(16 * g // d, 1)
    while bt < cap and bt < tokens:
        bt *= 2
    return bt


def gram_triton(x: torch.Tensor, group: int, per_head: bool, flags: torch.Tensor) -> torch.Tensor:
    """M^T M of the chunk matrix of x [B, H, T, D] (fp16, bf16 or fp32): float64 [B, G, G], or [B, H, G, G]
    with one matrix per head (per_head); an identity where x has a non-finite entry (flags[b] set)."""
    b, h, t, d = x.shape
    bt = _tile(t, d, group)
    hp = h if per_head else 1
    tiles = triton.cdiv(t, bt)
    partial = torch.empty(b * hp, tiles, group, group, dtype=torch.float32, device=x.device)
    _gram_kernel[(b * hp, tiles)](
        x, partial, t, x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        HP=hp, HL=h // hp, BT=bt, D=d, G=group, IEEE=x.dtype != torch.float16,
    )
    gram = torch.empty(b * hp, group, group, dtype=torch.float64, device=x.device)
    _gram_reduce_kernel[(b * hp,)](partial, gram, flags, tiles, MPB=hp, G=group)
    return gram.reshape(b, h, group, group) if per_head else gram


def factor_triton(evals: torch.Tensor, evecs: torch.Tensor, flags: torch.Tensor):
    """W = V S^{-1/2} (float32) and T_S = S^{1/2} V^T (float16), both [..., G, G], from float64 eigenpairs
    (evals [..., G] ascending, evecs [..., G, G]); flags[b] set for a rank-deficient matrix or an fp16 T_S
    overflow (the leading dims flatten to batch rows x matrices per row)."""
    g = evals.shape[-1]
    m = evals.numel() // g
    w = torch.empty(evecs.shape, dtype=torch.float32, device=evecs.device)
    t_s = torch.empty(evecs.shape, dtype=torch.float16, device=evecs.device)
    _factor_kernel[(m,)](evals.contiguous(), evecs.contiguous(), w, t_s, flags, MPB=m // flags.shape[0], G=g)
    return w, t_s


@lru_cache(maxsize=None)
def _clip_shrinks(device: torch.device) -> torch.Tensor:
    """quant.CLIP_SHRINKS in fp32 (as torch's scalar arithmetic rounds them) on `device`, made once per device:
    a prefill compresses every layer. Read only."""
    return torch.tensor(CLIP_SHRINKS, dtype=torch.float32, device=device)


def quantize_pack_triton(x: torch.Tensor, w: torch.Tensor, bits: int, granularity: str, symmetric: bool,
                         channel_group: int, flags: torch.Tensor, clip: bool = False):
    """Codes of T_L = M W for x [B, H, T, D] and w fp32 [B, G, G] or [B, H, G, G], packed along D; clip: the
    range search of asymmetric per-channel scales (granularity "channel").

    Returns (codes uint8 [B, H, T, D * bits / 8], scale fp16, zero fp16 or None) with the codec's parameter
    shapes: [B, 1, T, 1] (token), [B, H, T, 1] (token_head), [B, H, T / CG, 1, D] (channel, CG =
    channel_group dividing T); flags[b] set where a scale or zero is not finite.
    """
    b, h, t, d = x.shape
    gsize = w.shape[-1]
    gran = GRANULARITY_IDS[granularity]
    if clip and (symmetric or gran != 2):
        raise ValueError("clip: the kernel searches the ranges of asymmetric per-channel scales only "
                         f"(got granularity={granularity!r}, symmetric={symmetric})")
    shrinks = _clip_shrinks(x.device) if clip else flags
    w = w.float().contiguous()
    w_per_head = w.dim() == 4
    if gran == 2:
        bt, hl = channel_group, 1
        pshape = (b, h, t // channel_group, 1, d)
    else:
        bt, hl = _tile(t, d, gsize), (h if gran == 0 else 1)
        pshape = (b, 1 if gran == 0 else h, t, 1)
    codes = torch.empty(b, h, t, d * bits // 8, dtype=torch.uint8, device=x.device)
    scale = torch.empty(pshape, dtype=torch.float16, device=x.device)
    zero = None if symmetric else torch.empty_like(scale)
    s_sd = scale.stride(4) if gran == 2 else 0
    _quantize_pack_kernel[(b * (h // hl), triton.cdiv(t, bt))](
        x, w, codes, scale, scale if zero is None else zero, flags, shrinks, t,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        w.stride(0), w.stride(1) if w_per_head else 0,
        codes.stride(0), codes.stride(1), codes.stride(2),
        scale.stride(0), scale.stride(1), scale.stride(2), s_sd,
        H=h, HL=hl, BT=bt, D=d, G=gsize, BITS=bits, SYM=symmetric, GRAN=gran, W_PER_HEAD=w_per_head,
        NCLIP=len(CLIP_SHRINKS) if clip else 1,
    )
    return codes, scale, zero
