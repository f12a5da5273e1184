"""A layer's compressed blocks: `BlockStorage` keeps them, compresses new ones into them, and reads them back.

Blocks are immutable `Block` records (keys and values, valid length). A fused storage keeps them in contiguous
packed buffers (`buffer.PackedKVBuffer`), each `Block` then a lazy view into them, so the decode-attention kernels
read the whole history in place. Rows of a block whose input was not finite (or that its codec could not compress
safely) are stored exact beside the buffers (`ExactRows`, one record per such block; their buffer rows are
cleared): the kernels skip those rows' blocks and attention reads them exactly (`kernels.layout.ExactBlocks`).
"""

from __future__ import annotations

from functools import partial

import torch

from dataclasses import replace

from .api import compress, compress_kv_deferred, with_exact_rows
from .blocks import Block, DecodedHistory, ExactRows, select_batch
from .buffer import PackedKVBuffer
from .compressed import CompressedKV
from .format import Backend
from .kernels.attention import dequantize
from .kernels.layout import ExactBlocks, PackedKV

# at most this many elements of K (and of V) are compressed in one call
COMPRESS_ELEMENTS = 1 << 26


class BlockStorage:
    """The blocks of one layer. fused: also in packed buffers (see the module docstring); backend: of every
    kernel they meet (`format.Backend`); keep_decoded: keep their decoded form between reads (`DecodedHistory`)."""

    def __init__(self, config, fused: bool, backend: Backend, keep_decoded: bool):
        self.config, self.backend, self.block_size = config, backend, config.block_size
        self.buffers = (PackedKVBuffer(), PackedKVBuffer()) if fused else None
        self.blocks: list[Block] = []
        self.exact: dict[int, ExactRows] = {}  # fused: block index -> its rows stored exact
        self.decoded = DecodedHistory() if keep_decoded else None
        self._like = None  # (keys, values) template of the buffered blocks' views
        self._exact_view = None  # ((capacity, records), ExactBlocks) last handed out

    @property
    def buffered(self) -> int:
        """Blocks held in the packed buffers (a prefix of `blocks`)."""
        return 0 if self.buffers is None else self.buffers[0].blocks

    @property
    def all_buffered(self) -> bool:
        """Blocks that the kernels read in place: fused, and none shortened by a crop; O(1), no sync."""
        return self.buffers is not None and bool(self.blocks) and self.blocks[-1].length == self.block_size

    def exact_blocks(self) -> ExactBlocks | None:
        """The rows stored exact, for the kernels (None without any); the skip mask spans the buffers' capacity."""
        if not self.exact:
            return None
        key = (self.buffers[0].ts.shape[2], tuple(self.exact))
        if self._exact_view is None or self._exact_view[0] != key:
            size, (b, h, _, d) = self.block_size, self.shape
            recs = sorted(self.exact.items())
            rec = recs[0][1]
            skip = torch.zeros(b, key[0], dtype=torch.int8, device=rec.mask.device)
            keys = rec.keys.new_zeros(b, h, len(recs) * size, d)
            values = keys.clone()
            for j, (i, r) in enumerate(recs):
                skip[r.mask, i] = 1
                keys[r.mask, :, j * size:(j + 1) * size] = r.keys
                values[r.mask, :, j * size:(j + 1) * size] = r.values
            positions = torch.cat([torch.arange(i * size, (i + 1) * size, dtype=torch.int32, device=skip.device)
                                   for i, _ in recs])
            self._exact_view = (key, ExactBlocks(skip, keys, values, positions))
        return self._exact_view[1]

    def packed(self, capacity: bool = False) -> tuple[PackedKV, PackedKV]:
        """The packed buffers' blocks (or their whole capacity, see `PackedKVBuffer.view`)."""
        return self.buffers[0].view(capacity), self.buffers[1].view(capacity)

    def history(self, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The blocks' keys and values, decoded, as parts to concatenate (none without blocks)."""
        if self.all_buffered:  # one dequantize kernel per buffer instead of one decode per block
            k, v = self.packed()
            k, v = dequantize(k, dtype, self.backend), dequantize(v, dtype, self.backend)
            size = self.block_size
            for i, r in self.exact.items():
                k[r.mask, :, i * size:(i + 1) * size] = r.keys.to(dtype)
                v[r.mask, :, i * size:(i + 1) * size] = r.values.to(dtype)
            return [k], [v]
        if self.decoded is not None and self.blocks:
            k, v = self.decoded.read(self.blocks)
            return [k], [v]
        decoded = [block.decode() for block in self.blocks]
        return [k for k, _ in decoded], [v for _, v in decoded]

    # ------------------------------------------------------------------ writes
    def compress(self, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Compress keys and values [B, H, n * block_size, D] into n new blocks; returns how many of them keep
        exact rows. Blocks due together (a prefill) are compressed a few at a time folded into the batch dim (at
        most COMPRESS_ELEMENTS each); every codec works per batch row, so this equals compressing them one by
        one."""
        size = self.block_size
        b, h, t, d = keys.shape
        n, per_call = t // size, max(1, COMPRESS_ELEMENTS // (b * h * size * d))  # bounds the transient memory
        exact = 0
        for first in range(0, n, per_call):
            m = min(per_call, n - first)
            span = slice(first * size, (first + m) * size)
            exact += self._add(_fold_blocks(keys[..., span, :], m), _fold_blocks(values[..., span, :], m), m, b)
        return exact

    def _add(self, ks: torch.Tensor, vs: torch.Tensor, n: int, b: int) -> int:
        """Compress n blocks folded into the batch dim ([n * b, H, S, D], block-major) and store them; returns
        how many keep exact rows. A fused storage queues the copies into its packed buffers before the one host
        sync (whether any row must stay exact), so the GPU has work while the host waits."""
        ck, cv, any_exact = compress_kv_deferred(ks, vs, self.config, self.backend)
        if self.buffers is None:
            exact = bool(any_exact)
            if exact:
                ck, cv = with_exact_rows(ck, ks), with_exact_rows(cv, vs)
            for i in range(n):
                rows = torch.arange(i * b, (i + 1) * b, device=ks.device)
                self.blocks.append(Block(ck if n == 1 else select_batch(ck, rows),
                                         cv if n == 1 else select_batch(cv, rows), self.block_size,
                                         _fallback_rows(ck, cv, i, b)))
            return sum(block.exact for block in self.blocks[-n:]) if exact else 0
        # the packed buffers take all n blocks at once; the blocks become views into them
        storage = [None if buf.codes is None else buf.codes.data_ptr() for buf in self.buffers]
        self.buffers[0].append(ck, n)
        self.buffers[1].append(cv, n)
        regrown = storage != [buf.codes.data_ptr() for buf in self.buffers]
        if self._like is None:  # one batch row: the template (shapes, metadata) of every buffered block's views
            first_row = torch.arange(1, device=ks.device)
            self._like = (select_batch(ck, first_row), select_batch(cv, first_row))
        first, kept = len(self.blocks), 0
        if bool(any_exact):
            mask = ck.exact_mask | cv.exact_mask
            kept = self._keep_exact(mask, ks, vs, first, n, b)
            ck, cv = (replace(c, fallback_mask=None if c.fallback_mask is None else c.fallback_mask & ~mask)
                      for c in (ck, cv))
        self.blocks += [Block(None, None, self.block_size, _fallback_rows(ck, cv, i, b)) for i in range(n)]
        # only a regrown buffer moves the older blocks; otherwise only the new ones need views (a decode
        # step that compresses a block stays O(1) in the number of blocks)
        self.repoint(0 if regrown else first)
        return kept

    def _keep_exact(self, mask: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, first: int, n: int, b: int) -> int:
        """Record the rows under mask [n * b] of the n blocks from `first` on exact (keys and values alike), and
        clear them in the packed buffers (the kernels skip them; cleared, nothing there is NaN)."""
        kept = 0
        for i, any_row in enumerate(mask.reshape(n, b).any(1).tolist()):
            if any_row:
                rows = mask[i * b:(i + 1) * b]
                at = torch.arange(i * b, (i + 1) * b, device=ks.device)[rows]
                self.exact[first + i] = ExactRows(rows, ks[at].clone(), vs[at].clone())
                for buf in self.buffers:
                    buf.clear_rows(first + i, rows)
                kept += 1
        return kept

    def reserve(self, blocks: int, like: torch.Tensor) -> None:
        """Capacity for `blocks` blocks in the packed buffers now (fixed addresses for a captured graph); empty
        buffers first get their format from one block of random data like `like` [B, H, *, D], then forget it."""
        if self.buffers[0].codes is None:
            b, h, _, d = like.shape
            gen = torch.Generator(device=like.device).manual_seed(0)
            x = torch.randn(b, h, self.block_size, d, generator=gen, device=like.device).to(like.dtype)
            for buf, kind in zip(self.buffers, ("key", "value")):
                buf.append(compress(x, self.config, kind, self.backend))
                buf.truncate(0)
        for buf in self.buffers:
            buf.reserve(blocks * self.block_size)
        self.repoint()  # blocks whose views were read still point into the old buffers (and keep them alive)

    def repoint(self, first: int = 0) -> None:
        """Make the buffered blocks from `first` on (lazy) views into the (possibly regrown) packed buffers."""
        for i in range(first, self.buffered):
            self.blocks[i].point(partial(self._views, i))

    def _views(self, i: int) -> tuple[CompressedKV, CompressedKV]:
        k, v = self.buffers[0].block(i, self._like[0]), self.buffers[1].block(i, self._like[1])
        r = self.exact.get(i)
        if r is not None:  # the rows stored exact (the buffer's are cleared)
            k = replace(k, exact_mask=r.mask, exact_values=r.keys)
            v = replace(v, exact_mask=r.mask, exact_values=r.values)
        return k, v

    # ------------------------------------------------------------------ edits
    def crop(self, drop: int) -> int:
        """Drop up to `drop` tokens from the end (blocks are shortened, never rewritten); returns how many."""
        self._exact_view = None
        if self.decoded is not None:
            self.decoded.reset()
        done = 0
        while done < drop and self.blocks:
            block = self.blocks[-1]
            n = min(drop - done, block.length)
            block.length -= n
            if block.length == 0:
                self.blocks.pop()
                self.exact.pop(len(self.blocks), None)
            done += n
        for buf in self.buffers or ():
            buf.truncate(len(self.blocks))
        return done

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep/reorder/repeat batch rows."""
        self._exact_view = None
        if self.decoded is not None:
            self.decoded.reset()
        n = self.buffered
        for buf in self.buffers or ():
            buf.select_batch(index)
        self.exact = {i: r for i, r in ((i, r.select(index)) for i, r in self.exact.items()) if r is not None}
        self.blocks = self.blocks[:n] + [b.select_batch(index) for b in self.blocks[n:]]
        if n:
            self.repoint()

    # ------------------------------------------------------------------ accounting
    @property
    def shape(self) -> torch.Size | None:
        """[B, H, block_size, D] of the blocks (None without blocks)."""
        return self.blocks[0].keys.shape if self.blocks else None

    def memory(self) -> dict[str, int]:
        """The blocks' share of `CompressedKVStore.memory()`."""
        n = self.buffered
        # buffered blocks are views: count the buffers' whole allocation (spare capacity included)
        nbytes = sum(b.keys.nbytes + b.values.nbytes for b in self.blocks[n:])
        if n:  # the buffers, and each block's exact-row masks (one byte per row, keys and values) and records
            nbytes += (sum(buf.nbytes for buf in self.buffers) + 2 * n * self.shape[0]
                       + sum(r.keys.nbytes + r.values.nbytes for r in self.exact.values()))
        return {"compressed_blocks": nbytes,
                "compressed_elements": sum(b.keys.numel + b.values.numel for b in self.blocks),
                "fallback_blocks": sum(b.fallback for b in self.blocks),
                "exact_blocks": len(self.exact) + sum(b.exact for b in self.blocks[n:]),
                "compressed_tokens": sum(b.length for b in self.blocks),
                "decoded_copy": 0 if self.decoded is None else self.decoded.nbytes}


def _fallback_rows(ck: CompressedKV, cv: CompressedKV, i: int, b: int) -> tuple:
    """Block i's record of the keys' and values' fallback masks: (masks, its rows), no tensor work."""
    return ck.fallback_mask, cv.fallback_mask, slice(i * b, (i + 1) * b)


def _fold_blocks(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, H, n * S, D] -> [n * B, H, S, D], block-major (rows i*B .. i*B + B - 1 are block i): a strided view
    for one sequence (the compression kernels read it in place), a copy otherwise."""
    b, h, t, d = x.shape
    return x.reshape(b, h, n, t // n, d).permute(2, 0, 1, 3, 4).reshape(n * b, h, t // n, d)
