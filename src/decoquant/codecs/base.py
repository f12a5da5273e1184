"""The small interface every codec implements, and the unpacked form it produces.

A codec is a module whose `CODEC` is a `Codec` of two pure torch functions of one kind's recipe (`spec`: a
`spec.KindSpec`, from `DecoQuantConfig.spec(kind)`; a codec reads nothing else):

    encode(x, spec) -> Encoded     x: float [batch, kv_heads, tokens, head_dim]
    decode(enc, spec, shape) -> Tensor    float32 [batch, kv_heads, tokens, head_dim]

and, for a codec with GPU kernels, its fast path: `uses_kernels(x, spec, backend)` (decided once per tensor by
the caller, `api`) and `encode_kernels(xs, specs)`. A codec without kernels answers False, and refuses
backend="triton".

`Encoded.codes` are unsigned integer codes (uint8, one per element of whatever tensor the codec
quantizes, last dim = the dim that gets packed; or already packed, `packed`); `params` are the fp16
tensors stored beside them (scales, zero points, local tensors); `unsafe` marks batch rows that could
not be compressed safely (they are kept exact by the caller); `fallback` marks rows the codec compressed
with a simpler form of the same format (DecoQuant: T_S = I for a rank-deficient block), for the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

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


@dataclass(frozen=True)
class Codec:
    method: str
    encode: Callable[..., Encoded]  # (x, spec): the torch route, on any device
    decode: Callable[..., torch.Tensor]  # (enc, spec, shape)
    kernel_route: Callable[..., bool] | None = None  # (x, spec, backend): whether the kernels encode x
    encode_kernels: Callable[..., list[Encoded]] | None = None  # (xs, specs): several tensors, one pass

    def uses_kernels(self, x: torch.Tensor, spec, backend="auto") -> bool:
        """Whether x is encoded by this codec's GPU kernels (`encode_kernels`) under `backend`."""
        from ..format import Backend

        backend = Backend.parse(backend)
        if self.kernel_route is None:
            if backend is Backend.TRITON:
                raise ValueError(f"backend='triton' compresses method='decoquant' only; method={self.method!r} "
                                 "runs on torch")
            return False
        return self.kernel_route(x, spec, backend)
