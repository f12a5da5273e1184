"""Split-K decode attention for one query row per kv head (MHA), on the CUDA cores with exact integer dots.

The tensor-core kernel (decode_attention.py) pads each kv head's single query row to a 16-row tile
and stages every unpacked code through shared memory for the MMA; at one query row that staging, not
HBM, is the limit. Here each code is touched once, in registers, two products per instruction
(int_dot.py: one AND per field of a word, then dp2a):
    scores[t] = s_k[t] * (sum_r q~_r code_k[t, r] - qmax * sum_r q~_r)
    block sum = sum_t w[t] code_v[t] - qmax * sum_t w[t],  w[t] = p[t] * s_v[t]
with q~ = q @ T_S_k^T per G-channel chunk rounded to int16 per block and w rounded to int16 per block
(both normalised to 16383), all sums over codes exact 32-bit integers; the block sum is taken back to
the real basis by T_S_v once per block; zero points and per-channel key scales as in
decode_attention.py.

One warp per (sequence, head, split); per block of the split:
- the block's query rows: q~ normalised and rounded, packed as the int16 pairs each word of codes
  meets, with its normalisation, its sum and (asymmetric per-channel keys) q~ . z_k; one row per key
  scale group with per-channel key scales. They go to a per-program scratch row and come back by
  broadcast loads (every lane, same address).
- keys: one token per lane, its code words read with 16-byte loads, so a token's dot never leaves
  its lane; the block's softmax runs on those per-lane scores. The next block's key words are loaded
  while this block's values are summed.
- values: one word per lane, two tokens per dp2a (their bytes interleaved by one prmt), the tokens'
  int16 weights passed through the scratch; the rows are summed once per block before T_S_v.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .int_dot import axpy_asm, dot_asm, natural8, natural16
from .rows_steps import _key_dots, _load_key_words, _page_words, _query_float, _store_query_rows, _value_step

LANES = 32  # tokens per key step: one per lane of the program's single warp (written as 32 in the kernels)
# int16 target of the rounded weights: |sum| < 2**31 for blocks of <= 512 tokens, 14 bits + sign per number (the
# query's: rows_steps.QTARGET)
WTARGET = tl.constexpr(16383.0)
MAX_BLOCK = 512


@triton.jit(do_not_specialize=["VC"])  # VC: 4-byte value loads, one word per lane
def _decode_rows_kernel(
    Q, KT, KC, KS, KZ, VC, VS, VZ, VT, START, LEN, SKIP, BT, O, M, L, SCRATCH,
    stride_skb, stride_btb,
    stride_qb, stride_qh, stride_qd,
    stride_ktb, stride_kth, stride_ktn,
    stride_kcb, stride_kch,
    stride_ksb, stride_ksh, stride_ksg,
    stride_vcb, stride_vch,
    stride_vsb, stride_vsh,
    stride_vtb, stride_vth, stride_vtn,
    stride_ob, stride_oh, stride_os,
    stride_mb, stride_mh, stride_ms,
    sm_scale,
    KV_HEADS: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, KQMAX: tl.constexpr,
    VQMAX: tl.constexpr, BLOCK: tl.constexpr, QG: tl.constexpr, KEY_CHANNEL: tl.constexpr,
    K_ASYM: tl.constexpr, V_ASYM: tl.constexpr, K_ASM: tl.constexpr, V_ASM: tl.constexpr, USE_ASM: tl.constexpr,
    NUM_STAGES: tl.constexpr, HAS_SKIP: tl.constexpr, PAGED: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // KV_HEADS).to(tl.int64)  # 64-bit offsets: b * stride passes 2**31 on large caches
    h = (pid % KV_HEADS).to(tl.int64)
    NW: tl.constexpr = D * BITS // 32  # 32-bit words per token
    NK: tl.constexpr = 8 // BITS  # code fields per byte
    P: tl.constexpr = 16 // BITS  # query pairs per word
    SUB: tl.constexpr = BLOCK // 32  # key steps (32 tokens, one per lane) per block
    RV: tl.constexpr = 32 // NW  # value rows per step: one word per lane
    M_MAX: tl.constexpr = 1 << (8 - BITS)
    kc = KC + b * stride_kcb + h * stride_kch
    vc = VC + b * stride_vcb + h * stride_vch
    ks_ptr = KS + b * stride_ksb + h * stride_ksh
    kz_ptr = KZ + b * stride_ksb + h * stride_ksh
    vs_ptr = VS + b * stride_vsb + h * stride_vsh
    vz_ptr = VZ + b * stride_vsb + h * stride_vsh
    ROW: tl.constexpr = NW * P + 4  # int32 per query row of the scratch
    # the program's scratch: its block's query rows, then the block's int16 value weights
    qbuf = SCRATCH + (pid.to(tl.int64) * tl.num_programs(1) + split) * ((BLOCK // QG) * ROW + BLOCK // 2)
    wbuf = qbuf + (BLOCK // QG) * ROW
    wbuf16 = wbuf.to(tl.pointer_type(tl.int16))
    q_ptr = Q + b * stride_qb + h * stride_qh
    gi = tl.arange(0, G)
    ts_off = gi[:, None] * G + gi[None, :]
    sub = tl.arange(0, SUB)
    lane = tl.arange(0, 32)
    # 1 / m_k of each code of a word (natural order r = j * NK + k)
    inv_m = tl.exp2(-((tl.arange(0, 32 // BITS) % NK) * BITS).to(tl.float32))
    start = tl.load(START + b)
    length = tl.load(LEN + b)
    m_i = tl.max(tl.full([1], float("-inf"), tl.float32), 0)
    l_vec = tl.zeros([32, SUB], tl.float32)  # softmax denominators per lane, summed at the end
    acc = tl.zeros([D // G, G], tl.float32)  # output, real basis
    # this split's blocks, from the sequence's own length: a cache viewed at its full capacity (a CUDA-graph
    # decode step) splits only the blocks it holds, and no block past the length is read
    blocks = (length + BLOCK - 1) // BLOCK
    per_split = (blocks + tl.num_programs(1) - 1) // tl.num_programs(1)
    first = split * per_split
    end = tl.minimum(first + per_split, blocks)
    rel = lane[:, None] + sub[None, :] * 32  # [32, SUB]: token within a block, one per lane per key step
    toks = first * BLOCK + rel
    if PAGED:  # paged blocks (one per page): each block's pointers are shifted so that its tokens' sequence
        # positions address its page, and everything below indexes by position as in the per-sequence layout
        kc = _page_words(KC, BT, b, stride_btb, first, end, stride_kcb, h, stride_kch, BLOCK * NW)
    k0, k1, k2, k3 = _load_key_words(kc, toks, (toks >= start) & (toks < length), NW)
    for blk in tl.range(first, end, num_stages=NUM_STAGES):
        if PAGED:
            page = tl.load(BT + b * stride_btb + blk).to(tl.int64)
            vc = VC + page * stride_vcb + h * stride_vch - blk * (BLOCK * NW)
            ks_shift = blk * (BLOCK // QG) * stride_ksg if KEY_CHANNEL else blk * BLOCK
            ks_ptr = KS + page * stride_ksb + h * stride_ksh - ks_shift
            kz_ptr = KZ + page * stride_ksb + h * stride_ksh - ks_shift
            vs_ptr = VS + page * stride_vsb + h * stride_vsh - blk * BLOCK
            vz_ptr = VZ + page * stride_vsb + h * stride_vsh - blk * BLOCK
            kt_blk = KT + page * stride_ktb + h * stride_kth
            ts_v = tl.load(VT + page * stride_vtb + h * stride_vth + ts_off).to(tl.float32)
        else:
            kt_blk = KT + b * stride_ktb + h * stride_kth + blk * stride_ktn
            ts_v = tl.load(VT + b * stride_vtb + h * stride_vth + blk * stride_vtn + ts_off).to(tl.float32)
        toks = blk * BLOCK + rel
        if HAS_SKIP:  # a block whose row is stored exact (attended with the window instead)
            ok = (toks >= start) & (toks < tl.where(tl.load(SKIP + b * stride_skb + blk) != 0, 0, length))
        else:
            ok = (toks >= start) & (toks < length)
        tl.debug_barrier()  # the previous block's key steps have read the query rows
        _store_query_rows(qbuf, q_ptr, stride_qd, kt_blk,
                          ks_ptr + blk * (BLOCK // QG) * stride_ksg, kz_ptr + blk * (BLOCK // QG) * stride_ksg,
                          stride_ksg, sm_scale, D, G, BITS, QG, BLOCK, KEY_CHANNEL, K_ASYM)
        tl.debug_barrier()
        if KEY_CHANNEL:  # each key step sits in one scale group: its own query row
            rows = qbuf + (sub * 32 // QG) * ROW
            dot = _key_dots(k0, k1, k2, k3, rows[None, :, None], NW, P, BITS, K_ASM, USE_ASM)
            qsum = tl.load(rows + NW * P + 3)[None, :]
            s = (dot - (KQMAX * M_MAX) * qsum).to(tl.float32) * _query_float(rows + NW * P, 0)[None, :]
            if K_ASYM:
                s += _query_float(rows + NW * P, 2)[None, :]  # q~ . z_k of the group
        else:
            dot = _key_dots(k0, k1, k2, k3, qbuf, NW, P, BITS, K_ASM, USE_ASM)
            qsum = tl.load(qbuf + NW * P + 3)
            s = ((dot - (KQMAX * M_MAX) * qsum).to(tl.float32) * _query_float(qbuf + NW * P, 0)
                 * tl.load(ks_ptr + toks, mask=ok, other=0.0).to(tl.float32))
            if K_ASYM:
                s += _query_float(qbuf + NW * P, 1) * tl.load(kz_ptr + toks, mask=ok, other=0.0).to(tl.float32)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(tl.max(s, 1), 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe)
        l_vec = l_vec * alpha + p
        w = p * tl.load(vs_ptr + toks, mask=ok, other=0.0).to(tl.float32)
        wmax = tl.max(tl.max(tl.abs(w), 1), 0)
        wnorm = WTARGET / tl.where(wmax > 0, wmax, WTARGET)
        wi = (w * wnorm + 0.5).to(tl.int32)  # w >= 0: rounded to the nearest integer
        corr = -VQMAX * tl.sum(tl.sum(wi, 1), 0).to(tl.float32) / wnorm  # the code offset, exact sum
        if V_ASYM:
            corr += tl.sum(tl.sum(p * tl.load(vz_ptr + toks, mask=ok, other=0.0).to(tl.float32), 1), 0)
        # the weights reach the value layout through the program's scratch: int16, even token in the low half
        tl.debug_barrier()  # the previous block's value steps have read the scratch
        tl.store(wbuf16 + rel, wi.to(tl.int16))
        tl.debug_barrier()
        # the next block's key words, in flight while this block's values are summed
        toks_n = toks + BLOCK  # (none past the split's last block)
        if PAGED:
            kc = _page_words(KC, BT, b, stride_btb, blk + 1, end, stride_kcb, h, stride_kch, BLOCK * NW)
        k0, k1, k2, k3 = _load_key_words(kc, toks_n, (toks_n >= start) & (toks_n < tl.minimum(length, end * BLOCK)),
                                         NW)
        # the block's value sum per word, row and code: m_k * sum_t w_t code_t, exact
        a0 = tl.zeros([NW, RV], tl.int32)
        a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15 = (a0, a0, a0, a0, a0, a0, a0, a0, a0, a0,
                                                                             a0, a0, a0, a0, a0)
        for j in tl.static_range(BLOCK // (4 * RV)):
            a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15 = _value_step(
                vc, wbuf, blk * BLOCK + j * 4 * RV, j * 4 * RV, length, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10,
                a11, a12, a13, a14, a15, NW, RV, BITS, V_ASM, USE_ASM)
        if BITS == 4:
            vsum = natural8(a0, a1, a2, a3, a4, a5, a6, a7)
        else:
            vsum = natural16(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15)
        # back to the real basis once per block: code [D/G, G] @ T_S_v
        code = tl.sum(vsum.to(tl.float32), 1) * inv_m[None, :]
        code = tl.reshape(code, [D // G, G]) / wnorm + corr
        acc = acc * alpha + tl.sum(code[:, :, None] * ts_v[None, :, :], 1)
        m_i = m_new
    chunks = tl.arange(0, D // G)
    o_ptr = O + b * stride_ob + h * stride_oh + split * stride_os
    tl.store(o_ptr + chunks[:, None] * G + gi[None, :], acc)
    tl.store(M + b * stride_mb + h * stride_mh + split * stride_ms, m_i)
    tl.store(L + b * stride_mb + h * stride_mh + split * stride_ms, tl.sum(tl.sum(l_vec, 1), 0))


def rows_kernel_supports(q_heads: int, kv_heads: int, k, v, low_precision: bool) -> bool:
    """Whether `decode_rows_partials` reads this cache: one query row per kv head, 2- or 4-bit codes
    whose token rows are whole 16-byte vectors of a power-of-two count of words, blocks (and key scale
    groups) of a multiple of 32 tokens up to MAX_BLOCK, per-token value scales, a rounded query and
    rounded weights allowed (low_precision)."""
    d = k.codes.shape[-1] * 8 // k.bits
    words = d * k.bits // 32
    pow2 = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
    return (q_heads == kv_heads and low_precision and k.bits in (2, 4) and v.bits == k.bits
            and k.block_size % LANES == 0 and k.block_size <= MAX_BLOCK and (k.channel_group or LANES) % LANES == 0
            and d * k.bits % 32 == 0 and words % 4 == 0 and pow2(words) and words <= 16
            and d % k.group_size == 0 and pow2(d // k.group_size) and not v.channel_group)


def decode_rows_partials(q, k, v, sm_scale: float, kv_start, kv_len, splits: int, num_warps: int = 1,
                         num_stages: int = 1, maxnreg: int | None = None, skip: torch.Tensor | None = None,
                         block_table: torch.Tensor | None = None):
    """Partial attention of q [B, H, D] (one query row per kv head) over the compressed tokens of k/v
    (PackedKV, see rows_kernel_supports), split-K over `splits` programs per sequence.

    maxnreg: registers per thread (default: 128 at 2 bits, the compiler's choice at 4; H100, batch 8 x 32
    heads x 32k, kernel alone: 2-bit 278 -> 239 us at 128; 4-bit 404 us unbounded, 409 at 192, 467 at 128).
    skip: int8 [B, NB'] or None, blocks not attended (see decode_blocks_partials).
    block_table: int32 [B, NB] or None: paged blocks, one per page (see decode_blocks_partials).
    Returns (o [B, H, S, D] fp32 unnormalised, m [B, H, S], l [B, H, S]) like decode_blocks_partials.
    """
    b, hq, d = q.shape
    maxnreg = maxnreg or (128 if k.bits == 2 else None)
    # codes as int32 words (aligned, vectorisable loads); token rows must be contiguous
    codes = [(p.codes if p.codes.stride(-1) == 1 and p.codes.stride(-2) == p.codes.shape[-1] else p.codes.contiguous())
             .view(torch.int32) for p in (k, v)]
    qg = k.channel_group or k.block_size  # tokens per query row (a key scale group, else the block)
    row = d * k.bits // 32 * (16 // k.bits) + 4
    # one allocation each for the programs' scratch (query rows, int16 value weights) and the outputs
    scratch = torch.empty(b * hq * splits, k.block_size // qg * row + k.block_size // 2, device=q.device,
                          dtype=torch.int32)
    out = torch.empty(b, hq, splits, d + 2, device=q.device, dtype=torch.float32)
    o, m, l_ = out[..., :d], out[..., d], out[..., d + 1]  # m and l share their strides
    kz = k.zeros if k.zeros is not None else k.scales  # placeholders when symmetric (never read)
    vz = v.zeros if v.zeros is not None else v.scales
    head_stride = lambda t: t.stride(1) if t.shape[1] > 1 else 0  # noqa: E731  (shared by heads)
    _decode_rows_kernel[(b * hq, splits)](
        q, k.ts, codes[0], k.scales, kz, codes[1], v.scales, vz, v.ts, kv_start, kv_len,
        kv_len if skip is None else skip, kv_len if block_table is None else block_table, o, m, l_, scratch,
        0 if skip is None else skip.stride(0), 0 if block_table is None else block_table.stride(0),
        q.stride(0), q.stride(1), q.stride(2),
        k.ts.stride(0), head_stride(k.ts), k.ts.stride(2),
        codes[0].stride(0), codes[0].stride(1),
        k.scales.stride(0), head_stride(k.scales), k.scales.stride(2) if k.channel_group else 0,
        codes[1].stride(0), codes[1].stride(1),
        v.scales.stride(0), head_stride(v.scales),
        v.ts.stride(0), head_stride(v.ts), v.ts.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        m.stride(0), m.stride(1), m.stride(2),
        sm_scale,
        KV_HEADS=hq, D=d, G=k.group_size, BITS=k.bits, KQMAX=k.qmax, VQMAX=v.qmax, BLOCK=k.block_size, QG=qg,
        KEY_CHANNEL=bool(k.channel_group), K_ASYM=k.zeros is not None, V_ASYM=v.zeros is not None,
        K_ASM=dot_asm(k.bits), V_ASM=axpy_asm(v.bits), USE_ASM=q.is_cuda,
        NUM_STAGES=num_stages, HAS_SKIP=skip is not None, PAGED=block_table is not None, num_warps=num_warps,
        **({"maxnreg": maxnreg} if maxnreg else {}),
    )
    return o, m, l_
