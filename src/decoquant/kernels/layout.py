"""`PackedKV`: the contiguous GPU layout of a layer's compressed blocks (DecoQuant group layout),
read directly by the decode-attention kernels: tensors and integers only (which configs produce it:
`decoquant.format`; how blocks get into it: `decoquant.buffer`).

    codes   uint8  [B, KVH, T, D * bits / 8]   packed per token row (packing.py bit order)
    scales  fp16   [B, S_H, T]                 per-token scales (channel_group = 0; S_H = 1: shared
                                               by all heads, the paper; S_H = KVH: per token and head)
            fp16   [B, KVH, T / cg, D]         or per T_L channel over groups of cg = channel_group
                                               tokens (the keys of preset "channel64-token")
    zeros   fp16   like scales, or None        asymmetric codes: T_L = codes * s + z; symmetric
                                               (None): T_L = (codes - qmax) * s
    ts      fp16   [B, TS_H, NB, G, G]         T_S of each block (TS_H = 1: shared, or KVH)
T = NB * block_size. Token t of head h decodes as x[t, c*G:(c+1)*G] = T_L[t, c*G:(c+1)*G] @ T_S[t // block_size].

Paged blocks (a paged engine's cache): the same tensors with B = pages and T = block_size, so each page holds one
block (NB = 1); they may be strided views into the page bytes. A block table int32 [B', NB'] says which page holds
block n of sequence b (`reference.gather_pages` builds the per-sequence layout from them).

`ExactBlocks`: the rows of some blocks that are stored exact instead (their input was not finite). The kernels
skip block n of batch row b where skip[b, n] is set; attention reads those rows' tokens exactly instead:

    skip       int8   [B, NB']                 NB' >= the blocks read (a static view's whole capacity)
    keys       like the input [B, KVH, E * block_size, D]   the E blocks' tokens, exact where skipped
    values
    positions  int32  [E * block_size]         each of those tokens' position among the compressed tokens
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant import qmax_symmetric


@dataclass
class PackedKV:
    codes: torch.Tensor
    scales: torch.Tensor
    ts: torch.Tensor
    bits: int
    block_size: int
    group_size: int
    zeros: torch.Tensor | None = None  # asymmetric codes (see the module docstring)
    channel_group: int = 0  # 0: per-token scales; else per-channel scales over this many tokens

    @property
    def tokens(self) -> int:
        return self.codes.shape[2]

    @property
    def qmax(self) -> int:
        """The code offset: qmax for symmetric codes, 0 for asymmetric ones (their zero is explicit)."""
        return qmax_symmetric(self.bits) if self.zeros is None else 0

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.codes, self.scales, self.zeros, self.ts) if t is not None)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


@dataclass
class ExactBlocks:
    skip: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor

    def valid(self, block_size: int, kv_start: torch.Tensor | None, kv_len: torch.Tensor | None) -> torch.Tensor:
        """bool [B, E * block_size]: which of `keys` are attended (their row skips the block, and the position
        lies in [kv_start, kv_len))."""
        pos = self.positions.long()
        ok = self.skip.index_select(1, pos // block_size).bool()
        if kv_start is not None:
            ok &= pos[None] >= kv_start[:, None]
        if kv_len is not None:
            ok &= pos[None] < kv_len[:, None]
        return ok
