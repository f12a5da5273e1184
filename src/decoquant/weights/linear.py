"""QuantLinear: a Linear layer that stores packed low-bit codes and dequantizes on the fly."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..packing import pack_codes, unpack_codes
from ..quant import QTensor
from .codec import decode_weight, encode_weight


class QuantLinear(torch.nn.Module):
    """Drop-in for `torch.nn.Linear` (pure-torch reference forward: rebuild W, then `F.linear`).

    Buffers: `codes` (uint8, packed along the input dimension), `scale` (and `zero`) fp16 per output
    channel, `t_s` fp16 [g, g] for DecoQuant, and the original bias."""

    def __init__(self, linear: torch.nn.Linear, method: str, bits: int, group_size: int = 16,
                 symmetric: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.method, self.bits, self.group_size = method, bits, group_size
        w = linear.weight.detach()
        q, t_s = encode_weight(w, method, bits, group_size, symmetric)
        self.register_buffer("codes", pack_codes(q.codes, bits))
        self.register_buffer("scale", q.scale)
        self.register_buffer("zero", q.zero)
        self.register_buffer("t_s", t_s)
        bias = linear.bias
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.compute_dtype = w.dtype

    def dequantized_weight(self) -> torch.Tensor:
        codes = unpack_codes(self.codes, self.bits, self.in_features)
        q = QTensor(codes, self.scale, self.zero, self.bits)
        return decode_weight(q, self.t_s, self.group_size).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @property
    def nbytes(self) -> int:
        """Stored bytes of the weight (codes + scales + zeros + T_S), bias excluded."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero, self.t_s) if t is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}, "
                f"bits={self.bits}, group_size={self.group_size}, symmetric={self.zero is None}")
