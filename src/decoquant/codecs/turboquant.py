"""TurboQuant's MSE quantizer (Zandieh et al., ICLR 2026, arXiv 2504.19874) as a data-free baseline.

Every (token, head) vector x is stored as its norm |x| (fp16) and, for each coordinate of y = (x / |x|) R
(R a fixed random rotation, seeded by `rotation_seed`), the b-bit index of the nearest level of a Lloyd-Max
codebook. After a uniformly random rotation a coordinate of a unit vector in dimension d has the density
f(y) ~ (1 - y^2)^((d - 3) / 2) on [-1, 1] whatever the data, so the codebook is fitted to f, once per (d, b),
without any data. Decoded: x_hat = |x| * levels[codes] R^T. Stored bits per element: b + 16 / d.
With `outlier_channels` = n (the paper's outlier split), the n channels of each head with the largest RMS over
the block's tokens are taken out and quantized by a second instance (its own rotation and codebook, dimension n)
at b + 1 bits, the others at b bits (n = 32 of 128 at 2 / 3 bits: 2.5 bits per code; the paper does not say how
it picks the outliers: here from the block itself, so no data); the mask of outlier channels is stored as bits.
Not included: the inner-product stage (a 1-bit QJL transform of the residual).
"""

from __future__ import annotations

import functools

import torch

from ..packing import pack_codes, unpack_codes
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


def _quantize(x: torch.Tensor, bits: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8, norm float32 [..., 1]) of the vectors x [..., d]: one TurboQuant instance."""
    d = x.shape[-1]
    norm = x.norm(dim=-1, keepdim=True)
    y = (x / norm.clamp_min(torch.finfo(torch.float32).tiny)) @ rotation(d, seed, x.device)
    _, bounds = codebook(d, bits)
    return torch.bucketize(y, bounds.to(x.device)).to(torch.uint8), norm


def _dequantize(codes: torch.Tensor, norm: torch.Tensor, bits: int, seed: int) -> torch.Tensor:
    d = codes.shape[-1]
    levels, _ = codebook(d, bits)
    y = levels.to(codes.device)[codes.long()]
    return (y @ rotation(d, seed, y.device).T) * norm.float()


def _outlier_split(mask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel indices (outliers [B, H, 1, n], the others [B, H, 1, d - n], each ascending) of a bool mask
    [B, H, 1, d] with n True per head."""
    order = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices  # outliers first, ascending
    return order[..., :n], order[..., n:]


def encode(x: torch.Tensor, spec) -> Encoded:
    xf = x.float()
    n = spec.outliers
    if not n:
        codes, norm = _quantize(xf, spec.bits, spec.seed)
        return Encoded(codes, {"norm": norm.half()})
    # the outlier split: per head and block, the n channels of largest RMS over the block's tokens, quantized by
    # their own instance at bits + 1; their mask is stored as bits (d / 8 bytes per head and block)
    d = x.shape[-1]
    rms = xf.pow(2).mean(2, keepdim=True)  # [B, H, 1, d]
    top = rms.topk(n, dim=-1).indices
    mask = torch.zeros_like(rms, dtype=torch.bool).scatter_(-1, top, True)
    out_idx, rest_idx = _outlier_split(mask, n)
    t = x.shape[2]
    pick = lambda idx: xf.gather(-1, idx.expand(-1, -1, t, -1))  # noqa: E731
    codes, norm = _quantize(pick(rest_idx), spec.bits, spec.seed)
    out_codes, out_norm = _quantize(pick(out_idx), spec.bits + 1, spec.seed + 1)
    bits_of = (mask.reshape(*mask.shape[:-1], d // 8, 8).to(torch.uint8)
               << torch.arange(8, dtype=torch.uint8, device=x.device))
    return Encoded(codes, {"norm": torch.cat([norm, out_norm], -1).half(),
                           "outlier_codes": pack_codes(out_codes, spec.bits + 1),
                           "outlier_mask": bits_of.sum(-1, dtype=torch.uint8)})


def decode(enc: Encoded, spec, shape: tuple[int, ...]) -> torch.Tensor:
    n = spec.outliers
    if not n:
        return _dequantize(enc.codes, enc.params["norm"], spec.bits, spec.seed)
    d, t = shape[-1], shape[2]
    packed_mask = enc.params["outlier_mask"]
    mask = ((packed_mask[..., None] >> torch.arange(8, dtype=torch.uint8, device=packed_mask.device)) & 1).bool()
    out_idx, rest_idx = _outlier_split(mask.reshape(*packed_mask.shape[:-1], d), n)
    norm = enc.params["norm"]
    out_codes = unpack_codes(enc.params["outlier_codes"], spec.bits + 1, n)
    x = torch.empty(shape, dtype=torch.float32, device=enc.codes.device)
    x.scatter_(-1, rest_idx.expand(-1, -1, t, -1), _dequantize(enc.codes, norm[..., :1], spec.bits, spec.seed))
    x.scatter_(-1, out_idx.expand(-1, -1, t, -1), _dequantize(out_codes, norm[..., 1:], spec.bits + 1,
                                                               spec.seed + 1))
    return x


CODEC = Codec("turboquant", encode, decode)
