"""The last step of a fused decode call: exact attention over the fp16 window (sinks + recent tokens)
merged with the split-K partials of the compressed blocks, one program per (sequence, query head).

One launch instead of ~17 small torch ops (window scores, mask, softmax, value sum, three `cat`s and
the merge): at one decode step per layer those launches, not their work, were the cost on the host.
The pure-torch reference is `reference.merge_window_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# the window length, the split count and the strides that follow the window's length change from step to
# step: not specialized on (a recompile in the middle of a generation costs ~1 s)
@triton.jit(do_not_specialize=["splits", "window", "stride_wkb", "stride_wkh", "stride_wvb", "stride_wvh",
                               "stride_vb"])
def _merge_window_kernel(
    Q, O, M, L, WK, WV, VALID, OUT,
    stride_qb, stride_qh, stride_qd,
    stride_ob, stride_oh, stride_os,
    stride_mb, stride_mh, stride_ms,
    stride_wkb, stride_wkh, stride_wkt,
    stride_wvb, stride_wvh, stride_wvt,
    stride_vb, stride_vt,
    sm_scale, splits, window,
    HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr, WC: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_VALID: tl.constexpr,
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
    # the window in chunks of WC tokens, online softmax (no recompiles as it grows, bounded registers)
    m_w = tl.max(tl.full([1], float("-inf"), tl.float32), 0)
    l_w = tl.sum(tl.zeros([1], tl.float32), 0)
    o_w = tl.zeros([D], tl.float32)
    if HAS_WINDOW:
        kvh = h // GROUP
        q = tl.load(Q + b * stride_qb + h * stride_qh + dims * stride_qd).to(tl.float32) * sm_scale
        for t0 in range(0, window, WC):
            t = t0 + tl.arange(0, WC)
            ok = t < window
            if HAS_VALID:
                ok &= tl.load(VALID + b * stride_vb + t * stride_vt, mask=ok, other=0) != 0
            k = tl.load(WK + b * stride_wkb + kvh * stride_wkh + t[:, None] * stride_wkt + dims[None, :],
                        mask=ok[:, None], other=0.0).to(tl.float32)
            scores = tl.where(ok, tl.sum(k * q[None, :], 1), float("-inf"))
            m_new = tl.maximum(m_w, tl.max(scores, 0))
            m_s = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_w - m_s)
            p = tl.exp(scores - m_s)
            v = tl.load(WV + b * stride_wvb + kvh * stride_wvh + t[:, None] * stride_wvt + dims[None, :],
                        mask=ok[:, None], other=0.0).to(tl.float32)
            l_w = l_w * alpha + tl.sum(p, 0)
            o_w = o_w * alpha + tl.sum(p[:, None] * v, 0)
            m_w = m_new
    m_all = tl.maximum(tl.max(m, 0), m_w)
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)  # nothing attended at all: 0 / 0, as the reference
    w = tl.exp(m - m_safe)
    w_w = tl.exp(m_w - m_safe)
    num = tl.sum(w[:, None] * o, 0) + w_w * o_w
    den = tl.sum(w * l_, 0) + w_w * l_w
    tl.store(OUT + pid.to(tl.int64) * D + dims, num / den)


def merge_with_window(q: torch.Tensor, o: torch.Tensor, m: torch.Tensor, l: torch.Tensor, sm_scale: float,
                      window_k: torch.Tensor | None = None, window_v: torch.Tensor | None = None,
                      window_valid: torch.Tensor | None = None) -> torch.Tensor:
    """softmax-merge of split partials (o [B, Hq, S, D] unnormalised, m, l [B, Hq, S]; m and l share their
    strides) and exact attention of q [B, Hq, D] over window_k/v [B, KVH, W, D] (last dim contiguous;
    window_valid bool [B, W] or None = all) -> fp32 [B, Hq, D]."""
    b, hq, d = q.shape
    splits = o.shape[2]
    if window_k is not None and window_k.shape[2]:
        w, kvh = window_k.shape[2], window_k.shape[1]
        window_k = window_k if window_k.stride(-1) == 1 else window_k.contiguous()
        window_v = window_v if window_v.stride(-1) == 1 else window_v.contiguous()
    else:
        w, kvh, window_k, window_v = 0, hq, o, o  # placeholders (never read)
    if o.stride(-1) != 1 or m.stride() != l.stride():
        raise ValueError("merge_with_window needs o with a contiguous last dim and m, l of one layout")
    valid = window_valid if (window_valid is not None and w) else None
    out = torch.empty(b, hq, d, device=q.device, dtype=torch.float32)
    vb, vt = (valid.stride(0), valid.stride(1)) if valid is not None else (0, 0)
    _merge_window_kernel[(b * hq,)](
        q, o, m, l, window_k, window_v, valid if valid is not None else m, out,
        q.stride(0), q.stride(1), q.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        m.stride(0), m.stride(1), m.stride(2),
        window_k.stride(0), window_k.stride(1), window_k.stride(2),
        window_v.stride(0), window_v.stride(1), window_v.stride(2),
        vb, vt,
        sm_scale, splits, w,
        HQ=hq, GROUP=hq // kvh, D=d, S_PAD=triton.next_power_of_2(splits), WC=32,
        HAS_WINDOW=w > 0, HAS_VALID=valid is not None, num_warps=4,
    )
    return out
