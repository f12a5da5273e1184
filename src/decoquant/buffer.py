"""Block storage: compressed blocks packed into the contiguous layout the kernels read (`PackedKV`), and the
growing per-layer buffer a fused store keeps them in."""

from __future__ import annotations

from typing import Sequence

import torch

from .compressed import CompressedKV
from .format import KVFormat
from .kernels.layout import PackedKV


def pack_blocks(blocks: Sequence[CompressedKV], check_exact: bool = True) -> PackedKV:
    """Concatenate equally sized compressed blocks (one kind, of a format the fused kernels read, no exact
    rows; check_exact=False: the caller keeps those rows elsewhere, and no host sync counts them) into one
    PackedKV."""
    if not blocks:
        raise ValueError("blocks must hold at least one CompressedKV")
    cfg, kind = blocks[0].config, blocks[0].kind
    KVFormat.of(cfg).require_fused("packing blocks for the fused kernels")
    if check_exact and any(c.num_exact for c in blocks):
        raise ValueError("blocks with exact rows cannot be read by the fused kernels")
    b, h, t, d = blocks[0].shape
    spec = cfg.spec(kind)
    g, cg = spec.group_size, spec.channel_group
    shape = (lambda: (b, h, t // cg, d)) if cg else (lambda: (b, -1, t))
    cat = lambda ts: ts[0] if len(ts) == 1 else torch.cat(ts, dim=2)  # noqa: E731
    codes = cat([c.codes for c in blocks])
    scales = cat([c.params["scale"].reshape(shape()) for c in blocks])
    zeros = None
    if "zero" in blocks[0].params:
        zeros = cat([c.params["zero"].reshape(shape()) for c in blocks])
    ts = torch.stack([c.params["site2"].reshape(b, -1, g, g) for c in blocks], dim=2)
    return PackedKV(codes, scales, ts, spec.bits, t, g, zeros, cg)


class PackedKVBuffer:
    """A growing PackedKV (capacity grows by 1/16, whole blocks): blocks are appended in place, never
    rewritten."""

    def __init__(self):
        self.codes = self.scales = self.zeros = self.ts = None
        self.tokens = 0
        self.blocks = 0
        self.bits = self.block_size = self.group_size = None
        self.channel_group = 0

    def _scale_rows(self, tokens: int) -> int:
        """Rows of the scales (dim 2) that `tokens` tokens take."""
        return tokens // self.channel_group if self.channel_group else tokens

    def append(self, block: CompressedKV, n: int = 1) -> None:
        """Append `n` blocks given folded into the batch dim ([n * B, ...], block-major, as the
        cache compresses a prefill), or one block (n = 1). Rows that must stay exact are cleared afterwards
        (`clear_rows`) and kept by the caller."""
        p = pack_blocks([block], check_exact=False)
        b = p.codes.shape[0] // n
        unfold = lambda t: t.reshape(n, b, *t.shape[1:]).movedim(0, 2)  # noqa: E731  [b, H, n, ...]
        codes = unfold(p.codes).reshape(b, p.codes.shape[1], n * p.tokens, -1)
        params = [unfold(t).reshape(b, t.shape[1], n * t.shape[2], *t.shape[3:]) for t in (p.scales, p.zeros)
                  if t is not None]
        ts = unfold(p.ts.squeeze(2))  # [b, TS_H, n, G, G]
        if self.codes is None:
            self.bits, self.block_size, self.group_size = p.bits, p.block_size, p.group_size
            self.channel_group = p.channel_group
            self.codes, self.ts = codes.contiguous(), ts.contiguous()
            self.scales = params[0].contiguous()
            self.zeros = params[1].contiguous() if len(params) > 1 else None
        else:
            if self.tokens + codes.shape[2] > self.codes.shape[2]:
                self._grow(self.tokens + codes.shape[2])
            t, k = self.tokens, codes.shape[2]
            self.codes[:, :, t:t + k] = codes
            r0, r1 = self._scale_rows(t), self._scale_rows(t + k)
            self.scales[:, :, r0:r1] = params[0]
            if self.zeros is not None:
                self.zeros[:, :, r0:r1] = params[1]
            self.ts[:, :, self.blocks:self.blocks + n] = ts
        self.tokens += codes.shape[2]
        self.blocks += n

    def reserve(self, tokens: int) -> None:
        """Capacity for `tokens` tokens (whole blocks) now, so that appends up to there never reallocate: the
        addresses a captured CUDA graph reads stay fixed. The spare capacity is zero-filled."""
        if self.codes is None:
            raise ValueError("reserve needs a buffer that has its format (append a block first)")
        if tokens > self.codes.shape[2]:
            self._grow(tokens, exact=True)

    def _grow(self, need: int, exact: bool = False) -> None:
        # +1/16 (whole blocks): at most ~6% spare capacity; a copy of the layer's blocks every ~L/16 decode
        # steps at L cached tokens (e.g. ~20 MB per layer every 1k steps at 16k tokens, 4 bits) stays cheap
        step = self.block_size * max(1, self.codes.shape[2] // (16 * self.block_size))
        cap = need if exact else max(need, self.codes.shape[2] + step)
        def grown(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = size
            out = (torch.zeros if exact else torch.empty)(shape, dtype=t.dtype, device=t.device)
            out.narrow(dim, 0, t.shape[dim]).copy_(t)
            return out
        self.codes = grown(self.codes, 2, cap)
        self.scales = grown(self.scales, 2, self._scale_rows(cap))
        if self.zeros is not None:
            self.zeros = grown(self.zeros, 2, self._scale_rows(cap))
        self.ts = grown(self.ts, 2, cap // self.block_size)

    def block(self, i: int, like: CompressedKV) -> CompressedKV:
        """Block i as a CompressedKV whose tensors are views into this buffer (no copy); `like`: a block of
        the same format (any batch size) for the parameter shapes and metadata."""
        from dataclasses import replace

        t0, t1 = i * self.block_size, (i + 1) * self.block_size
        r0, r1 = self._scale_rows(t0), self._scale_rows(t1)
        b = self.codes.shape[0]
        # back to the codec's parameter shapes ([B, S_H, T, 1] per token, [B, H, T / cg, 1, D] per channel)
        as_param = ((lambda t: t[:, :, r0:r1].unsqueeze(3)) if self.channel_group
                    else (lambda t: t[:, :, r0:r1].unsqueeze(-1)))
        batch = lambda name: (b,) + tuple(like.params[name].shape[1:])  # noqa: E731  (like: any batch size)
        params = {"scale": as_param(self.scales).reshape(batch("scale")),
                  "site2": self.ts[:, :, i].reshape(batch("site2"))}
        if self.zeros is not None:
            params["zero"] = as_param(self.zeros).reshape(batch("zero"))
        return replace(like, codes=self.codes[:, :, t0:t1], params=params, shape=(b,) + tuple(like.shape[1:]),
                       exact_mask=torch.zeros(b, dtype=torch.bool, device=self.codes.device), exact_values=None,
                       fallback_mask=None)

    def clear_rows(self, i: int, rows: torch.Tensor) -> None:
        """Zero block i's parameters on batch rows `rows` (bool [B]): rows stored exact elsewhere, which the
        kernels skip (zeroed, nothing there is NaN)."""
        r0, r1 = self._scale_rows(i * self.block_size), self._scale_rows((i + 1) * self.block_size)
        for t in (self.scales, self.zeros):
            if t is not None:
                t[rows, :, r0:r1] = 0
        self.ts[rows, :, i] = 0

    def view(self, capacity: bool = False) -> PackedKV:
        """The blocks appended so far (slices: later appends do not change them), or (capacity) the whole
        allocation, which later appends fill in place (read with a kv_len bound)."""
        tokens = self.codes.shape[2] if capacity else self.tokens
        blocks = self.ts.shape[2] if capacity else self.blocks
        rows = self._scale_rows(tokens)
        return PackedKV(self.codes[:, :, :tokens], self.scales[:, :, :rows], self.ts[:, :, :blocks],
                        self.bits, self.block_size, self.group_size,
                        None if self.zeros is None else self.zeros[:, :, :rows], self.channel_group)

    def truncate(self, blocks: int) -> None:
        """Forget blocks past the first `blocks` (after a crop); their space is reused."""
        self.blocks = min(self.blocks, blocks)
        self.tokens = self.blocks * (self.block_size or 0)

    def select_batch(self, index: torch.Tensor) -> None:
        if self.codes is not None:
            self.codes, self.scales, self.ts = (t.index_select(0, index.to(t.device))
                                                for t in (self.codes, self.scales, self.ts))
            if self.zeros is not None:
                self.zeros = self.zeros.index_select(0, index.to(self.zeros.device))

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.codes, self.scales, self.zeros, self.ts) if t is not None)

    @property
    def nbytes(self) -> int:
        """Bytes of the capacity actually allocated."""
        return sum(t.numel() * t.element_size() for t in self.tensors)
