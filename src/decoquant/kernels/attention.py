"""Decode attention over [compressed blocks | exact window] and block dequantization: backend choice
(the split partials and the window are merged by triton/merge.py)."""

from __future__ import annotations

from functools import lru_cache

import torch

from ..format import Backend, dequantize_problem
from .layout import ExactBlocks, PackedKV
from .reference import decode_attention_reference, dequantize_packed, gather_pages


@lru_cache(maxsize=64)
def _whole_cache(batch: int, tokens: int, device: torch.device):
    """(kv_start, kv_len) that attend every compressed token; cached (read-only) since a decode step
    calls this once per layer."""
    return (torch.zeros(batch, dtype=torch.int32, device=device),
            torch.full((batch,), tokens, dtype=torch.int32, device=device))


def decode_attention(q: torch.Tensor, k: PackedKV, v: PackedKV, sm_scale: float,
                     kv_start: torch.Tensor | None = None, kv_len: torch.Tensor | None = None,
                     window_k: torch.Tensor | None = None, window_v: torch.Tensor | None = None,
                     window_valid: torch.Tensor | None = None, exact: ExactBlocks | None = None,
                     skip: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
                     backend: str = "auto", fuse_window: bool = True, **kernel_options) -> torch.Tensor:
    """softmax(q K^T * sm_scale) V over compressed blocks then the exact window, fp32 [B, Hq, D].

    q [B, Hq, D]; k/v: PackedKV; kv_start/kv_len int [B] bound the attended compressed tokens
    (default: all); window_k/v [B, KVH, W, D], window_valid bool [B, W] (default: all); exact: rows of blocks
    stored exact (`ExactBlocks`): the kernel skips those blocks and their tokens join the window; skip int8 [B, NB']:
    blocks not attended, whose tokens the caller puts in the window itself (not with `exact`). block_table int32
    [B, NB]: k/v are paged blocks, one per page (`layout`), and block n of row b is page block_table[b, n]. backend:
    "triton" (the fused kernel), "torch" (the dequantizing reference) or "auto" (triton on CUDA, torch elsewhere).
    fuse_window: the tensor-core kernel attends the window in the blocks' launch (programs past the block splits)
    and the merge reads one set of partials: one launch fewer, faster or level on every shape measured (gpu.md);
    False attends it in a launch of its own, as the rows kernel always does.
    """
    if exact is not None and skip is not None:
        raise ValueError("pass exact (ExactBlocks, which carry their own skip) or skip, not both")
    if exact is not None:
        window_k, window_v, window_valid = _join_exact(exact, k.block_size, kv_start, kv_len, window_k, window_v,
                                                       window_valid)
        skip = exact.skip
    if Backend.parse(backend).on(q.is_cuda) is Backend.TORCH:
        if block_table is not None:
            k, v = gather_pages(k, block_table), gather_pages(v, block_table)
        return decode_attention_reference(q, k, v, sm_scale, kv_start, kv_len, window_k, window_v, window_valid,
                                          skip)
    from .triton.decode_attention import decode_blocks_partials
    from .triton.launch import choose_kernel
    from .triton.merge import merge_with_window

    b = q.shape[0]
    if kv_start is None or kv_len is None:
        tokens = k.tokens if block_table is None else block_table.shape[1] * k.block_size
        start, length = _whole_cache(b, tokens, q.device)
        kv_start = start if kv_start is None else kv_start
        kv_len = length if kv_len is None else kv_len
    window = dict(window_k=window_k, window_v=window_v, window_valid=window_valid)
    kernel_options["kernel"] = choose_kernel(q.shape[1], k, v, kernel_options.get("low_precision", True),
                                             kernel_options.get("kernel", "auto"))
    in_launch = fuse_window and window_k is not None and kernel_options["kernel"] == "mma"
    o, m, l_ = decode_blocks_partials(q, k, v, sm_scale, kv_start.to(torch.int32), kv_len.to(torch.int32),
                                      skip=skip, block_table=None if block_table is None
                                      else block_table.to(torch.int32), **(window if in_launch else {}),
                                      **kernel_options)
    return merge_with_window(q, o, m, l_, sm_scale, **({} if in_launch else window))


def _join_exact(exact: ExactBlocks, block_size: int, kv_start, kv_len, window_k, window_v, window_valid):
    """The window with the exact blocks' tokens appended (their order does not matter to attention)."""
    ok = exact.valid(block_size, kv_start, kv_len)
    if window_k is None:
        return exact.keys, exact.values, ok
    if window_valid is None:
        window_valid = torch.ones(ok.shape[0], window_k.shape[2], dtype=torch.bool, device=ok.device)
    return (torch.cat([window_k, exact.keys.to(window_k.dtype)], 2),
            torch.cat([window_v, exact.values.to(window_v.dtype)], 2), torch.cat([window_valid.to(ok.device), ok], 1))


def dequantize(p: PackedKV, dtype: torch.dtype = torch.float16, backend: str = "auto") -> torch.Tensor:
    """Dense [B, KVH, T, D] K or V from packed blocks (prefill and multi-token steps). backend:
    "triton", "torch" (the reference) or "auto" (triton on CUDA where it reads the format, else torch)."""
    backend, problem = Backend.parse(backend), dequantize_problem(p.symmetric, p.channel_group)
    if backend is Backend.TRITON and problem is not None:
        raise ValueError(f"backend='triton' cannot dequantize these blocks: {problem}; use backend='torch' or 'auto'")
    if backend.on(p.codes.is_cuda and problem is None) is Backend.TORCH:
        return dequantize_packed(p).to(dtype)
    from .triton.dequantize import dequantize_packed_triton

    return dequantize_packed_triton(p, dtype)
