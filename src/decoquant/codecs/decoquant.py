"""DecoQuant: MPO-decompose the KV block, quantize the large local tensor, keep the small ones fp16.

Group layout (the paper's memory-saving one). For one batch row, x [H, T, D] with D = C * g is
viewed as a matrix M of N = H*T*C rows and g columns (row (h, t, c) = channels c*g..c*g+g-1 of
head h at token t; with ts_sharing="head" one matrix per head). The MPO with row factors
(N, 1, ..., 1) and column factors (1, j_2, ..., j_n) gives
    T_L = U sqrt(S)           [N, g]   quantized (codes laid out like x: [B, H, T, D])
    T_2 ... T_n               fp16, contracting to T_S = sqrt(S) V^T   [g, g]
and x_hat = deq(T_L) @ T_S per 16-channel chunk. T_L's columns are the principal axes of the
chunks divided by sqrt of their singular values, which flattens outlier channels before RTN.

Channel layout (the paper's LAMBADA table; fake quantization only): X^T [H*D, T] = U S V^T,
T_L = U sqrt(S) quantized with one scale per channel row, T_S = sqrt(S) V^T [r, T] fp16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..mpo import RANK_RTOL, mpo_decompose, two_sites_from_eigh
from ..quant import QTensor, dequantize, dequantize_kv, quantize, quantize_kv
from .base import Codec, Encoded

# A matrix whose smallest singular value is below RANK_RTOL of its largest is "rank deficient" (e.g. all
# zeros, one repeated token, or a dead channel shared by every head): its 1/sqrt(s) scaling is ill-conditioned,
# so it falls back to W = T_S = I (T_L = M: plain RTN at the config's scale granularity, same stored format) and
# is reported (`Encoded.fallback`). Only a non-finite input or parameter is kept exact. (num_sites > 2 keeps
# rank-deficient blocks exact: their identity sites would not match the other rows' bond shapes.)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.device.type == "cpu" else torch.float32


def _rank_deficient(t_l: torch.Tensor) -> torch.Tensor:
    """t_l [..., N, r] = U sqrt(S): column k has squared norm s_k. -> bool [...] per matrix."""
    s = t_l.pow(2).sum(-2)  # [..., r]
    return s.amin(-1) <= RANK_RTOL * s.amax(-1)


def _per_row(bad: torch.Tensor) -> torch.Tensor:
    """bool [batch, ...] per matrix -> [batch]."""
    return bad.reshape(bad.shape[0], -1).any(-1) if bad.dim() > 1 else bad


def small_tensor(params: dict[str, torch.Tensor], n_sites: int) -> torch.Tensor:
    """Contract the fp16 small sites T_2..T_n into T_S: float32 [..., g, g]."""
    sites = [params[f"site{k}"].float() for k in range(2, n_sites + 1)]
    first = sites[0]  # [..., r1, 1, j2, r2]
    batch = first.shape[:-4]
    r1 = first.shape[-4]
    acc = first.reshape(*batch, r1, -1)
    for t in sites[1:]:
        r = t.shape[-4]
        acc = acc.reshape(*batch, -1, r) @ t.reshape(*batch, r, -1)
    return acc.reshape(*batch, r1, -1)


def _matrix_view(x: torch.Tensor, spec) -> torch.Tensor:
    b, h, t, d = x.shape
    g = spec.group_size
    if spec.ts_sharing == "layer":
        return x.reshape(b, h * t * (d // g), g)
    return x.reshape(b, h, t * (d // g), g)


GRAM_ROWS = 512  # rows per partial Gram product


def _gram(m: torch.Tensor) -> torch.Tensor:
    """M^T M of m [..., N, g] as float64 [..., g, g], summed over partial products of GRAM_ROWS rows: one
    product per matrix reduces N ~ 32k rows in a single output tile (1 ms for a 16k-token prefill's keys
    on an H100), the partial products spread over the whole GPU."""
    n, g = m.shape[-2:]
    if n % GRAM_ROWS or n == GRAM_ROWS:
        return (m.transpose(-1, -2) @ m).double()
    parts = m.reshape(*m.shape[:-2], n // GRAM_ROWS, GRAM_ROWS, g)
    return (parts.transpose(-1, -2) @ parts).double().sum(-3)


def _factor_gram(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 2-site MPO from a float64 Gram matrix [..., g, g] of a tall M (`mpo.two_sites_from_eigh`). Returns
    (W [..., g, g], T_S [..., g, 1, g, 1], unsafe bool [batch], fallback bool [batch]): unsafe for a non-finite
    Gram matrix (a NaN/Inf in M; its eigenproblem is skipped); a rank-deficient matrix (T_L's column k has
    squared norm s_k, so the flag comes from S instead of another pass over T_L) gets W = T_S = I."""
    from ..kernels.reference import identity_where

    nonfinite = ~torch.isfinite(gram).flatten(-2).all(-1)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    gram = torch.where(nonfinite[..., None, None], eye, gram)  # no host sync to ask whether any
    w, t_s, bad = two_sites_from_eigh(*torch.linalg.eigh(gram))
    bad = bad & ~nonfinite
    w, t_s = identity_where(bad, w, t_s)
    t_s = t_s.reshape(*t_s.shape[:-2], t_s.shape[-2], 1, t_s.shape[-1], 1)
    return w, t_s, _per_row(nonfinite), _per_row(bad)


