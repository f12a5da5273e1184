"""The small interface every codec implements, and the unpacked form it produces.

A codec is a module with two pure functions:

    encode(x, config, kind) -> Encoded     x: float [batch, kv_heads, tokens, head_dim]
    decode(enc, config, kind, shape) -> Tensor    float32 [batch, kv_heads, tokens, head_dim]

`Encoded.codes` are unsigned integer codes (uint8, one per element of whatever tensor the codec
quantizes, last dim = the dim that gets packed; or already packed, `packed`); `params` are the fp16
tensors stored beside them (scales, zero points, local tensors); `unsafe` marks batch rows that could
not be compressed safely (they are kept exact by the caller); `fallback` marks rows the codec compressed
with a simpler form of the same format (DecoQuant: T_S = I for a rank-deficient block), for the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..quant import QTensor


@dataclass
class Encoded:
    codes: torch.Tensor | None  # uint8, unpacked (packed if `packed`)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    unsafe: torch.Tensor | None = None  # bool [batch]
    packed: bool = False  # codes already packed along their last dim (packing.py's order)
    fallback: torch.Tensor | None = None  # bool [batch]: rows (partly) stored with the codec's simpler fallback

    def qtensor(self, bits: int) -> QTensor:
        return QTensor(self.codes, self.params["scale"], self.params.get("zero"), bits)


def from_qtensor(q: QTensor, **extra: torch.Tensor) -> Encoded:
    params = {"scale": q.scale}
    if q.zero is not None:
        params["zero"] = q.zero
    params.update(extra)
    return Encoded(q.codes, params)
