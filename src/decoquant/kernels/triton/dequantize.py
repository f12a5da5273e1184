"""Dequantize packed DecoQuant blocks to dense K/V (for prefill and multi-token steps).

One program decodes ROWS tokens of one (batch, kv head) inside one block:
    x[t, c*G:(c+1)*G] = s[t] * (codes[t, c] - qmax) @ T_S[block]
codes are unpacked bit plane by bit plane (packing.py's order), scaled per token, and the G-channel
chunks of all ROWS tokens go through one [ROWS*D/G, G] @ [G, G] product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import PackedKV
from .codes import _load3, _plane, _three_planes, _unplanes


@triton.jit
def _dequantize_kernel(
    codes_ptr, scales_ptr, ts_ptr, out_ptr,
    s_cb, s_ch, s_ct, s_sb, s_sh, s_st, s_tb, s_th, s_tn, s_oa, s_oh, s_ot,
    H: tl.constexpr, SCALE_PER_HEAD: tl.constexpr, TS_PER_HEAD: tl.constexpr,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
    BITS: tl.constexpr, QMAX: tl.constexpr,
):
    bh = tl.program_id(0)  # batch x heads on the grid's x axis (up to 2**31 - 1 programs)
    tile = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # 64-bit offsets: a [B, H, T, D] output passes 2**31 elements
    h = (bh % H).to(tl.int64)
    t0 = tile * ROWS
    nb = t0 // BLOCK
    P: tl.constexpr = 8 // BITS
    DB: tl.constexpr = D // P if BITS != 3 else 1  # bytes per token row (3 bits: read in two parts)
    rows = t0 + tl.arange(0, ROWS)
    row_ptr = codes_ptr + b * s_cb + h * s_ch + rows[:, None] * s_ct
    if BITS == 3:
        w, hb = _load3(row_ptr, rows[:, None] >= 0, D)  # whole tiles
        c0, c1, c2, c3 = _three_planes(w, hb, "", QMAX, False, False, ROWS, D)
        codes = _unplanes(c0, c1, c2, c3, 4, ROWS, D)
    else:
        packed = tl.load(row_ptr + tl.arange(0, DB)[None, :]).to(tl.int16)
        a0 = _plane(packed, 0, BITS, QMAX, False)
        if P == 1:
            codes = a0
        elif P == 2:
            codes = _unplanes(a0, _plane(packed, 1, BITS, QMAX, False), a0, a0, P, ROWS, D)
        else:
            codes = _unplanes(a0, _plane(packed, 1, BITS, QMAX, False), _plane(packed, 2, BITS, QMAX, False),
                              _plane(packed, 3, BITS, QMAX, False), P, ROWS, D)
    sh = h if SCALE_PER_HEAD else 0
    scale = tl.load(scales_ptr + b * s_sb + sh * s_sh + rows * s_st).to(tl.float32)
    t_l = tl.reshape(codes * scale[:, None], [ROWS * (D // G), G])
    th = h if TS_PER_HEAD else 0
    g = tl.arange(0, G)
    ts = tl.load(ts_ptr + b * s_tb + th * s_th + nb * s_tn + g[:, None] * G + g[None, :]).to(tl.float32)
    x = tl.reshape(tl.dot(t_l, ts, input_precision="ieee"), [ROWS, D])
    out = out_ptr + b * s_oa + h * s_oh + rows[:, None] * s_ot + tl.arange(0, D)[None, :]
    tl.store(out, x.to(out_ptr.dtype.element_ty))


def _rows(block_size: int) -> int:
    rows = block_size & -block_size  # the largest power of two dividing the block size
    return min(rows, 64)


def dequantize_packed_triton(p: PackedKV, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """PackedKV -> dense [B, KVH, T, D] in `dtype`."""
    b, h, t, db = p.codes.shape
    d = db * 8 // p.bits
    rows = _rows(p.block_size)
    if rows * d // p.group_size < 16 or d & (d - 1):
        raise ValueError(f"the dequantize kernel needs a power-of-two head_dim and block tiles of >= 16 chunks; "
                         f"got head_dim={d}, block_size={p.block_size}, group_size={p.group_size}")
    out = torch.empty(b, h, t, d, dtype=dtype, device=p.codes.device)
    if t == 0:
        return out
    ts = p.ts.contiguous()
    codes = p.codes if p.codes.stride(-1) == 1 else p.codes.contiguous()
    grid = (b * h, t // rows)
    _dequantize_kernel[grid](
        codes, p.scales, ts, out,
        codes.stride(0), codes.stride(1), codes.stride(2),
        p.scales.stride(0), p.scales.stride(1), p.scales.stride(2),
        ts.stride(0), ts.stride(1), ts.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        H=h, SCALE_PER_HEAD=p.scales.shape[1] > 1, TS_PER_HEAD=ts.shape[1] > 1,
        BLOCK=p.block_size, ROWS=rows, D=d, G=p.group_size, BITS=p.bits, QMAX=p.qmax,
    )
    return out
