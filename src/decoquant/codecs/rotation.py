"""Randomized Hadamard rotation per head (QuaRot-style), then asymmetric per-token RTN.

R = diag(signs) H / sqrt(head_dim) is orthogonal; x_rot = x R is quantized per (token, head)
and decoded as x_hat = x_rot_hat R^T. R is a fixed function of (head_dim, rotation_seed), so it is
not stored per block."""

from __future__ import annotations

import functools

import torch

from ..quant import dequantize_kv, quantize_kv
from .base import Codec, Encoded, from_qtensor


@functools.lru_cache(maxsize=16)
def _rotation_cpu(dim: int, seed: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (dim,), generator=gen, dtype=torch.float64) * 2 - 1
    return (signs[:, None] * h / dim**0.5).float()


def rotation_matrix(dim: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [dim, dim] orthogonal matrix (dim must be a power of two)."""
    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"head_dim={dim} must be a power of two for the Hadamard rotation")
    return _rotation_cpu(dim, seed).to(device)


def encode(x: torch.Tensor, spec) -> Encoded:  # spec.granularity: "token_head"
    r = rotation_matrix(x.shape[-1], spec.seed, x.device)
    return from_qtensor(quantize_kv(x.float() @ r, spec.bits, spec.granularity, spec.symmetric))


def decode(enc: Encoded, spec, shape: tuple[int, ...]) -> torch.Tensor:
    xr = dequantize_kv(enc.qtensor(spec.bits), spec.granularity)
    return xr @ rotation_matrix(xr.shape[-1], spec.seed, xr.device).T


CODEC = Codec("rotation", encode, decode)
