"""The only stateful part: one layer's streaming compressed KV store (no transformers here).

Token order inside a store: [sinks | block_0 | block_1 | ... | window].
- sinks: the first `sink_tokens` tokens, kept exact;
- blocks: immutable `CompressedKV` pairs of `block_size` tokens each (a crop may shorten the last
  one's valid length, never rewrite it);
- window: the most recent tokens in full precision. When it holds `residual_length + block_size`
  tokens, its oldest `block_size` tokens are compressed into a new block. History is never
  re-quantized.

`append` returns the keys/values attention needs for the current step: the sinks, the decoded
blocks that existed before this step, and every token of the window plus the new tokens exact
(a prefill attends over its own tokens exactly, as in generation). With `defer=True` the blocks a
prefill fills are compressed later (`launch()`, then `settle()`), off the critical path (see `streams`).
The CUDA-graph decoding mode (`make_static`, `advance`) lives in `static_store`.
"""

from __future__ import annotations

from functools import partial

import torch

from .api import compress_kv_deferred, with_exact_rows
from .blocks import Block, DecodedHistory, FusedKV, StaticWindow, select_batch
from .compressed import CompressedKV
from .config import DecoQuantConfig
from .format import Backend, KVFormat
from .kernels.attention import dequantize
from . import streams
from .static_store import StaticDecoding
from .storage import PackedKVBuffer


# at most this many elements of K (and of V) are compressed in one call
COMPRESS_ELEMENTS = 1 << 26


