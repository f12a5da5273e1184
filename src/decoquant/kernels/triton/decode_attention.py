"""Split-K decode attention that reads DecoQuant's packed codes directly (never rebuilds fp16 K/V).

For one kv head h, cache block n (T_S_k, T_S_v) and the g-channel chunk c of the query:
    scores[t]  = s_k[t] * sum_c (q_c @ T_S_k^T) . (codes_k[t, c] - qmax)
    out        = sum_blocks ( sum_t p[t] s_v[t] (codes_v[t] - qmax) ) @ T_S_v     (per chunk)
The query is transformed once per block, scores and the value sum stay in the code basis, and T_S_v
is applied once per block. Programs split the blocks of a sequence (flash-decoding); their partial
(max, sum, output) triples are merged with the exact residual window by `merge_partials`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..layout import PackedKV


@triton.jit
def _unpack_rows(packed, BITS: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr):
    # packed: uint8 [ROWS, D * BITS / 8] -> int32 codes [ROWS, D] (bit order of packing.py)
    p = packed.to(tl.int32)
    if BITS == 8:
        codes = p
    elif BITS == 4:
        codes = tl.reshape(tl.join(p & 15, (p >> 4) & 15), [ROWS, D])
    else:  # 2 bits: code 4j + k sits in bits 2k..2k+1 of byte j
        lo = tl.join(p & 3, (p >> 4) & 3)
        hi = tl.join((p >> 2) & 3, (p >> 6) & 3)
        codes = tl.reshape(tl.join(lo, hi), [ROWS, D])
    return codes


@triton.jit
def _decode_blocks_kernel(
    Q, KC, KS, KT, VC, VS, VT, START, LEN, O, M, L,
    stride_qb, stride_qh, stride_qd,
    stride_kcb, stride_kch, stride_kct,
    stride_ksb, stride_ksh,
    stride_ktb, stride_kth, stride_ktn,
    stride_vcb, stride_vch, stride_vct,
    stride_vsb, stride_vsh,
    stride_vtb, stride_vth, stride_vtn,
    stride_ob, stride_oh, stride_os,
    stride_mb, stride_mh,
    sm_scale, blocks_per_split,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
    G: tl.constexpr, BITS: tl.constexpr, QMAX: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // KV_HEADS
    h = pid % KV_HEADS
    PACKED: tl.constexpr = D * BITS // 8
    rows = tl.arange(0, GROUP_PAD)
    row_ok = rows < GROUP
    dims = tl.arange(0, D)
    cols = tl.arange(0, PACKED)
    gi = tl.arange(0, G)
    q = tl.load(Q + b * stride_qb + (h * GROUP + rows)[:, None] * stride_qh + dims[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0).to(tl.float32) * sm_scale  # [GP, D]
    start = tl.load(START + b)
    length = tl.load(LEN + b)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)  # output, real basis
    blk = split * blocks_per_split
    last = blk + blocks_per_split
    while blk < last:  # (a while loop: the interpreter cannot index a range with a runtime scalar)
        t0 = blk * BLOCK
        if t0 < length:
            ts_off = gi[:, None] * G + gi[None, :]
            ts_k = tl.load(KT + b * stride_ktb + h * stride_kth + blk * stride_ktn + ts_off).to(tl.float32)
            ts_v = tl.load(VT + b * stride_vtb + h * stride_vth + blk * stride_vtn + ts_off).to(tl.float32)
            # q~_c = q_c @ T_S_k^T for every chunk c: [GP * D/G, G] @ [G, G]
            qt = tl.reshape(tl.dot(tl.reshape(q, [GROUP_PAD * (D // G), G]), tl.trans(ts_k)), [GROUP_PAD, D])
            acc_code = tl.zeros([GROUP_PAD, D], tl.float32)  # this block's value sum, code basis
            for j in tl.static_range(BLOCK // TILE):
                toks = t0 + j * TILE + tl.arange(0, TILE)
                ok = (toks >= start) & (toks < length)
                kp = tl.load(KC + b * stride_kcb + h * stride_kch + toks[:, None] * stride_kct + cols[None, :],
                             mask=ok[:, None], other=0)
                kf = _unpack_rows(kp, BITS, TILE, D).to(tl.float32) - QMAX  # [TILE, D]
                ks = tl.load(KS + b * stride_ksb + h * stride_ksh + toks, mask=ok, other=0.0).to(tl.float32)
                scores = tl.dot(qt, tl.trans(kf)) * ks[None, :]  # [GP, TILE]
                scores = tl.where(ok[None, :], scores, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(scores, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp(scores - m_safe[:, None])
                alpha = tl.exp(m_i - m_safe)
                vp = tl.load(VC + b * stride_vcb + h * stride_vch + toks[:, None] * stride_vct + cols[None, :],
                             mask=ok[:, None], other=0)
                vf = _unpack_rows(vp, BITS, TILE, D).to(tl.float32) - QMAX
                vs = tl.load(VS + b * stride_vsb + h * stride_vsh + toks, mask=ok, other=0.0).to(tl.float32)
                acc = acc * alpha[:, None]
                acc_code = acc_code * alpha[:, None] + tl.dot(p * vs[None, :], vf)
                l_i = l_i * alpha + tl.sum(p, 1)
                m_i = m_new
            # back to the real basis once per block: [GP * D/G, G] @ T_S_v
            acc += tl.reshape(tl.dot(tl.reshape(acc_code, [GROUP_PAD * (D // G), G]), ts_v), [GROUP_PAD, D])
        blk += 1
    hq = h * GROUP + rows
    tl.store(O + b * stride_ob + hq[:, None] * stride_oh + split * stride_os + dims[None, :], acc, mask=row_ok[:, None])
    tl.store(M + b * stride_mb + hq * stride_mh + split, m_i, mask=row_ok)
    tl.store(L + b * stride_mb + hq * stride_mh + split, l_i, mask=row_ok)


def _num_splits(programs: int, n_blocks: int, device: torch.device) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(n_blocks, math.ceil(2 * sms / max(programs, 1))))


def decode_blocks_partials(q: torch.Tensor, k: PackedKV, v: PackedKV, sm_scale: float,
                           kv_start: torch.Tensor, kv_len: torch.Tensor, num_splits: int | None = None,
                           tile: int = 64, num_warps: int = 4, num_stages: int = 2):
    """Partial attention of q [B, Hq, D] over the compressed tokens of k/v.

    kv_start/kv_len: int32 [B]; tokens kv_start <= t < kv_len are attended.
    Returns (o [B, Hq, S, D] fp32 unnormalised, m [B, Hq, S], l [B, Hq, S]) for S splits.
    """
    b, hq, d = q.shape
    kvh = k.codes.shape[1]
    if hq % kvh:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {kvh}")
    if k.bits not in (2, 4, 8) or v.bits != k.bits:
        raise ValueError(f"the fused kernel reads 2-, 4- or 8-bit codes, got bits={k.bits}/{v.bits}")
    if k.block_size % min(tile, k.block_size) or k.group_size != 16 and k.group_size != 32:
        raise ValueError(f"block_size={k.block_size} must be a multiple of the tile, group_size 16 or 32")
    tile = min(tile, k.block_size)
    n_blocks = k.tokens // k.block_size
    group = hq // kvh
    splits = num_splits or _num_splits(b * kvh, n_blocks, q.device)
    per_split = math.ceil(n_blocks / splits)
    o = torch.empty(b, hq, splits, d, device=q.device, dtype=torch.float32)
    m = torch.empty(b, hq, splits, device=q.device, dtype=torch.float32)
    l_ = torch.empty_like(m)
    kt, vt = k.ts, v.ts
    _decode_blocks_kernel[(b * kvh, splits)](
        q, k.codes, k.scales, kt, v.codes, v.scales, vt, kv_start, kv_len, o, m, l_,
        q.stride(0), q.stride(1), q.stride(2),
        k.codes.stride(0), k.codes.stride(1), k.codes.stride(2),
        k.scales.stride(0), k.scales.stride(1) if k.scales.shape[1] > 1 else 0,
        kt.stride(0), kt.stride(1) if kt.shape[1] > 1 else 0, kt.stride(2),
        v.codes.stride(0), v.codes.stride(1), v.codes.stride(2),
        v.scales.stride(0), v.scales.stride(1) if v.scales.shape[1] > 1 else 0,
        vt.stride(0), vt.stride(1) if vt.shape[1] > 1 else 0, vt.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        m.stride(0), m.stride(1),
        sm_scale, per_split,
        KV_HEADS=kvh, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=d,
        G=k.group_size, BITS=k.bits, QMAX=k.qmax, BLOCK=k.block_size, TILE=tile,
        num_warps=num_warps, num_stages=num_stages,
    )
    return o, m, l_