def _two_sites_gram(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 2-site MPO of a tall m [..., N, g] through its g x g Gram matrix (fast on GPUs); the Gram products
    and T_L run in m's dtype (float32 on GPUs, tf32 off). Returns (T_L, T_S, unsafe [batch], fallback [batch])
    as `_factor_gram`."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        w, t_s, bad, fallback = _factor_gram(_gram(m))
        t_l = m @ w.to(m.dtype)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return t_l, t_s, bad, fallback


def uses_kernels(x: torch.Tensor, spec, backend: str = "auto") -> bool:
    """Whether x is compressed by the Triton kernels (`encode_kernels`; on CUDA, or anywhere with
    backend="triton"; a format and shape they take, `format.compress_problem`): they read x in its dtype,
    return packed codes and flag non-finite rows themselves. backend="triton" with a format they do not take
    raises a ValueError saying why."""
    from ..format import Backend, compress_problem

    backend = Backend.parse(backend)
    if backend is Backend.TORCH:
        return False
    problem = compress_problem(spec, tuple(x.shape), x.dtype)
    if backend is Backend.TRITON and problem is not None:
        raise ValueError(f"backend='triton' cannot compress {spec.label} {spec.kind}s of shape {tuple(x.shape)}: "
                         f"{problem}; use backend='torch' or 'auto'")
    return problem is None and backend.on(x.is_cuda) is Backend.TRITON


def encode_kernels(xs: list[torch.Tensor], specs: list) -> list[Encoded]:
    """Encode tensors of one shape (e.g. a layer's keys and values) with the Triton kernels: Gram kernel ->
    one batch of float64 eigenproblems for all of them -> factor kernel (W, fp16 T_S) -> one kernel from each
    x to its packed codes (T_L never in memory). A few launches; the kernels flag the batch rows they find
    unsafe (a non-finite input or parameter) or that fell back to T_S = I (a rank-deficient block) in int32
    vectors, so no host sync asks which rows until the caller does."""
    from ..kernels.compress import factor, gram, quantize_pack

    g, b, per_head = specs[0].group_size, xs[0].shape[0], specs[0].ts_sharing == "head"
    # flags[0]: unsafe rows (kept exact), flags[1]: rows of the T_S = I fallback; one allocation, one cast
    both = torch.zeros(2, len(xs), b, dtype=torch.int32, device=xs[0].device)
    flags, fell = both[0], both[1]
    grams = [gram(x, g, per_head, f, "triton") for x, f in zip(xs, flags)]
    # torch.linalg.eigh syncs with the host to check its result; a Jacobi kernel without that sync took 1.0 ms
    # per launch on an H100 against 0.3 ms for eigh and the factor kernel
    evals, evecs = torch.linalg.eigh(torch.cat(grams) if len(grams) > 1 else grams[0])
    w, t_s = factor(evals, evecs, fell.view(-1), "triton")
    out = []
    for i, (x, spec) in enumerate(zip(xs, specs)):
        codes, scale, zero = quantize_pack(x, w[i * b:(i + 1) * b], spec.bits, spec.granularity, spec.symmetric,
                                           spec.channel_group, flags[i], "triton", spec.clip)
        params = {"scale": scale} if zero is None else {"scale": scale, "zero": zero}
        t_s_i = t_s[i * b:(i + 1) * b]
        params["site2"] = t_s_i.reshape(*t_s_i.shape[:-2], g, 1, g, 1)
        out.append((codes, params))
    unsafe, fallback = both.bool()  # after the kernels: [len(xs), B] each, rows are views
    return [Encoded(codes, params, unsafe[i], packed=True, fallback=fallback[i])
            for i, (codes, params) in enumerate(out)]


def encode(x: torch.Tensor, spec) -> Encoded:
    """The torch route (any device; the kernels' route is `encode_kernels`, chosen by `uses_kernels`)."""
    if spec.layout == "channel":
        return _encode_channel(x, spec)
    g, n_sites = spec.group_size, spec.num_sites
    m = _matrix_view(x.to(_compute_dtype(x)), spec)
    n_rows = m.shape[-2]
    fallback = None
    if x.is_cuda and n_sites == 2 and n_rows >= g:
        t_l, t_s, unsafe, fallback = _two_sites_gram(m)
        sites = [t_l, t_s]
    else:
        rows = (n_rows,) + (1,) * (n_sites - 1)
        cols = (1,) + spec.site_factors
        sites = mpo_decompose(m, rows, cols, gauge="symmetric")
        t_l = sites[0].reshape(*m.shape[:-2], n_rows, sites[0].shape[-1])
        deficient = _rank_deficient(t_l)
        unsafe = _per_row(deficient)
    r1 = t_l.shape[-1]
    if r1 < g:  # fewer rows than g: pad the bond with zeros (still exact)
        t_l = F.pad(t_l, (0, g - r1))
        sites[1] = F.pad(sites[1], (0, 0, 0, 0, 0, 0, 0, g - r1))
    if fallback is None and n_sites == 2:  # rank deficient: W = T_S = I, T_L = M (see the top of this module)
        eye = torch.eye(g, dtype=sites[1].dtype, device=x.device).reshape(g, 1, g, 1)
        t_l = torch.where(deficient[..., None, None], m.to(t_l.dtype), t_l)
        sites[1] = torch.where(deficient[..., None, None, None, None], eye, sites[1])
        unsafe, fallback = torch.zeros_like(unsafe), _per_row(deficient)
    q = quantize_kv(t_l.reshape(x.shape), spec.bits, spec.granularity, spec.symmetric, spec.quant_group_size,
                    spec.clip)
    params = {"scale": q.scale}
    if q.zero is not None:
        params["zero"] = q.zero
    for k, site in enumerate(sites[1:], start=2):
        params[f"site{k}"] = site.to(torch.float16)
    return Encoded(q.codes, params, unsafe, fallback=fallback)


def decode(enc: Encoded, spec, shape: tuple[int, ...]) -> torch.Tensor:
    if spec.layout == "channel":
        return _decode_channel(enc, spec, shape)
    q = QTensor(enc.codes, enc.params["scale"], enc.params.get("zero"), spec.bits)
    t_l = dequantize_kv(q, spec.granularity, spec.quant_group_size)
    t_s = small_tensor(enc.params, spec.num_sites)
    return (_matrix_view(t_l, spec) @ t_s).reshape(t_l.shape)


# ------------------------------------------------------------------------- channel layout
def _encode_channel(x: torch.Tensor, spec) -> Encoded:
    b, h, t, d = x.shape
    xt = x.to(_compute_dtype(x)).permute(0, 1, 3, 2).reshape(b, h * d, t)  # [B, H*D, T]
    sites = mpo_decompose(xt, (h * d, 1), (1, t), gauge="symmetric")
    t_l = sites[0].reshape(b, h * d, -1)  # [B, HD, r]
    unsafe = _rank_deficient(t_l)
    q = quantize(t_l, spec.bits, (-1,), spec.symmetric)
    params = {"scale": q.scale, "site2": sites[1].to(torch.float16)}
    if q.zero is not None:
        params["zero"] = q.zero
    return Encoded(q.codes, params, unsafe)


def _decode_channel(enc: Encoded, spec, shape: tuple[int, ...]) -> torch.Tensor:
    b, h, t, d = shape
    q = QTensor(enc.codes, enc.params["scale"], enc.params.get("zero"), spec.bits)
    t_s = enc.params["site2"].float().reshape(b, -1, t)  # [B, r, T]
    xt = dequantize(q) @ t_s  # [B, H*D, T]
    return xt.reshape(b, h, d, t).transpose(-1, -2)


CODEC = Codec("decoquant", encode, decode, uses_kernels, encode_kernels)
