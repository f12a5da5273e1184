"""What a layer's store keeps and hands out, besides its own bookkeeping (cache.py):

- `Block`: one compressed block (keys and values), with views into the store's packed buffers taken lazily;
- `ExactRows`: the rows of one buffered block stored exact;
- `select_batch`: rows of a CompressedKV (beam reorder, batch selection);
- `FusedKV`: what a fused-attention decode step reads instead of fp16 K/V;
- `StaticWindow`: a static store's exact tokens and device-side counters (CUDA-graph decoding);
- `DecodedHistory`: the decoded form of the blocks, kept between steps when a store is asked to (evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .api import decompress
from .compressed import CompressedKV
from .kernels.layout import ExactBlocks, PackedKV


class Block:
    """One compressed block: keys and values (CompressedKV) and its valid length (block_size unless
    cropped). A block that lives in a store's packed buffers gets its views into them lazily (`point`):
    after a buffer regrows, re-pointing costs O(1) per block instead of ~20 tensor ops (at 16k tokens
    that was ~20 ms per layer in the decode step that regrew)."""

    __slots__ = ("_keys", "_values", "length", "_view", "_fallback")

    def __init__(self, keys: CompressedKV | None, values: CompressedKV | None, length: int,
                 fallback: tuple = (None, None, None)):
        self._keys, self._values, self.length = keys, values, length
        self._view = None
        # (keys' mask, values' mask, rows): the fallback masks of the compression call that made this block
        # (bool on the device, or None) and this block's rows of them; reduced only when reported
        self._fallback = fallback

    def point(self, view) -> None:
        """Take keys and values from `view()` when first read (drops views of an older buffer now)."""
        self._keys = self._values = None
        self._view = view

    def _resolve(self) -> None:
        if self._view is not None:
            self._keys, self._values = self._view()
            self._view = None

    @property
    def keys(self) -> CompressedKV:
        self._resolve()
        return self._keys

    @property
    def values(self) -> CompressedKV:
        self._resolve()
        return self._values

    @property
    def exact(self) -> bool:
        """Whether rows of this block are kept exact (not finite: NaN/Inf)."""
        return self.keys.num_exact + self.values.num_exact > 0

    @property
    def fallback(self) -> bool:
        """Whether the codec stored some of this block with its fallback (`CompressedKV.fallback_mask`), as it was
        compressed (a later batch selection keeps the record)."""
        *masks, rows = self._fallback
        return any(m is not None and bool(m[rows].any()) for m in masks)

    def decode(self) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = decompress(self.keys), decompress(self.values)
        if self.length < k.shape[-2]:
            k, v = k[..., : self.length, :], v[..., : self.length, :]
        return k, v

    def select_batch(self, index: torch.Tensor) -> "Block":
        return Block(select_batch(self.keys, index), select_batch(self.values, index), self.length, self._fallback)


@dataclass
class ExactRows:
    """The batch rows of one block kept exact (its input was not finite, or its codec could not compress them
    safely): mask bool [B], and those rows' keys and values [mask.sum(), H, block_size, D], in the input dtype."""

    mask: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor

    def select(self, index: torch.Tensor) -> "ExactRows | None":
        """The record of batch rows `index` (None if none of them is exact)."""
        index = index.to(self.mask.device)
        mask = self.mask.index_select(0, index)
        if not bool(mask.any()):
            return None
        at = (torch.cumsum(self.mask.long(), 0) - 1).index_select(0, index)[mask]  # rows of keys/values
        return ExactRows(mask, self.keys.index_select(0, at), self.values.index_select(0, at))


