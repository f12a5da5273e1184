"""`PageFormat`: how one compressed KV block of one layer (all its kv heads) lies in the bytes of one paged-cache page.

A page holds `block_size` tokens of every kv head of one layer. For method "none" it holds the keys and then the
values in the model's dtype (the stock layout's bytes, so the page size is unchanged). For a compressing method it
holds the block's `CompressedKV` of the keys and then of the values, each tensor (codes, scales, zero points, fp16
local tensors) flattened in a fixed order; the page size is their sum, rounded up so that it splits into
`kv_heads x block_size` cells of a whole number of model-dtype elements (the page shape a paged engine allocates).

A block the codec cannot compress safely (non-finite input, an overflowing scale) has no bytes in its page: `pack`
reports it in its mask and the caller keeps that block exact elsewhere (`paged.PagedLayer`). Pure torch, no engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch

from ...api import compress, decompress
from ...compressed import CompressedKV
from ...config import DecoQuantConfig
from ...format import KVFormat
from ...kernels.layout import PackedKV
from ...options import KINDS


@dataclass(frozen=True)
class _Field:
    kind: str
    name: str  # "codes" or a params key
    shape: tuple[int, ...]  # per block (the batch dim dropped)
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class PageFormat:
    """The byte layout of one page: `config` (a DecoQuantConfig), a layer's `kv_heads` and `head_dim`, and the
    model's `dtype`. `page_bytes` is the page's size, `cell_bytes` that of one (kv head, token) cell."""

    def __init__(self, config: DecoQuantConfig, kv_heads: int, head_dim: int, dtype: torch.dtype):
        if not isinstance(config, DecoQuantConfig):
            raise ValueError(f"config must be a decoquant.DecoQuantConfig, got {type(config).__name__}")
        if config.residual_length != config.block_size:
            raise ValueError(f"a paged cache keeps exactly the filling page in full precision, so residual_length "
                             f"must equal block_size ({config.block_size}); got {config.residual_length}")
        config.check_head_dim(head_dim)
        self.config, self.kv_heads, self.head_dim, self.dtype = config, kv_heads, head_dim, dtype
        self.block_size = config.block_size
        self.shape = (kv_heads, self.block_size, head_dim)
        elem = torch.empty((), dtype=dtype).element_size()
        if config.method == "none":
            self.fields, self.n_codes = (), {}
            content = 2 * prod(self.shape) * elem
        else:
            self.fields, self.n_codes = self._template()
            content = sum(f.nbytes for f in self.fields)
        cells = kv_heads * self.block_size
        self.cell_bytes = -(-content // (cells * elem)) * elem
        self.page_bytes = self.cell_bytes * cells
        self.content_bytes = content

    def _template(self):
        """The fields of one block's CompressedKV, read off a compressed random block (shapes depend only on the
        config and the block's shape)."""
        x = torch.randn(1, *self.shape, generator=torch.Generator().manual_seed(0))
        fields, n_codes = [], {}
        for kind in KINDS:
            c = compress(x, self.config, kind, backend="torch")
            n_codes[kind] = c.n_codes
            for name, t in ([("codes", c.codes)] if c.codes is not None else []) + sorted(c.params.items()):
                fields.append(_Field(kind, name, tuple(t.shape[1:]), t.dtype))
        return tuple(fields), n_codes

    @property
    def compresses(self) -> bool:
        return self.config.method != "none"

    @property
    def bits_per_element(self) -> float:
        """Stored bits per key or value element, the page's padding included."""
        return 8.0 * self.page_bytes / (2 * prod(self.shape))

    def pack(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pages of n full blocks: keys, values [n, kv_heads, block_size, head_dim] -> (uint8 [n, page_bytes],
        bool [n]: the blocks whose pages hold nothing because they must be kept exact)."""
        n = keys.shape[0]
        if tuple(keys.shape[1:]) != self.shape or keys.shape != values.shape:
            raise ValueError(f"keys and values must be [n, {', '.join(map(str, self.shape))}], got "
                             f"{tuple(keys.shape)} and {tuple(values.shape)}")
        out = torch.zeros(n, self.page_bytes, dtype=torch.uint8, device=keys.device)
        if not self.compresses:
            raw = torch.cat([keys.to(self.dtype).reshape(n, -1), values.to(self.dtype).reshape(n, -1)], 1)
            out[:, :self.content_bytes] = raw.view(torch.uint8)
            return out, torch.zeros(n, dtype=torch.bool, device=keys.device)
        compressed = {kind: compress(x, self.config, kind)  # the compression kernels on CUDA
                      for kind, x in zip(KINDS, (keys, values))}
        for f, chunk in self._field_bytes(out):
            c = compressed[f.kind]
            t = c.codes if f.name == "codes" else c.params[f.name]
            chunk.copy_(t.contiguous().view(n, -1).view(torch.uint8))
        exact = compressed["key"].exact_mask | compressed["value"].exact_mask
        out[exact] = 0
        return out, exact

    def packed(self, pages: torch.Tensor) -> tuple[PackedKV, PackedKV]:
        """The keys' and values' `PackedKV` of every page, as paged blocks (`kernels.layout`: one block per page),
        strided views into uint8 pages [num_pages, page_bytes] (no copy): what the decode kernels read through a
        block table. Needs a format the kernels read (`fused_problem` says why not)."""
        problem = self.fused_problem()
        if problem is not None:
            raise ValueError(f"the decode kernels cannot read these pages: {problem}")
        self._check(pages)
        n, size, fmt = pages.shape[0], self.block_size, KVFormat.of(self.config)
        views = {kind: {} for kind in KINDS}
        for f, chunk in self._field_bytes(pages):
            views[f.kind][f.name] = chunk.view(f.dtype)
        out = []
        for kind in KINDS:
            t, spec = views[kind], fmt.scales(kind)
            cg = spec.channel_group
            scale_shape = (n, self.kv_heads, size // cg, self.head_dim) if cg else (n, -1, size)
            zeros = t["zero"].view(scale_shape) if "zero" in t else None
            out.append(PackedKV(t["codes"].view(n, self.kv_heads, size, -1), t["scale"].view(scale_shape),
                                t["site2"].view(n, -1, 1, spec.group_size, spec.group_size), spec.bits, size,
                                spec.group_size, zeros, cg))
        return out[0], out[1]

    def _field_bytes(self, pages: torch.Tensor):
        """(field, its bytes in every page: a uint8 view [n, field bytes]) in the page's order."""
        at = 0
        for f in self.fields:
            yield f, pages[:, at:at + f.nbytes]
            at += f.nbytes

    def _check(self, pages: torch.Tensor) -> None:
        if pages.dtype != torch.uint8 or pages.dim() != 2 or pages.shape[1] != self.page_bytes:
            raise ValueError(f"pages must be uint8 [n, {self.page_bytes}], got {pages.dtype} {tuple(pages.shape)}")

    def fused_problem(self) -> str | None:
        """Why the decode kernels cannot read these pages through a block table (None: they can)."""
        if not self.compresses:
            return "method 'none' stores the model's dtype"
        return KVFormat.of(self.config).fused_problem()

    def unpack(self, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) [n, kv_heads, block_size, head_dim] in the model's dtype, decoded from uint8 pages
        [n, page_bytes] that `pack` wrote (blocks it reported exact decode to zeros: the caller overrides them)."""
        self._check(pages)
        n = pages.shape[0]
        if not self.compresses:
            raw = pages[:, :self.content_bytes].contiguous().view(self.dtype).view(n, 2, *self.shape)
            return raw[:, 0], raw[:, 1]
        tensors = {kind: {} for kind in KINDS}
        for f, chunk in self._field_bytes(pages):
            tensors[f.kind][f.name] = chunk.contiguous().view(f.dtype).view(n, *f.shape)
        out = []
        for kind in KINDS:
            params = dict(tensors[kind])
            codes = params.pop("codes", None)
            c = CompressedKV(self.config, kind, (n, *self.shape), self.dtype, codes, self.n_codes[kind], params,
                             exact_mask=torch.zeros(n, dtype=torch.bool, device=pages.device))
            out.append(decompress(c))
        return out[0], out[1]
