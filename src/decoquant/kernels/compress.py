"""Block compression steps on the GPU (DecoQuant group layout, two sites): backend choice and the formats
the Triton kernels take."""

from __future__ import annotations

import torch

from .attention import check_backend
from .reference import factor_reference, gram_reference, quantize_pack_reference

PACK_BITS = (2, 4, 8)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kernel_format_ok(x: torch.Tensor, config, kind: str) -> bool:
    """Whether the Triton kernels can compress x [B, H, T, D] with `config`: group layout, 2 sites, 2/4/8 bits,
    scales per token, per token and head, or per T_L channel over groups of 16..128 tokens that tile T;
    power-of-two head_dim, group size 16 or 32; fp16, bf16 or fp32 input."""
    d, t = x.shape[-1], x.shape[-2]
    gran = config.granularity(kind)
    cg = config.quant_group_size
    gran_ok = gran in ("token", "token_head") or (
        gran == "channel" and cg in (16, 32, 64, 128) and t % cg == 0)
    return (config.method == "decoquant" and config.layout == "group" and config.num_sites == 2
            and config.bits in PACK_BITS and config.group_size in (16, 32) and gran_ok
            and x.dtype in DTYPES and d >= config.group_size and d & (d - 1) == 0)


def _backend(backend: str, x: torch.Tensor) -> str:
    check_backend(backend)
    return ("triton" if x.is_cuda else "torch") if backend == "auto" else backend


def gram(x: torch.Tensor, group: int, per_head: bool, flags: torch.Tensor | None = None,
         backend: str = "auto") -> torch.Tensor:
    """M^T M of x [B, H, T, D]'s chunk matrix (rows (head, token, chunk) of `group` channels): float64
    [B, G, G], or [B, H, G, G] with one matrix per head; an identity where x has a non-finite entry (and
    flags[b] = 1 in an int32 [B] `flags`). backend: "triton", "torch" (float64 reference) or "auto" (triton on
    CUDA)."""
    if _backend(backend, x) == "torch":
        return gram_reference(x, group, per_head, flags)
    from .triton.compress import gram_triton

    return gram_triton(x, group, per_head, _flags(flags, x))


def factor(evals: torch.Tensor, evecs: torch.Tensor, flags: torch.Tensor | None = None, backend: str = "auto"):
    """(W float32, T_S float16), both [..., G, G], of the 2-site MPO from the float64 eigenpairs of its Gram
    matrices (`mpo.two_sites_from_eigh`); a rank-deficient matrix or an fp16 T_S
    overflow gets W = T_S = I instead and flags[b] = 1 (`flags`: the fallback rows, not the unsafe ones)."""
    if _backend(backend, evals) == "torch":
        return factor_reference(evals, evecs, flags)
    from .triton.compress import factor_triton

    return factor_triton(evals, evecs, _flags(flags, evals))


def quantize_pack(x: torch.Tensor, w: torch.Tensor, bits: int, granularity: str, symmetric: bool,
                  channel_group: int = 0, flags: torch.Tensor | None = None, backend: str = "auto"):
    """Packed codes of T_L = M W, M the chunk matrix of x [B, H, T, D], w [B, G, G] or [B, H, G, G] (fp32):
    (codes uint8 [B, H, T, D * bits / 8], scale fp16, zero fp16 or None) in quant.quantize_kv's parameter
    shapes; flags[b] = 1 where a scale or zero is not finite. backend: "triton", "torch" (quantize_kv +
    pack_codes) or "auto" (triton on CUDA)."""
    if _backend(backend, x) == "torch":
        return quantize_pack_reference(x, w, bits, granularity, symmetric, channel_group, flags)
    from .triton.compress import quantize_pack_triton

    return quantize_pack_triton(x, w, bits, granularity, symmetric, channel_group, _flags(flags, x))


def _flags(flags: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """The caller's int32 [B] flags, or a scratch one (the kernels always write flags)."""
    if flags is None:
        return torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
    if flags.dtype != torch.int32 or flags.dim() != 1:
        raise ValueError(f"flags must be an int32 vector [batch], got {flags.dtype} of shape {tuple(flags.shape)}")
    return flags
