"""`StaticMode`: a store serving single-token decode steps from fixed addresses (CUDA-graph decoding).

The store hands its exact tokens to a `StaticMode` (`CompressedKVStore.make_static`): they move into one
buffer with room up to the next compression, and the packed buffers get the capacity the coming steps fill.
`append` then only writes device memory (capturable), and `advance` does the host bookkeeping between steps.
"""

from __future__ import annotations

import torch

from .blocks import FusedKV, StaticWindow
from .storage import BlockStorage


class StaticMode:
    """The exact tokens [sinks | window | room] at fixed addresses over a fused `BlockStorage` whose packed
    buffers have room for `steps` more single-token steps."""

    def __init__(self, storage: BlockStorage, sinks: tuple | None, window: tuple, steps: int):
        stream = storage.config.streaming
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.storage = storage
        b, h, w, d = window[0].shape
        # blocks the steps will add: the window compresses a block whenever it reaches residual + block tokens
        blocks = storage.buffered + max(0, (w + steps - stream.residual_length) // stream.block_size)
        storage.reserve(blocks, window[0])
        s = 0 if sinks is None else sinks[0].shape[-2]
        room = s + stream.residual_length + stream.block_size
        exact = []
        for i in (0, 1):
            t = window[0].new_zeros(b, h, room, d)
            t[:, :, :s + w] = window[i] if sinks is None else torch.cat([sinks[i], window[i]], -2)
            exact.append(t)
        dev = window[0].device
        positions = torch.arange(room, device=dev)
        pos = torch.full((1,), s + w, dtype=torch.int64, device=dev)
        st = StaticWindow(exact[0], exact[1], s + w, pos, positions, (positions < pos)[None],
                          torch.full((b,), storage.buffers[0].tokens, dtype=torch.int32, device=dev),
                          torch.zeros(b, dtype=torch.int32, device=dev), blocks)
        k, v = storage.packed(capacity=True)
        st.view = FusedKV(k, v, st.keys, st.values, s, kv_start=st.kv_start, kv_len=st.kv_len,
                          window_valid=st.valid.expand(b, room), exact=storage.exact_blocks(), backend=storage.backend)
        self.window = st

    @property
    def sink_tokens(self) -> int:
        return self.window.view.sink_tokens

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[FusedKV, FusedKV]:
        """Device work only (capturable): write the token at `pos`, advance `pos` and the window's validity."""
        st = self.window
        if keys.shape[-2] != 1:
            raise ValueError(f"a static store takes one token per step, got {keys.shape[-2]}; call "
                             "leave_static() first")
        st.keys.index_copy_(2, st.pos, keys)
        st.values.index_copy_(2, st.pos, values)
        st.pos.add_(1)
        torch.lt(st.positions, st.pos, out=st.valid[0])
        return st.view, st.view

    def advance(self) -> bool:
        """Host bookkeeping after one step: count the token and, when the window is full, compress its oldest
        block into the reserved buffers and shift the window down. False: that block kept exact rows, which
        the static view's fixed tensors cannot take in (the caller leaves static mode with `exit(drop=block_size)`)."""
        st, storage = self.window, self.storage
        stream, sinks = storage.config.streaming, self.sink_tokens
        st.count += 1
        if st.count - sinks < stream.residual_length + stream.block_size:
            return True
        if storage.buffered >= st.max_blocks:
            raise RuntimeError(f"the static store was made for {st.max_blocks} blocks and is full; call "
                               "make_static with more steps")
        cut, end = sinks + stream.block_size, st.count
        if storage.compress(st.keys[:, :, sinks:cut].contiguous(), st.values[:, :, sinks:cut].contiguous()):
            return False  # the block kept exact rows, which this view's fixed tensors do not hold
        for t in (st.keys, st.values):  # the window moves down over the compressed block (same addresses)
            t[:, :, sinks:end - stream.block_size] = t[:, :, cut:end].clone()
        st.count -= stream.block_size
        st.pos.fill_(st.count)
        torch.lt(st.positions, st.pos, out=st.valid[0])
        st.kv_len.fill_(storage.buffers[0].tokens)
        return True

    def exit(self, drop: int = 0) -> tuple:
        """The exact tokens back as (sink keys, sink values, window keys, window values), copies; the window
        without its first `drop` tokens (a block just compressed)."""
        st, s = self.window, self.sink_tokens
        sinks = (st.keys[:, :, :s].clone(), st.values[:, :, :s].clone()) if s else (None, None)
        return (*sinks, st.keys[:, :, s + drop:st.count].clone(), st.values[:, :, s + drop:st.count].clone())

    def exact_parts(self) -> tuple:
        """The exact tokens' fixed buffers, room for the coming tokens included: (sink k, sink v, window k,
        window v)."""
        st, s = self.window, self.sink_tokens
        return st.keys[:, :, :s], st.values[:, :, :s], st.keys[:, :, s:], st.values[:, :, s:]
