"""Round-to-nearest quantizers: choose scales, quantize, dequantize, fake-quantize.

Two quantizers:
- symmetric absmax (the paper's): qmax = 2**(B-1) - 1, scale = max|x| / qmax (clamped to >= 1e-5),
  code = round(x / scale) in [-qmax, qmax]. 2 bits is ternary {-1, 0, 1}. Codes are stored offset
  by +qmax, so they are unsigned integers in [0, 2*qmax].
- asymmetric min/max: scale = (max - min) / (2**B - 1) (clamped), zero = min,
  code = round((x - zero) / scale) in [0, 2**B - 1], x_hat = code * scale + zero.

With `clip=True` the asymmetric quantizer searches each slice's range: [lo + f (hi - lo), hi - f (hi - lo)]
for f = (1 - a) / 2 over the shrink ratios a of CLIP_RATIOS (1 first: the plain min/max range), keeping the
one whose fp16-stored reconstruction has the smallest squared error over the slice (ties: the earlier ratio).
Values outside the shrunk range clamp to its end codes. Same stored form, the slice's own data only.

Rounding is round-half-to-even (`torch.round`). Scales and zeros are stored in fp16, and codes are
computed against the fp16 scale, so the stored form decodes to exactly what fake quantization
returns.

Granularity is expressed by which dimensions share one scale (`reduce_dims`); `group_view`
reshapes a dimension into groups (padding the last group) for the grouped granularities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_MIN = 1e-5
PARAM_DTYPE = torch.float16


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
CLIP_SHRINKS = tuple((1.0 - a) / 2 for a in CLIP_RATIOS)  # f of each ratio: the range [lo + f span, hi - f span]


def qmax_symmetric(bits: int) -> int:
    return 2 ** (bits - 1) - 1


@dataclass
class QTensor:
    """Unpacked quantized tensor: uint8 codes with broadcastable fp16 scale (and zero)."""

    codes: torch.Tensor  # uint8, same shape as the input
    scale: torch.Tensor  # fp16, broadcastable to codes
    zero: torch.Tensor | None  # fp16 (asymmetric) or None (symmetric)
    bits: int

    @property
    def symmetric(self) -> bool:
        return self.zero is None


def quantize(x: torch.Tensor, bits: int, reduce_dims: tuple[int, ...], symmetric: bool = True,
             clip: bool = False) -> QTensor:
    """Quantize `x` with one scale (and zero) per slice over `reduce_dims`.

    x: any float tensor; reduce_dims: the dims that share a scale (e.g. (-1,) = per row); clip: search each
    slice's range (asymmetric only, see the module docstring).
    Returns codes (uint8, shape of x) and fp16 parameters with size 1 on `reduce_dims`.
    """
    xf = x.float()
    if symmetric:
        qmax = qmax_symmetric(bits)
        absmax = xf.abs().amax(dim=reduce_dims, keepdim=True)
        scale = (absmax / qmax).clamp_min(SCALE_MIN).to(PARAM_DTYPE)
        codes = torch.round(xf / scale.float()).clamp_(-qmax, qmax) + qmax
        return QTensor(codes.to(torch.uint8), scale, None, bits)
    lo = xf.amin(dim=reduce_dims, keepdim=True)
    hi = xf.amax(dim=reduce_dims, keepdim=True)
    if not clip:
        return QTensor(*_asymmetric(xf, lo, hi, bits), bits)
    best = best_err = None
    for f in CLIP_SHRINKS:
        cand = _asymmetric(xf, lo + f * (hi - lo), hi - f * (hi - lo), bits)
        err = (cand[0].float() * cand[1].float() + cand[2].float() - xf).pow(2).sum(dim=reduce_dims, keepdim=True)
        if best is None:
            best, best_err = cand, err
            continue
        take = err < best_err
        best_err = torch.where(take, err, best_err)
        best = tuple(torch.where(take, n, o) for n, o in zip(cand, best))
    return QTensor(*best, bits)


def _asymmetric(xf: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int):
    """(codes uint8, scale, zero) of xf over the range [lo, hi] (broadcast), parameters stored in fp16."""
    top = 2**bits - 1
    zero = lo.to(PARAM_DTYPE)
    scale = ((hi - zero.float()) / top).clamp_min(SCALE_MIN).to(PARAM_DTYPE)
    codes = torch.round((xf - zero.float()) / scale.float()).clamp_(0, top)
    return codes.to(torch.uint8), scale, zero


def dequantize(q: QTensor) -> torch.Tensor:
    """float32 reconstruction of a QTensor."""
    if q.zero is None:
        return (q.codes.float() - qmax_symmetric(q.bits)) * q.scale.float()
    return q.codes.float() * q.scale.float() + q.zero.float()


def fake_quantize(x: torch.Tensor, bits: int, reduce_dims: tuple[int, ...], symmetric: bool = True) -> torch.Tensor:
    """quantize + dequantize, returned in x's dtype."""
    return dequantize(quantize(x, bits, reduce_dims, symmetric)).to(x.dtype)