def exact_capacity(config: DecoQuantConfig) -> int:
    """The most tokens a fresh, unpadded store holds before its first block is compressed (everything it
    answers attention with up to then is exact): the sinks, the window and one token short of a block."""
    return config.sink_tokens + config.residual_length + config.block_size - 1


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class CompressedKVStore(StaticDecoding):
    """Streaming compressed KV for one attention layer. Tensors are [batch, kv_heads, tokens, head_dim].

    fused: keep the blocks in contiguous packed buffers (each Block's tensors are views into them)
    and answer single-token steps with a `FusedKV` for the fused attention kernel instead of
    decoding the history. Needs a config whose blocks the fused kernels read (`format.KVFormat.fused`);
    steps that cannot be served that way (several new tokens, a cropped or exact-row block) fall back to
    decoding. backend: of every kernel the store's blocks meet, compression, dequantization and fused
    attention ("auto": Triton on CUDA where it reads the format, see `format.Backend`; "torch": the pure-torch
    reference everywhere).
    keep_decoded: keep the blocks' decoded form between steps (`DecodedHistory`: each block is decoded once,
    at the price of holding the history in full precision too; for evaluating long texts on the CPU).
    """

    def __init__(self, config: DecoQuantConfig, fused: bool = False, backend: str = "auto",
                 keep_decoded: bool = False):
        backend = Backend.parse(backend)
        if keep_decoded not in (True, False):
            raise ValueError(f"keep_decoded={keep_decoded!r} is not supported; allowed values: True, False")
        if fused:
            KVFormat.of(config).require_fused("fused attention")
        self.config = config
        self.fused = fused
        self.backend = backend
        self.buffers = (PackedKVBuffer(), PackedKVBuffer()) if fused else None
        self.blocks: list[Block] = []
        self.decoded = DecodedHistory() if keep_decoded else None
        self._like = None  # (keys, values) template of the buffered blocks' views
        self.sink_keys = self.sink_values = None
        self.window_keys = self.window_values = None
        self.length = 0
        self.dtype = None  # of the keys and values appended
        self.exact_prefix = config.sink_tokens  # sinks, plus a padded batch's leading pads (set_padding)
        self._static: StaticWindow | None = None
        self._deferred = False
        self._event = None  # of a deferred compression: the main stream's work it waits for
        self._job = None  # the deferred compression, once launched

    # ------------------------------------------------------------------ update
    def append(self, keys: torch.Tensor, values: torch.Tensor, defer: bool = False):
        """Add new tokens; return (all keys, all values) for attention, or (FusedKV, FusedKV) for a
        single-token step of a fused store.

        defer: leave the compression of the blocks that several new tokens fill (a prefill) to `launch()`
        (on CUDA: a worker thread and a side stream, after this call's work) and `settle()` (waits for it):
        a caller that launches layer l's compression and goes on with layer l+1 keeps the GPU busy through
        compression's host syncs. The store settles itself before anything else reads or changes it."""
        self.settle()
        self._check(keys, values)
        self.dtype = keys.dtype
        if self._static is not None:
            return self._static_append(keys, values)
        if self._can_fuse(keys):
            self.window_keys = _cat(self.window_keys, keys)
            self.window_values = _cat(self.window_values, values)
            self.length += keys.shape[-2]
            exact_k, exact_v, sinks = self.window_keys, self.window_values, 0
            if self.sink_keys is not None:
                exact_k, exact_v = torch.cat([self.sink_keys, exact_k], -2), torch.cat([self.sink_values, exact_v], -2)
                sinks = self.sink_keys.shape[-2]
            view = FusedKV(self.buffers[0].view(), self.buffers[1].view(), exact_k, exact_v, sinks,
                           backend=self.backend)
            self._flush()
            return view, view
        parts_k, parts_v = [], []
        if self.sink_keys is not None:
            parts_k.append(self.sink_keys)
            parts_v.append(self.sink_values)
        if self._all_buffered():  # one dequantize kernel per buffer instead of one decode per block
            parts_k.append(dequantize(self.buffers[0].view(), keys.dtype, self.backend))
            parts_v.append(dequantize(self.buffers[1].view(), values.dtype, self.backend))
        elif self.decoded is not None and self.blocks:
            k, v = self.decoded.read(self.blocks)
            parts_k.append(k)
            parts_v.append(v)
        else:
            for block in self.blocks:
                k, v = block.decode()
                parts_k.append(k)
                parts_v.append(v)
        # sinks first fill up, the rest goes to the window
        room = self.exact_prefix - (0 if self.sink_keys is None else self.sink_keys.shape[-2])
        if room > 0 and not self.blocks and self.window_keys is None:
            take = min(room, keys.shape[-2])
            # copies: a view would pin the whole incoming chunk (a prefill) for the sequence's lifetime
            self.sink_keys = _cat(self.sink_keys, keys[..., :take, :].clone())
            self.sink_values = _cat(self.sink_values, values[..., :take, :].clone())
            keys, values = keys[..., take:, :], values[..., take:, :]
            parts_k.append(self.sink_keys[..., -take:, :])
            parts_v.append(self.sink_values[..., -take:, :])
        if keys.shape[-2]:
            self.window_keys = _cat(self.window_keys, keys)
            self.window_values = _cat(self.window_values, values)
        if self.window_keys is not None:
            parts_k.append(self.window_keys)
            parts_v.append(self.window_values)
        # one part (a first prefill without sinks): no copy
        out = (parts_k[0], parts_v[0]) if len(parts_k) == 1 else (torch.cat(parts_k, -2), torch.cat(parts_v, -2))
        self.length = out[0].shape[-2]
        # (only several new tokens defer: `out` is then fresh memory of this stream, never the side stream's)
        if defer and keys.shape[-2] > 1 and self._due():
            self._deferred, self._event = True, streams.mark(keys.device)
        else:
            self._flush()
        return out

    @property
    def deferred(self) -> bool:
        """Whether a deferred append left blocks to compress (done at `settle()`)."""
        return self._deferred

    def launch(self) -> None:
        """Start compressing what a deferred `append` left (see `streams.launch`); `settle()` waits for it."""
        if self._deferred and self._job is None:
            reads = (self.window_keys, self.window_values) + sum((b.tensors for b in self.buffers or ()), ())
            self._job = streams.launch(self._flush, self._event, self.window_keys.device, reads)

    def settle(self) -> None:
        """Finish the compression a deferred `append` left."""
        if not self._deferred:
            return
        self.launch()
        job, self._job, self._event = self._job, None, None
        try:
            job.wait()
        finally:
            self._deferred = False

    def _all_buffered(self) -> bool:
        # every block in the packed buffers (no exact rows) and none shortened by a crop; O(1), no sync
        return (self.fused and bool(self.blocks) and self.buffers[0].blocks == len(self.blocks)
                and self.blocks[-1].length == self.config.block_size)

    def _can_fuse(self, keys: torch.Tensor) -> bool:
        return keys.shape[-2] == 1 and self.window_keys is not None and self._all_buffered()

    def _due(self) -> int:
        """Full blocks of the window to compress (past the `residual_length` newest tokens)."""
        if self.window_keys is None:
            return 0
        return max(0, (self.window_keys.shape[-2] - self.config.residual_length) // self.config.block_size)

    def _flush(self) -> None:
        """Compress the oldest full blocks of the window, keeping `residual_length` tokens exact.
        Blocks due together (a prefill) are compressed a few at a time folded into the batch dim
        (at most COMPRESS_ELEMENTS each); every codec works per batch row, so this equals
        compressing them one by one. A fused store keeps blocks with exact rows out of its buffers
        (and from then on decodes instead)."""
        cfg, n = self.config, self._due()
        if n == 0:
            return
        cut = n * cfg.block_size
        b, h, _, d = self.window_keys.shape
        per_call = max(1, COMPRESS_ELEMENTS // (b * h * cfg.block_size * d))  # bounds the transient memory
        for first in range(0, n, per_call):
            m = min(per_call, n - first)
            span = slice(first * cfg.block_size, (first + m) * cfg.block_size)
            self._compress_blocks(_fold_blocks(self.window_keys[..., span, :], m),
                                  _fold_blocks(self.window_values[..., span, :], m), m, b)
        self.window_keys = self.window_keys[..., cut:, :].contiguous()
        self.window_values = self.window_values[..., cut:, :].contiguous()

    def _compress_blocks(self, ks: torch.Tensor, vs: torch.Tensor, n: int, b: int) -> None:
        """Compress n blocks folded into the batch dim ([n * b, H, S, D]) and store them. A fused store queues
        the copies into its packed buffers before the one host sync (whether any row must stay exact), so the
        GPU has work while the host waits; in the rare case it must, the appends are undone."""
        cfg = self.config
        ck, cv, any_exact = compress_kv_deferred(ks, vs, cfg, self.backend)
        # (blocks that come with their exact rows, off the kernel route, have them: never into the buffers)
        buffered = (self.fused and len(self.blocks) == self.buffers[0].blocks and ck.exact_values is None
                    and cv.exact_values is None)
        if buffered:  # the packed buffers take all n blocks at once; the blocks become views into them
            storage = [None if buf.codes is None else buf.codes.data_ptr() for buf in self.buffers]
            self.buffers[0].append(ck, n)
            self.buffers[1].append(cv, n)
            regrown = storage != [buf.codes.data_ptr() for buf in self.buffers]
        if buffered and not bool(any_exact):
            if self._like is None:  # one batch row: the template (shapes, metadata) of every buffered block's views
                first = torch.arange(1, device=ks.device)
                self._like = (select_batch(ck, first), select_batch(cv, first))
            self.blocks += [Block(None, None, cfg.block_size, _fallback_rows(ck, cv, i, b)) for i in range(n)]
            # only a regrown buffer moves the older blocks; otherwise only the new ones need views (a decode
            # step that compresses a block stays O(1) in the number of blocks)
            self._repoint(0 if regrown else len(self.blocks) - n)
            return
        if buffered:  # rows to keep exact: the blocks stay out of the packed buffers (the store decodes from now)
            for buf in self.buffers:
                buf.truncate(len(self.blocks))
            if regrown:
                self._repoint()
        ck, cv = with_exact_rows(ck, ks), with_exact_rows(cv, vs)
        for i in range(n):
            rows = torch.arange(i * b, (i + 1) * b, device=ks.device)
            self.blocks.append(Block(ck if n == 1 else select_batch(ck, rows),
                                     cv if n == 1 else select_batch(cv, rows), cfg.block_size,
                                     _fallback_rows(ck, cv, i, b)))

    def _check(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if keys.dim() != 4 or values.shape != keys.shape:
            raise ValueError(f"keys and values must both be [batch, kv_heads, tokens, head_dim], got "
                             f"{tuple(keys.shape)} and {tuple(values.shape)}")
        ref = self._reference()
        if ref is not None and ref.shape[:2] + ref.shape[3:] != keys.shape[:2] + keys.shape[3:]:
            raise ValueError(
                f"inconsistent shapes: the cache holds batch={ref.shape[0]}, kv_heads={ref.shape[1]}, "
                f"head_dim={ref.shape[3]} but got {tuple(keys.shape)}; reset the cache for a new batch")

    @property
    def kv_heads(self) -> int | None:
        ref = self._reference()
        return None if ref is None else ref.shape[1]

    def _reference(self) -> torch.Tensor | None:
        for t in (self.window_keys, self.sink_keys, self._static and self._static.keys):
            if t is not None:
                return t
        if self.blocks:
            shape = self.blocks[0].keys.shape
            return torch.empty(shape, device="meta")
        return None

    def _repoint(self, first: int = 0) -> None:
        """Make the buffered blocks from `first` on (lazy) views into the (possibly regrown) packed buffers."""
        for i in range(first, self.buffers[0].blocks):
            self.blocks[i].point(partial(self._views, i))

    def _views(self, i: int) -> tuple[CompressedKV, CompressedKV]:
        return self.buffers[0].block(i, self._like[0]), self.buffers[1].block(i, self._like[1])

    # ------------------------------------------------------------------ edits
    def crop(self, num_tokens: int) -> None:
        """Drop the last `num_tokens` tokens (blocks are shortened, never rewritten)."""
        self.leave_static()
        if self.decoded is not None:
            self.decoded.reset()
        drop = min(num_tokens, self.length)
        self.length -= drop
        while drop > 0:
            if self.window_keys is not None and self.window_keys.shape[-2] > 0:
                n = min(drop, self.window_keys.shape[-2])
                keep = self.window_keys.shape[-2] - n
                self.window_keys = self.window_keys[..., :keep, :]
                self.window_values = self.window_values[..., :keep, :]
                drop -= n
            elif self.blocks:
                block = self.blocks[-1]
                n = min(drop, block.length)
                block.length -= n
                if block.length == 0:
                    self.blocks.pop()
                drop -= n
            else:
                keep = self.sink_keys.shape[-2] - drop
                self.sink_keys, self.sink_values = self.sink_keys[..., :keep, :], self.sink_values[..., :keep, :]
                drop = 0
        for buf in self.buffers or ():
            buf.truncate(len(self.blocks))

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep/reorder/repeat batch rows (beam search, batch selection)."""
        self.leave_static()
        if self.decoded is not None:
            self.decoded.reset()
        take = lambda t: None if t is None else t.index_select(0, index.to(t.device))  # noqa: E731
        self.sink_keys, self.sink_values = take(self.sink_keys), take(self.sink_values)
        self.window_keys, self.window_values = take(self.window_keys), take(self.window_values)
        n = 0 if self.buffers is None else self.buffers[0].blocks
        for buf in self.buffers or ():
            buf.select_batch(index)
        self.blocks = self.blocks[:n] + [b.select_batch(index) for b in self.blocks[n:]]
        if n:
            self._repoint()

    # ------------------------------------------------------------------ accounting
    def memory(self) -> dict[str, int]:
        """Bytes held, by part, and the fp16 bytes the same tokens would take."""
        self.settle()
        n = 0 if self.buffers is None else self.buffers[0].blocks
        # buffered blocks are views: count the buffers' whole allocation (spare capacity included)
        blocks = sum(b.keys.nbytes + b.values.nbytes for b in self.blocks[n:])
        if n:
            blocks += sum(buf.nbytes for buf in self.buffers) + sum(
                b.keys.exact_mask.numel() + b.values.exact_mask.numel() for b in self.blocks[:n])
        exact_parts = (self.sink_keys, self.sink_values, self.window_keys, self.window_values)
        if self._static is not None:  # the exact tokens' fixed buffers, room for the coming tokens included
            st, s = self._static, self._static.view.sink_tokens
            exact_parts = (st.keys[:, :, :s], st.values[:, :, :s], st.keys[:, :, s:], st.values[:, :, s:])
        exact = sum(_nbytes(t) for t in exact_parts)
        ref = self._reference()
        per_token = 0 if ref is None else 2 * ref.shape[0] * ref.shape[1] * ref.shape[3]  # elements of K and V
        itemsize = 0 if self.dtype is None else torch.empty((), dtype=self.dtype).element_size()
        return {"compressed_blocks": blocks, "exact_tokens": exact, "total": blocks + exact,
                "exact_elements": sum(0 if t is None else t.numel() for t in exact_parts),
                "sink_elements": sum(0 if t is None else t.numel() for t in exact_parts[:2]),
                "compressed_elements": sum(b.keys.numel + b.values.numel for b in self.blocks),
                "fp16_equivalent": 2 * per_token * self.length, "dynamic_cache": itemsize * per_token * self.length,
                "tokens": self.length, "fallback_blocks": sum(b.fallback for b in self.blocks),
                "exact_blocks": sum(b.exact for b in self.blocks),
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


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=-2)
