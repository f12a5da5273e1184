"""Matrix product operator (MPO) decomposition: pure torch, no quantization, no state.

A matrix W of shape I x J with I = i_1*...*i_n and J = j_1*...*j_n is written as a chain of local
tensors T_k of shape (r_{k-1}, i_k, j_k, r_k), r_0 = r_n = 1:

    W[(a_1..a_n), (b_1..b_n)] = sum_{bonds} T_1[1, a_1, b_1, :] T_2[:, a_2, b_2, :] ... T_n[:, a_n, b_n, 1]

Row index (a_1..a_n) and column index (b_1..b_n) are row-major (a_1 slowest). The decomposition
sweeps left to right with SVDs; at each bond the singular values are split symmetrically (sqrt on
each side, the paper's gauge) or all carried right ("left" gauge: left-orthonormal tensors).
Everything is batched over leading dimensions.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def _check_factors(shape: tuple[int, int], rows: Sequence[int], cols: Sequence[int]) -> None:
    if len(rows) != len(cols) or len(rows) < 1:
        raise ValueError(f"row_factors {tuple(rows)} and col_factors {tuple(cols)} need the same length >= 1")
    if any(int(f) < 1 for f in (*rows, *cols)):
        raise ValueError(f"factors must be positive integers, got {tuple(rows)} x {tuple(cols)}")
    if math.prod(rows) != shape[0] or math.prod(cols) != shape[1]:
        raise ValueError(
            f"row_factors {tuple(rows)} (product {math.prod(rows)}) and col_factors {tuple(cols)} "
            f"(product {math.prod(cols)}) must multiply to the matrix shape {tuple(shape)}")


def full_bond_ranks(rows: Sequence[int], cols: Sequence[int]) -> list[int]:
    """r_k = min(prod_{l<=k} i_l j_l, prod_{l>k} i_l j_l) for k = 1..n-1."""
    sizes = [i * j for i, j in zip(rows, cols)]
    return [min(math.prod(sizes[:k]), math.prod(sizes[k:])) for k in range(1, len(sizes))]


def mpo_decompose(
    w: torch.Tensor,
    row_factors: Sequence[int],
    col_factors: Sequence[int],
    max_rank: int | Sequence[int] | None = None,
    gauge: str = "symmetric",
    compute_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Decompose w [..., I, J] into n local tensors [..., r_{k-1}, i_k, j_k, r_k].

    max_rank: truncate every bond (int) or each bond (sequence of n-1 ints) to at most this rank.
    gauge: "symmetric" (sqrt of the singular values on both sides of every bond) or "left".
    compute_dtype: dtype of the SVDs (default: float64 on CPU, float32 elsewhere).
    """
    if w.dim() < 2:
        raise ValueError(f"w must have at least 2 dims [..., I, J], got shape {tuple(w.shape)}")
    if gauge not in ("symmetric", "left"):
        raise ValueError(f"gauge={gauge!r} is not supported; allowed values: 'symmetric', 'left'")
    rows, cols = [int(f) for f in row_factors], [int(f) for f in col_factors]
    _check_factors(tuple(w.shape[-2:]), rows, cols)
    n = len(rows)
    if isinstance(max_rank, int) or max_rank is None:
        caps = [max_rank] * (n - 1)
    else:
        caps = list(max_rank)
        if len(caps) != n - 1:
            raise ValueError(f"max_rank needs {n - 1} entries for {n} sites, got {len(caps)}")
    if compute_dtype is None:
        compute_dtype = torch.float64 if w.device.type == "cpu" else torch.float32
    batch = w.shape[:-2]
    # (a_1..a_n, b_1..b_n) -> (a_1, b_1, a_2, b_2, ..., a_n, b_n)
    t = w.to(compute_dtype).reshape(*batch, *rows, *cols)
    nb = len(batch)
    perm = list(range(nb)) + [p for k in range(n) for p in (nb + k, nb + n + k)]
    rest = t.permute(perm).reshape(*batch, -1)
    tensors, r_prev = [], 1
    for k in range(n - 1):
        m = rest.reshape(*batch, r_prev * rows[k] * cols[k], -1)
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        r = s.shape[-1] if caps[k] is None else min(s.shape[-1], int(caps[k]))
        u, s, vh = u[..., :r], s[..., :r], vh[..., :r, :]
        if gauge == "symmetric":
            root = s.sqrt()
            left, rest = u * root.unsqueeze(-2), root.unsqueeze(-1) * vh
        else:
            left, rest = u, s.unsqueeze(-1) * vh
        tensors.append(left.reshape(*batch, r_prev, rows[k], cols[k], r))
        r_prev = r
    tensors.append(rest.reshape(*batch, r_prev, rows[-1], cols[-1], 1))
    out_dtype = w.dtype if w.dtype.is_floating_point else compute_dtype
    return [x.to(out_dtype) for x in tensors]


def mpo_contract(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract local tensors [..., r_{k-1}, i_k, j_k, r_k] back to the matrix [..., I, J]."""
    if not tensors:
        raise ValueError("tensors must hold at least one local tensor")
    first = tensors[0]
    batch = first.shape[:-4]
    nb = len(batch)
    rows = [t.shape[-3] for t in tensors]
    cols = [t.shape[-2] for t in tensors]
    # acc: [..., (i_1 j_1 ... i_k j_k), r_k] with indices interleaved as in the decomposition
    acc = first.reshape(*batch, -1, first.shape[-1])
    for t in tensors[1:]:
        r_prev = t.shape[-4]
        acc = acc @ t.reshape(*batch, r_prev, -1)  # [..., P, i_k j_k r_k]
        acc = acc.reshape(*batch, -1, t.shape[-1])
    n = len(tensors)
    acc = acc.reshape(*batch, *[d for k in range(n) for d in (rows[k], cols[k])])
    perm = list(range(nb)) + [nb + 2 * k for k in range(n)] + [nb + 2 * k + 1 for k in range(n)]
    return acc.permute(perm).reshape(*batch, math.prod(rows), math.prod(cols))


# A 2-site MPO whose smallest singular value is below this fraction of its largest is rank deficient
RANK_RTOL = 1e-6


def two_sites_from_eigh(evals: torch.Tensor, evecs: torch.Tensor, rtol: float = RANK_RTOL):
    """The symmetric-gauge 2-site MPO of a tall M [..., N, g] from the eigenpairs of M^T M = V S^2 V^T
    (`torch.linalg.eigh`'s output: evals [..., g] ascending, evecs [..., g, g]): T_L = M W with
    W = V S^{-1/2} (columns in descending singular value; zero for s_k <= rtol * s_max) and T_S = S^{1/2} V^T.
    Returns (W [..., g, g], T_S [..., g, g], rank deficient bool [...]: s_min <= rtol * s_max)."""
    s = evals.flip(-1).clamp_min(0).sqrt()
    v = evecs.flip(-1)
    keep = s > rtol * s[..., :1]
    inv_root = torch.where(keep, s.clamp_min(1e-300).rsqrt(), torch.zeros_like(s))
    t_s = s.sqrt().unsqueeze(-1) * v.transpose(-1, -2)
    return v * inv_root.unsqueeze(-2), t_s, s[..., -1] <= rtol * s[..., 0]
