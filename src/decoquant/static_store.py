"""The CUDA-graph part of `cache.CompressedKVStore`: serving single-token decode steps from fixed addresses.

A mixin over the store's state (its packed buffers, window and blocks); `make_static` moves the store into
that mode, `append` then only writes device memory (capturable), and `advance` does the host bookkeeping
between steps.
"""

from __future__ import annotations

import torch

from .api import compress
from .blocks import FusedKV, StaticWindow


class StaticDecoding:
    """Mixed into `CompressedKVStore` (uses its `buffers`, `blocks`, window, `_static`, `_compress_blocks`)."""

    @property
    def is_static(self) -> bool:
        return self._static is not None

    def make_static(self, steps: int) -> None:
        """Serve the next `steps` single-token steps from fixed addresses: the packed buffers get the capacity
        those steps will fill, the exact tokens move into one buffer with room up to the next compression, and
        `append` then does only device work (writes the token, advances device counters), so a decode step
        can be captured in a CUDA graph and replayed. After every step call `advance()` (host bookkeeping;
        compresses a block every `block_size` steps, outside the graph)."""
        self.settle()
        cfg = self.config
        if not self.fused:
            raise ValueError("static decoding needs a fused store (DecoQuantCache(..., fused=True) with a "
                             "fused-compatible config)")
        if self._static is not None:
            raise ValueError("the store is static already")
        if self.window_keys is None or (self.blocks and not self._all_buffered()):
            raise ValueError("static decoding needs a prefill longer than sink_tokens whose blocks all sit in "
                             "the packed buffers (no exact rows, no crop)")
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        b, h, w, d = self.window_keys.shape
        if self.buffers[0].codes is None:
            self._format_buffers(b, h, d)
        # blocks the steps will add: the window compresses a block whenever it reaches residual + block tokens
        blocks = self.buffers[0].blocks + max(0, (w + steps - cfg.residual_length) // cfg.block_size)
        for buf in self.buffers:
            buf.reserve(blocks * cfg.block_size)
        self._repoint()  # blocks whose views were read still point into the old buffers (and keep them alive)
        sinks = 0 if self.sink_keys is None else self.sink_keys.shape[-2]
        room = sinks + cfg.residual_length + cfg.block_size
        exact = []
        for parts in ((self.sink_keys, self.window_keys), (self.sink_values, self.window_values)):
            t = self.window_keys.new_zeros(b, h, room, d)
            t[:, :, :sinks + w] = torch.cat([p for p in parts if p is not None], -2)
            exact.append(t)
        dev = self.window_keys.device
        positions = torch.arange(room, device=dev)
        pos = torch.full((1,), sinks + w, dtype=torch.int64, device=dev)
        st = StaticWindow(exact[0], exact[1], sinks + w, pos, positions, (positions < pos)[None],
                     torch.full((b,), self.buffers[0].tokens, dtype=torch.int32, device=dev),
                     torch.zeros(b, dtype=torch.int32, device=dev), blocks)
        st.view = FusedKV(self.buffers[0].view(capacity=True), self.buffers[1].view(capacity=True), st.keys, st.values,
                          sinks, kv_start=st.kv_start, kv_len=st.kv_len, window_valid=st.valid.expand(b, room),
                          backend=self.backend)
        self._static = st
        self.window_keys = self.window_values = self.sink_keys = self.sink_values = None

    def _format_buffers(self, b: int, h: int, d: int) -> None:
        """Give empty packed buffers their format (dtypes, metadata shapes) from one compressed block of random
        data, then forget the block: the buffers can then reserve capacity before the first real block."""
        gen = torch.Generator(device=self.window_keys.device).manual_seed(0)
        x = torch.randn(b, h, self.config.block_size, d, generator=gen, device=self.window_keys.device)
        for buf, kind in zip(self.buffers, ("key", "value")):
            buf.append(compress(x.to(self.window_keys.dtype), self.config, kind, self.backend))
            buf.truncate(0)

    def _static_append(self, keys: torch.Tensor, values: torch.Tensor):
        """Device work only (capturable): write the token at `pos`, advance `pos` and the window's validity."""
        st = self._static
        if keys.shape[-2] != 1:
            raise ValueError(f"a static store takes one token per step, got {keys.shape[-2]}; call "
                             "leave_static() first")
        st.keys.index_copy_(2, st.pos, keys)
        st.values.index_copy_(2, st.pos, values)
        st.pos.add_(1)
        torch.lt(st.positions, st.pos, out=st.valid[0])
        return st.view, st.view

    def advance(self) -> bool:
        """Host bookkeeping after one static step (outside any graph): count the token and, when the window is
        full, compress its oldest block into the reserved buffers and shift the window down. Returns False if
        the store had to leave static mode (a block that cannot be compressed safely stays exact, which the
        static view cannot serve); decoding then goes on through `append` as usual."""
        st, cfg = self._static, self.config
        if st is None:
            raise ValueError("advance() follows a step of a static store; call make_static first")
        st.count += 1
        self.length += 1
        sinks = st.view.sink_tokens
        if st.count - sinks < cfg.residual_length + cfg.block_size:
            return True
        if self.buffers[0].blocks >= st.max_blocks:
            raise RuntimeError(f"the static store was made for {st.max_blocks} blocks and is full; call "
                               "make_static with more steps")
        cut, end = sinks + cfg.block_size, st.count
        self._compress_blocks(st.keys[:, :, sinks:cut].contiguous(), st.values[:, :, sinks:cut].contiguous(), 1,
                              st.keys.shape[0])
        if len(self.blocks) != self.buffers[0].blocks:  # the block kept exact rows: not in the packed buffers
            self._leave_static(drop=cfg.block_size)
            return False
        for t in (st.keys, st.values):  # the window moves down over the compressed block (same addresses)
            t[:, :, sinks:end - cfg.block_size] = t[:, :, cut:end].clone()
        st.count -= cfg.block_size
        st.pos.fill_(st.count)
        torch.lt(st.positions, st.pos, out=st.valid[0])
        st.kv_len.fill_(self.buffers[0].tokens)
        return True

    def leave_static(self) -> None:
        """Back to the ordinary (dynamic) store, same tokens (and any deferred compression done)."""
        self.settle()
        if self._static is not None:
            self._leave_static()

    def _leave_static(self, drop: int = 0) -> None:
        st = self._static
        sinks = st.view.sink_tokens
        if sinks:
            self.sink_keys, self.sink_values = st.keys[:, :, :sinks].clone(), st.values[:, :, :sinks].clone()
        self.window_keys = st.keys[:, :, sinks + drop:st.count].clone()
        self.window_values = st.values[:, :, sinks + drop:st.count].clone()
        self._static = None
