"""`PackedKV`: the contiguous GPU layout of a layer's compressed blocks (DecoQuant group layout,
symmetric codes), read directly by the decode-attention kernels.

    codes   uint8  [B, KVH, T, D * bits / 8]   packed per token row (packing.py bit order)
    scales  fp16   [B, S_H, T]                 one scale per token (S_H = 1: shared by all heads,
                                               the paper; S_H = KVH: per token and head)
    ts      fp16   [B, TS_H, NB, G, G]         T_S of each block (TS_H = 1: shared, or KVH)
T = NB * block_size. Token t of head h decodes as x[t, c*G:(c+1)*G] = s[t] * (codes[t, c] - qmax) @ T_S[t // block_size].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..compressed import CompressedKV
from ..quant import qmax_symmetric


@dataclass
class PackedKV:
    codes: torch.Tensor
    scales: torch.Tensor
    ts: torch.Tensor
    bits: int
    block_size: int
    group_size: int

    @property
    def tokens(self) -> int:
        return self.codes.shape[2]

    @property
    def qmax(self) -> int:
        return qmax_symmetric(self.bits)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.ts))

    @classmethod
    def from_blocks(cls, blocks: Sequence[CompressedKV]) -> "PackedKV":
        """Concatenate equally sized compressed blocks (decoquant, group layout, 2 sites, symmetric,
        scale_granularity token or token_head, no exact rows)."""
        if not blocks:
            raise ValueError("blocks must hold at least one CompressedKV")
        cfg = blocks[0].config
        if (cfg.method != "decoquant" or cfg.layout != "group" or cfg.num_sites != 2 or not cfg.is_symmetric
                or cfg.scale_granularity not in ("token", "token_head")):
            raise ValueError("the fused kernels read decoquant blocks with layout='group', num_sites=2, symmetric "
                             f"scales per token or per token and head; got {cfg.label()} "
                             f"(granularity {cfg.scale_granularity!r}, symmetric={cfg.is_symmetric})")
        if any(c.num_exact for c in blocks):
            raise ValueError("blocks with exact rows cannot be read by the fused kernels")
        b, h, t, _ = blocks[0].shape
        g = cfg.group_size
        codes = torch.cat([c.codes for c in blocks], dim=2)
        scales = torch.cat([c.params["scale"].reshape(b, -1, t) for c in blocks], dim=2)
        ts = torch.stack([c.params["site2"].reshape(b, -1, g, g) for c in blocks], dim=2)
        return cls(codes, scales, ts, cfg.bits, t, g)
