"""Split-K decode attention for one query row per kv head (MHA), on the CUDA cores with fp16x2 math.

The tensor-core kernel (decode_attention.py) pads each kv head's single query row to a 16-row tile
and stages every unpacked code through shared memory for the MMA; at one query row that staging, not
HBM, is the limit. Here each code is touched once, in registers, two at a time (fp16x2.py):
    scores[t] = s_k[t] * (sum_words word_dot(codes_k[t], q~) + (centre - qmax) * sum(q~))
    block sum = sum_t w[t] * (codes_v[t] - centre) + (centre - qmax) * sum_t w[t],  w[t] = p[t] * s_v[t]
with q~ = q @ T_S_k^T per G-channel chunk (once per block), the block sum taken back to the real
basis by T_S_v once per block, zero points and per-channel key scales as in decode_attention.py.
centre = qmax for symmetric codes (no correction, nothing cancels), the middle code otherwise.
Before fp16 rounding the query is normalised to a maximum of 256 (4-bit) / 1024 (2-bit) and the
weights of every 4 tokens to 512 / 2048 (exact powers of two divide them by m, see fp16x2.py), so
partial sums stay in fp16 range and well above its subnormals; each word's fp16 sum leaves in fp32.
Sub-tile r of a tile holds its tokens 4a + r: one value chain reads one word of each of 4 tokens.
Programs are one warp (no cross-warp reductions); ~16 of them per SM hide the memory latency.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .fp16x2 import axpy_asm, centre, dot_asm, query_pairs, token_weights, word_axpy, word_dot


@triton.jit
def _query_setup(qs, NW: tl.constexpr, BITS: tl.constexpr, TARGET: tl.constexpr):
    # qs [D] fp32 -> (1 / its normalisation, its sum, the 8 packed pairs of qs normalised to max |.| = TARGET)
    amax = tl.max(tl.abs(qs), 0)
    norm = TARGET / tl.where(amax > 0, amax, TARGET)
    qn = (qs * norm).to(tl.float16).to(tl.float32)  # the centring term sums the rounded query the dots see
    q0, q1, q2, q3, q4, q5, q6, q7 = query_pairs(qn, NW, BITS)
    return (1.0 / norm, tl.sum(qn, 0) / norm, q0[None, :], q1[None, :], q2[None, :], q3[None, :], q4[None, :], q5[None, :],
            q6[None, :], q7[None, :])


@triton.jit
def _row_dot(k, q0, q1, q2, q3, q4, q5, q6, q7, BITS: tl.constexpr, CENTRE: tl.constexpr,
             ASM: tl.constexpr, USE_ASM: tl.constexpr):
    # words [R, NW] -> [R]: each token's sum of (code - CENTRE) * q (normalised)
    return tl.sum(word_dot(k, q0, q1, q2, q3, q4, q5, q6, q7, BITS, CENTRE, ASM, USE_ASM), 1)


@triton.jit
def _load_rows(ptr, toks, ok, words, NW: tl.constexpr):
    # the words [R, NW] of tokens `toks` (a contiguous [T, NW] int32 row block)
    return tl.load(ptr + toks[:, None] * NW + words[None, :], mask=ok[:, None], other=0)


@triton.jit
def _per_token(ptr, toks, ok):
    return tl.load(ptr + toks, mask=ok, other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["blocks_per_split"])
def _decode_rows_kernel(
    Q, KC, KS, KZ, KT, VC, VS, VZ, VT, START, LEN, O, M, L,
    stride_qb, stride_qh, stride_qd,
    stride_kcb, stride_kch,
    stride_ksb, stride_ksh, stride_ksg,
    stride_ktb, stride_kth, stride_ktn,
    stride_vcb, stride_vch,
    stride_vsb, stride_vsh,
    stride_vtb, stride_vth, stride_vtn,
    stride_ob, stride_oh, stride_os,
    stride_mb, stride_mh,
    sm_scale, blocks_per_split,
    KV_HEADS: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, KQMAX: tl.constexpr,
    VQMAX: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr, KEY_CHANNEL: tl.constexpr,
    K_ASYM: tl.constexpr, V_ASYM: tl.constexpr, KCENTRE: tl.constexpr, VCENTRE: tl.constexpr,
    K_ASM: tl.constexpr, V_ASM: tl.constexpr, USE_ASM: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // KV_HEADS).to(tl.int64)  # 64-bit offsets: b * stride passes 2**31 on large caches
    h = (pid % KV_HEADS).to(tl.int64)
    NW: tl.constexpr = D * BITS // 32  # 32-bit words per token
    R: tl.constexpr = TILE // 4  # tokens per sub-tile
    # fp16 range: a word's partial sums stay below ~2**14 (16 / B pairs of |code - centre| <= 2**(B-1))
    QTARGET: tl.constexpr = 256.0 if BITS == 4 else 1024.0
    WTARGET: tl.constexpr = 512.0 if BITS == 4 else 2048.0
    kc = KC + b * stride_kcb + h * stride_kch
    vc = VC + b * stride_vcb + h * stride_vch
    ks_ptr = KS + b * stride_ksb + h * stride_ksh
    kz_ptr = KZ + b * stride_ksb + h * stride_ksh
    vs_ptr = VS + b * stride_vsb + h * stride_vsh
    vz_ptr = VZ + b * stride_vsb + h * stride_vsh
    gi = tl.arange(0, G)
    chunks = tl.arange(0, D // G)
    dims = tl.arange(0, D)
    words = tl.arange(0, NW)
    a = 4 * tl.arange(0, R)
    q = tl.load(Q + b * stride_qb + h * stride_qh + (chunks[:, None] * G + gi[None, :]) * stride_qd)
    q = q.to(tl.float32) * sm_scale  # [D/G, G]
    start = tl.load(START + b)
    length = tl.load(LEN + b)
    last_block = tl.maximum((length + BLOCK - 1) // BLOCK - 1, 0)
    m_i = tl.max(tl.full([1], float("-inf"), tl.float32), 0)
    l_vec = tl.zeros([R], tl.float32)  # softmax denominators per sub-tile row, summed at the end
    acc = tl.zeros([D // G, G], tl.float32)  # output, real basis
    first = split * blocks_per_split
    for blk in tl.range(first, first + blocks_per_split, num_stages=NUM_STAGES):
        # blocks past the end (last split) read a valid block's T_S; all their tokens are masked below
        blk_ts = tl.minimum(blk, last_block)
        ts_off = gi[:, None] * G + gi[None, :]
        ts_k = tl.load(KT + b * stride_ktb + h * stride_kth + blk_ts * stride_ktn + ts_off).to(tl.float32)
        ts_v = tl.load(VT + b * stride_vtb + h * stride_vth + blk_ts * stride_vtn + ts_off).to(tl.float32)
        qt = tl.reshape(tl.sum(q[:, None, :] * ts_k[None, :, :], 2), [D])  # q~_c = q_c @ T_S_k^T
        if not KEY_CHANNEL:
            qnorm, qsum, q0, q1, q2, q3, q4, q5, q6, q7 = _query_setup(qt, NW, BITS, QTARGET)
        vacc = tl.zeros([R, D], tl.float32)  # this block's value sum per sub-tile row, code basis
        for j in tl.static_range(BLOCK // TILE):
            t0 = blk * BLOCK + j * TILE
            tok0, tok1, tok2, tok3 = t0 + a, t0 + a + 1, t0 + a + 2, t0 + a + 3
            ok0 = (tok0 >= start) & (tok0 < length)
            ok1 = (tok1 >= start) & (tok1 < length)
            ok2 = (tok2 >= start) & (tok2 < length)
            ok3 = (tok3 >= start) & (tok3 < length)
            k0 = _load_rows(kc, tok0, ok0, words, NW)
            k1 = _load_rows(kc, tok1, ok1, words, NW)
            k2 = _load_rows(kc, tok2, ok2, words, NW)
            k3 = _load_rows(kc, tok3, ok3, words, NW)
            v0 = _load_rows(vc, tok0, ok0, words, NW)
            v1 = _load_rows(vc, tok1, ok1, words, NW)
            v2 = _load_rows(vc, tok2, ok2, words, NW)
            v3 = _load_rows(vc, tok3, ok3, words, NW)
            if KEY_CHANNEL:  # this tile is one scale group: fold its channel scales into the query
                grp = blk_ts * (BLOCK // TILE) + j  # past-the-end blocks read a valid group; all masked
                ks_c = tl.load(ks_ptr + grp * stride_ksg + dims).to(tl.float32)
                qnorm, qsum, q0, q1, q2, q3, q4, q5, q6, q7 = _query_setup(qt * ks_c, NW, BITS, QTARGET)
            base = (KCENTRE - KQMAX) * qsum
            s0 = qnorm * _row_dot(k0, q0, q1, q2, q3, q4, q5, q6, q7, BITS, KCENTRE, K_ASM, USE_ASM) + base
            s1 = qnorm * _row_dot(k1, q0, q1, q2, q3, q4, q5, q6, q7, BITS, KCENTRE, K_ASM, USE_ASM) + base
            s2 = qnorm * _row_dot(k2, q0, q1, q2, q3, q4, q5, q6, q7, BITS, KCENTRE, K_ASM, USE_ASM) + base
            s3 = qnorm * _row_dot(k3, q0, q1, q2, q3, q4, q5, q6, q7, BITS, KCENTRE, K_ASM, USE_ASM) + base
            if KEY_CHANNEL:
                if K_ASYM:  # zero points per channel: q~ . z_k, the same for every token of the tile
                    zk = tl.sum(qt * tl.load(kz_ptr + grp * stride_ksg + dims).to(tl.float32), 0)
                    s0, s1, s2, s3 = s0 + zk, s1 + zk, s2 + zk, s3 + zk
            else:
                s0 *= _per_token(ks_ptr, tok0, ok0)
                s1 *= _per_token(ks_ptr, tok1, ok1)
                s2 *= _per_token(ks_ptr, tok2, ok2)
                s3 *= _per_token(ks_ptr, tok3, ok3)
                if K_ASYM:
                    s0 += qsum * _per_token(kz_ptr, tok0, ok0)
                    s1 += qsum * _per_token(kz_ptr, tok1, ok1)
                    s2 += qsum * _per_token(kz_ptr, tok2, ok2)
                    s3 += qsum * _per_token(kz_ptr, tok3, ok3)
            s0 = tl.where(ok0, s0, float("-inf"))  # [R] each
            s1 = tl.where(ok1, s1, float("-inf"))
            s2 = tl.where(ok2, s2, float("-inf"))
            s3 = tl.where(ok3, s3, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(tl.maximum(tl.maximum(s0, s1), tl.maximum(s2, s3)), 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p0 = tl.exp(s0 - m_safe)
            p1 = tl.exp(s1 - m_safe)
            p2 = tl.exp(s2 - m_safe)
            p3 = tl.exp(s3 - m_safe)
            l_vec = l_vec * alpha + ((p0 + p1) + (p2 + p3))
            w0 = p0 * _per_token(vs_ptr, tok0, ok0)
            w1 = p1 * _per_token(vs_ptr, tok1, ok1)
            w2 = p2 * _per_token(vs_ptr, tok2, ok2)
            w3 = p3 * _per_token(vs_ptr, tok3, ok3)
            # per row: code-basis constant of its 4 tokens (centre, zero points); weights normalised to WTARGET
            wmax = tl.maximum(tl.maximum(tl.abs(w0), tl.abs(w1)), tl.maximum(tl.abs(w2), tl.abs(w3)))
            wnorm = WTARGET / tl.where(wmax > 0, wmax, WTARGET)
            w0 = (w0 * wnorm).to(tl.float16).to(tl.float32)  # the centring term sums the rounded weights
            w1 = (w1 * wnorm).to(tl.float16).to(tl.float32)
            w2 = (w2 * wnorm).to(tl.float16).to(tl.float32)
            w3 = (w3 * wnorm).to(tl.float16).to(tl.float32)
            corr = (VCENTRE - VQMAX) * ((w0 + w1) + (w2 + w3)) / wnorm
            if V_ASYM:
                corr += ((p0 * _per_token(vz_ptr, tok0, ok0) + p1 * _per_token(vz_ptr, tok1, ok1))
                         + (p2 * _per_token(vz_ptr, tok2, ok2) + p3 * _per_token(vz_ptr, tok3, ok3)))
            c00, c01, c02, c03 = token_weights(w0, BITS)
            c10, c11, c12, c13 = token_weights(w1, BITS)
            c20, c21, c22, c23 = token_weights(w2, BITS)
            c30, c31, c32, c33 = token_weights(w3, BITS)
            part = word_axpy(v0, v1, v2, v3, c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23,
                             c30, c31, c32, c33, R, NW, BITS, VCENTRE, V_ASM, USE_ASM)  # [R, D]
            part = part * (1.0 / wnorm)[:, None] + corr[:, None]
            if BLOCK // TILE > 1:
                vacc = vacc * alpha + part
            else:
                vacc = part
            acc = acc * alpha
            m_i = m_new
        # back to the real basis once per block: code [D/G, G] @ T_S_v
        code = tl.reshape(tl.sum(vacc, 0), [D // G, G])
        acc += tl.sum(code[:, :, None] * ts_v[None, :, :], 1)
    o_ptr = O + b * stride_ob + h * stride_oh + split * stride_os
    tl.store(o_ptr + chunks[:, None] * G + gi[None, :], acc)
    tl.store(M + b * stride_mb + h * stride_mh + split, m_i)
    tl.store(L + b * stride_mb + h * stride_mh + split, tl.sum(l_vec, 0))


DEFAULT_TILE = 64  # tokens per step (H100, batch 8 x 32 heads x 32k: 32 no faster, 128 needs 2+ warps)


def rows_kernel_supports(q_heads: int, kv_heads: int, k, v, low_precision: bool) -> bool:
    """Whether `decode_rows_partials` reads this cache: one query row per kv head, 2- or 4-bit codes
    whose token rows are whole 32-bit words, fp16 math allowed."""
    d = k.codes.shape[-1] * 8 // k.bits
    words = d * k.bits // 32
    tile = k.channel_group or min(DEFAULT_TILE, k.block_size)  # 4 sub-tiles of a power-of-two rows
    return (q_heads == kv_heads and low_precision and k.bits in (2, 4) and v.bits == k.bits
            and k.block_size % tile == 0 and tile % 4 == 0 and (tile // 4) & (tile // 4 - 1) == 0
            and d * k.bits % 32 == 0 and words & (words - 1) == 0 and d % k.group_size == 0
            and (d // k.group_size) & (d // k.group_size - 1) == 0 and not v.channel_group)


def decode_rows_partials(q, k, v, sm_scale: float, kv_start, kv_len, splits: int, tile: int = 0,
                         num_warps: int = 1, num_stages: int = 1):
    """Partial attention of q [B, H, D] (one query row per kv head) over the compressed tokens of k/v
    (PackedKV, see rows_kernel_supports), split-K over `splits` programs per sequence.

    tile: tokens per step (default: the block, or the key scale group for per-channel key scales).
    Returns (o [B, H, S, D] fp32 unnormalised, m [B, H, S], l [B, H, S]) like decode_blocks_partials.
    """
    b, hq, d = q.shape
    tile = k.channel_group or tile or k.block_size
    if k.block_size % tile or tile % 4 or (tile // 4) & (tile // 4 - 1):
        raise ValueError(f"tile={tile} must divide block_size={k.block_size} into 4 power-of-two sub-tiles")
    # codes as int32 words (aligned, vectorisable loads); token rows must be contiguous
    codes = [(p.codes if p.codes.stride(-1) == 1 and p.codes.stride(-2) == p.codes.shape[-1] else p.codes.contiguous())
             .view(torch.int32) for p in (k, v)]
    n_blocks = k.tokens // k.block_size
    per_split = math.ceil(n_blocks / splits)
    o = torch.empty(b, hq, splits, d, device=q.device, dtype=torch.float32)
    m = torch.empty(b, hq, splits, device=q.device, dtype=torch.float32)
    l_ = torch.empty_like(m)
    kz = k.zeros if k.zeros is not None else k.scales  # placeholders when symmetric (never read)
    vz = v.zeros if v.zeros is not None else v.scales
    head_stride = lambda t: t.stride(1) if t.shape[1] > 1 else 0  # noqa: E731  (shared by heads)
    kc, vc = centre(k.bits, k.qmax), centre(v.bits, v.qmax)
    _decode_rows_kernel[(b * hq, splits)](
        q, codes[0], k.scales, kz, k.ts, codes[1], v.scales, vz, v.ts, kv_start, kv_len, o, m, l_,
        q.stride(0), q.stride(1), q.stride(2),
        codes[0].stride(0), codes[0].stride(1),
        k.scales.stride(0), head_stride(k.scales), k.scales.stride(2) if k.channel_group else 0,
        k.ts.stride(0), head_stride(k.ts), k.ts.stride(2),
        codes[1].stride(0), codes[1].stride(1),
        v.scales.stride(0), head_stride(v.scales),
        v.ts.stride(0), head_stride(v.ts), v.ts.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        m.stride(0), m.stride(1),
        sm_scale, per_split,
        KV_HEADS=hq, D=d, G=k.group_size, BITS=k.bits, KQMAX=k.qmax, VQMAX=v.qmax, BLOCK=k.block_size,
        TILE=tile, KEY_CHANNEL=bool(k.channel_group), K_ASYM=k.zeros is not None, V_ASYM=v.zeros is not None,
        KCENTRE=kc, VCENTRE=vc, K_ASM=dot_asm(k.bits, kc), V_ASM=axpy_asm(v.bits, vc), USE_ASM=q.is_cuda,
        NUM_STAGES=num_stages, num_warps=num_warps,
    )
    return o, m, l_
