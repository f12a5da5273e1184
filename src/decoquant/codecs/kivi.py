"""KIVI (Liu et al., 2024): asymmetric RTN, keys per channel over groups of
`quant_group_size` tokens, values per token over groups of `quant_group_size` channels.
(KIVI's full-precision recent window is the cache's `residual_length`.)"""

from __future__ import annotations

import torch

from ..quant import dequantize_kv, quantize_kv
from .base import Codec, Encoded, from_qtensor


def encode(x: torch.Tensor, spec) -> Encoded:  # spec.granularity: keys "channel", values "group"
    return from_qtensor(quantize_kv(x, spec.bits, spec.granularity, spec.symmetric, spec.quant_group_size,
                                    spec.clip))


def decode(enc: Encoded, spec, shape: tuple[int, ...]) -> torch.Tensor:
    return dequantize_kv(enc.qtensor(spec.bits), spec.granularity, spec.quant_group_size)


CODEC = Codec("kivi", encode, decode)