class DecodedHistory:
    """The blocks' decoded keys and values, concatenated, extended as blocks are added.

    Blocks never change once written (a crop shortens the last one, which the store reports by `reset()`),
    so a store that keeps this decodes each block once instead of at every step. It holds the history in
    full precision beside the compressed blocks: a compute cache for evaluation on the CPU, where every
    chunk of a long text would otherwise decode every earlier block again, not a way to save memory."""

    __slots__ = ("keys", "values", "blocks")

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.keys = self.values = None
        self.blocks = 0  # how many of the store's blocks `keys` and `values` hold

    def read(self, blocks: list[Block]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded keys and values of `blocks` (all of them, in order), decoding only those not seen yet."""
        if self.blocks > len(blocks):
            self.reset()
        new = [b.decode() for b in blocks[self.blocks:]]
        if new:
            parts_k = ([] if self.keys is None else [self.keys]) + [k for k, _ in new]
            parts_v = ([] if self.values is None else [self.values]) + [v for _, v in new]
            self.keys, self.values = torch.cat(parts_k, -2), torch.cat(parts_v, -2)
            self.blocks = len(blocks)
        return self.keys, self.values

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else 2 * self.keys.numel() * self.keys.element_size()


def select_batch(c: CompressedKV, index: torch.Tensor) -> CompressedKV:
    """Rows `index` of a CompressedKV (beam reorder, batch selection)."""
    index = index.to(c.exact_mask.device)
    exact = None
    mask = c.exact_mask.index_select(0, index)
    if c.exact_values is not None and bool(mask.any()):
        row_of = torch.cumsum(c.exact_mask.long(), 0) - 1  # position of each exact row in exact_values
        exact = c.exact_values.index_select(0, row_of.index_select(0, index)[mask].to(c.exact_values.device))
    params = {k: v.index_select(0, index.to(v.device)) for k, v in c.params.items()}
    codes = None if c.codes is None else c.codes.index_select(0, index.to(c.codes.device))
    shape = (int(index.numel()),) + tuple(c.shape[1:])
    fallback = None if c.fallback_mask is None else c.fallback_mask.index_select(0, index.to(c.fallback_mask.device))
    return replace(c, shape=shape, codes=codes, params=params, exact_mask=mask, exact_values=exact,
                   fallback_mask=fallback)


@dataclass
class FusedKV:
    """What a fused-attention step reads instead of fp16 K/V: the packed blocks and the exact window.

    A static store (`CompressedKVStore.make_static`) hands out the same tensors at every step: the packed
    buffers and the exact window at their full capacity, with device-side bounds (kv_len, window_valid)
    that say how much of them is filled; a CUDA graph of the decode step replays them as they change."""

    keys: PackedKV
    values: PackedKV
    window_keys: torch.Tensor  # [B, KVH, S + W, D]: the exact tokens (sinks, then the window with the new one)
    window_values: torch.Tensor
    sink_tokens: int = 0  # S: how many of the exact tokens are sinks (they precede the blocks)
    kv_start: torch.Tensor | None = None  # int32 [B] zeros (static stores)
    kv_len: torch.Tensor | None = None  # int32 [B]: compressed tokens held (static stores; None: all of keys)
    window_valid: torch.Tensor | None = None  # bool [B, S + W]: which exact tokens are held (static stores)
    exact: ExactBlocks | None = None  # rows of blocks stored exact (the kernel skips them; read with the window)
    backend: str = "auto"  # of the decode-attention kernel (the store's, see format.Backend)

    @property
    def compressed_tokens(self) -> int:
        return self.keys.tokens

    @property
    def static(self) -> bool:
        return self.kv_len is not None


@dataclass
class StaticWindow:
    """A static store's exact tokens, [sinks | window | room for the tokens until the next compression], at
    fixed addresses, and the device-side counters a captured decode step reads and advances."""

    keys: torch.Tensor  # [B, KVH, sink + residual + block, D]
    values: torch.Tensor
    count: int  # exact tokens held (host copy of `pos`)
    pos: torch.Tensor  # int64 [1]: where the next token goes
    positions: torch.Tensor  # int64 [sink + residual + block]: 0, 1, 2, ...
    valid: torch.Tensor  # bool [1, sink + residual + block]: positions < pos
    kv_len: torch.Tensor  # int32 [B]: compressed tokens held
    kv_start: torch.Tensor  # int32 [B]: zeros (no padding)
    max_blocks: int  # the packed buffers' reserved capacity in blocks
    view: FusedKV | None = None
