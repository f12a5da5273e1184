"""Split-K decode attention that reads DecoQuant's packed codes directly (never rebuilds fp16 K/V).

For one kv head h, cache block n (T_S_k, T_S_v) and the g-channel chunk c of the query:
    scores[t]  = s_k[t] * sum_c (q_c @ T_S_k^T) . (codes_k[t, c] - qmax)
    out        = sum_blocks ( sum_t p[t] s_v[t] (codes_v[t] - qmax) ) @ T_S_v     (per chunk)
Asymmetric codes (T_L = codes * s + z) add z_k[t] * sum(q~) to the scores and sum_t p[t] z_v[t] to
every code column of the block's value sum. Keys with scales per T_L channel over groups of cg
tokens scale the transformed query instead, once per tile: scores = (q~ * s_k) . codes + q~ . z_k. A
tile holds STACK such groups where the padding rows of the tensor-core tile have room (STACK * ROWS
<= GROUP_PAD): row i is query i % ROWS, scaled for and attending only group i // ROWS of the tile,
with its own softmax state; a query's stacked rows are written as extra splits and merged as splits are.
A program serves ROWS of the GROUP query heads of its kv head: where a tile would need more than 16 rows
(MQA), GROUP / ROWS programs read the same blocks (mostly from L2) instead of one program with twice
the registers.
The query is transformed once per block, scores and the value sum stay in the code basis, and T_S_v
is applied once per block. Programs split the blocks of a sequence (flash-decoding); their partial
(max, sum, output) triples are merged with the exact residual window by `merge.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...format import FUSED_BITS
from ..layout import PackedKV
from .codes import _code_planes, _load3, _pair_planes, _planes, _three_planes, _unplanes
from .launch import _conversion, _num_splits, _starved, _tile, _value_words, choose_kernel
from .merge import WINDOW_TILE, _dot_dtype, _window_chunk


# the block splits, the window's length and its strides change between calls: not specialized on
@triton.jit(do_not_specialize=["block_splits", "window", "stride_wkb", "stride_wkh", "stride_wvb", "stride_wvh",
                               "stride_wlb"])
def _decode_blocks_kernel(
    Q, KC, KS, KZ, KT, VC, VS, VZ, VT, START, LEN, SKIP, BT, O, M, L, WK, WV, WL,
    stride_skb, stride_btb,
    stride_qb, stride_qh, stride_qd,
    stride_kcb, stride_kch, stride_kct,
    stride_ksb, stride_ksh, stride_ksg,
    stride_ktb, stride_kth, stride_ktn,
    stride_vcb, stride_vch, stride_vct,
    stride_vsb, stride_vsh,
    stride_vtb, stride_vth, stride_vtn,
    stride_ob, stride_oh, stride_os,
    stride_mb, stride_mh,
    stride_wkb, stride_wkh, stride_wkt, stride_wvb, stride_wvh, stride_wvt, stride_wlb, stride_wlt,
    sm_scale, block_splits, window,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
    G: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, KQMAX: tl.constexpr, VQMAX: tl.constexpr,
    BLOCK: tl.constexpr,
    TILE: tl.constexpr, LOW_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,
    KEY_CHANNEL: tl.constexpr, K_ASYM: tl.constexpr, V_ASYM: tl.constexpr,
    USE_ASM: tl.constexpr, KCONV: tl.constexpr, VCONV: tl.constexpr, HAS_SKIP: tl.constexpr,
    VPAIR: tl.constexpr, STACK: tl.constexpr, PAGED: tl.constexpr,
    WINDOW: tl.constexpr, WT: tl.constexpr, HAS_WL: tl.constexpr, WDOT: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    RSPLIT: tl.constexpr = GROUP // ROWS  # programs per kv head
    b = (pid // (KV_HEADS * RSPLIT)).to(tl.int64)  # 64-bit offsets: b * stride passes 2**31 on large caches
    h = (pid // RSPLIT % KV_HEADS).to(tl.int64)
    q_first = h * GROUP + pid % RSPLIT * ROWS  # this program's first query head
    # bit planes of the keys: codes per byte; 3-bit codes give the four planes of their low 2 bits
    # (`codes._three_planes`)
    P: tl.constexpr = 4 if KBITS == 3 else 8 // KBITS
    # value planes: codes per 16-bit word (VPAIR: values read as int16 words, `codes._pair_planes`), else per byte
    PV: tl.constexpr = 4 if VBITS == 3 else 16 // VBITS if VPAIR else 8 // VBITS
    DOT: tl.constexpr = tl.float16 if LOW_PRECISION else tl.float32
    rows = tl.arange(0, GROUP_PAD)
    # STACK scale groups of per-channel key scales per tile (see the module docstring): row i of the tile is
    # query i % ROWS over the tokens of group i // ROWS of each tile; STACK = 1: row i is query i
    row_ok = rows < ROWS * STACK
    row_group = rows // ROWS
    dims = tl.arange(0, D)
    cols = tl.arange(0, D * KBITS // 8 if KBITS != 3 else 1)  # KC's bytes per token row
    vcols = tl.arange(0, D * VBITS // (16 if VPAIR else 8) if VBITS != 3 else 1)  # VC's int16 words or bytes
    gi = tl.arange(0, G)
    q_at = Q + b * stride_qb + (q_first + rows % ROWS)[:, None] * stride_qh + dims[None, :] * stride_qd
    q = tl.load(q_at, mask=row_ok[:, None], other=0.0).to(tl.float32) * sm_scale  # [GP, D]
    start = tl.load(START + b)
    length = tl.load(LEN + b)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)  # output, real basis
    # this split's blocks, from the sequence's own length (see decode_rows.py); no host-side count, so nothing
    # here changes as the cache grows (a specialization on it recompiled the kernel mid-generation)
    blocks = (length + BLOCK - 1) // BLOCK
    per_split = (blocks + block_splits - 1) // block_splits
    first = split * per_split  # past the blocks for the window's programs (split >= block_splits): none
    for blk in tl.range(first, tl.minimum(first + per_split, blocks), num_stages=NUM_STAGES):
        t0 = blk * BLOCK
        # where the block lies: (row, its first token there, its block index there); paged: the block table's
        # page, which holds this one block
        if PAGED:
            row = tl.load(BT + b * stride_btb + blk).to(tl.int64)
            tb = t0
            bl = 0
        else:
            row = b
            tb = 0
            bl = blk
        if HAS_SKIP:  # a block whose row is stored exact (attended with the window instead)
            end = tl.where(tl.load(SKIP + b * stride_skb + blk) != 0, 0, length)
        else:
            end = length
        ts_off = gi[:, None] * G + gi[None, :]
        ts_k = tl.load(KT + row * stride_ktb + h * stride_kth + bl * stride_ktn + ts_off).to(tl.float32)
        ts_v = tl.load(VT + row * stride_vtb + h * stride_vth + bl * stride_vtn + ts_off).to(tl.float32)
        # q~_c = q_c @ T_S_k^T for every chunk c: [GP * D/G, G] @ [G, G]
        qt = tl.reshape(tl.dot(tl.reshape(q, [GROUP_PAD * (D // G), G]), tl.trans(ts_k)), [GROUP_PAD, D])
        q0, q1, q2, q3 = _planes(qt.to(DOT), P, GROUP_PAD, D)
        if K_ASYM and not KEY_CHANNEL:
            qsum = tl.sum(qt, 1)  # per-token zero points: z_k[t] * sum(q~)
        zacc = tl.zeros([GROUP_PAD], tl.float32)  # sum_t p[t] z_v[t] of this block
        # this block's value sum in the code basis, one accumulator per bit plane
        a0 = tl.zeros([GROUP_PAD, D // PV], tl.float32)
        a1 = tl.zeros([GROUP_PAD, D // PV], tl.float32)
        a2 = tl.zeros([GROUP_PAD, D // PV], tl.float32)
        a3 = tl.zeros([GROUP_PAD, D // PV], tl.float32)
        for j in tl.static_range(BLOCK // TILE):
            toks = t0 + j * TILE + tl.arange(0, TILE)
            ok = (toks >= start) & (toks < end)
            k_row = KC + row * stride_kcb + h * stride_kch + (toks - tb)[:, None] * stride_kct
            if KBITS == 3:
                kw, kh = _load3(k_row, ok[:, None], D)
                k0, k1, k2, k3 = _three_planes(kw, kh, KCONV, KQMAX, LOW_PRECISION, USE_ASM, TILE, D)
            else:
                kp = tl.load(k_row + cols[None, :], mask=ok[:, None], other=0)  # [TILE, D / P] uint8
                k0, k1, k2, k3 = _code_planes(kp, KCONV, KBITS, KQMAX, LOW_PRECISION, USE_ASM)
            if KEY_CHANNEL:  # fold each row's scale group's channel scales into its query, once per tile
                grp = (bl * (BLOCK // TILE) + j) * STACK
                if STACK > 1:  # [GP, D]: row i's group
                    ch_off = row * stride_ksb + h * stride_ksh + (grp + row_group)[:, None] * stride_ksg + dims[None, :]
                    ks_c = tl.load(KS + ch_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
                else:  # [D]: one group for every row (a 2-D load here costs MQA a third of its time)
                    ch_off = row * stride_ksb + h * stride_ksh + grp * stride_ksg + dims
                    ks_c = tl.load(KS + ch_off).to(tl.float32)[None, :]
                q0, q1, q2, q3 = _planes((qt * ks_c).to(DOT), P, GROUP_PAD, D)
            else:
                ks = tl.load(KS + row * stride_ksb + h * stride_ksh + toks - tb, mask=ok, other=0.0).to(tl.float32)
            # scores = sum over planes of q~_plane . (codes_plane - qmax): no shuffles per token
            scores = tl.dot(q0, tl.trans(k0))
            if P > 1:
                scores += tl.dot(q1, tl.trans(k1))
            if P > 2:
                scores += tl.dot(q2, tl.trans(k2))
                scores += tl.dot(q3, tl.trans(k3))
            if KEY_CHANNEL:
                if K_ASYM:
                    if STACK > 1:
                        kz_c = tl.load(KZ + ch_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
                    else:
                        kz_c = tl.load(KZ + ch_off).to(tl.float32)[None, :]
                    scores += tl.sum(qt * kz_c, 1)[:, None]
            else:
                scores = scores * ks[None, :]
                if K_ASYM:
                    kz = tl.load(KZ + row * stride_ksb + h * stride_ksh + toks - tb, mask=ok, other=0.0).to(tl.float32)
                    scores += qsum[:, None] * kz[None, :]
            if STACK > 1:  # a row attends its own scale group's tokens only
                mine = ok[None, :] & (tl.arange(0, TILE)[None, :] // (TILE // STACK) == row_group[:, None])
                scores = tl.where(mine, scores, float("-inf"))  # [GP, TILE]
            else:
                scores = tl.where(ok[None, :], scores, float("-inf"))  # [GP, TILE]
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            v_row = VC + row * stride_vcb + h * stride_vch + (toks - tb)[:, None] * stride_vct
            if VBITS == 3:
                vw, vh = _load3(v_row, ok[:, None], D)
                v0, v1, v2, v3 = _three_planes(vw, vh, VCONV, VQMAX, LOW_PRECISION, USE_ASM, TILE, D)
            else:
                vp = tl.load(v_row + vcols[None, :], mask=ok[:, None], other=0)
                if VPAIR:
                    v0, v1, v2, v3 = _pair_planes(vp, VCONV, VBITS, VQMAX, LOW_PRECISION, USE_ASM)
                else:
                    v0, v1, v2, v3 = _code_planes(vp, VCONV, VBITS, VQMAX, LOW_PRECISION, USE_ASM)
            vs = tl.load(VS + row * stride_vsb + h * stride_vsh + toks - tb, mask=ok, other=0.0).to(tl.float32)
            pw = (p * vs[None, :]).to(DOT)  # [GP, TILE]
            acc = acc * alpha[:, None]
            if V_ASYM:
                vz = tl.load(VZ + row * stride_vsb + h * stride_vsh + toks - tb, mask=ok, other=0.0).to(tl.float32)
                zacc = zacc * alpha + tl.sum(p * vz[None, :], 1)
            a0 = a0 * alpha[:, None] + tl.dot(pw, v0)
            if PV > 1:
                a1 = a1 * alpha[:, None] + tl.dot(pw, v1)
            if PV > 2:
                a2 = a2 * alpha[:, None] + tl.dot(pw, v2)
                a3 = a3 * alpha[:, None] + tl.dot(pw, v3)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        # back to the real basis once per block: [GP * D/G, G] @ T_S_v
        acc_code = _unplanes(a0, a1, a2, a3, PV, GROUP_PAD, D)
        if V_ASYM:
            acc_code += zacc[:, None]
        acc += tl.reshape(tl.dot(tl.reshape(acc_code, [GROUP_PAD * (D // G), G]), ts_v), [GROUP_PAD, D])
    if WINDOW:  # programs past the block splits: one chunk of WT window tokens each (merge._window_chunk), the
        # stacked rows each over their own part of it
        if split >= block_splits:
            wq = tl.load(q_at, mask=row_ok[:, None], other=0.0).to(WDOT)
            acc, m_i, l_i = _window_chunk(wq, WK + b * stride_wkb + h * stride_wkh,
                                          WV + b * stride_wvb + h * stride_wvh, WL + b * stride_wlb, stride_wkt,
                                          stride_wvt, stride_wlt, split - block_splits, window, sm_scale, row_group,
                                          D, WT, STACK, HAS_WL, WDOT)
    # row i -> query i % ROWS, split row_group * splits + split (the merge combines a query's stacked rows as
    # it combines splits)
    hq = q_first + rows % ROWS
    out_split = row_group * tl.num_programs(1) + split
    tl.store(O + b * stride_ob + hq[:, None] * stride_oh + out_split[:, None] * stride_os + dims[None, :], acc,
             mask=row_ok[:, None])
    tl.store(M + b * stride_mb + hq * stride_mh + out_split, m_i, mask=row_ok)
    tl.store(L + b * stride_mb + hq * stride_mh + out_split, l_i, mask=row_ok)


def decode_blocks_partials(q: torch.Tensor, k: PackedKV, v: PackedKV, sm_scale: float,
                           kv_start: torch.Tensor, kv_len: torch.Tensor, num_splits: int | None = None,
                           tile: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                           low_precision: bool = True, kernel: str = "auto", skip: torch.Tensor | None = None,
                           block_table: torch.Tensor | None = None, window_k: torch.Tensor | None = None,
                           window_v: torch.Tensor | None = None, window_valid: torch.Tensor | None = None):
    """Partial attention of q [B, Hq, D] over the compressed tokens of k/v.

    block_table: int32 [B, NB] or None; paged blocks (`layout`: k/v hold one block per page): block n of row b is
    page block_table[b, n] (both kernels read it; entries past a row's kv_len are never read).

    kv_start/kv_len: int32 [B]; tokens kv_start <= t < kv_len are attended.
    skip: int8 [B, NB'] or None; block n of row b is not attended where skip[b, n] != 0 (`layout.ExactBlocks`).
    low_precision: fp16 tensor-core dots (codes are exact; the query transform and p * s_v are
    rounded; the rows kernel rounds them to int16 per block), else fp32 (tf32) dots (mma kernel).
    tile: tokens per step of the mma kernel (default 128; keys with per-channel scales use tiles of
    their scale group); the rows kernel steps by 32 tokens, one per lane.
    num_warps / num_stages: default 4 / 3 (mma), 1 / 1 (rows).
    kernel: "mma" (tensor cores, this file), "rows" (one query row per kv head, integer dp2a CUDA-core math,
    decode_rows.py) or "auto" (rows where it applies: MHA, 2/4 bits, low_precision).
    window_k/v [B, KVH, W, D] (last dim contiguous), window_valid bool [B, W] or None (= all): the exact window,
    attended in the same launch by programs past the block splits, one per WINDOW_TILE tokens (mma kernel only;
    `merge.merge_with_window` attends it in a launch of its own).
    Returns (o [B, Hq, S, D] fp32 unnormalised, m [B, Hq, S], l [B, Hq, S]) for S splits.
    """
    from .decode_rows import decode_rows_partials

    b, hq, d = q.shape
    kvh = k.codes.shape[1]
    if hq % kvh:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {kvh}")
    if block_table is not None and (k.tokens != k.block_size or block_table.dim() != 2 or block_table.shape[0] != b):
        raise ValueError(f"paged blocks are one block per page ([pages, heads, {k.block_size}, ...]) and "
                         f"block_table is [{b}, blocks]; got {tuple(k.codes.shape)} and {tuple(block_table.shape)}")
    n_blocks = k.tokens // k.block_size if block_table is None else block_table.shape[1]
    has_window = window_k is not None and window_k.shape[2] > 0
    if choose_kernel(hq, k, v, low_precision, kernel) == "rows":
        if has_window:
            raise ValueError("the rows kernel attends no window in its launch; merge it with merge_with_window")
        # one-warp programs; 16 per SM's worth of splits (H100, batch 8 x 32 heads x 32k: 8 to 32 splits
        # within 3% of each other, 4 splits 30% slower)
        splits = num_splits or _num_splits(b * kvh, n_blocks, q.device, per_sm=16)
        return decode_rows_partials(q, k, v, sm_scale, kv_start, kv_len, splits, num_warps=num_warps or 1,
                                    num_stages=num_stages or 1, skip=skip, block_table=block_table)
    num_warps, num_stages = num_warps or 4, num_stages or 3
    if k.bits not in FUSED_BITS or v.bits not in FUSED_BITS:
        raise ValueError(f"the fused kernel reads codes of {'/'.join(map(str, FUSED_BITS))} bits (keys and values "
                         f"each), got bits={k.bits}/{v.bits}")
    if v.channel_group:
        raise ValueError("the fused kernel reads values with per-token scales, got per-channel value scales")
    group = hq // kvh
    tile, stack, rows = _tile(k, tile, group, starved=_starved(b * kvh, n_blocks, q.device))
    group_pad = max(16, triton.next_power_of_2(rows * stack))
    if k.block_size % tile or k.group_size != 16 and k.group_size != 32:
        raise ValueError(f"block_size={k.block_size} must be a multiple of the tile {tile}, group_size 16 or 32")
    for p in (k, v):
        columns = d // 4 if p.bits == 3 else d * p.bits // 8  # of a bit plane (3 bits: the low bits' planes)
        if columns < 16:
            raise ValueError(f"head_dim={d} at {p.bits} bits gives bit planes of {columns} < 16 columns")
        if p.bits == 3 and _value_words(p.codes) is None:  # the low bits are read as int16 words
            raise ValueError("3-bit codes must start every token row at an even byte offset (even strides and "
                             f"storage offset), got strides {p.codes.stride()}, offset {p.codes.storage_offset()}")
    splits = num_splits or _num_splits(b * hq // rows, n_blocks, q.device, per_sm=2, round_up=False)
    if has_window:
        window_k = window_k if window_k.stride(-1) == 1 else window_k.contiguous()
        window_v = window_v if window_v.stride(-1) == 1 else window_v.contiguous()
    programs = splits + (triton.cdiv(window_k.shape[2], WINDOW_TILE) if has_window else 0)
    o = torch.empty(b, hq, stack * programs, d, device=q.device, dtype=torch.float32)
    m = torch.empty(b, hq, stack * programs, device=q.device, dtype=torch.float32)
    l_ = torch.empty_like(m)
    kt, vt = k.ts, v.ts
    for p in (k, v):
        if p.zeros is not None and p.zeros.stride() != p.scales.stride():
            raise ValueError("zeros and scales of a PackedKV must share one memory layout (strides)")
    kz = k.zeros if k.zeros is not None else k.scales  # placeholders when symmetric (never read)
    vz = v.zeros if v.zeros is not None else v.scales
    use_asm = q.is_cuda and low_precision  # PTX on the GPU; the interpreter runs _plane
    # values read as 16-bit words where that measured faster (H200, batch 8 x 32k, graph-timed, old -> new ms:
    # GQA-4 4-bit 0.395 -> 0.372 default preset, 0.230 -> 0.210 paper; 8-bit 0.439 -> 0.365 and 0.268 -> 0.219;
    # MQA 8-bit 0.106 -> 0.092; but MQA 4-bit, 32 query rows, 0.094 -> 0.129: it keeps the byte path)
    vc = _value_words(v.codes) if v.bits == 8 or v.bits == 4 and group_pad == 16 else None
    vpair = vc is not None
    vc = vc if vpair else v.codes
    vconv = _conversion(v, use_asm, pair=vpair)
    head_stride = lambda t: t.stride(1) if t.shape[1] > 1 else 0  # noqa: E731  (scales shared by heads)
    wk, wv = (window_k, window_v) if has_window else (o, o)  # placeholders without a window (never read)
    wl = window_valid if has_window and window_valid is not None else kv_len
    _decode_blocks_kernel[(b * hq // rows, programs)](
        q, k.codes, k.scales, kz, kt, vc, v.scales, vz, vt, kv_start, kv_len,
        kv_len if skip is None else skip, kv_len if block_table is None else block_table, o, m, l_, wk, wv, wl,
        0 if skip is None else skip.stride(0), 0 if block_table is None else block_table.stride(0),
        q.stride(0), q.stride(1), q.stride(2),
        k.codes.stride(0), k.codes.stride(1), k.codes.stride(2),
        k.scales.stride(0), head_stride(k.scales), k.scales.stride(2) if k.channel_group else 0,
        kt.stride(0), head_stride(kt), kt.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2),
        v.scales.stride(0), head_stride(v.scales),
        vt.stride(0), head_stride(vt), vt.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        m.stride(0), m.stride(1),
        wk.stride(0), wk.stride(1), wk.stride(2), wv.stride(0), wv.stride(1), wv.stride(2),
        wl.stride(0) if wl.dim() == 2 else 0, wl.stride(1) if wl.dim() == 2 else 0,
        sm_scale, splits, window_k.shape[2] if has_window else 0,
        KV_HEADS=kvh, GROUP=group, ROWS=rows, GROUP_PAD=group_pad, D=d,
        G=k.group_size, KBITS=k.bits, VBITS=v.bits, KQMAX=k.qmax, VQMAX=v.qmax, BLOCK=k.block_size, TILE=tile,
        LOW_PRECISION=low_precision, NUM_STAGES=num_stages,
        KEY_CHANNEL=bool(k.channel_group), K_ASYM=k.zeros is not None, V_ASYM=v.zeros is not None,
        USE_ASM=use_asm, KCONV=_conversion(k, use_asm), VCONV=vconv,
        HAS_SKIP=skip is not None, VPAIR=vpair, STACK=stack, PAGED=block_table is not None,
        WINDOW=has_window, WT=WINDOW_TILE, HAS_WL=wl.dim() == 2, WDOT=_dot_dtype(q), num_warps=num_warps,
    )
    return o, m, l_