# ---------------------------------------------------------------------------- granularities
def group_view(x: torch.Tensor, dim: int, group: int) -> tuple[torch.Tensor, int]:
    """Split `dim` of x into (n_groups, group), padding the last group by repeating its last
    element (which changes neither its min, max nor absmax). Returns (view, original length)."""
    dim = dim % x.dim()
    n = x.shape[dim]
    pad = (-n) % group
    if pad:
        last = x.narrow(dim, n - 1, 1)
        x = torch.cat([x, last.expand(*[pad if d == dim else s for d, s in enumerate(last.shape)])], dim)
    shape = list(x.shape)
    shape[dim:dim + 1] = [shape[dim] // group, group]
    return x.reshape(shape), n


def ungroup(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """Inverse of `group_view` for a tensor whose `dim`, `dim+1` are (n_groups, group)."""
    dim = dim % x.dim()
    shape = list(x.shape)
    shape[dim:dim + 2] = [shape[dim] * shape[dim + 1]]
    return x.reshape(shape).narrow(dim, 0, length)


# ---------------------------------------------------------------------------- KV granularities
# x is [batch, heads, tokens, channels]. Which entries share one scale:
#   token       (b, t) over all heads and channels (the paper's per-token RTN)
#   token_head  (b, h, t) over channels
#   channel     (b, h, token group, c): per channel over groups of `group` tokens (KIVI keys)
#   group       (b, h, t, channel group): per token over groups of `group` channels (KIVI values)
GRANULARITIES = ("token", "token_head", "channel", "group")


def quantize_kv(x: torch.Tensor, bits: int, granularity: str, symmetric: bool, group: int = 32,
                clip: bool = False) -> QTensor:
    """Quantize x [B, H, T, C] at a KV granularity. Codes keep x's shape; scale/zero have the
    grouped shape ([B,1,T,1], [B,H,T,1], [B,H,ceil(T/G),1,C] or [B,H,T,C/G,1]). clip: see `quantize`."""
    if granularity == "token":
        return quantize(x, bits, (1, 3), symmetric, clip)
    if granularity == "token_head":
        return quantize(x, bits, (3,), symmetric, clip)
    if granularity == "channel":
        view, n = group_view(x, 2, group)
        q = quantize(view, bits, (3,), symmetric, clip)
        q.codes = ungroup(q.codes, 2, n)
        return q
    if granularity == "group":
        group = min(group, x.shape[-1])
        view, n = group_view(x, 3, group)
        q = quantize(view, bits, (4,), symmetric, clip)
        q.codes = ungroup(q.codes, 3, n)
        return q
    raise ValueError(f"granularity={granularity!r} is not supported; allowed values: {GRANULARITIES}")


def dequantize_kv(q: QTensor, granularity: str, group: int = 32) -> torch.Tensor:
    """float32 [B, H, T, C] reconstruction of `quantize_kv`'s output."""
    if granularity in ("token", "token_head"):
        return dequantize(q)
    dim = 2 if granularity == "channel" else 3
    if granularity == "group":
        group = min(group, q.codes.shape[-1])
    codes, n = group_view(q.codes, dim, group)
    return ungroup(dequantize(QTensor(codes, q.scale, q.zero, q.bits)), dim, n)
