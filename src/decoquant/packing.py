"""Pack B-bit unsigned codes (B in 2, 3, 4, 8) into bytes along the last dimension.

Bit order (written down once, used by every kernel):
- B = 2, 4, 8: the last dimension is cut into runs of 8 codes; run k becomes B bytes. Code i of a run
  (i = 0..7) occupies bits [i*B, (i+1)*B) of the run's 8*B-bit little-endian word, least significant bit first.
  Hence 8 bit: one code per byte; 4 bit: byte j holds code 2j in its low nibble and code 2j+1 in its high nibble;
  2 bit: byte j holds codes 4j..4j+3, code 4j in bits 0-1.
- B = 3: two parts, one after the other: the codes' low 2 bits packed as 2-bit codes, then their high bits packed
  1 bit per code (byte m holds the high bits of codes 8m..8m+7, code 8m in bit 0). A run of 8 codes still takes 3
  bytes, and a kernel reads the first part exactly as 2-bit codes (the same bit planes, no byte shuffles).
For B < 8 a last dimension that is not a multiple of 8 is padded with zero codes (each part of a 3-bit row is
padded); `unpack_codes` needs the original length.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; allowed values: {SUPPORTED_BITS}")


def packed_length(n: int, bits: int) -> int:
    """Bytes that `n` codes of `bits` bits take after packing."""
    _check_bits(bits)
    return n if bits == 8 else -(-n // 8) * bits


def _pack_runs(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] of bits 1, 2 or 4 -> runs of 8 codes in `bits` bytes each (the module's order)."""
    pad = (-codes.shape[-1]) % 8
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    runs = codes.reshape(*codes.shape[:-1], -1, 8).to(torch.int32)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int32) * bits
    words = (runs << shifts).sum(-1, keepdim=True, dtype=torch.int32)  # [..., n/8, 1], 8*bits <= 32 bits
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int32) * 8
    packed = (words >> byte_shifts) & 0xFF  # [..., n/8, bits]
    return packed.to(torch.uint8).reshape(*codes.shape[:-1], -1)


def _unpack_runs(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `_pack_runs`."""
    groups = packed.reshape(*packed.shape[:-1], -1, bits).to(torch.int32)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int32) * 8
    words = (groups << byte_shifts).sum(-1, keepdim=True, dtype=torch.int32)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32) * bits
    codes = (words >> shifts) & (2**bits - 1)
    return codes.to(torch.uint8).reshape(*packed.shape[:-1], -1)[..., :n]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: uint8 [..., n] with values < 2**bits -> uint8 [..., packed_length(n, bits)]."""
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be torch.uint8, got {codes.dtype}")
    if bits == 8:
        return codes.contiguous()
    if bits == 3:
        return torch.cat([_pack_runs(codes & 3, 2), _pack_runs(codes >> 2, 1)], dim=-1)
    return _pack_runs(codes, bits)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 [..., packed_length(n)] -> uint8 [..., n]."""
    _check_bits(bits)
    if packed.shape[-1] != packed_length(n, bits):
        raise ValueError(f"packed last dim {packed.shape[-1]} does not hold n={n} codes of {bits} bits")
    if bits == 8:
        return packed
    if bits == 3:
        low = packed.shape[-1] // 3 * 2
        return _unpack_runs(packed[..., :low], 2, n) | (_unpack_runs(packed[..., low:], 1, n) << 2)
    return _unpack_runs(packed, bits, n)
