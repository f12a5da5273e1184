"""`PagedLayer`: one attention layer's KV in a paged engine's pages, and the torch reference attention over it.

The engine hands each layer one tensor of pages (`[num_pages, page_bytes]` as uint8 here) and, per step, where each
new token goes (a slot: page * block_size + offset). A compressing `PagedLayer` keeps every page that is still
filling in full precision beside the pages (`filling`: page -> its tokens so far), and packs it into its page the
step its last token arrives (`pages.PageFormat`), so only full pages are compressed, as in `DecoQuantCache`. The
first write at offset 0 starts a page afresh: that is how a page the engine freed and handed out again (preemption,
a finished request) is told apart. Full pages are never written again, so pages shared between requests (prefix
caching) stay valid. Beside the pages it also keeps, in full precision: the blocks the codec could not compress
safely (`exact`), and each sequence's first `sink_tokens` tokens (`sinks`), as `DecoQuantCache` does.

The engine does not say when it frees a page, so a request that ends leaves its last, partly filled page in
`filling` until the page is handed out again. `max_filling` bounds them: beyond it, the pages written longest ago
are spilled, i.e. packed as they are (the missing tokens as zeros) with their length recorded (`spilled`); a spilled
page that gets written again (its request was only waiting) is decoded back into `filling` first, so nothing is lost,
only its tokens so far are read compressed.

Attention (`attend`) follows the cache's semantics: the tokens of a step attend to each other exactly and to the
earlier tokens through the cache, as the pages hold them after the step's writes (a page that this step fills is read
compressed). Pure torch, no engine import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .pages import PageFormat


@dataclass
class _Filling:
    keys: torch.Tensor  # [kv_heads, block_size, head_dim], the model's dtype
    values: torch.Tensor
    written: torch.Tensor  # bool [block_size]
    last: int = 0  # the write call that last wrote it


class PagedLayer:
    """The state of one layer's pages beside the page bytes (see the module docstring)."""

    def __init__(self, fmt: PageFormat, sink_tokens: int = 0, max_filling: int | None = None):
        if not 0 <= sink_tokens <= fmt.block_size:
            raise ValueError(f"sink_tokens must be in [0, {fmt.block_size}] (one page), got {sink_tokens}")
        if max_filling is not None and max_filling < 1:
            raise ValueError(f"max_filling must be None or >= 1, got {max_filling}")
        self.fmt, self.block_size, self.sink_tokens = fmt, fmt.block_size, sink_tokens
        self.max_filling = max_filling
        self.filling: dict[int, _Filling] = {}
        self.spilled: dict[int, int] = {}  # page -> tokens it holds (packed before it was full)
        self.spills = 0  # pages spilled so far (a count for reports)
        self._calls = 0
        self.exact: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sinks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # page -> keys, values [kv_heads, s, d]
        self.packed_pages = 0  # pages compressed so far (a count for reports)
        self.decoded = 0  # decode tokens attended through `decode` so far (a count for reports)
        self._views = None  # (the pages' address and shape, their PackedKV views): built once, not per step

    @property
    def side_bytes(self) -> int:
        """Bytes held beside the pages: the filling pages, the exact blocks and the sinks."""
        total = 0
        for f in self.filling.values():
            total += 2 * f.keys.numel() * f.keys.element_size()
        for k, v in list(self.exact.values()) + list(self.sinks.values()):
            total += k.numel() * k.element_size() + v.numel() * v.element_size()
        return total

    # ---------------------------------------------------------------- writes
    def write(self, pages: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
              positions: torch.Tensor) -> None:
        """Store new tokens: keys, values [tokens, kv_heads, head_dim] at `slots` [tokens] of `pages`
        (uint8 [num_pages, page_bytes]); `positions` [tokens] are their positions in their sequences."""
        if not self.fmt.compresses:
            self._write_raw(pages, keys, values, slots)
            return
        size = self.block_size
        page_of, offset = (slots // size).tolist(), (slots % size).tolist()
        self._calls += 1
        full = []
        for i, (p, o) in enumerate(zip(page_of, offset)):
            if o == 0 or p not in self.filling:
                if o == 0:
                    self._start(p, keys)
                elif self.spilled.get(p) == o:
                    self._unspill(pages, p)
                else:
                    raise RuntimeError(f"a token was written at offset {o} of page {p}, which is not filling: a page "
                                       "is written from its first token to its last, once")
            f = self.filling[p]
            f.keys[:, o], f.values[:, o] = keys[i], values[i]
            f.written[o] = True
            f.last = self._calls
            if int(positions[i]) < self.sink_tokens:
                self._sink(p, o, keys[i], values[i])
            if o == size - 1:
                full.append(p)
        for p in full:
            if not bool(self.filling[p].written.all()):
                raise RuntimeError(f"page {p} reached its last offset with tokens missing")
        if full:
            self._pack(pages, full)
            self.packed_pages += len(full)
        if self.max_filling is not None and len(self.filling) > self.max_filling:
            idle = sorted((f.last, p) for p, f in self.filling.items() if f.last < self._calls)
            self._spill(pages, [p for _, p in idle[:len(self.filling) - self.max_filling]])

    def _start(self, page: int, like: torch.Tensor) -> None:
        h, d = like.shape[1:]
        z = like.new_zeros(h, self.block_size, d)
        self.filling[page] = _Filling(z, z.clone(), torch.zeros(self.block_size, dtype=torch.bool))
        self.exact.pop(page, None)
        self.sinks.pop(page, None)
        self.spilled.pop(page, None)

    def _spill(self, pages: torch.Tensor, idle: list[int]) -> None:
        lengths = {p: int(self.filling[p].written.sum()) for p in idle}
        for p in idle:
            if not bool(self.filling[p].written[:lengths[p]].all()):
                raise RuntimeError(f"page {p} has gaps among its written tokens")
        self._pack(pages, idle)
        self.spilled.update(lengths)
        self.spills += len(idle)

    def _unspill(self, pages: torch.Tensor, page: int) -> None:
        n = self.spilled.pop(page)
        if page in self.exact:
            k, v = self.exact.pop(page)
        else:
            k, v = (t[0] for t in self.fmt.unpack(pages[page:page + 1]))
        written = torch.zeros(self.block_size, dtype=torch.bool)
        written[:n] = True
        self.filling[page] = _Filling(k.clone(), v.clone(), written)

    def _sink(self, page: int, offset: int, key: torch.Tensor, value: torch.Tensor) -> None:
        k, v = self.sinks.get(page, (key.new_zeros(key.shape[0], 0, key.shape[1]),) * 2)
        if offset != k.shape[1]:
            raise RuntimeError(f"sink token at offset {offset} of page {page} arrived out of order")
        self.sinks[page] = (torch.cat([k, key[:, None]], 1), torch.cat([v, value[:, None]], 1))

    def _pack(self, pages: torch.Tensor, ids: list[int]) -> None:
        """Pack the filling pages `ids` into their pages, as they are (their unwritten tokens are zeros)."""
        fills = [self.filling.pop(p) for p in ids]
        keys, values = torch.stack([f.keys for f in fills]), torch.stack([f.values for f in fills])
        packed, exact = self.fmt.pack(keys, values)
        pages[torch.tensor(ids, device=pages.device)] = packed.to(pages.device)
        for i in exact.nonzero().flatten().tolist():
            self.exact[ids[i]] = (keys[i], values[i])

    def _write_raw(self, pages, keys, values, slots) -> None:
        h, size, d = self.fmt.shape
        view = pages.view(self.fmt.dtype)[:, :2 * h * size * d].view(-1, 2, h, size, d)
        p, o = slots // size, slots % size
        view[p, 0, :, o] = keys.to(self.fmt.dtype)
        view[p, 1, :, o] = values.to(self.fmt.dtype)

    # ---------------------------------------------------------------- reads
    def read(self, pages: torch.Tensor, page_ids: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` tokens of a sequence whose pages are `page_ids` (in order): keys, values
        [kv_heads, length, head_dim] in the model's dtype."""
        h, size, d = self.fmt.shape
        n_full, rest = divmod(length, size)
        need = page_ids[:n_full + (rest > 0)]
        if len(need) * size < length:
            raise ValueError(f"{len(page_ids)} pages cannot hold {length} tokens")
        blocks_k, blocks_v = [None] * len(need), [None] * len(need)
        packed = [j for j, p in enumerate(need) if p not in self.filling and p not in self.exact]
        if packed:
            idx = torch.tensor([need[j] for j in packed], device=pages.device)
            k, v = self.fmt.unpack(pages[idx])
            for i, j in enumerate(packed):
                blocks_k[j], blocks_v[j] = k[i], v[i]
        for j, p in enumerate(need):
            if p in self.filling:
                f = self.filling[p]
                if j < n_full or not bool(f.written[:rest].all()):
                    raise RuntimeError(f"page {p} is read past the tokens written to it")
                blocks_k[j], blocks_v[j] = f.keys, f.values
            elif p in self.exact:
                blocks_k[j], blocks_v[j] = self.exact[p]
            if p in self.spilled and (j < n_full or rest > self.spilled[p]):
                raise RuntimeError(f"page {p} is read past the {self.spilled[p]} tokens it held when it was spilled")
            if p in self.sinks:
                sk, sv = self.sinks[p]
                blocks_k[j], blocks_v[j] = blocks_k[j].clone(), blocks_v[j].clone()
                blocks_k[j][:, :sk.shape[1]], blocks_v[j][:, :sv.shape[1]] = sk, sv
        if not need:
            z = pages.new_zeros((h, 0, d), dtype=self.fmt.dtype)
            return z, z
        return torch.cat(blocks_k, 1)[:, :length], torch.cat(blocks_v, 1)[:, :length]

    def decode(self, pages: torch.Tensor, query: torch.Tensor, block_table: torch.Tensor, seq_lens: list[int],
               scale: float, backend: str = "auto", device_table: torch.Tensor | None = None) -> torch.Tensor:
        """One decode token per sequence, after the step's writes: query [R, heads, d] (the last of each sequence's
        `seq_lens` tokens) attends all of them -> [R, heads, d] in query's dtype. The packed pages are read in
        place through `block_table` int [R, max_pages] (on the host; `device_table`: the same on the query's
        device, where the caller has it) by the decode kernels (`backend` "auto": the fused
        kernel on CUDA, the torch reference elsewhere); the filling page, the sinks and the exact blocks are
        attended exactly as the kernels' window. Needs pages the kernels read (`PageFormat.fused_problem`)."""
        from ...kernels.attention import decode_attention

        key = (pages.data_ptr(), tuple(pages.shape))  # the engine hands the same page memory every step
        if self._views is None or self._views[0] != key:
            self._views = (key, self.fmt.packed(pages))
        k, v = self._views[1]
        size, r = self.block_size, len(seq_lens)
        table = block_table.tolist()
        kv_start, kv_len = [0] * r, [0] * r
        skip = torch.zeros(r, max(block_table.shape[1], 1), dtype=torch.int8)
        window: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(r)]
        for i, length in enumerate(seq_lens):
            need = table[i][:-(-length // size)]
            if len(need) * size < length:
                raise ValueError(f"{len(table[i])} pages cannot hold {length} tokens")
            # set operations, not a loop over pages: long sequences hold hundreds of pages, the side dicts few
            held = set(need)
            last, rest = need[-1] if need else None, length - (len(need) - 1) * size
            early = set(need[:-1]) & self.filling.keys()  # only the last page may still be filling
            if early:
                raise RuntimeError(f"page {min(early)} is read past the tokens written to it")
            packed = len(need)
            if last in self.filling:
                f = self.filling[last]
                if not bool(f.written[:rest].all()):
                    raise RuntimeError(f"page {last} is read past the tokens written to it")
                window[i].append((f.keys[:, :rest], f.values[:, :rest]))
                packed -= 1
            for p in held & self.spilled.keys():
                if p != last or rest > self.spilled[p]:
                    raise RuntimeError(f"page {p} is read past the {self.spilled[p]} tokens it held when it was "
                                       "spilled")
            kv_len[i] = min(length, packed * size)
            for j in sorted(need.index(p) for p in held & self.exact.keys()):
                if j < packed:
                    skip[i, j] = 1
                    k_ex, v_ex = self.exact[need[j]]
                    n = min(size, length - j * size)
                    window[i].append((k_ex[:, :n], v_ex[:, :n]))
            if packed and need[0] in self.sinks and need[0] not in self.exact:  # the sinks: attended exactly
                sk, sv = self.sinks[need[0]]
                kv_start[i] = sk.shape[1]
                window[i].append((sk, sv))
        dev = query.device
        wk, wv, valid = _pad_windows(window, query.dtype, dev)
        out = decode_attention(query, k, v, scale, torch.tensor(kv_start, device=dev),
                               torch.tensor(kv_len, device=dev), wk, wv, valid, skip=skip.to(dev),
                               block_table=(block_table if device_table is None else device_table).to(
                                   device=dev, dtype=torch.int32), backend=backend)
        self.decoded += r
        return out.to(query.dtype)


def _pad_windows(window: list[list[tuple[torch.Tensor, torch.Tensor]]], dtype: torch.dtype, device):
    """Each sequence's exact (keys, values) pieces [kv_heads, n, d] joined and padded to one window: (keys,
    values [R, kv_heads, W, d], valid bool [R, W]), or Nones where no sequence has any."""
    joined = [(torch.cat([k for k, _ in w], 1), torch.cat([v for _, v in w], 1)) if w else None for w in window]
    width = max((j[0].shape[1] for j in joined if j is not None), default=0)
    if not width:
        return None, None, None
    h, d = next(j for j in joined if j is not None)[0].shape[::2]
    keys = torch.zeros(len(window), h, width, d, dtype=dtype, device=device)
    values = torch.zeros_like(keys)
    valid = torch.zeros(len(window), width, dtype=torch.bool, device=device)
    for i, j in enumerate(joined):
        if j is not None:
            n = j[0].shape[1]
            keys[i, :, :n], values[i, :, :n], valid[i, :n] = j[0], j[1], True
    return keys, values, valid


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
           past: int) -> torch.Tensor:
    """Causal attention of one sequence's new tokens: query [q, heads, d]; keys, values [kv_heads, past + q, d]
    (the `past` cached tokens, then the q new ones); query token j sits at position past + j. -> [q, heads, d]."""
    q = query.shape[0]
    total = keys.shape[1]
    mask = torch.ones(q, total, dtype=torch.bool, device=query.device).tril(diagonal=past)
    out = F.scaled_dot_product_attention(query.transpose(0, 1)[None], keys[None].to(query.dtype),
                                         values[None].to(query.dtype), attn_mask=mask, scale=scale,
                                         enable_gqa=query.shape[1] != keys.shape[0])
    return out[0].transpose(0, 1)
