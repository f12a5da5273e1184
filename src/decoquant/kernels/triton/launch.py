"""How the decode kernels are launched: the tensor-core kernel's tile, stacked scale groups and query rows per
program, the split count from the SM count, the kernel choice (tensor cores or rows) and the code conversion each
reads. Policy only, measured where stated; the kernels are decode_attention.py and decode_rows.py."""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import triton

from ..layout import PackedKV
from .codes import convert_asm, pair_asm, three_asm


def _tile(k: PackedKV, tile: int | None, group: int, max_rows: int = 16,
          starved: bool = False) -> tuple[int, int, int]:
    """(tokens per step, scale groups stacked per step, query rows per program) of the mma kernel.

    Keys with per-channel scales over groups of cg tokens step by `stack` groups at once, each in its own rows
    of the tile, where rows * stack <= max_rows (H200, default preset, GQA-4, batch 8 x 32k: 0.393 -> 0.238 ms
    for one 128-token step instead of two 64-token ones). Else a program steps by one group with all `group`
    rows, except at 2 or 3 bits or where the GPU is `starved` (one block per split still leaves SMs idle), where
    the group's rows are split over programs until they fit (MQA, batch 8 x 32k: paper preset 0.094 -> 0.062 ms,
    default 0.123 -> 0.125; 3 bits, H100, default 0.179 -> 0.161; at 4 bits the split measured slower there, 0.064
    -> 0.069 and 0.094 -> 0.133, since the blocks are read once per program, but faster at batch 1 x 4k: 0.014 ->
    0.013 and 0.017 -> 0.013).
    """
    want = min(tile or 128, k.block_size)
    cg = k.channel_group
    stack = want // cg if cg and want % cg == 0 else 1
    rows = group
    if rows * stack > max_rows and (k.bits in (2, 3) or starved):
        while rows * stack > max_rows and rows % 2 == 0:
            rows //= 2
    if rows * stack > max_rows:
        stack = 1
    return (cg * stack if cg else want), stack, rows


def _value_words(codes: torch.Tensor) -> torch.Tensor | None:
    """The value codes [B, H, T, C] as int16 words [B, H, T, C / 2] (a view), or None where the bytes do not pair
    up (an odd row length, stride or offset)."""
    if codes.stride(-1) != 1 or codes.shape[-1] % 2 or codes.storage_offset() % 2 \
            or any(st % 2 for st in codes.stride()[:-1]):
        return None
    return codes.view(torch.int16)


def _conversion(p: PackedKV, use_asm: bool, pair: bool = False) -> str:
    """The PTX converting p's codes (`codes.convert_asm`, `codes.pair_asm` for int16 word pairs, `codes.three_asm`
    at 3 bits), or "" where the kernel converts by arithmetic: off the GPU and with fp32 dots."""
    if not use_asm:
        return ""
    if p.bits == 3:
        return three_asm(p.qmax)
    return (pair_asm if pair else convert_asm)(p.bits, p.qmax)


KERNELS = ("auto", "mma", "rows")


def choose_kernel(q_heads: int, k: PackedKV, v: PackedKV, low_precision: bool = True, kernel: str = "auto") -> str:
    """The kernel that `decode_blocks_partials` runs: "rows" or "mma" (see its `kernel` argument)."""
    from .decode_rows import rows_kernel_supports

    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not supported; allowed values: {KERNELS}")
    if kernel == "mma":
        return kernel
    rows_ok = rows_kernel_supports(q_heads, k.codes.shape[1], k, v, low_precision)
    if kernel == "rows" and not rows_ok:
        raise ValueError("kernel='rows' reads one query row per kv head, 2/4-bit codes, per-token value scales "
                         "and low_precision=True; use kernel='mma' or 'auto'")
    return "rows" if kernel == "rows" or kernel == "auto" and rows_ok else "mma"


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sms(device: torch.device) -> int:
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4


def _starved(heads: int, n_blocks: int, device: torch.device, per_sm: int = 4) -> bool:
    """Whether `heads` (sequence, kv head) pairs of `n_blocks` blocks each, one block per split, make fewer than
    `per_sm` programs per SM."""
    return heads * n_blocks < per_sm * _sms(device)


def _num_splits(programs: int, n_blocks: int, device: torch.device, per_sm: int, round_up: bool = True) -> int:
    """Splits of each sequence's blocks: about `per_sm` programs per SM, rounded up (or down) to a power of two.

    The rows kernel (one-warp programs) takes 16 per SM rounded up. The tensor-core kernel takes 2 per SM rounded
    down (H100, graph-timed, default preset at 4 bits; old rule of 4 per SM rounded up -> this one, us):
    batch 1 x 32k, 1 / 4 / 8 kv heads: 53.1 -> 26.5, 56.1 -> 26.7, 50.6 -> 40.4 (the merge read 512 partials
    per query head and spilled); batch 8 x 32k: 98.4 -> 84.7, 135.6 -> 128.4, 238.7 -> 234.4; batch 1 x 4k:
    one block per split either way. Earlier, batch 8 x 8 kv heads x 32k: 5 splits 0.37 ms, 4 or 8 splits 0.28 ms.
    """
    want = per_sm * _sms(device) / max(programs, 1)
    splits = triton.next_power_of_2(math.ceil(want)) if round_up else 1 << (max(1, int(want)).bit_length() - 1)
    return max(1, min(n_blocks, splits))
