"""Per-token round-to-nearest: the paper's baseline (one symmetric scale per token over all
heads). `symmetric=False` in the config switches to the min/max quantizer."""

from __future__ import annotations

import torch

from ..quant import dequantize_kv, quantize_kv
from .base import Codec, Encoded, from_qtensor


def encode(x: torch.Tensor, spec) -> Encoded:
    return from_qtensor(quantize_kv(x, spec.bits, spec.granularity, spec.symmetric))


def decode(enc: Encoded, spec, shape: tuple[int, ...]) -> torch.Tensor:
    return dequantize_kv(enc.qtensor(spec.bits), spec.granularity)


CODEC = Codec("rtn", encode, decode)
