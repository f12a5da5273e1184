"""The last steps of a fused decode call: exact attention over the fp16 window (sinks + recent tokens), then the
softmax merge of its partials with the split-K partials of the compressed blocks.

The window is cut into chunks of WT tokens, one program per (chunk, kv head, query rows): the query rows of a
kv head share each chunk's loads and its two tensor-core dots, and the chunks run side by side instead of one
after the other (a static store's window is held at its full capacity, ~260 tokens: 9 dependent 32-token
steps per query head took most of the old single kernel's time at batch 1). The merge then reads both sets of
partials, one program per (sequence, query head). Two launches instead of ~17 small torch ops (scores, mask,
softmax, value sum, three `cat`s and the merge). The tensor-core blocks kernel (GQA, MQA) runs `_window_chunk` in
programs of its own launch instead (`decode_attention(fuse_window=True)`, the default) and the merge reads one set
of partials; `_window_kernel` serves the rows kernel (MHA) and `fuse_window=False`. The pure-torch reference is
`reference.merge_window_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

WINDOW_TILE = 64  # window tokens per program
_MIN_WINDOW_SLOTS = 8  # the merge's window tile, at least: a window growing to 8 * 64 tokens never recompiles


@triton.jit
def _window_chunk(q, WK, WV, VALID, stride_wkt, stride_wvt, stride_vt, chunk, window, sm_scale, part,
                  D: tl.constexpr, WT: tl.constexpr, PARTS: tl.constexpr, HAS_VALID: tl.constexpr, DOT: tl.constexpr):
    """Exact attention of the query rows q [R, D] (DOT) over window tokens chunk * WT ... + WT - 1 of one kv head
    (WK, WV: its first token's row; VALID: its sequence's mask) -> (o [R, D] unnormalised, m, l [R]) fp32. With
    PARTS > 1, row i attends only part[i] of the PARTS equal parts of the chunk (the decode kernel's stacked rows)."""
    dims = tl.arange(0, D)
    local = tl.arange(0, WT)
    t = chunk * WT + local
    ok = t < window
    if HAS_VALID:
        ok &= tl.load(VALID + t * stride_vt, mask=ok, other=0) != 0
    k = tl.load(WK + t[:, None] * stride_wkt + dims[None, :], mask=ok[:, None], other=0.0).to(DOT)
    v = tl.load(WV + t[:, None] * stride_wvt + dims[None, :], mask=ok[:, None], other=0.0).to(DOT)
    scores = tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale  # fp32 [R, WT]
    mine = ok[None, :]
    if PARTS > 1:
        mine = mine & (local[None, :] // (WT // PARTS) == part[:, None])
    scores = tl.where(mine, scores, float("-inf"))
    m = tl.max(scores, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # a chunk with nothing attended: l = 0, o = 0
    p = tl.exp(scores - m_safe[:, None])
    o = tl.dot(p.to(DOT), v, input_precision="ieee")
    return o, m, tl.sum(p, 1)


# the window length and the strides that follow it change from step to step: not specialized on (a recompile
# in the middle of a generation costs ~1 s)
@triton.jit(do_not_specialize=["window", "stride_wkb", "stride_wkh", "stride_wvb", "stride_wvh", "stride_vb"])
def _window_kernel(
    Q, WK, WV, VALID, O, M, L,
    stride_qb, stride_qh,
    stride_wkb, stride_wkh, stride_wkt,
    stride_wvb, stride_wvh, stride_wvt,
    stride_vb, stride_vt,
    sm_scale, window,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, RP: tl.constexpr, D: tl.constexpr,
    WT: tl.constexpr, HAS_VALID: tl.constexpr, DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    RSPLIT: tl.constexpr = GROUP // ROWS
    b = (pid // (KV_HEADS * RSPLIT)).to(tl.int64)
    kvh = ((pid // RSPLIT) % KV_HEADS).to(tl.int64)
    rows = tl.arange(0, RP)
    row_ok = rows < ROWS
    hq = kvh * GROUP + (pid % RSPLIT) * ROWS + rows
    dims = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + hq[:, None] * stride_qh + dims[None, :], mask=row_ok[:, None],
                other=0.0).to(DOT)
    o, m, l_ = _window_chunk(q, WK + b * stride_wkb + kvh * stride_wkh, WV + b * stride_wvb + kvh * stride_wvh,
                             VALID + b * stride_vb, stride_wkt, stride_wvt, stride_vt, chunk, window, sm_scale, rows,
                             D, WT, 1, HAS_VALID, DOT)
    at = (b * KV_HEADS * GROUP + hq) * tl.num_programs(1) + chunk  # o, m, l: [B, HQ, chunks(, D)] contiguous
    tl.store(O + at[:, None] * D + dims[None, :], o, mask=row_ok[:, None])
    tl.store(M + at, m, mask=row_ok)
    tl.store(L + at, l_, mask=row_ok)


# the split count and the window's chunk count change between calls: not specialized on
@triton.jit(do_not_specialize=["splits", "chunks"])
def _merge_kernel(
    O, M, L, OW, MW, LW, OUT,
    stride_ob, stride_oh, stride_os,
    stride_mb, stride_mh, stride_ms,
    splits, chunks,
    HQ: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr, W_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // HQ).to(tl.int64)
    h = (pid % HQ).to(tl.int64)
    dims = tl.arange(0, D)
    s = tl.arange(0, S_PAD)
    s_ok = s < splits
    m = tl.load(M + b * stride_mb + h * stride_mh + s * stride_ms, mask=s_ok, other=float("-inf"))
    l_ = tl.load(L + b * stride_mb + h * stride_mh + s * stride_ms, mask=s_ok, other=0.0)
    o = tl.load(O + b * stride_ob + h * stride_oh + s[:, None] * stride_os + dims[None, :], mask=s_ok[:, None],
                other=0.0)
    m_all = tl.max(m, 0)
    if HAS_WINDOW:  # the window's partials, [B, HQ, chunks(, D)] contiguous
        c = tl.arange(0, W_PAD)
        c_ok = c < chunks
        w_at = (b * HQ + h) * chunks + c
        m_w = tl.load(MW + w_at, mask=c_ok, other=float("-inf"))
        l_w = tl.load(LW + w_at, mask=c_ok, other=0.0)
        o_w = tl.load(OW + w_at[:, None] * D + dims[None, :], mask=c_ok[:, None], other=0.0)
        m_all = tl.maximum(m_all, tl.max(m_w, 0))
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)  # nothing attended at all: 0 / 0, as the reference
    w = tl.exp(m - m_safe)
    num = tl.sum(w[:, None] * o, 0)
    den = tl.sum(w * l_, 0)
    if HAS_WINDOW:
        w_w = tl.exp(m_w - m_safe)
        num += tl.sum(w_w[:, None] * o_w, 0)
        den += tl.sum(w_w * l_w, 0)
    tl.store(OUT + pid.to(tl.int64) * D + dims, num / den)


def _dot_dtype(q: torch.Tensor):
    """The window dots' input type: the model's fp16 or bf16 on tensor cores (p is rounded to it, as flash
    attention rounds it), else fp32 (IEEE; also bf16 under Triton's interpreter, whose bf16 dots are wrong)."""
    if q.dtype == torch.float16 or q.dtype == torch.bfloat16 and q.is_cuda:
        return tl.float16 if q.dtype == torch.float16 else tl.bfloat16
    return tl.float32


def window_partials(q: torch.Tensor, window_k: torch.Tensor, window_v: torch.Tensor,
                    window_valid: torch.Tensor | None, sm_scale: float):
    """Exact attention of q [B, Hq, D] over window_k/v [B, KVH, W, D] (last dim contiguous; window_valid bool
    [B, W] or None = all) in chunks of WINDOW_TILE tokens -> (o [B, Hq, C, D] unnormalised, m, l [B, Hq, C])
    fp32, as the split partials of the blocks."""
    b, hq, d = q.shape
    kvh, w = window_k.shape[1], window_k.shape[2]
    chunks = triton.cdiv(w, WINDOW_TILE)
    group = hq // kvh
    rows = min(group, 16)
    o = torch.empty(b, hq, chunks, d, device=q.device, dtype=torch.float32)
    m = torch.empty(b, hq, chunks, device=q.device, dtype=torch.float32)
    l_ = torch.empty_like(m)
    if q.stride(-1) != 1:
        q = q.contiguous()
    valid = window_valid
    _window_kernel[(b * kvh * (group // rows), chunks)](
        q, window_k, window_v, m if valid is None else valid, o, m, l_,
        q.stride(0), q.stride(1),
        window_k.stride(0), window_k.stride(1), window_k.stride(2),
        window_v.stride(0), window_v.stride(1), window_v.stride(2),
        valid.stride(0) if valid is not None else 0, valid.stride(1) if valid is not None else 0,
        sm_scale, w,
        KV_HEADS=kvh, GROUP=group, ROWS=rows, RP=max(16, triton.next_power_of_2(rows)), D=d, WT=WINDOW_TILE,
        HAS_VALID=valid is not None, DOT=_dot_dtype(q), num_warps=4,
    )
    return o, m, l_


def merge_with_window(q: torch.Tensor, o: torch.Tensor, m: torch.Tensor, l: torch.Tensor, sm_scale: float,
                      window_k: torch.Tensor | None = None, window_v: torch.Tensor | None = None,
                      window_valid: torch.Tensor | None = None) -> torch.Tensor:
    """softmax-merge of split partials (o [B, Hq, S, D] unnormalised, m, l [B, Hq, S]; m and l share their
    strides) and exact attention of q [B, Hq, D] over window_k/v [B, KVH, W, D] (last dim contiguous;
    window_valid bool [B, W] or None = all) -> fp32 [B, Hq, D]."""
    b, hq, d = q.shape
    if o.stride(-1) != 1 or m.stride() != l.stride():
        raise ValueError("merge_with_window needs o with a contiguous last dim and m, l of one layout")
    has_window = window_k is not None and window_k.shape[2] > 0
    if has_window:
        window_k = window_k if window_k.stride(-1) == 1 else window_k.contiguous()
        window_v = window_v if window_v.stride(-1) == 1 else window_v.contiguous()
        o_w, m_w, l_w = window_partials(q, window_k, window_v, window_valid, sm_scale)
    else:
        o_w, m_w, l_w = o, m, l  # placeholders (never read)
    chunks = o_w.shape[2] if has_window else 0
    splits = o.shape[2]
    out = torch.empty(b, hq, d, device=q.device, dtype=torch.float32)
    _merge_kernel[(b * hq,)](
        o, m, l, o_w, m_w, l_w, out,
        o.stride(0), o.stride(1), o.stride(2),
        m.stride(0), m.stride(1), m.stride(2),
        splits, chunks,
        HQ=hq, D=d, S_PAD=triton.next_power_of_2(splits),
        W_PAD=max(_MIN_WINDOW_SLOTS, triton.next_power_of_2(max(chunks, 1))), HAS_WINDOW=has_window, num_warps=4,
    )
    return out
