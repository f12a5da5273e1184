"""TurboQuant's MSE quantizer (Zandieh et al., ICLR 2026, arXiv 2504.19874) as a data-free baseline.

Every (token, head) vector x is stored as its norm |x| (fp16) and, for each coordinate of y = (x / |x|) R
(R a fixed random rotation, seeded by `rotation_seed`), the b-bit index of the nearest level of a Lloyd-Max
codebook. After a uniformly random rotation a coordinate of a unit vector in dimension d has the density
f(y) ~ (1 - y^2)^((d - 3) / 2) on [-1, 1] whatever the data, so the codebook is fitted to f, once per (d, b),
without any data. Decoded: x_hat = |x| * levels[codes] R^T. Stored bits per element: b + 16 / d.
Not included: the paper's variant that spends one more bit on a few outlier channels, and its
inner-product stage (a 1-bit QJL transform of the residual).
"""

from __future__ import annotations

import functools

import torch

from .base import Codec, Encoded


@functools.lru_cache(maxsize=16)
def _rotation_cpu(dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))[None, :]).float()  # Haar-distributed orthogonal matrix


def rotation(dim: int, seed: int, device) -> torch.Tensor:
    """float32 [dim, dim], a fixed random orthogonal matrix (any dim)."""
    return _rotation_cpu(dim, seed).to(device)


@functools.lru_cache(maxsize=32)
def codebook(dim: int, bits: int, iters: int = 300, grid: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels [2**bits], boundaries [2**bits - 1]) float32: the Lloyd-Max quantizer of the density
    (1 - y^2)^((dim - 3) / 2) on [-1, 1], fitted on a fine grid (levels symmetric about 0)."""
    if dim < 2:
        raise ValueError(f"head_dim={dim} must be >= 2 for TurboQuant")
    y = torch.linspace(-1.0, 1.0, grid + 2, dtype=torch.float64)[1:-1]
    w = torch.exp((dim - 3) / 2 * torch.log1p(-y * y))
    w = w / w.sum()
    cdf = torch.cumsum(w, 0)
    n = 1 << bits
    levels = y[torch.searchsorted(cdf, (torch.arange(n, dtype=torch.float64) + 0.5) / n).clamp(max=grid - 1)]
    for _ in range(iters):
        bounds = (levels[1:] + levels[:-1]) / 2
        cell = torch.bucketize(y, bounds)
        mass = torch.zeros(n, dtype=torch.float64).index_add_(0, cell, w)
        moment = torch.zeros(n, dtype=torch.float64).index_add_(0, cell, w * y)
        levels = torch.where(mass > 0, moment / mass.clamp_min(1e-300), levels)
    levels = (levels - levels.flip(0)) / 2  # exact symmetry
    return levels.float(), ((levels[1:] + levels[:-1]) / 2).float()


def encode(x: torch.Tensor, spec) -> Encoded:
    d = x.shape[-1]
    xf = x.float()
    norm = xf.norm(dim=-1, keepdim=True)
    y = (xf / norm.clamp_min(torch.finfo(torch.float32).tiny)) @ rotation(d, spec.seed, x.device)
    _, bounds = codebook(d, spec.bits)
    codes = torch.bucketize(y, bounds.to(x.device)).to(torch.uint8)
    return Encoded(codes, {"norm": norm.half()})


def decode(enc: Encoded, spec, shape: tuple[int, ...]) -> torch.Tensor:
    d = shape[-1]
    levels, _ = codebook(d, spec.bits)
    y = levels.to(enc.codes.device)[enc.codes.long()]
    return (y @ rotation(d, spec.seed, y.device).T) * enc.params["norm"].float()


CODEC = Codec("turboquant", encode, decode)
