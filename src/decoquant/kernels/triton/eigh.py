"""The g x g eigenproblems of block compression in one launch, without a host sync (torch.linalg.eigh checks
its result on the host), and the 2-site factors straight from them.

One program per symmetric float64 matrix A (a Gram matrix M^T M): cyclic Jacobi sweeps (Golub & Van Loan,
sym.schur2) in registers until the off-diagonal mass is below JACOBI_TOL^2 of the total, then, as
mpo.two_sites_from_eigh with s = sqrt(eigenvalue): W = V S^{-1/2} (float32, zero columns for
s <= RANK_RTOL * s_max), T_S = S^{1/2} V^T (float16), and flags[b] = 1 for a rank-deficient matrix or a T_S
entry past fp16. The eigenpairs come in Jacobi's order, not sorted: W's columns and T_S's rows are permuted
(and signed) consistently, which changes neither T_L T_S nor any scale format.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...mpo import RANK_RTOL

JACOBI_SWEEPS = 12  # fp64 cyclic Jacobi converges quadratically: 16 x 16 Gram matrices take 5-8 sweeps
JACOBI_TOL = 1e-14
_RANK_RTOL = tl.constexpr(RANK_RTOL)
_TOL2 = tl.constexpr(JACOBI_TOL * JACOBI_TOL)


@triton.jit
def _rotate(x, i, p, q, cs, sn, axis: tl.constexpr):
    """x J for the rotation J in the (p, q) plane along `axis` (1: columns p, q; 0: rows p, q)."""
    if axis == 1:
        xp = tl.sum(tl.where(i == p, x, 0.0), axis=1)[:, None]
        xq = tl.sum(tl.where(i == q, x, 0.0), axis=1)[:, None]
    else:
        xp = tl.sum(tl.where(i == p, x, 0.0), axis=0)[None, :]
        xq = tl.sum(tl.where(i == q, x, 0.0), axis=0)[None, :]
    return tl.where(i == p, cs * xp - sn * xq, tl.where(i == q, sn * xp + cs * xq, x))


@triton.jit
def _jacobi_factor_kernel(gram_ptr, w_ptr, ts_ptr, flag_ptr, MPB: tl.constexpr, G: tl.constexpr,
                          SWEEPS: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)  # one matrix; MPB matrices per batch row
    row = tl.arange(0, G)[:, None]
    col = tl.arange(0, G)[None, :]
    a = tl.load(gram_ptr + m * G * G + row * G + col)
    v = (row == col).to(tl.float64)
    total = tl.sum(tl.sum(a * a, axis=1), axis=0)
    for _ in range(SWEEPS):
        off = tl.sum(tl.sum(tl.where(row != col, a * a, 0.0), axis=1), axis=0)
        if off > _TOL2 * total:
            for p in range(G - 1):
                for q in range(p + 1, G):
                    a_p = tl.sum(tl.where(row == p, a, 0.0), axis=0)  # row p, by column
                    a_q = tl.sum(tl.where(row == q, a, 0.0), axis=0)
                    idx = tl.arange(0, G)
                    app = tl.sum(tl.where(idx == p, a_p, 0.0), axis=0)
                    aqq = tl.sum(tl.where(idx == q, a_q, 0.0), axis=0)
                    apq = tl.sum(tl.where(idx == q, a_p, 0.0), axis=0)
                    if apq != 0.0:
                        tau = (aqq - app) / (2.0 * apq)
                        t = tl.where(tau >= 0.0, 1.0, -1.0) / (tl.abs(tau) + tl.sqrt(1.0 + tau * tau))
                        cs = 1.0 / tl.sqrt(1.0 + t * t)
                        sn = t * cs
                        a = _rotate(a, row, p, q, cs, sn, 0)  # J^T A: rows p, q
                        a = _rotate(a, col, p, q, cs, sn, 1)  # (J^T A) J: columns p, q
                        v = _rotate(v, col, p, q, cs, sn, 1)  # V J
    s = tl.sqrt(tl.maximum(tl.sum(tl.where(row == col, a, 0.0), axis=0), 0.0))  # [G] by column
    s_max = tl.max(s, axis=0)
    inv_root = tl.where(s > _RANK_RTOL * s_max, 1.0 / tl.sqrt(tl.maximum(s, 1e-300)), 0.0)
    tl.store(w_ptr + m * G * G + row * G + col, (v * inv_root[None, :]).to(tl.float32))
    ts = (v * tl.sqrt(s)[None, :]).to(tl.float16)  # [i, j] = T_S[j, i]
    tl.store(ts_ptr + m * G * G + col * G + row, ts)
    ts32 = ts.to(tl.float32)
    overflow = tl.max(tl.max(((ts32 != ts32) | (tl.abs(ts32) == float("inf"))).to(tl.int32), axis=1), axis=0)
    deficient = (tl.min(s, axis=0) <= _RANK_RTOL * s_max).to(tl.int32)
    tl.atomic_max(flag_ptr + m // MPB, tl.maximum(overflow, deficient))


def jacobi_factor_triton(gram: torch.Tensor, flags: torch.Tensor):
    """W (float32) and T_S (float16), both [..., G, G], of finite symmetric float64 gram [..., G, G] (G = 16);
    flags[b] set for a rank-deficient matrix or an fp16 T_S overflow (leading dims: batch rows x matrices)."""
    g = gram.shape[-1]
    m = gram.numel() // (g * g)
    w = torch.empty(gram.shape, dtype=torch.float32, device=gram.device)
    t_s = torch.empty(gram.shape, dtype=torch.float16, device=gram.device)
    _jacobi_factor_kernel[(m,)](gram.contiguous(), w, t_s, flags, MPB=m // flags.shape[0], G=g,
                                SWEEPS=JACOBI_SWEEPS, num_warps=1)
    return w, t_s
