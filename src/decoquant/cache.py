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
(a prefill attends over its own tokens exactly, as in generation). With `overlap=True` the blocks a
prefill fills are compressed later (`launch()`, then `settle()`), off the critical path (see `streams`).
The parts: the blocks live in a `storage.BlockStorage`, the CUDA-graph decoding mode (`make_static`,
`advance`) is a `static_store.StaticMode`; the store owns the exact tokens and the order of things.
"""

from __future__ import annotations

import torch

from . import streams
from .blocks import FusedKV
from .config import DecoQuantConfig
from .format import Backend, KVFormat
from .static_store import StaticMode
from .storage import BlockStorage


def exact_capacity(config: DecoQuantConfig) -> int:
    """`spec.Streaming.exact_capacity` of the config."""
    return config.streaming.exact_capacity


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class CompressedKVStore:
    """Streaming compressed KV for one attention layer. Tensors are [batch, kv_heads, tokens, head_dim].

    fused: keep the blocks in contiguous packed buffers (each Block's tensors are views into them)
    and answer single-token steps with a `FusedKV` for the fused attention kernel instead of
    decoding the history. Needs a config whose blocks the fused kernels read (`format.KVFormat.fused`);
    steps that cannot be served that way (several new tokens, a cropped block) fall back to decoding; rows
    stored exact are read exactly beside the kernel (see `storage`). backend: of every kernel the store's
    blocks meet, compression, dequantization and fused attention ("auto": Triton on CUDA where it reads the
    format, see `format.Backend`; "torch": the pure-torch reference everywhere).
    keep_decoded: keep the blocks' decoded form between steps (`DecodedHistory`: each block is decoded once,
    at the price of holding the history in full precision too; for evaluating long texts on the CPU).
    """

    def __init__(self, config: DecoQuantConfig, fused: bool = False, backend: str = "auto",
                 keep_decoded: bool = False):
        backend = Backend.parse(backend)
        if keep_decoded not in (True, False):
            raise ValueError(f"keep_decoded={keep_decoded!r} is not supported; allowed values: True, False")
        if config.method == "decoquant" and config.layout == "channel":  # refused here, not at the first block
            raise ValueError("layout='channel' stores a tokens x rank fp16 tensor and saves no memory: it is "
                             "supported by decoquant.fake_quantize only; a cache needs layout='group'")
        if fused:
            KVFormat.of(config).require_fused("fused attention")
        self.config = config
        self.stream = config.streaming  # block_size, residual_length, sink_tokens
        self.fused = fused
        self.backend = backend
        self.storage = BlockStorage(config, fused, backend, keep_decoded)
        self.sink_keys = self.sink_values = None
        self.window_keys = self.window_values = None
        self.length = 0
        self.dtype = None  # of the keys and values appended
        self.exact_prefix = self.stream.sink_tokens  # sinks, plus a padded batch's leading pads (set_padding)
        self._static: StaticMode | None = None
        self._pending = False
        self._event = None  # of a pending compression: the main stream's work it waits for
        self._job = None  # the pending compression, once launched

    @property
    def blocks(self) -> list:
        return self.storage.blocks

    # ------------------------------------------------------------------ update
    def append(self, keys: torch.Tensor, values: torch.Tensor, overlap: bool = False):
        """Add new tokens; return (all keys, all values) for attention, or (FusedKV, FusedKV) for a
        single-token step of a fused store.

        overlap: leave the compression of the blocks that several new tokens fill (a prefill) to `launch()`
        (on CUDA: a worker thread and a side stream, after this call's work) and `settle()` (waits for it):
        a caller that launches layer l's compression and goes on with layer l+1 keeps the GPU busy through
        compression's host syncs. The store settles itself before anything else reads or changes it."""
        self.settle()
        self._check(keys, values)
        self.dtype = keys.dtype
        if self._static is not None:
            return self._static.append(keys, values)
        if keys.shape[-2] == 1 and self.window_keys is not None and self.storage.all_buffered:
            return self._fused_step(keys, values)
        parts_k, parts_v = self.storage.history(keys.dtype)
        if self.sink_keys is not None:
            parts_k.insert(0, self.sink_keys)
            parts_v.insert(0, self.sink_values)
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
        # (only several new tokens overlap: `out` is then fresh memory of this stream, never the side stream's)
        if overlap and keys.shape[-2] > 1 and self._due():
            self._pending, self._event = True, streams.mark(keys.device)
        else:
            self._flush()
        return out

    def _fused_step(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[FusedKV, FusedKV]:
        """One token of a store whose blocks all sit in the packed buffers: the packed blocks and the exact
        tokens, for the fused kernel (no decoding)."""
        self.window_keys = _cat(self.window_keys, keys)
        self.window_values = _cat(self.window_values, values)
        self.length += keys.shape[-2]
        exact_k, exact_v, sinks = self.window_keys, self.window_values, 0
        if self.sink_keys is not None:
            exact_k, exact_v = torch.cat([self.sink_keys, exact_k], -2), torch.cat([self.sink_values, exact_v], -2)
            sinks = self.sink_keys.shape[-2]
        view = FusedKV(*self.storage.packed(), exact_k, exact_v, sinks, exact=self.storage.exact_blocks(),
                       backend=self.backend)
        self._flush()
        return view, view

    @property
    def pending(self) -> bool:
        """Whether an overlapped append left blocks to compress (done at `settle()`)."""
        return self._pending

    def launch(self) -> None:
        """Start compressing what an overlapped `append` left (see `streams.launch`); `settle()` waits for it."""
        if self._pending and self._job is None:
            reads = (self.window_keys, self.window_values) + sum((b.tensors for b in self.storage.buffers or ()), ())
            self._job = streams.launch(self._flush, self._event, self.window_keys.device, reads)

    def settle(self) -> None:
        """Finish the compression an overlapped `append` left."""
        if not self._pending:
            return
        self.launch()
        job, self._job, self._event = self._job, None, None
        try:
            job.wait()
        finally:
            self._pending = False

    def _due(self) -> int:
        """Full blocks of the window to compress (past the `residual_length` newest tokens)."""
        if self.window_keys is None:
            return 0
        return max(0, (self.window_keys.shape[-2] - self.stream.residual_length) // self.stream.block_size)

    def _flush(self) -> None:
        """Compress the oldest full blocks of the window, keeping `residual_length` tokens exact."""
        cut = self._due() * self.stream.block_size
        if cut == 0:
            return
        self.storage.compress(self.window_keys[..., :cut, :], self.window_values[..., :cut, :])
        self.window_keys = self.window_keys[..., cut:, :].contiguous()
        self.window_values = self.window_values[..., cut:, :].contiguous()

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
        for t in (self.window_keys, self.sink_keys, self._static and self._static.window.keys):
            if t is not None:
                return t
        shape = self.storage.shape
        return None if shape is None else torch.empty(shape, device="meta")

    # ------------------------------------------------------------------ static (CUDA-graph) decoding
    @property
    def is_static(self) -> bool:
        return self._static is not None

    def make_static(self, steps: int) -> None:
        """Serve the next `steps` single-token steps from fixed addresses (`static_store.StaticMode`): `append`
        then does only device work (writes the token, advances device counters), so a decode step can be
        captured in a CUDA graph and replayed. After every step call `advance()` (host bookkeeping; compresses
        a block every `block_size` steps, outside the graph)."""
        self.settle()
        if not self.fused:
            raise ValueError("static decoding needs a fused store (DecoQuantCache(..., fused=True) with a "
                             "fused-compatible config)")
        if self._static is not None:
            raise ValueError("the store is static already")
        if self.window_keys is None or (self.blocks and not self.storage.all_buffered):
            raise ValueError("static decoding needs a prefill longer than sink_tokens and blocks that the "
                             "kernels read in place (no crop)")
        sinks = None if self.sink_keys is None else (self.sink_keys, self.sink_values)
        self._static = StaticMode(self.storage, sinks, (self.window_keys, self.window_values), steps)
        self.window_keys = self.window_values = self.sink_keys = self.sink_values = None

    def advance(self) -> bool:
        """Host bookkeeping after one static step (outside any graph), see `StaticMode.advance`. Returns False if
        the store had to leave static mode (a block that cannot be compressed safely keeps exact rows, which
        the static view's fixed tensors cannot take in); decoding then goes on through `append` as usual."""
        if self._static is None:
            raise ValueError("advance() follows a step of a static store; call make_static first")
        self.length += 1
        if self._static.advance():
            return True
        self._leave_static(drop=self.stream.block_size)
        return False

    def leave_static(self) -> None:
        """Back to the ordinary (dynamic) store, same tokens (and any pending compression done)."""
        self.settle()
        if self._static is not None:
            self._leave_static()

    def _leave_static(self, drop: int = 0) -> None:
        self.sink_keys, self.sink_values, self.window_keys, self.window_values = self._static.exit(drop)
        self._static = None

    # ------------------------------------------------------------------ edits
    def crop(self, num_tokens: int) -> None:
        """Drop the last `num_tokens` tokens (blocks are shortened, never rewritten)."""
        self.leave_static()
        drop = min(num_tokens, self.length)
        self.length -= drop
        if self.window_keys is not None and self.window_keys.shape[-2] > 0:
            n = min(drop, self.window_keys.shape[-2])
            keep = self.window_keys.shape[-2] - n
            self.window_keys, self.window_values = self.window_keys[..., :keep, :], self.window_values[..., :keep, :]
            drop -= n
        drop -= self.storage.crop(drop)
        if drop > 0:
            keep = self.sink_keys.shape[-2] - drop
            self.sink_keys, self.sink_values = self.sink_keys[..., :keep, :], self.sink_values[..., :keep, :]

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep/reorder/repeat batch rows (beam search, batch selection)."""
        self.leave_static()
        take = lambda t: None if t is None else t.index_select(0, index.to(t.device))  # noqa: E731
        self.sink_keys, self.sink_values = take(self.sink_keys), take(self.sink_values)
        self.window_keys, self.window_values = take(self.window_keys), take(self.window_values)
        self.storage.select_batch(index)

    # ------------------------------------------------------------------ accounting
    def memory(self) -> dict[str, int]:
        """Bytes held, by part, and the fp16 bytes the same tokens would take."""
        self.settle()
        blocks = self.storage.memory()
        exact_parts = (self.sink_keys, self.sink_values, self.window_keys, self.window_values)
        if self._static is not None:  # the exact tokens' fixed buffers, room for the coming tokens included
            exact_parts = self._static.exact_parts()
        exact = sum(_nbytes(t) for t in exact_parts)
        ref = self._reference()
        per_token = 0 if ref is None else 2 * ref.shape[0] * ref.shape[1] * ref.shape[3]  # elements of K and V
        itemsize = 0 if self.dtype is None else torch.empty((), dtype=self.dtype).element_size()
        return {**blocks, "exact_tokens": exact, "total": blocks["compressed_blocks"] + exact,
                "exact_elements": sum(0 if t is None else t.numel() for t in exact_parts),
                "sink_elements": sum(0 if t is None else t.numel() for t in exact_parts[:2]),
                "fp16_equivalent": 2 * per_token * self.length, "dynamic_cache": itemsize * per_token * self.length,
                "tokens": self.length}


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=-2)
