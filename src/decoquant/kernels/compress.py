"""Block compression steps on the GPU (DecoQuant group layout, two sites): the backend choice (the formats
the Triton kernels take: `decoquant.format.KVFormat.compress_problem`)."""

from __future__ import annotations

import torch

from ..format import Backend
from .reference import factor_reference, gram_reference, quantize_pack_reference

def _backend(backend, x: torch.Tensor) -> Backend:
    return Backend.parse(backend).on(x.is_cuda)


def gram(x: torch.Tensor, group: int, per_head: bool, flags: torch.Tensor | None = None,
         backend: str = "auto") -> torch.Tensor:
    """M^T M of x [B, H, T, D]'s chunk matrix (rows (head, token, chunk) of `group` channels): float64
    [B, G, G], or [B, H, G, G] with one matrix per head; an identity where x has a non-finite entry (and
    flags[b] = 1 in an int32 [B] `flags`). backend: "triton", "torch" (float64 reference) or "auto" (triton on
    CUDA)."""
    if _backend(backend, x) is Backend.TORCH:
        return gram_reference(x, group, per_head, flags)
    from .triton.compress import gram_triton

    return gram_triton(x, group, per_head, _flags(flags, x))


def factor(evals: torch.Tensor, evecs: torch.Tensor, flags: torch.Tensor | None = None, backend: str = "auto"):
    """(W float32, T_S float16), both [..., G, G], of the 2-site MPO from the float64 eigenpairs of its Gram
    matrices (`mpo.two_sites_from_eigh`); a rank-deficient matrix or an fp16 T_S
    overflow gets W = T_S = I instead and flags[b] = 1 (`flags`: the fallback rows, not the unsafe ones)."""
    if _backend(backend, evals) is Backend.TORCH:
        return factor_reference(evals, evecs, flags)
    from .triton.compress import factor_triton

    return factor_triton(evals, evecs, _flags(flags, evals))


def quantize_pack(x: torch.Tensor, w: torch.Tensor, bits: int, granularity: str, symmetric: bool,
                  channel_group: int = 0, flags: torch.Tensor | None = None, backend: str = "auto",
                  clip: bool = False):
    """Packed codes of T_L = M W, M the chunk matrix of x [B, H, T, D], w [B, G, G] or [B, H, G, G] (fp32):
    (codes uint8 [B, H, T, D * bits / 8], scale fp16, zero fp16 or None) in quant.quantize_kv's parameter
    shapes; flags[b] = 1 where a scale or zero is not finite; clip: the range search (quant.quantize; the kernel
    takes it for asymmetric per-channel scales). backend: "triton", "torch" (quantize_kv + pack_codes) or "auto"
    (triton on CUDA)."""
    if _backend(backend, x) is Backend.TORCH:
        return quantize_pack_reference(x, w, bits, granularity, symmetric, channel_group, flags, clip)
    from .triton.compress import quantize_pack_triton

    return quantize_pack_triton(x, w, bits, granularity, symmetric, channel_group, _flags(flags, x), clip)


def _flags(flags: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """The caller's int32 [B] flags, or a scratch one (the kernels always write flags)."""
    if flags is None:
        return torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
    if flags.dtype != torch.int32 or flags.dim() != 1:
        raise ValueError(f"flags must be an int32 vector [batch], got {flags.dtype} of shape {tuple(flags.shape)}")
    return flags
