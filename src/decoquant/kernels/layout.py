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


FUSED_BITS = (2, 4, 8)


def fused_compatible(config) -> bool:
    """Whether blocks made with `config` can be read by the fused decode kernels."""
    return (config.method == "decoquant" and config.layout == "group" and config.num_sites == 2
            and config.is_symmetric and {config.granularity("key"), config.granularity("value")} <= {"token", "token_head"}
            and config.bits in FUSED_BITS and config.group_size in (16, 32))


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
                or not {cfg.granularity("key"), cfg.granularity("value")} <= {"token", "token_head"}):
            raise ValueError("the fused kernels read decoquant blocks with layout='group', num_sites=2, symmetric "
                             f"scales per token or per token and head; got {cfg.label()} "
                             f"(granularities {cfg.granularity('key')!r}/{cfg.granularity('value')!r}, symmetric={cfg.is_symmetric})")
        if any(c.num_exact for c in blocks):
            raise ValueError("blocks with exact rows cannot be read by the fused kernels")
        b, h, t, _ = blocks[0].shape
        g = cfg.group_size
        codes = torch.cat([c.codes for c in blocks], dim=2)
        scales = torch.cat([c.params["scale"].reshape(b, -1, t) for c in blocks], dim=2)
        ts = torch.stack([c.params["site2"].reshape(b, -1, g, g) for c in blocks], dim=2)
        return cls(codes, scales, ts, cfg.bits, t, g)


class PackedKVBuffer:
    """A growing PackedKV (capacity grows by 25%): blocks are appended in place, never rewritten."""

    def __init__(self):
        self.codes = self.scales = self.ts = None
        self.tokens = 0
        self.blocks = 0
        self.bits = self.block_size = self.group_size = None

    def append(self, block: CompressedKV, n: int = 1) -> None:
        """Append `n` blocks given folded into the batch dim ([n * B, ...], block-major, as the
        cache compresses a prefill), or one block (n = 1)."""
        p = PackedKV.from_blocks([block])
        b = p.codes.shape[0] // n
        unfold = lambda t: t.reshape(n, b, *t.shape[1:]).movedim(0, 2)  # noqa: E731  [b, H, n, ...]
        codes = unfold(p.codes).reshape(b, p.codes.shape[1], n * p.tokens, -1)
        scales = unfold(p.scales).reshape(b, p.scales.shape[1], n * p.tokens)
        ts = unfold(p.ts.squeeze(2))  # [b, TS_H, n, G, G]
        if self.codes is None:
            self.bits, self.block_size, self.group_size = p.bits, p.block_size, p.group_size
            self.codes, self.scales, self.ts = codes.contiguous(), scales.contiguous(), ts.contiguous()
        else:
            if self.tokens + codes.shape[2] > self.codes.shape[2]:
                self._grow(self.tokens + codes.shape[2])
            t, k = self.tokens, codes.shape[2]
            self.codes[:, :, t:t + k] = codes
            self.scales[:, :, t:t + k] = scales
            self.ts[:, :, self.blocks:self.blocks + n] = ts
        self.tokens += codes.shape[2]
        self.blocks += n

    def _grow(self, need: int) -> None:
        # +25% (whole blocks): amortised copies stay cheap while the spare capacity stays small
        step = self.block_size * max(1, self.codes.shape[2] // (4 * self.block_size))
        cap = max(need, self.codes.shape[2] + step)
        def grown(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = size
            out = torch.empty(shape, dtype=t.dtype, device=t.device)
            out.narrow(dim, 0, t.shape[dim]).copy_(t)
            return out
        self.codes = grown(self.codes, 2, cap)
        self.scales = grown(self.scales, 2, cap)
        self.ts = grown(self.ts, 2, cap // self.block_size)

    def block(self, i: int, like: CompressedKV) -> CompressedKV:
        """Block i as a CompressedKV whose tensors are views into this buffer (no copy)."""
        from dataclasses import replace

        t0, t1 = i * self.block_size, (i + 1) * self.block_size
        b = self.codes.shape[0]
        params = {"scale": self.scales[:, :, t0:t1].unsqueeze(-1),
                  "site2": self.ts[:, :, i].reshape(like.params["site2"].shape)}
        return replace(like, codes=self.codes[:, :, t0:t1], params=params, shape=(b,) + tuple(like.shape[1:]),
                       exact_mask=torch.zeros(b, dtype=torch.bool, device=self.codes.device), exact_values=None)

    def view(self) -> PackedKV:
        """The blocks appended so far (slices: later appends do not change them)."""
        return PackedKV(self.codes[:, :, :self.tokens], self.scales[:, :, :self.tokens],
                        self.ts[:, :, :self.blocks], self.bits, self.block_size, self.group_size)

    def truncate(self, blocks: int) -> None:
        """Forget blocks past the first `blocks` (after a crop); their space is reused."""
        self.blocks = min(self.blocks, blocks)
        self.tokens = self.blocks * (self.block_size or 0)

    def select_batch(self, index: torch.Tensor) -> None:
        if self.codes is not None:
            self.codes, self.scales, self.ts = (t.index_select(0, index.to(t.device))
                                                for t in (self.codes, self.scales, self.ts))

    @property
    def nbytes(self) -> int:
        """Bytes of the capacity actually allocated."""
        if self.codes is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.ts))
