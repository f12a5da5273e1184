"""Data-free weight quantization: per-output-channel RTN, and DecoQuant's 2-site MPO for weights.

DecoQuant factorization of a Linear weight W [out, in] (in = C * g): view W as the matrix M of
out * C rows and g columns, row (o, c) = input channels c*g .. c*g+g-1 of output channel o (the KV
"group" layout with output channels in place of tokens). The 2-site MPO M = T_L @ T_S gives
    T_L = U sqrt(S)   [out * C, g] -> quantized, one scale (and zero) per output channel,
    T_S = sqrt(S) V^T [g, g]       -> fp16, shared by the whole matrix,
so W ~= deq(T_L) @ blockdiag(T_S, ..., T_S): every g-channel chunk of every row is rotated to the
principal axes of all chunks and rescaled, which evens out the input channels before rounding.
`codes` keep W's shape; `decode_weight` returns W's reconstruction.
"""

from __future__ import annotations

import torch

from ..quant import QTensor, dequantize, quantize

WEIGHT_METHODS = ("rtn", "decoquant")


def encode_weight(w: torch.Tensor, method: str, bits: int, group_size: int = 16,
                  symmetric: bool = True) -> tuple[QTensor, torch.Tensor | None]:
    """w [out, in] -> (quantized tensor of w's shape with per-row parameters, fp16 T_S [g, g] or None)."""
    if method == "rtn":
        return quantize(w.float(), bits, (-1,), symmetric), None
    if method != "decoquant":
        raise ValueError(f"method={method!r} is not supported for weights; allowed values: {WEIGHT_METHODS}")
    out_f, in_f = w.shape
    m = w.double().reshape(-1, group_size)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = s.sqrt()
    t_s = (root[:, None] * vh).to(torch.float16)
    # T_L against the fp16 T_S actually stored, so rounding of T_S is compensated: T_L = M T_S^-1.
    t_l = torch.linalg.solve(t_s.double().T, m.T).T if bool((s > 1e-8 * s[0]).all()) else u * root
    return quantize(t_l.reshape(out_f, in_f).float(), bits, (-1,), symmetric), t_s


def decode_weight(q: QTensor, t_s: torch.Tensor | None, group_size: int = 16) -> torch.Tensor:
    """float32 reconstruction of `encode_weight`'s output, shape [out, in]."""
    t_l = dequantize(q)
    if t_s is None:
        return t_l
    return (t_l.reshape(-1, group_size) @ t_s.float()).reshape(t_l.shape)
