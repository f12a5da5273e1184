"""KIVI (Liu et al., 2024): asymmetric RTN, keys per channel over groups of
`quant_group_size` tokens, values per token over groups of `quant_group_size` channels.
(KIVI's full-precision recent window is the cache's `residual_length`.)"""

from __future__ import annotations

import torch

from ..quant import dequantize_kv, quantize_kv
from .base import Codec, Encoded, from_qtensor


def _granularity(kind: str) -> str:
    return "channel" if kind == "key" else "group"


def encode(x: torch.Tensor, config, kind: str) -> Encoded:
    q = quantize_kv(x, config.bits, _granularity(kind), config.is_symmetric, config.quant_group_size)
    return from_qtensor(q)


def decode(enc: Encoded, config, kind: str, shape: tuple[int, ...]) -> torch.Tensor:
    return dequantize_kv(enc.qtensor(config.bits), _granularity(kind), config.quant_group_size)


CODEC = Codec("kivi", encode, decode)
