"""The steps of the rows kernel (decode_rows.py): its query rows in the program's scratch, the key words of a key
step and their integer dots, the value words of a value step, and a paged block's code pointer. Triton helpers
only; what they compute is stated in decode_rows.py's docstring."""

from __future__ import annotations

import triton
import triton.language as tl

from .int_dot import fields_total, pair_axpy, query_pairs, word_dot

# int16 target of the rounded query: |sum| < 2**31 for head_dim <= 256, 14 bits + sign per number
QTARGET = tl.constexpr(16383.0)


@triton.jit
def _store_query_rows(qbuf, q_ptr, stride_qd, kt_blk, ks_blk, kz_blk, stride_ksg, sm_scale,
                      D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, QG: tl.constexpr, BLOCK: tl.constexpr,
                      KEY_CHANNEL: tl.constexpr, K_ASYM: tl.constexpr):
    # one block's query rows (one per key scale group of the block, else one) into the program's scratch:
    # the int16 pairs each word of codes meets (NW * P int32), then 1 / (normalisation * m_max), the sum of
    # the rounded query / normalisation and q~ . z_k (fp32 bits), the rounded query's integer sum
    NW: tl.constexpr = D * BITS // 32
    P: tl.constexpr = 16 // BITS
    ROW: tl.constexpr = NW * P + 4
    M_MAX: tl.constexpr = 1 << (8 - BITS)  # m_k of the last field of a byte
    gi = tl.arange(0, G)
    chunks = tl.arange(0, D // G)
    qt = tl.zeros([D // G, G], tl.float32)
    for i in tl.static_range(G):  # q~_c = q_c @ T_S_k^T as G rank-one updates (columns read from L1)
        qt += (tl.load(q_ptr + (chunks * G + i) * stride_qd).to(tl.float32)[:, None]
               * tl.load(kt_blk + gi * G + i).to(tl.float32)[None, :])
    qt = tl.reshape(qt * sm_scale, [1, D])
    dims = tl.arange(0, D)[None, :]
    words = tl.arange(0, NW)[None, :] * P
    for g in tl.static_range(BLOCK // QG):
        x = qt
        zk = 0.0
        if KEY_CHANNEL:  # fold the group's channel scales into the query
            if K_ASYM:
                zk = tl.sum(tl.sum(qt * tl.load(kz_blk + g * stride_ksg + dims).to(tl.float32), 1), 0)
            x = qt * tl.load(ks_blk + g * stride_ksg + dims).to(tl.float32)
        amax = tl.max(tl.max(tl.abs(x), 1), 0)
        norm = QTARGET / tl.where(amax > 0, amax, QTARGET)
        xn = x * norm
        qi = tl.where(xn >= 0, xn + 0.5, xn - 0.5).to(tl.int32)  # rounded to the nearest integer
        q0, q1, q2, q3, q4, q5, q6, q7 = query_pairs(qi, NW, BITS)
        row = qbuf + g * ROW
        tl.store(row + words, q0)
        tl.store(row + words + 1, q1)
        tl.store(row + words + 2, q2)
        tl.store(row + words + 3, q3)
        if BITS == 2:
            tl.store(row + words + 4, q4)
            tl.store(row + words + 5, q5)
            tl.store(row + words + 6, q6)
            tl.store(row + words + 7, q7)
        four = tl.arange(0, 4)
        qsum = tl.sum(tl.sum(qi, 1), 0)  # exact; the zero-point terms use the query the dots see
        floats = tl.where(four == 0, 1.0 / (norm * M_MAX), tl.where(four == 1, qsum.to(tl.float32) / norm, zk))
        tl.store(row + NW * P + four, tl.where(four == 3, qsum, floats.to(tl.int32, bitcast=True)))


@triton.jit
def _query_float(qbuf, k: tl.constexpr):
    # float k of the query rows at qbuf (a pointer or pointers)
    return tl.load(qbuf + k).to(tl.float32, bitcast=True)


@triton.jit
def _split4(x):
    # [A, C, 4] -> its 4 columns, each [A, C] (the 4 sit in one lane: no data moves)
    even, odd = tl.split(tl.reshape(x, [x.shape[0], x.shape[1], 2, 2]))
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return x0, x1, x2, x3


@triton.jit
def _pairs4(tab):
    # 4 consecutive int32 of the query rows at `tab` (a pointer, or [1, A, 1] pointers), the same in
    # every lane (one broadcast 16-byte load) -> 4 x [32, 1 or A]
    lane0 = tl.zeros([32, 1, 1], tl.int32)
    return _split4(tl.load(tab + lane0 + tl.arange(0, 4)[None, None, :]))


@triton.jit
def _one_word(w, tab, a0, a1, a2, a3, P: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr,
              USE_ASM: tl.constexpr):
    q0, q1, q2, q3 = _pairs4(tab)
    if P == 8:
        q4, q5, q6, q7 = _pairs4(tab + 4)
    else:
        q4, q5, q6, q7 = q0, q0, q0, q0  # unused at 4 bits
    return word_dot(w, q0, q1, q2, q3, q4, q5, q6, q7, a0, a1, a2, a3, BITS, ASM, USE_ASM)


@triton.jit
def _load_key_words(kc, toks, ok, NW: tl.constexpr):
    # the code words of tokens [32, A] (dim 0 over the lanes), 4 per 16-byte load: up to 4 x [32, A, 4]
    base = kc + toks[:, :, None] * NW + tl.arange(0, 4)[None, None, :]
    k0 = tl.load(base, mask=ok[:, :, None], other=0)
    k1, k2, k3 = k0, k0, k0  # placeholders past NW words (never read)
    if NW >= 8:
        k1 = tl.load(base + 4, mask=ok[:, :, None], other=0)
    if NW >= 16:
        k2 = tl.load(base + 8, mask=ok[:, :, None], other=0)
        k3 = tl.load(base + 12, mask=ok[:, :, None], other=0)
    return k0, k1, k2, k3


@triton.jit
def _chunk_dot(kw, tab, a0, a1, a2, a3, P: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr,
               USE_ASM: tl.constexpr):
    # 4 words [32, A, 4] of each lane's tokens, the query row(s) at the first one's pairs, accumulators [32, A]
    w0, w1, w2, w3 = _split4(kw)
    a0, a1, a2, a3 = _one_word(w0, tab, a0, a1, a2, a3, P, BITS, ASM, USE_ASM)
    a0, a1, a2, a3 = _one_word(w1, tab + P, a0, a1, a2, a3, P, BITS, ASM, USE_ASM)
    a0, a1, a2, a3 = _one_word(w2, tab + 2 * P, a0, a1, a2, a3, P, BITS, ASM, USE_ASM)
    return _one_word(w3, tab + 3 * P, a0, a1, a2, a3, P, BITS, ASM, USE_ASM)


@triton.jit
def _key_dots(k0, k1, k2, k3, tab, NW: tl.constexpr, P: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr,
              USE_ASM: tl.constexpr):
    # words of tokens [32, A] (_load_key_words) -> m_max * each one's sum of q * code over its words (int32,
    # exact); the query row(s) `tab` hold P pairs per word
    a0 = tl.zeros([k0.shape[0], k0.shape[1]], tl.int32)
    a1, a2, a3 = a0, a0, a0
    a0, a1, a2, a3 = _chunk_dot(k0, tab, a0, a1, a2, a3, P, BITS, ASM, USE_ASM)
    if NW >= 8:
        a0, a1, a2, a3 = _chunk_dot(k1, tab + 4 * P, a0, a1, a2, a3, P, BITS, ASM, USE_ASM)
    if NW >= 16:
        a0, a1, a2, a3 = _chunk_dot(k2, tab + 8 * P, a0, a1, a2, a3, P, BITS, ASM, USE_ASM)
        a0, a1, a2, a3 = _chunk_dot(k3, tab + 12 * P, a0, a1, a2, a3, P, BITS, ASM, USE_ASM)
    return fields_total(a0, a1, a2, a3, BITS)


@triton.jit
def _value_step(vc, wbuf, t, t_rel, length, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15,
                NW: tl.constexpr, RV: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr, USE_ASM: tl.constexpr):
    # tokens t + 4a + r (a < RV, r < 4; t_rel: t within the block), one word per lane (lane = (word, a)):
    # the channel accumulators [NW, RV] of the lane's word plus the 4 tokens' weight * m_k * code
    a = 4 * tl.arange(0, RV)
    words = tl.arange(0, NW)
    tok0 = t + a
    v0 = tl.load(vc + words[:, None] + (tok0 * NW)[None, :], mask=(tok0 < length)[None, :], other=0)
    v1 = tl.load(vc + words[:, None] + ((tok0 + 1) * NW)[None, :], mask=(tok0 + 1 < length)[None, :], other=0)
    v2 = tl.load(vc + words[:, None] + ((tok0 + 2) * NW)[None, :], mask=(tok0 + 2 < length)[None, :], other=0)
    v3 = tl.load(vc + words[:, None] + ((tok0 + 3) * NW)[None, :], mask=(tok0 + 3 < length)[None, :], other=0)
    # the int16 weights of the 4 tokens as two pairs; every lane of a row reads the same 8 bytes
    idx = ((t_rel + a) // 2)[None, :, None] + tl.zeros([NW, RV, 2], tl.int32) + tl.arange(0, 2)[None, None, :]
    wp0, wp1 = tl.split(tl.load(wbuf + idx))
    a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15 = pair_axpy(
        v0, v1, wp0, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, BITS, ASM, USE_ASM)
    return pair_axpy(v2, v3, wp1, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15,
                     BITS, ASM, USE_ASM)


@triton.jit
def _page_words(C, BT, b, stride_btb, blk, end, stride_cb, h, stride_ch, WORDS: tl.constexpr):
    # codes of paged block `blk` of row b (page BT[b, blk]; none past `end`), shifted so that sequence position t
    # addresses its word row t % BLOCK
    page = tl.load(BT + b * stride_btb + blk, mask=blk < end, other=0).to(tl.int64)
    return C + page * stride_cb + h * stride_ch - blk * WORDS
